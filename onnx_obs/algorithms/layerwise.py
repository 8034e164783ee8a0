"""Layer-wise pruning of one weight matrix given its Hessian: the entry point of the pipeline.

A layer is W (rows = output units, cols = inputs) and H = (2/n) sum_k x_k x_k^T over the n
calibration inputs, so E(W') = 1/2 sum_r (W - W')_r^T H (W - W')_r = mean_k ||(W - W') x_k||^2.

Shared preparation for every method that has an H:
- dead inputs (H_jj == 0) contribute nothing to E: their row and column of H become the unit
  vector (as SparseGPT does) and their weights are removed first, smallest first, but only as
  many as the target needs: an input that is dead on the calibration data may be live in
  production, so the model must not change beyond the target;
- damping as algorithms/damping.py (damp * mean(diag H over live inputs), grown until the
  Cholesky factorisation succeeds), the value actually used reported;
- H with no live input at all carries no information: the layer falls back to magnitude pruning
  (solver "magnitude", predicted error 0, which is exact since E does not depend on W).
Weights already exactly zero count as removed and stay zero. Unstructured targets count
round(sparsity * W.size) zeros in the whole matrix; a target below the current count removes
nothing more.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
from scipy.linalg import lapack

from onnx_obs.algorithms.baselines import SCORES
from onnx_obs.algorithms.blas_threads import one_blas_thread
from onnx_obs.algorithms.damping import damped_cholesky, damping
from onnx_obs.algorithms.masks import nm_mask, smallest_in_groups, smallest_overall, spread_zeros
from onnx_obs.algorithms.obc import _greedy, obc_prune, obc_row_traces, obc_trace
from onnx_obs.algorithms.refit import refit_flops, refit_kept
from onnx_obs.algorithms.sparsegpt import sparsegpt_prune
from onnx_obs.threads import panel_matmul

METHODS = ("obs", *SCORES)   # OBS with correction, then the no-correction baselines
SOLVERS = ("auto", "exact", "fast")

# solver="auto" uses the exact solver while rows * cols^3 (its full greedy trace: every row, every
# step, an H^-1 column of cols^2) stays within this budget, the fast solver beyond. Exact gives
# far lower error (2.3-2.7x lower than fast on correlated inputs, 2.3-30x on the digits samples'
# real layers). `scripts/bench_layerwise.py --auto` on a 2-core AMD EPYC: exact 0.47 s for
# 256x256 (2^32), 0.96 s for 64x576 (2^33.5), 1.4 s for 128x512 (2^34), 1.9 s for 384x384
# (2^34.3), 5.5 s for 512x512 (2^36); fast 3-11 ms. The budget keeps exact layers under ~2 s.
EXACT_MAX_WORK = 2**34
# Beyond it, solver="auto" refits the fast solver's kept weights by least squares (algorithms.refit):
# up to REFIT_ITERATIONS conjugate-gradient iterations, as many as REFIT_MAX_FLOPS allows (about
# 2 s; none below 3). `bench_layerwise.py --auto`, same machine: fast + refit at 50% takes 0.21 s
# for 512x512 (1.29x exact's error; fast alone 2.52x), 1.4 s for 1024x1024 and 1.0 s for a
# 256x2304 conv (0.56x fast's error, where exact would take minutes).
REFIT_ITERATIONS = 20
REFIT_MAX_FLOPS = 2**36
# Modelled seconds of the exact solver per unit of rows * cols^3 (2^34 in about 2 s, above), for a
# run's budget of exact solves (exact_allowed).
EXACT_SECONDS_PER_WORK = 2.0 / 2**34
# error_curve's greedy trace (a whole trace per row: the bulk of an exact prune's time) runs on a
# quarter of the rows, at most as many as TRACE_MAX_WORK allows, at least 16: an allocation table
# then costs about a quarter of the prune it plans. With 16 of 64 rows its errors came out 0.78-1.0x
# those of all rows (tests/test_allocation.py's layers).
TRACE_ROW_SHARE = 0.25
TRACE_MAX_WORK = 2**32
# Weights of the levels FastLevels.errors stacks into one SparseGPT pass.
LEVELS_BYTES = 64 << 20


def exact_allowed(layers: list[list[tuple[int, int]]], budget_seconds: float,
                  value: list[float] | None = None) -> list[bool]:
    """Per layer (the (rows, cols) of its row groups): whether solver="auto" may solve it exactly,
    so that the modelled exact seconds of all layers stay within budget_seconds. Exact buys about
    the same error ratio over fast + refit on every layer (1.3x), so the error it removes is in
    proportion to the layer's share of the output error: with `value` (each layer's predicted
    output error, e.g. from the allocation) layers are admitted by value per second, else (every
    layer worth the same) cheapest first. Only layers within EXACT_MAX_WORK are eligible."""
    cost = [sum(r * c**3 for r, c in groups) * EXACT_SECONDS_PER_WORK
            if all(r * c**3 <= EXACT_MAX_WORK for r, c in groups) else None for groups in layers]
    eligible = [i for i, c in enumerate(cost) if c is not None]
    if value is None:
        eligible.sort(key=lambda i: (cost[i], i))
    else:
        eligible.sort(key=lambda i: (-value[i] / max(cost[i], 1e-9), cost[i], i))
    allowed, spent = [False] * len(layers), 0.0
    for i in eligible:
        if spent + cost[i] > budget_seconds:
            continue  # a cheaper one further down may still fit
        allowed[i], spent = True, spent + cost[i]
    return allowed



@dataclass
class LayerResult:
    weight: np.ndarray  # (rows, cols) pruned and corrected, exact zeros where pruned: float64, or
                        # float32 from the fast solver on float32/16 weights
    mask: np.ndarray  # bool (rows, cols): True = kept
    predicted_error: float  # predicted increase of E (see prune_layer)
    damping: float  # absolute value added to diag(H)
    solver: str  # "exact", "fast", "fast+refit", or the method name for baselines


def prune_layer(
    W: np.ndarray,
    H: np.ndarray | None,
    *,
    method: str = "obs",
    sparsity: float = 0.5,
    pattern: tuple[int, int] | None = None,
    solver: str = "auto",
    block_size: int = 128,
    damp: float = 0.01,
    exact: bool = True,
) -> LayerResult:
    """Prune one layer with OBS ("obs") or a no-correction baseline ("obd", "wanda", "magnitude").

    sparsity: fraction of the whole matrix to be zero. pattern=(N, M): keep N weights in every
    consecutive group of M columns (a tail group of r < M columns keeps min(N, r)); sparsity is
    then ignored. Allocation over rows: "obs" exact and "obd" and "magnitude" choose matrix-wide,
    "obs" fast per block of block_size columns over all rows (SparseGPT), "wanda" per row (its
    paper's comparison groups, counts differing by at most one between rows); every one of them
    hits round(sparsity * W.size) zeros exactly unless pre-existing zeros already exceed it.
    solver (for "obs"): "exact" (OBC), "fast" (SparseGPT), or "auto": exact while
    rows * cols^3 <= EXACT_MAX_WORK, else fast followed by the least-squares refit of the kept
    weights (algorithms.refit) where REFIT_MAX_FLOPS allows 3 or more iterations, else fast alone;
    exact=False: "auto" never picks the exact solver (a run's budget is spent, exact_allowed).
    predicted_error: for "obs" the sum of the OBS saliencies (Hassibi & Stork Eq. 6), after a
    refit 1/2 sum_r dW_r^T H dW_r as for the baselines; all with the damped H (NaN for magnitude
    without H).
    """
    W, H, pattern = _check(W, H, method, sparsity, pattern, solver, block_size, damp)
    n_zeros = round(sparsity * W.size)
    rows, cols = W.shape
    fast = method == "obs" and not runs_exact(method, solver, rows, cols, exact)
    # The fast solver works in the weights' own precision (float32 for float32/16 models).
    work = _float_copy(W, _work_dtype(W) if fast else np.float64)
    if work.size == 0:
        solver_name = "exact" if method == "obs" else method
        return LayerResult(work, np.ones(work.shape, dtype=bool), 0.0, 0.0, solver_name)
    if H is None:
        return _baseline(work, None, 0.0, "magnitude", n_zeros, pattern)
    h_diag = H.diagonal().astype(np.float64)
    dead = ~(h_diag > 0)
    if dead.all():  # H carries no information and E cannot change
        result = _baseline(work, None, 0.0, "magnitude", n_zeros, pattern)
        result.predicted_error = 0.0
        return result
    if dead.any():
        _remove_needed_dead(work, dead, n_zeros, pattern)
        h_diag[dead] = 0.0
    lam = damping(h_diag, damp)
    if method != "obs":
        return _baseline(work, h_diag, lam, method, n_zeros, pattern, H)
    A = _decoupled(H, dead)
    L, lam = damped_cholesky(A, lam, float(h_diag.max()))
    if fast:
        weight, removed, predicted = sparsegpt_prune(work, L, n_zeros=n_zeros, pattern=pattern,
                                                     block_size=block_size)
        iterations = min(REFIT_ITERATIONS, int(REFIT_MAX_FLOPS // refit_flops(rows, cols)))
        if solver == "auto" and iterations >= 3:
            A.flat[:: cols + 1] += lam
            weight, predicted = refit_kept(work, weight, A, removed, iterations)
            return LayerResult(weight, ~removed, predicted, lam, "fast+refit")
        return LayerResult(weight, ~removed, predicted, lam, "fast")
    del A
    Hinv = _inverse(L)
    weight, removed, predicted = obc_prune(work, Hinv, work == 0.0, n_zeros=n_zeros, pattern=pattern)
    return LayerResult(weight, ~removed, predicted, lam, "exact")


def prune_row_groups(W: np.ndarray, H: list, groups: list[slice], sparsities: list[float], *,
                     method: str = "obs", pattern: tuple[int, int] | None = None,
                     solver: str = "auto", block_size: int = 128, damp: float = 0.01,
                     exact: bool = True) -> list[LayerResult]:
    """prune_layer(W[g], H[i], sparsity=sparsities[i], ...) for every row group g = groups[i]
    (a grouped convolution's groups, each with its own H), with the same results.

    Groups of one row that the exact solver takes without special cases (no pattern, no dead
    input, no existing zero) are solved together: each row's H^-1 as prune_layer makes it, then
    one greedy over the stack (a depthwise convolution's channels: one call instead of one per
    channel, whose numpy overhead per step dominated these 9-25 column problems).
    """
    options = dict(method=method, pattern=pattern, solver=solver, block_size=block_size, damp=damp)
    results: list[LayerResult | None] = [None] * len(groups)
    batch = []
    for i, (g, Hg, share) in enumerate(zip(groups, H, sparsities)):
        w = W[g]
        if (w.shape[0] == 1 and Hg is not None and pattern is None
                and runs_exact(method, solver, 1, w.shape[1], exact)):
            w, Hg, _ = _check(w, Hg, method, share, pattern, solver, block_size, damp)
            if np.all(w != 0) and np.all(Hg.diagonal() > 0):
                batch.append(i)
                continue
        results[i] = prune_layer(w, Hg, sparsity=share, exact=exact, **options)
    if batch:
        rows = np.concatenate([np.asarray(W[groups[i]], dtype=np.float64) for i in batch])
        stop = np.array([round(sparsities[i] * W.shape[1]) for i in batch], dtype=np.int64)
        for i, result in zip(batch, _exact_rows(rows, [H[i] for i in batch], stop, damp)):
            results[i] = result
    return results


def _exact_rows(W: np.ndarray, H: list, stop: np.ndarray, damp: float) -> list[LayerResult]:
    """Row r of W with stop[r] weights removed by the exact solver under its own H[r] (no dead
    inputs, no zeros): prune_layer's steps for a one-row layer, the greedy over the stack."""
    Hinv, lams = _row_inverses(H, W.shape[1], damp)
    weight, removed, losses, _ = _greedy(W, Hinv, np.zeros(W.shape, dtype=bool), stop)
    return [LayerResult(weight[r : r + 1], ~removed[r : r + 1], float(losses[r, : stop[r]].sum()),
                        lam, "exact") for r, lam in enumerate(lams)]


def _row_inverses(H: list, cols: int, damp: float) -> tuple[np.ndarray, list[float]]:
    """(rows, cols, cols) inverses of the damped H[r] (no dead input) and the dampings."""
    Hinv, lams = np.empty((len(H), cols, cols)), []
    for r, Hr in enumerate(H):
        A = _decoupled(Hr, np.zeros(cols, dtype=bool))
        h_diag = A.diagonal().copy()
        L, lam = damped_cholesky(A, damping(h_diag, damp), float(h_diag.max()))
        Hinv[r] = _inverse(L)
        lams.append(lam)
    return Hinv, lams


def group_traces(W: np.ndarray, H: list, groups: list[slice], *, method: str = "obs",
                 solver: str = "auto", block_size: int = 128, damp: float = 0.01) -> list[np.ndarray]:
    """error_curve(W[g], H[i], range(W[g].size + 1)) for every row group g = groups[i], with the
    same results: one-row groups that the exact solver takes without special cases (as in
    prune_row_groups) share one greedy over their stacked H^-1 (obc.obc_row_traces)."""
    options = dict(method=method, solver=solver, block_size=block_size, damp=damp)
    traces: list[np.ndarray | None] = [None] * len(groups)
    batch = []
    for i, (g, Hg) in enumerate(zip(groups, H)):
        w = W[g]
        if w.shape[0] == 1 and runs_exact(method, solver, 1, w.shape[1]):
            w, Hg, _ = _check(w, Hg, method, 0.0, None, solver, block_size, damp)
            if np.all(w != 0) and np.all(Hg.diagonal() > 0):
                batch.append(i)
                continue
        traces[i] = error_curve(w, Hg, np.arange(w.size + 1), **options)
    if batch:
        rows = np.concatenate([np.asarray(W[groups[i]], dtype=np.float64) for i in batch])
        Hinv, _ = _row_inverses([H[i] for i in batch], rows.shape[1], damp)
        for i, trace in zip(batch, obc_row_traces(rows, Hinv)):
            traces[i] = trace
    return traces


def error_curve(W: np.ndarray, H: np.ndarray, counts, *, method: str = "obs", solver: str = "auto",
                block_size: int = 128, damp: float = 0.01, levels: FastLevels | None = None) -> np.ndarray:
    """prune_layer's predicted error at each zero count in `counts` (unstructured): a layer's
    error-vs-sparsity table, for allocating sparsity across layers (OBC, Frantar & Alistarh 2022).

    Where prune_layer would run the exact solver, one full greedy trace gives every count at once
    (obc.obc_trace), run on evenly spaced rows (TRACE_ROW_SHARE, at least 16) and scaled up:
    rows are independent problems with the same H, so m of R rows at k m / R zeros estimate the
    error of all at k, times R / m. Elsewhere the layer is pruned once per count, the fast solver
    without the refit (which lowers the error by a roughly constant factor) on one factorisation
    of H (FastLevels; `levels`: one already made for W and H), OBS on the same share of the rows
    (scaled the same way), the baselines on all.
    """
    W, H, _ = _check(W, H, method, 0.0, None, solver, block_size, damp)
    counts = np.clip(np.asarray(counts, dtype=np.int64), 0, W.size)
    rows, cols = W.shape
    if method == "obs" and not runs_exact(method, solver, rows, cols):
        levels = levels or FastLevels(W, H, block_size=block_size, damp=damp)
        m = min(rows, max(16, math.ceil(TRACE_ROW_SHARE * rows)))
        some = np.linspace(0, rows - 1, m).round().astype(np.int64) if m < rows else None
        return rows / m * levels.errors([round(k * m / rows) for k in counts.tolist()], some)
    if not runs_exact(method, solver, rows, cols) or W.size == 0:
        one = "fast" if method == "obs" and solver == "auto" else solver
        return np.array([prune_layer(W, H, method=method, sparsity=k / max(W.size, 1), solver=one,
                                     block_size=block_size, damp=damp).predicted_error for k in counts])
    h_diag = H.diagonal().astype(np.float64)
    dead = ~(h_diag > 0)
    if dead.all():  # E does not depend on W
        return np.zeros(len(counts))
    h_diag[dead] = 0.0
    L, _ = damped_cholesky(_decoupled(H, dead), damping(h_diag, damp), float(h_diag.max()))
    Hinv = _inverse(L)
    m = min(rows, max(16, min(math.ceil(TRACE_ROW_SHARE * rows), TRACE_MAX_WORK // cols**3)))
    work = np.array(W[np.linspace(0, rows - 1, m).round().astype(np.int64)], dtype=np.float64)
    trace = obc_trace(work, Hinv, (work == 0.0) | dead[None, :])
    return rows / m * np.interp(counts * m / rows, np.arange(trace.size), trace)


class FastLevels:
    """prune_layer(W, H, sparsity=k / W.size, solver="fast") at several zero counts k, the damped
    H factored once: on wide layers the Cholesky factorisation costs more than SparseGPT."""

    def __init__(self, W: np.ndarray, H: np.ndarray, *, block_size: int = 128, damp: float = 0.01):
        self.W, self.H, _ = _check(W, H, "obs", 0.0, None, "fast", block_size, damp)
        self.block_size, self.damp, self.L = block_size, damp, None
        h_diag = self.H.diagonal().astype(np.float64)
        self.dead = ~(h_diag > 0)
        if self.W.size and not self.dead.all():
            h_diag[self.dead] = 0.0
            self.L, self.lam = damped_cholesky(_decoupled(self.H, self.dead), damping(h_diag, damp),
                                               float(h_diag.max()))

    def prune(self, n_zeros: int, rows: np.ndarray | None = None) -> LayerResult:
        """rows: prune only these rows of W (as a layer of their own, with the same H)."""
        W = self.W if rows is None else self.W[rows]
        if self.L is None:  # empty, or no live input: prune_layer's special cases
            return prune_layer(W, self.H, sparsity=n_zeros / max(W.size, 1), solver="fast",
                               block_size=self.block_size, damp=self.damp)
        work = self._start(W, n_zeros)
        weight, removed, predicted = sparsegpt_prune(work, self.L, n_zeros=n_zeros, block_size=self.block_size)
        return LayerResult(weight, ~removed, predicted, self.lam, "fast")

    def errors(self, counts: list[int], rows: np.ndarray | None = None) -> np.ndarray:
        """prune(k, rows).predicted_error for every k of counts, the levels stacked into one
        SparseGPT pass (sparsegpt_prune with a list of counts), at most LEVELS_BYTES at a time."""
        W = self.W if rows is None else self.W[rows]
        if self.L is None or not counts:
            return np.array([self.prune(k, rows).predicted_error for k in counts])
        dtype = _work_dtype(W)
        per = max(1, LEVELS_BYTES // max(W.size * np.dtype(dtype).itemsize, 1))
        out = []
        for start in range(0, len(counts), per):
            part = counts[start:start + per]
            stacked = np.empty((len(part) * W.shape[0], W.shape[1]), dtype=dtype, order="F")
            for i, k in enumerate(part):
                self._start(W, k, stacked[i * W.shape[0]:(i + 1) * W.shape[0]])
            out.append(sparsegpt_prune(stacked, self.L, n_zeros=part, block_size=self.block_size)[2])
        return np.concatenate(out)

    def _start(self, W: np.ndarray, n_zeros: int, out: np.ndarray | None = None) -> np.ndarray:
        """W's working copy (into `out` if given), the dead weights n_zeros removes gone (as
        prune_layer)."""
        work = _float_copy(W, _work_dtype(W), out)
        if self.dead.any():
            _remove_needed_dead(work, self.dead, n_zeros, None)
        return work


def runs_exact(method: str, solver: str, rows: int, cols: int, exact: bool = True) -> bool:
    """Whether prune_layer runs the exact solver (OBC) on a rows x cols layer (exact=False: the
    run's --time-budget has no room for it)."""
    return method == "obs" and (solver == "exact" or (
        solver == "auto" and exact and rows * cols**3 <= EXACT_MAX_WORK))


def _inverse(L: np.ndarray) -> np.ndarray:
    """H^-1 = L^-T L^-1 (both triangles) from the lower Cholesky factor of H. (LAPACK's dpotri
    took 15 ms for a 25x25 factor with this machine's OpenBLAS, and 2-3x longer than this for
    256-576 columns.)"""
    with one_blas_thread():
        Li = np.tril(lapack.dtrtri(L, lower=1)[0])  # the upper triangle holds leftovers
    Hinv = panel_matmul(Li.T, Li)
    return np.tril(Hinv) + np.tril(Hinv, -1).T


def _remove_needed_dead(work: np.ndarray, dead: np.ndarray, n_zeros: int, pattern) -> None:
    """Zero the weights on dead inputs that the target removes anyway (they cost nothing on the
    calibration data), smallest first; once they are gone the solvers face a live-only problem,
    and where dead weights remain the target is already met, so they stay untouched."""
    scores = np.where(dead, np.abs(work), np.inf)
    forced = work == 0.0
    removed = nm_mask(scores, forced, *pattern) if pattern else smallest_overall(scores, forced, n_zeros)
    work[removed & dead] = 0.0


def layer_error(W_old: np.ndarray, W_new: np.ndarray, H: np.ndarray) -> float:
    """Layer-wise error of W_new against W_old: 1/2 sum_r dW_r^T H dW_r with the undamped H,
    which equals mean_k ||(W_old - W_new) x_k||^2 for H = (2/n) sum_k x_k x_k^T. Float32 weights
    (both) in a float32 product, summed in float64: a report figure (512x4608: 0.22 s against
    0.30 s in float64, the same to 1e-9)."""
    single = np.result_type(W_old, W_new).itemsize <= 4
    dtype = np.float32 if single else np.float64
    dW = (np.asarray(W_old, dtype=np.float64) - np.asarray(W_new, dtype=np.float64)).astype(dtype)
    return _half_quadratic(dW, np.asarray(H, dtype=dtype))


def _baseline(work, h_diag, lam, method, n_zeros, pattern, H=None) -> LayerResult:
    """Remove weights by a baseline score, without correcting the others."""
    forced = work == 0.0
    scores = SCORES[method](work, h_diag)
    if pattern is not None:
        removed = nm_mask(scores, forced, *pattern)
    elif method == "wanda":
        per_row = spread_zeros(n_zeros, forced.sum(axis=1), np.full(work.shape[0], work.shape[1]))
        removed = smallest_in_groups(scores, forced, per_row)
    else:
        removed = smallest_overall(scores, forced, n_zeros)
    dW = np.where(removed, work, 0.0)
    predicted = float("nan") if H is None else _half_quadratic(dW, H) + 0.5 * lam * float(np.vdot(dW, dW))
    work[removed] = 0.0
    return LayerResult(work, ~removed, predicted, lam, method)


def _work_dtype(W: np.ndarray):
    """The fast solver's working type: the weights' own precision (float32 for float32/16 models)."""
    return np.float32 if W.dtype.itemsize <= 4 else np.float64


def _float_copy(W: np.ndarray, dtype, out: np.ndarray | None = None) -> np.ndarray:
    """A copy of W in Fortran order (columns contiguous), into `out` if given, copied in bands of
    rows (a whole-array transposing copy of a 4096x4096 matrix took 3x longer)."""
    work = np.empty(W.shape, dtype=dtype, order="F") if out is None else out
    for r in range(0, W.shape[0], 256):
        work[r : r + 256] = W[r : r + 256]
    return work


def _half_quadratic(dW: np.ndarray, H: np.ndarray) -> float:
    """1/2 sum_r dW_r^T H dW_r."""
    return 0.5 * float(np.einsum("ij,ij->", panel_matmul(dW, H), dW, dtype=np.float64))


def _decoupled(H: np.ndarray, dead: np.ndarray) -> np.ndarray:
    """A Fortran-order float64 copy of H with dead inputs decoupled (unit row and column): the
    matrix every OBS solver works with, before damping."""
    A = np.array(H, dtype=np.float64, order="K")  # a plain copy in H's own memory order
    if not A.flags.f_contiguous:
        A = A.T  # H is symmetric: its transpose view is the same matrix in Fortran order
    if dead.any():
        A[dead, :] = 0.0
        A[:, dead] = 0.0
        A[dead, dead] = 1.0
    return A


def check_hessian(H, W: np.ndarray) -> np.ndarray:
    """H as an array, (cols, cols) for W and finite, or ValueError."""
    H = np.asarray(H)
    cols = W.shape[1]
    if H.shape != (cols, cols):
        raise ValueError(f"H must be ({cols}, {cols}) for W of shape {W.shape}, got {H.shape}")
    if not np.isfinite(H).all():
        raise ValueError("H contains NaN or infinity")
    return H


def _check(W, H, method, sparsity, pattern, solver, block_size, damp):
    """Validate the arguments; return W and H as arrays and pattern as a pair of ints."""
    W = np.asarray(W)
    if W.ndim != 2 or not np.issubdtype(W.dtype, np.floating):
        raise ValueError(f"W must be a 2-D float array, got shape {W.shape} and dtype {W.dtype}")
    if not np.isfinite(W).all():
        raise ValueError("W contains NaN or infinity")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if H is None:
        if method != "magnitude":
            raise ValueError(f"method {method!r} needs a Hessian H")
    else:
        H = check_hessian(H, W)
    if pattern is None:
        if not 0.0 <= sparsity <= 1.0:
            raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    elif len(pattern) != 2 or not all(isinstance(x, numbers.Integral) for x in pattern):
        raise ValueError(f"pattern must be a pair of integers (N, M), got {pattern!r}")
    elif not 0 <= pattern[0] <= pattern[1] or pattern[1] < 1:
        raise ValueError(f"pattern must be (N, M) with 0 <= N <= M and M >= 1, got {pattern}")
    else:
        pattern = (int(pattern[0]), int(pattern[1]))
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if damp < 0:
        raise ValueError(f"damp must be non-negative, got {damp}")
    return W, H, pattern
