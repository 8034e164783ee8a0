"""Which weights to remove: zero counts and smallest-score selection.

Scores follow one convention everywhere: lower means "remove first". Weights that must be removed
whatever their score (already exactly zero, or on a dead input) are passed as `forced`; they are
always selected and count toward the target.
"""

from __future__ import annotations

import numpy as np


def spread_zeros(total: int, forced: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Split `total` zeros over consecutive parts in proportion to their sizes.

    Each part gets at least its forced zeros and at most its size; the counts add up to `total`
    exactly whenever sum(forced) <= total <= sum(sizes) (below, every part gets just its forced
    zeros). Parts of equal size and few forced zeros get counts that differ by at most one.
    """
    forced = np.asarray(forced, dtype=np.int64)
    sizes = np.asarray(sizes, dtype=np.int64)
    counts = np.empty(len(sizes), dtype=np.int64)
    remaining, remaining_size, forced_after = int(total), int(sizes.sum()), int(forced.sum())
    for i, (size, must) in enumerate(zip(sizes.tolist(), forced.tolist())):
        forced_after -= must
        remaining_size -= size
        share = round(remaining * size / (remaining_size + size)) if size else 0
        # Leave room for the forced zeros still to come; take what later parts cannot hold.
        low = max(must, remaining - remaining_size)
        high = min(size, remaining - forced_after)
        counts[i] = max(must, min(max(share, low), high))
        remaining -= int(counts[i])
    return counts


def smallest_overall(scores: np.ndarray, forced: np.ndarray, n_remove: int) -> np.ndarray:
    """Boolean mask (True = remove) of the n_remove smallest scores of the whole array.

    Forced entries are always removed, so at least forced.sum() entries are selected.
    Ties at the threshold are broken by position (in memory order).
    """
    order = "F" if scores.flags.f_contiguous else "C"
    n_forced = int(np.count_nonzero(forced))
    flat = (np.where(forced, -np.inf, scores) if n_forced else scores).ravel(order=order)
    n_remove = min(max(int(n_remove), n_forced), flat.size)
    if n_remove == 0:
        return np.zeros(scores.shape, dtype=bool)
    threshold = _kth_smallest(flat, n_remove)
    remove = flat <= threshold
    extra = int(np.count_nonzero(remove)) - n_remove
    if extra:  # ties at the threshold: keep the last ones
        remove[np.flatnonzero(flat == threshold)[-extra:]] = False
    return remove.reshape(scores.shape, order=order)


def _kth_smallest(x: np.ndarray, k: int) -> float:
    """The k-th smallest value of the 1-D array x (k >= 1).

    For large x, a strided sample brackets the answer (+-4 sample standard deviations of its
    rank) so that only the values in the bracket are partitioned; if the bracket misses, the
    whole array is. The stride is odd so that it cycles through the columns of a flattened
    matrix whose row length is a power of two.
    """
    if x.size > 1 << 16:
        sample = x[:: (x.size >> 14) | 1]
        pos = k / x.size * sample.size
        margin = 4.0 * np.sqrt(sample.size) + 2.0
        ends = [max(int(pos - margin), 0), min(int(pos + margin), sample.size - 1)]
        lo, hi = np.partition(sample, ends)[ends]
        below = x < lo
        n_below = int(np.count_nonzero(below))
        inside = x[(x <= hi) & ~below]
        if n_below < k <= n_below + inside.size:
            return np.partition(inside, k - n_below - 1)[k - n_below - 1]
    return np.partition(x, k - 1)[k - 1]


def smallest_in_groups(scores: np.ndarray, forced: np.ndarray, n_remove: np.ndarray) -> np.ndarray:
    """Boolean mask (True = remove) of the n_remove[...] smallest scores along the last axis.

    `n_remove` has the shape of scores.shape[:-1]; forced entries are always removed (the count
    grows to the number of forced entries where that is larger). Ties are broken by position.
    """
    n_remove = np.maximum(n_remove, forced.sum(axis=-1))
    s = np.where(forced, -np.inf, scores)
    m = s.shape[-1]
    if m <= 8:  # rank by pairwise comparison: 10x faster than sorting many tiny rows
        a, b = s[..., :, None], s[..., None, :]
        rank = ((b < a) | ((b == a) & np.tri(m, k=-1, dtype=bool))).sum(axis=-1)
    else:
        rank = np.empty(s.shape, dtype=np.intp)
        np.put_along_axis(rank, np.argsort(s, axis=-1, kind="stable"), np.arange(m), axis=-1)
    return rank < n_remove[..., None]


def nm_keep_counts(cols: int, n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Group index of every column and the number of weights each group keeps, for N:M sparsity.

    Groups are consecutive runs of m columns. A full group keeps n; a tail group of r < m columns
    keeps min(n, r), so that zero-padding the tail to m columns gives a valid N:M group.
    """
    group = np.arange(cols) // m
    sizes = np.bincount(group, minlength=-(-cols // m))
    return group, np.minimum(n, sizes)


def nm_mask(scores: np.ndarray, forced: np.ndarray, n: int, m: int) -> np.ndarray:
    """Boolean mask (True = remove) keeping the n best of every group of m along the last axis.

    Groups with more forced entries than m - n keep fewer than n. See nm_keep_counts for the tail.
    """
    rows, cols = scores.shape
    pad = -cols % m
    if pad:  # a tail group: pad it with never-chosen entries
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=np.inf)
        forced = np.pad(forced, ((0, 0), (0, pad)))
    _, keep = nm_keep_counts(cols, n, m)
    sizes = np.full(keep.shape, m)
    sizes[-1] = m - pad
    groups = (rows, len(keep), m)
    n_remove = np.broadcast_to(sizes - keep, groups[:2])
    remove = smallest_in_groups(scores.reshape(groups), forced.reshape(groups), n_remove)
    return remove.reshape(rows, -1)[:, :cols]
