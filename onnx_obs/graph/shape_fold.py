"""Symbolic shape arithmetic for the channel trace: the dims of every tensor (with Reshape targets
that exporters compute from Shape folded into constants where onnx's inference gives up), the
values of small shape tensors, and where a reshape moves an axis."""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_obs.graph.protos import (
    attrs,
    constant_value,
    constants,
    infer_shapes,
    unique_name,
)

_SHAPE_OPS = {"Shape", "Identity", "Cast", "Squeeze", "Unsqueeze", "Reshape", "Gather", "Slice",
              "Concat", "Mul", "Div", "Add", "Sub"}
_FOLD_ROUNDS = 8


class ShapeMath:
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
        node, a = self.nodes[ni], attrs(self.nodes[ni])
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


def _arith(op: str, u, v) -> int | None:
    if not (isinstance(u, int) and isinstance(v, int)):
        return None
    if op == "Div":
        return u // v if v > 0 and u >= 0 else None
    return u * v if op == "Mul" else u + v if op == "Add" else u - v


def tensor_shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Inferred dims of every main-graph tensor: int, dim_param string, or None if unknown.

    onnx's inference gives up on a Reshape whose target is computed from Shape (older exports of
    x.view(x.size(0), -1), x.flatten(2), attention's view(b, t, heads, head_dim), where it makes
    up dimension names) and on everything after it: such targets are folded into
    constants where they resolve (0 where they copy a symbolic dimension of the same position),
    on a copy, and inferred again, until no more resolve.
    """
    shapes = _inferred_shapes(model)
    nodes, consts = list(model.graph.node), constants(model.graph, ints=True)
    folds: dict[int, list[int]] = {}
    for _ in range(_FOLD_ROUNDS):
        math = ShapeMath(nodes, consts, shapes)
        new = {}
        for i, n in enumerate(nodes):
            if (n.op_type == "Reshape" and i not in folds
                    and _unresolved(shapes.get(n.output[0]), shapes.get(n.input[0]))):
                given = math.target(n.input[1])
                if given is None or (attrs(n).get("allowzero", 0) and 0 in given):
                    continue   # allowzero: a literal 0 is a zero-size dimension, not a copy
                target = _constant_target(given, shapes.get(n.input[0]))
                if target is not None:
                    new[i] = target
        if not new:
            break
        folds.update(new)
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        _drop_made_up(copy.graph)
        for i, target in folds.items():
            name = unique_name(copy, f"{nodes[i].output[0]}_target")
            copy.graph.initializer.append(numpy_helper.from_array(np.array(target, np.int64), name))
            copy.graph.node[i].input[1] = name
            del copy.graph.node[i].attribute[:]   # allowzero off: the folded 0s copy (inference only)
        shapes = _inferred_shapes(copy)
    declared = _declared(model.graph)
    if any(dims is None or not _resolved(dims, declared) for dims in shapes.values()):
        for name, dims in _symbolic_shapes(model).items():
            if _resolved(dims, declared) and not _resolved(shapes.get(name), declared):
                shapes[name] = dims
    return shapes


def _declared(graph: onnx.GraphProto) -> set[str]:
    """The dimension names the graph inputs declare."""
    return {d.dim_param for i in graph.input for d in i.type.tensor_type.shape.dim if d.dim_param}


def _resolved(dims: list | None, declared: set[str]) -> bool:
    return dims is not None and all(isinstance(d, int) or d in declared for d in dims)


def _symbolic_shapes(model: onnx.ModelProto) -> dict[str, list]:
    """onnxruntime's symbolic shape inference, which evaluates the shape arithmetic onnx's
    leaves to made-up names (HuggingFace BERT's position ids and attention mask: every tensor
    after them); empty where it fails (custom ops) or sympy, which it needs and onnxruntime does
    not install, is missing (`pip install onnx-obs[shapes]`)."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except ImportError:
        return {}

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    _drop_made_up(copy.graph)
    for t in [t for t in copy.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]:
        # shapes need the dims of such weights, not their data (which onnx would look for
        # relative to where the process runs)
        copy.graph.initializer.remove(t)
        copy.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    quiet = logging.getLogger("onnxruntime.tools.symbolic_shape_infer")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        inferred = SymbolicShapeInference.infer_shapes(copy, auto_merge=True)
    except Exception:  # noqa: BLE001 - any failure: no extra shapes
        return {}
    finally:
        quiet.setLevel(level)
    return _graph_shapes(inferred.graph) if inferred is not None else {}


def _drop_made_up(graph: onnx.GraphProto) -> None:
    """Forget dimension names that no graph input declares (made up by an earlier inference,
    'unk__N'), in value_info and the graph outputs: they would outlive the folds."""
    declared = _declared(graph)
    keep = [vi for vi in graph.value_info
            if all(not d.dim_param or d.dim_param in declared for d in vi.type.tensor_type.shape.dim)]
    del graph.value_info[:]
    graph.value_info.extend(keep)
    for out in graph.output:
        for d in out.type.tensor_type.shape.dim:
            if d.dim_param and d.dim_param not in declared:
                d.ClearField("dim_param")


def _unresolved(dims_out: list | None, dims_in: list | None) -> bool:
    """Whether inference left a Reshape's output unknown: no shape, or dimensions it made up
    (neither numbers nor the input's named dimensions: onnx's 'unk__N' for a computed target)."""
    if dims_out is None:
        return True
    named = {d for d in dims_in or [] if isinstance(d, str)}
    return any(not isinstance(d, int) and d not in named for d in dims_out)


def _constant_target(target: list | None, dims_in: list | None) -> list[int] | None:
    """A Reshape target as constants: a symbolic entry, or a -1 that resolves to the input's
    symbolic dimension at the same position (inference would name it afresh: 'unk__N'), becomes
    0 (copy); None if another symbolic entry is left."""
    if target is None:
        return None
    out = []
    for pos, t in enumerate(target):
        if not isinstance(t, int):
            if dims_in is None or pos >= len(dims_in) or dims_in[pos] != t:
                return None
            t = 0
        out.append(t)
    if -1 in out and dims_in is not None:   # a -1 that stands for the input's own symbolic dim there
        i = out.index(-1)
        if i < len(dims_in) and isinstance(dims_in[i], str) and reshape_dims(dims_in, out)[i] == dims_in[i]:
            out[i] = 0
    return out


def _inferred_shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Dims as inferred (or, where inference fails, as the file declares them)."""
    return _graph_shapes(infer_shapes(model).graph)


def _graph_shapes(g: onnx.GraphProto) -> dict[str, list]:
    shapes = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tt.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                               for d in tt.shape.dim]
    for t in g.initializer:
        shapes[t.name] = list(t.dims)
    for node in g.node:
        value = constant_value(node)
        if value is not None:
            shapes[node.output[0]] = list(value.dims)
    return shapes


def product(dims: list):
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


def reshape_dims(dims_in: list, target: list[int]) -> list:
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
    out[i] = product([left] + syms)
    return out


def regroup(dims_in: list, dims_out: list, axis: int):
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
