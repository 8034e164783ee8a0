"""--activations int8 (graph/activation_qdq.py, algorithms/activation_ranges.py) checked
independently: QDQ scales against numpy min-max / percentiles of the float model's activations
(run by onnxruntime), the written model against a numpy fake-quant simulation, onnxruntime's
optimized graph for its integer kernels."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import graphs
from cli_checks import assert_one_line_error, prune_args, sha
from onnx_obs import api
from onnx_obs.config import PruneConfig
from test_quantize import dequantize_by_spec, nbits_model


def act_grids(model: onnx.ModelProto) -> dict[str, tuple[float, int]]:
    """tensor -> (scale, zero point) of the activation QuantizeLinear reading it."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.input[0]: (float(inits[n.input[1]]), int(inits[n.input[2]]))
            for n in model.graph.node if n.op_type == "QuantizeLinear"}


def expected_grid(lo: float, hi: float) -> tuple[float, int]:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = np.float32((hi - lo) / 255)
    return float(scale), int(np.clip(np.round(-lo / scale), 0, 255))


def fq(x: np.ndarray, scale: float, zero: int) -> np.ndarray:
    """QuantizeLinear (round half to even, saturate to uint8) then DequantizeLinear."""
    return (np.clip(np.rint(x / np.float32(scale)) + zero, 0, 255) - zero) * np.float32(scale)


