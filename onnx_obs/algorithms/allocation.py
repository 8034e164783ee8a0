"""Sparsity allocation across layers: per-site zero counts that meet a global target at least total
predicted error (OBC, Frantar & Alistarh 2022, Sec. 5; the dynamic program of SPDY, Frantar &
Alistarh 2022).

Site i offers options j with zero counts c_ij (non-decreasing in j) and predicted errors e_ij.
`allocate` picks one option per site,
    minimise sum_i e_{i j_i}   subject to   sum_i c_{i j_i} >= target,
a multiple-choice knapsack, by dynamic programming over the budget in units of u weights: u = 1
(exact) while the target is at most RESOLUTION weights, else u = target / RESOLUTION with every
count rounded to whole units. `exact_counts` then moves the chosen counts along each table's
linear interpolation, cheapest error first, until they add up to the target exactly.
"""

from __future__ import annotations

import math

import numpy as np

RESOLUTION = 10_000


def allocate(errors: list[np.ndarray], counts: list[np.ndarray], target: int) -> np.ndarray:
    """The option index per site (see the module doc). errors[i], counts[i]: site i's table."""
    errors, counts = _check(errors, counts, target)
    unit = max(1.0, target / RESOLUTION)
    T = math.ceil(target / unit - 1e-9)
    best = np.full(T + 1, np.inf)   # best[b]: least error of the sites so far with b units (T: >= T)
    best[0] = 0.0
    choice = np.zeros((len(errors), T + 1), dtype=np.int32)
    source = np.zeros((len(errors), T + 1), dtype=np.int32)
    at = np.arange(T + 1, dtype=np.int32)
    for i, (e, c) in enumerate(zip(errors, counts)):
        new = np.full(T + 1, np.inf)
        for j, (ej, cj) in enumerate(zip(e.tolist(), np.minimum(np.rint(c / unit), T).astype(int).tolist())):
            cand = np.full(T + 1, np.inf)
            cand[cj:T] = best[: T - cj] + ej
            src = at - cj
            tail = T - cj + int(np.argmin(best[T - cj :]))  # every b >= T - cj reaches T
            cand[T], src[T] = best[tail] + ej, tail
            better = cand < new
            new[better], choice[i, better], source[i, better] = cand[better], j, src[better]
        best = new
    picked = np.empty(len(errors), dtype=np.int64)
    b = int(np.flatnonzero(np.isfinite(best))[-1])  # T unless rounding to units fell short of it
    for i in reversed(range(len(errors))):
        picked[i] = choice[i, b]
        b = source[i, b]
    return picked


def exact_counts(errors: list[np.ndarray], counts: list[np.ndarray], picked: np.ndarray,
                 target: int) -> np.ndarray:
    """Per-site zero counts from the picked options, moved along the tables (linear between
    options, never outside a table's range) until they add up to `target`: surplus zeros come
    off the sites whose error falls most per weight, missing ones go where it rises least."""
    errors, counts = _check(errors, counts, target)
    n = np.array([int(c[j]) for c, j in zip(counts, picked)], dtype=np.int64)
    while (diff := int(n.sum()) - target) != 0:
        best, room = None, 0
        for i, (e, c) in enumerate(zip(errors, counts)):
            k = np.searchsorted(c, n[i], side="left" if diff > 0 else "right")  # the segment's far end
            k = k - 1 if diff > 0 else k
            if not 0 <= k < len(c):
                continue
            lo, hi = sorted((k, k + 1 if diff > 0 else k - 1))
            slope = (e[hi] - e[lo]) / (c[hi] - c[lo])
            score = -slope if diff > 0 else slope
            if best is None or score < best[0]:
                best, room = (score, i), abs(int(c[k]) - int(n[i]))
        if best is None:   # every table is at its end: the target is out of reach
            break
        n[best[1]] -= np.sign(diff) * min(abs(diff), room)
    return n


def interpolated_error(errors: np.ndarray, counts: np.ndarray, n: int) -> float:
    """A table's error at n zeros, linear between its options."""
    return float(np.interp(n, counts, errors))


def _check(errors, counts, target) -> tuple[list[np.ndarray], list[np.ndarray]]:
    if len(errors) != len(counts) or not errors:
        raise ValueError("errors and counts need one table per site, at least one site")
    errors = [np.asarray(e, dtype=np.float64) for e in errors]
    counts = [np.asarray(c, dtype=np.int64) for c in counts]
    for e, c in zip(errors, counts):
        if e.shape != c.shape or e.ndim != 1 or not e.size:
            raise ValueError("each site's errors and counts must be 1-D arrays of one length")
        if (np.diff(c) < 0).any() or c[0] < 0 or not np.isfinite(e).all():
            raise ValueError("counts must be non-negative and non-decreasing, errors finite")
    if not 0 <= target <= sum(int(c[-1]) for c in counts):
        raise ValueError(f"target {target} is outside 0 .. {sum(int(c[-1]) for c in counts)}, "
                         "the most zeros the tables offer")
    return errors, counts
