"""Reverse-mode gradient rules for ONNX operators, and the node emitter they share.

A rule receives the emitter, the forward node, the name of the gradient flowing into the node's
first output and the indices of the inputs whose gradients are wanted. It emits ONNX nodes and
returns {input index: gradient tensor name}; an index it cannot serve is simply left out.
Every emitted op is valid from opset 11 on; the opset-13 switch of ReduceSum/Unsqueeze axes from
attributes to inputs is handled in the emitter.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_obs.errors import OnnxObsError

Dim = int | str | None  # static size, symbolic name, or unknown
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}


class UnsupportedGradient(OnnxObsError):
    """A node on the differentiated path has no gradient rule (or one its attributes defeat)."""

    def __init__(self, op_type: str, node_name: str, reason: str = "no gradient rule for this operator"):
        self.op_type, self.node_name, self.reason = op_type, node_name, reason
        super().__init__(
            f"cannot differentiate {op_type} node '{node_name}': {reason}; "
            "use finite differences (onnx_obs.graph.perturb) instead"
        )


def inferred_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto.Tensor]:
    """Tensor types of the main graph after shape inference, initializers included."""
    graph = onnx.shape_inference.infer_shapes(model, data_prop=True).graph
    types = {t.name: helper.make_tensor_type_proto(t.data_type, t.dims).tensor_type for t in graph.initializer}
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type
    return types


def node_attrs(node: onnx.NodeProto) -> dict:
    """A node's attributes as Python values (strings decoded)."""
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def subgraph_names(node: onnx.NodeProto) -> set[str]:
    """Every tensor name a node's subgraphs (If/Loop/Scan bodies) read, at any depth."""
    names: set[str] = set()
    for a in node.attribute:
        for g in [a.g] if a.HasField("g") else list(a.graphs):
            for n in g.node:
                names.update(n.input)
                names |= subgraph_names(n)
    return names


def _constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and len(n.attribute) == 1:
            a = n.attribute[0]
            if a.name == "value":
                values[n.output[0]] = numpy_helper.to_array(a.t)
            elif a.name in ("value_int", "value_ints"):
                values[n.output[0]] = np.array(helper.get_attribute_value(a), dtype=np.int64)
            elif a.name in ("value_float", "value_floats"):
                values[n.output[0]] = np.array(helper.get_attribute_value(a), dtype=np.float32)
    return values


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {vi.name for vi in [*graph.input, *graph.output, *graph.value_info]}
    names |= {t.name for t in graph.initializer}
    for n in graph.node:
        names.update(n.input)
        names.update(n.output)
        for a in n.attribute:
            for g in [a.g] if a.HasField("g") else list(a.graphs):
                names |= _all_names(g)
    return names


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise OnnxObsError("the model imports no default-domain (ai.onnx) opset; it is not a standard ONNX model")


