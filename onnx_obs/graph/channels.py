"""Channel tracing and shape surgery for structured pruning. Graph code: no linear algebra.

A *unit* is one output row of a producer site: a Gemm / MatMul output neuron or a Conv output
channel. `trace_units` follows the producer's output tensor through the ops between it and the
linear layers that read it (its consumers), tracking the positions each unit occupies along the
tensor's channel axis (one position after an elementwise op, a block of H*W after a Flatten, an
offset after a Concat), and collects:
  - cuts: constant tensors that lose entries along one axis when a unit goes (the producer's
    weight rows and bias, per-channel constants on the path, the consumers' weight inputs);
  - edits: integers in the graph that count channels (Reshape targets, Split sizes, the group
    of a depthwise Conv on the path);
  - consumers: each consumer site and, per unit, the columns of its 2-D view the unit feeds.
Channels that reach anything else (a graph output, an Add with another computed tensor such as a
residual connection, an op not handled here) leave their producer alone, with the reason.
Nodes are visited in graph (topological) order, so a node whose several inputs carry the same
units (x * Sigmoid(x)) sees them together. `shrink` applies the cuts and edits for a set of
removed units and re-runs shape inference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_obs.errors import OnnxObsError
from onnx_obs.graph.sites import Site, node_label

# Ops applied to each element on its own: a channel passes through unchanged.
UNARY = {"Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Clip", "HardSigmoid", "HardSwish",
         "Elu", "Selu", "Celu", "Gelu", "Erf", "Softplus", "Softsign", "Mish", "ThresholdedRelu",
         "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign",
         "Sin", "Cos", "Identity", "Dropout", "Cast"}
# Elementwise ops of several operands: fine with constants (per channel or broadcast) and with
# computed tensors of size 1 on the channel axis; another computed tensor couples the channels.
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean"}
POOLS = {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
NORMS = {"BatchNormalization": 5, "InstanceNormalization": 3}  # op -> inputs (all per channel)
REGROUP = {"Flatten", "Reshape", "Squeeze", "Unsqueeze"}
# What coupling through an elementwise op with another computed tensor usually is.
_COUPLING = {"Mul": "a gate such as squeeze-and-excitation?", "Div": "a normalisation?"}
# Reductions: fine over other axes (x.mean((2, 3)) as a global pool), never over the channels.
REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
          "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"}
LINEAR = {"Gemm", "MatMul", "Conv", "ConvTranspose"}


@dataclass
class Cut:
    tensor: str                    # constant name in the main graph
    axis: int
    positions: list[np.ndarray]    # per unit: the indices along `axis` it owns


@dataclass
class Edit:
    kind: str                      # "reshape" (entry of a shape), "split" (size), "group"
    node: int                      # index of the node in graph.node
    index: int                     # reshape: entry; split: output
    base: int                      # the value before any removal
    positions: list[np.ndarray]    # per unit: positions it removes from the counted axis


@dataclass
class BiasSlot:
    """Where a consumer's bias lives: its value in 2-D view units is scale * stored value."""

    node: int
    tensor: str | None             # None: the node has no bias yet (one is added when written)
    shape: tuple[int, ...]         # stored shape that holds one value per unit
    scale: float


@dataclass
class ConsumerUse:
    site: Site
    columns: list[np.ndarray]      # per unit: columns of the site's 2-D view it feeds
    bias: BiasSlot | None


@dataclass
class UnitGroup:
    producer: Site
    node: int                      # index of the producer node
    units: int
    cuts: list[Cut]
    edits: list[Edit]
    consumers: list[ConsumerUse]
    path: list[str] = field(default_factory=list)   # op types followed


@dataclass
class LeftAlone:
    name: str
    op_type: str
    reason: str


class _Blocked(Exception):
    pass


@dataclass
class _State:
    tensor: str
    axis: int
    positions: list[np.ndarray]
    size: int


def trace_units(model: onnx.ModelProto, sites: list[Site],
                producers: set[str] | None = None) -> tuple[list[UnitGroup], list[LeftAlone]]:
    """Unit groups of the producer sites (all sites, or those named), and those left alone.

    `sites` must be every site of the model: consumers are looked up among them.
    """
    g = _Graph(model, sites)
    groups, left = [], []
    for site in sites:
        if producers is not None and site.name not in producers:
            continue
        try:
            groups.append(g.trace(site))
        except _Blocked as e:
            left.append(LeftAlone(site.name, site.op_type, str(e)))
    return groups, left


