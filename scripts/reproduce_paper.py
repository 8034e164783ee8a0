"""Reproduce the experiments of Hassibi & Stork (1992), "Optimal Brain Surgeon", with onnx-obs.

Every network is trained here (numpy + scipy, fixed seeds), exported to an ONNX file built with
onnx.helper, and pruned through the onnx_obs Python API (api.prune with hessian="full"):

  XOR      2-2-1 sigmoid network (9 weights with biases), trained from many seeds; delete one
           weight by magnitude, OBD and OBS (biases prunable, calibration = the 4 patterns) and
           count how often the deletion breaks XOR (OBS: after its Eq. 5 correction).
  MONK     MONK's problems 1-3 (Thrun et al. 1991), generated from their rules; 17-3-1 / 17-2-1
           sigmoid networks trained with weight decay; delete one weight at a time - H^-1
           recomputed at the corrected weights before each deletion, as the paper's procedure
           does - until the training accuracy would drop.
  digits   samples/digits_mlp.onnx: the most weights each method removes (no retraining) with
           at most 1 point of eval accuracy lost, on a sparsity grid.

    python scripts/reproduce_paper.py           # everything, a few minutes on 2 cores
    python scripts/reproduce_paper.py --quick   # fewer seeds, a coarser digits grid
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from scipy.optimize import minimize
from scipy.special import expit as sigmoid

from onnx_obs import api

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
PAPER_ALPHA = 1e-6  # H^-1_0 = I / alpha (Eq. 17); the paper's range is 1e-8..1e-4
ALPHA: float | None = PAPER_ALPHA  # XOR and MONK (--alpha); None: onnx-obs's default from the data


# ---- a sigmoid MLP in numpy: training and export -------------------------------------------------


class Net:
    """in -> sigmoid hidden -> sigmoid output; weights packed [W1, b1, W2, b2], W as [out, in]."""

    def __init__(self, sizes: tuple[int, int, int]):
        self.sizes = sizes
        d, h, o = sizes
        self.shapes = [(h, d), (h,), (o, h), (o,)]
        self.n = sum(int(np.prod(s)) for s in self.shapes)

    def unpack(self, w):
        out, i = [], 0
        for s in self.shapes:
            k = int(np.prod(s))
            out.append(w[i:i + k].reshape(s))
            i += k
        return out

    def forward(self, w, X):
        W1, b1, W2, b2 = self.unpack(w)
        h = sigmoid(X @ W1.T + b1)
        return h, sigmoid(h @ W2.T + b2)

    def loss(self, w, X, T, decay):
        """1/2 sum (y - t)^2 + decay/2 ||w||^2 and its gradient."""
        W1, b1, W2, b2 = self.unpack(w)
        h, y = self.forward(w, X)
        r = y - T
        dz2 = r * y * (1 - y)
        dz1 = dz2 @ W2 * h * (1 - h)
        g = np.concatenate([(dz1.T @ X).ravel(), dz1.sum(0), (dz2.T @ h).ravel(), dz2.sum(0)])
        return 0.5 * float(np.sum(r * r)) + 0.5 * decay * float(w @ w), g + decay * w

    def train(self, X, T, seed, decay=0.0, scale=1.0, iters=3000):
        w0 = np.random.default_rng(seed).normal(scale=scale, size=self.n)
        res = minimize(self.loss, w0, args=(X, T, decay), jac=True, method="L-BFGS-B",
                       options={"maxiter": iters, "gtol": 1e-10, "ftol": 1e-15})
        return res.x

    def export(self, w, path: Path) -> Path:
        """Gemm(transB=1) + Sigmoid twice, float64 (onnxruntime runs both in double)."""
        W1, b1, W2, b2 = self.unpack(w)
        d, _, o = self.sizes
        inits = [numpy_helper.from_array(np.ascontiguousarray(a, dtype=np.float64), n)
                 for a, n in zip((W1, b1, W2, b2), ("W1", "b1", "W2", "b2"))]
        nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["z1"], name="hidden", transB=1),
                 helper.make_node("Sigmoid", ["z1"], ["h"]),
                 helper.make_node("Gemm", ["h", "W2", "b2"], ["z2"], name="output", transB=1),
                 helper.make_node("Sigmoid", ["z2"], ["y"])]
        graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["N", d])],
                                  [helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["N", o])], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="reproduce_paper")
        model.ir_version = 8
        onnx.checker.check_model(model)
        onnx.save(model, path)
        return path


def run(model, x: np.ndarray) -> np.ndarray:
    src = str(model) if isinstance(model, Path) else model.SerializeToString()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def weights_of(model: onnx.ModelProto) -> np.ndarray:
    return np.concatenate([numpy_helper.to_array(t).ravel() for t in model.graph.initializer])


def prune(path: Path, x: np.ndarray, method: str, zeros: int, n: int, out: Path, **full) -> tuple[Path, dict]:
    """One api.prune call, full-network: `zeros` of the n weights (biases included) end at zero.
    Returns the output path and the report's full-network figures."""
    res = api.prune(str(path), {"x": x}, method=method, hessian="full", sparsity=zeros / n, device="cpu",
                    output=str(out), force=True, full=api.FullOptions(prune_biases=True, alpha=ALPHA, **full))
    return out, res.report.full_network


