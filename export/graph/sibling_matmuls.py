"""The weight MatMuls that read the same activation (q/k/v, gate/up) as one wider MatMul and a Split: at batch 1
each is a small GEMV and a kernel launch of its own.
"""
from __future__ import annotations

from ._util import _graph_index, _prune_dead_nodes, _toposort


def fuse_sibling_matmuls(model) -> int:
    """Merge the weight MatMuls that read the same activation into one MatMul and a Split.

    A decoder layer multiplies its normed hidden state by q, k and v (and, after the second norm, by gate and
    up) as separate weights: at batch 1 each is a small GEMV and a kernel launch of its own. Their weights
    concatenated along the output axis give one wider MatMul whose columns are the same dot products, split
    back into the original tensors (a weight-only int8 export quantizes the merged weight column block by
    column block, as it would the parts). Only 2D float initializers read by that one MatMul are merged.
    Returns how many groups were merged.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    g = model.graph
    inits, producer, consumers = _graph_index(g)
    groups = []
    for name, readers in consumers.items():
        mms = [n for n in readers if n.op_type == "MatMul" and n.input[0] == name and n.input[1] in inits
               and len(inits[n.input[1]].dims) == 2 and inits[n.input[1]].data_type == 1
               and len(consumers[n.input[1]]) == 1]
        if len(mms) > 1 and len({tuple(inits[n.input[1]].dims)[0] for n in mms}) == 1:
            groups.append((name, mms))
    for name, mms in groups:
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in mms]
        merged = f"{mms[0].input[1]}/merged"
        g.initializer.append(numpy_helper.from_array(np.concatenate(weights, axis=1), merged))
        split = f"{merged}/split"
        g.initializer.append(numpy_helper.from_array(np.array([w.shape[1] for w in weights], np.int64), split))
        at = list(g.node).index(mms[0])
        g.node.insert(at, helper.make_node("Split", [f"{merged}/out", split], [n.output[0] for n in mms],
                                           axis=-1, name=f"{mms[0].name}/split"))
        g.node.insert(at, helper.make_node("MatMul", [name, merged], [f"{merged}/out"], name=f"{mms[0].name}/merged"))
        for n in mms:
            g.node.remove(n)
    if groups:
        _toposort(g)
        _prune_dead_nodes(g)
    return len(groups)
