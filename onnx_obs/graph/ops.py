"""What onnx-obs knows of each linear op type, in one registry: `OPS[op_type]`.

A linear node reads a weight W (a constant operand) and an activation x. Per op type the registry
says which operand is the weight and how the node reads it (`role`), the weight's 2-D view
[rows = output units, cols = inputs] and back, which weight axes hold the output units and the
inputs (for removing whole units), where its bias is (`find_bias`), its multiply-accumulates and,
for a convolution, its geometry. A new linear op type is one more entry of OPS.

Words used with the registry across the package:
  layout, of a weight's 2-D view: "rows_cols" (the node reads W as [rows, cols]), "cols_rows"
    ([cols, rows]), "conv" ([C_out, C_in/group, *kernel]), "convT" ([C_in, C_out/group, *kernel]);
  samples, how the activation becomes input vectors: "rows" (its last axis is the input axis),
    "cols" (its second-to-last axis is), "conv" / "convtranspose" (unfolded patches);
  units, where the output units lie in the node's output: "rows" (last axis), "cols"
    (second-to-last axis), "channels" (axis 1).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import onnx


@dataclass(frozen=True)
class Role:
    """How a node reads its weight: operand positions, the weight's layout, the samples kind."""

    weight: int
    activation: int
    layout: str
    samples: str


@dataclass(frozen=True)
class BiasSource:
    """Where a linear node's bias is: `name` is an input of node `node` (the linear node itself,
    or with `added` the Add after it); None: the node has no bias input yet."""

    node: int
    name: str | None
    added: bool = False


@dataclass
class ConvGeometry:
    """What an unfold needs from a Conv / ConvTranspose node, as plain numbers."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...] | None   # begins then ends; None with auto_pad
    auto_pad: str = "NOTSET"
    groups: int = 1
    output_padding: tuple[int, ...] = ()
    output_shape: tuple[int, ...] = ()

    @classmethod
    def from_attrs(cls, attrs: dict, kernel: tuple[int, ...]) -> ConvGeometry:
        r = len(kernel)
        ap = attrs.get("auto_pad", "NOTSET")
        ap = ap.decode() if isinstance(ap, bytes) else ap
        return cls(
            kernel=tuple(attrs.get("kernel_shape", kernel)),
            strides=tuple(attrs.get("strides", [1] * r)),
            dilations=tuple(attrs.get("dilations", [1] * r)),
            pads=tuple(attrs["pads"]) if "pads" in attrs and ap in ("NOTSET", "") else None,
            auto_pad=ap or "NOTSET",
            groups=int(attrs.get("group", 1)),
            output_padding=tuple(attrs.get("output_padding", [0] * r)),
            output_shape=tuple(attrs.get("output_shape", ())),
        )


class OpSpec(ABC):
    """The facts of one linear op type. `op_shape` is the weight's shape as the node reads it;
    `layout` and `groups` are a site's (from `role` and `groups`)."""

    op_type: str
    weight = 1            # the input the weight usually takes
    bias: int | None      # the input of the node's own bias; None: an Add after it holds one
    bias_broadcasts: bool  # the bias broadcasts against the output (else: one per channel)

    @abstractmethod
    def role(self, node: onnx.NodeProto, consts, attrs: dict) -> Role | None:
        """How `node` reads a weight among `consts` (names of constants), None if it reads none."""

    def groups(self, attrs: dict) -> int:
        return 1

    def scales(self, attrs: dict) -> tuple[float, float]:
        """(alpha, beta): the node computes alpha * (W-product) + beta * bias."""
        return 1.0, 1.0

    @abstractmethod
    def units(self, node: onnx.NodeProto, activation: str) -> str:
        """Where the output units lie in the node's output (see the module docstring)."""

    @abstractmethod
    def matrix_shape(self, op_shape: tuple, layout: str, groups: int) -> tuple[int, int]:
        """(rows, cols) of the 2-D view."""

    @abstractmethod
    def to_matrix(self, w: np.ndarray, layout: str, groups: int) -> np.ndarray:
        """The 2-D view of a weight array as the node reads it."""

    @abstractmethod
    def from_matrix(self, matrix: np.ndarray, op_shape: tuple, layout: str, groups: int) -> np.ndarray:
        """The weight array (as the node reads it) of a 2-D view: to_matrix undone."""

    @abstractmethod
    def channel_axes(self, layout: str) -> tuple[int, int]:
        """(output-unit axis, input axis) of the weight as the node reads it."""

    def taps(self, op_shape: tuple) -> int:
        """Columns of the 2-D view per input channel."""
        return 1

    @abstractmethod
    def rank_problem(self, rank: int) -> str | None:
        """Why a weight of this rank is no site, None if it can be one."""

    @abstractmethod
    def macs(self, attrs: dict, x: list[int], w: list[int], out: list[int]) -> int:
        """Multiply-accumulates from the static shapes of inputs 0 and 1 and of the output."""

    def geometry(self, attrs: dict, op_shape: tuple) -> ConvGeometry | None:
        return None

    def own_bias(self, node: onnx.NodeProto) -> str | None:
        """The node's own bias input, if it has one."""
        b = self.bias
        return node.input[b] if b is not None and len(node.input) > b and node.input[b] else None


def _constant_operands(node: onnx.NodeProto, consts) -> list[bool]:
    return [i < len(node.input) and node.input[i] in consts for i in range(2)]


