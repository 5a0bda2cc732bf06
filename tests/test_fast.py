"""The compiled fast path (moesim/fast.py) against the plain-Python reference (moesim/engine.py + strategies/).

    python -m pytest tests/test_fast.py -q

Every built-in policy, both scopes, several budgets, reset_per_seq on and off, on random traces with
batched steps, several sequences and -1 entries: the counters must be identical.
"""
from __future__ import annotations

import numpy as np
import pytest

from moesim import fast
from moesim.units import parse_budget
from moesim.engine import hit_counts as reference_hit_counts
from moesim.errors import MoesimError
from moesim.trace import ModelSpec, from_arrays

POLICY_PARAMS = {  # each policy with its defaults and with parameters that change its decisions
    "lru": [{}],
    "fifo": [{}],
    "lfu": [{}, {"decay": 0.5, "decay_every": 7}, {"decay": 0.01, "decay_every": 1}],  # the last rescales
    "lfru": [{}, {"decay": 0.7, "alpha": 2.0}, {"decay": 1.0, "alpha": 0.0}],
    "belady": [{}],
    "static": [{}, {"calibrate_tokens": 40, "lru_slots": 4}],
}


def random_trace(seed: int, T: int = 300, L: int = 3, E: int = 8, K: int = 2, max_batch: int = 3,
                 p_missing: float = 0.05, skew: float = 1.2):
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
    return from_arrays(spec, experts, np.ones((T, L, K), np.float16), step=step, seq=seq)


def reference_counters(trace, policy, params, slots, scope, reset):
    cls = fast.reference_class(policy)
    return reference_hit_counts(trace, lambda: cls(**params), slots, scope, reset).to_dict()


def max_request(trace) -> int:
    req = fast.encode(trace)
    return int(np.diff(req.ptr).max())


@pytest.mark.parametrize("policy", sorted(POLICY_PARAMS))
@pytest.mark.parametrize("scope", ["per_layer", "global"])
def test_fast_equals_reference(policy, scope):
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
                    got = fast.hit_counts(trace, policy, params, b.slots, scope, reset)
                    assert got == want, (policy, params, scope, slots, reset, seed)


def test_fast_equals_reference_long_trace():
    """A longer trace with more experts: evictions from deep inside the heaps and lists."""
    trace = random_trace(11, T=1500, L=2, E=24, K=4, max_batch=2, skew=0.8)
    need = max_request(trace)
    for policy, plist in POLICY_PARAMS.items():
        for params in plist:
            for scope, slots in (("per_layer", 2 * max(need, 9)), ("global", 2 * need + 5)):
                want = reference_counters(trace, policy, params, slots, scope, False)
                got = fast.hit_counts(trace, policy, params, slots, scope, False)
                assert got == want, (policy, params, scope, slots)
                assert got["evictions"] > 0


def test_encode_matches_engine_step_requests():
    from moesim.engine import step_requests

    trace = random_trace(5, max_batch=4)
    req = fast.encode(trace)
    L = trace.n_layers
    for s, _, n_tokens, layers in step_requests(trace):
        assert req.step_tokens[s] == n_tokens
        for layer, (ids, counts) in enumerate(layers):
            a, b = req.ptr[s * L + layer], req.ptr[s * L + layer + 1]
            assert req.ids[a:b].tolist() == list(ids)
            assert req.token_counts()[a:b].tolist() == (list(counts) if counts is not None else [1] * len(ids))


def test_wide_requests_are_served_in_waves():
    """Batched steps whose layer needs more experts than its slots: the engine serves them in waves of at
    most that many, hits first; so does the fast path (counters and sim events)."""
    trace = random_trace(3, max_batch=6, p_missing=0.0)
    assert max_request(trace) > 2 * trace.top_k
    K, L = trace.top_k, trace.n_layers
    for policy, plist in POLICY_PARAMS.items():
        for scope, slots in (("per_layer", K * L), ("per_layer", (K + 1) * L), ("global", K), ("global", K + 3)):
            params = plist[min(1, len(plist) - 1)]
            want = reference_counters(trace, policy, params, slots, scope, True)
            assert fast.hit_counts(trace, policy, params, slots, scope, True) == want, (policy, scope, slots)
            if slots in (K * L, K):
                ref, prof, _, stats = reference_sim(trace, policy, params, slots, scope, False, "h200")
                got = fast.replay_sim(trace, policy, params, slots, scope, "h200", False)
                assert got.counters == ref and got.request_stats == stats
                for x, y in zip(got.profiler.arrays(), prof.arrays()):
                    np.testing.assert_array_equal(x, y)


def test_bad_params_refused_like_the_reference():
    trace = random_trace(1)
    with pytest.raises(MoesimError, match="decay"):
        fast.hit_counts(trace, "lfu", {"decay": 2.0}, 12, "per_layer")
    with pytest.raises(MoesimError, match="unknown policy"):
        fast.hit_counts(trace, "arc", {}, 12, "per_layer")


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


