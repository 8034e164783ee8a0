"""Wall time of a whole prune on real-shaped models, against magnitude and one forward pass.

For each model, in the same run: one onnxruntime forward pass of the calibration data (batches
of 32, as prune feeds them), the default `onnx-obs prune` (layer-wise OBS, 50%), and
`--method magnitude` with the same data; the prune's phase breakdown (from its report: onnxruntime's time in
capture and in the allocation's sensitivity probes, each in forward passes), the CPU seconds of
both prunes (the figure least moved by other jobs) and the relative output MSE on the
calibration data. With --old DIR the default prune also runs from
that checkout (PYTHONPATH=DIR, e.g. a detached worktree of main) for before/after figures. With
--compete every run shares the machine with one CPU-bound process (a pure-Python busy loop).

Models are exported here with torch (random weights, fixed seeds, BatchNorm statistics taken
from the calibration data, then folded into Conv by the exporter): a ResNet-18 and an EfficientNet-B0-like MBConv network with SE gates at 224 px,
a YOLO-style detector (C2f blocks, SPPF, FPN neck, three heads) at 320 px, a 4-layer BERT-small,
plus the repository's samples. torch is needed by this script only.

Usage: python scripts/bench_pipeline.py [--models resnet18,effnet,yolo,bert,samples]
           [--images 64] [--old /path/to/old/checkout] [--compete] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- models (torch)

def _torch_models():
    import torch
    from torch import nn

    def cbs(cin, cout, k=3, s=1, groups=1, act=nn.SiLU):
        return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False),
                             nn.BatchNorm2d(cout), act())

    class Basic(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.body = nn.Sequential(cbs(cin, cout, 3, stride, act=nn.ReLU),
                                      nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
            self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            return torch.relu(self.body(x) + self.skip(x))

    def resnet18():
        layers, cin = [cbs(3, 64, 7, 2, act=nn.ReLU), nn.MaxPool2d(3, 2, 1)], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [Basic(cin, cout, stride), Basic(cout, cout, 1)]
            cin = cout
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 1000))

    class MBConv(nn.Module):
        def __init__(self, cin, cout, expand, k, stride):
            super().__init__()
            mid = cin * expand
            self.expand = cbs(cin, mid, 1) if expand != 1 else nn.Identity()
            self.dw = cbs(mid, mid, k, stride, groups=mid)
            squeeze = max(1, cin // 4)
            self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(mid, squeeze, 1), nn.SiLU(),
                                    nn.Conv2d(squeeze, mid, 1), nn.Sigmoid())
            self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            h = self.dw(self.expand(x))
            h = self.project(h * self.se(h))
            return x + h if self.residual else h

    def effnet():  # EfficientNet-B0's stages: (expand, channels, repeats, stride, kernel)
        layers, cin = [cbs(3, 32, 3, 2)], 32
        for e, c, n, s, k in ((1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 40, 2, 2, 5), (6, 80, 3, 2, 3),
                              (6, 112, 3, 1, 5), (6, 192, 4, 2, 5), (6, 320, 1, 1, 3)):
            for i in range(n):
                layers.append(MBConv(cin, c, e, k, s if i == 0 else 1))
                cin = c
        return nn.Sequential(*layers, cbs(cin, 1280, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(1280, 1000))

    class C2f(nn.Module):
        def __init__(self, cin, cout, n):
            super().__init__()
            self.c = cout // 2
            self.cv1 = cbs(cin, cout, 1)
            self.m = nn.ModuleList(nn.Sequential(cbs(self.c, self.c), cbs(self.c, self.c)) for _ in range(n))
            self.cv2 = cbs((2 + n) * self.c, cout, 1)

        def forward(self, x):
            y = list(self.cv1(x).chunk(2, 1))
            for m in self.m:
                y.append(y[-1] + m(y[-1]))
            return self.cv2(torch.cat(y, 1))

    class Yolo(nn.Module):
        def __init__(self, w=(16, 32, 64, 128, 256), classes=80):
            super().__init__()
            self.stem = nn.Sequential(cbs(3, w[0], 3, 2), cbs(w[0], w[1], 3, 2), C2f(w[1], w[1], 1))
            self.p3 = nn.Sequential(cbs(w[1], w[2], 3, 2), C2f(w[2], w[2], 2))
            self.p4 = nn.Sequential(cbs(w[2], w[3], 3, 2), C2f(w[3], w[3], 2))
            self.p5 = nn.Sequential(cbs(w[3], w[4], 3, 2), C2f(w[4], w[4], 1))
            self.sppf1, self.sppf2 = cbs(w[4], w[4] // 2, 1), cbs(w[4] * 2, w[4], 1)
            self.pool = nn.MaxPool2d(5, 1, 2)
            self.up = nn.Upsample(scale_factor=2, mode="nearest")
            self.n4, self.n3 = C2f(w[4] + w[3], w[3], 1), C2f(w[3] + w[2], w[2], 1)
            self.heads = nn.ModuleList(nn.Sequential(cbs(c, c), nn.Conv2d(c, 4 + classes, 1))
                                       for c in (w[2], w[3], w[4]))

        def forward(self, x):
            p3 = self.p3(self.stem(x))
            p4 = self.p4(p3)
            a = self.sppf1(self.p5(p4))
            b = self.pool(a)
            c = self.pool(b)
            p5 = self.sppf2(torch.cat([a, b, c, self.pool(c)], 1))
            n4 = self.n4(torch.cat([self.up(p5), p4], 1))
            n3 = self.n3(torch.cat([self.up(n4), p3], 1))
            return tuple(h(f) for h, f in zip(self.heads, (n3, n4, p5)))

    class Bert(nn.Module):
        def __init__(self, vocab=2000, d=256, layers=4, heads=4, seq=128):
            super().__init__()
            self.emb, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.randn(seq, d) * 0.02)
            self.heads = heads
            self.blocks = nn.ModuleList(nn.ModuleDict(dict(
                qkv=nn.Linear(d, 3 * d), out=nn.Linear(d, d), ln1=nn.LayerNorm(d),
                ff1=nn.Linear(d, 4 * d), ff2=nn.Linear(4 * d, d), ln2=nn.LayerNorm(d)))
                for _ in range(layers))
            self.cls = nn.Linear(d, 2)

        def forward(self, ids):
            x = self.emb(ids) + self.pos[: ids.shape[1]]
            b, t, d = x.shape
            for blk in self.blocks:
                q, k, v = blk["qkv"](x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
                a = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, -1) @ v
                x = blk["ln1"](x + blk["out"](a.transpose(1, 2).reshape(b, t, d)))
                x = blk["ln2"](x + blk["ff2"](nn.functional.gelu(blk["ff1"](x))))
            return self.cls(x[:, 0])

    return dict(resnet18=(resnet18, "image", 224), effnet=(effnet, "image", 224),
                yolo=(Yolo, "image", 320), bert=(Bert, "tokens", 128))


def export(name: str, workdir: Path, images: int) -> tuple[Path, Path]:
    """The model exported to workdir/name.onnx and its calibration data (.npz)."""
    import torch

    builders = _torch_models()
    build, kind, size = builders[name]
    path, calib = workdir / f"{name}.onnx", workdir / f"{name}_calib.npz"
    if path.exists() and calib.exists():
        return path, calib
    torch.manual_seed(0)
    model = build().eval()
    rng = np.random.default_rng(0)
    if kind == "image":
        n = images if name != "yolo" else max(1, images // 2)
        data = rng.standard_normal((n, 3, size, size)).astype(np.float32)
    else:
        data = rng.integers(0, 2000, (images, size)).astype(np.int64)
    example = torch.from_numpy(data[:2])
    with torch.no_grad():
        # BatchNorm statistics from the data (as after training), so that activations keep their
        # scale through the depth and the outputs depend on the inputs
        bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
        if bns:
            model.train()
            for i in range(0, len(data), 8):
                model(torch.from_numpy(data[i:i + 8]))
            model.eval()
        torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}}, opset_version=17)
    np.savez(calib, x=data)
    return path, calib


# ----------------------------------------------------------------------------- measuring

def forward_seconds(path: Path, calib: Path) -> float:
    """One onnxruntime pass of the calibration data in batches of 32 (session creation apart)."""
    code = ("import sys, time, numpy as np, onnxruntime as ort\n"
            "o = ort.SessionOptions(); o.add_session_config_entry('session.intra_op.allow_spinning', '0')\n"
            "s = ort.InferenceSession(sys.argv[1], o, providers=['CPUExecutionProvider'])\n"
            "d = np.load(sys.argv[2]); x = d[d.files[0]]; name = s.get_inputs()[0].name\n"
            "t = time.perf_counter()\n"
            "[s.run(None, {name: x[i:i + 32]}) for i in range(0, len(x), 32)]\n"
            "print(time.perf_counter() - t)\n")
    out = subprocess.run([sys.executable, "-c", code, str(path), str(calib)], capture_output=True,
                         text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def prune(path: Path, calib: Path, out: Path, pythonpath: Path, *extra: str) -> dict:
    report = out.with_suffix(".json")
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    t, cpu = time.perf_counter(), os.times()
    # -P: the working directory stays off sys.path, else `python -m` run from a checkout imports
    # that checkout's onnx_obs whatever PYTHONPATH says (--old then timed the new code)
    proc = subprocess.run([sys.executable, "-P", "-m", "onnx_obs", "prune", str(path),
                           "--calib", str(calib), "-o", str(out), "--force", "-q",
                           "--report", str(report), *extra],
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    end = os.times()  # the child's CPU seconds: the figure least moved by other jobs' load
    cpu = end.children_user + end.children_system - cpu.children_user - cpu.children_system
    if proc.returncode != 0:
        return {"wall": wall, "cpu": cpu, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    r = json.loads(report.read_text())
    tot = r["totals"]
    return {"wall": wall, "cpu": cpu, "phases": tot.get("phase_seconds", {}), "threads": tot.get("threads"),
            "mse": float(np.mean([v["relative_mse"] for v in r["deviation"].values()])),
            "notes": [n for n in r["notes"] if "sequential capture" in n]}


def _mse(r: dict) -> str:
    m = r.get("mse")
    return f"{m:.4g}" if isinstance(m, (int, float)) else "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="samples,bert,yolo,effnet,resnet18")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--old", type=Path, default=None, help="checkout of the code to compare against")
    ap.add_argument("--compete", action="store_true", help="run one CPU-bound process alongside")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    workdir.mkdir(parents=True, exist_ok=True)
    models = []
    for name in args.models.split(","):
        if name == "samples":
            for s in ("mlp", "cnn"):
                models.append((f"digits_{s}", REPO / "samples" / f"digits_{s}.onnx",
                               REPO / "samples" / f"digits_{s}_calib.npz"))
        else:
            models.append((name, *export(name, workdir, args.images)))
    rival = (subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.compete else None)
    try:
        print(f"load average {os.getloadavg()[0]:.2f} at start; cpus {os.cpu_count()}; "
              f"competing process: {'yes' if rival else 'no'}; workdir {workdir}")
        for name, path, calib in models:
            fwd = forward_seconds(path, calib)
            obs = prune(path, calib, workdir / f"{name}_obs.onnx", REPO)
            mag = prune(path, calib, workdir / f"{name}_mag.onnx", REPO, "--method", "magnitude")
            line = (f"{name:10s} forward {fwd:6.2f} s | obs {obs['wall']:7.1f} s "
                    f"({obs['wall'] / mag['wall']:.1f}x magnitude, rel MSE {_mse(obs)}) | "
                    f"magnitude {mag['wall']:5.1f} s")
            if args.old is not None:
                old = prune(path, calib, workdir / f"{name}_old.onnx", args.old)
                line += (f" | old obs {old['wall']:7.1f} s ({old['wall'] / mag['wall']:.1f}x, "
                         f"rel MSE {_mse(old)})")
            print(line, flush=True)
            if "error" in obs:
                print(f"           obs failed: {obs['error']}")
            else:
                print("           phases " + ", ".join(f"{k} {v:.1f}" for k, v in obs["phases"].items())
                      + f" s; threads {obs['threads']}; onnxruntime in capture "
                      f"{obs['phases'].get('capture', 0) / fwd:.1f} + allocation probes "
                      f"{obs['phases'].get('probes', 0) / fwd:.1f} forward passes; CPU "
                      f"{obs['cpu']:.1f} s (magnitude {mag.get('cpu', float('nan')):.1f} s)"
                      + (f"; {obs['notes'][0]}" if obs["notes"] else ""), flush=True)
        print(f"load average {os.getloadavg()[0]:.2f} at end")
    finally:
        if rival is not None:
            rival.kill()


if __name__ == "__main__":
    main()
