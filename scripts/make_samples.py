#!/usr/bin/env python
"""Regenerate the sample models and data files in samples/.

Usage (from the repository root)::

    pip install .[samples]
    python scripts/make_samples.py            # writes samples/*
    python scripts/make_samples.py --bench    # also measures CNN latency in onnxruntime

This script is a maintainer tool.  It is not part of the ``onnx_obs`` package and
must never be imported by it or by the tests: the tests use only the committed
files in samples/, and need neither torch nor scikit-learn.

What it makes, from sklearn's bundled digits data set (1797 8x8 images, 10 classes,
no download), pixels scaled to [0, 1] float32, a stratified 75/25 train/test split:

* samples/digits_mlp.onnx          MLP 64-64-ReLU-32-ReLU-10, input "input" [batch, 64]
* samples/digits_cnn.onnx          small CNN, input "input" [batch, 1, 8, 8]
* samples/digits_{mlp,cnn}_calib.npz  256 calibration samples from the training split
                                      (key = input name)
* samples/digits_{mlp,cnn}_eval.npz   the held-out test split (key = input name, plus
                                      "label", int64)

Both models output "logits" [batch, 10] and have a dynamic batch axis named "batch".
Models are exported with torch's TorchScript-based exporter (``dynamo=False``) at the
exporter's default opset; after export each model is checked with onnx.checker, its
onnxruntime output is compared with torch's (max abs diff < 1e-4), and its accuracy is
measured with onnxruntime on the eval file.

Everything is seeded and torch runs single-threaded with deterministic algorithms, so
two runs on the same machine and library versions give byte-identical files.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

SEED = 0
TEST_FRACTION = 0.25
N_CALIB = 256
ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
MAX_ABS_DIFF = 1e-4
MAX_FILE_BYTES = 2 * 1024 * 1024


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _setup_torch() -> None:
    import torch

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.backends.mkldnn.enabled = False  # plain ATen CPU kernels, fewer code paths


# --------------------------------------------------------------------------- data
def load_data():
    """Digits scaled to [0, 1]; deterministic stratified split; calibration indices."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)  # pixel values are 0..16
    y = digits.target.astype(np.int64)
    idx = np.arange(len(y))
    train_idx, test_idx = train_test_split(
        idx, test_size=TEST_FRACTION, random_state=SEED, stratify=y
    )
    train_idx = np.sort(train_idx)
    test_idx = np.sort(test_idx)
    rng = np.random.default_rng(SEED)
    calib_idx = np.sort(rng.choice(train_idx, size=N_CALIB, replace=False))
    return x, y, train_idx, test_idx, calib_idx


