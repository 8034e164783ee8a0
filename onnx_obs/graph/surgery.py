"""Shape surgery for structured pruning: remove units from a model in place (their entries of every
cut tensor, the channel counts they change) and read or write a consumer's bias."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_obs.errors import OnnxObsError
from onnx_obs.graph.ops import OPS
from onnx_obs.graph.protos import constants, infer_shapes, unique_name
from onnx_obs.graph.units import BiasSlot, UnitGroup


def shrink(model: onnx.ModelProto, group: UnitGroup, removed, base_dir: str = "") -> None:
    """Delete the removed units' entries from every cut tensor, apply the edits, refresh shapes."""
    removed = [int(u) for u in removed]
    if not removed:
        return
    consts = constants(model.graph)
    for cut in group.cuts:
        pos = np.concatenate([cut.positions[u] for u in removed])
        array = numpy_helper.to_array(consts[cut.tensor], base_dir)
        _store(consts[cut.tensor], np.delete(array, pos, axis=cut.axis))
    splits: dict[int, dict[int, int]] = {}
    for e in group.edits:
        value = e.base - sum(len(e.positions[u]) for u in removed)
        node = model.graph.node[e.node]
        if e.kind == "reshape":
            shape = numpy_helper.to_array(consts[e.tensor]).copy()
            shape.reshape(-1)[e.index] = value
            _store(consts[e.tensor], shape)
        elif e.kind == "group":
            _set_int_attr(node, "group", value)
        else:
            splits.setdefault(e.node, {})[e.index] = value
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    for ni, sizes in splits.items():
        _write_split(model, model.graph.node[ni], [sizes[k] for k in sorted(sizes)], consts, opset)
    refresh_shapes(model)


def refresh_shapes(model: onnx.ModelProto) -> None:
    """Drop stale intermediate shapes and check the graph with strict shape inference (the
    inferred shapes are kept only if the file declared intermediate shapes to begin with)."""
    had = len(model.graph.value_info) > 0
    del model.graph.value_info[:]
    try:
        inferred = infer_shapes(model, strict=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as e:
        raise OnnxObsError(f"removing units left inconsistent shapes ({str(e).splitlines()[0]}): "
                           "nothing written; please report this") from e
    if had:
        model.graph.value_info.extend(inferred.graph.value_info)


def _store(tensor: onnx.TensorProto, array: np.ndarray) -> None:
    """Replace a tensor's contents in place (its name, dtype and location kind stay)."""
    tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), tensor.name))


def _set_int_attr(node: onnx.NodeProto, name: str, value) -> None:
    for a in node.attribute:
        if a.name == name:
            node.attribute.remove(a)
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))


def _write_split(model, node, sizes: list[int], consts, opset: int) -> None:
    if opset < 13:
        _set_int_attr(node, "split", sizes)
        return
    array = np.array(sizes, dtype=np.int64)
    if len(node.input) > 1 and node.input[1]:
        _store(consts[node.input[1]], array)
    else:
        name = unique_name(model, (node.name or node.output[0]) + "_split")
        model.graph.initializer.append(numpy_helper.from_array(array, name))
        while len(node.input) < 2:
            node.input.append("")
        node.input[1] = name
    for a in list(node.attribute):
        if a.name == "num_outputs":
            node.attribute.remove(a)


# ---------------------------------------------------------------- consumer biases

def read_bias(model: onnx.ModelProto, slot: BiasSlot, base_dir: str = "") -> np.ndarray:
    """The consumer's bias in 2-D view units, one value per unit (zeros if it has none)."""
    rows = int(np.prod(slot.shape))
    if slot.tensor is None:
        return np.zeros(rows)
    array = numpy_helper.to_array(constants(model.graph)[slot.tensor], base_dir).astype(np.float64)
    return slot.scale * np.broadcast_to(array.ravel(), (rows,)).copy()


def write_bias(model: onnx.ModelProto, slot: BiasSlot, values: np.ndarray) -> None:
    """Store a per-unit bias (2-D view units) into the consumer, adding the input if absent, in
    the type the consumer computes in (an fp16 weight behind a Cast to float computes in float)."""
    array = (np.asarray(values, dtype=np.float64) / slot.scale).reshape(slot.shape)
    consts = constants(model.graph)
    if slot.tensor is not None:
        t = consts[slot.tensor]
        _store(t, array.astype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)))
        return
    node = model.graph.node[slot.node]
    spec = OPS[node.op_type]
    dtype = _weight_type(model, node.input[spec.weight], consts)
    array = array.astype(onnx.helper.tensor_dtype_to_np_dtype(dtype))
    name = unique_name(model, (node.name or node.output[0]) + "_bias")
    model.graph.initializer.append(numpy_helper.from_array(array, name))
    while len(node.input) <= spec.bias:
        node.input.append("")
    node.input[spec.bias] = name
    slot.tensor = name


def _weight_type(model: onnx.ModelProto, name: str, consts: dict) -> int:
    """The element type a node reads its weight input `name` in: the stored tensor's, or the
    target of a Cast on the way (Identity and Transpose keep it)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    while name not in consts and name in producer:
        p = producer[name]
        if p.op_type == "Cast":
            return next(a.i for a in p.attribute if a.name == "to")
        name = p.input[0]
    return consts[name].data_type if name in consts else onnx.TensorProto.FLOAT
