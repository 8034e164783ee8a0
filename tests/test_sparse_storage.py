"""Sparse storage of pruned weights: exact round trip, smaller only where auto chooses it,
onnxruntime runs it, and onnx-obs reads its own sparse output back."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from graphs import init, make_model, randn, run, vi
from onnx_obs import api
from onnx_obs.graph.model_io import load_model
from onnx_obs.graph.sparse_storage import densify, sparse_bytes, store_sparse


def pruned_weight(shape, density: float, seed: int = 0) -> np.ndarray:
    w = randn(shape, seed)
    w[np.random.default_rng(seed + 1).random(shape) >= density] = 0.0
    return w


def two_layer(w1: np.ndarray, w2: np.ndarray) -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2")]
    return make_model(nodes, [vi("x", shape=["batch", w1.shape[0]])],
                      [vi("y", shape=["batch", w2.shape[1]])], [init("W1", w1), init("W2", w2)])


def test_round_trip_is_exact_and_runs_in_onnxruntime():
    w1, w2 = pruned_weight([16, 12], 0.2), pruned_weight([12, 5], 0.6, seed=3)
    dense = two_layer(w1, w2)
    sparse = onnx.ModelProto()
    sparse.CopyFrom(dense)
    choices = store_sparse(sparse, ["W1", "W2"], "sparse")
    assert [c.stored for c in choices] == ["sparse", "sparse"]
    assert {s.values.name for s in sparse.graph.sparse_initializer} == {"W1", "W2"}
    assert not sparse.graph.initializer
    sp = {s.values.name: s for s in sparse.graph.sparse_initializer}["W1"]
    assert numpy_helper.to_array(sp.indices).dtype == np.int64
    assert sp.indices.dims == sp.values.dims == [np.count_nonzero(w1)]
    onnx.checker.check_model(sparse)                   # full_check: see the module docstring
    x = {"x": randn([7, 16], 9)}
    np.testing.assert_array_equal(run(sparse, x)["y"], run(dense, x)["y"])
    assert densify(sparse.graph) == 2
    back = {t.name: numpy_helper.to_array(t) for t in sparse.graph.initializer}
    np.testing.assert_array_equal(back["W1"], w1)
    np.testing.assert_array_equal(back["W2"], w2)


def test_auto_stores_sparse_only_where_smaller():
    w1, w2 = pruned_weight([40, 30], 0.1), pruned_weight([30, 5], 0.5, seed=3)
    model = two_layer(w1, w2)
    before = model.ByteSize()
    choices = {c.name: c for c in store_sparse(model, ["W1", "W2"], "auto")}
    assert choices["W1"].stored == "sparse" and choices["W2"].stored == "dense"
    nnz = np.count_nonzero(w1)
    assert choices["W1"].sparse_bytes == sparse_bytes(nnz, 4) == nnz * 12 < w1.size * 4
    assert choices["W2"].sparse_bytes >= w2.size * 4
    assert [t.name for t in model.graph.initializer] == ["W2"]
    assert model.ByteSize() < before - (w1.size * 4 - nnz * 12) + 64


def test_coordinate_indices_are_read_too():
    w = pruned_weight([5, 4], 0.3)
    coords = np.argwhere(w).astype(np.int64)
    sp = helper.make_sparse_tensor(numpy_helper.from_array(w[w != 0], "W"),
                                   numpy_helper.from_array(coords, "W_idx"), list(w.shape))
    graph = helper.make_graph([], "g", [], [])
    graph.sparse_initializer.append(sp)
    densify(graph)
    np.testing.assert_array_equal(numpy_helper.to_array(graph.initializer[0]), w)


@pytest.mark.parametrize("sparsity, smaller", [(0.9, True), (0.5, False)])
def test_prune_with_auto_storage(tmp_path, mlp_path, mlp_calib, sparsity, smaller):
    dense_out, auto_out = tmp_path / "dense.onnx", tmp_path / "auto.onnx"
    kw = dict(method="magnitude", sparsity=sparsity)
    api.prune(str(mlp_path), str(mlp_calib), output=dense_out, **kw)
    res = api.prune(str(mlp_path), str(mlp_calib), output=auto_out, storage="auto", **kw)
    assert (auto_out.stat().st_size < dense_out.stat().st_size) == smaller
    assert res.report.file_size_after == auto_out.stat().st_size
    assert all((c["stored"] == "sparse") == smaller for c in res.report.storage)
    # onnx-obs reads its own sparse output: the same weights as the dense output
    a, b = load_model(auto_out).model, load_model(dense_out).model
    assert not a.graph.sparse_initializer
    wa = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    for t in b.graph.initializer:
        np.testing.assert_array_equal(wa[t.name], numpy_helper.to_array(t))
    x = {"input": np.load(mlp_calib)["input"][:8]}
    np.testing.assert_array_equal(run(str(auto_out), x)["logits"], run(str(dense_out), x)["logits"])


def test_sparse_storage_that_grows_the_file_says_so(tmp_path, mlp_path, mlp_calib):
    out = tmp_path / "s.onnx"
    res = api.prune(str(mlp_path), str(mlp_calib), output=out, method="magnitude", sparsity=0.5,
                    storage="sparse")
    assert out.stat().st_size > mlp_path.stat().st_size
    assert any("more bytes sparse than dense" in n and "--storage auto" in n for n in res.report.notes)


def test_sparse_output_can_be_pruned_again(tmp_path, mlp_path, mlp_calib):
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    api.prune(str(mlp_path), str(mlp_calib), output=first, sparsity=0.8, storage="sparse", allocation="uniform")
    assert onnx.load(str(first)).graph.sparse_initializer
    info = api.inspect(str(first))
    assert all(s.sparsity >= 0.79 for s in info.sites)
    res = api.prune(str(first), str(mlp_calib), output=second, sparsity=0.9, storage="auto")
    assert res.report.deviation["logits"]["top1_agreement"] > 0.5
    assert second.stat().st_size < first.stat().st_size
