"""Finite differences along the weights (hessian/differences.py) where the network has kinks: ReLU,
MaxPool, Max, Abs and Clip. Checked against the gradient graph (where every op has a rule) and
against float64 central differences on the weights themselves in onnx's reference evaluator."""

from __future__ import annotations

import numpy as np
import pytest
from graphs import vi
from onnx import helper
from test_full_network import _model, pipeline_net, pipeline_X, rel_err, weight_perturbation_X

from onnx_obs.hessian.differences import NodeTerm, to_z_layout, weight_jacobian
from onnx_obs.hessian.full import delta_vectors


def tie_net(dtype=np.float32, weights_as_inputs=False):
    """The minimal case: y = MaxPool2x2(ReLU(Conv1x1(x; w=1, b=0)))."""
    w = {"cw": np.ones((1, 1, 1, 1)), "cb": np.zeros(1)}
    nodes = [helper.make_node("Conv", ["x", "cw", "cb"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2]),
             helper.make_node("Flatten", ["p"], ["y"])]
    return _model(nodes, w, dtype, [vi("x", dtype, ["N", 1, 2, 2])], [vi("y", dtype, ["N", 1])], weights_as_inputs)


def test_a_four_way_maxpool_tie_has_the_slope_along_the_weights():
    model, _ = tie_net()
    x = np.full((1, 1, 2, 2), 0.5, dtype=np.float32)
    for mode in ("graph", "fd"):
        X = pipeline_X(pipeline_net(model, x, gradients=mode)[0])
        # y = max over the window of (w 0.5 + b): dy/dw = 0.5, dy/db = 1 (per-element differences of
        # the conv output give each tied element half a slope: 1.0 and 2.0)
        np.testing.assert_allclose(X, [[0.5, 1.0]], rtol=1e-3, err_msg=mode)


def conv_net(dtype=np.float32, weights_as_inputs=False):
    """x [N, 2, 6, 6] -> Conv 2->3 3x3 pad 1 + bias -> Relu -> MaxPool 2x2 -> Flatten -> Gemm 27->2."""
    r = np.random.default_rng(21)
    w = {"cw": r.normal(size=(3, 2, 3, 3)) / 3, "cb": np.array([0.3, -0.2, 0.1]),
         "fw": r.normal(size=(2, 27)) / 4, "fb": r.normal(size=2)}
    nodes = [helper.make_node("Conv", ["x", "cw", "cb"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], name="fc", transB=1)]
    return _model(nodes, w, dtype, [vi("x", dtype, ["N", 2, 6, 6])], [vi("y", dtype, ["N", 2])], weights_as_inputs)


def test_relu_maxpool_conv_net_fd_agrees_with_graph_and_weight_perturbation():
    model, _ = conv_net()
    x = np.random.default_rng(22).normal(size=(12, 2, 6, 6)).astype(np.float32)
    x[:3] = 0.0  # blank images: every window ties (at the bias, or at 0 behind the ReLU)
    x[3, :, :3, :3] = 1.0  # constant patches: ties with equal inputs
    graph = pipeline_X(pipeline_net(model, x)[0])
    net = pipeline_net(model, x, gradients="fd")[0]
    fd = pipeline_X(net)
    ref = weight_perturbation_X(conv_net, net, x, h=1e-6)
    assert rel_err(graph, ref) < 1e-5
    assert rel_err(fd, ref) < 1e-3 and rel_err(fd, graph) < 1e-3


