"""Rewrites that keep what a model computes but let the channel trace (graph/tracing.py) follow
what exporters write, applied before structured pruning:
- private copies of the small constants that several nodes read, so that removing units edits
  one reader's copy only. The TorchScript exporter deduplicates equal initializers behind
  Identity nodes (every zero bias of a fresh model becomes one tensor), the dynamo exporter shares
  one reshape target [-1, T, heads, head_dim] among every attention layer;
- K^T of attention written as Reshape [B*H, T, D] -> Transpose -> Reshape [B, H, D, T] (the
  dynamo exporter's decomposition of scaled_dot_product_attention) becomes the one Transpose it
  is, so the heads axis is not folded into the batch axis.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnx_obs.graph.protos import attrs, constants, readers, unique_name
from onnx_obs.graph.shape_fold import tensor_shapes

MAX_ELEMENTS = 1 << 16   # larger shared constants stay shared: copies would grow the file


def canonicalize(model: onnx.ModelProto, weights: set[str]) -> None:
    """In place, both rewrites; node indices change, so find sites after. `weights`: see
    unshare_constants."""
    unshare_constants(model, weights)
    _fold_key_transposes(model)
    _drop_dead_nodes(model.graph)   # Identity nodes left unread, a folded K^T's shape arithmetic


def unshare_constants(model: onnx.ModelProto, weights: set[str]) -> None:
    """In place: every read of a shared constant (directly or through Identity nodes) other than
    one direct read gets its own initializer copy. `weights`: tensors left shared whatever their
    size (the sites: a weight shared by two layers is tied, not duplicated). Identity nodes
    whose readers all moved to copies are left unread."""
    graph = model.graph
    consts = constants(graph)
    graph_inputs = {i.name for i in graph.input}
    alias: dict[str, str] = {}   # Identity output -> the constant it passes on
    for node in graph.node:
        if node.op_type == "Identity" and node.output:
            root = alias.get(node.input[0], node.input[0])
            if root in consts:
                alias[node.output[0]] = root
    reads: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        if node.op_type == "Identity" and node.output and node.output[0] in alias:
            continue
        for pos, name in enumerate(node.input):
            root = alias.get(name, name)
            if root in consts:
                reads.setdefault(root, []).append((node, pos))
    for root, where in reads.items():
        tensor = consts[root]
        if (root in weights or root in graph_inputs or len(where) < 2 and where[0][0].input[where[0][1]] == root
                or int(np.prod(tensor.dims, dtype=np.int64)) > MAX_ELEMENTS):
            continue
        direct = [i for i, (node, pos) in enumerate(where) if node.input[pos] == root]
        keep = direct[-1] if direct else None
        for i, (node, pos) in enumerate(where):
            if i == keep:
                continue
            copy = onnx.TensorProto()
            copy.CopyFrom(tensor)
            copy.name = unique_name(model, f"{root}_own")
            graph.initializer.append(copy)
            node.input[pos] = copy.name


def _fold_key_transposes(model: onnx.ModelProto) -> None:
    """Reshape [B, H, T, D] -> [B*H, T, D], Transpose (0, 2, 1), Reshape -> [B, H, D, T] becomes
    Transpose (0, 1, 3, 2), where the two tensors between are read by the chain only."""
    graph = model.graph
    shapes = tensor_shapes(model)
    producer = {o: n for n in graph.node for o in n.output}
    reads = readers(graph)
    outputs = {o.name for o in graph.output}
    for last in [n for n in graph.node if n.op_type == "Reshape"]:
        turn = producer.get(last.input[0])
        first = producer.get(turn.input[0]) if turn is not None and turn.op_type == "Transpose" else None
        if first is None or first.op_type != "Reshape" or attrs(turn).get("perm") != [0, 2, 1]:
            continue
        if any(len(reads.get(t, [])) != 1 or t in outputs for t in (first.output[0], turn.output[0])):
            continue
        x, merged, out = (shapes.get(t) for t in (first.input[0], first.output[0], last.output[0]))
        if (x is None or merged is None or out is None or len(x) != 4 or len(merged) != 3
                or merged[1:] != x[2:] or out != [x[0], x[1], x[3], x[2]] or None in x):
            continue
        index = list(graph.node).index(last)
        graph.node.insert(index, onnx.helper.make_node("Transpose", [first.input[0]], [last.output[0]],
                                                       name=f"{last.name}_as_transpose", perm=[0, 1, 3, 2]))
        for node in (first, turn, last):
            graph.node.remove(node)


def _drop_dead_nodes(graph: onnx.GraphProto) -> None:
    """Remove nodes none of whose outputs is read or a graph output, until none is left."""
    outputs = {o.name for o in graph.output}
    while True:
        read = {name for node in graph.node for name in node.input} | outputs
        dead = [n for n in graph.node if not any(o in read for o in n.output if o)]
        if not dead:
            return
        for node in dead:
            graph.node.remove(node)
