"""graph/model_io.py on its own: save and load round trips (inline and external data), atomic
writes that leave nothing half-written, and the output paths it refuses."""

from __future__ import annotations

import errno
import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from graphs import init, make_model, randn, vi
from onnx_obs.errors import OnnxObsError
from onnx_obs.graph import model_io
from onnx_obs.graph.model_io import check_output_path, load_model, save_model

PREVIOUS = b"a previous model"


def two_layer() -> onnx.ModelProto:
    """y = (x W1) W2 + b: W1 (7.5 KB) and W2 (1.2 KB) large enough for external data, b (40 B)
    not; W1's length is no multiple of 4096, so W2's aligned offset shows the padding."""
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
             helper.make_node("MatMul", ["h", "W2"], ["z"], name="mm2"),
             helper.make_node("Add", ["z", "b"], ["y"], name="add")]
    return make_model(nodes, [vi("x", shape=["batch", 64])], [vi("y", shape=["batch", 10])],
                      [init("W1", randn([64, 30], 1)), init("W2", randn([30, 10], 2)),
                       init("b", randn([10], 3))])


def values(model: onnx.ModelProto, base_dir: str = "") -> dict[str, np.ndarray]:
    """Initializer values as onnx itself reads them (external data from base_dir)."""
    return {t.name: numpy_helper.to_array(t, base_dir) for t in model.graph.initializer}


def external_info(t: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def test_inline_round_trip(tmp_path):
    model = two_layer()
    out = tmp_path / "m.onnx"
    size = save_model(model, out)
    assert size == out.stat().st_size == model.ByteSize()
    assert os.listdir(tmp_path) == ["m.onnx"]            # no .data, no temp file
    loaded = load_model(out)
    assert loaded.model.SerializeToString() == model.SerializeToString()
    assert (loaded.path, loaded.base_dir, loaded.file_size) == (out, str(tmp_path), size)
    assert not loaded.has_external_data


def test_external_round_trip(tmp_path):
    model = two_layer()
    expected = values(model)
    out = tmp_path / "m.onnx"
    size = save_model(model, out, external=True)
    data = tmp_path / "m.onnx.data"
    assert size == out.stat().st_size + data.stat().st_size
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]

    loaded = load_model(out)
    assert loaded.has_external_data and loaded.file_size == size
    tensors = {t.name: t for t in loaded.model.graph.initializer}
    assert tensors["b"].data_location == onnx.TensorProto.DEFAULT     # under 1 KB: inline
    for name in ("W1", "W2"):
        t = tensors[name]
        info = external_info(t)
        assert t.data_location == onnx.TensorProto.EXTERNAL and not t.raw_data  # not read in
        assert info["location"] == "m.onnx.data" and int(info["offset"]) % 4096 == 0
        assert int(info["length"]) == expected[name].nbytes
    got = values(loaded.model, loaded.base_dir)
    for name, a in expected.items():
        np.testing.assert_array_equal(got[name], a)

    # saved again elsewhere, its external data is copied from the first file's folder
    (tmp_path / "copy").mkdir()
    again = tmp_path / "copy" / "c.onnx"
    save_model(loaded.model, again, loaded.base_dir)
    assert sorted(os.listdir(tmp_path / "copy")) == ["c.onnx", "c.onnx.data"]
    copy = onnx.load(str(again))                          # onnx's own loader reads the data
    for name, a in expected.items():
        np.testing.assert_array_equal(numpy_helper.to_array(
            next(t for t in copy.graph.initializer if t.name == name)), a)


def _fail_at(call: int, error: BaseException):
    """An os.fsync that raises `error` at its `call`-th use (1: the first file written)."""
    calls = []
    fsync = os.fsync

    def fake(fd):
        calls.append(fd)
        if len(calls) == call:
            raise error
        fsync(fd)
    return fake


@pytest.mark.parametrize("external, call", [(False, 1), (True, 1), (True, 2)])
def test_a_failed_write_leaves_the_previous_file_and_no_temp_file(external, call, tmp_path,
                                                                  monkeypatch):
    out = tmp_path / "m.onnx"
    out.write_bytes(PREVIOUS)
    monkeypatch.setattr(model_io.os, "fsync",
                        _fail_at(call, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    with pytest.raises(OnnxObsError) as e:
        save_model(two_layer(), out, external=external)
    monkeypatch.undo()
    assert str(e.value) == f"could not write {out}: No space left on device"
    assert os.listdir(tmp_path) == ["m.onnx"] and out.read_bytes() == PREVIOUS


def test_an_interrupted_write_cleans_up_and_is_not_turned_into_an_error(tmp_path, monkeypatch):
    out = tmp_path / "m.onnx"
    monkeypatch.setattr(model_io.os, "fsync", _fail_at(2, KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save_model(two_layer(), out, external=True)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


def test_refuses_the_input_and_its_external_data(tmp_path):
    """The input m.onnx keeps its weights in w.onnx.data, so writing w.onnx (whose own data file
    would be w.onnx.data) would destroy them, as would writing the data file itself."""
    src = tmp_path / "m.onnx"
    onnx.save(two_layer(), str(src), save_as_external_data=True, all_tensors_to_one_file=True,
              location="w.onnx.data", size_threshold=0)
    loaded = load_model(src)
    (tmp_path / "link.onnx").symlink_to(src)
    for out in (src, tmp_path / "link.onnx"):
        with pytest.raises(OnnxObsError, match="^output path is the input model"):
            check_output_path(out, src, True, loaded.model, loaded.base_dir)
    data = tmp_path / "w.onnx.data"
    for out in (tmp_path / "w.onnx", data):
        with pytest.raises(OnnxObsError) as e:
            check_output_path(out, src, True, loaded.model, loaded.base_dir)
        assert str(e.value) == (f"writing {out} would overwrite {data}, the input model's "
                                "external data: choose another output name")
    assert check_output_path(tmp_path / "o.onnx", src, False, loaded.model,
                             loaded.base_dir) == tmp_path / "o.onnx"


def test_refuses_an_existing_output_without_force(tmp_path):
    out = tmp_path / "o.onnx"
    out.write_bytes(PREVIOUS)
    with pytest.raises(OnnxObsError, match="exists: pass --force"):
        check_output_path(out, None, False)
    assert check_output_path(out, None, True) == out and out.read_bytes() == PREVIOUS
