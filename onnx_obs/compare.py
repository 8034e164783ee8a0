"""Sweep pruning methods over sparsities and score each result on held-out data: which method
removes the most weights for the same loss of quality."""

from __future__ import annotations

import contextlib
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from onnx_obs import api
from onnx_obs.calib import load_calibration
from onnx_obs.config import ALLOCATIONS, BITS, METHODS, QUANT_METHODS, PruneConfig
from onnx_obs.errors import OnnxObsError
from onnx_obs.evaluate import Quality, as_flag, data_keys, detect_labels, label_note, measure
from onnx_obs.graph.model_io import load_any, save_model
from onnx_obs.progress import Progress
from onnx_obs.runtime import Runner

DEFAULT_SPARSITIES = "0.1:0.9:0.1"


@dataclass
class CompareRow:
    """One method at one sparsity, scored against the original model."""
    method: str
    sparsity: float
    pattern: str | None       # "N:M"
    weight_sparsity: float    # the fraction of zeros reached among the sites' weights
    output: str               # the output scored
    relative_mse: float
    cosine: float
    seconds: float
    top1_agreement: float | None = None  # with class scores
    accuracy: float | None = None        # with labels
    loss: float | None = None            # of the sweep's metric: set once its baseline is known
    allocation: str | None = None        # "uniform" or "auto" when the sweep sets --allocation
    bits: int | None = None              # a --bits sweep: the weights' bits,
    quant_method: str | None = None      # rtn, gptq or obq,
    file_size: int | None = None         # and the bytes of the model as written

    @property
    def series(self) -> str:
        """The curve the row belongs to: its method, and its allocation where the sweep sets one;
        in a --bits sweep its quantization method (after pruning at its sparsity)."""
        if self.bits is not None:
            return self.quant_method if self.sparsity == 0 else f"{self.method} {self.sparsity:g} + {self.quant_method}"
        return self.method if self.allocation is None else f"{self.method} {self.allocation}"

    def to_dict(self) -> dict:
        """As JSON: top1_agreement, accuracy, allocation and the --bits fields only where measured or set."""
        return {k: v for k, v in asdict(self).items() if v is not None or k not in (
            "top1_agreement", "accuracy", "allocation", "bits", "quant_method", "file_size")}


@dataclass
class Reach:
    """The highest sparsity within a loss, and its loss (both None when even the lowest
    sparsity loses more)."""
    sparsity: float | None
    loss: float | None


@dataclass
class HighestWithin:
    max_loss: float
    per_method: dict[str, Reach]


@dataclass
class DataUsed:
    source: str
    samples: int              # runs without batching


@dataclass
class EvalDataUsed(DataUsed):
    is_calibration: bool      # no held-out data: scored on the calibration data


@dataclass
class Comparison:
    model: str                # the path, or "<proto>"
    calibration: DataUsed
    eval: EvalDataUsed
    labels: str | None        # the key of the evaluation data holding the labels used
    output: str               # the output scored
    metric: str               # accuracy, top1_agreement or relative_mse: what loss is of
    baseline: float           # the original model's value of `metric`
    settings: dict            # the sweep's settings, as given
    device: str
    rows: list[CompareRow]    # by method, then sparsity
    max_loss: HighestWithin | None
    notes: list[str]
    file_size: int | None = None  # a --bits sweep: the original model's bytes as written

    def to_dict(self) -> dict:
        return {**asdict(self), "rows": [r.to_dict() for r in self.rows]}


def parse_sparsities(text: str) -> list[float]:
    """'start:stop:step' (stop included when it lands on the grid) or a comma list, sorted."""
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if step <= 0 or stop < start:
                raise OnnxObsError(f"--sparsities {text}: needs step > 0 and start <= stop")
            count = math.floor((stop - start) / step + 1e-9) + 1
            values = [round(start + i * step, 10) for i in range(count)]
        else:
            values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise OnnxObsError(f"--sparsities must be start:stop:step (e.g. 0.1:0.9:0.1) or a comma "
                           f"list (e.g. 0.5,0.7), got '{text}'") from None
    bad = [v for v in values if not 0 <= v < 1]
    if bad or not values:
        raise OnnxObsError(f"--sparsities must lie in [0, 1), got '{text}'")
    return sorted(set(values))


def parse_methods(text: str) -> list[str]:
    return _choices(text, METHODS, "method", "--methods", f"a comma list of {', '.join(METHODS)}")


def _comma_list(text: str) -> list[str]:
    """The distinct non-empty items of a comma list, in the order given."""
    return list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))


def parse_bits(text: str) -> list[int]:
    """'8,4' -> [8, 4]: each of BITS, in the order given."""
    try:
        values = list(dict.fromkeys(int(b) for b in _comma_list(text)))
    except ValueError:
        values = []
    if not values or any(b not in BITS for b in values):
        raise OnnxObsError(f"--bits must be a comma list of {' and '.join(map(str, BITS))}, got '{text}'")
    return values