class _Graph:
    def __init__(self, model: onnx.ModelProto, sites: list[Site]):
        self.model = model
        self.nodes = list(model.graph.node)
        self.consts: dict[str, onnx.TensorProto] = {i.name: i for i in model.graph.initializer}
        for node in self.nodes:
            if node.op_type == "Constant" and node.output:
                for a in node.attribute:
                    if a.name == "value":
                        self.consts[node.output[0]] = a.t
        self.readers: dict[str, list[tuple[int, int]]] = {}
        self.refs: dict[str, int] = {}
        for i, node in enumerate(self.nodes):
            for pos, name in enumerate(node.input):
                if name:
                    self.readers.setdefault(name, []).append((i, pos))
                    self.refs[name] = self.refs.get(name, 0) + 1
        self.inner_refs = _subgraph_refs(model.graph)
        self.outputs = {o.name for o in model.graph.output}
        self.graph_inputs = {i.name for i in model.graph.input}
        self.shapes = _shapes(model)
        self.labels = {node_label(n, i, ""): i for i, n in enumerate(self.nodes)}
        self.math = _ShapeMath(self.nodes, {**self.consts, **_int_constants(model)}, self.shapes)
        self.site_of_node: dict[int, list[tuple[Site, object]]] = {}
        for s in sites:
            for u in s.uses:
                if u.node in self.labels and not s.scope:
                    self.site_of_node.setdefault(self.labels[u.node], []).append((s, u))

    # ------------------------------------------------------------ the trace of one producer

    def trace(self, site: Site) -> UnitGroup:
        if site.scope:
            raise _Blocked("inside a subgraph")
        if len(site.uses) != 1:
            raise _Blocked("its weight is shared by several nodes")
        if site.graph_input or site.name in self.graph_inputs:
            raise _Blocked("its weight is also a graph input (a caller may replace it)")
        if site.layout in ("conv", "convT") and site.groups != 1:
            depthwise = site.layout == "conv" and site.op_shape[1] == 1
            raise _Blocked("depthwise Conv: its channels are tied to its input channels and go "
                           "with the layer that feeds it" if depthwise else
                           f"grouped {site.op_type} (group={site.groups}): removing one output "
                           "channel would unbalance its groups")
        use = site.uses[0]
        ni = self.labels[use.node]
        node = self.nodes[ni]
        out = node.output[0]
        rank = self._rank(out)
        units = site.matrix_shape[0]
        positions = [np.array([u], dtype=np.int64) for u in range(units)]
        if node.op_type in ("Conv", "ConvTranspose"):
            axis = 1
        elif node.op_type == "Gemm":
            axis = 1 if node.input[0] == use.activation else 0
        else:
            axis = rank - 1 if node.input[0] == use.activation else rank - 2
        group = UnitGroup(site, ni, units, [self._weight_cut(site, "out", positions)], [], [])
        if node.op_type != "MatMul" and len(node.input) > 2 and node.input[2]:
            bias = node.input[2]
            if bias not in self.consts:
                raise _Blocked("its bias is a computed tensor")
            if node.op_type == "Gemm":   # C broadcasts against Y; a Conv bias is per channel
                cut = self._per_channel(bias, rank, axis, units, positions)
            else:
                cut = self._own_cut(bias, 0, positions)
            if cut:
                group.cuts.append(cut)
        self._follow(group, _State(out, axis, positions, units))
        if not group.consumers:
            raise _Blocked("no linear layer reads its output")
        return group

    def _follow(self, group: UnitGroup, start: _State) -> None:
        """Visit the nodes after the producer in graph (topological) order, so that a node reads
        the states of all its inputs that carry the units at once (x * Sigmoid(x) is fine)."""
        if start.tensor in self.outputs:
            raise _Blocked(f"its channels reach the graph output '{start.tensor}'")
        states = {start.tensor: start}
        for ni in range(group.node + 1, len(self.nodes)):
            node = self.nodes[ni]
            where = [pos for pos, name in enumerate(node.input) if name in states]
            if not where:
                continue
            group.path.append(node.op_type)
            for st in self._step(group, ni, where, [states[node.input[p]] for p in where]):
                if st.tensor in self.outputs:
                    raise _Blocked(f"its channels reach the graph output '{st.tensor}'")
                states[st.tensor] = st
        for name in states:
            if name in self.inner_refs:
                raise _Blocked(f"'{name}' is read inside a subgraph")

    def _step(self, group: UnitGroup, ni: int, where: list[int], ins: list[_State]) -> list[_State]:
        st = ins[0]
        node = self.nodes[ni]
        op = node.op_type
        a = _attrs(node)
        if op in LINEAR and not (op == "Conv" and a.get("group", 1) > 1):
            self._consumer(group, ni, where, st)
            return []
        if op == "Conv" and where == [0]:
            return [self._depthwise(group, ni, st, a.get("group", 1))]
        if op in UNARY and where == [0]:
            if op == "PRelu":
                cut = self._per_channel(node.input[1], self._rank(node.output[0]), st.axis,
                                        st.size, st.positions)
                if cut:
                    group.cuts.append(cut)
            self._only_first_output(ni)
            return [_State(node.output[0], st.axis, st.positions, st.size)]
        if op in ELEMENTWISE:
            return [self._elementwise(group, ni, where, ins)]
        if op in NORMS and where == [0] and st.axis == 1:
            for name in node.input[1:NORMS[op]]:
                if name not in self.consts:
                    raise _Blocked(f"{op} '{self._label(ni)}' has computed statistics")
                group.cuts.append(self._own_cut(name, 0, st.positions))
            self._only_first_output(ni)
            return [_State(node.output[0], 1, st.positions, st.size)]
        if op in POOLS and where == [0] and st.axis == 1:
            self._only_first_output(ni)
            return [_State(node.output[0], 1, st.positions, st.size)]
        if op in REGROUP and where == [0]:
            return [self._regroup(group, ni, st)]
        if op in REDUCE and where == [0]:
            return [self._reduce(ni, st, a)]
        if op == "Shape" and where == [0]:
            self._shape_read(ni, st, a)
            return []
        if op == "Transpose" and where == [0]:
            perm = a.get("perm", list(range(self._rank(node.input[0])))[::-1])
            return [_State(node.output[0], list(perm).index(st.axis), st.positions, st.size)]
        if op == "Concat":
            return [self._concat(ni, where, ins, a)]
        if op == "Split" and where == [0]:
            return self._split(group, ni, st, a)
        if op == "Slice" and where == [0]:
            axes = self._const_ints(node.input[3]) if len(node.input) > 3 and node.input[3] else None
            rank = self._rank(node.input[0])
            if axes is None or st.axis in [x % rank for x in axes]:
                raise _Blocked(f"Slice '{self._label(ni)}' may cut its channel axis")
            return [_State(node.output[0], st.axis, st.positions, st.size)]
        raise _Blocked(f"its channels are read by {op} '{self._label(ni)}', which onnx-obs "
                       "cannot follow channels through")

    # ------------------------------------------------------------ the ops on the path

    def _consumer(self, group: UnitGroup, ni: int, where: list[int], st: _State) -> None:
        node = self.nodes[ni]
        found = [(s, u) for s, u in self.site_of_node.get(ni, []) if u.activation == st.tensor]
        if not found or where != [list(node.input).index(st.tensor)]:
            raise _Blocked(f"its channels reach {node.op_type} '{self._label(ni)}' as an operand "
                           "that is not a prunable layer's input")
        site, use = found[0]
        if len(site.uses) != 1:
            raise _Blocked(f"the weight of consumer '{site.name}' is shared by several nodes")
        if site.layout in ("conv", "convT") and site.groups != 1:
            raise _Blocked(f"consumer '{site.name}' is a grouped {node.op_type}")
        a = _attrs(node)
        rank = self._rank(st.tensor)
        pos = where[0]
        if node.op_type in ("Conv", "ConvTranspose"):
            contraction = 1
        elif node.op_type == "Gemm":
            contraction = (0 if a.get("transA", 0) else 1) if pos == 0 else (1 if a.get("transB", 0) else 0)
        else:
            contraction = rank - 1 if pos == 0 else max(rank - 2, 0)
        if st.axis != contraction:
            raise _Blocked(f"its channel axis is not the input axis of {node.op_type} "
                           f"'{self._label(ni)}'")
        taps = int(np.prod(site.op_shape[2:], dtype=np.int64)) if site.layout in ("conv", "convT") else 1
        columns = [(p[:, None] * taps + np.arange(taps)).ravel() for p in st.positions]
        group.cuts.append(self._weight_cut(site, "in", st.positions))
        group.consumers.append(ConsumerUse(site, columns, self._bias_slot(ni, site, use)))

    def _depthwise(self, group: UnitGroup, ni: int, st: _State, groups: int) -> _State:
        """A depthwise Conv on the path: its channels go with the unit that feeds them."""
        node = self.nodes[ni]
        if st.axis != 1 or groups != st.size or len(st.positions[0]) != 1:
            raise _Blocked(f"grouped Conv '{self._label(ni)}' (group={groups}): removing input "
                           "channels would unbalance its groups")
        if node.input[1] not in self.consts:
            raise _Blocked(f"depthwise Conv '{self._label(ni)}' has a computed weight")
        c_out = int(self.consts[node.input[1]].dims[0])
        mult = c_out // groups
        positions = [(p[:, None] * mult + np.arange(mult)).ravel() for p in st.positions]
        group.cuts.append(self._own_cut(node.input[1], 0, positions))
        if len(node.input) > 2 and node.input[2]:
            if node.input[2] not in self.consts:
                raise _Blocked(f"depthwise Conv '{self._label(ni)}' has a computed bias")
            group.cuts.append(self._own_cut(node.input[2], 0, positions))
        group.edits.append(Edit("group", ni, 0, groups, st.positions))
        return _State(node.output[0], 1, positions, c_out)

    def _elementwise(self, group: UnitGroup, ni: int, where: list[int], ins: list[_State]) -> _State:
        node = self.nodes[ni]
        out = node.output[0]
        rank_out = self._rank(out)
        st = ins[0]
        axis = st.axis + rank_out - self._rank(st.tensor)
        for other in ins[1:]:   # several operands carry the units: they must line up
            if (other.axis + rank_out - self._rank(other.tensor) != axis or other.size != st.size
                    or any(not np.array_equal(p, q) for p, q in zip(other.positions, st.positions))):
                raise _Blocked(f"{node.op_type} '{self._label(ni)}' combines its channels in "
                               "different layouts")
        for pos, name in enumerate(node.input):
            if pos in where or not name:
                continue
            if name in self.consts:
                cut = self._per_channel(name, rank_out, axis, st.size, st.positions)
                if cut:
                    group.cuts.append(cut)
                continue
            dims = self.shapes.get(name)
            k = None if dims is None else axis - (rank_out - len(dims))
            if dims is None or (k >= 0 and dims[k] != 1):
                why = _COUPLING.get(node.op_type, "a residual connection?")
                raise _Blocked(f"its channels are coupled with '{name}' by {node.op_type} "
                               f"'{self._label(ni)}' ({why})")
        return _State(out, axis, st.positions, st.size)

    def _regroup(self, group: UnitGroup, ni: int, st: _State) -> _State:
        """Flatten / Reshape / Squeeze / Unsqueeze: where the channel axis lands, and the block
        of positions each channel position becomes (outer * size * inner layout)."""
        node = self.nodes[ni]
        dims_in = self._dims(node.input[0])
        if node.op_type == "Flatten":
            k = _attrs(node).get("axis", 1)
            k = k + len(dims_in) if k < 0 else k
            dims_out = [_product(dims_in[:k]), _product(dims_in[k:])]
        elif node.op_type == "Reshape":
            target = self._const_ints(node.input[1])
            if target is None:   # x.view(x.size(0), -1): dims read with Shape, then constants
                target = self._computed_target(ni)
            dims_out = _reshape_dims(dims_in, target)
        else:
            dims_out = self._dims(node.output[0])
        if self.shapes.get(node.output[0]) is None:   # a computed target defeats inference
            self.shapes[node.output[0]] = dims_out
            self.math.memo.clear()
        out_axis, outer, inner = _regroup(dims_in, dims_out, st.axis)
        if out_axis is None:
            raise _Blocked(f"{node.op_type} '{self._label(ni)}' splits or mixes its channel axis")
        block = np.arange(outer)[:, None, None] * st.size * inner + np.arange(inner)
        positions = [(block + p[None, :, None] * inner).ravel() for p in st.positions]
        positions = [np.sort(p) for p in positions]
        if node.op_type == "Reshape" and target[out_axis] != 0 and target[out_axis] != -1:
            if node.input[1] not in self.consts:
                raise _Blocked(f"Reshape '{self._label(ni)}' has a computed size on its channel axis")
            if self.refs.get(node.input[1], 0) != 1:
                raise _Blocked(f"the shape of Reshape '{self._label(ni)}' is shared")
            group.edits.append(Edit("reshape", ni, out_axis, int(target[out_axis]), positions))
        return _State(node.output[0], out_axis, positions, st.size * outer * inner)

    def _reduce(self, ni: int, st: _State, a: dict) -> _State:
        """A reduction over axes other than the channel axis: where the channel axis lands."""
        node = self.nodes[ni]
        rank = self._rank(node.input[0])
        if len(node.input) > 1 and node.input[1]:   # axes as an input (ReduceSum 13+, all 18+)
            axes = self._const_ints(node.input[1])
            if axes is None:
                raise _Blocked(f"{node.op_type} '{self._label(ni)}' has computed axes")
        else:
            axes = a.get("axes")
        if not axes:   # all axes, or none with noop_with_empty_axes
            if a.get("noop_with_empty_axes", 0):
                return _State(node.output[0], st.axis, st.positions, st.size)
            raise _Blocked(f"{node.op_type} '{self._label(ni)}' reduces over its channel axis")
        axes = {int(x) % rank for x in axes}
        if st.axis in axes:
            raise _Blocked(f"{node.op_type} '{self._label(ni)}' reduces over its channel axis")
        axis = st.axis if a.get("keepdims", 1) else st.axis - sum(1 for x in axes if x < st.axis)
        return _State(node.output[0], axis, st.positions, st.size)

    def _shape_read(self, ni: int, st: _State, a: dict) -> None:
        """Shape of a tensor that carries units: fine when only other dimensions are used (the
        batch size of x.view(x.size(0), -1)), read from it by Gathers of constant indices."""
        node = self.nodes[ni]
        rank = self._rank(node.input[0])
        start, end = (min(max(v + rank if v < 0 else v, 0), rank)
                      for v in (a.get("start", 0), a.get("end", rank)))
        if not start <= st.axis < end:
            return
        out = node.output[0]
        if out in self.outputs or out in self.inner_refs:
            raise _Blocked(f"Shape '{self._label(ni)}' reads its channel count")
        for ri, pos in self.readers.get(out, []):
            reader = self.nodes[ri]
            idx = self._const_ints(reader.input[1]) if len(reader.input) > 1 else None
            if (reader.op_type != "Gather" or pos != 0 or _attrs(reader).get("axis", 0) != 0
                    or idx is None or st.axis - start in [i % (end - start) for i in idx]):
                raise _Blocked(f"Shape '{self._label(ni)}' reads its channel count")

    def _computed_target(self, ni: int) -> list:
        """A Reshape target computed from dimensions read with Shape and constants, with each
        read dimension replaced by its value (an int or a dim_param)."""
        target = self.math.target(self.nodes[ni].input[1])
        if target is None:
            raise _Blocked(f"Reshape '{self._label(ni)}' has a computed shape")
        return target

    def _concat(self, ni: int, where: list[int], ins: list[_State], a: dict) -> _State:
        node = self.nodes[ni]
        out = node.output[0]
        axis = a.get("axis", 0) % self._rank(out)
        if any(st.axis != axis for st in ins):
            raise _Blocked(f"Concat '{self._label(ni)}' stacks its channels with other tensors "
                           "on another axis (coupled)")
        shifted, total = [], 0
        for pos, name in enumerate(node.input):
            if pos in where:
                shifted.append([p + total for p in ins[where.index(pos)].positions])
            d = self._dims(name)[axis]
            if not isinstance(d, int):
                raise _Blocked(f"the inputs of Concat '{self._label(ni)}' have unknown sizes")
            total += d
        positions = [np.concatenate(ps) for ps in zip(*shifted)]
        return _State(out, axis, positions, total)

    def _split(self, group: UnitGroup, ni: int, st: _State, a: dict) -> list[_State]:
        node = self.nodes[ni]
        rank = self._rank(node.input[0])
        used = [i for i, o in enumerate(node.output) if o]
        if a.get("axis", 0) % rank != st.axis:
            return [_State(node.output[i], st.axis, st.positions, st.size) for i in used]
        if len(node.input) > 1 and node.input[1] and self.refs.get(node.input[1], 0) != 1:
            raise _Blocked(f"the sizes of Split '{self._label(ni)}' are shared")
        sizes = [self._dims(o)[st.axis] for o in node.output]
        if not all(isinstance(s, int) for s in sizes):
            raise _Blocked(f"the outputs of Split '{self._label(ni)}' have unknown sizes")
        states, start = [], 0
        for k, size in enumerate(sizes):
            inside = [p[(p >= start) & (p < start + size)] - start for p in st.positions]
            group.edits.append(Edit("split", ni, k, size, inside))
            if node.output[k]:
                states.append(_State(node.output[k], st.axis, inside, size))
            start += size
        return states

    # ------------------------------------------------------------ constants and biases

    def _per_channel(self, name: str, rank: int, axis: int, size: int,
                     positions: list[np.ndarray]) -> Cut | None:
        """The cut of a constant broadcast against a tensor whose `axis` carries the channels:
        None when it is the same for every channel (size 1 there, or no such axis)."""
        if name not in self.consts:
            raise _Blocked(f"'{name}' is a computed per-channel operand")
        dims = list(self.consts[name].dims)
        k = axis - (rank - len(dims))
        if k < 0 or dims[k] == 1:
            return None
        if dims[k] != size:
            raise _Blocked(f"constant '{name}' does not broadcast per channel")
        return self._own_cut(name, k, positions)

    def _weight_cut(self, site: Site, which: str, positions: list[np.ndarray]) -> Cut:
        """The cut of a site's weight along its output ("out") or input ("in") axis; refused
        where the graph reads the size of that axis with Shape or Size."""
        axis = _weight_axis(site, which)
        for ri, _ in self.readers.get(site.tensor_name, []) if not site.scope else []:
            reader = self.nodes[ri]
            if reader.op_type in ("Shape", "Size"):
                a, rank = _attrs(reader), len(site.shape)
                start, end = (min(max(v + rank if v < 0 else v, 0), rank)
                              for v in (a.get("start", 0), a.get("end", rank)))
                if reader.op_type == "Size" or start <= axis < end:
                    raise _Blocked(f"{reader.op_type} '{self._label(ri)}' reads the size of "
                                   f"'{site.name}' that removing units changes")
        return Cut(site.name, axis, positions)

    def _own_cut(self, name: str, axis: int, positions: list[np.ndarray]) -> Cut:
        if self.refs.get(name, 0) != 1 or name in self.graph_inputs:
            raise _Blocked(f"per-channel constant '{name}' is shared with other nodes")
        return Cut(name, axis, positions)

    def _bias_slot(self, ni: int, site: Site, use) -> BiasSlot | None:
        """Where the consumer's bias can absorb a correction (None: it cannot)."""
        node = self.nodes[ni]
        rows = site.matrix_shape[0]
        if node.op_type == "MatMul":
            return self._matmul_bias(ni, rows) if node.input[0] == use.activation else None
        a = _attrs(node)
        scale, shape = 1.0, (rows,)
        if node.op_type == "Gemm":
            alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
            if alpha == 0 or beta == 0:
                return None
            scale = beta / alpha
            if node.input[0] != use.activation:   # weight on the left: units on axis 0
                shape = (rows, 1)
        name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if name is None:
            return BiasSlot(ni, None, shape, scale)
        if name not in self.consts or self.refs.get(name, 0) != 1 or name in self.graph_inputs:
            return None
        dims = list(self.consts[name].dims)
        while dims and dims[0] == 1:   # leading 1s broadcast away
            dims.pop(0)
        if dims and dims != list(shape[-len(dims):]):
            return None   # varies along the sample axis: not one value per unit
        return BiasSlot(ni, name, shape, scale)

    def _matmul_bias(self, ni: int, rows: int) -> BiasSlot | None:
        """MatMul followed by Add of a per-unit constant (its bias, as exporters write it)."""
        out = self.nodes[ni].output[0]
        readers = self.readers.get(out, [])
        if len(readers) != 1 or out in self.outputs or self.nodes[readers[0][0]].op_type != "Add":
            return None
        ai, pos = readers[0]
        name = self.nodes[ai].input[1 - pos]
        if name not in self.consts or self.refs.get(name, 0) != 1 or name in self.graph_inputs:
            return None
        dims = list(self.consts[name].dims)
        while dims and dims[0] == 1:
            dims.pop(0)
        return BiasSlot(ai, name, (rows,), 1.0) if dims in ([], [rows]) else None

    # ------------------------------------------------------------ shapes

    def _dims(self, name: str) -> list:
        dims = self.shapes.get(name)
        if dims is None:
            raise _Blocked(f"the shape of '{name}' is unknown")
        return dims

    def _rank(self, name: str) -> int:
        return len(self._dims(name))

    def _const_ints(self, name: str) -> list[int] | None:
        return self.math.ints(name)

    def _only_first_output(self, ni: int) -> None:
        node = self.nodes[ni]
        for o in node.output[1:]:
            if o and (o in self.readers or o in self.outputs):
                raise _Blocked(f"the extra outputs of {node.op_type} '{self._label(ni)}' are used")

    def _label(self, ni: int) -> str:
        return node_label(self.nodes[ni], ni, "")


