"""Full-network OBS on ONNX graphs (strategies/full_network.py, hessian/network.py, hessian/full.py), checked against an
independent numpy backprop: per-sample derivatives, the Eq. 17 inverse, one deletion's error,
and the pipeline end to end."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from graphs import init, make_model, run, vi
from numpy.lib.stride_tricks import sliding_window_view
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnx_obs import api
from onnx_obs.calib import load_calibration
from onnx_obs.errors import OnnxObsError
from onnx_obs.graph.model_io import from_proto
from onnx_obs.graph.sites import find_sites
from onnx_obs.config import FullOptions
from onnx_obs.hessian.network import FullNetwork, parameters

ALPHA = 1e-3


def rel_err(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ---- models and their analytic derivatives --------------------------------------------------


def mlp(dtype=np.float64, d=5, h1=6, h2=4, out=3, seed=0):
    """x -> Gemm(transB) -> Tanh -> MatMul -> Add -> Sigmoid -> Gemm(alpha .7, beta 1.3) -> y."""
    r = np.random.default_rng(seed)
    w = {"W1": r.normal(size=(h1, d)), "b1": r.normal(size=h1), "W2": r.normal(size=(h1, h2)),
         "b2": r.normal(size=h2), "W3": r.normal(size=(h2, out)), "b3": r.normal(size=out)}
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["z1"], name="fc1", transB=1),
        helper.make_node("Tanh", ["z1"], ["a1"]),
        helper.make_node("MatMul", ["a1", "W2"], ["m2"], name="mm2"),
        helper.make_node("Add", ["m2", "b2"], ["z2"]),
        helper.make_node("Sigmoid", ["z2"], ["a2"]),
        helper.make_node("Gemm", ["a2", "W3", "b3"], ["y"], name="fc3", alpha=0.7, beta=1.3),
    ]
    inits = [init(k, v.astype(dtype)) for k, v in w.items()]
    model = make_model(nodes, [vi("x", dtype, ["N", d])], [vi("y", dtype, ["N", out])], inits)
    return model, {k: v.astype(dtype).astype(np.float64) for k, v in w.items()}


def mlp_jacobians(x, w):
    """d y_u / d parameter for every sample and unit: {name: (P, U, *param shape)} in site layout."""
    z1 = x @ w["W1"].T + w["b1"]
    a1 = np.tanh(z1)
    a2 = 1 / (1 + np.exp(-(a1 @ w["W2"] + w["b2"])))
    U = w["W3"].shape[1]
    alpha, beta = float(np.float32(0.7)), float(np.float32(1.3))  # ONNX float attributes are float32
    d3 = np.broadcast_to(np.eye(U), (len(x), U, U))                # dy/dy (P, U, U)
    d2 = alpha * d3 @ w["W3"].T * (a2 * (1 - a2))[:, None]        # dy/dz2 (P, U, h2)
    d1 = d2 @ w["W2"].T * (1 - a1**2)[:, None]                     # dy/dz1 (P, U, h1)
    outer = lambda d, a: d[:, :, :, None] * a[:, None, None, :]  # noqa: E731
    return {"W1": outer(d1, x), "b1": d1, "W2": outer(d2, a1),  # W2's site matrix is W2^T
            "b2": d2, "W3": alpha * outer(d3, a2), "b3": beta * d3}


def cnn(dtype=np.float32, seed=1):
    """x [N, 2, 6, 6] -> Conv 2->4 3x3 group 2 pad 1 + bias -> Tanh -> Flatten -> Gemm 144->3 -> y."""
    r = np.random.default_rng(seed)
    w = {"cw": r.normal(size=(4, 1, 3, 3)) / 2, "cb": r.normal(size=4),
         "fw": r.normal(size=(3, 144)) / 6, "fb": r.normal(size=3)}
    nodes = [
        helper.make_node("Conv", ["x", "cw", "cb"], ["c"], name="conv", pads=[1, 1, 1, 1], group=2),
        helper.make_node("Tanh", ["c"], ["t"]),
        helper.make_node("Flatten", ["t"], ["f"]),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], name="fc", transB=1),
    ]
    inits = [init(k, v.astype(dtype)) for k, v in w.items()]
    model = make_model(nodes, [vi("x", dtype, ["N", 2, 6, 6])], [vi("y", dtype, ["N", 3])], inits)
    return model, {k: v.astype(dtype).astype(np.float64) for k, v in w.items()}


def cnn_jacobians(x, w):
    xp = np.pad(x, [(0, 0), (0, 0), (1, 1), (1, 1)])
    win = sliding_window_view(xp, (3, 3), axis=(2, 3))                  # (P, 2, 6, 6, 3, 3)
    c = np.stack([np.einsum("pijkl,kl->pij", win[:, o // 2], w["cw"][o, 0]) for o in range(4)], 1)
    t = np.tanh(c + w["cb"][:, None, None])
    P, U = len(x), 3
    d3 = np.broadcast_to(np.eye(U), (P, U, U))
    dc = (d3 @ w["fw"]).reshape(P, U, 4, 6, 6) * (1 - t**2)[:, None]     # dy/dc (P, U, 4, 6, 6)
    dcw = np.stack([np.einsum("puij,pijkl->pukl", dc[:, :, o], win[:, o // 2]) for o in range(4)], 2)
    return {"cw": dcw.reshape(P, U, 4, 9), "cb": dc.sum(axis=(3, 4)),
            "fw": d3[:, :, :, None] * t.reshape(P, 1, 1, -1), "fb": d3}


def pipeline_net(model, x, *, prune_biases=True, gradients="graph", hessian="full", labels=None,
                 batch_size=8, alpha=ALPHA):
    """The FullNetwork the pipeline builds for `model` on calibration inputs x."""
    loaded = from_proto(model)
    sites, _ = find_sites(loaded.model)
    arrays = {"x": x} if labels is None else {"x": x, "t": labels}
    cal = load_calibration(arrays, loaded.model, batch_size=batch_size, labels_key=None if labels is None else "t")
    notes: list[str] = []
    params = parameters(loaded.model, sites, "", prune_biases, notes)
    options = FullOptions(alpha=alpha, gradients=gradients, prune_biases=prune_biases)
    return FullNetwork(loaded, params, cal, hessian=hessian, options=options, device="cpu", notes=notes), notes


def assemble(net, jac: dict, P: int) -> np.ndarray:
    """Analytic X (P * U rows, n columns) in the pipeline's weight order (segments by tensor name)."""
    names = {s.site.tensor_name if s.site is not None else s.bias.name: s for s in net.params.segments}
    U = next(iter(jac.values())).shape[1]
    X = np.zeros((P, U, net.params.n))
    for name, seg in names.items():
        X[:, :, seg.slice] = jac[name].reshape(P, U, -1)
    return X.reshape(P * U, -1)


