"""`inspect`: the prunable sites of a model, their shapes and sparsity, and the tensors left alone."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from onnx_obs.config import Selection
from onnx_obs.graph.model_io import iter_tensors, load_any
from onnx_obs.graph.protos import FLOAT_TYPES
from onnx_obs.graph.sites import Skipped, find_sites, read_array


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


@dataclass
class Inspection:
    model: str                # the path, or "<proto>"
    opset: dict[str, int]     # by domain ("ai.onnx" for the default one)
    sites: list[SiteInfo]     # the selected sites
    skipped: list[Skipped]
    model_params: int         # every floating-point weight, prunable or not
    file_size: int

    @property
    def site_params(self) -> int:
        return sum(s.params for s in self.sites)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "opset": self.opset,
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
    for s in sites:
        if not selection.picks(s):
            continue
        w = read_array(s, loaded.base_dir)  # as stored: no float64 copy
        rows.append(SiteInfo(
            name=s.name, op=s.op_type, nodes=[u.node for u in s.uses], onnx_shape=list(s.shape),
            matrix_shape=list(s.matrix_shape), params=s.size, sparsity=float(np.mean(w == 0)),
            dtype=s.dtype, location=s.storage + (f" in {s.scope}" if s.scope else ""),
            graph_input=s.graph_input))
    return Inspection(
        model=str(loaded.path) if loaded.path else "<proto>",
        opset={o.domain or "ai.onnx": o.version for o in loaded.model.opset_import},
        sites=rows, skipped=skipped, model_params=float_params(loaded.model),
        file_size=loaded.file_size)


def float_params(model) -> int:
    """All floating-point weights of the model, prunable or not."""
    return sum(int(np.prod(t.dims, dtype=np.int64)) for t in iter_tensors(model.graph)
               if t.data_type in FLOAT_TYPES)
