"""Structured removal of whole units (neurons, channels): the model gets smaller and faster.

One group of units at a time in graph order (a group: one producer layer, or several whose
channels meet in residual Adds or gates, graph/tracing.py) (sequential, like the layer-wise
pipeline: each layer's consumers are captured on the model as already shrunk):
  1. trace which columns of which consumer layers each unit feeds (graph.tracing);
  2. method "obs": capture the consumers' Hessians with a constant-1 input appended (so a bias
     can absorb what a removed unit contributed on average) and choose units by group OBS
     (algorithms.structured); each consumer whose node output is its whole output is then refit
     by least squares to the ORIGINAL model's output from its inputs in the shrunk model
     (hessian/targets.py: it also makes up for the groups removed before), the others keep
     OBS's correction;
     method "magnitude": remove the units with the smallest L1 norm over every weight entry
     they own (producers' rows, consumers' columns: the whole coupling group), no correction;
  3. cut the units out of every tensor they own and re-run shape inference (graph.surgery).
Targets: --sparsity removes that fraction of the units of every layer that has removable units.
--target-params / --target-flops / --target-speedup (MACs divided by it; with --latency measured,
and --target-latency-ms: batch-1 latency as the measured table of latency_table.py predicts)
plan per-layer counts for the whole model: each layer's greedy removal curve (group-OBS cost of
each next unit, divided by the layer's consumer output energy; for obs then scaled by the
group's measured output sensitivity, strategies/group_sensitivity.py, so that costs are relative
errors of the model's output; for magnitude the L1 norms divided by their layer mean) is merged
greedily, cheapest error per parameter (MAC, ms) saved first, until the target is met. With obs
the way to the target is cut into PLAN_ROUNDS equal ratios, each planned and removed on the
model as shrunk by the rounds before (curves, sensitivities and timings measured afresh).
"""

from __future__ import annotations

import math
import time

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_obs.algorithms.layerwise import layer_error
from onnx_obs.algorithms.structured import (
    Consumer,
    group_obs,
    norm_order,
    output_energy,
    plan_counts,
    refit_to_targets,
)
from onnx_obs.errors import OnnxObsError
from onnx_obs.flops import count_macs, resource_model
from onnx_obs.graph.canonical import canonicalize
from onnx_obs.graph.model_io import iter_tensors
from onnx_obs.graph.protos import constants
from onnx_obs.graph.sites import find_sites, site_matrix, write_matrix
from onnx_obs.graph.surgery import read_bias, shrink, write_bias
from onnx_obs.graph.tracing import trace_units
from onnx_obs.graph.units import ConsumerUse, LeftAlone, UnitGroup
from onnx_obs.hessian.capture import capture_hessians
from onnx_obs.hessian.targets import capture_targets, supported
from onnx_obs.latency_table import FRACTIONS, OnnxruntimeTimer, latency_model
from onnx_obs.strategies.context import Context
from onnx_obs.strategies.group_sensitivity import GroupProbe, probe_counts, scale_curve

PLAN_ROUNDS = 3  # structured OBS with a target: planned and removed in rounds (see _plan)
MAX_STEPS = 64   # greedy steps per layer at most: larger layers remove several units per step
CHANNEL_BLOCKS = ((16, 128), (8, 16))   # (multiple, from how many units on): see _multiple


