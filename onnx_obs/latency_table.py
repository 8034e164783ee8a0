"""Measured latency of a model as a function of how many units each group loses (ZipLM-style
latency-aware allocation, issue 17): each group alone is shrunk to a few widths (a quarter, half,
three quarters and all but the last block of its units removed, kept counts in the group's
blocks of 8/16), the shrunk model is timed, and between those widths the latency is
interpolated linearly; where groups' savings overlap (one layer losing input and output
channels) the MACs model corrects the sum (latency_model). The strategy re-times its plan and
tightens the target while it misses (strategies/structured.py)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx

from onnx_obs.calib import Calibration
from onnx_obs.flops import batch_feeds, latency_ms, resource_model
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
    (timing noise must not make a removal look like it costs time).

    Prediction: T = T0 + sum_g (T_g(k_g) - T0) + r * (M(k) - M0 - sum_g (M_g(k_g) - M0)), with
    T_g the table, M the MACs model (flops.resource_model) and r = ms per MAC over the table's
    widest removals: the last term puts back the MACs that two groups' savings both counted (a
    layer losing input and output channels saves their product, not the sum)."""
    base = timer(model)
    macs = resource_model(model, groups, "macs", orders)
    zero = np.zeros(len(groups), dtype=np.int64)
    m0 = macs(zero)
    alone = [{} for _ in groups]   # per group: count -> MACs with that group alone shrunk

    def macs_alone(g: int, k: int) -> float:
        if k not in alone[g]:
            counts = zero.copy()
            counts[g] = k
            alone[g][k] = macs(counts)
        return alone[g][k]

    table = []
    for g, group in enumerate(groups):
        xs = widths(group.units, multiples[g])
        ys = [timer(shrunk_copy(model, group, orders[g][:k], base_dir)) for k in xs]
        table.append((np.array([0] + xs, dtype=np.float64),
                      np.minimum.accumulate(np.array([base] + ys, dtype=np.float64))))
    saved_ms = sum(base - ys[-1] for _, ys in table)
    saved_macs = sum(m0 - macs_alone(g, int(xs[-1])) for g, (xs, _) in enumerate(table))
    rate = saved_ms / saved_macs if saved_macs > 0 else 0.0

    def predict(counts: np.ndarray) -> float:
        overlap = macs(counts) - m0 - sum(macs_alone(g, int(k)) - m0 for g, k in enumerate(counts))
        return base + sum(float(np.interp(counts[g], xs, ys)) - base
                          for g, (xs, ys) in enumerate(table)) + rate * overlap

    return predict, table
