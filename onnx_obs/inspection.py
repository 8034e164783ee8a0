"""`inspect`: the prunable sites of a model, their shapes and sparsity, and the tensors left alone."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from onnx_obs.config import Selection
from onnx_obs.graph.model_io import iter_tensors, load_any
from onnx_obs.graph.protos import FLOAT_TYPES
from onnx_obs.graph.sites import Skipped, find_sites, read_array
from onnx_obs.safeguards import site_flags


@dataclass
class SiteInfo:
    """One prunable weight as stored."""
    name: str
    op: str
    nodes: list[str]
    onnx_shape: list[int]
    matrix_shape: list[int]
    params: int
    sparsity: float
    dtype: str
    location: str      # "initializer" or "constant", with " in SUBGRAPH" inside one
    graph_input: bool  # also a graph input: a caller may override it
    flags: list[str] = field(default_factory=list)  # safeguards.site_flags


@dataclass
class Port:
    """A graph input or output as declared: dims are ints, names (dim_param) or None."""
    name: str
    dtype: str
    shape: list[int | str | None] | None   # None: rank unknown

    def describe(self) -> str:
        dims = "?" if self.shape is None else ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.dtype}[{dims}]"


@dataclass
class Inspection:
    model: str                # the path, or "<proto>"
    opset: dict[str, int]     # by domain ("ai.onnx" for the default one)
    sites: list[SiteInfo]     # the selected sites
    skipped: list[Skipped]
    model_params: int         # every floating-point weight, prunable or not
    file_size: int
    inputs: list[Port] = field(default_factory=list)    # what a caller feeds (no initializers)
    outputs: list[Port] = field(default_factory=list)

    @property
    def site_params(self) -> int:
        return sum(s.params for s in self.sites)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "opset": self.opset,
            "inputs": [asdict(p) for p in self.inputs],
            "outputs": [asdict(p) for p in self.outputs],
            "sites": [asdict(s) for s in self.sites],
            "skipped": [asdict(k) for k in self.skipped],
            "totals": {"sites": len(self.sites), "site_params": self.site_params,
                       "model_params": self.model_params, "file_size": self.file_size},
        }


def inspect(model, selection: Selection | None = None) -> Inspection:
    """Sites, their shapes and sparsity, and the tensors left alone."""
    loaded = load_any(model)
    sites, skipped = find_sites(loaded.model)
    selection = selection or Selection()
    rows = []
    picked = [s for s in sites if selection.picks(s)]
    for s in picked:
        w = read_array(s, loaded.base_dir)  # as stored: no float64 copy
        rows.append(SiteInfo(
            name=s.name, op=s.op_type, nodes=[u.node for u in s.uses], onnx_shape=list(s.shape),
            matrix_shape=list(s.matrix_shape), params=s.size, sparsity=float(np.mean(w == 0)),
            dtype=s.dtype, location=s.storage + (f" in {s.scope}" if s.scope else ""),
            graph_input=s.graph_input,
            flags=site_flags(s, picked, loaded.model, selection, loaded.base_dir)))
    inits = {i.name for i in loaded.model.graph.initializer}
    return Inspection(
        model=str(loaded.path) if loaded.path else "<proto>",
        opset={o.domain or "ai.onnx": o.version for o in loaded.model.opset_import},
        sites=rows, skipped=skipped, model_params=float_params(loaded.model),
        file_size=loaded.file_size,
        inputs=[_port(v) for v in loaded.model.graph.input if v.name not in inits],
        outputs=[_port(v) for v in loaded.model.graph.output])


def _port(v: onnx.ValueInfoProto) -> Port:
    t = v.type.tensor_type
    if not v.type.HasField("tensor_type"):
        return Port(v.name, v.type.WhichOneof("value") or "unknown", None)
    dtype = onnx.TensorProto.DataType.Name(t.elem_type).lower() if t.elem_type else "unknown"
    dtype = {"float": "float32", "double": "float64"}.get(dtype, dtype)
    shape = None
    if t.HasField("shape"):
        shape = [d.dim_value if d.HasField("dim_value") else d.dim_param or None for d in t.shape.dim]
    return Port(v.name, dtype, shape)


def float_params(model) -> int:
    """All floating-point weights of the model, prunable or not."""
    return sum(int(np.prod(t.dims, dtype=np.int64)) for t in iter_tensors(model.graph)
               if t.data_type in FLOAT_TYPES)
