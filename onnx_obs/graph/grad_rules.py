"""Reverse-mode gradient rules for ONNX operators.

A rule receives the emitter (grad_builder.GradBuilder), the forward node, the name of the gradient
flowing into the node's first output and the indices of the inputs whose gradients are wanted. It
emits ONNX nodes and returns {input index: gradient tensor name}; an index it cannot serve is simply
left out. Every emitted op is valid from opset 11 on.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import onnx

from onnx_obs.graph.grad_builder import GradBuilder, node_attrs

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
