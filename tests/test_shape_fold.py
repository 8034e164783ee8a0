"""Symbolic shape math (graph/shape_fold.py) against the shapes onnxruntime produces and numpy's
own reshape."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import init, make_model, randn, run_tensors, vi
from onnx import helper

from onnx_obs.graph.protos import constants
from onnx_obs.graph.shape_fold import (
    ShapeMath,
    product,
    regroup,
    reshape_dims,
    tensor_shapes,
)


def concrete(dims: list, batch: int) -> list[int]:
    return [batch if d == "batch" else d for d in dims]


def test_a_view_target_folds_to_the_real_shape():
    # x.view(x.size(0), -1) as the TorchScript exporter writes it: Shape, Gather, Unsqueeze, Concat
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "zero"], ["b"], axis=0),
             helper.make_node("Unsqueeze", ["b", "axes"], ["b1"]),
             helper.make_node("Concat", ["b1", "minus1"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["y"])]
    model = make_model(nodes, [vi("x", shape=["batch", 4, 3, 3])], [vi("y", shape=None)],
                       [init("zero", np.array(0, np.int64)), init("axes", np.array([0], np.int64)),
                        init("minus1", np.array([-1], np.int64))])
    shapes = tensor_shapes(model)
    target = ShapeMath(list(model.graph.node), constants(model.graph), shapes).target("target")
    assert target == ["batch", -1]
    dims = reshape_dims(shapes["x"], target)
    x = randn([5, 4, 3, 3])
    assert concrete(dims, 5) == list(run_tensors(model, {"x": x}, ["y"])["y"].shape)


def test_shapes_after_a_computed_reshape_are_recovered():
    # x.flatten(2).transpose(1, 2) as older exports write it: Reshape(x, Concat(Slice(Shape(x),
    # 0, 2), [-1])); onnx's own inference (at opset 13) knows nothing after it
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Slice", ["s", "start", "end"], ["s2"]),
             helper.make_node("Concat", ["s2", "minus1"], ["t"], axis=0),
             helper.make_node("Reshape", ["x", "t"], ["f"]),
             helper.make_node("Transpose", ["f"], ["ft"], perm=[0, 2, 1]),
             helper.make_node("Relu", ["ft"], ["y"])]
    model = make_model(nodes, [vi("x", shape=["batch", 4, 3, 3])], [vi("y", shape=["batch", 9, 4])],
                       [init("start", np.array([0], np.int64)), init("end", np.array([2], np.int64)),
                        init("minus1", np.array([-1], np.int64))], opset=13)
    inferred = onnx.shape_inference.infer_shapes(model).graph
    assert not any(v.name == "f" and v.type.tensor_type.HasField("shape") for v in inferred.value_info)
    shapes = tensor_shapes(model)
    real = run_tensors(model, {"x": randn([5, 4, 3, 3])}, ["s2", "t", "f", "ft", "y"])
    for name, value in real.items():
        assert concrete(shapes[name], 5) == list(value.shape), name


@pytest.mark.parametrize("dims, target", [([2, 3, 4], [0, -1]), ([2, 3, 4], [-1, 4]), ([6, 4], [2, 0, -1]),
                                          ([2, 3, 4], [4, 3, 2]), ([1, 24], [-1, 2, 3])])
def test_reshape_dims_match_numpy(dims, target):
    want = np.zeros(dims).reshape([dims[i] if t == 0 else t for i, t in enumerate(target)]).shape
    assert reshape_dims(dims, target) == list(want)


def test_reshape_dims_with_symbols():
    assert reshape_dims(["n", 4, 3], [0, -1]) == ["n", 12]
    assert reshape_dims(["n", 4, 3], [-1, 12]) == ["n", 12]
    assert reshape_dims(["n", 4, None], [0, -1]) == ["n", None]


def test_product():
    for dims in ([2, 3, 4], [5], []):
        assert product(dims) == int(np.prod(dims))
    assert product(["n", 1]) == "n"
    assert product(["n", 2]) is None and product([None, 3]) is None


def channel_positions(dims_in: list, dims_out: list, axis: int):
    """Along which positions of which output axis each input channel lands, by numpy's reshape
    of the channel index: (output axis, positions per channel), None if no output axis holds
    one channel per position."""
    channel = np.indices(dims_in)[axis].reshape(dims_out)
    for out_axis in range(len(dims_out)):
        moved = np.moveaxis(channel, out_axis, 0).reshape(dims_out[out_axis], -1)
        if (moved == moved[:, :1]).all() and len(np.unique(moved[:, 0])) == dims_in[axis]:
            return out_axis, [np.flatnonzero(moved[:, 0] == c).tolist() for c in range(dims_in[axis])]
    return None


@pytest.mark.parametrize("dims_in, dims_out, axis", [
    ([2, 4, 3, 3], [2, 36], 1), ([2, 4, 3, 3], [2, 4, 9], 1), ([2, 1, 1, 4], [2, 4], 3),
    ([6, 4], [2, 3, 4], 1), ([2, 4, 3], [2, 2, 6], 1)])
def test_regroup_matches_numpy(dims_in, dims_out, axis):
    out_axis, outer, inner = regroup(dims_in, dims_out, axis)
    found = channel_positions(dims_in, dims_out, axis)
    if found is None:
        assert out_axis is None
        return
    size = dims_in[axis]
    block = np.arange(outer)[:, None] * size * inner + np.arange(inner)
    assert out_axis == found[0]
    assert [sorted((block + c * inner).ravel().tolist()) for c in range(size)] == found[1]


def test_a_minus_one_batch_keeps_the_input_dimension_name_over_stale_made_up_names():
    """Reshape(allowzero=1, [-1, 5, 4, 4]) as the dynamo exporter writes it: inference names the
    -1 afresh ('unk__N', here also left in value_info by an earlier inference); the fold makes it
    the input's 'batch' again, for this tensor and the ones after it. onnxruntime agrees."""
    nodes = [helper.make_node("Reshape", ["x", "target"], ["h"], allowzero=1),
             helper.make_node("Transpose", ["h"], ["y"], perm=[0, 2, 1, 3])]
    model = make_model(nodes, [vi("x", shape=["batch", 5, 16])], [vi("y", shape=None)],
                       [init("target", np.array([-1, 5, 4, 4], np.int64))])
    model.graph.value_info.append(helper.make_tensor_value_info("h", onnx.TensorProto.FLOAT, ["unk__7", 5, 4, 4]))
    shapes = tensor_shapes(model)
    assert shapes["h"] == ["batch", 5, 4, 4] and shapes["y"] == ["batch", 4, 5, 4]
    out = run_tensors(model, {"x": randn([3, 5, 16], 0)}, ["h", "y"])
    assert [list(out[k].shape) for k in ("h", "y")] == [concrete(shapes[k], 3) for k in ("h", "y")]
    assert [vi.name for vi in model.graph.value_info] == ["h"]   # the model itself is left alone


