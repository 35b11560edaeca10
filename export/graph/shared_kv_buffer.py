"""The KV cache in one buffer per layer that past_key_values.* and present.* both name, so that
GroupQueryAttention appends the new keys/values in place instead of copying the whole cache into a new
present on every step.
"""
from __future__ import annotations

from ._util import _attr, _graph_index, _toposort


def prepare_shared_kv_buffer(model) -> bool:
    """Let the KV cache live in one buffer per layer that past_key_values.* and present.* both name.

    GroupQueryAttention appends the new keys/values in place when its past and present are the same
    tensor, a [batch, kv_heads, capacity, head_dim] buffer longer than the cache (ONNX Runtime compares the
    pointers): no copy of the whole cache into a new present on every step (SmolLM2 fp32 decode step
    -5% here at 64-192 cached tokens; the copy grows with the cache). The rest of the graph must then not
    take the cache length from a past tensor's shape (it would see the capacity): the Shape nodes that read
    one are rebuilt from the mask, [batch, kv_heads, attention_mask length - input_ids length, head_dim],
    which is the same value when the cache is not shared. Applies only when every present.* comes out of a
    GroupQueryAttention fed the matching past and nothing but Shape nodes read a past tensor otherwise;
    returns whether it did (the manifest's kv_cache.shared_buffer).
    """
    from onnx import helper

    g = model.graph
    _, producer, consumers = _graph_index(g)
    pasts = [i for i in g.input if i.name.startswith("past_key_values.")]
    if not pasts:
        return False
    for out in g.output:
        if not out.name.startswith("present."):
            continue
        node = producer.get(out.name)
        past = "past_key_values." + out.name[len("present."):]
        slot = {"key": 3, "value": 4}.get(out.name.rsplit(".", 1)[-1])
        if node is None or node.op_type != "GroupQueryAttention" or slot is None or node.input[slot] != past:
            return False
    shapes = []
    for past in pasts:
        for reader in consumers.get(past.name, []):
            if reader.op_type == "Shape":
                shapes.append(reader)
            elif reader.op_type != "GroupQueryAttention":
                return False
    dims = [d.dim_value for d in pasts[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or not dims[1] or not dims[3]:
        return False
    g.initializer.extend([helper.make_tensor("kv_shape/heads", 7, [1], [dims[1]]),
                          helper.make_tensor("kv_shape/head_dim", 7, [1], [dims[3]])])
    g.node.extend([
        helper.make_node("Shape", ["input_ids"], ["kv_shape/batch"], start=0, end=1, name="kv_shape/batch"),
        helper.make_node("Shape", ["input_ids"], ["kv_shape/new"], start=1, end=2, name="kv_shape/new"),
        helper.make_node("Shape", ["attention_mask"], ["kv_shape/total"], start=1, end=2, name="kv_shape/total"),
        helper.make_node("Sub", ["kv_shape/total", "kv_shape/new"], ["kv_shape/past"], name="kv_shape/past"),
        helper.make_node("Concat", ["kv_shape/batch", "kv_shape/heads", "kv_shape/past", "kv_shape/head_dim"],
                         ["kv_shape"], axis=0, name="kv_shape"),
    ])
    for reader in shapes:
        start, end = _attr(reader, "start", 0), _attr(reader, "end", 4)
        bounds = [f"{reader.name}/kv_shape_start", f"{reader.name}/kv_shape_end"]
        g.initializer.extend([helper.make_tensor(bounds[0], 7, [1], [start]),
                              helper.make_tensor(bounds[1], 7, [1], [end])])
        at = list(g.node).index(reader)
        g.node.insert(at, helper.make_node("Slice", ["kv_shape", *bounds], list(reader.output),
                                           name=f"{reader.name}/kv_shape"))
        g.node.remove(reader)
    _toposort(g)
    return True
