"""Structured removal of whole units (neurons, channels): the model gets smaller and faster.

One producer layer at a time in graph order (sequential, like the layer-wise
pipeline: each layer's consumers are captured on the model as already shrunk):
  1. trace which columns of which consumer layers each unit feeds (graph.tracing);
  2. method "obs": capture the consumers' Hessians with a constant-1 input appended (so a bias
     can absorb what a removed unit contributed on average) and remove units by group OBS
     (algorithms.structured), writing the corrected consumer weights and biases;
     method "magnitude": remove the units whose producer rows have the smallest L1 norm, no
     correction;
  3. cut the units out of every tensor they own and re-run shape inference (graph.surgery).
Targets: --sparsity removes that fraction of the units of every layer that has removable units.
--target-params / --target-flops plan per-layer counts for the whole model first, on the
original model: each layer's greedy removal curve (group-OBS cost of each next unit, divided by
the layer's consumer output energy so that costs are relative output errors comparable across
layers; for magnitude the L1 norms divided by their layer mean) is merged greedily, cheapest
relative error per parameter (or MAC) saved first, until the target is met.
"""

from __future__ import annotations

import math
import time

import numpy as np
import onnx

from onnx_obs.algorithms.layerwise import layer_error
from onnx_obs.algorithms.structured import (
    Consumer,
    group_obs,
    l1_order,
    output_energy,
    plan_counts,
)
from onnx_obs.errors import OnnxObsError
from onnx_obs.flops import resource_model
from onnx_obs.graph.model_io import iter_tensors
from onnx_obs.graph.sites import find_sites, site_matrix, write_matrix
from onnx_obs.graph.surgery import read_bias, shrink, write_bias
from onnx_obs.graph.tracing import trace_units
from onnx_obs.graph.units import UnitGroup
from onnx_obs.hessian.capture import capture_hessians
from onnx_obs.strategies.context import Context

MAX_STEPS = 64   # greedy steps per layer at most: larger layers remove several units per step
CHANNEL_BLOCKS = ((16, 128), (8, 16))   # (multiple, from how many units on): see _multiple


def run(ctx: Context) -> None:
    """Remove units from the model in place; fill report.structure and report.skipped; leave the
    sites of the shrunk model in ctx.sites."""
    loaded, cal, report, bar, c = ctx.loaded, ctx.cal, ctx.report, ctx.bar, ctx.config
    method, sparsity, damp, device = c.method, c.sparsity, c.layerwise.damp, c.device
    target_params, target_flops = c.structured.target_params, c.structured.target_flops
    model = loaded.model
    original = onnx.ModelProto()
    original.CopyFrom(model)
    sites, _ = find_sites(model)
    chosen = {s.name for s in sites if c.selection.picks(s)}
    groups, left = trace_units(model, sites, chosen)
    report.skipped += [{"name": x.name, "op_type": x.op_type, "reason": "units kept: " + x.reason}
                       for x in left]
    if not groups:
        why = f" ({left[0].name}: {left[0].reason})" if left else ""
        raise OnnxObsError(f"no selected layer has units that can be removed{why}: check "
                           "--include/--exclude/--op-types")
    groups.sort(key=lambda g: g.node)
    target = target_params if target_params is not None else target_flops
    if target is not None:
        kind = "params" if target_params is not None else "macs"
        counts = _plan(loaded, groups, cal, method, damp, device, bar, target, kind, report)
    else:
        asked = {g.producer.name: min(round(sparsity * g.units), g.units - 1) for g in groups}
        counts = {g.producer.name: _aligned(g.units, asked[g.producer.name], _multiple(g))
                  for g in groups}
        moved = [f"{g.producer.name} {g.units} -> {g.units - counts[g.producer.name]}"
                 for g in groups if counts[g.producer.name] != asked[g.producer.name]]
        if moved:
            report.notes.append(
                "channels kept at multiples of 8 or 16, which onnxruntime's fast CPU convolutions "
                f"need (else the smaller model can run slower): {', '.join(moved)}")
    task = bar.add("removing units", total=len(groups))
    for name in [g.producer.name for g in groups]:
        t0 = time.perf_counter()
        sites, _ = find_sites(model)
        now, lost = trace_units(model, sites, {name})
        if not now:
            report.notes.append(f"{name}: units kept: {lost[0].reason}")
            continue
        group, n = now[0], counts[name]
        entry = {"name": name, "op": group.producer.op_type, "units_before": group.units,
                 "units_after": group.units - n,
                 "consumers": [c.site.name for c in group.consumers],
                 "predicted_error": 0.0, "measured_error": 0.0, "relative_error": 0.0}
        if method == "obs":
            removed = _obs_step(loaded, group, n, cal, damp, device, bar, entry) if n else []
        else:
            removed = l1_order(site_matrix(group.producer, loaded.base_dir))[0][:n]
            entry["predicted_error"] = entry["measured_error"] = entry["relative_error"] = None
        shrink(model, group, removed, loaded.base_dir)
        entry["removed"] = sorted(int(u) for u in removed)
        entry["seconds"] = time.perf_counter() - t0
        report.structure.append(entry)
        bar.advance(task, what=name)
    _full_check(model, original, report)
    ctx.sites = find_sites(model)[0]


