"""Private copies of the small constants that several nodes read, so that removing units edits
one reader's copy only (graph/tracing.py). Exporters share them: the TorchScript exporter
deduplicates equal initializers behind Identity nodes (every zero bias of a fresh model becomes
one tensor), the dynamo exporter shares one reshape target [-1, T, heads, head_dim] among every
attention layer, and both share equal biases. The model computes the same after."""

from __future__ import annotations

import numpy as np
import onnx

from onnx_obs.graph.protos import constants, unique_name

MAX_ELEMENTS = 1 << 16   # larger shared constants stay shared: copies would grow the file


def unshare_constants(model: onnx.ModelProto, weights: set[str]) -> None:
    """In place: every read of a shared constant (directly or through Identity nodes) other than
    one direct read gets its own initializer copy. `weights`: tensors left shared whatever their
    size (the sites: a weight shared by two layers is tied, not duplicated). Identity nodes
    whose readers all moved to copies are removed: node indices change, so find sites after."""
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
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    dead = [node for node in graph.node if node.op_type == "Identity" and node.output
            and node.output[0] in alias and node.output[0] not in read]
    for node in dead:
        graph.node.remove(node)
