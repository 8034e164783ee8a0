"""compare: the sweep, its grid parsing, Hessian sharing, --max-loss and the plot."""

import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from onnx_obs import api
from onnx_obs.cli import app
from onnx_obs.compare import CompareRow, compare, highest_within, parse_sparsities
from onnx_obs.errors import OnnxObsError

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
MLP = SAMPLES / "digits_mlp.onnx"
CALIB, EVAL = SAMPLES / "digits_mlp_calib.npz", SAMPLES / "digits_mlp_eval.npz"


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    d = tmp_path_factory.mktemp("compare")
    res = CliRunner().invoke(app, [
        "compare", str(MLP), "--calib", str(CALIB), "--eval", str(EVAL), "--methods", "magnitude,obs",
        "--sparsities", "0:0.5:0.25", "--max-samples", "32", "--max-loss", "0.02", "--no-sequential",
        "--plot", str(d / "curve.png"), "--json", str(d / "out.json")])
    assert res.exit_code == 0, res.output
    return d, res, json.loads((d / "out.json").read_text())


def test_json_has_one_row_per_method_and_sparsity(swept):
    _, res, d = swept
    assert [(r["method"], r["sparsity"]) for r in d["rows"]] == [
        (m, s) for m in ("magnitude", "obs") for s in (0.0, 0.25, 0.5)]
    assert d["metric"] == "accuracy" and d["labels"] == "label"
    assert d["calibration"]["samples"] == 32 and d["eval"]["samples"] == 450
    assert not d["eval"]["is_calibration"] and d["settings"]["hessians_shared"]
    assert "obs" in res.stdout and "highest sparsity losing at most 0.02" in res.stdout


def test_sparsity_zero_changes_nothing(swept):
    row = next(r for r in swept[2]["rows"] if r["method"] == "magnitude" and r["sparsity"] == 0)
    assert row["top1_agreement"] == 1.0 and row["relative_mse"] == 0.0 and row["loss"] == 0.0


def test_magnitude_row_matches_numpy_pruning(swept, tmp_path):
    """Zero the half smallest |w| of each Gemm weight by hand and score it with onnxruntime."""
    model = onnx.load(str(MLP))
    for t in model.graph.initializer:
        if t.name.endswith("weight"):
            w = numpy_helper.to_array(t).copy()
            w.flat[np.argsort(np.abs(w), axis=None, kind="stable")[: round(0.5 * w.size)]] = 0
            t.CopyFrom(numpy_helper.from_array(w, t.name))
    with np.load(EVAL) as z:
        x, y = z["input"], z["label"]
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    a, b = run(onnx.load(str(MLP))).astype(np.float64), run(model).astype(np.float64)
    row = next(r for r in swept[2]["rows"] if r["method"] == "magnitude" and r["sparsity"] == 0.5)
    assert row["top1_agreement"] == pytest.approx(np.mean(a.argmax(1) == b.argmax(1)))
    assert row["accuracy"] == pytest.approx(np.mean(b.argmax(1) == y))
    assert row["relative_mse"] == pytest.approx(np.sum((a - b) ** 2) / np.sum(a * a), rel=1e-6)
    assert swept[2]["baseline"] == pytest.approx(np.mean(a.argmax(1) == y))


def test_png_and_svg_are_images(swept):
    d = swept[0]
    png = (d / "curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    image = pytest.importorskip("matplotlib.image").imread(d / "curve.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0  # not a blank canvas
    assert b"<svg" in (d / "curve.svg").read_bytes()[:1000]


@pytest.mark.parametrize("text, grid", [
    ("0.1:0.9:0.1", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]),
    ("0.1:0.6:0.2", [0.1, 0.3, 0.5]),
    ("0:0.5:0.25", [0.0, 0.25, 0.5]),
    ("0.7, 0.2,0.7", [0.2, 0.7]),
    ("0.5", [0.5]),
])
def test_parse_sparsities(text, grid):
    assert parse_sparsities(text) == grid


@pytest.mark.parametrize("text", ["a:b:c", "0.5:0.1:0.1", "0.1:0.9:0", "1.2", "0.5,1", "", "0.1:0.9"])
def test_parse_sparsities_rejects(text):
    with pytest.raises(OnnxObsError, match="--sparsities"):
        parse_sparsities(text)


def row(method: str, sparsity: float, loss: float) -> CompareRow:
    return CompareRow(method, sparsity, pattern=None, weight_sparsity=sparsity, output="y",
                      relative_mse=0.0, cosine=1.0, seconds=0.0, loss=loss)


