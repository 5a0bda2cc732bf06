"""Offload policies (strategies/fetch.py, host.py, cost.py, static_split.py) and the engine's host path:
decisions by hand, host computes counted, background loads, and the `offload=` option.

    python -m pytest tests/test_offload.py -q

Toy numbers (as tests/test_sim.py): one expert = 3e6 bytes, a copy takes 1 ms, a device expert max(2, n) ms
for n tokens. FAST_CPU computes a host expert in max(1, 2n) ms (plus the activations' round trip, ~1e-3 ms per
token), so one token is faster on the host (2 ms < 1 + 2) and four are faster fetched (8 ms > 1 + 4).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from moesim.__main__ import compose
from moesim.backends.sim import SimBackend
from moesim.cache import Cache
from moesim.engine import replay
from moesim.api import request_metrics, run
from moesim.errors import MoesimError
from moesim.hardware import Cost as CostModel, HardwareProfile
from moesim.profiler import Profiler
from moesim.trace import ModelSpec, from_arrays, save_trace
from strategies import Context, OffloadPolicy
from strategies.cost import Cost
from strategies.fetch import Fetch
from strategies.host import Host
from strategies.lru import LRU
from strategies.static_split import StaticSplit

SPEC = ModelSpec("toy", layers=3, experts=4, top_k=1, hidden=1000, ffn=1000, bits_per_weight=8)
HW = HardwareProfile("toy", h2d_pinned_gbps=3, h2d_pageable_gbps=1.5, copy_latency_us=0, device_mem_gbps=1.5,
                     device_tflops=0.006, host_mem_gbps=1, host_gflops=2, vram_gib=1, kernel_overhead_us=0,
                     host_overhead_us=0)
FAST_CPU = dataclasses.replace(HW, name="fast-cpu", host_mem_gbps=3, host_gflops=3)
SLOW = dataclasses.replace(HW, name="slow-link", h2d_pinned_gbps=0.6)  # a copy takes 5 ms


def cycle_trace(T: int = 8, spec: ModelSpec = SPEC):
    e = np.array([[[(t + l) % spec.experts] for l in range(spec.layers)] for t in range(T)])
    return from_arrays(spec, e, np.ones(e.shape))


def sim(trace, slots, offload, hw=HW, scope="per_layer", policy=LRU):
    cache = Cache(trace.spec, slots, scope, policy, trace)
    backend, profiler = SimBackend(hw), Profiler(trace.spec.layers)
    backend.setup(trace.spec, slots, profiler)
    counters = replay(trace, cache, backend, None, offload, CostModel(backend.hardware, trace.spec))
    m = request_metrics(counters, cache.prefetch, backend.request_stats(), trace.spec.bytes_per_expert)
    return counters, m, profiler, cache


def ctx(trace=None, capacity=6, scope="per_layer"):
    trace = trace or cycle_trace()
    return Context(trace, trace.spec, tuple(range(trace.spec.layers)), capacity, scope)


# ------------------------------------------------------------------------------------------------- host
def test_host_computes_every_miss_on_the_host():
    tr = cycle_trace()
    c, m, p, cache = sim(tr, 6, Host())
    assert c.host_computes == c.misses == c.requests == 24 and c.loads == 0 and c.hits == 0
    assert cache.resident_count() == 0  # nothing was ever loaded
    assert m["stall_free_rate"] == 0.0  # a host-computed miss is not a device request served stall-free
    pm = p.metrics()
    assert pm["bytes_h2d"] == 0 and pm["host_compute_ms"] == pytest.approx(24 * (3 + 2 * 2000 / 3e6))
    # the host timeline runs the layers one after another: 3 ms each plus the activations' round trip
    assert p.steps_table().latency_ms.sum() == pytest.approx(24 * (3 + 2 * 2000 / 3e6))


def test_fetch_is_plain_demand_loading():
    tr = cycle_trace()
    a = sim(tr, 6, Fetch())
    b = sim(tr, 6, None)
    assert a[0] == b[0]
    for x, y in zip(a[2].arrays(), b[2].arrays()):
        np.testing.assert_array_equal(x, y)


def test_device_set_popular_fetches_only_the_calibrated_hot_set():
    # calibration: at every layer expert 0 is requested most, then 1
    e = np.array([[[0], [0], [0]]] * 5 + [[[1], [1], [1]]] * 3 + [[[2], [2], [2]]])
    calib = from_arrays(SPEC, e, np.ones(e.shape))
    pol = Host(device_set="popular", calibrate_trace=calib)
    pol.setup(ctx(capacity=6))  # 2 slots per layer
    assert pol.device == {(l, x) for l in range(3) for x in (0, 1)}
    c, _, _, cache = sim(cycle_trace(T=8), 6, Host(device_set="popular", calibrate_trace=calib))
    # of the 24 requests, experts 0 and 1 of each layer are fetched once and then hit; the rest go to the host
    assert c.loads == 6 and c.evictions == 0 and c.hits == 12 - 6 and c.host_computes == 12
    g = Host(device_set="popular", calibrate_trace=calib)
    g.setup(ctx(capacity=4, scope="global"))  # a pool of 4: the 4 most requested keys over all layers
    assert len(g.device) == 4 and all(k[1] in (0, 1) for k in g.device)


def test_share_spreads_host_decisions_evenly_and_auto_balances_copy_and_cpu():
    pol = Host(share=0.5)
    pol.setup(ctx())
    cost = CostModel(HW, SPEC)
    assert [pol.on_miss((0, 0), 1, cost) for _ in range(6)] == ["fetch", "host"] * 3
    third = Host(share=1 / 3)
    third.setup(ctx())
    assert [third.on_miss((0, 0), 1, cost) for _ in range(6)].count("host") == 2
    auto = Host(share="auto")
    auto.setup(ctx())
    decisions = [auto.on_miss((0, 0), 1, cost) for _ in range(400)]
    f, h = cost.fetch_ms((0, 0)), cost.host_ms((0, 0), 1)  # 1 ms and ~3 ms: a quarter to the host
    assert decisions.count("host") == pytest.approx(400 * f / (f + h), abs=1)


def test_fill_first_fetches_until_each_partition_has_been_filled_once():
    pol = Host(fill_first=True)
    pol.setup(ctx(capacity=6))  # 2 per layer
    cost = CostModel(HW, SPEC)
    assert [pol.on_miss((1, e), 1, cost) for e in range(4)] == ["fetch", "fetch", "host", "host"]
    assert pol.on_miss((0, 0), 1, cost) == "fetch"  # layer 0's partition is not full yet
    c, _, _, _ = sim(cycle_trace(T=8), 6, Host(fill_first=True))
    assert c.loads == 6 and c.host_computes == 24 - 6 - c.hits


# ------------------------------------------------------------------------------------------------- cost
def test_cost_picks_the_host_for_few_tokens_and_the_copy_for_many():
    cost = CostModel(FAST_CPU, SPEC)
    assert cost.host_ms((0, 0), 1) < cost.fetch_ms((0, 0)) + cost.device_ms((0, 0), 1)
    assert cost.host_ms((0, 0), 4) > cost.fetch_ms((0, 0)) + cost.device_ms((0, 0), 4)
    pol = Cost()
    pol.setup(ctx())
    assert pol.on_miss((0, 0), 1, cost) == "host"
    assert pol.on_miss((0, 0), 4, cost) == "fetch"
    slow_cpu = Cost()
    slow_cpu.setup(ctx())
    assert slow_cpu.on_miss((0, 0), 1, CostModel(HW, SPEC)) == "fetch"  # 3 ms on the host > 1 + 2 ms fetched
    # through a replay: a step of one token computes its miss on the host, a step of four tokens sharing
    # one expert fetches it
    e = np.array([[[0], [1], [2]]] + [[[3], [3], [3]]] * 4)
    tr = from_arrays(SPEC, e, np.ones(e.shape), step=[0, 1, 1, 1, 1])
    c, _, p, _ = sim(tr, 6, Cost(), hw=FAST_CPU)
    assert c.host_computes == 3 and c.loads == 3
    assert p.metrics()["host_compute_ms"] > 0


# ----------------------------------------------------------------------------------------- static split
def test_static_split_keeps_chosen_layers_on_the_host():
    tr = cycle_trace(T=8)
    c, _, _, cache = sim(tr, 6, StaticSplit(host_layers=[1]))
    assert c.host_computes == 8  # every request of layer 1
    assert not any(k[0] == 1 for p in cache.partitions for k in p.resident)
    assert c.loads == 16  # layers 0 and 2 load on every miss (2 slots, 4 experts cycling)
    first = StaticSplit(host_layers=2)
    first.setup(ctx())
    assert first.host == {0, 1}
    c, _, _, cache = sim(tr, 6, StaticSplit(host_layers="all"))  # KTransformers: every routed expert on the host
    assert c.host_computes == c.requests == 24 and c.loads == 0


def test_static_split_auto_fits_the_device_layers_whole_in_a_global_pool():
    pol = StaticSplit()
    pol.setup(ctx(capacity=8, scope="global"))  # 8 slots hold 2 layers of 4 experts: the first one stays on host
    assert pol.host == {0}
    c, _, _, _ = sim(cycle_trace(T=8), 8, StaticSplit(), scope="global")
    assert c.loads == 8 and c.evictions == 0 and c.host_computes == 8  # after one load each, only hits
    with pytest.raises(MoesimError, match="scope=global"):
        StaticSplit().setup(ctx(capacity=6, scope="per_layer"))
    with pytest.raises(MoesimError, match="out of range"):
        StaticSplit(host_layers=[5]).setup(ctx())
    with pytest.raises(MoesimError, match="host_layers"):
        StaticSplit(host_layers="half")


# ------------------------------------------------------------------------------------ host and load
class HostAndLoad(OffloadPolicy):
    def __init__(self, max_inflight=None):
        self.max_inflight = max_inflight

    def on_miss(self, key, n_tokens, cost):
        return "host_and_load"


def test_host_and_load_computes_on_the_host_and_copies_for_later():
    tr = cycle_trace(T=8)
    c, m, p, cache = sim(tr, 4 * 3, HostAndLoad())  # room for every expert
    assert c.host_computes == 12 and c.loads == 12 and c.hits == 12  # tokens 4..7 find all 12 keys loaded
    assert p.metrics()["stall_ms"] == 0.0  # nobody waited for the background copies
    assert m["stall_free_rate"] == pytest.approx(12 / 24)


def test_host_and_load_respects_the_inflight_cap():
    tr = cycle_trace(T=8)
    free = sim(tr, 4 * 3, HostAndLoad(), hw=SLOW)[0]
    capped = sim(tr, 4 * 3, HostAndLoad(max_inflight="1 experts"), hw=SLOW)[0]
    # a background copy is skipped while one is queued: the key is computed on the host again next time
    assert capped.host_computes > free.host_computes and capped.hits < free.hits


def test_an_unknown_decision_is_refused():
    class Bad(OffloadPolicy):
        def on_miss(self, key, n_tokens, cost):
            return "gpu"

    with pytest.raises(MoesimError, match="'gpu'"):
        sim(cycle_trace(), 6, Bad())


@pytest.mark.parametrize("kwargs, word", [({"device_set": "hot"}, "device_set"), ({"share": 2}, "share"),
                                          ({"load": "yes"}, "load"), ({"max_inflight": "x"}, "max_inflight")])
def test_bad_options_are_refused(kwargs, word):
    with pytest.raises(MoesimError, match=word):
        Host(**kwargs)


# ------------------------------------------------------------------------------------------- config
def test_offload_option_replaces_the_strategys_offload(tmp_path):
    path = save_trace(cycle_trace(T=10), tmp_path / "c.moetrace.safetensors")
    cfg = compose("run", [f"trace={path}", "progress=false", "budget=6", "offload=host"])
    s = run(cfg, write=False).summary
    assert s["strategy"] == "lru+host" and s["host_computes"] == 30 and s["loads"] == 0
    cfg = compose("run", [f"trace={path}", "progress=false", "budget=6", "offload=host", "offload.share=0.5"])
    assert 0 < run(cfg, write=False).summary["loads"] < 30
    cfg = compose("run", [f"trace={path}", "progress=false", "budget=6", "offload=fetch"])
    assert run(cfg, write=False).summary["host_computes"] == 0