# ---- XOR ---------------------------------------------------------------------------------------------


XOR_X = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float64)
XOR_T = np.array([[0], [1], [1], [0]], dtype=np.float64)
METHODS = ("magnitude", "obd", "obs")


def xor(seeds: int, decay: float, work: Path) -> dict:
    """Per method: how many of `seeds` trained networks its one deletion breaks."""
    net = Net((2, 2, 1))
    broke = {m: 0 for m in METHODS}
    underestimate = []  # OBS deletions that break XOR: measured / predicted error increase
    trained, tried = 0, 0
    while trained < seeds:
        w = net.train(XOR_X, XOR_T, seed=tried, decay=decay, scale=0.5)
        tried += 1
        if not np.array_equal(net.forward(w, XOR_X)[1] > 0.5, XOR_T > 0.5):
            continue  # a local minimum that does not solve XOR
        trained += 1
        path = net.export(w, work / "xor.onnx")
        for m in METHODS:
            pruned, fn = prune(path, XOR_X, m, 1, net.n, work / f"xor_{m}.onnx")
            failed = not np.array_equal(run(pruned, XOR_X) > 0.5, XOR_T > 0.5)
            broke[m] += failed
            if failed and m == "obs":
                underestimate.append(fn["measured_error_increase"] / max(fn["predicted_error_increase"], 1e-300))
    return {"seeds": trained, "tried": tried, "broke": broke, "decay": decay,
            "underestimate": float(np.median(underestimate)) if underestimate else None}


# ---- MONK's problems ---------------------------------------------------------------------------------


VALUES = (3, 3, 2, 3, 4, 2)  # a1..a6


def monk_data():
    """All 432 examples: attributes (values from 1) and their 17-wide one-hot encoding."""
    grid = np.stack(np.meshgrid(*[np.arange(1, v + 1) for v in VALUES], indexing="ij"), -1).reshape(-1, 6)
    onehot = np.concatenate([np.eye(v)[grid[:, i] - 1] for i, v in enumerate(VALUES)], axis=1)
    return grid, onehot


def monk_rule(problem: int, a: np.ndarray) -> np.ndarray:
    a1, a2, a3, a4, a5, a6 = a.T
    if problem == 1:
        y = (a1 == a2) | (a5 == 1)
    elif problem == 2:
        y = (a == 1).sum(axis=1) == 2
    else:
        y = ((a5 == 3) & (a4 == 1)) | ((a5 != 4) & (a2 != 3))
    return y.astype(np.float64)


