"""Per-sample weight derivatives dF(w, in_k)/dw by central differences along the weights.

Moving weight j by h moves every linear node output z it enters by h v_j, v_j = dz/dw_j (for
z = alpha W x + beta b: alpha x[:, c] in unit r for W[r, c] at every position of every sample,
beta in unit r for b[r]), so one run per sign gives the derivative for every sample of a batch:
    dF/dw_j ~ (F(z + h v_j) - F(z - h v_j)) / 2h,    h = eps max(1, |w_j|).
This is differentiation along the weights. Perturbing each element of z on its own and chaining
the slopes is not: where F is differentiable along the weights but not element by element, the
slopes do not add up (each element of a 4-way MaxPool tie gets slope 1/2, so the tie counts twice).

A kink inside the step (a ReLU input within h of 0, a MaxPool or Max near a tie, Abs near 0,
Clip near a bound) shows as one-sided slopes that disagree beyond rounding,
(F(+h) - F(0)) / h != (F(0) - F(-h)) / h. Such samples are redone with steps 16 and 256 times
smaller; those that still disagree sit on a kink (F has no derivative there along w_j): they keep
the central difference, the mean of the two one-sided slopes, and are counted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice

import numpy as np

CHUNK = 64          # weights whose runs are handed to `run` together (it may stack them in one batch)
SHRINK = 16          # each retry divides the step by this
RETRIES = 2
SLOPE_TOL = 1e-2     # one-sided slopes may differ by this fraction of their size (curvature)
ROUNDING = 8         # and by this many units in the last place of the outputs, over h


@dataclass
class NodeTerm:
    """How one linear node's output z depends on a weight segment (and its bias) for one batch."""

    z: str                     # the node output's name
    shape: tuple[int, ...]     # z's shape for this batch
    layout: str                # "rows" | "cols" | "channels" (hessian.full.delta_vectors)
    rows: int
    groups: int
    inputs: np.ndarray         # (groups, positions, cols): the input vectors (hessian.layerwise.input_vectors)
    weights: slice             # the weight matrix's slice of w (row-major)
    alpha: float = 1.0         # Gemm's alpha
    bias: slice | None = None
    beta: float = 1.0          # Gemm's beta


def to_z_layout(v: np.ndarray, layout: str, shape: tuple[int, ...], groups: int) -> np.ndarray:
    """(groups, positions, rows / groups) in delta_vectors' order -> an array shaped like z."""
    if layout == "rows":
        return v.reshape(shape)
    if layout == "cols":
        if len(shape) == 1:
            return v.reshape(shape)
        swapped = (*shape[:-2], shape[-1], shape[-2])
        return np.swapaxes(v.reshape(swapped), -1, -2)
    if layout == "channels":
        n, c = shape[:2]
        v = v.reshape(groups, n, -1, c // groups).transpose(1, 0, 3, 2)  # (N, groups, rows/groups, spatial)
        return v.reshape(shape)
    raise ValueError(f"unknown layout {layout!r}")


def _direction(t: NodeTerm, r: int, column: np.ndarray | float) -> np.ndarray:
    """v = dz/dw for the weight of unit r whose input at each position is `column` (1 for a bias)."""
    rg = t.rows // t.groups
    v = np.zeros((t.groups, t.inputs.shape[1], rg))
    v[r // rg, :, r % rg] = column
    return to_z_layout(v, t.layout, t.shape, t.groups)


def _directions(terms: list[NodeTerm], n: int):
    """Yield (j, {z: v_j}) for every weight j of w that some term moves."""
    touching: dict[tuple[int, int], list[tuple[NodeTerm, bool]]] = {}
    for t in terms:
        touching.setdefault((t.weights.start, t.weights.stop), []).append((t, False))
        if t.bias is not None:
            touching.setdefault((t.bias.start, t.bias.stop), []).append((t, True))
    for (start, stop), users in sorted(touching.items()):
        for j in range(start, stop):
            k = j - start
            dirs: dict[str, np.ndarray] = {}
            for t, is_bias in users:
                if is_bias:
                    v = _direction(t, k, t.beta)
                else:
                    cols = t.inputs.shape[2]
                    r, c = divmod(k, cols)
                    g = r // (t.rows // t.groups)
                    v = _direction(t, r, t.alpha * t.inputs[g, :, c])
                dirs[t.z] = dirs[t.z] + v if t.z in dirs else v
            yield j, dirs


def weight_jacobian(run: Callable[[list[dict[str, np.ndarray]]], np.ndarray], y0: np.ndarray, w: np.ndarray,
                    terms: list[NodeTerm], eps: float, out_eps: float) -> tuple[np.ndarray, int, int]:
    """J[b, u, j] = dF_u(in_b)/dw_j for a batch, by central differences along each weight.

    run(moves) returns the outputs (len(moves), B, U), one batch for each dict of moves: each z in
    the dict moved by the given array (z's shape). y0: the outputs (B, U) unmoved, float64. eps: the
    relative step (cbrt of z's machine epsilon); out_eps: the outputs' machine epsilon. Returns J,
    the number of (sample, weight) pairs redone with smaller steps, and the number left on a kink.
    """
    batch, units = y0.shape
    J = np.zeros((batch, units, w.size))
    redone = kinks = 0
    directions = _directions(terms, w.size)
    while chunk := list(islice(directions, CHUNK)):
        h = np.array([eps * max(1.0, abs(float(w[j]))) for j, _ in chunk])
        todo = np.ones((len(chunk), batch), dtype=bool)
        js = np.array([j for j, _ in chunk])
        for attempt in range(RETRIES + 1):
            a = np.flatnonzero(todo.any(axis=1))
            ys = run([{z: sign * h[i] * v for z, v in chunk[i][1].items()} for i in a for sign in (1, -1)])
            plus, minus, step = ys[0::2], ys[1::2], h[a, None, None]  # (A, B, U)
            keep = todo[a].T[:, None, :]  # (B, 1, A)
            J[:, :, js[a]] = np.where(keep, ((plus - minus) / (2 * step)).transpose(1, 2, 0), J[:, :, js[a]])
            right, left = (plus - y0) / step, (y0 - minus) / step
            scale = np.max(np.maximum(np.abs(y0), np.maximum(np.abs(plus), np.abs(minus))), axis=2)
            tol = ROUNDING * out_eps * scale / h[a, None] + SLOPE_TOL * np.max(np.maximum(np.abs(right), np.abs(left)), axis=2)
            todo[a] &= np.max(np.abs(right - left), axis=2) > tol
            if not todo.any() or attempt == RETRIES:
                break
            redone += int(todo.sum())
            h /= SHRINK
        kinks += int(todo.sum())
    return J, redone, kinks
