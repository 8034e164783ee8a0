"""The exact solver's faster paths (issue 15) against independent computations.

- packed greedy (live columns only, finished rows dropped) against an explicit OBS loop with the
  full H^-1 downdated after every step (Hassibi & Stork Eqs. 5-6), and against itself unpacked;
- the global allocation's set removal against least squares for the chosen mask and against
  rerunning the greedy to the chosen counts (what it replaced);
- one-row groups solved as a stack against prune_layer group by group.
Layers have 64-100 columns so that the packing (MIN_PACKED = 32 live columns) happens.
"""

from __future__ import annotations

import numpy as np
import pytest

from onnx_obs.algorithms import obc
from onnx_obs.algorithms.layerwise import prune_layer, prune_row_groups
from onnx_obs.algorithms.obc import _global_counts, _greedy, obc_prune
from onnx_obs.algorithms.quantize import make_grid


def layer(rng, rows, cols, n=400):
    X = rng.standard_normal((n, cols)) @ (np.eye(cols) + 0.1 * rng.standard_normal((cols, cols)))
    X *= np.exp(0.3 * rng.standard_normal(cols))
    H = 2.0 / n * X.T @ X + 0.01 * np.eye(cols)
    return rng.standard_normal((rows, cols)), H, X


def explicit_obs(w, Hinv, forced, steps):
    """One row's greedy: forced weights first, then argmin w_q^2 / [H^-1]_qq (Eq. 6), update
    Eq. 5, H^-1 downdated explicitly. Returns (weights, order, step losses)."""
    w, Hinv = w.copy(), Hinv.copy()
    live = np.ones(w.size, dtype=bool)
    order, losses = [], []
    for _ in range(steps):
        score = np.where(live, w**2 / np.where(live, np.diag(Hinv), 1.0), np.inf)
        score[live & forced] = -np.inf
        q = int(np.argmin(score))
        losses.append(0.5 * w[q] ** 2 / Hinv[q, q])
        w = w - w[q] / Hinv[q, q] * Hinv[:, q]
        Hinv = Hinv - np.outer(Hinv[:, q], Hinv[q]) / Hinv[q, q]
        w[q], live[q] = 0.0, False
        order.append(q)
    return w, order, losses