MONKS = {  # problem: (training examples, hidden units, label noise, weight decay, paper row)
    1: (124, 3, 0.0, 1e-2, "58 -> 14, 100 / 100 %"),
    2: (169, 2, 0.0, 1e-2, "39 -> 15, 100 / 100 %"),
    3: (122, 2, 0.05, 1e-1, "39 -> 4, 93.4 / 97.2 %"),
}


def accuracy(model, X, T) -> float:
    return float(np.mean((run(model, X) > 0.5) == (T > 0.5)))


def monk(problem: int, restarts: int, work: Path, floor: float | None = None) -> dict:
    size, hidden, noise, decay, paper = MONKS[problem]
    grid, X = monk_data()
    T = monk_rule(problem, grid)[:, None]
    rng = np.random.default_rng(problem)
    train = np.sort(rng.choice(len(X), size, replace=False))
    Xtr, Ttr = X[train], T[train].copy()
    flip = rng.choice(size, int(round(noise * size)), replace=False)
    Ttr[flip] = 1 - Ttr[flip]
    net = Net((17, hidden, 1))
    best, best_key = None, None
    for seed in range(restarts):  # keep the best fit to the training set
        w = net.train(Xtr, Ttr, seed=100 * problem + seed, decay=decay, scale=0.5)
        _, y = net.forward(w, Xtr)
        key = (np.mean((y > 0.5) == (Ttr > 0.5)), -float(np.sum((y - Ttr) ** 2)))
        if best_key is None or key > best_key:
            best, best_key = w, key
    path = net.export(best, work / f"monk{problem}.onnx")
    base = accuracy(path, Xtr, Ttr)
    rows = {"paper": paper, "weights": net.n, "train": base, "test": accuracy(path, X, T)}
    for m in METHODS:
        current, zeros = path, 0
        while zeros < net.n - 1:  # delete one more weight (H^-1 at the current weights) ...
            candidate, _ = prune(current, Xtr, m, zeros + 1, net.n, work / f"monk{problem}_{m}_{zeros + 1}.onnx")
            if accuracy(candidate, Xtr, Ttr) < (base if floor is None else floor):  # ... unless the training
                # accuracy would drop (below `floor` when given)
                break
            current, zeros = candidate, zeros + 1
        rows[m] = {"left": net.n - zeros, "train": accuracy(current, Xtr, Ttr), "test": accuracy(current, X, T)}
    return rows


# ---- the digits MLP sample ---------------------------------------------------------------------------


def digits(grid: list[float], max_loss: float, work: Path) -> dict:
    """Per method, the highest grid sparsity whose eval accuracy is within max_loss of the original's."""
    model = SAMPLES / "digits_mlp.onnx"
    calib = SAMPLES / "digits_mlp_calib.npz"
    ev = np.load(SAMPLES / "digits_mlp_eval.npz")
    x, labels = ev["input"], ev["label"]

    def acc(m) -> float:
        return float(np.mean(run(m, x).argmax(1) == labels))

    base = acc(model)
    n = api.inspect(str(model)).site_params
    runs = {
        "magnitude (global)": dict(method="magnitude", hessian="full"),
        "OBD (global, diag of full H)": dict(method="obd", hessian="full"),
        "layer-wise OBS (damping 0.01 mean diag H)": dict(method="obs", hessian="layerwise"),
        f"full-network OBS, alpha {PAPER_ALPHA:g}": dict(method="obs", hessian="full",
                                                         full=api.FullOptions(step=32, alpha=PAPER_ALPHA)),
        "full-network OBS, alpha from the data (default: 0.01 mean diag H)": dict(
            method="obs", hessian="full", full=api.FullOptions(step=32)),
    }
    rows = {"original": base, "weights": n, "methods": {}}
    for label, kw in runs.items():
        rows["methods"][label] = sweep(str(model), str(calib), kw, grid, lambda m: acc(m) >= base - max_loss, acc)
    return rows


