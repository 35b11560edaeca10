"""Each layer's merged q/k/v MatMul -> Split -> RotaryEmbedding (Q, K) -> `Attention` as the packed QKV MatMul and
one com.microsoft `GroupQueryAttention` node, which rotates Q and K itself from cos/sin tables: per layer a
Split and two RotaryEmbedding kernel launches fewer on every decode step.
"""
from __future__ import annotations

from ._util import _attr, _graph_index, _prune_dead_nodes, _toposort, _typed_producer


def fuse_group_query_attention(model, max_positions: int) -> int:
    """Turn each layer's merged q/k/v MatMul -> Split -> RotaryEmbedding (Q, K) -> `Attention` into the merged
    MatMul (columns reordered to q, k, v) -> one com.microsoft `GroupQueryAttention` node.

    GroupQueryAttention takes the packed QKV, rotates Q and K itself (do_rotary, from cos/sin tables indexed
    by position) and attends the grouped K/V heads as they are: per layer a Split and two RotaryEmbedding
    kernel launches fewer on every decode step (SmolLM2 fp32 decode step 18.1 -> 16.6 ms in one A/B here,
    20.1 -> 19.7 ms in another: this VM is noisy). The tables
    are the graph's own rotary computation evaluated at positions 0..max_positions-1 (so any RoPE variant
    the export traced is reproduced as is), after checking that it is position-wise.

    Positions are the kernel's own: for a prompt it rotates every row's token s by s (it reads nothing but
    position_ids[0, 0] then, so a left-padded row cannot be given its own start), and at each later step
    by the cache length. A left-padded row's tokens are so rotated by their index, not by their position
    (index minus the row's pads) as transformers does: the same shift for all of the row's queries and
    keys, which rotary attention does not see (q_m . k_n depends on m - n alone), so logits are the same,
    but such a row's present.*.key differs from transformers' cache (an unpadded row's is the same). The
    position_ids input is then unused. The additive mask goes in as attention_bias and every row's key
    length is the mask's (seqlens_k = total - 1), so the KV cache interface (past_key_values.* in,
    present.* out, [batch, kv_heads, seq, head_dim]) is as it was. Run after
    fold_attention_layout and fuse_sibling_matmuls. A layer off the pattern is left as it is. Returns how
    many layers were fused.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    g = model.graph
    inits, producer, consumers = _graph_index(g)
    graph_inputs = {i.name for i in g.input}  # the mask feeds the kernel, position_ids the RoPE tables
    if not {"attention_mask", "position_ids"} <= graph_inputs or max_positions <= 0:
        return 0

    op = _typed_producer(producer)


    def shape_of_batch_seq(node):
        """A Shape node that reads only dims among [batch, seq] of a [batch, seq, features] tensor."""
        return node.op_type == "Shape" and _attr(node, "start", 0) in (0, 1) and _attr(node, "end") in (1, 2)

    layers = []
    for att in [n for n in g.node if n.op_type == "Attention" and n.domain in ("", "ai.onnx")
                and len(n.input) == 6 and len(n.output) == 3]:
        q_rot, k_rot, v3, mask, past_k, past_v = att.input
        rq, rk = op(q_rot, "RotaryEmbedding"), op(k_rot, "RotaryEmbedding")
        if rq is None or rk is None or len(rq.input) != 3 or list(rq.input[1:]) != list(rk.input[1:]):
            continue
        if _attr(rq, "interleaved", 0) != _attr(rk, "interleaved", 0) or _attr(rq, "rotary_embedding_dim", 0):
            continue
        q3, k3 = rq.input[0], rk.input[0]
        split = op(q3, "Split")
        if split is None or op(k3, "Split") is not split or op(v3, "Split") is not split or len(split.output) != 3:
            continue
        sizes = inits.get(split.input[1]) if len(split.input) > 1 else None
        mm = op(split.input[0], "MatMul")
        if (sizes is None or mm is None or mm.input[1] not in inits or len(consumers[mm.input[1]]) != 1
                or len(consumers[split.input[0]]) != 1 or _attr(split, "axis") not in (-1, 2)):
            continue
        others = [c for t in (q3, k3, v3) for c in consumers[t] if c not in (rq, rk, att)]
        if not all(shape_of_batch_seq(c) for c in others):
            continue
        if len(consumers[q_rot]) != 1 or len(consumers[k_rot]) != 1:
            continue
        sizes = numpy_helper.to_array(sizes).tolist()
        q_width = sizes[list(split.output).index(q3)]
        if q_width % int(_attr(att, "q_num_heads", 1)) or (q_width // int(_attr(att, "q_num_heads", 1))) % 16:
            continue  # the CPU kernel wants head_size a multiple of 16
        layers.append((att, rq, rk, split, mm, sizes, others))
    if not layers:
        return 0
    tables = {layers[0][1].input[1], layers[0][1].input[2]}
    if any({rq.input[1], rq.input[2]} != tables for _, rq, *_ in layers):
        return 0
    cos, sin = _rotary_tables(model, layers[0][1].input[1], layers[0][1].input[2], max_positions)
    if cos is None:
        return 0
    g.initializer.extend([numpy_helper.from_array(cos, "gqa/cos_cache"), numpy_helper.from_array(sin, "gqa/sin_cache"),
                          helper.make_tensor("gqa/one", 6, [1], [1])])
    # every row attends the whole (left-padded) cache; the additive mask does the rest
    g.node.extend([
        helper.make_node("Shape", ["attention_mask"], ["gqa/batch"], start=0, end=1, name="gqa/batch"),
        helper.make_node("Shape", ["attention_mask"], ["gqa/total64"], start=1, end=2, name="gqa/total64"),
        helper.make_node("Cast", ["gqa/total64"], ["gqa/total1"], to=6, name="gqa/total1"),
        helper.make_node("Squeeze", ["gqa/total1"], ["gqa/total"], name="gqa/total"),
        helper.make_node("Sub", ["gqa/total1", "gqa/one"], ["gqa/last"], name="gqa/last"),
        helper.make_node("Expand", ["gqa/last", "gqa/batch"], ["gqa/seqlens_k"], name="gqa/seqlens_k"),
    ])
    for att, rq, rk, split, mm, sizes, others in layers:
        order = {name: i for i, name in enumerate(split.output)}
        starts = np.cumsum([0] + sizes)
        w = numpy_helper.to_array(inits[mm.input[1]])
        cols = [w[:, starts[order[t]]:starts[order[t] + 1]] for t in (rq.input[0], rk.input[0], att.input[2])]
        packed = f"{mm.input[1]}/qkv"
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(np.concatenate(cols, axis=1)), packed))
        qkv = f"{mm.output[0]}/qkv"
        new_mm = helper.make_node("MatMul", [mm.input[0], packed], [qkv], name=f"{mm.name}/qkv")
        gqa = helper.make_node(
            "GroupQueryAttention",
            [qkv, "", "", att.input[4], att.input[5], "gqa/seqlens_k", "gqa/total", "gqa/cos_cache", "gqa/sin_cache",
             "", att.input[3]],
            list(att.output), name=f"{att.name}/gqa", domain="com.microsoft",
            num_heads=int(_attr(att, "q_num_heads")), kv_num_heads=int(_attr(att, "kv_num_heads")),
            scale=float(_attr(att, "scale")), do_rotary=1, rotary_interleaved=int(_attr(rq, "interleaved", 0)))
        for reader in others:  # a Shape read of q/k/v's [batch, seq] is the packed output's too
            reader.input[0] = qkv
        at = list(g.node).index(att)
        g.node.insert(at, gqa)
        g.node.insert(at, new_mm)
        for node in (att, rq, rk, split, mm):
            g.node.remove(node)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    _toposort(g)
    _prune_dead_nodes(g)
    return len(layers)


def _rotary_tables(model, cos_name: str, sin_name: str, positions: int):
    """The graph's [batch, seq, head_dim/2] cos/sin tensors evaluated for position_ids 0..positions-1, as
    [positions, head_dim/2] tables; (None, None) if they depend on more than position_ids or are not
    position-wise (a row for a position must not depend on the other positions in the call)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper

    g = model.graph
    inits, producer, _ = _graph_index(g)
    needed, frontier, names = [], [cos_name, sin_name], set()
    while frontier:
        name = frontier.pop()
        if name in names or name == "" or name in inits:
            continue
        names.add(name)
        node = producer.get(name)
        if node is None:
            if name != "position_ids":
                return None, None
            continue
        if node not in needed:
            needed.append(node)
        frontier.extend(node.input)
    order = {id(n): i for i, n in enumerate(g.node)}
    needed.sort(key=lambda n: order[id(n)])
    used = {i for n in needed for i in n.input}
    sub_inits = [inits[n] for n in used if n in inits]
    if any(i.data_location == onnx.TensorProto.EXTERNAL for i in sub_inits):
        return None, None
    pos_in = next(i for i in g.input if i.name == "position_ids")
    sub = helper.make_model(
        helper.make_graph(needed, "rotary_tables", [pos_in], [helper.make_tensor_value_info(cos_name, 1, None),
                                                               helper.make_tensor_value_info(sin_name, 1, None)],
                          sub_inits),
        opset_imports=list(model.opset_import), ir_version=model.ir_version)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(sub.SerializeToString(), so, providers=["CPUExecutionProvider"])
        cos, sin = sess.run(None, {"position_ids": np.arange(positions, dtype=np.int64)[None]})
        probe = np.array([[positions - 1, 0, 7, 3]], dtype=np.int64) % positions
        pcos, psin = sess.run(None, {"position_ids": probe})
    except Exception:  # not computable from position_ids alone
        return None, None
    if cos.ndim != 3 or cos.shape[:2] != (1, positions) or cos.shape != sin.shape:
        return None, None
    if not (np.array_equal(pcos[0], cos[0, probe[0]]) and np.array_equal(psin[0], sin[0, probe[0]])):
        return None, None
    return np.ascontiguousarray(cos[0], dtype=np.float32), np.ascontiguousarray(sin[0], dtype=np.float32)
