"""Channel tracing for structured pruning: which tensors and consumer columns each unit owns.

`trace_units` follows each producer site's output tensor through the ops between it and the
linear layers that read it (its consumers), tracking the positions each unit occupies along the
tensor's channel axis (one position after an elementwise op, a block of H*W after a Flatten, an
offset after a Concat: graph/passthrough.py), and collects the cuts, edits and consumers of a
`UnitGroup` (graph/units.py). Channels that reach anything else (a graph output, an Add with
another computed tensor such as a residual connection, an op not handled) leave their producer
alone, with the reason. Nodes are visited in graph (topological) order, so a node whose several
inputs carry the same units (x * Sigmoid(x)) sees them together. Graph code: no linear algebra.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnx_obs.graph.channel_graph import Blocked, ChannelGraph, State
from onnx_obs.graph.ops import OPS, find_bias, input_axis, unit_axis
from onnx_obs.graph.passthrough import PASS_THROUGH
from onnx_obs.graph.protos import attrs
from onnx_obs.graph.sites import Site
from onnx_obs.graph.units import BiasSlot, ConsumerUse, LeftAlone, UnitGroup


def trace_units(model: onnx.ModelProto, sites: list[Site],
                producers: set[str] | None = None) -> tuple[list[UnitGroup], list[LeftAlone]]:
    """Unit groups of the producer sites (all sites, or those named), and those left alone.

    `sites` must be every site of the model: consumers are looked up among them.
    """
    t = _Tracer(model, sites)
    groups, left = [], []
    for site in sites:
        if producers is not None and site.name not in producers:
            continue
        try:
            groups.append(t.trace(site))
        except Blocked as e:
            left.append(LeftAlone(site.name, site.op_type, str(e)))
    return groups, left


class _Tracer(ChannelGraph):
    def trace(self, site: Site) -> UnitGroup:
        if site.scope:
            raise Blocked("inside a subgraph")
        if len(site.uses) != 1:
            raise Blocked("its weight is shared by several nodes")
        if site.graph_input or site.name in self.graph_inputs:
            raise Blocked("its weight is also a graph input (a caller may replace it)")
        if site.groups != 1:
            depthwise = site.layout == "conv" and site.op_shape[1] == 1
            raise Blocked("depthwise Conv: its channels are tied to its input channels and go "
                          "with the layer that feeds it" if depthwise else
                          f"grouped {site.op_type} (group={site.groups}): removing one output "
                          "channel would unbalance its groups")
        use, spec = site.uses[0], site.spec
        ni = self.labels[use.node]
        node = self.nodes[ni]
        out = node.output[0]
        rank = self.rank(out)
        units = site.matrix_shape[0]
        positions = [np.array([u], dtype=np.int64) for u in range(units)]
        axis = unit_axis(spec.units(node, use.activation), rank)
        group = UnitGroup(site, ni, units, [self.weight_cut(site, "out", positions)], [], [])
        bias = spec.own_bias(node)
        if bias is not None:
            if bias not in self.consts:
                raise Blocked("its bias is a computed tensor")
            if spec.bias_broadcasts:   # a Gemm's C broadcasts against Y
                cut = self.per_channel(bias, rank, axis, units, positions)
            else:
                cut = self.own_cut(bias, 0, positions)
            if cut:
                group.cuts.append(cut)
        self._follow(group, State(out, axis, positions, units))
        if not group.consumers:
            raise Blocked("no linear layer reads its output")
        return group

    def _follow(self, group: UnitGroup, start: State) -> None:
        """Visit the nodes after the producer in graph (topological) order, so that a node reads
        the states of all its inputs that carry the units at once (x * Sigmoid(x) is fine)."""
        if start.tensor in self.outputs:
            raise Blocked(f"its channels reach the graph output '{start.tensor}'")
        states = {start.tensor: start}
        for ni in range(group.node + 1, len(self.nodes)):
            node = self.nodes[ni]
            where = [pos for pos, name in enumerate(node.input) if name in states]
            if not where:
                continue
            group.path.append(node.op_type)
            for st in self._step(group, ni, where, [states[node.input[p]] for p in where]):
                if st.tensor in self.outputs:
                    raise Blocked(f"its channels reach the graph output '{st.tensor}'")
                states[st.tensor] = st
        for name in states:
            if name in self.inner_refs:
                raise Blocked(f"'{name}' is read inside a subgraph")

    def _step(self, group: UnitGroup, ni: int, where: list[int], ins: list[State]) -> list[State]:
        node = self.nodes[ni]
        op = node.op_type
        # A linear node consumes the units, but a grouped Conv passes them on (depthwise).
        if op in OPS and not (op in PASS_THROUGH and OPS[op].groups(attrs(node)) > 1):
            self._consumer(group, ni, where, ins[0])
            return []
        handler = PASS_THROUGH.get(op)
        states = handler(self, group, ni, where, ins) if handler else None
        if states is None:
            raise Blocked(f"its channels are read by {op} '{self.label(ni)}', which onnx-obs "
                          "cannot follow channels through")
        return states

    def _consumer(self, group: UnitGroup, ni: int, where: list[int], st: State) -> None:
        node = self.nodes[ni]
        found = [(s, u) for s, u in self.site_of_node.get(ni, []) if u.activation == st.tensor]
        if not found or where != [list(node.input).index(st.tensor)]:
            raise Blocked(f"its channels reach {node.op_type} '{self.label(ni)}' as an operand "
                          "that is not a prunable layer's input")
        site, use = found[0]
        if len(site.uses) != 1:
            raise Blocked(f"the weight of consumer '{site.name}' is shared by several nodes")
        if site.groups != 1:
            raise Blocked(f"consumer '{site.name}' is a grouped {node.op_type}")
        if st.axis != input_axis(use.samples, self.rank(st.tensor)):
            raise Blocked(f"its channel axis is not the input axis of {node.op_type} "
                          f"'{self.label(ni)}'")
        taps = site.spec.taps(site.op_shape)
        columns = [(p[:, None] * taps + np.arange(taps)).ravel() for p in st.positions]
        group.cuts.append(self.weight_cut(site, "in", st.positions))
        group.consumers.append(ConsumerUse(site, columns, self._bias_slot(ni, site, use)))

    def _bias_slot(self, ni: int, site: Site, use) -> BiasSlot | None:
        """Where the consumer's bias can absorb a correction (None: it cannot)."""
        node, spec = self.nodes[ni], site.spec
        rows = site.matrix_shape[0]
        units = spec.units(node, use.activation)
        alpha, beta = spec.scales(attrs(node))
        found = find_bias(self.nodes, ni, self.readers)
        if alpha == 0 or beta == 0 or found is None:
            return None
        # An Add after a MatMul holds one value per unit only with the units on the last axis.
        if found.added and (units != "rows" or node.output[0] in self.outputs):
            return None
        shape = (rows, 1) if units == "cols" else (rows,)   # "cols": a Gemm's weight on the left
        if found.name is None:
            return BiasSlot(ni, None, shape, beta / alpha)
        name = found.name
        if name not in self.consts or self.refs(name) != 1 or name in self.graph_inputs:
            return None
        dims = list(self.consts[name].dims)
        while dims and dims[0] == 1:   # leading 1s broadcast away
            dims.pop(0)
        if dims and dims != list(shape[-len(dims):]):
            return None   # varies along the sample axis: not one value per unit
        return BiasSlot(found.node, name, shape, beta / alpha)