# --------------------------------------------------------------------------- models
def build_mlp():
    import torch.nn as nn

    return nn.Sequential(
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


def build_cnn(c1: int = 32, c2: int = 64, c3: int = 64, hidden: int = 128):
    """Conv-dominated CNN for 8x8 inputs. Channel widths are parameters so that the
    benchmark can build a half-width variant."""
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1),
        nn.BatchNorm2d(c1),
        nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.BatchNorm2d(c2),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 8x8 -> 4x4
        nn.Conv2d(c2, c3, 3, padding=1),
        nn.BatchNorm2d(c3),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 4x4 -> 2x2
        nn.Flatten(),
        nn.Linear(c3 * 2 * 2, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def train(model, x_train, y_train, *, epochs: int, lr: float, batch_size: int = 64,
          weight_decay: float = 0.0):
    import torch
    import torch.nn.functional as F

    xt = torch.from_numpy(x_train)
    yt = torch.from_numpy(y_train)
    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for start in range(0, len(xt), batch_size):
            b = perm[start:start + batch_size]
            opt.zero_grad()
            loss = F.cross_entropy(model(xt[b]), yt[b])
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    return model


# --------------------------------------------------------------------------- export
def export_onnx(model, example, path: Path) -> None:
    """Export with the TorchScript exporter at its default opset, dynamic batch axis."""
    import warnings

    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter warns that it is deprecated
        torch.onnx.export(
            model,
            (example,),
            buf,
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=True,
        )
    path.write_bytes(buf.getvalue())


def check_onnx(model, path: Path, x_check: np.ndarray, x_eval: np.ndarray,
               y_eval: np.ndarray) -> dict:
    import onnx
    import onnxruntime as ort
    import torch

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    ops = Counter(n.op_type for n in proto.graph.node)
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    n_params = int(sum(np.prod(t.dims) for t in proto.graph.initializer))

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    in_names = [i.name for i in sess.get_inputs()]
    out_names = [o.name for o in sess.get_outputs()]
    assert in_names == [INPUT_NAME], in_names
    assert out_names == [OUTPUT_NAME], out_names

    with torch.no_grad():
        ref = model(torch.from_numpy(x_check)).numpy()
    got = sess.run(None, {INPUT_NAME: x_check})[0]
    diff = float(np.max(np.abs(ref - got)))
    if not diff < MAX_ABS_DIFF:
        raise SystemExit(f"{path.name}: onnxruntime vs torch max abs diff {diff:.3g} "
                         f">= {MAX_ABS_DIFF}")
    # a batch of a different size exercises the dynamic batch axis
    got1 = sess.run(None, {INPUT_NAME: x_check[:1]})[0]
    assert got1.shape == (1, 10)

    logits = sess.run(None, {INPUT_NAME: x_eval})[0]
    acc = float(np.mean(np.argmax(logits, axis=1) == y_eval))
    return {"ops": ops, "opset": opset, "params": n_params, "diff": diff, "acc": acc,
            "bytes": path.stat().st_size}


def save_npz(path: Path, **arrays) -> None:
    # np.savez (uncompressed) writes fixed zip timestamps, so output is byte-stable.
    np.savez(path, **arrays)
    if path.stat().st_size > MAX_FILE_BYTES:
        raise SystemExit(f"{path} is larger than 2 MB")


# --------------------------------------------------------------------------- bench
def bench_cnn(path: Path, x_eval: np.ndarray, threads: int = 1, reps: int = 300):
    """Median onnxruntime latency (ms) of the committed CNN vs a half-channel variant
    (random weights, BN folded by the same exporter), at batch 1 and 32, plus the
    share of Conv time from an onnxruntime profile of the full model at batch 32."""
    import json
    import tempfile

    import onnxruntime as ort
    import torch

    def median_ms(sess, x):
        for _ in range(20):
            sess.run(None, {INPUT_NAME: x})
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            sess.run(None, {INPUT_NAME: x})
            ts.append(time.perf_counter() - t0)
        return 1e3 * float(np.median(ts))

    def session(p, profile_dir=None):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        if profile_dir is not None:
            so.enable_profiling = True
            so.profile_file_prefix = os.path.join(profile_dir, "prof")
        return ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])

    x_img = x_eval.reshape(-1, 1, 8, 8)
    with tempfile.TemporaryDirectory() as tmp:
        half_path = Path(tmp) / "half.onnx"
        torch.manual_seed(SEED)
        half = build_cnn(16, 32, 32, 128).eval()
        export_onnx(half, torch.from_numpy(x_img[:1]), half_path)

        full_s, half_s = session(path), session(half_path)
        rows = []
        for bs in (1, 32):
            xb = np.ascontiguousarray(x_img[:bs])
            f, h = median_ms(full_s, xb), median_ms(half_s, xb)
            rows.append((bs, f, h, f / h))

        # profile: share of node time spent in Conv, full model, batch 32
        shares = {}
        for name, p in (("full", path), ("half", half_path)):
            s = session(p, profile_dir=tmp)
            xb = np.ascontiguousarray(x_img[:32])
            for _ in range(200):
                s.run(None, {INPUT_NAME: xb})
            prof = s.end_profiling()
            with open(prof) as fh:
                events = json.load(fh)
            per_op = Counter()
            for e in events:
                if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                    per_op[e["args"]["op_name"]] += e["dur"]
            total = sum(per_op.values())
            shares[name] = {k: v / total for k, v in per_op.most_common()}
    return rows, shares


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=SAMPLES, help="output folder")
    ap.add_argument("--bench", action="store_true",
                    help="also time the CNN in onnxruntime (full vs half channels)")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime threads for --bench")
    args = ap.parse_args(argv)

    import onnx
    import onnxruntime as ort
    import sklearn
    import torch

    _setup_torch()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    x, y, train_idx, test_idx, calib_idx = load_data()
    x_train, y_train = x[train_idx], y[train_idx]
    x_test, y_test = x[test_idx], y[test_idx]
    x_calib = x[calib_idx]
    print(f"torch {torch.__version__}, onnx {onnx.__version__}, onnxruntime "
          f"{ort.__version__}, scikit-learn {sklearn.__version__}, numpy {np.__version__}")
    print(f"digits: train {len(train_idx)}, test {len(test_idx)}, calib {len(calib_idx)} "
          f"(from train)")

    results = {}

    # ---- MLP
    _seed_everything(SEED)
    mlp = train(build_mlp(), x_train, y_train, epochs=80, lr=3e-3, weight_decay=1e-4)
    mlp_path = out / "digits_mlp.onnx"
    export_onnx(mlp, torch.from_numpy(x_test[:1]), mlp_path)
    save_npz(out / "digits_mlp_calib.npz", **{INPUT_NAME: x_calib})
    save_npz(out / "digits_mlp_eval.npz", **{INPUT_NAME: x_test, "label": y_test})
    results["digits_mlp"] = check_onnx(mlp, mlp_path, x_test[:32], x_test, y_test)

    # ---- CNN
    img = lambda a: np.ascontiguousarray(a.reshape(-1, 1, 8, 8))  # noqa: E731
    _seed_everything(SEED)
    cnn = train(build_cnn(), img(x_train), y_train, epochs=30, lr=2e-3, weight_decay=1e-4)
    cnn_path = out / "digits_cnn.onnx"
    export_onnx(cnn, torch.from_numpy(img(x_test[:1])), cnn_path)
    save_npz(out / "digits_cnn_calib.npz", **{INPUT_NAME: img(x_calib)})
    save_npz(out / "digits_cnn_eval.npz", **{INPUT_NAME: img(x_test), "label": y_test})
    results["digits_cnn"] = check_onnx(cnn, cnn_path, img(x_test[:32]), img(x_test), y_test)

    ok = True
    for name, r in results.items():
        ops = ", ".join(f"{k} x{v}" if v > 1 else k for k, v in sorted(r["ops"].items()))
        print(f"{name}: opset {r['opset']}, {r['params']} parameters, {r['bytes']} bytes, "
              f"ops [{ops}], ort-vs-torch max abs diff {r['diff']:.2e}, "
              f"test accuracy (onnxruntime) {r['acc']:.4f}")
        if r["bytes"] > MAX_FILE_BYTES:
            print(f"  ERROR: {name}.onnx is larger than 2 MB")
            ok = False
    if results["digits_mlp"]["acc"] < 0.95 or results["digits_cnn"]["acc"] < 0.97:
        print("ERROR: accuracy below target (MLP >= 0.95, CNN >= 0.97)")
        ok = False

    if args.bench:
        rows, shares = bench_cnn(cnn_path, x_test, threads=args.threads)
        print(f"CNN latency, onnxruntime CPU, intra_op_num_threads={args.threads} "
              f"(median ms): full vs half channels (16/32/32, random weights)")
        for bs, f, h, r in rows:
            print(f"  batch {bs:2d}: full {f:.3f} ms, half {h:.3f} ms, speedup {r:.2f}x")
        for name, sh in shares.items():
            txt = ", ".join(f"{k} {v:.0%}" for k, v in sh.items())
            print(f"  kernel-time share at batch 32 ({name}): {txt}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
