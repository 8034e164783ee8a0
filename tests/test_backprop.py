"""Gradient graphs (backprop.py) and finite differences (perturb.py) against independent references.

References: a hand-written numpy backprop for an MLP, central differences in float64 (onnxruntime
where it has float64 kernels, onnx's reference evaluator where it has not), and perturb.fd_deltas.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnx_obs.errors import OnnxObsError
from onnx_obs.graph.backprop import UnsupportedGradient, build_vjp_model, supports_gradients
from onnx_obs.graph.grad_rules import RULES
from onnx_obs.graph.perturb import build_perturbed_model, fd_deltas

F32, F64 = TensorProto.FLOAT, TensorProto.DOUBLE
NEWEST = onnx.defs.onnx_opset_version()


def make_model(nodes, inputs: dict, outputs: list[str], consts: dict, elem: int, opset: int) -> onnx.ModelProto:
    """A one-graph model; float constants are cast to `elem`, inputs declared with the given dims,
    output shapes inferred."""
    np_dtype = helper.tensor_dtype_to_np_dtype(elem)
    inits = [numpy_helper.from_array(v.astype(np_dtype) if v.dtype.kind == "f" else v, n) for n, v in consts.items()]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, elem, dims) for n, dims in inputs.items()],
        [helper.make_tensor_value_info(n, elem, None) for n in outputs],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return onnx.shape_inference.infer_shapes(model)  # graph outputs need shapes to pass the checker


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


class RefSession:
    """fd_deltas' session interface over onnx's reference evaluator, which computes in float64."""

    def __init__(self, model: onnx.ModelProto):
        self.model, self.ref = model, ReferenceEvaluator(model)

    def get_inputs(self):
        def dims(vi):
            return [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]

        return [SimpleNamespace(name=i.name, shape=dims(i), type="tensor(double)") for i in self.model.graph.input]

    def run(self, names, feeds):
        return self.ref.run(names, feeds)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def graph_deltas(model: onnx.ModelProto, feeds: dict, wrt: list[str], output: str, units: int) -> dict:
    """Per-sample deltas [batch, units, *z] from one gradient-graph run per one-hot output unit."""
    vjp = build_vjp_model(model, wrt, output)
    onnx.checker.check_model(vjp, full_check=True)
    sess = session(vjp)
    x = next(iter(feeds.values()))
    runs = []
    for j in range(units):
        seed = np.zeros((x.shape[0], units), x.dtype)
        seed[:, j] = 1
        runs.append(sess.run([f"{w}__grad" for w in wrt], {**feeds, f"{output}__seed": seed}))
    return {w: np.stack([r[k] for r in runs], axis=1).astype(np.float64) for k, w in enumerate(wrt)}


# --- MLP: Gemm/MatMul + Relu/Tanh/Sigmoid + Softmax, float64 in onnxruntime ------------------
def mlp(opset: int, rng: np.random.Generator):
    w = {
        "W1": rng.standard_normal((8, 6)), "B1": rng.standard_normal(8),
        "W2": rng.standard_normal((8, 7)) / 3, "B2": rng.standard_normal(7),
        "W3": rng.standard_normal((7, 4)), "B3": rng.standard_normal(4),
    }
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "B1"], ["z1"], transB=1),
        helper.make_node("Relu", ["z1"], ["a1"]),
        helper.make_node("MatMul", ["a1", "W2"], ["m2"]),
        helper.make_node("Add", ["m2", "B2"], ["z2"]),
        helper.make_node("Tanh", ["z2"], ["a2"]),
        helper.make_node("Gemm", ["a2", "W3", "B3"], ["z3"], alpha=0.7, beta=1.3),
        helper.make_node("Sigmoid", ["z3"], ["s3"]),
        helper.make_node("Mul", ["z3", "s3"], ["h3"]),  # z3 fans out: its gradient is a sum
        helper.make_node("Softmax", ["h3"], ["y"]),
    ]
    return make_model(nodes, {"x": ["N", 6]}, ["y"], w, F64, opset), w


def mlp_numpy_deltas(x: np.ndarray, w: dict) -> dict:
    """Independent backprop: d y_j / d z for z1, m2, z3, every sample and unit j."""
    z1 = x @ w["W1"].T + w["B1"]
    a1 = np.maximum(z1, 0)
    m2 = a1 @ w["W2"]
    a2 = np.tanh(m2 + w["B2"])
    z3 = 0.7 * a2 @ w["W3"] + 1.3 * w["B3"]
    s3 = 1 / (1 + np.exp(-z3))
    h3 = z3 * s3
    y = np.exp(h3 - h3.max(1, keepdims=True))
    y /= y.sum(1, keepdims=True)
    dy_dh3 = y[:, :, None] * (np.eye(4)[None] - y[:, None, :])  # [n, j, k]
    d3 = dy_dh3 * (s3 + z3 * s3 * (1 - s3))[:, None, :]
    d2 = 0.7 * d3 @ w["W3"].T * (1 - a2**2)[:, None, :]
    d1 = d2 @ w["W2"].T * (z1 > 0)[:, None, :]
    return {"z1": d1, "m2": d2, "z3": d3}


@pytest.mark.parametrize("opset", [11, 13, NEWEST])
def test_mlp_deltas_match_numpy_backprop(opset):
    rng = np.random.default_rng(0)
    model, w = mlp(opset, rng)
    x = rng.standard_normal((5, 6))
    got = graph_deltas(model, {"x": x}, ["z1", "m2", "z3"], "y", 4)
    want = mlp_numpy_deltas(x, w)
    for name in want:
        assert got[name].shape == want[name].shape
        assert rel_err(got[name], want[name]) < 1e-5, name


def test_mlp_deltas_match_finite_differences():
    rng = np.random.default_rng(1)
    model, _ = mlp(17, rng)
    x = rng.standard_normal((5, 6))
    wrt = ["z1", "m2", "z3"]
    got = graph_deltas(model, {"x": x}, wrt, "y", 4)
    sess = session(build_perturbed_model(model, wrt))
    for name in wrt:
        fd = fd_deltas(sess, {"x": x}, name, "y")
        assert rel_err(got[name], fd) < 1e-3, name


# --- CNN: Conv + BatchNorm + Relu + pools + Flatten + Gemm, float32-only kernels in onnxruntime ---
def cnn(elem: int, rng: np.random.Generator) -> onnx.ModelProto:
    consts = {
        "W1": rng.standard_normal((4, 2, 3, 3)) / 2, "B1": rng.standard_normal(4),
        "scale": rng.uniform(0.5, 1.5, 4), "shift": rng.standard_normal(4),
        "mean": rng.standard_normal(4), "var": rng.uniform(0.5, 1.5, 4),
        "W2": rng.standard_normal((6, 2, 3, 3)) / 2,
        "W3": rng.standard_normal((3, 6)), "B3": rng.standard_normal(3),
    }
    nodes = [
        # 9x9 -> H 5, W 4; (9 + 1 - 3) % 2 == 1 leaves the last input column outside every window
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], strides=[2, 2], pads=[1, 0, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "scale", "shift", "mean", "var"], ["n1"], epsilon=1e-3),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2]),  # stride 1: windows overlap
        helper.make_node("Conv", ["p1", "W2"], ["c2"], group=2, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("AveragePool", ["r2"], ["a2"], kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 1, 1]),
        helper.make_node("GlobalAveragePool", ["a2"], ["g2"]),
        helper.make_node("Flatten", ["g2"], ["f2"]),
        helper.make_node("Gemm", ["f2", "W3", "B3"], ["y"], transB=1),
    ]
    return make_model(nodes, {"x": ["N", 2, 9, 9]}, ["y"], consts, elem, 17)


def test_cnn_deltas_match_finite_differences():
    x = np.random.default_rng(2).standard_normal((3, 2, 9, 9))
    wrt = ["c1", "c2", "y"]  # y is also the output: its delta is the identity
    # onnxruntime has no float64 Conv: the gradient graph runs in float32, so it is compared with
    # float64 differences at 1e-3 (float32 accumulations of ~100 terms agree to ~1e-6).
    got = graph_deltas(cnn(F32, np.random.default_rng(3)), {"x": x.astype(np.float32)}, wrt, "y", 3)
    ref = RefSession(build_perturbed_model(cnn(F64, np.random.default_rng(3)), wrt))
    for name in wrt:
        fd = fd_deltas(ref, {"x": x.astype(np.float32).astype(np.float64)}, name, "y")
        assert got[name].shape == fd.shape
        assert rel_err(got[name], fd) < 1e-3, name
    assert np.allclose(got["y"], np.broadcast_to(np.eye(3), (3, 3, 3)))


# --- one-op graphs: every rule against float64 central differences ----------------------------
R = np.random.default_rng(7)


def smooth(*shape):
    return R.uniform(-2, 2, shape)


def positive(*shape):
    return R.uniform(0.5, 1.5, shape)


def away(*shape, kinks=(0.0,), margin=0.05):
    """Uniform values kept `margin` away from the op's kinks, so differences never straddle one."""
    v = R.uniform(-3, 3, shape)
    for k in kinks:
        v[np.abs(v - k) < margin] += 2 * margin
    return v


