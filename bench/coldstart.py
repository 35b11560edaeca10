"""Whole-process cold start to the first classification result, and peak RSS, as a user sees them.

Each contender is a fresh `python -c` process (BERT-base sentiment, one short text): interpreter
start, imports, model load, session creation, the first call. Time runs from just before the
process is spawned to the moment it has its result; peak RSS is the child's VmHWM (the high-water
mark of its resident memory) read when it has the result. Model files are in the page cache (the first, discarded round puts them there), as on
a server restarting a model it has served before.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

from . import artifacts

TEXT = "I love this movie, it is wonderful"
EMBEDDED = "onnxpipe fp32, weights inside model.onnx (the export's format before), session cache off"

_TRANSFORMERS = """
import torch, transformers
torch.set_num_threads({threads})
p = transformers.pipeline("text-classification", model={ckpt!r}, device=-1)
r = p({text!r})
"""
_OPTIMUM = """
import onnxruntime as ort, transformers
from optimum.onnxruntime import ORTModelForSequenceClassification
so = ort.SessionOptions(); so.intra_op_num_threads = {threads}
m = ORTModelForSequenceClassification.from_pretrained({plain!r}, file_name="model.onnx", session_options=so)
p = transformers.pipeline("text-classification", model=m, tokenizer=transformers.AutoTokenizer.from_pretrained({plain!r}))
r = p({text!r})
"""
_ONNXPIPE = """
import onnxpipe
p = onnxpipe.pipeline("text-classification", model={folder!r}, precision={precision!r}, intra_op_num_threads={threads})
r = p({text!r})
"""
# The session loads a graph ONNX Runtime already optimized and saved, and skips optimizing it again.
_ONNXPIPE_PREOPT = """
import onnxruntime as ort, onnxpipe
so = ort.SessionOptions(); so.intra_op_num_threads = {threads}; so.log_severity_level = 3
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
p = onnxpipe.pipeline("text-classification", model={folder!r}, session_options=so)
r = p({text!r})
"""
# onnxpipe's default load uses its session cache (runtime/session.py): the first start on a machine saves the graph
# ONNX Runtime optimized for this CPU with its weights pre-packed, later starts load that as it is. The bench gives
# every onnxpipe process a cache folder of its own through ONNXPIPE_SESSION_CACHE: the default contender's is
# written by the uncounted first round; "first start" gets an empty one every round (it pays the writing);
# "cache off" shows the load without it (the default before the cache was on).
DEFAULT = "onnxpipe fp32"
FIRST_START = "onnxpipe fp32, first start on this machine (writes the session cache)"
CACHE_OFF = "onnxpipe fp32, session cache off"
_IMPORT_ONLY = """
import onnxpipe
r = None
"""


def run(threads: int, quick: bool) -> dict:
    ckpt = artifacts.checkpoint("bert", "text-classification")
    plain = artifacts.export("bert", "text-classification")
    opt = artifacts.export("bert", "text-classification", optimized=True)
    preopt = preoptimized_copy(plain)
    embedded = embedded_weights_copy(plain)
    cache = session_cache_dir(plain)
    scripts = {
        "transformers torch fp32": _TRANSFORMERS.format(threads=threads, ckpt=str(ckpt), text=TEXT),
        "Optimum ORT fp32": _OPTIMUM.format(threads=threads, plain=str(plain), text=TEXT),
        DEFAULT: _ONNXPIPE.format(threads=threads, folder=str(plain), precision="fp32", text=TEXT),
        FIRST_START: _ONNXPIPE.format(threads=threads, folder=str(plain), precision="fp32", text=TEXT),
        CACHE_OFF: _ONNXPIPE.format(threads=threads, folder=str(plain), precision="fp32", text=TEXT),
        "onnxpipe fp32 fused, session cache off": _ONNXPIPE.format(threads=threads, folder=str(opt), precision="fp32", text=TEXT),
        "onnxpipe fp32 pre-optimized (ORT_DISABLE_ALL), session cache off": _ONNXPIPE_PREOPT.format(threads=threads, folder=str(preopt), text=TEXT),
        EMBEDDED: _ONNXPIPE.format(threads=threads, folder=str(embedded), precision="fp32", text=TEXT),
        "onnxpipe int8": _ONNXPIPE.format(threads=threads, folder=str(plain), precision="int8", text=TEXT),
        "import onnxpipe only": _IMPORT_ONLY,
    }

    def cache_env(name: str) -> str:
        if name == DEFAULT or name == "onnxpipe int8":
            return str(cache / "default")
        if name == FIRST_START:  # an empty folder every time: this start writes the entry
            shutil.rmtree(cache / "first", ignore_errors=True)
            return str(cache / "first")
        return "off"

    model_bytes = {"fp32": artifacts.model_bytes(plain / "model.onnx"), "int8": artifacts.model_bytes(plain / "model.int8.onnx")}
    rounds = 1 if quick else 3
    samples: dict[str, list[dict]] = {n: [] for n in scripts}
    errors = {}
    for r in range(rounds + 1):  # round 0 warms the page cache and is not counted
        for name, code in scripts.items():
            if name in errors:
                continue
            try:
                s = _one_process(code, {"ONNXPIPE_SESSION_CACHE": cache_env(name)})
            except RuntimeError as e:
                errors[name] = str(e)
                continue
            if r > 0:
                samples[name].append(s)
    out = {"text": TEXT, "model": "bert-base text-classification (random weights)", "model_bytes": model_bytes,
           "rounds": rounds, "errors": errors, "contenders": {}}
    ref = samples.get("transformers torch fp32")
    ref_s = float(np.median([s["first_result_s"] for s in ref])) if ref else None
    for name, ss in samples.items():
        if not ss:
            continue
        first = [s["first_result_s"] for s in ss]
        rss = [s["peak_rss_mib"] for s in ss]
        row = {"first_result_s": float(np.median(first)), "min_s": min(first), "max_s": max(first),
               "peak_rss_mib": float(np.median(rss)), "samples": ss}
        if ref_s:
            row["fraction_of_transformers"] = row["first_result_s"] / ref_s
        out["contenders"][name] = row
    return out


def session_cache_dir(src: Path) -> Path:
    """A fresh session cache for this run (an entry from an earlier run would skip the first-load cost here too,
    which is fine, but a fresh one makes the uncounted round do the writing)."""
    out = artifacts.CACHE / "session-cache" / src.name
    shutil.rmtree(out, ignore_errors=True)
    return out


def preoptimized_copy(src: Path) -> Path:
    """`src`'s fp32 graph as ONNX Runtime optimizes it at ORT_ENABLE_EXTENDED (portable across CPUs), saved."""
    def write(src_onnx: Path, dst_onnx: Path) -> None:
        import onnxruntime as ort

        from onnxpipe.session import on_process_pool

        so = on_process_pool(ort.SessionOptions())
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(dst_onnx)
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", dst_onnx.name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        so.log_severity_level = 3
        ort.InferenceSession(str(src_onnx), so, providers=["CPUExecutionProvider"])

    return _fp32_variant(src, "preoptimized", write)


