"""The built-in default models, as `registry.json` describes them: which model serves which task, from what.

Light on purpose: `onnxpipe.pipeline(task)` with no model reads this, so it imports nothing heavy.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

REGISTRY_PATH = Path(__file__).with_name("registry.json")


@dataclass(frozen=True)
class DefaultModel:
    """One registry entry, with its sources resolved from the registry's `sources` table."""

    name: str
    tasks: tuple[str, ...]
    description: str
    licence: str
    sources: dict[str, dict]          # role ("base", "data") -> source entry
    recipe: dict
    recipe_version: int
    overrides: dict = field(default_factory=dict)
    build_minutes_seen: float | None = None   # descriptive: a build on this project's 2-core machines

    @property
    def recipe_sha256(self) -> str:
        """The cache key: what the build depends on (not the descriptive text)."""
        key = {"name": self.name, "tasks": list(self.tasks), "recipe_version": self.recipe_version,
               "recipe": self.recipe,
               "sources": {role: {k: s[k] for k in ("package", "version", "sdist", "archive_sha256", "file", "member")
                                  if k in s} for role, s in self.sources.items()}}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    def with_overrides(self, overrides: dict) -> "DefaultModel":
        """The same entry with parts of its recipe replaced (e.g. a few training steps for a test build).

        The overrides go into the recipe, so into the cache key and the built manifest: such a build
        never passes for the registry's own.
        """
        recipe = _deep_merge(copy.deepcopy(self.recipe), overrides)
        return DefaultModel(self.name, self.tasks, self.description, self.licence, self.sources, recipe,
                            self.recipe_version, _deep_merge(copy.deepcopy(self.overrides), overrides))


@dataclass(frozen=True)
class HubDefault:
    """transformers' own default checkpoint for a task (id and revision as transformers pins them), and a ready-made
    ONNX export of the same weights where the registry names one."""

    task: str
    model: str
    revision: str
    onnx_model: str | None = None
    onnx_revision: str | None = None


@dataclass(frozen=True)
class Registry:
    models: dict[str, DefaultModel]
    no_default: dict[str, str]        # task -> why there is none
    transformers_defaults: dict[str, HubDefault] = field(default_factory=dict)   # task -> transformers' default

    def has_builtin(self, task: str) -> bool:
        return any(task in model.tasks for model in self.models.values())

    def for_task(self, task: str) -> DefaultModel:
        """The default model for a normalized task name; a ValueError saying why when there is none."""
        for model in self.models.values():
            if task in model.tasks:
                return model
        why = self.no_default.get(task, "no default model is registered for it")
        raise ValueError(
            f"task {task!r} has no built-in default model: {why}. Pass model= (CLI: --model) a folder exported with "
            f"`onnxpipe export CHECKPOINT --task {task} --out MODEL_DIR` from a checkpoint fine-tuned for it")

    def get(self, name_or_task: str) -> DefaultModel:
        """A model by its name, or the default for a task name (aliases such as 'ner' included)."""
        if name_or_task in self.models:
            return self.models[name_or_task]
        from onnxpipe.task_table import normalize_task

        try:
            task = normalize_task(name_or_task)
        except ValueError:
            raise ValueError(f"{name_or_task!r} is neither a default model ({', '.join(self.models)}) "
                             "nor a task name") from None
        return self.for_task(task)


def load_registry(path: str | Path = REGISTRY_PATH) -> Registry:
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    if raw.get("format_version") != 1:
        raise ValueError(f"{path}: unsupported registry format_version {raw.get('format_version')!r}")
    sources = raw["sources"]
    models = {}
    for name, m in raw["models"].items():
        missing = [s for s in m["sources"].values() if s not in sources]
        if missing:
            raise ValueError(f"{path}: model {name!r} names unknown sources {missing}")
        models[name] = DefaultModel(
            name=name, tasks=tuple(m["tasks"]), description=m.get("description", ""), licence=m.get("licence", ""),
            sources={role: dict(sources[key], id=key) for role, key in m["sources"].items()},
            recipe=m["recipe"], recipe_version=int(m.get("recipe_version", 1)),
            build_minutes_seen=m.get("build_minutes_seen"))
    hub = {task: HubDefault(task, d["model"], d["revision"], (d.get("onnx") or {}).get("model"),
                            (d.get("onnx") or {}).get("revision"))
           for task, d in (raw.get("transformers_defaults") or {}).get("tasks", {}).items()}
    return Registry(models=models, no_default=dict(raw.get("no_default", {})), transformers_defaults=hub)


def _deep_merge(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        else:
            base[k] = v
    return base
