"""The op registry (graph/ops.py) entry by entry, against onnxruntime and plain numpy.

The 2-D view of each op is applied to the node's input by an independent numpy formula (a
product, sliding windows for Conv, a scatter for ConvTranspose) and must give what onnxruntime
computes; MACs must match a direct count from onnxruntime's output shapes; the bias that
find_bias finds must be exactly what the output loses when it is zeroed.
"""

from __future__ import annotations

import numpy as np
import pytest
from graphs import (
    conv_model,
    gemm_model,
    init,
    make_model,
    matmul_model,
    randn,
    run,
    vi,
)
from numpy.lib.stride_tricks import sliding_window_view
from onnx import helper, numpy_helper

from onnx_obs.graph.ops import OPS, ConvGeometry, find_bias, input_axis, unit_axis
from onnx_obs.graph.protos import attrs, readers
from onnx_obs.graph.sites import find_sites, read_array


def only_site(model):
    sites, skipped = find_sites(model)
    assert len(sites) == 1, (sites, skipped)
    return sites[0]


def view(site, weight: np.ndarray) -> np.ndarray:
    """The site's 2-D view through the registry entry (the weight as stored, perm applied)."""
    w = weight.transpose(site.perm) if site.perm else weight
    return site.spec.to_matrix(w, site.layout, site.groups).astype(np.float64)


def round_trips(site, weight: np.ndarray) -> None:
    w = weight.transpose(site.perm) if site.perm else weight
    m = site.spec.to_matrix(w, site.layout, site.groups)
    assert m.shape == site.spec.matrix_shape(site.op_shape, site.layout, site.groups)
    assert np.array_equal(site.spec.from_matrix(m, site.op_shape, site.layout, site.groups), w)


def with_zeroed(model, name: str, index=...):
    """A copy of the model with `name` (or its entries at `index`) set to zero."""
    m = model.__class__()
    m.CopyFrom(model)
    t = next(t for t in m.graph.initializer if t.name == name)
    a = numpy_helper.to_array(t).copy()
    a[index] = 0
    t.CopyFrom(numpy_helper.from_array(a, name))
    return m


# ---------------------------------------------------------------- 2-D views

@pytest.mark.parametrize("weight_left", [False, True])
@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_view_is_the_product(trans_a, trans_b, weight_left):
    model, feeds = gemm_model(trans_a=trans_a, trans_b=trans_b, weight_left=weight_left)
    site = only_site(model)
    w = read_array(site)
    round_trips(site, w)
    x = feeds["x"].astype(np.float64)
    # Y = A' B': the activation's input vectors are rows of A' (weight right) or columns of B'
    if weight_left:
        y = view(site, w) @ (x.T if trans_b else x)
    else:
        y = (x.T if trans_a else x) @ view(site, w).T
    np.testing.assert_allclose(y, run(model, feeds)["y"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x_shape, w_shape, left", [((3, 6), (6, 4), False), ((2, 3, 6), (6, 4), False),
                                                    ((6, 3), (4, 6), True), ((2, 6, 3), (4, 6), True)])
def test_matmul_view_is_the_product(x_shape, w_shape, left):
    model, feeds = matmul_model(x_shape=x_shape, w_shape=w_shape, weight_left=left)
    site = only_site(model)
    w = read_array(site)
    round_trips(site, w)
    x = feeds["x"].astype(np.float64)
    y = view(site, w) @ x if left else x @ view(site, w).T
    np.testing.assert_allclose(y, run(model, feeds)["y"], rtol=1e-5, atol=1e-5)


def conv_by_windows(x: np.ndarray, m: np.ndarray, groups: int, kernel: tuple) -> np.ndarray:
    """A valid, stride-1 2-D convolution from the 2-D view: row o, column (c, tap) of group g."""
    cin_g, rows_g = x.shape[1] // groups, m.shape[0] // groups
    out = []
    for g in range(groups):
        xg = x[:, g * cin_g:(g + 1) * cin_g]
        win = sliding_window_view(xg, kernel, axis=(2, 3))              # N, c, H', W', kh, kw
        cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(*win.shape[:1], *win.shape[2:4], -1)
        out.append(np.einsum("nhwk,ok->nohw", cols, m[g * rows_g:(g + 1) * rows_g]))
    return np.concatenate(out, axis=1)