def kink_mlp(ops, dtype=np.float32, weights_as_inputs=False):
    """x [N, 4] -> Gemm 4->6 + b1 = z -> one branch per op of `ops` (Relu, Abs, Clip [-0.5, 0.5],
    Max(Relu(z), Clip(z))) -> Sum -> Gemm 6->3 -> y. b1 puts sample 0's z at 1e-3 from the kinks
    (0 and the clip bound 0.5), inside float32's step (~5e-3) and outside float64's."""
    r = np.random.default_rng(23)
    W1 = r.normal(size=(6, 4))
    x0 = _X[0].astype(dtype).astype(np.float64)
    near = np.array([1e-3, -1e-3, 0.5 + 1e-3, 0.5 - 1e-3, -0.5 + 1e-3, 0.3])
    w = {"W1": W1, "b1": near - W1 @ x0, "W2": r.normal(size=(3, 6))}
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["z"], name="fc1", transB=1),
             helper.make_node("Constant", [], ["lo"], value=helper.make_tensor("lo", elem, [], [-0.5])),
             helper.make_node("Constant", [], ["hi"], value=helper.make_tensor("hi", elem, [], [0.5]))]
    branches = []
    for op in ops:
        if op == "Clip":
            nodes.append(helper.make_node("Clip", ["z", "lo", "hi"], ["clip"]))
        elif op == "Max":
            nodes += [helper.make_node("Relu", ["z"], ["mr"]), helper.make_node("Clip", ["z", "lo", "hi"], ["mc"]),
                      helper.make_node("Max", ["mr", "mc"], ["max"])]
        else:
            nodes.append(helper.make_node(op, ["z"], [op.lower()]))
        branches.append(nodes[-1].output[0])
    nodes += [helper.make_node("Sum", branches, ["h"]),
              helper.make_node("Gemm", ["h", "W2"], ["y"], name="fc2", transB=1)]
    return _model(nodes, w, dtype, [vi("x", dtype, ["N", 4])], [vi("y", dtype, ["N", 3])], weights_as_inputs)


_X = np.random.default_rng(24).normal(size=(16, 4)).astype(np.float32)


@pytest.mark.parametrize("ops, graph", [(("Relu", "Clip"), True), (("Abs",), False), (("Max",), False),
                                        (("Relu", "Abs", "Clip", "Max"), False)])
def test_kinks_inside_the_step_are_resolved(ops, graph):
    def build(dtype=np.float32, weights_as_inputs=False):
        return kink_mlp(ops, dtype, weights_as_inputs)

    model, _ = build()
    net = pipeline_net(model, _X, gradients="fd")[0]
    fd = pipeline_X(net)
    ref = weight_perturbation_X(build, net, _X, h=1e-7)
    near = slice(0, 3)  # sample 0's rows, the one at 1e-3 from the kinks
    assert rel_err(fd[near], ref[near]) < 1e-3 and rel_err(fd, ref) < 1e-3
    assert net.differences.redone > 0 and net.differences.kinks == 0
    if graph:
        assert rel_err(fd, pipeline_X(pipeline_net(model, _X)[0])) < 1e-3


def test_a_kink_at_the_point_itself_is_counted_and_gets_the_mean_slope():
    # F(w) = relu(w x) at w x = 0: one-sided slopes x and 0 at every step; the central difference is x / 2
    x = np.array([[0.0], [2.0]])
    term = NodeTerm("z", (2, 1), "rows", 1, 1, x.reshape(1, 2, 1), slice(0, 1))
    w = np.zeros(1)

    def run(moves):
        return np.stack([np.maximum(np.zeros((2, 1)) + m.get("z", 0.0), 0.0) for m in moves])

    J, redone, kinks = weight_jacobian(run, run([{}])[0], w, [term], 1e-3, 1e-16)
    np.testing.assert_allclose(J[:, 0, 0], [0.0, 1.0], rtol=1e-12)
    assert (redone, kinks) == (2, 1)  # sample 1 is redone twice and stays on its kink


@pytest.mark.parametrize("layout, shape, rows, groups", [("rows", (3, 4, 5), 5, 1), ("cols", (3, 5, 4), 5, 1),
                                                         ("cols", (5, 6), 5, 1), ("channels", (2, 6, 3, 2), 6, 3)])
def test_z_layout_inverts_delta_vectors(layout, shape, rows, groups):
    z = np.random.default_rng(25).normal(size=shape)
    v = delta_vectors(z[None], layout, rows, groups)[0]
    np.testing.assert_array_equal(to_z_layout(v, layout, shape, groups), z)
