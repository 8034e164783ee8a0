"""--allocation auto: per-site sparsity levels that meet the global target at least predicted
output error (OBC's per-layer error tables and a knapsack over them, Frantar & Alistarh 2022),
chosen before the usual layer-wise pruning.

1. Hessians of the model as given, one capture pass for all sites, kept in ctx.hessians: pruning
   reuses them for every site when capture is not sequential, for the first wave when it is.
2. Tables: e_i(k), the layer error of site i at k zeros, on a grid of levels up to
   --max-layer-sparsity (algorithms.layerwise.error_curve: every GRID from the exact solver's
   greedy trace, every FAST_GRID from one fast-solver run per level; a site's row groups summed at
   the shares pruning gives them).
3. Sensitivity: e_i is in the units of site i's own output. Each site is pruned alone to the
   target level (fast solver), the others kept, and the model runs on some evenly spaced
   calibration samples (PROBE_VALUES; the part of the graph after the site, _Probe):
       D_i = sum_o ||y_o - y_o^(i)||^2 / ||y_o||^2     (relative output MSE, summed over outputs)
       kappa_i = D_i / e_i^0,    e_i^0 = the probe's layer error,
   and the predicted output error of site i at k zeros is kappa_i e_i(k) (to first order
   y - y^(i) = J_i (dW_i x), whose mean square scales with the layer error mean ||dW_i x||^2).
4. algorithms.allocation: counts k_i (within each table) with sum_i k_i = round(sparsity *
   sum_i size_i) minimising sum_i kappa_i e_i(k_i).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from onnx_obs.algorithms.allocation import allocate, exact_counts, interpolated_error
from onnx_obs.algorithms.layerwise import (
    FastLevels,
    error_curve,
    group_traces,
    layer_error,
    prune_layer,
    prune_row_groups,
    runs_exact,
)
from onnx_obs.algorithms.masks import spread_zeros
from onnx_obs.calib import Calibration, model_inputs
from onnx_obs.errors import OnnxObsError
from onnx_obs.graph.capture import site_depths, with_outputs, with_weight_inputs
from onnx_obs.graph.sites import Site, site_matrix
from onnx_obs.graph.slicing import Unsliceable, slice_model, tail_plan
from onnx_obs.hessian.capture import capture_hessians
from onnx_obs.metrics import relative_mse
from onnx_obs.runtime import Runner
from onnx_obs.strategies.context import Context, advance_run

GRID = 0.025        # level step of the exact solver's tables (read off one greedy trace)
FAST_GRID = 0.1     # level step where each level costs a fast-solver run
# Calibration samples for the sensitivity runs: enough for PROBE_VALUES float output values, at
# least PROBE_MIN_SAMPLES, at most PROBE_SAMPLES (a classifier with 1000 logits: 9; BERT's two
# logits: all up to 256). Halving these from 16384 values / 16 samples halved the probes' time on
# the EfficientNet-like net and the detector (bench_pipeline.py) at output MSE -0.4% and +1.3%;
# BERT's probes on 32 of its 64 samples instead of all cost it +9.5%, so small outputs keep theirs.
PROBE_SAMPLES = 256
PROBE_MIN_SAMPLES = 8
PROBE_VALUES = 8192


@dataclass
class SiteLevel:
    zeros: int             # the site's zero count
    sensitivity: float     # kappa (module doc)
    predicted: float       # kappa e(zeros): predicted relative output MSE of the site pruned alone
    group_zeros: np.ndarray | None = None  # grouped convolutions: zeros per group (_merged_table)


def allocate_sites(ctx: Context) -> dict[str, SiteLevel]:
    """Each site's level; the global figures go into the report."""
    t0 = time.perf_counter()
    c, loaded, sites = ctx.config, ctx.loaded, ctx.sites
    if ctx.hessians is None:
        ctx.hessians = {}
    cache = ctx.hessians
    missing = [s for s in sites if s.name not in cache]
    if missing:
        cache.update(capture_hessians(loaded, missing, ctx.cal, c.device, ctx.bar, False, ctx.report.phases,
                                      c.layerwise.max_positions, c.layerwise.hessian_precision))
    probe = _Probe(ctx)
    task = ctx.bar.add("allocating sparsity", total=len(sites))
    tables, kappa = {}, {}
    # in the probe's order: its tail sessions are built once each
    for s in sorted(sites, key=lambda s: probe.order.get(s.name, -1)):
        w, H = site_matrix(s, loaded.base_dir), cache[s.name]
        counts, errors, split, fast = _table(s, w, H, c)
        kappa[s.name] = probe.sensitivity(s, w, H, counts, errors, fast, split)
        tables[s.name] = counts, errors, split  # the factorisations go
        ctx.bar.advance(task)
        advance_run(ctx, s.name)
    tables = [tables[s.name] for s in sites]
    unprobed = [s.name for s in sites if kappa[s.name] is None]
    if unprobed:
        probed = [k for k in kappa.values() if k is not None]
        fill = float(np.median(probed)) if probed else 1.0
        kappa.update({name: fill for name in unprobed})
        ctx.report.notes.append(f"auto allocation: {len(unprobed)} bfloat16 site(s) cannot be fed to "
                                f"onnxruntime for a sensitivity run; they take the median sensitivity")
    scaled = [kappa[s.name] * t[1] for s, t in zip(sites, tables)]
    counts = [t[0] for t in tables]
    total = sum(s.size for s in sites)
    target = min(round(c.sparsity * total), sum(int(k[-1]) for k in counts))
    chosen = exact_counts(scaled, counts, allocate(scaled, counts, target), target)
    levels = {s.name: SiteLevel(int(n), kappa[s.name], interpolated_error(e, k, int(n)),
                                None if t[2] is None else np.bincount(t[2][:n], minlength=len(s.row_groups())))
              for s, n, e, k, t in zip(sites, chosen, scaled, counts, tables)}
    ctx.report.allocation = {
        "mode": "auto", "max_layer_sparsity": c.layerwise.max_layer_sparsity,
        "target_zeros": target, "probe_samples": probe.samples,
        # the sum of the sites' predictions, each pruned alone (additive to first order)
        "predicted_relative_mse": sum(v.predicted for v in levels.values()),
        "seconds": time.perf_counter() - t0}
    return levels


