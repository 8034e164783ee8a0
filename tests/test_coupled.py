"""Coupling groups: channels tied by a residual Add, a squeeze-and-excitation gate (Mul) and a
depthwise Conv are removed together from every producer, and every consumer loses their columns.

References are computed here without onnx_obs: magnitude must pick the units of smallest L1 norm
over all the weights the group owns (summed by hand below) and the shrunk model must compute what
the original computes with those channels' consumer columns zeroed (onnxruntime on the original
graph); structured OBS (damp=0) must land each consumer on the least-squares refit (numpy lstsq)
of its original output from its kept input channels.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from cli_checks import assert_one_line_error
from graphs import init, make_model, randn, run, run_tensors, vi
from numpy.lib.stride_tricks import sliding_window_view
from onnx import helper
from test_structured import (
    assert_same_outputs,
    keep_of,
    lstsq_with_bias,
    removed_units,
    weights,
    with_weights,
)

from onnx_obs import api
from onnx_obs.flops import resource_model
from onnx_obs.graph.sites import find_sites
from onnx_obs.graph.tracing import trace_units


def conv(x, w, b, y, k, **kw):
    return helper.make_node("Conv", [x, w, b], [y], name=y, pads=[k // 2] * 4, **kw)


def relu(x, y):
    return helper.make_node("Relu", [x], [y], name=y)


def conv_fit(R, W, b, keep):
    """Least-squares refit of a stride-1 'same' conv (k x k) on the kept input channels of R."""
    k = W.shape[-1]
    xp = np.pad(R.astype(np.float64), ((0, 0), (0, 0), (k // 2, k // 2), (k // 2, k // 2)))
    P = sliding_window_view(xp, (k, k), axis=(2, 3)).transpose(0, 2, 3, 1, 4, 5).reshape(-1, R.shape[1] * k * k)
    T = P @ W.reshape(len(W), -1).T.astype(np.float64) + b
    cols = np.concatenate([np.arange(k * k) + k * k * c for c in keep])
    Wk, bk = lstsq_with_bias(P[:, cols], T)
    full = np.zeros(W.shape)
    full[:, keep] = Wk.reshape(len(W), len(keep), k, k)
    return full, bk


def resnet_block():
    """stem -> [conv a -> relu -> conv b] + stem -> relu -> head (a ResNet basic block)."""
    a = {"W0": randn([8, 3, 3, 3], 1), "b0": randn([8], 2), "Wa": randn([8, 8, 3, 3], 3),
         "ba": randn([8], 4), "Wb": randn([8, 8, 3, 3], 5), "bb": randn([8], 6),
         "Wh": randn([4, 8, 3, 3], 7), "bh": randn([4], 8)}
    nodes = [conv("x", "W0", "b0", "c0", 3), relu("c0", "r0"), conv("r0", "Wa", "ba", "ca", 3),
             relu("ca", "ra"), conv("ra", "Wb", "bb", "cb", 3),
             helper.make_node("Add", ["cb", "r0"], ["s"], name="residual"), relu("s", "rs"),
             conv("rs", "Wh", "bh", "y", 3)]
    model = make_model(nodes, [vi("x", shape=["batch", 3, 6, 6])], [vi("y", shape=["batch", 4, 6, 6])],
                       [init(k, v) for k, v in a.items()])
    return model, a


def mobile_block():
    """stem -> [expand 1x1 -> depthwise 3x3 -> x * SE gate -> project 1x1] + stem -> head."""
    a = {"W0": randn([8, 3, 3, 3], 1), "b0": randn([8], 2), "We": randn([16, 8, 1, 1], 3),
         "be": randn([16], 4), "Wd": randn([16, 1, 3, 3], 5), "bd": randn([16], 6),
         "W1": randn([4, 16, 1, 1], 7), "b1": randn([4], 8), "W2": randn([16, 4, 1, 1], 9),
         "b2": randn([16], 10), "Wp": randn([8, 16, 1, 1], 11), "bp": randn([8], 12),
         "Wh": randn([4, 8, 3, 3], 13), "bh": randn([4], 14)}
    nodes = [conv("x", "W0", "b0", "c0", 3), relu("c0", "r0"), conv("r0", "We", "be", "ce", 1),
             relu("ce", "re"), conv("re", "Wd", "bd", "cd", 3, group=16), relu("cd", "rd"),
             helper.make_node("GlobalAveragePool", ["rd"], ["p"], name="squeeze"),
             conv("p", "W1", "b1", "c1", 1), relu("c1", "r1"), conv("r1", "W2", "b2", "c2", 1),
             helper.make_node("Sigmoid", ["c2"], ["g"], name="gate"),
             helper.make_node("Mul", ["rd", "g"], ["m"], name="excite"),
             conv("m", "Wp", "bp", "cp", 1), helper.make_node("Add", ["cp", "r0"], ["s"], name="residual"),
             conv("s", "Wh", "bh", "y", 3)]
    model = make_model(nodes, [vi("x", shape=["batch", 3, 6, 6])], [vi("y", shape=["batch", 4, 6, 6])],
                       [init(k, v) for k, v in a.items()])
    return model, a


def l1(a, rows=(), cols=(), units=8):
    """Per unit: sum of |w| over the producers' rows and the consumers' columns."""
    return np.array([sum(np.abs(a[w][u]).sum() for w in rows) + sum(np.abs(a[w][:, u]).sum() for w in cols)
                     for u in range(units)])


def prune(model, X, method, include):
    return api.prune(model, {"x": X}, structure="channels", method=method, damp=0.0,
                     sparsity=0.5, include=include)


def test_groups_of_the_blocks():
    model, _ = mobile_block()
    sites, _ = find_sites(model)
    groups, left = trace_units(model, sites)
    found = {tuple(p.name for p in g.producers): sorted(c.site.name for c in g.consumers) for g in groups}
    assert found == {("W0", "Wp"): ["We", "Wh"], ("We", "W2"): ["W1", "Wp"], ("W1",): ["W2"]}
    hidden = next(g for g in groups if g.producer.name == "We")
    assert {c.tensor for c in hidden.cuts} == {"We", "be", "W2", "b2", "Wd", "bd", "W1", "Wp"}
    reasons = {x.name: x.reason for x in left}
    assert set(reasons) == {"Wd", "Wh"} and "depthwise" in reasons["Wd"] and "graph output" in reasons["Wh"]
    model, _ = resnet_block()
    groups, _ = trace_units(model, find_sites(model)[0])
    assert sorted(tuple(p.name for p in g.producers) for g in groups) == [("W0", "Wb"), ("Wa",)]


@pytest.mark.parametrize("method", ["magnitude", "obs"])
def test_resnet_residual_stream(method):
    model, a = resnet_block()
    X = randn([64, 3, 6, 6], 20)
    res = prune(model, X, method, "W0|Wb")
    gone = removed_units(res, "W0")
    keep = keep_of(8, gone)
    w = weights(res.model)
    assert (w["W0"].shape, w["b0"].shape, w["Wb"].shape, w["bb"].shape) == ((4, 3, 3, 3), (4,), (4, 8, 3, 3), (4,))
    assert w["Wa"].shape == (8, 4, 3, 3) and w["Wh"].shape == (4, 4, 3, 3)
    ref = {k: v.astype(np.float64) for k, v in a.items()}
    if method == "magnitude":
        norms = l1(a, rows=["W0", "Wb"], cols=["Wa", "Wh"])
        assert sorted(gone) == sorted(np.argsort(norms)[:4].tolist())
        ref["Wa"][:, gone] = 0.0
        ref["Wh"][:, gone] = 0.0
    else:
        acts = run_tensors(model, {"x": X}, ["r0", "rs"])
        ref["Wa"], ref["ba"] = conv_fit(acts["r0"], a["Wa"], a["ba"], keep)
        ref["Wh"], ref["bh"] = conv_fit(acts["rs"], a["Wh"], a["bh"], keep)
    assert_same_outputs(res.model, with_weights(model, ref), {"x": randn([8, 3, 6, 6], 21)})


@pytest.mark.parametrize("method", ["magnitude", "obs"])
def test_inverted_residual_with_gate(method):
    model, a = mobile_block()
    X = randn([64, 3, 6, 6], 30)
    res = prune(model, X, method, "We|W2")
    gone = removed_units(res, "We")
    keep = keep_of(16, gone)
    w = weights(res.model)
    assert [w[k].shape[0] for k in ("We", "be", "Wd", "bd", "W2", "b2")] == [8] * 6
    assert w["W1"].shape == (4, 8, 1, 1) and w["Wp"].shape == (8, 8, 1, 1)
    dw = next(n for n in res.model.graph.node if n.name == "cd")
    assert helper.get_attribute_value(next(x for x in dw.attribute if x.name == "group")) == 8
    ref = {k: v.astype(np.float64) for k, v in a.items()}
    if method == "magnitude":
        norms = l1(a, rows=["We", "W2", "Wd"], cols=["W1", "Wp"], units=16)
        assert sorted(gone) == sorted(np.argsort(norms)[:8].tolist())
        ref["W1"][:, gone] = 0.0
        ref["Wp"][:, gone] = 0.0
    else:
        acts = run_tensors(model, {"x": X}, ["p", "m"])
        ref["W1"], ref["b1"] = conv_fit(acts["p"], a["W1"], a["b1"], keep)
        ref["Wp"], ref["bp"] = conv_fit(acts["m"], a["Wp"], a["bp"], keep)
    assert_same_outputs(res.model, with_weights(model, ref), {"x": randn([8, 3, 6, 6], 31)})


def test_every_group_of_the_block_at_once():
    model, _ = mobile_block()
    X = randn([64, 3, 6, 6], 40)
    res = api.prune(model, {"x": X}, structure="channels", sparsity=0.5)
    w = weights(res.model)
    assert (w["W0"].shape[0], w["We"].shape[0], w["W1"].shape[0]) == (4, 8, 2)
    assert w["Wh"].shape == (4, 4, 3, 3) and w["Wp"].shape == (4, 8, 1, 1)
    assert not any("coupled" in s["reason"] for s in res.report.skipped)
    out, want = run(res.model, {"x": X[:8]})["y"], run(model, {"x": X[:8]})["y"]
    assert out.shape == want.shape and np.isfinite(out).all()


def test_layer_norm_over_the_channels_leaves_the_width_alone():
    nodes = [helper.make_node("Gemm", ["x", "W0", "b0"], ["h"], name="h", transB=1),
             helper.make_node("LayerNormalization", ["h", "g", "beta"], ["n"], name="ln", axis=-1),
             helper.make_node("Gemm", ["n", "W1", "b1"], ["y"], name="y", transB=1)]
    inits = [init("W0", randn([8, 4], 1)), init("b0", randn([8], 2)), init("g", randn([8], 3)),
             init("beta", randn([8], 4)), init("W1", randn([3, 8], 5)), init("b1", randn([3], 6))]
    model = make_model(nodes, [vi("x", shape=["batch", 4])], [vi("y", shape=["batch", 3])], inits, opset=17)
    _, left = trace_units(model, find_sites(model)[0])
    reason = next(x.reason for x in left if x.name == "W0")
    assert "LayerNormalization 'ln' normalises over its channels" in reason and "left alone" in reason


def test_target_speedup_counts_macs():
    model, a = resnet_block()
    X = randn([64, 3, 6, 6], 50)
    res = api.prune(model, {"x": X}, structure="channels", target_speedup=1.5)
    macs = lambda w: sum(int(np.prod(w[k].shape)) * 36 for k in ("W0", "Wa", "Wb", "Wh"))   # 6x6 'same' convs
    before, after = macs(a), macs(weights(res.model))
    assert before / 1.5 * 0.8 <= after <= before / 1.5
    assert any("--target-speedup 1.5" in n for n in res.report.notes)


def test_target_speedup_below_one_is_refused(cli, tmp_path):
    model, _ = resnet_block()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    np.savez(tmp_path / "c.npz", x=randn([8, 3, 6, 6], 51))
    args = ["prune", str(path), "--calib", str(tmp_path / "c.npz"), "--structure", "channels",
            "--target-speedup", "0.5", "-o", str(tmp_path / "out.onnx")]
    assert_one_line_error(cli(*args), "--target-speedup is how many times fewer MACs")
    assert not (tmp_path / "out.onnx").exists()


def test_a_group_with_an_unselected_producer_stays():
    model, a = resnet_block()
    res = api.prune(model, {"x": randn([32, 3, 6, 6], 60)}, structure="channels", sparsity=0.5,
                    include="W0|Wa")
    w = weights(res.model)
    assert w["W0"].shape == a["W0"].shape and w["Wb"].shape[1] == 4   # Wa's group only
    reasons = {s["name"]: s["reason"] for s in res.report.skipped}
    assert reasons["W0"] == "units kept: coupled with Wb, not selected"


def c2f_block():
    """YOLO's C2f: cv1 -> Split [4, 4] -> y1 + bottleneck(y1) -> Concat(y0, y1, y2) -> cv2."""
    a = {"W1": randn([8, 3, 1, 1], 1), "b1": randn([8], 2), "Wa": randn([4, 4, 3, 3], 3),
         "ba": randn([4], 4), "Wb": randn([4, 4, 3, 3], 5), "bb": randn([4], 6),
         "W2": randn([4, 12, 1, 1], 7), "b2": randn([4], 8)}
    nodes = [conv("x", "W1", "b1", "c1", 1), relu("c1", "r1"),
             helper.make_node("Split", ["r1", "sizes"], ["y0", "y1"], name="split", axis=1),
             conv("y1", "Wa", "ba", "ca", 3), relu("ca", "ra"), conv("ra", "Wb", "bb", "cb", 3),
             helper.make_node("Add", ["cb", "y1"], ["y2"], name="shortcut"),
             helper.make_node("Concat", ["y0", "y1", "y2"], ["cat"], name="cat", axis=1),
             conv("cat", "W2", "b2", "y", 1)]
    inits = [init(k, v) for k, v in a.items()] + [init("sizes", np.array([4, 4], np.int64))]
    model = make_model(nodes, [vi("x", shape=["batch", 3, 6, 6])], [vi("y", shape=["batch", 4, 6, 6])], inits)
    return model, a


