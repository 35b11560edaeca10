"""Each peer engine in a venv of its own under .cache/peers/<engine>/venv, installed from PyPI at the issue's pins.

Nothing of theirs is imported into onnxpipe's venv: the bench talks to them through bench/peers/worker.py run by
their own interpreter. Installs and compiles run under `nice -n 10` (the bench machine is shared).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("ONNXPIPE_PEERS_CACHE", ROOT / ".cache" / "peers"))

# llama.cpp's AMX kernels crashed here with SIGILL in ggml_backend_amx_mul_mat (issue 26): built without them.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
ENGINES = {
    # the model builder imports onnx_ir (undeclared) and wants a newer transformers than onnxpipe's export pin;
    # torch comes from onnxpipe's venv (a path appended after the venv's own: its own packages win)
    "onnxruntime-genai": {"packages": ["onnxruntime-genai==0.18.0", "onnx_ir", "onnx", "transformers>=4.57",
                                       "sentencepiece", "protobuf"], "torch": True, "dist": "onnxruntime-genai"},
    "llama.cpp": {"packages": ["llama-cpp-python==0.3.36"], "dist": "llama-cpp-python", "no_binary": "llama-cpp-python",
                  "env": {"CMAKE_ARGS": f"-DGGML_NATIVE=ON -DCMAKE_C_FLAGS='{NO_AMX}' -DCMAKE_CXX_FLAGS='{NO_AMX}' "
                                        "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF "
                                        "-DLLAMA_CURL=OFF",
                          "CMAKE_BUILD_PARALLEL_LEVEL": "2"}},
    # the converter reads the transformers checkpoint (torch from onnxpipe's venv, as above)
    "ctranslate2": {"packages": ["ctranslate2==4.8.5", "transformers>=4.57", "sentencepiece"], "torch": True,
                    "dist": "ctranslate2"},
    "openvino": {"packages": ["openvino==2026.4.1", "nncf"], "dist": "openvino"},
}


def venv_dir(engine: str) -> Path:
    return CACHE / engine / "venv"


def python(engine: str) -> Path:
    return venv_dir(engine) / "bin" / "python"


def stamp_path(engine: str) -> Path:
    return CACHE / engine / "installed.json"


def installed(engine: str) -> dict | None:
    """The install record ({versions, size_mb, ...}) when `engine` is installed at its current pins, else None."""
    p = stamp_path(engine)
    if not p.exists():
        return None
    rec = json.loads(p.read_text())
    if rec.get("packages") != ENGINES[engine]["packages"] or not python(engine).exists():
        return None
    return rec


def ensure(engine: str, log=print) -> dict:
    """Install `engine` (once); returns its record, or {"error": ...} when it cannot be installed here. A second
    process asking meanwhile waits for the first one's install (a file lock) instead of starting its own."""
    import fcntl

    (CACHE / engine).mkdir(parents=True, exist_ok=True)
    with open(CACHE / engine / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _ensure(engine, log)


def _ensure(engine: str, log=print) -> dict:
    rec = installed(engine)
    if rec:
        if "size_note" not in rec:  # a record from before the closure size: measure it again
            rec.update(versions=_versions(engine), size_mb=round(site_packages_bytes(engine) / 1e6, 1),
                       size_note="the engine's runtime closure")
            stamp_path(engine).write_text(json.dumps(rec, indent=1))
        return rec
    spec = ENGINES[engine]
    home = CACHE / engine
    home.mkdir(parents=True, exist_ok=True)
    venv = venv_dir(engine)
    logfile = home / "install.log"
    t0 = time.time()
    try:
        if not python(engine).exists():
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        env = {**os.environ, **spec.get("env", {})}
        cmd = ["nice", "-n", "10", str(python(engine)), "-m", "pip", "install", "--disable-pip-version-check",
               "--no-input", *spec["packages"]]
        if spec.get("no_binary"):
            cmd += ["--no-binary", spec["no_binary"], "--no-cache-dir", "--verbose"]
        log(f"bench peers: installing {engine} into {venv} ({' '.join(spec['packages'])})")
        with open(logfile, "w") as f:
            r = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        if r.returncode != 0:
            tail = logfile.read_text().splitlines()[-15:]
            return {"error": f"pip install failed (exit {r.returncode}); see {logfile}", "log_tail": tail}
        if spec.get("torch"):
            _append_torch(engine)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
    rec = {"engine": engine, "packages": spec["packages"], "versions": _versions(engine),
           "size_mb": round(site_packages_bytes(engine) / 1e6, 1), "size_note": "the engine's runtime closure", "install_s": round(time.time() - t0, 1),
           "torch_from_onnxpipe_venv": bool(spec.get("torch")), "cmake_args": spec.get("env", {}).get("CMAKE_ARGS")}
    stamp_path(engine).write_text(json.dumps(rec, indent=1))
    return rec


def _site(engine: str) -> Path:
    return next((venv_dir(engine) / "lib").glob("python3*/site-packages"))


def _append_torch(engine: str) -> None:
    """torch is only the converters' loader (not timed): read from onnxpipe's venv, after the venv's own packages."""
    ours = Path(sysconfig.get_paths()["purelib"])
    shutil.rmtree(_site(engine) / "_onnxpipe_torch", ignore_errors=True)
    (_site(engine) / "zz_onnxpipe_torch.pth").write_text(str(ours) + "\n")


def _versions(engine: str) -> dict:
    out = subprocess.run([str(python(engine)), "-m", "pip", "list", "--format", "json", "--disable-pip-version-check",
                          "--path", str(_site(engine))], capture_output=True, text=True)
    try:
        pkgs = {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(out.stdout)}
    except Exception:
        return {}
    keep = {ENGINES[engine]["dist"], "onnxruntime", "transformers", "numpy", "nncf", "onnx", "openvino"}
    return {k: v for k, v in pkgs.items() if k in keep}


def site_packages_bytes(engine: str) -> int:
    """What the engine weighs at run time: its distribution and everything it requires (bench/size.py's closure,
    resolved in the engine's venv; the converters' transformers and torch, and pip, not counted)."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from bench.size import closure_size; "
            "print(json.dumps(closure_size([sys.argv[2]])))")
    out = subprocess.run([str(python(engine)), "-c", code, str(ROOT), ENGINES[engine]["dist"]],
                         capture_output=True, text=True, cwd="/")
    return int(json.loads(out.stdout.strip().splitlines()[-1])["bytes"])


if __name__ == "__main__":  # python -m bench.peers.install [ENGINE ...]
    for e in sys.argv[1:] or list(ENGINES):
        print(e, json.dumps(ensure(e), indent=1), flush=True)