def pipeline_X(net) -> np.ndarray:
    return np.concatenate(list(net.derivative_blocks()))


# ---- 1. derivatives ---------------------------------------------------------------------------------


def test_mlp_derivatives_graph_fd_and_numpy_agree():
    model, w = mlp(np.float64)
    x = np.random.default_rng(2).normal(size=(12, 5))
    want = assemble(pipeline_net(model, x)[0], mlp_jacobians(x, w), 12)
    graph = pipeline_X(pipeline_net(model, x)[0])
    fd = pipeline_X(pipeline_net(model, x, gradients="fd")[0])
    assert want.shape == (12 * 3, 30 + 24 + 12 + 6 + 4 + 3)
    assert rel_err(graph, want) < 1e-5
    assert rel_err(fd, want) < 1e-3
    assert rel_err(fd, graph) < 1e-3


def test_matmul_bias_is_left_out_when_the_matmul_output_is_also_a_graph_output():
    """b2 (added after mm2) does not reach the graph output m2, so dF/dm2 is not its derivative:
    it stays out of w with the reason, and the remaining derivatives agree with finite differences
    taken on the whole model (which see both outputs)."""
    model, _ = mlp(np.float64)
    model.graph.output.append(vi("m2", np.float64, ["N", 4]))
    x = np.random.default_rng(3).normal(size=(10, 5))
    net, notes = pipeline_net(model, x)
    names = [s.bias.name for s in net.params.segments if s.bias is not None]
    assert names == ["b1", "b3"]
    assert any("'b2' is added after 'm2', which is also a graph output" in n for n in notes)
    graph = pipeline_X(net)
    fd = pipeline_X(pipeline_net(model, x, gradients="fd")[0])
    assert graph.shape == (10 * 7, 30 + 24 + 12 + 6 + 3)
    assert rel_err(graph, fd) < 1e-3


