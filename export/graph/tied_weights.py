"""A tied LM head (the embedding table, transposed) on disk and before quantization.

ONNX Runtime's optimizer folds Transpose(embedding) of a tied LM head into a second copy of the table
(`retie_transposed_weights` undoes it); quantizers skip a MatMul whose weight is not a constant, so before
quantizing each such MatMul gets its own transposed initializer (`untie_transposed_weights`).
"""
from __future__ import annotations


def retie_transposed_weights(model) -> int:
    """Undo a constant-folded transpose of a tied weight: a MatMul weight that is exactly a Gather table
    transposed (ONNX Runtime's optimizer folds Transpose(embedding) of a tied LM head into a second copy:
    +113 MB for SmolLM2) becomes a Transpose node of the table again. Returns how many."""
    import numpy as np
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    tables = {n.input[0] for n in g.node if n.op_type == "Gather" and n.input[0] in inits}
    weights = {n.input[1] for n in g.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits}
    count = 0
    for name in sorted(weights - tables):
        w = inits[name]
        if len(w.dims) != 2:
            continue
        for table in sorted(tables):
            t = inits[table]
            if list(t.dims) != [w.dims[1], w.dims[0]]:
                continue
            a, b = numpy_helper.to_array(w), numpy_helper.to_array(t)
            if a.dtype == b.dtype and np.array_equal(a, b.T):
                g.initializer.remove(w)
                g.node.insert(0, helper.make_node("Transpose", [table], [name], perm=[1, 0], name=f"retied/{name}"))
                count += 1
                break
    return count


def untie_transposed_weights(model) -> int:
    """Give each MatMul fed by Transpose(initializer) (a tied LM head) its own transposed initializer.

    Quantizers skip a MatMul whose weight is not a constant, which would leave a tied LM head
    (the largest matrix of a small LM) in fp32: with dynamic int8 its DequantizeLinear of the
    shared embedding took 21% of each SmolLM2 decode step. Returns how many were untied.
    """
    from onnx import numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    count = 0
    for node in g.node:
        if node.op_type != "MatMul":
            continue
        t = producers.get(node.input[1])
        if t is None or t.op_type != "Transpose" or t.input[0] not in inits:
            continue
        perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), None)
        w = numpy_helper.to_array(inits[t.input[0]])
        name = t.input[0] + "_transposed_for_" + node.name.replace("/", "_")
        g.initializer.append(numpy_helper.from_array(w.transpose(perm) if perm else w.T, name))
        node.input[1] = name
        count += 1
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    for node in [n for n in g.node if n.op_type == "Transpose" and not any(o in used for o in n.output)]:
        g.node.remove(node)
    return count
