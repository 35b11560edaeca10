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
        "bandwidth_gbs": bw["best_gbs"],
        "bandwidth_note": f"the fastest of {len(bw['kernels'])} read kernels over a {bw['mib']} MiB float32 array "
                          f"({bw['best']}), {threads} threads, median of repeats",
        "bandwidth_detail": bw,
    }


# --- a result above its ceiling is a broken probe, not a figure ---------------------------------------------------

# a share of a ceiling above this is reported as a measurement error (the ceiling was measured too low); the 2%
# is timer and rounding slack, not a tolerance for a probe that reads below the machine's rate
CEILING_SLACK = 1.02


def above_ceiling(share: float | None) -> bool:
    """True when `share` (an achieved rate over its ceiling) exceeds the ceiling: the probe is wrong, not the result."""
    return share is not None and share > CEILING_SLACK


def fmt_share(share: float | None, ceiling: str = "ceiling") -> str:
    """'83% of the ceiling', or a flagged measurement error instead of '149% of the ceiling'."""
    if share is None:
        return "–"
    if above_ceiling(share):
        return (f"measurement error: the result is {share:.2f}x its {ceiling}, so the ceiling was measured below "
                "the machine's real rate")
    return f"{share:.0%} of the {ceiling}"


class BandwidthProbe:
    """The machine's read bandwidth, called like a generation contender so it is sampled in the same rounds:
    `(ids, mask, n)` -> the time at which each of `reps` passes over a `mib` MiB float32 array ended.

    The kernel is the fastest, measured when the probe is built, of: numpy's sum, max and count_nonzero split
    across `threads` threads, a matrix-vector product through numpy's BLAS (OpenBLAS, its own threads), and ONNX Runtime's MatMul streaming
    the array as a [1, K] x [K, N] weight (a decode step's pattern, on the kernels the decoders run). numpy's
    float32 sum alone is compute-bound on some CPUs (5-12 GB/s on the Intel AMX machine, where a decoder streamed
    its weights faster: the "149% of the ceiling" of issue 26)."""

    def __init__(self, threads: int, mib: int = 512, reps: int = 8):
        self.kernels = _read_kernels(threads, mib)
        self.nbytes = mib * (1 << 20)
        self.reps = reps
        rates = {}
        for name, fn in self.kernels.items():
            fn()
            t0 = time.perf_counter()
            fn()
            rates[name] = self.nbytes / (time.perf_counter() - t0) / 1e9
        self.kernel = max(rates, key=rates.get)
        self.rates_at_build = rates
        self.fn = self.kernels[self.kernel]

    def __call__(self, ids=None, mask=None, new_tokens=None) -> np.ndarray:
        time.sleep(QUIESCE_S)  # ORT's threads spin for a while after a run
        stamps, t0 = [], time.perf_counter()
        for _ in range(self.reps):
            self.fn()
            stamps.append(time.perf_counter() - t0)
        return np.array(stamps)

    def gbs(self, stamps: np.ndarray) -> float:
        """The bandwidth of a call: the median pass's."""
        return self.nbytes / float(np.median(np.diff(np.concatenate([[0.0], stamps])))) / 1e9


