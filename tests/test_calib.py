"""Calibration data: every error is one OnnxObsError line naming the input; every accepted form
(.npz, .npy, dicts, CalibrationDataReader, iterables of feeds) gives the same batches."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from graphs import init, make_model, randn, vi
from onnx_obs.calib import load_calibration, model_inputs
from onnx_obs.errors import OnnxObsError


def one_input(batch="batch", feat=4):
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    return make_model([node], [vi("x", np.float32, [batch, feat])], [vi("y", np.float32, None)],
                      [init("W", randn([feat, 3]))])


def two_inputs(batch="batch"):
    nodes = [helper.make_node("MatMul", ["a", "W"], ["h"], name="mm"),
             helper.make_node("Cast", ["ids"], ["idf"], to=1),
             helper.make_node("ReduceSum", ["idf", "axes"], ["s"], keepdims=1),
             helper.make_node("Add", ["h", "s"], ["y"])]
    return make_model(nodes, [vi("a", np.float32, [batch, 4]), vi("ids", np.int64, [batch, 5])],
                      [vi("y", np.float32, None)],
                      [init("W", randn([4, 3])), init("axes", np.array([1], np.int64))])


def expect_error(source, model, *words, **kw) -> str:
    with pytest.raises(OnnxObsError) as e:
        load_calibration(source, model, **kw)
    msg = str(e.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


def feeds2(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return {"a": randn([n, 4], seed), "ids": rng.integers(0, 9, [n, 5]).astype(np.int64)}


# ---------------------------------------------------------------- errors

def test_missing_key():
    d = feeds2()
    del d["ids"]
    expect_error(d, two_inputs(), "'ids'", "int64")


def test_extra_key():
    d = feeds2()
    d["mask"] = d["a"]
    expect_error(d, two_inputs(), "'mask'", "not a model input")


def test_lossy_cast_refused_lossless_accepted():
    m = one_input()
    expect_error({"x": randn([6, 4]).astype(np.float64) / 3}, m, "'x'", "float32", "float64")
    exact = randn([6, 4]).astype(np.float64)                 # float32 values held in float64
    cal = load_calibration({"x": exact}, m)
    assert cal.batches[0]["x"].dtype == np.float32
    np.testing.assert_array_equal(cal.batches[0]["x"], exact)
    d = feeds2()
    d["ids"] = d["ids"].astype(np.int32)                     # int32 -> int64: lossless
    assert load_calibration(d, two_inputs()).batches[0]["ids"].dtype == np.int64
    d["ids"] = d["ids"] + 0.5                                # float -> int64: lossy
    expect_error(d, two_inputs(), "'ids'", "int64")


def test_non_numeric_dtype():
    expect_error({"x": np.array([["a"] * 4] * 2)}, one_input(), "'x'", "dtype")


def test_wrong_rank():
    expect_error({"x": randn([6, 4, 1])}, one_input(), "'x'", "rank 2", "[6, 4, 1]")


def test_wrong_static_dim():
    expect_error({"x": randn([6, 5])}, one_input(), "'x'", "axis 1 must be 4")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf(bad):
    x = randn([6, 4])
    x[2, 1] = bad
    expect_error({"x": x}, one_input(), "'x'", "NaN/Inf")


def test_empty_array():
    expect_error({"x": np.zeros([0, 4], np.float32)}, one_input(), "'x'", "empty")


def test_disagreeing_sample_counts():
    d = feeds2()
    d["ids"] = d["ids"][:5]
    expect_error(d, two_inputs(), "a=8", "ids=5")


def test_unreadable_file(tmp_path):
    bad = tmp_path / "data.npz"
    bad.write_bytes(np.random.default_rng(0).bytes(300))
    expect_error(bad, one_input(), "data.npz")
    txt = tmp_path / "data.npy"
    txt.write_text("not numpy\n")
    expect_error(txt, one_input(), "data.npy")
    expect_error(tmp_path / "missing.npz", one_input(), "missing.npz", "not found")
    empty = tmp_path / "empty.npz"
    np.savez(empty)
    expect_error(empty, one_input(), "no arrays")


def test_pickled_object_array_refused(tmp_path):
    p = tmp_path / "obj.npz"
    np.savez(p, x=np.array([{"a": 1}, None], dtype=object))
    expect_error(p, one_input(), "obj.npz")


def test_npy_for_two_inputs_refused(tmp_path):
    p = tmp_path / "a.npy"
    np.save(p, randn([4, 4]))
    expect_error(p, two_inputs(), "2 inputs", "a, ids")


def test_fixed_batch_not_divisible():
    expect_error({"x": randn([6, 4])}, one_input(batch=4), "fixed at 4", "6 samples")


def test_reader_yielding_nothing_and_bad_feed():
    expect_error(iter([]), one_input(), "no data")
    expect_error([randn([2, 4])], one_input(), "dict")
    expect_error([{"x": randn([2, 3])}], one_input(), "'x'", "axis 1 must be 4")


@pytest.mark.parametrize("kw,word", [(dict(batch_size=0), "--batch-size"), (dict(max_samples=0), "--max-samples")])
def test_bad_settings(kw, word):
    expect_error({"x": randn([6, 4])}, one_input(), word, **kw)


def test_unsupported_source():
    expect_error(42, one_input(), "int")


# ---------------------------------------------------------------- accepted forms

def _samples(cal, name):
    return np.concatenate([b[name] for b in cal.batches])


def test_npz_and_npy_accepted(tmp_path):
    x = randn([10, 4])
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "named.npz", x=x)
    np.savez(tmp_path / "other_key.npz", pixels=x)       # one array, another key: one-input model
    for f in ("x.npy", "named.npz", "other_key.npz"):
        cal = load_calibration(tmp_path / f, one_input(), batch_size=4)
        np.testing.assert_array_equal(_samples(cal, "x"), x)
        assert cal.num_samples == 10 and [len(b["x"]) for b in cal.batches] == [4, 4, 2]


def test_a_lone_array_under_another_key_is_fed_with_a_note(tmp_path):
    x = randn([10, 4])
    np.savez(tmp_path / "d.npz", x)                     # np.savez names it arr_0
    cal = load_calibration(tmp_path / "d.npz", one_input())
    np.testing.assert_array_equal(_samples(cal, "x"), x)
    assert cal.notes == [f"{tmp_path / 'd.npz'}: key 'arr_0' is not an input name: its array was "
                         "fed to the model's only input 'x'"]
    np.savez(tmp_path / "x.npz", x=x)
    np.save(tmp_path / "x.npy", x)
    for f in ("x.npz", "x.npy"):                        # named by the input, or keyless: no note
        assert load_calibration(tmp_path / f, one_input()).notes == []
    runs = tmp_path / "runs"
    runs.mkdir()
    for k in range(3):
        np.savez(runs / f"{k}.npz", randn([2, 4], k))
    cal = load_calibration(runs, one_input())            # one note for the whole directory
    assert cal.num_samples == 6 and cal.notes == [
        f"{runs}: key 'arr_0' is not an input name: its array was fed to the model's only input 'x'"]


def test_other_key_not_renamed_for_two_inputs(tmp_path):
    np.savez(tmp_path / "d.npz", pixels=randn([4, 4]))
    expect_error(tmp_path / "d.npz", two_inputs(), "'a'")


def test_calibration_data_reader_and_iterables():
    d = feeds2(12)
    chunks = [{k: v[i:i + 4] for k, v in d.items()} for i in range(0, 12, 4)]

    class Reader:  # the onnxruntime.quantization.CalibrationDataReader protocol
        def __init__(self):
            self.it = iter(chunks)

        def get_next(self):
            return next(self.it, None)

    for source in (Reader(), chunks, (c for c in chunks)):
        cal = load_calibration(source, two_inputs())
        assert cal.num_samples == 12 and len(cal.batches) == 3
        for name in ("a", "ids"):
            np.testing.assert_array_equal(_samples(cal, name), d[name])


def test_feeds_cast_losslessly():
    cal = load_calibration([{"x": randn([3, 4]).astype(np.float64)}], one_input())
    assert cal.batches[0]["x"].dtype == np.float32


def test_max_samples_and_batch_size():
    x = randn([20, 4])
    cal = load_calibration({"x": x}, one_input(), batch_size=6, max_samples=15)
    assert cal.num_samples == 15
    assert [len(b["x"]) for b in cal.batches] == [6, 6, 3]
    np.testing.assert_array_equal(_samples(cal, "x"), x[:15])


def test_max_samples_with_a_reader():
    x = randn([20, 4])
    feeds = [{"x": x[i:i + 4]} for i in range(0, 20, 4)]
    cal = load_calibration(feeds, one_input(), max_samples=6)
    assert cal.num_samples == 6
    np.testing.assert_array_equal(_samples(cal, "x"), x[:6])


def test_fixed_batch_dim_forces_batch_size():
    x = randn([12, 4])
    cal = load_calibration({"x": x}, one_input(batch=4), batch_size=5)
    assert [len(b["x"]) for b in cal.batches] == [4, 4, 4]
    cal = load_calibration({"x": x}, one_input(batch=4), batch_size=32, max_samples=8)
    assert cal.num_samples == 8 and [len(b["x"]) for b in cal.batches] == [4, 4]


def test_labels_are_kept_apart():
    d = {"x": randn([6, 4]), "label": np.arange(6)}
    cal = load_calibration(d, one_input(), labels_key="label", batch_size=4)
    np.testing.assert_array_equal(cal.labels, np.arange(6))
    assert set(cal.batches[0]) == {"x"}
    expect_error(dict(d), one_input(), "'label'", "--labels")
    expect_error({"x": d["x"]}, one_input(), "'lbl'", labels_key="lbl")


def test_initializers_listed_as_inputs_are_not_fed():
    m = one_input()
    m2 = make_model(m.graph.node, m.graph.input, m.graph.output, m.graph.initializer,
                    graph_inputs_for_inits=True)
    assert [s.name for s in model_inputs(m2)] == ["x"]
    assert load_calibration({"x": randn([3, 4])}, m2).num_samples == 3


def test_max_samples_with_a_reader_keeps_whole_fixed_batches():
    x = randn([20, 4])
    feeds = [{"x": x[i:i + 4]} for i in range(0, 20, 4)]
    cal = load_calibration(feeds, one_input(batch=4), max_samples=6)
    assert [len(b["x"]) for b in cal.batches] == [4, 4]  # a fixed batch dim cannot be cut
