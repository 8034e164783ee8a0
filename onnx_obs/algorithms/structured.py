"""Structured OBS: remove whole units (neurons, channels) and correct the layers that read them.

Removing unit u of a producer layer deletes the set Q of input columns it feeds in every consumer
layer W (rows = outputs, cols = inputs, layer-wise Hessian H = (2/n) sum_k x_k x_k^T, so that
E(W') = 1/2 sum_r (W - W')_r^T H (W - W')_r). With Hi = H^-1, the set form of Hassibi & Stork's
Eqs. 5-6 gives, summed over a consumer's rows,
    cost     dE_Q = 1/2 sum_r w_rQ^T ([Hi]_QQ)^-1 w_rQ
    update   dW   = -W_Q ([Hi]_QQ)^-1 Hi[Q, :]
and the inverse over the columns that remain is the block downdate
    Hi <- Hi - Hi[:, Q] ([Hi]_QQ)^-1 Hi[Q, :].
A unit's cost is the sum over its consumers. Units go greedily, cheapest first, `step` at a time
(a step of several units removes the union of their columns with the same formulas). E being
quadratic, the final weights are the least-squares optimum over the remaining columns whatever the
order; the order decides which units go. A consumer may carry its bias as a last column of W whose
input is constant 1: it belongs to no unit, so it is corrected and never removed.

Pure numpy: the graph side (which columns a unit feeds) lives in onnx_obs.graph.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from onnx_obs.algorithms.damping import damped_cholesky, damping


@dataclass
class Consumer:
    weight: np.ndarray            # (rows, cols) float64
    hessian: np.ndarray           # (cols, cols), undamped
    columns: list[np.ndarray]     # per unit: the columns of `weight` it feeds (may be empty)


@dataclass
class UnitRemoval:
    order: np.ndarray             # units removed, first removed first
    costs: np.ndarray             # predicted dE of each removal (a joint step is split evenly)
    weights: list[np.ndarray]     # corrected consumer weights; removed columns exactly zero
    damping: list[float]          # absolute value added to each consumer's diag(H)


def damped_inverse(H: np.ndarray, damp: float) -> tuple[np.ndarray, float]:
    """(H + lambda I)^-1 with lambda as algorithms/damping.py (an all-zero H, whose layer output
    ignores W, gets lambda = 1)."""
    diag = np.diag(H)
    L, lam = damped_cholesky(H, damping(diag, damp) if np.any(diag > 0) else 1.0, float(diag.max()))
    Li = np.linalg.inv(np.tril(L))
    return Li.T @ Li, lam


def group_obs(consumers: list[Consumer], n_remove: int, *, damp: float = 0.01,
              step: int = 1) -> UnitRemoval:
    """Remove `n_remove` units by group OBS over all their consumers (see the module docstring)."""
    units = len(consumers[0].columns)
    if not 0 <= n_remove <= units:
        raise ValueError(f"cannot remove {n_remove} of {units} units")
    W = [np.array(c.weight, dtype=np.float64) for c in consumers]
    inv = [damped_inverse(np.asarray(c.hessian, dtype=np.float64), damp) for c in consumers]
    Hi = [h for h, _ in inv]
    alive = np.ones(units, dtype=bool)
    order, costs = [], []
    while len(order) < n_remove:
        k = min(step, n_remove - len(order))
        scores = sum(_unit_costs(W[j], Hi[j], c.columns, alive) for j, c in enumerate(consumers))
        pick = np.argsort(scores, kind="stable")[:k]
        cost = 0.0
        for j, c in enumerate(consumers):
            Q = np.concatenate([c.columns[u] for u in pick]).astype(np.int64)
            if Q.size:
                cost += _remove_columns(W[j], Hi[j], Q)
        alive[pick] = False
        order.extend(int(u) for u in pick)
        costs.extend([cost / k] * k)
    for j, c in enumerate(consumers):  # later steps leave rounding residue in earlier columns
        gone = [c.columns[u] for u in order]
        if gone:
            W[j][:, np.concatenate(gone).astype(np.int64)] = 0.0
    return UnitRemoval(np.array(order, dtype=np.int64), np.array(costs), W, [lam for _, lam in inv])


def refit_without(consumers: list[Consumer], removed, damp: float = 0.01) -> list[np.ndarray]:
    """Each consumer's weights with the columns of the `removed` units deleted and the others
    corrected in one set step (Eq. 5 for the set Q: the least-squares optimum over the columns
    left, whatever order group_obs would remove them in); removed columns exactly zero."""
    out = []
    for c in consumers:
        W = np.array(c.weight, dtype=np.float64)
        Q = np.concatenate([c.columns[u] for u in removed] or [[]]).astype(np.int64)
        if Q.size:
            Hi, _ = damped_inverse(np.asarray(c.hessian, dtype=np.float64), damp)
            _remove_columns(W, Hi, Q)
        out.append(W)
    return out


def refit_to_targets(B: np.ndarray, H: np.ndarray, removed: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """argmin_W' sum_k ||t_k - W' x_k||^2 with the `removed` columns of W' zero, from
    H = (2/n) sum x x^T and B = (2/n) sum t x^T: W'_F = B_F (H_FF + lambda I)^-1 (normal
    equations; lambda as damped_inverse). The targets t are the original model's outputs, so
    the layer also makes up, as far as its inputs allow, for what earlier removals changed."""
    keep = np.setdiff1d(np.arange(H.shape[0]), np.asarray(removed, dtype=np.int64))
    W = np.zeros(B.shape)
    if keep.size:
        Hi, _ = damped_inverse(H[np.ix_(keep, keep)], damp)
        W[:, keep] = B[:, keep] @ Hi
    return W


def _unit_costs(W: np.ndarray, Hi: np.ndarray, columns: list[np.ndarray],
                alive: np.ndarray) -> np.ndarray:
    """dE_Q of each alive unit alone (inf for removed units), batched over units of equal |Q|."""
    cost = np.where(alive, 0.0, np.inf)
    by_size: dict[int, list[int]] = {}
    for u in np.flatnonzero(alive):
        by_size.setdefault(len(columns[u]), []).append(int(u))
    for size, us in by_size.items():
        if size == 0:
            continue
        idx = np.stack([columns[u] for u in us])                   # (U, K)
        B = np.linalg.inv(Hi[idx[:, :, None], idx[:, None, :]])    # ([Hi]_QQ)^-1, (U, K, K)
        WQ = W[:, idx]                                             # (rows, U, K)
        cost[us] = 0.5 * np.einsum("rui,uij,ruj->u", WQ, B, WQ)
    return cost


def _remove_columns(W: np.ndarray, Hi: np.ndarray, Q: np.ndarray) -> float:
    """Delete columns Q of W in place with the OBS correction and downdate Hi; return dE_Q."""
    B = np.linalg.inv(Hi[np.ix_(Q, Q)])
    WB = W[:, Q] @ B
    cost = 0.5 * float(np.sum(WB * W[:, Q]))
    W -= WB @ Hi[Q, :]
    Hi -= Hi[:, Q] @ B @ Hi[Q, :]
    W[:, Q] = 0.0
    return cost


def output_energy(consumers: list[Consumer]) -> float:
    """E of removing everything: 1/2 sum_r w_r^T H w_r summed over consumers (the scale that
    makes costs of different layers comparable: cost / energy is a relative output error)."""
    return sum(0.5 * float(np.sum((c.weight @ c.hessian) * c.weight)) for c in consumers)


def norm_order(norms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Magnitude baseline: units by ascending norm (of the weights each owns), and the norms
    divided by their mean (a per-layer normalised score, no correction)."""
    norms = np.asarray(norms, dtype=np.float64)
    order = np.argsort(norms, kind="stable")
    mean = norms.mean()
    return order, norms[order] / (mean if mean > 0 else 1.0)


