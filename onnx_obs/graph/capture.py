"""Graph cuts for capturing activations: expose intermediate tensors as graph outputs."""

from __future__ import annotations

import onnx

from onnx_obs.graph.slicing import implicit_inputs


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` whose outputs are exactly `names` (intermediate tensors included).

    Dropping the original outputs lets onnxruntime skip the nodes after the last requested tensor.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    known = {vi.name: vi for vi in list(m.graph.value_info) + list(m.graph.output) + list(m.graph.input)}
    del m.graph.output[:]
    for name in dict.fromkeys(names):
        vi = m.graph.output.add()
        if name in known and known[name].type.HasField("tensor_type"):
            vi.CopyFrom(known[name])
        else:
            vi.name = name
    return m


def site_depths(model: onnx.ModelProto, sites) -> dict[str, int]:
    """How many sites lie upstream of each site's inputs (0: fed by the model inputs only).

    Sites of equal depth can be captured in one pass after all shallower sites are pruned. A node
    with subgraphs depends on the outer tensors its subgraphs read too.
    """
    index = {s.name: i for i, s in enumerate(sites)}
    producing = {}  # node output -> bitmask of the sites whose node produces it
    for s in sites:
        for u in s.uses:
            producing[u.output] = producing.get(u.output, 0) | (1 << index[s.name])
    upstream: dict[str, int] = {}
    for node in model.graph.node:
        mask = 0
        for name in list(node.input) + sorted(implicit_inputs(node)):
            mask |= upstream.get(name, 0)
        for out in node.output:
            upstream[out] = mask | producing.get(out, 0)
    depth: dict[str, int] = {}
    for s in sorted(sites, key=lambda s: bin(_mask(s, upstream)).count("1")):
        above = _mask(s, upstream) & ~(1 << index[s.name])
        depth[s.name] = 1 + max((depth[t.name] for t in sites if above >> index[t.name] & 1
                                 and t.name in depth), default=-1)
    return depth


def _mask(site, upstream) -> int:
    m = 0
    for u in site.uses:
        m |= upstream.get(u.activation, 0)
    return m


def with_weight_inputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` in which each named main-graph weight is also a graph input whose default
    is its stored value: a run that feeds one replaces that weight alone (initializers listed as
    inputs are overridable from IR version 4). Constant nodes among them become initializers."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    wanted = set(names)
    for i in reversed(range(len(m.graph.node))):
        node = m.graph.node[i]
        if node.op_type == "Constant" and node.output and node.output[0] in wanted:
            init = m.graph.initializer.add()
            init.CopyFrom(next(a.t for a in node.attribute if a.name == "value"))
            init.name = node.output[0]
            del m.graph.node[i]
    inputs = {i.name for i in m.graph.input}
    for init in m.graph.initializer:
        if init.name in wanted and init.name not in inputs:
            m.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, init.dims))
    m.ir_version = max(m.ir_version, 4)
    return m
