"""api.py, the public surface: prune() from a config equals prune() from keywords, the package's
top-level names are the API functions, and the prune report carries calibration notes."""

from __future__ import annotations

import numpy as np

import onnx_obs
from onnx_obs import api
from onnx_obs.config import PruneConfig


def test_api_config_equals_keywords(mlp_path, mlp_calib):
    config = PruneConfig(method="obs", sparsity=0.6).replace(solver="fast", max_samples=64)
    a = api.prune(str(mlp_path), str(mlp_calib), config)
    b = api.prune(str(mlp_path), str(mlp_calib), method="obs", sparsity=0.6, solver="fast", max_samples=64)
    assert a.model.SerializeToString() == b.model.SerializeToString()
    assert a.report.settings == b.report.settings and a.report.settings["solver"] == "fast"


def test_top_level_api(mlp_path, mlp_calib):
    model, report = onnx_obs.prune(str(mlp_path), str(mlp_calib), onnx_obs.PruneConfig(method="obd"),
                                   max_samples=32)
    again = api.prune(str(mlp_path), str(mlp_calib), method="obd", max_samples=32)
    assert model.SerializeToString() == again.model.SerializeToString()
    assert report.method == "obd" and report.calibration_samples == 32
    assert onnx_obs.inspect is api.inspect  # the function, not a module


def test_prune_reports_a_lone_array_fed_to_the_only_input(tmp_path, mlp_path, mlp_calib):
    with np.load(mlp_calib) as z:
        np.savez(tmp_path / "x.npz", z["input"][:32])   # key arr_0; the model's input is 'input'
    res = api.prune(str(mlp_path), str(tmp_path / "x.npz"), sparsity=0.5)
    assert res.report.notes == [f"{tmp_path / 'x.npz'}: key 'arr_0' is not an input name: its "
                                "array was fed to the model's only input 'input'"]


def test_time_budget_moves_layers_to_the_fast_solver(cnn_path, cnn_calib):
    """--time-budget 0: no layer is solved exactly (a note says so); the default budget keeps the
    samples' small layers exact, as before."""
    from onnx_obs import api

    none = api.prune(str(cnn_path), str(cnn_calib), max_samples=64, time_budget=0.0).report
    default = api.prune(str(cnn_path), str(cnn_calib), max_samples=64).report
    assert {r.solver for r in none.sites} <= {"fast", "fast+refit"}
    assert any("--time-budget 0 s" in n for n in none.notes)
    assert "exact" in {r.solver for r in default.sites}
    assert not any("--time-budget" in n for n in default.notes)
