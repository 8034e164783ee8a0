"""Magnitude pruning: the smallest |w| go, per site or ranked over all sites (scope "global").
No Hessian and no correction; needs no calibration data."""

from __future__ import annotations

import time

import numpy as np

from onnx_obs.algorithms.layerwise import prune_layer
from onnx_obs.graph.sites import site_matrix, write_matrix
from onnx_obs.strategies.context import Context
from onnx_obs.strategies.layerwise import note_already_sparse, site_report


def run(ctx: Context) -> None:
    c, loaded = ctx.config, ctx.loaded
    threshold = None
    if c.scope == "global":
        allw = np.concatenate([np.abs(site_matrix(s, loaded.base_dir)).ravel() for s in ctx.sites])
        k = int(round(c.sparsity * allw.size))
        threshold = np.partition(allw, k - 1)[k - 1] if k else -1.0
        del allw
    for s in ctx.sites:  # one weight in memory at a time
        t0 = time.perf_counter()
        w = site_matrix(s, loaded.base_dir)
        if threshold is not None:
            new = np.where(np.abs(w) <= threshold, 0.0, w)
        else:
            new = prune_layer(w, None, method="magnitude", sparsity=c.sparsity, pattern=c.pattern).weight
        write_matrix(s, new, loaded.store)
        r = site_report(s, w, new, "magnitude")
        r.seconds = time.perf_counter() - t0
        ctx.report.sites.append(r)
    if threshold is None:
        note_already_sparse(ctx)