def test_highest_within_stops_at_the_first_excess():
    rows = [row("m", s, l) for s, l in [(0.5, 0.02), (0.1, 0.0), (0.3, 0.01), (0.7, 0.005)]]
    rows.append(row("n", 0.1, 0.5))
    got = asdict(highest_within(rows, ["m", "n"], 0.01))["per_method"]
    assert got == {"m": {"sparsity": 0.3, "loss": 0.01}, "n": {"sparsity": None, "loss": None}}


def test_shared_hessians_are_captured_once_and_change_nothing(monkeypatch):
    calls = []
    from onnx_obs.strategies import layerwise

    capture = layerwise.capture_hessians
    monkeypatch.setattr(layerwise, "capture_hessians", lambda *a: calls.append(a) or capture(*a))
    kw = dict(sparsity=0.5, sequential=False, max_samples=32, allocation="uniform")  # capture in the sweep
    cache = {}
    api.prune(str(MLP), str(CALIB), method="wanda", hessians=cache, **kw)
    shared = api.prune(str(MLP), str(CALIB), method="obd", hessians=cache, **kw)
    assert len(calls) == 1 and sorted(cache) == ["0.weight", "2.weight", "4.weight"]
    fresh = api.prune(str(MLP), str(CALIB), method="obd", **kw)
    assert shared.model.SerializeToString() == fresh.model.SerializeToString()


def test_sequential_ignores_the_cache():
    cache = {}
    api.prune(str(MLP), str(CALIB), method="wanda", sparsity=0.5, max_samples=32, hessians=cache)
    assert cache == {}


def test_calibration_scoring_warns_and_missing_matplotlib_still_writes_json(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    res = CliRunner().invoke(app, [
        "compare", str(MLP), "--calib", str(CALIB), "--methods", "magnitude", "--sparsities", "0.5",
        "--plot", str(tmp_path / "p.png"), "--json", str(tmp_path / "o.json")])
    assert res.exit_code == 2
    assert "pip install 'onnx-obs[plot]'" in res.stderr and "no --eval data" in res.stderr
    d = json.loads((tmp_path / "o.json").read_text())
    assert d["eval"]["is_calibration"] and d["metric"] == "top1_agreement" and len(d["rows"]) == 1
    assert not (tmp_path / "p.png").exists()


def test_found_label_key_without_class_scores_is_not_an_error(tmp_path):
    from test_evaluate import regression_data
    path, data = regression_data(tmp_path)
    d = compare(str(path), str(data), methods=["magnitude"], sparsities=[0.5], eval_data=str(data))
    assert d.labels is None and d.metric == "relative_mse" and "accuracy" not in d.rows[0].to_dict()
    assert "not used as labels" in d.notes[0]


def test_a_lone_array_under_another_key_is_used_with_a_note(tmp_path):
    with np.load(CALIB) as z:
        np.savez(tmp_path / "x.npz", z["input"][:64])   # key arr_0; the model's input is 'input'
    d = compare(str(MLP), str(tmp_path / "x.npz"), methods=["magnitude"], sparsities=[0.5])
    note = (f"{tmp_path / 'x.npz'}: key 'arr_0' is not an input name: its array was fed to the "
            "model's only input 'input'")
    assert d.notes.count(note) == 1   # once, though the file is read for calibration and scoring
    assert d.calibration.samples == d.eval.samples == 64


def test_pattern_sets_the_sparsity():
    d = compare(str(MLP), str(CALIB), methods=["magnitude"], sparsities=None, pattern=(2, 4),
                eval_data=str(EVAL))
    assert [(r.sparsity, r.pattern, r.weight_sparsity) for r in d.rows] == [(0.5, "2:4", 0.5)]
    with pytest.raises(OnnxObsError, match="drop --sparsities"):
        compare(str(MLP), str(CALIB), methods=["magnitude"], sparsities=[0.5], pattern=(2, 4))


@pytest.mark.parametrize("args, message", [
    (["--methods", "magnitude,foo"], "unknown method 'foo'"),
    (["--json", "/nonexistent/dir/o.json"], "does not exist"),
    (["--max-loss", "-1"], "--max-loss"),
])
def test_user_errors_are_one_line(args, message):
    res = CliRunner().invoke(app, ["compare", str(MLP), "--calib", str(CALIB), "--eval", str(EVAL),
                                   "--sparsities", "0.5", *args])
    assert res.exit_code == 2 and message in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_a_callers_model_proto_is_not_changed():
    from graphs import randn
    from test_evaluate import sparse_model
    model, sparsity = sparse_model()   # over half zeros already in each weight
    before = model.SerializeToString()
    d = compare(model, {"x": randn([8, 16], 5)}, methods=["magnitude"], sparsities=[0.5],
                min_params=0)   # a toy model: its 60-weight second layer counts too
    assert model.SerializeToString() == before
    assert d.model == "<proto>" and d.rows[0].weight_sparsity == pytest.approx(sparsity)