@pytest.mark.parametrize("method", ["magnitude", "obs"])
def test_c2f_split_shortcut_and_concat(method):
    model, a = c2f_block()
    groups, left = trace_units(model, find_sites(model)[0])
    g = next(g for g in groups if g.producer.name == "W1")
    assert [p.name for p in g.producers] == ["W1", "Wb"] and "Wb" not in {x.name for x in left}
    X = randn([64, 3, 6, 6], 70)
    res = prune(model, X, method, "W1|Wb")
    gone = removed_units(res, "W1")
    w = weights(res.model)
    low, high = [u for u in gone if u < 4], [u - 4 for u in gone if u >= 4]   # chunk 0, chunk 1
    assert w["W1"].shape[0] == 4 and w["Wb"].shape[0] == 4 - len(high) and w["Wa"].shape[1] == 4 - len(high)
    assert w["W2"].shape[1] == 12 - len(low) - 2 * len(high)
    assert w["sizes"].tolist() == [4 - len(low), 4 - len(high)]
    cols = [[u] + ([u + 4] if u >= 4 else []) for u in range(8)]   # unit u >= 4 is in y1 and y2
    gone_cols = sorted(c for u in gone for c in cols[u])
    kept_cols = [c for c in range(12) if c not in gone_cols]
    ref = {k: v.astype(np.float64) for k, v in a.items()}
    if method == "magnitude":
        norms = np.array([np.abs(a["W1"][u]).sum() + np.abs(a["W2"][:, cols[u]]).sum()
                          + (np.abs(a["Wb"][u - 4]).sum() + np.abs(a["Wa"][:, u - 4]).sum() if u >= 4 else 0)
                          for u in range(8)])
        assert sorted(gone) == sorted(np.argsort(norms)[:4].tolist())
        ref["Wa"][:, high] = 0.0
        ref["W2"][:, gone_cols] = 0.0
    else:
        acts = run_tensors(model, {"x": X}, ["y1", "cat"])
        ref["Wa"], ref["ba"] = conv_fit(acts["y1"], a["Wa"], a["ba"], [c for c in range(4) if c not in high])
        ref["W2"], ref["b2"] = conv_fit(acts["cat"], a["W2"], a["b2"], kept_cols)
    assert_same_outputs(res.model, with_weights(model, ref), {"x": randn([8, 3, 6, 6], 71)})


