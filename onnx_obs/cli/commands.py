"""The `onnx-obs` commands: parse, call the API, print. Nothing else lives here."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from onnx_obs import api
from onnx_obs import compare as sweep
from onnx_obs import evaluate as evaluation
from onnx_obs import plot as plotting
from onnx_obs.cli.app import STDOUT, app, err, handled, out, verbosity
from onnx_obs.cli.options import (CHECKS, DATA, FULL, METHOD, OUTPUT, QUANT, SOLVER, STRUCT, TIMING, ActOrderOpt,
                                  AllocationOpt, MaxLayerSparsityOpt,
                                  BatchSizeOpt, ConfigOpt, DampOpt, DeviceOpt, ExcludeOpt, FormatOpt, GroupSizeOpt,
                                  IncludeOpt, JsonOpt, MaxSamplesOpt, MinParamsOpt, NoBatchingOpt, OpTypesOpt,
                                  PatternOpt, QuietOpt, ReportOpt, SolverOpt, SymmetricOpt, VerboseOpt, prune_config)
from onnx_obs.cli.options import (ActivationCalibrationOpt, ActivationPercentileOpt, ActivationsOpt, CaptureMemoryOpt,
                                  HessianPrecisionOpt, MaxPositionsOpt, ThreadsOpt, TimeBudgetOpt)
from onnx_obs.config import Selection, parse_op_types, parse_pattern
from onnx_obs.cli.show import (_print_compare, _print_evaluate, _print_inspect, _print_prune,
                               check_json_path, write_json)
from onnx_obs.errors import OnnxObsError


@app.command()
@handled
def prune(
    ctx: typer.Context,
    model: Path = typer.Argument(..., help="The ONNX model to prune (never modified)."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the pruned model.", rich_help_panel=OUTPUT),
    calib: Optional[Path] = typer.Option(None, "--calib", help=".npz keyed by input name (or .npy for one input), batched on axis 0; or a directory of .npz (see --no-batching).", rich_help_panel=DATA),
    config_file: Optional[Path] = ConfigOpt,
    method: str = typer.Option("obs", "--method", help="obs (layer-wise OBS with weight correction), obd, wanda or magnitude.", rich_help_panel=METHOD),
    sparsity: float = typer.Option(0.5, "--sparsity", help="Fraction of the weights to remove: of all selected weights with auto allocation (the default for unstructured layer-wise pruning), else of each site's.", rich_help_panel=METHOD),
    pattern: Optional[str] = PatternOpt,
    allocation: Optional[str] = AllocationOpt,
    max_layer_sparsity: float = MaxLayerSparsityOpt,
    scope: str = typer.Option("layer", "--scope", help="layer: the target holds per site; global: rank all sites together (magnitude).", rich_help_panel=METHOD),
    solver: str = SolverOpt,
    block_size: int = typer.Option(128, "--block-size", help="Column block of the fast solver.", rich_help_panel=SOLVER),
    damp: float = DampOpt,
    sequential: bool = typer.Option(True, "--sequential/--no-sequential", help="Capture each site's inputs after the sites before it are pruned.", rich_help_panel=SOLVER),
    capture_memory: int = CaptureMemoryOpt,
    time_budget: float = TimeBudgetOpt,
    max_positions: int | None = MaxPositionsOpt,
    hessian_precision: str = HessianPrecisionOpt,
    batch_size: int = BatchSizeOpt,
    max_samples: Optional[int] = MaxSamplesOpt,
    labels: Optional[str] = typer.Option(None, "--labels", help="Key of the calibration file that holds targets (not a model input).", rich_help_panel=DATA),
    no_batching: bool = NoBatchingOpt,
    include: Optional[str] = IncludeOpt, exclude: Optional[str] = ExcludeOpt, op_types: Optional[str] = OpTypesOpt,
    min_params: int = MinParamsOpt,
    device: str = DeviceOpt,
    threads: int = ThreadsOpt,
    structure: Optional[str] = typer.Option(None, "--structure", help="neurons or channels (the same): remove whole output units with group OBS (--method obs) or by L1 norm (magnitude), shrinking the graph; --sparsity is then the fraction of units per layer.", rich_help_panel=STRUCT),
    target_params: Optional[int] = typer.Option(None, "--target-params", help="With --structure: remove units until the model has at most this many parameters.", rich_help_panel=STRUCT),
    target_flops: Optional[float] = typer.Option(None, "--target-flops", help="With --structure: remove units until the model needs at most this many MACs per sample.", rich_help_panel=STRUCT),
    target_speedup: Optional[float] = typer.Option(None, "--target-speedup", help="With --structure: remove units until the model needs this many times fewer MACs (1.5: two thirds of them), or with --latency measured until its measured batch-1 latency is this many times lower.", rich_help_panel=STRUCT),
    target_latency_ms: Optional[float] = typer.Option(None, "--target-latency-ms", help="With --structure: remove units until the measured batch-1 onnxruntime latency is at most this many ms (latency measured per width on this machine).", rich_help_panel=STRUCT),
    latency: str = typer.Option("macs", "--latency", help="What --target-speedup divides: macs (counted, default) or measured (each group timed at a few widths with onnxruntime on this machine).", rich_help_panel=STRUCT),
    storage: str = typer.Option("dense", "--storage", help="dense, sparse (pruned weights as sparse initializers) or auto (sparse where that is smaller).", rich_help_panel=OUTPUT),
    report: Optional[Path] = ReportOpt,
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output file.", rich_help_panel=OUTPUT),
    quiet: bool = QuietOpt, verbose: bool = VerboseOpt,
    hessian: str = typer.Option("layerwise", "--hessian", help="layerwise (per site, default); full: one OBS over all selected weights with the network's output Hessian (Hassibi & Stork 1992); fisher: the same with the empirical Fisher of the loss (needs --labels). With full/fisher, --sparsity is a global fraction and --method is obs, obd or magnitude.", rich_help_panel=FULL),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="Full-network: H^-1 starts at I/alpha (Eq. 17; the paper used 1e-8..1e-4). Default: 1% of mean diag(H), from the data.", rich_help_panel=FULL),
    max_error_increase: Optional[str] = typer.Option(None, "--max-error-increase", help="Full-network: stop before the error increase passes this, predicted or measured on the calibration data at checkpoints during surgery (then back to the last checkpoint within it): absolute, or N% of the current error (needs --labels).", rich_help_panel=FULL),
    recompute_every: Optional[int] = typer.Option(None, "--recompute-every", help="Full-network obs: rebuild H^-1 at the corrected weights every N deletions.", rich_help_panel=FULL),
    step: int = typer.Option(1, "--step", help="Full-network obs: weights deleted together per step (1 = one at a time, as the paper).", rich_help_panel=FULL),
    prune_biases: bool = typer.Option(False, "--prune-biases", help="Full-network: the selected nodes' biases join the pool (the paper counts them as weights).", rich_help_panel=FULL),
    gradients: str = typer.Option("auto", "--gradients", help="Full-network: graph (a gradient graph), fd (finite differences) or auto (graph where every op has a rule).", rich_help_panel=FULL),
    save_gradient_graph: Optional[Path] = typer.Option(None, "--save-gradient-graph", help="Full-network: also write the gradient graph here.", rich_help_panel=FULL),
    bits: Optional[int] = typer.Option(None, "--bits", help="Also quantize the pruned weights to 8 or 4 bits in the same pass (zeros stay zeros); see onnx-obs quantize.", rich_help_panel=QUANT),
    group_size: int = GroupSizeOpt, symmetric: bool = SymmetricOpt, act_order: bool = ActOrderOpt,
    quant_method: str = typer.Option("auto", "--quant-method", help="With --bits: obq, gptq, rtn or auto (obq where it costs about 2 s or less per layer, else gptq).", rich_help_panel=QUANT),
    format: str = FormatOpt, activations: str = ActivationsOpt,
    activation_calibration: str = ActivationCalibrationOpt, activation_percentile: float = ActivationPercentileOpt,
):
    """Prune MODEL and write the pruned model to -o."""
    _run(api.prune, ctx, model, calib, config_file, output, force, report, quiet, verbose)


@app.command()
@handled
def quantize(
    ctx: typer.Context,
    model: Path = typer.Argument(..., help="The ONNX model to quantize (never modified)."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the quantized model.", rich_help_panel=OUTPUT),
    calib: Optional[Path] = typer.Option(None, "--calib", help=".npz keyed by input name (or .npy for one input), batched on axis 0; or a directory of .npz (see --no-batching). Needed by obq and gptq.", rich_help_panel=DATA),
    config_file: Optional[Path] = ConfigOpt,
    bits: int = typer.Option(8, "--bits", help="8 (int8 codes) or 4 (int4, opset 21).", rich_help_panel=QUANT),
    group_size: int = GroupSizeOpt, symmetric: bool = SymmetricOpt,
    quant_method: str = typer.Option("auto", "--method", help="obq (exact greedy, Optimal Brain Quantization), gptq (fixed column order, blocked), rtn (round to nearest, no correction), or auto: obq where it costs about 2 s or less per layer, else gptq.", rich_help_panel=QUANT),
    act_order: bool = ActOrderOpt,
    activations: str = ActivationsOpt,
    activation_calibration: str = ActivationCalibrationOpt, activation_percentile: float = ActivationPercentileOpt,
    block_size: int = typer.Option(128, "--block-size", help="Column block of GPTQ's lazy updates.", rich_help_panel=SOLVER),
    damp: float = DampOpt,
    sequential: bool = typer.Option(True, "--sequential/--no-sequential", help="Capture each site's inputs after the sites before it are quantized.", rich_help_panel=SOLVER),
    capture_memory: int = CaptureMemoryOpt, max_positions: int | None = MaxPositionsOpt,
    hessian_precision: str = HessianPrecisionOpt,
    batch_size: int = BatchSizeOpt,
    max_samples: Optional[int] = MaxSamplesOpt,
    no_batching: bool = NoBatchingOpt,
    include: Optional[str] = IncludeOpt, exclude: Optional[str] = ExcludeOpt, op_types: Optional[str] = OpTypesOpt,
    device: str = DeviceOpt,
    threads: int = ThreadsOpt,
    format: str = FormatOpt,
    report: Optional[Path] = ReportOpt,
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output file.", rich_help_panel=OUTPUT),
    quiet: bool = QuietOpt, verbose: bool = VerboseOpt,
):
    """Quantize MODEL's weights to int8 / int4 with OBQ, GPTQ or RTN and write the model to -o."""
    _run(api.quantize, ctx, model, calib, config_file, output, force, report, quiet, verbose)


