"""What a model folder must hold before anything of it is loaded: every manifest field the runtime reads has the
type it expects, and every file it names lies inside the folder.

Model folders come from strangers (and from the Hub), so a damaged or hostile `onnxpipe.json` must end in one
line naming the field, never a KeyError deep in a pipeline, and must never make the runtime open a file
elsewhere: no absolute path, no `..`, no symlink that leaves the folder.
"""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath


class ManifestError(ValueError):
    """The manifest has a field of the wrong type or a path outside its folder; the message names the field."""


def check_manifest(manifest, folder: Path) -> None:
    """Raise ManifestError for the first field that is not as the runtime reads it (docs/MANIFEST.md)."""
    from .task_table import EXPORT_TASKS

    f = _Fields(folder)
    m = f.object(manifest, "the manifest")
    task = f.field(m, "task", str)
    if task not in EXPORT_TASKS:
        f.fail("task", f"is {task!r}; this onnxpipe runs {', '.join(EXPORT_TASKS)}")
    files = f.object(f.field(m, "files", dict), "files")
    if not files:
        f.fail("files", "is empty: it must name at least one graph")
    for role, precisions in files.items():
        precisions = f.object(precisions, f"files.{role}")
        if not precisions:
            f.fail(f"files.{role}", "is empty: it must name the graph of at least one precision")
        for precision, entry in precisions.items():
            where = f"files.{role}.{precision}"
            entry = f.object(entry, where)
            f.path(f.field(entry, "path", str, where), f"{where}.path")
            data = f.field(entry, "external_data", dict, where, optional=True)
            if data is not None:
                f.path(f.field(data, "path", str, f"{where}.external_data"), f"{where}.external_data.path")
    tokenizer = f.object(f.field(m, "tokenizer", dict), "tokenizer")
    f.path(f.field(tokenizer, "file", str, "tokenizer", optional=True) or "tokenizer.json", "tokenizer.file")
    f.field(tokenizer, "model_max_length", int, "tokenizer", optional=True)
    for side in ("padding_side", "truncation_side"):
        if f.field(tokenizer, side, str, "tokenizer", optional=True) not in (None, "left", "right"):
            f.fail(f"tokenizer.{side}", "must be \"left\" or \"right\"")
    for name in ("special_tokens", "special_token_ids"):
        f.field(tokenizer, name, dict, "tokenizer", optional=True)
    for name, value in (tokenizer.get("special_token_ids") or {}).items():
        f.check(value, int, f"tokenizer.special_token_ids.{name}", optional=True)
    for i, value in enumerate(f.field(tokenizer, "all_special_ids", list, "tokenizer", optional=True) or []):
        f.check(value, int, f"tokenizer.all_special_ids[{i}]")
    for i, value in enumerate(f.field(tokenizer, "model_input_names", list, "tokenizer", optional=True) or []):
        f.check(value, str, f"tokenizer.model_input_names[{i}]")
    f.field(tokenizer, "clean_up_tokenization_spaces", bool, "tokenizer", optional=True)
    for key, value in (f.field(m, "id2label", dict, optional=True) or {}).items():
        f.check(value, str, f"id2label.{key}")
    for name in ("max_positions", "num_labels"):
        f.field(m, name, int, optional=True)
    for name in ("chat_template", "prefix", "problem_type", "logits_to_keep_input", "model_type", "architecture"):
        f.field(m, name, str, optional=True)
    f.field(m, "is_encoder_decoder", bool, optional=True)
    for name in ("generation", "task_specific_params", "sentence_embedding", "optimization"):
        f.field(m, name, dict, optional=True)
    optimization = m.get("optimization") if isinstance(m.get("optimization"), dict) else {}
    for i, name in enumerate(f.field(optimization, "runtime_disabled_optimizers", list, "optimization",
                                     optional=True) or []):
        f.check(name, str, f"optimization.runtime_disabled_optimizers[{i}]")
    kv = f.field(m, "kv_cache", dict, optional=True)
    if kv is not None:
        for name in ("num_kv_heads", "head_dim"):
            f.field(kv, name, int, "kv_cache")
        for name in ("num_layers", "encoder_num_kv_heads"):
            f.field(kv, name, int, "kv_cache", optional=True)
        for name in ("past_names", "present_names"):
            for i, value in enumerate(f.field(kv, name, list, "kv_cache", optional=name == "present_names") or []):
                f.check(value, str, f"kv_cache.{name}[{i}]")
        f.field(kv, "dtype", str, "kv_cache", optional=True)
        f.field(kv, "shared_buffer", bool, "kv_cache", optional=True)
        rotary = f.field(kv, "rotary", dict, "kv_cache", optional=True)
        if rotary is not None:
            f.path(f.field(rotary, "file", str, "kv_cache.rotary"), "kv_cache.rotary.file")
            f.field(rotary, "interleaved", bool, "kv_cache.rotary")


def check_no_escaping_links(folder: Path) -> None:
    """No file or folder in the model folder may be a symlink that resolves outside it (ONNX Runtime follows the
    graph's own external-data names, which the manifest does not list)."""
    root = folder.resolve()
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path.is_symlink() and not _inside(path.resolve(), root):
                raise ManifestError(f"model dir '{folder}': {path.relative_to(folder)} is a link to "
                                    f"{os.readlink(path)}, outside the folder: copy the file into the folder")


class _Fields:
    """Type checks that name the field they failed on."""

    _JSON = {dict: "an object", list: "a list", str: "a string", int: "an integer", bool: "true or false"}

    def __init__(self, folder: Path):
        self.folder = folder

    def fail(self, field: str, why: str):
        raise ManifestError(f"model dir '{self.folder}': onnxpipe.json field {field} {why}: export it again")

    def check(self, value, kind, field: str, optional: bool = False):
        if value is None and optional:
            return None
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if not ok:
            self.fail(field, f"must be {self._JSON[kind]}{' or null' if optional else ''}, got {_describe(value)}")
        return value

    def object(self, value, field: str) -> dict:
        return self.check(value, dict, field)

    def field(self, parent: dict, name: str, kind, where: str = "", optional: bool = False):
        full = f"{where}.{name}" if where else name
        if name not in parent:
            if optional:
                return None
            self.fail(full, "is missing")
        return self.check(parent[name], kind, full, optional)

    def path(self, name: str, field: str) -> None:
        """A file name inside the folder: relative, no `..`, and not a link out of it."""
        pure = PurePosixPath(name.replace("\\", "/"))
        if not name or pure.is_absolute() or os.path.isabs(name) or ".." in pure.parts:
            self.fail(field, f"is {name!r}: it must name a file inside the model folder (relative, without '..')")
        if not _inside((self.folder / name).resolve(), self.folder.resolve()):
            self.fail(field, f"is {name!r}, a link that leads outside the model folder")


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _describe(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"
