"""Layer-wise Hessians H = (2/n) sum_k x_k x_k^T from captured activations (OBC / SparseGPT).

An activation tensor becomes input vectors x_k (the columns of the site's 2-D matrix): every
token of a MatMul input, every output position's receptive field of a convolution (im2col), one
set per convolution group. Sums are float64 and streamed batch by batch: memory is one
(cols x cols) matrix per group, whatever the number of samples. Float32 (or float16) activations
are multiplied in float32 BLAS, chunks of at most _CHUNK_ROWS_F32 rows, each chunk's product added
to the float64 sum: within a chunk the rounding error of a dot product of n terms grows like
sqrt(n) * 2^-24 of its magnitude (below 4e-6 at 4096 rows; measured on real activations: 3e-8 to
1.1e-7 relative Frobenius error, at most 3e-7 of the largest entry, scripts/bench_hessian.py);
float64 activations, or precision="float64", stay float64.

PRECISIONS: the products' floating type ("float32": float32 for float32/float16 activations).
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from onnx_obs.algorithms.blas_threads import one_blas_thread
from onnx_obs.threads import map_ordered
from onnx_obs.graph.ops import ConvGeometry

_CHUNK_ROWS = 16384         # input vectors per float64 product
_CHUNK_ROWS_F32 = 4096      # input vectors per float32 product (bounds its rounding error)
PRECISIONS = ("float32", "float64")
_UNFOLD_ELEMENTS = 1 << 24  # bounds one unfolded convolution chunk (64 MB of float32)
# A convolution's Hessian by default sums at most this many input vectors per column over the
# calibration set (positions_per_sample): beyond it the sums of wide-image early layers cost
# seconds and the estimate of H barely moves (scripts/bench_pipeline.py: output MSE on ResNet-18,
# the EfficientNet-like net and the detector, README).
VECTORS_PER_COLUMN = 64


class HessianSum:
    """Running sum of 2 x x^T per group; `hessian()` returns (groups, cols, cols) means.
    precision: one of PRECISIONS, the products' type (the sum is float64 either way)."""

    def __init__(self, groups: int, cols: int, precision: str = "float32"):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown Hessian precision {precision!r}: use one of {', '.join(PRECISIONS)}")
        self.sum = np.zeros((groups, cols, cols))
        self.count, self.precision = 0, precision

    def add(self, vectors: np.ndarray) -> None:
        """vectors: (groups, n, cols). Chunks of rows are multiplied in parallel, one BLAS thread
        each, and summed in order: the sum does not depend on the thread count."""
        wide = self.precision == "float64" or vectors.dtype == np.float64
        dtype, rows = (np.float64, _CHUNK_ROWS) if wide else (np.float32, _CHUNK_ROWS_F32)
        chunks = [vectors[:, s:s + rows] for s in range(0, vectors.shape[1], rows)]
        with one_blas_thread():
            for part in map_ordered(lambda v: _gram(v, dtype), chunks):
                self.sum += part
        self.count += vectors.shape[1]

    def add_columns(self, columns: np.ndarray) -> None:
        """add(columns.transpose(0, 2, 1)) without the transposing copy: columns (groups, cols,
        n), a convolution sample's unfolded patches as they lie in memory. Chunks of n as add's."""
        wide = self.precision == "float64" or columns.dtype == np.float64
        dtype, rows = (np.float64, _CHUNK_ROWS) if wide else (np.float32, _CHUNK_ROWS_F32)
        chunks = [columns[:, :, s:s + rows] for s in range(0, columns.shape[2], rows)]
        with one_blas_thread():
            for part in map_ordered(lambda v: _gram_columns(v, dtype), chunks):
                self.sum += part
        self.count += columns.shape[2]

    def hessian(self) -> np.ndarray:
        return self.sum / max(self.count, 1)


def _gram(v: np.ndarray, dtype) -> np.ndarray:
    """2 v^T v per group, multiplied in `dtype`, returned as float64."""
    v = v.astype(dtype, copy=False)
    return 2.0 * np.matmul(v.transpose(0, 2, 1), v).astype(np.float64)


def _gram_columns(c: np.ndarray, dtype) -> np.ndarray:
    """2 c c^T per group, multiplied in `dtype`, returned as float64."""
    c = c.astype(dtype, copy=False)
    return 2.0 * np.matmul(c, c.transpose(0, 2, 1)).astype(np.float64)


def positions_per_sample(cols: int, samples: int) -> int:
    """Output positions per sample that give a convolution of `cols` columns about
    VECTORS_PER_COLUMN * cols input vectors over `samples` calibration samples."""
    return max(1, math.ceil(VECTORS_PER_COLUMN * cols / max(samples, 1)))


