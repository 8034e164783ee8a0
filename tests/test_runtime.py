"""runtime.py on its own: Runner's outputs against numpy, external data found through base_dir,
and every failure an OnnxObsError of one line."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from graphs import init, make_model, randn, vi
from onnx_obs.errors import OnnxObsError
from onnx_obs.graph.model_io import load_model, save_model
from onnx_obs.runtime import Runner

W, B = randn([64, 8], 1), randn([8], 2)   # W (2 KB) goes to external data when asked


def affine_relu() -> onnx.ModelProto:
    """Outputs h = x W + b and y = relu(h), for x [batch, 64]."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"], name="mm"),
             helper.make_node("Add", ["xw", "b"], ["h"], name="add"),
             helper.make_node("Relu", ["h"], ["y"], name="relu")]
    return make_model(nodes, [vi("x", shape=["batch", 64])],
                      [vi("h", shape=["batch", 8]), vi("y", shape=["batch", 8])],
                      [init("W", W), init("b", B)])


def numpy_outputs(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h = x.astype(np.float64) @ W + B
    return h, np.maximum(h, 0)


@pytest.mark.parametrize("prepack", [True, False])
def test_outputs_match_numpy(prepack):
    x = randn([5, 64], 3)
    r = Runner(affine_relu(), device="cpu", prepack=prepack)
    assert r.input_names == ["x"] and r.output_names == ["h", "y"]
    assert r.provider == "CPUExecutionProvider"
    h, y = r.run({"x": x, "not_an_input": x})          # feeds the model does not take are dropped
    want_h, want_y = numpy_outputs(x)
    np.testing.assert_allclose(h, want_h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-6)
    assert (y == 0).any() and (y > 0).any()              # the Relu is exercised
    (only_y,) = r.run({"x": x}, ["y"])
    np.testing.assert_array_equal(only_y, y)


def test_external_data_is_read_from_base_dir(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    (tmp_path / "elsewhere").mkdir()
    path = tmp_path / "model" / "m.onnx"
    save_model(affine_relu(), path, external=True)
    loaded = load_model(path)
    assert loaded.has_external_data
    monkeypatch.chdir(tmp_path / "elsewhere")            # not found relative to the cwd
    x = randn([3, 64], 4)
    (_, y) = Runner(loaded.model, loaded.base_dir).run({"x": x})
    np.testing.assert_allclose(y, numpy_outputs(x)[1], rtol=1e-5, atol=1e-6)


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg and msg == msg.strip()
    return msg


def test_an_unknown_device_is_refused():
    with pytest.raises(OnnxObsError) as e:
        Runner(affine_relu(), device="tpu")
    assert one_line(e) == "unknown device 'tpu': use one of auto, cpu, cuda"


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(),
                    reason="CUDA is available here")
def test_cuda_without_onnxruntime_gpu_says_how_to_get_it():
    with pytest.raises(OnnxObsError) as e:
        Runner(affine_relu(), device="cuda")
    assert "pip install onnxruntime-gpu" in one_line(e)


def test_a_model_onnxruntime_cannot_load():
    node = helper.make_node("Frobnicate", ["x"], ["y"], domain="example.custom")
    model = make_model([node], [vi("x", shape=[2])], [vi("y", shape=[2])],
                       extra_opsets={"example.custom": 1}, check=False)
    with pytest.raises(OnnxObsError) as e:
        Runner(model)
    assert one_line(e).startswith("onnxruntime cannot load the model: ")


@pytest.mark.parametrize("feeds, described", [
    ({"x": np.zeros([3, 5], np.float32)}, "x float32[3, 5]"),     # wrong width
    ({"x": np.zeros([3, 64], np.float64)}, "x float64[3, 64]"),   # wrong dtype
    ({}, ""),                                                     # nothing fed
])
def test_a_failed_run_names_the_feeds(feeds, described):
    with pytest.raises(OnnxObsError) as e:
        Runner(affine_relu()).run(feeds)
    assert one_line(e).startswith(f"onnxruntime failed to run the model on {described}: ")