def _weight_axis(site: Site, which: str) -> int:
    """Stored axis of a site's tensor that holds its output units ("out") or inputs ("in")."""
    out_axis = {"rows_cols": 0, "cols_rows": 1, "conv": 0, "convT": 1}[site.layout]
    op_axis = out_axis if which == "out" else 1 - out_axis
    return site.perm[op_axis] if site.perm else op_axis


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _subgraph_refs(graph: onnx.GraphProto) -> set[str]:
    """Names read by nodes inside subgraphs (they may come from the outer graph)."""
    names: set[str] = set()
    for node in graph.node:
        for a in node.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                for n in g.node:
                    names.update(n.input)
                names |= _subgraph_refs(g)
    return names


class _ShapeMath:
    """The values of the small integer tensors exporters compute shapes with (Shape, Gather,
    Unsqueeze, Concat of constants: x.view(x.size(0), -1)), as far as they can be followed."""

    def __init__(self, nodes: list, consts: dict[str, onnx.TensorProto], shapes: dict[str, list]):
        self.nodes, self.consts, self.shapes = nodes, consts, shapes
        self.producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
        self.memo: dict[str, list | None] = {}

    def ints(self, name: str) -> list[int] | None:
        if name not in self.consts:
            return None
        return [int(x) for x in numpy_helper.to_array(self.consts[name]).ravel()]

    def target(self, name: str) -> list | None:
        """The value of a computed 1-D shape: per entry an int or a dim_param (a dimension
        read with Shape); None where it cannot be followed."""
        entries = self.entries(name, 0)
        return None if entries is None or any(e is None for e in entries) else entries

    def entries(self, name: str, depth: int) -> list | None:
        """Per entry an int, a dim_param or None (unknown); None when not followed at all."""
        if name not in self.memo:
            self.memo[name] = self._entries(name, depth)
        return self.memo[name]

    def _entries(self, name: str, depth: int) -> list | None:
        if name in self.consts:
            return self.ints(name)
        ni = self.producer.get(name)
        if ni is None or depth > 32 or self.nodes[ni].op_type not in _SHAPE_OPS:
            return None
        node, a = self.nodes[ni], _attrs(self.nodes[ni])
        op = node.op_type
        ins = [self.entries(x, depth + 1) if x and op != "Shape" else None for x in node.input]
        if op == "Shape":
            dims = self.shapes.get(node.input[0])
            return None if dims is None else list(dims)[a.get("start", 0):a.get("end")]
        if op in ("Identity", "Cast", "Squeeze", "Unsqueeze"):   # scalar <-> [1]: same entries
            return ins[0]
        if op == "Reshape":   # to one axis: [-1] or [n]
            target = self.ints(node.input[1])
            return ins[0] if ins[0] is not None and target in ([-1], [len(ins[0])]) else None
        if op == "Gather" and a.get("axis", 0) == 0:
            data, idx = ins[0], self.ints(node.input[1])
            if data is None or idx is None or any(not -len(data) <= i < len(data) for i in idx):
                return None
            return [data[i] for i in idx]
        if op == "Slice" and ins[0] is not None and len(node.input) >= 3 and all(
                not x or self.ints(x) is not None for x in node.input[1:]):   # opset 10+
            starts, ends = self.ints(node.input[1]), self.ints(node.input[2])
            axes = self.ints(node.input[3]) if len(node.input) > 3 and node.input[3] else [0]
            steps = self.ints(node.input[4]) if len(node.input) > 4 and node.input[4] else [1]
            if len(starts) != 1 or axes[0] not in (0, -1) or steps[0] == 0:
                return None
            return ins[0][slice(starts[0], ends[0], steps[0])]
        if op == "Concat" and all(p is not None for p in ins):
            return [e for p in ins for e in p]
        if op in ("Mul", "Div", "Add", "Sub") and all(p is not None for p in ins[:2]):
            x, y = ins[:2]
            if len(x) != len(y) and 1 not in (len(x), len(y)):
                return None
            n = max(len(x), len(y))
            x, y = (x * n if len(x) == 1 else x), (y * n if len(y) == 1 else y)
            return [_arith(op, u, v) for u, v in zip(x, y)]
        return None


