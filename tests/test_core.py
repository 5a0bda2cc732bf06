"""The compiled core (moesim/core/) against its oracles: the Python driver (moesim/engine.py) with the
plain-Python parts of strategies/.

    python -m pytest tests/test_core.py -q

Every built-in cache policy, prefetcher and offload policy, both scopes, several budgets, reset_per_seq on
and off, on random traces with batched steps, several sequences and -1 entries: counters, prefetch outcomes,
served-request counts and every profiler event must be identical.
"""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import pytest

from moesim import core
from moesim.units import parse_budget
from moesim.engine import hit_counts as reference_hit_counts, scratch_slots
from moesim.errors import MoesimError
from moesim.trace import ModelSpec, from_arrays
from moesim.hardware import load_hardware

POLICY_PARAMS = {  # each policy with its defaults and with parameters that change its decisions
    "lru": [{}],
    "fifo": [{}],
    "lfu": [{}, {"decay": 0.5, "decay_every": 7}, {"decay": 0.01, "decay_every": 1}],  # the last rescales
    "lfru": [{}, {"decay": 0.7, "alpha": 2.0}, {"decay": 1.0, "alpha": 0.0}],
    "belady": [{}],
    "static": [{}, {"calibrate_tokens": 40, "lru_slots": 4}],
    "class_lru": [{}, {"half_life": 3.0, "classes": 3}],
    "activation_aware": [{}],
    "visit_count": [{}],  # refuses to evict its layer's and later layers' experts: those misses are streamed
    "page_cache": [{}],  # its ratio is 1 on these small models; tests/test_disk.py has a larger one
}
_MODELS = Path(tempfile.mkdtemp(prefix="moesim-test-models-"))


def random_model(L: int, E: int, H: int = 5, seed: int = 0) -> str:
    """A learned policy's model file with random tables and network for L layers x E experts (its decisions vary
    from key to key; the compiled core must make the same ones)."""
    from strategies.learned import N_FEATURES, save_model

    path = _MODELS / f"{L}x{E}-{H}-{seed}.policy.safetensors"
    if not path.exists():
        rng = np.random.default_rng(seed)
        t = {"mu": rng.normal(size=N_FEATURES), "sd": rng.uniform(0.5, 2, N_FEATURES),
             "w1": rng.normal(size=(H, N_FEATURES)), "b1": rng.normal(size=H), "w2": rng.normal(size=(H, H)),
             "b2": rng.normal(size=H), "w3": rng.normal(size=(1, H)), "b3": rng.normal(size=1),
             "pop": rng.random((L, E)), "P": rng.random((L, E, E)), "P2": rng.random((L, E, E))}
        save_model(path, t, {"model": "random"})
    return str(path)


POLICY_PARAMS["learned"] = [{"model": random_model(3, 8)}, {"model": random_model(3, 8, H=3, seed=1)}]


def random_trace(seed: int, T: int = 300, L: int = 3, E: int = 8, K: int = 2, max_batch: int = 3,
                 p_missing: float = 0.05, skew: float = 1.2, predicted: bool = False):
    """Tokens with Zipf-like skewed routing, steps of 1..max_batch tokens, a new sequence now and then,
    and some -1 entries (fewer than K experts chosen)."""
    rng = np.random.default_rng(seed)
    w = 1.0 / np.arange(1, E + 1) ** skew
    experts = np.empty((T, L, K), np.int16)
    for t in range(T):
        for l in range(L):
            perm = rng.permutation(E)
            pr = w[perm] / w[perm].sum()
            experts[t, l] = rng.choice(perm, size=K, replace=False, p=pr)
    experts[rng.random((T, L, K)) < p_missing] = -1
    sizes = rng.integers(1, max_batch + 1, size=T)
    step = np.repeat(np.arange(T), sizes)[:T]
    seq = np.cumsum(rng.random(T) < 0.03).astype(np.int32)
    seq = seq[np.searchsorted(step, step, side="left")]  # a step belongs to one sequence
    spec = ModelSpec("tiny", L, E, K, 16, 16)
    guess = None
    if predicted:  # a noisy guess of each layer's experts: the true ones, a third replaced at random
        guess = np.where(rng.random((T, L, K)) < 0.33, rng.integers(0, E, (T, L, K)), experts).astype(np.int16)
    return from_arrays(spec, experts, np.ones((T, L, K), np.float16), step=step, seq=seq, predicted=guess)


def reference_counters(trace, policy, params, slots, scope, reset):
    cls = core.reference_class(policy)
    return reference_hit_counts(trace, lambda: cls(**params), slots, scope, reset).to_dict()


def max_request(trace) -> int:
    req = core.encode(trace)
    return int(np.diff(req.ptr).max())


