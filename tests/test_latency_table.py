"""Latency-aware structured allocation (latency_table.py, --target-latency-ms): with an injected
timer whose value is a closed formula of the weight shapes, so that the table and the plan can
be checked exactly."""

import numpy as np
import pytest
from onnx import helper, numpy_helper

from graphs import calib_for, init, make_model, randn, vi
from cli_checks import assert_one_line_error
from onnx_obs import api, latency_cache
from onnx_obs.calib import Calibration
from onnx_obs.errors import OnnxObsError
from onnx_obs.graph.sites import find_sites
from onnx_obs.graph.tracing import trace_units
from onnx_obs.latency_table import OnnxruntimeTimer, latency_model

FIXED_MS = 0.5


def conv_chain():
    """x[.,3,8,8] -> Conv 3->32 -> Relu -> Conv 32->32 -> Relu -> Conv 32->16 (the output)."""
    shapes = {"W1": [32, 3, 3, 3], "W2": [32, 32, 3, 3], "W3": [16, 32, 3, 3]}
    inits = [init(n, randn(s, seed=i) * 0.3) for i, (n, s) in enumerate(shapes.items())]
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], name="c1", pads=[1] * 4),
             helper.make_node("Relu", ["a"], ["ar"], name="r1"),
             helper.make_node("Conv", ["ar", "W2"], ["b"], name="c2", pads=[1] * 4),
             helper.make_node("Relu", ["b"], ["br"], name="r2"),
             helper.make_node("Conv", ["br", "W3"], ["y"], name="c3", pads=[1] * 4)]
    return make_model(nodes, [vi("x", np.float32, ["batch", 3, 8, 8])], [vi("y", np.float32, None)], inits)


def fake_ms(model) -> float:
    """A deterministic 'latency': fixed overhead plus MACs over 8x8 positions (not additive over
    groups: a Conv's cost is its input times its output channels)."""
    size = sum(numpy_helper.to_array(t).size for t in model.graph.initializer if t.name.startswith("W"))
    return FIXED_MS + 64 * size * 1e-5


def formula_ms(c1: int, c2: int) -> float:
    return FIXED_MS + 64 * 9 * (c1 * 3 + c2 * c1 + 16 * c2) * 1e-5


def test_table_matches_the_timer_and_falls_with_width():
    model = conv_chain()
    sites, _ = find_sites(model)
    groups, _ = trace_units(model, sites, {s.name for s in sites})
    groups.sort(key=lambda g: g.node)
    assert [g.units for g in groups] == [32, 32]
    predict, table, notes = latency_model(model, groups, [np.arange(32)] * 2, [8, 8], fake_ms)
    assert notes[0].startswith("latency table: measured in") and notes[0].endswith("s (not cached)")
    for g, (xs, ys) in enumerate(table):
        assert list(xs) == [0, 8, 16, 24]   # kept 32, 24, 16, 8: multiples of 8
        want = [formula_ms(32 - k, 32) if g == 0 else formula_ms(32, 32 - k) for k in xs]
        np.testing.assert_allclose(ys, want, rtol=1e-12)
        assert np.all(np.diff(ys) < 0)
    # on the table's widths the MACs overlap term makes the prediction exact for a MACs timer
    for c1, c2 in [(8, 0), (16, 24), (24, 24), (8, 8)]:
        np.testing.assert_allclose(predict(np.array([c1, c2])), formula_ms(32 - c1, 32 - c2), rtol=1e-9)
    # between widths: linear in each group's own table, plus the overlap of the exact MACs
    base = formula_ms(32, 32)
    mid = (formula_ms(24, 32) + formula_ms(16, 32)) / 2 - base   # 12 removed: between 8 and 16
    overlap = formula_ms(20, 24) - formula_ms(20, 32) - formula_ms(32, 24) + base
    np.testing.assert_allclose(predict(np.array([12, 8])),
                               base + mid + formula_ms(32, 24) - base + overlap, rtol=1e-9)


