"""Layer-wise OBS and its baselines (obd, wanda): each site's Hessian from its captured inputs, then
the algorithm per row group (algorithms/layerwise.py).

Sequential (the default): sites are pruned in waves of equal depth, shallower first, and each wave
is captured on the model as already pruned, so corrections compensate earlier layers' errors.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from onnx_obs.algorithms.layerwise import layer_error, prune_layer
from onnx_obs.algorithms.masks import spread_zeros
from onnx_obs.graph.capture import site_depths
from onnx_obs.graph.sites import Site, site_matrix, write_matrix
from onnx_obs.hessian.capture import capture_hessians
from onnx_obs.report import SiteReport
from onnx_obs.strategies.context import Context, drop_uncaptureable


def run(ctx: Context) -> None:
    drop_uncaptureable(ctx)
    sweep_sites(ctx, _prune_site, "pruning sites")
    note_already_sparse(ctx)


def sweep_sites(ctx: Context, visit: Callable[[Context, Site, np.ndarray], SiteReport], what: str) -> None:
    """Call visit(ctx, site, H) for every site with its (groups, cols, cols) Hessian, in waves of
    equal depth when sequential (each wave captured on the model as changed so far), and add the
    reports it returns."""
    c, loaded, sites = ctx.config, ctx.loaded, ctx.sites
    sequential = c.layerwise.sequential
    cache = None if sequential else ctx.hessians
    depth = site_depths(loaded.model, sites) if sequential else {s.name: 0 for s in sites}
    task = ctx.bar.add(what, total=len(sites))
    for wave in sorted(set(depth.values())):
        batch = [s for s in sites if depth[s.name] == wave]
        missing = [s for s in batch if cache is None or s.name not in cache]
        hessians = capture_hessians(loaded, missing, ctx.cal, c.device, ctx.bar) if missing else {}
        if cache is not None:
            cache.update(hessians)
            hessians = cache
        for s in batch:
            ctx.report.sites.append(visit(ctx, s, hessians[s.name]))
            ctx.bar.advance(task, what=s.name)


def _prune_site(ctx: Context, s: Site, H: np.ndarray) -> SiteReport:
    """Prune one site and write it back."""
    t0 = time.perf_counter()
    w = site_matrix(s, ctx.loaded.base_dir)
    new, r = prune_site_matrix(ctx, s, w, H)
    write_matrix(s, new, ctx.loaded.store)
    r.seconds = time.perf_counter() - t0
    return r


def prune_site_matrix(ctx: Context, s: Site, w: np.ndarray, H: np.ndarray) -> tuple[np.ndarray, SiteReport]:
    """The site's 2-D matrix w pruned, row group by row group (one per convolution group, each
    with its own H, or None for magnitude pruning without data), and its report."""
    c = ctx.config
    new = np.empty_like(w)
    r = site_report(s, w, w, c.method)
    r.predicted_error = r.measured_error = 0.0
    groups = s.row_groups()
    for rows, Hg, share in zip(groups, H, _group_sparsities(w, groups, c.sparsity)):
        res = prune_layer(w[rows], Hg, method=c.method, sparsity=share, pattern=c.pattern,
                          solver=c.layerwise.solver, block_size=c.layerwise.block_size,
                          damp=c.layerwise.damp)
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
