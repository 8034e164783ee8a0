"""Full-network OBS you can trust: alpha from the data, the error measured at checkpoints during
surgery (the bound, the flags, the stderr warning), and the rank note from H's effective rank.
Numbers are checked against numpy (derivative vectors from the analytic Jacobians) and onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from graphs import run
from test_full_network import assemble, measured_error, mlp, mlp_jacobians, pipeline_net, rel_err

import onnx_obs.hessian.network as network
from onnx_obs import api
from onnx_obs.config import FullOptions


def test_default_alpha_is_one_percent_of_mean_diag_h(monkeypatch):
    model, w = mlp(np.float64)
    P = 40
    x = np.random.default_rng(30).normal(size=(P, 5))
    X = None
    for keep_bytes in (2**30, 0):  # derivative vectors kept between the two passes, or computed again
        monkeypatch.setattr(network, "_KEEP_BYTES", keep_bytes)
        net = pipeline_net(model, x, alpha=None)[0]
        X = assemble(net, mlp_jacobians(x, w), P)
        G = X.T @ X / P
        Hinv = net.inverse()
        alpha = 0.01 * np.trace(G) / G.shape[0]
        assert net.alpha == pytest.approx(alpha, rel=1e-12)
        assert rel_err(Hinv, np.linalg.inv(alpha * np.eye(G.shape[0]) + G)) < 1e-9
    res = api.prune(model, {"x": x}, hessian="full", sparsity=0.3, device="cpu", full=FullOptions(prune_biases=True))
    fn = res.report.full_network
    assert fn["alpha_from_data"] and fn["alpha"] == pytest.approx(0.01 * np.mean(np.sum(X * X, 0)) / P, rel=1e-9)
    assert res.report.settings["alpha"] is None


def few_samples(seed=31, P=6):
    model, _ = mlp(np.float32)
    return model, np.random.default_rng(seed).normal(size=(P, 5)).astype(np.float32)


def test_checkpoints_record_the_error_onnxruntime_measures():
    model, x = few_samples()
    res = api.prune(model, {"x": x}, hessian="full", sparsity=0.6, device="cpu", full=FullOptions(step=2))
    fn = res.report.full_network
    points = fn["checkpoints"]
    assert 10 <= len(points) <= 40 and points[-1]["zeros"] == fn["zeros"] == 40  # 60% of 66
    assert all(b["zeros"] > a["zeros"] for a, b in zip(points, points[1:]))
    assert points[-1]["measured"] == pytest.approx(measured_error(model, res.model, x), rel=1e-5)
    assert points[-1]["predicted"] == pytest.approx(fn["predicted_error_increase"], rel=1e-12)
    for p in points:
        assert p["underestimated"] == (p["measured"] > 10 * p["predicted"] and p["measured"] > 1e-12)


def test_measured_bound_goes_back_to_the_last_checkpoint_within_it():
    model, x = few_samples()
    free = api.prune(model, {"x": x}, hessian="full", sparsity=0.8, device="cpu", full=FullOptions(step=2))
    points = free.report.full_network["checkpoints"]
    k = len(points) // 2
    bound = 0.5 * (points[k - 1]["measured"] + points[k]["measured"])
    assert points[k - 1]["measured"] < points[k]["measured"]
    res = api.prune(model, {"x": x}, hessian="full", sparsity=0.8, device="cpu",
                    full=FullOptions(step=2, max_error_increase=bound))
    fn = res.report.full_network
    assert fn["stop_reason"] == "measured" and fn["zeros"] == points[k - 1]["zeros"]
    assert fn["measured_error_increase"] == pytest.approx(measured_error(model, res.model, x), rel=1e-5)
    assert fn["measured_error_increase"] <= bound
    assert any("last checkpoint" in n for n in res.report.notes)


def test_a_large_underestimate_is_a_warning_on_stderr(tmp_path, cli):
    # 6 samples x 3 outputs = 18 vectors for 66 weights, alpha 1e-8: corrections run along directions
    # the data does not see, and the quadratic model predicts a tiny fraction of the error
    model, x = few_samples()
    src, calib, out, rep = tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "o.onnx", tmp_path / "r.json"
    onnx.save(model, src)
    np.savez(calib, x=x)
    res = cli("prune", src, "--calib", calib, "--hessian", "full", "--sparsity", "0.7", "--alpha", "1e-8",
              "-o", out, "--report", rep, "-q")
    assert res.exit_code == 0, res.stderr
    d = json.loads(rep.read_text())
    fn = d["full_network"]
    assert fn["measured_error_increase"] > 100 * fn["predicted_error_increase"]
    assert "warning: the measured error increase" in res.stderr and res.stdout == ""
    assert d["warnings"] and "is" in d["warnings"][0]
    y0, y1 = run(model, {"x": x})["y"], run(onnx.load(out), {"x": x})["y"]
    assert fn["measured_error_increase"] == pytest.approx(0.5 * np.sum((y1 - y0) ** 2) / len(x), rel=1e-5)
    assert any("numerically rank-deficient" in n and "at most rank 18" in n for n in d["notes"])
    # with the default alpha and enough samples the same prune has no warning and no "warnings" key
    x = np.random.default_rng(32).normal(size=(200, 5)).astype(np.float32)
    np.savez(calib, x=x)
    res = cli("prune", src, "--calib", calib, "--hessian", "full", "--sparsity", "0.2", "-o", out, "--force",
              "--report", rep)
    assert res.exit_code == 0 and "warning" not in res.stderr
    assert "warnings" not in json.loads(rep.read_text())


def test_rank_note_counts_directions_below_alpha():
    model, w = mlp(np.float64)
    for P, alpha, expect in [(6, None, True), (400, None, True), (400, 1e-8, False)]:
        # 400 samples: more vectors than weights, yet about 11 of 66 directions have curvature below
        # the default alpha; with alpha 1e-8 none does
        x = np.random.default_rng(33).normal(size=(P, 5))
        res = api.prune(model, {"x": x}, hessian="full", sparsity=0.1, device="cpu", full=FullOptions(alpha=alpha))
        alpha = res.report.full_network["alpha"]
        net = pipeline_net(model, x, alpha=alpha, prune_biases=False)[0]
        X = assemble(net, mlp_jacobians(x, w), P)
        lam = np.linalg.eigvalsh(X.T @ X / P)
        flat = float(np.sum(alpha / (lam + alpha)))  # alpha tr H^-1, from the eigenvalues
        notes = [n for n in res.report.notes if "numerically rank-deficient" in n]
        assert bool(notes) == expect == (flat >= 0.01 * lam.size)
        if expect:
            assert f"about {flat:.0f} of its {lam.size}" in notes[0]


def test_flat_outputs_fall_back_to_the_papers_alpha():
    # x W1 ~ 1e4 saturates tanh and the sigmoid: outputs depend on W3 only through a2 = 0 or 1, and
    # with the outputs' own targets every derivative of W1, W2 is 0; select W1 alone: diag H = 0
    model, _ = mlp(np.float64)
    x = 1e4 * np.random.default_rng(34).normal(size=(8, 5))
    res = api.prune(model, {"x": x}, hessian="full", sparsity=0.5, device="cpu", include="W1")
    assert res.report.full_network["alpha"] == 1e-6
    assert any("diag H is 0" in n for n in res.report.notes)