def plan_counts(curves: list[np.ndarray], resource: Callable[[np.ndarray], float],
                target: float, steps: list[int] | None = None) -> np.ndarray:
    """How many units to remove per layer to bring `resource(counts)` down to `target`.

    curves[l][k] is the (normalised) cost of removing the (k+1)-th unit of layer l, its length
    the most units that may go. Greedy: each step removes the next steps[l] units (default 1) of
    the layer with the smallest cost per unit of resource saved, saving measured exactly on the
    current counts; a layer's count stays a multiple of its step. Where the next step saves
    nothing (a flat stretch of a measured latency table) the move is the fewest steps that do.
    """
    steps = steps or [1] * len(curves)
    counts = np.zeros(len(curves), dtype=np.int64)
    current = resource(counts)
    while current > target:
        best, best_score, best_value, best_move = -1, np.inf, current, 0
        for layer, curve in enumerate(curves):
            k, move = counts[layer], steps[layer]
            while k + move <= len(curve):
                counts[layer] += move
                value = resource(counts)
                counts[layer] -= move
                if current - value > 0:
                    break
                move += steps[layer]
            else:
                continue
            score = max(float(np.sum(curve[k:k + move])), 0.0) / (current - value)
            if score < best_score:
                best, best_score, best_value, best_move = layer, score, value, move
        if best < 0:
            raise ValueError(f"the target cannot be reached by removing units: the smallest "
                               f"model they leave still has {current:,.0f}; raise the target")
        counts[best] += best_move
        current = best_value
    # Steps of several units overshoot: give back the costliest steps that keep the target met.
    while True:
        best, best_cost = -1, -np.inf
        for layer, curve in enumerate(curves):
            k, step = counts[layer], steps[layer]
            if k < step:
                continue
            counts[layer] -= step
            value = resource(counts)
            counts[layer] += step
            cost = float(np.sum(curve[k - step:k]))
            if value <= target and cost > best_cost:
                best, best_cost = layer, cost
        if best < 0:
            return counts
        counts[best] -= steps[best]