def parse_quant_methods(text: str) -> list[str]:
    return _choices(text, QUANT_METHODS, "quantization method", "--quant-methods",
                    f"a comma list of {', '.join(QUANT_METHODS)}")


def parse_allocations(text: str) -> list[str]:
    return _choices(text, ALLOCATIONS, "allocation", "--allocation", "uniform, auto or both (uniform,auto)")


def _choices(text: str, allowed, what: str, flag: str, use: str) -> list[str]:
    """The comma list `text` of values from `allowed`, or one line naming the first unknown one."""
    values = _comma_list(text)
    unknown = [v for v in values if v not in allowed]
    if unknown or not values:
        raise OnnxObsError(f"unknown {what} '{unknown[0] if unknown else text}' in {flag}: use {use}")
    return values


def compare(model, calib, config: PruneConfig | None = None, *, methods: list[str],
            sparsities: list[float] | None, eval_data=None, labels: str | None = None,
            max_loss: float | None = None, progress: bool | str = False,
            allocations: list[str] | None = None, bits: list[int] | None = None,
            quant_methods: list[str] | None = None, **overrides) -> Comparison:
    """Prune `model` with every method at every sparsity and score each result on `eval_data`
    (the calibration data when None) against the original model.

    config: the settings every run shares (default: PruneConfig(), sequential as prune), changed by
    keyword overrides as in api.prune; each run sets its method and sparsity. With
    sequential=False the original model's Hessians are captured once and shared by every run;
    sequential=True recaptures them per run. With `pattern`, `sparsities` must be None (the
    pattern fixes it). labels: the key of the evaluation data's class labels. max_loss: per method, the highest sparsity up to which every tested
    sparsity loses at most this much of the quality metric (accuracy with labels, else top-1
    agreement, else relative MSE, which counts as a loss by itself). batching: False feeds each
    run of the calibration and evaluation data whole (calib.py); samples then count runs.
    allocations: e.g. ["uniform", "auto"]: every method with a Hessian runs with each (one curve
    per method and allocation; magnitude stays uniform); None: the config's allocation alone (by
    default auto where it applies, as prune).
    bits: e.g. [8, 4]: quantize instead (api.quantize) with every quant_methods entry (default
    gptq) at every bits, without pruning when `sparsities` is None, else pruning first with each
    method at each sparsity (sparsity 0: quantization alone); rows also hold the written file's
    bytes, so that error can be set against file size.
    """
    config = (config or PruneConfig()).replace(**overrides)
    pattern, sequential, data = config.pattern, config.layerwise.sequential, config.data
    batch_size, max_samples, batching, device = data.batch_size, data.max_samples, data.batching, config.device
    if pattern is not None and sparsities is not None:
        raise OnnxObsError("--pattern fixes the sparsity at N/M: drop --sparsities")
    grid = [pattern[0] / pattern[1]] if pattern is not None else sparsities
    if bits is not None and not grid:
        grid = [0.0]
    if not grid:
        raise OnnxObsError("no sparsities to compare: pass --sparsities")
    if bits is not None and (pattern is not None or max_loss is not None or allocations is not None):
        raise OnnxObsError("--bits sweeps quantization against file size: drop --pattern, "
                           "--max-loss and --allocation")
    if max_loss is not None and max_loss < 0:
        raise OnnxObsError(f"--max-loss must be at least 0, got {max_loss}")
    loaded = load_any(model)
    notes = []
    cal = load_calibration(calib, loaded.model, batch_size=batch_size, max_samples=max_samples,
                           labels_key=_own_labels(calib, loaded.model, labels), batching=batching)
    eval_src = calib if eval_data is None else eval_data
    eval_labels = labels if labels is not None else detect_labels(eval_src, loaded.model)
    if eval_data is None:
        notes.append("no held-out data given: scores are measured on the calibration data, which "
                     "flatters the methods that use it (pass --eval HELD_OUT.npz)")
    if not sequential and any(m != "magnitude" for m in methods):
        notes.append("Hessians of the original model were captured once and shared by every run "
                     "(the seconds of the first Hessian-based run include the capture)")
    with as_flag("--eval") if eval_data is not None else contextlib.nullcontext():
        ecal = load_calibration(eval_src, loaded.model, batch_size=batch_size, labels_key=eval_labels,
                                batching=batching)
    ref = Runner(loaded.model, loaded.base_dir, device)
    cache = None if sequential else {}
    labelled = allocations is not None or config.layerwise.allocation is not None
    if bits is None:
        runs = [dict(method=m, allocation=a, sparsity=s) for m in methods
                for a in dict.fromkeys(["uniform"] if m == "magnitude" else allocations or [config.layerwise.allocation])
                for s in grid]
    else:  # sparsity 0 quantizes alone: once, whatever the pruning methods
        runs = [dict(method=m if s > 0 else "none", quant_method=q, bits=b, sparsity=s)
                for q in quant_methods or ["gptq"] for s in grid
                for m in (methods if s > 0 else ["none"]) for b in bits]
    rows, baseline = [], None
    with Progress(enabled=bool(progress), verbose=progress == "verbose") as bar:
        task = bar.add("pruning and scoring" if bits is None else "quantizing and scoring", total=len(runs))
        for run in runs:
            if bits is None:
                result = api.prune(model, cal.batches, config, **run, max_samples=None, hessians=cache)
            else:
                result = api.quantize(model, cal.batches, config, max_samples=None, hessians=cache,
                                      **{k: v for k, v in run.items() if k != "method" or v != "none"})
            quality = measure(ref, Runner(result.model, loaded.base_dir, device), ecal,
                              labels_required=labels is not None)
            baseline = quality.accuracy[0]
            rows.append(_row(run["method"], run["sparsity"], pattern, result, quality))
            if bits is None:
                rows[-1].allocation = run["allocation"] if labelled else None
            else:
                rows[-1].bits, rows[-1].quant_method = run["bits"], run["quant_method"]
                rows[-1].file_size = written_size(result.model, loaded.base_dir)
            bar.advance(task, what=f"{rows[-1].series} at {run['bits']} bits" if bits else
                        f"{rows[-1].series} at {run['sparsity']:g}")
    if labels is None and eval_labels is not None:
        notes.insert(0, label_note(eval_labels, quality, "evaluation data"))
        eval_labels = eval_labels if quality.label_output else None
    metric = ("accuracy" if eval_labels else
              "top1_agreement" if rows[0].top1_agreement is not None else "relative_mse")
    best = {"accuracy": baseline, "top1_agreement": 1.0, "relative_mse": 0.0}[metric]
    for r in rows:
        value = getattr(r, metric)
        r.loss = value - best if metric == "relative_mse" else best - value
    return Comparison(
        model=str(loaded.path) if loaded.path else "<proto>",
        calibration=DataUsed(cal.source, cal.num_samples),
        eval=EvalDataUsed(ecal.source, ecal.num_samples, is_calibration=eval_data is None),
        labels=eval_labels, output=rows[0].output, metric=metric, baseline=best,
        settings={"pattern": f"{pattern[0]}:{pattern[1]}" if pattern else None,
                  "sequential": sequential, "hessians_shared": not sequential,
                  "solver": config.layerwise.solver, "block_size": config.layerwise.block_size,
                  "damp": config.layerwise.damp,
                  "batch_size": batch_size, "max_samples": max_samples, "batching": batching},
        device=ref.provider,
        rows=rows,
        max_loss=None if max_loss is None else highest_within(rows, list(dict.fromkeys(r.series for r in rows)),
                                                              max_loss),
        notes=notes + list(dict.fromkeys(cal.notes + ecal.notes)),
        file_size=None if bits is None else written_size(loaded.model, loaded.base_dir))


