"""onnx-obs quantization (OBQ / GPTQ / RTN) beside onnxruntime's own quantizers, in one run.

Models: the two digits samples (Gemm MLP, CNN) and three models trained here on the same digits
data with torch and exported with MatMul weights or depthwise convolutions: an MLP written with
matmuls, a small transformer (the 8x8 image as 8 tokens of 8 pixels, two attention blocks) and a
MobileNet-style CNN (depthwise + pointwise convolutions). Per model and method: file size
against the float32 original, relative output MSE and top-1 agreement with the original on the
held-out split, accuracy, and onnxruntime CPU latency at batch 32 (one thread, median of
repeated runs) against the original, also with the session option session.disable_quant_qdq=1
(onnxruntime then folds DequantizeLinear of constant weights at load). onnxruntime's methods: quantize_dynamic (int8, per
channel), quantize_static (QDQ int8 per channel, activations too, calibrated on the same data),
MatMulNBitsQuantizer RTN and HQQ (4 bits, blocks of 32 and 128: MatMul weights only).

    pip install torch scikit-learn onnx-ir      # onnx-ir: onnxruntime's MatMulNBitsQuantizer
    OMP_NUM_THREADS=1 python scripts/bench_quantize.py [--models mlp,cnn,mlp_mm,transformer,mobilenet]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnx_obs import api
from onnx_obs.flops import latency_ms

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
sys.path.insert(0, str(ROOT / "scripts"))


# ------------------------------------------------------------------ models trained here

def _torch_models():
    import torch
    import torch.nn as nn

    class Dense(nn.Module):  # x @ W + b: exported as MatMul + Add
        def __init__(self, a, b):
            super().__init__()
            self.w = nn.Parameter(torch.randn(a, b) / a**0.5)
            self.b = nn.Parameter(torch.zeros(b))

        def forward(self, x):
            return x @ self.w + self.b

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2, self.l3 = Dense(64, 128), Dense(128, 64), Dense(64, 10)

        def forward(self, x):
            return self.l3(torch.relu(self.l2(torch.relu(self.l1(x)))))

    class Block(nn.Module):
        def __init__(self, d=64, ff=128, heads=4):
            super().__init__()
            self.q, self.k, self.v, self.o = Dense(d, d), Dense(d, d), Dense(d, d), Dense(d, d)
            self.f1, self.f2 = Dense(d, ff), Dense(ff, d)
            self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.heads = heads

        def forward(self, x):
            b, t, d = x.shape
            h = self.n1(x)
            split = lambda z: z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
            q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
            a = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1) @ v
            x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
            return x + self.f2(torch.relu(self.f1(self.n2(x))))

    class Transformer(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.pos = Dense(8, 64), nn.Parameter(torch.zeros(8, 64))
            self.blocks = nn.Sequential(Block(), Block())
            self.head = Dense(64, 10)

        def forward(self, x):
            return self.head(self.blocks(self.embed(x.reshape(-1, 8, 8)) + self.pos).mean(dim=1))

    def mobilenet():
        def sep(c_in, c_out, stride):
            return [nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in), nn.BatchNorm2d(c_in), nn.ReLU(),
                    nn.Conv2d(c_in, c_out, 1), nn.BatchNorm2d(c_out), nn.ReLU()]
        return nn.Sequential(nn.Conv2d(1, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.ReLU(),
                             *sep(32, 64, 1), *sep(64, 128, 2), *sep(128, 128, 1), *sep(128, 256, 2),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10))

    return {"mlp_mm": (MLP, (64,)), "transformer": (Transformer, (64,)), "mobilenet": (mobilenet, (1, 8, 8))}


def export_trained(name: str, out: Path, data) -> Path:
    import torch

    import make_samples

    make_samples._seed_everything(0)
    make_samples._setup_torch()
    x, y, train_idx, _, _ = data
    build, shape = _torch_models()[name]
    model = build()
    make_samples.train(model, x[train_idx].reshape(-1, *shape), y[train_idx], epochs=40, lr=3e-3)
    model.eval()
    path = out / f"{name}.onnx"
    torch.onnx.export(model, torch.zeros(1, *shape), str(path), input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=17, dynamo=False)
    return path


# ------------------------------------------------------------------ onnxruntime's quantizers

def ort_methods(model: Path, calib: dict, out: Path) -> dict[str, Path]:
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)

    paths = {}
    paths["ort dynamic int8"] = out / "ort_dynamic.onnx"
    quantize_dynamic(str(model), str(paths["ort dynamic int8"]), weight_type=QuantType.QInt8, per_channel=True)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": calib["input"][i : i + 32]} for i in range(0, len(calib["input"]), 32)])

        def get_next(self):
            return next(self.it, None)

    paths["ort static QDQ int8"] = out / "ort_static.onnx"
    quantize_static(str(model), str(paths["ort static QDQ int8"]), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import (HQQWeightOnlyQuantConfig,
                                                                     MatMulNBitsQuantizer,
                                                                     RTNWeightOnlyQuantConfig)
    except ImportError as e:
        print(f"  (onnxruntime's MatMulNBitsQuantizer is unavailable: {e}; pip install onnx-ir)")
        return paths
    for block in (32, 128):
        configs = {"rtn": RTNWeightOnlyQuantConfig()}
        try:
            configs["hqq"] = HQQWeightOnlyQuantConfig(block_size=block, bits=4)
        except Exception as e:  # needs torch
            print(f"  (HQQ unavailable: {e})")
        for algo, config in configs.items():
            path = out / f"ort_{algo}_{block}.onnx"
            q = MatMulNBitsQuantizer(onnx.load(str(model)), bits=4, block_size=block, is_symmetric=True,
                                     algo_config=config)
            q.process()
            q.model.save_model_to_file(str(path), use_external_data_format=False)
            paths[f"ort {algo.upper()} int4 b{block}"] = path
    return paths


# ------------------------------------------------------------------ onnx-obs

OURS = {  # label -> settings of api.prune
    "obs int8 (auto)": dict(bits=8, sparsity=0.0),
    "obs int8 + activations (auto)": dict(bits=8, sparsity=0.0, activations="int8"),
    "obs int8 + activations, percentile": dict(bits=8, sparsity=0.0, activations="int8",
                                               activation_calibration="percentile"),
    "obs int4 per channel (auto)": dict(bits=4, sparsity=0.0),
    "obs int4 g32 rtn": dict(bits=4, group_size=32, quant_method="rtn", sparsity=0.0),
    "obs int4 g32 gptq": dict(bits=4, group_size=32, quant_method="gptq", sparsity=0.0),
    "obs int4 g32 (auto)": dict(bits=4, group_size=32, sparsity=0.0),
    "obs int4 g128 (auto)": dict(bits=4, group_size=128, sparsity=0.0),
    "obs int4 g32 (auto), matmulnbits": dict(bits=4, group_size=32, sparsity=0.0, format="matmulnbits"),
    "obs 50% + int4 g32, joint": dict(bits=4, group_size=32, sparsity=0.5),
}


def our_methods(model: Path, calib: Path, out: Path) -> dict[str, Path]:
    paths = {}
    for label, settings in OURS.items():
        paths[label] = out / f"ours_{len(paths)}.onnx"
        t0 = time.perf_counter()
        api.prune(str(model), str(calib), output=paths[label], **settings)
        print(f"  {label}: {time.perf_counter() - t0:.1f} s")
    pruned = out / "pruned.onnx"
    api.prune(str(model), str(calib), output=pruned, sparsity=0.5)
    paths["obs 50%, then int4 g32 rtn"] = out / "separate.onnx"
    api.quantize(str(pruned), str(calib), output=paths["obs 50%, then int4 g32 rtn"], bits=4, group_size=32,
                 quant_method="rtn")
    return paths


# ------------------------------------------------------------------ measuring

def session(path: Path, fold: bool = False) -> ort.InferenceSession:
    """fold: the session option that makes onnxruntime fold DequantizeLinear of constant weights
    at load time (and not fuse QDQ groups into integer kernels)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    if fold:
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def file_size(path: Path) -> int:
    return path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + ".data"))


