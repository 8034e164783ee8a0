"""Loading and saving ONNX files: checks with clear errors, external data, atomic writes."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import onnx
from google.protobuf.message import DecodeError

from onnx_obs.errors import OnnxObsError
from onnx_obs.graph.sparse_storage import densify

_TWO_GB = 2**31
# Tensors at least this large go to the external data file when a model is saved with one.
_EXTERNAL_MIN_BYTES = 1024


@dataclass
class LoadedModel:
    model: onnx.ModelProto   # external data is referenced, not read into memory
    path: Path | None
    base_dir: str            # where external data files are found
    file_size: int           # bytes of the model file plus its external data files
    spill_file: BinaryIO | None = None  # open while pruning towards an output: see `spilling`
    spill_location: str = ""

    @property
    def has_external_data(self) -> bool:
        return any(_is_external(t) for t in iter_tensors(self.model.graph))

    def store(self, tensor: onnx.TensorProto, raw: bytes) -> None:
        """Give a tensor new raw bytes: in the spill file if one is open and they are large, else
        inline (bytes set on a proto stay in its memory arena until the whole model is freed)."""
        if self.spill_file is None or len(raw) < _EXTERNAL_MIN_BYTES:
            set_raw(tensor, raw)
            return
        try:
            offset = _append_aligned(self.spill_file, raw)
            self.spill_file.flush()  # onnx and onnxruntime read it through their own handles
        except OSError as e:
            folder = os.path.join(self.base_dir, os.path.dirname(self.spill_location))
            raise OnnxObsError(f"could not write pruned weights into {folder}: "
                               f"{e.strerror or e}") from e
        _point_external(tensor, self.spill_location, offset, len(raw))


def iter_tensors(graph: onnx.GraphProto):
    """Every stored tensor of a graph and its subgraphs: initializers and Constant values."""
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                yield a.t
            elif a.type == onnx.AttributeProto.GRAPH:
                yield from iter_tensors(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from iter_tensors(g)


def set_raw(t: onnx.TensorProto, raw: bytes) -> None:
    """Store raw little-endian bytes inline in t, in place of its external or typed data."""
    for f in ("external_data", "raw_data", "float_data", "int32_data", "double_data"):
        t.ClearField(f)
    t.data_location = onnx.TensorProto.DEFAULT
    t.raw_data = raw


def _is_external(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL


def _external_files(model: onnx.ModelProto) -> set[str]:
    files = set()
    for t in iter_tensors(model.graph):
        if _is_external(t):
            files.update(e.value for e in t.external_data if e.key == "location")
    return files


def load_model(path: str | os.PathLike, check: bool = True) -> LoadedModel:
    """Read an ONNX file without reading its external data; raise OnnxObsError on any problem."""
    p = Path(path)
    if not p.exists():
        raise OnnxObsError(f"model file not found: {p}")
    if not p.is_file():
        raise OnnxObsError(f"model path is not a file: {p}")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as e:
        raise OnnxObsError(f"{p} is not a readable ONNX model (truncated or another format?): "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    if not model.graph.node and not model.graph.output:
        raise OnnxObsError(f"{p} is not an ONNX model: no graph found")
    base_dir = str(p.parent)
    size = p.stat().st_size
    for loc in sorted(_external_files(model)):
        data = p.parent / loc
        if not data.is_file():
            raise OnnxObsError(f"external data file '{loc}' of {p.name} is missing: "
                               f"keep it next to the model in {p.parent}")
        size += data.stat().st_size
    if check:
        try:
            onnx.checker.check_model(str(p))
        except onnx.checker.ValidationError as e:
            # the checker's message spans lines (node details, context): keep it whole, on one line
            first = " ".join(str(e).split("==> Context")[0].split())[:300]
            raise OnnxObsError(f"{p} fails onnx.checker: {first}") from e
    densify(model.graph, base_dir)  # weights are read from initializers: sparse ones become dense
    return LoadedModel(model, p, base_dir, size)


def check_proto(model: onnx.ModelProto) -> None:
    """onnx.checker on an in-memory model, whose external data files the checker would look for
    in the working directory: a copy leaves those tensors out (their bytes are read as stored)."""
    if _external_files(model):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        for t in iter_tensors(copy.graph):
            if _is_external(t):
                t.data_location = onnx.TensorProto.DEFAULT
                del t.external_data[:]
                del t.dims[:]
                t.dims.append(0)
        model = copy
    onnx.checker.check_model(model)


def load_any(model: str | os.PathLike | onnx.ModelProto) -> LoadedModel:
    """A path is read as load_model does; a ModelProto is copied first, never changed."""
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return from_proto(copy)
    return load_model(model)


def from_proto(model: onnx.ModelProto) -> LoadedModel:
    size = model.ByteSize()
    densify(model.graph)  # as load_model: sparse initializers become dense ones, in place
    return LoadedModel(model, None, "", size)


def check_output_path(out: str | os.PathLike, src: Path | None, force: bool,
                      model: onnx.ModelProto | None = None, base_dir: str = "") -> Path:
    """Refuse paths that would lose data or cannot be written, before any work is done.

    With `model`, also refuse to write over its external data files (the output's own
    `<out>.data` included), which would corrupt the input.
    """
    o = Path(out)
    if src is not None and o.exists() and o.resolve() == src.resolve():
        raise OnnxObsError("output path is the input model: write to another file (-o)")
    inputs = {(Path(base_dir) / loc).resolve() for loc in _external_files(model)} if model else set()
    for p in (o, o.parent / (o.name + ".data")):
        if p.resolve() in inputs:
            raise OnnxObsError(f"writing {o} would overwrite {p}, the input model's external data: "
                               "choose another output name")
    if o.is_dir():
        raise OnnxObsError(f"output path {o} is a directory: give a file name")
    if not o.parent.exists():
        raise OnnxObsError(f"output directory {o.parent} does not exist: create it first")
    if not os.access(o.parent, os.W_OK):
        raise OnnxObsError(f"output directory {o.parent} is not writable")
    if o.exists() and not force:
        raise OnnxObsError(f"{o} exists: pass --force to overwrite it")
    return o


@contextmanager
def spilling(loaded: LoadedModel, out: str | os.PathLike | None, *others: onnx.ModelProto):
    """While pruning an external-data model into `out`, `loaded.store` writes pruned weights to a
    temp file beside `out` (removed on exit, however it happens), so memory holds one at a time.

    onnx and onnxruntime read all external data from one folder: `loaded.model` and `others`
    (copies sharing its data) get locations relative to the deepest folder holding both the
    input's data files and the temp file, which becomes `loaded.base_dir`.
    """
    if out is None or not loaded.has_external_data:
        yield
        return
    fd, name = tempfile.mkstemp(prefix=".onnx-obs-", dir=Path(out).parent)
    try:
        with os.fdopen(fd, "wb") as f:
            src = os.path.realpath(loaded.base_dir or ".")
            root = os.path.commonpath([src, os.path.dirname(os.path.realpath(name))])
            for m in (loaded.model, *others):
                _rebase(m, src, root)
            loaded.base_dir = root
            loaded.spill_file, loaded.spill_location = f, os.path.relpath(os.path.realpath(name), root)
            yield
    finally:
        loaded.spill_file = None
        Path(name).unlink(missing_ok=True)


def _rebase(model: onnx.ModelProto, src: str, root: str) -> None:
    for t in iter_tensors(model.graph):
        if _is_external(t):
            for e in t.external_data:
                if e.key == "location":
                    e.value = os.path.relpath(os.path.join(src, e.value), root)


def save_model(model: onnx.ModelProto, out: str | os.PathLike, base_dir: str = "",
               external: bool | None = None) -> int:
    """Write atomically (temp files, then rename) and return the bytes written.

    With external data (automatic when the input had it or the model exceeds 2 GB), large tensors
    are streamed one at a time into `<out>.data`, so memory stays near one tensor.
    """
    out = Path(out)
    if external is None:
        external = bool(_external_files(model)) or model.ByteSize() >= _TWO_GB
    data_name = out.name + ".data"
    tmp_files: list[Path] = []
    try:
        if external:
            fd, tmp_data = tempfile.mkstemp(prefix=".onnx-obs-", dir=out.parent)
            tmp_files.append(Path(tmp_data))
            os.fchmod(fd, _new_file_mode())
            with os.fdopen(fd, "wb") as f:
                _stream_external(model, f, data_name, base_dir)
                f.flush()
                os.fsync(f.fileno())
        fd, tmp_model = tempfile.mkstemp(prefix=".onnx-obs-", dir=out.parent)
        tmp_files.append(Path(tmp_model))
        os.fchmod(fd, _new_file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(model.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        if external:
            os.replace(tmp_files[0], out.parent / data_name)
        os.replace(tmp_files[-1], out)
    except BaseException as e:
        for t in tmp_files:
            t.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OnnxObsError(f"could not write {out}: {e.strerror or e}") from e
        raise
    size = out.stat().st_size
    if external:
        size += (out.parent / data_name).stat().st_size
    return size


def _new_file_mode() -> int:
    """The mode a plain open() gives a new file (0666 less the umask); mkstemp's 0600 is not."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _stream_external(model: onnx.ModelProto, f, data_name: str, base_dir: str) -> None:
    """Copy each large tensor's bytes into the open data file and point the tensor at it."""
    for t in iter_tensors(model.graph):
        if _is_external(t):
            info = {e.key: e.value for e in t.external_data}
            with open(os.path.join(base_dir, info["location"]), "rb") as src:
                src.seek(int(info.get("offset", 0)))
                payload = src.read(int(info["length"])) if "length" in info else src.read()
        elif t.HasField("raw_data") and len(t.raw_data) >= _EXTERNAL_MIN_BYTES:
            payload = t.raw_data
        else:
            continue
        _point_external(t, data_name, _append_aligned(f, payload), len(payload))


def _append_aligned(f: BinaryIO, payload: bytes) -> int:
    """Write payload at the next 4096-byte boundary of f (aligned offsets let runtimes memory-map
    tensors) and return its offset."""
    pad = -f.tell() % 4096
    f.write(b"\0" * pad)
    f.write(payload)
    return f.tell() - len(payload)


def _point_external(t: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    t.ClearField("raw_data")
    del t.external_data[:]
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
