"""Layer-wise OBS and its baselines (obd, wanda): each site's Hessian from its captured inputs, then
the algorithm per row group (algorithms/layerwise.py).

Sequential (the default): sites are pruned in waves of equal depth, shallower first, and each wave
is captured on the model as already pruned, so corrections compensate earlier layers' errors.
Each wave runs only the graph slice between the previous waves' cached outputs and its own
inputs (hessian/sequential.py); where the graph cannot be cut, the whole model runs per wave.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from onnx_obs.algorithms.layerwise import exact_allowed, layer_error, prune_row_groups
from onnx_obs.algorithms.masks import spread_zeros
from onnx_obs.errors import OnnxObsError, first_line
from onnx_obs.graph.capture import site_depths
from onnx_obs.graph.sites import Site, site_matrix, write_matrix
from onnx_obs.graph.slicing import Unsliceable
from onnx_obs.hessian.capture import capture_hessians
from onnx_obs.hessian.sequential import BoundaryCache, SlicedCapture
from onnx_obs.report import SiteReport
from onnx_obs.strategies.allocation import SiteLevel, allocate_sites
from onnx_obs.strategies.context import (
    Context,
    advance_run,
    drop_uncaptureable,
    run_progress,
)


def run(ctx: Context) -> None:
    drop_uncaptureable(ctx)
    levels = {}
    run_progress(ctx, 2 if ctx.config.allocation_used == "auto" else 1)
    if ctx.config.allocation_used == "auto":
        with ctx.report.phases("allocation"):  # its capture counts as capture and hessians
            levels = allocate_sites(ctx)
    value = {name: level.predicted for name, level in levels.items()} or None
    sweep_sites(ctx, lambda ctx, s, H: _prune_site(ctx, s, H, levels.get(s.name)), "pruning sites", value)
    if not levels:  # allocated levels count the existing zeros already
        note_already_sparse(ctx)


def sweep_sites(ctx: Context, visit: Callable[[Context, Site, np.ndarray], SiteReport], what: str,
                value: dict[str, float] | None = None) -> None:
    """Call visit(ctx, site, H) for every site with its (groups, cols, cols) Hessian and add the
    reports it returns. Sequential: in waves of equal depth, each captured on the model as changed
    so far, by one pass over graph slices where the graph can be cut. value: each site's predicted
    output error (auto allocation), where the exact solver's budget goes (_exact_budget)."""
    c, loaded, sites, phases = ctx.config, ctx.loaded, ctx.sites, ctx.report.phases
    run_progress(ctx, 1)
    task = ctx.bar.add(what, total=len(sites))
    ctx.exact = _exact_budget(ctx, value)
    if not c.layerwise.sequential:
        cache = ctx.hessians if ctx.hessians is not None else {}
        missing = [s for s in sites if s.name not in cache]
        if missing:
            cache.update(capture_hessians(loaded, missing, ctx.cal, c.device, ctx.bar, False, phases,
                                           c.layerwise.max_positions, c.layerwise.hessian_precision))
        _visit_wave(ctx, visit, sites, cache, task)
    else:
        depth = site_depths(loaded.model, sites)
        waves = [[s for s in sites if depth[s.name] == d] for d in sorted(set(depth.values()))]
        sliced = _sliced_capture(ctx, waves)
        # the first wave sees the model as given: Hessians captured on it already serve (allocation)
        known = ctx.hessians or {}
        first = {s.name: known[s.name] for s in waves[0] if s.name in known}
        ctx.hessians = None  # the rest describe the model before pruning: free them
        try:
            for i, wave in enumerate(waves):
                hessians = first if i == 0 and len(first) == len(wave) else None
                if sliced is not None:
                    try:
                        if hessians is None:
                            hessians = sliced.capture(i)
                        else:
                            sliced.capture(i, hessians=False)
                    except (Unsliceable, OnnxObsError) as e:
                        ctx.report.notes.append(f"sequential capture: waves {i + 1}-{len(waves)} ran "
                                                f"the whole model each ({first_line(e)})")
                        sliced.close()
                        sliced = None
                if hessians is None:
                    hessians = capture_hessians(loaded, wave, ctx.cal, c.device, ctx.bar, False, phases,
                                                c.layerwise.max_positions, c.layerwise.hessian_precision)
                _visit_wave(ctx, visit, wave, hessians, task)
        finally:
            if sliced is not None:
                _note_boundary(ctx, sliced.cache)
                sliced.close()


def _exact_budget(ctx: Context, value: dict[str, float] | None) -> dict[str, bool]:
    """Which sites solver="auto" may solve exactly within --time-budget (a note if not all):
    those of most predicted output error per second where `value` gives it, else the cheapest."""
    c = ctx.config
    if c.method != "obs" or c.layerwise.solver != "auto":
        return {}
    layers = [[(g.stop - g.start, s.matrix_shape[1]) for g in s.row_groups()] for s in ctx.sites]
    worth = None if value is None else [value.get(s.name, 0.0) for s in ctx.sites]
    allowed = dict(zip([s.name for s in ctx.sites], exact_allowed(layers, c.layerwise.time_budget, worth)))
    eligible = exact_allowed(layers, float("inf"))
    moved = sum(e and not a for e, a in zip(eligible, allowed.values()))
    if moved:
        ctx.report.notes.append(
            f"--time-budget {c.layerwise.time_budget:g} s of modelled exact solves: {moved} of "
            f"{sum(eligible)} sites small enough for the exact solver got fast + refit instead "
            "(raise --time-budget for lower error)")
    return allowed


