"""bench.peers (issue 26): the worker's JSON-line protocol with onnxpipe's own engine on tiny exports, the install
pins, and the report from a saved result. No engine install, no timing assertion."""
import json
import sys

import pytest

from bench.peers import install, report
from bench.peers.run import Worker, _agree, _paired
from conftest import tiny_export


def test_engines_are_pinned_to_the_issues_versions_and_llama_cpp_is_built_without_amx():
    pkgs = {e: " ".join(s["packages"]) for e, s in install.ENGINES.items()}
    assert "onnxruntime-genai==0.18.0" in pkgs["onnxruntime-genai"] and "onnx_ir" in pkgs["onnxruntime-genai"]
    assert "llama-cpp-python==0.3.36" in pkgs["llama.cpp"] and "ctranslate2==4.8.5" in pkgs["ctranslate2"]
    assert "openvino==2026.4.1" in pkgs["openvino"]
    cmake = install.ENGINES["llama.cpp"]["env"]["CMAKE_ARGS"]
    assert all(f in cmake for f in ("-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"))
    # every venv lives under the ignored cache
    assert all(".cache" in install.venv_dir(e).parts for e in install.ENGINES)


def test_the_worker_decodes_and_encodes_through_onnxpipe_in_a_process_of_its_own():
    dec = tiny_export("llama", "text-generation", optimize=True)
    w = Worker(sys.executable, "test-decode")
    try:
        info = w.ask(op="load", engine="onnxpipe", workload="decode", variant="fp32", threads=1, onnx_dir=dec)["info"]
        assert info["precision"] == "fp32"
        out = w.ask(op="decode", ids=[1, 5, 7, 9], n=6)
        assert len(out["stamps"]) == 6 and len(out["tokens"]) == 6
        assert all(b > a for a, b in zip(out["stamps"], out["stamps"][1:]))
        with pytest.raises(RuntimeError, match="KeyError"):
            w.ask(op="load", engine="no-such-engine", workload="decode", threads=1)
    finally:
        w.close()
    enc = tiny_export("bert", "text-classification")
    w = Worker(sys.executable, "test-encode")
    try:
        w.ask(op="load", engine="onnxpipe", workload="encode", variant="int8", threads=1, onnx_dir=enc)
        out = w.ask(op="encode", ids=[101, 7, 8, 102], mask=[1, 1, 1, 1], type_ids=[0, 0, 0, 0])
        assert out["s"] > 0 and len(out["head"]) >= 1
    finally:
        w.close()


def test_ratios_are_per_round_and_agreement_counts_the_equal_prefix():
    r = _paired([2.0, 3.0, 8.0], [1.0, 3.0, 2.0])
    assert r == {"median": 2.0, "min": 1.0, "max": 4.0, "rounds": 3}
    assert _agree([1, 2, 3, 4], [1, 2, 9, 4]) == 2 and _agree([1, 2], [1, 2, 3]) == 2


def _result():
    c = lambda v, p, ratio=None, **info: {"info": {"precision": p, **info}, "tokens_per_s": v, "min": v, "max": v,
                                         "per_round": [v], **({"ratio_vs_onnxpipe": ratio} if ratio else {})}
    e = lambda ms, p, ratio=None, **info: {"info": {"precision": p, **info}, "p50_ms": ms, "min_ms": ms, "max_ms": ms,
                                          **({"ratio_vs_onnxpipe": ratio} if ratio else {})}
    rr = lambda x: {"median": x, "min": x, "max": x, "rounds": 1}
    return {"meta": {"cpu": "Test CPU", "cpu_features": "avx512f amx_int8", "threads": 2, "cores": 2,
                     "loadavg_start": [1.0, 1.0, 1.0], "loadavg_end": [2.0, 2.0, 2.0], "started": "t", "mode": "full"},
            "installs": {"openvino": {"versions": {"openvino": "2026.4.1"}, "size_mb": 257.0},
                         "llama.cpp": {"error": "pip install failed"}},
            "preparation_errors": {"OpenVINO decode": "not measured"},
            "decode": [{"workload": "SmolLM2-135M decode b1, int4", "precision": "int4", "rounds": 1, "prompt_tokens": 64,
                        "new_tokens": 8, "loadavg_1min_per_round": [1.0], "reference": "onnxpipe int4", "errors": {},
                        "contenders": {"onnxpipe int4": c(70.0, "int4"),
                                       "onnxruntime-genai int4": c(105.0, "int4", rr(1.5))}}],
            "encode": [{"workload": "BERT-base b1 L128, fp32", "length": 128, "precision": "fp32", "rounds": 1,
                        "forwards_per_round": 1, "loadavg_1min_per_round": [1.0], "reference": "onnxpipe fp32",
                        "contenders": {"onnxpipe fp32": e(130.0, "fp32"),
                                       "OpenVINO f32": e(120.0, "fp32", rr(1.08), INFERENCE_PRECISION_HINT="f32")}}]}


def test_report_names_the_cpu_the_load_the_precisions_and_what_failed(tmp_path):
    res = json.loads(json.dumps(_result()))
    md = report.markdown(res)
    assert "Test CPU" in md and "1.00, 1.00, 1.00" in md and "INFERENCE_PRECISION_HINT=f32" in md
    assert "**1.50**" in md and "install failed" in md and "OpenVINO decode" in md
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Benchmarks\n\nkept\n\n## Next\n\nalso kept\n")
    assert report.update_readme(res, readme)
    assert report.update_readme(res, readme)  # a second run replaces its block, does not add one
    text = readme.read_text()
    assert text.count(report.README_START) == 1 and "kept" in text and text.endswith("## Next\n\nalso kept\n")
    assert "vs the fast engines" in text and "Test CPU" in text and "openvino 257 MB" in text
    assert text.index("vs the fast engines") < text.index("## Next")
