"""evaluate: its numbers against metrics computed directly from onnxruntime outputs with numpy."""

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from onnx_obs.cli import app
from onnx_obs.errors import OnnxObsError
from onnx_obs.evaluate import evaluate, parse_thresholds

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
MLP, CNN = SAMPLES / "digits_mlp.onnx", SAMPLES / "digits_cnn.onnx"
EVAL, CALIB = SAMPLES / "digits_mlp_eval.npz", SAMPLES / "digits_mlp_calib.npz"


def logits(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


@pytest.fixture(scope="module")
def changed(tmp_path_factory):
    """The MLP with one weight of its last layer raised by 3.0."""
    model = onnx.load(str(MLP))
    t = next(t for t in model.graph.initializer if t.name == "4.weight")
    w = numpy_helper.to_array(t).copy()
    w[3, 5] += 3.0
    t.CopyFrom(numpy_helper.from_array(w, t.name))
    path = tmp_path_factory.mktemp("eval") / "changed.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def data():
    with np.load(EVAL) as z:
        return z["input"], z["label"]


@pytest.fixture(scope="module")
def expected(changed, data):
    x, y = data
    a, b = logits(MLP, x).astype(np.float64), logits(changed, x).astype(np.float64)
    top5 = np.argsort(-b, axis=1)[:, :5]
    return {
        "relative_mse": np.sum((a - b) ** 2) / np.sum(a**2),
        "max_abs_error": np.max(np.abs(a - b)),
        "cosine": np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b)),
        "top1_agreement": np.mean(a.argmax(1) == b.argmax(1)),
        "top5_agreement": np.mean([a.argmax(1)[i] in top5[i] for i in range(len(a))]),
        "accuracy_original": np.mean(a.argmax(1) == y),
        "accuracy_pruned": np.mean(b.argmax(1) == y),
    }


def test_identical_models_agree_exactly(data):
    r = evaluate(str(MLP), str(MLP), str(EVAL), repeats=1)
    out = r.outputs["logits"]
    assert out["relative_mse"] == 0 and out["max_abs_error"] == 0
    assert out["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert out["top1_agreement"] == 1.0 and out["top5_agreement"] == 1.0
    x, y = data
    direct = np.mean(logits(MLP, x).argmax(1) == y)
    assert r.original.accuracy == r.pruned.accuracy == pytest.approx(direct)
    assert r.labels == "label" and "using key 'label'" in r.notes[0]
    assert r.samples == 450
    assert r.original.file_size == MLP.stat().st_size
    for model in (r.original, r.pruned):
        lat = model.latency_ms
        assert lat.pass_ms > 0 and lat.batch1_ms > 0


def test_one_changed_weight_matches_numpy(changed, expected):
    r = evaluate(str(MLP), str(changed), str(EVAL), batch_size=50, repeats=0)
    out = r.outputs["logits"]
    for key in ("relative_mse", "max_abs_error", "cosine", "top1_agreement", "top5_agreement"):
        assert out[key] == pytest.approx(expected[key], rel=1e-6), key
    assert out["relative_mse"] > 0 and expected["top1_agreement"] < 1  # the change shows
    assert r.original.accuracy == pytest.approx(expected["accuracy_original"])
    assert r.pruned.accuracy == pytest.approx(expected["accuracy_pruned"])
    assert r.original.latency_ms is None and r.batch_size == 50


def test_no_labels_without_a_label_key():
    r = evaluate(str(MLP), str(MLP), str(CALIB), repeats=0)
    assert r.labels is None and r.original.accuracy is None and r.notes == []


def regression_data(tmp_path):
    """A model with one output per sample ([batch, 1], a regressor) and data holding a 'label'
    array of targets, as a user's held-out file often does."""
    from graphs import init, make_model, randn, vi
    from onnx import helper
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
                       [vi("x", shape=["batch", 6])], [vi("y", shape=["batch", 1])],
                       [init("W", randn([6, 1]))])
    path, data = tmp_path / "reg.onnx", tmp_path / "reg.npz"
    onnx.save(model, str(path))
    np.savez(data, x=randn([40, 6], 1), label=randn([40], 2))
    return path, data


def test_found_label_key_without_class_scores_is_not_an_error(tmp_path):
    path, data = regression_data(tmp_path)
    r = evaluate(str(path), str(path), str(data), repeats=0)
    assert r.labels is None and r.original.accuracy is None
    assert "not used as labels" in r.notes[0] and r.outputs["y"]["relative_mse"] == 0
    with pytest.raises(OnnxObsError, match="drop --labels"):   # named: still an error
        evaluate(str(path), str(path), str(data), labels="label", repeats=0)


