"""Site discovery on every graph form, checked against onnxruntime.

For each site: the 2-D view round-trips exactly, and the 2-D matrix applied to the input vectors
that hessian/layerwise.input_vectors builds from the node's captured activation reproduces the
node's output as onnxruntime computes it (bias excluded), row group by row group.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphs import (conv_model, gemm_model, init, make_model, matmul_model, randn, run,
                    run_tensors, save, vi, constant)
from onnx_obs.graph.model_io import load_model
from onnx_obs.graph.sites import find_sites, read_array, site_matrix
from onnx_obs.hessian.layerwise import ConvGeometry, input_vectors


# ---------------------------------------------------------------- the independent check

def _weight_left(model: onnx.ModelProto, use) -> bool:
    for node in model.graph.node:
        if use.output in node.output:
            return node.input[0] != use.activation
    raise AssertionError(f"node producing {use.output} not in the main graph")


def check_use(site, use, x, y, *, weight_left=False, bias=None, base_dir="", rtol=1e-4, atol=1e-4):
    """W2d @ input_vectors(x) == y (minus bias), per row group."""
    w2d = site_matrix(site, base_dir)
    assert w2d.shape == site.matrix_shape
    rows, cols = w2d.shape
    geo = (ConvGeometry.from_attrs(use.attrs, site.op_shape[2:])
           if use.samples in ("conv", "convtranspose") else None)
    vecs = np.concatenate(list(input_vectors(x, use.samples, cols, geo)), axis=1)
    y = np.asarray(y, np.float64)
    if use.op_type in ("Conv", "ConvTranspose"):
        if bias is not None:
            y = y - bias.reshape([1, -1] + [1] * (y.ndim - 2))
        want = y.reshape(y.shape[0], y.shape[1], -1).transpose(1, 0, 2).reshape(y.shape[1], -1)
    else:
        if bias is not None:
            y = y - bias
        want = (np.swapaxes(y, -1, -2) if weight_left else y).reshape(-1, rows).T
    groups = site.row_groups()
    assert vecs.shape[0] == len(groups)
    assert sum(g.stop - g.start for g in groups) == rows
    for g, sl in enumerate(groups):
        got = w2d[sl] @ vecs[g].T.astype(np.float64)
        np.testing.assert_allclose(got, want[sl], rtol=rtol, atol=atol)


def check_model_sites(model, feeds, *, expect: int, base_dir="", bias=None, **tol):
    """Every site of a main-graph model: round trip and onnxruntime agreement for every use."""
    sites, skipped = find_sites(model)
    assert len(sites) == expect, (sites, skipped)
    for site in sites:
        check_round_trip(site, base_dir)
        for use in site.uses:
            vals = run_tensors(model, feeds, [use.activation, use.output])
            check_use(site, use, vals[use.activation], vals[use.output], base_dir=base_dir,
                      weight_left=_weight_left(model, use), bias=bias, **tol)
    return sites, skipped


def check_round_trip(site, base_dir=""):
    a = read_array(site, base_dir)
    assert a.shape == site.shape
    m = site.to_matrix(a)
    assert m.shape == site.matrix_shape
    back = site.from_matrix(m)
    assert back.dtype == a.dtype and back.shape == a.shape
    assert np.array_equal(back.view(np.uint8), np.ascontiguousarray(a).view(np.uint8))
    # a matrix of distinct values maps back to distinct positions (no element lost or doubled)
    ids = np.arange(a.size, dtype=np.float64).reshape(site.matrix_shape)
    flat = site.from_matrix(ids).ravel()
    assert sorted(flat.tolist()) == list(range(a.size))


# ---------------------------------------------------------------- Gemm and MatMul

@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("weight_left", [False, True])
def test_gemm_every_transpose_and_side(trans_a, trans_b, weight_left):
    model, feeds = gemm_model(trans_a=trans_a, trans_b=trans_b, weight_left=weight_left)
    (site,), _ = check_model_sites(model, feeds, expect=1)
    assert site.op_type == "Gemm" and site.name == "W" and site.storage == "initializer"
    # rows are output units: n outputs per x vector, k inputs
    assert site.matrix_shape == (4, 6)


def test_gemm_bias_is_not_a_site():
    model, feeds = gemm_model(trans_b=1, bias=True)
    (site,), skipped = check_model_sites(model, feeds, expect=1,
                                         bias=numpy_helper.to_array(model.graph.initializer[1]))
    assert site.name == "W" and not skipped


@pytest.mark.parametrize("x_shape,w_shape,left", [
    ((3, 6), (6, 4), False),
    ((6, 3), (4, 6), True),
    ((2, 5, 6), (6, 4), False),      # [batch, tokens, features]
    ((2, 6, 5), (4, 6), True),       # weight on the left of a batched activation
])
def test_matmul_sides_and_batched(x_shape, w_shape, left):
    model, feeds = matmul_model(x_shape=x_shape, w_shape=w_shape, weight_left=left)
    (site,), _ = check_model_sites(model, feeds, expect=1)
    assert site.matrix_shape == (4, 6)
    assert site.uses[0].samples == ("cols" if left else "rows")


def test_matmul_rank3_weight_is_skipped():
    model, _ = matmul_model(x_shape=(2, 3, 6), w_shape=(2, 6, 4))
    sites, skipped = find_sites(model)
    assert not sites
    assert [k.name for k in skipped] == ["W"] and "rank-3" in skipped[0].reason


# ---------------------------------------------------------------- convolutions

@pytest.mark.parametrize("dims,kw", [
    (1, dict(c_in=4, c_out=6, group=2, kernel=3, spatial=9, pads=[1, 2], strides=[2])),
    (2, dict(c_in=4, c_out=6, group=2, kernel=[3, 2], spatial=[7, 6], pads=[1, 0, 2, 1],
             strides=[2, 1], dilations=[1, 2])),
    (3, dict(c_in=6, c_out=3, group=3, kernel=2, spatial=[4, 5, 3], pads=[1, 0, 1, 0, 1, 0])),
    (2, dict(c_in=4, c_out=8, group=4, kernel=3, spatial=6, pads=[1, 1, 1, 1])),    # depthwise x2
    (2, dict(c_in=3, c_out=3, group=3, kernel=3, spatial=5, auto_pad="SAME_UPPER", strides=[2, 2])),
    (2, dict(c_in=2, c_out=4, kernel=3, spatial=6, auto_pad="SAME_LOWER", strides=[2, 1])),  # ORT: no dilation with SAME
    (2, dict(c_in=2, c_out=4, kernel=2, spatial=5, auto_pad="VALID")),
])
def test_conv_grouped_depthwise_and_geometry(dims, kw):
    model, feeds = conv_model(dims=dims, bias=True, **kw)
    bias = numpy_helper.to_array(model.graph.initializer[1])
    (site,), _ = check_model_sites(model, feeds, expect=1, bias=bias)
    g = kw.get("group", 1)
    k = int(np.prod(site.shape[2:]))
    assert site.layout == "conv" and site.groups == g
    assert site.matrix_shape == (kw["c_out"], kw["c_in"] // g * k)
    assert len(site.row_groups()) == g


@pytest.mark.parametrize("dims,kw", [
    (1, dict(c_in=4, c_out=6, group=2, kernel=3, spatial=5, strides=[2], pads=[1, 0])),
    (2, dict(c_in=4, c_out=6, group=2, kernel=[3, 2], spatial=[4, 3], strides=[2, 3],
             pads=[1, 0, 0, 1], output_padding=[1, 0], dilations=[1, 2])),
    (2, dict(c_in=4, c_out=4, group=4, kernel=3, spatial=4, strides=[2, 2], output_shape=[8, 7])),
    (2, dict(c_in=2, c_out=3, kernel=3, spatial=4, strides=[2, 2], auto_pad="SAME_UPPER")),
    (3, dict(c_in=4, c_out=2, group=2, kernel=2, spatial=[3, 2, 3], strides=[2, 1, 2])),
])
def test_conv_transpose_with_groups(dims, kw):
    model, feeds = conv_model(dims=dims, transpose=True, **kw)
    (site,), _ = check_model_sites(model, feeds, expect=1)
    g = kw.get("group", 1)
    k = int(np.prod(site.shape[2:]))
    assert site.layout == "convT" and site.groups == g and site.op_type == "ConvTranspose"
    assert site.matrix_shape == (kw["c_out"], kw["c_in"] // g * k)


# ---------------------------------------------------------------- where the weight comes from

def test_constant_node_weight():
    w = randn([6, 4])
    nodes = [constant("Wc", w), helper.make_node("MatMul", ["x", "Wc"], ["y"], name="mm")]
    model = make_model(nodes, [vi("x", np.float32, [3, 6])], [vi("y", np.float32, [3, 4])])
    (site,), _ = check_model_sites(model, {"x": randn([3, 6], 1)}, expect=1)
    assert site.storage == "constant" and site.name == "Wc" and site.scope == ""


def test_shared_weight_is_one_site_with_two_uses():
    nodes = [helper.make_node("MatMul", ["x1", "W"], ["y1"], name="a"),
             helper.make_node("MatMul", ["x2", "W"], ["y2"], name="b")]
    model = make_model(nodes, [vi("x1", np.float32, [3, 6]), vi("x2", np.float32, [2, 6])],
                       [vi("y1", np.float32, [3, 4]), vi("y2", np.float32, [2, 4])],
                       [init("W", randn([6, 4]))])
    (site,), _ = check_model_sites(model, {"x1": randn([3, 6], 1), "x2": randn([2, 6], 2)}, expect=1)
    assert [u.node for u in site.uses] == ["a", "b"]
    assert [u.activation for u in site.uses] == ["x1", "x2"]


def test_shared_weight_read_in_two_layouts_is_skipped():
    nodes = [helper.make_node("MatMul", ["x1", "W"], ["y1"], name="a"),
             helper.make_node("MatMul", ["W", "x2"], ["y2"], name="b")]
    model = make_model(nodes, [vi("x1", np.float32, [3, 6]), vi("x2", np.float32, [6, 2])],
                       [vi("y1", np.float32, None), vi("y2", np.float32, None)],
                       [init("W", randn([6, 6]))])
    sites, skipped = find_sites(model)
    assert not sites and "different layouts" in skipped[0].reason


def test_fp16_weights_direct_and_cast():
    w = randn([6, 4], dtype=np.float16)
    nodes = [helper.make_node("MatMul", ["xh", "W16"], ["y16"], name="direct"),
             helper.make_node("Cast", ["W16b"], ["W32"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["x", "W32"], ["y"], name="cast")]
    model = make_model(nodes, [vi("xh", np.float16, [3, 6]), vi("x", np.float32, [3, 6])],
                       [vi("y16", np.float16, None), vi("y", np.float32, None)],
                       [init("W16", w), init("W16b", randn([6, 4], 3, np.float16))])
    feeds = {"xh": randn([3, 6], 1, np.float16), "x": randn([3, 6], 2)}
    sites, _ = check_model_sites(model, feeds, expect=2, rtol=2e-2, atol=2e-2)
    assert {s.name: s.dtype for s in sites} == {"W16": "float16", "W16b": "float16"}


def test_bf16_weight_behind_cast():
    import ml_dtypes

    w = randn([4, 6]).astype(ml_dtypes.bfloat16)
    t = helper.make_tensor("Wb", TensorProto.BFLOAT16, [4, 6],
                           w.view(np.uint16).tobytes(), raw=True)
    nodes = [helper.make_node("Cast", ["Wb"], ["W32"], to=TensorProto.FLOAT),
             helper.make_node("Gemm", ["x", "W32"], ["y"], name="g", transB=1)]
    model = make_model(nodes, [vi("x", np.float32, [3, 6])], [vi("y", np.float32, [3, 4])], [t])
    (site,), _ = check_model_sites(model, {"x": randn([3, 6], 1)}, expect=1)
    assert site.dtype == "bfloat16" and site.layout == "rows_cols"


def test_weight_behind_identity_and_transpose():
    # W stored [out, in]; Identity then Transpose -> [in, out] for MatMul
    nodes = [helper.make_node("Identity", ["W"], ["Wi"]),
             helper.make_node("Transpose", ["Wi"], ["Wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "Wt"], ["y"], name="mm")]
    model = make_model(nodes, [vi("x", np.float32, [2, 3, 6])], [vi("y", np.float32, None)],
                       [init("W", randn([4, 6]))])
    (site,), _ = check_model_sites(model, {"x": randn([2, 3, 6], 1)}, expect=1)
    assert site.perm == (1, 0) and site.shape == (4, 6) and site.matrix_shape == (4, 6)


def test_conv_weight_behind_composed_transposes():
    # stored as [kh, kw, in, out] (TF layout); two Transposes bring it to [out, in, kh, kw]
    w = randn([3, 2, 4, 6])
    nodes = [helper.make_node("Transpose", ["W"], ["Wa"], perm=[2, 3, 0, 1]),   # [in, out, kh, kw]
             helper.make_node("Transpose", ["Wa"], ["Wb"], perm=[1, 0, 2, 3]),  # [out, in, kh, kw]
             helper.make_node("Conv", ["x", "Wb"], ["y"], name="conv", pads=[1, 0, 1, 0])]
    model = make_model(nodes, [vi("x", np.float32, [2, 4, 5, 5])], [vi("y", np.float32, None)],
                       [init("W", w)])
    (site,), _ = check_model_sites(model, {"x": randn([2, 4, 5, 5], 1)}, expect=1)
    assert site.perm == (3, 2, 0, 1) and site.op_shape == (6, 4, 3, 2)


def test_initializer_listed_as_graph_input():
    model, feeds = gemm_model(trans_b=1)
    model = make_model(model.graph.node, model.graph.input, model.graph.output,
                       model.graph.initializer, graph_inputs_for_inits=True)
    (site,), _ = check_model_sites(model, feeds, expect=1)
    assert site.graph_input is True
    plain, _ = find_sites(gemm_model(trans_b=1)[0])
    assert plain[0].graph_input is False


def test_external_data(tmp_path):
    model, feeds = conv_model(c_in=2, c_out=4, kernel=3, spatial=5, pads=[1, 1, 1, 1])
    w = numpy_helper.to_array(model.graph.initializer[0])
    path = save(model, tmp_path / "ext.onnx", external=True)
    assert (tmp_path / "ext.onnx.data").is_file()
    loaded = load_model(path)
    assert loaded.has_external_data
    (site,), _ = find_sites(loaded.model)
    assert site.tensor.data_location == TensorProto.EXTERNAL
    np.testing.assert_array_equal(read_array(site, loaded.base_dir), w)
    x = feeds["x"]
    y = run(path, feeds)["y"]
    check_round_trip(site, loaded.base_dir)
    check_use(site, site.uses[0], x, y, base_dir=loaded.base_dir)


# ---------------------------------------------------------------- subgraphs

def _matmul_graph(name, x, w_name, y, inits=(), nodes=()):
    return helper.make_graph(list(nodes) + [helper.make_node("MatMul", [x, w_name], [y], name=name + "_mm")],
                             name, [], [vi(y, np.float32, None)], list(inits))


def test_weights_in_if_branches():
    then_g = _matmul_graph("then", "x", "W_then", "t", [init("W_then", randn([6, 4], 1))])
    else_g = _matmul_graph("else", "x", "W_outer", "e")
    node = helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g)
    model = make_model([node], [vi("cond", np.bool_, []), vi("x", np.float32, [3, 6])],
                       [vi("y", np.float32, None)], [init("W_outer", randn([6, 4], 2))])
    sites, _ = find_sites(model)
    by = {s.name: s for s in sites}
    assert set(by) == {"if.then_branch/W_then", "W_outer"}
    inner, outer = by["if.then_branch/W_then"], by["W_outer"]
    assert inner.scope == "if.then_branch" and inner.tensor_name == "W_then"
    assert outer.scope == "" and outer.uses[0].in_subgraph
    assert not inner.captureable and not outer.captureable
    assert inner.uses[0].node == "if.then_branch/then_mm"
    x = randn([3, 6], 3)
    for site, cond in ((inner, True), (outer, False)):
        check_round_trip(site)
        y = run(model, {"cond": np.array(cond), "x": x})["y"]
        check_use(site, site.uses[0], x, y)


def test_constant_weight_in_loop_body():
    body = helper.make_graph(
        [helper.make_node("Identity", ["c_in"], ["c_out"]),
         constant("Wl", randn([6, 4], 1)),
         helper.make_node("MatMul", ["x", "Wl"], ["s"], name="body_mm")],
        "body", [vi("i", np.int64, []), vi("c_in", np.bool_, [])],
        [vi("c_out", np.bool_, []), vi("s", np.float32, None)])
    node = helper.make_node("Loop", ["trip", ""], ["y"], name="loop", body=body)
    model = make_model([node], [vi("x", np.float32, [3, 6])], [vi("y", np.float32, None)],
                       [init("trip", np.array(1, np.int64))])
    (site,), _ = find_sites(model)
    assert site.name == "loop.body/Wl" and site.storage == "constant" and site.scope == "loop.body"
    x = randn([3, 6], 2)
    y = run(model, {"x": x})["y"]
    check_round_trip(site)
    check_use(site, site.uses[0], x, y[0])


def test_weight_in_scan_body():
    body = helper.make_graph([helper.make_node("Gemm", ["xi", "Ws"], ["yi"], name="body_gemm", transB=1)],
                             "body", [vi("xi", np.float32, [3, 6])], [vi("yi", np.float32, [3, 4])],
                             [init("Ws", randn([4, 6], 1))])
    node = helper.make_node("Scan", ["x"], ["y"], name="scan", body=body, num_scan_inputs=1)
    model = make_model([node], [vi("x", np.float32, [5, 3, 6])], [vi("y", np.float32, None)])
    (site,), _ = find_sites(model)
    assert site.scope == "scan.body" and site.uses[0].activation == "xi"
    x = randn([5, 3, 6], 2)
    y = run(model, {"x": x})["y"]
    check_round_trip(site)
    check_use(site, site.uses[0], x, y)  # Scan stacks x_t @ W^T: the same as one batched Gemm


def test_inspect_location_names_the_subgraph():
    from onnx_obs.api import inspect

    then_g = _matmul_graph("then", "x", "W_then", "t", [init("W_then", randn([6, 4], 1))])
    else_g = _matmul_graph("else", "x", "W_else", "e", [init("W_else", randn([6, 4], 2))])
    node = helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g)
    model = make_model([node], [vi("cond", np.bool_, []), vi("x", np.float32, [3, 6])],
                       [vi("y", np.float32, None)])
    info = inspect(model)
    assert {s.location for s in info.sites} == {"initializer in if.then_branch",
                                                "initializer in if.else_branch"}


# ---------------------------------------------------------------- skipped with a reason

def test_quantized_weights_are_skipped():
    wq = np.random.default_rng(0).integers(-5, 5, [6, 4]).astype(np.int8)
    nodes = [helper.make_node("MatMulInteger", ["xq", "Wq"], ["y"], name="mmi")]
    model = make_model(nodes, [vi("xq", np.int8, [3, 6])], [vi("y", np.int32, None)], [init("Wq", wq)])
    sites, skipped = find_sites(model)
    assert not sites and skipped[0].name == "Wq"
    assert "quantized" in skipped[0].reason and "MatMulInteger" in skipped[0].reason

    wc = np.random.default_rng(1).integers(-5, 5, [4, 2, 3, 3]).astype(np.int8)
    q = [init("xs", np.array(0.1, np.float32)), init("xz", np.array(0, np.int8)),
         init("ws", np.array(0.05, np.float32)), init("wz", np.array(0, np.int8)),
         init("ys", np.array(0.2, np.float32)), init("yz", np.array(0, np.int8)), init("Wc", wc)]
    node = helper.make_node("QLinearConv", ["xq", "xs", "xz", "Wc", "ws", "wz", "ys", "yz"], ["y"], name="qc")
    model = make_model([node], [vi("xq", np.int8, [1, 2, 5, 5])], [vi("y", np.int8, None)], q)
    sites, skipped = find_sites(model)
    assert not sites
    reasons = {k.name: k.reason for k in skipped}
    assert "QLinearConv" in reasons["Wc"]


def test_lstm_weights_are_skipped():
    hidden, inp = 3, 4
    inits = [init("Wl", randn([1, 4 * hidden, inp])), init("Rl", randn([1, 4 * hidden, hidden], 1))]
    node = helper.make_node("LSTM", ["x", "Wl", "Rl"], ["y"], name="lstm", hidden_size=hidden)
    model = make_model([node], [vi("x", np.float32, [5, 2, inp])], [vi("y", np.float32, None)], inits)
    sites, skipped = find_sites(model)
    assert not sites
    assert {k.name for k in skipped} == {"Wl", "Rl"}
    assert all("LSTM" in k.reason for k in skipped)


def test_skipped_entries_name_the_op_and_leave_out_integer_inputs():
    # Exporters write x.shape[0] as Shape -> Gather(constant int64 index) and embeddings as
    # Gather(float table, ids): only the table is a weight left alone, listed under its op.
    hidden, inp = 3, 4
    inits = [init("Wl", randn([1, 4 * hidden, inp])), init("Rl", randn([1, 4 * hidden, hidden], 1)),
             init("seq", np.array([5, 5], np.int32)), init("table", randn([10, 4], 2)),
             init("idx0", np.array(0, np.int64))]
    nodes = [helper.make_node("LSTM", ["x", "Wl", "Rl", "", "seq"], ["y"], name="lstm", hidden_size=hidden),
             helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Gather", ["shape", "idx0"], ["steps"], name="g_index"),
             helper.make_node("Gather", ["table", "ids"], ["emb"], name="g_emb")]
    model = make_model(nodes, [vi("x", np.float32, [5, 2, inp]), vi("ids", np.int64, [3])],
                       [vi("y", np.float32, None), vi("steps", np.int64, None), vi("emb", np.float32, None)],
                       inits)
    sites, skipped = find_sites(model)
    assert not sites
    ops = {k.name: k.op_type for k in skipped}
    assert ops == {"Wl": "LSTM", "Rl": "LSTM", "table": "Gather"}
    assert all("recurrent" in k.reason for k in skipped if k.op_type == "LSTM")


def test_weight_whose_shape_is_read_is_a_site():
    # The dynamo exporter (optimize=False) sizes a zero bias from the weight's shape:
    # Conv(x, W, Expand(CastLike(0, x), Shape(W, end=1))). Shape does not read the values.
    nodes = [helper.make_node("Shape", ["W"], ["wshape"], name="wshape", start=0, end=1),
             helper.make_node("CastLike", ["zero", "x"], ["z"], name="castlike"),
             helper.make_node("Expand", ["z", "wshape"], ["b"], name="expand"),
             helper.make_node("Conv", ["x", "W", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    model = make_model(nodes, [vi("x", np.float32, [2, 3, 5, 5])], [vi("y", np.float32, None)],
                       [init("W", randn([4, 3, 3, 3])), init("zero", np.array(0.0, np.float32))], opset=18)
    (site,), skipped = find_sites(model)
    assert site.name == "W" and site.op_type == "Conv" and not skipped


def test_weight_also_used_elsewhere_is_skipped():
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
             helper.make_node("ReduceSum", ["W"], ["s"], name="sum")]
    model = make_model(nodes, [vi("x", np.float32, [3, 6])],
                       [vi("y", np.float32, None), vi("s", np.float32, None)], [init("W", randn([6, 4]))])
    sites, skipped = find_sites(model)
    assert not sites and "outside" in skipped[0].reason


def test_subgraph_input_shadowing_an_outer_weight():
    # The Scan body names its input "W", like the outer initializer: inside the body "W" is the
    # activation, so the body's Ws is a site and the outer W stays a plain MatMul weight.
    body = helper.make_graph([helper.make_node("MatMul", ["W", "Ws"], ["yi"], name="body_mm")],
                             "body", [vi("W", np.float32, [3, 6])], [vi("yi", np.float32, [3, 4])],
                             [init("Ws", randn([6, 4], 1))])
    nodes = [helper.make_node("Scan", ["x"], ["y"], name="scan", body=body, num_scan_inputs=1),
             helper.make_node("MatMul", ["x2", "W"], ["y2"], name="mm")]
    model = make_model(nodes, [vi("x", np.float32, [5, 3, 6]), vi("x2", np.float32, [3, 3])],
                       [vi("y", np.float32, None), vi("y2", np.float32, None)], [init("W", randn([3, 3], 2))])
    sites, skipped = find_sites(model)
    assert not skipped
    by = {s.name: s for s in sites}
    assert set(by) == {"W", "scan.body/Ws"}
    assert [u.node for u in by["W"].uses] == ["mm"]
    x, x2 = randn([5, 3, 6], 3), randn([3, 3], 4)
    out = run(model, {"x": x, "x2": x2})
    check_use(by["scan.body/Ws"], by["scan.body/Ws"].uses[0], x, out["y"])
    check_use(by["W"], by["W"].uses[0], x2, out["y2"])