def reference_sim(trace, policy, params, slots, scope, reset, hardware):
    from moesim.backends.sim import SimBackend
    from moesim.cache import Cache
    from moesim.engine import replay
    from moesim.profiler import Profiler

    cls = fast.reference_class(policy)
    cache = Cache(trace.spec, slots, scope, lambda: cls(**params), trace)
    backend, profiler = SimBackend(hardware), Profiler(trace.n_layers)
    backend.setup(trace.spec, slots, profiler)
    counters = replay(trace, cache, backend, reset_per_seq=reset)
    return counters.to_dict(), profiler, backend.device_bytes(), backend.request_stats()


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
                want, prof, dev_bytes, stats = reference_sim(trace, policy, params, slots, scope, reset, hw)
                got = fast.replay_sim(trace, policy, params, slots, scope, hw, reset)
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
    """LFRU in a global pool of many slots, where its victim is searched on the front (fast.py: keys with a
    smaller log f than every older one) and ties are frequent (decay 1, alpha 0: log f = log count): the
    same counters and events as the reference, with and without resets, wide requests served in waves."""
    trace = random_trace(12, T=600, L=4, E=16, K=3, max_batch=3, skew=0.9)
    need = max_request(trace)
    for slots, reset in ((need - 2, False), (need + 3, True), (2 * need, False), (40, True)):
        want, prof, _, stats = reference_sim(trace, "lfru", params, slots, "global", reset, "h200")
        got = fast.replay_sim(trace, "lfru", params, slots, "global", "h200", reset)
        assert got.counters == want and got.request_stats == stats, (params, slots, reset)
        assert want["evictions"] > 0
        for a, b in zip(got.profiler.arrays(), prof.arrays()):
            np.testing.assert_array_equal(a, b)
        assert fast.hit_counts(trace, "lfru", params, slots, "global", reset) == want


def test_replay_sim_with_shared_experts_and_batches():
    """A model with shared experts (their time depends on the step's tokens) and batched steps."""
    spec = ModelSpec("tiny-shared", 3, 8, 2, 64, 32, shared_experts=2, shared_ffn=48)
    base = random_trace(4, max_batch=5)
    trace = from_arrays(spec, base.experts, base.weights, step=base.step, seq=base.seq)
    slots = 3 * max_request(trace) + 3
    want, prof, _, _ = reference_sim(trace, "lru", {}, slots, "global", False, "h200")
    got = fast.replay_sim(trace, "lru", {}, slots, "global", "h200", False)
    assert got.counters == want
    for a, b in zip(got.profiler.arrays(), prof.arrays()):
        np.testing.assert_array_equal(a, b)


def test_hit_flags_mark_the_hits():
    trace = random_trace(8, max_batch=2)
    slots = 2 * max_request(trace) + 1
    for policy in ("lru", "belady"):
        flags = fast.hit_flags(trace, policy, {}, slots, "global")
        assert flags.shape == fast.encode(trace).ids.shape
        assert int(flags.sum()) == fast.hit_counts(trace, policy, {}, slots, "global")["hits"]
    # the first request of every key is a miss
    req = fast.encode(trace)
    layer = np.repeat(np.arange(len(req.ptr) - 1) % trace.n_layers, np.diff(req.ptr))
    _, first = np.unique(layer * 100 + req.ids, return_index=True)
    assert not flags[first].any()


def test_lfu_strong_decay_after_late_resets_equals_the_reference():
    """decay=0.01 per position with resets: LFU ages from each reset, so no power overflows (it did once)."""
    trace = random_trace(0, T=300, L=3)
    params = {"decay": 0.01, "decay_every": 1}
    ref = reference_counters(trace, "lfu", params, 12, "global", True)
    assert fast.hit_counts(trace, "lfu", params, 12, "global", True) == ref


def test_lfu_decay_with_reset_per_seq_stays_finite_and_equal():
    """After a reset LFU ages from the reset on: 6000 steps of decay 0.5 per step would overflow otherwise."""
    from strategies.lfu import LFU

    spec = ModelSpec("toy", layers=2, experts=8, top_k=2, hidden=4, ffn=4)
    rng = np.random.default_rng(0)
    e = np.array([[rng.permutation(8)[:2] for _ in range(2)] for _ in range(6000)])
    tr = from_arrays(spec, e, np.ones(e.shape) / 2, seq=np.repeat(np.arange(6), 1000))
    for scope, budget in (("per_layer", 8), ("global", 5)):
        ref = reference_hit_counts(tr, lambda: LFU(decay=0.5, decay_every=2), budget, scope, reset_per_seq=True)
        got = fast.hit_counts(tr, "lfu", {"decay": 0.5, "decay_every": 2}, budget, scope, True)
        assert (got["hits"], got["evictions"]) == (ref.hits, ref.evictions)


def test_a_slow_first_call_says_it_is_compiling(capsys):
    import time
    from types import SimpleNamespace

    cold, warm = SimpleNamespace(signatures=[]), SimpleNamespace(signatures=["(int64,)"])
    with fast.compile_notice(cold, after_s=0.05):
        time.sleep(0.3)
    assert "compiling the replay loop" in capsys.readouterr().err
    with fast.compile_notice(warm, after_s=0.0):
        time.sleep(0.1)
    with fast.compile_notice(cold, after_s=5.0):  # returned in time: nothing said
        pass
    time.sleep(0.1)
    assert capsys.readouterr().err == ""