def _read_kernels(threads: int, mib: int) -> dict:
    """name -> a zero-argument call that reads `mib` MiB once (and writes next to nothing)."""
    a = np.full(mib * (1 << 20) // 4, 1e-3, dtype=np.float32)
    parts = np.array_split(a, threads)
    cols = 4096
    m = a.reshape(-1, cols)
    v = np.ones(cols, dtype=np.float32)
    sess = _stream_session(m, threads)
    x = np.ones((1, m.shape[0]), dtype=np.float32)
    words = np.array_split(a.view(np.uint64), threads)
    return {f"numpy sum, {threads} threads": lambda: _split_sum(parts),
            f"numpy max, {threads} threads": lambda: _split(np.max, parts),
            # the least arithmetic per byte: a compare per 8 bytes (and numpy releases the GIL in it)
            f"numpy count_nonzero over 64-bit words, {threads} threads": lambda: _split(np.count_nonzero, words),
            "numpy matrix-vector (BLAS)": lambda: m @ v,
            f"ONNX Runtime MatMul [1,K]x[K,N] weight, {threads} threads": lambda: sess.run(None, {"x": x})}


def _stream_session(w: np.ndarray, threads: int):
    """x[1, K] @ w[K, N] in ONNX Runtime: one decode-step MatMul whose weight is the whole array."""
    from onnx import TensorProto, helper, numpy_helper

    k, n = w.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "stream",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                              [numpy_helper.from_array(w, "w")])
    return _ort_session(graph, threads)


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
    """Each read kernel's rate (median and max of `reps` passes), a STREAM-style copy beside them (read + write
    bytes counted; recorded, not used as the read ceiling), and the best read kernel's median as the ceiling."""
    time.sleep(QUIESCE_S)
    kernels = _read_kernels(threads, mib)
    nbytes = mib * (1 << 20)
    out = {"mib": mib, "kernels": {}}
    for name, fn in kernels.items():
        fn()
        rates = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            rates.append(nbytes / (time.perf_counter() - t0) / 1e9)
        out["kernels"][name] = summarize(rates, scale=1.0)
    del kernels
    a = np.ones(nbytes // 4, dtype=np.float32)
    b = np.empty_like(a)
    np.copyto(b, a)
    copy = []
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(b, a)
        copy.append(2 * nbytes / (time.perf_counter() - t0) / 1e9)
    out["copy_read_plus_write"] = summarize(copy, scale=1.0)
    out["best"] = max(out["kernels"], key=lambda k: out["kernels"][k]["p50"])
    out["best_gbs"] = out["kernels"][out["best"]]["p50"]
    return out


def _split(fn, parts: list[np.ndarray]) -> None:
    """fn over each part on a thread of its own (numpy releases the GIL in large reductions)."""
    workers = [threading.Thread(target=fn, args=(p,)) for p in parts]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def _split_sum(parts: list[np.ndarray]) -> None:
    """Sum each part on a thread of its own: numpy releases the GIL inside large reductions, so they stream
    concurrently (the read bandwidth of len(parts) cores)."""
    workers = [threading.Thread(target=p.sum) for p in parts]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


class DecodeMatmuls:
    """A decode step's weight MatMuls alone, through ONNX Runtime's kernels: every MatMul of the graph whose
    weight is a float32 initializer (or a Transpose of one: a tied LM head; GPT-2's Gemm layers too), at its
    shape, fed `batch` rows, in one session. What an ORT decoder cannot beat, next to the bandwidth ceiling
    (which assumes a kernel streaming weights at the machine's full read rate).

    Called like a generation contender, `(ids, mask, new_tokens)` -> the time at which each "step" ended, so
    the generation case times it in the same rounds as the contenders (same moment of this noisy VM)."""

    def __init__(self, onnx_path, threads: int, batch: int = 1):
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
        self.session = _ort_session(helper.make_graph(nodes, "decode_matmuls", list(inputs.values()), outputs, weights), threads)
        self.feeds = {f"x{k}": rng.standard_normal((batch, k), dtype=np.float32) for k in inputs}
        self.matmuls = len(shapes)
        self.weight_bytes = sum(4 * k * n for k, n in shapes)
        for _ in range(3):
            self.session.run(None, self.feeds)

    def __call__(self, ids=None, mask=None, new_tokens: int = 64) -> np.ndarray:
        stamps = []
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            self.session.run(None, self.feeds)
            stamps.append(time.perf_counter() - t0)
        return np.array(stamps)

    def summary(self, times_ms: list[float]) -> dict:
        p50 = float(np.median(times_ms))
        return {"matmuls": self.matmuls, "weight_bytes": self.weight_bytes, "p50_ms": p50, "min_ms": float(min(times_ms)),
                "gbs": self.weight_bytes / (p50 / 1e3) / 1e9}


class EncoderMatmulChain:
    """A BERT-like encoder's matmuls and nothing else, in one ONNX Runtime graph, as a callable timed beside the
    contenders, round by round (so the floor and the pipelines meet the same moment of this noisy VM).

    Per layer, chained as the model chains them: the four HxH projections (Q, K, V, output), the FFN's HxI and
    IxH, and the attention's two batched products (QK^T, PV) on their own chain; distinct weights per layer, so
    the weights stream from memory as the model's do (85M parameters for BERT-base). Weights are scaled so the
    activations keep unit variance through all layers (no inf/NaN, no denormals to slow the FMA units).
    """

    def __init__(self, layers: int, hidden: int, intermediate: int, seq: int, batch: int, threads: int, heads: int = 12):
        from onnx import TensorProto, helper, numpy_helper

        rng = np.random.default_rng(0)
        rows, d = batch * seq, hidden // heads
        bh = batch * heads

        def weight(name, k, n):
            return numpy_helper.from_array((rng.standard_normal((k, n), dtype=np.float32) / np.sqrt(k)).astype(np.float32), name)

        nodes, inits = [], []
        x, a = "x", "a"
        kt = numpy_helper.from_array((rng.standard_normal((bh, d, seq), dtype=np.float32) / np.sqrt(d)).astype(np.float32), "kt")
        v = numpy_helper.from_array((rng.standard_normal((bh, seq, d), dtype=np.float32) / np.sqrt(seq)).astype(np.float32), "v")
        inits += [kt, v]
        for layer in range(layers):
            for j, (k, n) in enumerate([(hidden, hidden)] * 4 + [(hidden, intermediate), (intermediate, hidden)]):
                w = weight(f"w{layer}_{j}", k, n)
                inits.append(w)
                y = f"x{layer}_{j}"
                nodes.append(helper.make_node("MatMul", [x, w.name], [y]))
                x = y
            s, p = f"s{layer}", f"a{layer}"
            nodes += [helper.make_node("MatMul", [a, "kt"], [s]), helper.make_node("MatMul", [s, "v"], [p])]
            a = p
        nodes += [helper.make_node("Identity", [x], ["y"]), helper.make_node("Identity", [a], ["z"])]
        graph = helper.make_graph(nodes, "encoder_matmuls",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, hidden]),
                                   helper.make_tensor_value_info("a", TensorProto.FLOAT, [bh, seq, d])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, hidden]),
                                   helper.make_tensor_value_info("z", TensorProto.FLOAT, [bh, seq, d])], inits)
        self.session = _ort_session(graph, threads)
        self.feeds = {"x": rng.standard_normal((rows, hidden), dtype=np.float32),
                      "a": rng.standard_normal((bh, seq, d), dtype=np.float32)}
        self.gflop = encoder_gflop(layers, hidden, intermediate, seq, batch)

    def __call__(self):
        return self.session.run(None, self.feeds)


class GemmProbe:
    """One float32 GEMM of a favourable shape (BERT's FFN at 512 rows), timed beside the contenders round by round:
    each round's GEMM rate gives that round's peak-rate floor (all of a model's FLOPs at that rate)."""

    def __init__(self, threads: int, m: int = 512, k: int = 768, n: int = 3072, reps: int = 3):
        rng = np.random.default_rng(0)
        self.session = _gemm_session(m, k, n, threads, rng)
        self.x = rng.standard_normal((m, k), dtype=np.float32)
        self.reps = reps
        self.flop = 2.0 * m * k * n * reps  # per call
        self.shape = f"{m}x{k}x{n}"

    def __call__(self):
        for _ in range(self.reps):
            self.session.run(None, {"x": self.x})
