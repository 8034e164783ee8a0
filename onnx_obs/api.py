"""The Python API: `prune` and `inspect`. The CLI is a thin wrapper over these."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnx_obs import compact
from onnx_obs.calib import Calibration, load_calibration
from onnx_obs.errors import OnnxObsError
from onnx_obs.graph.capture import site_depths, with_outputs
from onnx_obs.config import Selection
from onnx_obs.graph.model_io import LoadedModel, check_output_path, check_proto, load_any, save_model, spilling
from onnx_obs.graph.sites import Site, find_sites, site_matrix, write_matrix
from onnx_obs.inspection import float_params, inspect  # noqa: F401  (public: api.inspect)
from onnx_obs.hessian.layerwise import ConvGeometry, HessianSum, input_vectors
from onnx_obs.metrics import compare_runs
from onnx_obs.progress import Progress
from onnx_obs.full_network import FullOptions, check_full_settings, prune_full
from onnx_obs.algorithms.layerwise import layer_error, prune_layer
from onnx_obs.algorithms.masks import spread_zeros
from onnx_obs.report import Report, SiteReport
from onnx_obs.runtime import Runner

METHODS = ("obs", "obd", "wanda", "magnitude")
SCOPES = ("layer", "global")
GRAPH_INPUT_REASON = ("also a graph input: a caller may override it at run time; "
                      "name it with --include to prune it")


@dataclass
class PruneResult:
    model: onnx.ModelProto
    report: Report


def prune(model, calib=None, *, method: str = "obs", sparsity: float = 0.5,
          pattern: tuple[int, int] | None = None, scope: str = "layer",
          selection: Selection | None = None, solver: str = "auto", block_size: int = 128,
          damp: float = 0.01, sequential: bool = True, batch_size: int = 32,
          max_samples: int | None = None, labels: str | None = None, batching: bool = True,
          device: str = "auto",
          output: str | Path | None = None, force: bool = False, progress: bool = False,
          command: str = "", hessians: dict[str, np.ndarray] | None = None,
          hessian: str = "layerwise", full: FullOptions | None = None,
          structure: str | None = None, target_params: int | None = None,
          target_flops: float | None = None, storage: str = "dense") -> PruneResult:
    """Prune `model` (path or ModelProto) and return the pruned proto and its report.

    With `output`, the model is validated and then written atomically (never over the input).
    hessians: a cache, by site name, shared by calls on the same model and calibration data with
    sequential=False (their Hessians are the original model's): read where present, else
    captured and stored in it. Ignored in sequential mode, whose Hessians depend on the pruning.
    hessian: "layerwise" (per site), or "full" / "fisher": full-network OBS, OBD or magnitude over
    all selected weights as one pool (full_network.py), with its settings in `full`.
    structure: "neurons" / "channels" removes whole units and shrinks the graph (compact.py), to
    `sparsity` of each layer's units or to target_params / target_flops for the whole model.
    storage: "sparse" / "auto" writes pruned weights as sparse initializers (auto: where smaller).
    batching: False feeds each run of `calib` whole instead of slicing axis 0 (calib.py); the
    report's calibration_samples then counts runs.
    """
    start = time.perf_counter()
    _check_settings(method, sparsity, pattern, scope, calib)
    compact.check_settings(structure, method, pattern, scope, target_params, target_flops, storage,
                           hessian)
    full = full or FullOptions()
    bound = check_full_settings(hessian, method, pattern, full, labels, force)
    loaded = load_any(model)
    if output is not None:
        check_output_path(output, loaded.path, force, loaded.model, loaded.base_dir)
    original = onnx.ModelProto()
    original.CopyFrom(loaded.model)
    sites, skipped = find_sites(loaded.model)
    selection = selection or Selection()
    sites = [s for s in sites if selection.picks(s)]
    # A weight that is also a graph input can be replaced by the caller at run time: prune it
    # only when --include names it.
    overridable = [s for s in sites if s.graph_input and not selection.names(s)]
    sites = [s for s in sites if s not in overridable]
    if not sites:
        raise OnnxObsError("no prunable weights selected: check --include/--exclude/--op-types "
                           "(run `onnx-obs inspect MODEL` to list the sites)" + (
                               "; the selected weights are also graph inputs: name them with "
                               "--include to prune them" if overridable else ""))
    report = Report(command=command, method=method, settings=dict(
        sparsity=sparsity, pattern=f"{pattern[0]}:{pattern[1]}" if pattern else None, scope=scope,
        solver=solver, block_size=block_size, damp=damp, sequential=sequential,
        batch_size=batch_size, max_samples=max_samples, batching=batching))
    if structure is not None or storage != "dense":
        report.settings.update(structure=structure, target_params=target_params,
                               target_flops=target_flops, storage=storage)
    report.skipped = [vars(k) for k in skipped] + [
        {"name": s.name, "op_type": s.op_type, "reason": GRAPH_INPUT_REASON} for s in overridable]
    report.model_params = float_params(loaded.model)
    report.file_size_before = loaded.file_size
    cal = None
    if calib is not None:
        cal = load_calibration(calib, loaded.model, batch_size=batch_size,
                               max_samples=max_samples, labels_key=labels, batching=batching)
        report.calibration_samples = cal.num_samples
    with Progress(enabled=progress) as bar, spilling(loaded, output, original):
        if structure is not None:
            sites = compact.prune_structured(
                loaded, cal, selection, method=method, sparsity=sparsity,
                target_params=target_params, target_flops=target_flops, damp=damp,
                device=device, report=report, bar=bar, capture=capture_hessians)
        elif hessian != "layerwise":
            sites = _drop_uncaptureable(sites, report)
            prune_full(loaded, sites, cal, method=method, sparsity=sparsity, hessian=hessian, options=full,
                       bound=bound, device=device, report=report, bar=bar, force=force)
        elif method == "magnitude":
            _prune_magnitude(sites, loaded, sparsity, pattern, scope, report)
        else:
            sites = _drop_uncaptureable(sites, report)
            _prune_layerwise(sites, loaded, cal, method, sparsity, pattern, solver, block_size,
                             damp, sequential, device, report, bar,
                             None if sequential else hessians)
        _refuse_non_finite(sites, loaded.base_dir)
        report.device = _validate(original, loaded, cal, device, report, bar)
        compact.apply_storage(loaded, storage, device, cal, report)
        if structure is not None or storage != "dense":
            report.costs = compact.measure_costs(original, loaded, cal, device)
        if output is not None:
            report.file_size_after = save_model(loaded.model, output, loaded.base_dir)
    report.notes += [f"{r.name}: already {r.zeros_before / r.params:.1%} zeros, at or above the "
                     f"{sparsity:.1%} target: nothing removed" for r in report.sites
                     if pattern is None and scope == "layer" and hessian == "layerwise" and r.zeros_before
                     and r.zeros_before >= round(sparsity * r.params)]
    report.wall_seconds = time.perf_counter() - start
    return PruneResult(loaded.model, report)


def _check_settings(method, sparsity, pattern, scope, calib) -> None:
    if method not in METHODS:
        raise OnnxObsError(f"unknown method '{method}': use one of {', '.join(METHODS)}")
    if not 0 <= sparsity < 1:
        raise OnnxObsError(f"sparsity must be in [0, 1), got {sparsity}")
    if pattern is not None:
        n, m = pattern
        if not 0 < n < m:
            raise OnnxObsError(f"N:M pattern needs 0 < N < M, got {n}:{m}")
    if scope not in SCOPES:
        raise OnnxObsError(f"unknown scope '{scope}': use one of {', '.join(SCOPES)}")
    if scope == "global" and method != "magnitude":
        raise OnnxObsError("--scope global ranks weights of different layers against each other, "
                           "which only magnitude supports: use --method magnitude or --scope layer")
    if scope == "global" and pattern is not None:
        raise OnnxObsError("--pattern applies per layer: drop --scope global")
    if method != "magnitude" and calib is None:
        raise OnnxObsError(f"--method {method} needs calibration data: pass --calib DATA.npz")


def _site_report(site: Site, before: np.ndarray, after: np.ndarray, method: str) -> SiteReport:
    return SiteReport(name=site.name, op=site.op_type, matrix_shape=tuple(before.shape),
                      params=int(before.size), zeros_before=int(np.sum(before == 0)),
                      zeros_after=int(np.sum(after == 0)), method=method)


def _prune_magnitude(sites, loaded, sparsity, pattern, scope, report) -> None:
    threshold = None
    if scope == "global":
        allw = np.concatenate([np.abs(site_matrix(s, loaded.base_dir)).ravel() for s in sites])
        k = int(round(sparsity * allw.size))
        threshold = np.partition(allw, k - 1)[k - 1] if k else -1.0
        del allw
    for s in sites:  # one weight in memory at a time
        t0 = time.perf_counter()
        w = site_matrix(s, loaded.base_dir)
        if threshold is not None:
            new = np.where(np.abs(w) <= threshold, 0.0, w)
        else:
            new = prune_layer(w, None, method="magnitude", sparsity=sparsity, pattern=pattern).weight
        write_matrix(s, new, loaded.store)
        r = _site_report(s, w, new, "magnitude")
        r.seconds = time.perf_counter() - t0
        report.sites.append(r)


def _drop_uncaptureable(sites, report) -> list[Site]:
    kept = []
    for s in sites:
        if s.captureable:
            kept.append(s)
        else:
            report.skipped.append({"name": s.name, "op_type": s.op_type,
                                   "reason": "inside a subgraph: its activations cannot be "
                                             "captured for a Hessian (use --method magnitude)"})
    if not kept:
        raise OnnxObsError("no selected site can be captured for a Hessian (all are inside "
                           "subgraphs): use --method magnitude")
    return kept


def _prune_layerwise(sites, loaded, cal: Calibration, method, sparsity, pattern, solver,
                     block_size, damp, sequential, device, report, bar, cache=None) -> None:
    """Capture each site's Hessian and prune it; in sequential mode shallower sites go first and
    deeper sites see their already-pruned inputs, so corrections compensate earlier errors."""
    depth = site_depths(loaded.model, sites) if sequential else {s.name: 0 for s in sites}
    waves = sorted(set(depth.values()))
    task = bar.add("pruning sites", total=len(sites))
    for wave in waves:
        batch = [s for s in sites if depth[s.name] == wave]
        missing = [s for s in batch if cache is None or s.name not in cache]
        hessians = capture_hessians(loaded, missing, cal, device, bar) if missing else {}
        if cache is not None:
            cache.update(hessians)
            hessians = cache
        for s in batch:
            t0 = time.perf_counter()
            w = site_matrix(s, loaded.base_dir)
            H = hessians[s.name]
            new = np.empty_like(w)
            r = _site_report(s, w, w, method)
            r.predicted_error = r.measured_error = 0.0
            groups = s.row_groups()
            for rows, Hg, share in zip(groups, H, _group_sparsities(w, groups, sparsity)):
                res = prune_layer(w[rows], Hg, method=method, sparsity=share, pattern=pattern,
                                  solver=solver, block_size=block_size, damp=damp)
                new[rows] = res.weight
                r.predicted_error += res.predicted_error
                r.measured_error += layer_error(w[rows], res.weight, Hg)
                r.solver, r.damping = res.solver, res.damping
            write_matrix(s, new, loaded.store)
            r.zeros_after = int(np.sum(new == 0))
            r.seconds = time.perf_counter() - t0
            report.sites.append(r)
            bar.advance(task)


def _group_sparsities(w: np.ndarray, groups: list[slice], sparsity: float) -> list[float]:
    """Each row group's sparsity, so that their zeros add up to the site's round(sparsity * size)
    (rounding every group's share on its own can fall short: two groups of 1 weight at 30% -> 0)."""
    sizes = np.array([w[g].size for g in groups])
    forced = [int(np.sum(w[g] == 0)) for g in groups]
    return (spread_zeros(round(sparsity * w.size), forced, sizes) / sizes).tolist()


def capture_hessians(loaded: LoadedModel, sites: list[Site], cal: Calibration, device: str,
                     bar, with_bias: bool = False) -> dict[str, np.ndarray]:
    """Run the calibration data once and return each site's (groups, cols, cols) Hessian.

    Sites reading the same activation in the same way share one accumulator. with_bias: every
    input vector gets a trailing constant 1 (H is (groups, cols+1, cols+1)), the input of a bias.
    """
    acts = sorted({u.activation for s in sites for u in s.uses})
    runner = Runner(with_outputs(loaded.model, acts), loaded.base_dir, device, prepack=False)
    sums: dict[tuple, tuple[HessianSum, Site, list]] = {}
    keys = {}
    for s in sites:
        geometries = [_geometry(s, u) for u in s.uses]
        key = tuple((u.activation, u.samples, repr(g)) for u, g in zip(s.uses, geometries))
        keys[s.name] = key
        if key not in sums:
            sums[key] = HessianSum(len(s.row_groups()), s.matrix_shape[1] + with_bias), s, geometries
    task = bar.add("capturing activations", total=len(cal.batches))
    for feeds in cal:
        values = dict(zip(acts, runner.run(feeds, acts)))
        for acc, s, geometries in sums.values():
            for u, geometry in zip(s.uses, geometries):
                for vectors in input_vectors(values[u.activation], u.samples, s.matrix_shape[1],
                                             geometry):
                    if with_bias:
                        vectors = np.concatenate([vectors, np.ones(vectors.shape[:2] + (1,), vectors.dtype)],
                                                 axis=2)
                    acc.add(vectors)
        bar.advance(task)
    return {s.name: sums[keys[s.name]][0].hessian() for s in sites}


def _geometry(site: Site, use) -> ConvGeometry | None:
    if use.samples not in ("conv", "convtranspose"):
        return None
    return ConvGeometry.from_attrs(use.attrs, site.op_shape[2:])


def _refuse_non_finite(sites, base_dir) -> None:
    for s in sites:
        if not np.isfinite(site_matrix(s, base_dir)).all():
            raise OnnxObsError(f"pruning produced NaN/Inf in '{s.name}' (ill-conditioned Hessian?): "
                               "nothing written; raise --damp or add calibration samples")


def _validate(original, loaded, cal, device, report, bar) -> str:
    try:
        check_proto(loaded.model)
    except onnx.checker.ValidationError as e:
        raise OnnxObsError(f"the pruned model fails onnx.checker ({str(e).splitlines()[0]}): "
                           "nothing written; please report this") from e
    # each model runs the calibration data once, if at all: packed weight copies would not pay
    pruned = Runner(loaded.model, loaded.base_dir, device, prepack=False)
    if cal is not None:
        ref = Runner(original, loaded.base_dir, device, prepack=False)
        bar.add("measuring output deviation", total=None)
        report.deviation = compare_runs(ref, pruned, cal.batches)
    return pruned.provider
