"""Where built default models live (`.cache/models/<name>/`) and whether a cached one can be trusted.

A cached folder is used only when its manifest says it was built from the current recipe and
every file the manifest lists still has its recorded sha256. Hashing 650 MB on every
`pipeline()` call would cost seconds, so a file whose size and mtime match what was seen the
last time it hashed correctly is not hashed again (any write or truncation changes both).
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from .default_models import DefaultModel
from .sources import DEFAULT_CACHE, sha256_file

MANIFEST_NAME = "onnxpipe.json"
STAMP_NAME = ".onnxpipe-verified.json"


def models_cache(cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir or DEFAULT_CACHE) / "models"


def model_path(model: DefaultModel, cache_dir: str | os.PathLike | None = None) -> Path:
    return models_cache(cache_dir) / model.name


def read_built_manifest(path: Path) -> dict | None:
    try:
        return json.loads((path / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def check_built(model: DefaultModel, path: Path) -> str | None:
    """None when `path` holds a complete build of `model`'s current recipe, else why not (one line)."""
    if not path.is_dir():
        return "not built"
    manifest = read_built_manifest(path)
    if manifest is None:
        return f"{path} has no readable {MANIFEST_NAME}"
    built = manifest.get("default_model") or {}
    if built.get("recipe_sha256") != model.recipe_sha256:
        return "built from an older recipe"
    expected = dict(built.get("extra_files", {}))
    for role, precisions in manifest.get("files", {}).items():
        for entry in precisions.values():
            expected[entry["path"]] = entry["sha256"]
            if "external_data" in entry:
                expected[entry["external_data"]["path"]] = entry["external_data"]["sha256"]
    if not expected:
        return f"{MANIFEST_NAME} lists no files"
    stamp = _read_stamp(path)
    fresh = {}
    for name, sha in expected.items():
        file = path / name
        try:
            st = file.stat()
        except OSError:
            return f"{name} is missing"
        seen = [st.st_size, st.st_mtime_ns, sha]
        if stamp.get(name) != seen:
            if sha256_file(file) != sha:
                return f"{name} does not match the sha256 in its manifest (corrupt or changed)"
        fresh[name] = seen
    if fresh != stamp:
        _write_stamp(path, fresh)
    return None


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@contextlib.contextmanager
def build_lock(model: DefaultModel, cache_dir: str | os.PathLike | None = None):
    """One build of a model at a time across processes (a second one waits, then finds it built)."""
    import fcntl

    cache = models_cache(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{model.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read_stamp(path: Path) -> dict:
    try:
        return json.loads((path / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return {}


def _write_stamp(path: Path, stamp: dict) -> None:
    try:
        tmp = path / f"{STAMP_NAME}.{os.getpid()}"
        tmp.write_text(json.dumps(stamp))
        os.replace(tmp, path / STAMP_NAME)
    except OSError:
        pass  # a read-only cache still works: it is just hashed again next time