def test_resource_model_counts_unequal_units_exactly():
    # In a C2f group units 4-7 own rows of W1 and Wb and columns of Wa and twice of W2; units
    # 0-3 only a row of W1 and a column of W2: removing 7 then 6 costs the hand-counted sizes.
    model, a = c2f_block()
    groups, _ = trace_units(model, find_sites(model)[0])
    k = next(i for i, g in enumerate(groups) if g.producer.name == "W1")
    orders = [np.array([7, 6, 5, 4, 3, 2, 1, 0]) if i == k else np.arange(g.units) for i, g in enumerate(groups)]
    resource = resource_model(model, groups, "params", orders)
    counts = np.zeros(len(groups))
    counts[k] = 2
    cut = {"W1": ([7, 6], 0), "b1": ([7, 6], 0), "Wb": ([3, 2], 0), "bb": ([3, 2], 0),
           "Wa": ([3, 2], 1), "W2": ([7, 6, 11, 10], 1)}
    want = sum(np.delete(v, *cut[k2]).size if k2 in cut else v.size for k2, v in a.items())
    assert resource(counts) == want
    counts[k] = 6   # then 5 and 4 (the rest of chunk 1) and 3, 2: W2 loses 2 * 4 + 2 columns
    cut = {"W1": ([7, 6, 5, 4, 3, 2], 0), "b1": ([7, 6, 5, 4, 3, 2], 0), "Wb": ([3, 2, 1, 0], 0),
           "bb": ([3, 2, 1, 0], 0), "Wa": ([3, 2, 1, 0], 1), "W2": ([7, 6, 5, 4, 11, 10, 9, 8, 3, 2], 1)}
    want = sum(np.delete(v, *cut[k2]).size if k2 in cut else v.size for k2, v in a.items())
    assert resource(counts) == want


