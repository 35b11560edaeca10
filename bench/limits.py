"""The machine's own limits, measured in the same run: float32 GEMM GFLOP/s and memory read bandwidth.

Every speed figure is then also given as a distance from what the hardware allows: an
encoder's compute floor (its matmul FLOPs / GEMM rate) and a decoder's bandwidth ceiling
(weight bytes streamed per token / read bandwidth).
"""
from __future__ import annotations

import threading
import time

import numpy as np

from .timing import summarize


def measure(threads: int, quick: bool = False) -> dict:
    gemm = {f"{m}x{k}x{n}": _ort_gemm(m, k, n, threads, reps=3 if quick else 8)
            for m, k, n in ((128, 768, 3072), (512, 768, 3072), (1024, 1024, 1024))}
    numpy_gemm = _numpy_gemm(1024, reps=3 if quick else 8)
    bw = _bandwidth(threads, mib=256 if quick else 512, reps=3 if quick else 6)
    best = max(v["p50"] for v in gemm.values())
    return {
        "gemm_gflops": best,
        "gemm_note": "ONNX Runtime MatMul (MLAS, the kernels the ONNX contenders use), float32, "
                     f"{threads} intra-op threads; median of repeats, best shape",
        "gemm_by_shape": gemm,
        "numpy_gemm_1024_gflops": numpy_gemm,
        "bandwidth_gbs": max(bw["threads"]["p50"], bw["one_thread"]["p50"]),
        "bandwidth_note": f"sum over a {bw['mib']} MiB float32 array (numpy, split across {threads} threads), "
                          "median of repeats",
        "bandwidth_detail": bw,
    }


def gemm_now(threads: int) -> float:
    """A short GEMM measurement taken right before a case, so its floor reflects the machine at that moment."""
    return max(_ort_gemm(m, 768, 3072, threads, reps=3)["p50"] for m in (128, 512))


def bandwidth_now(threads: int) -> float:
    bw = _bandwidth(threads, mib=256, reps=3)
    return max(bw["threads"]["p50"], bw["one_thread"]["p50"])


def encoder_gflop(layers: int, hidden: int, intermediate: int, seq: int, batch: int = 1) -> float:
    """Matmul FLOPs of a BERT-like encoder (QKV + output projection, FFN, attention scores and mix)."""
    per_layer = 2 * seq * (4 * hidden * hidden + 2 * hidden * intermediate) + 2 * 2 * seq * seq * hidden
    return batch * layers * per_layer / 1e9


_SESSIONS: dict = {}


def _ort_gemm(m: int, k: int, n: int, threads: int, reps: int) -> dict:
    rng = np.random.default_rng(0)
    if (m, k, n, threads) not in _SESSIONS:
        _SESSIONS[(m, k, n, threads)] = _gemm_session(m, k, n, threads, rng)
    sess = _SESSIONS[(m, k, n, threads)]
    x = rng.standard_normal((m, k), dtype=np.float32)
    flop = 2.0 * m * k * n
    inner = max(1, int(5e9 // flop))  # ~5 GFLOP per sample: long enough to time, short enough to repeat
    sess.run(None, {"x": x})
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            sess.run(None, {"x": x})
        rates.append(flop * inner / (time.perf_counter() - t0) / 1e9)
    return summarize(rates, scale=1.0)


def _gemm_session(m: int, k: int, n: int, threads: int, rng):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _numpy_gemm(size: int, reps: int) -> dict:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    a @ b
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(5):
            a @ b
        rates.append(5 * 2.0 * size ** 3 / (time.perf_counter() - t0) / 1e9)
    return summarize(rates, scale=1.0)


def _bandwidth(threads: int, mib: int, reps: int) -> dict:
    a = np.ones(mib * (1 << 20) // 4, dtype=np.float32)
    a.sum()
    parts = np.array_split(a, threads)

    def one():
        t0 = time.perf_counter()
        a.sum()
        return a.nbytes / (time.perf_counter() - t0) / 1e9

    def split():
        # numpy releases the GIL inside large reductions, so the halves stream concurrently.
        workers = [threading.Thread(target=p.sum) for p in parts]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return a.nbytes / (time.perf_counter() - t0) / 1e9

    return {"mib": mib, "one_thread": summarize([one() for _ in range(reps)], scale=1.0),
            "threads": summarize([split() for _ in range(reps)], scale=1.0)}
