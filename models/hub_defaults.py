"""transformers' own default checkpoints (registry.json's `transformers_defaults`), fetched from the Hugging Face Hub
for the tasks with no built-in default, or for every task with ONNXPIPE_DEFAULTS=transformers.

Light on purpose, as default_models.py: a ready-made ONNX export of the default, where the registry names one, is
served without torch; only a default without one (or one that cannot be imported) is exported, on first use.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from .default_models import Registry

SETTING = "ONNXPIPE_DEFAULTS"


def wants_transformers_defaults() -> bool:
    """ONNXPIPE_DEFAULTS=transformers: every task's default is transformers' own, not the built-in one."""
    value = os.environ.get(SETTING, "").strip().lower()
    if value not in ("", "builtin", "transformers"):
        raise ValueError(f"{SETTING}={value!r} is not a setting: use 'transformers' (transformers' own defaults from "
                         "the Hub) or 'builtin' (the default)")
    return value == "transformers"


def hub_default_dir(registry: Registry, task: str, precision: str = "fp32") -> Path:
    """The model folder of transformers' default for `task` (normalized), downloaded once and cached; a ValueError
    that says what would make it work when the Hub cannot give it."""
    from onnxpipe.hub import HubError, HubUnreachableError, resolve_model

    default = registry.transformers_defaults[task]
    print(f"onnxpipe: task {task!r} uses transformers' default model {default.model} (revision {default.revision})"
          f"{f', as the ONNX export {default.onnx_model}' if default.onnx_model else ''}", file=sys.stderr, flush=True)
    try:
        if default.onnx_model:
            try:
                return resolve_model(default.onnx_model, task=task, revision=default.onnx_revision, precision=precision)
            except HubUnreachableError:
                raise
            except HubError as e:  # the ONNX export cannot be used here: the checkpoint itself, exported
                print(f"onnxpipe: {e}; exporting {default.model} instead", file=sys.stderr, flush=True)
        return resolve_model(default.model, task=task, revision=default.revision, precision=precision)
    except HubError as e:
        raise ValueError(f"{_without_hub(registry, task)}; transformers' default for it, {default.model} (revision "
                         f"{default.revision}), comes from the Hugging Face Hub, which failed: {e}") from None


def _without_hub(registry: Registry, task: str) -> str:
    """What the user can do without the Hub: the registry's own no-default error, or the built-in default."""
    if registry.has_builtin(task):
        name = next(m.name for m in registry.models.values() if task in m.tasks)
        return f"{SETTING}=transformers asks for transformers' default for {task!r}: unset it to use the built-in " \
               f"default {name!r}"
    try:
        registry.for_task(task)
    except ValueError as e:
        return str(e)
    return f"task {task!r} has no default"
