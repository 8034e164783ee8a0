"""Quantized weights written as ONNX: integer initializers and a DequantizeLinear ("QDQ" format).

A quantized site keeps its name: a DequantizeLinear node now produces it from int8 / uint8 /
int4 / uint4 codes, a scale and (asymmetric grids) a zero point, so every consumer (the original
Gemm / MatMul / Conv / ConvTranspose, through any Transpose or Cast) reads the same float weight
it read before. Scales run along the stored tensor's output-channel axis (per channel) or, with
column groups, in blocks of `block` input channels along its input-channel axis (blocked
DequantizeLinear, opset 21). Codes, scales and zero points come in as the site's 2-D view
(rows = output units, columns = inputs) and go back through `Site.from_matrix`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_obs.graph.protos import attrs
from onnx_obs.graph.sites import Site

_CODE_TYPES = {(8, True): onnx.TensorProto.INT8, (8, False): onnx.TensorProto.UINT8,
               (4, True): onnx.TensorProto.INT4, (4, False): onnx.TensorProto.UINT4}
SCALE_DTYPES = {"float32": np.float32, "float16": np.float16}
OPSET_PER_AXIS, OPSET_HALF_SCALES, OPSET_INT4_OR_BLOCKED = 13, 19, 21


@dataclass
class QuantizedWeight:
    """A site's weights on a grid, in its 2-D view: value = (codes - zero) * scale."""

    codes: np.ndarray    # (rows, cols) integers
    scale: np.ndarray    # (rows, n_groups), the dtype it is stored in
    zero: np.ndarray     # (rows, n_groups) integers
    groups: np.ndarray   # (cols,) group of every column
    bits: int
    signed: bool         # int8/int4 codes (symmetric grid) or uint8/uint4
    block: int | None    # input channels per group, None: one group per row


def unsupported(site: Site) -> str | None:
    """Why the site's weights cannot be written as QDQ, or None."""
    if site.scope:
        return "inside a subgraph: not quantized"
    if site.dtype not in SCALE_DTYPES:
        return f"{site.dtype} weights: DequantizeLinear outputs float32 or float16 here"
    if site.layout == "convT" and site.groups > 1:
        return "grouped ConvTranspose: its output channels span two axes, no per-channel scale"
    if site.graph_input:
        return "also a graph input: a quantized weight can no longer be overridden"
    return None


def site_block(site: Site, group_size: int) -> int | None:
    """Input channels per scale for the site: group_size, or None (one scale per output channel)
    where the site has fewer input channels than that (a block would hold fewer weights)."""
    channels = site.shape[site.channel_axis("in")]
    return None if group_size == -1 or channels < group_size else group_size


def column_groups(site: Site, block: int | None) -> np.ndarray:
    """Group index of every column of the site's 2-D view for blocks of `block` input channels
    (None: one group). Columns are (input channel, kernel position) pairs, channel-major; a
    group holds `block` consecutive channels at one kernel position."""
    cols = site.matrix_shape[1]
    if block is None:
        return np.zeros(cols, dtype=np.int64)
    positions = site.spec.taps(site.op_shape)
    col = np.arange(cols)
    return (col // positions) // block * positions + col % positions


def needed_opset(site: Site, bits: int, block: int | None) -> int:
    if bits == 4 or block is not None:
        return OPSET_INT4_OR_BLOCKED
    return OPSET_HALF_SCALES if site.dtype == "float16" else OPSET_PER_AXIS


def write_qdq(model: onnx.ModelProto, site: Site, q: QuantizedWeight, store, zero_point: bool = False) -> None:
    """Replace the site's float tensor by codes + scale (+ zero point) and a DequantizeLinear
    producing the same name. store(tensor, raw_bytes) stores a new tensor's data (LoadedModel.store).
    zero_point: write int codes' zero point (0) too; onnxruntime fuses Gemm into QGemm only then."""
    graph = model.graph
    name = site.tensor_name if site.storage == "initializer" else site.name  # what consumers read
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    row_axis, col_axis = site.channel_axis("out"), site.channel_axis("in")
    code_type = _CODE_TYPES[(q.bits, q.signed)]
    stored = site.from_matrix(q.codes)
    inputs = [add_initializer(graph, store, free_name(f"{name}_quantized", taken), code_type, stored)]
    if q.block is None:
        attrs = {"axis": row_axis}
        scale, zero = q.scale[:, 0], q.zero[:, 0]
    else:  # per element, back in the stored layout, then one entry per block along col_axis
        attrs = {"axis": col_axis, "block_size": q.block}
        take = slice(None, None, q.block)
        scale = np.moveaxis(np.moveaxis(site.from_matrix(q.scale[:, q.groups]), col_axis, 0)[take], 0, col_axis)
        zero = np.moveaxis(np.moveaxis(site.from_matrix(q.zero[:, q.groups]), col_axis, 0)[take], 0, col_axis)
    scale_type = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(q.scale.dtype))
    inputs.append(add_initializer(graph, store, free_name(f"{name}_scale", taken), scale_type, scale))
    if not q.signed or zero_point:  # int codes have zero point 0, DequantizeLinear's default
        inputs.append(add_initializer(graph, store, free_name(f"{name}_zero_point", taken), code_type, zero))
    node = onnx.helper.make_node("DequantizeLinear", inputs, [name],
                                 name=free_name(f"{name}_DequantizeLinear", taken), **attrs)
    if site.storage == "initializer":
        index = [t.name for t in graph.initializer].index(site.tensor_name)
        del graph.initializer[index]
        graph.node.insert(0, node)
    else:  # a Constant node: DequantizeLinear takes its place
        index = [n.output[0] if n.output else "" for n in graph.node].index(name)
        graph.node.insert(index, node)
        del graph.node[index + 1]