def embedded_weights_copy(src: Path) -> Path:
    """`src`'s fp32 graph with its weights inside model.onnx, as the export wrote it before it moved them
    to model.onnx.data: ONNX Runtime then parses a 400 MB protobuf and copies the weights out of it."""
    def write(src_onnx: Path, dst_onnx: Path) -> None:
        import onnx

        onnx.save(onnx.load(str(src_onnx)), str(dst_onnx))

    return _fp32_variant(src, "embedded-weights", write)


def _fp32_variant(src: Path, name: str, write) -> Path:
    """A model folder like `src` with only an fp32 graph, written by `write(src_onnx, dst_onnx)`; built once."""
    out = artifacts.variant_dir(src, name)
    if (out / "onnxpipe.json").exists():
        return out
    tmp = artifacts.variant_scratch(src, out)
    write(src / "model.onnx", tmp / "model.onnx")
    manifest = json.loads((tmp / "onnxpipe.json").read_text())
    entry = {"path": "model.onnx", "sha256": None, "bytes": (tmp / "model.onnx").stat().st_size}
    if (tmp / "model.onnx.data").exists():
        entry["external_data"] = {"path": "model.onnx.data", "sha256": None, "bytes": (tmp / "model.onnx.data").stat().st_size}
    manifest["files"]["model"] = {"fp32": entry}
    (tmp / "onnxpipe.json").write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out)
    return out


def _one_process(code: str, env: dict | None = None) -> dict:
    wrapped = "import time as _t, json as _j, sys as _s\n_t0 = float(_s.argv[1])\n" + textwrap.dedent(code) + \
        "\n_first = _t.time() - _t0\n" \
        "_hwm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n" \
        "print('BENCH ' + _j.dumps({'first_result_s': _first, 'vm_hwm_kib': _hwm}), flush=True)\n"
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1", **(env or {})}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.time()
        proc = subprocess.Popen([sys.executable, "-c", wrapped, repr(t0)], stdout=out, stderr=err, env=env, text=True)
        proc.wait()
        wall = time.time() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    line = next((ln for ln in stdout.splitlines() if ln.startswith("BENCH ")), None)
    if proc.returncode != 0 or line is None:
        tail = (stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"exit {proc.returncode}: {tail}")
    result = json.loads(line[6:])
    result["process_s"] = wall
    # VmHWM, not wait4's ru_maxrss: the latter also counts the parent's pages the child held between fork and exec.
    result["peak_rss_mib"] = result.pop("vm_hwm_kib") / 1024
    return result
