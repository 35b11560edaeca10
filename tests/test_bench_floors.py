"""bench.limits: the floors timed beside the contenders (the encoder's matmuls chained, a GEMM probe, a decoder
step's weight MatMuls) build the graphs they say they do, and the timing helpers pair rounds as documented."""
import numpy as np
import onnx
import pytest

from bench.limits import (BandwidthProbe, DecodeMatmuls, EncoderMatmulChain, GemmProbe, _bandwidth, above_ceiling,
                          encoder_gflop, fmt_share)
from bench.timing import paired_speedup, time_interleaved
from conftest import tiny_export


def test_encoder_matmul_chain_has_the_models_matmuls_and_keeps_activations_finite():
    chain = EncoderMatmulChain(layers=3, hidden=64, intermediate=256, seq=8, batch=2, threads=1, heads=4)
    y, z = chain()
    assert y.shape == (16, 64) and z.shape == (8, 8, 16)
    assert np.isfinite(y).all() and np.isfinite(z).all()
    # unit-variance weights: after 3 layers (18 projections, 6 attention products) the scale is still ~1
    assert 0.1 < y.std() < 10 and 0.1 < z.std() < 10
    assert chain.gflop == pytest.approx(encoder_gflop(3, 64, 256, 8, 2))
    # 6 weight matmuls + 2 attention products per layer
    assert encoder_gflop(1, 64, 256, 8, 1) * 1e9 == 2 * 8 * (4 * 64 * 64 + 2 * 64 * 256) + 2 * 2 * 8 * 8 * 64


def test_gemm_probe_counts_its_flops_per_call():
    probe = GemmProbe(threads=1, m=16, k=32, n=48, reps=3)
    assert probe.flop == 2 * 16 * 32 * 48 * 3 and probe.shape == "16x32x48"
    probe()


def test_decode_matmuls_are_the_decoders_weight_matmuls_and_time_like_a_contender():
    folder = tiny_export("llama", "text-generation", optimize=True)
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    weight_matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    floor = DecodeMatmuls(folder / "model.onnx", threads=1)
    # the tied LM head reads the embedding through a Transpose: counted too
    assert floor.matmuls >= len(weight_matmuls) >= 1
    stamps = floor(None, None, 5)
    assert len(stamps) == 5 and np.all(np.diff(stamps) > 0)
    s = floor.summary(list(np.diff(stamps) * 1e3))
    assert s["matmuls"] == floor.matmuls and s["gbs"] > 0


def test_interleaved_rounds_pair_with_the_reference():
    calls = {"a": lambda: None, "b": lambda: sum(range(20000)), "bad": lambda: 1 / 0}
    times, errors = time_interleaved(calls, budget_s=0.0, min_reps=3, max_reps=3, warmup=1)
    assert set(times) == {"a", "b"} and "ZeroDivisionError" in errors["bad"]
    assert all(len(t) == 3 for t in times.values())
    r = paired_speedup([2.0, 4.0, 6.0], [1.0, 1.0, 3.0])
    assert r == {"median": 2.0, "min": 2.0, "max": 4.0}


def test_bandwidth_is_the_fastest_of_several_read_kernels_and_the_probe_uses_one_of_them():
    bw = _bandwidth(threads=2, mib=8, reps=2)
    names = set(bw["kernels"])
    # numpy's sum alone read 5-12 GB/s on the Intel AMX machine while a decoder streamed faster (issue 26): a BLAS
    # matrix-vector product and ONNX Runtime's own MatMul streaming a weight are measured beside it
    assert any("numpy sum" in n for n in names) and any("BLAS" in n for n in names)
    assert any("ONNX Runtime MatMul" in n for n in names)
    assert bw["best"] in names and bw["best_gbs"] == max(k["p50"] for k in bw["kernels"].values()) > 0
    assert bw["copy_read_plus_write"]["p50"] > 0
    probe = BandwidthProbe(threads=2, mib=8, reps=3)
    assert probe.kernel in probe.kernels and set(probe.rates_at_build) == set(probe.kernels)
    stamps = probe()
    assert len(stamps) == 3 and probe.gbs(stamps) > 0


def test_a_share_above_its_ceiling_is_a_measurement_error_not_a_percentage():
    assert fmt_share(0.83) == "83% of the ceiling" and not above_ceiling(0.83) and not above_ceiling(None)
    assert above_ceiling(1.49)
    text = fmt_share(1.49, "read-bandwidth ceiling")
    assert "measurement error" in text and "149%" not in text and "1.49x" in text
    assert fmt_share(None) == "–"
