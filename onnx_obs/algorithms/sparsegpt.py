"""Fast layer-wise OBS: SparseGPT (Frantar & Alistarh 2023, Algorithm 1), one factor for all rows.

Alg. 1 visits the columns left to right with U, the upper Cholesky factor of H^-1. We visit them
right to left, which needs only L, the lower Cholesky factor of H (H = L L^T): no inverse of H or
of L (only of L's diagonal blocks, block_size wide). When column i is reached, the columns not
yet visited are F = {0..i},
H_FF = L_FF L_FF^T, and with Li = L^-1
    [H_FF^-1][:, i] = Li_ii * Li[i, :i+1],        [H_FF^-1]_ii = Li_ii^2 = 1 / L_ii^2,
so removing weight i among F (Hassibi & Stork Eq. 5/6) costs (w_i L_ii)^2 / 2 and changes the
columns still to visit by -(w_i L_ii) Li[i, :i]. A kept column is frozen once visited. (This is
Alg. 1 on the reversed column order: J H^-1 J = (J Li J)^T (J Li J), J Li J upper triangular.)

Written with L instead of Li: let z_j = w0_j - w'_j be the total change of visited column j (w0
the original weights, w' the final ones: 0 where pruned, the then-current value where kept), G
the visited columns, F = {0..i} the others, and S_F = Z_G L[G, F]. Summing the Eq. 5 updates
(E_G = Z_G L_GG, Li[G, F] = -L_GG^-1 L[G, F] L_FF^-1), the current weights of F are
    w_F = w0_F + S_F L_FF^-1,
so the current weights of a trailing block b of F are w0_b + S_b L_bb^-1 (one product with a
small triangular inverse, for choosing a mask), and those of column i alone, when it is
visited, w0_i + s_i / L_ii.
The lazy updates (Alg. 1 lines 13-16) accumulate S += Z L: rank-1 steps inside sub-blocks of
SUB_BLOCK columns, one matrix product per sub-block for the rest of its block, and one per block
for every column still to visit. S is stored in the output array; a visited column's slot then
holds its final weights.

Precision: L comes from a float64 factorisation; S, Z and the lazy products run in the dtype of
the weights passed in. For float32 weights that halves the time of the products that dominate
large layers (the reference implementation runs everything, the factorisation included, in
float32); each S_ij is a sum of changes times entries of L, so float32 adds a relative error of
order 1e-7 * sqrt(cols) to weights that are stored in float32 or narrower anyway.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg.blas import get_blas_funcs

from onnx_obs.algorithms.blas_threads import one_blas_thread
from onnx_obs.algorithms.masks import nm_mask, smallest_overall, spread_zeros

# Columns handled by rank-1 steps before a matrix product takes over (a sub-block of the output
# stays in L2 cache); 16 and 32 were fastest of 8/16/32/64/128 on the 4096x4096 benchmark.
SUB_BLOCK = 16


def sparsegpt_prune(
    W0: np.ndarray,
    L: np.ndarray,
    *,
    n_zeros: int | list[int] = 0,
    pattern: tuple[int, int] | None = None,
    block_size: int = 128,
) -> tuple[np.ndarray, np.ndarray, float | np.ndarray]:
    """Return (pruned weights, mask of removed weights, predicted error = sum of saliencies).

    W0: the original weights, float64 or float32 in Fortran order (read only); weights that are exactly zero
    are removed whatever their saliency. L: lower Cholesky factor of the damped H, Fortran
    order; only its lower triangle is read.
    Unstructured: n_zeros zeros in all, spread over the blocks in proportion to their size (each
    block at least its forced zeros), each block's mask chosen over all its rows and columns by
    the saliency w^2 / [H_FF^-1]_ii at the block's start (Alg. 1 line 9). N:M: a group's mask is
    chosen when its last column is reached, from the then-current weights.
    S, and the returned weights, have W0's dtype (module doc: precision).
    n_zeros a list (unstructured): W0 is that many slabs of equal rows, stacked, each pruned to its
    own count as if alone, and the predicted errors come per slab: one layer at several sparsity
    levels in one pass over the columns, whose per-column steps cost Python overhead rather than
    arithmetic on the few rows of an allocation table.
    BLAS runs on one thread, so that the result does not depend on the thread count
    (onnx_obs.threads).
    """
    rows, cols = W0.shape
    dtype = W0.dtype.type
    m = pattern[1] if pattern else 1
    block = max(m, block_size - block_size % m)
    sub = min(block, max(m, SUB_BLOCK - SUB_BLOCK % m))
    diag = L.diagonal().copy()
    inv_diag = (1.0 / diag).astype(dtype)
    blas = get_blas_funcs(("gemm", "ger", "trsm"), dtype=dtype)
    starts = list(reversed(range(0, cols, block)))
    counts = [n_zeros] if np.isscalar(n_zeros) else list(n_zeros)
    slabs = [slice(i * (rows // len(counts)), (i + 1) * (rows // len(counts))) for i in range(len(counts))]
    if pattern is None:
        sizes = [rows // len(counts) * (min(i1 + block, cols) - i1) for i1 in starts]
        quotas = []
        for n, rs in zip(counts, slabs):
            forced_cols = np.count_nonzero(W0[rs] == 0.0, axis=0)
            quotas.append(spread_zeros(n, [forced_cols[i1 : i1 + block].sum() for i1 in starts], sizes))
    S = np.zeros((rows, cols), dtype=dtype, order="F")
    removed = np.zeros((rows, cols), dtype=bool, order="F")
    Z = np.empty((rows, block), dtype=dtype, order="F")
    current = np.empty((rows, block), dtype=dtype, order="F")
    predicted = np.zeros(len(counts))
    with one_blas_thread():  # the result must not depend on the thread count (module doc)
        for b, i1 in enumerate(starts):
            i2 = min(i1 + block, cols)
            w0, S_b, drop = W0[:, i1:i2], S[:, i1:i2], removed[:, i1:i2]
            L_rows = L[i1:i2, :i2].astype(dtype, order="F")  # the block's rows of L: all it needs
            L_bb = L_rows[:, i1:]
            forced = w0 == 0.0
            if pattern is None:  # Alg. 1 line 9: adaptive mask over the whole block
                saliency = _saliency(w0, S_b, L_bb, blas)
                for quota, rs in zip(quotas, slabs):
                    drop[rs] = smallest_overall(saliency[rs], forced[rs], quota[b])
            _visit_block(w0, forced, S_b, L_bb, inv_diag[i1:i2], drop, Z, current, sub, pattern, blas)
            if i1 > 0:  # the block's changes reach every column still to visit
                blas[0](1.0, Z[:, : i2 - i1], L_rows[:, :i1], beta=1.0, c=S[:, :i1], overwrite_c=True)
            pruned = np.where(drop, current[:, : i2 - i1], 0.0)  # w_i of the removed weights
            for i, rs in enumerate(slabs):
                norms = np.einsum("ij,ij->j", pruned[rs], pruned[rs], dtype=np.float64)
                predicted[i] += 0.5 * float(norms @ diag[i1:i2] ** 2)  # Eq. 6
    return S, removed, (float(predicted[0]) if np.isscalar(n_zeros) else predicted)


def _visit_block(w0, forced, S, L, inv_diag, drop, Z, current, sub, pattern, blas) -> None:
    """Visit a block's columns right to left (Alg. 1 lines 10-15): final weights into S, changes
    into Z. Every argument but Z and current is the block's own part (L: its diagonal block)."""
    gemm, ger, _ = blas
    width = S.shape[1]
    keep = (~drop).astype(S.dtype)
    for j1 in reversed(range(0, width, sub)):
        j2 = min(j1 + sub, width)
        for k in range(j2 - 1, j1 - 1, -1):
            if pattern and ((k + 1) % pattern[1] == 0 or k == width - 1):
                g = slice(k - k % pattern[1], k + 1)  # k ends group g: choose its mask now
                drop[:, g] = nm_mask(_saliency(w0[:, g], S[:, g], L[g, g], blas), forced[:, g], *pattern)
                keep[:, g] = ~drop[:, g]
            w = current[:, k]
            np.multiply(S[:, k], inv_diag[k], out=w)
            w += w0[:, k]  # current w_k = w0_k + s_k / L_kk
            np.multiply(w, keep[:, k], out=S[:, k])  # final w'_k
            np.subtract(w0[:, k], S[:, k], out=Z[:, k])  # z_k = w0_k - w'_k
            if k > j1:
                ger(1.0, Z[:, k], L[k, j1:k], a=S[:, j1:k], overwrite_a=True)
        if j1 > 0:
            gemm(1.0, Z[:, j1:j2], L[j1:j2, :j1], beta=1.0, c=S[:, :j1], overwrite_c=True)


def _saliency(w0: np.ndarray, S_b: np.ndarray, L_bb: np.ndarray, blas) -> np.ndarray:
    """(w_i L_ii)^2 = w_i^2 / [H_FF^-1]_ii for the unvisited trailing columns b, whose current
    weights are w_b = w0_b + S_b L_bb^-1 (module doc): one triangular solve."""
    w = blas[2](1.0, L_bb, S_b, side=1, lower=1)  # S_b L_bb^-1, a new array
    w += w0
    w *= L_bb.diagonal()
    return np.square(w, out=w)
