"""The head layout and KV cache concatenation folded into each fused `Attention` node: after the fusions a
layer still reshapes, transposes and concatenates Q, K and V around it, ~15 small nodes a layer, each a kernel
launch on every decode step.
"""
from __future__ import annotations

from ._util import _attr, _graph_index, _prune_dead_nodes, _toposort, _typed_producer


def fold_attention_layout(model) -> int:
    """Let each fused `Attention` node (fuse_decoder_attention) do its own head layout and KV cache.

    After the fusions a layer still reshapes Q, K and V to [batch, heads, seq, head_dim], transposes them,
    concatenates K and V onto the cache and transposes and reshapes the output back: ~15 small nodes a
    layer, each a kernel launch on every decode step. ONNX `Attention` takes 3D Q/K/V with q_num_heads /
    kv_num_heads, appends them to past_key/past_value itself and returns present_key/present_value, and
    `RotaryEmbedding` rotates a 3D [batch, seq, heads*head_dim] input given num_heads; so the layer becomes
    q/k/v MatMul -> RotaryEmbedding (Q, K) -> Attention -> o_proj. The cache interface (past_key_values.* in,
    present.* out, [batch, kv_heads, seq, head_dim]) is unchanged. A Shape read of a present.* output (the
    causal mask's length) is rebuilt from the past's shape and the new tokens' count so no node waits on the
    attention it feeds. A layer off the pattern is left as it is. Returns how many layers were folded.
    """
    from onnx import helper, numpy_helper

    g = model.graph
    inits, producer, consumers = _graph_index(g)

    op = _typed_producer(producer)


    def heads_split(name):
        """Transpose(Reshape(x3d), perm=[0, 2, 1, 3]) -> x3d."""
        tr = op(name, "Transpose")
        rs = op(tr.input[0], "Reshape") if tr is not None and list(_attr(tr, "perm", [])) == [0, 2, 1, 3] else None
        return rs.input[0] if rs is not None else None

    def rotated(name):
        """RotaryEmbedding(Transpose(Reshape(x3d))) -> (x3d, rotary node)."""
        rot = op(name, "RotaryEmbedding")
        x = heads_split(rot.input[0]) if rot is not None and _attr(rot, "num_heads") is None else None
        return (x, rot) if x is not None else (None, None)

    def const_index(name):
        if name in inits:
            a = numpy_helper.to_array(inits[name])
        elif op(name, "Constant") is not None:
            a = numpy_helper.to_array(producer[name].attribute[0].t)
        else:
            return None
        return int(a.reshape(-1)[0]) if a.size == 1 else None

    def whole_shape(node):
        return node.op_type == "Shape" and _attr(node, "start", 0) == 0 and _attr(node, "end") is None

    def shape_reads(readers):
        """The Shape nodes through which `readers` of a present.* tensor use it, or None if they use more.

        A plain Shape(present) is one. So is the first layer's repeat_kv chain (Unsqueeze -> Expand ->
        Reshape to [batch, heads, past + new, head_dim]) when all that is read of it is its batch, length or
        head_dim (the causal mask's length): those dims are the present's own."""
        shapes = []
        for reader in readers:
            if whole_shape(reader):
                shapes.append(reader)
                continue
            node = reader
            for step in ("Unsqueeze", "Expand", "Reshape"):
                if node.op_type != step:
                    return None
                nxt = consumers.get(node.output[0], [])
                if step != "Reshape":
                    if len(nxt) != 1:
                        return None
                    node = nxt[0]
            for sh in nxt:
                gathers = consumers.get(sh.output[0], [])
                if (not whole_shape(sh) or not gathers
                        or any(c.op_type != "Gather" or const_index(c.input[1]) not in (0, 2, 3, -1, -2)
                               for c in gathers)):
                    return None
                shapes.append(sh)
        return shapes

    swaps, extra = [], []
    for att in [n for n in g.node if n.op_type == "Attention" and len(n.input) == 4 and len(n.output) == 1]:
        q_in, k_all, v_all, mask = att.input
        kcat, vcat = op(k_all, "Concat"), op(v_all, "Concat")
        if kcat is None or vcat is None or len(kcat.input) != 2 or len(vcat.input) != 2:
            continue
        past_k, past_v = kcat.input[0], vcat.input[0]
        q3, q_rot = rotated(q_in)
        k3, k_rot = rotated(kcat.input[1])
        v3 = heads_split(vcat.input[1])
        out_tr = consumers.get(att.output[0], [])
        out_rs = consumers.get(out_tr[0].output[0], []) if len(out_tr) == 1 else []
        if (None in (q3, k3, v3) or len(out_tr) != 1 or out_tr[0].op_type != "Transpose"
                or list(_attr(out_tr[0], "perm", [])) != [0, 2, 1, 3] or len(out_rs) != 1
                or out_rs[0].op_type != "Reshape"):
            continue
        readers = shape_reads([c for name in (k_all, v_all) for c in consumers.get(name, []) if c is not att])
        if readers is None:
            continue
        qh, kvh = _attr(att, "q_num_heads"), _attr(att, "kv_num_heads")
        q_new, k_new = f"{q3}/rotary", f"{k3}/rotary"
        new_att = helper.make_node("Attention", [q_new, k_new, v3, mask, past_k, past_v],
                                   [out_rs[0].output[0], k_all, v_all], name=att.name, q_num_heads=qh,
                                   kv_num_heads=kvh, scale=_attr(att, "scale"))
        rot_q = helper.make_node("RotaryEmbedding", [q3, *q_rot.input[1:]], [q_new], name=f"{q_rot.name}/3d",
                                 interleaved=_attr(q_rot, "interleaved", 0), num_heads=qh)
        rot_k = helper.make_node("RotaryEmbedding", [k3, *k_rot.input[1:]], [k_new], name=f"{k_rot.name}/3d",
                                 interleaved=_attr(k_rot, "interleaved", 0), num_heads=kvh)
        for reader in readers:  # Shape(present) = [batch, kv_heads, past + new, head_dim]
            base = f"{reader.output[0]}/rebuilt"
            past = past_v if reader.input[0] == v_all else past_k
            extra.append((reader, [
                helper.make_node("Shape", [past], [f"{base}/bh"], end=2, name=f"{base}/bh"),
                helper.make_node("Shape", [past], [f"{base}/past"], start=2, end=3, name=f"{base}/past"),
                helper.make_node("Shape", [k3], [f"{base}/new"], start=1, end=2, name=f"{base}/new"),
                helper.make_node("Add", [f"{base}/past", f"{base}/new"], [f"{base}/total"], name=f"{base}/total"),
                helper.make_node("Shape", [past], [f"{base}/dim"], start=3, name=f"{base}/dim"),
                helper.make_node("Concat", [f"{base}/bh", f"{base}/total", f"{base}/dim"], [reader.output[0]],
                                 axis=0, name=f"{base}/concat"),
            ]))
        swaps.append((att, [rot_q, rot_k, new_att], [kcat, vcat, out_tr[0], out_rs[0]]))
    if not swaps:
        return 0
    for att, new_nodes, gone in swaps:
        at = list(g.node).index(att)
        for node in reversed(new_nodes):
            g.node.insert(at, node)
        for node in (att, *gone):
            g.node.remove(node)
    for reader, new_nodes in extra:
        at = list(g.node).index(reader)
        for node in reversed(new_nodes):
            g.node.insert(at, node)
        g.node.remove(reader)
    _toposort(g)
    _prune_dead_nodes(g)
    return len(swaps)
