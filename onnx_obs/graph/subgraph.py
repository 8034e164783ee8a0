"""A unit group's own part of the graph as a model of its own, so that removing its units can be
timed without running (and copying) the whole model (latency_table.py): the nodes from the
group's producers to its consumers, the nodes computing the shape values and constants they
read, and as inputs the activations they read from the rest of the graph."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import onnx

from onnx_obs.graph.protos import FLOAT_TYPES, constants, readers
from onnx_obs.graph.sites import node_label
from onnx_obs.graph.units import UnitGroup


@dataclass
class Region:
    nodes: list[int]      # indices into graph.node, in graph order
    inputs: list[str]     # activations read from the rest of the graph (or graph inputs)
    outputs: list[str]    # the consumers' outputs


def group_region(model: onnx.ModelProto, group: UnitGroup, types: dict[str, int]) -> Region | None:
    """Nodes that are downstream of a producer and upstream of a consumer, plus what computes
    their non-float inputs (shape arithmetic, Constant nodes); `types`: element type of each
    computed tensor (shape inference). None where the group's cuts or edits reach outside it or a
    node has subgraphs."""
    graph = model.graph
    nodes = list(graph.node)
    index = {node_label(n, i, ""): i for i, n in enumerate(nodes)}
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    reads = readers(graph)
    starts = [index[p.uses[0].node] for p in group.producers]
    ends = [index[c.site.uses[0].node] for c in group.consumers]
    down, stack = set(starts), list(starts)
    while stack:
        for o in nodes[stack.pop()].output:
            for ri, _ in reads.get(o, []):
                if ri not in down:
                    down.add(ri)
                    stack.append(ri)
    up, stack = set(ends), list(ends)
    while stack:
        for x in nodes[stack.pop()].input:
            pi = producer.get(x)
            if pi is not None and pi not in up:
                up.add(pi)
                stack.append(pi)
    consts = {t.name for t in graph.initializer}
    static = set(consts)   # computed from constants alone (Constant nodes, a Cast of a weight)
    for n in nodes:        # graph order is topological
        if all(x in static for x in n.input if x):
            static.update(n.output)
    region, stack = down & up, list(down & up)
    inputs: list[str] = []
    while stack:   # pull in what computes constants and non-float inputs; activations are fed
        for x in nodes[stack.pop()].input:
            pi = producer.get(x)
            if not x or x in consts or pi in region:
                continue
            if pi is not None and (x in static or types.get(x) not in FLOAT_TYPES):
                region.add(pi)
                stack.append(pi)
            elif x not in inputs:
                inputs.append(x)
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for i in region for a in nodes[i].attribute):
        return None
    order = sorted(region)
    owned = {x for i in order for x in nodes[i].input} | {o for i in order for o in nodes[i].output}
    if not all(c.tensor in owned for c in group.cuts) or not all(
            e.node in region and (not e.tensor or e.tensor in owned) for e in group.edits):
        return None
    return Region(order, inputs, [nodes[i].output[0] for i in ends])


def region_model(model: onnx.ModelProto, region: Region, inputs: dict[str, tuple[int, list[int]]],
                 ranks: dict[str, tuple[int, int]]) -> onnx.ModelProto:
    """The region as a model; `inputs`: element type and shape of each region input; `ranks`:
    element type and rank of each output (their sizes change as units go)."""
    graph = model.graph
    nodes = [graph.node[i] for i in region.nodes]
    read = {x for n in nodes for x in n.input}
    table = constants(graph, nodes=False)
    sub = onnx.helper.make_graph(
        nodes, "region",
        [onnx.helper.make_tensor_value_info(x, *inputs[x]) for x in region.inputs],
        [onnx.helper.make_tensor_value_info(o, ranks[o][0], [f"{o}_{k}" for k in range(ranks[o][1])])
         for o in region.outputs],
        [table[x] for x in sorted(read) if x in table])
    out = onnx.helper.make_model(sub, opset_imports=list(model.opset_import),
                                 ir_version=model.ir_version)
    out.functions.extend(model.functions)
    return out


def region_group(group: UnitGroup, region: Region) -> UnitGroup:
    """The group with its edits' node indices counted in the region model."""
    at = {ni: k for k, ni in enumerate(region.nodes)}
    return dataclasses.replace(group, edits=[dataclasses.replace(e, node=at[e.node])
                                             for e in group.edits])
