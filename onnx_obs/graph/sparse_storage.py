"""Compact storage of pruned weights as ONNX sparse initializers, and back.

A sparse initializer (GraphProto.sparse_initializer) stores the non-zero values and their int64
linear indices into the flattened dense tensor, in ascending order (the ONNX spec's 1-D index
form). It is smaller than the dense tensor only when nnz * (itemsize + 8) < size * itemsize: for
float32 below one third density, i.e. above 2/3 sparsity.

onnxruntime accepts sparse initializers and turns them back into dense tensors when it loads the
model, so the file is smaller but memory and speed at run time are those of the dense model.
onnx's shape inference does not read sparse initializers' shapes, so a model holding them passes
onnx.checker only without full_check.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

MODES = ("dense", "sparse", "auto")
_INDEX_BYTES = 8


@dataclass
class StorageChoice:
    name: str
    dense_bytes: int
    sparse_bytes: int
    stored: str       # "sparse" or "dense"


def sparse_bytes(nnz: int, itemsize: int) -> int:
    return nnz * (itemsize + _INDEX_BYTES)


def store_sparse(model: onnx.ModelProto, names: list[str], mode: str,
                 base_dir: str = "") -> list[StorageChoice]:
    """Move the named main-graph initializers that hold zeros to sparse_initializer.

    mode "sparse": every named tensor with at least one zero; "auto": only where the sparse form
    is smaller than the dense one; "dense": nothing. Returns what was decided per tensor.
    """
    if mode == "dense":
        return []
    graph = model.graph
    inputs = {i.name for i in graph.input}
    index = {t.name: k for k, t in enumerate(graph.initializer)}
    choices, moved = [], []
    for name in names:
        if name not in index or name in inputs:
            continue
        t = graph.initializer[index[name]]
        dense = numpy_helper.to_array(t, base_dir)
        flat = np.flatnonzero(dense)
        dense_bytes = dense.size * dense.itemsize
        small = sparse_bytes(flat.size, dense.itemsize)
        if flat.size == dense.size or (mode == "auto" and small >= dense_bytes):
            choices.append(StorageChoice(name, dense_bytes, small, "dense"))
            continue
        values = numpy_helper.from_array(dense.ravel()[flat], name)
        indices = numpy_helper.from_array(flat.astype(np.int64), name + "_indices")
        graph.sparse_initializer.append(onnx.helper.make_sparse_tensor(values, indices, dense.shape))
        moved.append(index[name])
        choices.append(StorageChoice(name, dense_bytes, small, "sparse"))
    for k in sorted(moved, reverse=True):
        del graph.initializer[k]
    return choices


def densify(graph: onnx.GraphProto, base_dir: str = "") -> int:
    """Turn every sparse initializer (of the graph and its subgraphs) into a dense initializer;
    return how many were converted. Accepts both index forms of the spec: [nnz] linear indices
    and [nnz, rank] coordinates."""
    count = 0
    for sp in graph.sparse_initializer:
        values = numpy_helper.to_array(sp.values, base_dir)
        idx = numpy_helper.to_array(sp.indices, base_dir).astype(np.int64)
        dims = tuple(int(d) for d in sp.dims)
        dense = np.zeros(int(np.prod(dims, dtype=np.int64)), dtype=values.dtype)
        if idx.ndim == 2:
            idx = np.ravel_multi_index(tuple(idx.T), dims) if idx.size else idx.reshape(-1)
        dense[idx] = values
        graph.initializer.append(numpy_helper.from_array(dense.reshape(dims), sp.values.name))
        count += 1
    del graph.sparse_initializer[:]
    for node in graph.node:
        for a in node.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                count += densify(g, base_dir)
    return count
