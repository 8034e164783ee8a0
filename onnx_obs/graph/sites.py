"""Prunable sites: weight tensors of Gemm / MatMul / Conv / ConvTranspose and their 2-D views.

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

LINEAR_OPS = ("Gemm", "MatMul", "Conv", "ConvTranspose")
PASS_THROUGH = ("Identity", "Cast", "Transpose")
SHAPE_READERS = ("Shape", "Size")   # read a tensor's shape only: pruning its values is no change
RESHAPERS = ("Unsqueeze", "Squeeze", "Reshape", "Flatten")  # followed only to a recurrent op
RECURRENT_OPS = ("LSTM", "GRU", "RNN")
QUANTIZED_OPS = {
    "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QLinearGemm",
    "DequantizeLinear", "QuantizeLinear", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
    "MatMulNBits", "QGemm",
}
FLOAT_TYPES = {
    onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
}
# Ops whose constant inputs are weights that no site rule covers: listed as skipped.
NO_RULE_OPS = {"LSTM", "GRU", "RNN", "Attention", "MultiHeadAttention", "Einsum", "Gather",
               "EmbedLayerNormalization", "GroupQueryAttention", "DeformConv"}


@dataclass
class Use:
    """One linear node that consumes the site as its weight.

    `samples` says how the activation tensor becomes input vectors: "rows" (last axis is the
    input axis), "cols" (second-to-last axis is), "conv" or "convT" (unfolded patches).
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
    layout: str               # "rows_cols", "cols_rows", "conv", "convT"
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
    def matrix_shape(self) -> tuple[int, int]:
        s = self.op_shape
        if self.layout == "rows_cols":
            return s[0], s[1]
        if self.layout == "cols_rows":
            return s[1], s[0]
        k = int(np.prod(s[2:], dtype=np.int64))
        if self.layout == "conv":
            return s[0], s[1] * k
        return s[1] * self.groups, s[0] // self.groups * k  # convT: (C_in, C_out/g, *k)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def captureable(self) -> bool:
        return not any(u.in_subgraph for u in self.uses)

    def to_matrix(self, array: np.ndarray) -> np.ndarray:
        w = array.transpose(self.perm) if self.perm else array
        if self.layout == "rows_cols":
            return w
        if self.layout == "cols_rows":
            return w.T
        if self.layout == "conv":
            return w.reshape(w.shape[0], -1)
        g = self.groups
        cin, cout_g = w.shape[0], w.shape[1]
        w = w.reshape(g, cin // g, cout_g, -1).transpose(0, 2, 1, 3)
        return w.reshape(g * cout_g, -1)

    def from_matrix(self, matrix: np.ndarray) -> np.ndarray:
        s = self.op_shape
        if self.layout == "rows_cols":
            w = matrix
        elif self.layout == "cols_rows":
            w = matrix.T
        elif self.layout == "conv":
            w = matrix.reshape(s)
        else:
            g = self.groups
            cin, cout_g = s[0], s[1]
            w = matrix.reshape(g, cout_g, cin // g, -1).transpose(0, 2, 1, 3).reshape(s)
        if self.perm:
            w = w.transpose(np.argsort(self.perm))
        return np.ascontiguousarray(w)

    def row_groups(self) -> list[slice]:
        """Row ranges that share one Hessian (one per convolution group)."""
        rows = self.matrix_shape[0]
        g = self.groups if self.layout in ("conv", "convT") else 1
        return [slice(i * rows // g, (i + 1) * rows // g) for i in range(g)]


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


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def node_label(node: onnx.NodeProto, index: int, scope: str) -> str:
    name = node.name or f"{node.op_type}_{index}"
    return f"{scope}/{name}" if scope else name


def _compose(outer: tuple[int, ...] | None, inner: list[int]) -> tuple[int, ...]:
    return tuple(outer[k] for k in inner) if outer else tuple(inner)


def _linear_role(node, consts, attrs):
    """(weight input index, layout, samples kind, activation index) or None if not a weight use."""
    ins = list(node.input)
    # a constant seen through a RESHAPER is neither a weight nor a constant activation here
    is_const = [i < len(ins) and ins[i] in consts and not consts[ins[i]].reshaped for i in range(2)]
    if node.op_type in ("Conv", "ConvTranspose"):
        if is_const[1] and not is_const[0]:
            return 1, "conv" if node.op_type == "Conv" else "convT", node.op_type.lower(), 0
        return None
    if node.op_type == "MatMul":
        if is_const[1] and not is_const[0]:
            return 1, "cols_rows", "rows", 0
        if is_const[0] and not is_const[1]:
            return 0, "rows_cols", "cols", 1
        return None
    ta, tb = attrs.get("transA", 0), attrs.get("transB", 0)
    if is_const[1] and not is_const[0]:  # Gemm: Y = A' B', weight B'
        return 1, "rows_cols" if tb else "cols_rows", "cols" if ta else "rows", 0
    if is_const[0] and not is_const[1]:  # weight A' on the left, samples are columns of B'
        return 0, "cols_rows" if ta else "rows_cols", "rows" if tb else "cols", 1
    return None


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
            attrs = _attrs(node)
            if node.op_type == "Constant" and "value" in attrs and node.output:
                key = f"{scope}/{node.output[0]}" if scope else node.output[0]
                c = _Const(key, node.attribute[[a.name for a in node.attribute].index("value")].t,
                           "constant", scope)
                visible[node.output[0]] = const_of[key] = c
                continue
            if node.op_type in PASS_THROUGH and len(node.input) == 1 and node.input[0] in visible:
                src = visible[node.input[0]]
                perm = src.perm
                if node.op_type == "Transpose":
                    rank = len(src.tensor.dims)
                    perm = _compose(src.perm, attrs.get("perm", list(range(rank))[::-1]))
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
            role = _linear_role(node, visible, attrs) if node.op_type in LINEAR_OPS else None
            for pos, name in enumerate(node.input):
                if name not in visible:
                    continue
                c = visible[name]
                if c.reshaped:
                    if node.op_type in RECURRENT_OPS and c.tensor.data_type in FLOAT_TYPES:
                        uses.setdefault(c.key, []).append(
                            (None, (node.op_type, _no_rule_reason(node.op_type)), None))
                    continue
                if role and pos == role[0]:
                    use = Use(label, node.op_type, node.input[role[3]], node.output[0], role[2],
                              attrs, in_subgraph=bool(scope))
                    uses.setdefault(c.key, []).append((use, role[1], c.perm))
                elif node.op_type in QUANTIZED_OPS:
                    uses.setdefault(c.key, []).append(
                        (None, (node.op_type, "quantized op " + node.op_type), None))
                elif node.op_type in NO_RULE_OPS and c.tensor.data_type in FLOAT_TYPES:
                    # float weights only: integer inputs (Gather indices, sequence lengths) are not
                    uses.setdefault(c.key, []).append(
                        (None, (node.op_type, _no_rule_reason(node.op_type)), None))
                elif node.op_type in SHAPE_READERS:
                    continue   # reads the shape, not the values (a zero bias sized from it)
                elif not (node.op_type in LINEAR_OPS and pos == 2):  # a bias is not a weight
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
        groups = int(use0.attrs.get("group", 1)) if layout in ("conv", "convT") else 1
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
    layouts = {(layout, perm, u.attrs.get("group", 1)) for u, layout, perm in weight_uses}
    if len(layouts) > 1:
        return "shared by nodes that read it in different layouts"
    layout = weight_uses[0][1]
    rank = len(tensor.dims)
    if layout in ("rows_cols", "cols_rows") and rank != 2:
        return f"rank-{rank} MatMul weight (only 2-D weights are sites)"
    if layout in ("conv", "convT") and rank < 3:
        return f"rank-{rank} convolution weight"
    return None


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
