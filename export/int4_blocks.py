"""int4 weights as asymmetric 4-bit blocks with a float offset each (llama.cpp's Q4_1 layout), run by ONNX Runtime's
MatMulNBits.

Why not MatMulNBits' own forms: its symmetric blocks (zero point 8) centre every block's grid on 0, which wastes
levels on a block whose values are not centred (SmolLM2's news-text perplexity +24% over fp32); its asymmetric
blocks take an integer zero point, so the grid's offset is rounded to a whole step (+29% here); a float zero point
is exact but ONNX Runtime 1.32's CPU kernel runs it by dequantizing the weights: 30x slower in a one-node study
(804 against 26 us for 576 x 1,536).

So each block b of `block_size` rows of W (one column) is stored as W_b = d_b * q + m_b with q in 0..15, d_b = (max
- min) / 15 and m_b = min: MatMulNBits with its default zero point 8 computes sum_b d_b * (q - 8) . a_b, and the
rest, sum_b (m_b + 8 d_b) * sum(a_b), is a small float MatMul of the activations' block sums (K / block_size per
row, one MatMul by a 0/1 block-indicator matrix, whatever the activations' rank) by the offsets [K / block_size,
N]. Exact in float arithmetic up to rounding; one more float32 per block on disk (4 + 2 bits a weight with the
scales). Where the weights came from a Q4_1 file (the registry's SmolLM2 does) this reproduces them exactly; on
other weights it is Q4_1's error, no worse than symmetric blocks'.
"""
from __future__ import annotations

import numpy as np

LEVELS = 15  # 4 bits: q in 0..15
DEFAULT_ZERO_POINT = 8  # what MatMulNBits subtracts from q when it has no zero_points input


def quantize_asymmetric_blocks(model, *, block_size: int = 32, accuracy_level: int = 4, skip=()) -> list[str]:
    """Rewrite every MatMul of `model` (an onnx ModelProto, edited in place) whose weight is a 2-D float32
    initializer with K a multiple of `block_size`, except those named in `skip`. Returns the names of the float
    MatMuls it added (the offsets' term), which a later quantizer must leave alone."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    nodes, new_inits, added = [], [], []
    block_sums: dict[str, str] = {}  # activation -> its block sums (MatMuls sharing an input share them)
    indicators: dict[int, str] = {}  # K -> the [K, K / block_size] 0/1 matrix
    for node in g.node:
        w = _weight(node, inits, block_size, skip)
        if w is None:
            nodes.append(node)
            continue
        k, n = w.shape
        packed, scales, offsets = _blocks(w, block_size)
        base = f"int4_asym/{len(added)}"
        new_inits += [numpy_helper.from_array(packed, f"{base}/q4"), numpy_helper.from_array(scales, f"{base}/scales"),
                      numpy_helper.from_array(offsets, f"{base}/offsets")]
        a = node.input[0]
        if k not in indicators:
            indicators[k] = f"int4_asym/blocks_{k}"
            ind = np.zeros((k, k // block_size), np.float32)
            ind[np.arange(k), np.arange(k) // block_size] = 1.0
            new_inits.append(numpy_helper.from_array(ind, indicators[k]))
        if a not in block_sums:
            block_sums[a] = f"{base}/block_sums"
            nodes.append(helper.make_node("MatMul", [a, indicators[k]], [block_sums[a]], name=f"{base}/BlockSums"))
            added.append(f"{base}/BlockSums")
        nodes.append(helper.make_node("MatMulNBits", [a, f"{base}/q4", f"{base}/scales"], [f"{base}/steps"],
                                      domain="com.microsoft", K=k, N=n, bits=4, block_size=block_size,
                                      accuracy_level=accuracy_level, name=f"{base}/MatMulNBits"))
        nodes.append(helper.make_node("MatMul", [block_sums[a], f"{base}/offsets"], [f"{base}/offset_term"],
                                      name=f"{base}/Offsets"))
        nodes.append(helper.make_node("Add", [f"{base}/steps", f"{base}/offset_term"], [node.output[0]],
                                      name=f"{base}/Add"))
        added.append(f"{base}/Offsets")
    if not added:
        return []
    g.ClearField("node")
    g.node.extend(nodes)
    used = {i for nd in g.node for i in nd.input}
    kept = [i for i in g.initializer if i.name in used]
    g.ClearField("initializer")
    g.initializer.extend(kept + new_inits)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return added


def _weight(node, inits, block_size, skip):
    """The node's weight as a float32 [K, N] array when this pass takes it, else None."""
    from onnx import TensorProto, numpy_helper

    if node.op_type != "MatMul" or node.name in skip or len(node.input) < 2 or node.input[1] not in inits:
        return None
    t = inits[node.input[1]]
    if t.data_type != TensorProto.FLOAT or len(t.dims) != 2 or t.dims[0] % block_size:
        return None
    return numpy_helper.to_array(t)


def _blocks(w: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MatMulNBits' packed 4-bit data [N, K / bs, bs / 2], scales [N * K / bs] and the offsets [K / bs, N]."""
    k, n = w.shape
    blocks = w.T.reshape(n, k // block_size, block_size)
    lo, hi = blocks.min(-1), blocks.max(-1)
    d = (hi - lo) / LEVELS
    d = np.where(d > 0, d, 1.0).astype(np.float32)  # a constant block: every q is 0, its value is the offset
    q = np.clip(np.rint((blocks - lo[..., None]) / d[..., None]), 0, LEVELS).astype(np.uint8)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)  # two per byte, the lower index in the low nibble
    offsets = (lo + DEFAULT_ZERO_POINT * d).T.astype(np.float32)
    return np.ascontiguousarray(packed), d.reshape(-1), np.ascontiguousarray(offsets)
