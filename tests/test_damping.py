"""algorithms/damping.py: lambda from the live diagonal, grown until the factor is sound."""

from __future__ import annotations

import numpy as np

from onnx_obs.algorithms.damping import damped_cholesky, damping
from onnx_obs.algorithms.structured import damped_inverse


def test_damping_is_a_fraction_of_the_live_mean():
    assert damping(np.array([0.0, 2.0, 4.0, -1.0]), 0.1) == 0.1 * 3.0
    assert damping(np.zeros(3), 0.1) == 0.0


def test_factor_of_a_regular_h_keeps_lambda():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((50, 8))
    H = 2 * X.T @ X / 50
    L, lam = damped_cholesky(H, 0.01, float(H.diagonal().max()))
    assert lam == 0.01
    np.testing.assert_allclose(np.tril(L) @ np.tril(L).T, H + 0.01 * np.eye(8), rtol=1e-12, atol=1e-12)


def test_singular_h_without_damping_grows_lambda_until_sound():
    x = np.array([[1.0, 1.0, 0.0]])       # rank 1: H singular, no damping asked
    H = x.T @ x
    L, lam = damped_cholesky(H, 0.0, 1.0)
    assert lam >= 1e-10
    assert np.tril(L).diagonal().min() ** 2 > 1e-12
    np.testing.assert_allclose(np.tril(L) @ np.tril(L).T, H + lam * np.eye(3), atol=1e-12)


def test_structured_inverse_uses_the_same_rule():
    H = np.diag([4.0, 2.0, 0.0])          # one dead input
    inv, lam = damped_inverse(H, 0.5)
    assert lam == 0.5 * 3.0               # mean of the live diagonal
    np.testing.assert_allclose(inv, np.linalg.inv(H + lam * np.eye(3)), rtol=1e-12)
    inv, lam = damped_inverse(np.zeros((2, 2)), 0.5)   # no live input: lambda 1
    assert lam == 1.0 and np.allclose(inv, np.eye(2))
