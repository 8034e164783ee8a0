"""The proto helpers (graph/protos.py) against onnx's own readers and onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import constant, init, make_model, randn, run_tensors, vi
from onnx import helper, numpy_helper

from onnx_obs.graph.protos import (
    FLOAT_TYPES,
    NUMPY_FLOAT_TYPES,
    attrs,
    constant_value,
    constants,
    infer_shapes,
    readers,
    unique_name,
)


def test_attrs_are_the_values_the_node_was_made_with():
    given = {"alpha": 0.25, "transB": 1, "perm": [2, 0, 1], "mode": "constant",
             "scales": [0.5, 2.0], "value": numpy_helper.from_array(randn([2, 3]), "v")}
    node = helper.make_node("Anything", ["x"], ["y"], **given)
    got = attrs(node)
    assert set(got) == set(given)
    assert got["alpha"] == pytest.approx(given["alpha"]) and got["transB"] == given["transB"]
    assert list(got["perm"]) == given["perm"] and list(got["scales"]) == given["scales"]
    assert got["mode"] in (given["mode"], given["mode"].encode())
    assert np.array_equal(numpy_helper.to_array(got["value"]), numpy_helper.to_array(given["value"]))
    assert attrs(helper.make_node("Relu", ["x"], ["y"])) == {}


def test_constants_hold_initializers_and_constant_nodes():
    arrays = {"w": randn([3, 4]), "c": randn([4], 1)}
    nodes = [constant("c", arrays["c"]),
             helper.make_node("Constant", [], ["k"], value_ints=[2, -1]),
             helper.make_node("Constant", [], ["one"], value_int=1),
             helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "c"], ["y"])]
    model = make_model(nodes, [vi("x", shape=[2, 3])], [vi("y", shape=[2, 4])], [init("w", arrays["w"])])
    values = run_tensors(model, {"x": randn([2, 3], 2)}, ["c", "k", "one"])

    table = constants(model.graph)
    assert set(table) == {"w", "c"}
    assert np.array_equal(numpy_helper.to_array(table["w"]), arrays["w"])
    assert np.array_equal(numpy_helper.to_array(table["c"]), values["c"])
    assert table["c"] is constant_value(model.graph.node[0])   # the node's own tensor

    with_ints = constants(model.graph, ints=True)
    assert set(with_ints) == {"w", "c", "k", "one"}
    for name in ("k", "one"):   # the values onnxruntime computes for the Constant nodes
        assert np.array_equal(numpy_helper.to_array(with_ints[name]), values[name])
    assert set(constants(model.graph, nodes=False)) == {"w"}
    assert constant_value(model.graph.node[1]) is None and constant_value(model.graph.node[3]) is None


def test_readers_list_every_read():
    nodes = [helper.make_node("Mul", ["x", "x"], ["a"]), helper.make_node("Add", ["a", "x"], ["b"]),
             helper.make_node("Clip", ["b", "", "hi"], ["y"])]
    model = make_model(nodes, [vi("x", shape=[3]), vi("hi", shape=[])], [vi("y", shape=[3])])
    want: dict = {}
    for i, node in enumerate(model.graph.node):
        for pos, name in enumerate(node.input):
            if name:
                want.setdefault(name, set()).add((i, pos))
    got = readers(model.graph)
    assert {k: set(v) for k, v in got.items()} == want
    assert sum(map(len, got.values())) == sum(len(v) for v in want.values())


def test_infer_shapes_match_onnxruntime():
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("Gemm", ["f", "V"], ["y"], transB=1)]
    model = make_model(nodes, [vi("x", shape=[2, 3, 7, 7])], [vi("y", shape=None)],
                       [init("W", randn([5, 3, 3, 3])), init("V", randn([4, 80], 1))], check=False)
    inferred = infer_shapes(model)
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    real = run_tensors(model, {"x": randn([2, 3, 7, 7], 2)}, ["c", "r", "f", "y"])
    assert {k: list(v.shape) for k, v in real.items()} == {k: dims[k] for k in real}
    assert not model.graph.value_info   # the input model is left as it was


def test_infer_shapes_strict_and_best_effort():
    # Gemm of [2, 3] by [4, 5]: only strict inference refuses it
    nodes = [helper.make_node("Gemm", ["x", "W"], ["y"])]
    model = make_model(nodes, [vi("x", shape=[2, 3])], [vi("y", shape=[2, 5])],
                       [init("W", randn([4, 5]))], check=False)
    with pytest.raises(onnx.shape_inference.InferenceError):
        infer_shapes(model, strict=True)
    assert infer_shapes(model) is not model
    # a model onnx cannot infer at all (no opset of the default domain): the model itself
    del model.opset_import[:]
    assert infer_shapes(model) is model


def test_numpy_float_types_are_the_float_types_numpy_holds():
    kinds = {t: np.dtype(helper.tensor_dtype_to_np_dtype(t)).kind for t in FLOAT_TYPES}
    assert NUMPY_FLOAT_TYPES == {t for t, kind in kinds.items() if kind == "f"}
    assert onnx.TensorProto.BFLOAT16 in FLOAT_TYPES - NUMPY_FLOAT_TYPES


def test_unique_name_avoids_every_name_in_the_graph():
    nodes = [helper.make_node("Relu", ["x"], ["t"]), helper.make_node("Relu", ["t"], ["t_1"])]
    model = make_model(nodes, [vi("x", shape=[2])], [vi("t_1", shape=[2])], [init("t_2", randn([2]))])
    assert unique_name(model, "fresh") == "fresh"
    assert unique_name(model, "t") == "t_3"   # t, t_1 (node outputs) and t_2 (initializer) taken
    assert unique_name(model, "x") == "x_1"   # a graph input
