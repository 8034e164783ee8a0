"""Cut a graph into slices between depth waves, so sequential capture runs each node about once.

Sequential layer-wise pruning captures wave i's activations on the model with waves < i already
pruned. Instead of re-running the whole model per wave, wave i runs only the nodes between the
tensors already computed (boundary tensors, cached by the caller) and wave i's activations.

A tensor's *level* is 1 + the last wave whose weights it depends on (0: none): once wave
level - 1 is pruned it has its final value, and a slice may cache it for later waves. Tensors that
depend on no model input (weights, Constant nodes and what is computed from them alone) are never
cached: every slice that needs them recomputes them from the weights as they are then.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx


class Unsliceable(Exception):
    """The graph (or a tensor on a boundary) cannot be cut: capture on the whole model instead."""


@dataclass
class Slice:
    nodes: list[int]            # indices into graph.node, in graph order
    inputs: list[str]           # cached tensors this wave reads (slice inputs, or targets as they are)
    outputs: list[str]          # what the slice computes: targets not cached, and `keep`
    keep: list[str]             # boundary tensors to cache for later waves
    drop: list[str] = field(default_factory=list)  # cached tensors no later wave reads


def implicit_inputs(node: onnx.NodeProto) -> set[str]:
    """Outer-scope names read inside a node's subgraphs (If / Loop / Scan bodies)."""
    names: set[str] = set()
    for attr in node.attribute:
        for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            defined = {i.name for i in g.input} | {t.name for t in g.initializer}
            defined |= {t.values.name for t in g.sparse_initializer}
            for n in g.node:
                names |= {x for x in list(n.input) + sorted(implicit_inputs(n)) if x and x not in defined}
                defined |= set(n.output)
    return names


def plan_slices(graph: onnx.GraphProto, fed: set[str], waves: list[list[str]],
                changing: dict[str, int]) -> list[Slice]:
    """One Slice per wave. fed: the model inputs the calibration data feeds. waves: each wave's
    target tensors (the activations its sites read). changing: weight tensor -> the wave that
    prunes it. Raises Unsliceable when a target is neither computed by a node nor fed."""
    reads = [list(n.input) + sorted(implicit_inputs(n)) for n in graph.node]
    producer = {o: k for k, n in enumerate(graph.node) for o in n.output if o}
    level, dynamic = _levels(graph, reads, fed, changing)
    cached = set(fed)
    plans = []
    for i, targets in enumerate(waves):
        nodes: set[int] = set()
        stack = [t for t in targets if t not in cached]
        while stack:
            t = stack.pop()
            if t in cached or t not in producer:
                continue
            k = producer[t]
            if k not in nodes:
                nodes.add(k)
                stack += reads[k]
        produced = {o for k in nodes for o in graph.node[k].output if o}
        missing = [t for t in targets if t not in cached and t not in produced]
        if missing:
            raise Unsliceable(f"'{missing[0]}' is neither computed by a node nor fed")
        inputs = {t for k in nodes for t in reads[k] if t in cached} | {t for t in targets if t in cached}
        inputs -= produced
        final = {t for t in produced if dynamic[t] and level[t] <= i}
        plans.append(Slice(sorted(nodes), sorted(inputs), [], sorted(final)))
        cached |= final
    last_read: dict[str, int] = {}
    for i, p in enumerate(plans):
        for t in p.inputs:
            last_read[t] = i
    for i, (p, targets) in enumerate(zip(plans, waves)):
        p.keep = [t for t in p.keep if last_read.get(t, -1) > i]
        p.outputs = list(dict.fromkeys([t for t in targets if t not in p.inputs] + p.keep))
        p.drop = sorted(t for t, j in last_read.items() if j == i and t not in fed)
    return plans


def _levels(graph, reads, fed, changing) -> tuple[dict[str, int], dict[str, bool]]:
    level = {t: lv + 1 for t, lv in changing.items()}
    dynamic = {t: True for t in fed}
    for node, inputs in zip(graph.node, reads):
        lv = max((level.get(t, 0) for t in inputs), default=0)
        dyn = any(dynamic.get(t, False) for t in inputs)
        for o in node.output:
            level[o] = max(lv, level.get(o, 0))
            dynamic[o] = dyn
    return level, dynamic


def slice_model(model: onnx.ModelProto, plan: Slice, input_dtypes: dict[str, np.dtype]) -> onnx.ModelProto:
    """The nodes of `plan` as a model: its inputs typed from the cached arrays' dtypes (shapes
    left open: batches differ), its outputs `plan.outputs`, the initializers it reads."""
    g = model.graph
    nodes = [g.node[k] for k in plan.nodes]
    read = set()
    for n in nodes:
        read |= set(n.input) | implicit_inputs(n)
    inputs = []
    for name in plan.inputs:
        if name in read:
            try:
                elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(input_dtypes[name]))
            except (KeyError, TypeError, ValueError) as e:
                raise Unsliceable(f"boundary tensor '{name}' has no ONNX tensor type") from e
            inputs.append(onnx.helper.make_tensor_value_info(name, elem, None))
    known = {vi.name: vi for vi in list(g.value_info) + list(g.output)}
    outputs = [known[t] if t in known and known[t].type.HasField("tensor_type") else
               onnx.ValueInfoProto(name=t) for t in plan.outputs]
    graph = onnx.helper.make_graph(
        nodes, f"{g.name}_slice", inputs, outputs,
        initializer=[t for t in g.initializer if t.name in read],
        sparse_initializer=[t for t in g.sparse_initializer if t.values.name in read])
    m = onnx.helper.make_model(graph, opset_imports=model.opset_import, functions=model.functions)
    m.ir_version = model.ir_version
    return m


def tail_plan(graph: onnx.GraphProto, weights: set[str]) -> Slice:
    """The nodes whose values change when the tensors `weights` change: every node reading one
    (directly or inside its subgraphs) and every node after those, in graph order. Its inputs are
    the other tensors those nodes read (unchanged: computed by the other nodes, fed, or
    non-weight Constant outputs; initializers stay initializers), its outputs the graph outputs
    that change. A model of it (slice_model) recomputes what a change of `weights` affects from
    the unchanged values of one run of the whole model."""
    changed, nodes = set(weights), []
    for k, n in enumerate(graph.node):
        if any(t in changed for t in list(n.input) + sorted(implicit_inputs(n))):
            nodes.append(k)
            changed |= {o for o in n.output if o}
    produced = {o for k in nodes for o in graph.node[k].output if o}
    stored = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    read = {t for k in nodes for t in list(graph.node[k].input) + sorted(implicit_inputs(graph.node[k])) if t}
    inputs = sorted(t for t in read - produced if t not in stored)
    outputs = [o.name for o in graph.output if o.name in produced]
    return Slice(nodes, inputs, outputs, [])