def run(ctx: Context) -> None:
    """Remove units from the model in place; fill report.structure and report.skipped; leave the
    sites of the shrunk model in ctx.sites."""
    loaded, report, bar, c = ctx.loaded, ctx.report, ctx.bar, ctx.config
    method, sparsity = c.method, c.sparsity
    target_params, target_flops = c.structured.target_params, c.structured.target_flops
    model = loaded.model
    original = onnx.ModelProto()
    original.CopyFrom(model)
    sites, _ = find_sites(model)
    canonicalize(model, {s.tensor_name for s in sites})
    sites, _ = find_sites(model)
    chosen = {s.name for s in sites if c.selection.picks(s)}
    groups, left = _traced(model, sites, chosen)
    report.skipped += [{"name": x.name, "op_type": x.op_type, "reason": "units kept: " + x.reason}
                       for x in left]
    if not groups:
        why = f" ({left[0].name}: {left[0].reason})" if left else ""
        raise OnnxObsError(f"no selected layer has units that can be removed{why}: check "
                           "--include/--exclude/--op-types")
    target = target_params if target_params is not None else target_flops
    kind = "params" if target_params is not None else "macs"
    st = c.structured
    if st.target_latency_ms is not None or (st.target_speedup is not None and st.latency == "measured"):
        kind, target = "latency", st.target_latency_ms
    elif st.target_speedup is not None:
        target = count_macs(model)[0] / st.target_speedup
        report.notes.append(f"--target-speedup {st.target_speedup:g}: at most "
                            f"{target:,.0f} MACs per sample (MACs stand in for latency; "
                            "--latency measured times the widths instead)")
    if kind == "latency" and target is None:   # --target-speedup S: the model as given, timed / S
        target = _timer(ctx)(model) / st.target_speedup
    rounds = PLAN_ROUNDS if target is not None and method == "obs" else 1
    state = _Removal(original)
    given = {g.producer.name: g.units for g in groups}
    for r in range(rounds):
        if r:
            sites = find_sites(model)[0]
            groups, _ = _traced(model, sites, chosen)
        if target is not None:
            counts = _plan(ctx, groups, target, kind, sites, rounds - r, given, first=not r)
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
        task = bar.add("removing units" + (f" (round {r + 1} of {rounds})" if rounds > 1 else ""),
                       total=len(groups))
        for name in [g.producer.name for g in groups]:
            _remove_group(ctx, state, name, counts[name])
            bar.advance(task, what=name)
    report.structure += state.entries.values()
    _full_check(model, original, report)
    ctx.sites = find_sites(model)[0]


def _traced(model, sites, chosen) -> tuple[list[UnitGroup], list[LeftAlone]]:
    """The coupling groups whose producers are all selected, in graph order, and what is left."""
    groups, left = trace_units(model, sites, chosen)
    for g in [g for g in groups if any(p.name not in chosen for p in g.producers)]:
        groups.remove(g)
        others = ", ".join(p.name for p in g.producers if p.name not in chosen)
        left += [LeftAlone(p.name, p.op_type, f"coupled with {others}, not selected")
                 for p in g.producers if p.name in chosen]
    # a depthwise conv has no units of its own, but one that a group cuts loses channels with it
    cut = {c.tensor for g in groups for c in g.cuts}
    left = [x for x in left if not (x.reason.startswith("depthwise Conv") and x.name in cut)]
    return sorted(groups, key=lambda g: g.node), left


class _Removal:
    """What the removal rounds share: the original model (the refit's targets), each site's
    original rows still present, each group's original unit indices still present and its
    report entry (one per group over all rounds)."""

    def __init__(self, original: onnx.ModelProto):
        self.original = original
        self.rows: dict[str, np.ndarray] = {}
        self.units: dict[str, np.ndarray] = {}
        self.entries: dict[str, dict] = {}


def _remove_group(ctx: Context, state: _Removal, name: str, n: int) -> None:
    """Trace the group named `name` on the model as it is now, remove n of its units (OBS with
    the refit, or by L1 norm) and record them in its report entry."""
    loaded, report, model = ctx.loaded, ctx.report, ctx.loaded.model
    t0 = time.perf_counter()
    sites, _ = find_sites(model)
    now, lost = trace_units(model, sites, {name})
    if not now:
        report.notes.append(f"{name}: units kept: {lost[0].reason}")
        return
    group = now[0]
    entry = {"name": name, "op": group.producer.op_type,
             "producers": [p.name for p in group.producers], "units_before": group.units,
             "units_after": group.units - n,
             "consumers": [c.site.name for c in group.consumers],
             "predicted_error": 0.0, "measured_error": 0.0, "relative_error": 0.0}
    if ctx.config.method == "obs":
        removed = _obs_step(ctx, state.original, state.rows, group, n, entry)
    else:
        removed = norm_order(_group_l1(loaded, group, sites))[0][:n]
        entry["predicted_error"] = entry["measured_error"] = entry["relative_error"] = None
    removed = _none_emptied(model, group, list(removed), report)
    _track_rows(state.rows, group, removed)
    shrink(model, group, removed, loaded.base_dir)
    units = state.units.get(name, np.arange(group.units))
    state.units[name] = np.delete(units, np.asarray(removed, dtype=np.int64))
    entry["removed"] = sorted(int(units[u]) for u in removed)
    entry["seconds"] = time.perf_counter() - t0
    if name in state.entries:   # a later round: one entry per group
        first = state.entries[name]
        entry["units_before"] = first["units_before"]
        entry["removed"] = sorted(first["removed"] + entry["removed"])
        for key in ("predicted_error", "measured_error", "relative_error", "seconds"):
            if entry[key] is not None:
                entry[key] += first[key]
    state.entries[name] = entry


