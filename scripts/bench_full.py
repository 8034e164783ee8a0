"""Speed and memory of full-network OBS: blocked Eq. 17 inverse and global surgery.

Derivative vectors are the analytic per-sample gradients of a random 2-layer tanh network
f(x) = v . tanh(W x + b) on correlated Gaussian inputs, so H = (1/P) sum X X^T has a realistic
spectrum (rank <= P, strongly correlated weights).

    python scripts/bench_full.py          # 10,000 weights, 2,000 samples (about a minute on 2 cores)
    python scripts/bench_full.py --quick  # seconds-long smoke run

The end-to-end section then prunes ONNX models through api.prune(hessian="full"): the digits MLP
sample and a CNN of 9,736 weights (Conv, MaxPool, Gemm) built with onnx.helper, and prints the
seconds spent on gradients, the inverse and the surgery.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_obs import api
from onnx_obs.hessian.inverse import inverse_hessian
from onnx_obs.algorithms.surgery import obs_surgery

ALPHA = 1e-4  # the paper's range is 1e-8 <= alpha <= 1e-4
SAMPLES = Path(__file__).resolve().parent.parent / "samples"


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
    bench_pipeline(args.quick)


def small_cnn(seed: int = 0) -> onnx.ModelProto:
    """[N, 1, 8, 8] -> Conv 1->8 3x3 -> Relu -> MaxPool 2 -> Conv 8->16 3x3 -> Relu -> Flatten ->
    Gemm 256->32 -> Relu -> Gemm 32->10: 9,736 weights (He-initialised, untrained)."""
    rng = np.random.default_rng(seed)
    shapes = {"c1.w": (8, 1, 3, 3), "c1.b": (8,), "c2.w": (16, 8, 3, 3), "c2.b": (16,),
              "f1.w": (32, 256), "f1.b": (32,), "f2.w": (10, 32), "f2.b": (10,)}
    inits = [numpy_helper.from_array((rng.normal(size=s) * np.sqrt(2 / np.prod(s[1:])) if len(s) > 1
                                      else np.zeros(s)).astype(np.float32), k) for k, s in shapes.items()]
    node = helper.make_node
    nodes = [node("Conv", ["input", "c1.w", "c1.b"], ["c1"], pads=[1, 1, 1, 1]), node("Relu", ["c1"], ["r1"]),
             node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
             node("Conv", ["p1", "c2.w", "c2.b"], ["c2"], pads=[1, 1, 1, 1]), node("Relu", ["c2"], ["r2"]),
             node("Flatten", ["r2"], ["f"]), node("Gemm", ["f", "f1.w", "f1.b"], ["g1"], transB=1),
             node("Relu", ["g1"], ["r3"]), node("Gemm", ["r3", "f2.w", "f2.b"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "small_cnn", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def bench_pipeline(quick: bool) -> None:
    """api.prune(hessian="full") end to end on ONNX models."""
    samples = 64 if quick else None
    cases = [("digits MLP", str(SAMPLES / "digits_mlp.onnx"), str(SAMPLES / "digits_mlp_calib.npz")),
             ("9,736-weight CNN", small_cnn(), str(SAMPLES / "digits_cnn_calib.npz"))]
    for name, model, calib in cases:
        t0 = time.perf_counter()
        res = api.prune(model, calib, hessian="full", sparsity=0.5, max_samples=samples, device="cpu",
                        full=api.FullOptions(step=16))
        fn, wall = res.report.full_network, time.perf_counter() - t0
        sec = fn["seconds"]
        print(f"pipeline {name}: n={fn['weights']} P={fn['samples']} x {fn['vectors_per_sample']} vectors, "
              f"gradients ({fn['gradients']}) {sec['gradients']:.1f} s | inverse {sec['inverse']:.1f} s | "
              f"surgery (step 16) {sec['surgery']:.1f} s | total {wall:.1f} s | "
              f"predicted / measured error increase {fn['predicted_error_increase']:.3g} / "
              f"{fn['measured_error_increase']:.3g}")


if __name__ == "__main__":
    main()