def _table(s: Site, w: np.ndarray, H: np.ndarray, c) -> tuple:
    """(zero counts, layer errors) of site s at the grid levels up to the cap, for grouped
    convolutions on the exact solver the split of the zeros over the groups (_merged_table), and
    for OBS on the fast solver each group's FastLevels (for the probe)."""
    lw = c.layerwise
    groups = s.row_groups()
    sizes = np.array([w[g].size for g in groups])
    forced = np.array([int(np.sum(w[g] == 0)) for g in groups])
    exact = runs_exact(c.method, lw.solver, w[groups[0]].shape[0], w.shape[1])
    step = GRID if exact else FAST_GRID
    levels = np.append(np.arange(0.0, lw.max_layer_sparsity, step), lw.max_layer_sparsity)
    counts = np.unique(np.maximum(np.rint(levels * w.size).astype(np.int64), forced.sum()))
    if exact and len(groups) > 1:
        errors, split = _merged_table(w, H, groups, forced, counts, c)
        return counts, errors, split, None
    shares = np.array([spread_zeros(k, forced, sizes) for k in counts])  # (levels, groups)
    errors = np.zeros(len(counts))
    fast = None
    if c.method == "obs" and not exact:  # one factorisation per group for the table and the probe
        fast = [FastLevels(w[rows], Hg, block_size=lw.block_size, damp=lw.damp) for rows, Hg in zip(groups, H)]
    for g, (rows, Hg) in enumerate(zip(groups, H)):
        errors += error_curve(w[rows], Hg, shares[:, g], method=c.method, solver=lw.solver,
                              block_size=lw.block_size, damp=lw.damp, levels=fast and fast[g])
    return counts, errors, None, fast


def _merged_table(w, H, groups, forced, counts, c) -> tuple[np.ndarray, np.ndarray]:
    """A grouped convolution's groups (each its own H, as the rows of one matrix in OBC) share the
    site's zeros the way OBC shares a layer's over rows: each group's table at every count is
    convex (obc_trace), so the k cheapest steps over all groups are a prefix of every group's
    trace and their summed cost the least error for k zeros. Returns (errors at `counts`, the
    group of each step in that order: the split of k zeros is bincount of its first k)."""
    lw = c.layerwise
    steps, owner = [], []
    traces = group_traces(w, list(H), groups, method=c.method, solver=lw.solver,
                          block_size=lw.block_size, damp=lw.damp)
    for g, (rows, trace) in enumerate(zip(groups, traces)):
        size = w[rows].size
        step = np.diff(trace)
        step[: forced[g]] = -np.inf   # existing zeros stay zeros: first, at no cost
        steps.append(step)
        owner.append(np.full(size, g))
    order = np.argsort(np.concatenate(steps), kind="stable")
    cost = np.concatenate([[0.0], np.cumsum(np.maximum(np.concatenate(steps)[order], 0.0))])
    return cost[counts], np.concatenate(owner)[order]