def written_size(model, base_dir: str) -> int:
    """The bytes `model` takes written as prune writes it (save_model; external data included)."""
    with tempfile.TemporaryDirectory(prefix="onnx-obs-size-") as d:
        return save_model(model, Path(d) / "model.onnx", base_dir)


def _own_labels(calib, model, labels: str | None) -> str | None:
    """The labels key of the calibration data itself, so that it is not mistaken for an input."""
    if labels is not None and labels in data_keys(calib):
        return labels
    return detect_labels(calib, model)


def _row(method: str, sparsity: float, pattern, result: api.PruneResult,
         quality: Quality) -> CompareRow:
    outputs = quality.outputs
    name = quality.label_output or next(
        (k for k, d in outputs.items() if "top1_agreement" in d), next(iter(outputs)))
    out = outputs[name]
    totals = result.report.to_dict()["totals"]
    return CompareRow(method=method, sparsity=sparsity,
                      pattern=f"{pattern[0]}:{pattern[1]}" if pattern else None,
                      weight_sparsity=totals["sparsity"], output=name,
                      relative_mse=out["relative_mse"], cosine=out["cosine"],
                      seconds=result.report.wall_seconds,
                      top1_agreement=out.get("top1_agreement"), accuracy=quality.accuracy[1])


def highest_within(rows: list[CompareRow], methods: list[str], max_loss: float) -> HighestWithin:
    """Per method (series: method and allocation where the sweep sets one), the highest sparsity
    such that it and every lower tested sparsity lose at most `max_loss` (None when even the
    lowest loses more)."""
    found = {}
    for method in methods:
        best = None
        for r in sorted((r for r in rows if r.series == method), key=lambda r: r.sparsity):
            if r.loss > max_loss:
                break
            best = r
        found[method] = Reach(best.sparsity, best.loss) if best else Reach(None, None)
    return HighestWithin(max_loss, found)


def check_writable(path: Path | None, flag: str) -> None:
    """Fail before the sweep, not after it, when an output file cannot be written."""
    if path is None:
        return
    if path.is_dir():
        raise OnnxObsError(f"{flag} {path} is a directory: give a file name")
    if not path.parent.exists():
        raise OnnxObsError(f"{flag}: directory {path.parent} does not exist: create it first")
