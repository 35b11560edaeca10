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


# ONNX's Attention (opset 23) takes grouped K/V heads and an additive mask: one node in place of the
# ~50 an exported decoder layer spends on its attention.
ATTENTION_OPSET = 23


def fuse_decoder_attention(model, num_heads: int, num_kv_heads: int) -> int:
    """Replace each decoder layer's exported attention by one ONNX `Attention` node (opset 23).

    The export spells every layer's attention out: Concat(past, new) for the cache, repeat_kv
    (Unsqueeze/Expand/Reshape and their shape arithmetic), Q*scale, K^T*scale, QK^T + mask,
    Softmax, a NaN guard for fully masked rows, and the product with V. The cache Concats stay
    (they are the `present.*` outputs); the fused node takes the rotated Q, the whole K and V
    (`present.*`, grouped heads as they are), the additive mask, and the product of the two
    scales, and gives the attention output (ONNX Runtime gives fully masked rows 0, as the guard
    did). For SmolLM2 that is ~1,600 fewer nodes per decode step. A layer whose nodes do not
    match the exported pattern is left as it is. Returns how many layers were fused.
    """

    import numpy as np
    from onnx import helper, numpy_helper

    g = model.graph
    inits, producer, consumers = _graph_index(g)

    def scalar(name):
        if name in inits:
            a = numpy_helper.to_array(inits[name])
        elif name in producer and producer[name].op_type == "Constant":
            a = numpy_helper.to_array(producer[name].attribute[0].t)
        else:
            return None
        return float(a.reshape(-1)[0]) if a.size == 1 else None

    op = _typed_producer(producer)

    def reaches(name, target, depth=6):
        """`name` is `target` seen through repeat_kv's Unsqueeze/Expand/Reshape (and a Transpose for K)."""
        while depth > 0:
            if name == target:
                return True
            node = op(name, "Unsqueeze", "Expand", "Reshape", "Transpose")
            if node is None:
                return False
            name, depth = node.input[0], depth - 1
        return False

    def scaled(name):
        """Mul(x, c) with a scalar constant c -> (x, c)."""
        node = op(name, "Mul")
        if node is None:
            return None
        for a, b in ((0, 1), (1, 0)):
            c = scalar(node.input[b])
            if c is not None:
                return node.input[a], c
        return None

    fused = []
    for out in g.output:
        name = out.name
        if not (name.startswith("present.") and name.endswith(".key")):
            continue
        layer = name[len("present."):-len(".key")]
        kcat, vcat = op(name, "Concat"), op(f"present.{layer}.value", "Concat")
        past_k, past_v = f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"
        if kcat is None or vcat is None or list(kcat.input[:1]) != [past_k] or list(vcat.input[:1]) != [past_v]:
            continue
        # the product with V: a MatMul whose second input is present.value through repeat_kv
        pv = None
        frontier, seen = [vcat.output[0]], set()
        while frontier and pv is None:
            cur = frontier.pop()
            for c in consumers.get(cur, []):
                if c.op_type == "MatMul" and c.input[1] == cur:  # cur is present.value or its repeat_kv
                    pv = c
                    break
                if c.op_type in ("Unsqueeze", "Expand", "Reshape") and c.output[0] not in seen:
                    seen.add(c.output[0])
                    frontier.append(c.output[0])
        if pv is None:
            continue
        probs = op(pv.input[0], "Where", "Softmax")
        if probs is not None and probs.op_type == "Where":  # the NaN guard: Where(IsNaN(p), 0, p)
            probs = op(probs.input[2], "Softmax") if op(probs.input[0], "IsNaN") else None
        if probs is None:
            continue
        add = op(probs.input[0], "Add")
        if add is None:
            continue
        qk, mask = (op(add.input[0], "MatMul"), add.input[1])
        if qk is None:
            qk, mask = op(add.input[1], "MatMul"), add.input[0]
        if qk is None:
            continue
        q, k = scaled(qk.input[0]), scaled(qk.input[1])
        if q is None or k is None or not reaches(k[0], kcat.output[0]):
            continue
        kt = op(k[0], "Transpose")
        perm = next((list(a.ints) for a in kt.attribute if a.name == "perm"), []) if kt is not None else []
        if perm[-2:] != [3, 2]:
            continue
        scale = q[1] * k[1]
        fused.append((pv, q[0], kcat.output[0], vcat.output[0], mask, float(np.float32(scale)), layer))
    if not fused:
        return 0
    # Every layer slices the same causal mask to the same cache length (its own repeat_kv output's shape):
    # the first layer's mask serves them all, so the others' repeat_kv chains fall away with their attention.
    shared_mask = fused[0][4]
    _swap_nodes(model, [(pv, helper.make_node("Attention", [q, k, v, shared_mask], [pv.output[0]],
                                              name=f"fused_attention/{layer}", q_num_heads=int(num_heads),
                                              kv_num_heads=int(num_kv_heads), scale=scale))
                        for pv, q, k, v, _, scale, layer in fused])
    return len(fused)


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


def _attr(node, name, default=None):
    """Attribute `name` of an ONNX node, or `default` when it has none."""
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _typed_producer(producer: dict):
    """op(name, *types): the node producing tensor `name` when its op_type is one of `types`, else None."""

    def op(name, *types):
        node = producer.get(name)
        return node if node is not None and node.op_type in types else None

    return op


def _graph_index(g):
    """(initializers by name, the node producing each tensor, the nodes reading each tensor) of graph `g`."""
    from collections import defaultdict

    producer = {o: n for n in g.node for o in n.output}
    consumers = defaultdict(list)
    for n in g.node:
        for i in n.input:
            consumers[i].append(n)
    return {i.name: i for i in g.initializer}, producer, consumers


def _swap_nodes(model, swaps) -> None:
    """Put each (old, new) node's new one in the old one's place, drop what no longer reaches an output, and
    raise the graph to the opset the fused ops need."""
    g = model.graph
    for old, new in swaps:
        g.node.insert(list(g.node).index(old), new)
        g.node.remove(old)
    _toposort(g)
    _prune_dead_nodes(g)  # needs nodes in order
    _require_opset(model, ATTENTION_OPSET)


def _require_opset(model, version: int) -> None:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version < version:
            imp.version = version
    if model.ir_version < 10:  # opset 23 needs IR 10
        model.ir_version = 10


def _prune_dead_nodes(g) -> None:
    """Drop nodes none of whose outputs reach a graph output, then initializers nothing reads."""
    live = {o.name for o in g.output}
    keep = []
    for node in reversed(list(g.node)):
        if any(o in live for o in node.output):
            keep.append(node)
            live.update(i for i in node.input if i)
            for a in node.attribute:  # subgraphs (If/Loop) read outer names too
                if a.g is not None and a.g.node:
                    live.update(i for n in a.g.node for i in n.input)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    for init in [i for i in g.initializer if i.name not in live]:
        g.initializer.remove(init)
    for vi in [v for v in g.value_info if v.name not in live]:
        g.value_info.remove(vi)


def _toposort(g) -> None:
    """Order the nodes so every input is produced before it is read (Kahn's algorithm, stable)."""
    available = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    pending = list(g.node)
    ordered = []
    while pending:
        rest = []
        for node in pending:
            if all(i in available for i in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError(f"graph has a cycle or a missing input at {rest[0].name}")
        pending = rest
    del g.node[:]
    g.node.extend(ordered)
