"""--no-batching: inputs not batched on axis 0 (a scalar, a recurrent state batched on axis 1)
fed whole, one onnxruntime run per file / KEY__k group / feed, checked against numpy."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from cli_checks import assert_one_line_error
from graphs import init, make_model, mlp_model, randn, save, vi
from onnx_obs import api
from onnx_obs.calib import load_calibration
from onnx_obs.errors import OnnxObsError

W = randn([4, 3], seed=7)
ROWS = (5, 3, 6)  # samples per run


def scale_model() -> onnx.ModelProto:
    """y = (x * scale) @ W: x [batch, 4], scale a rank-0 scalar fed once per run. The scalar is
    the first input: sample counting must not read it as the batch."""
    nodes = [helper.make_node("Mul", ["x", "scale"], ["h"], name="mul"),
             helper.make_node("MatMul", ["h", "W"], ["y"], name="mm")]
    return make_model(nodes, [vi("scale", np.float32, []), vi("x", np.float32, ["batch", 4])],
                      [vi("y", np.float32, ["batch", 3])], [init("W", W)])


def state_model() -> onnx.ModelProto:
    """y = (x + state[0]) @ W: state [1, batch, 4] is batched on axis 1, as an RNN state."""
    nodes = [helper.make_node("Squeeze", ["state", "axes"], ["s"], name="squeeze"),
             helper.make_node("Add", ["x", "s"], ["h"], name="add"),
             helper.make_node("MatMul", ["h", "W"], ["y"], name="mm")]
    return make_model(nodes, [vi("x", np.float32, ["batch", 4]), vi("state", np.float32, [1, "batch", 4])],
                      [vi("y", np.float32, ["batch", 3])], [init("W", W), init("axes", np.array([0]))])


def scale_runs() -> list[dict]:
    return [{"scale": np.float32(0.5 + k), "x": randn([n, 4], seed=k)} for k, n in enumerate(ROWS)]


def state_runs() -> list[dict]:
    return [{"x": randn([n, 4], seed=k), "state": randn([1, n, 4], seed=10 + k)} for k, n in enumerate(ROWS)]


def layer_inputs(runs, model_name: str) -> np.ndarray:
    """The MatMul's input rows h over all runs, computed in numpy."""
    if model_name == "scale":
        return np.concatenate([r["x"] * r["scale"] for r in runs]).astype(np.float64)
    return np.concatenate([r["x"] + r["state"][0] for r in runs]).astype(np.float64)


def numpy_hessian(h: np.ndarray) -> np.ndarray:
    return 2.0 * h.T @ h / len(h)


MODELS = {"scale": (scale_model, scale_runs), "state": (state_model, state_runs)}


def write_dir(tmp_path, runs, name="runs"):
    d = tmp_path / name
    d.mkdir()
    for k, r in enumerate(runs):
        np.savez(d / f"run{k:02d}.npz", **r)
    return d


def write_suffixed(tmp_path, runs, name="runs.npz"):
    path = tmp_path / name
    np.savez(path, **{f"{key}__{k}": v for k, r in enumerate(runs) for key, v in r.items()})
    return path


def pruned_w(path) -> np.ndarray:
    m = onnx.load(str(path))
    return next(numpy_helper.to_array(t) for t in m.graph.initializer if t.name == "W")


# ---------------------------------------------------------------- Hessians and pruning

@pytest.mark.parametrize("kind", MODELS)
def test_api_feeds_hessian_matches_numpy(kind):
    make, runs = MODELS[kind]
    feeds = runs()
    cache = {}
    res = api.prune(make(), feeds, sparsity=0.5, sequential=False, hessians=cache, batching=False)
    H = numpy_hessian(layer_inputs(feeds, kind))
    np.testing.assert_allclose(cache["W"][0], H, rtol=1e-5, atol=1e-6)
    assert res.report.calibration_samples == len(ROWS)  # runs
    # The reported layer error is mean_k ||(W - W') h_k||^2 over every row of every run.
    new = numpy_helper.to_array(next(t for t in res.model.graph.initializer if t.name == "W"))
    h = layer_inputs(feeds, kind)
    err = np.mean(np.sum((h @ (W - new).astype(np.float64)) ** 2, axis=1))
    assert res.report.sites[0].measured_error == pytest.approx(err, rel=1e-5)
    assert np.mean(new == 0) == 0.5


@pytest.mark.parametrize("kind", MODELS)
def test_cli_directory_and_suffixes_equal_feeds(cli, tmp_path, kind):
    make, runs = MODELS[kind]
    model = save(make(), tmp_path / "m.onnx")
    expected = api.prune(make(), runs(), sparsity=0.5, batching=False).model
    want = numpy_helper.to_array(next(t for t in expected.graph.initializer if t.name == "W"))
    for k, source in enumerate((write_dir(tmp_path, runs()), write_suffixed(tmp_path, runs()))):
        out, rep = tmp_path / f"out{k}.onnx", tmp_path / f"r{k}.json"
        r = cli("prune", model, "--calib", source, "--no-batching", "-o", out, "--report", rep, "-q")
        assert r.exit_code == 0, r.stderr
        np.testing.assert_array_equal(pruned_w(out), want)
        report = json.loads(rep.read_text())
        assert report["calibration_samples"] == len(ROWS) and not report["settings"]["batching"]


