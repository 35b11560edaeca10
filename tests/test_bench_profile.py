"""bench.profile_decode: the per-operator split of a decode step on an exported decoder."""
import pytest

from bench.profile_decode import profile, render
from conftest import tiny_export


def test_profile_splits_a_fused_llama_decode_step_by_operator(tmp_path):
    r = profile(tiny_export("llama", "text-generation", optimize=True), "fp32", threads=1, prompt=5, steps=4,
                out=tmp_path)
    ops = {o["op"]: o for o in r["ops"]}
    # the fused graph: one ONNX Attention node per layer, the weight MatMuls, no unfused Softmax
    assert ops["Attention"]["nodes"] >= 1 and ops["MatMul"]["nodes"] > ops["Attention"]["nodes"]
    assert "Softmax" not in ops
    assert sum(o["ms_per_step"] for o in r["ops"]) == pytest.approx(r["kernel_ms_per_step"])
    assert 0 < r["kernel_ms_per_step"] <= r["model_run_ms_p50"] * 1.05
    assert r["nodes_per_step"] == sum(o["nodes"] for o in r["ops"])
    assert (tmp_path / r["trace"].rsplit("/", 1)[-1]).exists()
    assert "MatMul" in render(r)


def test_profile_refuses_an_encoder_folder_by_name(tmp_path):
    folder = tiny_export("bert", "text-classification")
    with pytest.raises(SystemExit, match="not a decoder with a KV cache"):
        profile(folder, out=tmp_path)


def test_compare_times_two_exports_round_by_round():
    from bench.profile_decode import compare

    onnx_attention = tiny_export("llama", "text-generation", optimize=True, hidden_size=64, head_dim=16,
                                 attention="onnx")
    gqa = tiny_export("llama", "text-generation", optimize=True, hidden_size=64, head_dim=16)
    r = compare(onnx_attention, gqa, threads=1, prompt=5, steps=3, rounds=2)
    assert list(r["step_ms_by_round"]) == [str(onnx_attention), str(gqa)]
    assert all(len(v) == 2 and min(v) > 0 for v in r["step_ms_by_round"].values())
    a, b = r["step_ms_by_round"].values()
    assert r["ratio_b_over_a_by_round"] == pytest.approx([y / x for x, y in zip(a, b)])
