"""End to end through the CLI on the digits samples: what is written matches the report and the
original model, the input is never touched, and every user error is one line with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from cli_checks import assert_one_line_error, prune_args, sha
from graphs import run, session

LINEAR = ("Gemm", "MatMul", "Conv", "ConvTranspose")


def weights_of(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def linear_weights(path) -> dict[str, str]:
    """weight initializer name -> op type, read straight from the graph."""
    m = onnx.load(str(path))
    return {n.input[1]: n.op_type for n in m.graph.node if n.op_type in LINEAR}


# ---------------------------------------------------------------- magnitude on the samples

@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_magnitude_half(which, cli, tmp_path, samples):
    model = samples / f"digits_{which}.onnx"
    calib = samples / f"digits_{which}_calib.npz"
    before = sha(model)
    out, rep = tmp_path / "out.onnx", tmp_path / "r.json"
    r = cli(*prune_args(model, out, "--method", "magnitude", "--sparsity", "0.5", "--calib", calib,
                        "--report", rep))
    assert r.exit_code == 0, r.stderr
    assert sha(model) == before                          # the input is never modified
    report = json.loads(rep.read_text())
    orig, new = weights_of(model), weights_of(out)
    sites = linear_weights(model)
    assert {s["name"] for s in report["sites"]} == set(sites)
    for s in report["sites"]:
        w0, w1 = orig[s["name"]], new[s["name"]]
        zeros = int(np.sum(w1 == 0))
        assert zeros == s["zeros_after"] and w1.size == s["params"]
        assert abs(zeros - round(0.5 * w1.size)) <= 1
        kept = w1 != 0
        np.testing.assert_array_equal(w1[kept], w0[kept])           # no correction
        assert np.abs(w0[~kept]).max() <= np.abs(w0[kept]).min()    # the smallest went
    for name in set(orig) - set(sites):                             # biases untouched
        np.testing.assert_array_equal(orig[name], new[name])
    # the written model runs, with the same output shapes; deviation as reported
    x = dict(np.load(calib))
    ref, got = run(model, x), run(out, x)
    assert {k: v.shape for k, v in ref.items()} == {k: v.shape for k, v in got.items()}
    for name, dev in report["deviation"].items():
        a, b = ref[name].astype(np.float64), got[name].astype(np.float64)
        np.testing.assert_allclose(dev["relative_mse"], np.sum((a - b) ** 2) / np.sum(a * a), rtol=1e-6)
        np.testing.assert_allclose(dev["top1_agreement"], np.mean(a.argmax(1) == b.argmax(1)))
    assert report["totals"]["sites"] == len(sites)


def test_scope_global_reaches_global_target(cli, tmp_path, cnn_path):
    out, rep = tmp_path / "g.onnx", tmp_path / "g.json"
    r = cli(*prune_args(cnn_path, out, "--method", "magnitude", "--scope", "global",
                        "--sparsity", "0.7", "--report", rep))
    assert r.exit_code == 0, r.stderr
    orig, new = weights_of(cnn_path), weights_of(out)
    names = list(linear_weights(cnn_path))
    total = sum(orig[n].size for n in names)
    zeros = sum(int(np.sum(new[n] == 0)) for n in names)
    assert abs(zeros - round(0.7 * total)) <= 1
    # one threshold for all layers: every removed weight is below every kept weight
    removed = np.concatenate([np.abs(orig[n][new[n] == 0]) for n in names])
    kept = np.concatenate([np.abs(orig[n][new[n] != 0]) for n in names])
    assert removed.max() <= kept.min()
    report = json.loads(rep.read_text())
    assert abs(report["totals"]["sparsity"] - zeros / total) < 1e-12
    per_site = [s["sparsity"] for s in report["sites"]]
    assert max(per_site) - min(per_site) > 0.05          # not simply 70% per layer


def test_existing_output_needs_force(cli, tmp_path, mlp_path):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"keep me")
    r = cli(*prune_args(mlp_path, out, "--method", "magnitude"))
    assert_one_line_error(r, "--force")
    assert out.read_bytes() == b"keep me"
    r = cli(*prune_args(mlp_path, out, "--method", "magnitude", "--force"))
    assert r.exit_code == 0, r.stderr
    onnx.checker.check_model(str(out))


def test_python_dash_m_help():
    p = subprocess.run([sys.executable, "-m", "onnx_obs", "--help"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0 and "prune" in p.stdout and "inspect" in p.stdout


# ---------------------------------------------------------------- inspect and selection

def test_inspect_json(cli, cnn_path):
    r = cli("inspect", "--json", cnn_path)
    assert r.exit_code == 0, r.stderr
    info = json.loads(r.stdout)
    arrays = weights_of(cnn_path)
    sites = linear_weights(cnn_path)
    assert {s["name"] for s in info["sites"]} == set(sites)
    for s in info["sites"]:
        a = arrays[s["name"]]
        assert s["onnx_shape"] == list(a.shape) and s["params"] == a.size
        assert s["matrix_shape"] == [a.shape[0], a.size // a.shape[0]]   # Conv [out, in*k*k]; Gemm transB=1
        assert s["op"] == sites[s["name"]]
        assert s["sparsity"] == float(np.mean(a == 0))
    assert info["totals"]["sites"] == 5
    assert info["totals"]["site_params"] == sum(arrays[n].size for n in sites)
    assert info["totals"]["model_params"] == sum(a.size for a in arrays.values())


@pytest.mark.parametrize("args,expect", [
    (["--op-types", "Conv"], {"onnx::Conv_42", "onnx::Conv_45", "onnx::Conv_48"}),
    (["--op-types", "Gemm, Conv"], {"onnx::Conv_42", "onnx::Conv_45", "onnx::Conv_48", "12.weight", "14.weight"}),
    (["--include", r"Conv_4[25]"], {"onnx::Conv_42", "onnx::Conv_45"}),
    (["--include", "/12/"], {"12.weight"}),                        # node names match too
    (["--exclude", "Conv"], {"12.weight", "14.weight"}),
    (["--include", "weight", "--exclude", "^14"], {"12.weight"}),
])
def test_selection_inspect(args, expect, cli, cnn_path):
    r = cli("inspect", "--json", cnn_path, *args)
    assert r.exit_code == 0, r.stderr
    assert {s["name"] for s in json.loads(r.stdout)["sites"]} == expect


def test_selection_prune_touches_only_selected(cli, tmp_path, cnn_path):
    out = tmp_path / "sel.onnx"
    r = cli(*prune_args(cnn_path, out, "--method", "magnitude", "--op-types", "Gemm",
                        "--exclude", "^14"))
    assert r.exit_code == 0, r.stderr
    orig, new = weights_of(cnn_path), weights_of(out)
    for name in orig:
        if name == "12.weight":
            assert np.sum(new[name] == 0) == new[name].size // 2
        else:
            np.testing.assert_array_equal(orig[name], new[name])


def test_selection_nothing_and_bad_regex(cli, tmp_path, cnn_path):
    out = tmp_path / "none.onnx"
    assert_one_line_error(cli(*prune_args(cnn_path, out, "--method", "magnitude", "--include", "nomatch")),
                          "no prunable weights")
    assert_one_line_error(cli(*prune_args(cnn_path, out, "--method", "magnitude", "--include", "(")),
                          "regular expression")
    assert not out.exists()


# ---------------------------------------------------------------- calibration errors

def _mlp_calib(tmp_path, name="c.npz", **arrays):
    p = tmp_path / name
    np.savez(p, **arrays)
    return p


def _x(n=8):
    return np.random.default_rng(0).random([n, 64], dtype=np.float32)


CALIB_CASES = {
    "missing key": (lambda: dict(foo=_x(), bar=_x()), ["'input'"]),
    "extra key": (lambda: dict(input=_x(), extra=_x()), ["'extra'"]),
    "lossy dtype": (lambda: dict(input=_x().astype(np.float64) / 3), ["'input'", "float32"]),
    "rank": (lambda: dict(input=_x().reshape(8, 8, 8)), ["'input'", "rank"]),
    "static dim": (lambda: dict(input=_x()[:, :60]), ["'input'", "axis 1"]),
    "nan": (lambda: dict(input=np.where(_x() > 0.9, np.nan, _x())), ["'input'", "NaN"]),
    "empty": (lambda: dict(input=_x(0)), ["'input'", "empty"]),
    "label count": (lambda: dict(input=_x(), label=np.arange(5)), ["'label'", "5"]),
}


@pytest.mark.parametrize("case", list(CALIB_CASES))
@pytest.mark.parametrize("method", ["obs", "magnitude"])
def test_calibration_errors(case, method, cli, tmp_path, mlp_path):
    make, words = CALIB_CASES[case]
    calib = _mlp_calib(tmp_path, **make())
    out = tmp_path / "out.onnx"
    extra = ["--labels", "label"] if case == "label count" else []
    r = cli(*prune_args(mlp_path, out, "--method", method, "--calib", calib, *extra))
    assert_one_line_error(r, *words)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["c.npz"]      # no temp files either


def test_calibration_file_errors(cli, tmp_path, mlp_path):
    out = tmp_path / "out.onnx"
    junk = tmp_path / "junk.npz"
    junk.write_bytes(np.random.default_rng(1).bytes(500))
    assert_one_line_error(cli(*prune_args(mlp_path, out, "--calib", junk)), "junk.npz")
    assert_one_line_error(cli(*prune_args(mlp_path, out, "--calib", tmp_path / "nope.npz")), "not found")
    assert_one_line_error(cli(*prune_args(mlp_path, out)), "--calib")        # obs needs data
    assert_one_line_error(cli(*prune_args(mlp_path, out, "--method", "magnitude", "--calib",
                                          _mlp_calib(tmp_path, input=_x()), "--batch-size", "0")),
                          "--batch-size")
    assert not out.exists()


def test_calibration_error_subprocess(tmp_path, mlp_path):
    """Exit code and stderr as a shell sees them."""
    calib = _mlp_calib(tmp_path, input=_x().reshape(8, 8, 8))
    out = tmp_path / "out.onnx"
    p = subprocess.run([sys.executable, "-m", "onnx_obs", "prune", str(mlp_path), "-o", str(out),
                        "--calib", str(calib)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "'input'" in lines[0] and "rank" in lines[0], p.stderr
    assert "Traceback" not in p.stderr and not out.exists()


def test_max_samples_and_batch_size_reach_the_report(cli, tmp_path, mlp_path, mlp_calib):
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    r = cli(*prune_args(mlp_path, out, "--method", "magnitude", "--calib", mlp_calib,
                        "--max-samples", "40", "--batch-size", "16", "--report", rep))
    assert r.exit_code == 0, r.stderr
    report = json.loads(rep.read_text())
    assert report["calibration_samples"] == 40
    assert report["settings"]["batch_size"] == 16 and report["settings"]["max_samples"] == 40
    # deviation measured on exactly the first 40 samples
    x = {"input": np.load(mlp_calib)["input"][:40]}
    a, b = run(mlp_path, x)["logits"].astype(np.float64), run(out, x)["logits"].astype(np.float64)
    np.testing.assert_allclose(report["deviation"]["logits"]["relative_mse"],
                               np.sum((a - b) ** 2) / np.sum(a * a), rtol=1e-6)


def test_obs_prunes_the_mlp(cli, tmp_path, mlp_path, mlp_calib):
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    r = cli(*prune_args(mlp_path, out, "--calib", mlp_calib, "--max-samples", "64", "--allocation", "uniform",
                        "--report", rep))
    assert r.exit_code == 0, r.stderr
    report = json.loads(rep.read_text())
    new = weights_of(out)
    for s in report["sites"]:
        assert int(np.sum(new[s["name"]] == 0)) == s["zeros_after"]
        assert abs(s["zeros_after"] - round(0.5 * s["params"])) <= 1
    assert session(out).get_outputs()[0].name == "logits"


@pytest.mark.parametrize("flags", [["--structure", "channels"], []])  # [] : auto allocation's probes
def test_successful_prune_writes_nothing_on_stderr(tmp_path, mlp_path, mlp_calib, flags):
    """onnxruntime's own warnings (e.g. a session option set twice) must not reach the user:
    a clean run with -q prints nothing at all (checked on a real process: they bypass Python)."""
    out = tmp_path / "o.onnx"
    p = subprocess.run([sys.executable, "-m", "onnx_obs", *prune_args(mlp_path, out, "--calib", mlp_calib,
                                                                       *flags)],
                       capture_output=True, text=True)
    assert p.returncode == 0 and out.exists(), p.stderr
    assert p.stderr == "" and p.stdout == ""
