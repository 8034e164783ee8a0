"""How far full-network OBS can be trusted: finite differences at kinks, alpha, the measured stop
rule and --recompute-every, on the repository's digits samples.

  kinks    a small Conv(1->2, 3x3)-ReLU-MaxPool(2)-Gemm(18->10) digits net (210 weights), trained
           here (torch, scripts only) on the calibration images with the sample CNN's predictions
           as labels; derivative vectors by the gradient graph and by finite differences (their
           relative difference), then 50% full-network OBS with biases, by each, at alpha 1e-6
           and without biases, against layer-wise OBS and magnitude: relative MSE of the logits on
           the held-out split
  alpha    the README example (digits MLP, --hessian full --sparsity 0.8 --step 16) with the
           default alpha (from the data) and with the paper's 1e-6: agreement, accuracy,
           predicted and measured error increase, warnings
  recompute  the same at 90% with --recompute-every N: what rebuilding H on the way buys
  bound    --max-error-increase checked against the measured error

    python scripts/bench_full_trust.py [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_obs import api
from onnx_obs.calib import load_calibration
from onnx_obs.config import FullOptions
from onnx_obs.graph.model_io import from_proto
from onnx_obs.graph.sites import find_sites
from onnx_obs.hessian.network import FullNetwork, parameters
from onnx_obs.runtime import Runner

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"


def outputs(model, x: np.ndarray) -> np.ndarray:
    runner = Runner(model if isinstance(model, onnx.ModelProto) else onnx.load(model), "", "cpu")
    return runner.run({runner.input_names[0]: x})[0]


def rel_mse(y, y0) -> float:
    return float(np.sum((y - y0) ** 2) / np.sum(y0 ** 2))


# ---- kinks -------------------------------------------------------------------------------------


def small_conv_net(seed: int, steps: int) -> onnx.ModelProto:
    import torch

    torch.manual_seed(seed)
    x = np.load(SAMPLES / "digits_cnn_calib.npz")["input"]
    labels = outputs(str(SAMPLES / "digits_cnn.onnx"), x).argmax(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
                              torch.nn.Linear(18, 10))
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    xt, yt = torch.from_numpy(x), torch.from_numpy(labels)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(xt), yt)
        loss.backward()
        opt.step()
    p = {k: v.detach().numpy().astype(np.float32) for k, v in net.state_dict().items()}
    inits = [numpy_helper.from_array(p["0.weight"], "cw"), numpy_helper.from_array(p["0.bias"], "cb"),
             numpy_helper.from_array(p["4.weight"], "fw"), numpy_helper.from_array(p["4.bias"], "fb")]
    nodes = [helper.make_node("Conv", ["input", "cw", "cb"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("input", 1, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", 1, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def tie_fraction(model: onnx.ModelProto, x: np.ndarray) -> float:
    """Pooling windows whose maximum is taken by more than one element."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(helper.make_tensor_value_info("r", 1, None))
    r = Runner(m, "", "cpu").run({"input": x}, ["r"])[0]
    win = r.reshape(len(r), r.shape[1], 3, 2, 3, 2).transpose(0, 1, 2, 4, 3, 5).reshape(len(r), r.shape[1], 9, 4)
    return float(np.mean(np.sum(win == win.max(-1, keepdims=True), -1) > 1))


def derivative_vectors(model, x, gradients: str) -> np.ndarray:
    loaded = from_proto(model)
    sites, _ = find_sites(loaded.model)
    cal = load_calibration({"input": x}, loaded.model, batch_size=32)
    params = parameters(loaded.model, sites, "", True, [])
    net = FullNetwork(loaded, params, cal, hessian="full", options=FullOptions(gradients=gradients, alpha=1e-6),
                      device="cpu", notes=[])
    return np.concatenate(list(net.derivative_blocks()))


