"""Speed and memory of the layer-wise pruning algorithms (onnx_obs.algorithms.layerwise).

Prints, in one run:
- the seconds to build H = (2/n) sum_k x_k x_k^T from the calibration vectors (float64, in chunks);
- the seconds of fast-mode (SparseGPT) 50% pruning, and its ratio to the floor: one float64
  Cholesky factorisation plus inverse of the same H, timed in the same run;
- the seconds of exact-mode (OBC) 50% pruning of a smaller layer, with both row allocations,
  and the layer errors of every method on it;
- with --auto, exact, fast and auto seconds and errors over a range of layer shapes (for
  EXACT_MAX_WORK and REFIT_MAX_FLOPS), and every method's error on the real layers of the
  repository's samples;
- peak resident memory.

The floor is factorised on one BLAS thread, as prune_layer factorises; its products split
themselves over the run's threads (onnx_obs.threads.panel_matmul). CPU seconds
(process time, all threads) are printed next to wall seconds: on a machine shared with other
jobs they show how much of the wall time was waiting.

Usage: python scripts/bench_layerwise.py [--quick] [--cols 4096] [--samples 8192] [--exact-cols 512]
                                         [--auto] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

import numpy as np
from scipy.linalg import lapack
from scipy.linalg.blas import dsyrk
from threadpoolctl import ThreadpoolController, threadpool_info

from onnx_obs.graph.model_io import load_any
from onnx_obs.hessian.capture import capture_hessians
from onnx_obs.calib import load_calibration
from onnx_obs.graph.sites import find_sites, site_matrix
from onnx_obs.progress import Progress
from onnx_obs.algorithms.blas_threads import one_blas_thread
from onnx_obs.algorithms import layerwise
from onnx_obs.algorithms.layerwise import layer_error, prune_layer
from onnx_obs.algorithms.obc import obc_prune


def correlated_inputs(rng: np.random.Generator, n: int, cols: int) -> np.ndarray:
    """float32 (n, cols): a low-rank shared part plus noise, with log-normal feature scales."""
    rank = max(1, cols // 8)
    mix = (rng.standard_normal((rank, cols)) / np.sqrt(rank)).astype(np.float32)
    X = rng.standard_normal((n, rank), dtype=np.float32) @ mix
    X += 0.5 * rng.standard_normal((n, cols), dtype=np.float32)
    X *= np.exp(0.5 * rng.standard_normal(cols)).astype(np.float32)
    return X


def build_hessian(X: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """H = (2/n) X^T X accumulated in float64 chunks with a symmetric rank-k update."""
    n, cols = X.shape
    H = np.zeros((cols, cols), order="F")
    for i in range(0, n, chunk):
        Xc = X[i : i + chunk].astype(np.float64)
        dsyrk(2.0 / n, Xc.T, beta=1.0, c=H, lower=1, overwrite_c=1)
    return np.tril(H) + np.tril(H, -1).T


def floor_seconds(H: np.ndarray, damp: float = 0.01) -> tuple[float, float]:
    """(wall, cpu) seconds of one float64 Cholesky factorisation plus inverse (dpotrf + dpotri)
    of the damped H, on one BLAS thread as prune_layer factorises."""
    cols = H.shape[0]
    A = np.array(H, order="F")
    A.flat[:: cols + 1] += damp * H.diagonal().mean()
    with one_blas_thread():
        (L, info), wall, cpu = timed(lapack.dpotrf, A, lower=1, clean=0, overwrite_a=1)
        _, wall2, cpu2 = timed(lapack.dpotri, L, lower=1, overwrite_c=1)
    assert info == 0
    return wall + wall2, cpu + cpu2


def timed(fn, *args, **kwargs):
    """(result, wall seconds, CPU seconds of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def bench_fast(rng, cols: int, samples: int) -> None:
    print(f"== fast mode: {cols}x{cols} layer, {samples} calibration vectors (float32 weights)")
    X = correlated_inputs(rng, samples, cols)
    W = rng.standard_normal((cols, cols), dtype=np.float32)
    H, t_h, c_h = timed(build_hessian, X)
    print(f"build H:             {t_h:8.3f} s wall {c_h:8.3f} s cpu")
    floor, c_floor = floor_seconds(H)
    print(f"floor (chol + inv):  {floor:8.3f} s wall {c_floor:8.3f} s cpu")
    for call in ("first call", "repeat"):  # the first call also pays the OS for fresh memory pages
        result, t_fast, c_fast = timed(prune_layer, W, H, sparsity=0.5, solver="fast")
        print(
            f"fast 50% ({call:10s}): {t_fast:6.3f} s wall {c_fast:8.3f} s cpu   ratio to floor "
            f"{t_fast / floor:.2f}x wall, {c_fast / c_floor:.2f}x cpu   (target <= 1.5x)"
        )
    _, t_24, c_24 = timed(prune_layer, W, H, pattern=(2, 4), solver="fast")
    print(f"fast 2:4:               {t_24:6.3f} s wall {c_24:8.3f} s cpu   ratio to floor {t_24 / floor:.2f}x")
    print(f"fast 50% predicted error {result.predicted_error:.6g}, zeros {np.mean(result.weight == 0):.4f}")


def bench_exact(rng, cols: int) -> None:
    samples = 2 * cols
    print(f"== exact mode: {cols}x{cols} layer, {samples} calibration vectors")
    X = correlated_inputs(rng, samples, cols).astype(np.float64)
    W = rng.standard_normal((cols, cols)) * np.exp(0.5 * rng.standard_normal((cols, 1)))
    H = 2.0 / samples * X.T @ X
    result, t_exact, c_exact = timed(prune_layer, W, H, sparsity=0.5, solver="exact")
    print(f"exact 50% (global allocation): {t_exact:8.3f} s wall {c_exact:8.3f} s cpu   (target < 20 s)")
    Hd = H + 0.01 * H.diagonal().mean() * np.eye(cols)
    row_alloc = timed(obc_prune, W, np.linalg.inv(Hd), W == 0, n_zeros=W.size // 2, allocation="row")
    (w_row, _, _), t_row, c_row = row_alloc
    print(f"exact 50% (row allocation):    {t_row:8.3f} s wall {c_row:8.3f} s cpu")
    errors = {
        "exact global": layer_error(W, result.weight, H),
        "exact row": layer_error(W, w_row, H),
        "fast": layer_error(W, prune_layer(W, H, solver="fast").weight, H),
    }
    for method in ("obd", "wanda", "magnitude"):
        errors[method] = layer_error(W, prune_layer(W, H, method=method).weight, H)
    base = errors["exact global"]
    summary = ", ".join(f"{k} {v:.4g} ({v / base:.2f})" for k, v in errors.items())
    print(f"layer error (x exact global): {summary}")


def bench_auto(rng) -> None:
    print("== exact, fast and auto, 50% (auto: exact within EXACT_MAX_WORK, else fast + refit)")
    shapes = ((128, 128), (256, 256), (64, 576), (128, 512), (384, 384), (512, 512), (1024, 1024), (256, 2304))
    for rows, cols in shapes:
        X = correlated_inputs(rng, 2 * cols, cols).astype(np.float64)
        W = rng.standard_normal((rows, cols))
        H = 2.0 / len(X) * X.T @ X
        solvers = ("exact", "fast", "auto") if rows * cols**3 <= 2**36 else ("fast", "auto")
        runs = {s: timed(prune_layer, W, H, solver=s) for s in solvers}
        base = layer_error(W, runs[solvers[0]][0].weight, H)
        summary = "   ".join(f"{s} {t:6.3f} s error {layer_error(W, r.weight, H) / base:.2f}"
                             for s, (r, t, _) in runs.items())
        print(f"{rows:4d}x{cols:<4d} work 2^{np.log2(rows * cols**3):4.1f}: {summary} "
              f"(auto: {runs['auto'][0].solver}; errors relative to {solvers[0]})")


def refitted(W: np.ndarray, H: np.ndarray):
    """What solver="auto" gives a layer beyond the exact budget: fast, then the refit."""
    saved, layerwise.EXACT_MAX_WORK = layerwise.EXACT_MAX_WORK, -1
    try:
        return prune_layer(W, H, solver="auto")
    finally:
        layerwise.EXACT_MAX_WORK = saved


def bench_sample_layers() -> None:
    """Layer errors of every method on the layers of the repository's samples, with Hessians
    captured through onnxruntime from their calibration data (real activations)."""
    print("== real layers: samples/digits_*.onnx, 50%, layer error relative to exact")
    samples = Path(__file__).resolve().parent.parent / "samples"
    for name in ("digits_mlp", "digits_cnn"):
        loaded = load_any(samples / f"{name}.onnx")
        sites, _ = find_sites(loaded.model)
        cal = load_calibration(samples / f"{name}_calib.npz", loaded.model)
        with Progress(False) as bar:
            hessians = capture_hessians(loaded, sites, cal, "cpu", bar)
        for site in sites:
            W, H = site_matrix(site), hessians[site.name][0]
            runs = {s: {"solver": s} for s in ("exact", "fast")}
            runs |= {m: {"method": m} for m in ("obd", "wanda", "magnitude")}
            errors = {k: layer_error(W, prune_layer(W, H, **kw).weight, H) for k, kw in runs.items()}
            errors["fast+refit"] = layer_error(W, refitted(W, H).weight, H)
            summary = ", ".join(f"{k} {v / errors['exact']:.2f}" for k, v in errors.items() if k != "exact")
            print(f"{name} {site.name} {W.shape[0]}x{W.shape[1]}: {summary}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test in seconds")
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--exact-cols", type=int, default=512)
    parser.add_argument("--auto", action="store_true", help="also time exact vs fast over layer sizes")
    parser.add_argument("--threads", type=int, help="limit BLAS to this many threads for the whole run")
    args = parser.parse_args()
    if args.threads:
        ThreadpoolController().limit(limits=args.threads, user_api="blas")
    if args.quick:
        args.cols, args.samples, args.exact_cols = 512, 1024, 96
    rng = np.random.default_rng(0)
    blas = [f"{i['internal_api']} {i['num_threads']} threads" for i in threadpool_info() if i["user_api"] == "blas"]
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"machine: {os.cpu_count()} CPUs, load average {load}; BLAS: {', '.join(blas)}")
    bench_fast(rng, args.cols, args.samples)
    bench_exact(rng, args.exact_cols)
    if args.auto:
        bench_auto(rng)
        bench_sample_layers()
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory (max RSS): {peak_mib:.0f} MiB")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
