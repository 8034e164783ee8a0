"""Seconds of the exact layer-wise solver (OBC, onnx_obs/algorithms/obc.py) per layer, before and
after a change, in the same run.

The old solver is the module at --old (a git revision, default the last commit before issue 15's
solver work), read with `git show` into a temporary directory and imported from there; its
helpers (blas_threads, masks) come from this checkout. Per layer shape, H = 2 X^T X / n from
random correlated activations X (n = 4 cols) plus 1% damping, as prune_layer makes it, then:
- prune: obc_prune at 50% (the default global allocation: a full greedy trace and the removal);
- trace: obc_trace, the error-vs-sparsity table of --allocation auto (one full greedy trace);
- obq: 4-bit OBQ (the greedy with a grid target, one scale per row and 32 columns), layers of
  up to 576 columns;
- depthwise rows: G one-row groups of k*k columns, each with its own H: old = prune_layer's steps
  per group (Cholesky, inverse, obc_prune), new = algorithms.layerwise.prune_row_groups.
For each it prints old and new seconds (the best of --repeat runs), their ratio, and whether the
results agree: identical masks, largest weight difference relative to the largest weight.

Usage: python scripts/bench_exact_solver.py [--old REV] [--quick] [--repeat N]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from onnx_obs.algorithms import obc
from onnx_obs.algorithms.damping import damped_cholesky, damping
from onnx_obs.algorithms.layerwise import _decoupled, _inverse, prune_row_groups
from onnx_obs.algorithms.quantize import make_grid

REPO = Path(__file__).resolve().parent.parent
OLD_REV = "49ec96e"  # main before the solver changes of issue 15 (follow-up 15b)
LAYERS = [(64, 288), (64, 576), (256, 256), (512, 512), (128, 1152)]
QUICK_LAYERS = [(64, 288), (64, 576), (256, 256)]
DEPTHWISE = [(256, 9), (672, 25)]  # (channels, kernel positions)


def load_old(rev: str, tmp: Path):
    """obc.py as of `rev`, imported as a separate module."""
    text = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:onnx_obs/algorithms/obc.py"],
                          check=True, capture_output=True, text=True).stdout
    path = tmp / "obc_old.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("obc_old", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def hessian(rng, cols: int) -> np.ndarray:
    n = 4 * cols
    mix = np.eye(cols) + 0.1 * rng.standard_normal((cols, cols))
    X = (rng.standard_normal((n, cols)) @ mix) * np.exp(0.5 * rng.standard_normal(cols))
    return 2.0 / n * X.T @ X


def inverse(H: np.ndarray) -> tuple[np.ndarray, float]:
    """prune_layer's damped H^-1 (no dead inputs) and the damping used."""
    diag = H.diagonal().copy()
    L, lam = damped_cholesky(_decoupled(H, diag <= 0), damping(diag, 0.01), float(diag.max()))
    return _inverse(L), lam


def obq_calls(old, W: np.ndarray, Hinv: np.ndarray):
    """4-bit OBQ of W with the old greedy (a nearest-value callback on full rows, as quantize
    called it) and the new one (per-weight scale and zero point)."""
    grid = make_grid(W, 4, groups=np.arange(W.shape[1]) // 32)
    stop, pinned = np.full(W.shape[0], W.shape[1]), W == 0.0

    def target(x, rows):
        c = grid.nearest(x, rows)
        return c, np.abs(x - c) > 0.5 * grid.scale[rows][:, grid.groups]

    per_weight = (grid.scale[:, grid.groups].astype(np.float64),
                  grid.zero[:, grid.groups].astype(np.float64), grid.qmin, grid.qmax)
    return (lambda: old._greedy(W, Hinv, pinned, stop, nearest=target),
            lambda: obc._greedy(W, Hinv, pinned, stop, grid=per_weight))


def best(fn, repeat: int):
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def agreement(old_w, new_w, old_mask, new_mask) -> str:
    rel = float(np.abs(old_w - new_w).max() / max(np.abs(old_w).max(), 1e-300))
    return f"masks {'equal' if np.array_equal(old_mask, new_mask) else 'DIFFER'}, max rel diff {rel:.1e}"


def row(label: str, t_old: float, t_new: float, note: str = "") -> None:
    print(f"{label:<28} old {t_old:8.3f} s   new {t_new:8.3f} s   x{t_old / t_new:5.2f}   {note}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", default=OLD_REV, help="git revision of the old solver")
    ap.add_argument("--quick", action="store_true", help="small layers only")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}   "
          f"old = {args.old}, new = this checkout")
    with tempfile.TemporaryDirectory() as tmp:
        old = load_old(args.old, Path(tmp))
    rng = np.random.default_rng(0)
    totals = [0.0, 0.0]
    for rows, cols in QUICK_LAYERS if args.quick else LAYERS:
        Hinv, _ = inverse(hessian(rng, cols))
        W = rng.standard_normal((rows, cols))
        forced = W == 0.0
        n = round(0.5 * W.size)
        t_old, (w_old, rem_old, _) = best(lambda: old.obc_prune(W, Hinv, forced, n_zeros=n), args.repeat)
        t_new, (w_new, rem_new, _) = best(lambda: obc.obc_prune(W, Hinv, forced, n_zeros=n), args.repeat)
        row(f"prune 50% {rows}x{cols}", t_old, t_new, agreement(w_old, w_new, rem_old, rem_new))
        totals[0] += t_old
        totals[1] += t_new
        t_old, tr_old = best(lambda: old.obc_trace(W, Hinv, forced), args.repeat)
        t_new, tr_new = best(lambda: obc.obc_trace(W, Hinv, forced), args.repeat)
        row(f"trace {rows}x{cols}", t_old, t_new,
            f"table max rel diff {np.abs(tr_old - tr_new).max() / tr_old.max():.1e}")
        if cols <= 576:
            obq_old, obq_new = obq_calls(old, W, Hinv)
            t_old, (q_old, *_) = best(obq_old, args.repeat)
            t_new, (q_new, *_) = best(obq_new, args.repeat)
            row(f"obq 4-bit {rows}x{cols}", t_old, t_new, agreement(q_old, q_new, True, True))
    for channels, k in DEPTHWISE:
        Hs = [hessian(rng, k) for _ in range(channels)]
        W = rng.standard_normal((channels, k))
        groups = [slice(c, c + 1) for c in range(channels)]

        def per_group():
            out = []
            for c, H in enumerate(Hs):
                Hinv, _ = inverse(H)
                w = W[c : c + 1]
                out.append(old.obc_prune(w, Hinv, w == 0.0, n_zeros=round(0.5 * k)))
            return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])

        t_old, (w_old, rem_old) = best(per_group, args.repeat)
        t_new, res = best(lambda: prune_row_groups(W, Hs, groups, [0.5] * channels), args.repeat)
        w_new = np.concatenate([r.weight for r in res])
        rem_new = ~np.concatenate([r.mask for r in res])
        row(f"depthwise {channels} x (1x{k})", t_old, t_new, agreement(w_old, w_new, rem_old, rem_new))
    row("all prune layers", *totals)


if __name__ == "__main__":
    sys.exit(main())
