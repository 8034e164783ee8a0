"""The node emitter that gradient rules share (grad_rules.py): the forward graph's types, shapes
and constants, fresh names, and the few composite emissions (ReduceSum/Unsqueeze across the opset-13
switch of axes from attributes to inputs, undoing broadcasting) every rule needs.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_obs.errors import OnnxObsError

Dim = int | str | None  # static size, symbolic name, or unknown
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}


class UnsupportedGradient(OnnxObsError):
    """A node on the differentiated path has no gradient rule (or one its attributes defeat)."""

    def __init__(self, op_type: str, node_name: str, reason: str = "no gradient rule for this operator"):
        self.op_type, self.node_name, self.reason = op_type, node_name, reason
        super().__init__(
            f"cannot differentiate {op_type} node '{node_name}': {reason}; "
            "use finite differences (onnx_obs.graph.perturb) instead"
        )


def inferred_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto.Tensor]:
    """Tensor types of the main graph after shape inference, initializers included."""
    graph = onnx.shape_inference.infer_shapes(model, data_prop=True).graph
    types = {t.name: helper.make_tensor_type_proto(t.data_type, t.dims).tensor_type for t in graph.initializer}
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type
    return types


def node_attrs(node: onnx.NodeProto) -> dict:
    """A node's attributes as Python values (strings decoded)."""
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def subgraph_names(node: onnx.NodeProto) -> set[str]:
    """Every tensor name a node's subgraphs (If/Loop/Scan bodies) read, at any depth."""
    names: set[str] = set()
    for a in node.attribute:
        for g in [a.g] if a.HasField("g") else list(a.graphs):
            for n in g.node:
                names.update(n.input)
                names |= subgraph_names(n)
    return names


def _constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and len(n.attribute) == 1:
            a = n.attribute[0]
            if a.name == "value":
                values[n.output[0]] = numpy_helper.to_array(a.t)
            elif a.name in ("value_int", "value_ints"):
                values[n.output[0]] = np.array(helper.get_attribute_value(a), dtype=np.int64)
            elif a.name in ("value_float", "value_floats"):
                values[n.output[0]] = np.array(helper.get_attribute_value(a), dtype=np.float32)
    return values


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {vi.name for vi in [*graph.input, *graph.output, *graph.value_info]}
    names |= {t.name for t in graph.initializer}
    for n in graph.node:
        names.update(n.input)
        names.update(n.output)
        for a in n.attribute:
            for g in [a.g] if a.HasField("g") else list(a.graphs):
                names |= _all_names(g)
    return names


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise OnnxObsError("the model imports no default-domain (ai.onnx) opset; it is not a standard ONNX model")