def _multiple(group: UnitGroup, units: int | None = None) -> int:
    """The multiple a layer's kept unit count should stay at: onnxruntime's fastest CPU
    convolutions (MLAS NCHWc) need channel counts in blocks of 8 (AVX2) or 16 (AVX-512), and a
    Conv that loses them runs in plain NCHW between layout reorders, slower than before removal
    (a MobileNet-style CNN with 30% of its channels removed: 0.39 -> 1.05 ms at batch 32).
    Counts already in such blocks stay so (blocks of 16 from 128 units on, where they cost at
    most 1/8 of the units; else of 8); 1 for layers without a Conv or not in blocks. `units`:
    the count the group had in the model as given (later rounds keep its blocks)."""
    if group.producer.layout not in ("conv", "convT") and not any(
            c.site.layout == "conv" for c in group.consumers):
        return 1
    units = group.units if units is None else units
    return next((m for m, least in CHANNEL_BLOCKS if units % m == 0 and units >= least), 1)


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


def _obs_step(ctx: Context, original, rows, group, n, entry) -> np.ndarray:
    """Choose n units by group OBS; the consumers that can (hessian/targets.supported) are refit
    to the original model's outputs on the columns left, the others keep OBS's correction."""
    loaded, cal, device, damp = ctx.loaded, ctx.cal, ctx.config.device, ctx.config.layerwise.damp
    refit = [j for j, u in enumerate(group.consumers) if _refittable(loaded.model, u)]
    if not n and not refit:
        return []
    hessians = capture_hessians(loaded, [u.site for u in group.consumers], cal, device, ctx.bar,
                                with_bias=True, phases=ctx.report.phases)
    consumers = _consumers(loaded, group, hessians)
    with ctx.report.phases("solves"):
        result = group_obs(consumers, n, damp=damp, step=math.ceil(n / MAX_STEPS))
    weights = list(result.weights)
    if refit:
        sites = [group.consumers[j].site for j in refit]
        stats = capture_targets(loaded.model, original, loaded.base_dir, sites,
                                {s.name: rows.get(s.name, np.arange(s.matrix_shape[0])) for s in sites},
                                [group.consumers[j].bias is not None for j in refit], cal.batches, device)
        for j, s in zip(refit, sites):
            H, B = stats[s.name]
            gone = np.concatenate([consumers[j].columns[u] for u in result.order] or [[]])
            weights[j] = refit_to_targets(B, H, gone, damp)
    for j, (u, con, W) in enumerate(zip(group.consumers, consumers, weights)):
        if not n and j not in refit:   # nothing removed: only the refit changes a consumer
            continue
        entry["measured_error"] += layer_error(con.weight, W, con.hessian)
        if u.bias is not None:
            write_bias(loaded.model, u.bias, W[:, -1])
            W = W[:, :-1]
        write_matrix(u.site, W)
    entry["predicted_error"] = float(result.costs.sum())
    energy = output_energy(consumers)
    entry["relative_error"] = entry["measured_error"] / energy if energy > 0 else 0.0
    return result.order


def _refittable(model, use: ConsumerUse) -> bool:
    """Whether the consumer's node output is its whole output (its bias, if any, inside it)."""
    return supported(use.site) and (use.bias is None or (
        use.bias.tensor is not None and model.graph.node[use.bias.node].output[0] == use.site.uses[0].output))


def _track_rows(rows: dict, group: UnitGroup, removed) -> None:
    """Drop the removed units' rows from rows[producer] (original row indices still present)."""
    if not removed:
        return
    for p in group.producers:
        cut = next((c for c in group.cuts if c.tensor == p.tensor_name and not p.scope), None)
        if cut is not None:
            kept = rows.get(p.name, np.arange(p.matrix_shape[0]))
            rows[p.name] = np.delete(kept, np.concatenate([cut.positions[u] for u in removed]))