def test_a_noisy_width_is_interpolated_not_flattened():
    """A width timed slower than no removal at all (noise) takes the value halfway between its
    neighbours, so that removing units still shows a gain there (a running minimum would make
    the first step look free of gain and stop a greedy planner)."""
    model = conv_chain()
    sites, _ = find_sites(model)
    groups, _ = trace_units(model, sites, {s.name for s in sites})
    groups.sort(key=lambda g: g.node)

    def noisy_ms(m):
        w1 = next(t for t in m.graph.initializer if t.name == "W1")
        return fake_ms(m) + (2.0 if w1.dims[0] == 24 else 0.0)

    assert noisy_ms(model) < formula_ms(24, 32) + 2.0   # the 8-removed width timed slower
    _, table, _ = latency_model(model, groups, [np.arange(32)] * 2, [8, 8], noisy_ms)
    want = [formula_ms(32, 32), (formula_ms(32, 32) + formula_ms(16, 32)) / 2, formula_ms(16, 32),
            formula_ms(8, 32)]
    np.testing.assert_allclose(table[0][1], want, rtol=1e-12)


def test_onnxruntime_times_each_group_on_its_own_part(monkeypatch, tmp_path):
    """The default timer times each group's part of the graph, not the whole model: the table
    (model time + part time at the width - part time as is) equals the whole-model one for a
    timer additive over layers (fake_ms), and the parts hold the group's layers only."""
    model = conv_chain()
    sites, _ = find_sites(model)
    groups, _ = trace_units(model, sites, {s.name for s in sites})
    groups.sort(key=lambda g: g.node)
    seen = []
    monkeypatch.setattr(OnnxruntimeTimer, "measure",
                        lambda self, m, feeds: seen.append([n.name for n in m.graph.node]) or fake_ms(m))
    timer = OnnxruntimeTimer(Calibration([calib_for(model, n=4)], 4))
    monkeypatch.setenv("ONNX_OBS_CACHE_DIR", str(tmp_path / "first"))
    _, table, _ = latency_model(model, groups, [np.arange(32)] * 2, [8, 8], timer)
    _, whole, _ = latency_model(model, groups, [np.arange(32)] * 2, [8, 8], fake_ms)
    for (xs, ys), (xw, yw) in zip(table, whole):
        np.testing.assert_array_equal(xs, xw)
        np.testing.assert_allclose(ys, yw, rtol=1e-12)
    assert seen == [["c1", "r1", "c2", "r2", "c3"]] + [["c1", "r1", "c2"]] * 4 + [["c2", "r2", "c3"]] * 4

    def refuse_parts(self, m, feeds):   # onnxruntime refusing a part alone: whole models instead
        if len(m.graph.node) < 5:
            raise OnnxObsError("refused")
        seen.append(len(m.graph.node))
        return fake_ms(m)

    seen.clear()
    monkeypatch.setattr(OnnxruntimeTimer, "measure", refuse_parts)
    monkeypatch.setenv("ONNX_OBS_CACHE_DIR", str(tmp_path / "second"))
    _, table, _ = latency_model(model, groups, [np.arange(32)] * 2, [8, 8], timer)
    for (_, ys), (_, yw) in zip(table, whole):
        np.testing.assert_allclose(ys, yw, rtol=1e-12)
    assert seen == [5] * 7


def test_plan_meets_the_latency_target():
    model = conv_chain()
    target = 0.6 * formula_ms(32, 32)
    res = api.prune(model, calib_for(model, n=32), structure="channels", target_latency_ms=target,
                    timer=fake_ms)
    kept = [e["units_after"] for e in res.report.structure]
    assert fake_ms(res.model) == pytest.approx(formula_ms(*kept))
    assert fake_ms(res.model) <= target * 1.02   # timed plan within 2% of the target
    assert all(k % 8 == 0 for k in kept) and kept != [32, 32]
    note = next(n for n in res.report.notes if n.startswith("latency at batch 1"))
    assert f"target {target:.3f} ms" in note and f"timed {fake_ms(res.model):.3f} ms" in note
    # speedup measured: the same plan as the target it implies
    again = api.prune(model, calib_for(model, n=32), structure="channels", target_speedup=1 / 0.6,
                      latency="measured", timer=fake_ms)
    assert [e["units_after"] for e in again.report.structure] == kept


