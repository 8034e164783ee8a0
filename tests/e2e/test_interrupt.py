"""Ctrl-C while pruning or while writing leaves nothing half-written: one line on stderr,
exit code 130, no output or temp file, and an existing output file untouched."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from onnx import helper

from graphs import calib_for, init, make_model, mlp_model, randn, save, vi
from onnx_obs.graph import model_io

EXISTING = b"a previous model"


def chain(layers: int, dim: int):
    """x -> MatMul -> ... -> y: one site per layer, pruned one after another."""
    names = ["x"] + [f"h{i}" for i in range(1, layers)] + ["y"]
    nodes = [helper.make_node("MatMul", [names[i], f"w{i}"], [names[i + 1]], name=f"mm{i}")
             for i in range(layers)]
    return make_model(nodes, [vi("x", np.float32, ["b", dim])], [vi("y", np.float32, ["b", dim])],
                      [init(f"w{i}", randn([dim, dim], i) * np.float32(dim**-0.5)) for i in range(layers)])


def setup_dirs(tmp_path, model):
    """The model with external data in in/, and out/ holding an earlier o.onnx (not its .data)."""
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    src = save(model, tmp_path / "in" / "m.onnx", external=True)
    out = tmp_path / "out" / "o.onnx"
    out.write_bytes(EXISTING)
    return src, out


def assert_clean_interrupt(code, stderr, stdout, src, out):
    assert code == 130, (code, stderr)
    assert stderr.strip() == "interrupted: nothing was written", stderr
    assert "Traceback" not in stderr + stdout
    assert [p.name for p in out.parent.iterdir()] == ["o.onnx"]  # no .data, no temp file
    assert out.read_bytes() == EXISTING
    assert sorted(p.name for p in src.parent.iterdir()) == ["m.onnx", "m.onnx.data"]


def test_ctrl_c_while_pruning(tmp_path):
    # 12 layers of exact OBS at 0.5-1 s each: the first spilled weight shows that pruning runs
    model = chain(12, 256)
    src, out = setup_dirs(tmp_path, model)
    np.savez(tmp_path / "c.npz", **calib_for(model, 64))
    p = subprocess.Popen([sys.executable, "-m", "onnx_obs", "prune", str(src), "-o", str(out),
                          "--calib", str(tmp_path / "c.npz"), "--solver", "exact", "--force"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not any(f.stat().st_size for f in out.parent.glob(".onnx-obs-*")):
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.01)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=60)
    assert_clean_interrupt(p.returncode, stderr, stdout, src, out)


@pytest.mark.parametrize("where", ["streaming", "fsync"])
def test_ctrl_c_while_writing(where, cli, tmp_path, monkeypatch):
    src, out = setup_dirs(tmp_path, mlp_model(sizes=(32, 16, 4)))
    written = []
    point_external, fsync = model_io._point_external, model_io.os.fsync

    def stream(t, location, offset, length):  # Ctrl-C after the first tensor of the output
        if location == out.name + ".data":
            written.append(t.name)
            if len(written) == 2:
                raise KeyboardInterrupt
        point_external(t, location, offset, length)

    def sync(fd):  # Ctrl-C at the model file's fsync, both temp files complete
        written.append(fd)
        if len(written) == 2:
            raise KeyboardInterrupt
        fsync(fd)

    if where == "streaming":
        monkeypatch.setattr(model_io, "_point_external", stream)
    else:
        monkeypatch.setattr(model_io.os, "fsync", sync)
    r = cli("prune", src, "-o", out, "--method", "magnitude", "--force", "--quiet")
    monkeypatch.undo()
    assert len(written) == 2
    assert_clean_interrupt(r.exit_code, r.stderr, r.stdout, src, out)
