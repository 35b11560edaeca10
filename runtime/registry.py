"""Task names and aliases -> pipeline classes, and the `pipeline()` factory."""
from __future__ import annotations

import importlib
import os

# task -> (module under onnxpipe.tasks, class name)
SUPPORTED_TASKS: dict[str, tuple[str, str]] = {
    "text-classification": ("text_classification", "TextClassificationPipeline"),
    "token-classification": ("token_classification", "TokenClassificationPipeline"),
    "question-answering": ("question_answering", "QuestionAnsweringPipeline"),
    "fill-mask": ("fill_mask", "FillMaskPipeline"),
    "feature-extraction": ("feature_extraction", "FeatureExtractionPipeline"),
    "sentence-similarity": ("feature_extraction", "SentenceEmbeddingPipeline"),
    "text-generation": ("text_generation", "TextGenerationPipeline"),
    "text2text-generation": ("text2text_generation", "Text2TextGenerationPipeline"),
    "summarization": ("text2text_generation", "SummarizationPipeline"),
    "translation": ("text2text_generation", "TranslationPipeline"),
}
TASK_ALIASES = {
    "sentiment-analysis": "text-classification",
    "ner": "token-classification",
    "embeddings": "sentence-similarity",
    "chat": "text-generation",
}


def normalize_task(task: str) -> str:
    if not isinstance(task, str):
        raise TypeError(f"task must be a string such as 'sentiment-analysis', got {type(task).__name__}")
    if task.startswith("translation_"):  # transformers' translation_en_to_de
        return "translation"
    task = TASK_ALIASES.get(task, task)
    if task not in SUPPORTED_TASKS:
        known = sorted(set(SUPPORTED_TASKS) | set(TASK_ALIASES))
        raise ValueError(f"unknown task {task!r}: use one of {', '.join(known)}")
    return task


def pipeline(task: str | None = None, model=None, *, device="cpu", precision: str = "fp32",
             intra_op_num_threads: int | None = None, inter_op_num_threads: int | None = None,
             session_options=None, session_cache=None, **kwargs):
    """Build a pipeline for `task` from an exported model folder, like `transformers.pipeline`.

    model: a folder written by `onnxpipe export` (or a loaded ModelDir); None takes the task's
    built-in default (built on first use). device: 'cpu', 'cuda' or 'cuda:N'.
    precision: 'fp32' or 'int8' (needs an export with --quantize int8).
    session_cache: where CPU sessions keep the graph as ONNX Runtime optimized it for this CPU, weights
    pre-packed, so later loads skip both (faster cold start; see Session). None (default): $ONNXPIPE_SESSION_CACHE
    if set (a folder, or "off"), else ~/.cache/onnxpipe/sessions for graphs of 32 MiB or more; a folder; False: off.
    """
    from .model_dir import ModelDir

    if task is None and model is None:
        raise ValueError("pipeline() needs a task, a model dir, or both")
    if model is None:
        from onnxpipe.models import default_model_dir

        model = default_model_dir(normalize_task(task))
    if not isinstance(model, ModelDir):
        if not isinstance(model, (str, os.PathLike)):
            raise TypeError(f"model must be a model dir path or a ModelDir, got {type(model).__name__}")
        model = ModelDir(model, precision=precision, device=device, intra_op_num_threads=intra_op_num_threads,
                         inter_op_num_threads=inter_op_num_threads, session_options=session_options,
                         session_cache=session_cache)
    asked = task
    task = normalize_task(task) if task is not None else model.task
    module, cls_name = SUPPORTED_TASKS[task]
    cls = getattr(importlib.import_module(f"onnxpipe.tasks.{module}"), cls_name)
    if module == "text2text_generation":  # its task_specific_params entry is keyed by the name asked for
        kwargs.setdefault("task_name", asked if asked and asked.startswith("translation") else task)
    return cls(model, **kwargs)