@pytest.mark.parametrize("policy", sorted(POLICY_PARAMS))
@pytest.mark.parametrize("scope", ["per_layer", "global"])
def test_core_equals_reference(policy, scope):
    for seed in range(3):
        trace = random_trace(seed, max_batch=1 if seed == 0 else 3)
        L, E = trace.n_layers, trace.spec.experts
        need = max_request(trace)  # every request must fit its partition (pinned while it computes)
        per_layer = [need, need + 1, E - 1, E] if scope == "per_layer" else None
        budgets = [n * L for n in per_layer] if per_layer else [need, need + 2, 2 * need + 1, L * E // 2, L * E]
        for params in POLICY_PARAMS[policy]:
            for slots in budgets:
                b = parse_budget(slots, trace.spec, scope)
                for reset in (False, True):
                    if reset and params.get("decay") == 0.01:
                        continue  # the reference LFU overflows math.exp after a late reset (reported)
                    want = reference_counters(trace, policy, params, slots, scope, reset)
                    got = core.hit_counts(trace, policy, params, b.slots, scope, reset)
                    assert got == want, (policy, params, scope, slots, reset, seed)


def test_core_equals_reference_long_trace():
    """A longer trace with more experts: evictions from deep inside the heaps and lists."""
    trace = random_trace(11, T=1500, L=2, E=24, K=4, max_batch=2, skew=0.8)
    need = max_request(trace)
    for policy, plist in POLICY_PARAMS.items():
        if policy == "learned":  # a model for this trace's 2 layers x 24 experts
            plist = [{"model": random_model(2, 24, H=6, seed=2)}]
        for params in plist:
            for scope, slots in (("per_layer", 2 * max(need, 9)), ("global", 2 * need + 5)):
                want = reference_counters(trace, policy, params, slots, scope, False)
                got = core.hit_counts(trace, policy, params, slots, scope, False)
                assert got == want, (policy, params, scope, slots)
                # visit_count never evicts the running layer's experts: a per-layer pool evicts nothing
                assert got["evictions"] > 0 or (policy, scope) == ("visit_count", "per_layer")


def test_encode_matches_engine_step_requests():
    from moesim.engine import step_requests

    trace = random_trace(5, max_batch=4)
    req = core.encode(trace)
    L = trace.n_layers
    for s, _, n_tokens, layers in step_requests(trace):
        assert req.step_tokens[s] == n_tokens
        for layer, (ids, counts) in enumerate(layers):
            a, b = req.ptr[s * L + layer], req.ptr[s * L + layer + 1]
            assert req.ids[a:b].tolist() == list(ids)
            assert req.token_counts()[a:b].tolist() == (list(counts) if counts is not None else [1] * len(ids))


def test_key_positions_are_beladys_request_positions():
    from moesim.core.parts import _key_positions
    from strategies.belady import request_positions

    for trace in (random_trace(6, max_batch=4), random_trace(7, max_batch=1, p_missing=0.0)):
        got = _key_positions(trace)
        want = request_positions(trace, tuple(range(trace.n_layers)))
        assert got[1].tolist() == want[1].tolist()
        assert got[0].tolist() == want[0].tolist()
        assert _key_positions(trace) is got  # kept on the trace


def test_wide_requests_are_served_in_waves():
    """Batched steps whose layer needs more experts than its slots: the engine serves them in waves of at
    most that many, hits first; so does the core (counters and sim events)."""
    trace = random_trace(3, max_batch=6, p_missing=0.0)
    assert max_request(trace) > 2 * trace.top_k
    K, L = trace.top_k, trace.n_layers
    for policy, plist in POLICY_PARAMS.items():
        for scope, slots in (("per_layer", K * L), ("per_layer", (K + 1) * L), ("global", K), ("global", K + 3)):
            params = plist[min(1, len(plist) - 1)]
            want = reference_counters(trace, policy, params, slots, scope, True)
            assert core.hit_counts(trace, policy, params, slots, scope, True) == want, (policy, scope, slots)
            if slots in (K * L, K):
                ref, prof, _, stats, _ = reference_sim(trace, policy, params, slots, scope, False, "h200")
                got = core_sim(trace, policy, params, slots, scope, "h200", False)
                assert got.counters == ref and got.request_stats == stats
                for x, y in zip(got.profiler.arrays(), prof.arrays()):
                    np.testing.assert_array_equal(x, y)


def test_bad_params_refused_like_the_reference():
    trace = random_trace(1)
    with pytest.raises(MoesimError, match="decay"):
        core.hit_counts(trace, "lfu", {"decay": 2.0}, 12, "per_layer")
    with pytest.raises(MoesimError, match="unknown compiled policy"):
        core.hit_counts(trace, "arc", {}, 12, "per_layer")


def _cpu_profile():
    """A profile as `calibrate` writes it on device=cpu: an FFN and a copy table, the replay's own costs."""
    import dataclasses

    from moesim.hardware import PRESETS

    return dataclasses.replace(
        PRESETS["rtx-4090"], name="cpu-like", layer_overhead_us=31.5, expert_overhead_us=4.25,
        load_overhead_us=22.0, writeback_us_per_mib=7.5, serial_copies=True,
        copy_table=[{"pinned": True, "bytes": 2**10, "ms": 0.01}, {"pinned": True, "bytes": 2**30, "ms": 90.0}],
        ffn_table=[{"where": "device", "tokens": t, "expert_bytes": 2**12, "ms": 0.1 * t ** 0.9} for t in (1, 2, 4)])


CPU_PROFILE = _cpu_profile()


def reference_sim(trace, policy, params, slots, scope, reset, hardware, prefetcher=None, offload=None, dense=None):
    """The Python driver with the sim backend: (counters, profiler, device bytes, request stats, prefetch)."""
    from moesim.backends.sim import SimBackend
    from moesim.cache import Cache
    from moesim.engine import replay
    from moesim.hardware import Cost
    from moesim.profiler import Profiler

    cls = core.reference_class(policy)
    cache = Cache(trace.spec, slots, scope, lambda: cls(**params), trace)
    backend, profiler = SimBackend(hardware), Profiler(trace.n_layers)
    backend.dense = dense
    off = offload() if offload else None
    backend.setup(trace.spec, slots + scratch_slots(trace.spec, cache.partitions[0].policy, off), profiler)
    counters = replay(trace, cache, backend, prefetcher() if prefetcher else None, off,
                      Cost(backend.hardware, trace.spec), reset_per_seq=reset)
    pf = (cache.prefetch.used, cache.prefetch.wasted, len(cache.prefetch.unused))
    return counters.to_dict(), profiler, backend.device_bytes(), backend.request_stats(), pf


def core_sim(trace, policy, params, slots, scope, hardware, reset, prefetcher=None, offload=None, dense=None):
    cls = core.reference_class(policy)
    return core.simulate(trace, trace.spec, slots, scope, lambda: cls(**params), prefetcher() if prefetcher else None,
                         offload() if offload else None, hardware, reset, dense=dense)


@pytest.mark.parametrize("policy", sorted(POLICY_PARAMS))
def test_replay_sim_equals_engine_with_sim_backend(policy):
    """Same counters and the same events (copies, layer computes, steps) as the engine + SimBackend: per-step
    latencies and stalls, metrics and tables then agree (equal floats: the same operations in the same order)."""
    for seed, scope, reset in ((0, "per_layer", False), (1, "global", True), (2, "per_layer", True)):
        trace = random_trace(seed, max_batch=1 + seed)
        need = max_request(trace)
        slots = (need + 1) * trace.n_layers if scope == "per_layer" else 2 * need + 1
        for params in POLICY_PARAMS[policy][:2]:
            for hw in ("h200", "rtx-4090", CPU_PROFILE):
                want, prof, dev_bytes, stats, _ = reference_sim(trace, policy, params, slots, scope, reset, hw)
                got = core_sim(trace, policy, params, slots, scope, hw, reset)
                assert got.counters == want
                assert got.device_bytes == dev_bytes
                assert got.request_stats == stats
                for a, b in zip(got.profiler.arrays(), prof.arrays()):
                    assert a.shape == b.shape
                    np.testing.assert_array_equal(a, b)
                assert got.profiler.metrics() == prof.metrics()
                assert got.profiler.steps_table().equals(prof.steps_table())
                assert got.profiler.layers_table().equals(prof.layers_table())


@pytest.mark.parametrize("params", POLICY_PARAMS["lfru"])
def test_lfru_global_pool_equals_reference(params):
    """LFRU in a global pool of many slots, where its victim is searched on the front (core.py: keys with a
    smaller log f than every older one) and ties are frequent (decay 1, alpha 0: log f = log count): the
    same counters and events as the reference, with and without resets, wide requests served in waves."""
    trace = random_trace(12, T=600, L=4, E=16, K=3, max_batch=3, skew=0.9)
    need = max_request(trace)
    for slots, reset in ((need - 2, False), (need + 3, True), (2 * need, False), (40, True)):
        want, prof, _, stats, _ = reference_sim(trace, "lfru", params, slots, "global", reset, "h200")
        got = core_sim(trace, "lfru", params, slots, "global", "h200", reset)
        assert got.counters == want and got.request_stats == stats, (params, slots, reset)
        assert want["evictions"] > 0
        for a, b in zip(got.profiler.arrays(), prof.arrays()):
            np.testing.assert_array_equal(a, b)
        assert core.hit_counts(trace, "lfru", params, slots, "global", reset) == want


def test_replay_sim_with_shared_experts_and_batches():
    """A model with shared experts (their time depends on the step's tokens) and batched steps."""
    spec = ModelSpec("tiny-shared", 3, 8, 2, 64, 32, shared_experts=2, shared_ffn=48)
    base = random_trace(4, max_batch=5)
    trace = from_arrays(spec, base.experts, base.weights, step=base.step, seq=base.seq)
    slots = 3 * max_request(trace) + 3
    want, prof, _, _, _ = reference_sim(trace, "lru", {}, slots, "global", False, "h200")
    got = core_sim(trace, "lru", {}, slots, "global", "h200", False)
    assert got.counters == want
    for a, b in zip(got.profiler.arrays(), prof.arrays()):
        np.testing.assert_array_equal(a, b)


def test_hit_flags_mark_the_hits():
    trace = random_trace(8, max_batch=2)
    slots = 2 * max_request(trace) + 1
    for policy in ("lru", "belady"):
        flags = core.hit_flags(trace, policy, {}, slots, "global")
        assert flags.shape == core.encode(trace).ids.shape
        assert int(flags.sum()) == core.hit_counts(trace, policy, {}, slots, "global")["hits"]
    # the first request of every key is a miss
    req = core.encode(trace)
    layer = np.repeat(np.arange(len(req.ptr) - 1) % trace.n_layers, np.diff(req.ptr))
    _, first = np.unique(layer * 100 + req.ids, return_index=True)
    assert not flags[first].any()


def test_lfu_strong_decay_after_late_resets_equals_the_reference():
    """decay=0.01 per position with resets: LFU ages from each reset, so no power overflows (it did once)."""
    trace = random_trace(0, T=300, L=3)
    params = {"decay": 0.01, "decay_every": 1}
    ref = reference_counters(trace, "lfu", params, 12, "global", True)
    assert core.hit_counts(trace, "lfu", params, 12, "global", True) == ref


def test_lfu_decay_with_reset_per_seq_stays_finite_and_equal():
    """After a reset LFU ages from the reset on: 6000 steps of decay 0.5 per step would overflow otherwise."""
    from strategies.lfu import LFU

    spec = ModelSpec("toy", layers=2, experts=8, top_k=2, hidden=4, ffn=4)
    rng = np.random.default_rng(0)
    e = np.array([[rng.permutation(8)[:2] for _ in range(2)] for _ in range(6000)])
    tr = from_arrays(spec, e, np.ones(e.shape) / 2, seq=np.repeat(np.arange(6), 1000))
    for scope, budget in (("per_layer", 8), ("global", 5)):
        ref = reference_hit_counts(tr, lambda: LFU(decay=0.5, decay_every=2), budget, scope, reset_per_seq=True)
        got = core.hit_counts(tr, "lfu", {"decay": 0.5, "decay_every": 2}, budget, scope, True)
        assert (got["hits"], got["evictions"]) == (ref.hits, ref.evictions)


def test_a_slow_first_call_says_it_is_compiling(capsys):
    import time
    from types import SimpleNamespace

    cold, warm = SimpleNamespace(signatures=[]), SimpleNamespace(signatures=["(int64,)"])
    with core.compile_notice(cold, after_s=0.05):
        time.sleep(0.3)
    assert "compiling the replay loop" in capsys.readouterr().err
    with core.compile_notice(warm, after_s=0.0):
        time.sleep(0.1)
    with core.compile_notice(cold, after_s=5.0):  # returned in time: nothing said
        pass
    time.sleep(0.1)
    assert capsys.readouterr().err == ""


def _parts():
    """Every built-in prefetcher and offload policy with parameters that change their decisions."""
    from strategies.activation_match import ActivationMatch
    from strategies.cost import Cost
    from strategies.fetch import Fetch
    from strategies.fiddler import Fiddler
    from strategies.history import History
    from strategies.host import Host
    from strategies.oracle import Oracle
    from strategies.recorded import Recorded
    from strategies.static_split import StaticSplit
    from strategies.transition import Transition
    from strategies.whole_layer import WholeLayer

    prefetchers = {
        "oracle": lambda: Oracle(),
        "oracle-4-capped": lambda: Oracle(lookahead=4, per_layer=2, max_inflight="1 experts"),
        "recorded": lambda: Recorded(),
        "transition": lambda: Transition(lookahead=2, calibrate_fraction=0.3),
        "history": lambda: History(per_layer=3, max_inflight=3 * 16 * 16 * 3 * 2),
        "whole_layer": lambda: WholeLayer(),
        "activation_match": lambda: ActivationMatch(calibrate_fraction=0.3),  # a flat table over later layers
        "activation_match-capped": lambda: ActivationMatch(per_layer=5, max_inflight="1 experts"),
    }
    offloads = {
        "fetch": lambda: Fetch(),
        "host-half": lambda: Host(share=0.5),
        "host-auto-fill-load": lambda: Host(share="auto", fill_first=True, load=True, max_inflight="2 experts"),
        "host-popular": lambda: Host(device_set="popular", share=0.7, calibrate_fraction=0.3),
        "cost": lambda: Cost(),
        "static_split": lambda: StaticSplit(host_layers=[1]),
        "host-inserts-per-layer": lambda: Host(load=True, loads_per_layer=1),  # no cap on queued copies
        "static_split-stream": lambda: StaticSplit(host_layers=[0, 1], min_batch=3),  # steps of 3+ tokens stream
        "fiddler": lambda: Fiddler(latency_cpu=7, latency_gpu=14, calibrate_fraction=0.3),  # 2+ tokens stream
    }
    return prefetchers, offloads


def _assert_same(got, want):
    counters, prof, dev_bytes, stats, pf = want
    assert got.counters == counters
    assert tuple(got.prefetch) == pf
    assert got.request_stats == stats
    assert got.device_bytes == dev_bytes
    for a, b in zip(got.profiler.arrays(), prof.arrays()):
        assert a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def _host_profile():
    """rtx-4090 with slow copies, so that the cost rule sends misses of few tokens to the host."""
    import dataclasses

    from moesim.hardware import PRESETS

    base = PRESETS["rtx-4090"]
    return dataclasses.replace(base, name="slow-copies", h2d_pinned_gbps=1e-4, h2d_pageable_gbps=1e-4)


@pytest.mark.parametrize("policy", sorted(POLICY_PARAMS))
def test_prefetch_and_offload_equal_the_python_driver(policy):
    """Every cache policy with every built-in prefetcher and with every built-in offload policy, both scopes,
    with resets and batched steps: the same decisions and the same events as the Python driver."""
    prefetchers, offloads = _parts()
    params = POLICY_PARAMS[policy][-1]
    for seed, scope, reset in ((0, "per_layer", False), (1, "global", True)):
        trace = random_trace(seed, max_batch=1 + 2 * seed, predicted=True)
        need = max_request(trace)
        slots = (need + 1) * trace.n_layers if scope == "per_layer" else 2 * need + 1
        for name, make in prefetchers.items():
            for hw in ("rtx-4090", CPU_PROFILE):
                want = reference_sim(trace, policy, params, slots, scope, reset, hw, prefetcher=make)
                # visit_count in a per-layer pool evicts nothing for a later layer: prefetches take free slots only
                assert want[0]["prefetch_loads"] > 0 or (policy, scope) == ("visit_count", "per_layer"), name
                _assert_same(core_sim(trace, policy, params, slots, scope, hw, reset, prefetcher=make), want)
        for name, make in offloads.items():
            for hw in (_host_profile(), CPU_PROFILE):
                want = reference_sim(trace, policy, params, slots, scope, reset, hw, offload=make)
                if name != "fetch" and hw is not CPU_PROFILE:
                    assert want[0]["host_computes"] > 0, name
                _assert_same(core_sim(trace, policy, params, slots, scope, hw, reset, offload=make), want)
        both = reference_sim(trace, policy, params, slots, scope, reset, "h200", prefetchers["transition"],
                             offloads["host-auto-fill-load"])
        _assert_same(core_sim(trace, policy, params, slots, scope, "h200", reset, prefetchers["transition"],
                              offloads["host-auto-fill-load"]), both)


def test_every_parameter_of_a_built_in_part_reaches_the_core():
    """A knob added to a built-in Python part and not to moesim/core/parts.py is refused, never ignored."""
    import importlib

    from moesim.core import parts

    for table, where in ((parts.CACHE, "strategy.cache"), (parts.PREFETCH, "prefetch"), (parts.OFFLOAD, "offload")):
        for path in table:
            module, name = path.rsplit(".", 1)
            cls = getattr(importlib.import_module(module), name)
            parts.check_params(cls, table, where)  # raises if a constructor parameter is not read

    from strategies.lfu import LFU

    class Knob(LFU):
        def __init__(self, decay: float = 1.0, decay_every=None, new_knob: int = 3):
            super().__init__(decay, decay_every)

    table = {parts.class_path(Knob): ("lfu", ("decay", "decay_every"))}
    with pytest.raises(MoesimError, match="new_knob"):
        parts.check_params(Knob, table, "strategy.cache")


def test_user_parts_are_not_compiled():
    from strategies.lru import LRU
    from strategies.oracle import Oracle

    class MyLRU(LRU):
        pass

    assert core.uncovered(LRU(), Oracle(), None) is None
    assert "MyLRU" in core.uncovered(MyLRU(), None, None)
    assert "prefetch" in core.uncovered(LRU(), type("MyOracle", (Oracle,), {})(), None)


def test_a_learned_prefetch_table_is_built_once_for_runs_that_share_it(monkeypatch):
    """Runs that differ only in budget or hardware reuse the table; another trace or parameter builds anew."""
    from strategies.transition import Transition

    built = []
    learn = Transition.learn
    monkeypatch.setattr(Transition, "learn", lambda self, calib: (built.append(1), learn(self, calib))[1])
    a, b = random_trace(0), random_trace(1)
    runs = [(a, 12, "h200", 0.25), (a, 15, "rtx-4090", 0.25), (a, 12, "h200", 0.5), (b, 12, "h200", 0.5)]
    for trace, slots, hw, w in runs:
        got = core_sim(trace, "lru", {}, slots, "global", hw, False, lambda: Transition(reuse_weight=w))
        want = reference_sim(trace, "lru", {}, slots, "global", False, hw, lambda: Transition(reuse_weight=w))
        assert got.counters == want[0]
    assert len(built) == 3 + 4  # the compiled runs: a/0.25 once, a/0.5, b/0.5; the 4 reference runs each


class Recorder:
    """A backend that logs every call the drivers make (and keeps SimBackend's clocks behind them)."""

    name = "recorder"

    def __init__(self):
        from moesim.backends.sim import SimBackend

        self.sim, self.calls = SimBackend("rtx-4090"), []

    def setup(self, spec, n_slots, profiler):
        self.sim.setup(spec, n_slots, profiler)

    def begin_step(self, step, n_tokens):
        self.calls.append(("begin", step, n_tokens))
        self.sim.begin_step(step, n_tokens)

    def route(self, experts, weights):
        self.calls.append(("route", np.asarray(experts).tobytes(), np.asarray(weights).tobytes()))

    def load(self, key, slot, prefetch):
        self.calls.append(("load", key, slot, prefetch))
        self.sim.load(key, slot, prefetch)

    def compute(self, layer, device, host):
        self.calls.append(("compute", layer, list(device), list(host)))
        self.sim.compute(layer, device, host)

    def end_step(self):
        self.calls.append(("end",))
        self.sim.end_step()

    def finish(self):
        self.calls.append(("finish",))

    def device_bytes(self):
        return self.sim.device_bytes()


@pytest.mark.parametrize("policy", sorted(POLICY_PARAMS))
def test_a_recorded_script_makes_the_python_drivers_backend_calls(policy):
    """core.simulate(record=True) + engine.play tell a backend exactly what moesim.engine.replay tells it, call
    for call, with every built-in prefetcher and offload policy (without max_inflight caps: those decisions read
    the backend's own clock), both scopes, resets and waves: how the torch backend runs built-in strategies."""
    from moesim.engine import drive, play
    from moesim.hardware import Cost, load_hardware
    from moesim.profiler import Profiler

    prefetchers, offloads = _parts()
    parts = [(None, None)] + [(p, None) for n, p in prefetchers.items() if "capped" not in n and "history" != n] + [
        (None, o) for n, o in offloads.items() if "load" not in n] + [(prefetchers["transition"], offloads["cost"])]
    params = POLICY_PARAMS[policy][-1]
    cls = core.reference_class(policy)
    hw = _host_profile()
    for seed, scope, reset in ((0, "per_layer", False), (1, "global", True), (3, "per_layer", True)):
        trace = random_trace(seed, max_batch=1 + seed, predicted=True)
        need = max_request(trace)
        slots = trace.top_k * trace.n_layers if scope == "per_layer" else 2 * need + 1
        for make_pf, make_off in parts:
            python = Recorder()
            _, _, want = drive(trace, trace.spec, slots, scope, lambda: cls(**params), python,
                               make_pf() if make_pf else None, make_off() if make_off else None,
                               Cost(load_hardware(hw), trace.spec), reset_per_seq=reset)
            sim = core.simulate(trace, trace.spec, slots, scope, lambda: cls(**params), make_pf() if make_pf else None,
                                make_off() if make_off else None, hw, reset, record=True)
            played = Recorder()
            off = make_off() if make_off else None
            played.setup(trace.spec, slots + scratch_slots(trace.spec, cls(**params), off), Profiler(trace.n_layers))
            play(trace, played, sim.script)
            assert sim.counters == want.to_dict()
            assert played.calls == python.calls, (policy, scope, make_pf, make_off)


def test_whole_model_dense_times_equal_the_python_driver():
    """A whole-model spec (attention with a sliding window, a dense layer, an LM head): the dense part's times
    enter both drivers at the same points (each layer's attention before its lookups), with prefetch, offload
    and waves; the dense part adds to every step, less where copies in flight hide under it."""
    import dataclasses

    from moesim.whole import contexts, dense_times

    prefetchers, offloads = _parts()
    base = random_trace(5, max_batch=4, predicted=True)
    spec = dataclasses.replace(base.spec, name="tiny-whole", attention="gqa", heads=4, kv_heads=2, head_dim=16,
                               vocab=500, dense_layers=1, dense_ffn=96, sliding_window=8, sliding_layers=2)
    trace = from_arrays(spec, base.experts, base.weights, step=base.step, seq=base.seq, phase=base.phase,
                        predicted=base.predicted)
    need = max_request(trace)
    for hw in ("rtx-4090", _host_profile()):
        dense = dense_times(spec, load_hardware(hw), contexts(trace, spec.sliding_window))
        assert (dense.attention > 0).all() and (dense.tail > 0).all() and dense.cls.tolist() == [0, 1, 0]  # blocks 0 (dense) and 2 slide
        for slots, pf, off in ((need - 1, None, None), (2 * need, prefetchers["transition"], None),
                               (2 * need, None, offloads["cost"])):
            want = reference_sim(trace, "lru", {}, slots, "global", False, hw, pf, off, dense=dense)
            _assert_same(core_sim(trace, "lru", {}, slots, "global", hw, False, pf, off, dense=dense), want)
            plain = core_sim(trace, "lru", {}, slots, "global", hw, False, pf, off)
            assert got_counters_equal(plain, want)
            lat = lambda prof: prof.arrays()[0][:, 3] - prof.arrays()[0][:, 2]  # noqa: E731
            assert (lat(want[1]) > dense.total_ms).all()
            # serial time added, of which copies in flight may hide under the attention: never more than it
            assert lat(plain.profiler).sum() < lat(want[1]).sum() <= lat(plain.profiler).sum() + dense.total_ms.sum() + 1e-9


def got_counters_equal(run, want) -> bool:
    """The dense part changes times, never decisions (without a clock-reading cap)."""
    return run.counters == want[0]


SUMS_ONLY = ("compute_busy_ms", "overlap", "belady_hit_rate")  # need every interval (the bound: plan has its own)


def _same(a, b) -> bool:
    """Equal, floats within rounding (sums in another order; the copy engine's busy time as loads x one copy)."""
    if isinstance(a, float) and isinstance(b, float):
        return b == pytest.approx(a, rel=1e-9, abs=1e-9)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("strategy,budget", [("lru", "25%"), ("class_lru_host", "25%"), ("moe_infinity", "25%"),
                                             ("fiddler", "25%"), ("llama_cpp_ncmoe", "50%"),
                                             ("llama_cpp_fork_moe_cache", "12.5%")])
def test_sums_instead_of_events_give_the_same_summary(strategy, budget):
    """replay_config(events=False), the planner's replays: the loop keeps sums, not a row per copy and compute;
    the summary is the full run's (steps, counters, stall, bytes, split), less what needs every interval."""
    from moesim.api import compose_run, load_trace, replay_config

    tr = load_trace("gpt-oss-like").slice_tokens(0, 600)
    cfg = compose_run("gpt-oss-like", strategy, budget, "rtx-4090")
    full = replay_config(cfg, tr).summary
    light = replay_config(cfg, tr, events=False)
    sums = light.summary
    assert full["loads"] > 0 and full["stall_ms"] + full["host_compute_ms"] > 0  # something to compare
    assert full.keys() == sums.keys()
    for key, value in full.items():
        if key in SUMS_ONLY:
            assert sums[key] is None, key
        else:
            assert _same(value, sums[key]), (key, value, sums[key])
    with pytest.raises(MoesimError, match="kept sums"):
        light.steps  # noqa: B018  the per-step table needs the events


@pytest.mark.parametrize("strategy", ["lru", "moe_infinity", "fiddler", "llama_cpp_ncmoe", "class_lru_host"])
def test_the_compiled_loop_reads_no_uninitialised_memory(strategy):
    """The same counters and step times with malloc's free blocks full of NaN (issue 17: every np.empty of the
    compiled code is written before it is read)."""
    from conftest import fill_malloc_with_nan
    from moesim.api import compose_run, load_trace, replay_config

    tr = load_trace("gpt-oss-like").slice_tokens(0, 300)
    cfg = compose_run("gpt-oss-like", strategy, "25%", "rtx-4090")
    clean = replay_config(cfg, tr)
    fill_malloc_with_nan()
    dirty = replay_config(cfg, load_trace("gpt-oss-like").slice_tokens(0, 300))  # encoded again, after the fill
    assert dirty.summary["hits"] == clean.summary["hits"] and dirty.summary["loads"] == clean.summary["loads"]
    np.testing.assert_array_equal(dirty.steps["latency_ms"], clean.steps["latency_ms"])


@pytest.mark.parametrize("host_policy", sorted(set(POLICY_PARAMS) - {"learned"}))  # refused there (test_disk)
def test_the_disk_tier_equals_the_python_driver(host_policy):
    """The disk tier (moesim/disk.py) in the compiled core: every cache policy as the host cache's, under device
    caches with a prefetcher, a host-computing and a streaming offload policy: the same host cache decisions,
    disk reads and events (copies waiting for reads, host computes waiting for reads) as the Python driver."""
    from moesim.backends.sim import SimBackend
    from moesim.cache import Cache
    from moesim.disk import DiskTier, Storage
    from moesim.engine import replay
    from moesim.hardware import Cost
    from moesim.profiler import Profiler

    prefetchers, offloads = _parts()
    storages = (Storage("toy", read_gbps=0.002, latency_us=30.0),  # a read takes several copies' time
                Storage("toy-q3", read_gbps=0.004, latency_us=300.0, queue_depth=3))  # latencies overlap
    host_params = POLICY_PARAMS[host_policy][-1]
    hcls = core.reference_class(host_policy)
    make_host = lambda: hcls(**host_params)  # noqa: E731
    reads = 0
    for seed, scope, reset in ((0, "per_layer", False), (1, "global", True)):
        trace = random_trace(seed, max_batch=1 + 2 * seed, predicted=True)
        storage = storages[seed]
        if seed == 1:  # an expert in three requests, the last shorter (the mmap reader's read-around windows)
            storage = dataclasses.replace(storage, request_bytes=trace.spec.bytes_per_expert // 3 + 1)
        need = max_request(trace)
        slots = (need + 1) * trace.n_layers if scope == "per_layer" else 2 * need + 1
        host_slots = max(2 * need + 1, trace.spec.total_experts // 2)
        for device, pf, off, hw in (("lru", None, None, "rtx-4090"), ("lfu", "oracle", None, "h200"),
                                    ("lru", "transition", "host-auto-fill-load", _host_profile()),
                                    ("class_lru", None, "fiddler", CPU_PROFILE), ("belady", "history", None, "h200")):
            cls = core.reference_class(device)
            make = lambda: cls(**POLICY_PARAMS[device][-1])  # noqa: E731
            disk = DiskTier(trace.spec, host_slots, make_host, storage, trace)
            cache = Cache(trace.spec, slots, scope, make, trace)
            offload = offloads[off]() if off else None
            backend, profiler = SimBackend(hw), Profiler(trace.n_layers)
            backend.setup(trace.spec, slots + scratch_slots(trace.spec, cache.partitions[0].policy, offload), profiler)
            backend.setup_disk(storage)
            counters = replay(trace, cache, backend, prefetchers[pf]() if pf else None, offload,
                              Cost(backend.hardware, trace.spec), reset_per_seq=reset, disk=disk)
            want = (counters.to_dict(), profiler, backend.device_bytes(), backend.request_stats(),
                    (cache.prefetch.used, cache.prefetch.wasted, len(cache.prefetch.unused)))
            got = core.simulate(trace, trace.spec, slots, scope, make, prefetchers[pf]() if pf else None,
                                offloads[off]() if off else None, hw, reset,
                                disk=DiskTier(trace.spec, host_slots, make_host, storage, trace))
            _assert_same(got, want)
            assert got.disk == disk.counts(backend.disk_busy_ms), (device, pf, off)
            reads += got.disk["reads"]
            assert 0 < got.disk["hits"] < got.disk["requests"], (device, pf, off)
    assert reads > 0


def some_dense(trace, on: bool = True):
    """A dense part of random ms per step and layer class (moesim.whole.DenseTimes), or none."""
    from moesim.whole import DenseTimes

    if not on:
        return None
    rng = np.random.default_rng(5)
    S, L = trace.n_steps, trace.n_layers
    return DenseTimes(rng.uniform(0.01, 0.3, (S, 2)), rng.integers(0, 2, L), rng.uniform(0, 0.5, S),
                      rng.uniform(0, 0.5, S))


@pytest.mark.parametrize("policy", ["lru", "fifo", "lfu", "lfru", "class_lru", "activation_aware", "static", "belady",
                                    "visit_count", "page_cache"])
@pytest.mark.parametrize("serial", [False, True])
def test_decided_hits_are_timed_as_the_cache_state_does(policy, serial, monkeypatch):
    """simulate(events=False) of a demand cache: its hits decided first (by its slot kernel, moesim/core/slots.py,
    where it has one: per layer, and LRU's and visit_count's in one pool too; page_cache by the cache-only replay) and
    timed by loop.time_hits. The same counters, steps, sums and served requests as run_sim's replay on the cache
    state, bit for bit, with copies beside the compute or holding it (serial), resets per sequence or none,
    steps of one token and of several, with a dense part or none; a request wider than a partition takes the
    cache state."""
    from moesim.api import load_trace
    from moesim.core import encode, slots

    calls = []
    find = slots.slot_kernel
    monkeypatch.setattr(core, "slot_kernel", lambda *a: (lambda k: calls.append(k is not None) or k)(find(*a)))
    hw = dataclasses.replace(load_hardware("rtx-4090"), serial_copies=serial)
    cls = core.reference_class(policy)
    decode = load_trace("gpt-oss-like").slice_tokens(0, 500)
    batch = load_trace("gpt-oss-like-batch8").slice_tokens(0, 3000)
    L = decode.n_layers
    cases = [(decode, 6 * L, "per_layer"), (batch, 31 * L, "per_layer"), (batch, 12 * L, "per_layer")]
    if policy in ("lru", "visit_count"):
        cases += [(decode, 16 * L, "global"), (batch, 20 * L, "global"), (batch, 25 * L, "global")]
    for tr, n_slots, scope in cases:
        cap = n_slots // L if scope == "per_layer" else n_slots
        for reset in (False, True):
            runs = []
            for decide in (True, False):
                monkeypatch.setattr(core, "DECIDE", decide)
                n = len(calls)
                r = core.simulate(tr, tr.spec, n_slots, scope, cls, hardware=hw, reset_per_seq=reset, events=False,
                                  dense=some_dense(tr, reset))
                runs.append((r, calls[n:]))
            (fast, took), (slow, none) = runs
            assert none == [] and took == ([policy != "page_cache"] if encode(tr).width <= cap else [])
            assert fast.counters == slow.counters and fast.request_stats == slow.request_stats
            assert fast.counters["loads"] > 0 and fast.counters["hits"] > 0
            np.testing.assert_array_equal(fast.profiler.arrays()[0], slow.profiler.arrays()[0])
            assert fast.profiler.metrics() == slow.profiler.metrics()


@pytest.mark.parametrize("policy", ["lru", "class_lru"])
def test_offload_decided_without_the_clocks_is_timed_as_the_cache_state_does(policy, monkeypatch):
    """simulate(events=False) with an offload policy that decides without the clocks (every built-in one but a cap
    on the bytes in flight): a slot kernel decides what becomes of each element (fetched, streamed, on the host,
    loaded behind its host compute) and loop.time_hits times it. The same counters, steps, sums and served
    requests as run_sim's replay on the cache state, bit for bit, for LRU per layer and in one pool and class_lru
    per layer, with batched steps, resets, a dense part and profiles where the host computes; a cap on the bytes
    in flight, or class_lru in one pool, takes the cache state."""
    from moesim.core import slots

    _, offloads = _parts()
    calls = []
    find = slots.slot_kernel
    monkeypatch.setattr(core, "slot_kernel", lambda *a: (lambda k: calls.append(k is not None) or k)(find(*a)))
    cls = core.reference_class(policy)
    for seed, scope, reset in ((0, "per_layer", False), (1, "global", True), (2, "per_layer", True)):
        trace = random_trace(seed, max_batch=1 + 2 * (seed % 2))
        need = max_request(trace)
        n_slots = (need + 1) * trace.n_layers if scope == "per_layer" else 2 * need + 1
        dense = some_dense(trace, reset)
        for name, make in offloads.items():
            for hw in (_host_profile(), CPU_PROFILE):
                runs = []
                for decide in (True, False):
                    monkeypatch.setattr(core, "DECIDE", decide)
                    calls.clear()
                    runs.append((core.simulate(trace, trace.spec, n_slots, scope, cls, offload=make(), hardware=hw,
                                               reset_per_seq=reset, events=False, dense=dense), list(calls)))
                (fast, took), (slow, none) = runs
                capped = name == "host-auto-fill-load"  # max_inflight: its loads wait for room on the copy engine
                assert none == [] and took == ([] if capped else [policy == "lru" or scope == "per_layer"]), name
                assert fast.counters == slow.counters and fast.request_stats == slow.request_stats, (name, scope)
                np.testing.assert_array_equal(fast.profiler.arrays()[0], slow.profiler.arrays()[0])
                assert fast.profiler.metrics() == slow.profiler.metrics(), (name, scope)
                if name != "fetch" and hw is not CPU_PROFILE:
                    assert fast.counters["host_computes"] > 0, name


def test_belady_with_a_prefetcher_decided_without_the_clocks_is_timed_as_the_cache_state_does(monkeypatch):
    """simulate(events=False) of Belady per layer with a prefetcher that has no cap on the bytes in flight (plan's
    bound: oracle prefetch 4 layers ahead): its slot kernel decides the hits and the prefetches, loop.time_hits
    times them. The same counters, prefetch outcomes, steps, sums and served requests (late prefetches included)
    as run_sim's replay on the cache state, bit for bit, for several prefetchers, batched steps, resets, serial
    copies and a dense part; a capped prefetcher, or one pool, takes the cache state."""
    from strategies.oracle import Oracle
    from strategies.transition import Transition

    from moesim.core import slots

    calls = []
    find = slots.slot_kernel
    monkeypatch.setattr(core, "slot_kernel", lambda *a: (lambda k: calls.append(k is not None) or k)(find(*a)))
    cls = core.reference_class("belady")
    prefetchers = {"oracle-4": lambda: Oracle(lookahead=4), "oracle-1-two": lambda: Oracle(per_layer=2),
                   "transition": lambda: Transition(lookahead=2, calibrate_fraction=0.3),
                   "oracle-capped": lambda: Oracle(lookahead=4, max_inflight="1 experts")}
    late = 0
    for seed, scope, reset, serial in ((0, "per_layer", False, False), (1, "per_layer", True, True),
                                       (2, "global", True, False)):
        trace = random_trace(seed, max_batch=1 + 2 * (seed % 2))
        need = max_request(trace)
        n_slots = (need + 1) * trace.n_layers if scope == "per_layer" else 2 * need + 1
        hw = dataclasses.replace(load_hardware("rtx-4090"), serial_copies=serial)
        dense = some_dense(trace, reset)
        for name, make in prefetchers.items():
            runs = []
            for decide in (True, False):
                monkeypatch.setattr(core, "DECIDE", decide)
                calls.clear()
                runs.append((core.simulate(trace, trace.spec, n_slots, scope, cls, make(), hardware=hw,
                                           reset_per_seq=reset, events=False, dense=dense), list(calls)))
            (fast, took), (slow, none) = runs
            capped = name == "oracle-capped"
            assert none == [] and took == ([] if capped else [scope == "per_layer"]), (name, scope)
            assert fast.counters == slow.counters and fast.prefetch == slow.prefetch, (name, scope)
            assert fast.request_stats == slow.request_stats, (name, scope)
            np.testing.assert_array_equal(fast.profiler.arrays()[0], slow.profiler.arrays()[0])
            assert fast.profiler.metrics() == slow.profiler.metrics(), (name, scope)
            assert fast.counters["prefetch_loads"] > 0, name
            late += fast.request_stats["late_prefetches"]
    assert late > 0  # some prefetches arrived after their layer began


def test_a_learned_policys_budgets_decided_together_replay_as_each_alone(monkeypatch):
    """core.budgets_ahead (plan's replays of a learned policy): the hits of every budget come from one pass
    (loop.run_hits_budgets, the policy's history and outputs computed once) and run_sim times each budget's. The
    same counters, steps, sums and served requests as each budget replayed on its own, with resets per sequence
    or none and steps of several tokens; a budget whose partitions a request does not fit replays on its own."""
    from moesim.core import encode, loop
    from strategies.learned import Learned

    calls = []
    kernel = loop.run_hits_budgets

    class Counting:  # the kernel, counting its budgets per call
        signatures = property(lambda self: kernel.signatures)

        def __call__(self, *a):
            calls.append(len(a[-2]))
            return kernel(*a)

    monkeypatch.setattr(loop, "run_hits_budgets", Counting())
    hw = load_hardware("rtx-4090")
    trace = random_trace(11, T=400, max_batch=3)
    L = trace.n_layers
    w = encode(trace).width
    model = random_model(L, trace.spec.experts, H=4, seed=2)
    make = lambda: Learned(model=model)  # noqa: E731
    budgets = [(w - 1) * L, w * L, (w + 1) * L, (w + 2) * L]  # the first: a request wider than its partitions
    for reset in (False, True):
        dense = some_dense(trace, reset)
        alone = [core.simulate(trace, trace.spec, b, "per_layer", make, hardware=hw, reset_per_seq=reset,
                               events=False, dense=dense) for b in budgets]
        calls.clear()
        with core.budgets_ahead(budgets):
            together = [core.simulate(trace, trace.spec, b, "per_layer", make, hardware=hw, reset_per_seq=reset,
                                      events=False, dense=dense) for b in budgets]
        assert calls[1:] == [3]  # one pass (after the call of no steps) for the three budgets that fit
        for a, t in zip(alone, together):
            assert a.counters == t.counters and a.request_stats == t.request_stats
            np.testing.assert_array_equal(a.profiler.arrays()[0], t.profiler.arrays()[0])
            assert a.profiler.metrics() == t.profiler.metrics()
        assert alone[1].counters["evictions"] > 0 and alone[1].counters["hits"] > 0
    assert not core._DECIDED and not core._AHEAD