def _none_emptied(model, group: UnitGroup, removed: list[int], report) -> list[int]:
    """The removed units less the last ones that would empty a tensor along its cut axis (a
    C2f block's bottleneck owns only part of its group's units). Such a unit stays with its
    consumer columns as OBS left them (zero): the output is the same as with it removed."""
    consts = constants(model.graph)
    for cut in group.cuts:
        dim = int(consts[cut.tensor].dims[cut.axis])
        owners = [u for u in removed if len(cut.positions[u])]
        while owners and sum(len(cut.positions[u]) for u in owners) >= dim:
            back = owners.pop()
            removed.remove(back)
            report.notes.append(f"{group.producer.name}: unit {back} kept, else '{cut.tensor}' "
                                "would lose every channel")
    return removed


def _group_l1(loaded, group: UnitGroup, sites) -> np.ndarray:
    """Per unit, the L1 norm of every layer weight entry it owns: the producers' rows, the
    consumers' columns, depthwise kernels on the path (Torch-Pruning's group magnitude)."""
    weights = {s.name for s in sites}
    consts = constants(loaded.model.graph)
    norms = np.zeros(group.units)
    for cut in group.cuts:
        if cut.tensor in weights:
            a = np.abs(numpy_helper.to_array(consts[cut.tensor], loaded.base_dir).astype(np.float64))
            norms += [a.take(p, axis=cut.axis).sum() for p in cut.positions]
    return norms


def _plan(ctx: Context, groups, target, kind, sites, rounds_left: int = 1,
          given: dict | None = None, first: bool = True) -> dict:
    """Per-layer unit counts that meet a whole-model target (see the module docstring); with
    rounds_left > 1 the count still above the target is cut by its rounds_left-th root (equal
    ratios per round), the rest left to the next rounds, planned on the model as shrunk.
    given: each group's unit count in the model as given (its blocks, _multiple)."""
    loaded, cal, bar, report, c = ctx.loaded, ctx.cal, ctx.bar, ctx.report, ctx.config
    method, damp, device = c.method, c.layerwise.damp, c.device
    if method == "obs":
        consumer_sites = list({c.site.name: c.site for g in groups for c in g.consumers}.values())
        hessians = capture_hessians(loaded, consumer_sites, cal, device, bar, with_bias=True,
                                    phases=report.phases)
    curves, orders, consumer_lists = [], [], []
    for g in groups:
        limit = g.units - 1
        if method == "obs":
            consumers = _consumers(loaded, g, hessians)
            consumer_lists.append(consumers)
            with report.phases("solves"):
                result = group_obs(consumers, limit, damp=damp, step=math.ceil(limit / MAX_STEPS))
            energy = output_energy(consumers)
            curves.append(result.costs / energy if energy > 0 else result.costs)
            orders.append(result.order)
        else:
            order, norms = norm_order(_group_l1(loaded, g, sites))
            curves.append(norms[:limit])
            orders.append(order)
    steps = [_multiple(g, (given or {}).get(g.producer.name)) for g in groups]
    if method == "obs" and cal is not None:
        with report.phases("probes"):
            curves = _measured_curves(ctx, groups, consumer_lists, curves, orders, steps)
    if kind == "latency":
        with report.phases("latency"):
            return _plan_latency(ctx, groups, curves, orders, steps, target, rounds_left, first)
    resource = resource_model(loaded.model, groups, kind, orders)
    start = resource(np.zeros(len(groups)))
    if start > target and rounds_left > 1:
        target = start * (target / start) ** (1.0 / rounds_left)
    if start <= target:
        report.notes.append(f"the model already has {start:,.0f} {kind}, within the target "
                            f"{target:,.0f}: nothing removed")
    try:
        counts = plan_counts(curves, resource, target, steps=steps)
    except ValueError as e:   # the target is out of reach
        raise OnnxObsError(str(e)) from e
    return {g.producer.name: int(k) for g, k in zip(groups, counts)}


