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
   target level (fast solver), the others kept, and the model runs on up to PROBE_SAMPLES
   calibration samples (one session whose weights are overridable inputs):
       D_i = sum_o ||y_o - y_o^(i)||^2 / ||y_o||^2     (relative output MSE, summed over outputs)
       kappa_i = D_i / e_i^0,    e_i^0 = the probe's layer error,
   and the predicted output error of site i at k zeros is kappa_i e_i(k) (to first order
   y - y^(i) = J_i (dW_i x), whose mean square scales with the layer error mean ||dW_i x||^2).
4. algorithms.allocation: counts k_i (within each table) with sum_i k_i = round(sparsity *
   sum_i size_i) minimising sum_i kappa_i e_i(k_i).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from onnx_obs.algorithms.allocation import allocate, exact_counts, interpolated_error
from onnx_obs.algorithms.layerwise import error_curve, layer_error, prune_layer, runs_exact
from onnx_obs.algorithms.masks import spread_zeros
from onnx_obs.graph.capture import with_weight_inputs
from onnx_obs.graph.sites import Site, site_matrix
from onnx_obs.hessian.capture import capture_hessians
from onnx_obs.runtime import Runner
from onnx_obs.strategies.context import Context

GRID = 0.025        # level step of the exact solver's tables (read off one greedy trace)
FAST_GRID = 0.1     # level step where each level costs a fast-solver run
PROBE_SAMPLES = 256  # calibration samples for the sensitivity runs


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
    tables, kappa = [], {}
    for s in sites:
        w, H = site_matrix(s, loaded.base_dir), cache[s.name]
        counts, errors, split = _table(s, w, H, c)
        kappa[s.name] = probe.sensitivity(s, w, H, counts, errors)
        tables.append((counts, errors, split))
        ctx.bar.advance(task)
    unprobed = [s.name for s in sites if kappa[s.name] is None]
    if unprobed:
        probed = [k for k in kappa.values() if k is not None]
        fill = float(np.median(probed)) if probed else 1.0
        kappa.update({name: fill for name in unprobed})
        ctx.report.notes.append(f"auto allocation: {len(unprobed)} bfloat16 site(s) cannot be fed to "
                                f"onnxruntime for a sensitivity run; they take the median sensitivity")
    scaled = [kappa[s.name] * e for s, (_, e, _) in zip(sites, tables)]
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


def _table(s: Site, w: np.ndarray, H: np.ndarray, c) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(zero counts, layer errors) of site s at the grid levels up to the cap, and for grouped
    convolutions on the exact solver the split of the zeros over the groups (_merged_table)."""
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
        return counts, errors, split
    shares = np.array([spread_zeros(k, forced, sizes) for k in counts])  # (levels, groups)
    errors = np.zeros(len(counts))
    for g, (rows, Hg) in enumerate(zip(groups, H)):
        errors += error_curve(w[rows], Hg, shares[:, g], method=c.method, solver=lw.solver,
                              block_size=lw.block_size, damp=lw.damp)
    return counts, errors, None


def _merged_table(w, H, groups, forced, counts, c) -> tuple[np.ndarray, np.ndarray]:
    """A grouped convolution's groups (each its own H, as the rows of one matrix in OBC) share the
    site's zeros the way OBC shares a layer's over rows: each group's table at every count is
    convex (obc_trace), so the k cheapest steps over all groups are a prefix of every group's
    trace and their summed cost the least error for k zeros. Returns (errors at `counts`, the
    group of each step in that order: the split of k zeros is bincount of its first k)."""
    lw = c.layerwise
    steps, owner = [], []
    for g, (rows, Hg) in enumerate(zip(groups, H)):
        size = w[rows].size
        trace = error_curve(w[rows], Hg, np.arange(size + 1), method=c.method, solver=lw.solver,
                            block_size=lw.block_size, damp=lw.damp)
        step = np.diff(trace)
        step[: forced[g]] = -np.inf   # existing zeros stay zeros: first, at no cost
        steps.append(step)
        owner.append(np.full(size, g))
    order = np.argsort(np.concatenate(steps), kind="stable")
    cost = np.concatenate([[0.0], np.cumsum(np.maximum(np.concatenate(steps)[order], 0.0))])
    return cost[counts], np.concatenate(owner)[order]


class _Probe:
    """The sensitivity runs: one onnxruntime session in which every site's weight can be fed."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        names = [s.name for s in ctx.sites if s.dtype != "bfloat16"]
        model = with_weight_inputs(ctx.loaded.model, names)
        self.runner = Runner(model, ctx.loaded.base_dir, ctx.config.device, prepack=False)
        self.batches, self.samples = [], 0
        for feeds in ctx.cal.batches:
            if self.samples >= PROBE_SAMPLES:
                break
            self.batches.append(feeds)
            first = next(iter(feeds.values()))
            self.samples += len(first) if ctx.cal.sliceable else 1
        self.reference = [self.runner.run(feeds) for feeds in self.batches]

    def sensitivity(self, s: Site, w: np.ndarray, H: np.ndarray, counts: np.ndarray,
                    errors: np.ndarray) -> float | None:
        """kappa: relative output MSE per unit of layer error, site s pruned alone (module doc), at
        the target level or, where the table is still 0 there (weights on inputs that are 0 on
        every calibration sample go first, at no layer error), at its first level with an error:
        a probe of free weights alone would measure kappa = 0/0 and leave the site unguarded."""
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
        groups = s.row_groups()
        forced = [int(np.sum(w[g] == 0)) for g in groups]
        shares = spread_zeros(k, forced, np.array([w[g].size for g in groups]))
        pruned = np.empty_like(w)
        e0 = 0.0
        for rows, Hg, n in zip(groups, H, shares):
            new = prune_layer(w[rows], Hg, method=c.method, sparsity=n / max(w[rows].size, 1),
                              solver="fast" if c.method == "obs" else c.layerwise.solver,
                              block_size=c.layerwise.block_size, damp=c.layerwise.damp).weight
            pruned[rows] = new
            e0 += layer_error(w[rows], new, Hg)
        feed = {s.name: s.from_matrix(pruned).astype(s.dtype)}
        sq_err = np.zeros(len(self.runner.output_names))
        sq_ref = np.zeros(len(self.runner.output_names))
        for feeds, ref in zip(self.batches, self.reference):
            # onnxruntime lists overridable weights apart from the inputs that Runner.run passes on
            inputs = {k: v for k, v in feeds.items() if k in self.runner.input_names}
            for o, (a, b) in enumerate(zip(ref, self.runner.session.run(None, {**inputs, **feed}))):
                if np.asarray(a).dtype.kind == "f":
                    r = np.asarray(a, dtype=np.float64)
                    d = r - np.asarray(b, dtype=np.float64)
                    sq_err[o] += float(np.vdot(d, d))
                    sq_ref[o] += float(np.vdot(r, r))
        deviation = float(np.sum(sq_err[sq_ref > 0] / sq_ref[sq_ref > 0]))
        return deviation / e0 if e0 > 0 else 0.0
