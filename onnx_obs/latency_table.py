"""Measured latency of a model as a function of how many units each group loses (ZipLM-style
latency-aware allocation, issue 17): each group alone is shrunk to a few widths (a quarter, half,
three quarters and all but the last block of its units removed, kept counts in the group's
blocks of 8/16), the shrunk model is timed, and between those widths the latency is
interpolated linearly; where groups' savings overlap (one layer losing input and output
channels) the MACs model corrects the sum (latency_model). The strategy re-times its plan and
tightens the target while it misses (strategies/structured.py). Tables timed with onnxruntime
are cached on disk (latency_cache.py)."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort

from onnx_obs import latency_cache
from onnx_obs.calib import Calibration
from onnx_obs.errors import OnnxObsError
from onnx_obs.flops import batch_feeds, latency_ms, resource_model
from onnx_obs.graph.capture import with_outputs
from onnx_obs.graph.protos import infer_shapes
from onnx_obs.graph.subgraph import group_region, region_group, region_model
from onnx_obs.graph.surgery import shrink
from onnx_obs.runtime import Runner
from onnx_obs.threads import current_threads

Timer = Callable[[onnx.ModelProto], float]
FRACTIONS = (0.25, 0.5, 0.75)   # of the units removed, besides all but the last block


class OnnxruntimeTimer:
    """Milliseconds per run at batch 1 (median of repeated runs) on the calibration's first
    sample; its fingerprint says what else the figure depends on (the cache key)."""

    def __init__(self, cal: Calibration, base_dir: str = "", device: str = "cpu",
                 budget_s: float = 0.15):
        self.feeds = batch_feeds(cal.batches, 1) if cal.sliceable else cal.batches[0]
        self.base_dir, self.device, self.budget_s = base_dir, device, budget_s

    def __call__(self, model: onnx.ModelProto) -> float:
        return self.measure(model, self.feeds)

    def measure(self, model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> float:
        session = Runner(model, self.base_dir, self.device).session
        return latency_ms(session, feeds, max_runs=50, budget_s=self.budget_s)

    def fingerprint(self) -> dict:
        return {"onnxruntime": ort.__version__, "threads": current_threads(), "batch": 1,
                "device": self.device, "budget_s": self.budget_s,
                "inputs": {k: [list(v.shape), str(v.dtype)] for k, v in sorted(self.feeds.items())},
                "machine": [platform.machine(), platform.processor(), platform.node(),
                            os.cpu_count()]}


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
                  ) -> tuple[Callable[[np.ndarray], float], list[tuple[np.ndarray, np.ndarray]],
                             list[str]]:
    """(predicted latency as a function of the per-group counts removed, the table: per group the
    counts timed, from 0, and their latencies, notes for the report: where the table came from).
    Latencies are made non-increasing in the count (_monotone: timing noise must not make a
    removal look like it costs time, nor hide what it saves).

    Prediction: T = T0 + sum_g (T_g(k_g) - T0) + r * (M(k) - M0 - sum_g (M_g(k_g) - M0)), with
    T_g the table, M the MACs model (flops.resource_model) and r = ms per MAC over the table's
    widest removals: the last term puts back the MACs that two groups' savings both counted (a
    layer losing input and output channels saves their product, not the sum)."""
    xs_all = [widths(group.units, multiples[g]) for g, group in enumerate(groups)]
    base, raw, notes = _cached_table(model, groups, orders, xs_all, timer, base_dir)
    table = [_monotone(np.array([0] + xs, dtype=np.float64), np.array(ys)) for xs, ys in zip(xs_all, raw)]
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

    saved_ms = sum(base - ys[-1] for _, ys in table)
    saved_macs = sum(m0 - macs_alone(g, int(xs[-1])) for g, (xs, _) in enumerate(table))
    rate = saved_ms / saved_macs if saved_macs > 0 else 0.0

    def predict(counts: np.ndarray) -> float:
        overlap = macs(counts) - m0 - sum(macs_alone(g, int(k)) - m0 for g, k in enumerate(counts))
        return base + sum(float(np.interp(counts[g], xs, ys)) - base
                          for g, (xs, ys) in enumerate(table)) + rate * overlap

    return predict, table, notes


def _monotone(xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A width timed no faster than a smaller removal (noise) takes the value interpolated
    between the widths that were faster (a running minimum would leave a flat stretch, where
    removing units looks free of gain and a greedy planner stops)."""
    kept = [0]
    for i in range(1, len(ys)):
        if ys[i] < ys[kept[-1]]:
            kept.append(i)
    return xs, np.interp(xs, xs[kept], ys[kept])


