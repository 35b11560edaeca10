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
                                       report.INT4_SYMMETRIC: c(105.0, "int4", rr(1.5)),
                                       "onnxruntime-genai int4": c(105.0, "int4", rr(1.5))}}],
            "int4_fidelity": {"articles": ["a"], "tokens_per_article": 8, "weights_bytes": {},
                              "perplexity": {"onnxpipe fp32": {"ppl": 10.0, "vs_fp32": 0.0},
                                             "onnxpipe int4": {"ppl": 10.1, "vs_fp32": 0.01},
                                             report.INT4_SYMMETRIC: {"ppl": 12.0, "vs_fp32": 0.2},
                                             "onnxruntime-genai int4": {"ppl": 13.0, "vs_fp32": 0.3}}},
            "encode": [{"workload": "BERT-base b1 L128, fp32", "length": 128, "precision": "fp32", "rounds": 1,
                        "forwards_per_round": 1, "loadavg_1min_per_round": [1.0], "reference": "onnxpipe fp32",
                        "contenders": {"onnxpipe fp32": e(130.0, "fp32"),
                                       "OpenVINO f32": e(120.0, "fp32", rr(1.08), INFERENCE_PRECISION_HINT="f32")}}]}


def test_report_names_the_cpu_the_load_the_precisions_and_what_failed(tmp_path):
    res = json.loads(json.dumps(_result()))
    md = report.markdown(res)
    assert "Test CPU" in md and "1.00, 1.00, 1.00" in md and "INFERENCE_PRECISION_HINT=f32" in md
    assert "**1.50**" in md and "install failed" in md and "OpenVINO decode" in md
    assert "| onnxruntime-genai int4 | 13.00 | +30.0% |" in md  # the int4 variants' perplexity table
    line = "\n".join(report.summary_table(res))
    assert "default +1.0%; `--int4-method symmetric` +20.0% at 1.50x the default's decode speed" in line
    assert "onnxruntime-genai int4 +30.0%" in line
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Benchmarks\n\nkept\n\n## Next\n\nalso kept\n")
    assert report.update_readme(res, readme)
    assert report.update_readme(res, readme)  # a second run replaces its block, does not add one
    text = readme.read_text()
    assert text.count(report.README_START) == 1 and "kept" in text and text.endswith("## Next\n\nalso kept\n")
    assert "vs the fast engines" in text and "Test CPU" in text and "openvino 257 MB" in text
    assert text.index("vs the fast engines") < text.index("## Next")


def test_the_plot_has_a_bar_per_peer_and_workload_and_the_readme_shows_it(tmp_path, monkeypatch):
    import matplotlib.axes

    bars = []
    barh = matplotlib.axes.Axes.barh
    monkeypatch.setattr(matplotlib.axes.Axes, "barh", lambda self, y, width, *a, **k: bars.append(len(y)) or
                        barh(self, y, width, *a, **k))
    report.plot(_result(), tmp_path / "peers.png")
    assert bars == [2] and (tmp_path / "peers.png").stat().st_size > 1000  # genai int4, OpenVINO f32
    assert "bench/results/peers.png" in report.readme_block(_result(), with_plot=True)
    assert "peers.png" not in report.readme_block(_result())
    empty = {**_result(), "decode": [], "encode": []}
    with pytest.raises(ValueError, match="no ratios"):
        report.plot(empty, tmp_path / "none.png")