def test_cnn_derivatives_graph_fd_and_numpy_agree():
    model, w = cnn(np.float32)  # onnxruntime has no float64 Conv
    x = np.random.default_rng(3).normal(size=(6, 2, 6, 6)).astype(np.float32)
    net = pipeline_net(model, x, batch_size=4)[0]  # batches of 4 and 2: samples stay apart
    want = assemble(net, cnn_jacobians(x.astype(np.float64), w), 6)
    graph = pipeline_X(net)
    fd = pipeline_X(pipeline_net(model, x, gradients="fd", batch_size=4)[0])
    assert want.shape == (6 * 3, 36 + 4 + 432 + 3)
    assert rel_err(graph, want) < 1e-5
    assert rel_err(fd, want) < 1e-3


def test_fisher_vectors_are_loss_gradients():
    model, w = mlp(np.float64)
    r = np.random.default_rng(4)
    x, labels = r.normal(size=(10, 5)), r.integers(0, 3, 10)
    net, notes = pipeline_net(model, x, hessian="fisher", labels=labels)
    assert any("softmax cross-entropy" in n for n in notes)
    J = assemble(net, mlp_jacobians(x, w), 10).reshape(10, 3, -1)
    y = run(model, {"x": x})["y"]
    p = np.exp(y - y.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    want = np.einsum("pu,pun->pn", p - np.eye(3)[labels], J)  # d CE_k / dw
    assert rel_err(pipeline_X(net), want) < 1e-9


def left_matmul(dtype=np.float32, weights_as_inputs=False):
    """x [N, 4] -> Transpose -> MatMul(W [3, 4], x^T) + b [3, 1] -> Transpose -> Tanh -> y: the
    weight on the left, samples on the last axis of the node's input and output."""
    r = np.random.default_rng(12)
    w = {"W": r.normal(size=(3, 4)), "b": r.normal(size=(3, 1))}
    nodes = [helper.make_node("Transpose", ["x"], ["xt"]),
             helper.make_node("MatMul", ["W", "xt"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "b"], ["z"]),
             helper.make_node("Transpose", ["z"], ["zt"]),
             helper.make_node("Tanh", ["zt"], ["y"])]
    return _model(nodes, w, dtype, [vi("x", dtype, ["N", 4])], [vi("y", dtype, ["N", 3])], weights_as_inputs)


def conv_transpose(dtype=np.float32, weights_as_inputs=False):
    """x [N, 2, 3, 3] -> ConvTranspose 2->3 2x2 stride 2 + bias -> Tanh -> Flatten -> Gemm 108->2."""
    r = np.random.default_rng(13)
    w = {"W": r.normal(size=(2, 3, 2, 2)) / 2, "b": r.normal(size=3), "fw": r.normal(size=(2, 108)) / 8,
         "fb": r.normal(size=2)}
    nodes = [helper.make_node("ConvTranspose", ["x", "W", "b"], ["c"], name="convT", strides=[2, 2]),
             helper.make_node("Tanh", ["c"], ["t"]),
             helper.make_node("Flatten", ["t"], ["f"]),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], name="fc", transB=1)]
    return _model(nodes, w, dtype, [vi("x", dtype, ["N", 2, 3, 3])], [vi("y", dtype, ["N", 2])], weights_as_inputs)