def sweep(model: str, calib: str, kw: dict, grid: list[float], good, acc) -> dict:
    """The highest grid sparsity before the first one whose pruned model is not `good`."""
    t0, best = time.perf_counter(), (0.0, acc(Path(model)))
    for s in grid:
        pruned = api.prune(model, calib, sparsity=s, device="cpu", **kw).model
        if not good(pruned):
            break
        best = (s, acc(pruned))
    n = api.inspect(model).site_params
    return {"sparsity": best[0], "kept": int(round(n * (1 - best[0]))), "accuracy": best[1],
            "seconds": time.perf_counter() - t0}


# ---- the table ---------------------------------------------------------------------------------------


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer XOR seeds and MONK restarts, coarser digits grid")
    parser.add_argument("--out-dir", type=Path, help="keep the built and pruned models here (default: a temp dir)")
    parser.add_argument("--alpha", default=str(PAPER_ALPHA), help="XOR and MONK: alpha of Eq. 17, or 'auto' for "
                        "onnx-obs's default (1%% of mean diag H)")
    parser.add_argument("--min-train", type=float, help="MONK: delete while the training accuracy stays at or "
                        "above this (default: the trained network's), e.g. 0.934, the paper's MONK-3 figure")
    args = parser.parse_args()
    global ALPHA
    ALPHA = None if args.alpha == "auto" else float(args.alpha)
    seeds, restarts = (20, 3) if args.quick else (40, 10)
    grid = [0.5, 0.7, 0.8, 0.9] if args.quick else [round(s, 2) for s in np.arange(0.5, 0.96, 0.05)]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="onnx-obs-paper-") as tmp:
        work = args.out_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        xors = [xor(seeds, decay, work) for decay in (1e-4, 0.0)]
        monks = {p: monk(p, restarts, work, args.min_train) for p in MONKS}
        d = digits(grid, 0.01, work)

    print("\nXOR 2-2-1 sigmoid network (9 weights with biases), targets 0/1, one deletion each: networks whose "
          "outputs no longer solve XOR")
    print("| training | networks | magnitude | OBD | OBS |")
    print("| --- | --- | --- | --- | --- |")
    for x in xors:
        how = f"weight decay {x['decay']:g}" if x["decay"] else "no weight decay (E -> 0, saturated units)"
        print(f"| {how} | {x['seeds']} ({x['tried'] - x['seeds']} seeds in local minima skipped) | "
              + " | ".join(f"{x['broke'][m]} / {x['seeds']}" for m in METHODS) + " |")
    for x in xors:
        if x["underestimate"] is not None:
            print(f"weight decay {x['decay']:g}: OBS deletions that break XOR had a measured error increase "
                  f"{x['underestimate']:.3g}x the predicted (median)")
    print("paper: only OBS deletes the correct weight in every case")

    print("\nMONK's problems: weights left (biases included) and accuracy train / test %, one weight at a time "
          "until the training accuracy would drop")
    print("| problem | trained | magnitude | OBD | OBS | paper (OBS) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for p, r in monks.items():
        cells = [f"{r[m]['left']}: {pct(r[m]['train'])} / {pct(r[m]['test'])}" for m in METHODS]
        print(f"| MONK-{p} | {r['weights']}: {pct(r['train'])} / {pct(r['test'])} | " + " | ".join(cells)
              + f" | {r['paper']} |")

    print(f"\ndigits MLP ({d['weights']} weights, biases not pruned): most removed with eval accuracy at most "
          f"1 point below the original {pct(d['original'])} %, no retraining, sparsity grid "
          f"{grid[0]:g}..{grid[-1]:g}")
    print("| method | sparsity | weights kept | eval accuracy % | seconds |")
    print("| --- | --- | --- | --- | --- |")
    for label, r in d["methods"].items():
        print(f"| {label} | {pct(r['sparsity'])} % | {r['kept']} | {pct(r['accuracy'])} | {r['seconds']:.0f} |")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