def test_report_renders_the_batch_decode_workload_what_each_engine_offers_and_the_server_figures(tmp_path):
    from bench.peers.run import BATCHING, _server_concurrent

    res = _result()
    c = lambda v, p, how, ratio=None, agree=16: {
        "info": {"precision": p, "batching": how}, "tokens_per_s": v, "min": v - 1, "max": v + 1, "per_round": [v - 1, v + 1],
        "greedy_agrees_with_onnxpipe_fp32_for": agree, **({"ratio_vs_onnxpipe": ratio} if ratio else {})}
    res["decode_batch"] = [{"workload": "SmolLM2-135M decode b8, fp32", "precision": "fp32", "batch": 8, "rounds": 2,
                            "prompt_tokens": 64, "new_tokens": 16, "loadavg_1min_per_round": [1.5, 1.6],
                            "reference": "onnxpipe fp32",
                            "errors": {"CTranslate2 float32": "load failed: boom"},
                            "contenders": {"onnxpipe fp32": c(160.0, "fp32", "GenerationEngine (continuous batching)"),
                                           "llama.cpp F32 (low-level batch)": c(
                                               200.0, "F32", "low-level API", {"median": 1.25, "min": 1.2, "max": 1.3,
                                                                               "rounds": 2}, agree=11)}}]
    res["batching"] = dict(BATCHING)
    serve = tmp_path / "serve_generation.json"
    serve.write_text(json.dumps({"machine": {"cpus": 2, "cpu_model": "Test CPU", "loadavg_1m_before": 1.0,
                                             "loadavg_1m_after": 1.5}, "new_tokens": 48, "length_spread": 0.5,
                                 "runs": [{"precision": "fp32", "mode": "after", "clients": 8, "aggregate_tokens_per_s": 167.1,
                                           "stream_tokens_per_s_p50": 24.0, "ttft_p50_ms": 135.4},
                                          {"precision": "fp32", "mode": "before", "clients": 8,
                                           "aggregate_tokens_per_s": 45.4, "stream_tokens_per_s_p50": 50.6,
                                           "ttft_p50_ms": 6278.8}]}))
    res["server_concurrent"] = _server_concurrent(serve)
    assert [r["aggregate_tokens_per_s"] for r in res["server_concurrent"]["runs"]] == [167.1]  # the engine's, not one at a time
    assert _server_concurrent(tmp_path / "absent.json") is None
    res = json.loads(json.dumps(res))
    md = report.markdown(res)
    assert "## SmolLM2-135M decode b8, fp32" in md and "aggregate tok/s" in md and "8 news articles" in md
    assert "| llama.cpp F32 (low-level batch) | F32 | low-level API | 200.0 (199.0–201.0) | **1.25** (1.20–1.30) | 11 |" in md
    assert "CTranslate2 float32 | failed: load failed: boom" in md
    assert "What each engine offers" in md and "continuous batching" in md and "llama-server --parallel" in md
    assert "concurrent clients" in md and "| fp32 | 8 | 167.1 |" in md and "45.4" not in md
    assert "| SmolLM2-135M decode b8, fp32 | ❌ no | llama.cpp F32 (low-level batch) 1.25x |" in md  # the targets table
    table = "\n".join(report.summary_table(res))
    assert "| SmolLM2-135M decode b8, fp32 (160 tok/s) |" in table and "**1.25** (F32 (low-level batch))" in table
    # a result without the workload (an older peers.json) renders as before
    old = _result()
    assert "decode b8" not in report.markdown(old) and "What each engine offers" not in report.markdown(old)


def test_a_run_can_be_narrowed_to_some_workloads(monkeypatch):
    from bench.peers.run import WORKLOADS, _workloads

    assert _workloads() == list(WORKLOADS)
    assert _workloads(["encode", "decode_b8"]) == ["decode_b8", "encode"]  # in the run's order
    monkeypatch.setenv("ONNXPIPE_PEERS_WORKLOADS", "decode_b8")  # no such switch: a full run stays whole
    assert _workloads() == list(WORKLOADS)
    with pytest.raises(ValueError, match="unknown workload"):
        _workloads(["decode_b16"])


def test_the_server_comparison_reports_medians_per_server_and_client_count():
    from bench.peers import server

    run = lambda name, c, r, agg: {"precision": "fp32", "server": name, "clients": c, "round": r,  # noqa: E731
                                   "aggregate_tokens_per_s": agg, "stream_tokens_per_s_p50": agg / c,
                                   "ttft_p50_ms": 100.0, "ttft_p99_ms": 200.0, "completed": 6 * c}
    report = {"cpu": "Test CPU", "cpus": 2, "threads": 2, "loadavg_1m": [1.0, 1.5], "new_tokens": 48,
              "llama_cpp": "llama.cpp x", "started": "t",
              "runs": [run("onnxpipe serve", 8, 0, 160.0), run("onnxpipe serve", 8, 1, 180.0),
                       run("onnxpipe serve", 8, 2, 100.0), run("llama-server --parallel 8", 8, 0, 120.0)]}
    md = server.markdown(report)
    assert "| fp32 | onnxpipe serve | 8 | 160.0 | 20.0 | 100 | 200 |" in md  # the median of 160, 180, 100
    assert "| fp32 | llama-server --parallel 8 | 8 | 120.0 |" in md and "Test CPU" in md
