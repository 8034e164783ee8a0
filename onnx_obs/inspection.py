"""`inspect`: the prunable sites of a model, their shapes and sparsity, and the tensors left alone."""

from __future__ import annotations

import numpy as np

from onnx_obs.config import Selection
from onnx_obs.graph.model_io import iter_tensors, load_any
from onnx_obs.graph.sites import FLOAT_TYPES, find_sites, read_array


def inspect(model, selection: Selection | None = None) -> dict:
    """Sites, their shapes and sparsity, and the tensors left alone."""
    loaded = load_any(model)
    sites, skipped = find_sites(loaded.model)
    selection = selection or Selection()
    rows = []
    for s in sites:
        if not selection.picks(s):
            continue
        w = read_array(s, loaded.base_dir)  # as stored: no float64 copy
        rows.append({
            "name": s.name, "op": s.op_type, "nodes": [u.node for u in s.uses],
            "onnx_shape": list(s.shape), "matrix_shape": list(s.matrix_shape), "params": s.size,
            "sparsity": float(np.mean(w == 0)), "dtype": s.dtype,
            "location": s.storage + (f" in {s.scope}" if s.scope else ""),
            "graph_input": s.graph_input,
        })
    return {
        "model": str(loaded.path) if loaded.path else "<proto>",
        "opset": {o.domain or "ai.onnx": o.version for o in loaded.model.opset_import},
        "sites": rows,
        "skipped": [vars(k) for k in skipped],
        "totals": {"sites": len(rows), "site_params": sum(r["params"] for r in rows),
                   "model_params": float_params(loaded.model),
                   "file_size": loaded.file_size},
    }


def float_params(model) -> int:
    """All floating-point weights of the model, prunable or not."""
    return sum(int(np.prod(t.dims, dtype=np.int64)) for t in iter_tensors(model.graph)
               if t.data_type in FLOAT_TYPES)