class GradBuilder:
    """Emits gradient nodes into a list, knowing the forward graph's types and opset."""

    def __init__(self, model: onnx.ModelProto):
        self.opset = default_opset(model)
        self.types = inferred_types(model)
        self.consts = _constant_values(model.graph)
        self.nodes: list[onnx.NodeProto] = []
        self.used = _all_names(model.graph)
        self.current: onnx.NodeProto | None = None  # the forward node whose rule is running

    # --- forward-graph facts --------------------------------------------------------------
    def fail(self, reason: str) -> UnsupportedGradient:
        node = self.current
        return UnsupportedGradient(node.op_type, node.name or node.output[0], reason)

    def dtype(self, name: str) -> int:
        t = self.types.get(name)
        if t is None or not t.elem_type:
            raise self.fail(f"shape inference gave no type for '{name}'")
        return t.elem_type

    def np_dtype(self, name: str) -> np.dtype:
        return np.dtype(helper.tensor_dtype_to_np_dtype(self.dtype(name)))

    def is_float(self, name: str) -> bool:
        """Could the tensor carry a gradient? Unknown types count as yes, so no path is dropped."""
        t = self.types.get(name)
        return t is None or not t.elem_type or t.elem_type in FLOAT_TYPES

    def dims(self, name: str) -> list[Dim]:
        t = self.types.get(name)
        if t is None or not t.HasField("shape"):
            raise self.fail(f"shape inference gave no rank for '{name}'")
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]

    def static(self, dims: Sequence[Dim], what: str) -> list[int]:
        if not all(isinstance(d, int) for d in dims):
            raise self.fail(f"{what} must be static, got {list(dims)}")
        return list(dims)

    def const_value(self, name: str) -> np.ndarray | None:
        return self.consts.get(name)

    # --- emission ------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        name, k = hint, 0
        while name in self.used:
            k += 1
            name = f"{hint}_{k}"
        self.used.add(name)
        return name

    def prefix(self) -> str:
        node = self.current
        return f"{node.name or node.output[0]}__grad" if node is not None else "grad"

    def node(self, op: str, inputs: Iterable[str], n_out: int = 1, **attrs) -> str | list[str]:
        outs = [self.fresh(f"{self.prefix()}/{op}") for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=outs[0], **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value: np.ndarray) -> str:
        # A Constant node, not an initializer: IR < 4 would require initializers among the inputs.
        return self.node("Constant", [], value=numpy_helper.from_array(np.asarray(value)))

    def ints(self, values: Sequence[int]) -> str:
        return self.const(np.array(values, dtype=np.int64))

    def scalar(self, value: float, like: str) -> str:
        """A 0-d constant with the element type of tensor `like`."""
        return self.const(np.array(value, dtype=self.np_dtype(like)))

    def reduce_sum(self, x: str, axes: Sequence[int], keepdims: int) -> str:
        if self.opset >= 13:
            return self.node("ReduceSum", [x, self.ints(axes)], keepdims=keepdims)
        return self.node("ReduceSum", [x], axes=list(axes), keepdims=keepdims)

    def unsqueeze(self, x: str, axes: Sequence[int]) -> str:
        if self.opset >= 13:
            return self.node("Unsqueeze", [x, self.ints(axes)])
        return self.node("Unsqueeze", [x], axes=list(axes))

    def filled_like(self, x: str, value: float, like: str | None = None) -> str:
        """A tensor of x's runtime shape and the element type of `like` (default x), filled with `value`."""
        fill = numpy_helper.from_array(np.array([value], dtype=self.np_dtype(like or x)))
        return self.node("ConstantOfShape", [self.node("Shape", [x])], value=fill)

    def masked(self, cond: str, g: str, like: str) -> str:
        """g where cond holds, zero elsewhere."""
        return self.node("Where", [cond, g, self.scalar(0.0, like)])

    def sum_to(self, g: str, target: str, g_dims: list[Dim]) -> str:
        """Undo broadcasting: sum g (shaped g_dims) down to the shape of tensor `target`."""
        t_dims = self.dims(target)
        lead = len(g_dims) - len(t_dims)
        if lead:
            g = self.reduce_sum(g, range(lead), keepdims=0)
        axes, ambiguous = [], False
        for i, (td, gd) in enumerate(zip(t_dims, g_dims[lead:])):
            if td == 1 and gd != 1:
                axes.append(i)
            elif not isinstance(td, int) and td != gd:
                ambiguous = True  # td may be 1 at runtime while gd is not
        if ambiguous:
            return self._sum_to_runtime(g, target)
        return self.reduce_sum(g, axes, keepdims=1) if axes else g

    def _sum_to_runtime(self, g: str, target: str) -> str:
        # Reduce the axes where the target is 1 and g is not, found at runtime.
        if self.opset < 13:
            raise self.fail(
                f"broadcast of '{target}' is not known statically and opset < 13 cannot reduce dynamic axes"
            )
        one = self.ints([1])
        t_is_one = self.node("Equal", [self.node("Shape", [target]), one])
        g_not_one = self.node("Not", [self.node("Equal", [self.node("Shape", [g]), one])])
        where = self.node("NonZero", [self.node("And", [t_is_one, g_not_one])])
        axes = self.node("Reshape", [where, self.ints([-1])])
        return self.node("ReduceSum", [g, axes], keepdims=1, noop_with_empty_axes=1)