def test_packed_greedy_matches_explicit_obs_loop():
    rng = np.random.default_rng(0)
    W, H, _ = layer(rng, 5, 100)
    W[1, [3, 50, 97]] = 0.0  # forced: removed first
    Hinv = np.linalg.inv(H)
    stop = np.array([0, 10, 100, 70, 45])  # rows leave the working set at different steps
    w, removed, losses, order = _greedy(W, Hinv, W == 0.0, stop)
    for r in range(5):
        w_ref, order_ref, losses_ref = explicit_obs(W[r], Hinv, W[r] == 0.0, stop[r])
        assert order[r, : stop[r]].tolist() == order_ref
        assert removed[r].sum() == stop[r] and removed[r, order_ref].all()
        np.testing.assert_allclose(losses[r, : stop[r]], losses_ref, rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(w[r], w_ref, rtol=1e-8, atol=1e-10)
    assert sorted(order[1, :3].tolist()) == [3, 50, 97]


@pytest.mark.parametrize("case", ["prune", "nm", "obq", "per_row"])
def test_packing_changes_nothing(monkeypatch, case):
    """Packing only drops numbers no live quantity reads: bitwise the same as never packing."""
    rng = np.random.default_rng(1)
    W, H, _ = layer(rng, 6, 96)
    W[W < -1.8] = 0.0
    Hinv = np.linalg.inv(H)
    kwargs = {}
    if case == "nm":
        group = np.arange(96) // 4
        kwargs["groups"] = (group, np.full(24, 2))
    elif case == "obq":
        grid = make_grid(W, 4, groups=np.arange(96) // 32)
        kwargs["grid"] = (grid.scale[:, grid.groups].astype(np.float64),
                          grid.zero[:, grid.groups].astype(np.float64), grid.qmin, grid.qmax)
    elif case == "per_row":
        Hinv = np.stack([np.linalg.inv(layer(rng, 1, 96)[1]) for _ in range(6)])
    stop = np.full(6, 48 if case == "nm" else 96)

    packed = _greedy(W, Hinv, W == 0.0, stop, **kwargs)
    monkeypatch.setattr(obc, "COMPACT", 0.0)
    unpacked = _greedy(W, Hinv, W == 0.0, stop, **kwargs)
    for a, b in zip(packed, unpacked):
        assert np.array_equal(a, b)
    if case == "per_row":  # each row under its own H^-1 alone
        for r in range(6):
            alone = _greedy(W[r : r + 1], Hinv[r], W[r : r + 1] == 0.0, stop[r : r + 1])
            assert np.array_equal(alone[0][0], packed[0][r]) and np.array_equal(alone[3][0], packed[3][r])


def test_global_set_removal_equals_greedy_rerun_and_least_squares():
    rng = np.random.default_rng(2)
    W, H, X = layer(rng, 8, 64)
    W[2, :5] = 0.0
    Hinv = np.linalg.inv(H)
    forced = W == 0.0
    pruned, removed, predicted = obc_prune(W, Hinv, forced, n_zeros=round(0.55 * W.size))
    # what the solver did before: the greedy rerun to the counts chosen from the full traces
    _, _, losses, _ = _greedy(W, Hinv, forced, np.full(8, 64))
    stop = _global_counts(losses, forced.sum(axis=1), round(0.55 * W.size))
    rerun, rerun_removed, rerun_losses, _ = _greedy(W, Hinv, forced, stop)
    assert np.array_equal(removed, rerun_removed) and removed.sum() == round(0.55 * W.size)
    np.testing.assert_allclose(pruned, rerun, rtol=1e-10, atol=1e-12 * np.abs(W).max())
    assert predicted == pytest.approx(rerun_losses.sum(), rel=1e-12)
    for r in range(8):  # kept weights: least squares for the mask with the (damped) H
        keep = ~removed[r]
        w_best = np.zeros(64)
        w_best[keep] = np.linalg.solve(H[np.ix_(keep, keep)], H[keep] @ W[r])
        np.testing.assert_allclose(pruned[r], w_best, rtol=1e-9, atol=1e-11)


def test_one_row_groups_batched_equal_prune_layer_per_group():
    rng = np.random.default_rng(3)
    cols, n_groups = 25, 40
    W = rng.standard_normal((n_groups + 1, cols))
    W[4, 7] = 0.0  # an existing zero: solved alone
    H = [layer(rng, 1, cols)[1] for _ in range(n_groups)]
    H[9][5, :] = H[9][:, 5] = 0.0  # a dead input: solved alone
    groups = [slice(i, i + 1) for i in range(n_groups - 1)] + [slice(n_groups - 1, n_groups + 1)]
    sparsities = rng.uniform(0.0, 1.0, n_groups).tolist()
    sparsities[:3] = [0.0, 1.0, 0.5]
    got = prune_row_groups(W, H, groups, sparsities, damp=0.01)
    for g, Hg, share, res in zip(groups, H, sparsities, got):
        ref = prune_layer(W[g], Hg, sparsity=share, damp=0.01)
        assert np.array_equal(res.weight, ref.weight) and np.array_equal(res.mask, ref.mask)
        assert res.predicted_error == ref.predicted_error
        assert (res.damping, res.solver) == (ref.damping, ref.solver)
    # and against the explicit loop for one batched group
    Hd = H[20] + got[20].damping * np.eye(cols)
    steps = round(sparsities[20] * cols)
    w_ref, _, losses = explicit_obs(W[20], np.linalg.inv(Hd), np.zeros(cols, dtype=bool), steps)
    np.testing.assert_allclose(got[20].weight[0], w_ref, rtol=1e-8, atol=1e-10)
    assert got[20].predicted_error == pytest.approx(sum(losses), rel=1e-8)


def test_one_row_groups_pass_user_errors_through():
    W = np.ones((2, 4))
    H = [np.eye(4), np.full((4, 4), np.nan)]
    with pytest.raises(ValueError, match="NaN"):
        prune_row_groups(W, H, [slice(0, 1), slice(1, 2)], [0.5, 0.5])
