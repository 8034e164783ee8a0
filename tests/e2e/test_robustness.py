"""Bad inputs end in one line, a non-zero exit, no traceback and no output file; odd but
valid models (opsets, several inputs/outputs, dynamic dims, external data, graph-input weights,
already-sparse weights) prune and run."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from graphs import (NEWEST_OPSET, calib_for, cnn_model, init, make_model, mlp_model, randn, run,
                    save, vi)
from onnx_obs import api
from onnx_obs.api import GRAPH_INPUT_REASON
from onnx_obs.graph import model_io


def assert_fails(result, *words, out=None):
    assert result.exit_code != 0 and result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    err = result.stderr.strip()
    assert err and "\n" not in err, err
    assert "Traceback" not in result.stderr + result.stdout
    for w in words:
        assert w in err, (w, err)
    if out is not None:
        assert not out.exists()
        assert not list(out.parent.glob(".onnx-obs-*"))          # no temp file left behind
    return err


def prune(cli, model, out, *extra):
    return cli("prune", model, "-o", out, "--quiet", *extra)


def weights(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t, str(path.parent)) for t in onnx.load(str(path)).graph.initializer}


def npz(path, arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


# ---------------------------------------------------------------- bad model files

def test_not_a_file(cli, tmp_path):
    out = tmp_path / "o.onnx"
    assert_fails(prune(cli, tmp_path, out, "--method", "magnitude"), "not a file", out=out)
    assert_fails(prune(cli, tmp_path / "nope.onnx", out, "--method", "magnitude"), "not found", out=out)
    assert_fails(cli("inspect", tmp_path / "nope.onnx"), "not found")


def test_not_onnx(cli, tmp_path):
    bad = tmp_path / "random.onnx"
    bad.write_bytes(np.random.default_rng(0).bytes(2000))
    out = tmp_path / "o.onnx"
    assert_fails(prune(cli, bad, out, "--method", "magnitude"), "random.onnx", out=out)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    assert_fails(prune(cli, empty, out, "--method", "magnitude"), "empty.onnx", out=out)
    text = tmp_path / "text.onnx"
    text.write_text("hello, I am not a model\n")
    assert_fails(prune(cli, text, out, "--method", "magnitude"), "text.onnx", out=out)


def test_truncated_onnx_subprocess(tmp_path, mlp_path):
    data = mlp_path.read_bytes()
    bad = tmp_path / "half.onnx"
    bad.write_bytes(data[: len(data) // 2])
    out = tmp_path / "o.onnx"
    p = subprocess.run([sys.executable, "-m", "onnx_obs", "prune", str(bad), "-o", str(out),
                        "--method", "magnitude"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "half.onnx" in lines[0] and "truncated" in lines[0], p.stderr
    assert "Traceback" not in p.stderr and not out.exists()


def test_fails_checker_says_which_check(cli, tmp_path):
    nodes = [helper.make_node("Gemm", ["x", "W"], ["h"], name="fc", transB=1),
             helper.make_node("Add", ["h", "undefined_tensor"], ["y"], name="add")]
    m = make_model(nodes, [vi("x", np.float32, ["b", 6])], [vi("y", np.float32, ["b", 5])],
                   [init("W", randn([5, 6]))], check=False)
    bad = save(m, tmp_path / "bad.onnx")
    out = tmp_path / "o.onnx"
    err = assert_fails(prune(cli, bad, out, "--method", "magnitude"), "onnx.checker", out=out)
    assert "topologically sorted" in err and "undefined_tensor" in err and "Add" in err


def test_missing_external_data(cli, tmp_path):
    m = mlp_model()
    path = save(m, tmp_path / "ext.onnx", external=True)
    (tmp_path / "ext.onnx.data").unlink()
    out = tmp_path / "o.onnx"
    assert_fails(prune(cli, path, out, "--method", "magnitude"), "ext.onnx.data", "missing", out=out)


# ---------------------------------------------------------------- bad settings

@pytest.mark.parametrize("args,words", [
    (["--sparsity", "-0.1"], ["sparsity", "[0, 1)"]),
    (["--sparsity", "1"], ["sparsity", "[0, 1)"]),
    (["--sparsity", "1.5"], ["sparsity"]),
    (["--sparsity", "nan"], ["sparsity"]),
    (["--method", "prayer"], ["unknown method", "prayer"]),
    (["--pattern", "4:4"], ["N:M", "4:4"]),
    (["--pattern", "5:4"], ["N:M", "5:4"]),
    (["--pattern", "0:4"], ["N:M"]),
    (["--pattern", "2-4"], ["--pattern", "2-4"]),
    (["--scope", "galaxy"], ["scope", "galaxy"]),
    (["--device", "tpu"], ["device", "tpu"]),
])
def test_bad_settings(args, words, cli, tmp_path, mlp_path, mlp_calib):
    out = tmp_path / "o.onnx"
    extra = [] if "--method" in args else ["--method", "magnitude"]
    assert_fails(prune(cli, mlp_path, out, "--calib", mlp_calib, *extra, *args), *words, out=out)


def test_output_equal_to_input(cli, tmp_path, mlp_path):
    model = tmp_path / "m.onnx"
    shutil.copy(mlp_path, model)
    before = model.read_bytes()
    for extra in ([], ["--force"]):
        assert_fails(prune(cli, model, model, "--method", "magnitude", *extra), "input model")
        assert model.read_bytes() == before
    # the same file under another spelling
    other = tmp_path / "sub" / ".." / "m.onnx"
    (tmp_path / "sub").mkdir()
    assert_fails(prune(cli, model, other, "--method", "magnitude", "--force"), "input model")
    assert model.read_bytes() == before


def test_output_directory_missing(cli, tmp_path, mlp_path):
    out = tmp_path / "no" / "such" / "dir" / "o.onnx"
    assert_fails(prune(cli, mlp_path, out, "--method", "magnitude"), "does not exist")
    assert not (tmp_path / "no").exists()


def test_report_directory_missing(cli, tmp_path, mlp_path):
    out = tmp_path / "o.onnx"
    assert_fails(prune(cli, mlp_path, out, "--method", "magnitude", "--report", tmp_path / "no" / "r.json"),
                 "report", out=out)


def test_output_directory_not_writable(cli, tmp_path, mlp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        if os.access(d, os.W_OK):
            pytest.skip("running as a user (root) who can write to a read-only directory")
        out = d / "o.onnx"
        assert_fails(prune(cli, mlp_path, out, "--method", "magnitude"), "not writable")
        assert not list(d.iterdir())
    finally:
        d.chmod(0o700)


def test_output_over_the_inputs_external_data(cli, tmp_path):
    m = mlp_model(sizes=(32, 16, 4))
    src = tmp_path / "a.onnx"
    onnx.save(m, str(src), save_as_external_data=True, location="b.onnx.data", size_threshold=0)
    data = (tmp_path / "b.onnx.data").read_bytes()
    for name in ("b.onnx", "b.onnx.data"):
        assert_fails(prune(cli, src, tmp_path / name, "--method", "magnitude", "--force"),
                     "external data")
        assert (tmp_path / "b.onnx.data").read_bytes() == data


def test_debug_shows_traceback(cli, tmp_path, mlp_path):
    out = tmp_path / "o.onnx"
    r = cli("--debug", "prune", mlp_path, "-o", out, "--method", "magnitude", "--sparsity", "2")
    assert r.exit_code == 2
    assert "Traceback" in r.stderr and "OnnxObsError" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error:")
    assert not out.exists()


# ---------------------------------------------------------------- disk full while writing

def _enospc(*_):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("external,failing", [(False, "fsync"), (True, "fsync"), (True, "spill")])
def test_disk_full_while_writing(external, failing, cli, tmp_path, monkeypatch):
    (tmp_path / "in").mkdir()
    src = save(mlp_model(sizes=(32, 16, 4)), tmp_path / "in" / "m.onnx", external=external)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "o.onnx"
    out.write_bytes(b"previous model")
    if failing == "fsync":
        monkeypatch.setattr(os, "fsync", _enospc)
    else:  # the first write is a pruned weight's, to the temp file beside the output
        monkeypatch.setattr(model_io, "_append_aligned", _enospc)
    r = prune(cli, src, out, "--method", "magnitude", "--force")
    monkeypatch.undo()
    assert_fails(r, "could not write", "No space left on device")
    assert out.read_bytes() == b"previous model"
    assert sorted(p.name for p in out_dir.iterdir()) == ["o.onnx"]    # temp files removed


# ---------------------------------------------------------------- determinism

@pytest.mark.parametrize("which,args", [
    ("mlp", ["--method", "obs", "--max-samples", "64"]),
    ("cnn", ["--method", "magnitude", "--scope", "global", "--sparsity", "0.6"]),
])
def test_same_command_same_bytes(which, args, cli, tmp_path, samples):
    model, calib = samples / f"digits_{which}.onnx", samples / f"digits_{which}_calib.npz"
    outs = [tmp_path / f"{i}.onnx" for i in range(2)]
    for out in outs:
        r = prune(cli, model, out, "--calib", calib, *args)
        assert r.exit_code == 0, r.stderr
    a, b = (hashlib.sha256(o.read_bytes()).hexdigest() for o in outs)
    assert a == b


# ---------------------------------------------------------------- odd but valid models

@pytest.mark.parametrize("opset", sorted({11, 13, 17, NEWEST_OPSET}))
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_opsets(opset, kind, cli, tmp_path):
    m = mlp_model(opset=opset) if kind == "mlp" else cnn_model(opset=opset)
    src = save(m, tmp_path / "m.onnx")
    feeds = calib_for(m, 12)
    out = tmp_path / "o.onnx"
    r = prune(cli, src, out, "--calib", npz(tmp_path / "c.npz", feeds), "--allocation", "uniform")
    assert r.exit_code == 0, r.stderr
    pruned = onnx.load(str(out))
    assert {o.domain: o.version for o in pruned.opset_import}[""] == opset
    onnx.checker.check_model(pruned)
    got, ref = run(out, feeds), run(src, feeds)
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in ref.items()}
    w = weights(out)
    for name in w:
        if name.endswith("weight"):
            assert abs(int(np.sum(w[name] == 0)) - round(0.5 * w[name].size)) <= 1


def multi_io_model():
    nodes = [helper.make_node("Gemm", ["x", "W1"], ["h"], name="fc", transB=1),
             helper.make_node("Cast", ["ids"], ["idf"], to=onnx.TensorProto.FLOAT),
             helper.make_node("Concat", ["h", "idf"], ["hc"], axis=1),
             helper.make_node("MatMul", ["hc", "W2"], ["y"], name="mm"),
             helper.make_node("ArgMax", ["y"], ["cls"], axis=1, keepdims=0),
             helper.make_node("Greater", ["y", "zero"], ["pos"]),
             helper.make_node("Cast", ["y"], ["y16"], to=onnx.TensorProto.FLOAT16)]
    return make_model(nodes, [vi("x", np.float32, ["b", 6]), vi("ids", np.int64, ["b", 2])],
                      [vi("y", np.float32, ["b", 4]), vi("cls", np.int64, ["b"]),
                       vi("pos", np.bool_, ["b", 4]), vi("y16", np.float16, ["b", 4])],
                      [init("W1", randn([5, 6])), init("W2", randn([7, 4], 1)),
                       init("zero", np.zeros([1], np.float32))])


def test_several_inputs_and_outputs(cli, tmp_path):
    m = multi_io_model()
    src = save(m, tmp_path / "m.onnx")
    feeds = calib_for(m, 20)
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    r = cli("prune", src, "-o", out, "--calib", npz(tmp_path / "c.npz", feeds), "--report", rep)
    assert r.exit_code == 0, r.stderr
    assert "Traceback" not in r.stdout
    for name in ("y", "cls", "pos", "y16"):
        assert name in r.stdout                                   # the summary prints every output
    report = json.loads(rep.read_text())
    ref, got = run(src, feeds), run(out, feeds)
    assert set(report["deviation"]) == set(ref) == {"y", "cls", "pos", "y16"}
    for name, dev in report["deviation"].items():
        a, b = ref[name].astype(np.float64), got[name].astype(np.float64)
        assert got[name].dtype == ref[name].dtype and got[name].shape == ref[name].shape
        want = np.sum((a - b) ** 2) / np.sum(a * a) if np.sum(a * a) else float(np.any(a != b))
        np.testing.assert_allclose(dev["relative_mse"], want, rtol=1e-5, atol=1e-12)
        assert np.isfinite(dev["max_abs_error"])
    assert "top1_agreement" not in report["deviation"]["cls"]


def test_dynamic_batch_and_sequence(tmp_path):
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2")]
    m = make_model(nodes, [vi("x", np.float32, ["batch", "seq", 6])], [vi("y", np.float32, ["batch", "seq", 3])],
                   [init("W1", randn([6, 5])), init("W2", randn([5, 3], 1))])
    src = save(m, tmp_path / "m.onnx")
    feeds = [{"x": randn([2, s, 6], s)} for s in (3, 5, 1)]          # a sequence length per run
    res = api.prune(str(src), feeds, method="obs", sparsity=0.5, output=tmp_path / "o.onnx", device="cpu",
                    allocation="uniform")
    assert res.report.calibration_samples == 6
    assert [s.zeros_after for s in res.report.sites] == [15, 8]
    y = run(tmp_path / "o.onnx", {"x": randn([4, 9, 6], 7)})["y"]
    assert y.shape == (4, 9, 3)


def test_external_data_model_prunes(cli, tmp_path):
    m = mlp_model(sizes=(32, 16, 4))
    src = save(m, tmp_path / "ext.onnx", external=True)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    feeds = calib_for(m, 8)
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    r = prune(cli, src, out, "--calib", npz(tmp_path / "c.npz", feeds), "--allocation", "uniform")
    assert r.exit_code == 0, r.stderr
    assert (out.parent / "o.onnx.data").is_file()
    assert all((tmp_path / n).read_bytes() == b for n, b in before.items())
    w = weights(out)
    assert int(np.sum(w["fc0.weight"] == 0)) == 256
    assert run(out, feeds)["y"].shape == (8, 4)
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    u = os.umask(0)
    os.umask(u)
    return u


def test_custom_domain_op(cli, tmp_path):
    nodes = [helper.make_node("Gemm", ["x", "W1"], ["h"], name="fc", transB=1),
             helper.make_node("FancyActivation", ["h"], ["y"], name="custom", domain="com.example")]
    m = make_model(nodes, [vi("x", np.float32, ["b", 6])], [vi("y", np.float32, ["b", 5])],
                   [init("W1", randn([5, 6]))], extra_opsets={"com.example": 1})
    src = save(m, tmp_path / "m.onnx")
    calib = npz(tmp_path / "c.npz", {"x": randn([8, 6])})
    out = tmp_path / "o.onnx"
    for method in ("obs", "magnitude"):
        assert_fails(prune(cli, src, out, "--method", method, "--calib", calib), "FancyActivation",
                     out=out)


def sparse_mlp():
    m = mlp_model(sizes=(8, 6, 4))
    rng = np.random.default_rng(5)
    for t in m.graph.initializer:
        if t.name in ("fc0.weight", "fc1.weight"):
            w = numpy_helper.to_array(t).copy()
            frac = 0.6 if t.name == "fc0.weight" else 0.25
            w.ravel()[rng.choice(w.size, round(frac * w.size), replace=False)] = 0
            t.CopyFrom(numpy_helper.from_array(w, t.name))
    return m


@pytest.mark.parametrize("method", ["magnitude", "obs"])
def test_already_zero_weights(method, tmp_path):
    m = sparse_mlp()
    src = save(m, tmp_path / "m.onnx")
    feeds = calib_for(m, 32)
    res = api.prune(str(src), feeds, method=method, sparsity=0.5, output=tmp_path / "o.onnx", device="cpu",
                    allocation="uniform")  # the per-site target that the existing zeros already meet
    w0, w1 = weights(src), weights(tmp_path / "o.onnx")
    by = {s.name: s for s in res.report.sites}
    for name in ("fc0.weight", "fc1.weight"):
        assert np.all(w1[name][w0[name] == 0] == 0)                 # zeros stay zero
        assert by[name].zeros_before == int(np.sum(w0[name] == 0))
        assert by[name].zeros_after == int(np.sum(w1[name] == 0))
    # fc0 is 60 % zero, above the 50 % target: nothing removed, nothing changed, and said so
    assert by["fc0.weight"].zeros_after == by["fc0.weight"].zeros_before == 29
    np.testing.assert_array_equal(w1["fc0.weight"], w0["fc0.weight"])
    notes = [n for n in res.report.notes if "fc0.weight" in n]
    assert len(notes) == 1 and "nothing removed" in notes[0]
    # fc1 was 25 % zero: the existing zeros count toward the 50 % target
    assert by["fc1.weight"].zeros_after == 12
    assert not [n for n in res.report.notes if "fc1.weight" in n]


# ---------------------------------------------------------------- weights that are graph inputs

def graph_input_mlp():
    m = mlp_model(sizes=(8, 6, 4))
    w = next(t for t in m.graph.initializer if t.name == "fc0.weight")
    m.graph.input.append(helper.make_tensor_value_info(w.name, w.data_type, list(w.dims)))
    onnx.checker.check_model(m)
    return m


def test_graph_input_weight_needs_include(cli, tmp_path):
    m = graph_input_mlp()
    src = save(m, tmp_path / "m.onnx")
    calib = npz(tmp_path / "c.npz", calib_for(m, 8))
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    r = cli("prune", src, "-o", out, "--method", "magnitude", "--calib", calib, "--report", rep)
    assert r.exit_code == 0, r.stderr
    assert GRAPH_INPUT_REASON in " ".join(r.stdout.split())          # the printed summary says so
    report = json.loads(rep.read_text())
    assert [s["name"] for s in report["sites"]] == ["fc1.weight"]
    assert {"name": "fc0.weight", "op_type": "Gemm", "reason": GRAPH_INPUT_REASON} in report["skipped"]
    w0, w1 = weights(src), weights(out)
    np.testing.assert_array_equal(w1["fc0.weight"], w0["fc0.weight"])
    # named with --include, it is pruned
    r = cli("prune", src, "-o", out, "--method", "magnitude", "--calib", calib, "--report", rep,
            "--include", "fc0.weight", "--force", "--quiet")
    assert r.exit_code == 0, r.stderr
    report = json.loads(rep.read_text())
    assert [s["name"] for s in report["sites"]] == ["fc0.weight"]
    assert int(np.sum(weights(out)["fc0.weight"] == 0)) == 24
    # inspect says which sites are graph inputs, and that prune leaves them alone
    r = cli("inspect", src)
    assert r.exit_code == 0 and "initializer, graph input" in r.stdout
    assert "also graph inputs (a caller may override them): 1;" in " ".join(r.stdout.split())
    # selected only through its node's name: still skipped, and nothing else is left to prune
    r = prune(cli, src, out, "--method", "magnitude", "--include", "^fc0$", "--force")
    assert_fails(r, "graph inputs", "--include")
