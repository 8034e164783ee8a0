"""Layer-wise pruning algorithms checked against independent computations.

Independent references used here: least squares on the calibration activations themselves
(numpy.linalg.lstsq), the closed-form OBS step (Hassibi & Stork Eq. 5/6) from an explicit
inverse, and a literal transcription of SparseGPT Algorithm 1 with an explicit H^-1.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnx_obs.algorithms import layerwise
from onnx_obs.algorithms.layerwise import LayerResult, layer_error, prune_layer
from onnx_obs.algorithms.masks import smallest_in_groups
from onnx_obs.algorithms.refit import refit_kept


def activations(rng, n, cols, mix=0.05):
    """Calibration inputs (n, cols) with correlated features of unequal scale."""
    A = np.eye(cols) + mix * rng.standard_normal((cols, cols))
    return (rng.standard_normal((n, cols)) @ A) * np.exp(0.3 * rng.standard_normal(cols))


def hessian(X):
    return 2.0 / len(X) * X.T @ X


def measured_error(W, W_new, X):
    """mean_k ||(W - W') x_k||^2 from the activations."""
    return float(np.sum(((W - W_new) @ X.T) ** 2) / len(X))


def best_error_for_mask(w, X, removed):
    """Least-squares optimum of one row given the removed set: min ||X w - X_F v||^2 / n."""
    free = ~removed
    v, *_ = np.linalg.lstsq(X[:, free], X @ w, rcond=None)
    w_new = np.zeros_like(w)
    w_new[free] = v
    return float(np.sum((X @ (w - w_new)) ** 2) / len(X)), w_new


ALL_METHODS = [("obs", "exact"), ("obs", "fast"), ("obd", "auto"), ("wanda", "auto"), ("magnitude", "auto")]


# ---------------------------------------------------------------- exact solver (OBC)


def test_single_removal_matches_closed_form_eq5_eq6():
    rng = np.random.default_rng(0)
    X = activations(rng, 64, 8)
    H = hessian(X)
    w = rng.standard_normal(8)
    r = prune_layer(w[None, :], H, sparsity=1 / 8, solver="exact", damp=0.0)
    Hinv = np.linalg.inv(H)
    q = np.argmin(w**2 / np.diag(Hinv))  # Eq. 6
    expected = w - w[q] / Hinv[q, q] * Hinv[:, q]  # Eq. 5
    expected[q] = 0.0
    np.testing.assert_allclose(r.weight[0], expected, rtol=1e-10, atol=1e-12)
    assert r.predicted_error == pytest.approx(w[q] ** 2 / (2 * Hinv[q, q]), rel=1e-10)
    assert np.flatnonzero(~r.mask[0]).tolist() == [q]


def test_exact_greedy_sequence_matches_brute_force():
    rng = np.random.default_rng(1)
    X = activations(rng, 40, 8, mix=0.3)
    H = hessian(X)
    w = rng.standard_normal(8)
    # Brute-force greedy: at each step try every remaining weight, re-solve least squares.
    removed = np.zeros(8, dtype=bool)
    total = 0.0
    for k in range(1, 4):
        trials = []
        for q in np.flatnonzero(~removed):
            trial = removed.copy()
            trial[q] = True
            trials.append((best_error_for_mask(w, X, trial)[0], q))
        err, q = min(trials)
        removed[q] = True
        total = err
        r = prune_layer(w[None, :], H, sparsity=k / 8, solver="exact", damp=0.0)
        assert (~r.mask[0] == removed).all(), f"step {k}"
        _, w_best = best_error_for_mask(w, X, removed)
        np.testing.assert_allclose(r.weight[0], w_best, rtol=1e-8, atol=1e-10)
        assert r.predicted_error == pytest.approx(total, rel=1e-8)


@pytest.mark.parametrize("solver", ["exact", "fast"])
@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_predicted_error_equals_measured_error(solver, pattern):
    rng = np.random.default_rng(2)
    X = activations(rng, 300, 24)
    W = rng.standard_normal((10, 24))
    r = prune_layer(W, hessian(X), sparsity=0.6, pattern=pattern, solver=solver, damp=0.0, block_size=8)
    assert r.solver == solver and r.damping == 0.0
    measured = measured_error(W, r.weight, X)
    assert r.predicted_error == pytest.approx(measured, rel=1e-8)
    assert layer_error(W, r.weight, hessian(X)) == pytest.approx(measured, rel=1e-10)


def test_exact_kept_weights_are_least_squares_optimal_per_row():
    rng = np.random.default_rng(3)
    X = activations(rng, 200, 16)
    W = rng.standard_normal((6, 16)) * np.array([[0.1], [1], [3], [1], [0.5], [2]])
    r = prune_layer(W, hessian(X), sparsity=0.5, solver="exact", damp=0.0)
    for row in range(6):
        _, w_best = best_error_for_mask(W[row], X, ~r.mask[row])
        np.testing.assert_allclose(r.weight[row], w_best, rtol=1e-8, atol=1e-10)
    # The global allocation moves removals to the rows where they are cheap.
    counts = (~r.mask).sum(axis=1)
    assert counts.sum() == 48 and counts[0] > counts[2]


# ---------------------------------------------------------------- fast solver (SparseGPT)


def sparsegpt_reference(W, H, sparsity, block, pattern=None):
    """SparseGPT Alg. 1 transcribed literally: left to right, U = chol(H^-1)^T (upper)."""
    W = W.copy()
    cols = W.shape[1]
    U = np.linalg.cholesky(np.linalg.inv(H)).T
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, U1, Err = W[:, i1:i2].copy(), U[i1:i2, i1:i2], np.zeros((W.shape[0], i2 - i1))
        if pattern is None:
            scores = (W1 / np.diag(U1)) ** 2
            k = round(scores.size * sparsity)
            drop = scores <= np.sort(scores.ravel())[k - 1]
        else:
            drop = np.zeros(W1.shape, dtype=bool)
        for i in range(i2 - i1):
            if pattern is not None and i % pattern[1] == 0:
                g = (W1[:, i : i + pattern[1]] / np.diag(U1)[i : i + pattern[1]]) ** 2
                order = np.argsort(g, axis=1)[:, : pattern[1] - pattern[0]]
                np.put_along_axis(drop[:, i : i + pattern[1]], order, True, axis=1)
            q = np.where(drop[:, i], 0.0, W1[:, i])
            Err[:, i] = (W1[:, i] - q) / U1[i, i]
            W1[:, i:] -= np.outer(Err[:, i], U1[i, i:])
            W1[:, i] = q
        W[:, i1:i2] = W1
        W[:, i2:] -= Err @ U[i1:i2, i2:]
    return W


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_fast_equals_sparsegpt_algorithm_on_reversed_columns(pattern):
    rng = np.random.default_rng(4)
    X = activations(rng, 400, 48)
    H = hessian(X)
    W = rng.standard_normal((20, 48))
    r = prune_layer(W, H, sparsity=0.5, pattern=pattern, solver="fast", damp=0.0, block_size=16)
    expected = sparsegpt_reference(W[:, ::-1], H[::-1, ::-1], 0.5, 16, pattern)[:, ::-1]
    np.testing.assert_allclose(r.weight, expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_fast_on_float32_weights_runs_in_float32_and_matches_float64(pattern):
    rng = np.random.default_rng(6)
    X = activations(rng, 600, 96)
    H = hessian(X)
    W = rng.standard_normal((40, 96))
    r64 = prune_layer(W, H, sparsity=0.5, pattern=pattern, solver="fast", block_size=32)
    r32 = prune_layer(W.astype(np.float32), H, sparsity=0.5, pattern=pattern, solver="fast", block_size=32)
    assert r64.weight.dtype == np.float64 and r32.weight.dtype == np.float32
    assert np.mean(r32.mask == r64.mask) > 0.99  # near-ties may flip a few choices
    same = (r32.mask == r64.mask).all(axis=1)
    np.testing.assert_allclose(r32.weight[same], r64.weight[same], rtol=1e-4, atol=1e-4)
    e32, e64 = (layer_error(W, r.weight, H) for r in (r32, r64))
    assert e32 == pytest.approx(e64, rel=1e-3)
    assert r32.predicted_error == pytest.approx(damped_error(W, r32, X), rel=1e-4)


def test_fast_close_to_exact_and_both_beat_baselines():
    rng = np.random.default_rng(5)
    X = activations(rng, 512, 64, mix=0.02)
    H = hessian(X)
    W = rng.standard_normal((64, 64))
    err = {s: layer_error(W, prune_layer(W, H, solver=s).weight, H) for s in ("exact", "fast")}
    base = {m: layer_error(W, prune_layer(W, H, method=m).weight, H) for m in ("magnitude", "obd", "wanda")}
    # SparseGPT's fixed column order costs it against OBC's free greedy order. Fast/exact error
    # measured at 128x128, 50%: 1.15-1.2 (block 16-128) for independent inputs, 1.2-1.3 at this
    # mild correlation, 1.5-1.9 at mix=0.05, 2.5-5 for strongly correlated inputs (and 2.5-3 in
    # scripts/bench_layerwise.py). Here it is 1.12.
    assert err["exact"] <= err["fast"] <= 1.35 * err["exact"]
    assert max(err.values()) < min(base.values())


# ---------------------------------------------------------------- least-squares refit


def test_refit_converges_to_the_least_squares_optimum_of_every_row():
    rng = np.random.default_rng(7)
    X = activations(rng, 200, 12)
    H = hessian(X)
    W = rng.standard_normal((5, 12))
    removed = rng.random(W.shape) < 0.5
    removed[0] = False  # nothing removed: the optimum is the row as it is
    removed[1] = True  # everything removed
    start = W + 0.1 * rng.standard_normal(W.shape)  # any start; removed entries are ignored
    weight, predicted = refit_kept(W, start, H, removed, iterations=50)
    total = 0.0
    for r in range(5):
        err, w_best = best_error_for_mask(W[r], X, removed[r])
        np.testing.assert_allclose(weight[r], w_best, rtol=1e-6, atol=1e-8)
        total += err
    assert predicted == pytest.approx(total, rel=1e-8)
    # Each iteration lowers the error; a few already take most of the way.
    errors = [refit_kept(W, start, H, removed, iterations=k)[1] for k in range(4)]
    assert all(a > b for a, b in zip(errors, errors[1:])) and errors[3] < total + 0.1 * (errors[0] - total)


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_auto_refits_the_fast_solver_beyond_the_exact_budget(monkeypatch, pattern):
    rng = np.random.default_rng(8)
    X = activations(rng, 400, 48)
    H = hessian(X)
    W = rng.standard_normal((20, 48))
    monkeypatch.setattr(layerwise, "EXACT_MAX_WORK", 0)
    fast = prune_layer(W, H, sparsity=0.5, pattern=pattern, solver="fast", block_size=16)
    auto = prune_layer(W, H, sparsity=0.5, pattern=pattern, solver="auto", block_size=16)
    assert (fast.solver, auto.solver) == ("fast", "fast+refit")
    assert np.array_equal(auto.mask, fast.mask)  # same mask, better kept weights
    assert layer_error(W, auto.weight, H) < layer_error(W, fast.weight, H)
    assert auto.predicted_error == pytest.approx(damped_error(W, auto, X), rel=1e-8)
    monkeypatch.setattr(layerwise, "REFIT_MAX_FLOPS", 0)
    assert prune_layer(W, H, sparsity=0.5, pattern=pattern, block_size=16).solver == "fast"


# ---------------------------------------------------------------- masks and targets


@pytest.mark.parametrize("method,solver", ALL_METHODS)
@pytest.mark.parametrize("cols", [12, 14])
def test_nm_pattern_keeps_n_in_every_group(method, solver, cols):
    rng = np.random.default_rng(6)
    X = activations(rng, 100, cols)
    W = rng.standard_normal((7, cols))
    r = prune_layer(W, hessian(X), method=method, pattern=(2, 4), solver=solver)
    nonzero = r.weight != 0
    assert (nonzero == r.mask).all()
    for g in range(0, cols, 4):
        expected = min(2, cols - g)  # a tail group of r < 4 columns keeps min(2, r)
        assert (nonzero[:, g : g + 4].sum(axis=1) == expected).all()


@pytest.mark.parametrize("method,solver", ALL_METHODS)
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77, 1.0])
def test_sparsity_target_met_exactly(method, solver, sparsity):
    rng = np.random.default_rng(7)
    X = activations(rng, 80, 20)
    W = rng.standard_normal((9, 20))
    r = prune_layer(W, hessian(X), method=method, sparsity=sparsity, solver=solver, block_size=8)
    assert (r.weight == 0).sum() == round(sparsity * W.size)
    assert ((r.weight != 0) == r.mask).all()
    assert np.isfinite(r.weight).all() and np.isfinite(r.predicted_error)