def u8s8_may_saturate() -> bool:
    """onnxruntime's uint8 x int8 kernels on x86 without VNNI add pairs of products in int16 with
    saturation (its quantization docs: use reduce_range there), so a fused model may be off by
    more than the grids' rounding."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return "avx2" in flags and not flags & {"avx512_vnni", "avx_vnni"}


def optimized_ops(model: onnx.ModelProto, tmp_path) -> set[str]:
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}


@pytest.mark.parametrize("calibration", ["minmax", "percentile"])
def test_scales_are_the_calibration_ranges(calibration):
    model = graphs.cnn_model()
    feeds = graphs.calib_for(model, n=48)
    out, report = api.quantize(model, feeds, quant_method="rtn", activations="int8", min_params=0,
                               activation_calibration=calibration, activation_percentile=99.0)
    acts = graphs.run_tensors(model, feeds, ["x", "r", "f", "y"])  # the float model's tensors
    grids = act_grids(out)
    assert set(grids) == {"x", "r", "f", "y_float"}  # inputs of conv and fc, their outputs (after conv's Relu)
    grids["y"] = grids.pop("y_float")  # the graph output keeps its name, now DequantizeLinear's
    for name, a in acts.items():
        lo, hi = (a.min(), a.max()) if calibration == "minmax" else np.percentile(a, [1.0, 99.0])
        scale, zero = expected_grid(float(lo), float(hi))
        assert grids[name][0] == pytest.approx(scale, rel=1e-6) and grids[name][1] == zero
    assert grids["r"][1] == 0  # a Relu output: zero point 0, so onnxruntime drops the Relu
    assert [a["name"] for a in report.activations] == ["x", "r", "f", "y"]
    assert [o.name for o in out.graph.output] == ["y"]


def test_model_computes_the_fake_quant_simulation(tmp_path):
    """x -> fq -> Gemm -> Relu -> fq -> Gemm -> fq: numpy with the written grids and dequantized
    weights against onnxruntime without fusion (same float arithmetic) and with its integer
    kernels (requantization may round a hidden value the other way: one step of the hidden grid
    through the last layer, then one step of the output grid)."""
    model = graphs.mlp_model(sizes=(16, 24, 5))
    feeds = graphs.calib_for(model, n=64)
    out, _ = api.quantize(model, feeds, activations="int8", min_params=0)
    w = dequantize_by_spec(out)
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    g = act_grids(out)
    assert set(g) == {"x", "h0", "y_float"}
    x = feeds["x"]
    h = np.maximum(fq(x, *g["x"]) @ w["fc0.weight"].T + inits["fc0.bias"], 0)
    want = fq(fq(h, *g["h0"]) @ w["fc1.weight"].T + inits["fc1.bias"], *g["y_float"])
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain = ort.InferenceSession(out.SerializeToString(), so, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(plain.run(None, {"x": x})[0], want, rtol=1e-4, atol=1e-4)
    fused = graphs.session(out).run(None, {"x": x})[0]
    step = g["h0"][0] * np.abs(w["fc1.weight"]).sum(axis=1).max() + g["y_float"][0]
    if not u8s8_may_saturate():
        assert np.abs(fused - want).max() <= step * 1.01
    assert "QGemm" in optimized_ops(out, tmp_path)


def test_onnxruntime_runs_integer_kernels(tmp_path):
    conv, _ = api.quantize(graphs.cnn_model(), graphs.calib_for(graphs.cnn_model()), activations="int8",
                           quant_method="rtn", min_params=0)
    assert {"QLinearConv"} <= optimized_ops(conv, tmp_path)
    model = nbits_model()
    mm, _ = api.quantize(model, graphs.calib_for(model), activations="int8", min_params=0)
    assert {"QLinearMatMul", "QGemm"} <= optimized_ops(mm, tmp_path)
    weight_only, _ = api.quantize(model, graphs.calib_for(model), min_params=0)
    assert not {"QLinearMatMul", "QGemm"} & optimized_ops(weight_only, tmp_path)


def test_hessians_see_the_quantized_inputs(mlp_path, mlp_calib):
    """The first layer's measured error is mean ||(W - Wq) fq(x)||^2 over the calibration inputs
    through the written input grid (the fake-quantized activations), not over x."""
    original = onnx.load(mlp_path)
    model, report = api.quantize(str(mlp_path), str(mlp_calib), activations="int8", quant_method="gptq")
    x = np.load(mlp_calib)["input"]
    xq = fq(x, *act_grids(model)["input"]).astype(np.float64)
    first = report.sites[0]
    W = numpy_helper.to_array(next(t for t in original.graph.initializer if t.name == first.name))
    dW = (W - dequantize_by_spec(model)[first.name]).astype(np.float64)

    def on(a):
        return np.mean(np.sum((dW @ a.T) ** 2, axis=0))

    assert first.measured_error == pytest.approx(on(xq), rel=1e-5)
    assert first.measured_error != pytest.approx(on(x.astype(np.float64)), rel=1e-3)


def test_prune_bits_8_with_activations(mlp_path, mlp_calib, tmp_path, cli):
    out, before = tmp_path / "p.onnx", sha(mlp_path)
    r = cli(*prune_args(mlp_path, out, "--calib", mlp_calib, "--sparsity", "0.3", "--bits", "8",
                        "--activations", "int8", "--activation-calibration", "percentile",
                        "--report", tmp_path / "r.json"))
    assert r.exit_code == 0, r.stderr
    assert sha(mlp_path) == before
    d = json.loads((tmp_path / "r.json").read_text())
    assert d["settings"]["activations"] == "int8" and len(d["activations"]) == 4  # 3 inputs, the logits
    model = onnx.load(out)
    weights = dequantize_by_spec(model)
    assert all(np.mean(w == 0) >= 0.29 for n, w in weights.items() if n.endswith("weight"))
    assert "QGemm" in optimized_ops(model, tmp_path)


@pytest.mark.parametrize("extra,words", [
    (["--bits", "4", "--activations", "int8"], ["--bits 8"]),
    (["--format", "matmulnbits", "--bits", "4", "--activations", "int8"], ["--bits 8"]),
    (["--activations", "int4"], ["--activations", "none, int8"]),
    (["--activation-calibration", "entropy", "--activations", "int8"], ["minmax, percentile"]),
    (["--activation-calibration", "percentile"], ["--activations int8"]),
    (["--activations", "int8", "--activation-calibration", "percentile", "--activation-percentile", "40"],
     ["(50, 100]"]),
])
def test_bad_activation_flags_fail_in_one_line(mlp_path, mlp_calib, tmp_path, cli, extra, words):
    out = tmp_path / "q.onnx"
    assert_one_line_error(cli("quantize", mlp_path, "--calib", mlp_calib, "-o", out, *extra), *words)
    assert not out.exists()


def test_activations_need_calibration_data(mlp_path, tmp_path, cli):
    r = cli("quantize", mlp_path, "-o", tmp_path / "q.onnx", "--method", "rtn", "--activations", "int8")
    assert_one_line_error(r, "--calib")


def test_toml_activation_settings(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[quantize]\nbits = 8\nactivations = "int8"\nactivation_calibration = "percentile"\n')
    q = PruneConfig.from_toml(f).quantize
    assert (q.activations, q.activation_calibration, q.activation_percentile) == ("int8", "percentile", 99.99)


def test_maxpool_output_shares_its_input_grid(tmp_path):
    """Conv -> Relu -> MaxPool -> Conv -> Relu -> Flatten -> Gemm: with percentile ranges the pool's
    output would get a grid of its own; it takes the Relu's (numpy percentiles of the Relu output),
    so onnxruntime pools on uint8 and no float MaxPool is left."""
    from onnx import helper
    inits = [graphs.init("w1", graphs.randn([6, 2, 3, 3], 1)), graphs.init("w2", graphs.randn([5, 6, 3, 3], 2)),
             graphs.init("fc", graphs.randn([3, 5 * 4 * 4], 3))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("MaxPool", ["r1"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p", "w2"], ["c2"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Flatten", ["r2"], ["f"]), helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1)]
    model = graphs.make_model(nodes, [graphs.vi("x", shape=["n", 2, 8, 8])], [graphs.vi("y", shape=None)], inits)
    feeds = graphs.calib_for(model, n=32)
    out, _ = api.quantize(model, feeds, quant_method="rtn", activations="int8", min_params=0,
                          activation_calibration="percentile", activation_percentile=99.0)
    g = act_grids(out)
    r1 = graphs.run_tensors(model, feeds, ["r1"])["r1"]
    assert g["p"] == g["r1"] == expected_grid(0.0, float(np.percentile(r1, 99.0)))
    assert g["f"] == g["r2"]
    ops = optimized_ops(out, tmp_path)
    assert "QLinearConv" in ops and "MaxPool" not in ops


def test_activation_range_and_grid():
    from onnx_obs.algorithms.activation_ranges import SAMPLE_PER_BATCH, ActivationRange, uint8_grid
    rng = np.random.default_rng(1)
    batches = [rng.uniform(0.5, 2.0, (7, 5)) * (i + 1) for i in range(3)]
    r = ActivationRange()
    for b in batches:
        r.add(b)
    assert r.range() == (0.0, pytest.approx(max(b.max() for b in batches), rel=1e-6))  # 0 always inside
    scale, zero = uint8_grid(-1.0, 3.0)
    assert scale == np.float32(4 / 255) and zero == 64  # round(1 / (4/255)) = round(63.75)
    assert uint8_grid(0.0, 0.0) == (1.0, 0)
    big = [rng.standard_normal(4 * SAMPLE_PER_BATCH).astype(np.float32) for _ in range(4)]
    p = ActivationRange("percentile", 99.0)
    for b in big:
        p.add(b)
    lo, hi = np.percentile(np.concatenate(big), [1.0, 99.0])
    assert p.range() == (pytest.approx(lo, rel=0.03), pytest.approx(hi, rel=0.03))
    with pytest.raises(ValueError):
        ActivationRange("entropy")
    with pytest.raises(ValueError):
        uint8_grid(0.5, 1.0)


def test_matmul_bias_add_joins_the_layer(tmp_path):
    """MatMul -> Add(bias) -> Relu -> MatMul -> Add(bias) = output: no QDQ pair between a MatMul
    and its bias (onnxruntime then makes each one QGemm, the last too, its output quantized)."""
    from onnx import helper
    inits = [graphs.init("W1", graphs.randn([12, 10], 1)), graphs.init("b1", graphs.randn([10], 2)),
             graphs.init("W2", graphs.randn([10, 4], 3)), graphs.init("b2", graphs.randn([4], 4))]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["m1"]), helper.make_node("Add", ["m1", "b1"], ["a1"]),
             helper.make_node("Relu", ["a1"], ["r1"]), helper.make_node("MatMul", ["r1", "W2"], ["m2"]),
             helper.make_node("Add", ["m2", "b2"], ["y"])]
    model = graphs.make_model(nodes, [graphs.vi("x", shape=["n", 12])], [graphs.vi("y", shape=None)], inits)
    feeds = graphs.calib_for(model, n=32)
    out, _ = api.quantize(model, feeds, quant_method="rtn", activations="int8", min_params=0)
    g = act_grids(out)
    assert set(g) == {"x", "r1", "y_float"}
    y = graphs.run_tensors(model, feeds, ["y"])["y"]
    assert g["y_float"] == expected_grid(float(y.min()), float(y.max()))
    ops = optimized_ops(out, tmp_path)
    assert "QGemm" in ops and not {"MatMul", "Gemm", "Add"} & ops
