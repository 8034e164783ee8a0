"""Calibration data: .npz / .npy files, dicts of arrays, CalibrationDataReaders, feed iterables.

Everything is validated against the model's declared inputs before any work starts, and turned
into a list of feed dicts (batches) that can be replayed as often as a method needs.

With batching (the default) arrays are sliced on axis 0 into batches. Without it every run's
arrays are fed whole: one run per .npz of a directory, per KEY__k group of an .npz, or per feed.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections import Counter
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnx_obs.errors import OnnxObsError


@dataclass
class InputSpec:
    name: str
    dtype: np.dtype
    shape: list[int | None] | None  # None: rank unknown; None entries: dynamic dims

    def describe(self) -> str:
        dims = "?" if self.shape is None else ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.dtype.name}[{dims}]"


@dataclass
class Calibration:
    batches: list[dict[str, np.ndarray]]
    num_samples: int  # samples on axis 0 with batching; runs (= len(batches)) without
    labels: np.ndarray | None = None
    source: str = "arrays"
    batched: bool = True
    notes: list[str] = field(default_factory=list)  # what the user should know about the data

    def __iter__(self):
        return iter(self.batches)

    @property
    def sliceable(self) -> bool:
        """Whether samples can be cut from and joined across batches (axis 0 of every input)."""
        return self.batched and all(np.ndim(v) for v in self.batches[0].values())


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """Inputs a caller must feed (graph inputs that are not initializers)."""
    inits = {i.name for i in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise OnnxObsError(f"input '{vi.name}' is not a tensor: only tensor inputs are supported")
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        shape = None
        if tt.HasField("shape"):
            shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                     for d in tt.shape.dim]
        specs.append(InputSpec(vi.name, dtype, shape))
    return specs


NO_BATCHING = "feed whole runs with --no-batching (batching=False in Python)"
RUN_KEY = re.compile(r"(.+)__(\d+)")


def load_calibration(source, model: onnx.ModelProto, **options) -> Calibration:
    """`_load` (below), with a note for every cast of an input's arrays to the model's dtype."""
    casts: list[str] = []
    token = _CASTS.set(casts)
    try:
        cal = _load(source, model, **options)
    finally:
        _CASTS.reset(token)
    cal.notes = list(dict.fromkeys(cal.notes + casts))
    return cal


# The casts _check_array makes during one load_calibration call, as notes.
_CASTS: ContextVar[list[str] | None] = ContextVar("casts", default=None)


def _load(source, model: onnx.ModelProto, *, batch_size: int = 32,
          max_samples: int | None = None, labels_key: str | None = None,
          batching: bool = True) -> Calibration:
    """Validate `source` against the model's inputs and split it into batches.

    source: a path to .npz / .npy or to a directory of .npz files, a mapping of input name ->
    array, an onnxruntime.quantization CalibrationDataReader, or an iterable of feed dicts (one
    run each). Keys KEY__0, KEY__1, ... of an .npz or mapping are runs 0, 1, ...
    batching: slice the arrays on axis 0 into batches of `batch_size` (files and runs apart);
    False feeds every run whole, checks every axis, and counts runs as samples (max_samples too).
    """
    specs = model_inputs(model)
    notes: list[str] = []
    if batch_size < 1:
        raise OnnxObsError(f"--batch-size must be at least 1, got {batch_size}")
    if max_samples is not None and max_samples < 1:
        raise OnnxObsError(f"--max-samples must be at least 1, got {max_samples}")
    if isinstance(source, (str, os.PathLike)):
        parts, name = _read_path(Path(source), specs, labels_key, notes), str(source)
    elif isinstance(source, Mapping):
        parts, name = _runs(dict(source), "", specs, labels_key), "arrays"
    elif hasattr(source, "get_next"):
        return _from_feeds(iter(source.get_next, None), specs, max_samples, "CalibrationDataReader", batching)
    elif isinstance(source, Iterable):
        return _from_feeds(iter(source), specs, max_samples, "feeds", batching)
    else:
        raise OnnxObsError(f"unsupported calibration source of type {type(source).__name__}: "
                           "pass an .npz/.npy path, a dict of arrays or a CalibrationDataReader")
    cal = _from_parts(parts, specs, batch_size, max_samples, labels_key, name, batching)
    cal.notes = list(dict.fromkeys(notes))  # once for all files of a directory
    return cal


def _read_path(path: Path, specs, labels_key, notes: list[str]) -> list[tuple[str, dict]]:
    """(where, arrays) per run group: one per .npz of a directory (by name), or of the file.

    A model with one input is fed the lone array of an .npz whatever its key (np.savez(f, x)
    names it arr_0), with a note in `notes`.
    """
    in_dir = path.is_dir()
    files = sorted(path.glob("*.npz")) if in_dir else [path]
    if not files:
        raise OnnxObsError(f"calibration directory {path} holds no .npz files: put one .npz per "
                           "run in it, keyed by input name")
    parts = []
    for f in files:
        arrays = _read_file(f, specs)
        if len(specs) == 1 and len(arrays) == 1 and specs[0].name not in arrays:
            (key, array), = arrays.items()
            notes.append(f"{path}: key '{key}' is not an input name: its array was fed to the "
                         f"model's only input '{specs[0].name}'")
            arrays = {specs[0].name: array}
        parts += _runs(arrays, f.name if in_dir else "", specs, labels_key)
    return parts


def _runs(arrays: dict, where: str, specs, labels_key) -> list[tuple[str, dict]]:
    """Split KEY__k arrays into one dict per run k (in numeric order); no suffixes: one run."""
    literal = {s.name for s in specs} | {labels_key}
    runs, plain = {}, []
    for key, a in arrays.items():
        m = RUN_KEY.fullmatch(key)
        if m is None or key in literal:
            plain.append(key)
        else:
            runs.setdefault(int(m[2]), {})[m[1]] = a
    if not runs:
        return [(where, arrays)]
    src = where or "the calibration data"
    if plain:
        raise OnnxObsError(f"{src}: key '{plain[0]}' has no run suffix while others have one: "
                           "name every array KEY__0, KEY__1, ... (one suffix per run)")
    keys = set().union(*runs.values())
    for k, run in sorted(runs.items()):
        if keys - run.keys():
            key = sorted(keys - run.keys())[0]
            raise OnnxObsError(f"{src}: '{key}' has no array for run {k} ('{key}__{k}' is missing): "
                               "every key needs the same run indices")
    return [(f"{where} run {k}".strip(), run) for k, run in sorted(runs.items())]


def _read_file(path: Path, specs: list[InputSpec]) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise OnnxObsError(f"calibration file not found: {path}")
    try:
        if path.suffix == ".npy":
            if len(specs) != 1:
                raise OnnxObsError(f"a .npy file holds one array but the model has {len(specs)} "
                                   f"inputs ({', '.join(s.name for s in specs)}): use an .npz keyed by input name")
            return {specs[0].name: np.load(path, allow_pickle=False)}
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except OnnxObsError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise OnnxObsError(f"cannot read calibration file {path}: {e} "
                           "(expected an .npz of arrays keyed by input name, or an .npy)") from e
    if not isinstance(arrays, dict) or not arrays:
        raise OnnxObsError(f"calibration file {path} holds no arrays")
    return arrays


@contextmanager
def _where(prefix: str):
    """Prefix user errors with the file or run they come from."""
    try:
        yield
    except OnnxObsError as e:
        if not prefix:
            raise
        raise OnnxObsError(f"{prefix}: {e}") from e


def _from_parts(parts, specs, batch_size, max_samples, labels_key, name, batching) -> Calibration:
    """Batches of every run group in turn (each batched on its own, or fed whole)."""
    batches, labels, n = [], [], 0
    for where, arrays in parts:
        if max_samples is not None and n >= max_samples:
            break
        with _where(where):
            arrays = dict(arrays)
            lab = _pop_labels(arrays, labels_key)
            if batching:
                left = None if max_samples is None else max_samples - n
                part = _from_arrays(arrays, lab, labels_key, specs, batch_size, left)
            else:
                part = Calibration([_check_feed(arrays, specs, batched=False)], 1,
                                   None if lab is None else np.atleast_1d(lab))
        batches += part.batches
        n += part.num_samples
        if part.labels is not None:
            labels.append(part.labels)
    return Calibration(batches, n, np.concatenate(labels) if labels else None, name, batching)


def _pop_labels(arrays: dict, labels_key: str | None) -> np.ndarray | None:
    if labels_key is None:
        return None
    if labels_key not in arrays:
        raise OnnxObsError(f"labels key '{labels_key}' is not in the calibration data "
                           f"(keys: {', '.join(sorted(arrays))})")
    return np.asarray(arrays.pop(labels_key))


def _from_arrays(arrays, labels, labels_key, specs, batch_size, max_samples) -> Calibration:
    arrays = _check_feed(arrays, specs, batched=True)
    scalar = next((k for k, v in arrays.items() if v.ndim == 0), None)
    if scalar is not None:
        raise OnnxObsError(f"input '{scalar}' is a scalar (rank 0), so the data cannot be split "
                           f"into batches on axis 0: {NO_BATCHING}")
    n = _batch_length(arrays, specs)
    if labels is not None and len(labels) != n:
        raise OnnxObsError(f"labels '{labels_key}' have {len(labels)} rows but the inputs have {n} samples")
    if max_samples is not None:
        n = min(n, max_samples)
    # A static batch dimension fixes the batch size.
    fixed = {s.shape[0] for s in specs if s.shape and s.shape[0] is not None}
    if len(fixed) == 1:
        batch_size = fixed.pop()
        if n % batch_size:
            raise OnnxObsError(f"the model's batch dimension is fixed at {batch_size} but the "
                               f"calibration data has {n} samples: use a multiple of {batch_size}")
    batches = [{k: v[i:min(i + batch_size, n)] for k, v in arrays.items()} for i in range(0, n, batch_size)]
    return Calibration(batches, n, None if labels is None else labels[:n])


def _batch_length(arrays: dict[str, np.ndarray], specs: list[InputSpec]) -> int:
    """The common axis-0 length of `arrays` (1 when empty); an input that differs from the
    batch (the length most inputs with a dynamic axis 0 share) is named in the error."""
    counts = {k: len(v) for k, v in arrays.items()}
    if len(set(counts.values())) <= 1:
        return next(iter(counts.values()), 1)
    dynamic = [counts[s.name] for s in specs if s.name in counts and s.shape and s.shape[0] is None]
    batch = Counter(dynamic or counts.values()).most_common(1)[0][0]
    odd = next(k for k, v in counts.items() if v != batch)
    raise OnnxObsError(f"calibration arrays disagree on the number of samples on axis 0 ("
                       + ", ".join(f"{k}={v}" for k, v in counts.items())
                       + f"): if input '{odd}' is not batched on axis 0, {NO_BATCHING}")


def _from_feeds(feeds, specs, max_samples, name, batching) -> Calibration:
    batches, n = [], 0
    for feed in feeds:
        batch = _check_feed(feed, specs, batching)
        # Scalars hold one value per run: the batch is the other arrays' axis 0.
        size = _batch_length({k: v for k, v in batch.items() if v.ndim}, specs) if batching else 1
        if batching and max_samples is not None and n + size > max_samples and _dynamic_batch(specs):
            size = max_samples - n  # keep exactly max_samples: cut the last feed short
            batch = {k: v[:size] for k, v in batch.items()}
        batches.append(batch)
        n += size
        if max_samples is not None and n >= max_samples:
            break
    if not batches:
        raise OnnxObsError(f"the calibration {name} yielded no data")
    return Calibration(batches, n, None, name, batching)


def _check_feed(feed, specs: list[InputSpec], batched: bool) -> dict[str, np.ndarray]:
    if not isinstance(feed, Mapping):
        raise OnnxObsError(f"each calibration feed must be a dict of input name -> array, "
                           f"got {type(feed).__name__}")
    _check_keys(feed, specs)
    return {s.name: _check_array(s, np.asarray(feed[s.name]), batched) for s in specs}


def _dynamic_batch(specs: list[InputSpec]) -> bool:
    return all(s.shape and s.shape[0] is None for s in specs)


def _check_keys(arrays: Mapping, specs: list[InputSpec]) -> None:
    names = [s.name for s in specs]
    missing = [s for s in specs if s.name not in arrays]
    if missing:
        s = missing[0]
        raise OnnxObsError(f"calibration data has no array for input '{s.name}' "
                           f"(expected {s.describe()}); keys found: {', '.join(sorted(arrays)) or 'none'}")
    extra = sorted(set(arrays) - set(names))
    if extra:
        raise OnnxObsError(f"calibration key '{extra[0]}' is not a model input (inputs: "
                           f"{', '.join(names)}): remove it, or name it with --labels if it holds targets")


def _check_array(spec: InputSpec, a: np.ndarray, batched: bool) -> np.ndarray:
    """Dtype (lossless casts only), emptiness, shape (axis 0 too without batching), NaN/Inf."""
    if a.dtype == object or a.dtype.kind not in "biufc":
        raise OnnxObsError(f"input '{spec.name}': calibration array has dtype {a.dtype}, "
                           f"expected {spec.dtype.name}")
    if a.size == 0:
        raise OnnxObsError(f"input '{spec.name}': calibration array is empty (shape {list(a.shape)})")
    if a.dtype != spec.dtype:
        cast = a.astype(spec.dtype)
        with np.errstate(invalid="ignore"):
            lossless = np.array_equal(cast.astype(a.dtype), a, equal_nan=a.dtype.kind in "fc")
        if not lossless and not _shape_fits(spec, a, batched):
            raise OnnxObsError(f"input '{spec.name}' expects {spec.describe()}, got "
                               f"{a.dtype.name}[{', '.join(map(str, a.shape))}]: is this data for "
                               "this model? (`onnx-obs inspect MODEL` lists its inputs)")
        if not lossless:
            raise OnnxObsError(f"input '{spec.name}' expects {spec.dtype.name} but the calibration "
                               f"array is {a.dtype.name} and would lose precision: convert it with "
                               f".astype(np.{spec.dtype.name})")
        _note_cast(spec, a.dtype)
        a = cast
    if spec.shape is not None:
        if a.ndim != len(spec.shape):
            hint = f": a scalar takes one value per run, {NO_BATCHING}" if batched and not spec.shape else ""
            raise OnnxObsError(f"input '{spec.name}' expects rank {len(spec.shape)} "
                               f"{spec.describe()}, got an array of shape {list(a.shape)}{hint}")
        for axis, (want, got) in enumerate(zip(spec.shape, a.shape)):
            if (axis or not batched) and want is not None and want != got:
                raise OnnxObsError(f"input '{spec.name}' expects {spec.describe()}, got shape "
                                   f"{list(a.shape)} (axis {axis} must be {want})")
    if a.dtype.kind in "fc" and not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).sum())
        raise OnnxObsError(f"input '{spec.name}': calibration data has {bad} NaN/Inf values: "
                           "clean the data first")
    return a


def _shape_fits(spec: InputSpec, a: np.ndarray, batched: bool) -> bool:
    """Whether `a`'s rank and fixed axes match the input (axis 0 apart with batching)."""
    if spec.shape is None:
        return True
    return a.ndim == len(spec.shape) and all(
        want is None or want == got or (axis == 0 and batched)
        for axis, (want, got) in enumerate(zip(spec.shape, a.shape)))


def _note_cast(spec: InputSpec, dtype: np.dtype) -> None:
    """Say that an input's arrays were cast (losslessly) to the model's dtype."""
    casts = _CASTS.get()
    if casts is None:
        return
    src, dst = dtype.name, spec.dtype.name
    if dtype.kind in "biu" and spec.dtype.kind in "fc":
        why = (f"integer values (such as pixels 0..255) were cast to {dst} as they are: if the model "
               "expects scaled or normalised values, scale them before saving the data")
    elif dtype.kind == "f" and spec.dtype.kind == "f":
        why = f"{src} values were cast to {dst} (every value is exactly representable)"
    else:
        why = f"{src} values were cast to {dst} (no value changes)"
    casts.append(f"input '{spec.name}': {why}")
