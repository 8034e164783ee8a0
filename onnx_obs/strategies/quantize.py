"""Weight quantization, site by site as layer-wise pruning (strategies/layerwise.py sweep_sites):
each site's Hessian is captured on the model as quantized so far (sequential), the site is pruned
first when a sparsity or pattern is asked for (its zeros then stay zeros: one joint pass), then
quantized by algorithms/quantize.py (OBQ / GPTQ / RTN). While the sweep runs, a quantized site
holds its dequantized float values, so later sites see exactly what the written model computes;
at the end every site is written as integer codes + DequantizeLinear (graph/quant_format.py), the
opset raised where the format needs it.
"""

from __future__ import annotations

import time

import numpy as np
import onnx
from onnx import version_converter

from onnx_obs.algorithms.activation_ranges import ActivationRange, uint8_grid
from onnx_obs.algorithms.layerwise import layer_error
from onnx_obs.algorithms.quantize import quantize_layer
from onnx_obs.errors import OnnxObsError
from onnx_obs.graph import matmul_nbits
from onnx_obs.graph.activation_qdq import activation_tensors, grid_sources, insert_qdq
from onnx_obs.graph.capture import with_outputs
from onnx_obs.graph.matmul_nbits import write_matmul_nbits
from onnx_obs.graph.quant_format import (SCALE_DTYPES, QuantizedWeight, column_groups, needed_opset,
                                         site_block, unsupported, write_qdq)
from onnx_obs.graph.sites import Site, find_sites, site_matrix, write_matrix
from onnx_obs.report import SiteReport
from onnx_obs.runtime import Runner
from onnx_obs.strategies.context import Context, drop_uncaptureable
from onnx_obs.strategies.layerwise import prune_site_matrix, site_report, sweep_sites


def run(ctx: Context) -> None:
    c, q = ctx.config, ctx.config.quantize
    pruning = f"{c.method} pruning + " if c.sparsity > 0 or c.pattern is not None else ""
    ctx.report.method = f"{pruning}int{q.bits} quantization ({q.quant_method})"
    _drop_unsupported(ctx)
    nbits = _matmul_nbits_sites(ctx) if q.format == "matmulnbits" else set()
    _raise_opset(ctx, nbits)
    quantized: dict[str, QuantizedWeight] = {}

    def visit(ctx: Context, s: Site, H: np.ndarray | None) -> SiteReport:
        return _quantize_site(ctx, s, H, site_block(s, q.group_size), quantized)

    if ctx.cal is not None:
        drop_uncaptureable(ctx)
    if q.activations == "int8":  # before the sweep: each site's Hessian sees fake-quantized inputs
        _quantize_activations(ctx)
    if ctx.cal is None:  # rtn alone needs no data
        task = ctx.bar.add("quantizing sites", total=len(ctx.sites))
        for s in ctx.sites:
            ctx.report.sites.append(visit(ctx, s, None))
            ctx.bar.advance(task)
    else:
        sweep_sites(ctx, visit, "quantizing sites")
    for s in ctx.sites:
        if s.name in nbits:
            write_matmul_nbits(ctx.loaded.model, s, quantized[s.name], ctx.loaded.store)
        else:
            write_qdq(ctx.loaded.model, s, quantized[s.name], ctx.loaded.store, q.activations == "int8")
    if len(nbits) < len(ctx.sites) and q.activations == "none":
        ctx.report.notes.append(
            "onnxruntime runs DequantizeLinear on every call (and Conv loses its prepacked kernels): "
            "the session option session.disable_quant_qdq=1 folds them at load time (float speed "
            "from the smaller file); --format matmulnbits runs 4-bit MatMul/Gemm weights in its int4 kernels")
    ctx.sites = []  # their float tensors are gone: DequantizeLinear produces them now


def _quantize_site(ctx: Context, s: Site, H: np.ndarray | None, block: int | None,
                   quantized: dict[str, QuantizedWeight]) -> SiteReport:
    """Prune (if asked) and quantize one site, row group by row group; keep its codes and write
    its dequantized values into the model."""
    c, q = ctx.config, ctx.config.quantize
    t0 = time.perf_counter()
    w = site_matrix(s, ctx.loaded.base_dir)
    Hs = [None] * len(s.row_groups()) if H is None else H
    pruned = c.sparsity > 0 or c.pattern is not None
    if pruned:
        target, r = prune_site_matrix(ctx, s, w, Hs)
        if not np.isfinite(target).all():
            raise OnnxObsError(f"pruning produced NaN/Inf in '{s.name}' (ill-conditioned Hessian?): "
                               "nothing written; raise --damp or add calibration samples")
    else:
        target, r = w, site_report(s, w, w, c.method)
    groups = column_groups(s, block)
    rows_all, cols = w.shape
    n_groups = int(groups.max(initial=-1)) + 1
    scale_dtype = SCALE_DTYPES[s.dtype]
    qw = QuantizedWeight(np.empty((rows_all, cols), dtype=np.int64), np.empty((rows_all, n_groups), scale_dtype),
                         np.empty((rows_all, n_groups), dtype=np.int64), groups, q.bits, q.symmetric, block)
    new = np.empty_like(w)
    predicted = measured = 0.0
    clip = []
    for rows, Hg in zip(s.row_groups(), Hs):
        res = quantize_layer(target[rows], Hg, q.bits, symmetric=q.symmetric, groups=groups,
                             method=q.quant_method, act_order=q.act_order,
                             block_size=c.layerwise.block_size, damp=c.layerwise.damp, scale_dtype=scale_dtype)
        new[rows], qw.codes[rows], qw.scale[rows], qw.zero[rows] = res.weight, res.codes, res.grid.scale, res.grid.zero
        predicted += res.predicted_error
        if Hg is not None:
            measured += layer_error(w[rows], res.weight, Hg)
        clip.append(res.grid.clip)
        solver, damping = res.solver, res.damping
    quantized[s.name] = qw
    write_matrix(s, new, ctx.loaded.store)
    r.method = f"{c.method}+{solver}" if pruned else solver
    r.solver = f"{r.solver}+{solver}" if pruned else solver
    r.predicted_error = (r.predicted_error if pruned else 0.0) + predicted
    r.measured_error = measured if H is not None else None
    r.damping = damping
    r.zeros_after = int(np.sum(new == 0))
    r.seconds = time.perf_counter() - t0
    clip = np.concatenate(clip)
    ctx.report.quantization.append(dict(
        name=s.name, bits=q.bits, group_size=block or -1, symmetric=q.symmetric, method=solver,
        scales=int(clip.size), clip_mean=float(clip.mean()), clipped_fraction=float(np.mean(clip < 1)),
        predicted_error=predicted, measured_error=r.measured_error))
    return r


