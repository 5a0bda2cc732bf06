"""Profiler metrics on hand-made events; timeline format; event buffers past their first allocation."""
import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from moesim.profiler import LAYERS_TABLE_COLUMNS, STEPS_TABLE_COLUMNS, Profiler, covered_ms


def test_percentiles_weight_each_token_by_its_step():
    p = Profiler()
    p.step(0, 3, 0.0, 1.0)  # a 3-token step of 1 ms: three tokens of latency 1
    p.step(1, 1, 1.0, 11.0)  # one token of 10 ms
    m = p.metrics()
    assert m["tokens"] == 4 and m["steps"] == 2
    assert m["latency_ms"]["p50"] == pytest.approx(1.0)
    assert m["latency_ms"]["mean"] == pytest.approx(13 / 4)
    assert m["latency_ms"]["p99"] == pytest.approx(np.percentile([1, 1, 1, 10], 99))
    assert m["step_latency_ms_mean"] == pytest.approx(5.5)
    assert m["wall_ms"] == pytest.approx(11.0) and m["tokens_per_s"] == pytest.approx(4 / 0.011)


def test_percentiles_of_decode_steps():
    p = Profiler()
    t = 0.0
    for i, lat in enumerate([4.0, 1.0, 3.0, 2.0]):
        p.step(i, 1, t, t + lat)
        t += lat
    lat = p.metrics()["latency_ms"]
    assert (lat["p50"], lat["p90"], lat["mean"]) == pytest.approx((2.5, 3.7, 2.5))


def test_busy_union_bandwidth_and_overlap():
    p = Profiler()
    p.copy((0, 1), 100, 0.0, 2.0, False)
    p.copy((0, 2), 100, 1.0, 3.0, False)  # overlaps the first: union [0, 3]
    p.copy((1, 0), 200, 5.0, 6.0, True)
    p.compute(0, 1.0, 5.5, 1.0, "device")
    p.compute(1, 5.0, 5.25, 0.0, "host")  # inside the device span: adds nothing to compute busy time
    p.step(0, 1, 0.0, 6.0)
    m = p.metrics()
    assert m["h2d_busy_ms"] == pytest.approx(4.0)  # [0, 3] + [5, 6]
    assert m["bytes_h2d"] == 400 and m["prefetch_bytes_h2d"] == 200 and m["prefetch_loads"] == 1
    assert m["h2d_gbps"] == pytest.approx(400 / 4e6)  # bytes / (ms x 1e6) = GB/s
    assert m["compute_busy_ms"] == pytest.approx(4.5)
    assert m["overlap"] == pytest.approx(2.5 / 4.0)  # [1, 3] and [5, 5.5] under compute
    assert m["stall_ms"] == pytest.approx(1.0) and m["stall_ms_per_layer"] == [1.0, 0.0]
    assert m["host_compute_ms"] == pytest.approx(0.25)


def test_empty_profiler_metrics_are_defined():
    m = Profiler(n_layers=2).metrics()
    assert m["tokens"] == 0 and m["tokens_per_s"] is None and m["overlap"] is None and m["h2d_gbps"] is None
    assert m["latency_ms"]["p50"] is None and m["stall_ms_per_layer"] == [0.0, 0.0]
    json.dumps(m, allow_nan=False)  # plain JSON, no NaN


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 10)), max_size=12),
       st.lists(st.tuples(st.integers(0, 40), st.integers(0, 10)), max_size=12))
def test_covered_ms_matches_counting_unit_cells(a, b):
    a = [(s, s + d) for s, d in a]
    b = [(s, s + d) for s, d in b]
    cells_a = {t for s, e in a for t in range(s, e)}
    cells_b = {t for s, e in b for t in range(s, e)}
    arr = lambda iv: (np.array([s for s, _ in iv], float), np.array([e for _, e in iv], float))  # noqa: E731
    assert covered_ms([arr(a)]) == len(cells_a)
    assert covered_ms([arr(a), arr(b)]) == len(cells_a & cells_b)


def test_tables_assign_events_to_steps():
    p = Profiler(n_layers=3)
    p.copy((0, 1), 10, 0.0, 1.0, False)
    p.compute(0, 1.0, 2.0, 1.0)
    p.copy((2, 0), 20, 2.0, 3.0, True)  # issued after step 0's last layer: step 0's
    p.step(0, 1, 0.0, 2.0)
    p.compute(2, 3.0, 4.0, 1.0)
    p.compute(2, 3.0, 3.5, 0.0, "host")
    p.step(1, 2, 2.0, 4.0)
    s = p.steps_table()
    assert list(s.columns) == list(STEPS_TABLE_COLUMNS)
    assert s.step.tolist() == [0, 1] and s.n_tokens.tolist() == [1, 2]
    assert s.latency_ms.tolist() == [2.0, 2.0] and s.stall_ms.tolist() == [1.0, 1.0]
    assert s.loads.tolist() == [2, 0] and s.bytes_h2d.tolist() == [30, 0]
    t = p.layers_table()
    assert list(t.columns) == list(LAYERS_TABLE_COLUMNS)
    assert t.layer.tolist() == [0, 1, 2]  # layer 1 had no events but is listed
    assert t.compute_ms.tolist() == [1.0, 0.0, 1.0] and t.host_ms.tolist() == [0.0, 0.0, 0.5]
    assert t.loads.tolist() == [1, 0, 1] and t.prefetch_loads.tolist() == [0, 0, 1]
    assert t.bytes_h2d.tolist() == [10, 0, 20] and t.stall_ms.tolist() == [1.0, 0.0, 1.0]