_SHAPE_OPS = {"Shape", "Identity", "Cast", "Squeeze", "Unsqueeze", "Reshape", "Gather", "Slice",
              "Concat", "Mul", "Div", "Add", "Sub"}


def _arith(op: str, u, v) -> int | None:
    if not (isinstance(u, int) and isinstance(v, int)):
        return None
    if op == "Div":
        return u // v if v > 0 and u >= 0 else None
    return u * v if op == "Mul" else u + v if op == "Add" else u - v


_FOLD_ROUNDS = 8


def _shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Inferred dims of every main-graph tensor: int, dim_param string, or None if unknown.

    onnx's inference gives up on a Reshape whose target is computed from Shape (older exports of
    x.view(x.size(0), -1), x.flatten(2)) and on everything after it: such targets are folded into
    constants where they resolve (0 where they copy a symbolic dimension of the same position),
    on a copy, and inferred again, until no more resolve.
    """
    shapes = _inferred_shapes(model)
    nodes, consts = list(model.graph.node), {**_const_protos(model), **_int_constants(model)}
    folds: dict[int, list[int]] = {}
    for _ in range(_FOLD_ROUNDS):
        math = _ShapeMath(nodes, consts, shapes)
        new = {}
        for i, n in enumerate(nodes):
            if (n.op_type == "Reshape" and i not in folds and n.input[1] not in consts
                    and shapes.get(n.output[0]) is None and not _attrs(n).get("allowzero", 0)):
                target = _constant_target(math.target(n.input[1]), shapes.get(n.input[0]))
                if target is not None:
                    new[i] = target
        if not new:
            break
        folds.update(new)
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        for i, target in folds.items():
            name = _unique_name(copy, f"{nodes[i].output[0]}_target")
            copy.graph.initializer.append(numpy_helper.from_array(np.array(target, np.int64), name))
            copy.graph.node[i].input[1] = name
        shapes = _inferred_shapes(copy)
    return shapes


def _int_constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Constant nodes holding integers as value_int / value_ints (the dynamo exporter writes
    shape constants so), as tensors: read-only copies for shape arithmetic."""
    out = {}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            for a in node.attribute:
                if a.name in ("value_int", "value_ints"):
                    value = a.i if a.name == "value_int" else list(a.ints)
                    out[node.output[0]] = numpy_helper.from_array(np.array(value, np.int64))
    return out


