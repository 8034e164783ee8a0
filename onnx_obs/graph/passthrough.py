"""How units pass through the ops between a producer and its consumers: `PASS_THROUGH[op_type]`.

A handler gets the graph, the unit group, the node's index, the input positions that carry the
units (`where`) and their states, and returns the states of the outputs that carry them on (none:
the units end there), records the cuts and edits the op needs, or raises Blocked with the reason.
It returns None where it cannot follow the units (they reach an input it does not pass on).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from onnx_obs.graph.channel_graph import Blocked, ChannelGraph, Coarsen, Coupled, State
from onnx_obs.graph.ops import OPS
from onnx_obs.graph.protos import attrs
from onnx_obs.graph.shape_fold import product, regroup, reshape_dims
from onnx_obs.graph.units import Edit, UnitGroup

# Ops applied to each element on its own: a channel passes through unchanged.
UNARY = {"Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Clip", "HardSigmoid", "HardSwish",
         "Elu", "Selu", "Celu", "Gelu", "Erf", "Softplus", "Softsign", "Mish", "ThresholdedRelu",
         "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign",
         "Sin", "Cos", "Identity", "Dropout", "Cast", "IsNaN", "IsInf", "Not"}
# Elementwise ops of several operands: fine with constants (per channel or broadcast) and with
# computed tensors of size 1 on the channel axis; another computed tensor couples the channels
# (graph/tracing.py then adds its producers to the group).
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where"}
POOLS = {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
NORMS = {"BatchNormalization": 5, "InstanceNormalization": 3}  # op -> inputs (all per channel)
REGROUP = {"Flatten", "Reshape", "Squeeze", "Unsqueeze"}
# What coupling through an elementwise op with another computed tensor usually is.
_COUPLING = {"Mul": "a gate such as squeeze-and-excitation?", "Div": "a normalisation?"}
# Reductions: fine over other axes (x.mean((2, 3)) as a global pool), never over the channels.
REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
          "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"}

Handler = Callable[[ChannelGraph, UnitGroup, int, list[int], list[State]], list[State] | None]


def _unary(g: ChannelGraph, group: UnitGroup, ni: int, where: list[int], ins: list[State]):
    if where != [0]:
        return None
    st, node = ins[0], g.nodes[ni]
    if node.op_type == "PRelu":
        cut = g.per_channel(node.input[1], g.rank(node.output[0]), st.axis, st.size, st.positions)
        if cut:
            group.cuts.append(cut)
    g.only_first_output(ni)
    return [State(node.output[0], st.axis, st.positions, st.size)]


def _elementwise(g: ChannelGraph, group: UnitGroup, ni: int, where: list[int], ins: list[State]):
    node = g.nodes[ni]
    out = node.output[0]
    rank_out = g.rank(out)
    st = ins[0]
    axis = st.axis + rank_out - g.rank(st.tensor)
    for other in ins[1:]:   # several operands carry the units: they must line up
        if (other.axis + rank_out - g.rank(other.tensor) != axis or other.size != st.size
                or any(not np.array_equal(p, q) for p, q in zip(other.positions, st.positions))):
            raise Blocked(f"{node.op_type} '{g.label(ni)}' combines its channels in "
                          "different layouts")
    for pos, name in enumerate(node.input):
        if pos in where or not name:
            continue
        if name in g.consts:
            cut = g.per_channel(name, rank_out, axis, st.size, st.positions)
            if cut:
                group.cuts.append(cut)
            continue
        dims = g.shapes.get(name)
        k = None if dims is None else axis - (rank_out - len(dims))
        if dims is None or (k >= 0 and dims[k] != 1):
            why = _COUPLING.get(node.op_type, "a residual connection?")
            message = (f"its channels are coupled with '{name}' by {node.op_type} "
                       f"'{g.label(ni)}' ({why})")
            if dims is None or k < 0 or dims[k] != st.size:
                raise Blocked(message)
            # the tracer looks for the operand's producers
            raise Coupled(message, name, k, st.positions, st.size)
    return [State(out, axis, st.positions, st.size)]


def _norm(g: ChannelGraph, group: UnitGroup, ni: int, where: list[int], ins: list[State]):
    st, node = ins[0], g.nodes[ni]
    if where != [0] or st.axis != 1:
        return None
    for name in node.input[1:NORMS[node.op_type]]:
        if name not in g.consts:
            raise Blocked(f"{node.op_type} '{g.label(ni)}' has computed statistics")
        group.cuts.append(g.own_cut(name, 0, st.positions))
    g.only_first_output(ni)
    return [State(node.output[0], 1, st.positions, st.size)]


def _pool(g: ChannelGraph, group: UnitGroup, ni: int, where: list[int], ins: list[State]):
    st = ins[0]
    if where != [0] or st.axis != 1:
        return None
    g.only_first_output(ni)
    return [State(g.nodes[ni].output[0], 1, st.positions, st.size)]


def _regroup(g: ChannelGraph, group: UnitGroup, ni: int, where: list[int], ins: list[State]):
    """Flatten / Reshape / Squeeze / Unsqueeze: where the channel axis lands, and the block
    of positions each channel position becomes (outer * size * inner layout)."""
    if where != [0]:
        return None
    st, node = ins[0], g.nodes[ni]
    dims_in = g.dims(node.input[0])
    if node.op_type == "Flatten":
        k = attrs(node).get("axis", 1)
        k = k + len(dims_in) if k < 0 else k
        dims_out = [product(dims_in[:k]), product(dims_in[k:])]
    elif node.op_type == "Reshape":
        target = g.ints(node.input[1])
        if target is None:   # x.view(x.size(0), -1): dims read with Shape, then constants
            target = g.math.target(node.input[1])
            if target is None:
                raise Blocked(f"Reshape '{g.label(ni)}' has a computed shape")
        dims_out = reshape_dims(dims_in, target)
    else:
        dims_out = g.dims(node.output[0])
    if g.shapes.get(node.output[0]) is None:   # a computed target defeats inference
        g.shapes[node.output[0]] = dims_out
        g.math.memo.clear()
    out_axis, outer, inner = regroup(dims_in, dims_out, st.axis)
    if out_axis is None:
        out_axis, positions, size = _split_axis(g, ni, st, dims_in, dims_out)
    else:
        block = np.arange(outer)[:, None, None] * st.size * inner + np.arange(inner)
        positions = [(block + p[None, :, None] * inner).ravel() for p in st.positions]
        positions = [np.sort(p) for p in positions]
        size = st.size * outer * inner
    if node.op_type == "Reshape" and target[out_axis] != 0 and target[out_axis] != -1:
        source = g.shape_entry(node.input[1], out_axis)
        if source is None:
            raise Blocked(f"Reshape '{g.label(ni)}' has a computed size on its channel axis")
        if g.refs(source[0]) != 1:
            raise Blocked(f"the shape of Reshape '{g.label(ni)}' is shared")
        group.edits.append(Edit("reshape", ni, source[1], int(target[out_axis]), positions,
                                source[0]))
    return [State(node.output[0], out_axis, positions, size)]


def _split_axis(g: ChannelGraph, ni: int, st: State, dims_in: list, dims_out: list):
    """A reshape that splits the channel axis into [blocks, block size, ...] at the same axis
    (attention's [B, T, hidden] -> [B, T, heads, head_dim]): each unit must own whole blocks,
    which become its positions on the blocks axis; single-channel units ask the tracer to start
    over with units of whole blocks (graph/tracing.py)."""
    axis = st.axis
    back, outer, block = regroup(dims_out, dims_in, axis) if axis < len(dims_out) else (None, 0, 0)
    if back != axis or outer != 1 or block < 2:
        raise Blocked(f"{g.nodes[ni].op_type} '{g.label(ni)}' splits or mixes its channel axis")
    blocks = [np.unique(p // block) for p in st.positions]
    if any(len(b) * block != len(p) for b, p in zip(blocks, st.positions)):
        if all(len(p) == 1 and p[0] == u for u, p in enumerate(st.positions)):
            raise Coarsen(f"Reshape '{g.label(ni)}' splits its channels into blocks of {block}",
                          block)
        raise Blocked(f"Reshape '{g.label(ni)}' splits its channels across units")
    return axis, blocks, st.size // block


def _softmax(g: ChannelGraph, group: UnitGroup, ni: int, where: list[int], ins: list[State]):
    """Softmax / LogSoftmax over another axis than the units' (attention scores over keys, per
    head): each unit's slices stay its own (before opset 13 the op flattens from `axis` on, so
    the units must lie before it)."""
    st, node = ins[0], g.nodes[ni]
    if where != [0]:
        return None
    rank = g.rank(node.input[0])
    axis = attrs(node).get("axis", -1 if g.opset >= 13 else 1) % rank
    if st.axis == axis or (g.opset < 13 and st.axis > axis):
        raise Blocked(f"{node.op_type} '{g.label(ni)}' normalises over its channels")
    return [State(node.output[0], st.axis, st.positions, st.size)]


def _batched_matmul(g: ChannelGraph, group: UnitGroup, ni: int, where: list[int],
                    ins: list[State]):
    """MatMul of two computed tensors (attention's QK^T and PV): units on a batch axis (the heads)
    pass through; the other operand, if it has that axis, carries the same units (coupled: its
    producers join the group, as in an elementwise op)."""
    node = g.nodes[ni]
    out = node.output[0]
    rank_out = g.rank(out)
    st = ins[0]
    axis = st.axis + rank_out - g.rank(st.tensor)
    for other in ins:
        rank = g.rank(other.tensor)
        if other.axis + rank_out - rank != axis or other.axis >= rank - 2:   # not a batch axis
            raise Blocked(f"MatMul '{g.label(ni)}' contracts or mixes its channels")
        if other.size != st.size or any(not np.array_equal(p, q)
                                        for p, q in zip(other.positions, st.positions)):
            raise Blocked(f"MatMul '{g.label(ni)}' combines its channels in different layouts")
    for pos, name in enumerate(node.input):
        if pos in where:
            continue
        dims = g.dims(name)
        k = axis - (rank_out - len(dims))
        if k >= 0 and dims[k] != 1:
            message = f"its channels meet '{name}' in MatMul '{g.label(ni)}' (attention heads)"
            if dims[k] != st.size:
                raise Blocked(message)
            raise Coupled(message, name, k, st.positions, st.size)
    group.batched[ni] = (st.size, st.positions)
    return [State(out, axis, st.positions, st.size)]


def _reduce(g: ChannelGraph, group: UnitGroup, ni: int, where: list[int], ins: list[State]):
    """A reduction over axes other than the channel axis: where the channel axis lands."""
    if where != [0]:
        return None
    st, node = ins[0], g.nodes[ni]
    a = attrs(node)
    rank = g.rank(node.input[0])
    if len(node.input) > 1 and node.input[1]:   # axes as an input (ReduceSum 13+, all 18+)
        axes = g.ints(node.input[1])
        if axes is None:
            raise Blocked(f"{node.op_type} '{g.label(ni)}' has computed axes")
    else:
        axes = a.get("axes")
    if not axes:   # all axes, or none with noop_with_empty_axes
        if a.get("noop_with_empty_axes", 0):
            return [State(node.output[0], st.axis, st.positions, st.size)]
        raise Blocked(f"{node.op_type} '{g.label(ni)}' reduces over its channel axis")
    axes = {int(x) % rank for x in axes}
    if st.axis in axes:
        raise Blocked(f"{node.op_type} '{g.label(ni)}' reduces over its channel axis")
    axis = st.axis if a.get("keepdims", 1) else st.axis - sum(1 for x in axes if x < st.axis)
    return [State(node.output[0], axis, st.positions, st.size)]


def _shape(g: ChannelGraph, group: UnitGroup, ni: int, where: list[int], ins: list[State]):
    """Shape of a tensor that carries units: fine when only other dimensions are used (the
    batch size of x.view(x.size(0), -1)), read from it by Gathers of constant indices."""
    if where != [0]:
        return None
    st, node = ins[0], g.nodes[ni]
    a = attrs(node)
    rank = g.rank(node.input[0])
    start, end = (min(max(v + rank if v < 0 else v, 0), rank)
                  for v in (a.get("start", 0), a.get("end", rank)))
    if not start <= st.axis < end:
        return []
    out = node.output[0]
    if out in g.outputs or out in g.inner_refs:
        raise Blocked(f"Shape '{g.label(ni)}' reads its channel count")
    for ri, pos in g.readers.get(out, []):
        reader = g.nodes[ri]
        idx = g.ints(reader.input[1]) if len(reader.input) > 1 else None
        if (reader.op_type != "Gather" or pos != 0 or attrs(reader).get("axis", 0) != 0
                or idx is None or st.axis - start in [i % (end - start) for i in idx]):
            raise Blocked(f"Shape '{g.label(ni)}' reads its channel count")
    return []


def _transpose(g: ChannelGraph, group: UnitGroup, ni: int, where: list[int], ins: list[State]):
    if where != [0]:
        return None
    st, node = ins[0], g.nodes[ni]
    perm = attrs(node).get("perm", list(range(g.rank(node.input[0])))[::-1])
    return [State(node.output[0], list(perm).index(st.axis), st.positions, st.size)]


def _concat(g: ChannelGraph, group: UnitGroup, ni: int, where: list[int], ins: list[State]):
    node = g.nodes[ni]
    out = node.output[0]
    axis = attrs(node).get("axis", 0) % g.rank(out)
    if any(st.axis != axis for st in ins):
        raise Blocked(f"Concat '{g.label(ni)}' stacks its channels with other tensors "
                      "on another axis (coupled)")
    shifted, total = [], 0
    for pos, name in enumerate(node.input):
        if pos in where:
            shifted.append([p + total for p in ins[where.index(pos)].positions])
        d = g.dims(name)[axis]
        if not isinstance(d, int):
            raise Blocked(f"the inputs of Concat '{g.label(ni)}' have unknown sizes")
        total += d
    positions = [np.concatenate(ps) for ps in zip(*shifted)]
    return [State(out, axis, positions, total)]


def _split(g: ChannelGraph, group: UnitGroup, ni: int, where: list[int], ins: list[State]):
    if where != [0]:
        return None
    st, node = ins[0], g.nodes[ni]
    rank = g.rank(node.input[0])
    used = [i for i, o in enumerate(node.output) if o]
    if attrs(node).get("axis", 0) % rank != st.axis:
        return [State(node.output[i], st.axis, st.positions, st.size) for i in used]
    if len(node.input) > 1 and node.input[1] and g.refs(node.input[1]) != 1:
        raise Blocked(f"the sizes of Split '{g.label(ni)}' are shared")
    sizes = [g.dims(o)[st.axis] for o in node.output]
    if not all(isinstance(s, int) for s in sizes):
        raise Blocked(f"the outputs of Split '{g.label(ni)}' have unknown sizes")
    states, start = [], 0
    for k, size in enumerate(sizes):
        inside = [p[(p >= start) & (p < start + size)] - start for p in st.positions]
        group.edits.append(Edit("split", ni, k, size, inside))
        if node.output[k]:
            states.append(State(node.output[k], st.axis, inside, size))
        start += size
    return states


def _slice(g: ChannelGraph, group: UnitGroup, ni: int, where: list[int], ins: list[State]):
    if where != [0]:
        return None
    st, node = ins[0], g.nodes[ni]
    axes = g.ints(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    rank = g.rank(node.input[0])
    if axes is None or st.axis in [x % rank for x in axes]:
        raise Blocked(f"Slice '{g.label(ni)}' may cut its channel axis")
    return [State(node.output[0], st.axis, st.positions, st.size)]


def _depthwise(g: ChannelGraph, group: UnitGroup, ni: int, where: list[int], ins: list[State]):
    """A grouped Conv on the path (a plain one consumes the units): depthwise, its channels go
    with the unit that feeds them."""
    if where != [0]:
        return None
    st, node = ins[0], g.nodes[ni]
    spec = OPS[node.op_type]
    groups = spec.groups(attrs(node))
    if st.axis != 1 or groups != st.size or len(st.positions[0]) != 1:
        raise Blocked(f"grouped Conv '{g.label(ni)}' (group={groups}): removing input "
                      "channels would unbalance its groups")
    weight, bias = node.input[spec.weight], spec.own_bias(node)
    if weight not in g.consts:
        raise Blocked(f"depthwise Conv '{g.label(ni)}' has a computed weight")
    c_out = int(g.consts[weight].dims[0])
    mult = c_out // groups
    positions = [(p[:, None] * mult + np.arange(mult)).ravel() for p in st.positions]
    group.cuts.append(g.own_cut(weight, 0, positions))
    if bias is not None:
        if bias not in g.consts:
            raise Blocked(f"depthwise Conv '{g.label(ni)}' has a computed bias")
        group.cuts.append(g.own_cut(bias, 0, positions))
    group.edits.append(Edit("group", ni, 0, groups, st.positions))
    return [State(node.output[0], 1, positions, c_out)]


PASS_THROUGH: dict[str, Handler] = {
    **dict.fromkeys(UNARY, _unary),
    **dict.fromkeys(ELEMENTWISE, _elementwise),
    **dict.fromkeys(NORMS, _norm),
    **dict.fromkeys(POOLS, _pool),
    **dict.fromkeys(REGROUP, _regroup),
    **dict.fromkeys(REDUCE, _reduce),
    "Shape": _shape,
    "Transpose": _transpose,
    "Concat": _concat,
    "Split": _split,
    "Slice": _slice,
    "Conv": _depthwise,
    "Softmax": _softmax,
    "LogSoftmax": _softmax,
    "MatMul": _batched_matmul,
}
