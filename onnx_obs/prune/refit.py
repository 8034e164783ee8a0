"""Least-squares refit of the kept weights for a fixed mask: OBS removing a whole set at once.

For one row with removed set M and kept set F, minimising 1/2 (w - w0)^T H (w - w0) subject to
w_M = 0 (Hassibi & Stork Eq. 5 for a set of weights, solved on the kept side) gives
    w_F = w0_F + H_FF^-1 H_FM w0_M.
The fast solver (SparseGPT) freezes each column once it is visited, so its kept weights are not
the optimum for its own mask; refitting them roughly halves its layer error on correlated
inputs, for sum over rows of |F|^3 / 3 flops (one Cholesky factorisation of H_FF per row).
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import lapack

from onnx_obs.prune.blas_threads import one_blas_thread


def refit_flops(removed: np.ndarray) -> float:
    """Flops of the per-row factorisations refit_kept would do for this mask."""
    kept = (removed.shape[1] - np.count_nonzero(removed, axis=1)).astype(np.float64)
    return float(np.sum(kept**3) / 3)


def refit_kept(W0: np.ndarray, H: np.ndarray, removed: np.ndarray) -> tuple[np.ndarray, float]:
    """Return (weights, predicted error): zeros where `removed`, the optimal kept weights
    elsewhere, and 1/2 sum_r dW_r^T H dW_r. H: symmetric positive definite (the damped H)."""
    W0 = np.asarray(W0, dtype=np.float64)
    W = np.where(removed, 0.0, W0)
    with one_blas_thread():  # many small factorisations: threads only add waiting
        for r in range(W.shape[0]):
            M = removed[r]
            F = ~M
            if not M.any() or not F.any():
                continue
            factor, info = lapack.dpotrf(H[np.ix_(F, F)], lower=1, clean=0, overwrite_a=1)
            assert info == 0, "H must be positive definite"
            step, _ = lapack.dpotrs(factor, H[np.ix_(F, M)] @ W0[r, M], lower=1)
            W[r, F] += step
    dW = W0 - W
    return W, 0.5 * float(np.einsum("ij,ij->", dW @ H, dW))
