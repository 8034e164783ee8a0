"""Layer-wise quantization of one weight matrix given its Hessian: RTN, GPTQ and OBQ.

The OBS Lagrangian with the constraint w_q + dw_q = c (c a point of the quantization grid instead
of 0) gives the cost (w_q - c)^2 / (2 [H^-1]_qq) and the correction
dw = -((w_q - c) / [H^-1]_qq) H^-1 e_q (Frantar & Alistarh 2022, Optimal Brain Quantization):
- "obq": exact greedy per row, the cheapest weight first, H^-1 downdated after every step: the
  OBC solver (algorithms/obc.py) with the grid as target;
- "gptq": the same steps in a fixed column order (left to right, or by decreasing diag H with
  act_order), with lazy block updates from the upper Cholesky factor U of H^-1 (H^-1 = U^T U,
  [H_F^-1]_qq = U_qq^2 for the columns F not yet quantized): Frantar et al. 2023, Algorithm 1;
- "rtn": round to nearest, no correction (the baseline).
Weights that are exactly zero stay zero (0 is a point of every grid; pruning is the grid {0}),
so pruned weights stay pruned while the others compensate their quantization error.

The grid (Grid) has one scale and zero point per row and group of columns; it is chosen before
the solver runs, from the original weights: min-max, then per row and group the clipping ratio
(1.0, 0.98, ..., 0.5 of the range) with the lowest layer error dw H_gg dw^T of round-to-nearest,
H_gg the group's diagonal block of H (the whole H for one group per row: tr(dW H dW^T)); where
that search would cost more than CLIP_MAX_WORK multiply-adds, H's diagonal stands in for H_gg.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import lapack

from onnx_obs.algorithms.blas_threads import one_blas_thread
from onnx_obs.algorithms.damping import damped_cholesky, damping
from onnx_obs.algorithms.layerwise import (
    EXACT_MAX_WORK,
    _decoupled,
    check_hessian,
    layer_error,
)
from onnx_obs.algorithms.obc import _greedy
from onnx_obs.threads import panel_matmul

QUANT_METHODS = ("auto", "obq", "gptq", "rtn")
BITS = (4, 8)
CLIP_RATIOS = np.round(np.arange(1.0, 0.499, -0.02), 2)
# ratios * rows * sum of squared group widths: 2^34 is a few seconds on 2 cores (a 512 x 1024
# layer with one scale per row; a 4096 x 4096 layer in groups of 32)
CLIP_MAX_WORK = 2**34


@dataclass
class Grid:
    """Per weight of a (rows, cols) matrix: value = (code - zero) * scale, qmin <= code <= qmax,
    with scale and zero of the weight's row and column group."""

    scale: np.ndarray    # (rows, n_groups), already rounded to the dtype it is stored in
    zero: np.ndarray     # (rows, n_groups) integers in [qmin, qmax]
    groups: np.ndarray   # (cols,) group index of every column
    qmin: int
    qmax: int
    clip: np.ndarray     # (rows, n_groups) clipping ratio chosen

    def codes(self, W: np.ndarray, rows=slice(None)) -> np.ndarray:
        """The integer code nearest to every weight of W (the rows `rows` of the matrix)."""
        S, Z = self.scale[rows][:, self.groups], self.zero[rows][:, self.groups]
        return np.clip(np.rint(W / S) + Z, self.qmin, self.qmax).astype(np.int64)

    def values(self, codes: np.ndarray, rows=slice(None)) -> np.ndarray:
        S, Z = self.scale[rows][:, self.groups], self.zero[rows][:, self.groups]
        return (codes - Z) * S.astype(np.float64)

    def nearest(self, W: np.ndarray, rows=slice(None)) -> np.ndarray:
        """The grid value nearest to every weight of W."""
        return self.values(self.codes(W, rows), rows)


@dataclass
class QuantResult:
    weight: np.ndarray       # (rows, cols) float64, every value on the grid
    codes: np.ndarray        # (rows, cols) int64 codes: weight = (codes - zero) * scale
    grid: Grid
    predicted_error: float   # sum of the OBS costs (damped H); for rtn 1/2 tr(dW H dW^T)
    damping: float
    solver: str              # "obq", "gptq" or "rtn"