@pytest.mark.parametrize("method,solver", ALL_METHODS)
def test_prezeroed_weights_stay_zero_and_count(method, solver):
    rng = np.random.default_rng(8)
    X = activations(rng, 80, 16)
    H = hessian(X)
    W = rng.standard_normal((8, 16))
    W[rng.random(W.shape) < 0.3] = 0.0
    zero = W == 0
    r = prune_layer(W, H, method=method, sparsity=0.5, solver=solver, block_size=8)
    assert (r.weight[zero] == 0).all() and (~r.mask[zero]).all()
    assert (r.weight == 0).sum() == 64
    # A target below the current sparsity removes nothing and corrects nothing.
    r = prune_layer(W, H, method=method, sparsity=0.1, solver=solver, block_size=8)
    np.testing.assert_array_equal(r.weight, W)
    assert r.predicted_error == 0.0


def test_baseline_masks_match_their_definitions():
    rng = np.random.default_rng(9)
    X = activations(rng, 60, 10)
    H = hessian(X)
    W = rng.standard_normal((6, 10))
    k = 30
    r = prune_layer(W, None, method="magnitude", sparsity=0.5)
    assert set(np.flatnonzero(~r.mask)) == set(np.argsort(np.abs(W), axis=None)[:k])
    assert np.isnan(r.predicted_error)  # no H, no prediction
    r = prune_layer(W, H, method="obd", sparsity=0.5)
    assert set(np.flatnonzero(~r.mask)) == set(np.argsort(np.diag(H) * W**2, axis=None)[:k])
    r = prune_layer(W, H, method="wanda", sparsity=0.5)
    per_row = np.argsort(np.abs(W) * np.linalg.norm(X, axis=0), axis=1)[:, :5]
    for row in range(6):
        assert set(np.flatnonzero(~r.mask[row])) == set(per_row[row])
    # Predicted error of a no-correction method: 1/2 dW^T (H + damping I) dW.
    dW = W - r.weight
    assert r.predicted_error == pytest.approx(layer_error(W, r.weight, H) + 0.5 * r.damping * np.sum(dW**2))
    assert r.damping == pytest.approx(0.01 * np.mean(np.diag(H)))