def _run(fn, ctx: typer.Context, model: Path, calib: Path | None, config_file: Path | None, output: Path,
         force: bool, report: Path | None, quiet: bool, verbose: bool) -> None:
    """prune / quantize: the config from the options, the run, then the report and the summary."""
    progress = verbosity(quiet, verbose)
    _check_report_path(report, model, output)
    result = fn(str(model), str(calib) if calib else None, prune_config(ctx, config_file), output=output,
                force=force, progress=progress, command="onnx-obs " + shlex.join(sys.argv[1:]))
    _show_result(result, report, progress, output)


def _check_report_path(report: Path | None, model: Path, output: Path) -> None:
    if report is None or str(report) == STDOUT:
        return
    if report.resolve() in (model.resolve(), output.resolve()):
        raise OnnxObsError("--report must not be the model or the output path")
    if not (report.parent.is_dir() and os.access(report.parent, os.W_OK)):
        raise OnnxObsError(f"cannot write the report into {report.parent}: the directory is "
                           "missing or not writable")


def _show_result(result: api.PruneResult, report: Path | None, progress, output: Path) -> None:
    """The JSON report where --report/--json asked for it, then the summary (not when the JSON
    goes to stdout)."""
    for warning in result.report.warnings:
        err.print(escape(f"warning: {warning}"), style="bold yellow", highlight=False)
    if report is not None:
        write_json(report, result.report.to_json(), "--report")
    if progress and not (report is not None and str(report) == STDOUT):
        _print_prune(result.report.to_dict(), output)


