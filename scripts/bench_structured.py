"""Structured OBS vs unstructured OBS vs L1 channel pruning on the digits samples.

For each sample: the original model; structured OBS with half of every prunable layer's units
removed (--structure neurons --sparsity 0.5); unstructured layer-wise OBS at the same number of
non-zero parameters (uniform per-site sparsity, dense and --storage auto files, and with the first
layer left dense, the others sparser, same count); and L1-norm
channel pruning (the same shapes as structured OBS, no correction). Printed per model: parameters
(non-zero), MACs per sample, file size, onnxruntime CPU latency (median of repeated runs, batch
1 and 32; each round times every model once, models interleaved; the median over rounds is
shown with the min-max range), speed-up over the original, top-1 agreement with the original
and accuracy on the held-out eval split.

    python scripts/bench_structured.py                 # both samples, 3 rounds, 1 thread
    python scripts/bench_structured.py --sample cnn --rounds 5 --threads 2

With --arch mobilenet|resnet|c2f (both: the first two): a MobileNet-style CNN (inverted
residuals, depthwise convs, SE gates, residual Adds), a ResNet-18-style CNN or a YOLOv8-style C2f
backbone is trained for seconds on synthetic data
and exported with torch (scripts/torch_models.py); with --arch bert|bert-mha a 2-layer BERT-like
encoder (8 heads, FFN 256; hand-written attention, or nn.MultiheadAttention whose packed export
keeps its heads: only FFN neurons go) on a synthetic sequence task (scripts/torch_bert.py).
Each is pruned by coupled channel groups (attention heads, FFN neurons) with
--target-speedup 1.3 / 1.5 / 2 (MACs; --latency measured|both: the measured latency table,
"lat" rows), structured OBS against the L1-group baseline
(--method magnitude): measured speed-up at batch 1 and 32, params, file size, top-1 agreement and
relative output MSE against the original on 512 held-out samples.

--width W multiplies the CNNs' channel counts (2: less bound by per-node overhead at batch 1);
--size S enlarges the inputs (the same task; training slows down a lot on CPU).

    python scripts/bench_structured.py --arch both --rounds 3 --calib-samples 1024 --train-steps 600
    python scripts/bench_structured.py --arch mobilenet --width 2 --train-steps 600 --speedups 1.5,2
    python scripts/bench_structured.py --arch bert --train-steps 300 --calib-samples 256
    python scripts/bench_structured.py --arch resnet --speedups 1.5 --latency both
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnx_obs import api
from onnx_obs.flops import batch_feeds, count_macs, count_params, latency_ms

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
sys.path.insert(0, str(Path(__file__).resolve().parent))   # scripts/torch_models.py


def session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def build(sample: str, out: Path) -> dict[str, Path]:
    model, calib = SAMPLES / f"digits_{sample}.onnx", SAMPLES / f"digits_{sample}_calib.npz"
    paths = {"original": model}
    paths["structured OBS"] = out / "structured_obs.onnx"
    s = api.prune(str(model), str(calib), structure="neurons", sparsity=0.5,
                  output=paths["structured OBS"])
    kept = s.report.costs["params"]["after"]
    total = s.report.costs["params"]["before"]
    info = api.inspect(str(model))
    site_params = info.site_params
    sparsity = (total - kept) / site_params     # uniform per site: same non-zero count in all
    for storage in ("dense", "auto"):
        name = "unstructured OBS" + (" (sparse file)" if storage == "auto" else "")
        paths[name] = out / f"unstructured_{storage}.onnx"
        api.prune(str(model), str(calib), method="obs", sparsity=sparsity, storage=storage,
                  output=paths[name])
    # Uniform sparsity is hard on a first layer with few inputs per unit (9 taps for the CNN):
    # also compare sparing the first site, the others sparser to keep the same non-zero count.
    first = info.sites[0]
    spared = (total - kept) / (site_params - first.params)
    if spared < 1:   # impossible when the first layer holds most weights (the MLP)
        paths["unstructured OBS, 1st layer kept"] = out / "unstructured_first_kept.onnx"
        api.prune(str(model), str(calib), method="obs", sparsity=spared,
                  selection=api.Selection(exclude=f"^{re.escape(first.name)}$"),
                  output=paths["unstructured OBS, 1st layer kept"])
    paths["L1 channels"] = out / "l1_channels.onnx"
    api.prune(str(model), str(calib), method="magnitude", structure="neurons", sparsity=0.5,
              output=paths["L1 channels"])
    print(f"\n== {sample}: half the units of every prunable layer removed; unstructured OBS at "
          f"{sparsity:.1%} per-site sparsity has the same non-zero parameter count ==")
    for e in s.report.structure:
        print(f"   {e['name']:<16} {e['op']:<5} {e['units_before']:>4} -> {e['units_after']:<4} "
              f"relative error of its consumers {e['relative_error']:.4f}")
    for k in s.report.skipped:
        print(f"   left alone: {k['name']} ({k['reason']})")
    return paths


def quality(path: Path, reference: np.ndarray, data: dict) -> tuple[float, float]:
    logits = session(path, 1).run(None, {"input": data["input"]})[0]
    return float(np.mean(logits.argmax(1) == reference)), float(np.mean(logits.argmax(1) == data["label"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", choices=["cnn", "mlp", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--arch", choices=["mobilenet", "resnet", "c2f", "bert", "bert-mha", "both"],
                        default=None, help="the torch-exported models with coupled channels "
                        "(CNNs, BERT-like encoders) instead of the samples")
    parser.add_argument("--train-steps", type=int, default=150)
    parser.add_argument("--width", type=float, default=1.0, help="--arch mobilenet|resnet: channel "
                        "multiplier (2: a model with 2-4x the MACs per layer, less overhead-bound)")
    parser.add_argument("--size", type=int, default=16, help="--arch mobilenet|resnet|c2f: input "
                        "side in pixels (a multiple of 16: the same task, enlarged; slow to train)")
    parser.add_argument("--calib-samples", type=int, default=256)
    parser.add_argument("--speedups", default="1.3,1.5,2", help="--arch: the --target-speedup values")
    parser.add_argument("--latency", choices=["macs", "measured", "both"], default="macs",
                        help="--arch: what --target-speedup divides (both: one model per kind)")
    args = parser.parse_args()
    if args.arch:
        for arch in (["mobilenet", "resnet"] if args.arch == "both" else [args.arch]):
            with tempfile.TemporaryDirectory() as tmp:
                run_arch(arch, Path(tmp), args)
        return
    print(f"onnxruntime {ort.__version__} CPU, intra_op_num_threads={args.threads}, {args.rounds} "
          "rounds; latency = median ms of up to 300 runs per round (shared machine: other jobs "
          "may run at the same time, hence the rounds and the ranges)")
    for sample in (["cnn", "mlp"] if args.sample == "both" else [args.sample]):
        with tempfile.TemporaryDirectory() as tmp:
            run_sample(sample, Path(tmp), args)


def run_sample(sample: str, tmp: Path, args) -> None:
    paths = build(sample, tmp)
    data = dict(np.load(SAMPLES / f"digits_{sample}_eval.npz"))
    calib = [dict(np.load(SAMPLES / f"digits_{sample}_calib.npz"))]
    reference = session(paths["original"], 1).run(None, {"input": data["input"]})[0].argmax(1)
    sessions = {k: session(p, args.threads) for k, p in paths.items()}
    times = {(k, b): [] for k in paths for b in (1, 32)}
    for _ in range(args.rounds):
        for b in (1, 32):
            feeds = batch_feeds(calib, b)
            for k, sess in sessions.items():
                times[k, b].append(latency_ms(sess, feeds, max_runs=300, budget_s=1.0))
    base = {b: np.median(times["original", b]) for b in (1, 32)}
    print(f"{'model':<34}{'params':>9}{'non-zero':>10}{'MACs':>11}{'file':>10}"
          f"{'ms b=1':>22}{'x':>6}{'ms b=32':>22}{'x':>6}{'agree':>8}{'acc':>8}")
    for k, p in paths.items():
        m = onnx.load(str(p))
        params = count_params(m)
        macs = count_macs(m)[0]
        agree, acc = quality(p, reference, data)
        cols = []
        for b in (1, 32):
            t = times[k, b]
            cols.append(f"{np.median(t):8.4f} [{min(t):.4f}-{max(t):.4f}]{base[b] / np.median(t):6.2f}")
        print(f"{k:<34}{params['params']:>9,}{params['nonzero_params']:>10,}{macs:>11,}"
              f"{p.stat().st_size / 1024:>8.1f}KB{cols[0]:>28}{cols[1]:>28}{agree:>8.2%}{acc:>8.2%}")


def run_arch(arch: str, tmp: Path, args) -> None:
    if arch.startswith("bert"):   # torch only here
        from torch_bert import data, train_and_export
    else:
        from torch_models import data, train_and_export

    original = tmp / "original.onnx"
    if arch.startswith("bert"):
        acc = train_and_export(arch, original, steps=args.train_steps)
    else:
        acc = train_and_export(arch, original, steps=args.train_steps, size=args.size, width=args.width)
        data = partial(data, size=args.size)
    x_cal, _ = data(args.calib_samples, 7)
    calib = tmp / "calib.npz"
    np.savez(calib, input=x_cal)
    x_eval, y_eval = data(512, 999)
    paths, seconds, widths = {"original": original}, {}, {}
    kinds = ["macs", "measured"] if args.latency == "both" else [args.latency]
    for speedup in [float(v) for v in args.speedups.split(",")]:
        for (method, label), kind in [(m, k) for m in (("obs", "OBS"), ("magnitude", "L1 group"))
                                      for k in kinds]:
            key = f"{speedup}x {label}" + (" lat" if kind == "measured" else "")
            paths[key] = tmp / f"{method}_{speedup}_{kind}.onnx"
            t0 = time.perf_counter()
            # threads as timed below: the measured latency table must see the same kernels
            result = api.prune(str(original), str(calib), structure="channels", method=method,
                               target_speedup=speedup, latency=kind, threads=args.threads,
                               output=paths[key])
            seconds[key] = time.perf_counter() - t0
            for note in result.report.notes:
                if note.startswith("latency"):
                    print(f"  {key}: {note}")
            widths[key] = " ".join(f"{e['units_before']}->{e['units_after']}"
                                   for e in result.report.structure)
    ref = session(original, 1).run(None, {"input": x_eval})[0]
    sessions = {k: session(p, args.threads) for k, p in paths.items()}
    times = {(k, b): [] for k in paths for b in (1, 32)}
    for _ in range(args.rounds):
        for b in (1, 32):
            feeds = {"input": x_cal[:b]}
            for k, sess in sessions.items():
                times[k, b].append(latency_ms(sess, feeds, max_runs=300, budget_s=1.0))
    base = {b: np.median(times["original", b]) for b in (1, 32)}
    print(f"\n== {arch} (width x{args.width:g}, {args.size} px): trained {args.train_steps} steps, "
          f"held-out accuracy {acc:.2%}; "
          f"{args.calib_samples} calibration samples; "
          f"{args.threads} thread(s), {args.rounds} rounds ==")
    print(f"{'model':<20}{'params':>9}{'MACs':>12}{'file':>10}{'ms b=1':>9}{'x':>6}{'ms b=32':>9}"
          f"{'x':>6}{'agree':>8}{'acc':>8}{'rel MSE':>10}{'prune s':>9}")
    for k, p in paths.items():
        m = onnx.load(str(p))
        out = sessions[k].run(None, {"input": x_eval})[0]
        mse = float(np.mean((out - ref) ** 2) / np.mean(ref ** 2))
        agree = float(np.mean(out.argmax(1) == ref.argmax(1)))
        accuracy = float(np.mean(out.argmax(1) == y_eval))
        t1, t32 = np.median(times[k, 1]), np.median(times[k, 32])
        print(f"{k:<20}{count_params(m)['params']:>9,}{count_macs(m)[0]:>12,}"
              f"{p.stat().st_size / 1024:>8.1f}KB{t1:>9.4f}{base[1] / t1:>6.2f}{t32:>9.3f}"
              f"{base[32] / t32:>6.2f}{agree:>8.2%}{accuracy:>8.2%}{mse:>10.4f}"
              f"{seconds.get(k, 0.0):>9.1f}")
    print("units per group (graph order: heads of attention and FFN neurons per layer for bert):")
    for k, w in widths.items():
        print(f"  {k:<20}{w}")


if __name__ == "__main__":
    main()