def kinks(seeds: int, steps: int) -> None:
    x_cal = np.load(SAMPLES / "digits_cnn_calib.npz")["input"][:64]
    x_eval = np.load(SAMPLES / "digits_cnn_eval.npz")["input"]
    print("kinks: Conv-ReLU-MaxPool-Gemm digits nets (210 weights), 64 calibration samples, 50% with biases")
    print("seed | tied windows | |X_fd - X_graph| / |X_graph| | held-out rel. MSE: full graph | full fd | "
          "full graph alpha 1e-6 | full without biases | layer-wise OBS | magnitude")
    for seed in range(seeds):
        model = small_conv_net(seed, steps)
        Xg, Xf = derivative_vectors(model, x_cal, "graph"), derivative_vectors(model, x_cal, "fd")
        y0 = outputs(model, x_eval)
        row = [f"{seed:4d}", f"{tie_fraction(model, x_cal):.1%}", f"{np.linalg.norm(Xf - Xg) / np.linalg.norm(Xg):.2e}"]
        for kw in (dict(full=FullOptions(gradients="graph", prune_biases=True)),
                   dict(full=FullOptions(gradients="fd", prune_biases=True)),
                   dict(full=FullOptions(alpha=1e-6, prune_biases=True)), dict(),
                   dict(hessian="layerwise"), dict(method="magnitude")):
            kw = {"hessian": "full", **kw}
            # min_params=0: the 18-weight conv is pruned too (prune keeps sites under 64 weights dense)
            res = api.prune(model, {"input": x_cal}, sparsity=0.5, device="cpu", min_params=0, **kw)
            row.append(f"{rel_mse(outputs(res.model, x_eval), y0):.3f}")
        print(" | ".join(row))


# ---- alpha, recompute, bound on the digits MLP ---------------------------------------------------


def mlp_run(label: str, sparsity: float, hessian: str = "full", **full) -> None:
    model, calib = str(SAMPLES / "digits_mlp.onnx"), str(SAMPLES / "digits_mlp_calib.npz")
    ev = np.load(SAMPLES / "digits_mlp_eval.npz")
    x, labels = ev["input"], ev["label"]
    y0 = outputs(model, x)
    t0 = time.perf_counter()
    res = api.prune(model, calib, hessian=hessian, sparsity=sparsity, device="cpu",
                    full=FullOptions(step=16, **full) if hessian == "full" else None)
    t = time.perf_counter() - t0
    y = outputs(res.model, x)
    if hessian == "layerwise":
        print(f"{label:<34} agreement {np.mean(y.argmax(1) == y0.argmax(1)):.2%} | accuracy "
              f"{np.mean(y.argmax(1) == labels):.2%} | {t:.1f} s")
        return
    fn = res.report.full_network
    flagged = sum(p["underestimated"] for p in fn.get("checkpoints", []))
    print(f"{label:<34} zeros {fn['zeros']:5d} ({fn['stop_reason']}) | agreement {np.mean(y.argmax(1) == y0.argmax(1)):.2%}"
          f" | accuracy {np.mean(y.argmax(1) == labels):.2%} (original {np.mean(y0.argmax(1) == labels):.2%})"
          f" | predicted {fn['predicted_error_increase']:.4g} measured {fn['measured_error_increase']:.4g}"
          f" | alpha {fn['alpha']:.3g} | flagged {flagged}/{len(fn.get('checkpoints', []))}"
          f" | warning {'yes' if res.report.warnings else 'no'} | {t:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one seed, fewer runs")
    parser.add_argument("--only", choices=["kinks", "mlp"], help="run one part")
    args = parser.parse_args()
    if args.only in (None, "kinks"):
        kinks(1 if args.quick else 3, 300)
    if args.only in (None, "mlp"):
        print("\ndigits MLP (6,464 weights, 256 calibration samples, 450 held-out), --hessian full --step 16")
        mlp_run("80%, alpha from the data (default)", 0.8)
        mlp_run("80%, alpha 1e-6 (the paper's)", 0.8, alpha=1e-6)
        if not args.quick:
            mlp_run("90%, alpha from the data", 0.9)
            mlp_run("90%, --recompute-every 2000", 0.9, recompute_every=2000)
            mlp_run("90%, --recompute-every 500", 0.9, recompute_every=500)
            mlp_run("90%, --max-error-increase 5", 0.9, max_error_increase=5.0)
            mlp_run("80%, alpha 1e-6, --max-error-increase 5", 0.8, alpha=1e-6, max_error_increase=5.0)
            mlp_run("85%, alpha from the data", 0.85)
            mlp_run("80%, layer-wise OBS", 0.8, hessian="layerwise")
            mlp_run("85%, layer-wise OBS", 0.85, hessian="layerwise")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory():
        main()
