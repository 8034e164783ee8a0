"""Quantized models (strategies/quantize.py, graph/quant_format.py) checked independently: every
DequantizeLinear is re-computed with numpy from the spec's formula, the float model with those
weights is run by onnxruntime beside the quantized one, and layer errors come from the
calibration activations themselves."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import graphs
from cli_checks import assert_one_line_error, prune_args, sha
from onnx_obs import api
from onnx_obs.config import PruneConfig


def dequantize_by_spec(model: onnx.ModelProto, grids: dict | None = None) -> dict[str, np.ndarray]:
    """y = (x - zero_point) * scale for every DequantizeLinear of the main graph, scale broadcast
    along `axis` (per axis) or repeated block_size times along it (blocked), in numpy; `grids`
    receives each output's (scale, zero point) per element."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    weights = {}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:  # weights only
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        x = inits[node.input[0]].astype(np.int64)
        scale = inits[node.input[1]].astype(np.float64)
        zero = inits[node.input[2]].astype(np.int64) if len(node.input) > 2 else np.zeros(scale.shape, np.int64)
        axis = attrs.get("axis", 1)
        if "block_size" in attrs:
            b = attrs["block_size"]
            scale = np.repeat(scale, b, axis=axis).take(range(x.shape[axis]), axis=axis)
            zero = np.repeat(zero, b, axis=axis).take(range(x.shape[axis]), axis=axis)
        elif scale.ndim == 1:
            shape = [1] * x.ndim
            shape[axis] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        weights[node.output[0]] = ((x - zero) * scale).astype(inits[node.input[1]].dtype)
        if grids is not None:
            grids[node.output[0]] = (np.broadcast_to(scale, x.shape), np.broadcast_to(zero, x.shape))
    return weights


