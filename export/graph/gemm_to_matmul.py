"""Gemm with a constant weight as MatMul + Add: GPT-2's Conv1D layers export as Gemm, and the weight-only
quantizer (MatMulNBitsQuantizer) only looks at MatMul.
"""
from __future__ import annotations


def gemm_to_matmul(model) -> int:
    """Rewrite Gemm(A, W, bias) with a constant W as MatMul + Add, which the weight-only quantizer handles.

    GPT-2's Conv1D layers export as Gemm, and MatMulNBitsQuantizer only looks at MatMul.
    Returns how many were rewritten.
    """
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    count = 0
    for idx, node in reversed(list(enumerate(g.node))):
        if node.op_type != "Gemm" or node.input[1] not in inits:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0):
            continue
        weight = node.input[1]
        if attrs.get("transB", 0):
            w = numpy_helper.to_array(inits[weight]).T
            weight = weight + "_t"
            g.initializer.append(numpy_helper.from_array(w.copy(), weight))
        product = node.output[0] + ("_matmul" if len(node.input) > 2 else "")
        new = [helper.make_node("MatMul", [node.input[0], weight], [product], name=node.name + "_MatMul")]
        if len(node.input) > 2 and node.input[2]:
            new.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=node.name + "_Add"))
        g.node.remove(node)
        for offset, n in enumerate(new):
            g.node.insert(idx + offset, n)
        count += 1
    if count:  # a transposed weight's original may now be unused
        used = {i for n in g.node for i in n.input}
        for init in [i for i in g.initializer if i.name not in used]:
            g.initializer.remove(init)
    return count