# ---------------------------------------------------------------- degenerate Hessians


@pytest.mark.parametrize("method,solver", ALL_METHODS)
def test_dead_inputs_give_zero_weights_and_no_nan(method, solver):
    rng = np.random.default_rng(10)
    X = activations(rng, 100, 12)
    X[:, [2, 7]] = 0.0
    H = hessian(X)
    W = rng.standard_normal((5, 12))
    r = prune_layer(W, H, method=method, sparsity=0.5, solver=solver, block_size=4)
    assert (r.weight[:, [2, 7]] == 0).all()
    assert np.isfinite(r.weight).all() and np.isfinite(r.predicted_error)
    assert (r.weight == 0).sum() == 30
    live = np.ones(12, dtype=bool)
    live[[2, 7]] = False
    assert r.damping == pytest.approx(0.01 * np.mean(np.diag(H)[live]))
    W_prepared = np.where(live, W, 0.0)  # dead inputs contribute nothing to E
    assert r.predicted_error == pytest.approx(damped_error(W_prepared, r, X), rel=1e-8)


@pytest.mark.parametrize("method,solver", ALL_METHODS)
def test_dead_inputs_keep_their_weights_unless_the_target_needs_them(method, solver):
    rng = np.random.default_rng(12)
    X = activations(rng, 100, 12)
    X[:, [2, 7]] = 0.0
    W = rng.standard_normal((5, 12))
    H = hessian(X)
    unchanged = prune_layer(W, H, method=method, sparsity=0.0, solver=solver, block_size=4)
    assert np.array_equal(unchanged.weight, W)
    r = prune_layer(W, H, method=method, sparsity=4 / 60, solver=solver, block_size=4)
    dead = np.abs(W[:, [2, 7]])
    expected = np.isin(np.abs(W), np.sort(dead, axis=None)[:4])  # the 4 smallest dead weights
    assert np.array_equal(r.weight == 0, expected)
    assert np.array_equal(r.weight[~expected], W[~expected])  # nothing else moves