def make_grid(W: np.ndarray, bits: int, *, symmetric: bool = True, groups: np.ndarray | None = None,
              H: np.ndarray | None = None, ratios=CLIP_RATIOS, scale_dtype=np.float32) -> Grid:
    """Scales and zero points per row and column group (module doc); H None: plain squared error.

    symmetric: signed codes [-2^(b-1), 2^(b-1) - 1], zero 0, scale = max|w| / (2^(b-1) - 1);
    asymmetric: unsigned codes [0, 2^b - 1] over [min(w, 0), max(w, 0)], integer zero point.
    """
    W = np.asarray(W, dtype=np.float64)
    rows, cols = W.shape
    groups = np.zeros(cols, dtype=np.int64) if groups is None else np.asarray(groups, dtype=np.int64)
    if groups.shape != (cols,) or (cols and groups.min() < 0):
        raise ValueError(f"groups must be {cols} non-negative group indices, got shape {groups.shape}")
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    n_groups = int(groups.max(initial=-1)) + 1
    members = [np.flatnonzero(groups == g) for g in range(n_groups)]
    lo = np.zeros((rows, n_groups))
    hi = np.zeros((rows, n_groups))
    for g, cols_g in enumerate(members):
        if cols_g.size:
            lo[:, g] = np.minimum(W[:, cols_g].min(axis=1), 0.0)
            hi[:, g] = np.maximum(W[:, cols_g].max(axis=1), 0.0)
    work = len(ratios) * rows * sum(c.size**2 for c in members)
    if H is None:
        blocks = [None] * n_groups
    elif work <= CLIP_MAX_WORK:
        blocks = [np.asarray(H, dtype=np.float64)[np.ix_(c, c)] for c in members]
    else:
        blocks = [np.asarray(H, dtype=np.float64).diagonal()[c] for c in members]
    best = np.full((rows, n_groups), np.inf)
    grid = Grid(np.ones((rows, n_groups), dtype=scale_dtype), np.zeros((rows, n_groups), dtype=np.int64),
                groups, qmin, qmax, np.ones((rows, n_groups)))
    for ratio in ratios:
        scale, zero = _scale_zero(lo * ratio, hi * ratio, qmin, qmax, symmetric, scale_dtype)
        trial = Grid(scale, zero, groups, qmin, qmax, grid.clip)
        dW = W - trial.nearest(W)
        for g, (cols_g, Hg) in enumerate(zip(members, blocks)):
            d = dW[:, cols_g]
            err = np.einsum("ij,ij->i", d, d if Hg is None else d @ Hg if Hg.ndim == 2 else d * Hg)
            better = err < best[:, g]
            best[better, g] = err[better]
            grid.scale[better, g], grid.zero[better, g] = scale[better, g], zero[better, g]
            grid.clip[better, g] = ratio
    return grid


def _scale_zero(lo, hi, qmin, qmax, symmetric, scale_dtype):
    if symmetric:
        scale = np.maximum(-lo, hi) / qmax
    else:
        scale = (hi - lo) / (qmax - qmin)
    tiny = np.finfo(scale_dtype).tiny
    scale = np.where(scale > 0, scale, 1.0).astype(scale_dtype)  # an all-zero group: any scale
    scale = np.maximum(scale, tiny)  # below the dtype's range: the smallest normal scale
    zero = np.zeros(scale.shape, dtype=np.int64)
    if not symmetric:
        zero = np.clip(np.rint(-lo / scale.astype(np.float64)), qmin, qmax).astype(np.int64)
    return scale, zero


