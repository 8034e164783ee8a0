"""Cost and accuracy of the measured latency table (--latency measured): each group timed on its
own part of the graph (the default) against the whole model timed per width (as before; the same
timer passed as a caller's function), in the same run, on a ResNet-18 at 224 px exported by
scripts/bench_pipeline.py (torch needed for the export only).

Per kind: seconds to build the table (from the report's note) and CPU seconds of the whole prune,
the plan's predicted latency against the timed one (the note) and against an independent timing
of the written model (median of 200 runs), and the speed-up. Each kind starts from an empty cache.

With --tables N: instead, each kind builds the table N times (interleaved, empty cache each time)
and the saved ms at each group's widest removal is printed per build, with the spread over builds
(how repeatable the table is under the machine's load).

Usage: python scripts/bench_latency_table.py [--speedup 1.5] [--threads 1] [--tables N] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import export

from onnx_obs import api
from onnx_obs.calib import load_calibration
from onnx_obs.flops import latency_ms
from onnx_obs.graph.sites import find_sites
from onnx_obs.graph.tracing import trace_units
from onnx_obs.latency_table import OnnxruntimeTimer, latency_model
from onnx_obs.runtime import Runner
from onnx_obs.threads import run_threads


def timed(model: onnx.ModelProto, x: np.ndarray) -> float:
    return latency_ms(Runner(model).session, {"x": x}, max_runs=200, budget_s=3.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--speedup", type=float, default=1.5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tables", type=int, default=0)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "onnx_obs_bench_latency"))
    a = ap.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    path, calib = export("resnet18", work, images=4)
    model = onnx.load(str(path))
    x = np.load(calib)["x"][:1]
    print(f"load average {os.getloadavg()}")
    if a.tables:
        return tables(model, calib, a)
    for kind in ("parts", "whole"):
        os.environ["ONNX_OBS_CACHE_DIR"] = tempfile.mkdtemp(dir=work)
        timer = None
        if kind == "whole":
            with run_threads(a.threads):
                ort = OnnxruntimeTimer(load_calibration(str(calib), model))

            def timer(m, ort=ort):   # a plain function: timed on the whole model per width
                return ort(m)
        wall, cpu = time.perf_counter(), time.process_time()
        res = api.prune(model, str(calib), structure="channels", method="magnitude",
                        target_speedup=a.speedup, latency="measured", threads=a.threads, timer=timer)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        notes = res.report.notes
        table = next(n for n in notes if n.startswith("latency table"))
        plan = next(n for n in notes if n.startswith("latency at batch 1"))
        before, predicted, timed_plan = (float(v) for v in re.findall(
            r"([\d.]+) ms before.*predicted ([\d.]+) ms, timed ([\d.]+) ms", plan)[0])
        with run_threads(a.threads):
            t0, t1 = timed(model, x), timed(res.model, x)
        print(f"{kind}: {table}; prune {wall:.1f} s wall, {cpu:.1f} s CPU; plan predicted "
              f"{predicted:.3f} ms, timed in the run {timed_plan:.3f} ms, timed again {t1:.3f} ms "
              f"(prediction {100 * (predicted / t1 - 1):+.1f}%); before {before:.3f} / {t0:.3f} ms, "
              f"speed-up {t0 / t1:.2f}x; load {os.getloadavg()[0]:.2f}")


def tables(model: onnx.ModelProto, calib: Path, a) -> None:
    groups, _ = trace_units(model, find_sites(model)[0])
    groups.sort(key=lambda g: g.node)
    orders = [np.arange(g.units) for g in groups]
    blocks = [16 if g.units >= 128 else 8 for g in groups]
    saved = {"parts": [], "whole": []}
    with run_threads(a.threads):
        ort = OnnxruntimeTimer(load_calibration(str(calib), model))
        for kind in ["parts", "whole"] * a.tables:
            os.environ["ONNX_OBS_CACHE_DIR"] = tempfile.mkdtemp(dir=a.workdir)
            timer = ort if kind == "parts" else (lambda m: ort(m))
            _, table, notes = latency_model(model, groups, orders, blocks, timer)
            saved[kind].append([ys[0] - ys[-1] for _, ys in table])
            print(f"{kind}: {notes[-1].split(',')[0]}; saved ms at the widest removal per group: "
                  + " ".join(f"{v:.3f}" for v in saved[kind][-1])
                  + f"; sum {sum(saved[kind][-1]):.3f}; load {os.getloadavg()[0]:.2f}")
    for kind, rows in saved.items():
        rows = np.array(rows)
        spread = (rows.max(0) - rows.min(0)) / np.median(rows, 0)
        sums = rows.sum(1)
        print(f"{kind}: spread over builds (max - min) / median per group: "
              + " ".join(f"{v:.0%}" for v in spread)
              + f"; of the sum {(sums.max() - sums.min()) / np.median(sums):.0%}")


if __name__ == "__main__":
    main()
