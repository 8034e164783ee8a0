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

from onnx_obs.threads import panel_matmul


def refit_flops(rows: int, cols: int) -> float:
    """Flops of one conjugate-gradient iteration on a (rows, cols) layer."""
    return 2.0 * rows * cols * cols


def refit_kept(W0: np.ndarray, W: np.ndarray, H: np.ndarray, removed: np.ndarray, iterations: int,
               tol: float = 1e-12) -> tuple[np.ndarray, float]:
    """Return (weights, E) after at most `iterations` of conjugate gradients from W (zero where
    `removed`) towards the kept weights minimising E = 1/2 sum_r (w_r - w0_r)^T H (w_r - w0_r);
    stops early once the preconditioned squared residual falls below tol times its start.
    H: symmetric positive definite (the damped H). Works in W's floating type: float32 for a
    float32 W (the fast solver's), float64 otherwise. On correlated random layers float32 took
    0.84 s against 1.56 s (512x4608, 3 iterations) and 0.63 against 1.11 s (256x2304, 20), its E
    within 3e-10 of float64's."""
    dtype = np.float32 if W.dtype == np.float32 else np.float64
    H, W0 = H.astype(dtype, copy=False), W0.astype(dtype, copy=False)
    keep = ~removed
    D = np.where(keep, W, 0).astype(dtype) - W0  # the change from W0, -w0 on removed
    precond = np.where(keep, 1 / H.diagonal(), 0).astype(dtype)
    R = panel_matmul(D, H)  # kept up to date below: E and the gradient need no further product
    G = R * keep  # gradient of E over the kept weights
    Z = G * precond
    P = -Z
    gz = np.einsum("ij,ij->i", G, Z)
    start = gz.sum()
    for _ in range(iterations):
        if gz.sum() <= tol * start:
            break
        HP = panel_matmul(P, H)  # P is 0 on removed weights: P . HP is the curvature over the kept
        curvature = np.einsum("ij,ij->i", P, HP)
        alpha = np.divide(gz, curvature, out=np.zeros_like(gz), where=curvature > 0)
        D += alpha[:, None] * P
        R += alpha[:, None] * HP
        G = R * keep
        Z = G * precond
        gz_next = np.einsum("ij,ij->i", G, Z)
        beta = np.divide(gz_next, gz, out=np.zeros_like(gz), where=gz > 0)
        P = beta[:, None] * P - Z
        gz = gz_next
    return W0 + D, 0.5 * float(np.einsum("ij,ij->", D, R, dtype=np.float64))