def measure(paths: dict[str, Path], eval_data: dict) -> list[dict]:
    x, labels = eval_data["input"], eval_data["label"]
    feeds32 = {"input": x[:32]}
    ref_session = session(paths["float32"])
    ref = ref_session.run(None, {"input": x})[0]
    base_latency = latency_ms(ref_session, feeds32)
    rows = []
    for label, path in paths.items():
        s = session(path)
        y = s.run(None, {"input": x})[0]
        rows.append(dict(method=label, size=file_size(path) / file_size(paths["float32"]),
                         mse=float(np.mean((y - ref) ** 2) / np.mean(ref**2)),
                         agreement=float(np.mean(y.argmax(1) == ref.argmax(1))),
                         accuracy=float(np.mean(y.argmax(1) == labels)),
                         latency=latency_ms(s, feeds32) / base_latency,
                         folded=latency_ms(session(path, fold=True), feeds32) / base_latency))
    return rows


def print_table(name: str, rows: list[dict]) -> None:
    print(f"\n{name}")
    print("| method | file | rel. MSE | top-1 agreement | accuracy | latency (batch 32) | latency, DQ folded |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['size']:.3f}x | {r['mse']:.2e} | {r['agreement']:.2%} | "
              f"{r['accuracy']:.2%} | {r['latency']:.2f}x | {r['folded']:.2f}x |")


