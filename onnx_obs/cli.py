"""The `onnx-obs` command line: parse, call the API, print. Nothing else lives here."""

from __future__ import annotations

import functools
import json
import os
import shlex
import sys
import traceback
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from onnx_obs import api
from onnx_obs import compare as sweep
from onnx_obs import evaluate as evaluation
from onnx_obs import plot as plotting
from onnx_obs.errors import OnnxObsError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Prune ONNX models with Optimal Brain Surgeon: remove weights, correct the "
                       "rest, write a standard ONNX file.")
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True)
_state = {"debug": False}


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")):
    _state["debug"] = debug


def handled(fn):
    """Turn user errors into one line on stderr and exit code 2 (tracebacks only with --debug)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OnnxObsError as e:
            if _state["debug"]:
                traceback.print_exc()
            err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            err.print("interrupted: nothing was written")
            raise typer.Exit(130)
    return wrapper


IncludeOpt = typer.Option(None, "--include", help="Only sites whose tensor or node name matches this regex.")
ExcludeOpt = typer.Option(None, "--exclude", help="Skip sites whose tensor or node name matches this regex.")
OpTypesOpt = typer.Option(None, "--op-types", help="Comma-separated op types to prune, e.g. Conv,Gemm.")
NoBatchingOpt = typer.Option(False, "--no-batching", help="Feed the arrays whole instead of slicing axis 0 into batches, for inputs not batched on axis 0 (scalars, recurrent states): one onnxruntime run per .npz of a directory (by name), per KEY__0, KEY__1, ... group of an .npz, or per plain file. Shapes are checked on every axis; samples count runs.")


def _selection(include, exclude, op_types) -> api.Selection:
    ops = [o.strip() for o in op_types.split(",") if o.strip()] if op_types else None
    return api.Selection(include, exclude, ops)


def _pattern(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        n, m = (int(x) for x in text.split(":"))
    except ValueError:
        raise OnnxObsError(f"--pattern must look like N:M (e.g. 2:4), got '{text}'") from None
    return n, m


@app.command()
@handled
def prune(
    model: Path = typer.Argument(..., help="The ONNX model to prune (never modified)."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the pruned model."),
    calib: Optional[Path] = typer.Option(None, "--calib", help=".npz keyed by input name (or .npy for one input), batched on axis 0; or a directory of .npz (see --no-batching)."),
    method: str = typer.Option("obs", "--method", help="obs (layer-wise OBS with weight correction), obd, wanda or magnitude."),
    sparsity: float = typer.Option(0.5, "--sparsity", help="Fraction of each site's weights to remove."),
    pattern: Optional[str] = typer.Option(None, "--pattern", help="N:M semi-structured sparsity, e.g. 2:4 (overrides --sparsity)."),
    scope: str = typer.Option("layer", "--scope", help="layer: the target holds per site; global: rank all sites together (magnitude)."),
    solver: str = typer.Option("auto", "--solver", help="OBS solver: exact (OBC), fast (SparseGPT), or auto: exact where it costs about 2 s or less per layer, else fast with a least-squares refit of the kept weights where that costs about 2 s or less."),
    block_size: int = typer.Option(128, "--block-size", help="Column block of the fast solver."),
    damp: float = typer.Option(0.01, "--damp", help="Hessian damping, as a fraction of mean diag(H)."),
    sequential: bool = typer.Option(True, "--sequential/--no-sequential", help="Capture each site's inputs after the sites before it are pruned."),
    batch_size: int = typer.Option(32, "--batch-size", help="Calibration samples per onnxruntime run."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", help="Use at most this many calibration samples."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Key of the calibration file that holds targets (not a model input)."),
    no_batching: bool = NoBatchingOpt,
    include: Optional[str] = IncludeOpt, exclude: Optional[str] = ExcludeOpt, op_types: Optional[str] = OpTypesOpt,
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda (onnxruntime-gpu)."),
    structure: Optional[str] = typer.Option(None, "--structure", help="neurons or channels (the same): remove whole output units with group OBS (--method obs) or by L1 norm (magnitude), shrinking the graph; --sparsity is then the fraction of units per layer."),
    target_params: Optional[int] = typer.Option(None, "--target-params", help="With --structure: remove units until the model has at most this many parameters."),
    target_flops: Optional[float] = typer.Option(None, "--target-flops", help="With --structure: remove units until the model needs at most this many MACs per sample."),
    storage: str = typer.Option("dense", "--storage", help="dense, sparse (pruned weights as sparse initializers) or auto (sparse where that is smaller)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the JSON report here."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output file."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing but errors."),
    hessian: str = typer.Option("layerwise", "--hessian", help="layerwise (per site, default); full: one OBS over all selected weights with the network's output Hessian (Hassibi & Stork 1992); fisher: the same with the empirical Fisher of the loss (needs --labels). With full/fisher, --sparsity is a global fraction and --method is obs, obd or magnitude."),
    alpha: float = typer.Option(1e-6, "--alpha", help="Full-network: H^-1 starts at I/alpha (Eq. 17; the paper used 1e-8..1e-4)."),
    max_error_increase: Optional[str] = typer.Option(None, "--max-error-increase", help="Full-network: stop before the predicted error increase passes this: absolute, or N% of the current error (needs --labels)."),
    recompute_every: Optional[int] = typer.Option(None, "--recompute-every", help="Full-network obs: rebuild H^-1 at the corrected weights every N deletions."),
    step: int = typer.Option(1, "--step", help="Full-network obs: weights deleted together per step (1 = one at a time, as the paper)."),
    prune_biases: bool = typer.Option(False, "--prune-biases", help="Full-network: the selected nodes' biases join the pool (the paper counts them as weights)."),
    gradients: str = typer.Option("auto", "--gradients", help="Full-network: graph (a gradient graph), fd (finite differences) or auto (graph where every op has a rule)."),
    save_gradient_graph: Optional[Path] = typer.Option(None, "--save-gradient-graph", help="Full-network: also write the gradient graph here."),
):
    """Prune MODEL and write the pruned model to -o."""
    if report is not None and report.resolve() in (model.resolve(), output.resolve()):
        raise OnnxObsError("--report must not be the model or the output path")
    if report is not None and not (report.parent.is_dir() and os.access(report.parent, os.W_OK)):
        raise OnnxObsError(f"cannot write the report into {report.parent}: the directory is "
                           "missing or not writable")
    result = api.prune(
        str(model), str(calib) if calib else None, method=method, sparsity=sparsity,
        pattern=_pattern(pattern), scope=scope, selection=_selection(include, exclude, op_types),
        solver=solver, block_size=block_size, damp=damp, sequential=sequential,
        batch_size=batch_size, max_samples=max_samples, labels=labels, batching=not no_batching, device=device,
        output=output, force=force, progress=not quiet,
        structure=structure, target_params=target_params, target_flops=target_flops, storage=storage,
        command="onnx-obs " + shlex.join(sys.argv[1:]), hessian=hessian,
        full=api.FullOptions(alpha=alpha, max_error_increase=max_error_increase,
                             recompute_every=recompute_every, step=step, prune_biases=prune_biases,
                             gradients=gradients, save_gradient_graph=save_gradient_graph))
    data = result.report.to_dict()
    if report is not None:
        try:
            report.write_text(result.report.to_json())
        except OSError as e:
            raise OnnxObsError(f"could not write the report {report}: {e.strerror or e}") from e
    if not quiet:
        _print_prune(data, output)


def _print_prune(d: dict, output: Path) -> None:
    t = Table(title=f"{d['method']} pruning", title_justify="left")
    for col in ("site", "op", "2-D shape", "sparsity", "pred. error", "meas. error", "s"):
        t.add_column(col, justify="left" if col in ("site", "op") else "right")
    for s in d["sites"]:
        t.add_row(s["name"], s["op"], "x".join(map(str, s["matrix_shape"])), f"{s['sparsity']:.1%}",
                  _num(s["predicted_error"]), _num(s["measured_error"]), f"{s['seconds']:.2f}")
    tot = d["totals"]
    if "structure" in d:
        _print_structure(d)
    else:
        out.print(t)
        out.print(f"weights  {tot['nonzero_params_before']:,} -> {tot['nonzero_params_after']:,} non-zero "
                  f"in {tot['sites']} sites ({tot['sparsity']:.1%} sparse); model has {tot['model_params']:,} parameters")
    _print_costs(d)
    out.print(f"file     {_size(tot['file_size_before'])} -> {_size(tot['file_size_after'])}")
    for name, dev in d["deviation"].items():
        extra = f", top-1 agreement {dev['top1_agreement']:.2%}" if "top1_agreement" in dev else ""
        out.print(f"output   {name}: relative MSE {dev['relative_mse']:.3g}, max abs error "
                  f"{dev['max_abs_error']:.3g}{extra} (on {d['calibration_samples']} calibration "
                  f"{_unit(d['settings'])})")
    for k in d["skipped"]:
        out.print(escape(f"skipped  {k['name']} ({k['op_type']}): {k['reason']}"), highlight=False)
    for n in d["notes"]:
        out.print(escape(f"note     {n}"), highlight=False)
    out.print(f"wrote    {output} in {tot['wall_seconds']:.1f} s on {d['device']}, "
              f"peak memory {tot['peak_memory_mb']:.0f} MB")


def _print_structure(d: dict) -> None:
    t = Table(title=f"structured {d['method']} pruning", title_justify="left")
    for col in ("layer", "op", "units", "consumers", "pred. error", "meas. error", "rel. error", "s"):
        t.add_column(col, justify="left" if col in ("layer", "op", "consumers") else "right")
    for e in d["structure"]:
        t.add_row(e["name"], e["op"], f"{e['units_before']} -> {e['units_after']}", ", ".join(e["consumers"]),
                  _num(e["predicted_error"]), _num(e["measured_error"]), _num(e["relative_error"]),
                  f"{e['seconds']:.2f}")
    out.print(t)


def _print_costs(d: dict) -> None:
    c = d.get("costs", {})
    for key, label in (("params", "params"), ("nonzero_params", "non-zero"), ("macs", "MACs")):
        if key in c:
            out.print(f"{label:<8} {c[key]['before']:,} -> {c[key]['after']:,} "
                      f"({c[key]['after'] / max(c[key]['before'], 1):.1%})")
    for key, v in c.items():
        if key.startswith("latency_ms_"):
            what = "first run" if key == "latency_ms_first_run" else f"batch {key.rsplit('_', 1)[1]}"
            out.print(f"latency  {what}: {v['before']:.3f} -> {v['after']:.3f} ms "
                      f"({v['speedup']:.2f}x, onnxruntime, median of repeated runs)")
    sparse = [s for s in d.get("storage", []) if s["stored"] == "sparse"]
    if d.get("storage"):
        out.print(f"storage  {len(sparse)} of {len(d['storage'])} pruned weights stored sparse "
                  f"({sum(s['dense_bytes'] for s in sparse):,} -> {sum(s['sparse_bytes'] for s in sparse):,} bytes)")


@app.command()
@handled
def inspect(
    model: Path = typer.Argument(..., help="The ONNX model to inspect."),
    include: Optional[str] = IncludeOpt, exclude: Optional[str] = ExcludeOpt, op_types: Optional[str] = OpTypesOpt,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """List the prunable sites of MODEL and the weights left alone."""
    info = api.inspect(str(model), _selection(include, exclude, op_types))
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    t = Table(title=f"{info['model']}  (opset {info['opset']})", title_justify="left")
    for col in ("site", "op", "ONNX shape", "2-D shape", "params", "sparsity", "dtype", "location"):
        t.add_column(col, justify="right" if col in ("params", "sparsity") else "left")
    for s in info["sites"]:
        t.add_row(s["name"], s["op"], str(s["onnx_shape"]), "x".join(map(str, s["matrix_shape"])),
                  f"{s['params']:,}", f"{s['sparsity']:.1%}", s["dtype"],
                  s["location"] + (", graph input" if s["graph_input"] else ""))
    out.print(t)
    tot = info["totals"]
    out.print(f"{tot['sites']} sites, {tot['site_params']:,} prunable of {tot['model_params']:,} "
              f"parameters, file {_size(tot['file_size'])}")
    inputs = sum(s["graph_input"] for s in info["sites"])
    if inputs:
        out.print(f"note     sites that are also graph inputs (a caller may override them): {inputs}; "
                  "prune skips them unless --include names them", highlight=False)
    for k in info["skipped"]:
        out.print(escape(f"skipped  {k['name']} ({k['op_type']}): {k['reason']}"), highlight=False)


@app.command()
@handled
def evaluate(
    original: Path = typer.Argument(..., help="The original ONNX model."),
    pruned: Path = typer.Argument(..., help="The pruned model to compare with it."),
    data: Path = typer.Option(..., "--data", help=".npz keyed by input name (or .npy for one input), batched on axis 0; or a directory of .npz (see --no-batching)."),
    no_batching: bool = NoBatchingOpt,
    labels: Optional[str] = typer.Option(None, "--labels", help="Key of the data file holding class labels (default: a key 'label' or 'labels' that is not an input)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Samples per onnxruntime run."),
    repeats: int = typer.Option(5, "--repeats", help="Timed passes per model after a warm-up; the median is reported (0: no timing)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda (onnxruntime-gpu)."),
    fail_under: Optional[str] = typer.Option(None, "--fail-under", help="Exit 1 when a higher-is-better metric is below its threshold: comma list of metric=value over top1_agreement (or agreement, top1), top5_agreement (top5), accuracy, cosine; e.g. agreement=0.99,accuracy=0.95."),
    fail_over: Optional[str] = typer.Option(None, "--fail-over", help="Exit 1 when a lower-is-better metric is above its threshold: relative_mse (or mse), max_abs_error (max_abs), accuracy_drop (original minus pruned accuracy); e.g. mse=0.01,accuracy_drop=0.005."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
):
    """Compare PRUNED with ORIGINAL on the same data: output error, agreement, accuracy, speed, size.

    Output metrics are checked on every output that has them. Exit status: 0 when every
    threshold holds, 1 when one is missed (one line per miss on stderr), 2 on bad input.
    """
    under = evaluation.parse_thresholds(fail_under, "--fail-under")
    over = evaluation.parse_thresholds(fail_over, "--fail-over")
    result = evaluation.evaluate(str(original), str(pruned), str(data), labels=labels,
                                 batch_size=batch_size, repeats=repeats, device=device,
                                 batching=not no_batching,
                                 progress=not as_json)
    checks = evaluation.check_thresholds(result, under, over)
    if as_json:
        typer.echo(json.dumps({**result, "thresholds": checks}, indent=2))
    else:
        _print_evaluate(result, checks)
    missed = [c for c in checks if not c["passed"]]
    for c in missed:
        err.print(f"[bold red]threshold missed:[/] {escape(evaluation.failure_message(c))}", highlight=False, soft_wrap=True)
    if missed:
        raise typer.Exit(1)


def _print_evaluate(r: dict, checks: list[dict]) -> None:
    t = Table(title=f"pruned vs original on {r['samples']} {_unit(r)} of {r['data']}", title_justify="left")
    for col in ("output", "relative MSE", "max abs error", "cosine", "top-1 agreement", "top-5 agreement"):
        t.add_column(col, justify="left" if col == "output" else "right")
    for name, d in r["outputs"].items():
        t.add_row(name, _num(d["relative_mse"]), _num(d["max_abs_error"]), f"{d['cosine']:.6f}",
                  _pct(d.get("top1_agreement")), _pct(d.get("top5_agreement")))
    out.print(t)
    o, p = r["original"], r["pruned"]
    t = Table(title=f"models ({r['device']})", title_justify="left")
    for col in ("", "original", "pruned", "change"):
        t.add_column(col, justify="left" if not col else "right")
    if o["accuracy"] is not None:
        t.add_row(f"accuracy ('{r['labels']}')", _pct(o["accuracy"]), _pct(p["accuracy"]),
                  f"{100 * (p['accuracy'] - o['accuracy']):+.2f} pts")
    t.add_row("weight sparsity", _pct(o["weight_sparsity"]), _pct(p["weight_sparsity"]), "")
    t.add_row("file size", _size(o["file_size"]), _size(p["file_size"]),
              f"x{p['file_size'] / o['file_size']:.2f}")
    if o["latency_ms"] is not None:
        full = f"batch {r['batch_size']}" if r["batch_size"] else f"{r['samples']} runs"
        for key, label in (("pass_ms", f"full pass, {full}"), ("batch1_ms", "one sample")):
            a, b = o["latency_ms"][key], p["latency_ms"][key]
            if a is not None:
                t.add_row(f"{label} (median of {r['repeats']})", f"{a:.3f} ms", f"{b:.3f} ms",
                          f"speedup {a / b:.2f}x" if b else "")
    out.print(t)
    for n in r["notes"]:
        out.print(escape(f"note     {n}"), highlight=False)
    for c in checks:
        if c["passed"]:
            sign = ">=" if c["fails_when"] == "under" else "<="
            out.print(f"ok       {c['metric']} of {c['of']} is {c['value']:.6g} {sign} {c['limit']:.6g}", highlight=False)


@app.command()
@handled
def compare(
    model: Path = typer.Argument(..., help="The ONNX model to prune (never modified)."),
    calib: Path = typer.Option(..., "--calib", help="Calibration .npz keyed by input name (or .npy for one input), batched on axis 0; or a directory of .npz (see --no-batching)."),
    eval_data: Optional[Path] = typer.Option(None, "--eval", help="Held-out data to score on (default: the calibration data, with a warning)."),
    methods: str = typer.Option("magnitude,wanda,obd,obs", "--methods", help="Comma list of methods to compare."),
    sparsities: Optional[str] = typer.Option(None, "--sparsities", help=f"start:stop:step (stop included when on the grid) or a comma list (default {sweep.DEFAULT_SPARSITIES})."),
    pattern: Optional[str] = typer.Option(None, "--pattern", help="N:M semi-structured sparsity instead of --sparsities, e.g. 2:4."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Key of the evaluation data holding class labels: score by accuracy (default: a key 'label' or 'labels')."),
    sequential: bool = typer.Option(False, "--sequential/--no-sequential", help="Recapture Hessians after earlier layers are pruned (as prune does by default); off: capture the original model's Hessians once and share them across all runs."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", help="Use at most this many calibration samples."),
    batch_size: int = typer.Option(32, "--batch-size", help="Samples per onnxruntime run."),
    no_batching: bool = NoBatchingOpt,
    solver: str = typer.Option("auto", "--solver", help="OBS solver: exact (OBC), fast (SparseGPT), or auto: exact where it costs about 2 s or less per layer, else fast with a least-squares refit of the kept weights where that costs about 2 s or less."),
    damp: float = typer.Option(0.01, "--damp", help="Hessian damping, as a fraction of mean diag(H)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda (onnxruntime-gpu)."),
    max_loss: Optional[float] = typer.Option(None, "--max-loss", help="Per method, report the highest sparsity up to which the quality loss (accuracy or top-1 agreement, absolute, e.g. 0.01 = 1 point) stays within this."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write quality vs sparsity to this PNG and an SVG beside it (needs matplotlib: pip install onnx-obs\\[plot])."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON here."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing but warnings and errors."),
):
    """Prune MODEL with each method at each sparsity and score every result on held-out data.

    Prints one row per method and sparsity: the fraction of zero weights reached, top-1 agreement
    with the original, accuracy (with labels), relative MSE of the output and seconds. Exit
    status 2 on bad input, or when --plot cannot be drawn (the table and JSON are still written).
    """
    sweep.check_writable(json_out, "--json")
    sweep.check_writable(plot, "--plot")
    if plot is not None and not plotting.available():
        err.print(f"[bold yellow]warning:[/] matplotlib is not installed, so no plot will be drawn: "
                  f"{escape(plotting.INSTALL_HINT)}", highlight=False, soft_wrap=True)
    pat = _pattern(pattern)
    grid = None if pat and sparsities is None else sweep.parse_sparsities(sparsities or sweep.DEFAULT_SPARSITIES)
    if eval_data is None:
        err.print("[bold yellow]warning: no --eval data: scoring on the calibration data flatters every "
                  "method that uses it; pass held-out data with --eval[/]", highlight=False, soft_wrap=True)
    result = sweep.compare(str(model), str(calib), methods=sweep.parse_methods(methods), sparsities=grid,
                           eval_data=str(eval_data) if eval_data else None, labels=labels, pattern=pat,
                           sequential=sequential, max_samples=max_samples, batch_size=batch_size,
                           batching=not no_batching,
                           solver=solver, damp=damp, device=device, max_loss=max_loss,
                           progress=not quiet)
    if json_out is not None:
        try:
            json_out.write_text(json.dumps(result, indent=2))
        except OSError as e:
            raise OnnxObsError(f"could not write {json_out}: {e.strerror or e}") from e
    if not quiet:
        _print_compare(result)
    if plot is not None:
        if not plotting.available():
            raise OnnxObsError(f"no plot written: matplotlib is not installed ({plotting.INSTALL_HINT}); "
                               "the table and JSON are complete")
        paths = plotting.plot_compare(result, plot)
        if not quiet:
            out.print(f"wrote    {' and '.join(map(str, paths))}", highlight=False)


def _print_compare(r: dict) -> None:
    metric, rows, ev = r["metric"], r["rows"], r["eval"]
    where = "the calibration data (not held out)" if ev["is_calibration"] else ev["source"]
    unit = _unit(r["settings"])
    out.print(f"{r['model']}: {r['calibration']['samples']} calibration {unit}, scored on "
              f"{ev['samples']} {unit} of {where}", highlight=False)
    t = Table()
    cols = ["method", "sparsity", "zeros", "top-1 agreement"] + (["accuracy"] if metric == "accuracy" else []) + ["relative MSE", "s"]
    for col in cols:
        t.add_column(col, justify="left" if col == "method" else "right")
    for i, row in enumerate(rows):
        cells = [row["method"], row["pattern"] or _pct(row["sparsity"], 0), _pct(row["weight_sparsity"], 1),
                 _pct(row.get("top1_agreement"))]
        if metric == "accuracy":
            cells.append(_pct(row["accuracy"]))
        cells += [_num(row["relative_mse"]), f"{row['seconds']:.2f}"]
        last = i + 1 == len(rows) or rows[i + 1]["method"] != row["method"]
        t.add_row(*cells, end_section=last)
    out.print(t)
    if metric == "accuracy":
        out.print(f"original accuracy {_pct(r['baseline'])} on the same samples", highlight=False)
    if r["max_loss"] is not None:
        found = ", ".join(f"{m} {_pct(v['sparsity'], 0)}" for m, v in r["max_loss"]["per_method"].items())
        out.print(f"highest sparsity losing at most {r['max_loss']['max_loss']:g} of {metric}: {found}",
                  highlight=False)
    for n in r["notes"]:
        out.print(escape(f"note     {n}"), highlight=False)


def _pct(x, digits: int = 2) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%" if digits else f"{100 * x:g}%"


def _unit(settings: dict) -> str:
    """What the sample counts count: runs without batching."""
    return "samples" if settings.get("batching", True) else "runs"


def _num(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def _size(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def main() -> None:
    app()
