"""Least-squares refit of the kept weights for a fixed mask: OBS removing a whole set at once.

For one row with removed set M and kept set F, minimising E = 1/2 (w - w0)^T H (w - w0) subject
to w_M = 0 (Hassibi & Stork Eq. 5 for a set of weights, solved on the kept side) gives
    w_F = w0_F + H_FF^-1 H_FM w0_M.
The fast solver (SparseGPT) freezes each column once it is visited, so its kept weights are not
the optimum for its own mask. Rather than factorising H_FF for every row (|F|^3 / 3 flops each),
the refit runs preconditioned conjugate gradients on all rows at once, started from the fast
solver's weights: one product (rows x cols) @ H per iteration, a Jacobi (diag H) preconditioner,
and E falls at every iteration. On the benchmark's correlated inputs 10 iterations reach 0.52-0.57x
of the fast solver's error and 20 the exact optimum (0.52-0.56x).
"""

from __future__ import annotations

import numpy as np


def refit_flops(rows: int, cols: int) -> float:
    """Flops of one conjugate-gradient iteration on a (rows, cols) layer."""
    return 2.0 * rows * cols * cols


def refit_kept(W0: np.ndarray, W: np.ndarray, H: np.ndarray, removed: np.ndarray, iterations: int,
               tol: float = 1e-12) -> tuple[np.ndarray, float]:
    """Return (weights, E) after at most `iterations` of conjugate gradients from W (zero where
    `removed`) towards the kept weights minimising E = 1/2 sum_r (w_r - w0_r)^T H (w_r - w0_r);
    stops early once the preconditioned squared residual falls below tol times its start.
    H: symmetric positive definite (the damped H)."""
    W0 = np.asarray(W0, dtype=np.float64)
    keep = (~removed).astype(np.float64)
    D = np.asarray(W, dtype=np.float64) * keep - W0  # the change from W0, fixed at -w0 on removed
    precond = keep / H.diagonal()
    G = (D @ H) * keep  # gradient of E over the kept weights
    Z = G * precond
    P = -Z
    gz = np.einsum("ij,ij->i", G, Z)
    start = gz.sum()
    for _ in range(iterations):
        if gz.sum() <= tol * start:
            break
        HP = (P @ H) * keep
        curvature = np.einsum("ij,ij->i", P, HP)
        alpha = np.divide(gz, curvature, out=np.zeros_like(gz), where=curvature > 0)
        D += alpha[:, None] * P
        G += alpha[:, None] * HP
        Z = G * precond
        gz_next = np.einsum("ij,ij->i", G, Z)
        beta = np.divide(gz_next, gz, out=np.zeros_like(gz), where=gz > 0)
        P = beta[:, None] * P - Z
        gz = gz_next
    return W0 + D, 0.5 * float(np.einsum("ij,ij->", D @ H, D))
