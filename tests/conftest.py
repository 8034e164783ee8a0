"""Shared fixtures: sample paths, a CLI runner, and `tests/` on sys.path for `import graphs`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

SAMPLES = TESTS.parent / "samples"

# One thread per test process: the test machines are small and shared.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _latency_cache(tmp_path_factory, monkeypatch):
    """Measured latency tables go to a folder of the test session, never the user's cache."""
    monkeypatch.setenv("ONNX_OBS_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "latency-cache"))


@pytest.fixture(scope="session")
def samples() -> Path:
    return SAMPLES


@pytest.fixture(scope="session")
def mlp_path() -> Path:
    return SAMPLES / "digits_mlp.onnx"


@pytest.fixture(scope="session")
def mlp_calib() -> Path:
    return SAMPLES / "digits_mlp_calib.npz"


@pytest.fixture(scope="session")
def cnn_path() -> Path:
    return SAMPLES / "digits_cnn.onnx"


@pytest.fixture(scope="session")
def cnn_calib() -> Path:
    return SAMPLES / "digits_cnn_calib.npz"


@pytest.fixture
def cli():
    """Invoke the Typer app in-process: cli("prune", ...) -> click Result (stdout, stderr apart)."""
    from typer.testing import CliRunner

    from onnx_obs.cli import _state, app

    def invoke(*args):
        # Click >= 8.2 keeps stderr apart; older versions need mix_stderr=False.
        try:
            runner = CliRunner(mix_stderr=False)
        except TypeError:
            runner = CliRunner()
        _state["debug"] = False
        return runner.invoke(app, [str(a) for a in args])

    return invoke
