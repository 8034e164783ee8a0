"""Safe defaults: tiny sites and fixed transforms stay dense (listed as skipped), recurrent
weights behind an Unsqueeze are listed, and inspect flags what to watch for."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from graphs import init, make_model, randn, vi
from onnx_obs import api
from onnx_obs.algorithms.fixed import fixed_transform
from onnx_obs.graph.sites import find_sites


def dfl_model(bins: int = 16, hidden: int = 64, seed: int = 0) -> onnx.ModelProto:
    """A learned Gemm (hidden x 4*bins) then, per box side, a softmax over `bins` and a 1x1 Conv
    with the weights 0..bins-1: the expected distance (a YOLO-style DFL decode)."""
    proj = np.arange(bins, dtype=np.float32).reshape(1, bins, 1, 1)
    inits = [init("fc.weight", randn([4 * bins, hidden], seed) * 0.3), init("dfl.weight", proj),
             init("shape", np.array([-1, 4, bins, 1], np.int64))]
    nodes = [helper.make_node("Gemm", ["x", "fc.weight"], ["h"], name="fc", transB=1),
             helper.make_node("Reshape", ["h", "shape"], ["h4"], name="split"),
             helper.make_node("Softmax", ["h4"], ["p"], name="softmax", axis=2),
             helper.make_node("Transpose", ["p"], ["pt"], name="t", perm=[0, 2, 1, 3]),
             helper.make_node("Conv", ["pt", "dfl.weight"], ["dist"], name="dfl")]
    return make_model(nodes, [vi("x", np.float32, ["n", hidden])], [vi("dist", np.float32, None)], inits)


def stft_basis(n_fft: int = 64) -> np.ndarray:
    """Real and imaginary rows of a Hann-windowed DFT, as audio front ends store them."""
    n, k = np.arange(n_fft), np.arange(n_fft // 2 + 1)[:, None]
    w = np.hanning(n_fft)
    return np.concatenate([np.cos(2 * np.pi * k * n / n_fft) * w, -np.sin(2 * np.pi * k * n / n_fft) * w])


@pytest.mark.parametrize("w, words", [
    (np.arange(16.0)[None], "0..15"),
    (np.eye(8), "identity"),
    (np.eye(6)[[2, 0, 5]], "selection"),
    (stft_basis(), "DFT/DCT/STFT"),
    (np.cos(np.pi / 32 * np.outer(np.arange(32), np.arange(32) + 0.5)), "DFT/DCT/STFT"),  # DCT-II
])
def test_fixed_transforms_are_recognised(w, words):
    assert words in fixed_transform(w)


def test_learned_weights_are_not_fixed_transforms(cnn_path, mlp_path):
    rng = np.random.default_rng(0)
    for shape in [(8, 16), (64, 64), (4, 40), (30, 33), (128, 256)]:
        assert fixed_transform(rng.standard_normal(shape)) is None
        assert fixed_transform(np.cumsum(rng.standard_normal(shape), axis=1)) is None  # smooth rows
    for path in (cnn_path, mlp_path):
        for s in find_sites(onnx.load(str(path)))[0]:
            assert fixed_transform(numpy_helper.to_array(s.tensor).reshape(s.shape[0], -1)) is None


def test_dfl_projection_stays_dense_and_the_decode_exact():
    model = dfl_model()
    x = randn([20, 64], 3)
    tiny = api.prune(model, {"x": x}, sparsity=0.5)   # 16 weights: below --min-params
    assert "fewer than --min-params" in {k["name"]: k["reason"] for k in tiny.report.skipped}["dfl.weight"]
    result = api.prune(model, {"x": x}, sparsity=0.5, min_params=0)   # recognised all the same
    skipped = {k["name"]: k["reason"] for k in result.report.skipped}
    assert "fixed transform" in skipped["dfl.weight"] and "0..15" in skipped["dfl.weight"]
    assert [s.name for s in result.report.sites] == ["fc.weight"]
    weights = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    np.testing.assert_array_equal(weights["dfl.weight"].ravel(), np.arange(16))
    assert np.mean(weights["fc.weight"] == 0) == pytest.approx(0.5)
    # named by --include, it is pruned after all
    forced = api.prune(model, {"x": x}, sparsity=0.5, include="dfl")
    assert [s.name for s in forced.report.sites] == ["dfl.weight"]


def mixed_model():
    """A 40-weight MatMul (below the default --min-params 64) after a 320-weight one."""
    inits = [init("big", randn([32, 10])), init("tiny", randn([10, 4], 1))]
    nodes = [helper.make_node("MatMul", ["x", "big"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "tiny"], ["y"], name="mm2")]
    return make_model(nodes, [vi("x", np.float32, ["n", 32])], [vi("y", np.float32, None)], inits)


def test_tiny_sites_stay_dense_unless_min_params_allows_them():
    model, x = mixed_model(), {"x": randn([16, 32], 2)}
    r = api.prune(model, x, method="magnitude", sparsity=0.5)
    assert [s.name for s in r.report.sites] == ["big"]
    reason = {k["name"]: k["reason"] for k in r.report.skipped}["tiny"]
    assert "40 weights, fewer than --min-params 64" in reason
    tiny = {t.name: numpy_helper.to_array(t) for t in r.model.graph.initializer}["tiny"]
    np.testing.assert_array_equal(tiny, numpy_helper.to_array(model.graph.initializer[1]))
    for kw in ({"min_params": 0}, {"min_params": 40}, {"include": "tiny|big"}):
        assert [s.name for s in api.prune(model, x, method="magnitude", **kw).report.sites] == ["big", "tiny"]
    # a model of tiny sites only is pruned in full
    assert [s.name for s in api.prune(model, x, method="magnitude", min_params=10**6).report.sites] == ["big", "tiny"]


def test_lstm_weights_behind_unsqueeze_are_listed_as_skipped():
    hidden, inp = 3, 4
    inits = [init("W2", randn([4 * hidden, inp])), init("R2", randn([4 * hidden, hidden], 1)),
             init("axes", np.array([0], np.int64))]
    nodes = [helper.make_node("Unsqueeze", ["W2", "axes"], ["W"]),
             helper.make_node("Unsqueeze", ["R2", "axes"], ["R"]),
             helper.make_node("LSTM", ["x", "W", "R"], ["y"], name="lstm", hidden_size=hidden)]
    model = make_model(nodes, [vi("x", np.float32, [5, 2, inp])], [vi("y", np.float32, None)], inits)
    sites, skipped = find_sites(model)
    assert not sites
    assert {k.name: k.op_type for k in skipped} == {"W2": "LSTM", "R2": "LSTM"}
    assert all("recurrent" in k.reason for k in skipped)


def test_inspect_shows_inputs_outputs_and_flags(cli, tmp_path):
    path = tmp_path / "dfl.onnx"
    onnx.save(dfl_model(), str(path))
    r = cli("inspect", path, "--json")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["n", 64]}]
    assert [o["name"] for o in d["outputs"]] == ["dist"]
    flags = {s["name"]: s["flags"] for s in d["sites"]}
    assert flags["fc.weight"] == []
    assert any("fixed transform" in f for f in flags["dfl.weight"])
    assert any("feeds the graph output 'dist'" in f for f in flags["dfl.weight"])
    text = cli("inspect", path)
    assert "float32[n, 64]" in text.stdout and "dfl.weight (!)" in text.stdout
    assert "dfl.weight: looks like a fixed transform" in text.stdout


def test_a_reshaped_constant_activation_leaves_the_weight_a_site():
    # following Reshape/Unsqueeze for recurrent ops must not turn a constant activation into a
    # second "weight" that hides the real one
    inits = [init("table", randn([12])), init("shape", np.array([3, 4], np.int64)), init("W", randn([4, 5], 1))]
    nodes = [helper.make_node("Reshape", ["table", "shape"], ["a"]),
             helper.make_node("MatMul", ["a", "W"], ["y"], name="mm")]
    model = make_model(nodes, [], [vi("y", np.float32, None)], inits)
    sites, skipped = find_sites(model)
    assert [s.name for s in sites] == ["W"] and not skipped