def test_shapes_computed_from_shape_slices_resolve_where_onnx_inference_makes_names_up():
    """HF BERT's position embeddings: a table sliced to x's token count read with Shape. onnx's
    inference names that count afresh (and every tensor after it); onnxruntime's symbolic
    inference evaluates it. Checked against the shapes onnxruntime produces."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "one"], ["t"], axis=0),
             helper.make_node("Unsqueeze", ["t", "axes"], ["ends"]),
             helper.make_node("Slice", ["table", "starts", "ends", "axes"], ["pos"]),
             helper.make_node("Add", ["x", "pos"], ["y"])]
    model = make_model(nodes, [vi("x", shape=["batch", 5, 16])], [vi("y", shape=None)],
                       [init("table", randn([64, 16], 0)), init("one", np.array(1, np.int64)),
                        init("axes", np.array([0], np.int64)), init("starts", np.array([0], np.int64))])
    del model.graph.value_info[:]
    shapes = tensor_shapes(model)
    assert shapes["pos"] == [5, 16] and shapes["y"] == ["batch", 5, 16]
    out = run_tensors(model, {"x": randn([3, 5, 16], 1)}, ["pos", "y"])
    assert [list(out[k].shape) for k in ("pos", "y")] == [concrete(shapes[k], 3) for k in ("pos", "y")]

