"""Layer-wise Hessian sums with float32 vs float64 products (hessian/layerwise.HessianSum).

Prints, in one run:
- accuracy: the relative Frobenius error ||H32 - H64|| / ||H64|| and the largest entry error
  relative to max |H64| of float32 products against float64 ones, on the real activations of the
  repository's digits samples (every site) and on a random 3x3 convolution layer's patches;
- speed: seconds of HessianSum.add float64 vs float32 on realistic shapes (unfolded 3x3 conv
  patches of 64, 128, 256 channels, Gemm inputs of 512 and 1024 features), the same data, the
  same threads, and their ratio;
- end to end: `api.prune` of the digits MLP and CNN (50%, defaults) with --hessian-precision
  float64 and float32, alternating: seconds (and the report's `hessians` phase), the output MSE against the dense model on the eval data, its
  relative change, and the largest difference of the pruned weights.

Usage: python scripts/bench_hessian.py [--rows 100000] [--repeat 3] [--threads N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from onnx_obs import api, threads
from onnx_obs.calib import load_calibration
from onnx_obs.graph.model_io import load_any
from onnx_obs.graph.ops import ConvGeometry
from onnx_obs.graph.sites import find_sites
from onnx_obs.hessian.capture import capture_hessians
from onnx_obs.hessian.layerwise import HessianSum, input_vectors
from onnx_obs.progress import Progress

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
MAX_BYTES = 1 << 29  # a timed array's float32 size: rows are cut to keep it under 512 MB


def _errors(h32: np.ndarray, h64: np.ndarray) -> tuple[float, float]:
    d = h32 - h64
    return float(np.linalg.norm(d) / np.linalg.norm(h64)), float(np.abs(d).max() / np.abs(h64).max())


def _sum(vectors: np.ndarray, precision: str) -> np.ndarray:
    h = HessianSum(vectors.shape[0], vectors.shape[2], precision)
    h.add(vectors)
    return h.hessian()


def accuracy() -> None:
    print("accuracy of float32 products (relative Frobenius error, max entry error / max |H|):")
    for name in ("mlp", "cnn"):
        loaded = load_any(str(SAMPLES / f"digits_{name}.onnx"))
        sites, _ = find_sites(loaded.model)
        cal = load_calibration(str(SAMPLES / f"digits_{name}_calib.npz"), loaded.model, batch_size=128)
        hs = {}
        for precision in ("float64", "float32"):
            with Progress(enabled=False) as bar:
                hs[precision] = capture_hessians(loaded, sites, cal, "cpu", bar, precision=precision)
        for s in sites:
            fro, entry = _errors(hs["float32"][s.name], hs["float64"][s.name])
            print(f"  digits_{name} {s.name:24s} {hs['float64'][s.name].shape[-1]:5d} cols  "
                  f"{fro:.2e}  {entry:.2e}")
    rng = np.random.default_rng(0)
    x = np.maximum(rng.standard_normal((64, 64, 16, 16)), 0).astype(np.float32)  # post-ReLU
    g = ConvGeometry(kernel=(3, 3), strides=(1, 1), dilations=(1, 1), pads=(1, 1, 1, 1))
    v = np.concatenate(list(input_vectors(x, "conv", 64 * 9, g)), axis=1)
    fro, entry = _errors(_sum(v, "float32"), _sum(v, "float64"))
    print(f"  random conv 64ch 3x3, {v.shape[1]} rows x {v.shape[2]} cols  {fro:.2e}  {entry:.2e}")


def speed(rows: int, repeat: int) -> None:
    print(f"speed of HessianSum.add on {threads.current_threads()} thread(s) (best of {repeat}):")
    rng = np.random.default_rng(1)
    for label, cols in (("conv 64x3x3", 576), ("conv 128x3x3", 1152), ("conv 256x3x3", 2304),
                        ("gemm 512", 512), ("gemm 1024", 1024)):
        n = min(rows, MAX_BYTES // (4 * cols))
        v = np.maximum(rng.standard_normal((1, n, cols), dtype=np.float32), 0)
        secs, hs = {}, {}
        for precision in ("float64", "float32"):
            best = np.inf
            for _ in range(repeat):
                t = time.perf_counter()
                hs[precision] = _sum(v, precision)
                best = min(best, time.perf_counter() - t)
            secs[precision] = best
        fro, _ = _errors(hs["float32"], hs["float64"])
        print(f"  {label:13s} {n:7d} rows x {cols:4d} cols  float64 {secs['float64']:7.3f} s  "
              f"float32 {secs['float32']:7.3f} s  ratio {secs['float64'] / secs['float32']:5.2f}x  "
              f"rel err {fro:.1e}")


def _outputs(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0].astype(np.float64)


def end_to_end(repeat: int) -> None:
    print(f"end to end, api.prune 50% (defaults), best of {repeat} alternating runs; output MSE "
          "against the dense model on eval data:")
    for name in ("mlp", "cnn"):
        path = SAMPLES / f"digits_{name}.onnx"
        data = np.load(SAMPLES / f"digits_{name}_eval.npz")
        dense = onnx.load(str(path))
        feeds = {i.name: data[i.name] for i in dense.graph.input if i.name in data}
        ref = _outputs(dense, feeds)
        res, secs, sums = {}, {"float64": np.inf, "float32": np.inf}, {"float64": np.inf, "float32": np.inf}
        for _ in range(repeat):
            for precision in ("float64", "float32"):
                t = time.perf_counter()
                pruned, report = api.prune(str(path), str(SAMPLES / f"digits_{name}_calib.npz"), sparsity=0.5,
                                           hessian_precision=precision)
                secs[precision] = min(secs[precision], time.perf_counter() - t)
                sums[precision] = min(sums[precision], report.phases.get("hessians", 0.0))
                weights = {w.name: numpy_helper.to_array(w) for w in pruned.graph.initializer}
                res[precision] = (float(np.mean((_outputs(pruned, feeds) - ref) ** 2)), weights)
        (m64, w64), (m32, w32) = res["float64"], res["float32"]
        (s64, s32), (h64, h32) = (secs["float64"], secs["float32"]), (sums["float64"], sums["float32"])
        dw = max(float(np.abs(w32[k].astype(np.float64) - w64[k]).max()) for k in w64 if w64[k].dtype.kind == "f")
        changed = sum(int(np.sum((w32[k] != 0) != (w64[k] != 0))) for k in w64 if w64[k].dtype.kind == "f")
        print(f"  digits_{name}: float64 {s64:.2f} s (hessians {h64:.3f} s) MSE {m64:.6e} | float32 {s32:.2f} s "
              f"(hessians {h32:.3f} s) MSE {m32:.6e} | relative MSE change {abs(m32 - m64) / m64:.1e}, max |dW| {dw:.1e}, mask entries differing {changed}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="0: the free cores")
    args = ap.parse_args()
    with threads.run_threads(args.threads):
        accuracy()
        speed(args.rows, args.repeat)
        end_to_end(args.repeat)


if __name__ == "__main__":
    main()
