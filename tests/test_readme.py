"""The README's examples run as written: every indented `onnx-obs ...` command (the set-up one
after its `pip install . &&`) and every ```python block, from a copy of the repository root (the
samples), in README order."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def shell_commands(text: str) -> list[str]:
    """Indented `onnx-obs ...` lines (joined over trailing backslashes), comments dropped."""
    lines, commands, pending = text.splitlines(), [], ""
    for line in lines:
        if not line.startswith("    ") or line.startswith("    #"):
            continue
        body = line.strip().split(" && ")[-1]
        if pending:
            pending += " " + body
        elif body.startswith("onnx-obs "):
            pending = body
        else:
            continue
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        commands.append(pending.split("   #")[0].strip())
        pending = ""
    return commands


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


COMMANDS = shell_commands(README)


def test_the_readme_has_examples_to_run():
    # a parser that found nothing would make the tests below vacuous
    assert len(COMMANDS) >= 11 and len(python_blocks(README)) >= 1
    assert all(c.startswith("onnx-obs ") for c in COMMANDS)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("readme")
    shutil.copytree(ROOT / "samples", d / "samples")
    return d


@pytest.mark.parametrize("command", COMMANDS, ids=[c[9:60] for c in COMMANDS])
def test_readme_command(command, workdir, cli, monkeypatch):
    monkeypatch.chdir(workdir)
    before = {p.name: p.read_bytes() for p in (workdir / "samples").iterdir()}
    r = cli(*shlex.split(command)[1:])
    assert r.exit_code == 0, (command, r.stdout, r.stderr)
    assert "Traceback" not in r.stdout + r.stderr
    # the inputs are never modified
    assert {p.name: p.read_bytes() for p in (workdir / "samples").iterdir()} == before
    args = shlex.split(command)
    if "-o" in args:  # the written model runs in onnxruntime on the sample's data
        out = workdir / args[args.index("-o") + 1]
        onnx.checker.check_model(str(out))
        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        x = np.load(workdir / args[args.index("--calib") + 1])["input"][:4]
        assert np.isfinite(sess.run(None, {"input": x})[0]).all()
    for flag in ("--json", "--report"):
        if flag in args:  # the JSON file it names parses
            assert json.loads((workdir / args[args.index(flag) + 1]).read_text())


@pytest.mark.parametrize("block", python_blocks(README))
def test_readme_python(block, workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    exec(compile(block, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "% of the sites' weights are zero" in printed and "['input']" in printed
    model = onnx.load(str(workdir / "out_api.onnx"))
    weights = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith("weight")]
    # the default allocation (auto): 60% of all the sites' weights, no site beyond the 0.9 cap
    zeros = [int(np.sum(w == 0)) for w in weights]
    assert weights and sum(zeros) == pytest.approx(0.6 * sum(w.size for w in weights), abs=len(weights))
    assert all(z <= 0.9 * w.size + 1 for z, w in zip(zeros, weights))
