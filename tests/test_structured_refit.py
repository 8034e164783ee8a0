"""Structured OBS beyond one group: consumers refit to the ORIGINAL model's outputs, each group's
measured output sensitivity, plans in rounds, and plan_counts over flat latency stretches.

References are computed here with numpy (least squares, the MLP's forward pass) and brute force.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
from graphs import init, make_model, randn, vi
from test_structured import (
    gemm,
    lstsq_with_bias,
    relu,
    removed_units,
    structured,
    weights,
)

from onnx_obs import api
from onnx_obs.algorithms.structured import plan_counts
from onnx_obs.calib import Calibration
from onnx_obs.flops import count_params
from onnx_obs.graph.sites import find_sites
from onnx_obs.graph.tracing import trace_units
from onnx_obs.strategies.group_sensitivity import GroupProbe, probe_counts, scale_curve
from onnx_obs.strategies.structured import _consumers


def mlp3():
    """x (8) -> Gemm 12 -> Relu -> Gemm 10 -> Relu -> Gemm 5 -> y."""
    a = {"W1": randn([12, 8], 1), "b1": randn([12], 2), "W2": randn([10, 12], 3) / 3,
         "b2": randn([10], 4), "W3": randn([5, 10], 5), "b3": randn([5], 6)}
    nodes = [gemm("x", "W1", "b1", "h1"), relu("h1", "r1"), gemm("r1", "W2", "b2", "h2"),
             relu("h2", "r2"), gemm("r2", "W3", "b3", "y")]
    model = make_model(nodes, [vi("x", shape=["batch", 8])], [vi("y", shape=["batch", 5])],
                       [init(k, v) for k, v in a.items()])
    return model, {k: v.astype(np.float64) for k, v in a.items()}


def keep(n, gone):
    return [u for u in range(n) if u not in gone]


def test_consumers_are_refit_to_the_original_outputs():
    model, a = mlp3()
    X = randn([500, 8], 7).astype(np.float64)
    res = structured(model, {"x": X.astype(np.float32)}, sparsity=0.5)
    k1, k2 = keep(12, removed_units(res, "W1")), keep(10, removed_units(res, "W2"))
    w = weights(res.model)
    # the first producer is no consumer: its kept rows are the original ones (unit indices map)
    np.testing.assert_array_equal(w["W1"], a["W1"][k1].astype(np.float32))
    R1 = np.maximum(X @ a["W1"].T + a["b1"], 0)
    H2 = R1 @ a["W2"].T + a["b2"]                       # the original second layer's output
    Y = np.maximum(H2, 0) @ a["W3"].T + a["b3"]         # and the model's
    W2, b2 = lstsq_with_bias(R1[:, k1], H2)             # W2 refit on the units left ...
    np.testing.assert_allclose(w["W2"], W2[k2], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(w["b2"], b2[k2], rtol=1e-4, atol=1e-4)
    # ... and W3 refit to the ORIGINAL output from the shrunk model's own inputs: it makes up for
    # the first group's removal too (OBS alone would keep W3's output on the shrunk inputs)
    R2 = np.maximum(R1[:, k1] @ w["W2"].T.astype(np.float64) + w["b2"], 0)
    W3, b3 = lstsq_with_bias(R2, Y)
    np.testing.assert_allclose(w["W3"], W3, rtol=1e-4, atol=1e-4 * np.abs(W3).max())
    np.testing.assert_allclose(w["b3"], b3, rtol=1e-4, atol=1e-4 * np.abs(b3).max())


@pytest.mark.parametrize("consumer_bias", [True, False])
def test_group_sensitivity_is_the_relative_output_error_of_the_group_alone(consumer_bias):
    """Several probes of one traced group (the planner's use); a consumer without a bias gets one
    in each probe's copy of the model, and only there."""
    model, a = mlp3()
    if not consumer_bias:
        del next(n for n in model.graph.node if "W2" in n.input).input[2]
        model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "b2"))
        a["b2"] = np.zeros(10)
    X = randn([256, 8], 8).astype(np.float64)   # PROBE_SAMPLES: the probe runs them all
    cal = Calibration([{"x": X.astype(np.float32)}], len(X))
    loaded = SimpleNamespace(model=model, base_dir="")
    R1 = np.maximum(X @ a["W1"].T + a["b1"], 0)
    A = np.hstack([R1, np.ones((len(X), 1))])
    hessians = {"W2": (2.0 / len(X) * A.T @ A)[None]}
    group = trace_units(model, find_sites(model)[0], {"W1"})[0][0]
    probe = GroupProbe(loaded, cal, "cpu")
    for gone in ([0, 3, 7], [1, 2]):
        got = probe.error(group, _consumers(loaded, group, hessians), gone, 0.0)
        Y = np.maximum(R1 @ a["W2"].T + a["b2"], 0) @ a["W3"].T + a["b3"]
        W2, b2 = lstsq_with_bias(R1[:, keep(12, gone)], R1 @ a["W2"].T + a["b2"])
        Yg = np.maximum(R1[:, keep(12, gone)] @ W2.T + b2, 0) @ a["W3"].T + a["b3"]
        assert got == pytest.approx(np.sum((Y - Yg) ** 2) / np.sum(Y ** 2), rel=1e-4)
    assert len(model.graph.initializer) == 5 + consumer_bias   # the model as given is unchanged


