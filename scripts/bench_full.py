"""Speed and memory of full-network OBS: blocked Eq. 17 inverse and global surgery.

Derivative vectors are the analytic per-sample gradients of a random 2-layer tanh network
f(x) = v . tanh(W x + b) on correlated Gaussian inputs, so H = (1/P) sum X X^T has a realistic
spectrum (rank <= P, strongly correlated weights).

    python scripts/bench_full.py          # 10,000 weights, 2,000 samples (about a minute on 2 cores)
    python scripts/bench_full.py --quick  # seconds-long smoke run
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from onnx_obs.hessian.inverse import inverse_hessian
from onnx_obs.prune.surgery import obs_surgery

ALPHA = 1e-4  # the paper's range is 1e-8 <= alpha <= 1e-4


def tanh_net(P: int, d_in: int, hidden: int, rng: np.random.Generator):
    """Weights [W, b, v] (n = hidden * (d_in + 2)), their per-sample gradients X (P x n), bias mask."""
    W = rng.normal(size=(hidden, d_in)) / np.sqrt(d_in)
    b = 0.1 * rng.normal(size=hidden)
    v = rng.normal(size=hidden) / np.sqrt(hidden)
    x = rng.normal(size=(P, d_in)) @ (rng.normal(size=(d_in, d_in)) / np.sqrt(d_in))
    t = np.tanh(x @ W.T + b)
    g = (1.0 - t * t) * v  # df/db
    X = np.hstack([(g[:, :, None] * x[:, None, :]).reshape(P, -1), g, t])  # df/dW, df/db, df/dv
    w = np.concatenate([W.ravel(), b, v])
    prunable = np.ones(w.size, dtype=bool)
    prunable[W.size : W.size + hidden] = False  # biases are corrected, not deleted
    return w, X, prunable


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def blocks(X: np.ndarray, size: int = 256):
    for s in range(0, X.shape[0], size):
        yield X[s : s + size]


def bench_inverse(X: np.ndarray) -> np.ndarray:
    P, n = X.shape
    t0 = time.perf_counter()
    Hinv = inverse_hessian(blocks(X), n, ALPHA, P)
    t_ours = time.perf_counter() - t0
    peak_ours = peak_gib()

    t0 = time.perf_counter()
    H = X.T @ X
    H /= P
    H.flat[:: n + 1] += ALPHA
    ref = np.linalg.inv(H)
    t_floor = time.perf_counter() - t0

    rel = np.abs(Hinv - ref).max() / np.abs(ref).max()
    print(
        f"inverse  n={n} P={P}: blocked Eq. 17 {t_ours:.2f} s | floor (X^T X + numpy inv) {t_floor:.2f} s"
        f" | ratio {t_ours / t_floor:.2f} | max rel diff {rel:.1e}"
    )
    print(f"peak memory after the blocked inverse (X and H^-1 held): {peak_ours:.2f} GiB")
    return Hinv


def bench_surgery(w, Hinv, prunable, step: int) -> None:
    target = int(0.9 * w.size)
    t0 = time.perf_counter()
    res = obs_surgery(w, Hinv, target_zeros=target, step=step, prunable=prunable, overwrite_hinv=True)
    t = time.perf_counter() - t0
    print(
        f"surgery  n={w.size} step={step}: removed {res.order.size} in {t:.2f} s"
        f" | predicted dE {res.error_increase:.3e} ({res.stop_reason})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    # (samples, d_in, hidden): n = hidden * (d_in + 2)
    small, large = ((200, 8, 50), (400, 18, 50)) if args.quick else ((2000, 18, 100), (2000, 98, 100))

    w, X, prunable = tanh_net(*small, rng)
    Hinv = inverse_hessian(blocks(X), w.size, ALPHA, X.shape[0])
    bench_surgery(w, Hinv, prunable, step=1)

    w, X, prunable = tanh_net(*large, rng)
    Hinv = bench_inverse(X)
    del X
    bench_surgery(w, Hinv, prunable, step=64)

    print(f"peak memory of the whole run (the floor's numpy inv included): {peak_gib():.2f} GiB")


if __name__ == "__main__":
    main()