@pytest.mark.parametrize("group, c_in, c_out", [(1, 4, 6), (2, 4, 6), (4, 4, 8)])
def test_conv_view_is_the_convolution(group, c_in, c_out):
    model, feeds = conv_model(c_in=c_in, c_out=c_out, group=group, kernel=3, spatial=6)
    site = only_site(model)
    w = read_array(site)
    round_trips(site, w)
    m = view(site, w)
    assert m.shape == (c_out, c_in // group * 9)
    y = conv_by_windows(feeds["x"].astype(np.float64), m, group, (3, 3))
    np.testing.assert_allclose(y, run(model, feeds)["y"], rtol=1e-4, atol=1e-4)


def conv_transpose_by_scatter(x: np.ndarray, m: np.ndarray, groups: int, kernel: tuple,
                              stride: int) -> np.ndarray:
    """ConvTranspose (no padding) from the 2-D view: input channel c of group g adds its tap k
    weights, row o of the group's rows, at output position stride * position + k."""
    n, cin, h, w = x.shape
    kh, kw = kernel
    cin_g, rows_g = cin // groups, m.shape[0] // groups
    y = np.zeros((n, m.shape[0], (h - 1) * stride + kh, (w - 1) * stride + kw))
    for g in range(groups):
        rows = slice(g * rows_g, (g + 1) * rows_g)
        for c in range(cin_g):
            for a in range(kh):
                for b in range(kw):
                    weights = m[rows, c * kh * kw + a * kw + b]
                    y[:, rows, a:a + stride * h:stride, b:b + stride * w:stride] += np.einsum(
                        "nhw,o->nohw", x[:, g * cin_g + c], weights)
    return y


@pytest.mark.parametrize("group, stride", [(1, 1), (1, 2), (2, 2)])
def test_conv_transpose_view_is_the_transposed_convolution(group, stride):
    model, feeds = conv_model(c_in=4, c_out=6, group=group, kernel=3, spatial=4, transpose=True,
                              strides=[stride, stride])
    site = only_site(model)
    w = read_array(site)
    round_trips(site, w)
    m = view(site, w)
    assert m.shape == (6, 4 // group * 9)
    y = conv_transpose_by_scatter(feeds["x"].astype(np.float64), m, group, (3, 3), stride)
    np.testing.assert_allclose(y, run(model, feeds)["y"], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- axes

FORMS = {
    "gemm": lambda: gemm_model(trans_b=1),
    "gemm_left": lambda: gemm_model(trans_a=1, weight_left=True),
    "matmul": lambda: matmul_model(x_shape=(2, 3, 6)),
    "conv": lambda: conv_model(c_in=3, c_out=4, kernel=3, spatial=5),
    "conv_transpose": lambda: conv_model(c_in=3, c_out=4, kernel=2, spatial=3, transpose=True),
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_channel_axes_hold_units_and_inputs(form):
    model, feeds = FORMS[form]()
    site = only_site(model)
    node = model.graph.node[0]
    use = site.uses[0]
    y = run(model, feeds)["y"]
    y_axis = unit_axis(site.spec.units(node, use.activation), y.ndim)
    x_axis = input_axis(use.samples, feeds["x"].ndim)
    rows, cols = site.matrix_shape
    assert y.shape[y_axis] == rows
    assert feeds["x"].shape[x_axis] * site.spec.taps(site.op_shape) == cols
    # Zeroing a unit's slice of the weight zeroes that unit of the output, nothing else.
    out = site.channel_axis("out")
    u = rows // 2
    index = (slice(None),) * out + (u,)
    got = run(with_zeroed(model, site.tensor_name, index), feeds)["y"]
    want = y.copy()
    want[(slice(None),) * y_axis + (u,)] = 0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Zeroing an input's slice of the weight is zeroing that input channel of the activation.
    c = feeds["x"].shape[x_axis] // 2
    index = (slice(None),) * site.channel_axis("in") + (c,)
    x = feeds["x"].copy()
    x[(slice(None),) * x_axis + (c,)] = 0
    got = run(with_zeroed(model, site.tensor_name, index), feeds)["y"]
    np.testing.assert_allclose(got, run(model, {"x": x})["y"], rtol=1e-5, atol=1e-5)


def test_channel_axes_follow_a_transposed_weight():
    # W stored [in, out] and transposed to the [out, in] that Gemm(transB=1) reads.
    w = randn([6, 4])
    nodes = [helper.make_node("Transpose", ["Wt"], ["W"], perm=[1, 0]),
             helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)]
    model = make_model(nodes, [vi("x", shape=[3, 6])], [vi("y", shape=[3, 4])], [init("Wt", w)])
    site = only_site(model)
    assert site.perm == (1, 0)
    assert (site.channel_axis("out"), site.channel_axis("in")) == (1, 0)
    round_trips(site, w)
    x = randn([3, 6], 1)
    np.testing.assert_allclose(x @ view(site, w).T, run(model, {"x": x})["y"], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- MACs and geometry

def test_macs_match_a_direct_count():
    cases = [(gemm_model(m=5, k=6, n=4), lambda x, y: 5 * 6 * 4),
             (gemm_model(m=5, k=6, n=4, trans_a=1, weight_left=True), lambda x, y: 5 * 6 * 4),
             (matmul_model(x_shape=(2, 3, 6), w_shape=(6, 4)), lambda x, y: 2 * 3 * 6 * 4),
             (conv_model(c_in=4, c_out=6, group=2, kernel=3, spatial=7, pads=[1, 1, 1, 1], strides=[2, 2]),
              lambda x, y: y.shape[0] * 6 * y.shape[2] * y.shape[3] * (4 // 2) * 9),
             (conv_model(c_in=4, c_out=6, kernel=2, spatial=3, transpose=True, strides=[2, 2]),
              lambda x, y: x.shape[0] * 4 * x.shape[2] * x.shape[3] * 6 * 4)]
    for (model, feeds), count in cases:
        node = model.graph.node[0]
        x, y = feeds["x"], run(model, feeds)["y"]
        w = [int(d) for d in model.graph.initializer[0].dims]
        shapes = [list(x.shape), w] if node.input[1] == "W" else [w, list(x.shape)]
        assert OPS[node.op_type].macs(attrs(node), *shapes, list(y.shape)) == count(x, y)


@pytest.mark.parametrize("kw", [{}, {"strides": [2, 1], "pads": [1, 0, 2, 1], "dilations": [1, 2]},
                                {"auto_pad": "SAME_UPPER", "strides": [2, 2]}])
def test_conv_geometry_gives_the_output_size(kw):
    model, feeds = conv_model(c_in=2, c_out=4, kernel=3, spatial=8, **kw)
    site = only_site(model)
    g = site.spec.geometry(site.uses[0].attrs, site.op_shape)
    assert g == ConvGeometry.from_attrs(attrs(model.graph.node[0]), (3, 3))
    assert OPS["Gemm"].geometry({}, (4, 4)) is None
    y = run(model, feeds)["y"]
    for axis, n in enumerate(feeds["x"].shape[2:]):
        extent = g.dilations[axis] * (g.kernel[axis] - 1) + 1
        if g.auto_pad.startswith("SAME"):   # ceil(n / stride)
            size = -(-n // g.strides[axis])
        else:
            pads = g.pads or (0, 0, 0, 0)
            size = (n + pads[axis] + pads[axis + 2] - extent) // g.strides[axis] + 1
        assert y.shape[2 + axis] == size


# ---------------------------------------------------------------- biases

def bias_models():
    gemm, feeds = gemm_model(bias=True, trans_b=1)
    conv, conv_feeds = conv_model(c_in=3, c_out=4, kernel=3, spatial=5, bias=True)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["c", "h"], ["y"])]
    matmul = make_model(nodes, [vi("x", shape=[3, 6])], [vi("y", shape=[3, 4])],
                        [init("W", randn([6, 4])), init("c", randn([4], 1))])
    return [(gemm, feeds, 0), (conv, conv_feeds, 0), (matmul, {"x": randn([3, 6], 2)}, 1)]


@pytest.mark.parametrize("case", range(3))
def test_find_bias_finds_what_the_output_adds(case):
    model, feeds, holder = bias_models()[case]
    nodes = list(model.graph.node)
    found = find_bias(nodes, 0, readers(model.graph))
    assert found.node == holder and found.added == (nodes[0].op_type == "MatMul")
    bias = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == found.name))
    y = run(model, feeds)["y"]
    without = run(with_zeroed(model, found.name), feeds)["y"]
    shape = [1, -1] + [1] * (y.ndim - 2) if nodes[0].op_type == "Conv" else [-1]
    np.testing.assert_allclose(y - without, np.broadcast_to(bias.reshape(shape), y.shape), atol=1e-5)


def test_find_bias_without_one():
    gemm, _ = gemm_model()
    assert find_bias(list(gemm.graph.node), 0, readers(gemm.graph)).name is None
    matmul, _ = matmul_model()
    assert find_bias(list(matmul.graph.node), 0, readers(matmul.graph)) is None
    # a MatMul output read by an Add and by something else: no bias of its own
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "c"], ["a"]),
             helper.make_node("Mul", ["h", "a"], ["y"])]
    model = make_model(nodes, [vi("x", shape=[3, 6])], [vi("y", shape=[3, 4])],
                       [init("W", randn([6, 4])), init("c", randn([4], 1))])
    assert find_bias(list(model.graph.node), 0, readers(model.graph)) is None
