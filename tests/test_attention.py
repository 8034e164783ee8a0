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
import pytest
from bert_graph import FFN, HEAD_DIM, HEADS, HIDDEN, TOKENS, bert_model
from graphs import randn, run_tensors
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
