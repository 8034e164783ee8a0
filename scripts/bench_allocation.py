#!/usr/bin/env python
"""Uniform vs auto sparsity allocation (--allocation) at the same overall sparsity.

Models: the two samples (digits MLP and CNN) and three exported here with torch (CPU, seeded):
a wider MLP (64-256-256-10), a MobileNet-style CNN (stem conv, three blocks of depthwise 5x5 +
pointwise 1x1 conv, 32-64-128-128 channels, batch norm folded by the exporter, global average
pool, classifier) and a small
transformer (16 tokens of 2x2 pixels, two pre-norm blocks of 4-head attention and a 64-128-64
MLP). The digits calibration file has no labels, so the exported models are distilled from the
sample CNN (99.3% accurate) on shifted, rescaled and noisy copies of the 256 calibration images;
their accuracy on the held-out split is printed.

Each model is pruned with layer-wise OBS (the default method and solver, sequential capture) at
every sparsity, with --allocation uniform and auto, and scored on the held-out eval split
(450 images never used for calibration or training): relative output MSE, top-1 agreement with
the original, accuracy, and the run time of both, wall and CPU (the process's, all threads), with
auto/uniform ratios, and the allocation step's own seconds.

    python scripts/bench_allocation.py                       # all models, 50/70/80%
    python scripts/bench_allocation.py --models mobilenet --sparsities 0.5 --json out.json

torch is used by this script only (never by onnx_obs); exported models are cached in --workdir.
"""

from __future__ import annotations

import argparse
import io
import json
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnx_obs import api
from onnx_obs.evaluate import evaluate

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
MODELS = ("sample_mlp", "sample_cnn", "mlp", "mobilenet", "transformer")
SEED = 0
# Distillation per exported model: augmented images, Adam steps, batch size (small: 2 shared cores).
TRAINING = {"mlp": (16384, 1500, 128), "mobilenet": (8192, 400, 64), "transformer": (8192, 400, 64)}


def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(calibration images [256,1,8,8], eval images [450,1,8,8], eval labels)."""
    calib = np.load(SAMPLES / "digits_cnn_calib.npz")["input"]
    ev = np.load(SAMPLES / "digits_cnn_eval.npz")
    return calib, ev["input"], ev["label"]


def augmented(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n copies of random images of x, shifted by up to one pixel, rescaled and with noise."""
    out = x[rng.integers(0, len(x), n)].copy()
    for i in range(n):
        dy, dx = rng.integers(-1, 2, 2)
        out[i, 0] = np.roll(out[i, 0], (dy, dx), axis=(0, 1))
        if dy:
            out[i, 0, 0 if dy > 0 else -1, :] = 0
        if dx:
            out[i, 0, :, 0 if dx > 0 else -1] = 0
    out *= rng.uniform(0.8, 1.2, (n, 1, 1, 1)).astype(np.float32)
    out += rng.normal(0, 0.05, out.shape).astype(np.float32)
    return np.clip(out, 0, 1.2).astype(np.float32)


