"""Channel tracing (graph/tracing.py, graph/passthrough.py) on small graphs, checked by running them.

For a traced unit, silencing it at the producer (its weight row and bias set to zero) must change
the model output exactly as zeroing the consumer columns the trace assigns to it does.
"""

from __future__ import annotations

import numpy as np
import pytest
from graphs import init, make_model, randn, run, vi
from test_structured import with_weights
from onnx import helper, numpy_helper

from onnx_obs.graph.passthrough import (
    ELEMENTWISE,
    NORMS,
    PASS_THROUGH,
    POOLS,
    REDUCE,
    REGROUP,
    UNARY,
)
from onnx_obs.graph.sites import find_sites, site_matrix
from onnx_obs.graph.tracing import trace_units


def conv(x, w, y, b=None, **kw):
    return helper.make_node("Conv", [x, w] + ([b] if b else []), [y], name=y, **kw)


def check_columns(model, group, silence: dict, feeds) -> None:
    """Per unit: silencing it at the producer == zeroing its columns in every consumer.
    `silence`: tensor name -> axis of the producer tensors that hold one entry per unit."""
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for u in range(group.units):
        at_producer = {n: arrays[n].copy() for n in silence}
        for name, axis in silence.items():
            np.moveaxis(at_producer[name], axis, 0)[u] = 0
        at_consumers = {}
        for c in group.consumers:
            m = site_matrix(c.site)
            m[:, c.columns[u]] = 0
            at_consumers[c.site.tensor_name] = c.site.from_matrix(m)
        want = run(with_weights(model, at_producer), feeds)["y"]
        got = run(with_weights(model, at_consumers), feeds)["y"]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def traced(model, producer: str):
    sites, _ = find_sites(model)
    groups, left = trace_units(model, sites, {producer})
    return groups, left


def test_conv_relu_conv():
    a = {"W1": randn([4, 3, 3, 3]), "b1": randn([4], 1), "W2": randn([5, 4, 3, 3], 2), "b2": randn([5], 3)}
    nodes = [conv("x", "W1", "c", "b1"), helper.make_node("Relu", ["c"], ["r"]),
             conv("r", "W2", "y", "b2", pads=[1, 1, 1, 1])]
    model = make_model(nodes, [vi("x", shape=["n", 3, 6, 6])], [vi("y", shape=None)],
                       [init(k, v) for k, v in a.items()])
    (group,), _ = traced(model, "W1")
    assert group.units == 4 and group.path == ["Relu", "Conv"]
    assert [(c.tensor, c.axis) for c in group.cuts] == [("W1", 0), ("b1", 0), ("W2", 1)]
    for cut in group.cuts:   # one entry per unit, each its own
        assert [p.tolist() for p in cut.positions] == [[u] for u in range(4)]
    (consumer,) = group.consumers
    assert consumer.site.name == "W2"
    assert consumer.bias.tensor == "b2" and consumer.bias.shape == (5,) and consumer.bias.scale == 1.0
    check_columns(model, group, {"W1": 0, "b1": 0}, {"x": randn([2, 3, 6, 6], 4)})
    _, left = traced(model, "W2")
    assert "graph output 'y'" in left[0].reason


def test_concat_offsets_the_second_input():
    a = {"Wa": randn([3, 2, 1, 1]), "Wb": randn([4, 2, 1, 1], 1), "W2": randn([5, 7, 3, 3], 2)}
    nodes = [conv("x", "Wa", "a"), conv("x", "Wb", "b"),
             helper.make_node("Concat", ["a", "b"], ["cat"], axis=1),
             helper.make_node("Relu", ["cat"], ["r"]), conv("r", "W2", "y")]
    model = make_model(nodes, [vi("x", shape=[2, 2, 5, 5])], [vi("y", shape=None)],
                       [init(k, v) for k, v in a.items()])
    feeds = {"x": randn([2, 2, 5, 5], 3)}
    for producer, offset, units in (("Wa", 0, 3), ("Wb", 3, 4)):
        (group,), _ = traced(model, producer)
        assert group.path == ["Concat", "Relu", "Conv"]
        (consumer,) = group.consumers
        assert [c.tolist() for c in consumer.columns] == [
            list(range((offset + u) * 9, (offset + u + 1) * 9)) for u in range(units)]
        check_columns(model, group, {producer: 0}, feeds)