def test_buffers_grow_far_past_their_first_allocation_and_keep_every_event():
    rng = np.random.default_rng(0)
    n_steps, L = 5000, 24
    p = Profiler(n_layers=L)
    stalls = rng.random((n_steps, L))
    t = 0.0
    for s in range(n_steps):
        start = t
        for layer in range(L):
            if layer % 4 == 0:
                p.copy((layer, s % 32), 1000 + layer, t, t + 0.1, bool(s % 2))
            p.compute(layer, t, t + 0.5, float(stalls[s, layer]))
            t += 0.5
        p.step(s, 1, start, t)
    st_, cp, cm = p.arrays()
    assert cm.shape == (n_steps * L, 5) and cp.shape == (n_steps * 6, 6) and st_.shape == (n_steps, 6)
    assert np.array_equal(cm[:, 3], stalls.reshape(-1))
    assert np.array_equal(cm[:, 0], np.tile(np.arange(L), n_steps))
    m = p.metrics()
    assert m["stall_ms_per_layer"] == pytest.approx(stalls.sum(axis=0).tolist())
    assert m["bytes_h2d"] == n_steps * sum(1000 + l for l in range(0, L, 4))
    assert p.steps_table().stall_ms.to_numpy() == pytest.approx(stalls.sum(axis=1))
    p.compute(0, t, t + 1, 0.0)  # still appendable after being read
    assert p.arrays()[2].shape[0] == n_steps * L + 1


def _events(p):
    return [e for e in p["traceEvents"] if e["ph"] == "X"]


def test_timeline_is_chrome_trace_format():
    p = Profiler()
    p.copy((3, 7), 1000, 0.0, 1.5, False)
    p.copy((4, 1), 1000, 1.5, 2.0, True)
    p.compute(3, 1.5, 2.5, 1.5)
    p.compute(3, 0.0, 2.0, 0.0, "host")
    p.step(0, 1, 0.0, 2.5)
    tl = json.loads(json.dumps(p.timeline()))  # plain JSON
    assert tl["displayTimeUnit"] == "ms" and tl["otherData"]["truncated"] is False
    names = {e["tid"]: e["args"]["name"] for e in tl["traceEvents"] if e["name"] == "thread_name"}
    assert names == {1: "copy engine", 2: "compute", 3: "host compute", 4: "steps"}
    for e in tl["traceEvents"]:
        assert {"name", "ph", "pid"} <= set(e) and e["pid"] == 1
    xs = _events(tl)
    for e in xs:
        assert {"ts", "dur", "tid"} <= set(e) and e["dur"] >= 0
    by_tid = {}
    for e in xs:
        by_tid.setdefault(e["tid"], []).append((e["name"], e["ts"], e["dur"]))
    assert by_tid[1] == [("load L3 E7", 0.0, 1500.0), ("prefetch L4 E1", 1500.0, 500.0)]  # microseconds
    assert by_tid[2] == [("layer 3", 1500.0, 1000.0)]
    assert by_tid[3] == [("layer 3 host", 0.0, 2000.0)]
    assert by_tid[4] == [("step 0", 0.0, 2500.0)]


def test_timeline_keeps_whole_steps_up_to_the_cap():
    p = Profiler()
    for s in range(10):  # 1 copy + 2 computes + 1 step span = 4 spans per step
        p.copy((0, s), 1, s, s + 0.5, False)
        p.compute(0, s + 0.5, s + 0.75, 0.5)
        p.compute(1, s + 0.75, s + 1.0, 0.0)
        p.step(s, 1, float(s), s + 1.0)
    tl = p.timeline(max_events=9)  # two whole steps fit
    assert tl["otherData"]["truncated"] is True
    assert tl["otherData"]["steps_shown"] == 2 and tl["otherData"]["steps_total"] == 10
    assert len(_events(tl)) == 8
    assert "2 of 10 steps" in tl["otherData"]["note"]
    assert len(_events(p.timeline(max_events=1))) == 4  # at least one step
    assert len(_events(p.timeline())) == 40