def quantized_zeros(model: onnx.ModelProto, base_dir: str = "") -> tuple[int, int]:
    """(zeros, weights) over the quantized weights of a written model: codes equal to their zero
    point in each DequantizeLinear reading an initializer, and in each MatMulNBits' packed codes
    (4 bits; zero point 8 unless given). Activation pairs (a tensor input) are not weights."""
    inits = {t.name: t for t in model.graph.initializer}

    def value(name: str) -> np.ndarray:
        return numpy_helper.to_array(inits[name], base_dir).astype(np.int64)

    zeros = total = 0
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            codes = value(node.input[0])
            zero = value(node.input[2]) if len(node.input) > 2 and node.input[2] in inits else np.zeros((), np.int64)
            zeros += int(np.count_nonzero(codes == _spread(zero, codes.shape, node)))
            total += codes.size
        elif node.op_type == "MatMulNBits" and node.input[1] in inits:
            a = attrs(node)
            n, k, block = a["N"], a["K"], a["block_size"]
            codes = _unpack(value(node.input[1]).reshape(n, -1))[:, :k]
            zero = np.full((n, 1), 8, np.int64)
            if len(node.input) > 3 and node.input[3] in inits:
                zero = np.repeat(_unpack(value(node.input[3]).reshape(n, -1)), block, axis=1)[:, :k]
            zeros += int(np.count_nonzero(codes == zero))
            total += codes.size
    return zeros, total


def _spread(zero: np.ndarray, shape: tuple[int, ...], node: onnx.NodeProto) -> np.ndarray:
    """A DequantizeLinear zero point broadcast to the codes' shape (scalar, per axis or blocked)."""
    if zero.ndim == 0:
        return zero
    a = attrs(node)
    axis = a.get("axis", 1) % len(shape)
    if zero.ndim == 1:
        return zero.reshape([-1 if i == axis else 1 for i in range(len(shape))])
    return np.take(np.repeat(zero, a["block_size"], axis=axis), np.arange(shape[axis]), axis=axis)


def _unpack(packed: np.ndarray) -> np.ndarray:
    """Bytes holding two 4-bit values each (first in the low nibble) along the last axis."""
    return np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(packed.shape[0], -1)


def add_initializer(graph: onnx.GraphProto, store, name: str, data_type: int, values: np.ndarray) -> str:
    t = graph.initializer.add()
    t.name, t.data_type = name, data_type
    t.dims.extend(values.shape)
    if data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        nibbles = (np.ascontiguousarray(values).reshape(-1).astype(np.int64) & 0xF).astype(np.uint8)
        if nibbles.size % 2:
            nibbles = np.append(nibbles, np.uint8(0))
        raw = (nibbles[0::2] | (nibbles[1::2] << 4)).tobytes()  # first element in the low nibble
    else:
        raw = np.ascontiguousarray(values).astype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).tobytes()
    store(t, raw)
    return name


def free_name(name: str, taken: set[str]) -> str:
    candidate, k = name, 1
    while candidate in taken:
        candidate, k = f"{name}_{k}", k + 1
    taken.add(candidate)
    return candidate
