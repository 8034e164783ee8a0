"""Layer-wise quantization (algorithms/quantize.py) against independent computations.

References: the grid by its direct min-max formula, the clipping search by brute force over the
ratios with tr(dW H dW^T) computed directly, GPTQ as the literal OBS projection loop with an
explicit inverse (no Cholesky, no lazy blocks), OBQ's greedy order by re-solving least squares for
every candidate, and the layer error from the activations themselves.
"""

from __future__ import annotations

import numpy as np
import pytest

from onnx_obs.algorithms.layerwise import layer_error
from onnx_obs.algorithms.quantize import CLIP_RATIOS, make_grid, quantize_layer


def activations(rng, n, cols, mix=0.3):
    A = np.eye(cols) + mix * rng.standard_normal((cols, cols))
    return (rng.standard_normal((n, cols)) @ A) * np.exp(0.3 * rng.standard_normal(cols))


def hessian(X):
    return 2.0 / len(X) * X.T @ X


def nearest(w, scale, zero, qmin, qmax):
    return (np.clip(np.rint(w / scale) + zero, qmin, qmax) - zero) * scale


@pytest.mark.parametrize("bits,symmetric", [(8, True), (4, True), (8, False), (4, False)])
def test_min_max_grid_matches_the_formula(bits, symmetric):
    rng = np.random.default_rng(0)
    W = rng.standard_normal((5, 12)) + (0 if symmetric else 0.7)
    groups = np.arange(12) // 4
    g = make_grid(W, bits, symmetric=symmetric, groups=groups, ratios=[1.0])
    for r in range(5):
        for k in range(3):
            w = W[r, 4 * k : 4 * k + 4]
            lo, hi = min(w.min(), 0), max(w.max(), 0)
            if symmetric:
                scale, zero, qmin, qmax = max(-lo, hi) / (2 ** (bits - 1) - 1), 0, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
            else:
                scale, qmin, qmax = (hi - lo) / (2**bits - 1), 0, 2**bits - 1
                zero = np.clip(np.rint(-lo / np.float32(scale)), qmin, qmax)
            assert g.scale[r, k] == np.float32(scale) and g.zero[r, k] == zero
            np.testing.assert_array_equal(g.nearest(W)[r, 4 * k : 4 * k + 4],
                                          nearest(w, np.float64(np.float32(scale)), zero, qmin, qmax))
    codes = g.codes(W)
    assert codes.min() >= g.qmin and codes.max() <= g.qmax
    # 0 is a grid point: exact zeros map to 0
    assert np.all(g.nearest(np.zeros_like(W)) == 0.0)


def test_clipping_search_picks_the_ratio_with_least_layer_error():
    rng = np.random.default_rng(1)
    X = activations(rng, 200, 10)
    H = hessian(X)
    W = rng.standard_normal((6, 10))
    W[:, 3] *= 6  # an outlier column makes clipping worth it
    g = make_grid(W, 4, H=H)
    for r in range(6):
        errs = []
        for ratio in CLIP_RATIOS:
            scale = np.float64(np.float32(np.abs(W[r]).max() * ratio / 7))
            d = W[r] - nearest(W[r], scale, 0, -8, 7)
            errs.append(d @ H @ d)
        assert g.clip[r, 0] == CLIP_RATIOS[int(np.argmin(errs))]
    assert (g.clip < 1).any()  # the search does clip somewhere


def test_rtn_is_round_to_nearest_with_its_layer_error():
    rng = np.random.default_rng(2)
    X = activations(rng, 100, 8)
    W = rng.standard_normal((4, 8))
    res = quantize_layer(W, hessian(X), 4, method="rtn")
    np.testing.assert_array_equal(res.weight, res.grid.nearest(W))
    dW = W - res.weight
    assert res.predicted_error == pytest.approx(np.sum((dW @ X.T) ** 2) / len(X), rel=1e-10)


def _obs_projection_loop(W, H, grid, order, pinned):
    """GPTQ's math without its tricks: explicit H^-1, one OBS projection per column in `order`."""
    W = W.copy()
    total = 0.0
    for r in range(W.shape[0]):
        w, Hinv = W[r].copy(), np.linalg.inv(H)
        for q in order:
            c = 0.0 if pinned[r, q] else grid.nearest(w[None, :], [r])[0, q]
            total += (w[q] - c) ** 2 / (2 * Hinv[q, q])
            w -= (w[q] - c) / Hinv[q, q] * Hinv[:, q]
            w[q] = c
            Hinv = Hinv - np.outer(Hinv[:, q], Hinv[q, :]) / Hinv[q, q]
        W[r] = w
    return W, total


@pytest.mark.parametrize("block_size", [1, 3, 128])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_equals_sequential_obs_projections(block_size, act_order):
    rng = np.random.default_rng(3)
    X = activations(rng, 300, 9)
    H = hessian(X)
    W = rng.standard_normal((4, 9))
    W[1, 2] = W[3, 5] = 0.0
    groups = np.arange(9) // 4
    res = quantize_layer(W, H, 4, groups=groups, method="gptq", act_order=act_order,
                         block_size=block_size, damp=0.0)
    order = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(9)
    expected, total = _obs_projection_loop(W, H, res.grid, order, W == 0)
    np.testing.assert_allclose(res.weight, expected, rtol=1e-9, atol=1e-12)
    assert res.predicted_error == pytest.approx(total, rel=1e-9)
    # the sum of the projection costs is the final layer error
    assert res.predicted_error == pytest.approx(layer_error(W, res.weight, H), rel=1e-8)
    assert res.weight[1, 2] == 0 and res.weight[3, 5] == 0


