"""Evaluate a pruned model against its original on the same data: output deviation, top-k
agreement, accuracy with labels, latency and file size; and quality thresholds for CI."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import statistics
import sys
import time
import zipfile
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from onnx_obs import api
from onnx_obs.calib import RUN_KEY, Calibration, load_calibration, model_inputs
from onnx_obs.errors import OnnxObsError
from onnx_obs.graph.model_io import LoadedModel, load_any
from onnx_obs.graph.quant_format import quantized_zeros
from onnx_obs.metrics import compare_runs, is_classifier_like, top1_correct
from onnx_obs.progress import Progress
from onnx_obs.runtime import Runner

LABEL_KEYS = ("label", "labels")
TIME_SAMPLES = 128   # timing runs on the first batches holding this many samples (or runs)
# Threshold metrics: higher is better (checked by --fail-under) or lower is better (--fail-over).
HIGHER_IS_BETTER = ("top1_agreement", "top5_agreement", "accuracy", "cosine")
LOWER_IS_BETTER = ("relative_mse", "max_abs_error", "accuracy_drop")
ALIASES = {"agreement": "top1_agreement", "top1": "top1_agreement", "top5": "top5_agreement",
           "mse": "relative_mse", "max_abs": "max_abs_error"}


@dataclass
class Latency:
    pass_ms: float            # median wall time of a pass over the timed batches
    batch1_ms: float | None   # of a one-sample run; None when one sample cannot run alone
    samples: int = 0          # samples (runs without batching) in the timed batches


@dataclass
class ModelSummary:
    model: str                # the path, or "<proto>"
    file_size: int
    weight_sparsity: float    # fraction of exact zeros among the sites' weights
    accuracy: float | None    # with labels
    latency_ms: Latency | None


@dataclass
class Evaluation:
    original: ModelSummary
    pruned: ModelSummary
    outputs: dict[str, dict[str, float]]  # per output: metrics.OutputDeviation.summary()
    label_output: str | None  # the output scored against the labels
    metrics: dict[str, float]  # --metric: the user's function, sample-weighted mean over batches
    data: str
    samples: int              # runs without batching
    labels: str | None        # the key of the data holding the labels used
    batching: bool
    batch_size: int | None    # None without batching
    repeats: int
    device: str
    notes: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Quality:
    """What `measure` finds: per-output deviation, and accuracy of (reference, candidate)."""
    outputs: dict[str, dict[str, float]]
    accuracy: tuple[float | None, float | None]
    label_output: str | None


@dataclass
class ThresholdCheck:
    metric: str
    of: str                   # "output 'NAME'" or "the pruned model"
    value: float
    limit: float
    fails_when: str           # "under" or "over" the limit
    passed: bool

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(original, pruned, data, *, labels: str | None = None, batch_size: int = 32,
             repeats: int = 5, device: str = "auto", progress: bool | str = False,
             batching: bool = True, time_samples: int = TIME_SAMPLES,
             metric=None) -> Evaluation:
    """Run `original` and `pruned` (paths or ModelProtos) on `data` and compare them.

    data: anything load_calibration accepts (an .npz/.npy path, a dict of arrays, ...).
    labels: the key of `data` that holds class labels; when None, a key "label" or "labels" that
    is not a model input is used (and a note says so). repeats: timed passes per model (after a
    warm-up) over the first batches holding `time_samples` samples (at least one batch); 0 skips
    the timing. batching: False feeds each run of `data` whole (calib.py); "samples" then counts
    runs and "batch_size" is None. metric: f(original, pruned) of two dicts output name -> array
    (one batch each) returning a number, or a dict of named numbers; `metrics` holds each one's
    mean over the batches, weighted by their samples.
    """
    if repeats < 0:
        raise OnnxObsError(f"--repeats must be at least 0, got {repeats}")
    if time_samples < 1:
        raise OnnxObsError(f"--time-samples must be at least 1, got {time_samples}")
    ref_model, cand_model = load_any(original), load_any(pruned)
    _check_same_interface(ref_model.model, cand_model.model)
    notes = []
    detected = labels is None
    if detected:
        labels = detect_labels(data, ref_model.model)
    with as_flag("--data"):
        cal = load_calibration(data, ref_model.model, batch_size=batch_size, labels_key=labels,
                               batching=batching)
    ref = Runner(ref_model.model, ref_model.base_dir, device)
    cand = Runner(cand_model.model, cand_model.base_dir, device)
    custom = UserMetric(metric) if metric is not None else None
    with Progress(enabled=bool(progress), verbose=progress == "verbose") as bar:
        quality = measure(ref, cand, cal, bar, labels_required=not detected, metric=custom)
        timed = _first_samples(cal, time_samples)
        latency = measure_latency([ref, cand], timed, repeats, bar) if repeats else [None, None]
    if detected and labels is not None:
        notes.append(label_note(labels, quality, "data"))
        labels = labels if quality.label_output else None
    ref_summary, cand_summary = [
        ModelSummary(model=str(loaded.path) if loaded.path else "<proto>",
                     file_size=loaded.file_size, weight_sparsity=weight_sparsity(source, loaded),
                     accuracy=acc, latency_ms=lat)
        for source, loaded, acc, lat in zip((original, pruned), (ref_model, cand_model),
                                            quality.accuracy, latency)]
    return Evaluation(
        original=ref_summary, pruned=cand_summary,
        outputs=quality.outputs, label_output=quality.label_output,
        metrics=custom.summary() if custom else {},
        data=cal.source, samples=cal.num_samples, labels=labels, batching=cal.batched,
        batch_size=len(next(iter(cal.batches[0].values()))) if cal.sliceable else None,
        repeats=repeats, device=ref.provider, notes=notes + cal.notes)


def detect_labels(data, model: onnx.ModelProto) -> str | None:
    """A key named "label" or "labels" in `data` that is not a model input, if any."""
    inputs = {s.name for s in model_inputs(model)}
    keys = data_keys(data)
    return next((k for k in LABEL_KEYS if k in keys and k not in inputs), None)


def data_keys(data) -> set[str]:
    """The keys of a dict of arrays, an .npz file or a directory of them (empty for other
    sources); a run key KEY__k also counts as KEY."""
    if isinstance(data, Mapping):
        keys = set(data)
    elif not isinstance(data, (str, os.PathLike)):
        return set()
    else:
        path = Path(data)
        files = sorted(path.glob("*.npz")) if path.is_dir() else [path] if path.suffix == ".npz" else []
        keys = set().union(*map(_npz_keys, files))
    return keys | {m[1] for m in map(RUN_KEY.fullmatch, keys) if m}


def _npz_keys(path: Path) -> set[str]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return set(z.files)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return set()  # load_calibration reports the unreadable file


def _check_same_interface(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    ins_a = [(s.name, s.describe()) for s in model_inputs(a)]
    ins_b = [(s.name, s.describe()) for s in model_inputs(b)]
    if ins_a != ins_b:
        raise OnnxObsError(f"the models take different inputs ({_names(ins_a)} vs {_names(ins_b)}): "
                           "compare a model with a pruned copy of it")
    outs_a, outs_b = [o.name for o in a.graph.output], [o.name for o in b.graph.output]
    if outs_a != outs_b:
        raise OnnxObsError(f"the models have different outputs ({', '.join(outs_a)} vs "
                           f"{', '.join(outs_b)}): compare a model with a pruned copy of it")


def _names(specs) -> str:
    return ", ".join(f"{n} {d}" for n, d in specs)


def label_note(key: str, quality: Quality, where: str) -> str:
    """The note on a labels key found by its name, used or not."""
    if quality.label_output:
        return f"using key '{key}' of the {where} as labels (choose another with --labels)"
    return (f"key '{key}' of the {where} is not used as labels: no model output looks like "
            "class scores (a 2-D float [batch, classes] array)")


def measure(ref: Runner, cand: Runner, cal: Calibration, bar=None,
            labels_required: bool = True, metric: UserMetric | None = None) -> Quality:
    """Per-output deviation of `cand` from `ref` over every batch, and with cal.labels the
    accuracy of each model on the first classifier-like output ([batch, classes] floats).
    labels_required=False: without such an output, no accuracy instead of an error (for labels
    found by their key's name rather than given). metric: also fed every batch."""
    seen = {"rows": 0, "correct": [0, 0], "output": None, "required": labels_required}

    def observe(ref_out, cand_out):
        if metric is not None:
            metric.add(dict(zip(ref.output_names, ref_out)), dict(zip(ref.output_names, cand_out)))
        if cal.labels is not None and seen["output"] != "":
            i = _label_output(ref_out, ref.output_names, seen)
            if i is None:
                return
            labels = cal.labels[seen["rows"]:seen["rows"] + len(ref_out[i])]
            _check_labels(labels, ref_out[i])
            for k, out in enumerate((ref_out, cand_out)):
                seen["correct"][k] += top1_correct(out[i], labels)
            seen["rows"] += len(ref_out[i])
        if bar is not None:
            bar.advance(task)

    task = bar.add("comparing outputs", total=len(cal.batches)) if bar is not None else None
    outputs = compare_runs(ref, cand, cal.batches, observe)
    accuracy = tuple(c / seen["rows"] for c in seen["correct"]) if seen["rows"] else (None, None)
    return Quality(outputs, accuracy, seen["output"] or None)


def _label_output(outs, names, seen) -> int | None:
    if seen["output"] is None:
        i = next((i for i, y in enumerate(outs) if is_classifier_like(np.asarray(y))), None)
        if i is None:
            if not seen["required"]:
                seen["output"] = ""   # none: accuracy is not measured
                return None
            raise OnnxObsError("labels were given but no model output looks like class scores "
                               "(a 2-D float [batch, classes] array): drop --labels")
        seen["output"] = names[i]
    return names.index(seen["output"])


def _check_labels(labels: np.ndarray, scores: np.ndarray) -> None:
    ok = (labels.ndim == 1 or (labels.ndim == 2 and labels.shape[1] == scores.shape[1]))
    if not ok or len(labels) != len(scores):
        raise OnnxObsError(f"labels of shape {list(labels.shape)} do not fit output scores of "
                           f"shape {list(scores.shape)}: give class indices [samples] or one-hot "
                           "[samples, classes]")


def measure_latency(runners: list[Runner], cal: Calibration, repeats: int, bar=None) -> list[Latency]:
    """Per runner, the median wall time of a full pass over `cal` and of a one-sample run.

    Each runner gets a warm-up first; the timed runs alternate between runners so that load from
    elsewhere on the machine hits them alike. batch1_ms is None when the batch size is fixed or
    the runs cannot be cut into samples.
    """
    first = cal.batches[0]
    single = cal.sliceable and (len(next(iter(first.values()))) == 1 or _batch_is_free(runners[0]))
    one = {k: v[:1] for k, v in first.items()} if single else {}
    task = bar.add("timing", total=repeats * len(runners)) if bar is not None else None
    for r in runners:
        _full_pass(r, cal)
        if single:
            r.run(one)
    passes = [[] for _ in runners]
    singles = [[] for _ in runners]
    for _ in range(repeats):
        for k, r in enumerate(runners):
            passes[k].append(_full_pass(r, cal))
            if single:
                t0 = time.perf_counter()
                r.run(one)
                singles[k].append(time.perf_counter() - t0)
            if bar is not None:
                bar.advance(task)
    return [Latency(pass_ms=1e3 * statistics.median(p),
                    batch1_ms=1e3 * statistics.median(s) if single else None,
                    samples=cal.num_samples)
            for p, s in zip(passes, singles)]


def _first_samples(cal: Calibration, n: int) -> Calibration:
    """The first batches of `cal` holding at least `n` samples (runs without batching)."""
    kept, count = [], 0
    for feeds in cal.batches:
        if count >= n:
            break
        kept.append(feeds)
        count += len(next(iter(feeds.values()))) if cal.sliceable else 1
    return dataclasses.replace(cal, batches=kept, num_samples=count, labels=None)


class UserMetric:
    """--metric: the user's f(original, pruned) on each batch, averaged weighted by samples."""

    def __init__(self, fn):
        self.fn, self.name = fn, getattr(fn, "__name__", "metric")
        self.sums: dict[str, float] = {}
        self.weight = 0

    def add(self, ref: dict[str, np.ndarray], cand: dict[str, np.ndarray]) -> None:
        n = len(np.atleast_1d(next(iter(ref.values()))))
        try:
            value = self.fn(ref, cand)
        except Exception as e:  # the user's code: one line naming it
            raise OnnxObsError(f"--metric {self.name} failed: {type(e).__name__}: {e}") from e
        values = value if isinstance(value, Mapping) else {self.name: value}
        for k, v in values.items():
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise OnnxObsError(f"--metric {self.name} must return a number or a dict of "
                                   f"numbers, got {type(v).__name__} for '{k}'") from None
            self.sums[k] = self.sums.get(k, 0.0) + n * v
        self.weight += n

    def summary(self) -> dict[str, float]:
        return {k: v / self.weight for k, v in self.sums.items()} if self.weight else {}


@contextmanager
def as_flag(flag: str):
    """Word data errors for the flag the user passed (`--data`, `--eval`), not "calibration"."""
    try:
        yield
    except OnnxObsError as e:
        text = str(e)
        for old, new in (("calibration data", "the data"), ("calibration array", "array"),
                         ("calibration file", "data file"), ("calibration key", "key"),
                         ("calibration directory", "data directory"), ("calibration", "data")):
            text = text.replace(old, new)
        raise OnnxObsError(f"{flag}: {text}") from e


def _full_pass(runner: Runner, cal: Calibration) -> float:
    t0 = time.perf_counter()
    for feeds in cal.batches:
        runner.run(feeds)
    return time.perf_counter() - t0


def _batch_is_free(runner: Runner) -> bool:
    """Whether every input's first dimension is dynamic (or 1), so one sample can run alone."""
    return all(not i.shape or not isinstance(i.shape[0], int) or i.shape[0] == 1
               for i in runner.session.get_inputs())


def weight_sparsity(model, loaded: LoadedModel) -> float:
    """Fraction of exact zeros among the prunable weights (the sites) of `model` (loaded as
    `loaded`), quantized weights included (a code at its zero point is a zero)."""
    sites = api.inspect(model).sites
    zeros, total = quantized_zeros(loaded.model, loaded.base_dir)
    zeros += sum(s.params * s.sparsity for s in sites)
    total += sum(s.params for s in sites)
    return zeros / total if total else 0.0


def parse_thresholds(text: str | None, flag: str, custom: list[str] = ()) -> dict[str, float]:
    """'metric=value,...' for --fail-under (higher-is-better metrics) or --fail-over (lower);
    `custom`: names a --metric function may report, allowed under either flag."""
    allowed = (HIGHER_IS_BETTER if flag == "--fail-under" else LOWER_IS_BETTER) + tuple(custom)
    other = "--fail-over" if flag == "--fail-under" else "--fail-under"
    limits = {}
    for item in filter(None, (t.strip() for t in (text or "").split(","))):
        name, sep, value = item.partition("=")
        metric = ALIASES.get(name.strip(), name.strip())
        try:
            limit = float(value)
        except ValueError:
            raise OnnxObsError(f"{flag} expects metric=number pairs, e.g. "
                               f"{allowed[0]}=0.99, got '{item}'") from None
        builtin = metric in HIGHER_IS_BETTER + LOWER_IS_BETTER
        if not sep or metric not in allowed and (builtin or not custom):
            hint = (f"{metric} is lower-is-better: use {other}" if metric in LOWER_IS_BETTER
                    else f"{metric} is higher-is-better: use {other}" if metric in HIGHER_IS_BETTER
                    else f"{flag} takes {', '.join(allowed)}")
            raise OnnxObsError(f"{flag}: cannot check '{item}' ({hint})")
        limits[metric] = limit
    return limits


def check_thresholds(result: Evaluation, under: dict[str, float],
                     over: dict[str, float]) -> list[ThresholdCheck]:
    """Each threshold against `result` of evaluate(): one check per output that has the metric.

    A check fails when the value is below an `under` limit or above an `over` limit.
    """
    checks = []
    for limits, direction in ((under, "under"), (over, "over")):
        for metric, limit in limits.items():
            for where, value in _values(result, metric):
                passed = value >= limit if direction == "under" else value <= limit
                checks.append(ThresholdCheck(metric=metric, of=where, value=value, limit=limit,
                                             fails_when=direction, passed=passed))
    return checks


def _values(result: Evaluation, metric: str) -> list[tuple[str, float]]:
    if metric in result.metrics:
        return [("the --metric function", result.metrics[metric])]
    if result.metrics and metric not in HIGHER_IS_BETTER + LOWER_IS_BETTER:
        raise OnnxObsError(f"--metric reported {', '.join(result.metrics)}, not '{metric}': "
                           "fix the threshold's name")
    if metric in ("accuracy", "accuracy_drop"):
        acc, ref = result.pruned.accuracy, result.original.accuracy
        if acc is None:
            raise OnnxObsError(f"{metric} needs labels: pass --labels KEY (a key of the data file)")
        return [("the pruned model", acc if metric == "accuracy" else ref - acc)]
    found = [(f"output '{name}'", d[metric]) for name, d in result.outputs.items() if metric in d]
    if not found:
        raise OnnxObsError(f"no output has {metric} (top-k agreement needs [batch, classes] scores, "
                           "top-5 more than 5 classes): drop that threshold")
    return found


def failure_message(check: ThresholdCheck) -> str:
    return (f"{check.metric} of {check.of} is {check.value:.6g}, {check.fails_when} "
            f"the threshold {check.limit:.6g}")


def load_metric(spec: str):
    """The function named by --metric MODULE:FUNCTION (MODULE importable, or a .py file)."""
    module, sep, name = spec.rpartition(":")
    if not sep or not module or not name:
        raise OnnxObsError(f"--metric must look like MODULE:FUNCTION (e.g. mymetrics:iou), got '{spec}'")
    try:
        if module.endswith(".py"):
            spec_ = importlib.util.spec_from_file_location(Path(module).stem, module)
            if spec_ is None or not Path(module).is_file():
                raise OnnxObsError(f"--metric: file {module} not found")
            mod = importlib.util.module_from_spec(spec_)
            spec_.loader.exec_module(mod)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())
            mod = importlib.import_module(module)
    except OnnxObsError:
        raise
    except Exception as e:  # the user's module failed to import: say so in one line
        raise OnnxObsError(f"--metric: cannot import {module}: {type(e).__name__}: {e}") from e
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise OnnxObsError(f"--metric: {module} has no function '{name}'")
    return fn
