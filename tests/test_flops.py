"""Model cost (flops.py): MACs and parameters against direct counts, and the structured resource
model against the counts of the model actually shrunk."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import init, make_model, randn, run_tensors, vi
from onnx import helper, numpy_helper

from onnx_obs.flops import count_macs, count_params, resource_model
from onnx_obs.graph.sites import find_sites
from onnx_obs.graph.surgery import shrink
from onnx_obs.graph.tracing import trace_units


def small_cnn() -> onnx.ModelProto:
    """x [n, 2, 6, 6] -> Conv 2->4 3x3 stride 2 pad 1 -> Relu -> Conv 4->6 1x1 -> Relu -> Flatten
    -> Gemm 54->3 -> MatMul 3->2."""
    a = {"W1": randn([4, 2, 3, 3]), "b1": randn([4], 1), "W2": randn([6, 4, 1, 1], 2),
         "W3": randn([3, 54], 3), "b3": randn([3], 4), "W4": randn([3, 2], 5)}
    a["W1"][0, 0] = 0   # some zeros to count
    nodes = [helper.make_node("Conv", ["x", "W1", "b1"], ["c1"], name="c1", strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "W2"], ["c2"], name="c2"),
             helper.make_node("Relu", ["c2"], ["r2"]), helper.make_node("Flatten", ["r2"], ["f"]),
             helper.make_node("Gemm", ["f", "W3", "b3"], ["g"], name="fc", transB=1),
             helper.make_node("MatMul", ["g", "W4"], ["y"], name="mm")]
    return make_model(nodes, [vi("x", shape=["n", 2, 6, 6])], [vi("y", shape=["n", 2])],
                      [init(k, v) for k, v in a.items()])


def direct_macs(model) -> dict[str, int]:
    """MACs per node from the shapes onnxruntime gives at batch 1."""
    s = {k: v.shape for k, v in run_tensors(model, {"x": randn([1, 2, 6, 6])}, ["c1", "c2", "f", "g", "y"]).items()}
    w = {t.name: tuple(t.dims) for t in model.graph.initializer}
    return {"c1": int(np.prod(s["c1"])) * w["W1"][1] * 9,          # every output: C_in x 3 x 3
            "c2": int(np.prod(s["c2"])) * w["W2"][1],              # every output: C_in x 1 x 1
            "fc": int(np.prod(s["g"])) * s["f"][1],
            "mm": int(np.prod(s["y"])) * s["g"][1]}


def test_count_macs_matches_a_direct_count():
    model = small_cnn()
    total, per_node = count_macs(model)
    assert per_node == direct_macs(model)
    assert total == sum(per_node.values())


def test_count_params_counts_every_float_weight():
    model = small_cnn()
    arrays = [numpy_helper.to_array(t) for t in model.graph.initializer]
    assert count_params(model) == {"params": sum(a.size for a in arrays),
                                   "nonzero_params": sum(int(np.count_nonzero(a)) for a in arrays)}


@pytest.mark.parametrize("kind", ["params", "macs"])
def test_resource_model_predicts_the_shrunk_model(kind):
    model = small_cnn()
    sites, _ = find_sites(model)
    groups, _ = trace_units(model, sites)
    assert [g.producer.name for g in groups] == ["W1", "W2", "W3"]   # W4 feeds the output
    resource = resource_model(model, groups, kind)

    def measured(m):
        return count_params(m)["params"] if kind == "params" else count_macs(m)[0]

    assert resource(np.zeros(len(groups))) == pytest.approx(measured(model))
    removed = {"W1": [0], "W2": [1, 4], "W3": [2]}
    shrunk = onnx.ModelProto()
    shrunk.CopyFrom(model)
    for name, units in removed.items():   # W2 loses output units and, through W1, input units
        (group,), _ = trace_units(shrunk, find_sites(shrunk)[0], {name})
        shrink(shrunk, group, units)
    counts = np.array([len(removed[g.producer.name]) for g in groups], dtype=float)
    assert resource(counts) == pytest.approx(measured(shrunk))
