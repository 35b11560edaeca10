"""Each exported rotary position embedding, x*cos + rotate_half(x)*sin (two Slices, Neg, Concat, two Muls, an
Add and their shape arithmetic), as one ONNX `RotaryEmbedding` node (opset 23).
"""
from __future__ import annotations

from ._util import _attr, _swap_nodes, _typed_producer


def fuse_rotary_embeddings(model) -> int:
    """Replace each exported rotary position embedding, x*cos + rotate_half(x)*sin (two Slices, Neg,
    Concat, two Muls, an Add and their shape arithmetic), by one ONNX `RotaryEmbedding` node (opset 23)
    on the same [batch, heads, seq, head_dim] tensor, with the cos/sin halves sliced once for all layers.
    Returns how many were fused (two per layer: Q and K)."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}

    op = _typed_producer(producer)

    def const(name):
        if name in inits:
            return numpy_helper.to_array(inits[name]).reshape(-1).tolist()
        node = op(name, "Constant")
        return numpy_helper.to_array(node.attribute[0].t).reshape(-1).tolist() if node is not None else None


    def unsqueezed(name):
        """Unsqueeze(t, axes=[1]) -> t: the [batch, seq, dim] cos/sin table broadcast over heads."""
        node = op(name, "Unsqueeze")
        if node is None:
            return None
        axes = const(node.input[1]) if len(node.input) > 1 else _attr(node, "axes")
        return node.input[0] if list(axes or []) == [1] else None

    matches = []
    for add in [n for n in g.node if n.op_type == "Add"]:
        muls = [op(i, "Mul") for i in add.input]
        if None in muls:
            continue
        for plain, rotated in (muls, muls[::-1]):
            x, cos = None, None
            for a, b in ((0, 1), (1, 0)):
                if unsqueezed(plain.input[b]) is not None:
                    x, cos = plain.input[a], unsqueezed(plain.input[b])
            cat = next((op(i, "Concat") for i in rotated.input if op(i, "Concat")), None)
            sin = next((unsqueezed(i) for i in rotated.input if unsqueezed(i) is not None), None)
            if x is None or cat is None or sin is None or _attr(cat, "axis") not in (-1, 3) or len(cat.input) != 2:
                continue
            neg, low = op(cat.input[0], "Neg"), op(cat.input[1], "Slice")
            high = op(neg.input[0], "Slice") if neg is not None else None
            if low is None or high is None or low.input[0] != x or high.input[0] != x:
                continue
            if const(low.input[1]) != [0] or (const(high.input[2]) or [0])[0] < 2**31:  # x[..., :h] and x[..., h:]
                continue
            matches.append((add, x, cos, sin))
            break
    if not matches:
        return 0
    halves = {}
    for table in sorted({m[2] for m in matches} | {m[3] for m in matches}):
        # the table is cat(freqs, freqs) over its last axis: its first half is what RotaryEmbedding takes
        shape, half, tail = f"{table}/rotary_half_shape", f"{table}/rotary_half_len", f"{table}/rotary_half"
        g.node.extend([
            helper.make_node("Shape", [table], [shape], start=-1, name=f"{table}/rotary_half/Shape"),
            helper.make_node("Div", [shape, "rotary_half/two"], [half], name=f"{table}/rotary_half/Div"),
            helper.make_node("Slice", [table, "rotary_half/zero", half, "rotary_half/last_axis"], [tail],
                             name=f"{table}/rotary_half/Slice"),
        ])
        halves[table] = tail
    g.initializer.extend([helper.make_tensor("rotary_half/two", 7, [1], [2]),
                          helper.make_tensor("rotary_half/zero", 7, [1], [0]),
                          helper.make_tensor("rotary_half/last_axis", 7, [1], [-1])])
    _swap_nodes(model, [(add, helper.make_node("RotaryEmbedding", [x, halves[cos], halves[sin]], [add.output[0]],
                                               name=f"fused_rotary/{add.name}", interleaved=0))
                        for add, x, cos, sin in matches])
    return len(matches)