@app.command()
@handled
def inspect(
    model: Path = typer.Argument(..., help="The ONNX model to inspect."),
    include: Optional[str] = IncludeOpt, exclude: Optional[str] = ExcludeOpt, op_types: Optional[str] = OpTypesOpt,
    min_params: int = MinParamsOpt,
    json_out: Optional[Path] = JsonOpt,
    quiet: bool = QuietOpt, verbose: bool = VerboseOpt,
):
    """List MODEL's inputs and outputs, its prunable sites (with what to watch for) and the
    weights left alone."""
    progress = verbosity(quiet, verbose)
    check_json_path(json_out)
    info = api.inspect(str(model), Selection(include, exclude, parse_op_types(op_types), min_params))
    if json_out is not None:
        write_json(json_out, json.dumps(info.to_dict(), indent=2), "--json")
    if progress and (json_out is None or str(json_out) != STDOUT):
        _print_inspect(info, verbose=progress == "verbose")


@app.command()
@handled
def evaluate(
    original: Path = typer.Argument(..., help="The original ONNX model."),
    pruned: Path = typer.Argument(..., help="The pruned model to compare with it."),
    data: Path = typer.Option(..., "--data", help=".npz keyed by input name (or .npy for one input), batched on axis 0; or a directory of .npz (see --no-batching).", rich_help_panel=DATA),
    metric: Optional[str] = typer.Option(None, "--metric", metavar="MODULE:FUNCTION", help="Also score with your own function f(original, pruned) of two dicts output name -> array (one batch each), returning a number: its sample-weighted mean is reported under the function's name and checked by --fail-under/--fail-over NAME=VALUE. MODULE may be a .py file.", rich_help_panel=CHECKS),
    no_batching: bool = NoBatchingOpt,
    labels: Optional[str] = typer.Option(None, "--labels", help="Key of the data file holding class labels (default: a key 'label' or 'labels' that is not an input).", rich_help_panel=DATA),
    batch_size: int = BatchSizeOpt,
    repeats: int = typer.Option(5, "--repeats", help="Timed passes per model after a warm-up; the median is reported (0: no timing).", rich_help_panel=TIMING),
    time_samples: int = typer.Option(evaluation.TIME_SAMPLES, "--time-samples", help="Time on the first batches holding this many samples (runs without batching), not the whole data set: timing costs 2 x (repeats + 1) passes.", rich_help_panel=TIMING),
    device: str = DeviceOpt,
    fail_under: Optional[str] = typer.Option(None, "--fail-under", help="Exit 1 when a higher-is-better metric is below its threshold: comma list of metric=value over top1_agreement (or agreement, top1), top5_agreement (top5), accuracy, cosine; e.g. agreement=0.99,accuracy=0.95.", rich_help_panel=CHECKS),
    fail_over: Optional[str] = typer.Option(None, "--fail-over", help="Exit 1 when a lower-is-better metric is above its threshold: relative_mse (or mse), max_abs_error (max_abs), accuracy_drop (original minus pruned accuracy); e.g. mse=0.01,accuracy_drop=0.005.", rich_help_panel=CHECKS),
    json_out: Optional[Path] = JsonOpt,
    quiet: bool = QuietOpt, verbose: bool = VerboseOpt,
):
    """Compare PRUNED with ORIGINAL on the same data: output error, agreement, accuracy, speed, size.

    Output metrics are checked on every output that has them. Exit status: 0 when every
    threshold holds, 1 when one is missed (one line per miss on stderr), 2 on bad input.
    """
    progress = verbosity(quiet, verbose)
    check_json_path(json_out)
    fn = evaluation.load_metric(metric) if metric else None
    extra = [fn.__name__] if fn else []
    under = evaluation.parse_thresholds(fail_under, "--fail-under", extra)
    over = evaluation.parse_thresholds(fail_over, "--fail-over", extra)
    result = evaluation.evaluate(str(original), str(pruned), str(data), labels=labels,
                                 batch_size=batch_size, repeats=repeats, device=device,
                                 batching=not no_batching, time_samples=time_samples,
                                 metric=fn, progress=progress)
    checks = evaluation.check_thresholds(result, under, over)
    if json_out is not None:
        write_json(json_out, json.dumps({**result.to_dict(), "thresholds": [c.to_dict() for c in checks]},
                                        indent=2), "--json")
    if progress and (json_out is None or str(json_out) != STDOUT):
        _print_evaluate(result, checks)
    missed = [c for c in checks if not c.passed]
    for c in missed:
        err.print(f"[bold red]threshold missed:[/] {escape(evaluation.failure_message(c))}", highlight=False, soft_wrap=True)
    if missed:
        raise typer.Exit(1)

