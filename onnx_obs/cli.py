"""The `onnx-obs` command line: parse, call the API, print. Nothing else lives here."""

from __future__ import annotations

import functools
import json
import shlex
import sys
import traceback
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from onnx_obs import api
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
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            err.print("interrupted: nothing was written")
            raise typer.Exit(130)
    return wrapper


IncludeOpt = typer.Option(None, "--include", help="Only sites whose tensor or node name matches this regex.")
ExcludeOpt = typer.Option(None, "--exclude", help="Skip sites whose tensor or node name matches this regex.")
OpTypesOpt = typer.Option(None, "--op-types", help="Comma-separated op types to prune, e.g. Conv,Gemm.")


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
    calib: Optional[Path] = typer.Option(None, "--calib", help=".npz keyed by input name (or .npy for one input), batched on axis 0."),
    method: str = typer.Option("obs", "--method", help="obs (layer-wise OBS with weight correction), obd, wanda or magnitude."),
    sparsity: float = typer.Option(0.5, "--sparsity", help="Fraction of each site's weights to remove."),
    pattern: Optional[str] = typer.Option(None, "--pattern", help="N:M semi-structured sparsity, e.g. 2:4 (overrides --sparsity)."),
    scope: str = typer.Option("layer", "--scope", help="layer: the target holds per site; global: rank all sites together (magnitude)."),
    solver: str = typer.Option("auto", "--solver", help="OBS solver: exact (OBC), fast (SparseGPT) or auto."),
    block_size: int = typer.Option(128, "--block-size", help="Column block of the fast solver."),
    damp: float = typer.Option(0.01, "--damp", help="Hessian damping, as a fraction of mean diag(H)."),
    sequential: bool = typer.Option(True, "--sequential/--no-sequential", help="Capture each site's inputs after the sites before it are pruned."),
    batch_size: int = typer.Option(32, "--batch-size", help="Calibration samples per onnxruntime run."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", help="Use at most this many calibration samples."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Key of the calibration file that holds targets (not a model input)."),
    include: Optional[str] = IncludeOpt, exclude: Optional[str] = ExcludeOpt, op_types: Optional[str] = OpTypesOpt,
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda (onnxruntime-gpu)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the JSON report here."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output file."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing but errors."),
):
    """Prune MODEL and write the pruned model to -o."""
    if report is not None and report.resolve() in (model.resolve(), output.resolve()):
        raise OnnxObsError("--report must not be the model or the output path")
    result = api.prune(
        str(model), str(calib) if calib else None, method=method, sparsity=sparsity,
        pattern=_pattern(pattern), scope=scope, selection=_selection(include, exclude, op_types),
        solver=solver, block_size=block_size, damp=damp, sequential=sequential,
        batch_size=batch_size, max_samples=max_samples, labels=labels, device=device,
        output=output, force=force, progress=not quiet,
        command="onnx-obs " + shlex.join(sys.argv[1:]))
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
    out.print(t)
    tot = d["totals"]
    out.print(f"weights  {tot['nonzero_params_before']:,} -> {tot['nonzero_params_after']:,} non-zero "
              f"in {tot['sites']} sites ({tot['sparsity']:.1%} sparse); model has {tot['model_params']:,} parameters")
    out.print(f"file     {_size(tot['file_size_before'])} -> {_size(tot['file_size_after'])}")
    for name, dev in d["deviation"].items():
        extra = f", top-1 agreement {dev['top1_agreement']:.2%}" if "top1_agreement" in dev else ""
        out.print(f"output   {name}: relative MSE {dev['relative_mse']:.3g}, max abs error "
                  f"{dev['max_abs_error']:.3g}{extra} (on {d['calibration_samples']} calibration samples)")
    for k in d["skipped"]:
        out.print(f"skipped  {k['name']} ({k['op_type']}): {k['reason']}", highlight=False)
    for n in d["notes"]:
        out.print(f"note     {n}", highlight=False)
    out.print(f"wrote    {output} in {tot['wall_seconds']:.1f} s on {d['device']}, "
              f"peak memory {tot['peak_memory_mb']:.0f} MB")


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
                  f"{s['params']:,}", f"{s['sparsity']:.1%}", s["dtype"], s["location"])
    out.print(t)
    tot = info["totals"]
    out.print(f"{tot['sites']} sites, {tot['site_params']:,} prunable of {tot['model_params']:,} "
              f"parameters, file {_size(tot['file_size'])}")
    for k in info["skipped"]:
        out.print(f"skipped  {k['name']} ({k['op_type']}): {k['reason']}", highlight=False)


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