def test_scaled_curve_sums_to_the_measured_errors_at_the_probes():
    curve = np.array([0.1, 0.2, 0.2, 0.5, 1.0, 1.0, 2.0])
    counts = probe_counts(len(curve), 1)
    assert counts == [2, 4, 6]
    measured = [0.03, 0.4, 1.0]
    scaled = scale_curve(curve, counts, measured)
    # exact at the first probe (kappa constant up to it), the others within the interpolation
    assert np.cumsum(scaled)[1] == pytest.approx(0.03)
    kappa = np.interp(np.arange(1, 8), counts, [0.03 / 0.3, 0.4 / 1.0, 1.0 / 3.0])
    np.testing.assert_allclose(scaled, curve * kappa)
    np.testing.assert_array_equal(scale_curve(np.zeros(4), [2], [0.5]), np.zeros(4))
    assert probe_counts(15, 8) == [8]   # steps of 8: one probe, never beyond the curve


def test_plan_counts_steps_over_a_flat_stretch_like_brute_force():
    # layer 0 saves nothing for its first 2 units (a flat stretch of a timed table), then 5 per
    # unit; layer 1 saves 1 per unit at 10x the cost. Stopping at the flat stretch (the old rule)
    # leaves the target out of reach.
    curves = [np.ones(4), np.full(4, 10.0)]
    resource = lambda c: 20.0 - 5.0 * max(int(c[0]) - 2, 0) - 1.0 * int(c[1])
    for target in (15.0, 12.0, 10.0, 8.0):
        got = plan_counts(curves, resource, target)
        best = min((sum(curves[0][:i].sum() for i in [c0]) + curves[1][:c1].sum(), (c0, c1))
                   for c0, c1 in itertools.product(range(5), range(5))
                   if resource((c0, c1)) <= target)
        assert resource(got) <= target
        assert curves[0][:got[0]].sum() + curves[1][:got[1]].sum() == best[0]


def test_target_in_rounds_meets_it_with_one_entry_per_group():
    model, a = mlp3()
    X = randn([400, 8], 9)
    res = api.prune(model, {"x": X}, structure="neurons", target_params=150)
    assert count_params(res.model)["params"] <= 150
    entries = res.report.structure
    assert [e["name"] for e in entries] == ["W1", "W2"]
    w = weights(res.model)
    for e in entries:
        assert e["units_after"] == e["units_before"] - len(e["removed"]) == len(w[e["name"]])
    # unit indices of every round are the model's as given
    np.testing.assert_array_equal(w["W1"], a["W1"][keep(12, entries[0]["removed"])].astype(np.float32))