@pytest.mark.parametrize("regroup", ["Flatten", "Reshape"])
def test_flatten_gives_each_channel_a_block(regroup):
    a = {"W1": randn([4, 2, 3, 3]), "W2": randn([3, 64], 1)}
    shape = [init("target", np.array([0, -1], np.int64))] if regroup == "Reshape" else []
    flat = helper.make_node(regroup, ["r", "target"] if shape else ["r"], ["f"])
    nodes = [conv("x", "W1", "c", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]), flat,
             helper.make_node("Gemm", ["f", "W2"], ["y"], transB=1)]
    model = make_model(nodes, [vi("x", shape=["n", 2, 4, 4])], [vi("y", shape=["n", 3])],
                       [init(k, v) for k, v in a.items()] + shape)
    (group,), _ = traced(model, "W1")
    (consumer,) = group.consumers
    assert [c.tolist() for c in consumer.columns] == [list(range(16 * u, 16 * (u + 1))) for u in range(4)]
    assert consumer.bias.tensor is None and consumer.bias.shape == (3,)   # room for a new C
    assert not group.edits   # the target keeps the batch and infers the rest
    check_columns(model, group, {"W1": 0}, {"x": randn([2, 2, 4, 4], 2)})


def test_an_op_without_a_handler_leaves_the_producer():
    nodes = [conv("x", "W1", "c"), helper.make_node("Hardmax", ["c"], ["s"], axis=1), conv("s", "W2", "y")]
    model = make_model(nodes, [vi("x", shape=[1, 2, 5, 5])], [vi("y", shape=None)],
                       [init("W1", randn([3, 2, 3, 3])), init("W2", randn([2, 3, 3, 3], 1))])
    groups, (left,) = traced(model, "W1")
    assert not groups and "Hardmax" not in PASS_THROUGH
    assert left.reason.startswith("its channels are read by Hardmax") and "cannot follow" in left.reason


@pytest.mark.parametrize("axis, opset, follows", [(1, 17, False), (-1, 17, True), (3, 17, True),
                                                  (0, 17, True), (1, 11, False), (0, 11, False),
                                                  (2, 11, True)])
def test_softmax_passes_units_only_over_other_axes(axis, opset, follows):
    """Softmax over the channel axis ties them; over another one (attention over keys) each
    channel's slice stays its own (opset < 13 flattens from `axis` on: the channels must be before)."""
    nodes = [conv("x", "W1", "c"), helper.make_node("Softmax", ["c"], ["s"], axis=axis), conv("s", "W2", "y")]
    model = make_model(nodes, [vi("x", shape=[1, 2, 5, 5])], [vi("y", shape=None)],
                       [init("W1", randn([3, 2, 3, 3])), init("W2", randn([2, 3, 3, 3], 1))], opset=opset)
    groups, left = traced(model, "W1")
    assert bool(groups) == follows
    if not follows:
        assert "Softmax" in left[0].reason and "normalises over its channels" in left[0].reason


def test_residual_add_couples_the_channels():
    nodes = [conv("x", "W1", "c", pads=[1, 1, 1, 1]), helper.make_node("Add", ["c", "x"], ["s"]),
             conv("s", "W2", "y")]
    model = make_model(nodes, [vi("x", shape=[1, 2, 5, 5])], [vi("y", shape=None)],
                       [init("W1", randn([2, 2, 3, 3])), init("W2", randn([2, 2, 3, 3], 1))])
    _, (left,) = traced(model, "W1")
    assert "coupled with 'x' by Add" in left.reason and "residual" in left.reason


def test_the_registry_covers_every_op_family():
    families = (UNARY, ELEMENTWISE, POOLS, set(NORMS), REGROUP, REDUCE,
                {"Shape", "Transpose", "Concat", "Split", "Slice", "Conv", "Softmax", "LogSoftmax", "MatMul"})
    assert set(PASS_THROUGH) == set().union(*families)
    assert sum(map(len, families)) == len(PASS_THROUGH)   # no op in two families
