"""Measured latency of a model as a function of how many units each group loses (ZipLM-style
latency-aware allocation, issue 17): each group alone is shrunk to a few widths (a quarter, half,
three quarters and all but the last block of its units removed, kept counts in the group's
blocks of 8/16), the shrunk model is timed, and between those widths the latency is
interpolated linearly. Groups are taken as independent: predicted latency = base + the sum over
groups of (latency with that group shrunk - base). That overstates the saving where one layer
loses both input and output channels (its cost is their product), so the strategy re-times its
plan and tightens the target (strategies/structured.py)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx

from onnx_obs.calib import Calibration
from onnx_obs.flops import batch_feeds, latency_ms
from onnx_obs.graph.surgery import shrink
from onnx_obs.runtime import Runner

Timer = Callable[[onnx.ModelProto], float]
FRACTIONS = (0.25, 0.5, 0.75)   # of the units removed, besides all but the last block


def onnxruntime_timer(cal: Calibration, base_dir: str = "", device: str = "cpu",
                      budget_s: float = 0.15) -> Timer:
    """Milliseconds per run at batch 1 (median of repeated runs), on the calibration's first sample."""
    feeds = batch_feeds(cal.batches, 1) if cal.sliceable else cal.batches[0]

    def timer(model: onnx.ModelProto) -> float:
        session = Runner(model, base_dir, device).session
        return latency_ms(session, feeds, max_runs=50, budget_s=budget_s)

    return timer


def widths(units: int, multiple: int) -> list[int]:
    """Unit counts to remove at which a group is timed: kept counts stay multiples of `multiple`
    (at least one block), increasing, without repeats."""
    keep_least = multiple if units > multiple else 1
    out = {units - max(keep_least, multiple * round((units - units * f) / multiple))
           for f in FRACTIONS} | {units - keep_least}
    return sorted(k for k in out if k > 0)


def shrunk_copy(model: onnx.ModelProto, group, removed, base_dir: str = "") -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    shrink(copy, group, removed, base_dir)
    return copy


def latency_model(model: onnx.ModelProto, groups, orders: list[np.ndarray],
                  multiples: list[int], timer: Timer, base_dir: str = ""
                  ) -> tuple[Callable[[np.ndarray], float], list[tuple[np.ndarray, np.ndarray]]]:
    """(predicted latency as a function of the per-group counts removed, the table: per group the
    counts timed, from 0, and their latencies). Latencies are made non-increasing in the count
    (timing noise must not make a removal look like it costs time)."""
    base = timer(model)
    table = []
    for g, group in enumerate(groups):
        xs = widths(group.units, multiples[g])
        ys = [timer(shrunk_copy(model, group, orders[g][:k], base_dir)) for k in xs]
        table.append((np.array([0] + xs, dtype=np.float64),
                      np.minimum.accumulate(np.array([base] + ys, dtype=np.float64))))

    def predict(counts: np.ndarray) -> float:
        return base + sum(float(np.interp(counts[g], xs, ys)) - base
                          for g, (xs, ys) in enumerate(table))

    return predict, table
