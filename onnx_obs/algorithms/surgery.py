"""Global Optimal Brain Surgeon over all weights of a network (Hassibi & Stork 1992), and the
magnitude and Optimal Brain Damage baselines (no correction).

All weights are one vector w (length n) with one inverse Hessian H^-1 (n x n). Deleting weight q
(constraint e_q^T dw + w_q = 0):
    Eq. 5   dw  = -(w_q / [H^-1]_qq) H^-1 e_q
    Eq. 6   L_q = w_q^2 / (2 [H^-1]_qq)
and the inverse over the remaining weights is H^-1 - H^-1 e_q e_q^T H^-1 / [H^-1]_qq with row and
column q dropped. Deleting a set Q at once:
    dw = -H^-1[:,Q] ([H^-1]_QQ)^-1 w_Q,   dE = 1/2 w_Q^T ([H^-1]_QQ)^-1 w_Q,
    H^-1 <- H^-1 - H^-1[:,Q] ([H^-1]_QQ)^-1 H^-1[Q,:].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.linalg import cho_solve, cholesky, solve_triangular

from onnx_obs.hessian.inverse import subtract_outer_lower, symmetrize_from_lower
from onnx_obs.algorithms.baselines import magnitude_scores, obd_scores

_TINY = np.finfo(np.float64).tiny
_MIN_FLUSH = 128  # downdates folded into H^-1 together: at least this many deletions
_FLUSH_GROUPS = 4  # and at least this many groups of `step`
_COMPACT_FRACTION = 4  # drop deleted rows/columns once they are 1/4 of the active inverse


@dataclass(frozen=True)
class SurgeryResult:
    w: np.ndarray  # corrected weights (length n), exactly 0 where deleted
    mask: np.ndarray  # True = kept
    order: np.ndarray  # deleted indices, in deletion order
    saliencies: np.ndarray  # per deletion: its criterion when chosen (Eq. 6 for OBS)
    cumulative: np.ndarray  # per deletion: predicted error increase so far (a group shares one)
    error_increase: float  # total predicted error increase
    stop_reason: str  # "sparsity" (target reached), "error" (the next deletion's predicted increase
    # would pass the bound) or "measured" (a checkpoint failed: back at the last one that passed)


class _ActiveInverse:
    """H^-1 over the weights still in play, with the deletions' downdates applied lazily.

    The current inverse is  hinv - vt[:, :r] vt[:, :r]^T : deleting a set Q (L L^T = [H^-1]_QQ)
    appends the columns H^-1[:,Q] L^-T to vt, and every `flush_every` deletions they are folded into
    hinv by one rank-r syrk. Deleted rows and columns are dropped once they are a quarter of hinv,
    so the cost falls as pruning proceeds.
    """

    def __init__(self, hinv, idx, w, prunable, flush_every):
        self.hinv = hinv  # symmetric, Fortran order
        self.idx = idx  # global index of each row
        self.w = w
        self.prunable = prunable
        self.alive = np.ones(idx.size, dtype=bool)
        self.d = np.diag(hinv).copy()  # diagonal of the current inverse
        self.flush_every = flush_every
        self.vt = np.empty((idx.size, 2 * flush_every), order="F")
        self.r = 0

    def saliencies(self) -> np.ndarray:
        """Eq. 6 for every active prunable weight, +inf elsewhere."""
        out = np.full(self.w.size, np.inf)
        np.divide(self.w * self.w, 2.0 * np.maximum(self.d, _TINY), out=out, where=self.alive & self.prunable)
        return out

    def columns(self, Q: np.ndarray) -> np.ndarray:
        """Current H^-1[:, Q], with the rows of deleted weights zeroed."""
        h = self.hinv[:, Q]
        if self.r:
            h -= self.vt[:, : self.r] @ self.vt[Q, : self.r].T
        h[~self.alive] = 0.0
        return h

    def delete(self, Q: np.ndarray, h: np.ndarray, L: np.ndarray, c: np.ndarray) -> None:
        """Apply dw = -H^-1[:,Q] c (c = [H^-1]_QQ^-1 w_Q), zero w_Q, and downdate H^-1 by Q."""
        self.w -= h @ c
        self.w[Q] = 0.0
        Z = solve_triangular(L, h.T, lower=True).T  # Z Z^T = H^-1[:,Q] [H^-1]_QQ^-1 H^-1[Q,:]
        self.vt[:, self.r : self.r + Z.shape[1]] = Z
        self.r += Z.shape[1]
        self.d -= np.einsum("ij,ij->i", Z, Z)
        self.alive[Q] = False
        if self.r >= self.flush_every:
            self._flush()

    def _flush(self) -> None:
        subtract_outer_lower(self.hinv, self.vt[:, : self.r])
        self.r = 0
        symmetrize_from_lower(self.hinv)
        dead = self.alive.size - np.count_nonzero(self.alive)
        if dead * _COMPACT_FRACTION >= self.alive.size:
            keep = np.flatnonzero(self.alive)
            sub = self.hinv[np.ix_(keep, keep)]
            self.hinv = sub if sub.flags.f_contiguous else sub.T  # symmetric: .T is itself, Fortran order
            self.idx, self.w, self.prunable = self.idx[keep], self.w[keep], self.prunable[keep]
            self.alive = np.ones(keep.size, dtype=bool)
            self.vt = np.empty((keep.size, self.vt.shape[1]), order="F")
        self.d = np.diag(self.hinv).copy()


def obs_surgery(
    w: np.ndarray,
    Hinv: np.ndarray,
    *,
    target_zeros: int,
    max_error_increase: float | None = None,
    step: int = 1,
    prunable: np.ndarray | None = None,
    recompute: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    recompute_every: int | None = None,
    checkpoint: Callable[[np.ndarray, float], bool] | None = None,
    checkpoint_every: int = 1,
    overwrite_hinv: bool = False,
) -> SurgeryResult:
    """Delete weights by OBS until `target_zeros` prunable weights are zero or the error bound stops it.

    Each step deletes the `step` active prunable weights of smallest Eq. 6 saliency together (block
    formula) and corrects all remaining weights, non-prunable ones included. Prunable weights already
    exactly zero are deleted first at zero cost; they count towards `target_zeros` (all of them are
    deleted even when they exceed it). The paper's stop rule: stop before the cumulative predicted
    increase would pass `max_error_increase` (absolute); a block that would pass it is retried one
    weight at a time. `recompute(w, mask)` returns H^-1 over the kept weights (ascending index order)
    at the current corrected weights; it is called every `recompute_every` deletions, and the array
    it returns is worked on in place. `overwrite_hinv` lets the surgery work in the caller's `Hinv`
    instead of a copy.

    `checkpoint(w, predicted)` judges the corrected weights every `checkpoint_every` deletions and
    at the end (e.g. by the error measured on data, which the quadratic model may underestimate);
    when it returns False the surgery goes back to the last checkpoint that passed (or the start)
    and stops there.
    """
    w = np.array(w, dtype=np.float64).ravel()
    n = w.size
    Hinv = np.asarray(Hinv, dtype=np.float64)
    if Hinv.shape != (n, n):
        raise ValueError(f"Hinv has shape {Hinv.shape}, expected ({n}, {n})")
    prunable = np.ones(n, dtype=bool) if prunable is None else np.asarray(prunable, dtype=bool).ravel()
    if prunable.size != n:
        raise ValueError(f"prunable has {prunable.size} entries, expected {n}")
    if not 0 <= target_zeros <= np.count_nonzero(prunable):
        raise ValueError(f"target_zeros={target_zeros} is outside [0, {np.count_nonzero(prunable)}]")
    if step < 1:
        raise ValueError(f"step={step} must be at least 1")
    if (recompute is None) != (recompute_every is None):
        raise ValueError("recompute and recompute_every go together")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every={checkpoint_every} must be at least 1")

    flush_every = max(_MIN_FLUSH, _FLUSH_GROUPS * step)

    def active(hinv, keep, copy):
        hinv = hinv.T if hinv.flags.c_contiguous else hinv  # symmetric: same matrix, Fortran order
        hinv = np.array(hinv, dtype=np.float64, order="F", copy=True if copy else None)
        return _ActiveInverse(hinv, keep, w[keep], prunable[keep], flush_every)

    def current_weights():
        w[state.idx] = state.w
        w[~mask] = 0.0
        return w

    state = active(Hinv, np.arange(n), copy=not overwrite_hinv)
    mask = np.ones(n, dtype=bool)
    order, sal, cum = [], [], []
    total = 0.0

    def record(Q, saliencies):
        mask[state.idx[Q]] = False
        order.extend(state.idx[Q])
        sal.extend(saliencies)
        cum.extend([total] * len(Q))

    # Weights already zero leave the active set first: Eq. 5 with w_Q = 0 moves nothing.
    zeros = np.flatnonzero(prunable & (w == 0.0))
    for start in range(0, zeros.size, flush_every):
        Q = np.searchsorted(state.idx, zeros[start : start + flush_every])  # rows (idx stays sorted)
        record(Q, np.zeros(Q.size))
        h = state.columns(Q)
        state.delete(Q, h, cholesky(h[Q], lower=True), np.zeros(Q.size))
    deleted = zeros.size
    stop_reason = "sparsity"
    since_recompute = 0
    k = step
    good = (current_weights().copy(), mask.copy(), len(order), total)  # the last checkpoint passed
    checked = deleted

    def passes() -> bool:
        nonlocal good, checked
        checked = deleted
        if checkpoint(current_weights().copy(), total):
            good = (w.copy(), mask.copy(), len(order), total)
            return True
        return False

    while deleted < target_zeros:
        K = min(k, target_zeros - deleted)
        L_all = state.saliencies()
        if K == 1:
            Q = np.array([np.argmin(L_all)])
        else:
            Q = np.argpartition(L_all, K - 1)[:K]
            Q = Q[np.argsort(L_all[Q], kind="stable")]
        h = state.columns(Q)
        L = cholesky(h[Q], lower=True)  # [H^-1]_QQ = L L^T
        c = cho_solve((L, True), state.w[Q])
        dE = 0.5 * float(state.w[Q] @ c)
        if max_error_increase is not None and total + dE > max_error_increase:
            if K > 1:
                k = 1
                continue
            stop_reason = "error"
            break
        total += dE
        record(Q, L_all[Q])
        state.delete(Q, h, L, c)
        deleted += K
        since_recompute += K
        if checkpoint is not None and deleted - checked >= checkpoint_every and not passes():
            stop_reason = "measured"
            break
        if recompute is not None and since_recompute >= recompute_every and deleted < target_zeros:
            keep = np.flatnonzero(mask)
            w_now = current_weights().copy()
            state = None  # free the old inverse before the caller builds the new one
            new = np.asarray(recompute(w_now, mask.copy()))
            if new.shape != (keep.size, keep.size):
                raise ValueError(f"recompute returned shape {new.shape}, expected ({keep.size}, {keep.size})")
            state = active(new, keep, copy=False)
            since_recompute = 0
    if checkpoint is not None and stop_reason != "measured" and deleted > checked and not passes():
        stop_reason = "measured"
    if stop_reason == "measured":
        w, mask, kept, total = good
        del order[kept:], sal[kept:], cum[kept:]
    else:
        w = current_weights()
    return SurgeryResult(
        w=w,
        mask=mask,
        order=np.asarray(order, dtype=np.int64),
        saliencies=np.asarray(sal, dtype=np.float64),
        cumulative=np.asarray(cum, dtype=np.float64),
        error_increase=total,
        stop_reason=stop_reason,
    )


def global_baseline(
    w: np.ndarray,
    method: str,
    *,
    target_zeros: int,
    hessian_diag: np.ndarray | None = None,
    prunable: np.ndarray | None = None,
) -> SurgeryResult:
    """Zero the `target_zeros` prunable weights of smallest criterion, with no correction.

    "magnitude": |w_q|.  "obd" (LeCun et al. 1990): H_qq w_q^2 / 2 from the diagonal of H itself.
    The predicted error increase is OBD's diagonal estimate sum H_qq w_q^2 / 2 when `hessian_diag`
    is given, NaN otherwise.
    """
    w = np.array(w, dtype=np.float64).ravel()
    prunable = np.ones(w.size, dtype=bool) if prunable is None else np.asarray(prunable, dtype=bool).ravel()
    if not 0 <= target_zeros <= np.count_nonzero(prunable):
        raise ValueError(f"target_zeros={target_zeros} is outside [0, {np.count_nonzero(prunable)}]")
    diag_cost = None if hessian_diag is None else obd_scores(w, np.asarray(hessian_diag, dtype=np.float64).ravel())
    if method == "magnitude":
        score = magnitude_scores(w)
    elif method == "obd":
        if diag_cost is None:
            raise ValueError("obd needs hessian_diag")
        score = diag_cost
    else:
        raise ValueError(f"unknown baseline {method!r}; expected 'magnitude' or 'obd'")
    candidates = np.flatnonzero(prunable)
    order = candidates[np.argsort(score[candidates], kind="stable")[:target_zeros]]
    mask = np.ones(w.size, dtype=bool)
    mask[order] = False
    w[order] = 0.0
    cumulative = np.cumsum(diag_cost[order]) if diag_cost is not None else np.full(order.size, np.nan)
    return SurgeryResult(
        w=w,
        mask=mask,
        order=order,
        saliencies=score[order],
        cumulative=cumulative,
        error_increase=float(cumulative[-1]) if order.size else 0.0,
        stop_reason="sparsity",
    )
