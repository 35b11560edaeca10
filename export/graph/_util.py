"""Helpers the graph passes share: reading nodes and attributes, indexing a graph, swapping nodes in, pruning
what no longer reaches an output, topological order and the opset the fused ops need.
"""
from __future__ import annotations

# ONNX's Attention (opset 23) takes grouped K/V heads and an additive mask: one node in place of the
# ~50 an exported decoder layer spends on its attention.
ATTENTION_OPSET = 23


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
