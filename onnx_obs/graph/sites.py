"""Prunable sites: weight tensors of the linear ops (graph/ops.py) and their 2-D views.

A site is one stored tensor (an initializer or a Constant node's value, in the main graph or in a
subgraph) that reaches the weight operand of one or more linear ops, possibly through Identity,
Cast or Transpose nodes. Its 2-D view has rows = output units and columns = the inputs that the
layer-wise Hessian ranges over. `Site.to_matrix` / `Site.from_matrix` convert exactly both ways.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_obs.graph.model_io import set_raw
from onnx_obs.graph.ops import OPS, OpSpec
from onnx_obs.graph.protos import FLOAT_TYPES, attrs, constant_value

PASS_THROUGH = ("Identity", "Cast", "Transpose")
SHAPE_READERS = ("Shape", "Size")   # read a tensor's shape only: pruning its values is no change
RESHAPERS = ("Unsqueeze", "Squeeze", "Reshape", "Flatten")  # followed only to a recurrent op
RECURRENT_OPS = ("LSTM", "GRU", "RNN")
QUANTIZED_OPS = {
    "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QLinearGemm",
    "DequantizeLinear", "QuantizeLinear", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
    "MatMulNBits", "QGemm",
}
# Ops whose constant inputs are weights that no site rule covers: listed as skipped.
NO_RULE_OPS = {"LSTM", "GRU", "RNN", "Attention", "MultiHeadAttention", "Einsum", "Gather",
               "EmbedLayerNormalization", "GroupQueryAttention", "DeformConv"}


@dataclass
class Use:
    """One linear node that consumes the site as its weight.

    `samples` says how the activation tensor becomes input vectors: "rows" (last axis is the
    input axis), "cols" (second-to-last axis is), "conv" or "convtranspose" (unfolded patches).
    """

    node: str
    op_type: str
    activation: str
    output: str
    samples: str
    attrs: dict = field(default_factory=dict)
    in_subgraph: bool = False


@dataclass
class Site:
    name: str                 # unique key: tensor name, prefixed by the subgraph path if nested
    tensor_name: str
    storage: str              # "initializer" or "constant"
    scope: str                # "" for the main graph, else the subgraph path
    shape: tuple[int, ...]    # ONNX shape of the stored tensor
    dtype: str
    perm: tuple[int, ...] | None  # stored tensor -> op view, composed Transposes
    layout: str               # "rows_cols", "cols_rows", "conv", "convT" (graph/ops.py)
    groups: int
    uses: list[Use]
    tensor: onnx.TensorProto = field(repr=False)
    graph_input: bool = False  # also listed as a graph input (a caller may override it)

    @property
    def op_type(self) -> str:
        return self.uses[0].op_type

    @property
    def op_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[p] for p in self.perm) if self.perm else self.shape

    @property
    def spec(self) -> OpSpec:
        return OPS[self.op_type]

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return self.spec.matrix_shape(self.op_shape, self.layout, self.groups)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def captureable(self) -> bool:
        return not any(u.in_subgraph for u in self.uses)

    def to_matrix(self, array: np.ndarray) -> np.ndarray:
        w = array.transpose(self.perm) if self.perm else array
        return self.spec.to_matrix(w, self.layout, self.groups)

    def from_matrix(self, matrix: np.ndarray) -> np.ndarray:
        w = self.spec.from_matrix(matrix, self.op_shape, self.layout, self.groups)
        if self.perm:
            w = w.transpose(np.argsort(self.perm))
        return np.ascontiguousarray(w)

    def row_groups(self) -> list[slice]:
        """Row ranges that share one Hessian (one per convolution group)."""
        rows, g = self.matrix_shape[0], self.groups
        return [slice(i * rows // g, (i + 1) * rows // g) for i in range(g)]

    def channel_axis(self, which: str) -> int:
        """Axis of the stored tensor that holds the output units ("out") or the inputs ("in")."""
        axis = self.spec.channel_axes(self.layout)[0 if which == "out" else 1]
        return self.perm[axis] if self.perm else axis


@dataclass
class Skipped:
    name: str
    op_type: str
    reason: str


@dataclass
class _Const:
    key: str
    tensor: onnx.TensorProto
    storage: str
    scope: str
    perm: tuple[int, ...] | None = None
    reshaped: bool = False   # seen through a RESHAPER: counts only as a recurrent op's weight


def node_label(node: onnx.NodeProto, index: int, scope: str) -> str:
    name = node.name or f"{node.op_type}_{index}"
    return f"{scope}/{name}" if scope else name


def _compose(outer: tuple[int, ...] | None, inner: list[int]) -> tuple[int, ...]:
    return tuple(outer[k] for k in inner) if outer else tuple(inner)


class _WeightNames:
    """The constants a linear op may read as its weight: not those seen through a RESHAPER."""

    def __init__(self, visible: dict):
        self.visible = visible

    def __contains__(self, name: str) -> bool:
        c = self.visible.get(name)
        return c is not None and not c.reshaped


def find_sites(model: onnx.ModelProto) -> tuple[list[Site], list[Skipped]]:
    """Every prunable weight of the model, plus the constant tensors left alone and why."""
    graph_inputs = {i.name for i in model.graph.input}
    uses: dict[str, list] = {}        # const key -> [(use or None, reason or None, const view)]
    const_of: dict[str, _Const] = {}

    def walk(graph: onnx.GraphProto, scope: str, visible: dict[str, _Const]):
        visible = dict(visible)
        for i in graph.input:  # a subgraph input may shadow an outer constant of the same name
            visible.pop(i.name, None)
        for init in graph.initializer:
            key = f"{scope}/{init.name}" if scope else init.name
            c = _Const(key, init, "initializer", scope)
            visible[init.name] = const_of[key] = c
        for idx, node in enumerate(graph.node):
            label = node_label(node, idx, scope)
            node_attrs = attrs(node)
            value = constant_value(node)
            if value is not None:
                key = f"{scope}/{node.output[0]}" if scope else node.output[0]
                visible[node.output[0]] = const_of[key] = _Const(key, value, "constant", scope)
                continue
            if node.op_type in PASS_THROUGH and len(node.input) == 1 and node.input[0] in visible:
                src = visible[node.input[0]]
                perm = src.perm
                if node.op_type == "Transpose":
                    rank = len(src.tensor.dims)
                    perm = _compose(src.perm, node_attrs.get("perm", list(range(rank))[::-1]))
                visible[node.output[0]] = _Const(src.key, src.tensor, src.storage, src.scope, perm,
                                                 src.reshaped)
                continue
            if node.op_type in RESHAPERS and node.input and node.input[0] in visible:
                # exporters put LSTM/GRU/RNN weights behind an Unsqueeze: follow them so that
                # they are listed as skipped; any other use is not a weight use, as before
                src = visible[node.input[0]]
                uses.setdefault(src.key, []).append((None, None, None))
                visible[node.output[0]] = _Const(src.key, src.tensor, src.storage, src.scope,
                                                 None, True)
                continue
            spec = OPS.get(node.op_type)
            role = spec.role(node, _WeightNames(visible), node_attrs) if spec else None
            for pos, name in enumerate(node.input):
                if name not in visible:
                    continue
                c = visible[name]
                if c.reshaped:
                    if node.op_type in RECURRENT_OPS and c.tensor.data_type in FLOAT_TYPES:
                        uses.setdefault(c.key, []).append(
                            (None, (node.op_type, _no_rule_reason(node.op_type)), None))
                    continue
                if role and pos == role.weight:
                    use = Use(label, node.op_type, node.input[role.activation], node.output[0],
                              role.samples, node_attrs, in_subgraph=bool(scope))
                    uses.setdefault(c.key, []).append((use, role.layout, c.perm))
                elif node.op_type in QUANTIZED_OPS:
                    uses.setdefault(c.key, []).append(
                        (None, (node.op_type, "quantized op " + node.op_type), None))
                elif node.op_type in NO_RULE_OPS and c.tensor.data_type in FLOAT_TYPES:
                    # float weights only: integer inputs (Gather indices, sequence lengths) are not
                    uses.setdefault(c.key, []).append(
                        (None, (node.op_type, _no_rule_reason(node.op_type)), None))
                elif node.op_type in SHAPE_READERS:
                    continue   # reads the shape, not the values (a zero bias sized from it)
                elif not (spec and pos == spec.bias):  # a bias is not a weight
                    uses.setdefault(c.key, []).append((None, None, None))
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g, f"{label}.{a.name}", visible)

    walk(model.graph, "", {})

    sites, skipped = [], []
    for key, entries in uses.items():
        c = const_of[key]
        weight_uses = [e for e in entries if e[0] is not None]
        blockers = [e[1] for e in entries if e[0] is None and e[1]]
        other = [e for e in entries if e[0] is None and not e[1]]
        if not weight_uses and not blockers:
            continue
        op = weight_uses[0][0].op_type if weight_uses else blockers[0][0]
        reason = _skip_reason(c.tensor, weight_uses, [b[1] for b in blockers], other)
        if reason:
            skipped.append(Skipped(key, op, reason))
            continue
        use0, layout, perm = weight_uses[0]
        groups = OPS[use0.op_type].groups(use0.attrs)
        sites.append(Site(
            name=key, tensor_name=c.tensor.name or key.rsplit("/", 1)[-1], storage=c.storage,
            scope=c.scope, shape=tuple(c.tensor.dims),
            dtype=onnx.helper.tensor_dtype_to_np_dtype(c.tensor.data_type).name,
            perm=perm, layout=layout, groups=groups, uses=[u for u, _, _ in weight_uses],
            tensor=c.tensor, graph_input=not c.scope and c.tensor.name in graph_inputs,
        ))
    return sites, skipped


def _no_rule_reason(op_type: str) -> str:
    if op_type in RECURRENT_OPS:
        return (f"recurrent {op_type} weights (W, R) are not pruned: layer-wise OBS has no "
                "Hessian for them yet")
    if op_type == "Gather":
        return "read by Gather as a lookup table (an embedding): not pruned"
    return f"{op_type} weights are not pruned (no 2-D view for them)"


def _skip_reason(tensor, weight_uses, blockers, other) -> str | None:
    if blockers:
        return blockers[0]
    if tensor.data_type not in FLOAT_TYPES:
        return "integer weights (quantized)"
    if other:
        return "also used outside a linear op's weight input"
    layouts = {(layout, perm, OPS[u.op_type].groups(u.attrs)) for u, layout, perm in weight_uses}
    if len(layouts) > 1:
        return "shared by nodes that read it in different layouts"
    return OPS[weight_uses[0][0].op_type].rank_problem(len(tensor.dims))


def read_array(site: Site, base_dir: str = "") -> np.ndarray:
    return numpy_helper.to_array(site.tensor, base_dir)


def site_matrix(site: Site, base_dir: str = "") -> np.ndarray:
    """The site's 2-D view in float64."""
    return site.to_matrix(read_array(site, base_dir)).astype(np.float64)


def write_matrix(site: Site, matrix: np.ndarray, store=set_raw) -> None:
    """Store a 2-D matrix back into the site's tensor, in its own dtype, through
    `store(tensor, raw_bytes)` (default: inline; `LoadedModel.store` may spill it to disk)."""
    array = site.from_matrix(matrix).astype(site.dtype if site.dtype != "bfloat16" else _bf16())
    store(site.tensor, numpy_helper.from_array(array, site.tensor.name).raw_data)


def _bf16():
    import ml_dtypes

    return ml_dtypes.bfloat16
