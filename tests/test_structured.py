"""Structured OBS: whole units removed, the graph shrunk, consumers corrected.

The reference for every graph is computed here, independently of onnx_obs: the dense model with
the removed units zeroed (producer rows, biases and per-channel constants) and the consumer's
remaining columns and bias set to the least-squares fit (numpy.linalg.lstsq) of its original
output from its original inputs. With damp=0, group OBS must land on exactly that optimum, so the
shrunk model and the reference compute the same outputs to float32 precision.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from onnx import helper, numpy_helper

from graphs import init, make_model, randn, run, run_tensors, vi
from onnx_obs import api
from onnx_obs.errors import OnnxObsError
from onnx_obs.algorithms.structured import Consumer, group_obs, plan_counts


# ---------------------------------------------------------------- helpers

def structured(model, feeds, **kw):
    return api.prune(model, feeds, structure="neurons", damp=0.0, **kw)


def removed_units(result, producer: str) -> list[int]:
    return next(e["removed"] for e in result.report.structure if e["name"] == producer)


def weights(model) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def with_weights(model, arrays: dict[str, np.ndarray]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if t.name in arrays:
            t.CopyFrom(numpy_helper.from_array(arrays[t.name].astype(np.float32), t.name))
    return m


def zeroed(arrays: dict, units: dict[str, list[int]]) -> dict:
    """Copies with entries `units[name]` zeroed along axis 0."""
    out = {k: v.astype(np.float64).copy() for k, v in arrays.items()}
    for name, idx in units.items():
        out[name][idx] = 0.0
    return out


def lstsq_with_bias(X: np.ndarray, T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """min ||[X 1] c - T||: weights (outputs x inputs) and bias."""
    A = np.hstack([X.astype(np.float64), np.ones((len(X), 1))])
    coef = np.linalg.lstsq(A, T.astype(np.float64), rcond=None)[0]
    return coef[:-1].T, coef[-1]


def patches(x: np.ndarray, k: int = 3, pad: int = 1) -> np.ndarray:
    """im2col of (N, C, H, W) for a k x k stride-1 conv: rows (n, h, w), columns (c, kh, kw)."""
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    win = sliding_window_view(xp, (k, k), axis=(2, 3))            # N, C, H, W, k, k
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(-1, x.shape[1] * k * k)


def conv_fit(R: np.ndarray, W: np.ndarray, b: np.ndarray, keep: list[int]):
    """Least-squares refit of a 3x3 pad-1 conv on the kept input channels of R."""
    P = patches(R.astype(np.float64))
    T = P @ W.reshape(len(W), -1).T + b
    cols = np.concatenate([np.arange(9) + 9 * c for c in keep])
    Wk, bk = lstsq_with_bias(P[:, cols], T)
    full = np.zeros(W.shape)
    full[:, keep] = Wk.reshape(len(W), len(keep), 3, 3)
    return full, bk


def assert_same_outputs(model, reference, feeds):
    got, want = run(model, feeds), run(reference, feeds)
    for k in want:
        scale = np.abs(want[k]).max()
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-4 * scale)


def keep_of(units: int, gone: list[int]) -> list[int]:
    return [u for u in range(units) if u not in gone]


def halve_units(model, X, producer: str, units: int):
    """Remove half the units of every layer; return the result and `producer`'s removed and
    kept units."""
    res = structured(model, {"x": X}, sparsity=0.5)
    gone = removed_units(res, producer)
    return res, gone, keep_of(units, gone)


def gemm(a, w, b, y, **kw):
    return helper.make_node("Gemm", [a, w, b], [y], name=y, transB=1, **kw)


def conv(x, w, b, y, **kw):
    return helper.make_node("Conv", [x, w, b], [y], name=y, pads=[1, 1, 1, 1], **kw)


def relu(x, y):
    return helper.make_node("Relu", [x], [y], name=y)


# ---------------------------------------------------------------- chains

@pytest.mark.parametrize("form", ["gemm", "gemm_alpha_no_bias", "matmul_add_transposed"])
def test_gemm_relu_gemm(form):
    a = {"W1": randn([12, 8], 1), "b1": randn([12], 2), "W2": randn([5, 12], 3), "b2": randn([5], 4)}
    alpha = 0.5 if form == "gemm_alpha_no_bias" else 1.0
    if form == "gemm":
        nodes = [gemm("x", "W1", "b1", "h"), relu("h", "r"), gemm("r", "W2", "b2", "y")]
    elif form == "gemm_alpha_no_bias":   # the consumer gets a bias input to absorb the correction
        a["b2"] = np.zeros(5, np.float32)
        nodes = [gemm("x", "W1", "b1", "h"), relu("h", "r"),
                 helper.make_node("Gemm", ["r", "W2"], ["y"], name="y", transB=1, alpha=alpha)]
    else:   # weights read through a Transpose, biases as Add of a constant (exporters do this)
        nodes = [helper.make_node("Transpose", ["W1"], ["W1t"], perm=[1, 0]),
                 helper.make_node("MatMul", ["x", "W1t"], ["m1"]), helper.make_node("Add", ["m1", "b1"], ["h"]),
                 relu("h", "r"), helper.make_node("Transpose", ["W2"], ["W2t"], perm=[1, 0]),
                 helper.make_node("MatMul", ["r", "W2t"], ["m2"]), helper.make_node("Add", ["m2", "b2"], ["y"])]
    inits = [init(k, v) for k, v in a.items() if not (form == "gemm_alpha_no_bias" and k == "b2")]
    model = make_model(nodes, [vi("x", shape=["batch", 8])], [vi("y", shape=["batch", 5])], inits)
    X = randn([400, 8], 5)
    res, gone, keep = halve_units(model, X, "W1", 12)
    assert len(gone) == 6
    w = weights(res.model)
    assert w["W1"].shape == (6, 8) and w["b1"].shape == (6,) and w["W2"].shape == (5, 6)
    onnx.checker.check_model(res.model, full_check=True)

    R = np.maximum(X.astype(np.float64) @ a["W1"].T + a["b1"], 0)
    Wk, bk = lstsq_with_bias(R[:, keep], alpha * R @ a["W2"].T.astype(np.float64) + a["b2"])
    Xe = randn([64, 8], 6).astype(np.float64)
    W1z, b1z = a["W1"].astype(np.float64), a["b1"].astype(np.float64)
    W1z[gone], b1z[gone] = 0.0, 0.0     # the dense model with the units zeroed ...
    W2c = np.zeros((5, 12))
    W2c[:, keep] = Wk                   # ... and the least-squares consumer
    want = np.maximum(Xe @ W1z.T + b1z, 0) @ W2c.T + bk
    got = run(res.model, {"x": Xe.astype(np.float32)})["y"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    entry = res.report.structure[0]     # with damp=0 the predicted error is the measured one
    assert entry["predicted_error"] == pytest.approx(entry["measured_error"], rel=1e-6)


def test_fp16_weights_behind_a_cast_keep_float_biases():
    # Weights stored in float16 and cast to float where used: the corrected consumer bias (the
    # existing one, or one added to a Gemm without bias) is float like the computation.
    a = {"W1": randn([12, 8], 1, np.float16), "b1": randn([12], 2), "W2": randn([5, 12], 3, np.float16),
         "W3": randn([4, 5], 4, np.float16), "b3": randn([4], 5)}
    cast = [helper.make_node("Cast", [w], [w + "f"], name="cast_" + w, to=onnx.TensorProto.FLOAT)
            for w in ("W1", "W2", "W3")]
    nodes = cast + [gemm("x", "W1f", "b1", "h"), relu("h", "r"),
                    helper.make_node("Gemm", ["r", "W2f"], ["h2"], name="h2", transB=1), relu("h2", "r2"),
                    gemm("r2", "W3f", "b3", "y")]
    model = make_model(nodes, [vi("x", shape=["batch", 8])], [vi("y", shape=["batch", 4])],
                       [init(k, v) for k, v in a.items()])
    res = structured(model, {"x": randn([300, 8], 6)}, sparsity=0.4)
    w = weights(res.model)
    assert w["W1"].dtype == w["W2"].dtype == w["W3"].dtype == np.float16
    assert w["W1"].shape == (7, 8) and w["W2"].shape == (3, 7) and w["W3"].shape == (4, 3)
    added = [k for k in w if k not in a]
    assert len(added) == 1 and w[added[0]].dtype == w["b1"].dtype == w["b3"].dtype == np.float32
    out = run(res.model, {"x": randn([4, 8], 7)})["y"]
    assert out.shape == (4, 4) and np.isfinite(out).all()


@pytest.mark.parametrize("act", ["relu", "silu"])
def test_conv_batchnorm_act_conv(act):
    a = {"W1": randn([8, 3, 3, 3], 1), "b1": randn([8], 2), "s": randn([8], 3), "B": randn([8], 4),
         "m": randn([8], 5), "v": np.abs(randn([8], 6)) + 0.5, "W2": randn([4, 8, 3, 3], 7),
         "b2": randn([4], 8)}
    nodes = [conv("x", "W1", "b1", "c1"),
             helper.make_node("BatchNormalization", ["c1", "s", "B", "m", "v"], ["bn"], name="bn")]
    if act == "relu":
        nodes.append(relu("bn", "r"))
    else:   # SiLU as exporters write it: both operands of the Mul carry the channels
        nodes += [helper.make_node("Sigmoid", ["bn"], ["sg"], name="sg"),
                  helper.make_node("Mul", ["bn", "sg"], ["r"], name="silu")]
    nodes.append(conv("r", "W2", "b2", "y"))
    model = make_model(nodes, [vi("x", shape=["batch", 3, 6, 6])], [vi("y", shape=["batch", 4, 6, 6])],
                       [init(k, v) for k, v in a.items()])
    X = randn([64, 3, 6, 6], 9)
    res, gone, keep = halve_units(model, X, "W1", 8)
    w = weights(res.model)
    assert w["W1"].shape == (4, 3, 3, 3) and w["W2"].shape == (4, 4, 3, 3)
    assert all(w[k].shape == (4,) for k in ("b1", "s", "B", "m", "v"))
    onnx.checker.check_model(res.model, full_check=True)

    R = run_tensors(model, {"x": X}, ["r"])["r"]
    ref = zeroed(a, {"W1": gone, "b1": gone, "s": gone, "B": gone})
    ref["W2"], ref["b2"] = conv_fit(R, a["W2"], a["b2"], keep)
    assert_same_outputs(res.model, with_weights(model, ref), {"x": randn([8, 3, 6, 6], 10)})


@pytest.mark.parametrize("flatten", ["Flatten", "Reshape"])
def test_conv_flatten_gemm(flatten):
    a = {"W1": randn([6, 2, 3, 3], 1), "b1": randn([6], 2), "W2": randn([3, 96], 3), "b2": randn([3], 4)}
    inits = [init(k, v) for k, v in a.items()]
    if flatten == "Flatten":
        flat = helper.make_node("Flatten", ["r"], ["f"], name="flat")
    else:  # an explicit channel count in the shape constant: it must shrink too
        flat = helper.make_node("Reshape", ["r", "shape"], ["f"], name="flat")
        inits.append(init("shape", np.array([0, 96], dtype=np.int64)))
    model = make_model([conv("x", "W1", "b1", "c"), relu("c", "r"), flat, gemm("f", "W2", "b2", "y")],
                       [vi("x", shape=["batch", 2, 4, 4])], [vi("y", shape=["batch", 3])], inits)
    X = randn([600, 2, 4, 4], 5)
    res, gone, keep = halve_units(model, X, "W1", 6)
    w = weights(res.model)
    assert w["W1"].shape == (3, 2, 3, 3) and w["W2"].shape == (3, 48)
    if flatten == "Reshape":
        assert w["shape"].tolist() == [0, 48]
    onnx.checker.check_model(res.model, full_check=True)

    F = run_tensors(model, {"x": X}, ["r"])["r"].reshape(len(X), 96).astype(np.float64)
    cols = np.concatenate([np.arange(16) + 16 * c for c in keep])   # channel c -> 16 spatial columns
    Wk, bk = lstsq_with_bias(F[:, cols], F @ a["W2"].T.astype(np.float64) + a["b2"])
    ref = zeroed(a, {"W1": gone, "b1": gone})
    ref["W2"] = np.zeros((3, 96))
    ref["W2"][:, cols] = Wk
    ref["b2"] = bk
    assert_same_outputs(res.model, with_weights(model, ref), {"x": randn([16, 2, 4, 4], 6)})


@pytest.mark.parametrize("opset", [13, 18])
def test_conv_reducemean_gemm(opset):
    # x.mean((2, 3)) as exporters write a global pool: ReduceMean over the spatial axes, axes an
    # attribute (keepdims=0, opset 13) or an input (keepdims=1 then Flatten, opset 18).
    a = {"W1": randn([6, 2, 3, 3], 1), "b1": randn([6], 2), "W2": randn([3, 6], 3), "b2": randn([3], 4)}
    inits = [init(k, v) for k, v in a.items()]
    if opset == 13:
        pool = [helper.make_node("ReduceMean", ["r"], ["f"], name="mean", axes=[2, 3], keepdims=0)]
    else:
        inits.append(init("axes", np.array([-2, -1], np.int64)))
        pool = [helper.make_node("ReduceMean", ["r", "axes"], ["m"], name="mean"),
                helper.make_node("Flatten", ["m"], ["f"], name="flat")]
    model = make_model([conv("x", "W1", "b1", "c"), relu("c", "r"), *pool, gemm("f", "W2", "b2", "y")],
                       [vi("x", shape=["batch", 2, 4, 4])], [vi("y", shape=["batch", 3])], inits,
                       opset=opset)
    X = randn([200, 2, 4, 4], 5)
    res, gone, keep = halve_units(model, X, "W1", 6)
    w = weights(res.model)
    assert w["W1"].shape == (3, 2, 3, 3) and w["W2"].shape == (3, 3)
    onnx.checker.check_model(res.model, full_check=True)

    F = run_tensors(model, {"x": X}, ["r"])["r"].mean(axis=(2, 3)).astype(np.float64)
    Wk, bk = lstsq_with_bias(F[:, keep], F @ a["W2"].T.astype(np.float64) + a["b2"])
    ref = zeroed(a, {"W1": gone, "b1": gone})
    ref["W2"] = np.zeros((3, 6))
    ref["W2"][:, keep] = Wk
    ref["b2"] = bk
    assert_same_outputs(res.model, with_weights(model, ref), {"x": randn([16, 2, 4, 4], 6)})


def _view_flatten(index: int) -> tuple[list, list]:
    """x.view(x.size(index), -1) as the TorchScript exporter writes it."""
    nodes = [helper.make_node("Shape", ["r"], ["shp"], name="shape"),
             helper.make_node("Gather", ["shp", "i"], ["n"], name="size", axis=0),
             helper.make_node("Unsqueeze", ["n", "zero"], ["n1"], name="unsq"),
             helper.make_node("Concat", ["n1", "minus1"], ["target"], name="target", axis=0),
             helper.make_node("Reshape", ["r", "target"], ["f"], name="view")]
    inits = [init("i", np.array(index, np.int64)), init("zero", np.array([0], np.int64)),
             init("minus1", np.array([-1], np.int64))]
    return nodes, inits


def test_conv_view_batch_gemm():
    a = {"W1": randn([6, 2, 3, 3], 1), "b1": randn([6], 2), "W2": randn([3, 96], 3), "b2": randn([3], 4)}
    view, extra = _view_flatten(0)
    model = make_model([conv("x", "W1", "b1", "c"), relu("c", "r"), *view, gemm("f", "W2", "b2", "y")],
                       [vi("x", shape=["batch", 2, 4, 4])], [vi("y", shape=["batch", 3])],
                       [init(k, v) for k, v in a.items()] + extra, opset=13)
    X = randn([600, 2, 4, 4], 5)
    res, gone, keep = halve_units(model, X, "W1", 6)
    w = weights(res.model)
    assert w["W1"].shape == (3, 2, 3, 3) and w["W2"].shape == (3, 48)
    onnx.checker.check_model(res.model, full_check=True)

    F = run_tensors(model, {"x": X}, ["r"])["r"].reshape(len(X), 96).astype(np.float64)
    cols = np.concatenate([np.arange(16) + 16 * c for c in keep])
    Wk, bk = lstsq_with_bias(F[:, cols], F @ a["W2"].T.astype(np.float64) + a["b2"])
    ref = zeroed(a, {"W1": gone, "b1": gone})
    ref["W2"] = np.zeros((3, 96))
    ref["W2"][:, cols] = Wk
    ref["b2"] = bk
    assert_same_outputs(res.model, with_weights(model, ref), {"x": randn([16, 2, 4, 4], 6)})


def test_shapes_after_a_computed_reshape_are_recovered():
    # x.flatten(2).transpose(1, 2) as older exports write it: Reshape(c, Concat(Slice(Shape(c),
    # 0, 2), [-1])). onnx's shape inference knows nothing after it; the MLP behind it is prunable.
    nodes = [helper.make_node("Conv", ["x", "Wc"], ["c"], name="conv"),
             helper.make_node("Shape", ["c"], ["s"], name="shape"),
             helper.make_node("Slice", ["s", "start", "end"], ["s2"], name="slice"),
             helper.make_node("Concat", ["s2", "minus1"], ["t"], name="cat", axis=0),
             helper.make_node("Reshape", ["c", "t"], ["f"], name="flat"),
             helper.make_node("Transpose", ["f"], ["ft"], name="tr", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["ft", "W1"], ["h"], name="mm1"), relu("h", "r"),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2")]
    a = {"Wc": randn([8, 4, 1, 1]), "W1": randn([8, 16], 1), "W2": randn([16, 5], 2)}
    inits = [init(k, v) for k, v in a.items()] + [
        init("start", np.array([0], np.int64)), init("end", np.array([2], np.int64)),
        init("minus1", np.array([-1], np.int64))]
    model = make_model(nodes, [vi("x", shape=["batch", 4, 3, 3])], [vi("y", shape=["batch", 9, 5])],
                       inits, opset=13)
    assert not any(v.name == "h" and v.type.tensor_type.HasField("shape")
                   for v in onnx.shape_inference.infer_shapes(model).graph.value_info)
    X = randn([100, 4, 3, 3], 3)
    res, gone, keep = halve_units(model, X, "W1", 16)
    w = weights(res.model)
    assert w["W1"].shape == (8, 8) and w["W2"].shape == (8, 5) and w["Wc"].shape == (8, 4, 1, 1)

    R = run_tensors(model, {"x": X}, ["r"])["r"].reshape(-1, 16).astype(np.float64)
    ref = {"W1": a["W1"].astype(np.float64).copy(), "W2": np.zeros((16, 5))}
    ref["W1"][:, gone] = 0.0
    ref["W2"][keep] = np.linalg.lstsq(R[:, keep], R @ a["W2"], rcond=None)[0]
    assert_same_outputs(res.model, with_weights(model, ref), {"x": randn([8, 4, 3, 3], 4)})


def test_dynamo_unoptimized_zero_bias_and_view():
    # torch.onnx.export(dynamo=True, optimize=False): a bias-free Conv gets a zero bias sized
    # by Shape(W, end=1), and x.view(x.size(0), -1) is built from value_ints Constants.
    ints = lambda out, v: helper.make_node("Constant", [], [out], value_ints=v)
    nodes = [helper.make_node("Shape", ["W2"], ["W2_n"], name="W2_shape", start=0, end=1),
             helper.make_node("Expand", ["zero", "W2_n"], ["W2_b"], name="W2_expand"),
             conv("x", "W1", "b1", "c1"), relu("c1", "r1"),
             helper.make_node("Conv", ["r1", "W2", "W2_b"], ["c2"], name="c2", pads=[1, 1, 1, 1]),
             relu("c2", "r2"), conv("r2", "W3", "b3", "c3"), relu("c3", "r3"),
             helper.make_node("Shape", ["r3"], ["s"], name="size0", start=0, end=1),
             helper.make_node("Squeeze", ["s"], ["n"], name="squeeze"), ints("m1", [-1]),
             helper.make_node("Reshape", ["n", "m1"], ["n1"], name="as_vector"), ints("m1b", [-1]),
             helper.make_node("Concat", ["n1", "m1b"], ["target"], name="target", axis=0),
             helper.make_node("Reshape", ["r3", "target"], ["f"], name="view"), gemm("f", "W4", "b4", "y")]
    a = {"W1": randn([6, 2, 3, 3], 1), "b1": randn([6], 2), "W2": randn([4, 6, 3, 3], 3),
         "W3": randn([4, 4, 3, 3], 4), "b3": randn([4], 5), "W4": randn([3, 64], 6), "b4": randn([3], 7)}
    model = make_model(nodes, [vi("x", shape=["batch", 2, 4, 4])], [vi("y", shape=["batch", 3])],
                       [init(k, v) for k, v in a.items()] + [init("zero", np.array([0.0], np.float32))],
                       opset=18)
    res = structured(model, {"x": randn([300, 2, 4, 4], 8)}, sparsity=0.5)
    w = weights(res.model)
    assert w["W1"].shape == (3, 2, 3, 3) and w["W2"].shape == (4, 3, 3, 3)   # W1's units go
    assert w["W3"].shape == (2, 4, 3, 3) and w["W4"].shape == (3, 32)         # through the view
    reasons = {s["name"]: s["reason"] for s in res.report.skipped}
    assert "Shape 'W2_shape' reads the size of 'W2'" in reasons["W2"]          # W2's units stay
    out = run(res.model, {"x": randn([5, 2, 4, 4], 9)})["y"]
    assert out.shape == (5, 3) and np.isfinite(out).all()


def test_shape_read_of_the_channel_count_blocks():
    # x.view(x.size(1), -1) would keep the old channel count in the computed target
    a = {"W1": randn([6, 2, 3, 3], 1), "b1": randn([6], 2), "W2": randn([16, 3], 3)}
    view, extra = _view_flatten(1)
    model = make_model([conv("x", "W1", "b1", "c"), relu("c", "r"), *view,
                        helper.make_node("MatMul", ["f", "W2"], ["y"], name="mm")],
                       [vi("x", shape=[1, 2, 4, 4])], [vi("y", shape=[6, 3])],
                       [init(k, v) for k, v in a.items()] + extra, opset=13)
    with pytest.raises(OnnxObsError, match="Shape 'shape' reads its channel count"):
        structured(model, {"x": randn([1, 2, 4, 4], 5)}, sparsity=0.5)


def test_reduction_over_the_channels_blocks():
    a = {"W1": randn([6, 2, 3, 3], 1), "b1": randn([6], 2), "W2": randn([3, 16], 3), "b2": randn([3], 4)}
    nodes = [conv("x", "W1", "b1", "c"), relu("c", "r"),
             helper.make_node("ReduceMax", ["r"], ["m"], name="cmax", axes=[1], keepdims=0),
             helper.make_node("Flatten", ["m"], ["f"], name="flat"), gemm("f", "W2", "b2", "y")]
    model = make_model(nodes, [vi("x", shape=["batch", 2, 4, 4])], [vi("y", shape=["batch", 3])],
                       [init(k, v) for k, v in a.items()], opset=13)
    with pytest.raises(OnnxObsError, match="reduces over its channel axis"):
        structured(model, {"x": randn([32, 2, 4, 4], 5)}, sparsity=0.5)


def test_concat_offsets():
    a = {"WA": randn([4, 3, 3, 3], 1), "bA": randn([4], 2), "WB": randn([6, 3, 3, 3], 3),
         "bB": randn([6], 4), "WC": randn([3, 10, 3, 3], 5), "bC": randn([3], 6)}
    nodes = [conv("x", "WA", "bA", "cA"), relu("cA", "rA"), conv("x", "WB", "bB", "cB"), relu("cB", "rB"),
             helper.make_node("Concat", ["rA", "rB"], ["cat"], name="cat", axis=1),
             conv("cat", "WC", "bC", "y")]
    model = make_model(nodes, [vi("x", shape=["batch", 3, 5, 5])], [vi("y", shape=["batch", 3, 5, 5])],
                       [init(k, v) for k, v in a.items()])
    X = randn([64, 3, 5, 5], 7)
    res = structured(model, {"x": X}, sparsity=0.5)
    goneA, goneB = removed_units(res, "WA"), removed_units(res, "WB")
    assert (len(goneA), len(goneB)) == (2, 3)
    keep = keep_of(4, goneA) + [4 + c for c in keep_of(6, goneB)]
    w = weights(res.model)
    assert w["WA"].shape == (2, 3, 3, 3) and w["WB"].shape == (3, 3, 3, 3) and w["WC"].shape == (3, 5, 3, 3)
    onnx.checker.check_model(res.model, full_check=True)

    # WA's units go first; WB's removal then refits WC again: both exact OBS steps on the same
    # quadratic, so the end point is the joint least-squares optimum over the kept channels.
    R = run_tensors(model, {"x": X}, ["cat"])["cat"]
    ref = zeroed(a, {"WA": goneA, "bA": goneA, "WB": goneB, "bB": goneB})
    ref["WC"], ref["bC"] = conv_fit(R, a["WC"], a["bC"], keep)
    assert_same_outputs(res.model, with_weights(model, ref), {"x": randn([8, 3, 5, 5], 8)})


def test_depthwise_conv_follows_its_input_channels():
    a = {"W1": randn([6, 3, 3, 3], 1), "b1": randn([6], 2), "Wd": randn([6, 1, 3, 3], 3),
         "bd": randn([6], 4), "W3": randn([2, 6, 3, 3], 5), "b3": randn([2], 6)}
    nodes = [conv("x", "W1", "b1", "c1"), relu("c1", "r1"), conv("r1", "Wd", "bd", "cd", group=6),
             relu("cd", "rd"), conv("rd", "W3", "b3", "y")]
    model = make_model(nodes, [vi("x", shape=["batch", 3, 5, 5])], [vi("y", shape=["batch", 2, 5, 5])],
                       [init(k, v) for k, v in a.items()])
    X = randn([64, 3, 5, 5], 7)
    res, gone, keep = halve_units(model, X, "W1", 6)
    w = weights(res.model)
    assert w["W1"].shape == (3, 3, 3, 3) and w["Wd"].shape == (3, 1, 3, 3) and w["W3"].shape == (2, 3, 3, 3)
    dw = next(n for n in res.model.graph.node if n.name == "cd")
    assert helper.get_attribute_value(next(x for x in dw.attribute if x.name == "group")) == 3
    assert not any("depthwise" in s["reason"] for s in res.report.skipped)   # it lost channels with W1's group

    R = run_tensors(model, {"x": X}, ["rd"])["rd"]
    ref = zeroed(a, {"W1": gone, "b1": gone, "bd": gone})
    ref["W3"], ref["b3"] = conv_fit(R, a["W3"], a["b3"], keep)
    assert_same_outputs(res.model, with_weights(model, ref), {"x": randn([8, 3, 5, 5], 8)})


def test_conv_channels_stay_in_blocks_of_8():
    # 16 channels at 30%: 11 kept would drop onnxruntime's blocked (NCHWc) convolutions and run
    # slower than the original; the nearest multiple of 8 is kept instead, and a note says so.
    a = {"W1": randn([16, 3, 3, 3], 1), "b1": randn([16], 2), "W2": randn([4, 16, 3, 3], 3),
         "b2": randn([4], 4)}
    nodes = [conv("x", "W1", "b1", "c1"), relu("c1", "r1"), conv("r1", "W2", "b2", "y")]
    model = make_model(nodes, [vi("x", shape=["batch", 3, 5, 5])], [vi("y", shape=["batch", 4, 5, 5])],
                       [init(k, v) for k, v in a.items()])
    res = structured(model, {"x": randn([64, 3, 5, 5], 5)}, sparsity=0.3)
    w = weights(res.model)
    assert w["W1"].shape == (8, 3, 3, 3) and w["W2"].shape == (4, 8, 3, 3)
    assert any("multiples of 8 or 16" in n and "W1 16 -> 8" in n for n in res.report.notes)


def test_plan_counts_in_steps_gives_back_the_overshoot():
    # Layer 0 goes in steps of 8 units (cost 1 and saving 1 each), layer 1 one unit at a time (cost
    # 0.5, saving 1, 3 units at most). From 40 to 30: layer 1's 3 units, then one step of layer 0
    # overshoots to 29; giving back one unit of layer 1 still meets the target.
    curves = [np.full(31, 1.0), np.full(3, 0.5)]
    resource = lambda counts: 40.0 - counts[0] - counts[1]
    assert plan_counts(curves, resource, 30.0, steps=[8, 1]).tolist() == [8, 2]
    assert plan_counts(curves, resource, 30.0).tolist() == [7, 3]   # unit steps: no overshoot


# ---------------------------------------------------------------- the algorithm alone

def test_group_obs_is_the_least_squares_optimum():
    rng = np.random.default_rng(0)
    n, units, k = 500, 5, 3
    X = rng.standard_normal((n, units * k)) @ rng.standard_normal((units * k, units * k))
    W = rng.standard_normal((4, units * k))
    H = 2.0 / n * X.T @ X
    columns = [np.arange(k) + k * u for u in range(units)]
    res = group_obs([Consumer(W, H, columns)], 2, damp=0.0)
    keep = np.concatenate([columns[u] for u in range(units) if u not in res.order])
    Wls = np.linalg.lstsq(X[:, keep], X @ W.T, rcond=None)[0].T
    np.testing.assert_allclose(res.weights[0][:, keep], Wls, rtol=1e-7, atol=1e-9)
    assert not res.weights[0][:, np.setdiff1d(np.arange(units * k), keep)].any()
    dW = res.weights[0] - W
    assert res.costs.sum() == pytest.approx(0.5 * np.sum((dW @ H) * dW), rel=1e-8)

    def lone_cost(u):  # error of the best refit without unit u alone, by lstsq
        kept = np.concatenate([columns[v] for v in range(units) if v != u])
        fit = np.linalg.lstsq(X[:, kept], X @ W.T, rcond=None)[0]
        return np.sum((X[:, kept] @ fit - X @ W.T) ** 2) / n

    costs = [lone_cost(u) for u in range(units)]
    assert res.order[0] == int(np.argmin(costs))
    assert res.costs[0] == pytest.approx(costs[res.order[0]], rel=1e-7)


def test_units_feeding_two_consumers_cost_the_sum():
    rng = np.random.default_rng(1)
    n = 300
    X = rng.standard_normal((n, 4)) @ rng.standard_normal((4, 4))
    H = 2.0 / n * X.T @ X
    cols = [np.array([u]) for u in range(4)]
    W1, W2 = rng.standard_normal((2, 4)), rng.standard_normal((3, 4))

    def lone(W, u):
        kept = [v for v in range(4) if v != u]
        fit = np.linalg.lstsq(X[:, kept], X @ W.T, rcond=None)[0]
        return np.sum((X[:, kept] @ fit - X @ W.T) ** 2) / n

    total = [lone(W1, u) + lone(W2, u) for u in range(4)]
    res = group_obs([Consumer(W1, H, cols), Consumer(W2, H, cols)], 1, damp=0.0)
    assert res.order[0] == int(np.argmin(total))
    assert res.costs[0] == pytest.approx(min(total), rel=1e-7)


# ---------------------------------------------------------------- targets and settings

def test_target_params_is_met(mlp_path, mlp_calib):
    res = api.prune(str(mlp_path), str(mlp_calib), structure="neurons", target_params=3000)
    after = res.report.costs["params"]["after"]
    assert after <= 3000 and after > 2500   # one unit saves at most 64 + 1 + 32 parameters
    assert res.report.costs["params"]["before"] == 6570


def test_target_flops_on_the_cnn(cnn_path, cnn_calib):
    res = api.prune(str(cnn_path), str(cnn_calib), structure="channels", target_flops=900_000,
                    max_samples=64)
    macs = res.report.costs["macs"]
    assert macs["before"] == 1_821_952 and 800_000 < macs["after"] <= 900_000
    # the phases of a structured run: its captures, group solves and sensitivity runs are timed
    phases = res.report.to_dict()["totals"]["phase_seconds"]
    assert {"load", "capture", "hessians", "solves", "probes", "other", "validation"} <= set(phases)
    assert all(v > 0 for v in phases.values())
    assert sum(phases.values()) <= res.report.wall_seconds + 1e-3


@pytest.mark.parametrize("kwargs, words", [
    (dict(target_params=100), "add --structure"),
    (dict(structure="neurons", method="wanda"), "--method obs"),
    (dict(structure="rows"), "neurons or channels"),
    (dict(structure="neurons", target_params=100, target_flops=100), "not both"),
    (dict(storage="zip"), "unknown storage"),
    (dict(structure="neurons", target_params=10), "cannot be reached"),
])
def test_user_errors(mlp_path, mlp_calib, kwargs, words):
    with pytest.raises(OnnxObsError, match=words):
        api.prune(str(mlp_path), str(mlp_calib), **kwargs)


def test_cli_channels_writes_a_smaller_faster_model(cli, tmp_path, cnn_path, cnn_calib):
    out = tmp_path / "small.onnx"
    r = cli("prune", cnn_path, "-o", out, "--calib", cnn_calib, "--structure", "channels",
            "--sparsity", "0.5", "--max-samples", "64")
    assert r.exit_code == 0, r.stderr
    assert out.stat().st_size < cnn_path.stat().st_size / 3
    assert "MACs" in r.stdout and "latency" in r.stdout and "14.weight" in r.stdout
    onnx.checker.check_model(str(out), full_check=True)
    again = cli("inspect", out)
    assert again.exit_code == 0 and "[16, 1, 3, 3]" in again.stdout
