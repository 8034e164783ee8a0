"""Full-network OBS, OBD or magnitude (Hassibi & Stork 1992): all selected weights as one pool,
with the network's output Hessian (or the empirical Fisher) from per-sample derivatives."""

from __future__ import annotations

from onnx_obs.full_network import prune_full
from onnx_obs.strategies.context import Context, drop_uncaptureable


def run(ctx: Context) -> None:
    drop_uncaptureable(ctx)
    c = ctx.config
    prune_full(ctx.loaded, ctx.sites, ctx.cal, method=c.method, sparsity=c.sparsity, hessian=c.hessian,
               options=c.full, bound=c.full.error_bound, device=c.device, report=ctx.report,
               bar=ctx.bar, force=ctx.force)
