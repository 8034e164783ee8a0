"""Thread pools sized to the free cores; the pruned model does not depend on the count."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest

from onnx_obs import api, threads
from onnx_obs.algorithms.blas_threads import _controller, _OpenBLAS, one_blas_thread
from onnx_obs.errors import OnnxObsError
from onnx_obs.hessian.layerwise import HessianSum
from onnx_obs.runtime import Runner


def test_cores_follow_affinity_quota_and_idle_cpus(monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: None)
    monkeypatch.setattr(threads, "idle_cpus", lambda: 5.8)
    assert threads.available_cores() == 6 and threads.free_cores() == 6
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: 3)
    assert threads.available_cores() == 3 and threads.free_cores() == 3
    monkeypatch.setattr(threads, "idle_cpus", lambda: 1.4)   # the others busy
    assert threads.free_cores() == 1
    monkeypatch.setattr(threads, "idle_cpus", lambda: 0.1)
    assert threads.free_cores() == 1   # never fewer than one
    monkeypatch.setattr(threads, "idle_cpus", lambda: None)  # no /proc/stat: the load average
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (1.6, 0.0, 0.0))
    assert threads.free_cores() == 1


def test_idle_cpus_reads_per_cpu_jiffies_of_the_affinity_mask(monkeypatch, tmp_path):
    # cpu0 idle 90 of 100 jiffies, cpu1 idle 25 of 100, cpu2 (outside the mask) idle throughout
    lines = [["cpu  0 0 0 0 0 0 0 0 0 0", "cpu0 10 0 0 100 0 0 0 0 0 0", "cpu1 10 0 0 100 0 0 0 0 0 0",
              "cpu2 0 0 0 100 0 0 0 0 0 0", "intr 1 2 3"],
             ["cpu  0 0 0 0 0 0 0 0 0 0", "cpu0 15 0 5 180 10 0 0 0 0 0", "cpu1 80 0 5 120 5 0 0 0 0 0",
              "cpu2 0 0 0 200 0 0 0 0 0 0", "intr 1 2 3"]]
    files = [tmp_path / "a", tmp_path / "b"]
    for f, text in zip(files, lines):
        f.write_text("\n".join(text) + "\n")
    reads = iter(files)
    monkeypatch.setattr(threads, "_cpu_jiffies", lambda stat, real=threads._cpu_jiffies: real(next(reads)))
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1})
    assert threads.idle_cpus(window=0) == pytest.approx(90 / 100 + 25 / 100)


def test_run_threads_sets_blas_and_sessions_then_restores(mlp_path):
    c = _controller()
    if not isinstance(c, _OpenBLAS) or not c.libs:
        pytest.skip("no OpenBLAS found to query")
    before = c.get()
    with threads.run_threads(1) as n:
        assert n == 1 and c.get() == [1] * len(before)
        opts = Runner(onnx.load(mlp_path)).session.get_session_options()
        assert opts.intra_op_num_threads == 1
        assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert c.get() == before
    with one_blas_thread():
        assert c.get() == [1] * len(before)
    assert c.get() == before


@pytest.mark.parametrize("precision,rtol", [("float64", 1e-12), ("float32", 1e-5)])
def test_hessian_sum_does_not_depend_on_threads(monkeypatch, precision, rtol):
    """Chunks multiplied on parallel threads, summed in order: equal to the serial sum, bit for bit,
    and to 2 X^T X / n computed at once (float32 products: within float32 rounding)."""
    monkeypatch.setattr("onnx_obs.hessian.layerwise._CHUNK_ROWS", 100)
    monkeypatch.setattr("onnx_obs.hessian.layerwise._CHUNK_ROWS_F32", 100)
    x = np.random.default_rng(0).standard_normal((2, 950, 7)).astype(np.float32)
    sums = {}
    for n in (1, 3):
        with threads.run_threads(n):
            h = HessianSum(2, 7, precision)
            h.add(x)
            sums[n] = h.hessian()
    np.testing.assert_array_equal(sums[1], sums[3])
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(sums[1], 2 * np.einsum("gni,gnj->gij", x64, x64) / 950, rtol=rtol)


@pytest.mark.parametrize("which,sequential", [("mlp", True), ("cnn", True), ("cnn", False)])
def test_pruned_bytes_do_not_depend_on_threads(which, sequential, samples, tmp_path):
    digests = set()
    for n in (1, 2):
        out = tmp_path / f"{which}_{n}.onnx"
        api.prune(str(samples / f"digits_{which}.onnx"), str(samples / f"digits_{which}_calib.npz"),
                  threads=n, max_samples=96, sequential=sequential, output=out)
        digests.add(hashlib.sha256(out.read_bytes()).hexdigest())
    assert len(digests) == 1


def test_negative_threads_refused(mlp_path, mlp_calib):
    with pytest.raises(OnnxObsError, match="--threads must be at least 0"):
        api.prune(str(mlp_path), str(mlp_calib), threads=-1)


def test_panel_matmul_is_the_product_and_the_same_on_any_thread_count():
    rng = np.random.default_rng(1)
    A = rng.standard_normal((70, 600)).astype(np.float32)
    B = np.asfortranarray(rng.standard_normal((600, 530)).astype(np.float32))
    out = []
    for n in (1, 2, 3):
        with threads.run_threads(n):
            out.append(threads.panel_matmul(A, B))
    np.testing.assert_allclose(out[0], A.astype(np.float64) @ B.astype(np.float64), rtol=1e-4, atol=1e-3)
    for other in out[1:]:
        np.testing.assert_array_equal(other, out[0])


def test_wide_layers_prune_to_the_same_bytes_on_any_thread_count():
    """OpenBLAS's threads round a wide layer's products and factorisation differently with their
    count (a 256x2304 layer moved by 1e-6); the solvers split the work themselves, so a
    128x2000 layer (fast + refit), its allocation table (stacked levels) and a 48x400 layer
    (exact) come out bitwise equal on 1 and 2 threads."""
    from onnx_obs.algorithms.layerwise import FastLevels, prune_layer

    rng = np.random.default_rng(0)
    X = rng.standard_normal((2400, 2000)).astype(np.float32)
    X[:, 1:] += 0.5 * X[:, :-1]  # correlated inputs
    H = (2.0 / len(X)) * (X.T @ X).astype(np.float64)
    W = rng.standard_normal((128, 2000)).astype(np.float32)
    small, Hs = W[:48, :400], H[:400, :400]
    runs = []
    for n in (1, 2):
        with threads.run_threads(n):
            wide = prune_layer(W, H, sparsity=0.5)
            exact = prune_layer(small, Hs, sparsity=0.5)
            table = FastLevels(W, H).errors([1000, 60000, 120000])
        assert (wide.solver, exact.solver) == ("fast+refit", "exact")
        runs.append((wide.weight, wide.predicted_error, exact.weight, table))
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)
