"""Activation QDQ pairs: QuantizeLinear + DequantizeLinear (uint8, per tensor) on the tensors
around the quantized sites, the pattern onnxruntime's QDQ fusion turns into integer kernels.

onnxruntime 1.2x (CPU) fuses DequantizeLinear(x) and DequantizeLinear(weight) into QLinearConv /
QGemm / QLinearMatMul when the op's output also goes through a QuantizeLinear (Conv needs it; a
MatMul without one becomes MatMulIntegerToFloat). An output read by a single Relu is quantized
after the Relu instead: with zero point 0 the grid clips negatives as the Relu does and
onnxruntime drops it. A MatMul's bias Add (a constant added) joins the layer the same way:
onnxruntime makes MatMul + Add one Gemm, then QGemm (a QuantizeLinear between them would leave
the Add in float, with a DequantizeLinear and QuantizeLinear around it). A tensor that an order-keeping op (MaxPool, Flatten, Reshape, ...) makes
from another quantized tensor takes that tensor's grid: onnxruntime then runs the op on uint8
(NhwcMaxPool) or drops the pair; so does an average pooling's output that reaches a site. Graph
outputs stay float, except the output of a Conv / Gemm / MatMul + bias (quantize_static quantizes
them too): without a QuantizeLinear onnxruntime runs that layer in
float, dequantizing its weights on every call.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnx_obs.graph.protos import readers
from onnx_obs.graph.quant_format import add_initializer, free_name
from onnx_obs.graph.sites import Site

OUTPUT_QDQ_OPS = {"Conv", "Gemm"}  # fused by onnxruntime only with a QuantizeLinear on the output
AVERAGE_OPS = {"GlobalAveragePool", "AveragePool"}  # run on uint8 with QDQ on both sides
# ops whose output holds values of their first input (moved, selected or the max of some)
SAME_GRID_OPS = {"MaxPool", "GlobalMaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze",
                 "Identity", "Slice", "Gather", "Split", "DepthToSpace", "SpaceToDepth"}


def activation_tensors(model: onnx.ModelProto, sites: list[Site]) -> list[str]:
    """The tensors to quantize, in graph order of first mention: every use's activation input and
    its output (after a MatMul's bias Add and a Relu, each its single reader), graph outputs left
    out but those of OUTPUT_QDQ_OPS and MatMul + bias; the output of an average pooling that
    reaches the input through SAME_GRID_OPS."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    consts = {t.name for t in graph.initializer} | {n.output[0] for n in graph.node
                                                    if n.op_type == "Constant" and n.output}
    read = readers(graph)
    producer = {o: n for n in graph.node for o in n.output}
    chosen: list[str] = []
    for s in sites:
        for u in s.uses:
            if u.in_subgraph:
                continue
            up = producer.get(u.activation)  # a pooling before a Flatten / Reshape: its output too
            while up is not None and up.op_type in SAME_GRID_OPS and up.input:
                up = producer.get(up.input[0])
            if up is not None and up.op_type in AVERAGE_OPS and up.output[0] not in outputs:
                chosen.append(up.output[0])
            out = u.output
            for op in ("Add", "Relu"):  # a MatMul's bias Add and a Relu join the layer
                after = read.get(out, [])
                if len(after) == 1 and out not in outputs:
                    node = graph.node[after[0][0]]
                    bias = u.op_type == "MatMul" and any(x in consts for x in node.input)
                    if node.op_type == op and (op == "Relu" or bias):
                        out = node.output[0]
            if u.activation not in outputs and u.activation not in consts:
                chosen.append(u.activation)
            if out not in outputs or u.op_type in OUTPUT_QDQ_OPS or out != u.output:
                chosen.append(out)
    return list(dict.fromkeys(chosen))


def grid_sources(model: onnx.ModelProto, names: list[str]) -> dict[str, str]:
    """tensor -> the quantized tensor whose grid it shares: made from it by a chain of SAME_GRID_OPS."""
    chosen, made_from = set(names), {}
    for node in model.graph.node:
        if node.op_type in SAME_GRID_OPS and node.input:
            for out in node.output:
                made_from[out] = node.input[0]
    sources = {}
    for name in names:  # the earliest quantized tensor up the chain
        src, root = made_from.get(name), None
        while src is not None:
            root = src if src in chosen else root
            src = made_from.get(src)
        if root is not None:
            sources[name] = root
    return sources


def insert_qdq(model: onnx.ModelProto, grids: dict[str, tuple[np.float32, np.uint8]], store) -> None:
    """Put QuantizeLinear -> DequantizeLinear (scale, zero point) behind every tensor in `grids`
    and make every main-graph node read the dequantized tensor instead; a graph output keeps its
    name, now the DequantizeLinear's (its producer writes `<name>_float`). store: LoadedModel.store."""
    graph = model.graph
    taken = ({t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
             | {i.name for i in graph.input})
    outputs = {o.name for o in graph.output}
    renamed, pairs, source = {}, {}, {}  # source: what the QuantizeLinear reads
    for name, (scale, zero) in grids.items():
        s = add_initializer(graph, store, free_name(f"{name}_act_scale", taken), onnx.TensorProto.FLOAT,
                            np.asarray(scale, np.float32))
        z = add_initializer(graph, store, free_name(f"{name}_act_zero_point", taken), onnx.TensorProto.UINT8,
                            np.asarray(zero, np.uint8))
        q = free_name(f"{name}_act_quantized", taken)
        dq = name if name in outputs else free_name(f"{name}_act_dequantized", taken)
        source[name] = free_name(f"{name}_float", taken) if name in outputs else name
        pairs[name] = [
            onnx.helper.make_node("QuantizeLinear", [source[name], s, z], [q],
                                  name=free_name(f"{name}_QuantizeLinear", taken)),
            onnx.helper.make_node("DequantizeLinear", [q, s, z], [dq], name=free_name(f"{name}_DequantizeLinear", taken)),
        ]
        if name not in outputs:
            renamed[name] = dq
    nodes = [n for i in graph.input if i.name in pairs for n in pairs[i.name]]
    for node in graph.node:
        for k, x in enumerate(node.input):
            if x in renamed:
                node.input[k] = renamed[x]
        made = [o for o in node.output if o in pairs]
        for k, o in enumerate(node.output):
            if o in pairs:
                node.output[k] = source[o]
        nodes.append(node)
        nodes += [n for o in made for n in pairs[o]]
    del graph.node[:]
    graph.node.extend(nodes)