def test_obq_greedy_order_matches_brute_force():
    """Each OBQ step quantizes the weight whose move to its nearest grid value, with the others
    re-solved by least squares, costs least (weights pushed beyond the grid's range by more than
    half a step first, OBQ's outlier rule): checked by trying every candidate."""
    rng = np.random.default_rng(4)
    X = activations(rng, 60, 6, mix=0.5)
    H = hessian(X)
    w0 = rng.standard_normal(6)
    res = quantize_layer(w0[None, :], H, 4, method="obq", damp=0.0)
    grid = res.grid
    fixed = {}  # column -> value
    w = w0.copy()
    for _ in range(6):
        trials = []
        for q in sorted(set(range(6)) - set(fixed)):
            c = grid.nearest(w[None, :])[0, q]
            trial = {**fixed, q: c}
            free = [j for j in range(6) if j not in trial]
            v = w0.copy()
            for j, val in trial.items():
                v[j] = val
            if free:  # least squares of the free weights: min ||X (w0 - v)||
                rhs = X @ w0 - X[:, list(trial)] @ np.array(list(trial.values()))
                v[free] = np.linalg.lstsq(X[:, free], rhs, rcond=None)[0]
            outside = abs(w[q] - c) > 0.5 * grid.scale[0, 0]
            trials.append((not outside, np.sum((X @ (w0 - v)) ** 2) / len(X), q, c, v))
        _, _, q, c, w = min(trials, key=lambda t: t[:2])
        fixed[q] = c
    np.testing.assert_allclose(res.weight[0], w, rtol=1e-8, atol=1e-10)
    assert res.predicted_error == pytest.approx(layer_error(w0[None, :], res.weight, H), rel=1e-8)


def test_obq_beats_gptq_beats_rtn_and_all_stay_on_the_grid():
    rng = np.random.default_rng(5)
    X = activations(rng, 1000, 64)
    H = hessian(X)
    W = rng.standard_normal((16, 64))
    W[W < -2] = 0.0  # some pinned zeros
    errs = {}
    for method in ("obq", "gptq", "rtn"):
        res = quantize_layer(W, H, 4, groups=np.arange(64) // 16, method=method)
        errs[method] = layer_error(W, res.weight, H)
        np.testing.assert_array_equal(res.weight, res.grid.values(res.codes))
        assert res.codes.min() >= -8 and res.codes.max() <= 7
        assert np.all(res.weight[W == 0] == 0)
    assert max(errs["obq"], errs["gptq"]) < 0.8 * errs["rtn"]


def test_dead_inputs_and_singular_hessians_give_finite_weights():
    rng = np.random.default_rng(6)
    X = activations(rng, 5, 8)  # 5 samples, 8 inputs: singular
    X[:, 2] = 0.0  # a dead input
    W = rng.standard_normal((3, 8))
    for method in ("obq", "gptq"):
        res = quantize_layer(W, hessian(X), 8, method=method, damp=0.0, symmetric=False)
        assert np.isfinite(res.weight).all()
        # the dead input's weights are only rounded: nothing can compensate them
        np.testing.assert_array_equal(res.weight[:, 2], res.grid.nearest(W)[:, 2])


def test_auto_uses_obq_within_the_exact_budget(monkeypatch):
    from onnx_obs.algorithms import quantize

    rng = np.random.default_rng(7)
    W, H = rng.standard_normal((4, 8)), hessian(activations(rng, 50, 8))
    assert quantize_layer(W, H, 8).solver == "obq"
    monkeypatch.setattr(quantize, "EXACT_MAX_WORK", 4 * 8**3 - 1)
    assert quantize_layer(W, H, 8).solver == "gptq"


def test_invalid_arguments_raise():
    W, H = np.ones((2, 3)), np.eye(3)
    for kwargs, msg in [(dict(bits=3), "bits"), (dict(bits=8, method="x"), "method"),
                        (dict(bits=8, block_size=0), "block_size"), (dict(bits=8, damp=-1), "damp")]:
        with pytest.raises(ValueError, match=msg):
            quantize_layer(W, H, **kwargs)
    with pytest.raises(ValueError, match="Hessian"):
        quantize_layer(W, None, 8, method="gptq")
    with pytest.raises(ValueError, match="H must be"):
        quantize_layer(W, np.eye(2), 8)
    with pytest.raises(ValueError, match="groups"):
        make_grid(W, 8, groups=np.zeros(2))


def test_clipping_search_weighs_by_diag_h_beyond_its_budget(monkeypatch):
    from onnx_obs.algorithms import quantize

    rng = np.random.default_rng(8)
    H = hessian(activations(rng, 200, 10))
    W = rng.standard_normal((6, 10))
    W[:, 3] *= 6
    monkeypatch.setattr(quantize, "CLIP_MAX_WORK", 0)
    g = make_grid(W, 4, H=H)
    for r in range(6):
        errs = []
        for ratio in CLIP_RATIOS:
            scale = np.float64(np.float32(np.abs(W[r]).max() * ratio / 7))
            d = W[r] - nearest(W[r], scale, 0, -8, 7)
            errs.append(np.sum(np.diag(H) * d * d))
        assert g.clip[r, 0] == CLIP_RATIOS[int(np.argmin(errs))]