def test_no_producer_loses_every_row():
    # Units 4-7 own all of the bottleneck's channels and are the smallest: the last one chosen
    # stays, else Wa would read no channel and Wb write none.
    model, a = c2f_block()
    a["Wa"], a["Wb"] = a["Wa"] * 1e-3, a["Wb"] * 1e-3
    a["W1"][4:] *= 1e-3
    a["W2"][:, 4:] *= 1e-3
    model = with_weights(model, a)
    res = prune(model, randn([32, 3, 6, 6], 80), "magnitude", "W1|Wb")
    assert removed_units(res, "W1") == [5, 6, 7]
    assert any("unit 4 kept, else 'Wa' would lose every channel" in n for n in res.report.notes)
    w = weights(res.model)
    assert w["Wa"].shape == (4, 1, 3, 3) and w["Wb"].shape == (1, 4, 3, 3) and w["W2"].shape == (4, 6, 1, 1)
    ref = {k: v.astype(np.float64) for k, v in a.items()}
    ref["Wa"][:, [1, 2, 3]] = 0.0
    ref["W2"][:, [5, 6, 7, 9, 10, 11]] = 0.0
    assert_same_outputs(res.model, with_weights(model, ref), {"x": randn([8, 3, 6, 6], 81)})


def test_channel_shuffle_removes_whole_groups():
    """ShuffleNet's shuffle (Reshape [B, 2, 4, H, W], Transpose, Reshape back) splits the channel
    axis into blocks of 4: a unit is a block of the producer's rows, landing on interleaved
    channels of the consumer (block u: channels u, u + 2, ...), and both Reshapes are rewritten."""
    a = {"W0": randn([8, 3, 3, 3], 1), "b0": randn([8], 2), "Wh": randn([4, 8, 3, 3], 3), "bh": randn([4], 4),
         "split": np.array([0, 2, 4, 6, 6], np.int64), "merge": np.array([0, 8, 6, 6], np.int64)}
    nodes = [conv("x", "W0", "b0", "c0", 3), relu("c0", "r0"),
             helper.make_node("Reshape", ["r0", "split"], ["g"], name="split_groups"),
             helper.make_node("Transpose", ["g"], ["gt"], name="shuffle", perm=[0, 2, 1, 3, 4]),
             helper.make_node("Reshape", ["gt", "merge"], ["s"], name="merge_groups"),
             conv("s", "Wh", "bh", "y", 3)]
    model = make_model(nodes, [vi("x", shape=["batch", 3, 6, 6])], [vi("y", shape=["batch", 4, 6, 6])],
                       [init(k, v) for k, v in a.items()])
    (group,), _ = trace_units(model, find_sites(model)[0], {"W0"})
    assert group.units == 2 and group.consumers[0].columns[1].tolist()[:2] == [9, 10]
    X = randn([32, 3, 6, 6], 5)
    res = prune(model, X, "magnitude", "W0")
    (gone,) = removed_units(res, "W0")
    rows = np.arange(4 * gone, 4 * gone + 4)
    norms = [np.abs(a["W0"][4 * u:4 * u + 4]).sum() + np.abs(a["Wh"][:, u::2]).sum() for u in (0, 1)]
    assert gone == int(np.argmin(norms))
    w = weights(res.model)
    assert w["W0"].shape == (4, 3, 3, 3) and w["Wh"].shape == (4, 4, 3, 3)
    assert w["split"].tolist() == [0, 1, 4, 6, 6] and w["merge"].tolist() == [0, 4, 6, 6]
    ref = {k: v.astype(np.float64).copy() for k, v in a.items() if v.dtype != np.int64}
    ref["W0"][rows], ref["b0"][rows] = 0.0, 0.0
    ref["Wh"][:, gone::2] = 0.0
    assert_same_outputs(res.model, with_weights(model, ref), {"x": randn([4, 3, 6, 6], 6)})


