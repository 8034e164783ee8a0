"""The steps every strategy ends with: refuse NaN, validate, store sparse, measure costs, write.

Validation: onnx.checker, then onnxruntime loads the pruned model and, with calibration data,
runs it beside the original to measure the output deviation. Sparse storage comes after
validation (onnxruntime must compute exactly what the dense model computes); the atomic write
comes last, so an error anywhere leaves no output file.
"""

from __future__ import annotations

import zlib

import numpy as np
import onnx

from onnx_obs.calib import model_inputs
from onnx_obs.errors import OnnxObsError
from onnx_obs.flops import batch_feeds, count_macs, count_params, latency_ms
from onnx_obs.graph.model_io import check_proto, save_model
from onnx_obs.graph.sites import find_sites, site_matrix
from onnx_obs.graph.sparse_storage import store_sparse
from onnx_obs.metrics import compare_runs
from onnx_obs.runtime import Runner
from onnx_obs.strategies.context import Context

COMPRESS_MAX_BYTES = 256 * 2**20


def run(ctx: Context, original: onnx.ModelProto, output) -> None:
    """original: the model as loaded, before pruning. output: where to write, or None."""
    c, loaded, report = ctx.config, ctx.loaded, ctx.report
    with report.phases("validation"):
        _refuse_non_finite(ctx)
        report.device = _validate(ctx, original)
        _store(ctx)
        if c.structured.structure is not None or c.storage != "dense" or c.quantize.bits is not None:
            report.costs = _measure_costs(ctx, original, counts=c.quantize.bits is None)
        elif _inline_and_small(original, loaded.model):
            # zeros in dense tensors: say what they buy (a compressed file), not only that; large
            # models skip it (two more sessions, two copies of the model in memory)
            report.costs = _measure_costs(ctx, original, counts=False, sizes=[1], budget_s=0.25)
            report.compressed_size = {"before": len(zlib.compress(original.SerializeToString(), 1)),
                                      "after": len(zlib.compress(loaded.model.SerializeToString(), 1))}
    if output is not None:
        with report.phases("write"):
            report.file_size_after = save_model(loaded.model, output, loaded.base_dir)


def _refuse_non_finite(ctx: Context) -> None:
    for s in ctx.sites:
        if not np.isfinite(site_matrix(s, ctx.loaded.base_dir)).all():
            raise OnnxObsError(f"pruning produced NaN/Inf in '{s.name}' (ill-conditioned Hessian?): "
                               "nothing written; raise --damp or add calibration samples")


def _validate(ctx: Context, original: onnx.ModelProto) -> str:
    loaded, cal = ctx.loaded, ctx.cal
    try:
        check_proto(loaded.model)
    except onnx.checker.ValidationError as e:
        raise OnnxObsError(f"the pruned model fails onnx.checker ({str(e).splitlines()[0]}): "
                           "nothing written; please report this") from e
    # each model runs the calibration data once, if at all: packed weight copies would not pay
    pruned = Runner(loaded.model, loaded.base_dir, ctx.config.device, prepack=False)
    if cal is not None:
        ref = Runner(original, loaded.base_dir, ctx.config.device, prepack=False)
        ctx.bar.add("measuring output deviation", total=None)
        ctx.report.deviation = compare_runs(ref, pruned, cal.batches)
    return pruned.provider


def _store(ctx: Context) -> None:
    """Store pruned weights sparse (after validation, before writing) and check that
    onnxruntime loads the result and computes exactly what the dense model computes."""
    loaded, mode, device, cal, report = ctx.loaded, ctx.config.storage, ctx.config.device, ctx.cal, ctx.report
    if mode == "dense":
        return
    sites, _ = find_sites(loaded.model)
    names = [s.name for s in sites if s.storage == "initializer" and not s.scope]
    dense = onnx.ModelProto()
    dense.CopyFrom(loaded.model)
    choices = store_sparse(loaded.model, names, mode, loaded.base_dir)
    report.storage = [vars(c) for c in choices]
    if not any(c.stored == "sparse" for c in choices):
        report.notes.append(f"--storage {mode}: no weight is smaller stored sparse "
                            "(values + int64 indices need under 1/3 density in float32)")
        return
    larger = [c for c in choices if c.stored == "sparse" and c.sparse_bytes >= c.dense_bytes]
    if larger:
        report.notes.append(
            f"--storage sparse: {len(larger)} of the weights take more bytes sparse than dense "
            f"({sum(c.dense_bytes for c in larger):,} -> {sum(c.sparse_bytes for c in larger):,}): "
            "values + int64 indices are smaller only below 1/3 density in float32 (1/5 in "
            "float16); --storage auto keeps those dense")
    try:
        onnx.checker.check_model(loaded.model)
    except onnx.checker.ValidationError as e:
        raise OnnxObsError(f"the sparse model fails onnx.checker ({str(e).splitlines()[0]}): "
                           "use --storage dense") from e
    runner = Runner(loaded.model, loaded.base_dir, device)
    if cal is not None:
        feeds = cal.batches[0]
        same = all(np.array_equal(a, b) for a, b in
                   zip(Runner(dense, loaded.base_dir, device).run(feeds), runner.run(feeds)))
        if not same:
            raise OnnxObsError("onnxruntime computes different outputs from the sparse-stored "
                               "weights: use --storage dense")


def _inline_and_small(original: onnx.ModelProto, pruned: onnx.ModelProto) -> bool:
    """Whether both models hold their weights inline and the original is at most
    COMPRESS_MAX_BYTES: then its deflate-compressed size (zlib level 1, as a zip or a compressed
    download holds it) and its speed are cheap to measure."""
    external = any(t.data_location == onnx.TensorProto.EXTERNAL
                   for m in (original, pruned) for t in m.graph.initializer)
    return not external and original.ByteSize() <= COMPRESS_MAX_BYTES


def _measure_costs(ctx: Context, original: onnx.ModelProto, counts: bool = True,
                   sizes: list[int] | None = None, budget_s: float = 1.0) -> dict:
    """Parameters and MACs (with counts), onnxruntime latency (median of repeated runs within
    budget_s per model and batch size; batch sizes 1 and 32 unless given) before and after."""
    loaded, cal, device = ctx.loaded, ctx.cal, ctx.config.device
    costs = {}
    counters = (("params", lambda m: count_params(m, loaded.base_dir)["params"]),
                ("nonzero_params", lambda m: count_params(m, loaded.base_dir)["nonzero_params"]),
                ("macs", lambda m: count_macs(m)[0]))
    for key, fn in counters if counts else ():
        costs[key] = {"before": fn(original), "after": fn(loaded.model)}
    if cal is None:
        return costs
    fixed = [s.shape[0] for s in model_inputs(original) if s.shape and s.shape[0] is not None]
    sizes = [fixed[0]] if fixed else sizes or [1, 32]
    # timed one after the other: idle threads must not spin into the other session's runs
    before = Runner(original, loaded.base_dir, device).session
    after = Runner(loaded.model, loaded.base_dir, device).session
    # Runs that cannot be cut into samples (no batching, scalar inputs) are timed as they are.
    runs = ({f"batch_{size}": batch_feeds(cal.batches, size) for size in sizes} if cal.sliceable
            else {"first_run": cal.batches[0]})
    for key, feeds in runs.items():
        b, a = latency_ms(before, feeds, budget_s=budget_s), latency_ms(after, feeds, budget_s=budget_s)
        costs[f"latency_ms_{key}"] = {"before": b, "after": a, "speedup": b / a if a else None}
    return costs
