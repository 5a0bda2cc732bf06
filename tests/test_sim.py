"""The sim backend's clocks, against timelines computed by hand.

Toy numbers: one expert = 3e6 bytes; a copy takes 1 ms (3 GB/s = 3e6 B/ms, no latency); a device expert
takes max(2 ms, n ms) for n tokens (3e6 B at 1.5e6 B/ms; 6e6 flop per token at 6e6 flop/ms); a host
expert takes 3n ms (3e6 B at 1e6 B/ms; 6e6 flop per token at 2e6 flop/ms). No fixed overheads.
"""
import pytest

from moesim.backends import Backend
from moesim.backends.sim import SimBackend
from moesim.hardware import HardwareProfile
from moesim.profiler import Profiler
from moesim.trace import ModelSpec

SPEC = ModelSpec("toy", layers=3, experts=4, top_k=2, hidden=1000, ffn=1000, bits_per_weight=8)
HW = HardwareProfile("toy", h2d_pinned_gbps=3, h2d_pageable_gbps=1.5, copy_latency_us=0, device_mem_gbps=1.5,
                     device_tflops=0.006, host_mem_gbps=1, host_gflops=2, vram_gib=1, kernel_overhead_us=0,
                     host_overhead_us=0)
ACT = 2 * 2000 / 3e6  # activations round trip of one token: 2 copies of 1000 bf16 values at 3e6 B/ms


def make(spec=SPEC, n_slots=4, hw=HW, pinned=True):
    b, p = SimBackend(hw, pinned=pinned), Profiler(spec.layers)
    b.setup(spec, n_slots, p)
    return b, p


def spans(p, where):
    _, cp, cm = p.arrays()
    if where == "copy":
        return [(round(s, 9), round(e, 9)) for s, e in cp[:, 3:5].tolist()]
    host = 1.0 if where == "host" else 0.0
    return [(int(l), round(s, 9), round(e, 9), round(st, 9)) for l, s, e, st, h in cm.tolist() if h == host]


def test_is_a_backend_and_accepts_a_preset_name():
    b = SimBackend("a100-pcie")
    assert isinstance(b, Backend) and b.name == "sim" and b.hardware.name == "a100-pcie"


def test_one_miss_per_layer_latency_is_copy_plus_compute():
    b, p = make()
    b.begin_step(0, 1)
    for layer in range(3):
        b.load((layer, 0), layer, prefetch=False)
        b.compute(layer, [((layer, 0), layer, 1)], [])
    b.end_step()
    b.finish()
    # each layer: copy 1 ms (issued when the previous layer ends), then compute 2 ms
    assert spans(p, "copy") == [(0, 1), (3, 4), (6, 7)]
    assert spans(p, "device") == [(0, 1, 3, 1), (1, 4, 6, 1), (2, 7, 9, 1)]
    steps = p.steps_table()
    assert steps.latency_ms.tolist() == [pytest.approx(9.0)]
    m = p.metrics()
    assert m["stall_ms"] == pytest.approx(3.0)
    assert m["bytes_h2d"] == 3 * SPEC.bytes_per_expert == 9_000_000
    assert m["overlap"] == pytest.approx(0.0)  # nothing overlapped: every copy ran while compute waited


def test_replay_overheads_and_write_back_are_serial():
    """A calibrated CPU profile's own-time fields, after each layer's compute: 0.5 ms per layer, 0.25 ms per
    load, 0.1 ms per expert; each copied expert (3e6 B) adds 0.35 ms to the next layer's compute."""
    import dataclasses

    mib = SPEC.bytes_per_expert / 2**20
    hw = dataclasses.replace(HW, layer_overhead_us=500, load_overhead_us=250, expert_overhead_us=100,
                             writeback_us_per_mib=350 / mib)
    b, p = make(hw=hw)
    b.begin_step(0, 1)
    b.load((0, 0), 0, prefetch=False)  # layer 0: copy 1 ms, compute 2 + 0.35 ms, then 0.5 + 0.25 + 2 x 0.1 ms
    b.compute(0, [((0, 0), 0, 1), ((0, 1), 1, 0)], [])
    b.compute(1, [((1, 0), 2, 1)], [])  # layer 1, all hits: compute 2 ms, then 0.5 + 0.1 ms
    b.end_step()
    b.begin_step(1, 1)
    b.load((0, 2), 3, prefetch=False)  # step 1, layer 0: issued after all of that
    b.compute(0, [((0, 2), 3, 1)], [])
    b.end_step()
    b.finish()
    assert spans(p, "copy") == [(0, 1), (6.9, 7.9)]
    assert spans(p, "device") == [(0, 1, 3.35, 1.0), (1, 4.3, 6.3, 0.0), (0, 7.9, 10.25, 1.0)]
    assert p.steps_table().latency_ms.tolist() == [pytest.approx(6.9), pytest.approx(11.1 - 6.9)]