def _model(nodes, w, dtype, inputs, outputs, weights_as_inputs):
    w = {k: v.astype(dtype) for k, v in w.items()}
    if weights_as_inputs:  # the reference below feeds perturbed weights
        return make_model(nodes, inputs + [vi(k, dtype, list(v.shape)) for k, v in w.items()], outputs), w
    return make_model(nodes, inputs, outputs, [init(k, v) for k, v in w.items()]), w


def weight_perturbation_X(build, net, x, h=1e-5) -> np.ndarray:
    """dF_u(k)/dw_q by float64 central differences on the weights themselves (onnx's reference
    evaluator): X in the pipeline's weight order, (P * U rows, n columns)."""
    model, w = build(np.float64, weights_as_inputs=True)
    ref = ReferenceEvaluator(model)
    x = x.astype(np.float64)
    cols = []
    for seg in net.params.segments:
        name = seg.site.tensor_name if seg.site is not None else seg.bias.name
        flat = seg.site.to_matrix(w[name]) if seg.site is not None else w[name]
        for q in range(flat.size):
            ys = []
            for sign in (1, -1):
                p = flat.copy()
                p.flat[q] += sign * h
                value = seg.site.from_matrix(p) if seg.site is not None else p
                ys.append(ref.run(None, {"x": x, **w, name: value})[0])
            cols.append(((ys[0] - ys[1]) / (2 * h)).reshape(-1))
    return np.stack(cols, axis=1)


@pytest.mark.parametrize("build, shape, mode", [(left_matmul, (6, 4), "graph"), (conv_transpose, (4, 2, 3, 3), "graph"),
                                                (conv_transpose, (4, 2, 3, 3), "fd")])
def test_weight_left_matmul_and_conv_transpose_match_weight_perturbation(build, shape, mode):
    model, _ = build()
    x = np.random.default_rng(14).normal(size=shape).astype(np.float32)
    net, _ = pipeline_net(model, x, gradients=mode, batch_size=3)
    got = pipeline_X(net)
    assert net.params.n == (12 + 3 if build is left_matmul else 24 + 3 + 216 + 2)
    assert rel_err(got, weight_perturbation_X(build, net, x)) < (1e-5 if mode == "graph" else 1e-3)


# ---- 2. the inverse ------------------------------------------------------------------------------------


def test_inverse_hessian_equals_direct_inverse():
    model, w = mlp(np.float64)
    P = 40
    x = np.random.default_rng(5).normal(size=(P, 5))
    net = pipeline_net(model, x)[0]
    X = assemble(net, mlp_jacobians(x, w), P)
    want = np.linalg.inv(ALPHA * np.eye(X.shape[1]) + X.T @ X / P)
    assert rel_err(net.inverse(), want) < 1e-9
    assert net.mean_diag == pytest.approx(np.mean(np.sum(X * X, 0)) / P, rel=1e-12)


def test_recompute_builds_the_inverse_at_the_corrected_weights_over_the_kept_ones():
    model, _ = mlp(np.float64)
    P = 40
    x = np.random.default_rng(15).normal(size=(P, 5))
    net = pipeline_net(model, x)[0]
    mask = np.ones(net.params.n, dtype=bool)
    mask[[0, 7, 40, 70]] = False
    w = 0.9 * net.params.read()
    w[~mask] = 0.0
    Hinv = net.recompute(w, mask)
    now = {t.name: numpy_helper.to_array(t) for t in net.loaded.model.graph.initializer}  # written back
    X = assemble(net, mlp_jacobians(x, now), P)[:, mask]
    want = np.linalg.inv(ALPHA * np.eye(X.shape[1]) + X.T @ X / P)
    assert rel_err(Hinv, want) < 1e-9


# ---- 3. the pipeline end to end ---------------------------------------------------------------------


