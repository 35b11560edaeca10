"""`pipeline()`: a task name (from the one task table, task_table.py) and a model folder -> a pipeline object."""
from __future__ import annotations

import importlib
import os

from .hub import is_repo_id, resolve_model
from .session import SessionConfig
from .task_table import SUPPORTED_TASKS, normalize_task


def pipeline(task: str | None = None, model=None, *, device=None, precision: str = "fp32",
             intra_op_num_threads: int | None = None, inter_op_num_threads: int | None = None,
             session_options=None, session_cache=None, session_config: SessionConfig | None = None,
             revision: str | None = None, token=None, trust_remote_code: bool = False, **kwargs):
    """Build a pipeline for `task` from an exported model folder, like `transformers.pipeline`.

    model: a folder written by `onnxpipe export` (or a loaded ModelDir), or a Hugging Face Hub id ("ORG/NAME", at
    `revision`, read with `token`; needs the `hub` extra): an onnxpipe repo is loaded as it is, a ready-made ONNX repo
    (Optimum's or transformers.js's layout) is imported without torch, a PyTorch checkpoint is exported on first use
    (the `export` extra; trust_remote_code=True to run its own code); all cached (see onnxpipe.hub). None takes the
    task's default (see onnxpipe.models.default_model_dir). device: 'cpu' (default), 'cuda' or 'cuda:N'.
    precision: 'fp32', 'int8' / 'int4' (an export with --quantize int8 / int4) or 'fp16' (an export with
    --dtype fp16; for device='cuda': on CPU it runs emulated, slower than fp32, with a warning).
    session_cache: where CPU sessions keep the graph as ONNX Runtime optimized it for this CPU, weights
    pre-packed, so later loads skip both (faster cold start; see Session). None (default): $ONNXPIPE_SESSION_CACHE
    if set (a folder, or "off"), else ~/.cache/onnxpipe/sessions for graphs of 32 MiB or more; a folder; False: off.
    session_config: all session settings as one SessionConfig, instead of the separate keywords above.
    """
    from .model_dir import ModelDir

    if task is None and model is None:
        raise ValueError("pipeline() needs a task, a model dir, or both")
    if model is None:
        from onnxpipe.models import default_model_dir

        model = default_model_dir(normalize_task(task), precision=precision)
    elif is_repo_id(model):
        model = resolve_model(model, task=task, revision=revision, token=token, precision=precision,
                              trust_remote_code=trust_remote_code)
    if not isinstance(model, ModelDir):
        if not isinstance(model, (str, os.PathLike)):
            raise TypeError(f"model must be a model dir path or a ModelDir, got {type(model).__name__}")
        config = SessionConfig.of(session_config, device=device, intra_op_num_threads=intra_op_num_threads,
                                  inter_op_num_threads=inter_op_num_threads, session_options=session_options,
                                  session_cache=session_cache)
        model = ModelDir(model, precision=precision, session_config=config)
    asked = task
    row = SUPPORTED_TASKS[normalize_task(task) if task is not None else model.task]
    cls = getattr(importlib.import_module(f"onnxpipe.tasks.{row.module}"), row.class_name)
    if row.module == "text2text_generation":  # its task_specific_params entry is keyed by the name asked for
        kwargs.setdefault("task_name", asked if asked and asked.startswith("translation") else row.name)
    return cls(model, **kwargs)
