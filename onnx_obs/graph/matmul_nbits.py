"""4-bit weights written as onnxruntime's com.microsoft MatMulNBits, the format of its fast CPU
kernels: Y = A W with W (K x N) stored transposed, N rows of ceil(K / block_size) blocks of 4-bit
codes q in [0, 15], two per byte (the lower index in the low nibble), and per block a scale and a
zero point z (default 8): w = (q - z) * scale. A MatMul whose right operand is the site, or a
Gemm computing A W (+ a 1-D bias), becomes one MatMulNBits node; other uses stay QDQ
(graph/quant_format.py)."""

from __future__ import annotations

import numpy as np
import onnx

from onnx_obs.graph.quant_format import QuantizedWeight, add_initializer, free_name
from onnx_obs.graph.sites import Site

DOMAIN = "com.microsoft"


def block_for(site: Site, block: int | None) -> int:
    """MatMulNBits needs a power-of-two block of at least 16: one block per row (per channel) is
    a block covering all K inputs."""
    if block is not None:
        return block
    return max(16, 1 << (site.matrix_shape[1] - 1).bit_length())


def unsupported(model: onnx.ModelProto, site: Site, bits: int, block: int | None) -> str | None:
    """Why the site cannot be written as MatMulNBits, or None."""
    if bits != 4:
        return "MatMulNBits is written for 4 bits here"
    if site.perm or site.scope or site.storage != "initializer" or site.dtype not in ("float32", "float16"):
        return "not a float32/float16 initializer of the main graph read as it is stored"
    if block_for(site, block) < 16 or block_for(site, block) & (block_for(site, block) - 1):
        return "MatMulNBits needs a power-of-two --group-size of at least 16"
    inits = {t.name: t for t in model.graph.initializer}
    for u in site.uses:
        if u.op_type == "MatMul" and u.samples == "rows":
            continue
        a = u.attrs
        if u.op_type != "Gemm" or a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or u.samples != "rows":
            return f"{u.op_type} {u.node} is not a plain A W product"
        node = _node(model, u.output)
        if len(node.input) > 2 and node.input[2]:
            bias = inits.get(node.input[2])
            if bias is None or list(bias.dims) != [site.matrix_shape[0]] or a.get("beta", 1.0) != 1.0:
                return f"Gemm {u.node} adds a bias that is not a constant vector of N"
    return None


def write_matmul_nbits(model: onnx.ModelProto, site: Site, q: QuantizedWeight, store) -> None:
    """Replace every use of the site by a MatMulNBits node reading its packed codes."""
    graph = model.graph
    n, k = q.codes.shape
    block = block_for(site, q.block)
    n_blocks = -(-k // block)
    codes = q.codes + (8 if q.signed else 0)  # unsigned 4-bit; signed grids use the default zero 8
    padded = np.zeros((n, n_blocks * block), dtype=np.uint8)
    padded[:, :k] = codes
    taken = {t.name for t in graph.initializer} | {o for node in graph.node for o in node.output}
    name = site.tensor_name
    packed = _pack(padded).reshape(n, n_blocks, block // 2)
    inputs = [add_initializer(graph, store, free_name(f"{name}_nbits", taken), onnx.TensorProto.UINT8, packed)]
    scale_type = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(q.scale.dtype))
    # one scale (and zero point) per block: the column groups are the blocks (one when per channel)
    inputs.append(add_initializer(graph, store, free_name(f"{name}_scales", taken), scale_type, q.scale.reshape(-1)))
    zeros = ""
    if not q.signed:
        zeros = add_initializer(graph, store, free_name(f"{name}_zero_points", taken), onnx.TensorProto.UINT8,
                                _pack(q.zero).reshape(-1))
    for u in site.uses:
        node = _node(model, u.output)
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 else ""
        extra = [zeros, "", bias] if bias else ([zeros] if zeros else [])
        new = onnx.helper.make_node("MatMulNBits", [node.input[0], *inputs, *extra], list(node.output),
                                    name=node.name, domain=DOMAIN, K=k, N=n, bits=4, block_size=block)
        node.CopyFrom(new)
    index = [t.name for t in graph.initializer].index(site.tensor_name)
    del graph.initializer[index]
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))


def _pack(values: np.ndarray) -> np.ndarray:
    """Pairs of 4-bit values along the last axis into bytes, the first in the low nibble (an odd
    count padded with 0)."""
    v = values.astype(np.uint8) & 0xF
    if v.shape[-1] % 2:
        v = np.concatenate([v, np.zeros(v.shape[:-1] + (1,), np.uint8)], axis=-1)
    return v[..., 0::2] | (v[..., 1::2] << 4)


def _node(model: onnx.ModelProto, output: str) -> onnx.NodeProto:
    return next(node for node in model.graph.node if node.output and node.output[0] == output)