def sparsity_of(model: onnx.ModelProto, names) -> float:
    arrays = [numpy_helper.to_array(t) for t in model.graph.initializer if t.name in names]
    return sum(int(np.sum(a == 0)) for a in arrays) / sum(a.size for a in arrays)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_cli_prunes_to_the_global_target_and_the_model_runs(kind, tmp_path, cli):
    model, _ = mlp(np.float32) if kind == "mlp" else cnn()
    shape = (64, 5) if kind == "mlp" else (32, 2, 6, 6)
    x = np.random.default_rng(6).normal(size=shape).astype(np.float32)
    src, calib, out = tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "out.onnx"
    onnx.save(model, src)
    np.savez(calib, x=x)
    res = cli("prune", src, "--calib", calib, "--hessian", "full", "--sparsity", "0.4", "--prune-biases",
              "-o", out, "--report", tmp_path / "r.json", "--save-gradient-graph", tmp_path / "g.onnx",
              "--min-params", "0")   # a toy model: its tiny first conv counts too
    assert res.exit_code == 0, res.stderr
    pruned = onnx.load(out)
    names = {t.name for t in model.graph.initializer}
    assert sparsity_of(pruned, names) == pytest.approx(0.4, abs=0.01)
    y = run(pruned, {"x": x})["y"]
    assert y.shape == (shape[0], 3) and np.isfinite(y).all()
    assert "full-network obs" in res.stdout
    fn = json.loads((tmp_path / "r.json").read_text())["full_network"]
    assert fn["stop_reason"] == "sparsity" and fn["gradients"] == "graph" and fn["biases"] == (13 if kind == "mlp" else 7)
    grad = onnx.load(tmp_path / "g.onnx")
    assert [o.name for o in grad.graph.output][0] == "y" and "y__seed" in [i.name for i in grad.graph.input]


def measured_error(original, pruned, x) -> float:
    y0, y1 = run(original, {"x": x})["y"], run(pruned, {"x": x})["y"]
    return 0.5 * float(np.sum((y1 - y0) ** 2)) / len(x)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_one_deletion_error_matches_the_saliency(kind):
    # more vectors (samples x 3 outputs) than weights: H is full rank, so no deletion hides in its null space
    # (the CNN is float32: its data are picked so the deletion's error, ~6e-9, is well above what the
    # float32 storage of the corrected weights resolves)
    model, _ = mlp(np.float64) if kind == "mlp" else cnn(seed=2)
    x = np.random.default_rng(7 if kind == "mlp" else 2).normal(size=(64, 5) if kind == "mlp" else (200, 2, 6, 6))
    x = x.astype(np.float64 if kind == "mlp" else np.float32)
    n = 30 + 24 + 12 if kind == "mlp" else 36 + 432
    res = api.prune(model, {"x": x}, hessian="full", sparsity=1 / n, full=FullOptions(alpha=1e-8), device="cpu")
    fn = res.report.full_network
    assert fn["removed"] == 1 and fn["stop_reason"] == "sparsity"
    predicted = fn["predicted_error_increase"]
    measured = measured_error(model, res.model, x)
    assert predicted > 0
    assert measured == pytest.approx(predicted, rel=0.02)  # the quadratic model, to second order
    assert fn["measured_error_increase"] == pytest.approx(measured, rel=1e-6)


def test_max_error_increase_stops_before_the_bound():
    model, _ = mlp(np.float64)
    x = np.random.default_rng(8).normal(size=(64, 5))
    free = api.prune(model, {"x": x}, hessian="full", sparsity=0.9, full=FullOptions(alpha=1e-8), device="cpu")
    bound = free.report.full_network["predicted_error_increase"] / 50
    res = api.prune(model, {"x": x}, hessian="full", sparsity=0.9, device="cpu",
                    full=FullOptions(alpha=1e-8, max_error_increase=bound))
    fn = res.report.full_network
    # the measured increase passes the bound first (higher-order terms): surgery goes back to the last
    # checkpoint within it (the predicted rule alone: tests/test_full_obs.py)
    assert fn["stop_reason"] == "measured" and 0 < fn["removed"] < free.report.full_network["removed"]
    assert fn["predicted_error_increase"] <= bound
    assert fn["measured_error_increase"] == pytest.approx(measured_error(model, res.model, x), rel=1e-6)
    assert fn["measured_error_increase"] <= bound < fn["checkpoints"][-1]["measured"]
    assert fn["checkpoints"][-2]["measured"] == pytest.approx(fn["measured_error_increase"], rel=1e-12)


