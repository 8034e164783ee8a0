"""Model cost: parameters and multiply-accumulates counted from the graph, onnxruntime latency.

Parameters: elements of every float initializer and Constant (sparse initializers at their dense
size), and how many of them are non-zero. MACs: one per multiply-add of the linear ops
(graph/ops.py: Conv, ConvTranspose, Gemm, MatMul), from the shapes onnx shape inference gives with
every symbolic dimension (the batch) set to 1. Elementwise ops, pooling and normalisation are not
counted. Counts are dense: a zero in a dense tensor still costs its MAC, which is why structured
removal is what makes a model faster.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from onnx_obs.graph.ops import OPS
from onnx_obs.graph.protos import FLOAT_TYPES, attrs
from onnx_obs.graph.shape_fold import tensor_shapes
from onnx_obs.graph.sites import node_label


def _float_tensors(graph: onnx.GraphProto):
    """(name, TensorProto or SparseTensorProto) of the float weights of a graph and subgraphs."""
    for t in graph.initializer:
        if t.data_type in FLOAT_TYPES:
            yield t.name, t
    for s in graph.sparse_initializer:
        if s.values.data_type in FLOAT_TYPES:
            yield s.values.name, s
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type in FLOAT_TYPES and node.output:
                yield node.output[0], a.t
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                yield from _float_tensors(g)


def count_params(model: onnx.ModelProto, base_dir: str = "") -> dict:
    """{"params": float weight elements, "nonzero_params": those that are not zero}."""
    total = nonzero = 0
    for _, t in _float_tensors(model.graph):
        if isinstance(t, onnx.SparseTensorProto):
            total += int(np.prod(t.dims, dtype=np.int64))
            nonzero += int(np.count_nonzero(numpy_helper.to_array(t.values, base_dir)))
        else:
            total += int(np.prod(t.dims, dtype=np.int64))
            nonzero += int(np.count_nonzero(numpy_helper.to_array(t, base_dir)))
    return {"params": total, "nonzero_params": nonzero}


def count_macs(model: onnx.ModelProto) -> tuple[int, dict[str, int]]:
    """Total MACs at batch 1 and the MACs of each linear node (by node label)."""
    dims = _batch1_shapes(model)
    per_node = {}
    for i, node in enumerate(model.graph.node):
        if node.op_type not in OPS:
            continue
        macs = _node_macs(node, dims)
        if macs is not None:
            per_node[node_label(node, i, "")] = macs
    return sum(per_node.values()), per_node


def _node_macs(node: onnx.NodeProto, dims: dict) -> int | None:
    shapes = [dims.get(n) for n in node.input[:2]]
    out = dims.get(node.output[0])
    if any(s is None for s in shapes) or out is None:
        return None
    return OPS[node.op_type].macs(attrs(node), *shapes, out)


def _batch1_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Static dims of every tensor with symbolic input dims set to 1 (tensors whose shape stays
    unknown are left out)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.value_info[:]
    for vi in m.graph.input:
        for d in vi.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.dim_value = 1
    # Reshape targets computed from Shape (attention's view(b, t, heads, head_dim)) are folded
    # so that what follows them gets shapes too; custom ops: count what can be counted.
    out = {name: dims for name, dims in tensor_shapes(m).items()
           if all(isinstance(d, int) for d in dims)}
    for name, t in _float_tensors(m.graph):
        out.setdefault(name, list(t.dims))
    return out


def resource_model(model: onnx.ModelProto, groups, kind: str,
                   orders: list[np.ndarray] | None = None) -> Callable[[np.ndarray], float]:
    """Parameters ("params") or MACs ("macs") of the model as a function of how many units each
    of `groups` (onnx_obs.graph.units.UnitGroup) loses: every cut tensor shrinks by the
    unit's positions along its axis, and a linear node's MACs scale with its weight's size
    (a MatMul of two computed tensors, as attention's QK^T, with the heads it carries).
    With `orders` (per group, the units in the order they go) the positions are counted exactly
    (units of a group may own unequal numbers of positions, as in a C2f block); else on average."""
    cut_axes: dict[str, dict[int, list[tuple[int, np.ndarray]]]] = {}
    # A MatMul of computed tensors the units ride through (attention heads): its MACs are
    # proportional to the positions left on that axis.
    batched: dict[int, list[tuple[int, np.ndarray]]] = {}
    for g, group in enumerate(groups):
        order = orders[g] if orders is not None else None
        for cut in group.cuts:
            cut_axes.setdefault(cut.tensor, {}).setdefault(cut.axis, []).append(
                (g, _removed(cut.positions, order)))
        for ni, (_, positions) in group.batched.items():
            batched.setdefault(ni, []).append((g, _removed(positions, order)))
    tensors = dict(_float_tensors(model.graph))
    scaled = []   # (MACs, size of the axis, its groups)
    if kind == "params":
        weights = {name: 1.0 for name in tensors}
        fixed = 0.0
    else:
        _, per_node = count_macs(model)
        weights, fixed = {}, 0.0
        for i, node in enumerate(model.graph.node):
            macs = per_node.get(node_label(node, i, ""), 0)
            spec = OPS.get(node.op_type)
            w = node.input[spec.weight] if spec and len(node.input) > spec.weight else ""
            if w in tensors and macs:
                size = int(np.prod(tensors[w].dims, dtype=np.int64))
                weights[w] = weights.get(w, 0.0) + macs / size
            elif i in batched and macs:
                scaled.append((macs, float(groups[batched[i][0][0]].batched[i][0]), batched[i]))
            else:
                fixed += macs
    terms = [(coef, [int(d) for d in tensors[name].dims], cut_axes.get(name, {}))
             for name, coef in weights.items()]

    def resource(counts: np.ndarray) -> float:
        total = fixed
        for macs, size, axes in scaled:
            left = size - sum(cum[min(int(counts[g]), len(cum) - 1)] for g, cum in axes)
            total += macs * max(left, 0.0) / size
        for coef, dims, axes in terms:
            size = coef
            for axis, d in enumerate(dims):
                size *= max(d - sum(cum[min(int(counts[g]), len(cum) - 1)]
                                    for g, cum in axes.get(axis, ())), 0.0)
            total += size
        return total

    return resource


def _removed(positions: list[np.ndarray], order: np.ndarray | None) -> np.ndarray:
    """Positions gone after each count of removed units (0, 1, ...): exactly in `order`, or on
    average without one."""
    sizes = np.array([len(p) for p in positions], dtype=np.float64)
    sizes = sizes[order] if order is not None else np.full(len(sizes), sizes.mean())
    return np.concatenate([[0.0], np.cumsum(sizes)])


# ---------------------------------------------------------------- latency

def latency_ms(session: ort.InferenceSession, feeds: dict[str, np.ndarray], *,
               max_runs: int = 200, budget_s: float = 1.0) -> float:
    """Median wall time of session.run over repeated runs (after 5 warm-up runs), in ms."""
    for _ in range(5):
        session.run(None, feeds)
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < max_runs and (len(times) < 10 or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return 1000.0 * float(np.median(times))


def batch_feeds(batches: list[dict[str, np.ndarray]], size: int) -> dict[str, np.ndarray]:
    """The first `size` samples of the calibration data (repeated if there are fewer), from the
    batches shaped like the first (runs of other sequence lengths are left out)."""
    names = list(batches[0])
    alike = [b for b in batches if all(b[k].shape[1:] == batches[0][k].shape[1:] for k in names)]
    data = {k: np.concatenate([b[k] for b in alike]) for k in names}
    n = len(next(iter(data.values())))
    idx = np.arange(size) % n
    return {k: v[idx] for k, v in data.items()}