def test_plain_npz_is_one_run(tmp_path):
    run = scale_runs()[1]
    np.savez(tmp_path / "one.npz", **run)
    cal = load_calibration(tmp_path / "one.npz", scale_model(), batching=False, batch_size=2)
    assert cal.num_samples == 1 and len(cal.batches) == 1
    np.testing.assert_array_equal(cal.batches[0]["x"], run["x"])
    assert cal.batches[0]["scale"].shape == ()


def test_suffix_runs_in_numeric_order_and_max_samples(tmp_path):
    runs = scale_runs()
    path = tmp_path / "r.npz"
    np.savez(path, **{f"{key}__{k * 5}": v for k, r in enumerate(runs) for key, v in r.items()})  # 0, 5, 10
    cal = load_calibration(path, scale_model(), batching=False)
    assert [len(b["x"]) for b in cal.batches] == list(ROWS)
    cal = load_calibration(path, scale_model(), batching=False, max_samples=2)
    assert cal.num_samples == 2 and [len(b["x"]) for b in cal.batches] == list(ROWS[:2])


def test_scalar_first_feeds_count_samples_with_batching():
    """Batched feeds (the default) with a scalar first: the batch is the other inputs' axis 0."""
    feeds = scale_runs()
    cal = load_calibration(feeds, scale_model())
    assert cal.num_samples == sum(ROWS)
    res = api.prune(scale_model(), feeds, hessian="full", method="obs", sparsity=0.5)
    full = res.report.full_network
    assert full["samples"] == sum(ROWS)
    # y = h W: dy_u / dW_iu = h_i, so mean diag(H) = (1/P) sum_k ||h_k||^2 / 4.
    h = layer_inputs(feeds, "scale")
    assert full["mean_diag_h"] == pytest.approx(np.sum(h * h) / len(h) / 4, rel=1e-4)


def test_directory_with_batching_concatenates_files(tmp_path):
    model = mlp_model(sizes=(4, 3, 2))
    parts = [randn([n, 4], seed=k) for k, n in enumerate(ROWS)]
    d = tmp_path / "parts"
    d.mkdir()
    for k, x in enumerate(parts):
        np.savez(d / f"p{k}.npz", x=x)
    cal = load_calibration(d, model, batch_size=4)
    assert cal.num_samples == sum(ROWS) and cal.batched
    assert [len(b["x"]) for b in cal.batches] == [4, 1, 3, 4, 2]  # each file batched on its own
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in cal.batches]), np.concatenate(parts))
    assert load_calibration(d, model, batch_size=4, max_samples=7).num_samples == 7


# ---------------------------------------------------------------- evaluate and compare

def test_evaluate_cli_no_batching_with_labels(cli, tmp_path):
    model = save(scale_model(), tmp_path / "m.onnx")
    pruned = tmp_path / "p.onnx"
    runs = scale_runs()
    for k, r in enumerate(runs):
        r["label"] = np.arange(len(r["x"])) % 3
    data = write_dir(tmp_path, runs)
    assert cli("prune", model, "--calib", data, "--labels", "label", "--no-batching", "-o", pruned,
               "-q").exit_code == 0
    r = cli("evaluate", model, pruned, "--data", data, "--no-batching", "--repeats", "1", "--json")
    assert r.exit_code == 0, r.stderr
    got = json.loads(r.stdout)
    h = layer_inputs(runs, "scale")
    y0, y1 = h @ W, h @ pruned_w(pruned)
    labels = np.concatenate([r["label"] for r in runs])
    assert got["samples"] == len(ROWS) and got["batch_size"] is None
    assert got["outputs"]["y"]["relative_mse"] == pytest.approx(np.sum((y0 - y1) ** 2) / np.sum(y0 ** 2), rel=1e-4)
    assert got["pruned"]["accuracy"] == pytest.approx(np.mean(y1.argmax(1) == labels))
    assert got["original"]["accuracy"] == pytest.approx(np.mean(y0.argmax(1) == labels))


