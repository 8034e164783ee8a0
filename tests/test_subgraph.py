"""A group's own part of the graph (graph/subgraph.py), as the latency table times it: fed with the
activations the whole model computes there, the part computes what the whole model computes at
the group's consumers (onnxruntime on both), before and after the group's units are removed
from it; and a group's part holds fewer nodes than the model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from bert_graph import bert_model
from graphs import randn, run, run_tensors
from test_coupled import c2f_block, mobile_block, resnet_block

from onnx_obs.graph.protos import infer_shapes
from onnx_obs.graph.sites import find_sites
from onnx_obs.graph.subgraph import group_region, region_group, region_model
from onnx_obs.graph.surgery import shrink
from onnx_obs.graph.tracing import trace_units


@pytest.mark.parametrize("build", [resnet_block, mobile_block, c2f_block,
                                   lambda: bert_model(computed=True)],
                         ids=["resnet", "mobile", "c2f", "bert_computed_reshapes"])
def test_part_computes_what_the_model_computes(build):
    model, _ = build()
    dims = [d.dim_value or 2 for d in model.graph.input[0].type.tensor_type.shape.dim]
    feeds = {"x": randn(dims, 30)}
    inferred = infer_shapes(model).graph
    infos = [*inferred.value_info, *inferred.output]
    types = {v.name: v.type.tensor_type.elem_type for v in infos}
    ranks = {v.name: (v.type.tensor_type.elem_type, len(v.type.tensor_type.shape.dim)) for v in infos}
    groups, _ = trace_units(model, find_sites(model)[0])
    sizes = []
    for group in groups:
        region = group_region(model, group, types)
        assert region is not None
        sizes.append(len(region.nodes))
        values = run_tensors(model, feeds, region.inputs + region.outputs)
        specs = {x: (onnx.helper.np_dtype_to_tensor_dtype(values[x].dtype), list(values[x].shape))
                 for x in region.inputs}
        part = region_model(model, region, specs, ranks)
        onnx.checker.check_model(part, full_check=True)
        part_feeds = {x: values[x] for x in region.inputs}
        got = run(part, part_feeds)
        for o in region.outputs:
            np.testing.assert_allclose(got[o], values[o], rtol=1e-5, atol=1e-5)
        removed = np.arange(1, group.units, 2)   # every other unit
        shrink(part, region_group(group, region), removed)
        whole = onnx.ModelProto()
        whole.CopyFrom(model)
        shrink(whole, group, removed)
        want = run_tensors(whole, feeds, region.outputs)
        got = run(part, part_feeds)
        for o in region.outputs:
            np.testing.assert_allclose(got[o], want[o], rtol=1e-5, atol=1e-5)
    assert len(groups) > 1 and min(sizes) < len(model.graph.node)
