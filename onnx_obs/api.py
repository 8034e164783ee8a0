"""The Python API: `prune`, `quantize` and `inspect`. The CLI is a thin wrapper over these."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from onnx_obs.calib import load_calibration
from onnx_obs.config import METHODS, FullOptions, PruneConfig, Selection  # noqa: F401  (public)
from onnx_obs.errors import OnnxObsError
from onnx_obs.graph.model_io import check_output_path, load_any, spilling
from onnx_obs.graph.sites import find_sites
from onnx_obs.inspection import float_params, inspect  # noqa: F401  (public: api.inspect)
from onnx_obs.progress import Progress
from onnx_obs.report import Report
from onnx_obs.safeguards import held_back
from onnx_obs.strategies import STRATEGIES, finish
from onnx_obs.strategies.context import Context
from onnx_obs.threads import run_threads

GRAPH_INPUT_REASON = ("also a graph input: a caller may override it at run time; "
                      "name it with --include to prune it")


@dataclass
class PruneResult:
    model: onnx.ModelProto
    report: Report

    def __iter__(self):
        """`model, report = prune(...)`."""
        return iter((self.model, self.report))


def quantize(model, calib=None, config: PruneConfig | None = None, *, bits: int | None = None,
             **kwargs) -> PruneResult:
    """Quantize the weights of `model` to `bits` (8 or 4; default the config's, else 8) with OBQ /
    GPTQ / RTN, without pruning: `prune(model, calib, config, sparsity=0, bits=bits, ...)`, so
    every keyword of prune and every setting (group_size=128, symmetric=False,
    quant_method="gptq", damp=...) applies; pass sparsity= to prune and quantize jointly;
    activations="int8" (8 bits) adds activation QDQ pairs so onnxruntime runs integer kernels."""
    config = config or PruneConfig()
    bits = bits or config.quantize.bits or 8
    return prune(model, calib, config, **{"sparsity": 0.0, "bits": bits, **kwargs})


def prune(model, calib=None, config: PruneConfig | None = None, *, output: str | Path | None = None,
          force: bool = False, progress: bool | str = False, command: str = "",
          hessians: dict[str, np.ndarray] | None = None,
          timer: Callable[[onnx.ModelProto], float] | None = None, **overrides) -> PruneResult:
    """Prune `model` (path or ModelProto, never changed) and return the pruned proto and its report.

    calib: calibration data (a path, a dict of arrays, a CalibrationDataReader or feed dicts;
    calib.py). config: the settings (default PruneConfig()); keyword overrides change single
    settings by name, e.g. prune(m, data, sparsity=0.7, damp=0.02) (PruneConfig.replace); bits=4
    (or 8) also quantizes the pruned weights (see `quantize`).
    With `output`, the model is validated and then written atomically (never over the input).
    progress: True shows progress on stderr (progress.py), "verbose" a line per step.
    hessians: a cache, by site name, shared by calls on the same model and calibration data with
    sequential=False (their Hessians are the original model's): read where present, else
    captured and stored in it. Ignored in sequential mode, whose Hessians depend on the pruning.
    timer: for target_latency_ms / latency="measured", the latency in ms of a model proto (say
    on the device it will run on); default onnxruntime here at batch 1 (latency_table.py).
    """
    start = time.perf_counter()
    config = (config or PruneConfig()).replace(**overrides)
    config.validate(has_calibration=calib is not None)
    if config.full.save_gradient_graph is not None:
        check_output_path(config.full.save_gradient_graph, None, force)
    loaded = load_any(model)
    if output is not None:
        check_output_path(output, loaded.path, force, loaded.model, loaded.base_dir)
    original = onnx.ModelProto()
    original.CopyFrom(loaded.model)
    sites, skipped = find_sites(loaded.model)
    selection = config.selection
    sites = [s for s in sites if selection.picks(s)]
    # A weight that is also a graph input can be replaced by the caller at run time: prune it
    # only when --include names it.
    overridable = [s for s in sites if s.graph_input and not selection.names(s)]
    sites = [s for s in sites if s not in overridable]
    dense = held_back(sites, selection, loaded.base_dir)   # tiny sites, fixed transforms
    sites = [s for s in sites if s.name not in dense]
    if not sites:
        raise OnnxObsError("no prunable weights selected: check --include/--exclude/--op-types "
                           "(run `onnx-obs inspect MODEL` to list the sites)" + (
                               "; the selected weights are also graph inputs: name them with "
                               "--include to prune them" if overridable else "") + (
                               "; the selected weights look like fixed transforms: name them "
                               "with --include to prune them" if dense else ""))
    report = Report(command=command, method=config.method, settings=config.report_settings())
    report.skipped = [vars(k) for k in skipped] + [
        {"name": s.name, "op_type": s.op_type, "reason": GRAPH_INPUT_REASON} for s in overridable
    ] + [{"name": name, "op_type": op, "reason": reason} for name, (op, reason) in dense.items()]
    report.model_params = float_params(loaded.model)
    report.file_size_before = loaded.file_size
    cal = None
    if calib is not None:
        data = config.data
        cal = load_calibration(calib, loaded.model, batch_size=data.batch_size,
                               max_samples=data.max_samples, labels_key=data.labels,
                               batching=data.batching)
        report.calibration_samples = cal.num_samples
        report.notes += cal.notes
    report.phases["load"] = time.perf_counter() - start  # model, sites and calibration data
    with (Progress(enabled=bool(progress), verbose=progress == "verbose") as bar, spilling(loaded, output, original),
          run_threads(config.threads) as report.threads):
        shared = hessians if not config.layerwise.sequential else None
        ctx = Context(loaded, sites, cal, config, report, bar, force, shared, timer=timer)
        with report.phases("other"):  # what the strategy's own phases leave out (graph surgery...)
            STRATEGIES[config.mode].run(ctx)
        finish.run(ctx, original, output)
    report.wall_seconds = time.perf_counter() - start
    return PruneResult(loaded.model, report)
