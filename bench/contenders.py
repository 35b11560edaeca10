"""The contenders, each built from the same weights with the same thread count.

transformers + torch (fp32, and dynamic int8 via torch.ao.quantization), Optimum's ORTModel
(loaded explicitly from our fp32 export, then given to the transformers pipeline), and onnxpipe's
own pipeline on the plain export, on the fused (--optimize) export, and in int8.
"""
from __future__ import annotations

import importlib
import warnings
from pathlib import Path
from typing import Callable

REFERENCE = "transformers torch fp32"
INT8_DEFAULT = "onnxpipe int8 fused (QInt8 per-channel)"

_TASK_MODULES = {"text-classification": "text_classification", "token-classification": "token_classification",
                 "question-answering": "question_answering", "text-generation": "text_generation"}
_HF_CLASSES = {"text-classification": "AutoModelForSequenceClassification",
               "token-classification": "AutoModelForTokenClassification",
               "question-answering": "AutoModelForQuestionAnswering", "text-generation": "AutoModelForCausalLM"}
_ORT_CLASSES = {"text-classification": "ORTModelForSequenceClassification",
                "token-classification": "ORTModelForTokenClassification",
                "question-answering": "ORTModelForQuestionAnswering", "text-generation": "ORTModelForCausalLM"}


def onnxpipe_has_pipeline(task: str) -> bool:
    try:
        importlib.import_module(f"onnxpipe.tasks.{_TASK_MODULES[task]}")
        return True
    except ImportError:
        return False


def set_torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before the first parallel work
        pass


def transformers_pipeline(task: str, checkpoint: Path, threads: int, int8: bool = False):
    import torch
    import transformers

    set_torch_threads(threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, _HF_CLASSES[task]).from_pretrained(checkpoint, dtype=torch.float32)
        model.eval()
        if int8:
            from torch.ao.quantization import quantize_dynamic

            model = quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        tok = transformers.AutoTokenizer.from_pretrained(checkpoint)
        _ensure_pad(tok, model)
        return transformers.pipeline(task, model=model, tokenizer=tok, device=-1)


def optimum_pipeline(task: str, export_dir: Path, threads: int):
    """Optimum's ORTModel on our plain fp32 export; optimum.pipeline(session_options=...) cannot pickle them."""
    import onnxruntime as ort
    import transformers
    import optimum.onnxruntime as ortm

    from onnxpipe.session import on_process_pool

    so = on_process_pool(ort.SessionOptions(), threads)
    so.log_severity_level = 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs = {"use_cache": True, "use_io_binding": False} if task == "text-generation" else {}
        model = getattr(ortm, _ORT_CLASSES[task]).from_pretrained(export_dir, file_name="model.onnx", session_options=so,
                                                                provider="CPUExecutionProvider", **kwargs)
        tok = transformers.AutoTokenizer.from_pretrained(export_dir)
        _ensure_pad(tok, model)
        return transformers.pipeline(task, model=model, tokenizer=tok, device=-1)


def onnxpipe_pipeline(task: str, export_dir: Path, threads: int, precision: str = "fp32"):
    import onnxpipe

    return onnxpipe.pipeline(task, model=export_dir, precision=precision, intra_op_num_threads=threads)


def _ensure_pad(tok, model) -> None:
    # Batched generation needs a pad token; GPT-2 has none, and transformers' own advice is eos.
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tok.eos_token_id


def encoder_contenders(task: str, checkpoint: Path, plain: Path, opt: Path, threads: int,
                       torch_int8: bool = True) -> dict[str, Callable[[], object]]:
    """name -> zero-argument builder; the builders run one at a time so a failing one is reported, not fatal.

    int8 comes in two flavours: QUInt8 per-tensor weights (ONNX Runtime's default, and the export's
    until it switched) and QInt8 per-channel on the fused graph (the export's default now; u8s8 kernels,
    the fast path on AVX2 CPUs without VNNI).
    """
    from . import artifacts

    out = {
        REFERENCE: lambda: transformers_pipeline(task, checkpoint, threads),
        "transformers torch int8 (dynamic)": lambda: transformers_pipeline(task, checkpoint, threads, int8=True),
        "Optimum ORT fp32": lambda: optimum_pipeline(task, plain, threads),
        "onnxpipe fp32": lambda: onnxpipe_or_session(task, plain, threads),
        "onnxpipe fp32 fused": lambda: onnxpipe_or_session(task, opt, threads),
        "onnxpipe int8 (QUInt8)": lambda: onnxpipe_or_session(task, artifacts.requantized(plain, "quint8"), threads, "int8"),
        INT8_DEFAULT: lambda: onnxpipe_or_session(task, artifacts.requantized(opt, "qint8", per_channel=True), threads, "int8"),
    }
    if not torch_int8:
        out.pop("transformers torch int8 (dynamic)")
    return out


def default_contenders(task: str, checkpoint: Path, folder: Path, threads: int) -> dict[str, Callable[[], object]]:
    """The built-in default (real weights): its own fp32 and int8 files (QInt8 per-channel, as built), Optimum on
    the same fp32 file, and transformers on a checkpoint of the same shapes."""
    return {
        REFERENCE: lambda: transformers_pipeline(task, checkpoint, threads),
        "transformers torch int8 (dynamic)": lambda: transformers_pipeline(task, checkpoint, threads, int8=True),
        "Optimum ORT fp32": lambda: optimum_pipeline(task, folder, threads),
        "onnxpipe fp32": lambda: onnxpipe_or_session(task, folder, threads),
        "onnxpipe int8 (QInt8 per-channel, as built)": lambda: onnxpipe_or_session(task, folder, threads, "int8"),
    }


class SessionOnly:
    """Tokenizer + ONNX session + argmax, for a task whose onnxpipe pipeline is not committed yet.

    It does less than a pipeline (no offsets, no answer-span search), so its figures are marked.
    """

    def __init__(self, task: str, export_dir: Path, threads: int, precision: str = "fp32"):
        import onnxpipe

        self.task = task
        self.model = onnxpipe.ModelDir(export_dir, precision=precision, intra_op_num_threads=threads)
        self.session = self.model.session()

    def __call__(self, inputs=None, *, question=None, context=None, batch_size=None, **_):
        if self.task == "question-answering":
            qs = [question] if isinstance(question, str) else question
            cs = [context] if isinstance(context, str) else context
            feeds = self.model.tokenizer(qs, cs, truncation="only_second", max_length=512)
        else:
            feeds = self.model.tokenizer([inputs] if isinstance(inputs, str) else inputs, truncation=True, max_length=512)
        out = self.session.run(feeds)
        return [v.argmax(-1) for v in out.values()]


def onnxpipe_or_session(task: str, export_dir: Path, threads: int, precision: str = "fp32"):
    if onnxpipe_has_pipeline(task):
        return onnxpipe_pipeline(task, export_dir, threads, precision)
    return SessionOnly(task, export_dir, threads, precision)
