"""Exact layer-wise OBS: OBC (Frantar & Alistarh 2022), greedy per row with the full H^-1.

Every row is its own OBS problem over the columns, all with the same H. Per row and step:
    q = argmin_q w_q^2 / [H^-1]_qq                       (twice the saliency, H&S Eq. 6)
    w <- w - (w_q / [H^-1]_qq) H^-1[:, q]                (Eq. 5)
    H^-1 <- H^-1 - H^-1[:, q] H^-1[q, :] / [H^-1]_qq     (inverse over the remaining weights)
The downdates are kept lazily: with v_s = H^-1_s[:, q_s] / sqrt([H^-1_s]_qq) for the steps s
since the last fold, H^-1_t = H^-1_fold - sum_s v_s v_s^T, so a step needs only the column
H^-1_fold[:, q] - V^T V[:, q] and the diagonal downdate v^2 (a pivoted Cholesky factorisation of
H^-1 with OBS pivots); every FOLD steps the pending vectors are folded into the row's H^-1 with
one matrix product. Rows go in chunks, every row of a chunk advancing one step per vectorised
iteration.

The same greedy moves weights onto a quantization grid (OBQ, algorithms/quantize.py): with c_q the
nearest grid value, the cost is (w_q - c_q)^2 / [H^-1]_qq and the correction
-((w_q - c_q) / [H^-1]_qq) H^-1[:, q]; pruning is the grid {0}.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import lapack
from scipy.linalg.blas import dgemm
from scipy.optimize import isotonic_regression

from onnx_obs.algorithms.blas_threads import one_blas_thread
from onnx_obs.algorithms.masks import nm_keep_counts, spread_zeros

# Bytes of per-row copies of H^-1 (rows x cols x cols float64) held at once.
CHUNK_BYTES = 64 << 20
# Greedy steps between folds of the lazy downdates into the per-row H^-1.
FOLD = 32
# A chunk's per-row H^-1 are packed down to the live columns once these are at most COMPACT of
# the working width, while at least MIN_PACKED remain (smaller ones cost less than the copy).
COMPACT = 0.75
MIN_PACKED = 32


def obc_prune(
    W: np.ndarray,
    Hinv: np.ndarray,
    forced: np.ndarray,
    *,
    n_zeros: int = 0,
    pattern: tuple[int, int] | None = None,
    allocation: str = "global",
) -> tuple[np.ndarray, np.ndarray, float]:
    """Return (pruned weights, mask of removed weights, predicted error = sum of saliencies).

    Hinv: inverse of the damped H (symmetric, both triangles). forced: weights that must go (they
    are removed first, at no cost). Unstructured targets n_zeros zeros in the whole matrix:
    - allocation="global" (default): each row's greedy trace is run to the end, recording the
      loss of every step; per-row counts minimising the total loss for the total count are
      chosen from those traces (_global_counts), and each row loses its chosen steps at once
      (_remove_sets: the same result as running the greedy again to those counts).
    - allocation="row": the n_zeros are spread evenly over the rows (counts differ by at most
      one), one pass.
    N:M: greedy within the rows with the weights of full groups (see masks.nm_keep_counts) out of
    reach, until every group is down to its count.
    """
    rows, cols = W.shape
    n_forced = forced.sum(axis=1)
    groups = None
    if pattern is not None:
        group, keep = nm_keep_counts(cols, *pattern)
        live = np.stack([np.bincount(group, weights=~f, minlength=len(keep)) for f in forced])
        stop = n_forced + np.maximum(live - keep, 0).sum(axis=1).astype(np.int64)
        groups = (group, keep)
    elif allocation == "row":
        stop = spread_zeros(n_zeros, n_forced, np.full(rows, cols))
    elif allocation == "global" and rows == 1:  # the row's first steps, as many as the target
        stop = np.minimum(np.maximum(n_forced, n_zeros), cols)
    elif allocation == "global":
        _, _, losses, order = _greedy(W, Hinv, forced, np.full(rows, cols))
        stop = _global_counts(losses, n_forced, n_zeros)
        taken = np.arange(cols)[None, :] < stop[:, None]
        pruned, removed = _remove_sets(W, Hinv, order, stop)
        return pruned, removed, float(np.where(taken, losses, 0.0).sum())
    else:
        raise ValueError(f"allocation must be 'global' or 'row', got {allocation!r}")
    pruned, removed, losses, _ = _greedy(W, Hinv, forced, stop, groups)
    return pruned, removed, float(losses.sum())


def obc_trace(W: np.ndarray, Hinv: np.ndarray, forced: np.ndarray) -> np.ndarray:
    """Predicted error of the exact solver at every zero count of W: entry k (k = 0 .. W.size) is
    the loss of the k cheapest steps of the rows' greedy traces, as obc_prune's "global" choice
    takes them (_global_counts): one full greedy run gives the whole curve (OBC's error table).
    Forced weights cost nothing (dead inputs: no error on the calibration data)."""
    steps = np.sort(_trace_slopes(W, Hinv, forced), axis=None)
    return np.concatenate([[0.0], np.cumsum(np.maximum(steps, 0.0))])


def obc_row_traces(W: np.ndarray, Hinv: np.ndarray) -> np.ndarray:
    """(rows, cols + 1): obc_trace of each row of W alone (Hinv: its own (rows, cols, cols) or
    one shared), from one greedy run over all rows (no forced weights)."""
    steps = np.sort(_trace_slopes(W, Hinv, np.zeros(W.shape, dtype=bool)), axis=1)
    return np.concatenate([np.zeros((len(W), 1)), np.cumsum(np.maximum(steps, 0.0), axis=1)], axis=1)


def _trace_slopes(W: np.ndarray, Hinv: np.ndarray, forced: np.ndarray) -> np.ndarray:
    """Every row's greedy step losses to the end, convexified (_convex_slopes)."""
    _, _, losses, _ = _greedy(W, Hinv, forced, np.full(W.shape[0], W.shape[1]))
    return _convex_slopes(losses, forced.sum(axis=1))


def _remove_sets(W: np.ndarray, Hinv: np.ndarray, order: np.ndarray,
                 stop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every row r with the weights of its first stop[r] greedy steps (order[r, :stop[r]]) removed
    at once: OBS for a set Q (Hassibi & Stork; OBC Eq. 7), dw = -H^-1[:, Q] ([H^-1]_QQ)^-1 w_Q.
    The steps' downdates of H^-1 compose to exactly this (the inverse of H over the remaining
    weights), so it equals rerunning the greedy to stop[r] steps, to rounding, at the cost of one
    Cholesky solve of |Q| unknowns per row instead of a second pass of O(cols^3) per row."""
    w = np.array(W, dtype=np.float64, order="C")
    removed = np.zeros(w.shape, dtype=bool)
    with one_blas_thread():
        for r in np.flatnonzero(stop):
            Q = order[r, : stop[r]]
            _, z, info = lapack.dposv(Hinv[np.ix_(Q, Q)], w[r, Q], lower=1, overwrite_a=1)
            if info != 0:
                raise ValueError("H^-1 is not positive definite: raise damp")
            w[r] -= Hinv[:, Q] @ z
            w[r, Q] = 0.0
            removed[r, Q] = True
    return w, removed


def _global_counts(losses: np.ndarray, n_forced: np.ndarray, n_zeros: int) -> np.ndarray:
    """Per-row step counts for n_zeros removals in all, minimising the summed loss.

    Each row's cumulative loss is replaced by its greatest convex minorant, whose slopes are the
    isotonic regression of the step losses; taking the smallest slopes overall then gives every
    row a prefix of its trace and is optimal for the convexified problem (a Lagrangian choice;
    exact wherever a row's count ends on a vertex of its minorant). Forced steps go first.
    """
    slopes = _convex_slopes(losses, n_forced)
    rows, steps = losses.shape
    # Stable sort of the row-major flattening: on ties, earlier steps of a row come first.
    order = np.argsort(slopes, axis=None, kind="stable")
    take = min(max(int(n_zeros), int(n_forced.sum())), slopes.size)
    return np.bincount(order[:take] // steps, minlength=rows)


def _convex_slopes(losses: np.ndarray, n_forced: np.ndarray) -> np.ndarray:
    """Each row's step losses after its n_forced forced steps (-inf) made non-decreasing: the
    slopes of the greatest convex minorant of the row's cumulative loss."""
    rows, steps = losses.shape
    slopes = np.full((rows, steps), -np.inf)
    for r, f in enumerate(n_forced.tolist()):
        if f < steps:
            slopes[r, f:] = isotonic_regression(losses[r, f:]).x
    return slopes


def _greedy(
    W: np.ndarray,
    Hinv: np.ndarray,
    forced: np.ndarray,
    stop: np.ndarray,
    groups: tuple[np.ndarray, np.ndarray] | None = None,
    grid: tuple[np.ndarray, np.ndarray, int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Run `stop[r]` greedy OBS steps on every row r; return (weights, removed, step losses,
    the column removed at each step).

    Hinv: (cols, cols), shared by the rows, or (rows, cols, cols), each row's own (a depthwise
    convolution's channels: a batch of one-row problems in one call).
    grid: None to prune (every target is 0), or, to quantize, (scale, zero, qmin, qmax) with the
    scale and zero point of every weight (rows, cols): the target of a weight w is its nearest
    grid value c = (clip(rint(w / scale) + zero, qmin, qmax) - zero) * scale, and weights that
    corrections pushed beyond the grid's range by over half a step go next; forced weights go to
    0."""
    rows, cols = W.shape
    w = np.array(W, dtype=np.float64, order="C")
    removed = np.zeros((rows, cols), dtype=bool)
    losses = np.zeros((rows, int(stop.max(initial=0))))
    order = np.zeros(losses.shape, dtype=np.int64)
    chunk = max(1, CHUNK_BYTES // (8 * cols * cols))
    by_steps = np.argsort(stop, kind="stable")  # rows with similar step counts share a chunk
    with one_blas_thread():
        for r0 in range(0, rows, chunk):
            r = by_steps[r0 : r0 + chunk]
            target = None if grid is None else (grid[0][r], grid[1][r], *grid[2:])
            Hr = Hinv if Hinv.ndim == 2 else Hinv[r]
            chunk_result = _greedy_chunk(w[r], Hr, forced[r], stop[r], groups, losses.shape[1], target)
            w[r], removed[r], losses[r], order[r] = chunk_result
    return w, removed, losses, order


def _greedy_chunk(w, Hinv, forced, stop, groups, n_losses, grid=None):
    """Greedy OBS on a chunk of rows; return (weights, removed, step losses, removal order).

    The lazy downdates (module doc) are folded into each row's own copy of H^-1 every FOLD steps
    with one matrix product, so a step costs O(cols * FOLD) per row, mostly in cache. Removed
    weights no longer enter any live quantity (their rows and columns of H^-1 only feed their own
    entries), so at a fold where the live columns have dropped to COMPACT of the working width,
    every row's arrays are packed down to its live columns and finished rows leave the working
    set: all rows still stepping have removed the same number of weights, so the packed width is
    common. A full trace then folds about cols^3 / 3 numbers per row instead of cols^3.
    """
    n, cols = w.shape
    steps = int(stop.max(initial=0))
    losses = np.zeros((n, n_losses))
    order = np.zeros((n, n_losses), dtype=np.int64)
    out = np.array(w)  # the weights in their own columns, written back at every packing
    removed = np.zeros((n, cols), dtype=bool)
    fixed = np.zeros((n, cols))  # the value each weight is moved to: 0, or its grid point
    rows = np.arange(n)  # the chunk's rows in the working set
    idx = np.repeat(np.arange(cols)[None, :], n, axis=0)  # the column of every packed slot
    gone = np.zeros((n, cols), dtype=bool)  # packed slots removed since the last packing
    Hc = np.empty((n, cols, cols))
    Hc[:] = Hinv
    V = np.empty((n, FOLD, cols))
    d = np.array(np.broadcast_to(np.diagonal(Hinv, axis1=-2, axis2=-1), (n, cols)))
    floor = np.finfo(np.float64).eps * d.max(axis=1)  # per row: rows may have their own H^-1
    # Added to the scores: -inf for forced weights not yet removed (they go first), +inf once removed.
    penalty = np.where(forced, -np.inf, 0.0)
    if groups is not None:
        group, keep = groups
        live = np.repeat(np.bincount(group)[None, :], n, axis=0)
    at = rows.copy()
    k = 0  # lazy steps since the last fold
    for t in range(steps):
        if k == FOLD:
            for r in np.flatnonzero(stop[rows] > t - FOLD):  # Hc[r] -= V[r]^T V[r]
                dgemm(-1.0, V[r].T, V[r].T, beta=1.0, c=Hc[r].T, trans_b=1, overwrite_c=1)
            k = 0
            if cols - t <= COMPACT * Hc.shape[1] and cols - t >= MIN_PACKED:
                out[rows[:, None], idx] = w
                sel = np.flatnonzero(stop[rows] > t)
                pos = np.nonzero(~gone[sel])[1].reshape(sel.size, cols - t)
                rows, idx, at = rows[sel], np.take_along_axis(idx[sel], pos, 1), at[: sel.size]
                floor = floor[sel]
                w, d, penalty, forced = (np.take_along_axis(x[sel], pos, 1)
                                         for x in (w, d, penalty, forced))
                if grid is not None:
                    grid = (*(np.take_along_axis(x[sel], pos, 1) for x in grid[:2]), *grid[2:])
                packed = np.empty((sel.size, cols - t, cols - t))
                for i, (r, p) in enumerate(zip(sel, pos)):  # row by row: 8x faster than one gather
                    packed[i] = Hc[r][p][:, p]
                Hc = packed
                V = np.empty((sel.size, FOLD, cols - t))
                gone = np.zeros(w.shape, dtype=bool)
                if groups is not None:
                    live = live[sel]
        active = t < stop[rows]
        if grid is None:
            # twice the saliency (Eq. 6)
            dev, score = w, w * w / np.maximum(d, floor[:, None]) + penalty
        else:
            scale, zero, qmin, qmax = grid
            c = (np.clip(np.rint(w / scale) + zero, qmin, qmax) - zero) * scale  # nearest grid value
            outside = np.abs(w - c) > 0.5 * scale
            dev = np.where(forced, w, w - c)  # w_q - c_q
            score = dev * dev / np.maximum(d, floor[:, None])
            # OBQ's outlier rule: a weight pushed off the grid is quantized at once
            score = np.where(outside, -1.0 / (1.0 + score), score) + penalty
        if groups is not None:
            score[np.take_along_axis(live <= keep, group[idx], 1) & (penalty == 0.0)] = np.inf
        q = score.argmin(axis=1)
        h = Hc[at, q]  # row q of H^-1 = column q (symmetric)
        if k:
            h -= np.matmul(V[at, :k, q][:, None, :], V[:, :k])[:, 0]
        s = np.where(active, 1.0 / np.sqrt(np.maximum(h[at, q], floor)), 0.0)
        v = h * s[:, None]  # H^-1[:, q] / sqrt([H^-1]_qq)
        V[:, k] = v
        k += 1
        a = dev[at, q] * s  # (w_q - c_q) / sqrt([H^-1]_qq)
        col = idx[at, q]
        losses[rows, t] = 0.5 * a * a  # Eq. 6
        order[rows, t] = col
        hit, hit_out = (at[active], q[active]), (rows[active], col[active])
        fixed[hit_out] = w[hit] - dev[hit]  # c_q
        w -= a[:, None] * v  # Eq. 5
        d -= v * v  # diagonal of the downdated H^-1
        w[hit] = fixed[hit_out]
        d[hit] = 1.0
        penalty[hit] = np.inf
        gone[hit] = removed[hit_out] = True
        if groups is not None:
            live[at[active], group[col[active]]] -= 1
    out[rows[:, None], idx] = w
    # removed weights of earlier steps carry rounding-level changes from later steps
    return np.where(removed, fixed, out), removed, losses, order