def conv_positions(x: np.ndarray, geometry: ConvGeometry) -> int:
    """Output positions per sample of a Conv on the batch x."""
    return math.prod(_padded(x[:1, :1], geometry)[1])


def conv_columns(x: np.ndarray, geometry: ConvGeometry):
    """Yield one (groups, C/groups * K, positions) block per sample of a Conv input batch: the
    transposed input vectors of input_vectors(x, "conv", ..., geometry) (all positions), sample
    by sample, a plain reshape of the sample's unfolded patches."""
    xp, out = _padded(x, geometry)
    c, groups = x.shape[1], geometry.groups
    for n in range(len(x)):
        taps = _taps(xp[n:n + 1], geometry.kernel, geometry.dilations, geometry.strides, out)
        yield taps.reshape(groups, c // groups * taps.shape[2], -1)


def input_vectors(x: np.ndarray, samples: str, cols: int,
                  geometry: ConvGeometry | None = None, max_positions: int = 0, seed: int = 0):
    """Yield (groups, n, cols) blocks of input vectors from one activation batch.

    max_positions > 0: a convolution keeps at most that many output positions per sample, a
    random subset drawn with a fixed seed (the Hessian is then the mean over the subset, an
    unbiased estimate of the mean over all positions); seed: the draws' seed, e.g. the vectors
    summed so far, so that every batch draws differently.
    """
    if samples == "rows":
        yield x.reshape(1, -1, cols)
    elif samples == "cols":
        yield (x.reshape(1, cols) if x.ndim == 1 else np.swapaxes(x, -1, -2)).reshape(1, -1, cols)
    elif samples == "conv" and max_positions > 0:
        xp, out = _padded(x, geometry)
        positions = math.prod(out)
        step = max(1, _UNFOLD_ELEMENTS // (x.shape[1] * math.prod(geometry.kernel) * positions))  # as below
        for start in range(0, len(x), step):
            n = min(step, len(x) - start)
            if max_positions >= positions:
                yield _group_rows(_taps(xp[start:start + n], geometry.kernel, geometry.dilations,
                                        geometry.strides, out), geometry.groups)
            else:
                yield _picked_patches(xp[start:start + n], geometry, out,
                                      _pick(n, positions, max_positions, seed + start))
    elif samples in ("conv", "convtranspose"):
        unfold = conv_patches if samples == "conv" else conv_transpose_patches
        per_sample = unfold(x[:1], geometry).size
        step = max(1, _UNFOLD_ELEMENTS // per_sample)
        for start in range(0, len(x), step):
            vectors = _group_rows(unfold(x[start:start + step], geometry), geometry.groups)
            yield _some_positions(vectors, min(step, len(x) - start), max_positions, seed + start)
    else:
        raise ValueError(f"unknown sample layout {samples}")


def _some_positions(vectors: np.ndarray, n: int, keep: int, seed: int) -> np.ndarray:
    """(groups, n * positions, cols) -> (groups, n * keep, cols): per sample, `keep` positions
    drawn without replacement (_pick)."""
    positions = vectors.shape[1] // n
    if keep <= 0 or keep >= positions:
        return vectors
    pick = _pick(n, positions, keep, seed) + positions * np.arange(n)[:, None]
    return vectors[:, pick.ravel()]


def _pick(n: int, positions: int, keep: int, seed: int) -> np.ndarray:
    """(n, keep): per sample, `keep` of `positions` drawn without replacement, ascending."""
    return np.sort(np.random.default_rng(seed).random((n, positions)).argsort(axis=1)[:, :keep], axis=1)


def _picked_patches(xp: np.ndarray, g: ConvGeometry, out: list[int], pick: np.ndarray) -> np.ndarray:
    """Conv input vectors of a padded batch xp (N, C, *spatial) at the output positions `pick`
    (N, keep; flat indices into `out`) only: (groups, N * keep, C/groups * K), the rows of
    _group_rows(conv_patches(...)) that _some_positions keeps, without unfolding the others."""
    n, c = xp.shape[:2]
    where = np.unravel_index(pick, out)
    batch = np.arange(n)[:, None]
    taps = [xp[(batch, slice(None), *(o * s + k * d for o, s, k, d in zip(where, g.strides, offset, g.dilations)))]
            for offset in itertools.product(*[range(k) for k in g.kernel])]   # each (N, keep, C)
    vectors = np.stack(taps, axis=-1).reshape(n * pick.shape[1], g.groups, c // g.groups * len(taps))
    return vectors.transpose(1, 0, 2)


def _group_rows(patches: np.ndarray, groups: int) -> np.ndarray:
    """(N, C, K, *out) patches -> (groups, N * positions, C/groups * K), columns (channel, tap)."""
    n, c, k = patches.shape[:3]
    p = patches.reshape(n, groups, c // groups * k, -1)
    return p.transpose(1, 0, 3, 2).reshape(groups, -1, c // groups * k)


def same_pads(in_size: int, stride: int, extent: int, mode: str) -> tuple[int, int]:
    out = -(-in_size // stride)
    total = max(0, (out - 1) * stride + extent - in_size)
    small, big = total // 2, total - total // 2
    return (small, big) if mode == "SAME_UPPER" else (big, small)


def conv_patches(x: np.ndarray, g: ConvGeometry) -> np.ndarray:
    """im2col of a batch x (N, C, *spatial) for Conv: (N, C, prod(kernel), *out)."""
    xp, out = _padded(x, g)
    return _taps(xp, g.kernel, g.dilations, g.strides, out)


def _padded(x: np.ndarray, g: ConvGeometry) -> tuple[np.ndarray, list[int]]:
    """x padded as the Conv pads it, and the output's spatial size."""
    r = len(g.kernel)
    extents = [(k - 1) * d + 1 for k, d in zip(g.kernel, g.dilations)]
    if g.pads is not None:
        pads = list(zip(g.pads[:r], g.pads[r:]))
    elif g.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = [same_pads(n, s, e, g.auto_pad) for n, s, e in zip(x.shape[2:], g.strides, extents)]
    else:
        pads = [(0, 0)] * r
    xp = np.pad(x, [(0, 0), (0, 0)] + pads)
    return xp, [(n - e) // s + 1 for n, e, s in zip(xp.shape[2:], extents, g.strides)]


def conv_transpose_patches(x: np.ndarray, g: ConvGeometry) -> np.ndarray:
    """Input vectors of ConvTranspose for a batch (N, C, *spatial): (N, C, prod(kernel), *out).

    Output position p sees tap k of input i where p = i*s + k*d - pad_begin. On the input
    upsampled by s (zeros between samples) and padded left by (K-1)*d - pad_begin, that tap is
    element p + (K-1-k)*d: an ordinary dilated im2col with the kernel axis reversed.
    """
    r = len(g.kernel)
    spatial = x.shape[2:]
    full = [s * (n - 1) + op + (k - 1) * d + 1 for n, s, op, k, d in
            zip(spatial, g.strides, g.output_padding or [0] * r, g.kernel, g.dilations)]
    if g.output_shape:
        pads = _transpose_pads([f - o for f, o in zip(full, g.output_shape[-r:])], g.auto_pad)
    elif g.pads is not None:
        pads = list(zip(g.pads[:r], g.pads[r:]))
    elif g.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = _transpose_pads([f - n * s for f, n, s in zip(full, spatial, g.strides)], g.auto_pad)
    else:
        pads = [(0, 0)] * r
    out = list(g.output_shape[-r:]) if g.output_shape else [f - b - e for f, (b, e) in zip(full, pads)]
    up = np.zeros(x.shape[:2] + tuple((n - 1) * s + 1 for n, s in zip(spatial, g.strides)), x.dtype)
    up[(slice(None),) * 2 + tuple(slice(None, None, s) for s in g.strides)] = x
    xp = np.zeros(x.shape[:2] + tuple(o + (k - 1) * d for o, k, d in zip(out, g.kernel, g.dilations)),
                  x.dtype)
    dst, src = [slice(None)] * 2, [slice(None)] * 2
    for n_up, n_xp, k, d, (b, _) in zip(up.shape[2:], xp.shape[2:], g.kernel, g.dilations, pads):
        left = (k - 1) * d - b          # xp[j] = up[j - left]
        lo, hi = max(0, left), min(n_xp, n_up + left)
        dst.append(slice(lo, hi))
        src.append(slice(lo - left, hi - left))
    xp[tuple(dst)] = up[tuple(src)]
    taps = _taps(xp, g.kernel, g.dilations, (1,) * r, out)
    return taps[:, :, ::-1]  # tap k' = K-1-k; the flattened reversal reverses every kernel axis


def _transpose_pads(totals: list[int], auto_pad: str) -> list[tuple[int, int]]:
    # As onnxruntime: a negative total (output_shape above the natural size) pads nothing, and
    # SAME_UPPER puts the smaller half first.
    totals = [max(0, t) for t in totals]
    return [(t // 2, t - t // 2) if auto_pad == "SAME_UPPER" else (t - t // 2, t // 2) for t in totals]


def _taps(xp, kernel, dilations, strides, out) -> np.ndarray:
    taps = np.empty((*xp.shape[:2], int(np.prod(kernel)), *out), xp.dtype)
    for t, offset in enumerate(itertools.product(*[range(k) for k in kernel])):
        idx = tuple(slice(o * d, o * d + s * (n - 1) + 1, s)
                    for o, d, s, n in zip(offset, dilations, strides, out))
        taps[:, :, t] = xp[(slice(None),) * 2 + idx]
    return taps