def test_a_lone_array_under_another_key_is_used_with_a_note(tmp_path, data):
    x, _ = data
    np.savez(tmp_path / "x.npz", x)                     # key arr_0; the model's input is 'input'
    note = (f"{tmp_path / 'x.npz'}: key 'arr_0' is not an input name: its array was fed to the "
            "model's only input 'input'")
    r = evaluate(str(MLP), str(MLP), str(tmp_path / "x.npz"), repeats=0)
    assert r.notes == [note] and r.samples == len(x)
    res = run(MLP, "--data", tmp_path / "x.npz")   # (a long path may be folded: the note's end)
    assert res.exit_code == 0 and note.split(": ", 1)[1] in " ".join(res.stdout.split())


def test_cli_notes_are_printed_verbatim(tmp_path):
    path, data = regression_data(tmp_path)   # the note holds "[batch, classes]", not markup
    res = CliRunner().invoke(app, ["evaluate", str(path), str(path), "--data", str(data),
                                   "--repeats", "0"])
    assert res.exit_code == 0, res.output
    assert "a 2-D float [batch, classes] array" in " ".join(res.stdout.split())


def run(*args):
    return CliRunner().invoke(app, ["evaluate", str(MLP), *map(str, args), "--repeats", "1"])


def test_json_parses(changed, expected):
    res = run(changed, "--data", EVAL, "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["outputs"]["logits"]["top1_agreement"] == pytest.approx(expected["top1_agreement"])
    assert d["thresholds"] == []


@pytest.mark.parametrize("flag, metric, key, sign", [
    ("--fail-under", "agreement", "top1_agreement", +1),
    ("--fail-under", "accuracy", "accuracy_pruned", +1),
    ("--fail-over", "relative_mse", "relative_mse", -1),
])
def test_thresholds_fail_exactly_when_missed(changed, expected, flag, metric, key, sign):
    value = float(expected[key])
    margin = 1e-6 * max(value, 1e-12)
    ok = run(changed, "--data", EVAL, flag, f"{metric}={value - sign * margin!r}")
    assert ok.exit_code == 0, ok.output
    assert "ok " in ok.stdout
    missed = run(changed, "--data", EVAL, flag, f"{metric}={value + sign * margin!r}")
    assert missed.exit_code == 1
    line = missed.stderr.strip()
    assert "\n" not in line and "threshold missed" in line and f"{value:.6g}" in line
    assert ("top1_agreement" if metric == "agreement" else metric) in line


@pytest.mark.parametrize("args, message", [
    (["--data", SAMPLES / "missing.npz"], "--data: data file not found"),  # names the flag, not "calibration"
    (["--data", SAMPLES / "digits_cnn_eval.npz"], "expects rank 2"),
    (["--data", EVAL, "--labels", "nope"], "labels key 'nope'"),
    (["--data", EVAL, "--fail-under", "mse=0.1"], "lower-is-better: use --fail-over"),
    (["--data", EVAL, "--fail-over", "agreement=0.1"], "higher-is-better: use --fail-under"),
    (["--data", EVAL, "--fail-under", "agreement"], "metric=number"),
    (["--data", CALIB, "--fail-under", "accuracy=0.9"], "needs labels"),
])
def test_user_errors_are_one_line(args, message):
    res = run(MLP, *args)
    assert res.exit_code == 2
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_models_with_different_inputs_are_refused():
    with pytest.raises(OnnxObsError, match="different inputs"):
        evaluate(str(MLP), str(CNN), str(EVAL), repeats=0)


def test_parse_thresholds_aliases():
    assert parse_thresholds("top1=0.9, top5=0.99,cosine=0.5", "--fail-under") == {
        "top1_agreement": 0.9, "top5_agreement": 0.99, "cosine": 0.5}
    assert parse_thresholds("mse=1e-3,accuracy_drop=0.01", "--fail-over") == {
        "relative_mse": 1e-3, "accuracy_drop": 0.01}
    assert parse_thresholds(None, "--fail-over") == {}


def sparse_model() -> tuple[onnx.ModelProto, float]:
    """Two MatMuls whose weights are sparse initializers (as prune --storage sparse writes), and
    the fraction of zeros among their weights."""
    from test_sparse_storage import pruned_weight, two_layer

    from onnx_obs.graph.sparse_storage import store_sparse
    w1, w2 = pruned_weight([16, 12], 0.3), pruned_weight([12, 5], 0.5, seed=3)
    model = two_layer(w1, w2)
    store_sparse(model, ["W1", "W2"], "sparse")
    assert len(model.graph.sparse_initializer) == 2
    zeros = np.sum(w1 == 0) + np.sum(w2 == 0)
    return model, zeros / (w1.size + w2.size)


def test_a_callers_model_proto_is_not_changed():
    from graphs import randn
    model, sparsity = sparse_model()
    before = model.SerializeToString()
    r = evaluate(model, model, {"x": randn([8, 16], 5)}, repeats=0)
    assert model.SerializeToString() == before
    assert r.outputs["y"]["relative_mse"] == 0 and r.original.model == "<proto>"
    assert r.original.weight_sparsity == pytest.approx(sparsity)