def distinct(*shape):
    """Values at least 4/size apart: max pooling has no near ties."""
    return (R.permutation(int(np.prod(shape))) / np.prod(shape) * 4 - 2).reshape(shape)


@dataclass
class OpCase:
    id: str
    node: onnx.NodeProto
    values: dict  # graph inputs; all are differentiated
    consts: dict = field(default_factory=dict)
    opset: int = 17
    float_only: bool = False  # onnxruntime has no float64 kernel: run the gradient graph in float32
    dims: dict = field(default_factory=dict)  # declared input dims, where not the value's shape

    def model(self, elem: int) -> onnx.ModelProto:
        inputs = {n: self.dims.get(n, list(v.shape)) for n, v in self.values.items()}
        return make_model([self.node], inputs, ["y"], self.consts, elem, self.opset)


def node(op, inputs, outputs=("y",), **attrs):
    return helper.make_node(op, list(inputs), list(outputs), name=f"{op.lower()}_0", **attrs)


def i64(*v):
    return np.array(v, dtype=np.int64)


CASES = [
    *(
        OpCase(f"gemm-tA{ta}-tB{tb}", node("Gemm", "abc", alpha=0.7, beta=1.3, transA=ta, transB=tb),
               {"a": smooth(*((4, 3) if ta else (3, 4))), "b": smooth(*((5, 4) if tb else (4, 5))), "c": smooth(*c)})
        for ta, tb, c in [(0, 0, (5,)), (0, 1, (3, 1)), (1, 0, (1, 5)), (1, 1, (3, 5))]
    ),
    OpCase("matmul-batched-const", node("MatMul", ["a", "W"]), {"a": smooth(2, 3, 4)}, {"W": smooth(4, 5)}),
    OpCase("matmul-broadcast", node("MatMul", "ab"), {"a": smooth(2, 1, 3, 4), "b": smooth(4, 4, 5)}),
    OpCase("matmul-1d-a-opset11", node("MatMul", "ab"), {"a": smooth(4), "b": smooth(2, 4, 5)}, opset=11),
    OpCase("matmul-1d-b", node("MatMul", "ab"), {"a": smooth(2, 3, 4), "b": smooth(4)}, opset=13),
    OpCase("matmul-1d-both", node("MatMul", "ab"), {"a": smooth(4), "b": smooth(4)}),
    OpCase("conv-strides-pads-bias", node("Conv", ["x", "W", "B"], strides=[2, 3], pads=[1, 0, 2, 1]),
           {"x": smooth(2, 3, 7, 8), "B": smooth(4)}, {"W": smooth(4, 3, 3, 2)}, float_only=True),
    OpCase("conv-group-dilation", node("Conv", ["x", "W"], group=2, dilations=[2, 1], strides=[1, 2]),
           {"x": smooth(1, 4, 7, 7)}, {"W": smooth(6, 2, 3, 3)}, opset=11, float_only=True),
    OpCase("conv-same-upper", node("Conv", ["x", "W"], auto_pad="SAME_UPPER", strides=[2, 2]),
           {"x": smooth(2, 2, 6, 5)}, {"W": smooth(3, 2, 3, 3)}, float_only=True),
    OpCase("conv1d-same-lower", node("Conv", ["x", "W"], auto_pad="SAME_LOWER", strides=[3]),
           {"x": smooth(2, 2, 9)}, {"W": smooth(3, 2, 4)}, float_only=True),
    OpCase("conv-depthwise-valid", node("Conv", ["x", "W"], group=3, auto_pad="VALID", strides=[2, 2]),
           {"x": smooth(1, 3, 6, 6)}, {"W": smooth(3, 1, 3, 3)}, float_only=True),
    OpCase("add-broadcast", node("Add", "ab"), {"a": smooth(2, 3, 4), "b": smooth(3, 1)}),
    OpCase("add-opset11", node("Add", "ab"), {"a": smooth(2, 3), "b": smooth(1, 3)}, opset=11),
    OpCase("add-runtime-broadcast", node("Add", "ab"), {"a": smooth(3, 4), "b": smooth(1, 1)}, opset=13,
           dims={"a": ["p", "q"], "b": ["r", 1]}),
    OpCase("sum-broadcast", node("Sum", "abc"), {"a": smooth(2, 3, 4), "b": smooth(4), "c": smooth(3, 1)}, opset=11),
    OpCase("sub-broadcast", node("Sub", "ab"), {"a": smooth(2, 1, 4), "b": smooth(3, 1)}),
    OpCase("mul-broadcast", node("Mul", "ab"), {"a": smooth(2, 3, 4), "b": smooth(4)}),
    OpCase("mul-square", node("Mul", "aa"), {"a": smooth(2, 3)}),
    OpCase("div-broadcast", node("Div", "ab"), {"a": smooth(2, 3, 4), "b": positive(2, 1, 4)}),
    OpCase("relu", node("Relu", "x"), {"x": away(2, 5)}),
    OpCase("leaky-relu", node("LeakyRelu", "x", alpha=0.1), {"x": away(2, 5)}),
    OpCase("sigmoid", node("Sigmoid", "x"), {"x": smooth(2, 5)}),
    OpCase("tanh", node("Tanh", "x"), {"x": smooth(2, 5)}),
    OpCase("hard-sigmoid", node("HardSigmoid", "x", alpha=0.3, beta=0.4), {"x": away(3, 5, kinks=(-4 / 3, 2.0))},
           float_only=True),
    OpCase("clip", node("Clip", ["x", "lo", "hi"]), {"x": away(3, 5, kinks=(-0.5, 0.7))},
           {"lo": np.array(-0.5), "hi": np.array(0.7)}, opset=11, float_only=True),
    OpCase("clip-max-only", node("Clip", ["x", "", "hi"]), {"x": away(3, 5, kinks=(0.7,))}, {"hi": np.array(0.7)}),
    OpCase("softmax-opset11", node("Softmax", "x", axis=1), {"x": smooth(2, 3, 4)}, opset=11),
    OpCase("softmax-opset13", node("Softmax", "x", axis=1), {"x": smooth(2, 3, 4)}, opset=13),
    OpCase("log-softmax-opset11", node("LogSoftmax", "x", axis=1), {"x": smooth(2, 3, 4)}, opset=11),
    OpCase("log-softmax-opset13", node("LogSoftmax", "x"), {"x": smooth(2, 3, 4)}, opset=13),
    OpCase("batchnorm-opset11", node("BatchNormalization", ["x", "s", "b", "m", "v"], epsilon=1e-2),
           {"x": smooth(2, 3, 4, 4)}, {"s": smooth(3), "b": smooth(3), "m": smooth(3), "v": positive(3)}, opset=11),
    OpCase("batchnorm-rank2", node("BatchNormalization", ["x", "s", "b", "m", "v"]),
           {"x": smooth(4, 3)}, {"s": smooth(3), "b": smooth(3), "m": smooth(3), "v": positive(3)}, opset=15),
    OpCase("maxpool-overlapping", node("MaxPool", "x", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
           {"x": distinct(2, 2, 6, 6)}, opset=11),
    OpCase("maxpool-dilated", node("MaxPool", "x", kernel_shape=[2], strides=[1], dilations=[2]),
           {"x": distinct(2, 2, 7)}),
    OpCase("maxpool-ceil-opset11", node("MaxPool", "x", kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
           {"x": distinct(2, 2, 6, 5)}, opset=11),
    OpCase("maxpool-own-indices", node("MaxPool", "x", ["y", "idx"], kernel_shape=[2], strides=[2]),
           {"x": distinct(2, 3, 8)}),
    OpCase("avgpool-exclude-pad", node("AveragePool", "x", kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 1, 1]),
           {"x": smooth(2, 2, 7, 6)}, float_only=True),
    OpCase("avgpool-include-pad",
           node("AveragePool", "x", kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 1, 1], count_include_pad=1),
           {"x": smooth(2, 2, 7, 6)}, opset=11, float_only=True),
    OpCase("avgpool-ceil-exact", node("AveragePool", "x", kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
           {"x": smooth(1, 2, 6, 4)}, float_only=True),
    OpCase("global-avgpool", node("GlobalAveragePool", "x"), {"x": smooth(2, 3, 4, 5)}, float_only=True),
    OpCase("flatten", node("Flatten", "x", axis=2), {"x": smooth(2, 3, 4, 2)}),
    OpCase("reshape", node("Reshape", ["x", "shape"]), {"x": smooth(2, 3, 4)}, {"shape": i64(0, -1)}),
    OpCase("transpose-perm", node("Transpose", "x", perm=[2, 0, 1]), {"x": smooth(2, 3, 4)}),
    OpCase("transpose-default", node("Transpose", "x"), {"x": smooth(2, 3, 4)}),
    OpCase("concat", node("Concat", ["a", "k", "b"], axis=-2), {"a": smooth(2, 3, 4), "b": smooth(2, 1, 4)},
           {"k": smooth(2, 2, 4)}),
    OpCase("identity", node("Identity", "x"), {"x": smooth(2, 3)}),
    OpCase("dropout", node("Dropout", ["x", "ratio"]), {"x": smooth(2, 3)}, {"ratio": np.array(0.5)}),
    OpCase("squeeze-opset11", node("Squeeze", "x", axes=[1]), {"x": smooth(2, 1, 3)}, opset=11),
    OpCase("squeeze-opset13", node("Squeeze", ["x", "axes"]), {"x": smooth(2, 1, 3)}, {"axes": i64(1)}, opset=13),
    OpCase("unsqueeze-opset11", node("Unsqueeze", "x", axes=[0, 3]), {"x": smooth(2, 3)}, opset=11),
    OpCase("unsqueeze-opset13", node("Unsqueeze", ["x", "axes"]), {"x": smooth(2, 3)}, {"axes": i64(-1)}, opset=13),
    OpCase("gather-2d-indices", node("Gather", ["x", "idx"], axis=1), {"x": smooth(2, 4, 3)},
           {"idx": i64([0, 2], [-1, 0], [2, 2])}),
    OpCase("gather-scalar", node("Gather", ["x", "idx"]), {"x": smooth(3, 4)}, {"idx": np.array(1, dtype=np.int64)}),
]


def test_every_rule_has_a_case():
    assert {c.node.op_type for c in CASES} == set(RULES)


def central_diff(f, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    g = np.empty_like(x)
    for i in np.ndindex(*x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        g[i] = (f(xp) - f(xm)) / (2 * h)
    return g


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_rule_matches_central_differences(case: OpCase):
    model64 = case.model(F64)
    if case.float_only:
        forward = ReferenceEvaluator(model64)
    else:
        forward = session(model64)
    values = {k: v.astype(np.float32).astype(np.float64) for k, v in case.values.items()}  # exact in both
    y = forward.run(["y"], values)[0]
    seed = R.standard_normal(y.shape)
    elem, dtype = (F32, np.float32) if case.float_only else (F64, np.float64)
    vjp = build_vjp_model(case.model(elem), list(values), "y")
    onnx.checker.check_model(vjp, full_check=True)
    feeds = {k: v.astype(dtype) for k, v in values.items()}
    out = session(vjp).run(None, {**feeds, "y__seed": seed.astype(dtype)})
    assert np.allclose(out[0], y, rtol=1e-5, atol=1e-6)  # the forward output is untouched
    # float64 differences with h = 1e-6 are accurate to ~1e-9; a float32 graph to ~1e-6.
    tol = 1e-4 if case.float_only else 1e-6
    for k, name in enumerate(values):

        def objective(v, name=name):
            return float(np.sum(seed * forward.run(["y"], {**values, name: v})[0]))

        fd = central_diff(objective, values[name])
        assert out[1 + k].shape == fd.shape, name
        assert rel_err(out[1 + k].astype(np.float64), fd) < tol, name


# --- structure of the built models ------------------------------------------------------------
def test_vjp_model_keeps_forward_graph_and_names_io():
    model, _ = mlp(13, np.random.default_rng(4))
    model.ir_version = 8
    vjp = build_vjp_model(model, ["z3", "z1"], "y")
    assert list(vjp.graph.node)[: len(model.graph.node)] == list(model.graph.node)
    assert list(vjp.opset_import) == list(model.opset_import) and vjp.ir_version == 8
    assert [i.name for i in vjp.graph.input] == ["x", "y__seed"]
    assert [o.name for o in vjp.graph.output] == ["y", "z3__grad", "z1__grad"]
    seed_dims = vjp.graph.input[1].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in seed_dims] == ["N", 4]
    z1_dims = vjp.graph.output[2].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in z1_dims] == ["N", 8]


def test_ir3_model_stays_valid():
    # IR 3 requires every initializer among the graph inputs; the gradient pass adds Constant nodes.
    model, _ = mlp(11, np.random.default_rng(4))
    model.ir_version = 3
    model.graph.input.extend(
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in model.graph.initializer
    )
    onnx.checker.check_model(build_vjp_model(model, ["z1"], "y"), full_check=True)


def test_wrt_off_the_output_path_gets_zeros():
    nodes = [node("Relu", "x", ["r"]), node("Tanh", "x", ["side"]), node("Sigmoid", "r")]
    model = make_model(nodes, {"x": [2, 3]}, ["y", "side"], {}, F64, 17)
    vjp = build_vjp_model(model, ["side", "r"], "y")
    x = away(2, 3)
    side, r = session(vjp).run(["side__grad", "r__grad"], {"x": x, "y__seed": np.ones((2, 3))})
    assert np.array_equal(side, np.zeros((2, 3)))
    s = 1 / (1 + np.exp(-np.maximum(x, 0)))
    assert np.allclose(r, s * (1 - s))


def unsupported(model, wrt, output, op):
    ok, reason = supports_gradients(model, wrt, output)
    assert not ok and op in reason
    with pytest.raises(UnsupportedGradient) as err:
        build_vjp_model(model, wrt, output)
    return err.value


def test_op_without_rule_raises_naming_it():
    nodes = [node("Relu", "x", ["r"]), helper.make_node("Sin", ["r"], ["s"], name="my_sin"), node("Tanh", "s")]
    model = make_model(nodes, {"x": [2, 3]}, ["y"], {}, F64, 17)
    err = unsupported(model, ["x"], "y", "Sin")
    assert (err.op_type, err.node_name) == ("Sin", "my_sin") and "my_sin" in str(err)
    # Sin past the differentiated tensor, or off the path to the output, does not matter.
    assert supports_gradients(model, ["s"], "y") == (True, "")
    side = make_model([node("Sin", "x", ["side"]), node("Tanh", "x")], {"x": [2, 3]}, ["y", "side"], {}, F64, 17)
    assert supports_gradients(side, ["x"], "y") == (True, "")


def test_custom_domain_op_is_named_with_its_domain():
    nodes = [helper.make_node("FusedThing", ["x"], ["f"], name="f0", domain="com.example"), node("Tanh", "f")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", F32, [2])],
        [helper.make_tensor_value_info("y", F32, [2])], value_info=[helper.make_tensor_value_info("f", F32, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    assert unsupported(model, ["x"], "y", "com.example.FusedThing").op_type == "com.example.FusedThing"


@pytest.mark.parametrize(
    "case, reason",
    [
        (OpCase("maxpool-column-major", node("MaxPool", "x", kernel_shape=[2, 2], storage_order=1),
                {"x": smooth(1, 1, 4, 4)}), "storage_order"),
        (OpCase("avgpool-partial-window", node("AveragePool", "x", kernel_shape=[2], strides=[2], ceil_mode=1),
                {"x": smooth(1, 1, 5)}), "ceil_mode"),
        (OpCase("add-runtime-broadcast-opset11", node("Add", "ab"), {"a": smooth(3, 4), "b": smooth(1, 1)}, opset=11,
                dims={"a": ["p", "q"], "b": ["r", 1]}), "opset < 13"),
        (OpCase("conv-weight", node("Conv", ["x", "w"]), {"x": smooth(1, 1, 5), "w": smooth(1, 1, 3)}), "input 1"),
        (OpCase("dropout-training", node("Dropout", ["x", "", "t"]), {"x": smooth(3)}, {"t": np.array(True)}),
         "training_mode"),
    ],
    ids=lambda v: v.id if isinstance(v, OpCase) else "",
)
def test_rule_limits_raise(case, reason):
    err = unsupported(case.model(F32), list(case.values), "y", case.node.op_type)
    assert reason in err.reason


def test_gather_with_runtime_indices_is_unsupported():
    graph = helper.make_graph(
        [node("Gather", ["x", "i"])], "g",
        [helper.make_tensor_value_info("x", F32, [3]), helper.make_tensor_value_info("i", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", F32, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    assert "indices are not constant" in unsupported(model, ["x"], "y", "Gather").reason


def test_opset_below_11_is_refused():
    model = make_model([node("Relu", "x")], {"x": [2]}, ["y"], {}, F32, 10)
    ok, reason = supports_gradients(model, ["x"], "y")
    assert not ok and "opset >= 11" in reason
    with pytest.raises(OnnxObsError, match="opset >= 11"):
        build_vjp_model(model, ["x"], "y")


def test_unknown_tensor_is_a_user_error():
    model, _ = mlp(17, np.random.default_rng(5))
    with pytest.raises(OnnxObsError, match="'nope'"):
        build_vjp_model(model, ["nope"], "y")


# --- the perturbed model ------------------------------------------------------------------------
def test_perturbed_model_adds_deltas_and_keeps_outputs():
    model, _ = mlp(13, np.random.default_rng(6))
    pert = build_perturbed_model(model, ["z1", "y"])
    onnx.checker.check_model(pert, full_check=True)
    deltas = {i.name: i for i in pert.graph.input if i.name.endswith("__delta")}
    assert [d.dim_param or d.dim_value for d in deltas["z1__delta"].type.tensor_type.shape.dim] == ["N", 8]
    assert [o.name for o in pert.graph.output] == ["y", "z1"]
    x = np.random.default_rng(6).standard_normal((3, 6))
    y0 = session(model).run(["y"], {"x": x})[0]
    sess = session(pert)
    zero = {"z1__delta": np.zeros((3, 8)), "y__delta": np.zeros((3, 4))}
    assert np.allclose(sess.run(["y"], {"x": x, **zero})[0], y0, rtol=0, atol=1e-15)
    shifted = sess.run(["y"], {"x": x, **zero, "y__delta": np.full((3, 4), 0.5)})[0]
    assert np.allclose(shifted, y0 + 0.5)
    with pytest.raises(ValueError, match="'x'"):
        build_perturbed_model(model, ["x"])
