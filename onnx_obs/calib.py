"""Calibration data: .npz / .npy files, dicts of arrays, CalibrationDataReaders, feed iterables.

Everything is validated against the model's declared inputs before any work starts, and turned
into a list of feed dicts (batches) that can be replayed as often as a method needs.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
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
    num_samples: int
    labels: np.ndarray | None = None
    source: str = "arrays"

    def __iter__(self):
        return iter(self.batches)


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


def load_calibration(source, model: onnx.ModelProto, *, batch_size: int = 32,
                     max_samples: int | None = None, labels_key: str | None = None) -> Calibration:
    """Validate `source` against the model's inputs and split it into batches.

    source: a path to .npz / .npy, a mapping of input name -> array (batched on axis 0), an
    onnxruntime.quantization CalibrationDataReader, or an iterable of feed dicts (one run each).
    """
    specs = model_inputs(model)
    if batch_size < 1:
        raise OnnxObsError(f"--batch-size must be at least 1, got {batch_size}")
    if max_samples is not None and max_samples < 1:
        raise OnnxObsError(f"--max-samples must be at least 1, got {max_samples}")
    if isinstance(source, (str, os.PathLike)):
        arrays, name = _read_file(Path(source), specs), str(source)
        return _from_arrays(arrays, specs, batch_size, max_samples, labels_key, name)
    if isinstance(source, Mapping):
        return _from_arrays(dict(source), specs, batch_size, max_samples, labels_key, "arrays")
    if hasattr(source, "get_next"):
        feeds = iter(source.get_next, None)
        return _from_feeds(feeds, specs, max_samples, "CalibrationDataReader")
    if isinstance(source, Iterable):
        return _from_feeds(iter(source), specs, max_samples, "feeds")
    raise OnnxObsError(f"unsupported calibration source of type {type(source).__name__}: "
                       "pass an .npz/.npy path, a dict of arrays or a CalibrationDataReader")


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
    if len(specs) == 1 and len(arrays) == 1 and specs[0].name not in arrays:
        arrays = {specs[0].name: next(iter(arrays.values()))}
    return arrays


def _from_arrays(arrays, specs, batch_size, max_samples, labels_key, name) -> Calibration:
    labels = None
    if labels_key is not None:
        if labels_key not in arrays:
            raise OnnxObsError(f"labels key '{labels_key}' is not in the calibration data "
                               f"(keys: {', '.join(sorted(arrays))})")
        labels = np.asarray(arrays.pop(labels_key))
    _check_keys(arrays, specs)
    arrays = {s.name: _check_array(s, np.asarray(arrays[s.name])) for s in specs}
    counts = {k: len(v) for k, v in arrays.items()}
    if len(set(counts.values())) > 1:
        raise OnnxObsError("calibration arrays disagree on the number of samples (axis 0): "
                           + ", ".join(f"{k}={v}" for k, v in counts.items()))
    n = next(iter(counts.values()))
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
    return Calibration(batches, n, None if labels is None else labels[:n], name)


def _from_feeds(feeds, specs, max_samples, name) -> Calibration:
    batches, n = [], 0
    for feed in feeds:
        if not isinstance(feed, Mapping):
            raise OnnxObsError(f"each calibration feed must be a dict of input name -> array, "
                               f"got {type(feed).__name__}")
        _check_keys(feed, specs)
        batch = {s.name: _check_array(s, np.asarray(feed[s.name])) for s in specs}
        first = next(iter(batch.values()))
        size = first.shape[0] if first.ndim else 1
        if max_samples is not None and n + size > max_samples and _dynamic_batch(specs):
            size = max_samples - n  # keep exactly max_samples: cut the last feed short
            batch = {k: v[:size] for k, v in batch.items()}
        batches.append(batch)
        n += size
        if max_samples is not None and n >= max_samples:
            break
    if not batches:
        raise OnnxObsError(f"the calibration {name} yielded no data")
    return Calibration(batches, n, None, name)


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


def _check_array(spec: InputSpec, a: np.ndarray) -> np.ndarray:
    if a.dtype == object or a.dtype.kind not in "biufc":
        raise OnnxObsError(f"input '{spec.name}': calibration array has dtype {a.dtype}, "
                           f"expected {spec.dtype.name}")
    if a.size == 0:
        raise OnnxObsError(f"input '{spec.name}': calibration array is empty (shape {list(a.shape)})")
    if a.dtype != spec.dtype:
        cast = a.astype(spec.dtype)
        with np.errstate(invalid="ignore"):
            lossless = np.array_equal(cast.astype(a.dtype), a, equal_nan=a.dtype.kind in "fc")
        if not lossless:
            raise OnnxObsError(f"input '{spec.name}' expects {spec.dtype.name} but the calibration "
                               f"array is {a.dtype.name} and would lose precision: convert it with "
                               f".astype(np.{spec.dtype.name})")
        a = cast
    if spec.shape is not None:
        if a.ndim != len(spec.shape):
            raise OnnxObsError(f"input '{spec.name}' expects rank {len(spec.shape)} "
                               f"{spec.describe()}, got an array of shape {list(a.shape)}")
        for axis, (want, got) in enumerate(zip(spec.shape, a.shape)):
            if axis and want is not None and want != got:
                raise OnnxObsError(f"input '{spec.name}' expects {spec.describe()}, got shape "
                                   f"{list(a.shape)} (axis {axis} must be {want})")
    if a.dtype.kind in "fc" and not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).sum())
        raise OnnxObsError(f"input '{spec.name}': calibration data has {bad} NaN/Inf values: "
                           "clean the data first")
    return a