def _constant_target(target: list | None, dims_in: list | None) -> list[int] | None:
    """A Reshape target as constants: a symbolic entry becomes 0 where it copies the input's
    dimension at the same position; None if another one is left."""
    if target is None:
        return None
    out = []
    for pos, t in enumerate(target):
        if not isinstance(t, int):
            if dims_in is None or pos >= len(dims_in) or dims_in[pos] != t:
                return None
            t = 0
        out.append(t)
    return out


def _inferred_shapes(model: onnx.ModelProto) -> dict[str, list]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # custom ops or inconsistent declarations: use what the file declares
        inferred = model
    shapes = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tt.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                               for d in tt.shape.dim]
    for t in g.initializer:
        shapes[t.name] = list(t.dims)
    for node in g.node:
        if node.op_type == "Constant" and node.output:
            for a in node.attribute:
                if a.name == "value":
                    shapes[node.output[0]] = list(a.t.dims)
    return shapes


def _product(dims: list):
    """Product of dims: an int, a single dim_param times 1, or None when unknown."""
    n, syms = 1, []
    for d in dims:
        if isinstance(d, int):
            n *= d
        elif isinstance(d, str):
            syms.append(d)
        else:
            return None
    if not syms:
        return n
    return syms[0] if len(syms) == 1 and n == 1 else None


