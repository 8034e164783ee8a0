"""Float32 Hessian products (the default for float32 activations) against a float64 reference.

The bound: every 4096-row chunk is one float32 product (a dot product of at most 4096 terms,
rounding error below about sqrt(4096) * 2^-24 = 4e-6 of its magnitude, in practice much less),
summed in float64; the samples' real activations measure 3e-8..1.1e-7 relative Frobenius error
(scripts/bench_hessian.py). Tests allow 2e-6.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from cli_checks import assert_one_line_error, prune_args
from graphs import conv_model
from onnx_obs import api
from onnx_obs.hessian.layerwise import HessianSum
from test_capture import capture, conv_vectors, hessian

BOUND = 2e-6


def rel_fro(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_conv_capture_float32_within_bound_of_float64_reference():
    model, feeds = conv_model(dims=2, batch=7, c_in=4, c_out=6, group=2, kernel=[3, 2], spatial=[6, 5],
                              pads=[1, 0, 2, 1], strides=[2, 1], dilations=[1, 2])
    sites, hs = capture(model, feeds, batch_size=3, precision="float32")
    attrs = sites["W"].uses[0].attrs
    vecs, _ = conv_vectors(feeds["x"], [3, 2], 2, attrs.get("strides"), attrs.get("pads"), attrs.get("dilations"))
    ref = hessian(vecs)
    err = rel_fro(hs["W"], ref)
    assert err < BOUND
    assert err > 0  # float32 products really ran: the float64 path meets 1e-10 (test_capture)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_many_chunks_float32_and_float16_within_bound(dtype):
    """20000 rows (5 float32 chunks) of post-ReLU features: float32 products of the given values
    against 2 X^T X / n in float64."""
    x = np.maximum(np.random.default_rng(3).standard_normal((2, 20000, 40)), 0).astype(dtype)
    h = HessianSum(2, 40)
    h.add(x)
    x64 = x.astype(np.float64)
    ref = 2 * np.einsum("gni,gnj->gij", x64, x64) / 20000
    assert 0 < rel_fro(h.hessian(), ref) < BOUND


def test_float64_activations_keep_float64_products():
    x = np.random.default_rng(4).standard_normal((1, 5000, 30))
    h = HessianSum(1, 30, "float32")
    h.add(x)
    np.testing.assert_allclose(h.hessian(), 2 * np.einsum("gni,gnj->gij", x, x) / 5000, rtol=1e-12)


def test_unknown_precision_refused():
    with pytest.raises(ValueError, match="float16"):
        HessianSum(1, 3, "float16")


def test_digits_mlp_output_barely_moves(samples, tmp_path):
    """The pruned MLP's output MSE against the dense model: float32 vs float64 products change it
    by less than 1e-5 relative (measured 4e-7), with the same masks."""
    path, calib = str(samples / "digits_mlp.onnx"), str(samples / "digits_mlp_calib.npz")
    data = np.load(samples / "digits_mlp_eval.npz")
    dense = onnx.load(path)
    feeds = {i.name: data[i.name] for i in dense.graph.input}

    def outputs(model):
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, feeds)[0].astype(np.float64)

    ref, mse, masks = outputs(dense), {}, {}
    for precision in ("float64", "float32"):
        res = api.prune(path, calib, sparsity=0.5, hessian_precision=precision)
        assert res.report.settings["hessian_precision"] == precision
        mse[precision] = np.mean((outputs(res.model) - ref) ** 2)
        masks[precision] = [onnx.numpy_helper.to_array(w) != 0 for w in res.model.graph.initializer]
    assert abs(mse["float32"] - mse["float64"]) / mse["float64"] < 1e-5
    assert all((a == b).all() for a, b in zip(masks["float32"], masks["float64"]))


def test_cli_refuses_unknown_precision(cli, mlp_path, mlp_calib, tmp_path):
    out = tmp_path / "p.onnx"
    r = cli(*prune_args(mlp_path, out, "--calib", mlp_calib, "--hessian-precision", "float16"))
    assert_one_line_error(r, "--hessian-precision", "float32")
    assert not out.exists()
