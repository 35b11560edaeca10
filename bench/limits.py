"""The machine's own limits, measured in the same run: float32 GEMM GFLOP/s and memory read bandwidth.

Every speed figure is then also given as a distance from what the hardware allows: an
encoder's compute floor (its matmul FLOPs / GEMM rate) and a decoder's bandwidth ceiling
(weight bytes streamed per token / read bandwidth).
"""
from __future__ import annotations

import threading
import time

import numpy as np

from onnxpipe.session import on_process_pool

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


def encoder_gemm_floor_ms(layers: int, hidden: int, intermediate: int, seq: int, batch: int, threads: int,
                          heads: int = 12) -> dict:
    """The same encoder's matmuls, each timed alone in ONNX Runtime (MLAS) at its own shape: the compute floor
    for this model at this size on this machine.

    `encoder_gflop / best GEMM rate` assumes every matmul runs at the rate of the most favourable shape;
    BERT's 128x768x768 projections and its (seq x 64) attention products run slower than a 512x768x3072
    GEMM, so this floor is the one a whole model can approach. Both are reported.
    """
    rows = batch * seq
    head_dim = hidden // heads
    parts = {  # name: (ms per call, calls per layer)
        "projection HxH (Q, K, V, output)": (_ort_gemm_ms(rows, hidden, hidden, threads), 4),
        "FFN in HxI": (_ort_gemm_ms(rows, hidden, intermediate, threads), 1),
        "FFN out IxH": (_ort_gemm_ms(rows, intermediate, hidden, threads), 1),
        "attention scores QK^T": (_ort_batched_ms(batch * heads, seq, head_dim, seq, threads), 1),
        "attention mix PV": (_ort_batched_ms(batch * heads, seq, seq, head_dim, threads), 1),
    }
    total = layers * sum(ms * n for ms, n in parts.values())
    return {"floor_ms": total, "per_layer_ms": {k: ms * n for k, (ms, n) in parts.items()}}


def _ort_gemm_ms(m: int, k: int, n: int, threads: int) -> float:
    """Median ms of one [m,k] x [k,n] MatMul with a constant weight (prepacked, as in the model)."""
    rate = _ort_gemm(m, k, n, threads, reps=5)["p50"]
    return 2.0 * m * k * n / (rate * 1e9) * 1e3


def _ort_batched_ms(b: int, m: int, k: int, n: int, threads: int) -> float:
    """Median ms of a batched [b,m,k] x [b,k,n] MatMul of two activations (attention's products)."""
    from onnx import TensorProto, helper

    key = ("batched", b, m, k, n, threads)
    if key not in _SESSIONS:
        graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["y"])], "bmm",
                                  [helper.make_tensor_value_info("a", TensorProto.FLOAT, [b, m, k]),
                                   helper.make_tensor_value_info("b", TensorProto.FLOAT, [b, k, n])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [b, m, n])])
        _SESSIONS[key] = _ort_session(graph, threads)
    sess = _SESSIONS[key]
    rng = np.random.default_rng(0)
    feeds = {"a": rng.standard_normal((b, m, k), dtype=np.float32), "b": rng.standard_normal((b, k, n), dtype=np.float32)}
    sess.run(None, feeds)
    inner = max(1, int(5e8 // (2.0 * b * m * k * n)))
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(inner):
            sess.run(None, feeds)
        times.append((time.perf_counter() - t0) / inner * 1e3)
    return float(np.median(times))


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
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], [w])
    return _ort_session(graph, threads)


def _ort_session(graph, threads: int):
    """An ONNX Runtime CPU session of `graph` (opset 17) with `threads` threads (or the process's shared pool)."""
    import onnxruntime as ort
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    so = on_process_pool(ort.SessionOptions(), threads)
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _numpy_gemm(size: int, reps: int) -> dict:
    time.sleep(QUIESCE_S)
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


# ONNX Runtime's intra-op threads spin for ~30-60 ms after a run (measured here: the process kept using a core
# that long while it slept); numpy's threads measured then would share their cores with that spinning.
QUIESCE_S = 0.15


def _bandwidth(threads: int, mib: int, reps: int) -> dict:
    time.sleep(QUIESCE_S)
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


def decode_matmul_floor_ms(onnx_path, threads: int, batch: int = 1, reps: int = 7) -> dict:
    """A decode step's weight MatMuls alone, through ONNX Runtime's kernels: every MatMul of the graph whose
    weight is a float32 initializer (or a Transpose of one: a tied LM head), at its shape, fed `batch` rows,
    in one session. What an ORT decoder cannot beat, next to the bandwidth ceiling (which assumes a kernel
    streaming weights at the machine's full read rate)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    shapes = []
    for node in g.node:
        if node.op_type == "Gemm" and node.input[1] in inits and len(inits[node.input[1]].dims) == 2:  # GPT-2's Conv1D
            dims = tuple(inits[node.input[1]].dims)
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            shapes.append(dims[::-1] if trans_b else dims)
            continue
        if node.op_type != "MatMul" or len(node.input) < 2:
            continue
        w, t = node.input[1], producer.get(node.input[1])
        if w in inits and inits[w].data_type == TensorProto.FLOAT and len(inits[w].dims) == 2:
            shapes.append(tuple(inits[w].dims))
        elif t is not None and t.op_type == "Transpose" and t.input[0] in inits and len(inits[t.input[0]].dims) == 2:
            shapes.append(tuple(inits[t.input[0]].dims[::-1]))
    rng = np.random.default_rng(0)
    nodes, weights, inputs, outputs = [], [], {}, []
    for i, (k, n) in enumerate(shapes):
        weights.append(numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32) * 0.02, f"w{i}"))
        inputs.setdefault(k, helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [batch, k]))
        nodes.append(helper.make_node("MatMul", [f"x{k}", f"w{i}"], [f"y{i}"]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [batch, n]))
    sess = _ort_session(helper.make_graph(nodes, "decode_matmuls", list(inputs.values()), outputs, weights), threads)
    feeds = {f"x{k}": rng.standard_normal((batch, k), dtype=np.float32) for k in inputs}
    for _ in range(3):
        sess.run(None, feeds)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - t0) * 1e3)
    weight_bytes = sum(4 * k * n for k, n in shapes)
    p50 = float(np.median(times))
    return {"matmuls": len(shapes), "weight_bytes": weight_bytes, "p50_ms": p50, "min_ms": float(min(times)),
            "gbs": weight_bytes / (p50 / 1e3) / 1e9}