def test_prefetch_issued_early_overlaps_and_removes_the_stall():
    def run(prefetch: bool):
        b, p = make()
        b.begin_step(0, 1)
        b.load((0, 0), 0, False)  # miss
        b.compute(0, [((0, 0), 0, 1)], [])  # 1..3
        if prefetch:
            b.load((2, 0), 2, True)  # after layer 0: for layer 2, 3..4, under layer 1's compute
        b.compute(1, [((1, 0), 1, 1)], [])  # hit (slot 1 never loaded: ready at 0): 3..5
        if not prefetch:
            b.load((2, 0), 2, False)  # demand miss found when layer 2 is about to run: 5..6
        b.compute(2, [((2, 0), 2, 1)], [])
        b.end_step()
        return p

    late, early = run(False), run(True)
    assert spans(late, "device")[2] == (2, 6, 8, 1)
    assert late.steps_table().latency_ms[0] == pytest.approx(8.0)
    assert spans(early, "copy") == [(0, 1), (3, 4)]
    assert spans(early, "device")[2] == (2, 5, 7, 0)  # ready at 4, compute free at 5: no stall
    assert early.steps_table().latency_ms[0] == pytest.approx(7.0)
    m = early.metrics()
    assert m["prefetch_loads"] == 1 and m["prefetch_bytes_h2d"] == SPEC.bytes_per_expert
    assert m["overlap"] == pytest.approx(0.5)  # the prefetch (1 of 2 ms of copies) ran under layer 1


def test_serial_copies_hold_the_compute_thread():
    """device=cpu with inline copies: the prefetch of the test above no longer hides under layer 1; it delays
    layer 1 and is layer 1's stall; host experts run after the layer's device experts."""
    import dataclasses

    b, p = make(hw=dataclasses.replace(HW, serial_copies=True))
    b.begin_step(0, 1)
    b.load((0, 0), 0, False)  # 0..1
    b.compute(0, [((0, 0), 0, 1)], [])  # 1..3, stall 1
    b.load((2, 0), 2, True)  # 3..4, holding the thread
    b.compute(1, [((1, 0), 1, 1)], [((1, 1), 1)])  # device 4..6 (stall 1: the prefetch); host 6..9 + ACT
    b.compute(2, [((2, 0), 2, 1)], [])  # ready long ago: no stall, (9 + ACT)..(11 + ACT)
    b.end_step()
    assert spans(p, "copy") == [(0, 1), (3, 4)]
    assert spans(p, "device") == [(0, 1, 3, 1), (1, 4, 6, 1), (2, round(9 + ACT, 9), round(11 + ACT, 9), 0)]
    assert spans(p, "host") == [(1, 6, round(9 + ACT, 9), 0)]
    assert p.steps_table().latency_ms[0] == pytest.approx(11 + ACT)
    assert b.inflight_bytes() == 0
    assert b.request_stats() == {"stall_free_requests": 2, "late_prefetches": 0}  # layers 1 and 2 waited for no copy of theirs


def test_copy_engine_serialises_copies_in_issue_order():
    b, p = make()
    b.begin_step(0, 1)
    b.load((0, 0), 0, False)
    b.load((0, 1), 1, False)
    b.compute(0, [((0, 0), 0, 1), ((0, 1), 1, 1)], [])
    b.end_step()
    assert spans(p, "copy") == [(0, 1), (1, 2)]
    assert spans(p, "device") == [(0, 2, 6, 2)]  # waits for the later copy; two experts of 2 ms
    assert p.metrics()["h2d_busy_ms"] == pytest.approx(2.0)
    assert p.metrics()["h2d_gbps"] == pytest.approx(3.0)


def test_a_queued_prefetch_delays_the_next_demand_miss():
    b, p = make()
    b.begin_step(0, 1)
    b.compute(0, [((0, 0), 0, 1)], [])  # hit: 0..2
    b.load((2, 3), 3, True)  # prefetch at 2: 2..3
    b.load((1, 0), 1, False)  # demand miss at 2, behind it: 3..4
    b.compute(1, [((1, 0), 1, 1)], [])
    b.end_step()
    assert spans(p, "copy") == [(2, 3), (3, 4)]
    assert spans(p, "device")[1] == (1, 4, 6, 2)


