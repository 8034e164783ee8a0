"""Layer-wise OBS and its baselines (obd, wanda): each site's Hessian from its captured inputs, then
the algorithm per row group (algorithms/layerwise.py).

Sequential (the default): sites are pruned in waves of equal depth, shallower first, and each wave
is captured on the model as already pruned, so corrections compensate earlier layers' errors.
"""

from __future__ import annotations

import time

import numpy as np

from onnx_obs.algorithms.layerwise import layer_error, prune_layer
from onnx_obs.algorithms.masks import spread_zeros
from onnx_obs.graph.capture import site_depths
from onnx_obs.graph.sites import Site, site_matrix, write_matrix
from onnx_obs.hessian.capture import capture_hessians
from onnx_obs.report import SiteReport
from onnx_obs.strategies.allocation import SiteLevel, allocate_sites
from onnx_obs.strategies.context import Context, drop_uncaptureable


def run(ctx: Context) -> None:
    drop_uncaptureable(ctx)
    c, loaded, sites = ctx.config, ctx.loaded, ctx.sites
    levels = allocate_sites(ctx) if c.layerwise.allocation == "auto" else {}
    sequential = c.layerwise.sequential
    cache = None if sequential else ctx.hessians
    depth = site_depths(loaded.model, sites) if sequential else {s.name: 0 for s in sites}
    task = ctx.bar.add("pruning sites", total=len(sites))
    for wave in sorted(set(depth.values())):
        batch = [s for s in sites if depth[s.name] == wave]
        missing = [s for s in batch if cache is None or s.name not in cache]
        hessians = capture_hessians(loaded, missing, ctx.cal, c.device, ctx.bar) if missing else {}
        if cache is not None:
            cache.update(hessians)
            hessians = cache
        for s in batch:
            ctx.report.sites.append(_prune_site(ctx, s, hessians[s.name], levels.get(s.name)))
            ctx.bar.advance(task, what=s.name)
    if not levels:  # allocated levels count the existing zeros already
        note_already_sparse(ctx)


def _prune_site(ctx: Context, s: Site, H: np.ndarray, level: SiteLevel | None = None) -> SiteReport:
    """Prune one site, row group by row group (one per convolution group, each with its own H), to
    the uniform sparsity or to its allocated level."""
    c = ctx.config
    t0 = time.perf_counter()
    w = site_matrix(s, ctx.loaded.base_dir)
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
    for rows, Hg, share in zip(groups, H, shares):
        res = prune_layer(w[rows], Hg, method=c.method, sparsity=share, pattern=c.pattern,
                          solver=c.layerwise.solver, block_size=c.layerwise.block_size,
                          damp=c.layerwise.damp)
        new[rows] = res.weight
        r.predicted_error += res.predicted_error
        r.measured_error += layer_error(w[rows], res.weight, Hg)
        r.solver, r.damping = res.solver, res.damping
    write_matrix(s, new, ctx.loaded.store)
    r.zeros_after = int(np.sum(new == 0))
    r.seconds = time.perf_counter() - t0
    return r


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
