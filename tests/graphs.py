"""Small ONNX graphs built with onnx.helper, and onnxruntime helpers to run them.

Reusable by every test file: `make_model` wraps a node list into a checked model, the `*_model`
builders return one-node models for each form a site can take, `run` / `run_tensors` execute a
model (intermediate tensors included) in onnxruntime on CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
NEWEST_OPSET = onnx.defs.onnx_opset_version()


def randn(shape, seed: int = 0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def tensor_type(dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def vi(name: str, dtype=np.float32, shape=None) -> onnx.ValueInfoProto:
    """A value info; shape entries may be ints, strings (dim_param) or None (unknown)."""
    return helper.make_tensor_value_info(name, tensor_type(dtype), shape)


def init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def constant(output: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [output], value=init(output + "_value", array))


def make_model(nodes, inputs, outputs, initializers=(), *, opset: int = OPSET,
               extra_opsets: dict[str, int] | None = None, ir_version: int | None = None,
               graph_inputs_for_inits: bool = False, check: bool = True,
               name: str = "test") -> onnx.ModelProto:
    """A model around `nodes`; with `graph_inputs_for_inits` every initializer is also an input."""
    inputs = list(inputs)
    if graph_inputs_for_inits:
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in initializers]
    graph = helper.make_graph(list(nodes), name, inputs, list(outputs), list(initializers))
    opsets = [helper.make_opsetid("", opset)]
    opsets += [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="onnx-obs-tests")
    if any(not o.type.tensor_type.HasField("shape") for o in model.graph.output):
        _infer_output_types(model)
    if ir_version is not None:
        model.ir_version = ir_version
    elif opset <= 21:
        model.ir_version = 8  # readable by every onnxruntime the package supports
    if check:
        onnx.checker.check_model(model)
    return model


def _infer_output_types(model: onnx.ModelProto) -> None:
    """Fill in outputs declared without a shape (the checker wants one) by shape inference."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # custom ops: leave them as they are
        return
    for out, inf in zip(model.graph.output, inferred.graph.output):
        if not out.type.tensor_type.HasField("shape") and inf.type.tensor_type.HasField("shape"):
            out.type.CopyFrom(inf.type)


def save(model: onnx.ModelProto, path, external: bool = False) -> Path:
    path = Path(path)
    if external:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data", size_threshold=0)
    else:
        onnx.save(model, str(path))
    return path


# ---------------------------------------------------------------- running in onnxruntime