def probe_batches(cal: Calibration, n: int) -> list[dict[str, np.ndarray]]:
    """At most n calibration samples, evenly spaced over the set (data files are often sorted by
    class): one batch of them, or with samples that cannot be sliced, n evenly spaced runs.
    n = PROBE_SAMPLES: the first batches up to n samples, as they are."""
    if not cal.sliceable:
        pick = np.unique(np.linspace(0, len(cal.batches) - 1, min(n, len(cal.batches))).round().astype(int))
        return [cal.batches[i] for i in pick]
    sizes = [len(next(iter(b.values()))) for b in cal.batches]
    total = sum(sizes)
    if total <= n or n >= PROBE_SAMPLES:
        return cal.batches[: int(np.searchsorted(np.cumsum(sizes), n)) + 1]
    pick = np.unique(np.linspace(0, total - 1, n).round().astype(np.int64))
    start = np.cumsum([0] + sizes[:-1])
    batch = np.searchsorted(start, pick, side="right") - 1
    parts = [(cal.batches[b], pick[batch == b] - start[b]) for b in np.unique(batch)]
    return [{k: np.concatenate([feeds[k][rows] for feeds, rows in parts]) for k in cal.batches[0]}]


class _Probe:
    """The sensitivity runs. The sites (main graph, in depth order) go in about sqrt(count)
    segments; a site's run recomputes only its segment's tail (graph.slicing.tail_plan: the nodes
    after the segment's first weights, whose other inputs come from one run of the model as given),
    with the segment's weights overridable, so a run costs the part of the model after the
    segment instead of all of it. Sites in subgraphs, or whose tail cannot be cut, run the whole
    model with every weight overridable."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        model, fed = ctx.loaded.model, set(ctx.cal.batches[0])
        self.outputs = [o.name for o in model.graph.output]
        main = [s for s in ctx.sites if s.dtype != "bfloat16" and not s.scope]
        depth = site_depths(model, ctx.sites)
        main.sort(key=lambda s: depth[s.name])
        bounds = np.linspace(0, len(main), max(1, math.ceil(math.sqrt(len(main)))) + 1).round().astype(int)
        segments = [main[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        self.order = {s.name: k for k, s in enumerate(main)}
        self.plans = [tail_plan(model.graph, {s.name for s in seg}) for seg in segments]  # main graph: name = tensor
        self.segment = {s.name: i for i, seg in enumerate(segments) for s in seg}
        self.weights = [[s.name for s in seg] for seg in segments]
        needed = sorted({t for p in self.plans for t in p.inputs} - fed)
        self.phases = ctx.report.phases  # onnxruntime's time here: phase "probes"
        with self.phases("probes"):
            runner = Runner(with_outputs(model, self.outputs + needed), ctx.loaded.base_dir, ctx.config.device)
            self.batches = probe_batches(ctx.cal, self._sample_count(runner))
            self.samples = (sum(len(next(iter(b.values()))) for b in self.batches) if ctx.cal.sliceable
                            else len(self.batches))
            # per batch: the graph outputs and the tails' inputs on the model as given, these
            # within --capture-memory (beyond it every site's run is a whole-model run)
            budget, held, self.values = ctx.config.layerwise.capture_memory_mb << 20, 0, []
            for feeds in self.batches:
                self.values.append({**feeds, **dict(zip(self.outputs + needed, runner.run(feeds)))})
                held += sum(np.asarray(self.values[-1][t]).nbytes for t in needed)
                if needed and held > budget:
                    ctx.report.notes.append(
                        f"auto allocation: the sensitivity runs' cut tensors exceed --capture-memory "
                        f"{ctx.config.layerwise.capture_memory_mb} MB; each runs the whole model")
                    self.values = [{k: v[k] for k in list(feeds) + self.outputs} for v in self.values]
                    self.segment, needed = {}, []
        self.floats = {o for o in self.outputs if np.asarray(self.values[0][o]).dtype.kind == "f"}
        self._runner: tuple[int, Runner | None] | None = None
        self._whole: Runner | None = None

    def _sample_count(self, runner: Runner) -> int:
        """Probe samples: enough for PROBE_VALUES output values (at least PROBE_MIN_SAMPLES, at
        most PROBE_SAMPLES), counted on one sample's run; PROBE_SAMPLES where the samples cannot
        be regrouped (no batching, or a fixed batch size: the calibration batches as they are)."""
        cal = self.ctx.cal
        fed = set(cal.batches[0])
        specs = [i for i in model_inputs(self.ctx.loaded.model) if i.name in fed]
        if not cal.sliceable or not all(i.shape and i.shape[0] is None for i in specs):
            return PROBE_SAMPLES
        one = probe_batches(cal, 1)[0]
        values = sum(np.size(y) for y in runner.run(one, self.outputs) if np.asarray(y).dtype.kind == "f")
        return min(PROBE_SAMPLES, max(PROBE_MIN_SAMPLES, math.ceil(PROBE_VALUES / max(values, 1))))

    def _tail(self, i: int) -> Runner | None:
        """Segment i's tail session (one held at a time: sites come in depth order), or None
        where it cannot be built."""
        if self._runner is None or self._runner[0] != i:
            self._runner = None  # free the previous session first
            plan, first = self.plans[i], self.values[0]
            try:
                if not all(isinstance(first.get(t), np.ndarray) for t in plan.inputs):
                    raise Unsliceable("a tail input is not a tensor")
                tail = slice_model(self.ctx.loaded.model, plan, {t: first[t].dtype for t in plan.inputs})
                with self.phases("probes"):
                    runner = Runner(with_weight_inputs(tail, self.weights[i]), self.ctx.loaded.base_dir,
                                    self.ctx.config.device)
            except (Unsliceable, OnnxObsError):
                runner = None
            self._runner = (i, runner)
        return self._runner[1]

    def _deviation(self, s: Site, value: np.ndarray) -> float:
        """Relative output MSE, summed over the float outputs, of the model with s's weight =
        value (module doc): on its segment's tail where there is one, else the whole model."""
        i = self.segment.get(s.name)
        runner = None if i is None else self._tail(i)
        if runner is None:
            if self._whole is None:
                names = [x.name for x in self.ctx.sites if x.dtype != "bfloat16"]
                with self.phases("probes"):
                    self._whole = Runner(with_weight_inputs(self.ctx.loaded.model, names),
                                         self.ctx.loaded.base_dir, self.ctx.config.device, prepack=False)
            runner, names = self._whole, self.outputs
        else:
            names = self.plans[i].outputs
        names = [o for o in names if o in self.floats]
        reference, outputs = [], []
        for values in self.values if names else []:
            # onnxruntime lists overridable weights apart from the inputs that Runner.run passes on
            inputs = {k: v for k, v in values.items() if k in runner.input_names}
            with self.phases("probes"):
                outputs.append(runner.session.run(names, {**inputs, s.name: value}))
            reference.append([values[o] for o in names])
        return relative_mse(reference, outputs)

    def sensitivity(self, s: Site, w: np.ndarray, H: np.ndarray, counts: np.ndarray,
                    errors: np.ndarray, fast: list[FastLevels] | None = None,
                    split: np.ndarray | None = None) -> float | None:
        """kappa: relative output MSE per unit of layer error, site s pruned alone (module doc), at
        the target level or, where the table is still 0 there (weights on inputs that are 0 on
        every calibration sample go first, at no layer error), at its first level with an error:
        a probe of free weights alone would measure kappa = 0/0 and leave the site unguarded.
        Pruned by the fast solver (on `fast`, the table's factorisations, if given), or for grouped
        convolutions on the exact solver as pruning will (`split`: _merged_table's)."""
        if s.dtype == "bfloat16":
            return None
        c = self.ctx.config
        level = min(max(c.sparsity, 0.1), c.layerwise.max_layer_sparsity)
        k = int(np.clip(round(level * w.size), counts[0], counts[-1]))
        costly = counts[errors > 0]
        if interpolated_error(errors, counts, k) <= 0 and costly.size:
            k = int(costly[0])
        if k == counts[0]:
            k = int(counts[-1])
        if k == counts[0]:  # nothing can be removed: the table is flat
            return 0.0
        groups, lw = s.row_groups(), c.layerwise
        if split is not None:
            # a grouped convolution on the exact solver: its zeros split as pruning will split
            # them, all groups solved in one stacked greedy (one call per group cost seconds)
            sizes = [w[g].size for g in groups]
            shares = [n / size for n, size in zip(np.bincount(split[:k], minlength=len(groups)), sizes)]
            new = [r.weight for r in prune_row_groups(w, list(H), groups, shares, method=c.method,
                                                      solver=lw.solver, block_size=lw.block_size, damp=lw.damp)]
        else:
            forced = [int(np.sum(w[g] == 0)) for g in groups]
            shares = spread_zeros(k, forced, np.array([w[g].size for g in groups]))
            new = [fast[g].prune(int(n)).weight if fast else prune_layer(
                       w[rows], Hg, method=c.method, sparsity=n / max(w[rows].size, 1),
                       solver="fast" if c.method == "obs" else lw.solver,
                       block_size=lw.block_size, damp=lw.damp).weight
                   for g, (rows, Hg, n) in enumerate(zip(groups, H, shares))]
        pruned = np.empty_like(w)
        for rows, part in zip(groups, new):
            pruned[rows] = part
        e0 = sum(layer_error(w[rows], part, Hg) for rows, part, Hg in zip(groups, new, H))
        deviation = self._deviation(s, s.from_matrix(pruned).astype(s.dtype))
        return deviation / e0 if e0 > 0 else 0.0