def _quantize_activations(ctx: Context) -> None:
    """Ranges of the tensors around the sites over the calibration data (the float model, as
    onnxruntime's quantize_static calibrates), then their QDQ pairs; the sites are found again,
    their uses now reading the dequantized tensors."""
    q, loaded = ctx.config.quantize, ctx.loaded
    names = activation_tensors(loaded.model, ctx.sites)
    ranges = {n: ActivationRange(q.activation_calibration, q.activation_percentile) for n in names}
    kinds: dict[str, np.dtype] = {}
    runner = Runner(with_outputs(loaded.model, names), loaded.base_dir, ctx.config.device)
    task = ctx.bar.add("activation ranges", total=len(ctx.cal.batches))
    for feeds in ctx.cal:
        for n, x in zip(names, runner.run(feeds)):
            kinds[n] = x.dtype
            if x.dtype == np.float32:
                ranges[n].add(x)
        ctx.bar.advance(task)
    del runner
    other = [n for n in names if kinds[n] != np.float32]
    if other:
        ctx.report.notes.append("--activations int8 quantizes float32 tensors; left as they are: "
                                + ", ".join(f"{n} ({kinds[n]})" for n in other))
    grids, shared = {}, grid_sources(loaded.model, [n for n in names if n not in other])
    for n in names:
        if n in other:
            continue
        lo, hi = ranges[shared.get(n, n)].range()
        grids[n] = uint8_grid(lo, hi)
        ctx.report.activations.append(dict(name=n, min=lo, max=hi, scale=float(grids[n][0]),
                                           zero_point=int(grids[n][1])))
    insert_qdq(loaded.model, grids, loaded.store)
    chosen = {s.name for s in ctx.sites}
    ctx.sites = [s for s in find_sites(loaded.model)[0] if s.name in chosen]
    ctx.report.notes.append(
        f"--activations int8: {len(grids)} tensors quantized to uint8 per tensor "
        f"({q.activation_calibration}{f' {q.activation_percentile:g}' if q.activation_calibration == 'percentile' else ''}"
        " ranges from the calibration data); onnxruntime fuses the QDQ pairs into integer kernels")


def _drop_unsupported(ctx: Context) -> None:
    kept = []
    for s in ctx.sites:
        reason = unsupported(s)
        if reason:
            ctx.report.skipped.append({"name": s.name, "op_type": s.op_type, "reason": reason})
        else:
            kept.append(s)
    if not kept:
        raise OnnxObsError("no selected weight can be quantized (see the reasons listed with "
                           "`onnx-obs inspect`): check --include/--exclude/--op-types")
    ctx.sites = kept


def _matmul_nbits_sites(ctx: Context) -> set[str]:
    """The sites written as MatMulNBits; the others are named in a note (they stay QDQ)."""
    q, chosen, left = ctx.config.quantize, set(), []
    for s in ctx.sites:
        reason = matmul_nbits.unsupported(ctx.loaded.model, s, q.bits, site_block(s, q.group_size))
        if reason:
            left.append(f"{s.name} ({reason})")
        else:
            chosen.add(s.name)
    if left:
        ctx.report.notes.append("--format matmulnbits: stored as DequantizeLinear instead: " + "; ".join(left))
    return chosen


def _raise_opset(ctx: Context, nbits: set[str]) -> None:
    """Convert the model to the opset the DequantizeLinear nodes need (int4 and blocked scales: 21,
    float16 scales: 19, per-axis: 13), saying so in the notes; the sites are found again."""
    model = ctx.loaded.model
    have = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    q = ctx.config.quantize
    need = max((needed_opset(s, q.bits, site_block(s, q.group_size)) for s in ctx.sites
                if s.name not in nbits), default=0)
    if have >= need:
        return
    try:
        converted = version_converter.convert_version(model, need)
    except Exception as e:  # the converter raises bare RuntimeError/ValueError for any failure
        raise OnnxObsError(f"the model's opset {have} must become {need} for these quantized weights, "
                           f"and onnx's version converter failed ({str(e).splitlines()[0]}): use --bits 8 "
                           "without --group-size (opset 13)") from e
    converted.ir_version = max(converted.ir_version, onnx.helper.find_min_ir_version_for(
        list(converted.opset_import), ignore_unknown=True))
    ctx.loaded.model = converted
    names = {s.name for s in ctx.sites}
    ctx.sites = [s for s in find_sites(converted)[0] if s.name in names]
    ctx.report.notes.append(f"opset raised from {have} to {need}: "
                            + ("int4 codes and blocked scales need DequantizeLinear-21" if need == 21
                               else "float16 scales need DequantizeLinear-19" if need == 19
                               else "per-channel scales need DequantizeLinear-13"))
