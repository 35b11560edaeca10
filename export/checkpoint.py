"""Reading a checkpoint folder: checks with one-line errors, GGUF -> HF, loading config/tokenizer/model."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from onnxpipe.task_table import EXPORT_TASKS

from .errors import ExportError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model")


@dataclass
class CheckpointSource:
    path: Path
    gguf_file: str | None = None
    hub: dict | None = None   # {"repo_id", "revision", "commit"}: downloaded from the Hugging Face Hub


def inspect_checkpoint(checkpoint) -> CheckpointSource:
    path = Path(checkpoint)
    if not path.exists():
        raise ExportError(f"checkpoint folder {path} does not exist: pass a folder with config.json, weights and tokenizer files")
    if not path.is_dir():
        raise ExportError(f"checkpoint {path} is not a folder: pass the folder that holds config.json (or a .gguf file)")
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if not (path / "config.json").exists():
        if ggufs:
            if len(ggufs) > 1:
                raise ExportError(f"checkpoint folder {path} holds several GGUF files ({', '.join(ggufs)}): keep one")
            return CheckpointSource(path, ggufs[0])
        raise ExportError(f"checkpoint folder {path} has no config.json: pass a transformers checkpoint "
                          "(save it with model.save_pretrained) or a folder holding one .gguf file")
    if not any((path / f).exists() for f in WEIGHT_FILES):
        raise ExportError(f"checkpoint folder {path} has no weights (expected one of {', '.join(WEIGHT_FILES)}): "
                          "save the model with model.save_pretrained")
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        raise ExportError(f"checkpoint folder {path} has no tokenizer files (expected tokenizer.json or a vocab): "
                          "save the tokenizer with tokenizer.save_pretrained into the same folder")
    return CheckpointSource(path)


def load_config(path: Path, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ExportError(f"cannot read config.json in {path}: {_first_line(e)}") from None


def check_task_supported(config, task: str) -> None:
    import optimum.exporters.onnx.model_configs  # noqa: F401  (fills TasksManager's registry)
    from optimum.exporters.tasks import TasksManager

    model_type = config.model_type.replace("_", "-")
    try:
        supported = TasksManager.get_supported_tasks_for_model_type(model_type, "onnx", library_name="transformers")
    except KeyError:
        raise ExportError(f"architecture {config.model_type!r} cannot be exported to ONNX by optimum-onnx: "
                          "no ONNX config is registered for it") from None
    base = {t.replace("-with-past", "") for t in supported}
    if task not in base:
        raise ExportError(f"architecture {config.model_type!r} cannot do task {task!r}; "
                          f"it can do: {', '.join(sorted(t for t in base if t in EXPORT_TASKS)) or 'none of onnxpipe tasks'}")
    if task == "text2text-generation" and not getattr(config, "is_encoder_decoder", False):
        raise ExportError(f"task text2text-generation needs an encoder-decoder model; {config.model_type} is not one")
    if task == "text-generation" and getattr(config, "is_encoder_decoder", False):
        raise ExportError(f"task text-generation is for decoder-only models; {config.model_type} is encoder-decoder: "
                          "use --task text2text-generation")




def load_tokenizer(path: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, use_fast=True,
                                            trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ExportError(f"cannot load the tokenizer in {path}: {_first_line(e)}") from None
    if not tok.is_fast:
        raise ExportError(f"the tokenizer in {path} has no fast (tokenizers) version; onnxpipe needs tokenizer.json")
    return tok


MODEL_CLASSES = {
    "text-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "fill-mask": "AutoModelForMaskedLM",
    "feature-extraction": "AutoModel",
    "text-generation": "AutoModelForCausalLM",
    "text2text-generation": "AutoModelForSeq2SeqLM",
}


def model_class(task: str):
    """The transformers Auto class that loads a checkpoint for `task`."""
    import transformers

    return getattr(transformers, MODEL_CLASSES[task])


def load_model(path: Path, task: str, trust_remote_code: bool = False):
    import torch

    cls = model_class(task)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = cls.from_pretrained(path, local_files_only=True, dtype=torch.float32,
                                        trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ExportError(f"cannot load {path} as {cls.__name__} for {task}: {_first_line(e)}") from None
    model.eval()
    return model


def gguf_to_hf(path: Path, gguf_file: str, dest: Path) -> Path:
    """Dequantize a GGUF causal LM into a float32 transformers checkpoint (needs gguf + accelerate)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
            model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=torch.float32)
    except Exception as e:
        raise ExportError(f"cannot read GGUF file {path / gguf_file}: {_first_line(e)}") from None
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