def _sliced_capture(ctx: Context, waves: list[list[Site]]) -> SlicedCapture | None:
    """One-pass capture over graph slices, or None (with a note) where the graph cannot be cut."""
    try:
        with ctx.report.phases("capture"):
            return SlicedCapture(ctx.loaded, waves, ctx.cal, ctx.config.device,
                                 ctx.config.layerwise.capture_memory_mb << 20, ctx.report.phases,
                                 ctx.config.layerwise.max_positions, ctx.config.layerwise.hessian_precision)
    except Unsliceable as e:
        ctx.report.notes.append(f"sequential capture ran the whole model once per wave ({e})")
        return None


def _note_boundary(ctx: Context, cache: BoundaryCache) -> None:
    if cache.spilled:
        ctx.report.notes.append(
            f"sequential capture: boundary tensors beyond --capture-memory "
            f"{ctx.config.layerwise.capture_memory_mb} MB were spilled to disk "
            f"({cache.spilled / 2**20:.0f} MB written; {cache.peak / 2**20:.0f} MB held at most)")


def _visit_wave(ctx: Context, visit, wave: list[Site], hessians: dict[str, np.ndarray], task) -> None:
    for s in wave:
        with ctx.report.phases("solves"):
            ctx.report.sites.append(visit(ctx, s, hessians[s.name]))
        ctx.bar.advance(task, what=s.name)
        advance_run(ctx, s.name)



def _prune_site(ctx: Context, s: Site, H: np.ndarray, level: SiteLevel | None = None) -> SiteReport:
    """Prune one site (to the uniform sparsity or its allocated level) and write it back."""
    t0 = time.perf_counter()
    w = site_matrix(s, ctx.loaded.base_dir)
    new, r = prune_site_matrix(ctx, s, w, H, level)
    write_matrix(s, new, ctx.loaded.store)
    r.seconds = time.perf_counter() - t0
    return r


def prune_site_matrix(ctx: Context, s: Site, w: np.ndarray, H: np.ndarray,
                      level: SiteLevel | None = None) -> tuple[np.ndarray, SiteReport]:
    """The site's 2-D matrix w pruned, row group by row group (one per convolution group, each
    with its own H, or None for magnitude pruning without data), to the uniform sparsity or to
    its allocated level, and its report."""
    c = ctx.config
    new = np.empty_like(w)
    r = site_report(s, w, w, c.method)
    r.predicted_error = r.measured_error = 0.0
    sparsity = c.sparsity
    if level is not None:
        sparsity = level.zeros / max(w.size, 1)
        r.target_sparsity, r.sensitivity, r.predicted_output_error = sparsity, level.sensitivity, level.predicted
    groups = s.row_groups()
    if level is not None and level.group_zeros is not None:
        shares = [n / w[g].size for g, n in zip(groups, level.group_zeros.tolist())]
    else:
        shares = _group_sparsities(w, groups, sparsity)
    results = prune_row_groups(w, list(H), groups, shares, method=c.method, pattern=c.pattern,
                               solver=c.layerwise.solver, block_size=c.layerwise.block_size,
                               damp=c.layerwise.damp, exact=ctx.exact.get(s.name, True))
    for rows, Hg, res in zip(groups, H, results):
        new[rows] = res.weight
        r.predicted_error += res.predicted_error
        if Hg is not None:  # magnitude pruning before rtn quantization runs without data
            r.measured_error += layer_error(w[rows], res.weight, Hg)
        r.solver, r.damping = res.solver, res.damping
    r.zeros_after = int(np.sum(new == 0))
    return new, r


def _group_sparsities(w: np.ndarray, groups: list[slice], sparsity: float) -> list[float]:
    """Each row group's sparsity, so that their zeros add up to the site's round(sparsity * size)
    (rounding every group's share on its own can fall short: two groups of 1 weight at 30% -> 0)."""
    sizes = np.array([w[g].size for g in groups])
    forced = [int(np.sum(w[g] == 0)) for g in groups]
    return (spread_zeros(round(sparsity * w.size), forced, sizes) / sizes).tolist()


def note_already_sparse(ctx: Context) -> None:
    """Name the sites whose existing zeros already meet a per-site sparsity target."""
    c = ctx.config
    ctx.report.notes += [
        f"{r.name}: already {r.zeros_before / r.params:.1%} zeros, at or above the "
        f"{c.sparsity:.1%} target: nothing removed" for r in ctx.report.sites
        if c.pattern is None and r.zeros_before and r.zeros_before >= round(c.sparsity * r.params)]


def site_report(site: Site, before: np.ndarray, after: np.ndarray, method: str) -> SiteReport:
    return SiteReport(name=site.name, op=site.op_type, matrix_shape=tuple(before.shape),
                      params=int(before.size), zeros_before=int(np.sum(before == 0)),
                      zeros_after=int(np.sum(after == 0)), method=method)