def quantize_layer(W: np.ndarray, H: np.ndarray | None, bits: int, *, symmetric: bool = True,
                   groups: np.ndarray | None = None, method: str = "auto", act_order: bool = False,
                   block_size: int = 128, damp: float = 0.01, scale_dtype=np.float32) -> QuantResult:
    """Quantize one layer W (rows = output units, cols = inputs) whose inputs have Hessian H.

    method "auto": obq while rows * cols^3 <= EXACT_MAX_WORK (as exact pruning), else gptq;
    H None allows only rtn. Exact zeros of W stay zero. groups: the group index of every column
    (default one group per row). act_order: gptq visits columns by decreasing diag H.
    """
    W = np.asarray(W, dtype=np.float64)
    _check(W, H, bits, method, block_size, damp)
    rows, cols = W.shape
    if method == "auto":
        method = "obq" if rows * cols**3 <= EXACT_MAX_WORK else "gptq"
    grid = make_grid(W, bits, symmetric=symmetric, groups=groups, H=H, scale_dtype=scale_dtype)
    pinned = W == 0.0
    if method == "rtn" or W.size == 0:
        codes = grid.codes(W)
        weight = grid.values(codes)
        predicted = float("nan") if H is None else layer_error(W, weight, H)
        return QuantResult(weight, codes, grid, predicted, 0.0, "rtn")
    h_diag = np.asarray(H).diagonal().astype(np.float64)
    dead = ~(h_diag > 0)  # inputs never active: decoupled, their weights rounded to nearest
    h_diag[dead] = 0.0
    lam = damping(h_diag, damp)
    order = np.argsort(-h_diag, kind="stable") if act_order and method == "gptq" else np.arange(cols)
    A = _decoupled(np.asarray(H)[np.ix_(order, order)], dead[order])
    L, lam = damped_cholesky(A, lam, float(h_diag.max(initial=0.0)))
    with one_blas_thread():  # a threaded factorisation rounds differently with the count
        Hinv, _ = lapack.dpotri(L, lower=1, overwrite_c=1)
    Hinv = np.tril(Hinv) + np.tril(Hinv, -1).T
    if method == "obq":
        per_weight = (grid.scale[:, grid.groups].astype(np.float64),
                      grid.zero[:, grid.groups].astype(np.float64), grid.qmin, grid.qmax)
        weight, _, losses, _ = _greedy(W, Hinv, pinned, np.full(rows, cols), grid=per_weight)
        predicted = float(losses.sum())
    else:
        with one_blas_thread():
            U, info = lapack.dpotrf(Hinv, lower=0, clean=1)
        if info != 0:
            raise ValueError("H^-1 is not positive definite: raise damp")
        permuted = Grid(grid.scale, grid.zero, grid.groups[order], grid.qmin, grid.qmax, grid.clip)
        weight_p, predicted = gptq(W[:, order], U, permuted, pinned[:, order], block_size)
        weight = np.empty_like(weight_p)
        weight[:, order] = weight_p
    codes = grid.codes(weight)
    return QuantResult(grid.values(codes), codes, grid, predicted, lam, method)


def gptq(W: np.ndarray, U: np.ndarray, grid: Grid, pinned: np.ndarray,
         block_size: int = 128) -> tuple[np.ndarray, float]:
    """GPTQ (Frantar et al. 2023, Alg. 1): columns left to right, each moved to its nearest grid
    value c (0 where pinned) with the OBS correction of the columns after it, -(w - c) / U_qq
    times U[q, q+1:]; inside a block of block_size columns at once, beyond it once per block.
    U: upper Cholesky factor of the damped H^-1. Return (weights on the grid, sum of the costs)."""
    W = np.array(W, dtype=np.float64)
    rows, cols = W.shape
    predicted = 0.0
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        Err = np.empty((rows, i2 - i1))
        for i in range(i1, i2):
            w = W[:, i]
            c = np.where(pinned[:, i], 0.0, _column_nearest(grid, w, i))
            err = (w - c) / U[i, i]
            predicted += 0.5 * float(err @ err)  # (w - c)^2 / (2 [H_F^-1]_qq)
            W[:, i + 1 : i2] -= np.outer(err, U[i, i + 1 : i2])
            W[:, i] = c
            Err[:, i - i1] = err
        W[:, i2:] -= panel_matmul(Err, U[i1:i2, i2:])
    return W, predicted


def _column_nearest(grid: Grid, w: np.ndarray, col: int) -> np.ndarray:
    g = grid.groups[col]
    s, z = grid.scale[:, g].astype(np.float64), grid.zero[:, g]
    return (np.clip(np.rint(w / s) + z, grid.qmin, grid.qmax) - z) * s


def _check(W, H, bits, method, block_size, damp) -> None:
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D, got shape {W.shape}")
    if not np.isfinite(W).all():
        raise ValueError("W contains NaN or infinity")
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    if method not in QUANT_METHODS:
        raise ValueError(f"method must be one of {QUANT_METHODS}, got {method!r}")
    if H is None and method != "rtn":
        raise ValueError(f"method {method!r} needs a Hessian H (rtn does not)")
    if H is not None:
        check_hessian(H, W)
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if damp < 0:
        raise ValueError(f"damp must be non-negative, got {damp}")