def session(model: onnx.ModelProto | str | Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    src = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def run(model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    s = session(model)
    names = [o.name for o in s.get_outputs()]
    return dict(zip(names, s.run(None, feeds)))


def run_tensors(model: onnx.ModelProto, feeds: dict[str, np.ndarray], names) -> dict[str, np.ndarray]:
    """Values of any main-graph tensors (inputs, intermediates, outputs) for `feeds`."""
    names = list(dict.fromkeys(names))
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    for name in names:
        if name in feeds:
            continue
        m.graph.output.add().name = name
    got = run(m, feeds) if len(m.graph.output) else {}
    return {n: feeds[n] if n in feeds else got[n] for n in names}


# ---------------------------------------------------------------- one-node linear models

def gemm_model(*, m: int = 5, k: int = 6, n: int = 4, trans_a: int = 0, trans_b: int = 0,
               weight_left: bool = False, bias: bool = False, seed: int = 0,
               dtype=np.float32) -> tuple[onnx.ModelProto, dict]:
    """Y = A' B' with the weight as B (right, default) or A (left); the other operand is input x.

    Right: x is [m, k] ([k, m] with transA), W is [k, n] ([n, k] with transB), Y [m, n].
    Left: W is [n, k] ([k, n] with transA), x is [k, m] ([m, k] with transB), Y [n, m].
    """
    if weight_left:
        w = randn([k, n] if trans_a else [n, k], seed, dtype)
        x_shape = [m, k] if trans_b else [k, m]
        ins, y_shape = ["W", "x"], [n, m]
    else:
        w = randn([n, k] if trans_b else [k, n], seed, dtype)
        x_shape = [k, m] if trans_a else [m, k]
        ins, y_shape = ["x", "W"], [m, n]
    inits = [init("W", w)]
    if bias:
        inits.append(init("b", randn([y_shape[1]], seed + 1, dtype)))
        ins.append("b")
    node = helper.make_node("Gemm", ins, ["y"], name="gemm", transA=trans_a, transB=trans_b)
    model = make_model([node], [vi("x", dtype, x_shape)], [vi("y", dtype, y_shape)], inits)
    return model, {"x": randn(x_shape, seed + 2, dtype)}


def matmul_model(*, x_shape=(3, 6), w_shape=(6, 4), weight_left: bool = False, seed: int = 0,
                 dtype=np.float32) -> tuple[onnx.ModelProto, dict]:
    ins = ["W", "x"] if weight_left else ["x", "W"]
    node = helper.make_node("MatMul", ins, ["y"], name="matmul")
    model = make_model([node], [vi("x", dtype, list(x_shape))], [vi("y", dtype, None)],
                       [init("W", randn(w_shape, seed, dtype))])
    return model, {"x": randn(x_shape, seed + 2, dtype)}


def conv_model(*, dims: int = 2, c_in: int = 4, c_out: int = 6, group: int = 1, kernel=3,
               spatial=7, batch: int = 2, bias: bool = False, seed: int = 0,
               transpose: bool = False, **attrs) -> tuple[onnx.ModelProto, dict]:
    """One Conv (or ConvTranspose) node; `attrs` go to the node (pads, strides, dilations, ...)."""
    kernel = [kernel] * dims if isinstance(kernel, int) else list(kernel)
    spatial = [spatial] * dims if isinstance(spatial, int) else list(spatial)
    if transpose:
        w_shape = [c_in, c_out // group, *kernel]
    else:
        w_shape = [c_out, c_in // group, *kernel]
    inits = [init("W", randn(w_shape, seed))]
    ins = ["x", "W"]
    if bias:
        inits.append(init("b", randn([c_out], seed + 1)))
        ins.append("b")
    op = "ConvTranspose" if transpose else "Conv"
    node = helper.make_node(op, ins, ["y"], name=op.lower(), group=group, **attrs)
    x_shape = [batch, c_in, *spatial]
    model = make_model([node], [vi("x", np.float32, x_shape)], [vi("y", np.float32, None)], inits)
    return model, {"x": randn(x_shape, seed + 2)}


# ---------------------------------------------------------------- small whole networks

def mlp_model(*, opset: int = OPSET, batch="batch", sizes=(8, 6, 4), seed: int = 0,
              ir_version: int | None = None) -> onnx.ModelProto:
    """x -> Gemm(transB=1) -> Relu -> Gemm(transB=1) -> y, input 'x' [batch, sizes[0]]."""
    nodes, inits, prev = [], [], "x"
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        inits += [init(f"fc{i}.weight", randn([b, a], seed + i)), init(f"fc{i}.bias", randn([b], seed + 50 + i))]
        out = "y" if i == len(sizes) - 2 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"fc{i}.weight", f"fc{i}.bias"], [out + ("" if out == "y" else "_pre")],
                                      name=f"fc{i}", transB=1))
        if out != "y":
            nodes.append(helper.make_node("Relu", [out + "_pre"], [out], name=f"relu{i}"))
        prev = out
    return make_model(nodes, [vi("x", np.float32, [batch, sizes[0]])],
                      [vi("y", np.float32, [batch, sizes[-1]])], inits, opset=opset, ir_version=ir_version)


def cnn_model(*, opset: int = OPSET, batch="batch", seed: int = 0) -> onnx.ModelProto:
    """x [batch, 2, 6, 6] -> Conv 2->4 3x3 pad 1 -> Relu -> Flatten -> Gemm 144->3 -> y."""
    inits = [init("conv.weight", randn([4, 2, 3, 3], seed)), init("conv.bias", randn([4], seed + 1)),
             init("fc.weight", randn([3, 144], seed + 2)), init("fc.bias", randn([3], seed + 3))]
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["y"], name="fc", transB=1),
    ]
    return make_model(nodes, [vi("x", np.float32, [batch, 2, 6, 6])],
                      [vi("y", np.float32, [batch, 3])], inits, opset=opset)


def calib_for(model: onnx.ModelProto, n: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """Random calibration arrays for every float/int input, dynamic dims set to n (batch) or 3."""
    inits = {t.name for t in model.graph.initializer}
    out = {}
    for i, x in enumerate(model.graph.input):
        if x.name in inits:
            continue
        tt = x.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (n if j == 0 else 3)
                for j, d in enumerate(tt.shape.dim)]
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np.dtype(dtype).kind == "f":
            out[x.name] = randn(dims, seed + i, dtype)
        else:
            out[x.name] = np.random.default_rng(seed + i).integers(0, 3, dims).astype(dtype)
    return out
