"""A decoder graph's `logits_to_keep` input, as transformers' forward has: the exported decoder computes the LM
head for every prompt position at prefill, though generation needs only the last.
"""
from __future__ import annotations

from pathlib import Path

from .external_data import _save

LOGITS_TO_KEEP = "logits_to_keep"
_INT64_MAX = 9223372036854775807


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