class GradBuilder:
    """Emits gradient nodes into a list, knowing the forward graph's types and opset."""

    def __init__(self, model: onnx.ModelProto):
        self.opset = default_opset(model)
        self.types = inferred_types(model)
        self.consts = _constant_values(model.graph)
        self.nodes: list[onnx.NodeProto] = []
        self.used = _all_names(model.graph)
        self.current: onnx.NodeProto | None = None  # the forward node whose rule is running

    # --- forward-graph facts --------------------------------------------------------------
    def fail(self, reason: str) -> UnsupportedGradient:
        node = self.current
        return UnsupportedGradient(node.op_type, node.name or node.output[0], reason)

    def dtype(self, name: str) -> int:
        t = self.types.get(name)
        if t is None or not t.elem_type:
            raise self.fail(f"shape inference gave no type for '{name}'")
        return t.elem_type

    def np_dtype(self, name: str) -> np.dtype:
        return np.dtype(helper.tensor_dtype_to_np_dtype(self.dtype(name)))

    def is_float(self, name: str) -> bool:
        """Could the tensor carry a gradient? Unknown types count as yes, so no path is dropped."""
        t = self.types.get(name)
        return t is None or not t.elem_type or t.elem_type in FLOAT_TYPES

    def dims(self, name: str) -> list[Dim]:
        t = self.types.get(name)
        if t is None or not t.HasField("shape"):
            raise self.fail(f"shape inference gave no rank for '{name}'")
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]

    def static(self, dims: Sequence[Dim], what: str) -> list[int]:
        if not all(isinstance(d, int) for d in dims):
            raise self.fail(f"{what} must be static, got {list(dims)}")
        return list(dims)

    def const_value(self, name: str) -> np.ndarray | None:
        return self.consts.get(name)

    # --- emission ------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        name, k = hint, 0
        while name in self.used:
            k += 1
            name = f"{hint}_{k}"
        self.used.add(name)
        return name

    def prefix(self) -> str:
        node = self.current
        return f"{node.name or node.output[0]}__grad" if node is not None else "grad"

    def node(self, op: str, inputs: Iterable[str], n_out: int = 1, **attrs) -> str | list[str]:
        outs = [self.fresh(f"{self.prefix()}/{op}") for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=outs[0], **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value: np.ndarray) -> str:
        # A Constant node, not an initializer: IR < 4 would require initializers among the inputs.
        return self.node("Constant", [], value=numpy_helper.from_array(np.asarray(value)))

    def ints(self, values: Sequence[int]) -> str:
        return self.const(np.array(values, dtype=np.int64))

    def scalar(self, value: float, like: str) -> str:
        """A 0-d constant with the element type of tensor `like`."""
        return self.const(np.array(value, dtype=self.np_dtype(like)))

    def reduce_sum(self, x: str, axes: Sequence[int], keepdims: int) -> str:
        if self.opset >= 13:
            return self.node("ReduceSum", [x, self.ints(axes)], keepdims=keepdims)
        return self.node("ReduceSum", [x], axes=list(axes), keepdims=keepdims)

    def unsqueeze(self, x: str, axes: Sequence[int]) -> str:
        if self.opset >= 13:
            return self.node("Unsqueeze", [x, self.ints(axes)])
        return self.node("Unsqueeze", [x], axes=list(axes))

    def filled_like(self, x: str, value: float, like: str | None = None) -> str:
        """A tensor of x's runtime shape and the element type of `like` (default x), filled with `value`."""
        fill = numpy_helper.from_array(np.array([value], dtype=self.np_dtype(like or x)))
        return self.node("ConstantOfShape", [self.node("Shape", [x])], value=fill)

    def masked(self, cond: str, g: str, like: str) -> str:
        """g where cond holds, zero elsewhere."""
        return self.node("Where", [cond, g, self.scalar(0.0, like)])

    def sum_to(self, g: str, target: str, g_dims: list[Dim]) -> str:
        """Undo broadcasting: sum g (shaped g_dims) down to the shape of tensor `target`."""
        t_dims = self.dims(target)
        lead = len(g_dims) - len(t_dims)
        if lead:
            g = self.reduce_sum(g, range(lead), keepdims=0)
        axes, ambiguous = [], False
        for i, (td, gd) in enumerate(zip(t_dims, g_dims[lead:])):
            if td == 1 and gd != 1:
                axes.append(i)
            elif not isinstance(td, int) and td != gd:
                ambiguous = True  # td may be 1 at runtime while gd is not
        if ambiguous:
            return self._sum_to_runtime(g, target)
        return self.reduce_sum(g, axes, keepdims=1) if axes else g

    def _sum_to_runtime(self, g: str, target: str) -> str:
        # Reduce the axes where the target is 1 and g is not, found at runtime.
        if self.opset < 13:
            raise self.fail(
                f"broadcast of '{target}' is not known statically and opset < 13 cannot reduce dynamic axes"
            )
        one = self.ints([1])
        t_is_one = self.node("Equal", [self.node("Shape", [target]), one])
        g_not_one = self.node("Not", [self.node("Equal", [self.node("Shape", [g]), one])])
        where = self.node("NonZero", [self.node("And", [t_is_one, g_not_one])])
        axes = self.node("Reshape", [where, self.ints([-1])])
        return self.node("ReduceSum", [g, axes], keepdims=1, noop_with_empty_axes=1)