def _multiple(group: UnitGroup) -> int:
    """The multiple a layer's kept unit count should stay at: onnxruntime's fastest CPU
    convolutions (MLAS NCHWc) need channel counts in blocks of 8 (AVX2) or 16 (AVX-512), and a
    Conv that loses them runs in plain NCHW between layout reorders, slower than before removal
    (a MobileNet-style CNN with 30% of its channels removed: 0.39 -> 1.05 ms at batch 32).
    Counts already in such blocks stay so (blocks of 16 from 128 units on, where they cost at
    most 1/8 of the units; else of 8); 1 for layers without a Conv or not in blocks."""
    if group.producer.layout not in ("conv", "convT") and not any(
            c.site.layout == "conv" for c in group.consumers):
        return 1
    return next((m for m, least in CHANNEL_BLOCKS if group.units % m == 0 and group.units >= least), 1)


def _aligned(units: int, n: int, multiple: int) -> int:
    """n units to remove, moved so that the kept count is the nearest multiple (at least one)."""
    if multiple == 1:
        return n
    keep = max(multiple, multiple * math.floor((units - n) / multiple + 0.5))
    return units - keep


def _full_check(model, original, report) -> None:
    """onnx.checker with full_check (shape inference included), unless the input fails it too.
    With external data the checker would look for the files in the working directory: the strict
    shape inference of every shrink step and the pipeline's own check_proto stand in for it."""
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in iter_tensors(model.graph)):
        return
    errors = (onnx.checker.ValidationError, onnx.shape_inference.InferenceError)
    try:
        onnx.checker.check_model(model, full_check=True)
    except errors as e:
        try:
            onnx.checker.check_model(original, full_check=True)
        except errors:
            report.notes.append("the input model fails onnx.checker with full_check, so the shrunk "
                                "one is checked without it")
            return
        raise OnnxObsError(f"the shrunk model fails onnx.checker ({str(e).splitlines()[0]}): "
                           "nothing written; please report this") from e


def _consumers(loaded, group: UnitGroup, hessians: dict) -> list[Consumer]:
    """The algorithm's view of each consumer: W (with its bias as a last column where the bias
    can absorb a correction) and the matching Hessian (H of [x; 1], or of x alone)."""
    out = []
    for c in group.consumers:
        W = site_matrix(c.site, loaded.base_dir)
        H = hessians[c.site.name][0]
        if c.bias is not None:
            W = np.hstack([W, read_bias(loaded.model, c.bias, loaded.base_dir)[:, None]])
        else:
            H = H[:-1, :-1]
        out.append(Consumer(W, H, c.columns))
    return out


def _obs_step(loaded, group, n, cal, damp, device, bar, entry) -> np.ndarray:
    hessians = capture_hessians(loaded, [c.site for c in group.consumers], cal, device, bar, with_bias=True)
    consumers = _consumers(loaded, group, hessians)
    result = group_obs(consumers, n, damp=damp, step=math.ceil(n / MAX_STEPS))
    for c, con, W in zip(group.consumers, consumers, result.weights):
        entry["measured_error"] += layer_error(con.weight, W, con.hessian)
        if c.bias is not None:
            write_bias(loaded.model, c.bias, W[:, -1])
            W = W[:, :-1]
        write_matrix(c.site, W)
    entry["predicted_error"] = float(result.costs.sum())
    energy = output_energy(consumers)
    entry["relative_error"] = entry["measured_error"] / energy if energy > 0 else 0.0
    return result.order


def _plan(loaded, groups, cal, method, damp, device, bar, target, kind, report) -> dict:
    """Per-layer unit counts that meet a whole-model target (see the module docstring)."""
    if method == "obs":
        consumer_sites = list({c.site.name: c.site for g in groups for c in g.consumers}.values())
        hessians = capture_hessians(loaded, consumer_sites, cal, device, bar, with_bias=True)
    curves = []
    for g in groups:
        limit = g.units - 1
        if method == "obs":
            consumers = _consumers(loaded, g, hessians)
            costs = group_obs(consumers, limit, damp=damp, step=math.ceil(limit / MAX_STEPS)).costs
            energy = output_energy(consumers)
            curves.append(costs / energy if energy > 0 else costs)
        else:
            curves.append(l1_order(site_matrix(g.producer, loaded.base_dir))[1][:limit])
    resource = resource_model(loaded.model, groups, kind)
    start = resource(np.zeros(len(groups)))
    if start <= target:
        report.notes.append(f"the model already has {start:,.0f} {kind}, within the target "
                            f"{target:,.0f}: nothing removed")
    try:
        counts = plan_counts(curves, resource, target, steps=[_multiple(g) for g in groups])
    except ValueError as e:   # the target is out of reach
        raise OnnxObsError(str(e)) from e
    return {g.producer.name: int(k) for g, k in zip(groups, counts)}
