"""int4's asymmetric blocks (export/int4_blocks.py) and the int4 export's layout (export/quantize.py)."""
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from onnxpipe.export.int4_blocks import quantize_asymmetric_blocks  # noqa: E402


def _graph(weights: dict, rank: int = 3):
    """x -> MatMul(W_i) for each weight, all reading x, each output a graph output."""
    k = next(iter(weights.values())).shape[0]
    shape = ["b", "s", k] if rank == 3 else ["m", k]
    nodes = [helper.make_node("MatMul", ["x", name], [f"y_{name}"], name=f"mm_{name}") for name in weights]
    outs = [helper.make_tensor_value_info(f"y_{name}", TensorProto.FLOAT, None) for name in weights]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)], outs,
                          [numpy_helper.from_array(w, name) for name, w in weights.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, x):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})


def _q4_1(rng, k, n, block=32):
    """Weights on a Q4_1 grid: each block of `block` rows of a column is d * q + m, q in 0..15 using 0 and 15."""
    d = rng.uniform(0.005, 0.05, (k // block, n)).astype(np.float32)
    m = rng.uniform(-0.3, 0.1, (k // block, n)).astype(np.float32)
    q = rng.integers(0, 16, (k, n))
    q[::block], q[1::block] = 0, 15
    return (np.repeat(d, block, 0) * q + np.repeat(m, block, 0)).astype(np.float32)


@pytest.mark.parametrize("rank", [3, 2])
def test_weights_on_a_q4_1_grid_come_through_exactly(rank):
    rng = np.random.default_rng(0)
    w = {"a": _q4_1(rng, 128, 48), "b": _q4_1(rng, 128, 24)}
    model = _graph(w, rank)
    added = quantize_asymmetric_blocks(model, block_size=32, accuracy_level=0)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulNBits") == 2 and "MatMul" in ops
    assert len([a for a in added if a.endswith("BlockSums")]) == 1  # two MatMuls reading x share the block sums
    x = rng.standard_normal((2, 3, 128) if rank == 3 else (5, 128)).astype(np.float32)
    for y, name in zip(_run(model, x), w):
        ref = x @ w[name]
        assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max(), name


def test_off_grid_weights_lose_no_more_than_symmetric_blocks():
    """On weights from no 4-bit grid, min-max asymmetric blocks are Q4_1's error: below symmetric blocks'."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    rng = np.random.default_rng(1)
    w = {"a": (rng.standard_normal((256, 64)) * 0.05 + 0.02).astype(np.float32)}
    asym = _graph(w)
    quantize_asymmetric_blocks(asym, block_size=32, accuracy_level=0)
    sym = MatMulNBitsQuantizer(_graph(w), bits=4, block_size=32, is_symmetric=True, accuracy_level=0)
    sym.process()
    x = rng.standard_normal((1, 4, 256)).astype(np.float32)
    ref = x @ w["a"]
    err_asym = np.abs(_run(asym, x)[0] - ref).mean()
    err_sym = np.abs(_run(sym.model.model, x)[0] - ref).mean()
    assert 0 < err_asym < err_sym


def test_what_it_cannot_take_is_left_alone():
    rng = np.random.default_rng(2)
    w = {"odd": rng.standard_normal((48, 8)).astype(np.float32)}  # K not a multiple of 32
    model = _graph(w)
    assert quantize_asymmetric_blocks(model, block_size=32) == []
    assert [n.op_type for n in model.graph.node] == ["MatMul"]
    model = _graph({"a": _q4_1(rng, 64, 8)})
    assert quantize_asymmetric_blocks(model, block_size=32, skip={"mm_a"}) == []


def test_a_constant_block_is_exact():
    w = {"a": np.full((64, 4), 0.25, np.float32)}
    model = _graph(w)
    quantize_asymmetric_blocks(model, block_size=32, accuracy_level=0)
    x = np.ones((1, 1, 64), np.float32)
    np.testing.assert_allclose(_run(model, x)[0], x @ w["a"], rtol=1e-6)
