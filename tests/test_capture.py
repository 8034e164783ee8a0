"""Hessians captured through onnxruntime equal (2/n) sum x x^T computed directly in numpy.

The numpy reference unfolds convolutions here with explicit loops over output positions and
kernel taps (no code shared with onnx_obs.hessian.layerwise), and is itself checked: the site's
2-D matrix times these vectors reproduces onnxruntime's output of the node.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from onnx import helper

from graphs import conv_model, init, make_model, randn, run_tensors, vi
from onnx_obs.hessian.capture import capture_hessians
from onnx_obs.calib import load_calibration
from onnx_obs.graph.model_io import from_proto
from onnx_obs.graph.sites import find_sites, site_matrix
from onnx_obs.progress import Progress


def capture(model, feeds, batch_size=5, precision="float64"):
    """precision float64: these tests pin H to a float64 numpy reference at rtol 1e-10, which
    float32 products (the default, about 1e-7 relative) do not meet; test_hessian_precision.py
    checks the float32 path against the same reference within its bound."""
    loaded = from_proto(model)
    sites, _ = find_sites(loaded.model)
    cal = load_calibration(feeds, loaded.model, batch_size=batch_size)
    with Progress(enabled=False) as bar:
        hs = capture_hessians(loaded, sites, cal, "cpu", bar, precision=precision)
    return {s.name: s for s in sites}, hs


def hessian(vectors: np.ndarray) -> np.ndarray:
    """(groups, n, cols) -> (groups, cols, cols) = (2/n) sum x x^T, by an explicit outer-product sum."""
    g, n, c = vectors.shape
    H = np.zeros((g, c, c))
    for gi in range(g):
        for v in vectors[gi].astype(np.float64):
            H[gi] += 2.0 * np.outer(v, v)
    return H / n


# ---------------------------------------------------------------- independent unfolds (loops)

def _loop_vectors(x, kernel, group, out, tap_index):
    """One vector per (sample, output position) and group, columns (channel, taps); tap_index(p, k)
    gives the input position output p reads through tap k, or None where it reads zero."""
    n, c = x.shape[:2]
    spatial = x.shape[2:]
    cg = c // group
    vecs = [[] for _ in range(group)]
    for s in range(n):
        for p in itertools.product(*[range(o) for o in out]):
            for g in range(group):
                v = []
                for ch in range(g * cg, (g + 1) * cg):
                    for k in itertools.product(*[range(kk) for kk in kernel]):
                        idx = tap_index(p, k)
                        inside = idx is not None and all(0 <= i < n_ for i, n_ in zip(idx, spatial))
                        v.append(x[(s, ch, *idx)] if inside else 0.0)
                vecs[g].append(v)
    return np.array(vecs, np.float64), out


def conv_vectors(x, kernel, group, strides=None, pads=None, dilations=None):
    """Conv: output p reads x[p*s + k*d - pad] through tap k."""
    r = len(kernel)
    strides = strides or [1] * r
    dilations = dilations or [1] * r
    pads = pads or [0] * 2 * r
    spatial = x.shape[2:]
    out = [(spatial[i] + pads[i] + pads[r + i] - (kernel[i] - 1) * dilations[i] - 1) // strides[i] + 1
           for i in range(r)]
    return _loop_vectors(x, kernel, group, out, lambda p, k: [
        p[i] * strides[i] + k[i] * dilations[i] - pads[i] for i in range(r)])


def conv_transpose_vectors(x, kernel, group, strides=None, pads=None, dilations=None,
                           output_padding=None):
    """ConvTranspose input vectors: output p sees x[c, i] through tap k where p = i*s + k*d - pad."""
    r = len(kernel)
    strides = strides or [1] * r
    dilations = dilations or [1] * r
    pads = pads or [0] * 2 * r
    output_padding = output_padding or [0] * r
    spatial = x.shape[2:]
    out = [strides[i] * (spatial[i] - 1) + output_padding[i] + (kernel[i] - 1) * dilations[i] + 1
           - pads[i] - pads[r + i] for i in range(r)]

    def tap_index(p, k):
        num = [p[i] + pads[i] - k[i] * dilations[i] for i in range(r)]
        if any(num[i] % strides[i] for i in range(r)):
            return None
        return [num[i] // strides[i] for i in range(r)]

    return _loop_vectors(x, kernel, group, out, tap_index)


def check_vectors_reproduce(site, vecs, y):
    """The reference vectors are right: W2d @ v == onnxruntime's node output (no bias)."""
    w = site_matrix(site)
    want = y.reshape(y.shape[0], y.shape[1], -1).transpose(1, 0, 2).reshape(y.shape[1], -1)
    for g, rows in enumerate(site.row_groups()):
        np.testing.assert_allclose(w[rows] @ vecs[g].T, want[rows], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- Gemm / MatMul

def test_gemm_and_matmul_sharing_one_input():
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["h1"], name="fc", transB=1),
             helper.make_node("MatMul", ["x", "W2"], ["h2"], name="mm"),
             helper.make_node("Relu", ["h1"], ["r"]),
             helper.make_node("MatMul", ["W3", "r"], ["y"], name="left")]       # weight on the left
    model = make_model(nodes, [vi("x", np.float32, ["n", 6])],
                       [vi("h2", np.float32, None), vi("y", np.float32, None)],
                       [init("W1", randn([5, 6], 1)), init("b1", randn([5], 2)),
                        init("W2", randn([6, 3], 3)), init("W3", randn([4, 12], 4))])
    # the left MatMul contracts r's first axis: W3 [4, n] @ r [n, 5] needs n = 12 samples per run
    x = randn([12, 6], 5)
    sites, hs = capture(model, {"x": x}, batch_size=12)
    H = hessian(x[None])
    np.testing.assert_allclose(hs["W1"], H, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(hs["W1"], hs["W2"])       # one input tensor, one H
    r = run_tensors(model, {"x": x}, ["r"])["r"]
    np.testing.assert_allclose(hs["W3"], hessian(r.T[None]), rtol=1e-10, atol=1e-12)
    assert hs["W3"].shape == (1, 12, 12)


def test_matmul_tokens_streamed_over_batches():
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    model = make_model([node], [vi("x", np.float32, ["b", "t", 6])], [vi("y", np.float32, None)],
                       [init("W", randn([6, 4]))])
    x = randn([11, 3, 6], 1)
    _, hs = capture(model, {"x": x}, batch_size=4)     # 3 runs: 4 + 4 + 3 samples
    np.testing.assert_allclose(hs["W"], hessian(x.reshape(1, -1, 6)), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- convolutions

@pytest.mark.parametrize("dims,kw", [
    (2, dict(c_in=4, c_out=6, group=2, kernel=[3, 2], spatial=[6, 5], pads=[1, 0, 2, 1],
             strides=[2, 1], dilations=[1, 2])),
    (1, dict(c_in=3, c_out=6, group=3, kernel=3, spatial=8, pads=[2, 1], strides=[3], dilations=[2])),
    (2, dict(c_in=2, c_out=3, kernel=3, spatial=5)),
])
def test_conv(dims, kw):
    model, feeds = conv_model(dims=dims, batch=7, **kw)
    x = feeds["x"]
    sites, hs = capture(model, feeds, batch_size=3)
    site = sites["W"]
    attrs = site.uses[0].attrs
    vecs, _ = conv_vectors(x, list(site.shape[2:]), kw.get("group", 1), attrs.get("strides"),
                           attrs.get("pads"), attrs.get("dilations"))
    check_vectors_reproduce(site, vecs, run_tensors(model, feeds, ["y"])["y"])
    np.testing.assert_allclose(hs["W"], hessian(vecs), rtol=1e-10, atol=1e-10)
    assert hs["W"].shape[0] == kw.get("group", 1)


@pytest.mark.parametrize("dims,kw", [
    (2, dict(c_in=4, c_out=6, group=2, kernel=[3, 2], spatial=[4, 3], strides=[2, 3],
             pads=[1, 0, 0, 1], output_padding=[1, 0], dilations=[1, 2])),
    (1, dict(c_in=2, c_out=3, kernel=4, spatial=5, strides=[2], pads=[1, 2])),
])
def test_conv_transpose(dims, kw):
    model, feeds = conv_model(dims=dims, batch=5, transpose=True, **kw)
    x = feeds["x"]
    sites, hs = capture(model, feeds, batch_size=2)
    site = sites["W"]
    attrs = site.uses[0].attrs
    vecs, _ = conv_transpose_vectors(x, list(site.shape[2:]), kw.get("group", 1), attrs.get("strides"),
                                     attrs.get("pads"), attrs.get("dilations"),
                                     attrs.get("output_padding"))
    check_vectors_reproduce(site, vecs, run_tensors(model, feeds, ["y"])["y"])
    np.testing.assert_allclose(hs["W"], hessian(vecs), rtol=1e-10, atol=1e-10)


def test_conv_chain_intermediate_activation():
    # Conv -> Relu -> grouped Conv -> Flatten -> Gemm: each H from its own captured input
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c1"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "W2"], ["c2"], name="c2", group=2, strides=[2, 2]),
             helper.make_node("Flatten", ["c2"], ["f"]),
             helper.make_node("Gemm", ["f", "W3"], ["y"], name="fc", transB=1)]
    model = make_model(nodes, [vi("x", np.float32, ["n", 2, 5, 5])], [vi("y", np.float32, None)],
                       [init("W1", randn([4, 2, 3, 3], 1)), init("W2", randn([4, 2, 2, 2], 2)),
                        init("W3", randn([3, 16], 3))])
    x = randn([6, 2, 5, 5], 4)
    sites, hs = capture(model, {"x": x}, batch_size=4)
    acts = run_tensors(model, {"x": x}, ["r1", "f"])
    v1, _ = conv_vectors(x, [3, 3], 1, pads=[1, 1, 1, 1])
    v2, _ = conv_vectors(acts["r1"], [2, 2], 2, strides=[2, 2])
    np.testing.assert_allclose(hs["W1"], hessian(v1), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(hs["W2"], hessian(v2), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(hs["W3"], hessian(acts["f"][None]), rtol=1e-10, atol=1e-10)


def test_two_convs_sharing_an_input_share_h():
    nodes = [helper.make_node("Conv", ["x", "Wa"], ["ya"], name="a", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "Wb"], ["yb"], name="b", pads=[1, 1, 1, 1])]
    model = make_model(nodes, [vi("x", np.float32, ["n", 2, 4, 4])],
                       [vi("ya", np.float32, None), vi("yb", np.float32, None)],
                       [init("Wa", randn([3, 2, 3, 3], 1)), init("Wb", randn([5, 2, 3, 3], 2))])
    x = randn([4, 2, 4, 4], 3)
    _, hs = capture(model, {"x": x})
    np.testing.assert_array_equal(hs["Wa"], hs["Wb"])
    v, _ = conv_vectors(x, [3, 3], 1, pads=[1, 1, 1, 1])
    np.testing.assert_allclose(hs["Wa"], hessian(v), rtol=1e-10, atol=1e-10)


def test_max_positions_sums_a_seeded_subset_of_positions():
    """Each sample keeps max_positions distinct output positions of its own; H equals
    (2/n) sum x x^T over exactly those patch vectors (the loop unfold's), and with 0 the full H."""
    from onnx_obs.hessian.capture import HessianSums
    from onnx_obs.hessian.layerwise import _some_positions

    model, feeds = conv_model(c_in=3, c_out=4, kernel=3, spatial=6, batch=3, pads=[1, 1, 1, 1])
    sites, _ = find_sites(from_proto(model).model)
    vecs = conv_vectors(feeds["x"], [3, 3], 1, pads=[1, 1, 1, 1])[0][0]  # (3 * 36, 27)
    full = HessianSums(sites, precision="float64")
    full.add_values(feeds)
    np.testing.assert_allclose(full.hessians()["W"][0], hessian(vecs[None])[0], rtol=1e-10)
    sub = HessianSums(sites, max_positions=5, precision="float64")
    sub.add_values(feeds)
    pick = _some_positions(np.arange(3 * 36)[None, :, None], 3, 5, 0)[0, :, 0]
    assert len(set(pick.tolist())) == 15 and [p // 36 for p in pick] == [0] * 5 + [1] * 5 + [2] * 5
    np.testing.assert_allclose(sub.hessians()["W"][0], hessian(vecs[pick][None])[0], rtol=1e-10)
    assert not np.allclose(sub.hessians()["W"][0], full.hessians()["W"][0])


@pytest.mark.parametrize("geometry", [
    dict(kernel=(3, 3), strides=(1, 1), dilations=(1, 1), pads=(1, 1, 1, 1), groups=1),
    dict(kernel=(3, 3), strides=(2, 2), dilations=(1, 1), pads=(1, 1, 1, 1), groups=8),
    dict(kernel=(5, 3), strides=(1, 2), dilations=(2, 1), pads=(0, 1, 2, 0), groups=2),
    dict(kernel=(3,), strides=(2,), dilations=(1,), pads=(1, 0), groups=4),
])
def test_drawn_positions_are_unfolded_alone_as_the_full_unfold_would_give_them(geometry):
    """With max_positions, only the drawn output positions are unfolded: the same vectors, in the
    same order, as unfolding everything and keeping those positions."""
    from onnx_obs.graph.ops import ConvGeometry
    from onnx_obs.hessian.layerwise import _group_rows, _some_positions, conv_patches, input_vectors

    g = ConvGeometry(**geometry)
    x = randn([5, 8] + [11, 9][: len(g.kernel)], 4)
    cols = 8 // g.groups * int(np.prod(g.kernel))
    full = _group_rows(conv_patches(x, g), g.groups)
    for keep in (0, 3, 20, 10_000):
        got = np.concatenate(list(input_vectors(x, "conv", cols, g, keep, 7)), axis=1)
        np.testing.assert_array_equal(got, _some_positions(full, 5, keep, 7))


@pytest.mark.parametrize("geometry", [
    dict(kernel=(3, 3), strides=(1, 1), dilations=(1, 1), pads=(1, 1, 1, 1), groups=8),
    dict(kernel=(5, 3), strides=(1, 2), dilations=(2, 1), pads=(0, 1, 2, 0), groups=2),
    dict(kernel=(3,), strides=(2,), dilations=(1,), pads=(1, 0), groups=1),
])
def test_conv_columns_sum_the_same_hessian_without_transposing(geometry):
    """Conv Hessians summed from each sample's patches as they lie (groups, cols, positions) equal
    those from the transposed input vectors: to rounding in float64, and within float32's."""
    from onnx_obs.graph.ops import ConvGeometry
    from onnx_obs.hessian.layerwise import HessianSum, conv_columns, input_vectors

    g = ConvGeometry(**geometry)
    x = randn([4, 8] + [11, 9][: len(g.kernel)], 5)
    cols = 8 // g.groups * int(np.prod(g.kernel))
    vectors = np.concatenate(list(input_vectors(x.astype(np.float64), "conv", cols, g)), axis=1)
    want = 2 * np.matmul(vectors.transpose(0, 2, 1), vectors) / vectors.shape[1]
    for precision, rtol in (("float64", 1e-12), ("float32", 1e-6)):
        acc = HessianSum(g.groups, cols, precision)
        for columns in conv_columns(x, g):
            acc.add_columns(columns)
        assert acc.count == vectors.shape[1]
        np.testing.assert_allclose(acc.hessian(), want, rtol=rtol, atol=rtol * np.abs(want).max())
