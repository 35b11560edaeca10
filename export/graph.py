"""Graph edits applied after optimum's export."""
from __future__ import annotations

import os
from pathlib import Path

LOGITS_TO_KEEP = "logits_to_keep"
_INT64_MAX = 9223372036854775807
_EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # protobuf's 2 GB cap, with room


def add_logits_to_keep(path: Path) -> bool:
    """Give a decoder graph a `logits_to_keep` input ([1] int64), as transformers' forward has.

    The exported decoder computes the LM head for every prompt position at prefill, though
    generation needs only the last: for SmolLM2 that is a 576x49152 matmul per prompt token.
    The edit slices the hidden states to the last `logits_to_keep` positions before the LM
    head's MatMul (0 keeps all, which validation and perplexity use). Returns False, leaving
    the file as it was, when the logits do not come straight out of a MatMul.
    """
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path))
    graph = model.graph
    producer = next((n for n in graph.node if "logits" in n.output), None)
    if producer is None or producer.op_type != "MatMul":
        return False
    hidden = producer.input[0]
    graph.input.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, [1]))
    graph.initializer.extend([
        helper.make_tensor("logits_to_keep_ends", TensorProto.INT64, [1], [_INT64_MAX]),
        helper.make_tensor("logits_to_keep_axes", TensorProto.INT64, [1], [1]),
    ])
    sliced = hidden + "_last_positions"
    nodes = [
        helper.make_node("Neg", [LOGITS_TO_KEEP], ["logits_to_keep_starts"], name="logits_to_keep/Neg"),
        helper.make_node("Slice", [hidden, "logits_to_keep_starts", "logits_to_keep_ends", "logits_to_keep_axes"],
                         [sliced], name="logits_to_keep/Slice"),
    ]
    index = list(graph.node).index(producer)
    for offset, node in enumerate(nodes):
        graph.node.insert(index + offset, node)
    producer.input[0] = sliced
    for out in graph.output:
        if out.name == "logits":
            out.type.tensor_type.shape.dim[1].dim_param = "logits_sequence_length"
    _save(model, path)
    return True


def externalize_weights(path: Path) -> None:
    """Rewrite `path` with its weights in one external file beside it (`<name>.data`).

    ONNX Runtime then reads a small protobuf and maps the weights file instead of parsing a
    protobuf that holds them and copying them out: measured on BERT-base, cold start to the
    first result 3.0 -> 1.9 s and peak RSS 564 -> 399 MiB (bench/, README "Benchmarks").
    """
    import onnx

    model = onnx.load(str(path))
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing file
    for stale in (path.with_name(path.name + "_data"),):  # optimum's own name for > 2 GB models
        stale.unlink(missing_ok=True)
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
              size_threshold=1024)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(data, 0o666 & ~umask)  # onnx creates it 0600; the weights are as readable as the graph


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


def _save(model, path: Path) -> None:
    import onnx

    if model.ByteSize() > _EXTERNAL_DATA_THRESHOLD:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data")
    else:
        onnx.save(model, str(path))
