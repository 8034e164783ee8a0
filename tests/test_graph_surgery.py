"""Shape surgery (graph/surgery.py): a shrunk model, run in onnxruntime, computes what numpy
computes with the kept slices of the original weights."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from graphs import init, make_model, randn, run, vi
from numpy.lib.stride_tricks import sliding_window_view
from onnx import helper, numpy_helper

from onnx_obs.errors import OnnxObsError
from onnx_obs.graph.sites import find_sites
from onnx_obs.graph.surgery import read_bias, shrink, write_bias
from onnx_obs.graph.tracing import trace_units


def group_of(model, producer: str):
    sites, _ = find_sites(model)
    (group,), _ = trace_units(model, sites, {producer})
    return group


def relu(x):
    return np.maximum(x, 0.0)


def test_shrink_gemm_relu_gemm():
    a = {"W1": randn([6, 5]), "b1": randn([6], 1), "W2": randn([3, 6], 2), "b2": randn([3], 3)}
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], transB=1),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "W2", "b2"], ["y"], transB=1)]
    model = make_model(nodes, [vi("x", shape=["n", 5])], [vi("y", shape=["n", 3])],
                       [init(k, v) for k, v in a.items()])
    gone = [0, 4]
    keep = [u for u in range(6) if u not in gone]
    shrink(model, group_of(model, "W1"), gone)
    onnx.checker.check_model(model, full_check=True)
    x = randn([7, 5], 4).astype(np.float64)
    want = relu(x @ a["W1"][keep].T + a["b1"][keep]) @ a["W2"][:, keep].T + a["b2"]
    np.testing.assert_allclose(run(model, {"x": x.astype(np.float32)})["y"], want, rtol=1e-4, atol=1e-4)


def conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Valid, stride-1 convolution."""
    win = sliding_window_view(x, w.shape[2:], axis=(2, 3))   # N, C, H', W', kh, kw
    return np.einsum("nchwij,ocij->nohw", win, w) + b[None, :, None, None]


def test_shrink_conv_reshape_gemm_edits_the_target():
    a = {"W1": randn([4, 2, 3, 3]), "b1": randn([4], 1), "W2": randn([3, 36], 2)}
    nodes = [helper.make_node("Conv", ["x", "W1", "b1"], ["c"]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Reshape", ["r", "target"], ["f"]),
             helper.make_node("Gemm", ["f", "W2"], ["y"], transB=1)]
    model = make_model(nodes, [vi("x", shape=[2, 2, 5, 5])], [vi("y", shape=[2, 3])],
                       [init(k, v) for k, v in a.items()] + [init("target", np.array([-1, 36], np.int64))])
    group = group_of(model, "W1")
    (edit,) = group.edits
    assert (edit.kind, edit.base) == ("reshape", 36)
    gone = [2]
    keep = [u for u in range(4) if u not in gone]
    shrink(model, group, gone)
    onnx.checker.check_model(model, full_check=True)
    target = next(t for t in model.graph.initializer if t.name == "target")
    assert numpy_helper.to_array(target).tolist() == [-1, 9 * len(keep)]
    x = randn([2, 2, 5, 5], 3).astype(np.float64)
    r = relu(conv2d(x, a["W1"][keep].astype(np.float64), a["b1"][keep]))
    cols = np.concatenate([np.arange(9) + 9 * u for u in keep])
    want = r.reshape(2, -1) @ a["W2"][:, cols].T
    np.testing.assert_allclose(run(model, {"x": x.astype(np.float32)})["y"], want, rtol=1e-4, atol=1e-4)


def test_write_bias_adds_an_input_and_read_bias_reads_it():
    a = {"W1": randn([4, 3]), "W2": randn([2, 4], 1)}
    nodes = [helper.make_node("Gemm", ["x", "W1"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "W2"], ["y"], transB=1, alpha=2.0, beta=0.5)]
    model = make_model(nodes, [vi("x", shape=[5, 3])], [vi("y", shape=[5, 2])],
                       [init(k, v) for k, v in a.items()])
    x = randn([5, 3], 2)
    before = run(model, {"x": x})["y"]
    slot = group_of(model, "W1").consumers[0].bias
    assert slot.tensor is None and slot.scale == 0.5 / 2.0
    values = np.array([0.75, -1.5])   # in 2-D view units: y = alpha * (W r + values)
    write_bias(model, slot, values)
    assert slot.tensor in model.graph.node[2].input
    np.testing.assert_allclose(read_bias(model, slot), values, rtol=1e-6)
    np.testing.assert_allclose(run(model, {"x": x})["y"], before + 2.0 * values, rtol=1e-5, atol=1e-5)


def test_an_inconsistent_cut_is_refused():
    nodes = [helper.make_node("Gemm", ["x", "W1"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "W2"], ["y"], transB=1)]
    model = make_model(nodes, [vi("x", shape=[5, 3])], [vi("y", shape=[5, 2])],
                       [init("W1", randn([4, 3])), init("W2", randn([2, 4], 1))])
    group = group_of(model, "W1")
    producer_only = dataclasses.replace(group, cuts=group.cuts[:1])   # the consumer keeps 4 inputs
    with pytest.raises(OnnxObsError, match="removing units left inconsistent shapes"):
        shrink(model, producer_only, [1])