def build(name: str):
    import torch
    from torch import nn

    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                             nn.Linear(256, 10))
    if name == "mobilenet":
        def block(cin, cout, stride):
            return [nn.Conv2d(cin, cin, 5, stride, 2, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU(),
                    nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        return nn.Sequential(nn.Conv2d(1, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                             *block(32, 64, 1), *block(64, 128, 2), *block(128, 128, 1),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))

    class Block(nn.Module):
        def __init__(self, d=64, heads=4, hidden=128):
            super().__init__()
            self.heads = heads
            self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
            self.ff = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, d))

        def forward(self, x):
            b, t, d = x.shape
            h = self.n1(x)
            q, k, v = (f(h).reshape(b, t, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
            a = torch.softmax(q @ k.transpose(2, 3) / (d // self.heads) ** 0.5, dim=-1)
            x = x + self.o((a @ v).transpose(1, 2).reshape(b, t, d))
            return x + self.ff(self.n2(x))

    class Transformer(nn.Module):
        def __init__(self, d=64):
            super().__init__()
            self.embed = nn.Linear(4, d)
            self.pos = nn.Parameter(torch.randn(1, 16, d) * 0.1)
            self.blocks = nn.Sequential(Block(d), Block(d))
            self.norm = nn.LayerNorm(d)
            self.head = nn.Linear(d, 10)

        def forward(self, x):  # [b, 1, 8, 8] -> 16 tokens of 2x2 pixels
            b = x.shape[0]
            t = x.reshape(b, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(b, 16, 4)
            h = self.blocks(self.embed(t) + self.pos)
            return self.head(self.norm(h).mean(dim=1))

    return Transformer()


def export(name: str, workdir: Path) -> Path:
    """Distil `name` from the sample CNN and export it (cached)."""
    path = workdir / f"{name}.onnx"
    if path.exists():
        return path
    import torch
    import torch.nn.functional as F

    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    rng = np.random.default_rng(SEED)
    calib, _, _ = digits()
    images, steps, batch = TRAINING[name]
    x = augmented(calib, images, rng)
    teacher = ort.InferenceSession(str(SAMPLES / "digits_cnn.onnx"), providers=["CPUExecutionProvider"])
    soft = np.concatenate([teacher.run(None, {"input": x[i:i + 1024]})[0] for i in range(0, len(x), 1024)])
    model = build(name)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    xt, st = torch.from_numpy(x), torch.from_numpy(soft).softmax(-1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(steps):
        idx = torch.from_numpy(rng.integers(0, len(x), batch))
        loss = F.kl_div(model(xt[idx]).log_softmax(-1), st[idx], reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.from_numpy(calib[:2]), buf, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          dynamo=False)
    path.write_bytes(buf.getvalue())
    return path


def model_files(name: str, workdir: Path) -> tuple[Path, Path, Path]:
    """(model, calibration npz, eval npz) for a model of MODELS."""
    if name.startswith("sample_"):
        kind = name.split("_")[1]
        return (SAMPLES / f"digits_{kind}.onnx", SAMPLES / f"digits_{kind}_calib.npz",
                SAMPLES / f"digits_{kind}_eval.npz")
    calib, ev, labels = digits()  # every exported model takes the [batch, 1, 8, 8] images
    cpath, epath = workdir / "digits_calib.npz", workdir / "digits_eval.npz"
    if not cpath.exists():
        np.savez(cpath, input=calib)
        np.savez(epath, input=ev, label=labels)
    return export(name, workdir), cpath, epath


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--sparsities", default="0.5,0.7,0.8")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/onnx-obs-bench-allocation"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"{'model':<12} {'sparsity':>8} {'alloc':>8} {'reached':>8} {'rel. MSE':>10} {'top-1 agr.':>10} "
          f"{'accuracy':>8} {'run s':>7} {'cpu s':>7} {'alloc s':>7}")
    for name in args.models.split(","):
        model, calib, ev = model_files(name, args.workdir)
        for sparsity in (float(s) for s in args.sparsities.split(",")):
            for allocation in ("uniform", "auto"):
                out = args.workdir / f"{name}_{sparsity}_{allocation}.onnx"
                t0, c0 = time.perf_counter(), time.process_time()
                result = api.prune(str(model), str(calib), sparsity=sparsity, allocation=allocation,
                                   output=out, force=True)
                seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
                score = evaluate(str(model), str(out), str(ev), repeats=0).to_dict()
                o = score["outputs"]["logits"]
                report = result.report.to_dict()
                row = dict(model=name, sparsity=sparsity, allocation=allocation,
                           reached=report["totals"]["sparsity"], relative_mse=o["relative_mse"],
                           top1_agreement=o["top1_agreement"], accuracy=score["pruned"]["accuracy"],
                           original_accuracy=score["original"]["accuracy"], seconds=seconds, cpu_seconds=cpu,
                           allocation_seconds=report.get("allocation", {}).get("seconds", 0.0),
                           levels={s["name"]: round(s["sparsity"], 4) for s in report["sites"]})
                rows.append(row)
                print(f"{name:<12} {sparsity:>8.0%} {allocation:>8} {row['reached']:>8.2%} "
                      f"{row['relative_mse']:>10.4g} {row['top1_agreement']:>10.2%} {row['accuracy']:>8.2%} "
                      f"{seconds:>7.1f} {cpu:>7.1f} {row['allocation_seconds']:>7.1f}", flush=True)
            u, a = rows[-2], rows[-1]
            print(f"{'':<12} {'':>8} {'auto/uni':>8} {'':>8} {a['relative_mse'] / max(u['relative_mse'], 1e-30):>10.3f} "
                  f"{a['top1_agreement'] - u['top1_agreement']:>+10.2%} {'':>8} {a['seconds'] / u['seconds']:>7.2f} "
                  f"{a['cpu_seconds'] / u['cpu_seconds']:>7.2f}")
        print(f"{name}: original accuracy {rows[-1]['original_accuracy']:.2%}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
