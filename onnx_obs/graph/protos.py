"""Helpers over onnx protos shared by the graph code: node attributes, a graph's constants and
readers, float element types, shape inference, fresh names."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

FLOAT_TYPES = {
    onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
}
# The float types numpy holds without ml_dtypes.
NUMPY_FLOAT_TYPES = FLOAT_TYPES - {onnx.TensorProto.BFLOAT16}


def attrs(node: onnx.NodeProto) -> dict:
    """A node's attributes by name, as Python values."""
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def constant_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The tensor a Constant node holds in its `value` attribute (None for anything else)."""
    if node.op_type != "Constant" or not node.output:
        return None
    return next((a.t for a in node.attribute if a.name == "value"), None)


def constants(graph: onnx.GraphProto, *, nodes: bool = True,
              ints: bool = False) -> dict[str, onnx.TensorProto]:
    """Name -> tensor of a graph's constants: its initializers, with `nodes` the values of its
    Constant nodes, with `ints` also the Constant nodes that hold value_int / value_ints (the
    dynamo exporter writes shape constants so) as int64 tensors, read-only copies."""
    table = {t.name: t for t in graph.initializer}
    for node in graph.node if nodes else ():
        value = constant_value(node)
        if value is not None:
            table[node.output[0]] = value
        elif ints and node.op_type == "Constant" and node.output:
            for a in node.attribute:
                if a.name in ("value_int", "value_ints"):
                    number = a.i if a.name == "value_int" else list(a.ints)
                    table[node.output[0]] = numpy_helper.from_array(np.array(number, np.int64))
    return table


def readers(graph: onnx.GraphProto) -> dict[str, list[tuple[int, int]]]:
    """Where the graph's own nodes read each tensor: (node index, input position) per read."""
    out: dict[str, list[tuple[int, int]]] = {}
    for i, node in enumerate(graph.node):
        for pos, name in enumerate(node.input):
            if name:
                out.setdefault(name, []).append((i, pos))
    return out


def infer_shapes(model: onnx.ModelProto, *, strict: bool = False) -> onnx.ModelProto:
    """The model with inferred intermediate shapes. strict: raise onnx's InferenceError or
    ValidationError on an inconsistent graph; else best effort: the model itself when inference
    fails (custom ops, inconsistent declarations)."""
    if strict:
        return onnx.shape_inference.infer_shapes(model, strict_mode=True)
    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - any failure of inference means: no inferred shapes
        return model


def unique_name(model: onnx.ModelProto, base: str) -> str:
    """`base`, or `base_1`, `base_2`, ... if the main graph already has a tensor of that name."""
    taken = {i.name for i in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
    taken |= {i.name for i in model.graph.input}
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name