def damped_error(W, r, X):
    """E(W') - E(W) + damping/2 ||W - W'||^2: what every method predicts (OBS exactly so)."""
    return measured_error(W, r.weight, X) + 0.5 * r.damping * float(np.sum((W - r.weight) ** 2))


@pytest.mark.parametrize("solver", ["exact", "fast"])
@pytest.mark.parametrize("case", ["few_samples", "duplicated_columns", "all_zero"])
def test_singular_hessians_give_no_nan(solver, case):
    rng = np.random.default_rng(11)
    X = activations(rng, 6 if case == "few_samples" else 100, 16)
    if case == "duplicated_columns":
        X[:, 8:] = X[:, :8]
    if case == "all_zero":
        X[:] = 0.0
    W = rng.standard_normal((5, 16))
    for damp in (0.0, 0.01):
        r = prune_layer(W, hessian(X), sparsity=0.5, solver=solver, damp=damp, block_size=8)
        assert np.isfinite(r.weight).all() and np.isfinite(r.predicted_error)
        assert (r.weight == 0).sum() == 40
        if case == "all_zero":  # no information: magnitude pruning, and E cannot change
            assert r.solver == "magnitude" and r.predicted_error == 0.0
            assert set(np.flatnonzero(~r.mask)) == set(np.argsort(np.abs(W), axis=None)[:40])
        else:
            assert r.damping > 0  # grown from 0 until the factorisation succeeded
            assert r.predicted_error == pytest.approx(damped_error(W, r, X), rel=1e-6, abs=1e-9)


