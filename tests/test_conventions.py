"""CLI conventions every command follows: --version, -h, -q/-v, --debug after the command,
--json [FILE.json|-], plural counts, case-insensitive --op-types, compare's defaults as prune's,
and the Typer range the help was written against."""

from __future__ import annotations

import importlib.metadata
import json
import re
import tomllib
from pathlib import Path

import pytest

from cli_checks import assert_one_line_error
from onnx_obs import __version__
from onnx_obs.cli.app import normalize_args

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ("prune", "inspect", "evaluate", "compare")


def test_version_and_completion(cli):
    r = cli("--version")
    assert r.exit_code == 0 and r.stdout.strip() == f"onnx-obs {__version__}"
    assert "--install-completion" in cli("-h").stdout


def test_compare_names_its_eval_flag(cli, mlp_path, mlp_calib, tmp_path):
    r = cli("compare", mlp_path, "--calib", mlp_calib, "--eval", tmp_path / "none.npz", "-q")
    assert_one_line_error(r, "--eval: data file not found")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_takes_h_q_v(cli, command):
    r = cli(command, "-h")
    assert r.exit_code == 0, r.stderr
    for flag in ("--quiet", "--verbose", "--json"):
        assert flag in r.stdout, (command, flag)


def test_debug_after_the_command_shows_the_traceback(cli, tmp_path):
    r = cli("inspect", tmp_path / "missing.onnx", "--debug")
    assert r.exit_code == 2 and "Traceback" in r.stderr and "model file not found" in r.stderr
    assert_one_line_error(cli("inspect", tmp_path / "missing.onnx"), "model file not found")


def test_json_takes_a_value_only_when_it_is_a_file_or_stdout():
    assert normalize_args(["inspect", "--json", "m.onnx"]) == ["inspect", "--json", "-", "m.onnx"]
    assert normalize_args(["inspect", "m.onnx", "--json"]) == ["inspect", "m.onnx", "--json", "-"]
    assert normalize_args(["inspect", "--json", "o.JSON", "m.onnx"]) == ["inspect", "--json", "o.JSON", "m.onnx"]
    assert normalize_args(["x", "--debug", "--", "--debug"]) == ["--debug", "x", "--", "--debug"]


def test_prune_report_dash_goes_to_stdout_not_to_a_file(cli, mlp_path, mlp_calib, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = cli("prune", mlp_path, "--calib", mlp_calib, "-o", "o.onnx", "--method", "magnitude",
            "--report", "-")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["method"] == "magnitude"    # nothing but the JSON on stdout
    assert not (tmp_path / "-").exists() and (tmp_path / "o.onnx").exists()
    r = cli("prune", mlp_path, "-o", "p.onnx", "--method", "magnitude", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["totals"]["sites"] == 3


def test_inspect_json_to_a_file_and_quiet(cli, mlp_path, tmp_path):
    r = cli("inspect", mlp_path, "--json", tmp_path / "i.json", "-q")
    assert r.exit_code == 0 and r.stdout == ""
    assert [p["name"] for p in json.loads((tmp_path / "i.json").read_text())["inputs"]] == ["input"]


def test_inspect_verbose_names_the_nodes(cli, mlp_path):
    assert "nodes" not in cli("inspect", mlp_path).stdout
    r = cli("inspect", mlp_path, "-v")
    assert r.exit_code == 0 and "nodes" in r.stdout and "/0/Gemm" in r.stdout


def test_quiet_and_verbose_contradict(cli, mlp_path):
    assert_one_line_error(cli("inspect", mlp_path, "-q", "-v"), "--quiet", "--verbose")


def test_op_types_are_case_insensitive_and_checked(cli, cnn_path):
    r = cli("inspect", cnn_path, "--op-types", "conv", "--json")
    assert {s["op"] for s in json.loads(r.stdout)["sites"]} == {"Conv"}
    assert_one_line_error(cli("inspect", cnn_path, "--op-types", "Cnv"), "'Cnv'", "Conv")


def test_one_run_is_singular(cli, tmp_path):
    import numpy as np

    from graphs import gemm_model, save
    model, feeds = gemm_model(m=3)
    path = save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", **feeds)
    r = cli("evaluate", path, path, "--data", tmp_path / "d.npz", "--no-batching", "--repeats", "0")
    assert r.exit_code == 0, r.stderr
    assert "on 1 run of" in r.stdout and "1 runs" not in r.stdout


def test_compare_and_prune_share_the_sequential_default(cli, mlp_path, mlp_calib, tmp_path):
    r = cli("compare", mlp_path, "--calib", mlp_calib, "--methods", "obs", "--sparsities", "0.5",
            "--max-samples", "32", "--json")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)   # --json alone: the JSON on stdout, no table
    assert d["settings"]["hessians_shared"] is False    # recaptured per run, as prune does
    from onnx_obs.config import LayerwiseOptions
    assert LayerwiseOptions().sequential is True


def test_typer_is_pinned_to_the_range_the_help_was_written_against():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if d.startswith("typer"))
    low, high = re.fullmatch(r"typer>=([\d.]+),<([\d.]+)", spec).groups()
    version = tuple(int(x) for x in importlib.metadata.version("typer").split(".")[:2])
    assert tuple(map(int, low.split(".")[:2])) <= version < tuple(map(int, high.split(".")[:2]))
