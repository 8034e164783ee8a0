"""Transformers under --structure channels: attention heads (the Q, K, V rows of a head, the
Reshape constants that count heads and the hidden width, the output projection's columns) and
FFN neurons (through the Erf-decomposed Gelu) are removed as units.

References are computed here without onnx_obs: magnitude must pick the heads of smallest L1 norm
over Q, K, V rows and out-projection columns (summed by hand), and the shrunk model must compute
what the original computes with those heads' Q/K/V rows (and biases) and out-projection columns
zeroed (onnxruntime on the original graph); structured OBS (damp=0) must land the out projection
and the FFN's second layer on the least-squares refit (numpy lstsq) from their kept inputs.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from bert_graph import FFN, HEAD_DIM, HEADS, HIDDEN, TOKENS, bert_model, bert_weights
from graphs import randn, run_tensors
from onnx import numpy_helper
from test_structured import (
    assert_same_outputs,
    keep_of,
    lstsq_with_bias,
    removed_units,
    weights,
    with_weights,
)

from onnx_obs import api
from onnx_obs.flops import count_macs, resource_model
from onnx_obs.graph.sites import find_sites
from onnx_obs.graph.tracing import trace_units


def head_cols(heads):
    return np.concatenate([np.arange(h * HEAD_DIM, (h + 1) * HEAD_DIM) for h in heads]).astype(int)


def test_heads_and_ffn_groups():
    model, _ = bert_model()
    groups, left = trace_units(model, find_sites(model)[0])
    found = {tuple(p.name for p in g.producers): ([c.site.name for c in g.consumers], g.units) for g in groups}
    assert found == {("Wq", "Wk", "Wv"): (["Wo"], HEADS), ("W1",): (["W2"], FFN)}
    heads = next(g for g in groups if g.producer.name == "Wq")
    assert heads.consumers[0].columns[1].tolist() == list(range(HEAD_DIM, 2 * HEAD_DIM))
    reasons = {x.name: x.reason for x in left}
    assert "LayerNormalization" in reasons["W2"] and "graph output" in reasons["Wc"]


@pytest.mark.parametrize("shapes", ["constant", "computed", "shared"])
@pytest.mark.parametrize("method", ["magnitude", "obs"])
def test_heads_and_neurons_removed(method, shapes):
    computed = shapes == "computed"
    model, a = bert_model(computed=computed, shared=shapes == "shared")
    X = randn([96, TOKENS, HIDDEN], 30)
    res = api.prune(model, {"x": X}, structure="channels", method=method, damp=0.0, sparsity=0.5)
    gone_h, gone_n = removed_units(res, "Wq"), removed_units(res, "W1")
    assert len(gone_h) == HEADS // 2 and len(gone_n) == FFN // 2
    w = weights(res.model)
    kept = HIDDEN - len(gone_h) * HEAD_DIM
    assert [w[k].shape for k in ("Wq", "bq", "Wk", "Wv", "Wo", "W1", "W2")] == [
        (HIDDEN, kept), (kept,), (HIDDEN, kept), (HIDDEN, kept), (kept, HIDDEN), (HIDDEN, FFN // 2), (FFN // 2, HIDDEN)]
    if computed:   # the Concat's constant pieces: heads counts edited, head_dim kept
        assert [w[f"heads_{k}"].tolist() for k in "qkv"] == [[HEADS // 2]] * 3 and w["width"].tolist() == [kept]
        assert w["head_dim_q"].tolist() == [HEAD_DIM]
    elif shapes == "shared":   # each Reshape got its own copy of the shared target, edited alike
        targets = [w[n.input[1]].tolist() for n in res.model.graph.node if n.op_type == "Reshape"]
        assert targets == [[-1, TOKENS, HEADS // 2, HEAD_DIM]] * 3 + [[-1, TOKENS, kept]]
    else:
        assert w["split_heads_q"].tolist() == [0, 0, HEADS // 2, HEAD_DIM] and w["merge_heads"].tolist() == [0, 0, kept]
    ref = {k: v.astype(np.float64).copy() for k, v in a.items()}
    cols = head_cols(gone_h)
    if method == "magnitude":
        norms = [sum(np.abs(a[k][:, head_cols([h])]).sum() for k in ("Wq", "Wk", "Wv"))
                 + np.abs(a["Wo"][head_cols([h])]).sum() for h in range(HEADS)]
        assert sorted(gone_h) == sorted(np.argsort(norms)[:HEADS // 2].tolist())
        l1 = np.abs(a["W1"]).sum(0) + np.abs(a["W2"]).sum(1)
        assert sorted(gone_n) == sorted(np.argsort(l1)[:FFN // 2].tolist())
        for k in ("q", "k", "v"):   # the heads' rows zeroed: with their biases they vanish
            ref[f"W{k}"][:, cols] = 0.0
            ref[f"b{k}"][cols] = 0.0
        ref["Wo"][cols] = 0.0
        ref["W2"][gone_n] = 0.0
    else:
        # Heads first (graph order), then the FFN: its inputs are those of the head-pruned model.
        acts = run_tensors(model, {"x": X}, ["merged"])
        merged = acts["merged"].reshape(-1, HIDDEN)
        target = merged @ a["Wo"] + a["bo"]
        keep = np.setdiff1d(np.arange(HIDDEN), cols)
        Wk, ref["bo"] = lstsq_with_bias(merged[:, keep], target)
        ref["Wo"] = np.zeros((HIDDEN, HIDDEN))
        ref["Wo"][keep] = Wk.T
        mid = with_weights(model, {"Wo": ref["Wo"], "bo": ref["bo"]})
        gelu = run_tensors(mid, {"x": X}, ["gelu"])["gelu"].reshape(-1, FFN)
        keep_n = keep_of(FFN, gone_n)
        Wk, ref["b2"] = lstsq_with_bias(gelu[:, keep_n], gelu @ a["W2"] + a["b2"])
        ref["W2"] = np.zeros((FFN, HIDDEN))
        ref["W2"][keep_n] = Wk.T
    assert_same_outputs(res.model, with_weights(model, ref), {"x": randn([4, TOKENS, HIDDEN], 31)})


def test_macs_counted_after_computed_reshapes():
    """Hand count at batch 1: per token the four projections, the FFN and the head; QK^T and PV."""
    want = TOKENS * (4 * HIDDEN * HIDDEN + 2 * HIDDEN * FFN + 3 * HIDDEN) + 2 * TOKENS * TOKENS * HIDDEN
    for computed in (False, True):
        assert count_macs(bert_model(computed=computed)[0])[0] == want


def test_resource_model_counts_heads_in_the_attention_matmuls():
    """The MACs the planner predicts for removing heads and neurons equal count_macs of the
    shrunk model (QK^T and PV shrink with the heads)."""
    model, _ = bert_model(computed=True)
    groups, _ = trace_units(model, find_sites(model)[0])
    res = api.prune(model, {"x": randn([32, TOKENS, HIDDEN], 3)}, structure="channels",
                    method="magnitude", sparsity=0.5)
    counts = np.array([g.units - next(e["units_after"] for e in res.report.structure
                                      if e["name"] == g.producer.name) for g in groups])
    assert counts.tolist() == [HEADS // 2, FFN // 2]
    predicted = resource_model(model, groups, "macs")(counts)
    assert predicted == count_macs(res.model)[0] < count_macs(model)[0] - 2 * TOKENS * TOKENS * HIDDEN // 2


def exporter_variant(model, a):
    """The model as newer exporters write attention: a padding mask input added to the scores
    through Where (HF BERT), NaN rows of the softmax cleared by IsNaN + Where and K^T as
    Reshape [B*H, T, D] -> Transpose -> Reshape [B, H, D, T] with targets sliced from K's Shape
    (dynamo's scaled_dot_product_attention), and the q/k/v biases one tensor behind Identity
    nodes (the TorchScript exporter deduplicates equal initializers). Returns the variant and
    its weights (bq = bk = bv)."""
    from onnx import helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    a = dict(a, bk=a["bq"], bv=a["bq"])
    for t in [t for t in g.initializer if t.name in ("bq", "bk", "bv")]:
        g.initializer.remove(t)
    ints = {"i0": [0], "i1": [1], "i2": [2], "i3": [3], "i4": [4], "minus_one": [-1]}
    g.initializer.extend(numpy_helper.from_array(np.array(v, np.int64), k) for k, v in ints.items())
    g.initializer.extend([numpy_helper.from_array(a["bq"].astype(np.float32), "b_shared"),
                          numpy_helper.from_array(np.array(0, np.float32), "zero"),
                          numpy_helper.from_array(np.array(-1e4, np.float32), "minus")])
    g.node.remove(next(n for n in g.node if n.name == "k_t"))
    for n in g.node:
        if n.name == "probs":
            n.input[0] = "masked"
        if n.name == "context":
            n.input[0] = "probs_clean"
    g.input.append(helper.make_tensor_value_info("mask", onnx.TensorProto.FLOAT, ["batch", 1, 1, TOKENS]))
    extra = [helper.make_node("Identity", ["b_shared"], [f"b{k}"], name=f"id_{k}") for k in "qkv"]
    extra += [helper.make_node("Equal", ["mask", "zero"], ["pad"], name="pad"),
              helper.make_node("Where", ["pad", "minus", "zero"], ["bias_mask"], name="bias_mask"),
              helper.make_node("Add", ["scaled", "bias_mask"], ["masked"], name="masked"),
              helper.make_node("IsNaN", ["probs"], ["nan"], name="nan"),
              helper.make_node("Where", ["nan", "zero", "probs"], ["probs_clean"], name="probs_clean"),
              helper.make_node("Transpose", ["k_heads"], ["k4"], name="k4", perm=[0, 2, 1, 3]),
              helper.make_node("Shape", ["k4"], ["k4_shape"], name="k4_shape"),
              helper.make_node("Slice", ["k4_shape", "i0", "i2"], ["bh"], name="bh"),
              helper.make_node("Slice", ["k4_shape", "i2", "i3"], ["t_dim"], name="t_dim"),
              helper.make_node("Slice", ["k4_shape", "i3", "i4"], ["d_dim"], name="d_dim"),
              helper.make_node("Concat", ["minus_one", "t_dim", "d_dim"], ["merge_t"], name="merge_t", axis=0),
              helper.make_node("Reshape", ["k4", "merge_t"], ["k3"], name="k3"),
              helper.make_node("Transpose", ["k3"], ["k3t"], name="k3t", perm=[0, 2, 1]),
              helper.make_node("Concat", ["bh", "d_dim", "t_dim"], ["split_t"], name="split_t", axis=0),
              helper.make_node("Reshape", ["k3t", "split_t"], ["k_t"], name="k_t")]
    nodes = extra + list(g.node)
    del g.node[:]
    g.node.extend(sorted(nodes, key=lambda n: 0 if n.op_type == "Identity" else 1))
    ordered = onnx.helper.make_graph([], "g", [], [])  # topological order for onnxruntime
    done, pending = {i.name for i in g.input} | {t.name for t in g.initializer}, list(g.node)
    while pending:
        n = next(n for n in pending if all(x in done for x in n.input if x))
        ordered.node.append(n)
        done.update(n.output)
        pending.remove(n)
    del g.node[:]
    g.node.extend(ordered.node)
    return m, a


@pytest.mark.parametrize("method", ["magnitude", "obs"])
def test_heads_through_a_padding_mask_sdpa_key_transpose_and_deduplicated_biases(method):
    """The variant prunes the same heads and neurons as the plain graph, and computes what the
    variant computes with those heads' Q/K/V rows and out-projection columns zeroed (magnitude),
    or the same as the plain graph pruned the same way (OBS: the mask is all ones here)."""
    plain, a = bert_model(a=dict(bert_weights(), bk=bert_weights()["bq"], bv=bert_weights()["bq"]))
    model, a = exporter_variant(plain, a)
    X = randn([96, TOKENS, HIDDEN], 30)
    mask = np.ones((96, 1, 1, TOKENS), np.float32)
    res = api.prune(model, {"x": X, "mask": mask}, structure="channels", method=method, damp=0.0, sparsity=0.5)
    gone_h = removed_units(res, "Wq")
    assert len(gone_h) == HEADS // 2 and len(removed_units(res, "W1")) == FFN // 2
    assert not any(s["name"] in ("Wq", "W1") for s in res.report.skipped)
    want = api.prune(plain, {"x": X}, structure="channels", method=method, damp=0.0, sparsity=0.5)
    assert gone_h == removed_units(want, "Wq") and removed_units(res, "W1") == removed_units(want, "W1")
    feeds = {"x": randn([4, TOKENS, HIDDEN], 31)}
    got = run_tensors(res.model, dict(feeds, mask=np.ones((4, 1, 1, TOKENS), np.float32)), ["y"])["y"]
    np.testing.assert_allclose(got, run_tensors(want.model, feeds, ["y"])["y"], rtol=1e-4, atol=1e-4)
    if method == "magnitude":
        ref = {k: v.astype(np.float64).copy() for k, v in a.items() if k not in ("bq", "bk", "bv")}
        cols = head_cols(gone_h)
        for k in "qkv":
            ref[f"W{k}"][:, cols] = 0.0
        ref["Wo"][cols] = 0.0
        ref["W2"][removed_units(res, "W1")] = 0.0
        # the zeroed heads' biases are b_shared's entries: they vanish with the heads (Wo rows 0)
        assert_same_outputs(res.model, with_weights(model, ref), dict(feeds, mask=np.ones((4, 1, 1, TOKENS), np.float32)))