def test_invalid_arguments_raise():
    W, H = np.ones((2, 3)), np.eye(3)
    for kwargs in (
        {"method": "optimal"},
        {"solver": "slow"},
        {"sparsity": 1.5},
        {"pattern": (3, 2)},
        {"pattern": (2.0, 4)},
        {"block_size": 0},
        {"damp": -1.0},
    ):
        with pytest.raises(ValueError):
            prune_layer(W, H, **kwargs)
    with pytest.raises(ValueError):
        prune_layer(W, np.eye(2))
    with pytest.raises(ValueError):
        prune_layer(W, None, method="obs")
    with pytest.raises(ValueError):
        prune_layer(np.array([[np.nan, 1.0, 2.0]]), H)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 6),
    cols=st.integers(1, 12),
    sparsity=st.floats(0.0, 1.0),
    pattern=st.sampled_from([None, None, (1, 2), (2, 4), (3, 4)]),
    method=st.sampled_from(["obs-exact", "obs-fast", "obd", "wanda", "magnitude"]),
    zero_frac=st.sampled_from([0.0, 0.4]),
    seed=st.integers(0, 2**16),
)
def test_invariants_on_random_layers(rows, cols, sparsity, pattern, method, zero_frac, seed):
    rng = np.random.default_rng(seed)
    X = activations(rng, rng.integers(1, 3 * cols + 2), cols)
    W = rng.standard_normal((rows, cols))
    W[rng.random(W.shape) < zero_frac] = 0.0
    name, _, solver = method.partition("-")
    solver = solver or "auto"
    r = prune_layer(W, hessian(X), method=name, sparsity=sparsity, pattern=pattern, solver=solver, block_size=4)
    assert isinstance(r, LayerResult) and r.weight.shape == W.shape and r.weight.dtype == np.float64
    assert np.isfinite(r.weight).all() and np.isfinite(r.predicted_error) and r.predicted_error >= 0
    assert ((r.weight != 0) == r.mask).all()
    assert (r.weight[W == 0] == 0).all()
    live = np.sum(X * X, axis=0) > 0
    # Dead inputs: weights the target removed cost nothing on the data (excluded from E).
    W_prepared = np.where(~live & (r.weight == 0), 0.0, W)
    if pattern is None:
        assert (r.weight == 0).sum() == max(round(sparsity * W.size), int((W == 0).sum()))
    else:
        n, m = pattern
        for g in range(0, cols, m):
            kept = r.mask[:, g : g + m].sum(axis=1)
            could_keep = (W[:, g : g + m] != 0).sum(axis=1)
            assert (kept == np.minimum(min(n, cols - g), could_keep)).all()
    if live.any():
        assert r.predicted_error == pytest.approx(damped_error(W_prepared, r, X), rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("m", [4, 8, 9, 16])
def test_group_selection_matches_stable_sort(m):
    rng = np.random.default_rng(12)
    scores = rng.integers(0, 4, size=(50, 3, m)).astype(float)  # many ties
    forced = rng.random(scores.shape) < 0.2
    n_remove = rng.integers(0, m + 1, size=(50, 3))
    got = smallest_in_groups(scores, forced, n_remove)
    for idx in itertools.product(range(50), range(3)):
        s = np.where(forced[idx], -np.inf, scores[idx])
        count = max(n_remove[idx], forced[idx].sum())
        expected = np.zeros(m, dtype=bool)
        expected[np.argsort(s, kind="stable")[:count]] = True
        assert (got[idx] == expected).all()


def test_exact_allowed_spends_the_budget_on_the_cheapest_layers():
    """Modelled seconds rows * cols^3 * EXACT_SECONDS_PER_WORK, summed over a layer's row groups;
    layers admitted cheapest first while the sum stays within the budget; none beyond
    EXACT_MAX_WORK per group."""
    from onnx_obs.algorithms.layerwise import EXACT_MAX_WORK, EXACT_SECONDS_PER_WORK, exact_allowed

    layers = [[(64, 576)], [(256, 256)], [(8, 16)] * 4, [(512, 512)], [(128, 256)]]
    secs = [64 * 576**3, 256 * 256**3, 4 * 8 * 16**3, None, 128 * 256**3]
    secs = [None if w is None else w * EXACT_SECONDS_PER_WORK for w in secs]
    assert 512 * 512**3 > EXACT_MAX_WORK
    for budget in (0.0, 0.5, 1.0, 1.6, 3.0, 100.0):
        allowed = exact_allowed(layers, budget)
        assert allowed[3] is False
        spent = sum(s for s, a in zip(secs, allowed) if a)
        assert spent <= budget
        order = sorted((s, i) for i, s in enumerate(secs) if s is not None)
        prefix = []
        for s, i in order:  # the longest cheapest-first prefix that fits
            if sum(secs[j] for j in prefix) + s > budget:
                break
            prefix.append(i)
        assert [i for i, a in enumerate(allowed) if a] == sorted(prefix)
    assert exact_allowed(layers, 100.0) == [True, True, True, False, True]


def test_exact_allowed_with_values_admits_most_value_per_second_then_fills():
    """With each layer's value: layers by value / modelled seconds, best first, each admitted if it
    still fits (a cheaper one further down may fill what a dearer one left)."""
    from onnx_obs.algorithms.layerwise import EXACT_SECONDS_PER_WORK, exact_allowed

    layers = [[(256, 256)], [(768, 256)], [(64, 64)], [(1024, 256)], [(128, 128)]]
    secs = [r * c**3 * EXACT_SECONDS_PER_WORK for (r, c), in layers]
    value = [0.04, 9.0, 0.001, 2.0, 0.001]
    for budget in (0.1, 1.0, 2.0, 4.0):
        allowed = exact_allowed(layers, budget, value)
        picked = [i for i, a in enumerate(allowed) if a]
        assert sum(secs[i] for i in picked) <= budget
        spent, expect = 0.0, []
        for i in sorted(range(len(layers)), key=lambda i: -value[i] / secs[i]):
            if spent + secs[i] <= budget:
                expect.append(i)
                spent += secs[i]
        assert picked == sorted(expect)
        # the highest value-per-second layer that fits alone is always in
        best = max((i for i in range(len(layers)) if secs[i] <= budget), key=lambda i: value[i] / secs[i])
        assert best in picked
    # the big QKV-like layer (most value) goes before the cheap ones of little value
    assert exact_allowed(layers, secs[1], value) == [False, True, False, False, False]
    assert any(exact_allowed(layers, b, value) != exact_allowed(layers, b) for b in (1.0, 2.0))


def test_fast_levels_prune_as_prune_layer_at_every_count():
    """One factorisation of H serves every count: bitwise what prune_layer's fast solver gives,
    dead inputs and existing zeros included."""
    from onnx_obs.algorithms.layerwise import FastLevels

    rng = np.random.default_rng(4)
    W = rng.standard_normal((12, 40)).astype(np.float32)
    W[3, 7] = 0.0
    X = rng.standard_normal((40, 120))
    X[5] = 0.0
    H = 2 * X @ X.T / X.shape[1]
    levels = FastLevels(W, H, block_size=16)
    for k in (0, 1, 100, 240, 431):
        got = levels.prune(k)
        want = prune_layer(W, H, sparsity=k / W.size, solver="fast", block_size=16)
        np.testing.assert_array_equal(got.weight, want.weight)
        np.testing.assert_array_equal(got.mask, want.mask)
        assert (got.predicted_error, got.damping) == (want.predicted_error, want.damping)
    # all counts in one stacked pass, on all rows and on some: each as its own prune_layer run
    counts = [0, 1, 100, 240, 431]
    some = np.array([0, 3, 4, 9])
    want = [prune_layer(W, H, sparsity=k / W.size, solver="fast", block_size=16).predicted_error for k in counts]
    np.testing.assert_allclose(levels.errors(counts), want, rtol=1e-6)
    want = [prune_layer(W[some], H, sparsity=k / W[some].size, solver="fast", block_size=16).predicted_error
            for k in (0, 5, 80)]
    np.testing.assert_allclose(levels.errors([0, 5, 80], some), want, rtol=1e-6)