def test_recompute_every_and_baselines_reach_the_target():
    model, _ = mlp(np.float64)
    x = np.random.default_rng(9).normal(size=(32, 5))
    for method, full in [("obs", FullOptions(recompute_every=10, step=2)), ("obd", None), ("magnitude", None)]:
        res = api.prune(model, {"x": x}, hessian="full", method=method, sparsity=0.5, full=full, device="cpu")
        assert res.report.full_network["removed"] == 33
        assert res.report.full_network["recomputes"] == (3 if method == "obs" else 0)  # after 10, 20, 30
        assert sparsity_of(res.model, {"W1", "W2", "W3"}) == 0.5


def test_memory_guard_refuses_before_any_gradient_work(monkeypatch):
    import onnx_obs.hessian.inverse as inverse
    import onnx_obs.strategies.full_network as fn

    monkeypatch.setattr(inverse, "available_memory", lambda: 10_000)
    monkeypatch.setattr(fn, "FullNetwork", None)  # reaching it would fail differently
    model, _ = mlp(np.float64)
    with pytest.raises(OnnxObsError, match=r"--hessian layerwise") as info:
        api.prune(model, {"x": np.zeros((4, 5))}, hessian="full", device="cpu")
    assert "\n" not in str(info.value)


def test_unsupported_op_falls_back_to_fd_or_refuses():
    model, _ = mlp(np.float64)
    model.graph.node[1].op_type = "Sin"  # no gradient rule; onnxruntime runs it
    x = np.random.default_rng(10).normal(size=(16, 5))
    res = api.prune(model, {"x": x}, hessian="full", sparsity=0.2, device="cpu")
    assert res.report.full_network["gradients"] == "fd"
    assert any("finite differences" in n and "Sin" in n for n in res.report.notes)
    with pytest.raises(OnnxObsError, match="Sin"):
        api.prune(model, {"x": x}, hessian="full", device="cpu", full=FullOptions(gradients="graph"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(full=FullOptions(max_error_increase="5%")), "needs --labels|without labels"),
    (dict(hessian="fisher"), "--labels"),
    (dict(method="wanda"), "obs, obd, magnitude"),
    (dict(full=FullOptions(max_error_increase="lots")), "percentage"),
    (dict(method="magnitude", full=FullOptions(max_error_increase=1.0)), "obs or obd"),
    (dict(hessian="layerwise", full=FullOptions(step=4)), "--step applies to full-network"),
    (dict(hessian="diagonal"), "unknown --hessian"),
])
def test_bad_settings_are_one_line_errors(kwargs, message):
    model, _ = mlp(np.float64)
    kwargs = {"hessian": "full", **kwargs}
    with pytest.raises(OnnxObsError, match=message) as info:
        api.prune(model, {"x": np.zeros((4, 5))}, device="cpu", **kwargs)
    assert "\n" not in str(info.value)


def test_relative_bound_uses_the_labelled_error():
    model, _ = mlp(np.float64)
    r = np.random.default_rng(11)
    x, t = r.normal(size=(32, 5)), r.normal(size=(32, 3))
    res = api.prune(model, {"x": x, "t": t}, labels="t", hessian="full", sparsity=0.9, device="cpu",
                    full=FullOptions(alpha=1e-8, max_error_increase="1%"))
    fn = res.report.full_network
    y = run(model, {"x": x})["y"]
    assert fn["error_before"] == pytest.approx(0.5 * np.sum((y - t) ** 2) / 32, rel=1e-9)
    assert fn["predicted_error_increase"] <= 0.01 * fn["error_before"] and fn["stop_reason"] == "measured"
    y = run(res.model, {"x": x})["y"]
    assert fn["error_after"] == pytest.approx(0.5 * np.sum((y - t) ** 2) / 32, rel=1e-9)
    assert fn["measured_error_increase"] <= 0.01 * fn["error_before"]