def float_twin(original: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The original model with the given initializers replaced."""
    m = onnx.ModelProto()
    m.CopyFrom(original)
    for t in m.graph.initializer:
        if t.name in weights:
            t.CopyFrom(numpy_helper.from_array(weights[t.name], t.name))
    for node in m.graph.node:
        if node.op_type == "Constant" and node.output[0] in weights:
            node.attribute[0].t.CopyFrom(numpy_helper.from_array(weights[node.output[0]]))
    return m


def check_quantized(original: onnx.ModelProto, quantized: onnx.ModelProto, feeds, n_sites: int,
                    tensors=None):
    """The quantized model computes what the original computes with the dequantized weights
    (compared on `tensors`, default the outputs; the weights are fetched too, which keeps
    onnxruntime from fusing DequantizeLinear into its own int4 / int8 kernels)."""
    onnx.checker.check_model(quantized)
    weights = dequantize_by_spec(quantized)
    assert len(weights) == n_sites
    float_names = {t.name for t in quantized.graph.initializer}
    assert not float_names & set(weights)  # the float weights are gone
    names = list(weights) + (tensors or [o.name for o in original.graph.output])
    got = graphs.run_tensors(quantized, feeds, names)
    want = graphs.run_tensors(float_twin(original, weights), feeds, names)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5)
    return weights


@pytest.mark.parametrize("bits,group_size,symmetric", [(8, -1, True), (8, -1, False), (4, -1, True),
                                                       (4, 32, False), (8, 16, True)])
def test_written_model_computes_its_dequantized_weights(cnn_path, cnn_calib, bits, group_size, symmetric):
    original = onnx.load(cnn_path)
    model, report = api.quantize(str(cnn_path), str(cnn_calib), bits=bits, group_size=group_size,
                                 symmetric=symmetric, quant_method="rtn", max_samples=64)
    feeds = {"input": np.load(cnn_calib)["input"][:16]}
    weights = check_quantized(original, model, feeds, n_sites=5)
    grids = {}
    dequantize_by_spec(model, grids)
    opset = next(o.version for o in model.opset_import if o.domain == "")
    assert opset == (21 if bits == 4 or group_size != -1 else 20)
    assert any("opset raised from 20 to 21" in n for n in report.notes) == (opset == 21)
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    for t in original.graph.initializer:
        if t.name in weights:  # rtn: every weight on its nearest grid point
            w, (scale, zero) = numpy_helper.to_array(t).astype(np.float64), grids[t.name]
            rtn = (np.clip(np.rint(w / scale) + zero, qmin, qmax) - zero) * scale
            np.testing.assert_allclose(weights[t.name], rtn, rtol=1e-6, atol=1e-9)
    types = {t.data_type for t in model.graph.initializer if t.name.endswith("_quantized")}
    assert types == {{(8, True): onnx.TensorProto.INT8, (8, False): onnx.TensorProto.UINT8,
                      (4, True): onnx.TensorProto.INT4, (4, False): onnx.TensorProto.UINT4}[bits, symmetric]}


def test_report_errors_match_the_activations(mlp_path, mlp_calib):
    """The first layer sees the calibration inputs: its measured error is mean ||(W - Wq) x||^2;
    OBQ's predicted error, the sum of its step costs, is the same error in the damped metric the
    solver used: + lambda/2 ||dW||^2, and (1 + lambda)/2 dW^2 on dead inputs (unit diagonal)."""
    original = onnx.load(mlp_path)
    model, report = api.quantize(str(mlp_path), str(mlp_calib), bits=4, quant_method="obq", damp=0.0)
    x = np.load(mlp_calib)["input"].astype(np.float64)
    first = report.sites[0]
    W = numpy_helper.to_array(next(t for t in original.graph.initializer if t.name == first.name))
    Wq = dequantize_by_spec(model)[first.name]
    direct = np.mean(np.sum(((W - Wq) @ x.T) ** 2, axis=0))
    assert first.measured_error == pytest.approx(direct, rel=1e-6)
    dW = (W - Wq).astype(np.float64)
    dead = ~np.any(x != 0, axis=0)
    damped = direct + first.damping / 2 * np.sum(dW**2) + 0.5 * np.sum(dW[:, dead] ** 2)
    assert first.predicted_error == pytest.approx(damped, rel=1e-6)
    q = report.quantization[0]
    assert q["bits"] == 4 and q["method"] == "obq" and q["measured_error"] == first.measured_error


def test_hessian_methods_beat_round_to_nearest(mlp_path, mlp_calib):
    dev = {}
    for method in ("rtn", "gptq", "obq"):
        _, report = api.quantize(str(mlp_path), str(mlp_calib), bits=4, quant_method=method)
        dev[method] = report.deviation["logits"]["relative_mse"]
    assert dev["obq"] < 0.7 * dev["rtn"] and dev["gptq"] < 0.7 * dev["rtn"]


def test_prune_and_quantize_in_one_pass_keeps_the_zeros(mlp_path, mlp_calib):
    original = onnx.load(mlp_path)
    model, report = api.prune(str(mlp_path), str(mlp_calib), sparsity=0.5, bits=4, group_size=32)
    weights = check_quantized(original, model, {"input": np.load(mlp_calib)["input"][:8]}, n_sites=3)
    for s in report.sites:
        assert np.mean(weights[s.name] == 0) >= 0.5
    assert report.method == "obs pruning + int4 quantization (auto)"
    # pruned, then rounded to nearest: no correction of the quantization error
    pruned, _ = api.prune(str(mlp_path), str(mlp_calib), sparsity=0.5)
    separate, _ = api.quantize(pruned, str(mlp_calib), bits=4, group_size=32, quant_method="rtn")
    feeds = {"input": np.load(mlp_calib)["input"]}
    ref = graphs.run(original, feeds)["logits"]

    def relative_mse(m):
        return np.mean((graphs.run(m, feeds)["logits"] - ref) ** 2) / np.mean(ref**2)

    assert relative_mse(model) < 0.95 * relative_mse(separate)


def test_sites_in_every_form(tmp_path):
    """MatMul weight on the left, Gemm transA, a Constant-stored weight behind a Transpose,
    a ConvTranspose and a float16 MatMul."""
    x = graphs.vi("x", shape=["n", 8])
    nodes = [
        graphs.constant("Wc", graphs.randn([16, 8], 1)),
        helper.make_node("Transpose", ["Wc"], ["Wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "Wt"], ["h"], name="mm"),              # weight (8, 16) via Transpose
        helper.make_node("Gemm", ["W2", "h"], ["g"], name="gemm", transA=1, transB=1),  # weight left, [16, 4]^T
        helper.make_node("Transpose", ["g"], ["gt"], perm=[1, 0]),
        helper.make_node("Reshape", ["gt", "shape"], ["img"]),
        helper.make_node("ConvTranspose", ["img", "W3"], ["ct"], name="ct"),
        helper.make_node("Flatten", ["ct"], ["f"]),
        helper.make_node("Cast", ["f"], ["f16"], to=onnx.TensorProto.FLOAT16),
        helper.make_node("MatMul", ["f16", "W4"], ["y16"], name="mm16"),
        helper.make_node("Cast", ["y16"], ["y"], to=onnx.TensorProto.FLOAT),
    ]
    inits = [graphs.init("W2", graphs.randn([16, 4], 2)), graphs.init("shape", np.array([-1, 1, 2, 2])),
             graphs.init("W3", graphs.randn([1, 3, 3, 3], 3)),
             graphs.init("W4", graphs.randn([48, 5], 4).astype(np.float16))]
    model = graphs.make_model(nodes, [x], [graphs.vi("y", shape=None)], inits, opset=19)
    path = graphs.save(model, tmp_path / "forms.onnx")
    feeds = {"x": graphs.randn([32, 8], 5)}
    for bits, group_size in ((8, -1), (4, 4)):
        qmodel, report = api.quantize(str(path), feeds, bits=bits, group_size=group_size, min_params=0)
        assert not report.skipped, report.skipped
        x4 = {"x": feeds["x"][:4]}
        check_quantized(model, qmodel, x4, n_sites=4, tensors=["h", "g", "ct", "y16"])
        fused, twin = graphs.run(qmodel, x4)["y"], graphs.run(float_twin(model, dequantize_by_spec(qmodel)), x4)["y"]
        np.testing.assert_allclose(fused, twin, atol=0.02 * np.abs(twin).max())  # fp16 rounding
        assert [n.op_type for n in qmodel.graph.node].count("Constant") == 0


def test_rtn_needs_no_data_and_obq_does(mlp_path, tmp_path, cli):
    out = tmp_path / "q.onnx"
    before = sha(mlp_path)
    r = cli("quantize", mlp_path, "-o", out, "--method", "rtn", "--bits", "8", "-q")
    assert r.exit_code == 0, r.stderr
    assert sha(mlp_path) == before and out.exists()
    assert_one_line_error(cli("quantize", mlp_path, "-o", tmp_path / "b.onnx", "--method", "obq"),
                          "calibration data", "--calib")
    assert not (tmp_path / "b.onnx").exists()


@pytest.mark.parametrize("extra,words", [
    (["--bits", "3"], ["--bits must be 8 or 4"]),
    (["--group-size", "0"], ["--group-size"]),
    (["--method", "fast"], ["obq, gptq, rtn"]),
    (["--method", "rtn", "--act-order"], ["--act-order"]),
    (["--format", "qoperator"], ["--format"]),
])
def test_bad_quantize_flags_fail_in_one_line(mlp_path, mlp_calib, tmp_path, cli, extra, words):
    out = tmp_path / "q.onnx"
    assert_one_line_error(cli("quantize", mlp_path, "--calib", mlp_calib, "-o", out, *extra), *words)
    assert not out.exists()


def test_prune_bits_flags(mlp_path, mlp_calib, tmp_path, cli):
    out = tmp_path / "p.onnx"
    assert_one_line_error(cli(*prune_args(mlp_path, out, "--calib", mlp_calib, "--group-size", "32")),
                          "--bits")
    assert_one_line_error(cli(*prune_args(mlp_path, out, "--calib", mlp_calib, "--bits", "4",
                                          "--structure", "neurons")), "--structure")
    r = cli(*prune_args(mlp_path, out, "--calib", mlp_calib, "--bits", "4", "--sparsity", "0.3",
                        "--quant-method", "gptq", "--report", tmp_path / "r.json"))
    assert r.exit_code == 0, r.stderr
    import json
    d = json.loads((tmp_path / "r.json").read_text())
    assert d["settings"]["bits"] == 4 and d["settings"]["quant_method"] == "gptq"
    assert [q["method"] for q in d["quantization"]] == ["gptq"] * 3
    assert "latency_ms_batch_1" in d["costs"] and d["totals"]["file_size_after"] < 0.2 * d["totals"]["file_size_before"]


def test_toml_quantize_table(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[quantize]\nbits = 4\ngroup_size = 64\nsymmetric = false\n")
    c = PruneConfig.from_toml(f)
    assert (c.quantize.bits, c.quantize.group_size, c.quantize.symmetric, c.mode) == (4, 64, False, "quantize")


def nbits_model():
    """MatMul (K=40, not a multiple of the blocks), Gemm transB=1 with a bias, Gemm transB=0."""
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm"),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "W2", "b2"], ["g"], name="gemm", transB=1),
             helper.make_node("Gemm", ["g", "W3"], ["y"], name="gemm2")]
    inits = [graphs.init("W1", graphs.randn([40, 64], 1)), graphs.init("W2", graphs.randn([48, 64], 2)),
             graphs.init("b2", graphs.randn([48], 3)), graphs.init("W3", graphs.randn([48, 6], 4))]
    return graphs.make_model(nodes, [graphs.vi("x", shape=["n", 40])], [graphs.vi("y", shape=None)], inits)


@pytest.mark.parametrize("group_size,symmetric", [(-1, True), (16, False), (32, True)])
def test_matmul_nbits_computes_what_the_checked_qdq_model_computes(group_size, symmetric):
    model = nbits_model()
    feeds = {"x": graphs.randn([64, 40], 5)}
    settings = dict(bits=4, group_size=group_size, symmetric=symmetric)
    qdq, _ = api.quantize(model, feeds, **settings)
    nbits, report = api.quantize(model, feeds, format="matmulnbits", **settings)
    assert [n.op_type for n in nbits.graph.node] == ["MatMulNBits", "Relu", "MatMulNBits", "MatMulNBits"]
    assert not report.notes
    weights = check_quantized(model, qdq, feeds, n_sites=3)  # the QDQ model against the spec
    twin = graphs.run(float_twin(model, weights), feeds)["y"]
    np.testing.assert_allclose(graphs.run(nbits, feeds)["y"], twin, rtol=1e-4, atol=1e-3)
    # 4 bits per weight plus a scale per block (the MatMul's K=40 padded to whole blocks)
    weights = sum(t.dims[0] * t.dims[1] * t.dims[2] for t in nbits.graph.initializer if t.name.endswith("_nbits"))
    assert weights == sum(-(-k // b) * b // 2 * n for k, n, b in
                          [(40, 64, 16 if group_size == 16 else 64), (64, 48, 64 if group_size != 16 else 16),
                           (48, 6, 64 if group_size == -1 else group_size)])


def test_matmul_nbits_leaves_conv_as_qdq_and_says_so(cnn_path, cnn_calib):
    model, report = api.quantize(str(cnn_path), str(cnn_calib), bits=4, group_size=32, quant_method="rtn",
                                 format="matmulnbits", max_samples=32)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulNBits") == 2 and ops.count("DequantizeLinear") == 3
    assert any("--format matmulnbits: stored as DequantizeLinear" in n and "Conv_45" in n for n in report.notes)


def test_magnitude_pruning_and_rtn_need_no_data(mlp_path):
    original = onnx.load(mlp_path)
    model, report = api.prune(str(mlp_path), None, method="magnitude", sparsity=0.5, bits=8,
                              quant_method="rtn")
    weights = dequantize_by_spec(model)
    for t in original.graph.initializer:
        if t.name in weights:  # the largest half kept, each within half a step of its grid point
            w, wq = numpy_helper.to_array(t), weights[t.name]
            assert np.mean(wq == 0) >= 0.5 and np.all(wq[np.abs(w) > np.median(np.abs(w)) * 1.01] != 0)
    assert report.sites[0].measured_error is None and not report.deviation


@pytest.mark.parametrize("opset,bits,group_size,need", [(11, 8, -1, 13), (11, 4, -1, 21), (13, 8, -1, 13)])
def test_opset_raised_only_as_far_as_needed(opset, bits, group_size, need):
    model = graphs.mlp_model(opset=opset, sizes=(16, 12, 4))
    feeds = graphs.calib_for(model, n=32)
    qmodel, report = api.quantize(model, feeds, bits=bits, group_size=group_size, min_params=0)
    assert next(o.version for o in qmodel.opset_import if o.domain == "") == need
    assert any(f"opset raised from {opset} to {need}" in n for n in report.notes) == (opset < need)
    assert next(o.version for o in model.opset_import if o.domain == "") == opset  # input untouched
    check_quantized(model, qmodel, feeds, n_sites=2)


@pytest.mark.parametrize("group_size,symmetric", [(-1, True), (16, False)])
def test_zeros_of_quantized_weights_are_counted_in_both_formats(group_size, symmetric):
    """quantized_zeros counts codes at their zero point; the independent count is exact zeros of
    the weights dequantized by the spec (the MatMulNBits file holds the same codes, checked above)."""
    from onnx_obs.evaluate import weight_sparsity
    from onnx_obs.graph.model_io import from_proto
    from onnx_obs.graph.quant_format import quantized_zeros

    model = nbits_model()
    feeds = {"x": graphs.randn([64, 40], 5)}
    settings = dict(sparsity=0.5, bits=4, group_size=group_size, symmetric=symmetric, allocation="uniform")
    qdq, _ = api.prune(model, feeds, **settings)
    nbits, _ = api.prune(model, feeds, format="matmulnbits", **settings)
    weights = dequantize_by_spec(qdq)
    want = (sum(int(np.count_nonzero(w == 0)) for w in weights.values()), sum(w.size for w in weights.values()))
    assert want[0] >= 0.5 * want[1]
    assert quantized_zeros(qdq) == want
    assert quantized_zeros(nbits) == want
    assert weight_sparsity(nbits, from_proto(nbits)) == pytest.approx(want[0] / want[1])
