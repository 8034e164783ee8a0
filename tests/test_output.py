"""Output for people and pipelines: progress lines, bounded timing, per-position agreement,
--metric, and calibration notes for every cast or guess."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from onnx import helper

from cli_checks import assert_one_line_error
from graphs import init, make_model, randn, save, vi
from onnx_obs import evaluate as evaluation
from onnx_obs import progress
from onnx_obs.calib import load_calibration
import onnx


# ---------------------------------------------------------------- progress

def test_a_log_gets_plain_progress_lines(cli, mlp_path, mlp_calib, tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "EVERY", 0.0)   # as if every step took longer than the interval
    r = cli("prune", mlp_path, "--calib", mlp_calib, "-o", tmp_path / "o.onnx")
    assert r.exit_code == 0, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.startswith("onnx-obs: pruning sites")]
    assert [l.split(" (")[0] for l in lines] == [f"onnx-obs: pruning sites {i}/3" for i in (1, 2, 3)]
    assert "(0.weight)" in lines[0] and "s left" in lines[0] and "s left" not in lines[-1]
    # one task for the whole run, a step per site in each stage (allocation tables, pruning)
    run = [l.split(" (")[0] for l in r.stderr.splitlines() if l.startswith("onnx-obs: whole run")]
    assert run == [f"onnx-obs: whole run {i}/6" for i in range(1, 7)]
    quiet = cli("prune", mlp_path, "--calib", mlp_calib, "-o", tmp_path / "q.onnx", "-q")
    assert quiet.exit_code == 0 and quiet.stderr == "" and quiet.stdout == ""


def test_short_runs_stay_silent_and_verbose_logs_every_step(cli, mlp_path, tmp_path):
    r = cli("prune", mlp_path, "-o", tmp_path / "o.onnx", "--method", "magnitude")
    assert r.exit_code == 0 and "onnx-obs:" not in r.stderr
    r = cli("compare", mlp_path, "--calib", mlp_path.parent / "digits_mlp_calib.npz", "--methods",
            "magnitude", "--sparsities", "0.2,0.4", "--max-samples", "16", "-v")
    assert r.exit_code == 0, r.stderr
    steps = [l for l in r.stderr.splitlines() if l.startswith("onnx-obs: pruning and scoring")]
    assert steps[0].endswith("started") and "(magnitude at 0.2)" in steps[1] and "2/2" in steps[2]


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_a_bar_not_lines():
    stream = Tty()
    with progress.Progress(stream=stream) as bar:
        task = bar.add("work", total=2)
        bar.advance(task, what="a")
        bar.advance(task, what="b")
    assert bar.bar and "onnx-obs:" not in stream.getvalue()
    assert not progress.Progress(enabled=False, stream=Tty()).bar


# ---------------------------------------------------------------- evaluate

def test_timing_runs_on_the_first_batches_only(mlp_path, monkeypatch):
    data = mlp_path.parent / "digits_mlp_eval.npz"
    passes = []
    real = evaluation._full_pass
    monkeypatch.setattr(evaluation, "_full_pass", lambda r, cal: passes.append(len(cal.batches)) or real(r, cal))
    r = evaluation.evaluate(str(mlp_path), str(mlp_path), str(data), time_samples=40, repeats=2)
    assert r.samples == 450 and r.original.latency_ms.samples == 64   # two batches of 32
    assert passes == [2] * 6   # a warm-up and 2 timed passes per model, 2 batches each


def sequence_model(w: np.ndarray):
    """[N, T, 16] -> MatMul -> [N, T, C] scores per position."""
    return make_model([helper.make_node("MatMul", ["x", "W"], ["y"])],
                      [vi("x", np.float32, ["n", 7, 16])], [vi("y", np.float32, ["n", 7, w.shape[1]])],
                      [init("W", w)])


def test_sequence_outputs_get_agreement_per_position(tmp_path):
    w = randn([16, 5])
    noisy = w + 0.7 * randn([16, 5], 1)
    a, b = save(sequence_model(w), tmp_path / "a.onnx"), save(sequence_model(noisy), tmp_path / "b.onnx")
    x = randn([20, 7, 16], 2)
    r = evaluation.evaluate(str(a), str(b), {"x": x}, repeats=0, batch_size=8)
    expected = np.mean(np.argmax(x @ w, -1) == np.argmax(x @ noisy, -1))
    assert 0 < expected < 1
    out = r.outputs["y"]
    assert out["top1_agreement"] == pytest.approx(expected) and out["positions"] == 140


METRIC = '''
import numpy as np

def close(original, pruned):
    return float(np.mean(np.abs(original["logits"] - pruned["logits"]) < 1.0))

def both(original, pruned):
    return {"close": close(original, pruned), "n": 1}

def broken(original, pruned):
    raise KeyError("boxes")
'''


def test_metric_from_a_file_is_averaged_and_gated(cli, mlp_path, tmp_path):
    from onnx_obs import api
    calib, data = mlp_path.parent / "digits_mlp_calib.npz", mlp_path.parent / "digits_mlp_eval.npz"
    pruned = tmp_path / "p.onnx"
    api.prune(str(mlp_path), str(calib), method="magnitude", sparsity=0.7, output=pruned)
    (tmp_path / "mymetric.py").write_text(METRIC)
    x = np.load(data)["input"]
    from graphs import run
    ref, cand = run(onnx.load(str(mlp_path)), {"input": x}), run(onnx.load(str(pruned)), {"input": x})
    expected = float(np.mean(np.abs(ref["logits"] - cand["logits"]) < 1.0))
    assert 0 < expected < 1
    spec = f"{tmp_path / 'mymetric.py'}:close"
    r = cli("evaluate", mlp_path, pruned, "--data", data, "--repeats", "0", "--metric", spec, "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["metrics"]["close"] == pytest.approx(expected)
    assert cli("evaluate", mlp_path, pruned, "--data", data, "--repeats", "0", "--metric", spec,
               "--fail-under", f"close={expected + 0.01}").exit_code == 1
    ok = cli("evaluate", mlp_path, pruned, "--data", data, "--repeats", "0", "--metric", spec,
             "--fail-under", f"close={expected - 0.01}")
    assert ok.exit_code == 0 and "metric   close = " in ok.stdout
    both = cli("evaluate", mlp_path, pruned, "--data", data, "--repeats", "0", "--json",
               "--metric", f"{tmp_path / 'mymetric.py'}:both")
    assert json.loads(both.stdout)["metrics"] == {"close": pytest.approx(expected), "n": 1.0}
    for bad, words in ((f"{tmp_path / 'mymetric.py'}:broken", ["broken failed", "KeyError"]),
                       (f"{tmp_path / 'mymetric.py'}:nope", ["no function 'nope'"]),
                       ("no_such_module_xyz:f", ["cannot import no_such_module_xyz"]),
                       ("close", ["MODULE:FUNCTION"])):
        assert_one_line_error(cli("evaluate", mlp_path, pruned, "--data", data, "--repeats", "0",
                                  "--metric", bad), *words)


# ---------------------------------------------------------------- calibration notes

def test_every_cast_gets_a_note(mlp_path):
    model = onnx.load(str(mlp_path))
    pixels = np.random.default_rng(0).integers(0, 16, (40, 64)).astype(np.uint8)
    cal = load_calibration({"input": pixels}, model)
    assert len(cal.notes) == 1 and "input 'input': integer values" in cal.notes[0]
    np.testing.assert_array_equal(cal.batches[0]["input"], pixels[:32].astype(np.float32))
    cal = load_calibration({"input": pixels.astype(np.float64) / 4}, model)
    assert cal.notes == ["input 'input': float64 values were cast to float32 (every value is exactly representable)"]
    assert load_calibration({"input": pixels.astype(np.float32)}, model).notes == []


def test_cast_notes_reach_the_prune_report(mlp_path, tmp_path):
    from onnx_obs import api
    np.savez(tmp_path / "c.npz", input=np.random.default_rng(0).integers(0, 16, (40, 64)))
    r = api.prune(str(mlp_path), str(tmp_path / "c.npz"), method="wanda")
    assert any("integer values" in n and "scale" in n for n in r.report.notes)


def test_wrong_data_names_both_signatures(cli, tmp_path):
    ids = make_model([helper.make_node("Cast", ["ids"], ["f"], to=1),
                      helper.make_node("MatMul", ["f", "W"], ["y"])],
                     [vi("ids", np.int32, ["n", 2048])], [vi("y", np.float32, None)],
                     [init("W", randn([2048, 4]))])
    path = save(ids, tmp_path / "ids.onnx")
    np.savez(tmp_path / "img.npz", ids=randn([32, 3, 48, 192]))
    r = cli("prune", path, "--calib", tmp_path / "img.npz", "-o", tmp_path / "o.onnx")
    assert_one_line_error(r, "input 'ids' expects int32[?, 2048], got float32[32, 3, 48, 192]")
    assert not (tmp_path / "o.onnx").exists()


def test_an_unstructured_prune_reports_compressed_sizes_and_batch_1_latency(cli, mlp_path, mlp_calib, tmp_path):
    """Dense zeros leave the file as large as before; what they buy is a smaller compressed file:
    the report's figures are zlib (level 1) of the input file and of the file written."""
    import zlib

    out = tmp_path / "o.onnx"
    r = cli("prune", mlp_path, "--calib", mlp_calib, "-o", out, "--report", tmp_path / "r.json")
    assert r.exit_code == 0, r.stderr
    d = json.loads((tmp_path / "r.json").read_text())
    z = d["totals"]["compressed_size"]
    assert z == {"before": len(zlib.compress(mlp_path.read_bytes(), 1)),
                 "after": len(zlib.compress(out.read_bytes(), 1))}
    assert z["after"] < 0.8 * z["before"]
    assert list(d["costs"]) == ["latency_ms_batch_1"] and d["costs"]["latency_ms_batch_1"]["after"] > 0
    assert "zipped" in r.stdout and "--structure channels" in r.stdout