class MatrixProduct(OpSpec):
    """Y = A' B' (A' = A or its transpose with `transposes`, scaled by alpha and plus beta C with
    `scaled`): either operand may be the weight."""

    bias_broadcasts = True

    def __init__(self, op_type: str, bias: int | None, transposes: bool = False, scaled: bool = False):
        self.op_type, self.bias, self.transposes, self.scaled = op_type, bias, transposes, scaled

    def role(self, node, consts, attrs):
        const = _constant_operands(node, consts)
        ta, tb = (attrs.get("transA", 0), attrs.get("transB", 0)) if self.transposes else (0, 0)
        if const[1] and not const[0]:   # weight B' on the right: samples are rows of A'
            return Role(1, 0, "rows_cols" if tb else "cols_rows", "cols" if ta else "rows")
        if const[0] and not const[1]:   # weight A' on the left: samples are columns of B'
            return Role(0, 1, "cols_rows" if ta else "rows_cols", "rows" if tb else "cols")
        return None

    def scales(self, attrs):
        if not self.scaled:
            return 1.0, 1.0
        return float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))

    def units(self, node, activation):
        return "rows" if node.input[0] == activation else "cols"

    def matrix_shape(self, op_shape, layout, groups):
        return (op_shape[0], op_shape[1]) if layout == "rows_cols" else (op_shape[1], op_shape[0])

    def to_matrix(self, w, layout, groups):
        return w if layout == "rows_cols" else w.T

    def from_matrix(self, matrix, op_shape, layout, groups):
        return matrix if layout == "rows_cols" else matrix.T

    def channel_axes(self, layout):
        return (0, 1) if layout == "rows_cols" else (1, 0)

    def rank_problem(self, rank):
        return None if rank == 2 else f"rank-{rank} MatMul weight (only 2-D weights are sites)"

    def macs(self, attrs, x, w, out):
        # every output element is a dot product over the shared axis of A'
        trans_a = attrs.get("transA", 0) if self.transposes else 0
        return int(np.prod(out) * (x[0] if trans_a else x[-1]))


class Convolution(OpSpec):
    """Conv ([C_out, C_in/g, *kernel] weight) or, `transposed`, ConvTranspose ([C_in, C_out/g,
    *kernel]); the 2-D view has one row per output channel and (input channel, tap) columns,
    block-diagonal over the groups."""

    bias = 2
    bias_broadcasts = False

    def __init__(self, op_type: str, transposed: bool):
        self.op_type, self.transposed = op_type, transposed

    def role(self, node, consts, attrs):
        const = _constant_operands(node, consts)
        if const[1] and not const[0]:
            return Role(1, 0, "convT" if self.transposed else "conv", self.op_type.lower())
        return None

    def groups(self, attrs):
        return int(attrs.get("group", 1))

    def units(self, node, activation):
        return "channels"

    def matrix_shape(self, op_shape, layout, groups):
        k = self.taps(op_shape)
        if not self.transposed:
            return op_shape[0], op_shape[1] * k
        return op_shape[1] * groups, op_shape[0] // groups * k

    def to_matrix(self, w, layout, groups):
        if not self.transposed:
            return w.reshape(w.shape[0], -1)
        cin, cout_g = w.shape[0], w.shape[1]   # rows: (group, C_out/g); columns: (C_in/g, taps)
        w = w.reshape(groups, cin // groups, cout_g, -1).transpose(0, 2, 1, 3)
        return w.reshape(groups * cout_g, -1)

    def from_matrix(self, matrix, op_shape, layout, groups):
        if not self.transposed:
            return matrix.reshape(op_shape)
        cin, cout_g = op_shape[0], op_shape[1]
        w = matrix.reshape(groups, cout_g, cin // groups, -1).transpose(0, 2, 1, 3)
        return w.reshape(op_shape)

    def channel_axes(self, layout):
        return (1, 0) if self.transposed else (0, 1)

    def taps(self, op_shape):
        return int(np.prod(op_shape[2:], dtype=np.int64))

    def rank_problem(self, rank):
        return f"rank-{rank} convolution weight" if rank < 3 else None

    def macs(self, attrs, x, w, out):
        # every weight element meets every output position (Conv) or input position (ConvTranspose)
        positions = x[:1] + x[2:] if self.transposed else out[:1] + out[2:]
        return int(np.prod(positions) * np.prod(w))

    def geometry(self, attrs, op_shape):
        return ConvGeometry.from_attrs(attrs, op_shape[2:])


OPS: dict[str, OpSpec] = {spec.op_type: spec for spec in (
    MatrixProduct("Gemm", bias=2, transposes=True, scaled=True),
    MatrixProduct("MatMul", bias=None),
    Convolution("Conv", transposed=False),
    Convolution("ConvTranspose", transposed=True),
)}


def find_bias(nodes, index: int, readers: dict[str, list[tuple[int, int]]]) -> BiasSource | None:
    """Where the bias of linear node `nodes[index]` is: its own bias input (a Gemm's C, a Conv's
    B), or for an op without one (MatMul) the other operand of the one Add that reads its output,
    as exporters write a bias; None when there is none. `readers`: see protos.readers."""
    node = nodes[index]
    spec = OPS[node.op_type]
    if spec.bias is not None:
        return BiasSource(index, spec.own_bias(node))
    after = readers.get(node.output[0], [])
    if len(after) != 1 or nodes[after[0][0]].op_type != "Add":
        return None
    add, pos = after[0]
    return BiasSource(add, nodes[add].input[1 - pos], added=True)


def unit_axis(units: str, rank: int) -> int:
    """The axis of a node output of this rank that holds its units (see the module docstring)."""
    return {"rows": rank - 1, "cols": rank - 2, "channels": 1}[units]


def input_axis(samples: str, rank: int) -> int:
    """The axis of an activation of this rank that the weight contracts."""
    return {"rows": rank - 1, "cols": max(rank - 2, 0)}.get(samples, 1)