def _reshape_dims(dims_in: list, target: list[int]) -> list:
    """Output dims of Reshape(dims_in, target): 0 copies, -1 takes what is left (None when the
    leftover is not one known number or one dim_param)."""
    out = [dims_in[i] if t == 0 and i < len(dims_in) else t for i, t in enumerate(target)]
    if -1 not in out:
        return out
    i = out.index(-1)
    left, syms = 1, []
    for d in dims_in:
        if d is None:
            out[i] = None
            return out
        left, syms = (left * d, syms) if isinstance(d, int) else (left, syms + [d])
    for d in out[:i] + out[i + 1:]:
        if isinstance(d, int) and d and left % d == 0:
            left //= d
        elif isinstance(d, str) and d in syms:
            syms.remove(d)
        else:
            out[i] = None
            return out
    out[i] = _product([left] + syms)
    return out


def _regroup(dims_in: list, dims_out: list, axis: int):
    """(output axis, outer, inner) for a reshape that keeps the channel axis whole: the output
    axis holds outer x channel x inner positions (row-major). (None, 0, 0) if it splits it."""
    n_in, n_out = len(dims_in), len(dims_out)
    pre = 0
    while pre < min(n_in, n_out) and dims_in[pre] is not None and dims_in[pre] == dims_out[pre]:
        pre += 1
    if pre > axis:
        return axis, 1, 1
    suf = 0
    while (suf < min(n_in, n_out) - pre and dims_in[-1 - suf] is not None
           and dims_in[-1 - suf] == dims_out[-1 - suf]):
        suf += 1
    if suf >= n_in - axis:
        return n_out - (n_in - axis), 1, 1
    k = axis - pre
    # The longest equal suffix may hold the output axis the channel merges into ([N, 1, 1, 2] ->
    # [N, 2]): then a shorter one is right.
    for s in range(suf, -1, -1):
        mid_in, mid_out = dims_in[pre:n_in - s], dims_out[pre:n_out - s]
        merged = _merged_axis(mid_in, mid_out)
        if merged is not None:
            outer = int(np.prod(mid_in[:k], dtype=np.int64))
            inner = int(np.prod(mid_in[k + 1:], dtype=np.int64))
            return pre + merged, outer, inner
    return None, 0, 0


