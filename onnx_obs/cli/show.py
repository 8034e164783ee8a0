"""What the commands print: tables and summary lines from the API's results."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from onnx_obs.cli.app import STDOUT, out
from onnx_obs.compare import Comparison, check_writable
from onnx_obs.errors import OnnxObsError
from onnx_obs.evaluate import Evaluation, ThresholdCheck
from onnx_obs.inspection import Inspection

def _print_prune(d: dict, output: Path) -> None:
    alloc = d.get("allocation")
    title = d["method"] if "quantization" in d else f"{d['method']} pruning" + (", auto allocation" if alloc else "")
    t = Table(title=title, title_justify="left")
    cols = ("site", "op", "2-D shape", "sparsity", "pred. error", "meas. error")
    for col in cols + (("pred. output",) if alloc else ()) + ("s",):
        t.add_column(col, justify="left" if col in ("site", "op") else "right")
    for s in d["sites"]:
        extra = (_num(s.get("predicted_output_error")),) if alloc else ()
        t.add_row(s["name"], s["op"], "x".join(map(str, s["matrix_shape"])), f"{s['sparsity']:.1%}",
                  _num(s["predicted_error"]), _num(s["measured_error"]), *extra, f"{s['seconds']:.2f}")
    tot = d["totals"]
    if "structure" in d:
        _print_structure(d)
    else:
        out.print(t)
        out.print(f"weights  {tot['nonzero_params_before']:,} -> {tot['nonzero_params_after']:,} non-zero "
                  f"in {tot['sites']} sites ({tot['sparsity']:.1%} sparse); model has {tot['model_params']:,} parameters")
    _print_quantization(d)
    if alloc:
        out.print(f"alloc.   levels per site (cap {alloc['max_layer_sparsity']:.0%}) predicted to add "
                  f"{alloc['predicted_relative_mse']:.3g} relative output MSE (pred. output: each site "
                  f"pruned alone, on {alloc['probe_samples']} samples); chosen in {alloc['seconds']:.1f} s")
    _print_costs(d)
    out.print(f"file     {_size(tot['file_size_before'])} -> {_size(tot['file_size_after'])}")
    if "compressed_size" in tot:
        z = tot["compressed_size"]
        out.print(f"zipped   {_size(z['before'])} -> {_size(z['after'])} (deflate; zeros are stored dense: "
                  "for a smaller, faster file use --structure channels or --bits)")
    for name, dev in d["deviation"].items():
        extra = f", top-1 agreement {dev['top1_agreement']:.2%}" if "top1_agreement" in dev else ""
        out.print(f"output   {name}: relative MSE {dev['relative_mse']:.3g}, max abs error "
                  f"{dev['max_abs_error']:.3g}{extra} (on "
                  f"{_count(d['calibration_samples'], 'calibration ' + _unit(d['settings']))})")
    for k in d["skipped"]:
        out.print(escape(f"skipped  {k['name']} ({k['op_type']}): {k['reason']}"), highlight=False)
    for n in d["notes"]:
        out.print(escape(f"note     {n}"), highlight=False)
    out.print(f"wrote    {output} in {tot['wall_seconds']:.1f} s on {d['device']}, "
              f"peak memory {tot['peak_memory_mb']:.0f} MB")
    phases = tot.get("phase_seconds") or {}
    if phases:
        out.print("time     " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items())
                  + f" ({_count(tot['threads'], 'threads')})", highlight=False)


def _print_structure(d: dict) -> None:
    t = Table(title=f"structured {d['method']} pruning", title_justify="left")
    for col in ("layer", "op", "units", "consumers", "pred. error", "meas. error", "rel. error", "s"):
        t.add_column(col, justify="left" if col in ("layer", "op", "consumers") else "right")
    for e in d["structure"]:
        t.add_row(e["name"], e["op"], f"{e['units_before']} -> {e['units_after']}", ", ".join(e["consumers"]),
                  _num(e["predicted_error"]), _num(e["measured_error"]), _num(e["relative_error"]),
                  f"{e['seconds']:.2f}")
    out.print(t)


def _print_quantization(d: dict) -> None:
    if not d.get("quantization"):
        return
    t = Table(title="quantization", title_justify="left")
    for col in ("site", "grid", "method", "scales", "clip (mean)", "clipped", "pred. error", "meas. error"):
        t.add_column(col, justify="left" if col in ("site", "grid", "method") else "right")
    for q in d["quantization"]:
        grid = (f"int{q['bits']} {'sym' if q['symmetric'] else 'asym'}, "
                + ("per channel" if q["group_size"] == -1 else f"group {q['group_size']}"))
        t.add_row(q["name"], grid, q["method"], f"{q['scales']:,}", f"{q['clip_mean']:.3f}",
                  f"{q['clipped_fraction']:.0%}", _num(q["predicted_error"]), _num(q["measured_error"]))
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

def _print_inspect(info: Inspection, verbose: bool = False) -> None:
    out.print(escape(f"{info.model}  (opset {info.opset})"), highlight=False)
    t = Table(title="inputs and outputs", title_justify="left")
    for col in ("", "name", "dtype and shape"):
        t.add_column(col)
    for kind, ports in (("input", info.inputs), ("output", info.outputs)):
        for p in ports:
            t.add_row(kind, escape(p.name), escape(p.describe()))
    out.print(t)
    t = Table(title="prunable weights (sites)", title_justify="left")
    cols = ["site", "op", "ONNX shape", "2-D shape", "params", "sparsity", "dtype", "location"]
    for col in cols + (["nodes"] if verbose else []):
        t.add_column(col, justify="right" if col in ("params", "sparsity") else "left")
    for s in info.sites:
        t.add_row(s.name + (" (!)" if s.flags else ""), s.op, str(s.onnx_shape),
                  "x".join(map(str, s.matrix_shape)), f"{s.params:,}", f"{s.sparsity:.1%}", s.dtype,
                  s.location + (", graph input" if s.graph_input else ""),
                  *([", ".join(s.nodes)] if verbose else []))
    out.print(t)
    out.print(f"{len(info.sites)} sites, {info.site_params:,} prunable of {info.model_params:,} "
              f"parameters, file {_size(info.file_size)}")
    inputs = sum(s.graph_input for s in info.sites)
    if inputs:
        out.print(f"note     sites that are also graph inputs (a caller may override them): {inputs}; "
                  "prune skips them unless --include names them", highlight=False)
    for s in info.sites:
        for f in s.flags:
            out.print(escape(f"(!)      {s.name}: {f}"), highlight=False)
    for k in info.skipped:
        out.print(escape(f"skipped  {k.name} ({k.op_type}): {k.reason}"), highlight=False)


def _print_evaluate(r: Evaluation, checks: list[ThresholdCheck]) -> None:
    unit = "samples" if r.batching else "runs"
    t = Table(title=f"pruned vs original on {_count(r.samples, unit)} of {r.data}", title_justify="left")
    for col in ("output", "relative MSE", "max abs error", "cosine", "top-1 agreement", "top-5 agreement"):
        t.add_column(col, justify="left" if col == "output" else "right")
    for name, d in r.outputs.items():
        where = f" over {d['positions']:,} positions" if "positions" in d else ""
        t.add_row(name, _num(d["relative_mse"]), _num(d["max_abs_error"]), f"{d['cosine']:.6f}",
                  _pct(d.get("top1_agreement")) + where, _pct(d.get("top5_agreement")))
    out.print(t)
    for name, value in r.metrics.items():
        out.print(f"metric   {name} = {value:.6g} (--metric, mean over {_count(r.samples, unit)})",
                  highlight=False)
    o, p = r.original, r.pruned
    t = Table(title=f"models ({r.device})", title_justify="left")
    for col in ("", "original", "pruned", "change"):
        t.add_column(col, justify="left" if not col else "right")
    if o.accuracy is not None:
        t.add_row(f"accuracy ('{r.labels}')", _pct(o.accuracy), _pct(p.accuracy),
                  f"{100 * (p.accuracy - o.accuracy):+.2f} pts")
    t.add_row("weight sparsity", _pct(o.weight_sparsity), _pct(p.weight_sparsity), "")
    t.add_row("file size", _size(o.file_size), _size(p.file_size),
              f"x{p.file_size / o.file_size:.2f}")
    if o.latency_ms is not None:
        timed = _count(o.latency_ms.samples, unit)
        full = f"{timed} in batches of {r.batch_size}" if r.batch_size else timed
        for label, a, b in ((f"pass over {full}", o.latency_ms.pass_ms, p.latency_ms.pass_ms),
                            ("one sample", o.latency_ms.batch1_ms, p.latency_ms.batch1_ms)):
            if a is not None:
                t.add_row(f"{label} (median of {r.repeats})", f"{a:.3f} ms", f"{b:.3f} ms",
                          f"speedup {a / b:.2f}x" if b else "")
    out.print(t)
    for n in r.notes:
        out.print(escape(f"note     {n}"), highlight=False)
    for c in checks:
        if c.passed:
            sign = ">=" if c.fails_when == "under" else "<="
            out.print(f"ok       {c.metric} of {c.of} is {c.value:.6g} {sign} {c.limit:.6g}", highlight=False)

def _print_compare(r: Comparison) -> None:
    metric, rows, ev = r.metric, r.rows, r.eval
    where = "the calibration data (not held out)" if ev.is_calibration else ev.source
    unit = _unit(r.settings)
    out.print(f"{r.model}: {_count(r.calibration.samples, 'calibration ' + unit)}, scored on "
              f"{_count(ev.samples, unit)} of {where}", highlight=False)
    t = Table()
    quant = r.file_size is not None  # a --bits sweep
    cols = (["method"] + (["bits"] if quant else []) + ["sparsity", "zeros"] + (["file size"] if quant else [])
            + ["top-1 agreement"] + (["accuracy"] if metric == "accuracy" else []) + ["relative MSE", "s"])
    for col in cols:
        t.add_column(col, justify="left" if col == "method" else "right")
    for i, row in enumerate(rows):
        cells = ([row.series] + ([str(row.bits)] if quant else []) +
                 [row.pattern or _pct(row.sparsity, 0), _pct(row.weight_sparsity, 1)] +
                 ([f"{_size(row.file_size)} (x{row.file_size / r.file_size:.2f})"] if quant else []) +
                 [_pct(row.top1_agreement)])
        if metric == "accuracy":
            cells.append(_pct(row.accuracy))
        cells += [_num(row.relative_mse), f"{row.seconds:.2f}"]
        last = i + 1 == len(rows) or rows[i + 1].series != row.series
        t.add_row(*cells, end_section=last)
    out.print(t)
    if metric == "accuracy":
        out.print(f"original accuracy {_pct(r.baseline)} on the same samples"
                  + (f", file size {_size(r.file_size)}" if quant else ""), highlight=False)
    elif quant:
        out.print(f"original file size {_size(r.file_size)}", highlight=False)
    if r.max_loss is not None:
        found = ", ".join(f"{m} {_pct(v.sparsity, 0)}" for m, v in r.max_loss.per_method.items())
        out.print(f"highest sparsity losing at most {r.max_loss.max_loss:g} of {metric}: {found}",
                  highlight=False)
    for n in r.notes:
        out.print(escape(f"note     {n}"), highlight=False)


def _pct(x, digits: int = 2) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%" if digits else f"{100 * x:g}%"


def _count(n: int, unit: str) -> str:
    """'1 run', '2 runs', '1 calibration sample'."""
    return f"{n} {unit[:-1] if n == 1 and unit.endswith('s') else unit}"


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


def check_json_path(path: Path | None) -> None:
    """Fail before any work when a --json file cannot be written."""
    if path is not None and str(path) != STDOUT:
        check_writable(path, "--json")


def write_json(path: Path, text: str, flag: str) -> None:
    """`text` to stdout for `-`, else to the file."""
    if str(path) == STDOUT:
        typer.echo(text)
        return
    try:
        path.write_text(text)
    except OSError as e:
        raise OnnxObsError(f"could not write {flag} {path}: {e.strerror or e}") from e