@app.command()
@handled
def compare(
    ctx: typer.Context,
    model: Path = typer.Argument(..., help="The ONNX model to prune (never modified)."),
    calib: Path = typer.Option(..., "--calib", help="Calibration .npz keyed by input name (or .npy for one input), batched on axis 0; or a directory of .npz (see --no-batching).", rich_help_panel=DATA),
    eval_data: Optional[Path] = typer.Option(None, "--eval", help="Held-out data to score on (default: the calibration data, with a warning).", rich_help_panel=DATA),
    methods: Optional[str] = typer.Option(None, "--methods", help="Comma list of methods to compare (default magnitude,wanda,obd,obs; with --bits, obs: the pruning before quantization at each sparsity above 0).", rich_help_panel=METHOD),
    sparsities: Optional[str] = typer.Option(None, "--sparsities", help=f"start:stop:step (stop included when on the grid) or a comma list (default {sweep.DEFAULT_SPARSITIES}).", rich_help_panel=METHOD),
    pattern: Optional[str] = typer.Option(None, "--pattern", help="N:M semi-structured sparsity instead of --sparsities, e.g. 2:4.", rich_help_panel=METHOD),
    labels: Optional[str] = typer.Option(None, "--labels", help="Key of the evaluation data holding class labels: score by accuracy (default: a key 'label' or 'labels').", rich_help_panel=DATA),
    allocation: Optional[str] = typer.Option(None, "--allocation", help="uniform, auto (per-site levels, see prune --allocation) or uniform,auto: one curve per method and allocation (magnitude stays uniform). Default: as prune (auto for obs, obd and wanda), one curve per method.", rich_help_panel=METHOD),
    bits: Optional[str] = typer.Option(None, "--bits", help="Sweep quantization instead: comma list of 8 and 4, e.g. 8,4. Each --quant-methods method at each bits, without pruning (or after pruning with --methods at each --sparsities); rows add the written file's size.", rich_help_panel=QUANT),
    quant_methods: str = typer.Option("rtn,gptq,obq", "--quant-methods", help="With --bits: comma list of rtn, gptq, obq (auto: obq where affordable, else gptq).", rich_help_panel=QUANT),
    sequential: bool = typer.Option(True, "--sequential/--no-sequential", help="Recapture Hessians after earlier layers are pruned (as prune does); off: capture the original model's Hessians once and share them across all runs (faster).", rich_help_panel=SOLVER),
    min_params: int = MinParamsOpt,
    include: Optional[str] = IncludeOpt, exclude: Optional[str] = ExcludeOpt, op_types: Optional[str] = OpTypesOpt,
    max_samples: Optional[int] = MaxSamplesOpt,
    batch_size: int = BatchSizeOpt,
    no_batching: bool = NoBatchingOpt,
    solver: str = SolverOpt,
    damp: float = DampOpt,
    device: str = DeviceOpt,
    max_loss: Optional[float] = typer.Option(None, "--max-loss", help="Per method, report the highest sparsity up to which the quality loss (accuracy or top-1 agreement, absolute, e.g. 0.01 = 1 point) stays within this.", rich_help_panel=OUTPUT),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write quality vs sparsity (with --bits: vs file size) to this PNG and an SVG beside it (needs matplotlib: pip install onnx-obs\\[plot]).", rich_help_panel=OUTPUT),
    json_out: Optional[Path] = JsonOpt,
    quiet: bool = QuietOpt, verbose: bool = VerboseOpt,
):
    """Prune MODEL with each method at each sparsity and score every result on held-out data.

    Prints one row per method and sparsity: the fraction of zero weights reached, top-1 agreement
    with the original, accuracy (with labels), relative MSE of the output and seconds. With --bits,
    quantizes instead (one row per quantization method, sparsity and bits, with the file's size). Exit
    status 2 on bad input, or when --plot cannot be drawn (the table and JSON are still written).
    """
    progress = verbosity(quiet, verbose)
    check_json_path(json_out)
    sweep.check_writable(plot, "--plot")
    if plot is not None and not plotting.available():
        err.print(f"[bold yellow]warning:[/] matplotlib is not installed, so no plot will be drawn: "
                  f"{escape(plotting.INSTALL_HINT)}", highlight=False, soft_wrap=True)
    pat = parse_pattern(pattern)
    allocations = sweep.parse_allocations(allocation) if allocation else None
    bit_grid = sweep.parse_bits(bits) if bits is not None else None
    grid = (None if (pat or bit_grid) and sparsities is None else
            sweep.parse_sparsities(sparsities or sweep.DEFAULT_SPARSITIES))
    methods = sweep.parse_methods(methods or ("obs" if bit_grid else "magnitude,wanda,obd,obs"))
    quant = sweep.parse_quant_methods(quant_methods) if bit_grid else None
    if eval_data is None:
        err.print("[bold yellow]warning: no --eval data: scoring on the calibration data flatters every "
                  "method that uses it; pass held-out data with --eval[/]", highlight=False, soft_wrap=True)
    result = sweep.compare(str(model), str(calib), prune_config(ctx, None, exclude=("labels", "allocation", "bits")),
                           methods=methods, sparsities=grid,
                           allocations=allocations, bits=bit_grid,
                           quant_methods=quant,
                           eval_data=str(eval_data) if eval_data else None, labels=labels,
                           max_loss=max_loss, progress=progress)
    if json_out is not None:
        write_json(json_out, json.dumps(result.to_dict(), indent=2), "--json")
    if progress and (json_out is None or str(json_out) != STDOUT):
        _print_compare(result)
    if plot is not None:
        if not plotting.available():
            raise OnnxObsError(f"no plot written: matplotlib is not installed ({plotting.INSTALL_HINT}); "
                               "the table and JSON are complete")
        paths = plotting.plot_compare(result, plot)
        if progress:
            out.print(f"wrote    {' and '.join(map(str, paths))}", highlight=False)