def _merged_axis(mid_in: list, mid_out: list) -> int | None:
    """The one axis of mid_out (the others of size 1) that all of mid_in merges into, or None."""
    if not all(isinstance(d, int) for d in mid_in + mid_out):
        return None
    if int(np.prod(mid_in, dtype=np.int64)) != int(np.prod(mid_out, dtype=np.int64)):
        return None
    big = [i for i, d in enumerate(mid_out) if d != 1]
    return big[0] if len(big) == 1 else None


# ---------------------------------------------------------------- surgery

def shrink(model: onnx.ModelProto, group: UnitGroup, removed, base_dir: str = "") -> None:
    """Delete the removed units' entries from every cut tensor, apply the edits, refresh shapes."""
    removed = [int(u) for u in removed]
    if not removed:
        return
    consts = _const_protos(model)
    for cut in group.cuts:
        pos = np.concatenate([cut.positions[u] for u in removed])
        array = numpy_helper.to_array(consts[cut.tensor], base_dir)
        _store(consts[cut.tensor], np.delete(array, pos, axis=cut.axis))
    splits: dict[int, dict[int, int]] = {}
    for e in group.edits:
        value = e.base - sum(len(e.positions[u]) for u in removed)
        node = model.graph.node[e.node]
        if e.kind == "reshape":
            shape = numpy_helper.to_array(consts[node.input[1]]).copy()
            shape[e.index] = value
            _store(consts[node.input[1]], shape)
        elif e.kind == "group":
            _set_int_attr(node, "group", value)
        else:
            splits.setdefault(e.node, {})[e.index] = value
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    for ni, sizes in splits.items():
        _write_split(model, model.graph.node[ni], [sizes[k] for k in sorted(sizes)], consts, opset)
    refresh_shapes(model)