def test_compare_cli_no_batching(cli, tmp_path):
    model = save(state_model(), tmp_path / "m.onnx")
    data = write_suffixed(tmp_path, state_runs())
    out = tmp_path / "c.json"
    r = cli("compare", model, "--calib", data, "--no-batching", "--methods", "magnitude,obs",
            "--sparsities", "0.5", "--json", out, "-q")
    assert r.exit_code == 0, r.stderr
    got = json.loads(out.read_text())
    assert got["calibration"]["samples"] == got["eval"]["samples"] == len(ROWS)
    # Magnitude at 50%: the 6 smallest |W| of 12 removed, no correction.
    Wm = np.where(np.abs(W) <= np.sort(np.abs(W).ravel())[5], 0, W)
    h = layer_inputs(state_runs(), "state")
    y0, y1 = h @ W, h @ Wm
    row = next(r for r in got["rows"] if r["method"] == "magnitude")
    assert row["relative_mse"] == pytest.approx(np.sum((y0 - y1) ** 2) / np.sum(y0 ** 2), rel=1e-4)
    obs = next(r for r in got["rows"] if r["method"] == "obs")
    assert obs["relative_mse"] < row["relative_mse"]


# ---------------------------------------------------------------- errors

def _bad_runs(kind, change):
    runs = MODELS[kind][1]()
    change(runs)
    return runs


def _nan(runs):
    runs[1]["x"][0, 0] = np.nan


def _empty(runs):
    runs[0]["x"] = np.zeros([0, 4], np.float32)


def _lossy(runs):
    runs[2]["scale"] = np.float64(0.1)


def _state_axis0(runs):
    runs[0]["state"] = np.concatenate([runs[0]["state"]] * 2)


@pytest.mark.parametrize("kind,change,words", [
    ("scale", _nan, ["run01.npz", "'x'", "NaN/Inf"]),
    ("scale", _empty, ["run00.npz", "'x'", "empty"]),
    ("scale", _lossy, ["run02.npz", "'scale'", "float32", "float64"]),
    ("state", _state_axis0, ["run00.npz", "'state'", "axis 0 must be 1"]),
])
def test_invalid_run_in_directory(cli, tmp_path, kind, change, words):
    model = save(MODELS[kind][0](), tmp_path / "m.onnx")
    data = write_dir(tmp_path, _bad_runs(kind, change))
    out = tmp_path / "out.onnx"
    assert_one_line_error(cli("prune", model, "--calib", data, "--no-batching", "-o", out), *words)
    assert not out.exists()


def test_batching_refuses_inputs_not_batched_on_axis_0(cli, tmp_path):
    for kind, words in (("scale", ["'scale'", "scalar", "--no-batching"]),
                        ("state", ["'state'", "x=5", "state=1", "--no-batching"])):
        model = save(MODELS[kind][0](), tmp_path / f"{kind}.onnx")
        np.savez(tmp_path / f"{kind}.npz", **MODELS[kind][1]()[0])
        out = tmp_path / "out.onnx"
        assert_one_line_error(cli("prune", model, "--calib", tmp_path / f"{kind}.npz", "-o", out), *words)
        assert not out.exists()
    # A scalar input given one value per sample.
    with pytest.raises(OnnxObsError, match="'scale' expects rank 0.*--no-batching"):
        load_calibration({"x": randn([4, 4]), "scale": randn([4])}, scale_model())
    # The same state fed batched on axis 0 through the API: the error names it too.
    with pytest.raises(OnnxObsError, match="'state' is not batched on axis 0.*batching=False"):
        load_calibration(state_runs(), state_model())


def test_suffix_errors(cli, tmp_path):
    model = save(scale_model(), tmp_path / "m.onnx")
    runs = scale_runs()
    missing = {f"{key}__{k}": v for k, r in enumerate(runs) for key, v in r.items()}
    del missing["scale__1"]
    np.savez(tmp_path / "missing.npz", **missing)
    mixed = {"x__0": runs[0]["x"], "x__1": runs[1]["x"], "scale": runs[0]["scale"]}
    np.savez(tmp_path / "mixed.npz", **mixed)
    out = tmp_path / "out.onnx"
    assert_one_line_error(cli("prune", model, "--calib", tmp_path / "missing.npz", "--no-batching", "-o", out),
                   "'scale'", "run 1", "scale__1")
    assert_one_line_error(cli("prune", model, "--calib", tmp_path / "mixed.npz", "--no-batching", "-o", out),
                   "'scale'", "no run suffix")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(cli("prune", model, "--calib", tmp_path / "empty", "--no-batching", "-o", out),
                   "no .npz files")
    assert not out.exists()


def test_onnxruntime_failure_names_the_inputs(cli, tmp_path):
    """Shapes the declared dims allow but the graph cannot broadcast: x [5, 4] + state[0] [4, 4]."""
    model = save(state_model(), tmp_path / "m.onnx")
    runs = state_runs()
    runs[0]["state"] = randn([1, 4, 4])
    out = tmp_path / "out.onnx"
    assert_one_line_error(cli("prune", model, "--calib", write_dir(tmp_path, runs), "--no-batching", "-o", out),
                   "onnxruntime failed to run", "x float32[5, 4]", "state float32[1, 4, 4]")
    assert not out.exists()