def test_unreachable_latency_and_bad_setting(cli, cnn_path, cnn_calib, tmp_path):
    model = conv_chain()
    # predicted out of reach (the overhead alone is above the target): one error
    with pytest.raises(OnnxObsError, match="cannot be reached"):
        api.prune(model, calib_for(model, n=32), structure="channels",
                  target_latency_ms=0.2 * FIXED_MS, timer=fake_ms)
    # predicted within reach, timed not (a cost the MACs miss, like a layout reorder once both
    # layers are narrow): the report says so
    def reorder_ms(m):
        w2 = next(t for t in m.graph.initializer if t.name == "W2")
        return fake_ms(m) + (5.0 if w2.dims[0] < 32 and w2.dims[1] < 32 else 0.0)

    target = 0.3 * formula_ms(32, 32)   # needs both groups narrow (formula_ms(8, 32) > target)
    assert formula_ms(8, 32) > target and formula_ms(32, 8) > target
    res = api.prune(model, calib_for(model, n=32), structure="channels", target_latency_ms=target,
                    timer=reorder_ms)
    assert reorder_ms(res.model) > target * 1.02
    assert any(n.startswith("latency target not met") for n in res.report.notes)
    out = tmp_path / "out.onnx"
    r = cli("prune", cnn_path, "-o", out, "--calib", cnn_calib, "--structure", "channels",
            "--target-speedup", "1.5", "--latency", "fast")
    assert_one_line_error(r, "--latency must be macs or measured")
    assert not out.exists()


def test_table_is_cached_on_disk(tmp_path, monkeypatch):
    """onnxruntime's table (here its timings replaced by fake_ms) is read back from the cache on
    a second run; another thread count is another key; a corrupted entry is measured again."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("ONNX_OBS_CACHE_DIR", str(cache))
    timed = []
    monkeypatch.setattr(OnnxruntimeTimer, "measure", lambda self, m, feeds: timed.append(1) or fake_ms(m))
    model, target = conv_chain(), 0.6 * formula_ms(32, 32)
    cal = calib_for(model, n=32)

    def run(threads):
        timed.clear()
        # magnitude: one planning round, one table (structured OBS plans in rounds, a table each)
        res = api.prune(model, cal, structure="channels", method="magnitude", target_latency_ms=target,
                        threads=threads)
        return res, len(timed), [n for n in res.report.notes if "latency table" in n]

    first, calls, notes = run(1)
    table_calls = 1 + 2 * (1 + 3)   # the model, then each group's part as is and at 3 widths
    entries = list(cache.glob("latency-*.json"))
    want = f"latency table: measured in {notes[0].split()[4]} s, cached ({entries[0]})"
    assert len(entries) == 1 and notes == [want]
    second, again, notes = run(1)
    assert again == calls - table_calls   # only the plan is timed
    assert notes == [f"latency table: cached ({entries[0]})"]
    assert [e["units_after"] for e in second.report.structure] == \
        [e["units_after"] for e in first.report.structure]
    # the key: the model's bytes (one weight changed: another key), groups, timer's fingerprint
    changed = conv_chain()
    changed.graph.initializer[2].CopyFrom(numpy_helper.from_array(randn([16, 32, 3, 3], 9), "W3"))
    key = latency_cache.table_key(model, [], {"threads": 1})
    assert key == latency_cache.table_key(conv_chain(), [], {"threads": 1})
    assert len({key, latency_cache.table_key(changed, [], {"threads": 1}),
                latency_cache.table_key(model, [(["W1"], 32, [8])], {"threads": 1}),
                latency_cache.table_key(model, [], {"threads": 2})}) == 4
    _, other, notes = run(2)   # another thread count: another entry
    assert other == calls and "measured in" in notes[0] and len(list(cache.glob("latency-*.json"))) == 2
    entries[0].write_text("{not json")
    _, redone, notes = run(1)
    assert redone == calls and notes[0].startswith(f"latency table cache entry {entries[0]} ignored")
    assert "measured in" in notes[1]
    _, calls, _ = run(1)   # rewritten
    assert calls == again
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("ONNX_OBS_CACHE_DIR", str(tmp_path / "file" / "cache"))   # cannot be made
    _, _, notes = run(1)
    assert notes[0].startswith(f"the latency table could not be cached in {tmp_path / 'file' / 'cache'}")
    assert notes[1].endswith("s, not cached")