def _cached_table(model, groups, orders, xs_all, timer, base_dir):
    """(latency of the model, per group its latencies at 0 and xs_all[g] removed, notes): read
    from the disk cache when the timer has a fingerprint and an entry fits, else timed (and
    stored)."""
    notes, key = [], None
    if hasattr(timer, "fingerprint"):
        described = [([p.name for p in group.producers], group.units, xs)
                     for group, xs in zip(groups, xs_all)]
        key = latency_cache.table_key(model, described, timer.fingerprint())
        entry, note = latency_cache.load(key, xs_all)
        notes += [note] if note else []
        if entry is not None:
            path = latency_cache.entry_path(key)
            return entry["base"], entry["tables"], notes + [f"latency table: cached ({path})"]
    start = time.perf_counter()
    base, tables = _measure(model, groups, orders, xs_all, timer, base_dir)
    seconds = time.perf_counter() - start
    if key is None:
        return base, tables, [*notes, f"latency table: measured in {seconds:.1f} s (not cached)"]
    note = latency_cache.store(key, {"base": base, "tables": tables, "seconds": seconds})
    where = "not cached" if note else f"cached ({latency_cache.entry_path(key)})"
    measured = f"latency table: measured in {seconds:.1f} s, {where}"
    return base, tables, [*notes, *([note] if note else []), measured]


def _measure(model, groups, orders, xs_all, timer, base_dir) -> tuple[float, list[list[float]]]:
    """The whole model timed once; each group alone shrunk to each of its widths and timed: with
    onnxruntime, only the group's own part of the graph (graph/subgraph.py; the whole model minus
    that part's time is the same at every width), else (a caller's timer, or a part that cannot
    be cut out) the whole model."""
    base = float(timer(model))
    parts = _parts(model, groups, timer, base_dir) if isinstance(timer, OnnxruntimeTimer) else {}
    tables = []
    for g, group in enumerate(groups):
        if g in parts:
            sub, sub_group, feeds = parts[g]
            try:
                t0 = timer.measure(sub, feeds)
                tables.append([base] + [base - t0 + timer.measure(
                    shrunk_copy(sub, sub_group, orders[g][:k], base_dir), feeds) for k in xs_all[g]])
                continue
            except OnnxObsError:   # onnxruntime refuses the part alone: the whole model then
                pass
        tables.append([base] + [float(timer(shrunk_copy(model, group, orders[g][:k], base_dir)))
                                for k in xs_all[g]])
    return base, tables


def _parts(model, groups, timer: OnnxruntimeTimer, base_dir: str) -> dict[int, tuple]:
    """Per group that can be cut out: (its part as a model, the group renumbered for it, the
    part's feeds: the activations it reads, from one run of the whole model at batch 1)."""
    inferred = infer_shapes(model).graph
    infos = [*inferred.value_info, *inferred.output, *inferred.input]
    types = {v.name: v.type.tensor_type.elem_type for v in infos}
    ranks = {v.name: (v.type.tensor_type.elem_type, len(v.type.tensor_type.shape.dim))
             for v in infos if v.type.tensor_type.HasField("shape")}
    regions = {g: r for g, group in enumerate(groups)
               if (r := group_region(model, group, types)) is not None
               and all(o in ranks for o in r.outputs)}
    wanted = list(dict.fromkeys(x for r in regions.values() for x in r.inputs if x not in timer.feeds))
    values = dict(timer.feeds)
    try:
        if wanted:
            values.update(zip(wanted, Runner(with_outputs(model, wanted), base_dir, timer.device)
                              .run(timer.feeds, wanted)))
    except OnnxObsError:   # onnxruntime cannot give them: every group timed on the whole model
        return {}
    parts = {}
    for g, r in regions.items():
        specs = {x: (onnx.helper.np_dtype_to_tensor_dtype(values[x].dtype), list(values[x].shape))
                 for x in r.inputs}
        parts[g] = (region_model(model, r, specs, ranks), region_group(groups[g], r),
                    {x: values[x] for x in r.inputs})
    return parts
