"""A model with over 2 GB of weights in external data is inspected and pruned with peak
memory bounded by copies of one weight, not by the model's size (measured on the CLI subprocess)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

DIM = 2048       # every weight is DIM x DIM float32: 16 MiB
LAYERS = 129     # 2.02 GiB of weights, past protobuf's 2 GiB limit on one message
PRUNED = 24      # the first 24 ("prune*") are selected: 384 MiB of pruned weights to keep somewhere
FILLED = 28      # the first 28 hold random values; the rest are holes of a sparse file (zeros)
# Pruning one weight holds about ten float32-sized buffers (its float64 working copies).
TENSORS_OF_MEMORY = 16


def build_chain(folder: Path, layers: int, dim: int, filled: int) -> Path:
    """x -> MatMul -> ... -> y, weights written chunk by chunk straight into one data file."""
    folder.mkdir()
    data, rng, size = folder / "m.onnx.data", np.random.default_rng(0), dim * dim * 4
    inits = []
    with open(data, "wb") as f:
        for i in range(layers):
            if i < filled:
                f.write((rng.random((dim, dim), dtype=np.float32) - np.float32(0.5)).data)
            t = TensorProto(name=f"prune{i}" if i < PRUNED else f"keep{i}", dims=[dim, dim],
                            data_type=TensorProto.FLOAT, data_location=TensorProto.EXTERNAL)
            for k, v in (("location", data.name), ("offset", str(i * size)), ("length", str(size))):
                t.external_data.add(key=k, value=v)
            inits.append(t)
        f.truncate(layers * size)  # the unfilled weights are holes: no disk, no writing time
    names = ["x"] + [f"h{i}" for i in range(1, layers)] + ["y"]
    nodes = [helper.make_node("MatMul", [names[i], t.name], [names[i + 1]], name=f"mm{i}")
             for i, t in enumerate(inits)]
    x, y = (helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", dim]) for n in "xy")
    graph = helper.make_graph(nodes, "chain", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    (folder / "m.onnx").write_bytes(model.SerializeToString())
    return folder / "m.onnx"


def measured(*args) -> tuple[int, str, str, int]:
    """Run the CLI in a subprocess: exit code, stdout, stderr and its peak RSS in bytes."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = subprocess.Popen([sys.executable, "-m", "onnx_obs", *map(str, args)],
                             stdout=out, stderr=err)
        timer = threading.Timer(300, p.kill)
        timer.start()
        _, status, usage = os.wait4(p.pid, 0)  # the rusage of this child alone
        timer.cancel()
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        kib = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS
        return p.returncode, out.read().decode(), err.read().decode(), usage.ru_maxrss * kib


def read_weight(folder: Path, t: onnx.TensorProto) -> np.ndarray:
    """A float32 weight read from its external data file alone, at its offset and length."""
    info = {e.key: e.value for e in t.external_data}
    return np.fromfile(folder / info["location"], np.float32, int(info["length"]) // 4,
                       offset=int(info["offset"]))


@pytest.fixture
def space(tmp_path):
    """tmp_path, if it has the disk space; emptied afterwards (pytest keeps recent ones)."""
    size = DIM * DIM * 4
    need = (FILLED + PRUNED + LAYERS) * size + (256 << 20)  # input, spilled weights, output
    free = shutil.disk_usage(tmp_path).free
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB free disk in {tmp_path}, has {free / 2**30:.1f}")
    yield tmp_path
    for p in tmp_path.iterdir():
        shutil.rmtree(p)


def test_model_over_2gb_prunes_in_little_memory(space):
    tmp_path, size = space, DIM * DIM * 4
    model_bytes = LAYERS * size
    src = build_chain(tmp_path / "big", LAYERS, DIM, FILLED)
    assert model_bytes > 2**31
    before = onnx.load(str(src), load_external_data=False).graph.initializer
    tiny = build_chain(tmp_path / "tiny", 4, 64, 4)
    prune_args = ["--method", "magnitude", "--sparsity", "0.5", "--include", "^prune", "--quiet"]
    rc, _, err, baseline = measured("prune", tiny, "-o", tmp_path / "tiny" / "o.onnx", *prune_args)
    assert rc == 0, err
    bound = baseline + TENSORS_OF_MEMORY * size  # an eighth of the model above the baseline

    rc, out, err, peak_inspect = measured("inspect", src, "--json")
    assert rc == 0, err
    sites = json.loads(out)["sites"]
    assert [s["name"] for s in sites] == [t.name for t in before]
    assert [s["sparsity"] for s in sites[FILLED:]] == [1.0] * (LAYERS - FILLED)

    dst = tmp_path / "out" / "p.onnx"
    dst.parent.mkdir()
    rc, _, err, peak_prune = measured("prune", src, "-o", dst, *prune_args)
    assert rc == 0, err
    print(f"model {model_bytes >> 20} MiB, weight {size >> 20} MiB, baseline {baseline >> 20} MiB, "
          f"inspect {peak_inspect >> 20} MiB, prune {peak_prune >> 20} MiB")
    assert peak_inspect < bound and peak_prune < bound, (peak_inspect, peak_prune, bound)

    assert sorted(p.name for p in dst.parent.iterdir()) == ["p.onnx", "p.onnx.data"]
    assert sorted(p.name for p in src.parent.iterdir()) == ["m.onnx", "m.onnx.data"]
    onnx.checker.check_model(str(dst))
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.disable_prepacking", "1")  # load, memory-mapped
    ort.InferenceSession(str(dst), opts, providers=["CPUExecutionProvider"])
    after = onnx.load(str(dst), load_external_data=False).graph.initializer
    for i in [*range(FILLED), LAYERS - 1]:
        w0, w1 = read_weight(src.parent, before[i]), read_weight(dst.parent, after[i])
        assert sites[i]["sparsity"] == np.mean(w0 == 0)
        if i >= PRUNED:
            assert w1.tobytes() == w0.tobytes(), after[i].name
            continue
        kept = w1 != 0
        assert int(np.sum(~kept)) == round(0.5 * w0.size), after[i].name
        np.testing.assert_array_equal(w1[kept], w0[kept])                # no correction: values kept
        assert np.abs(w0[~kept]).max() <= np.abs(w0[kept]).min()        # the smallest went
