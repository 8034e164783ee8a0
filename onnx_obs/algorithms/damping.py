"""Damping of a layer-wise Hessian before it is factorised: the one rule every OBS solver uses.

lambda = damp * mean(diag H over live inputs) is added to the diagonal. Should the Cholesky
factorisation still fail (singular H with damp = 0), lambda grows tenfold (from at least
1e-10 * max diag H) until it succeeds with no squared pivot below 1e-12 * max diag H (a
numerically singular H can pass dpotrf with rounding-level pivots, whose inverse would be noise);
the value actually used is returned for the report.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import lapack

from onnx_obs.algorithms.blas_threads import one_blas_thread


def damping(diag: np.ndarray, damp: float) -> float:
    """lambda = damp * the mean of the positive diagonal entries (0 when there are none)."""
    live = diag[diag > 0]
    return damp * float(live.mean()) if live.size else 0.0


def damped_cholesky(A: np.ndarray, lam: float, scale: float) -> tuple[np.ndarray, float]:
    """Lower Cholesky factor (Fortran order) of A + lam I, and the lam used (see the module
    docstring); scale: max diag H. A is left unchanged. On one BLAS thread: a threaded dpotrf
    rounds differently with the thread count (onnx_obs/threads.py)."""
    scale = max(scale, np.finfo(np.float64).tiny)
    while True:
        B = np.array(A, dtype=np.float64, order="F")
        B.flat[:: B.shape[0] + 1] += lam
        with one_blas_thread():
            L, info = lapack.dpotrf(B, lower=1, clean=0, overwrite_a=1)
        if info == 0 and L.diagonal().min() ** 2 > 1e-12 * scale:
            return L, lam
        lam = max(10.0 * lam, 1e-10 * scale)
