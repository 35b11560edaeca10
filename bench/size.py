"""Installed size of the serve-time environment against a transformers + torch one.

Serve time: a fresh venv with onnxpipe[cpu] (numpy, tokenizers, onnxruntime and their own
dependencies, at the versions of the project's .venv), its site-packages measured on disk,
less pip (which every venv carries). transformers + torch: the files of every distribution in
the dependency closure of `torch` and `transformers` as installed in the project's .venv.
Both closures are also measured the same way inside .venv, as a cross-check.
"""
from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from . import artifacts

SERVE_ROOTS = ("numpy", "tokenizers", "onnxruntime")
HEAVY_ROOTS = ("torch", "transformers")
VENV_BASELINE = {"pip", "setuptools"}


def run(quick: bool) -> dict:
    out = {"closure_in_project_venv": {"serve": closure_size(SERVE_ROOTS), "transformers+torch": closure_size(HEAVY_ROOTS)}}
    try:
        out["fresh_serve_venv"] = fresh_serve_venv()
    except Exception as e:  # no PyPI, no venv module: the closure figures still stand
        out["fresh_serve_venv"] = {"error": f"{type(e).__name__}: {e}"}
    serve = out["fresh_serve_venv"].get("bytes_without_pip") or out["closure_in_project_venv"]["serve"]["bytes"]
    heavy = out["closure_in_project_venv"]["transformers+torch"]["bytes"]
    out["serve_bytes"], out["heavy_bytes"], out["ratio"] = serve, heavy, serve / heavy
    return out


def closure_size(roots) -> dict:
    """Bytes on disk of `roots` and everything they require (extras not followed)."""
    seen: dict[str, int] = {}
    todo = list(roots)
    while todo:
        name = _norm(todo.pop())
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen[name] = _dist_bytes(dist)
        for req in dist.requires or []:
            if "extra ==" in req or "extra==" in req:
                continue
            marker_ok = True
            if ";" in req:
                try:
                    from packaging.requirements import Requirement

                    r = Requirement(req)
                    marker_ok = r.marker is None or r.marker.evaluate({"extra": ""})
                except Exception:
                    marker_ok = True
            if marker_ok:
                todo.append(re.split(r"[ ;<>=!~\[(]", req.strip(), maxsplit=1)[0])
    return {"bytes": sum(seen.values()), "distributions": dict(sorted(seen.items(), key=lambda kv: -kv[1]))}


def fresh_serve_venv() -> dict:
    """Create (once per set of versions) a venv holding only onnxpipe[cpu]; measure its site-packages."""
    pins = [f"{n}=={metadata.version(n)}" for n in SERVE_ROOTS]
    key = hashlib.sha256((" ".join(pins) + (artifacts.ROOT / "pyproject.toml").read_text()).encode()).hexdigest()[:10]
    venv = artifacts.CACHE / f"serve-venv-{key}"
    py = venv / "bin" / "python"
    if not (venv / ".complete").exists():
        print("bench: creating a fresh serve-time venv (once, needs PyPI)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *pins,
                        f"{artifacts.ROOT}[cpu]"], check=True)
        (venv / ".complete").write_text(" ".join(pins))
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    total = _tree_bytes(site)
    baseline = sum(_tree_bytes(p) for p in site.iterdir() if _norm(p.name.split("-")[0]) in VENV_BASELINE)
    listed = subprocess.run([str(py), "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check"],
                            capture_output=True, text=True).stdout.split()
    return {"path": str(venv), "pins": pins, "site_packages_bytes": total, "bytes_without_pip": total - baseline,
            "packages": listed}


def _dist_bytes(dist) -> int:
    total = 0
    for f in dist.files or []:
        try:
            total += Path(dist.locate_file(f)).stat().st_size
        except OSError:
            pass
    return total


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()