def _measured_curves(ctx: Context, groups, consumer_lists, curves, orders, steps) -> list[np.ndarray]:
    """The curves scaled by each group's measured output sensitivity (strategies/group_sensitivity)."""
    c = ctx.config
    probe = GroupProbe(ctx.loaded, ctx.cal, c.device)
    task = ctx.bar.add("measuring group sensitivity", total=len(groups))
    scaled = []
    for g, consumers, curve, order, step in zip(groups, consumer_lists, curves, orders, steps):
        counts = probe_counts(len(curve), step)
        measured = [probe.error(g, consumers, order[:k], c.layerwise.damp) for k in counts]
        scaled.append(scale_curve(curve, counts, measured))
        ctx.bar.advance(task, what=g.producer.name)
    return scaled


def _timer(ctx: Context):
    if ctx.timer is None and ctx.cal is None:
        raise OnnxObsError("--target-latency-ms and --latency measured time the model on its "
                           "calibration data: pass --calib DATA.npz")
    return ctx.timer or OnnxruntimeTimer(ctx.cal, ctx.loaded.base_dir, ctx.config.device)


def _plan_latency(ctx: Context, groups, curves, orders, steps, final_ms, rounds_left=1,
                  first=True) -> dict:
    """Counts by lowest error per measured ms saved (ZipLM): the latency table predicts, the
    plan's shrunk model is timed, and while it misses the target (the prediction is an estimate,
    latency_table.py) the target is tightened by the miss and the plan redone (3 rounds at most).
    With rounds_left > 1 the target is this round's share of the way to final_ms (as _plan)."""
    loaded, report = ctx.loaded, ctx.report
    timer = _timer(ctx)
    predict, _, notes = latency_model(loaded.model, groups, orders, steps, timer, loaded.base_dir)
    report.notes += [n for n in notes if n not in report.notes]
    base = predict(np.zeros(len(groups)))
    least = predict(np.array([len(c) // s * s for c, s in zip(curves, steps)]))
    if first and least > final_ms:
        raise _unreachable(least, final_ms)
    target_ms = final_ms
    if base > final_ms and rounds_left > 1:
        target_ms = base * (final_ms / base) ** (1.0 / rounds_left)
    goal, counts, measured = target_ms, None, base
    for _ in range(3):
        try:
            plan = plan_counts(curves, predict, goal, steps=steps)
        except ValueError:   # the target is out of reach
            if counts is not None:   # a tightened goal: keep the last plan
                break
            if not first:   # a later round: keep what the earlier ones removed
                report.notes.append(f"latency target not met: the model as shrunk so far times "
                                    f"{base:.3f} ms, and what is left cannot reach {final_ms:.3f} ms")
                return {g.producer.name: 0 for g in groups}
            raise _unreachable(least, target_ms) from None
        counts = plan
        measured = timer(_shrunk_plan(loaded, groups, orders, counts))
        if measured <= target_ms * 1.02:
            break
        goal *= target_ms / measured
    if rounds_left == 1:   # the last round: how the plan met the final target
        report.notes.append(
            f"latency at batch 1 (each group timed at {len(FRACTIONS) + 1} widths): {base:.3f} ms before, "
            f"target {target_ms:.3f} ms; plan predicted {predict(counts):.3f} ms, timed {measured:.3f} ms")
        if measured > target_ms * 1.02:
            report.notes.append(f"latency target not met: the plan timed {measured:.3f} ms, above the "
                                f"target {target_ms:.3f} ms (the units left cannot go, or timing is "
                                "noisy: see the latency rows)")
    return {g.producer.name: int(k) for g, k in zip(groups, counts)}


def _unreachable(least: float, target_ms: float) -> OnnxObsError:
    why = ("above" if least > target_ms else
           "yet no plan removing units group by group gets below")   # the table's groups interact
    return OnnxObsError(f"the latency target cannot be reached: the smallest model removing units "
                        f"can leave is predicted at {least:.3f} ms at batch 1, {why} the target "
                        f"{target_ms:.3f} ms: raise the target")


def _shrunk_plan(loaded, groups, orders, counts) -> onnx.ModelProto:
    """A copy of the model with each group's first counts[g] units (in orders[g]) removed, traced
    afresh after each group as the removal loop does."""
    model = onnx.ModelProto()
    model.CopyFrom(loaded.model)
    for g, group in enumerate(groups):
        now, _ = trace_units(model, find_sites(model)[0], {group.producer.name})
        if now and counts[g]:
            shrink(model, now[0], orders[g][:counts[g]], loaded.base_dir)
    return model