def targets(name: str, rows: list[dict]) -> None:
    by = {r["method"]: r for r in rows}
    ort4 = [r for m, r in by.items() if m.startswith("ort") and "int4" in m]
    ours4 = min((by[m] for m in OURS if "int4" in m and "50%" not in m and "rtn" not in m), key=lambda r: r["mse"])
    nbits = by["obs int4 g32 (auto), matmulnbits"]
    covered = [r for r in ort4 if r["mse"] > 0 and r["size"] < 0.9]
    if covered:
        best = min(covered, key=lambda r: r["mse"])
        print(f"target int4: ours {ours4['mse']:.2e} ({ours4['method']}) vs best onnxruntime 4-bit "
              f"{best['mse']:.2e} ({best['method']}): {ours4['mse'] / best['mse']:.2f}x "
              f"({'met' if ours4['mse'] <= 0.5 * best['mse'] else 'NOT met'}: at most 0.5x)")
    else:
        print("target int4: onnxruntime's 4-bit quantizers change no weight of this model (MatMul "
              f"only); ours {ours4['mse']:.2e} at {ours4['size']:.3f}x the file")
    if "ort RTN int4 b32" in by and by["ort RTN int4 b32"]["size"] < 0.9:  # it changed the model
        ort_nbits = by["ort RTN int4 b32"]
        print(f"target latency int4 (MatMulNBits, block 32): ours {nbits['latency']:.2f}x vs onnxruntime RTN "
              f"{ort_nbits['latency']:.2f}x of the float model")
    static = by["ort static QDQ int8"]
    ours8 = by["obs int8 (auto)"]
    print(f"target int8: agreement ours {ours8['agreement']:.2%} vs quantize_static {static['agreement']:.2%} "
          f"({'met' if ours8['agreement'] >= static['agreement'] else 'NOT met'}); file {ours8['size']:.3f}x "
          f"({'met' if ours8['size'] <= 0.27 else 'NOT met'}: at most 0.27x)")
    for label in ("obs int8 + activations (auto)", "obs int8 + activations, percentile"):
        a8 = by[label]
        print(f"target int8 with activations ({label}): agreement {a8['agreement']:.2%} vs quantize_static "
              f"{static['agreement']:.2%} ({'met' if a8['agreement'] >= static['agreement'] else 'NOT met'}); "
              f"latency {a8['latency']:.2f}x vs quantize_static {static['latency']:.2f}x of the float model "
              f"({'met' if a8['latency'] <= static['latency'] else 'NOT met'}: not slower); file {a8['size']:.3f}x")
    g32 = by["obs int4 g32 (auto)"]
    print(f"target file int4: {g32['size']:.3f}x ({'met' if g32['size'] <= 0.16 else 'NOT met'}: at most 0.16x)")
    joint, separate = by["obs 50% + int4 g32, joint"], by["obs 50%, then int4 g32 rtn"]
    print(f"target joint: 50% + int4 jointly {joint['mse']:.2e} vs pruned then quantized "
          f"{separate['mse']:.2e} ({'met' if joint['mse'] < separate['mse'] else 'NOT met'})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,cnn,mlp_mm,transformer,mobilenet")
    args = ap.parse_args()
    names = args.models.split(",")
    data = None
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            out = Path(tmp) / name
            out.mkdir()
            if name in ("mlp", "cnn"):
                model = SAMPLES / f"digits_{name}.onnx"
                calib_path, eval_path = SAMPLES / f"digits_{name}_calib.npz", SAMPLES / f"digits_{name}_eval.npz"
                calib, eval_data = dict(np.load(calib_path)), dict(np.load(eval_path))
            else:
                import make_samples

                data = data or make_samples.load_data()
                x, y, _, test_idx, calib_idx = data
                shape = (-1, 1, 8, 8) if name == "mobilenet" else (-1, 64)
                model = export_trained(name, out, data)
                calib = {"input": x[calib_idx].reshape(shape)}
                eval_data = {"input": x[test_idx].reshape(shape), "label": y[test_idx]}
                calib_path = out / "calib.npz"
                np.savez(calib_path, **calib)
            print(f"{name}: {model.name}")
            paths = {"float32": model, **ort_methods(model, calib, out), **our_methods(model, calib_path, out)}
            rows = measure(paths, eval_data)
            print_table(name, rows)
            targets(name, rows)


if __name__ == "__main__":
    main()