def refresh_shapes(model: onnx.ModelProto) -> None:
    """Drop stale intermediate shapes and check the graph with strict shape inference (the
    inferred shapes are kept only if the file declared intermediate shapes to begin with)."""
    had = len(model.graph.value_info) > 0
    del model.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as e:
        raise OnnxObsError(f"removing units left inconsistent shapes ({str(e).splitlines()[0]}): "
                           "nothing written; please report this") from e
    if had:
        model.graph.value_info.extend(inferred.graph.value_info)


def _const_protos(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    consts = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = a.t
    return consts


def _store(tensor: onnx.TensorProto, array: np.ndarray) -> None:
    """Replace a tensor's contents in place (its name, dtype and location kind stay)."""
    tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), tensor.name))


def _set_int_attr(node: onnx.NodeProto, name: str, value) -> None:
    for a in node.attribute:
        if a.name == name:
            node.attribute.remove(a)
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))


def _write_split(model, node, sizes: list[int], consts, opset: int) -> None:
    if opset < 13:
        _set_int_attr(node, "split", sizes)
        return
    array = np.array(sizes, dtype=np.int64)
    if len(node.input) > 1 and node.input[1]:
        _store(consts[node.input[1]], array)
    else:
        name = _unique_name(model, (node.name or node.output[0]) + "_split")
        model.graph.initializer.append(numpy_helper.from_array(array, name))
        while len(node.input) < 2:
            node.input.append("")
        node.input[1] = name
    for a in list(node.attribute):
        if a.name == "num_outputs":
            node.attribute.remove(a)


def _unique_name(model: onnx.ModelProto, base: str) -> str:
    taken = {i.name for i in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
    taken |= {i.name for i in model.graph.input}
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


# ---------------------------------------------------------------- consumer biases

def read_bias(model: onnx.ModelProto, slot: BiasSlot, base_dir: str = "") -> np.ndarray:
    """The consumer's bias in 2-D view units, one value per unit (zeros if it has none)."""
    rows = int(np.prod(slot.shape))
    if slot.tensor is None:
        return np.zeros(rows)
    array = numpy_helper.to_array(_const_protos(model)[slot.tensor], base_dir).astype(np.float64)
    return slot.scale * np.broadcast_to(array.ravel(), (rows,)).copy()


def write_bias(model: onnx.ModelProto, slot: BiasSlot, values: np.ndarray) -> None:
    """Store a per-unit bias (2-D view units) into the consumer, adding the input if absent, in
    the type the consumer computes in (an fp16 weight behind a Cast to float computes in float)."""
    array = (np.asarray(values, dtype=np.float64) / slot.scale).reshape(slot.shape)
    consts = _const_protos(model)
    if slot.tensor is not None:
        t = consts[slot.tensor]
        _store(t, array.astype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)))
        return
    node = model.graph.node[slot.node]
    array = array.astype(onnx.helper.tensor_dtype_to_np_dtype(_weight_type(model, node, consts)))
    name = _unique_name(model, (node.name or node.output[0]) + "_bias")
    model.graph.initializer.append(numpy_helper.from_array(array, name))
    while len(node.input) < 3:
        node.input.append("")
    node.input[2] = name
    slot.tensor = name


def _weight_type(model: onnx.ModelProto, node: onnx.NodeProto, consts: dict) -> int:
    """The element type a Gemm / Conv reads its weight input in: the stored tensor's, or the
    target of a Cast on the way (Identity and Transpose keep it)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    name = node.input[1]
    while name not in consts and name in producer:
        p = producer[name]
        if p.op_type == "Cast":
            return next(a.i for a in p.attribute if a.name == "to")
        name = p.input[0]
    return consts[name].data_type if name in consts else onnx.TensorProto.FLOAT
