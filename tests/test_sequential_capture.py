"""One-pass sequential capture (graph slices on cached boundary tensors) against the whole model.

The reference is the per-wave path: onnxruntime runs the whole (partly pruned) model once per
depth wave. Slices must give the same Hessians and the same pruned model, run every node at most
once, and fall back to the per-wave path where a boundary cannot be cut (a sequence).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from graphs import constant, init, make_model, randn, vi
from onnx_obs import api
from onnx_obs.calib import load_calibration
from onnx_obs.graph.capture import site_depths
from onnx_obs.graph.model_io import from_proto
from onnx_obs.graph.sites import find_sites
from onnx_obs.graph.slicing import plan_slices
from onnx_obs.hessian.capture import capture_hessians
from onnx_obs.hessian.sequential import SlicedCapture
from onnx_obs.progress import Progress
from onnx_obs.strategies import layerwise


def residual_model(middle: str = "plain") -> onnx.ModelProto:
    """x -> fc0 -> relu h0 -> [middle] -> fc1 -> relu h1; r = (h1 + h0) * 0.5 (a Constant);
    fc2 through a Transpose of its weight; Concat(fc2 out, h0) -> fc3 -> y; h1 a second output.
    middle: "plain" (fc1 reads h0), "if" (an If whose branches read h0 from the outer scope),
    "sequence" (h0 travels through a sequence that a later wave also reads)."""
    inits = [init("w0", randn([8, 8], 1)), init("w1", randn([8, 8], 2)), init("w2t", randn([8, 8], 3)),
             init("w3", randn([4, 16], 4))]
    nodes = [helper.make_node("Gemm", ["x", "w0"], ["a0"], name="fc0", transB=1),
             helper.make_node("Relu", ["a0"], ["h0"], name="relu0")]
    fc1_in, fc2_extra = "h0", None
    if middle == "if":
        then = helper.make_graph([helper.make_node("Relu", ["h0"], ["t_out"])], "then", [],
                                 [vi("t_out", np.float32, None)])
        other = helper.make_graph([helper.make_node("Neg", ["h0"], ["e_out"])], "else", [],
                                  [vi("e_out", np.float32, None)])
        nodes += [constant("cond", np.array(True)),
                  helper.make_node("If", ["cond"], ["branch"], name="if", then_branch=then, else_branch=other)]
        fc1_in = "branch"
    elif middle == "sequence":
        nodes += [helper.make_node("SequenceConstruct", ["h0", "h0"], ["seq"], name="seq"),
                  constant("zero", np.array(0, np.int64)), constant("one", np.array(1, np.int64)),
                  helper.make_node("SequenceAt", ["seq", "zero"], ["s0"], name="at0"),
                  helper.make_node("SequenceAt", ["seq", "one"], ["s1"], name="at1")]
        fc1_in, fc2_extra = "s0", "s1"
    nodes += [helper.make_node("MatMul", [fc1_in, "w1"], ["a1"], name="fc1"),
              helper.make_node("Relu", ["a1"], ["h1"], name="relu1"),
              helper.make_node("Add", ["h1", "h0"], ["r"], name="residual"),
              constant("half", np.array(0.5, np.float32)),
              helper.make_node("Mul", ["r", "half"], ["r2"], name="scale")]
    if fc2_extra:
        nodes.append(helper.make_node("Add", ["r2", fc2_extra], ["r3"], name="extra"))
    nodes += [helper.make_node("Transpose", ["w2t"], ["w2"], name="w2_t"),
              helper.make_node("MatMul", ["r3" if fc2_extra else "r2", "w2"], ["m2"], name="fc2"),
              helper.make_node("Concat", ["m2", "h0"], ["c"], name="concat", axis=1),
              helper.make_node("Gemm", ["c", "w3"], ["y"], name="fc3", transB=1)]
    return make_model(nodes, [vi("x", np.float32, ["batch", 8])],
                      [vi("y", np.float32, ["batch", 4]), vi("h1", np.float32, ["batch", 8])], inits)


def _waves(model):
    loaded = from_proto(model)
    sites, _ = find_sites(loaded.model)
    depth = site_depths(loaded.model, sites)
    return loaded, [[s for s in sites if depth[s.name] == d] for d in sorted(set(depth.values()))]


def _weights(model) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("middle", ["plain", "if"])
def test_slices_give_the_whole_models_hessians(middle):
    """Without pruning between waves, each wave's sliced Hessians equal one capture of all sites
    on the whole model (onnxruntime computes the same tensors, only cut into pieces)."""
    loaded, waves = _waves(residual_model(middle))
    assert [len(w) for w in waves] == [1, 1, 1, 1]
    cal = load_calibration({"x": randn([20, 8], 9)}, loaded.model, batch_size=6)
    with Progress(enabled=False) as bar:
        whole = capture_hessians(loaded, [s for w in waves for s in w], cal, "cpu", bar)
    sliced = SlicedCapture(loaded, waves, cal, "cpu", memory_budget=1 << 30)
    for i, wave in enumerate(waves):
        for s, H in sliced.capture(i).items():
            np.testing.assert_allclose(H, whole[s], rtol=1e-6, atol=1e-9)
    assert not sliced.cache.memory  # every boundary tensor dropped after its last reader
    sliced.close()


@pytest.mark.parametrize("middle", ["plain", "if"])
def test_every_node_runs_at_most_once(middle):
    """The slices together run each node once (Constants, static, may repeat), never the nodes
    after the last wave's inputs (fc3, the second output's consumers)."""
    loaded, waves = _waves(residual_model(middle))
    g = loaded.model.graph
    targets = [sorted({u.activation for s in w for u in s.uses}) for w in waves]
    plans = plan_slices(g, {"x"}, targets, {s.tensor_name: i for i, w in enumerate(waves) for s in w})
    ran = [g.node[k].name for p in plans for k in p.nodes if g.node[k].op_type != "Constant"]
    assert len(ran) == len(set(ran))
    assert "fc3" not in ran and "concat" in ran and "fc0" in ran
    assert plans[0].nodes == [] and plans[0].inputs == ["x"]  # fc0 reads the fed input as it is


def _prune_both(model, monkeypatch, **kw):
    data = {"x": randn([40, 8], 7)}
    kw = dict(sparsity=0.5, batch_size=16, **kw)
    sliced = api.prune(model, data, **kw)
    with monkeypatch.context() as m:
        m.setattr(layerwise, "_sliced_capture", lambda ctx, waves: None)
        whole = api.prune(model, data, **kw)
    return sliced, whole


@pytest.mark.parametrize("middle", ["plain", "if", "sequence"])
def test_pruned_model_equals_the_per_wave_path(middle, monkeypatch):
    sliced, whole = _prune_both(residual_model(middle), monkeypatch)
    a, b = _weights(sliced.model), _weights(whole.model)
    for name in a:
        np.testing.assert_array_equal(a[name] == 0, b[name] == 0)
        np.testing.assert_allclose(a[name], b[name], rtol=1e-6, atol=1e-7)
    fell_back = [n for n in sliced.report.notes if n.startswith("sequential capture")]
    if middle == "sequence":  # a sequence crosses a boundary: the remaining waves ran whole
        assert fell_back and "not a tensor" in fell_back[0]
    else:
        assert not fell_back


def test_spilled_boundaries_give_the_same_model(monkeypatch, tmp_path):
    """capture_memory_mb=0: every boundary tensor goes to disk and comes back unchanged."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    model = residual_model()
    data = {"x": randn([40, 8], 7)}
    disk = api.prune(model, data, sparsity=0.5, batch_size=16, capture_memory_mb=0)
    memory = api.prune(model, data, sparsity=0.5, batch_size=16)
    for name, w in _weights(disk.model).items():
        np.testing.assert_array_equal(w, _weights(memory.model)[name])
    assert any("spilled to disk" in n for n in disk.report.notes)
    assert not any("spilled" in n for n in memory.report.notes)
    assert list(tmp_path.iterdir()) == []  # the spill folder is removed


def test_report_has_phase_times(monkeypatch):
    res = api.prune(residual_model(), {"x": randn([40, 8], 7)}, sparsity=0.5)
    phases = res.report.to_dict()["totals"]["phase_seconds"]
    assert list(phases)[:4] == ["load", "capture", "hessians", "solves"]
    assert "validation" in phases and all(v >= 0 for v in phases.values())
    assert sum(phases.values()) <= res.report.wall_seconds + 1e-3