def csp_block():
    """stem -> t = relu(conv t) -> Concat(conv a(t), conv b(t)) + stem -> head: a residual whose
    other operand stacks two producers' channels (CSP / DenseNet-like)."""
    a = {"W0": randn([8, 3, 3, 3], 1), "b0": randn([8], 2), "Wt": randn([6, 8, 1, 1], 3),
         "bt": randn([6], 4), "Wa": randn([3, 6, 3, 3], 5), "ba": randn([3], 6),
         "Wb": randn([5, 6, 1, 1], 7), "bb": randn([5], 8), "Wh": randn([4, 8, 3, 3], 9),
         "bh": randn([4], 10)}
    nodes = [conv("x", "W0", "b0", "c0", 3), relu("c0", "r0"), conv("r0", "Wt", "bt", "ct", 1),
             relu("ct", "rt"), conv("rt", "Wa", "ba", "ca", 3), conv("rt", "Wb", "bb", "cb", 1),
             helper.make_node("Concat", ["ca", "cb"], ["cat"], name="cat", axis=1),
             helper.make_node("Add", ["r0", "cat"], ["s"], name="residual"), relu("s", "rs"),
             conv("rs", "Wh", "bh", "y", 3)]
    model = make_model(nodes, [vi("x", shape=["batch", 3, 6, 6])], [vi("y", shape=["batch", 4, 6, 6])],
                       [init(k, v) for k, v in a.items()])
    return model, a


