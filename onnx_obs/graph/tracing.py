"""Channel tracing for structured pruning: which tensors and consumer columns each unit owns.

`trace_units` follows each producer site's output tensor through the ops between it and the
linear layers that read it (its consumers), tracking the positions each unit occupies along the
tensor's channel axis (one position after an elementwise op, a block of H*W after a Flatten, an
offset after a Concat: graph/passthrough.py), and collects the cuts, edits and consumers of a
`UnitGroup` (graph/units.py). Where the channels meet another computed tensor elementwise (a
residual Add, a squeeze-and-excitation Mul), that tensor's producers are found by walking back
and join the group: their rows go with the same units (DepGraph's coupling groups). Channels that
reach anything else (a graph output, a LayerNorm over them, an op not handled) leave their
producers alone, with the reason. Attention heads: where a Reshape splits the channels into
[heads, head_dim], the trace starts over with units of head_dim rows (graph/channel_graph.py
Coarsen); the heads then ride a batch axis through QK^T, Softmax and PV, whose other operands
bring the K and V projections into the group, and merge back before the output projection.
Nodes are visited in graph (topological) order, so a node whose several inputs carry the same
units (x * Sigmoid(x)) sees them together. Graph code: no linear algebra.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnx_obs.graph.channel_graph import Blocked, ChannelGraph, Coarsen, Coupled, State
from onnx_obs.graph.ops import OPS, find_bias, input_axis, unit_axis
from onnx_obs.graph.passthrough import (
    ELEMENTWISE,
    NORMS,
    PASS_THROUGH,
    POOLS,
    REGROUP,
    UNARY,
)
from onnx_obs.graph.protos import attrs
from onnx_obs.graph.shape_fold import regroup
from onnx_obs.graph.sites import Site
from onnx_obs.graph.units import BiasSlot, ConsumerUse, LeftAlone, UnitGroup


def trace_units(model: onnx.ModelProto, sites: list[Site],
                producers: set[str] | None = None) -> tuple[list[UnitGroup], list[LeftAlone]]:
    """Unit groups of the producer sites (all sites, or those named), and those left alone.

    `sites` must be every site of the model: consumers are looked up among them. A group of
    several producers comes once, named by the producer its trace started from (the first in
    `sites` order that reaches all the others).
    """
    t = _Tracer(model, sites)
    groups, left, taken = [], [], set()
    for site in sites:
        if site.name in taken or (producers is not None and site.name not in producers):
            continue
        try:
            group = t.trace(site)
        except Blocked as e:
            left.append(LeftAlone(site.name, site.op_type, str(e)))
            continue
        taken.update(p.name for p in group.producers)
        groups.append(group)
    return groups, [x for x in left if x.name not in taken]


class _Tracer(ChannelGraph):
    def trace(self, site: Site) -> UnitGroup:
        """The group of `site` (unit u = its row u): started from it alone, each tensor its
        channels meet elementwise adds that tensor's producers (found by walking back, owning
        the rows the units meet there), and the trace starts over."""
        rows = site.matrix_shape[0]
        own = [np.array([u], dtype=np.int64) for u in range(rows)]
        seeds = {site.name: (site, own)}
        while True:
            try:
                return self._trace(site, seeds)
            except Coarsen as e:   # attention heads: a unit is a block of rows
                if len(own[0]) != 1 or rows % e.block:
                    raise Blocked(str(e)) from None
                own = [np.arange(u * e.block, (u + 1) * e.block) for u in range(rows // e.block)]
                seeds = {site.name: (site, own)}
            except Coupled as e:
                try:
                    found = self._sources(e.tensor, e.axis)
                except Blocked as why:
                    raise Blocked(f"{e}; {why}") from None
                if set(found) <= set(seeds):
                    raise Blocked(str(e)) from None
                for name, (s, block, start, span) in found.items():
                    span = e.size if span is None else span
                    if s.matrix_shape[0] != span * block:
                        raise Blocked(f"{e}; its producer '{name}' has {s.matrix_shape[0]} "
                                      f"units for {span} channels") from None
                    # unit u owns the producer's rows of its positions in [start, start + span)
                    seeds.setdefault(name, (s, [((p[(p >= start) & (p < start + span)] - start)
                                                 [:, None] * block + np.arange(block)).ravel()
                                                for p in e.positions]))

    def _seed(self, group: UnitGroup, site: Site, positions: list[np.ndarray]) -> State:
        """Record a producer's own cuts (unit u: rows positions[u] of its weight and bias); the
        state of its output."""
        if site.graph_input or site.name in self.graph_inputs:
            raise Blocked(f"'{site.name}' is also a graph input (a caller may replace it)")
        if site.groups != 1:
            depthwise = site.layout == "conv" and site.op_shape[1] == 1
            raise Blocked("depthwise Conv: its channels are tied to its input channels and go "
                          "with the layer that feeds it" if depthwise else
                          f"grouped {site.op_type} (group={site.groups}): removing one output "
                          "channel would unbalance its groups")
        use, spec = site.uses[0], site.spec
        node = self.nodes[self.labels[use.node]]
        out = node.output[0]
        rank = self.rank(out)
        rows = site.matrix_shape[0]
        axis = unit_axis(spec.units(node, use.activation), rank)
        group.cuts.append(self.weight_cut(site, "out", positions))
        bias = spec.own_bias(node)
        if bias is not None:
            if bias not in self.consts:
                raise Blocked(f"the bias of '{site.name}' is a computed tensor")
            if spec.bias_broadcasts:   # a Gemm's C broadcasts against Y
                cut = self.per_channel(bias, rank, axis, rows, positions)
            else:
                cut = self.own_cut(bias, 0, positions)
            if cut:
                group.cuts.append(cut)
        return State(out, axis, positions, rows)

    def _trace(self, lead: Site, seeds: dict[str, tuple[Site, list[np.ndarray]]]) -> UnitGroup:
        for s, _ in seeds.values():
            if s.scope:
                raise Blocked("inside a subgraph" if s is lead else
                              f"coupled with '{s.name}' inside a subgraph")
            if len(s.uses) != 1:
                raise Blocked(f"the weight of '{s.name}' is shared by several nodes")
        at = {self.labels[s.uses[0].node]: (s, pos) for s, pos in seeds.values()}
        group = UnitGroup(lead, min(at), len(seeds[lead.name][1]), [], [], [],
                          producers=[at[ni][0] for ni in sorted(at)])
        self._follow(group, at)
        if not group.consumers:
            raise Blocked("no linear layer reads its output")
        return group

    def _follow(self, group: UnitGroup, seeds: dict[int, tuple[Site, list[np.ndarray]]]) -> None:
        """Visit the nodes from the first producer on in graph (topological) order, so that a
        node reads the states of all its inputs that carry the units at once (x * Sigmoid(x),
        a residual Add of two producers' outputs); each producer adds its output's state."""
        states: dict[str, State] = {}
        for ni in range(group.node, len(self.nodes)):
            node = self.nodes[ni]
            where = [pos for pos, name in enumerate(node.input) if name in states]
            new = []
            if where:
                group.path.append(node.op_type)
                new = self._step(group, ni, where, [states[node.input[p]] for p in where])
            if ni in seeds:
                new.append(self._seed(group, *seeds[ni]))
            for st in new:
                if st.tensor in self.outputs:
                    raise Blocked(f"its channels reach the graph output '{st.tensor}'")
                states[st.tensor] = st
        for name in states:
            if name in self.inner_refs:
                raise Blocked(f"'{name}' is read inside a subgraph")

    def _sources(self, name: str, axis: int, block: int = 1
                 ) -> dict[str, tuple[Site, int, int, int | None]]:
        """The producer sites whose output channels reach `name` along `axis` unchanged, split
        into blocks (a head of attention: `block` channels of the producer per position) or
        stacked by a Concat (a CSP / DenseNet block), walking back through the ops that keep
        channels in place (the forward trace then checks them); per producer: the block size,
        and the positions [start, start + span) of `name` its channels fill (span None: all)."""
        ni = self.math.producer.get(name)
        if ni is None:
            raise Blocked(f"'{name}' is a graph input or a constant, which cannot lose channels")
        node = self.nodes[ni]
        op = node.op_type
        sites = [s for s, _ in self.site_of_node.get(ni, [])]
        if op in OPS and not OPS[op].groups(attrs(node)) > 1:
            if len(sites) != 1:
                raise Blocked(f"'{name}' comes from {op} '{self.label(ni)}' without a prunable weight")
            return {sites[0].name: (sites[0], block, 0, None)}
        if op in UNARY or op in NORMS or op in POOLS or op == "Conv":   # grouped Conv: depthwise
            return self._sources(node.input[0], axis, block)
        if op == "Transpose":
            perm = attrs(node).get("perm", list(range(self.rank(name)))[::-1])
            return self._sources(node.input[0], perm[axis], block)
        if op in ("Softmax", "LogSoftmax") and self.opset >= 13 and attrs(node).get("axis", -1) % self.rank(name) != axis:
            return self._sources(node.input[0], axis, block)   # normalised over another axis
        if op in REGROUP:
            try:
                return self._sources(node.input[0], self._axis_before(node, axis), block)
            except Blocked:
                dims_in, dims_out = self.dims(node.input[0]), self.dims(node.output[0])
                j, outer, inner = regroup(dims_out, dims_in, axis)
                if j != axis or outer != 1:
                    raise
                return self._sources(node.input[0], axis, block * inner)
        if op in ELEMENTWISE:
            found, rank = {}, self.rank(name)
            for x in node.input:
                dims = self.shapes.get(x) if x and x not in self.consts else None
                k = None if dims is None else axis - (rank - len(dims))
                if dims is not None and k >= 0 and dims[k] != 1:
                    found.update(self._sources(x, k, block))
            return found
        if op == "Concat" and block == 1 and attrs(node).get("axis", 0) % self.rank(name) == axis:
            found, offset = {}, 0
            for x in node.input:
                size = self._size(x, axis)
                for s, (site, b, start, span) in self._sources(x, axis).items():
                    found[s] = (site, b, start + offset, size if span is None else span)
                offset += size
            return found
        raise Blocked(f"'{name}' comes from {op} '{self.label(ni)}', which onnx-obs cannot "
                      "follow channels back through")

    def _size(self, name: str, axis: int) -> int:
        size = self.dims(name)[axis]
        if not isinstance(size, int):
            raise Blocked(f"the channel count of '{name}' is unknown")
        return size

    def _axis_before(self, node: onnx.NodeProto, axis: int) -> int:
        """The input axis of a Reshape-like node that becomes output `axis`: the same size with
        the same non-1 sizes before it."""
        dims_in, dims_out = self.dims(node.input[0]), self.dims(node.output[0])
        before = [d for d in dims_out[:axis] if d != 1]
        for j, d in enumerate(dims_in):
            if d == dims_out[axis] and [e for e in dims_in[:j] if e != 1] == before:
                return j
        raise Blocked(f"{node.op_type} '{node.name}' mixes the channel axis")

    def _step(self, group: UnitGroup, ni: int, where: list[int], ins: list[State]) -> list[State]:
        node = self.nodes[ni]
        op = node.op_type
        # A linear node consumes the units, but a grouped Conv passes them on (depthwise), and
        # so does a MatMul of two computed tensors on its batch axes (attention heads).
        if op in OPS and not (op == "Conv" and OPS[op].groups(attrs(node)) > 1) and not (
                op == "MatMul" and ni not in self.site_of_node):
            self._consumer(group, ni, where, ins[0])
            return []
        if op in ("LayerNormalization", "GroupNormalization"):
            raise Blocked(f"{op} '{self.label(ni)}' normalises over its channels, which couples "
                          "the whole width: left alone")
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
