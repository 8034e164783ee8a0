"""Full-network inverse Hessian by the recursion of Hassibi & Stork (1992), Eq. 17.

H = alpha I + (1/P) sum_k X_k X_k^T, one derivative vector X_k per (sample, output unit), P samples.
Adding the vectors one at a time, Sherman-Morrison gives Eq. 17:
    H^-1_{m+1} = H^-1_m - (H^-1_m x x^T H^-1_m) / (P + x^T H^-1_m x),   H^-1_0 = alpha^-1 I.
Adding b vectors B (b x n) at once is the Woodbury form of the same recursion:
    H^-1 <- H^-1 - H^-1 B^T (P I_b + B H^-1 B^T)^-1 B H^-1.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np
from scipy.linalg import blas, cholesky, solve_triangular

from onnx_obs.errors import OnnxObsError

_SYMMETRIZE_TILE = 256
# Order up to which the rank-b update is one dsyrk call. Above it the lower triangle is updated in
# column panels (a dsyrk per diagonal block, a matrix product below it): OpenBLAS's threaded dsyrk
# crashes (SIGSEGV) on large orders, e.g. from n = 22,500 with b = 512 on 2 threads
# (scipy-openblas 0.3.31), well inside what check_fits allows.
_SYRK_ORDER = 8192
_PANEL_ELEMENTS = 2**25   # the product below a diagonal block: at most 256 MB at a time
_MIN_PANEL = 256


def inverse_hessian_rank1(X: np.ndarray, alpha: float, P: int) -> np.ndarray:
    """Eq. 17 exactly, one derivative vector (row of X, shape (num_vectors, n)) at a time.

    The reference implementation: O(num_vectors * n^2) with matrix-vector speed.
    """
    X = np.asarray(X, dtype=np.float64)
    Hinv = np.eye(X.shape[1]) / alpha
    for x in X:
        u = Hinv @ x
        Hinv -= np.outer(u, u) / (P + x @ u)
    return Hinv


def inverse_hessian(
    X_blocks: Iterable[np.ndarray], n: int, alpha: float, P: int, *, block: int = 512
) -> np.ndarray:
    """Eq. 17 applied `block` vectors at a time (Woodbury) over a stream of (b, n) blocks.

    Incoming blocks of any size are regrouped into `block` rows, so the caller may stream one
    sample at a time and still get matrix-matrix speed. Only the lower triangle of H^-1 is updated
    (BLAS symm/syrk); the result is symmetrised once at the end.
    """
    check_fits(n, copies=1)
    Hinv = np.zeros((n, n), order="F")
    Hinv.flat[:: n + 1] = 1.0 / alpha
    buf = np.empty((block, n))
    fill = 0
    for B in X_blocks:
        B = np.atleast_2d(np.asarray(B, dtype=np.float64))
        if B.ndim != 2 or B.shape[1] != n:
            raise ValueError(f"derivative block has shape {B.shape}, expected (b, {n})")
        start = 0
        while start < B.shape[0]:
            take = min(block - fill, B.shape[0] - start)
            buf[fill : fill + take] = B[start : start + take]
            fill += take
            start += take
            if fill == block:
                _woodbury_update(Hinv, buf, P)
                fill = 0
    if fill:
        _woodbury_update(Hinv, buf[:fill], P)
    symmetrize_from_lower(Hinv)
    return Hinv


def _woodbury_update(Hinv: np.ndarray, B: np.ndarray, P: int) -> None:
    """In place on the lower triangle of Hinv (Fortran order): Hinv -= U^T S^-1 U, U = B Hinv."""
    Ut = blas.dsymm(1.0, Hinv, B.T, lower=1)  # H^-1 B^T, (n, b)
    S = B @ Ut
    S.flat[:: S.shape[0] + 1] += P  # P I_b + B H^-1 B^T
    L = cholesky(S, lower=True)
    Z = solve_triangular(L, Ut.T, lower=True)  # Z^T Z = H^-1 B^T S^-1 B H^-1
    subtract_outer_lower(Hinv, Z.T)


def subtract_outer_lower(A: np.ndarray, V: np.ndarray) -> None:
    """A -= V V^T on the lower triangle of A (n x n, Fortran order), V (n, k), in place: one
    dsyrk, or column panels above _SYRK_ORDER."""
    n = A.shape[0]
    if n <= _SYRK_ORDER:
        blas.dsyrk(-1.0, V, beta=1.0, c=A, lower=1, overwrite_c=1)
        return
    width = max(_MIN_PANEL, min(_SYRK_ORDER, _PANEL_ELEMENTS // n))
    for s in range(0, n, width):
        e = min(s + width, n)
        Vs = V[s:e]
        A[s:e, s:e] = blas.dsyrk(-1.0, Vs, beta=1.0, c=A[s:e, s:e], lower=1)
        if e < n:
            A[e:, s:e] -= V[e:] @ Vs.T


def symmetrize_from_lower(A: np.ndarray) -> None:
    """Copy the lower triangle of square A onto its upper triangle, in place, tile by tile."""
    n = A.shape[0]
    for s in range(0, n, _SYMMETRIZE_TILE):
        e = min(s + _SYMMETRIZE_TILE, n)
        A[s:e, e:] = A[e:, s:e].T
        tile = A[s:e, s:e]
        upper = np.triu_indices(e - s, 1)
        tile[upper] = tile.T[upper]


def available_memory() -> int:
    """Bytes this process can still allocate: MemAvailable, capped by a cgroup v2 limit."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read())
        if limit != "max":
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return avail


def check_fits(n: int, copies: int = 2) -> None:
    """Raise OnnxObsError when `copies` n x n float64 matrices would not fit in available memory."""
    need = copies * n * n * 8
    avail = available_memory()
    if need > avail:
        raise OnnxObsError(
            f"full-network OBS over {n} weights needs {need / 2**30:.1f} GiB for its inverse Hessian "
            f"but only {avail / 2**30:.1f} GiB is available; use the default layer-wise OBS "
            "(--hessian layerwise) for a model this size"
        )