Rule = Callable[[GradBuilder, onnx.NodeProto, str, set[int]], dict[int, str]]


# --- linear maps -----------------------------------------------------------------------------
def _gemm(b: GradBuilder, node: onnx.NodeProto, gy: str, wanted: set[int]) -> dict[int, str]:
    at = node_attrs(node)
    alpha, beta = at.get("alpha", 1.0), at.get("beta", 1.0)
    ta, tb = at.get("transA", 0), at.get("transB", 0)
    a, w = node.input[:2]
    grads = {}
    # With A' = op(A), B' = op(B): dA' = alpha gY B'^T, dB' = alpha A'^T gY; a transposed operand
    # takes the transposed gradient, which Gemm's own flags express without Transpose nodes.
    if 0 in wanted:
        grads[0] = (
            b.node("Gemm", [w, gy], alpha=alpha, transA=tb, transB=1)
            if ta
            else b.node("Gemm", [gy, w], alpha=alpha, transB=1 - tb)
        )
    if 1 in wanted:
        grads[1] = (
            b.node("Gemm", [gy, a], alpha=alpha, transA=1, transB=ta)
            if tb
            else b.node("Gemm", [a, gy], alpha=alpha, transA=1 - ta)
        )
    if 2 in wanted:
        gc = gy if beta == 1.0 else b.node("Mul", [gy, b.scalar(beta, node.output[0])])
        grads[2] = b.sum_to(gc, node.input[2], b.dims(node.output[0]))
    return grads


def _swap_last2(b: GradBuilder, x: str, rank: int) -> str:
    return b.node("Transpose", [x], perm=[*range(rank - 2), rank - 1, rank - 2])


def _matmul(b: GradBuilder, node: onnx.NodeProto, gy: str, wanted: set[int]) -> dict[int, str]:
    a, w = node.input[:2]
    a_dims, w_dims = b.dims(a), b.dims(w)
    # Promote 1-D operands to matrices as numpy does ([K] -> [1, K] for A, [K, 1] for B), so the
    # batched formulas dA = gY B^T, dB = A^T gY cover every rank; broadcast batch axes are summed.
    g_axes = ([-2] if len(a_dims) == 1 else []) + ([-1] if len(w_dims) == 1 else [])
    g = b.unsqueeze(gy, g_axes) if g_axes else gy
    g_dims = b.dims(node.output[0]) + [1] * (len(w_dims) == 1)
    if len(a_dims) == 1:
        g_dims = [*g_dims[:-1], 1, g_dims[-1]]
    batch = g_dims[:-2]
    grads = {}
    if 0 in wanted:
        wm = b.unsqueeze(w, [-1]) if len(w_dims) == 1 else w
        da = b.node("MatMul", [g, _swap_last2(b, wm, max(len(w_dims), 2))])
        grads[0] = b.sum_to(da, a, [*batch, g_dims[-2], a_dims[-1]])
    if 1 in wanted:
        am = b.unsqueeze(a, [0]) if len(a_dims) == 1 else a
        dw = b.node("MatMul", [_swap_last2(b, am, max(len(a_dims), 2)), g])
        if len(w_dims) == 1:
            dw = b.reduce_sum(dw, [-1], keepdims=0)
            grads[1] = b.sum_to(dw, w, [*batch, w_dims[0]])
        else:
            grads[1] = b.sum_to(dw, w, [*batch, *w_dims[-2:]])
    return grads


