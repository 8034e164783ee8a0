"""config.py: PruneConfig built from keywords, from TOML and from the CLI gives the same prune;
validation refuses bad settings with one line before any work."""

from __future__ import annotations

import json

import pytest

from cli_checks import assert_one_line_error, prune_args, sha
from onnx_obs.config import FullOptions, PruneConfig, Selection
from onnx_obs.errors import OnnxObsError

RECIPE = """
method = "obd"
sparsity = 0.7
damp = 0.05            # a group's setting by its plain name

[selection]
op_types = "Gemm"

[data]
batch_size = 16
max_samples = 64
"""


def test_toml_matches_the_same_settings_as_keywords(tmp_path):
    path = tmp_path / "recipe.toml"
    path.write_text(RECIPE)
    got = PruneConfig.from_toml(path)
    want = PruneConfig(method="obd", sparsity=0.7).replace(
        damp=0.05, selection=Selection(op_types=["Gemm"]), batch_size=16, max_samples=64)
    assert got == want
    assert got.layerwise.solver == "auto" and got.full == FullOptions()   # the rest: defaults


def test_replace_reaches_every_group_and_leaves_the_original():
    base = PruneConfig()
    new = base.replace(sparsity=0.3, damp=0.1, alpha=1e-4, target_params=100, include="fc",
                       batching=False)
    assert (new.sparsity, new.layerwise.damp, new.full.alpha) == (0.3, 0.1, 1e-4)
    assert (new.structured.target_params, new.selection.include, new.data.batching) == (100, "fc", False)
    assert base == PruneConfig()
    with pytest.raises(TypeError, match="sparsty"):
        base.replace(sparsty=0.3)


@pytest.mark.parametrize("text,words", [
    ("sparsty = 0.5\n", ["unknown setting 'sparsty'"]),
    ("[layerwise]\nalpha = 1.0\n", ["unknown setting 'alpha' in [layerwise]"]),
    ("sparsity = 'half'\n", ["'sparsity' must be", "'half'"]),
    ("sequential = 1\n", ["'sequential' must be"]),
    ("sparsity = \n", ["not valid TOML"]),
])
def test_bad_toml_is_one_line(tmp_path, text, words):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(OnnxObsError) as e:
        PruneConfig.from_toml(path)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_cli_config_file_and_flags(cli, tmp_path, mlp_path, mlp_calib):
    """The file gives the settings, a typed flag overrides it, and both equal plain flags."""
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('method = "wanda"\nsparsity = 0.7\n[data]\nmax_samples = 64\n')
    runs = {
        "file": ["--config", recipe],
        "flags": ["--method", "wanda", "--sparsity", "0.7", "--max-samples", "64"],
        "file+flag": ["--config", recipe, "--sparsity", "0.3"],
        "flags 0.3": ["--method", "wanda", "--sparsity", "0.3", "--max-samples", "64"],
    }
    outs = {}
    for name, extra in runs.items():
        out, rep = tmp_path / f"{name}.onnx", tmp_path / f"{name}.json"
        r = cli(*prune_args(mlp_path, out, "--calib", mlp_calib, "--report", rep, *extra))
        assert r.exit_code == 0, r.stderr
        outs[name] = (sha(out), json.loads(rep.read_text()))
    assert outs["file"][0] == outs["flags"][0] and outs["file+flag"][0] == outs["flags 0.3"][0]
    assert outs["file"][0] != outs["file+flag"][0]
    report = outs["file+flag"][1]
    assert report["method"] == "wanda" and report["settings"]["sparsity"] == 0.3
    assert report["settings"]["max_samples"] == 64 and report["calibration_samples"] == 64


@pytest.mark.parametrize("flags,words", [
    (["--damp", "-1"], ["--damp must be at least 0"]),
    (["--solver", "slow"], ["unknown solver 'slow'"]),
    (["--block-size", "0"], ["--block-size must be at least 1"]),
    (["--sparsity", "1"], ["sparsity must be in [0, 1)"]),
])
def test_layerwise_settings_refused_before_work(cli, tmp_path, mlp_path, mlp_calib, flags, words):
    out = tmp_path / "out.onnx"
    assert_one_line_error(cli(*prune_args(mlp_path, out, "--calib", mlp_calib, *flags)), *words)
    assert not out.exists()