def test_token_counts_set_expert_time():
    b, p = make()
    b.begin_step(0, 8)
    b.compute(0, [((0, 0), 0, 8), ((0, 1), 1, 1)], [])  # 8 ms (compute-bound) + 2 ms (memory-bound)
    b.end_step()
    assert spans(p, "device") == [(0, 0, 10, 0)]
    assert p.metrics()["latency_ms"]["p50"] == pytest.approx(10.0)
    assert p.metrics()["tokens"] == 8


def test_host_experts_run_in_parallel_with_the_device():
    b, p = make()
    b.begin_step(0, 1)
    b.load((0, 0), 0, False)  # 0..1
    b.compute(0, [((0, 0), 0, 1)], [((0, 1), 1)])  # device 1..3; host 0..(3 + ACT) from the layer's input
    assert spans(p, "device") == [(0, 1, 3, 1)]
    assert spans(p, "host") == [(0, 0, round(3 + ACT, 9), 0)]
    # the layer ends with its later part: the host one
    b.compute(1, [], [((1, 2), 1), ((1, 3), 1)])  # no device experts; two host experts in a row
    assert spans(p, "device")[1] == (1, round(3 + ACT, 9), round(3 + ACT, 9), 0)
    assert spans(p, "host")[1] == (1, round(3 + ACT, 9), round(9 + 2 * ACT, 9), 0)  # one round trip, 2 x 3 ms
    b.end_step()
    assert p.steps_table().latency_ms[0] == pytest.approx(9 + 2 * ACT)
    assert p.metrics()["host_compute_ms"] == pytest.approx(9 + 2 * ACT)
    assert p.metrics()["stall_ms"] == pytest.approx(1.0)


def test_host_queue_waits_for_the_cpu():
    b, p = make()
    b.begin_step(0, 1)
    b.compute(0, [((0, 0), 0, 1)], [((0, 1), 1)])  # device 0..2, host 0..3+ACT
    assert p.steps_table().empty  # no step ended yet
    b.end_step()
    b.begin_step(1, 1)  # starts when the host part of layer 0 came back
    b.compute(0, [((0, 0), 0, 1)], [])
    b.end_step()
    st = p.steps_table()
    assert st.start_ms[1] == pytest.approx(3 + ACT) and st.latency_ms[1] == pytest.approx(2.0)


def test_shared_experts_add_to_every_layer_and_to_device_bytes():
    spec = ModelSpec("shared", layers=2, experts=4, top_k=1, hidden=1000, ffn=1000, bits_per_weight=8,
                     shared_experts=2, shared_ffn=2000)
    b, p = make(spec, n_slots=3)
    b.begin_step(0, 1)
    b.compute(0, [((0, 0), 0, 1)], [])  # routed 2 ms + 2 shared x (6e6 B / 1.5e6 B/ms = 4 ms)
    b.compute(1, [], [])  # shared experts only
    b.end_step()
    assert spans(p, "device") == [(0, 0, 10, 0), (1, 10, 18, 0)]
    assert b.device_bytes() == 3 * 3_000_000 + 2 * 2 * 6_000_000


def test_steps_follow_each_other_and_prefetch_across_steps():
    b, p = make()
    b.begin_step(0, 1)
    b.compute(0, [((0, 0), 0, 1)], [])  # 0..2
    b.load((0, 1), 1, True)  # after the last layer, for the next step: 2..3
    b.end_step()
    b.begin_step(1, 1)
    b.compute(0, [((0, 1), 1, 1)], [])  # starts at 2, waits until 3
    b.end_step()
    st = p.steps_table()
    assert st.start_ms.tolist() == [0.0, 2.0] and st.latency_ms.tolist() == [2.0, 3.0]
    assert st.loads.tolist() == [1, 0] and st.stall_ms.tolist() == [0.0, 1.0]
    m = p.metrics()
    assert m["wall_ms"] == pytest.approx(5.0) and m["tokens_per_s"] == pytest.approx(400.0)


def test_pageable_copies_are_slower():
    b, p = make(pinned=False)
    b.begin_step(0, 1)
    b.load((0, 0), 0, False)
    b.end_step()
    assert spans(p, "copy") == [(0, 2)]


def test_layers_table_counts_loads_and_bytes():
    b, p = make()
    for step in range(2):
        b.begin_step(step, 1)
        for layer in range(3):
            b.load((layer, step), layer, False)
            b.compute(layer, [((layer, step), layer, 1)], [])
        b.end_step()
    t = p.layers_table()
    assert t.layer.tolist() == [0, 1, 2]
    assert t.loads.tolist() == [2, 2, 2] and t.bytes_h2d.tolist() == [6_000_000] * 3
    assert t.compute_ms.tolist() == [4.0, 4.0, 4.0] and t.stall_ms.tolist() == [2.0, 2.0, 2.0]
