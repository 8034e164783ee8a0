"""Structured OBS on a small ViT (scripts/torch_vit.py: patch Conv, 2 post-LayerNorm layers of 8
heads and 512 FFN neurons) by attention heads and FFN neurons, against the L1-group baseline
(--method magnitude): --target-speedup S by MACs and by the measured latency table
(--latency measured), then on 512 held-out images: speed-up at batch 1 and 32 (onnxruntime,
median over rounds of the median of repeated runs, models interleaved), params, top-1 agreement
and relative output MSE against the original. torch is needed for training and export only.

    python scripts/bench_vit.py --speedups 1.3 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_structured import session
from torch_models import data
from torch_vit import train_and_export

from onnx_obs import api
from onnx_obs.flops import count_params, latency_ms


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--speedups", default="1.3")
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--calib-samples", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    original = tmp / "original.onnx"
    acc = train_and_export(original, steps=a.train_steps)
    x_cal, _ = data(a.calib_samples, 7)
    np.savez(tmp / "calib.npz", input=x_cal)
    x_eval, y_eval = data(512, 999)
    paths, heads = {"original": original}, {}
    for speedup in [float(v) for v in a.speedups.split(",")]:
        for method, label in (("obs", "OBS"), ("magnitude", "L1 group")):
            for kind in ("macs", "measured"):
                key = f"{speedup}x {label} {kind}"
                paths[key] = tmp / f"{method}_{speedup}_{kind}.onnx"
                t = time.perf_counter()
                r = api.prune(str(original), str(tmp / "calib.npz"), structure="channels",
                              method=method, target_speedup=speedup, latency=kind,
                              threads=a.threads, output=paths[key])
                notes = [n for n in r.report.notes if n.startswith("latency")]
                print(f"  {key}: {time.perf_counter() - t:.1f} s; {'; '.join(notes)}")
                heads[key] = " ".join(f"{e['units_before']}->{e['units_after']}"
                                      for e in r.report.structure)
    sessions = {k: session(p, a.threads) for k, p in paths.items()}
    times = {(k, b): [] for k in paths for b in (1, 32)}
    for _ in range(a.rounds):
        for b in (1, 32):
            for k, s in sessions.items():
                times[k, b].append(latency_ms(s, {"input": x_cal[:b]}, max_runs=300, budget_s=1.0))
    ref = sessions["original"].run(None, {"input": x_eval})[0]
    base = {b: np.median(times["original", b]) for b in (1, 32)}
    print(f"\n== ViT: trained {a.train_steps} steps, held-out accuracy {acc:.2%}; {a.threads} "
          f"thread(s), {a.rounds} rounds; load {os.getloadavg()[0]:.2f} ==")
    print(f"{'model':<28}{'params':>9}{'ms b=1':>9}{'x':>6}{'ms b=32':>9}{'x':>6}{'agree':>8}"
          f"{'acc':>8}{'rel MSE':>10}")
    for k, p in paths.items():
        out = sessions[k].run(None, {"input": x_eval})[0]
        t1, t32 = np.median(times[k, 1]), np.median(times[k, 32])
        print(f"{k:<28}{count_params(onnx.load(str(p)))['params']:>9,}{t1:>9.4f}"
              f"{base[1] / t1:>6.2f}{t32:>9.3f}{base[32] / t32:>6.2f}"
              f"{np.mean(out.argmax(1) == ref.argmax(1)):>8.2%}{np.mean(out.argmax(1) == y_eval):>8.2%}"
              f"{np.mean((out - ref) ** 2) / np.mean(ref ** 2):>10.4f}")
    print("units per group (graph order: heads, FFN neurons per layer):")
    for k, w in heads.items():
        print(f"  {k:<28}{w}")


if __name__ == "__main__":
    main()