def _window_geometry(b: GradBuilder, node: onnx.NodeProto, kernel: list[int]) -> tuple[list[int], ...]:
    """Strides, dilations, explicit pads and the ConvTranspose output_padding that maps a sliding-
    window op's output gradient back onto its input."""
    at, n = node_attrs(node), len(kernel)
    strides, dilations = at.get("strides", [1] * n), at.get("dilations", [1] * n)
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    spatial = b.dims(node.input[0])[2:]
    auto_pad = at.get("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        sizes = b.static(spatial, "spatial input size under auto_pad SAME")
        total = [max(0, (-(-size // s) - 1) * s + e - size) for size, s, e in zip(sizes, strides, extent)]
        small, large = [t // 2 for t in total], [t - t // 2 for t in total]
        pads = small + large if auto_pad == "SAME_UPPER" else large + small
    elif auto_pad == "VALID":
        pads = [0] * (2 * n)
    else:
        pads = at.get("pads", [0] * (2 * n))
    # When (size + pads - extent) is not a multiple of the stride, the last `rest` inputs are in no
    # window; ConvTranspose restores them (with zero gradient) through output_padding.
    out_pad = []
    for i, s in enumerate(strides):
        if s == 1:
            out_pad.append(0)
        else:
            size = b.static([spatial[i]], "spatial input size with stride > 1")[0]
            out_pad.append((size + pads[i] + pads[n + i] - extent[i]) % s)
    return strides, dilations, pads, out_pad


def _conv_transpose(b: GradBuilder, g: str, w: str, node: onnx.NodeProto, kernel: list[int], group: int) -> str:
    strides, dilations, pads, out_pad = _window_geometry(b, node, kernel)
    return b.node(
        "ConvTranspose", [g, w], kernel_shape=kernel, strides=strides, dilations=dilations,
        pads=pads, output_padding=out_pad, group=group,
    )


def _conv(b: GradBuilder, node: onnx.NodeProto, gy: str, wanted: set[int]) -> dict[int, str]:
    at = node_attrs(node)
    x, w = node.input[:2]
    kernel = at.get("kernel_shape") or b.static(b.dims(w)[2:], "Conv kernel shape")
    grads = {}
    if 0 in wanted:
        # The adjoint of a convolution is the transposed convolution with the same weights, whose
        # [M, C/group, k...] layout is exactly ConvTranspose's [in, out/group, k...].
        grads[0] = _conv_transpose(b, gy, w, node, kernel, at.get("group", 1))
    if 2 in wanted:
        grads[2] = b.reduce_sum(gy, [0, *range(2, len(b.dims(x)))], keepdims=0)
    return grads


def _average_pool(b: GradBuilder, node: onnx.NodeProto, gy: str, wanted: set[int]) -> dict[int, str]:
    at = node_attrs(node)
    x, kernel = node.input[0], at["kernel_shape"]
    _, _, pads, out_pad = _window_geometry(b, node, kernel)
    if at.get("ceil_mode", 0) and any(out_pad):
        raise b.fail("ceil_mode adds partial windows")
    channels = b.static(b.dims(x)[1:2], "channel count")[0]
    size = int(np.prod(kernel))
    if at.get("count_include_pad", 0) or not any(pads):
        scaled = b.node("Mul", [gy, b.scalar(1.0 / size, x)])
    else:
        # Windows divide by their count of non-padding inputs; pooling ones with padding counted
        # gives count / size.
        fraction = b.node("AveragePool", [b.filled_like(x, 1.0)], **{**at, "count_include_pad": 1})
        scaled = b.node("Div", [gy, b.node("Mul", [fraction, b.scalar(float(size), x)])])
    # Each input receives the scaled gradients of the windows covering it: a depthwise ConvTranspose
    # with an all-ones kernel.
    ones = b.const(np.ones([channels, 1, *kernel], dtype=b.np_dtype(x)))
    return {0: _conv_transpose(b, scaled, ones, node, kernel, channels)}


def _global_average_pool(b: GradBuilder, node: onnx.NodeProto, gy: str, wanted: set[int]) -> dict[int, str]:
    x, y = node.input[0], node.output[0]
    to = b.dtype(x)
    # Each output is the mean of Size(x) / Size(y) inputs.
    ratio = b.node("Div", [b.node("Cast", [b.node("Size", [y])], to=to), b.node("Cast", [b.node("Size", [x])], to=to)])
    return {0: b.node("Mul", [b.node("Expand", [gy, b.node("Shape", [x])]), ratio])}


def _max_pool(b: GradBuilder, node: onnx.NodeProto, gy: str, wanted: set[int]) -> dict[int, str]:
    at = node_attrs(node)
    x, kernel = node.input[0], at["kernel_shape"]
    if at.get("storage_order", 0):
        raise b.fail("column-major storage_order indices")
    n = len(kernel)
    strides, dilations = at.get("strides", [1] * n), at.get("dilations", [1] * n)
    # Indices are flat positions in x (batch and channel included): scatter each window's gradient
    # onto its argmax.
    if len(node.output) > 1 and node.output[1]:
        indices = node.output[1]
    else:
        indices = b.node("MaxPool", [x], n_out=2, **at)[1]
    # Windows `spacing` = ceil(extent / stride) positions apart never overlap, so each residue class
    # of window positions scatters onto distinct inputs; adding the classes sums where windows
    # share an argmax, with no need for ScatterElements' opset-16 reduction.
    spacing = [-(-((k - 1) * d + 1) // s) for k, s, d in zip(kernel, strides, dilations)]
    flat = b.ints([-1])
    zeros = b.filled_like(b.node("Reshape", [x, flat]), 0.0, like=x)
    total = None
    for offset in itertools.product(*(range(g) for g in spacing)):
        part_g, part_i = gy, indices
        if any(g > 1 for g in spacing):
            ends = b.ints([np.iinfo(np.int64).max] * n)
            window = [b.ints(offset), ends, b.ints(range(2, 2 + n)), b.ints(spacing)]
            part_g, part_i = b.node("Slice", [gy, *window]), b.node("Slice", [indices, *window])
        updates, positions = b.node("Reshape", [part_g, flat]), b.node("Reshape", [part_i, flat])
        part = b.node("ScatterElements", [zeros, positions, updates], axis=0)
        total = part if total is None else b.node("Add", [total, part])
    return {0: b.node("Reshape", [total, b.node("Shape", [x])])}


def _batch_norm(b: GradBuilder, node: onnx.NodeProto, gy: str, wanted: set[int]) -> dict[int, str]:
    at = node_attrs(node)
    if at.get("training_mode", 0):
        raise b.fail("training_mode=1 normalizes with batch statistics")
    x, scale, _, _, var = node.input[:5]
    # Inference mode is affine per channel: dX = gY * scale / sqrt(var + epsilon).
    std = b.node("Sqrt", [b.node("Add", [var, b.scalar(at.get("epsilon", 1e-5), var)])])
    factor = b.node("Div", [scale, std])
    if b.dtype(scale) != b.dtype(x):
        factor = b.node("Cast", [factor], to=b.dtype(x))
    factor = b.node("Reshape", [factor, b.ints([-1] + [1] * (len(b.dims(x)) - 2))])
    return {0: b.node("Mul", [gy, factor])}


# --- elementwise arithmetic with broadcasting -------------------------------------------------
def _add(b: GradBuilder, node: onnx.NodeProto, gy: str, wanted: set[int]) -> dict[int, str]:
    """Add and the n-ary Sum: every input receives the gradient, summed over its broadcast axes."""
    out = b.dims(node.output[0])
    return {i: b.sum_to(gy, node.input[i], out) for i in wanted}


def _sub(b: GradBuilder, node: onnx.NodeProto, gy: str, wanted: set[int]) -> dict[int, str]:
    out = b.dims(node.output[0])
    grads = {}
    if 0 in wanted:
        grads[0] = b.sum_to(gy, node.input[0], out)
    if 1 in wanted:
        grads[1] = b.sum_to(b.node("Neg", [gy]), node.input[1], out)
    return grads


def _mul(b: GradBuilder, node: onnx.NodeProto, gy: str, wanted: set[int]) -> dict[int, str]:
    out = b.dims(node.output[0])
    return {i: b.sum_to(b.node("Mul", [gy, node.input[1 - i]]), node.input[i], out) for i in wanted}


def _div(b: GradBuilder, node: onnx.NodeProto, gy: str, wanted: set[int]) -> dict[int, str]:
    a, d = node.input[:2]
    out = b.dims(node.output[0])
    grads = {}
    if 0 in wanted:
        grads[0] = b.sum_to(b.node("Div", [gy, d]), a, out)
    if 1 in wanted:
        # d(a/d)/dd = -(a/d)/d = -y/d
        gd = b.node("Neg", [b.node("Div", [b.node("Mul", [gy, node.output[0]]), d])])
        grads[1] = b.sum_to(gd, d, out)
    return grads


# --- activations ------------------------------------------------------------------------------
def _relu(b: GradBuilder, node: onnx.NodeProto, gy: str, wanted: set[int]) -> dict[int, str]:
    y = node.output[0]
    return {0: b.masked(b.node("Greater", [y, b.scalar(0.0, y)]), gy, y)}


def _leaky_relu(b: GradBuilder, node: onnx.NodeProto, gy: str, wanted: set[int]) -> dict[int, str]:
    x = node.input[0]
    slope = b.node("Mul", [gy, b.scalar(node_attrs(node).get("alpha", 0.01), x)])
    return {0: b.node("Where", [b.node("Greater", [x, b.scalar(0.0, x)]), gy, slope])}


def _sigmoid(b: GradBuilder, node: onnx.NodeProto, gy: str, wanted: set[int]) -> dict[int, str]:
    y = node.output[0]
    slope = b.node("Mul", [y, b.node("Sub", [b.scalar(1.0, y), y])])
    return {0: b.node("Mul", [gy, slope])}


def _tanh(b: GradBuilder, node: onnx.NodeProto, gy: str, wanted: set[int]) -> dict[int, str]:
    y = node.output[0]
    slope = b.node("Sub", [b.scalar(1.0, y), b.node("Mul", [y, y])])
    return {0: b.node("Mul", [gy, slope])}


def _clip(b: GradBuilder, node: onnx.NodeProto, gy: str, wanted: set[int]) -> dict[int, str]:
    x = node.input[0]
    bounds = list(node.input[1:3]) + [""] * (3 - len(node.input))
    # Opset >= 11 takes min/max as optional inputs; the gradient passes where min <= x <= max.
    inside = [b.node("Not", [b.node(op, [x, bound])]) for op, bound in zip(("Less", "Greater"), bounds) if bound]
    if not inside:
        return {0: gy}
    cond = inside[0] if len(inside) == 1 else b.node("And", inside)
    return {0: b.masked(cond, gy, x)}


def _hard_sigmoid(b: GradBuilder, node: onnx.NodeProto, gy: str, wanted: set[int]) -> dict[int, str]:
    y = node.output[0]
    alpha = node_attrs(node).get("alpha", 0.2)
    linear = b.node("And", [b.node("Greater", [y, b.scalar(0.0, y)]), b.node("Less", [y, b.scalar(1.0, y)])])
    return {0: b.masked(linear, b.node("Mul", [gy, b.scalar(alpha, y)]), y)}


def _softmax_axes(b: GradBuilder, node: onnx.NodeProto) -> list[int]:
    rank = len(b.dims(node.input[0]))
    if b.opset >= 13:
        return [node_attrs(node).get("axis", -1) % rank]
    # Before opset 13 the input is coerced to 2-D at `axis`: normalization runs over axes [axis, rank).
    return list(range(node_attrs(node).get("axis", 1) % rank, rank))


def _softmax(b: GradBuilder, node: onnx.NodeProto, gy: str, wanted: set[int]) -> dict[int, str]:
    y = node.output[0]
    # dX = Y * (gY - sum(gY * Y)) over the normalized axes.
    dot = b.reduce_sum(b.node("Mul", [gy, y]), _softmax_axes(b, node), keepdims=1)
    return {0: b.node("Mul", [y, b.node("Sub", [gy, dot])])}


def _log_softmax(b: GradBuilder, node: onnx.NodeProto, gy: str, wanted: set[int]) -> dict[int, str]:
    y = node.output[0]
    # dX = gY - softmax(X) * sum(gY) over the normalized axes, with softmax(X) = exp(Y).
    total = b.reduce_sum(gy, _softmax_axes(b, node), keepdims=1)
    return {0: b.node("Sub", [gy, b.node("Mul", [b.node("Exp", [y]), total])])}


# --- data movement ----------------------------------------------------------------------------
def _identity(b: GradBuilder, node: onnx.NodeProto, gy: str, wanted: set[int]) -> dict[int, str]:
    return {0: gy}


def _dropout(b: GradBuilder, node: onnx.NodeProto, gy: str, wanted: set[int]) -> dict[int, str]:
    if len(node.input) > 2 and node.input[2]:
        training = b.const_value(node.input[2])
        if training is None or bool(training):
            raise b.fail("training_mode is not a constant false")
    return {0: gy}


def _reshape_back(b: GradBuilder, node: onnx.NodeProto, gy: str, wanted: set[int]) -> dict[int, str]:
    """Reshape, Flatten, Squeeze, Unsqueeze: same elements, so reshape the gradient back."""
    return {0: b.node("Reshape", [gy, b.node("Shape", [node.input[0]])])}


def _transpose(b: GradBuilder, node: onnx.NodeProto, gy: str, wanted: set[int]) -> dict[int, str]:
    perm = node_attrs(node).get("perm")
    if perm is None:  # the default reversal is its own inverse
        return {0: b.node("Transpose", [gy])}
    return {0: b.node("Transpose", [gy], perm=[int(i) for i in np.argsort(perm)])}


def _concat(b: GradBuilder, node: onnx.NodeProto, gy: str, wanted: set[int]) -> dict[int, str]:
    axis = node_attrs(node)["axis"] % len(b.dims(node.output[0]))
    axes, begin, grads = b.ints([axis]), b.ints([0]), {}
    # Slice each input's block out of the gradient; block sizes are read at runtime.
    for i, x in enumerate(node.input):
        size = b.node("Slice", [b.node("Shape", [x]), b.ints([axis]), b.ints([axis + 1])])
        end = b.node("Add", [begin, size])
        if i in wanted:
            grads[i] = b.node("Slice", [gy, begin, end, axes])
        begin = end
    return grads


def _gather(b: GradBuilder, node: onnx.NodeProto, gy: str, wanted: set[int]) -> dict[int, str]:
    x, idx_name = node.input[:2]
    indices = b.const_value(idx_name)
    if indices is None:
        raise b.fail("indices are not constant")
    dims = b.dims(x)
    axis = node_attrs(node).get("axis", 0) % len(dims)
    size = b.static([dims[axis]], "gathered axis")[0]
    k, post = indices.ndim, len(dims) - axis - 1
    # gY = [pre, idx..., post]. Move idx axes last, flatten them to q, and multiply by the constant
    # one-hot [q, size] matrix: a scatter-add of the gathered rows back to their source positions.
    perm = [*range(axis), *range(axis + k, axis + k + post), *range(axis, axis + k)]
    moved = b.node("Transpose", [gy], perm=perm)
    flat = b.node("Reshape", [moved, b.ints([0] * (axis + post) + [-1])])
    one_hot = np.eye(size, dtype=b.np_dtype(x))[indices.reshape(-1) % size]
    summed = b.node("MatMul", [flat, b.const(one_hot)])
    back = [*range(axis), axis + post, *range(axis, axis + post)]
    return {0: b.node("Transpose", [summed], perm=back)}


RULES: dict[str, Rule] = {
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Conv": _conv,
    "Add": _add,
    "Sum": _add,
    "Sub": _sub,
    "Mul": _mul,
    "Div": _div,
    "Relu": _relu,
    "LeakyRelu": _leaky_relu,
    "Sigmoid": _sigmoid,
    "Tanh": _tanh,
    "Softmax": _softmax,
    "LogSoftmax": _log_softmax,
    "Clip": _clip,
    "HardSigmoid": _hard_sigmoid,
    "BatchNormalization": _batch_norm,
    "MaxPool": _max_pool,
    "AveragePool": _average_pool,
    "GlobalAveragePool": _global_average_pool,
    "Flatten": _reshape_back,
    "Reshape": _reshape_back,
    "Squeeze": _reshape_back,
    "Unsqueeze": _reshape_back,
    "Transpose": _transpose,
    "Concat": _concat,
    "Gather": _gather,
    "Identity": _identity,
    "Dropout": _dropout,
}