@pytest.mark.parametrize("method", ["magnitude", "obs"])
def test_residual_fed_by_a_concat(method):
    """The Concat's producers join the stem's group at their offsets: unit u < 3 is row u of Wa,
    unit u >= 3 row u - 3 of Wb."""
    model, a = csp_block()
    groups, _ = trace_units(model, find_sites(model)[0])
    found = {tuple(p.name for p in g.producers): sorted(c.site.name for c in g.consumers) for g in groups}
    assert found == {("W0", "Wa", "Wb"): ["Wh", "Wt"], ("Wt",): ["Wa", "Wb"]}
    X = randn([64, 3, 6, 6], 80)
    res = prune(model, X, method, "W0|Wa|Wb")
    gone = removed_units(res, "W0")
    keep = keep_of(8, gone)
    in_a, in_b = [u for u in gone if u < 3], [u - 3 for u in gone if u >= 3]
    w = weights(res.model)
    assert [w[k].shape[0] for k in ("W0", "b0", "Wa", "ba", "Wb", "bb")] == \
        [4, 4, 3 - len(in_a), 3 - len(in_a), 5 - len(in_b), 5 - len(in_b)]
    assert w["Wt"].shape == (6, 4, 1, 1) and w["Wh"].shape == (4, 4, 3, 3)
    ref = {k: v.astype(np.float64) for k, v in a.items()}
    if method == "magnitude":
        norms = np.array([np.abs(a["W0"][u]).sum() + np.abs(a["Wt"][:, u]).sum() + np.abs(a["Wh"][:, u]).sum()
                          + (np.abs(a["Wa"][u]).sum() if u < 3 else np.abs(a["Wb"][u - 3]).sum())
                          for u in range(8)])
        assert sorted(gone) == sorted(np.argsort(norms)[:4].tolist())
        # the units' rows and biases zeroed: r0 and cat, hence s, are 0 on them
        for name, rows in (("W0", gone), ("b0", gone), ("Wa", in_a), ("ba", in_a), ("Wb", in_b), ("bb", in_b)):
            ref[name][rows] = 0.0
    else:
        acts = run_tensors(model, {"x": X}, ["r0", "rs"])
        ref["Wt"], ref["bt"] = conv_fit(acts["r0"], a["Wt"], a["bt"], keep)
        ref["Wh"], ref["bh"] = conv_fit(acts["rs"], a["Wh"], a["bh"], keep)
    assert_same_outputs(res.model, with_weights(model, ref), {"x": randn([8, 3, 6, 6], 81)})
