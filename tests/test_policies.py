"""The cache policies of strategies/: exact victims on hand-worked sequences, candidate restriction, LFU
aging, Belady against exhaustive search, and properties on random traces through the cache-only replay.

    python -m pytest tests/test_policies.py -q

Hand-worked sequences use one layer (a position is a step) and rows padded with -1; `evictions` lists
the keys in the order the cache evicted them.
"""
from __future__ import annotations

import ast
import itertools
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim.cache import Cache
from moesim.units import parse_budget
from moesim.engine import replay
from moesim.errors import MoesimError
from moesim.trace import ModelSpec, from_arrays, save_trace
from strategies import CachePolicy, Context
from strategies.belady import NEVER, Belady, request_positions
from strategies.fifo import FIFO
from strategies.lfru import LFRU
from strategies.lfu import LFU
from strategies.lru import LRU
from strategies.static import Static, request_counts

POLICIES = {"fifo": FIFO, "lru": LRU, "lfu": LFU, "lfru": LFRU, "static": Static, "belady": Belady}


def trace_of(rows, E: int = 8, L: int = 1, steps=None):
    """A trace from rows: per token, per layer, a list of expert ids (padded with -1 to the longest)."""
    if L == 1 and rows and not isinstance(rows[0][0], (list, tuple)):
        rows = [[r] for r in rows]
    K = max(len(r) for tok in rows for r in tok)
    ex = np.full((len(rows), L, K), -1, np.int16)
    for t, tok in enumerate(rows):
        for layer, r in enumerate(tok):
            ex[t, layer, :len(r)] = r
    spec = ModelSpec("test", L, E, K, 8, 8)
    return from_arrays(spec, ex, np.ones(ex.shape, np.float16), step=steps)


def run(trace, make_policy, slots: int, scope: str = "per_layer"):
    """Cache-only replay; returns (counters, evicted keys in order, the cache)."""
    evicted = []

    def make():
        policy = make_policy()
        on_evict = policy.on_evict

        def record(key):
            evicted.append(key)
            on_evict(key)

        policy.on_evict = record
        return policy

    cache = Cache(trace.spec, slots, scope, make, trace)
    counters = replay(trace, cache)
    return counters, evicted, cache


def victims(trace, make_policy, slots: int, scope: str = "per_layer"):
    return [e for _, e in run(trace, make_policy, slots, scope)[1]]  # expert ids (one layer)


# ------------------------------------------------------------------------------------- hand-worked
# capacity 3; steps: 0,1 | 2 | 0 (hit) | 3 | 1 | 4
SEQ = [[0, 1], [2], [0], [3], [1], [4]]


def test_fifo_evicts_oldest_insertion_hits_do_not_reorder():
    # 3 misses: oldest insert is 0 (its hit at step 2 does not help); 1 hits; 4: oldest of {1, 2, 3} is 1
    assert victims(trace_of(SEQ), FIFO, 3) == [0, 1]


def test_lru_evicts_least_recent_use():
    # after step 2 the order is 1, 2, 0; 3 evicts 1; 1 evicts 2 (order 0, 3, 1); 4 evicts 0
    assert victims(trace_of(SEQ), LRU, 3) == [1, 2, 0]


def test_lru_hits_move_in_row_order_before_misses():
    # capacity 4: row [2, 1, 5] hits 2 then 1, then inserts 5 (evicting 0): order 3, 2, 1, 5; then 6, 7
    # evict 3, then 2 (1 was touched after 2 within the row)
    assert victims(trace_of([[0, 1], [2, 3], [2, 1, 5], [6], [7]]), LRU, 4) == [0, 3, 2]


def test_lfu_lowest_count_ties_least_recent():
    # counts after step 2: 0:2, 1:1, 2:1. 3 evicts 1 (count 1, touched before 2); 1 evicts 2 (count 1,
    # older than 3); 4: 0:2, 3:1, 1:1 -> 3 (touched before 1)
    assert victims(trace_of(SEQ), LFU, 3) == [1, 2, 3]


def test_lfu_count_is_forgotten_on_eviction():
    # 0 reaches count 3 and is evicted only when everything else has more; coming back it starts at 1
    rows = [[0], [0], [0], [1], [1], [1], [1], [2], [2], [2], [2], [3], [4]]
    assert victims(trace_of(rows), LFU, 3) == [0, 3]


def test_lfu_decay_changes_the_victim():
    # 0 used at steps 0-2 (count 3), 1 at steps 3-4 (count 2), then 2 needs a slot. Without aging 1 goes;
    # halving every step, 0's 3 uses are old (aged count 1.75 at step 2, 0.22 at step 5) and 0 goes.
    rows = [[0], [0], [0], [1], [1], [2]]
    assert victims(trace_of(rows), LFU, 2) == [1]
    assert victims(trace_of(rows), lambda: LFU(decay=0.5, decay_every=1), 2) == [0]
    # aging every 4 positions: at position 4 both are halved: 0 -> 1.5, 1 -> 0.5 + 1 (its hit) = 1.5,
    # a tie that the least recent (0) loses; a milder decay leaves 0 ahead (2.7 against 1.9)
    assert victims(trace_of(rows), lambda: LFU(decay=0.5, decay_every=4), 2) == [0]
    assert victims(trace_of(rows), lambda: LFU(decay=0.9, decay_every=4), 2) == [1]


def test_lfu_decay_default_period_is_one_step():
    # two layers: layer 0 sees 0, 0, 0, 1, 1, 2; layer 1 always 5. Aged counts when 2 arrives (step 5):
    # decay 0.9 per step: 0 has 0.9**5 + 0.9**4 + 0.9**3 = 1.98, 1 has 0.9**2 + 0.9 = 1.71: 1 goes;
    # decay 0.9 per position (0.81 per step): 0 has 1.31, 1 has 0.81**2 + 0.81 = 1.47: 0 goes.
    rows = [[[e], [5]] for e in (0, 0, 0, 1, 1, 2)]
    tr = trace_of(rows, L=2)
    assert run(tr, lambda: LFU(decay=0.9), 4)[1] == [(0, 1)]  # per layer: 2 slots each
    assert run(tr, lambda: LFU(decay=0.9, decay_every=1), 4)[1] == [(0, 0)]


class EagerLFU(CachePolicy):
    """Reference for LFU aging: walks every count at each period boundary (what LFU avoids)."""

    def __init__(self, decay, decay_every):
        self.decay, self.every = decay, decay_every

    def setup(self, ctx):
        self.count, self.touch, self.n, self.epoch = {}, {}, 0, 0

    def _age(self, pos):
        while self.epoch < pos // self.every:
            self.epoch += 1
            for k in self.count:
                self.count[k] *= self.decay

    def on_access(self, pos, keys):
        self._age(pos)
        for k in keys:
            self.n += 1
            self.count[k] += 1
            self.touch[k] = self.n

    def on_insert(self, pos, key, prefetched):
        self._age(pos)
        self.n += 1
        self.count[key], self.touch[key] = 1.0, self.n

    def on_evict(self, key):
        del self.count[key], self.touch[key]

    def victim(self, candidates):
        return min(candidates, key=lambda k: (self.count[k], self.touch[k]))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), every=st.integers(1, 5), slots=st.integers(2, 5))
def test_lfu_lazy_aging_equals_eager_aging(seed, every, slots):
    rng = np.random.default_rng(seed)
    rows = [list(rng.choice(6, size=2, replace=False)) for _ in range(400)]  # long: forces rescaling
    tr = trace_of(rows)
    # decay 0.5: every aged count is exact in binary, so the two agree bit for bit
    lazy = victims(tr, lambda: LFU(decay=0.5, decay_every=every), slots)
    eager = victims(tr, lambda: EagerLFU(0.5, every), slots)
    assert lazy == eager


def test_lfru_frequency_beats_recency_and_alpha_restores_recency():
    # 0 used 4 times (steps 0-3), 1 at step 4, 2 needs a slot at step 5 (capacity 2). Scores at step 5:
    rows = [[0], [0], [0], [0], [1], [2]]
    assert victims(trace_of(rows), LRU, 2) == [0]
    assert victims(trace_of(rows), lambda: LFRU(decay=1.0, alpha=1.0), 2) == [1]  # 4/3 > 1/2
    assert victims(trace_of(rows), lambda: LFRU(decay=1.0, alpha=5.0), 2) == [0]  # 4/3**5 < 1/2**5
    assert victims(trace_of(rows), lambda: LFRU(decay=0.5, alpha=1.0), 2) == [0]  # 1.875/4/3 < 0.5/2
    # 4/3**3 = 0.148 > 1/2**3 = 0.125. Ranked one step early (at step 4: 4/2**3 < 1/1) the answer flips:
    # this needs the cache to call on_access at every position, also one without hits
    assert victims(trace_of(rows), lambda: LFRU(decay=1.0, alpha=3.0), 2) == [1]


def test_cache_tells_the_policy_every_position():
    """strategies/__init__.py: per (step, layer) `on_access` comes first, with the hits (maybe none);
    policies that rank by age (LFRU) learn the time from it."""
    seen = []

    class Spy(LRU):
        def on_access(self, pos, keys):
            seen.append(pos)
            super().on_access(pos, keys)

    run(trace_of([[[0], [1]], [[2], [1]], [[0], [3]]], L=2), Spy, 4)
    assert sorted(seen) == [0, 1, 2, 3, 4, 5]


def test_lfru_score_by_hand():
    spec = ModelSpec("test", 2, 4, 1, 8, 8)
    p = LFRU(decay=0.5, alpha=1.0)
    p.setup(Context(None, spec, (0, 1), 4, "global"))
    p.on_insert(0, (0, 0), False)  # t = 0
    p.on_access(2, [(0, 0)])  # t = 1: f = 1 * 0.5 + 1 = 1.5
    p.on_insert(3, (1, 2), False)  # t = 1.5
    p.on_access(6, [])  # t = 3
    assert math.isclose(math.exp(p.log_score((0, 0), 3.0)), 1.5 * 0.25 / 3)
    assert math.isclose(math.exp(p.log_score((1, 2), 3.0)), 0.5 ** 1.5 / 2.5)
    assert p.victim({(0, 0), (1, 2)}) == (0, 0)
    assert p.victim({(1, 2)}) == (1, 2)


def test_lfru_keeps_history_after_eviction():
    # 0 is used 3 times, evicted, and comes back: its count goes on (3 + 1), it does not restart at 1
    p = LFRU(decay=1.0, alpha=0.0)
    p.setup(Context(None, ModelSpec("test", 1, 8, 1, 8, 8), (0,), 2, "per_layer"))
    p.on_insert(0, (0, 0), False)
    p.on_access(1, [(0, 0)])
    p.on_access(2, [(0, 0)])
    p.on_evict((0, 0))
    p.on_insert(10, (0, 0), False)
    assert math.isclose(math.exp(p.log_f[(0, 0)]), 4.0)


def test_static_keeps_calibrated_experts():
    # calibration = the first 6 tokens: 5 three times, 6 twice, 7 once -> capacity 3 - 1 LRU slot = {5, 6}
    rows = [[5], [5], [5], [6], [6], [7], [1], [5], [2], [6], [3]]
    make = lambda: Static(calibrate_tokens=6, lru_slots=1)  # noqa: E731
    assert victims(trace_of(rows), make, 3) == [7, 1, 2]
    assert victims(trace_of(rows), LRU, 3) == [5, 6, 7, 1, 5]  # what it saves
    p = Static(calibrate_tokens=6, lru_slots=1)
    p.setup(Context(trace_of(rows), ModelSpec("test", 1, 8, 1, 8, 8), (0,), 3, "per_layer"))
    assert set(p.static) == {(0, 5), (0, 6)} and p.calibration_tokens == 6


def test_static_defaults_and_calibration_trace(tmp_path):
    rng = np.random.default_rng(0)
    rows = [[[int(x) for x in rng.choice(8, 2, replace=False, p=[.4, .3, .1, .1, .05, .03, .01, .01])]
             for _ in range(2)] for _ in range(200)]
    tr = trace_of(rows, L=2)
    p = Static()
    p.setup(Context(tr, tr.spec, (0, 1), 10, "global"))
    assert p.calibration_tokens == 20  # 10% of 200
    assert len(p.static) == 10 - 2 * 2  # lru_slots default: top_k per layer of the partition
    counts = request_counts(tr.slice_tokens(0, 20), (0, 1))
    assert min(p.static.values()) >= max(counts[k[0], k[1]] for k in itertools.product(range(2), range(8))
                                         if k not in p.static)
    path = save_trace(tr.slice_tokens(100, 200), tmp_path / "calib.moetrace.safetensors")
    q = Static(calibrate_trace=str(path))
    q.setup(Context(tr, tr.spec, (1,), 5, "per_layer"))
    assert q.calibration_tokens == 0
    c1 = request_counts(tr.slice_tokens(100, 200), (1,))[0]
    assert sorted(e for _, e in q.static) == sorted(np.argsort(-c1, kind="stable")[:3].tolist())


def test_request_counts_count_the_steps_that_request_each_expert():
    rng = np.random.default_rng(5)
    T, L, E, K = 80, 3, 6, 2
    rows = [[[int(x) for x in rng.choice(E, K, replace=False)] for _ in range(L)] for _ in range(T)]
    steps = np.cumsum(rng.random(T) < 0.5).astype(np.int32)  # several tokens per step: an expert counts once
    tr = trace_of(rows, E=E, L=L, steps=steps)
    experts = np.asarray(tr.experts)
    got = request_counts(tr, (2, 0))
    for i, layer in enumerate((2, 0)):
        for e in range(E):
            assert got[i, e] == sum(e in experts[tr.step_starts[s]:tr.step_starts[s + 1], layer]
                                    for s in range(tr.n_steps))
    assert got.sum() < T * K * 2  # some step requested an expert twice


def test_calibration_trace_comes_through_context(tmp_path):
    """A Context's `open_trace` serves the calibrate_trace reference; a trace of another model is refused by
    name, from a path or a Trace."""
    tr = trace_of([[[0, 1], [2, 3]]] * 20, L=2)
    served = []

    def open_trace(ref):
        served.append(ref)
        return tr.slice_tokens(0, 10)

    p = Static(calibrate_trace="calib-name")
    p.setup(Context(tr, tr.spec, (0, 1), 6, "global", open_trace))
    assert served == ["calib-name"] and p.calibration_tokens == 0
    other = trace_of([[[0, 1], [9, 15]]] * 4, E=16, L=2)  # 2 layers x 16 experts; the replayed trace has 8
    path = save_trace(other, tmp_path / "other.moetrace.safetensors")
    with pytest.raises(MoesimError, match=r"strategy.cache.calibrate_trace=.*other.moetrace.safetensors: model has "
                                          r"2 layers x 16 experts, the replayed trace 2 x 8"):
        Static(calibrate_trace=str(path)).setup(Context(tr, tr.spec, (0, 1), 6, "global"))
    from strategies.transition import Transition

    with pytest.raises(MoesimError, match=r"prefetch.calibrate_trace=<Trace of test>: model has 2 layers x 16"):
        Transition(calibrate_trace=other).setup(Context(tr, tr.spec, (0, 1), 6, "global"))


def test_calibrate_trace_named_twice_is_read_once(tmp_path, monkeypatch):
    """Two partitions' cache policies, a prefetcher and a per-sequence reset all name one calibrate_trace: one read."""
    import moesim.importers as importers
    from strategies.transition import Transition

    tr = trace_of([[[0, 1], [2, 3]], [[4, 5], [6, 7]]] * 20, L=2)
    path = str(save_trace(tr.slice_tokens(0, 10), tmp_path / "calib.moetrace.safetensors"))
    reads = []
    load = importers.load_trace
    monkeypatch.setattr(importers, "load_trace", lambda p, *a, **k: reads.append(str(p)) or load(p, *a, **k))
    monkeypatch.setattr(importers, "_opened", {})
    cache = Cache(tr.spec, 6, "per_layer", lambda: Static(calibrate_trace=path), tr)  # 2 partitions
    replay(tr, cache, prefetcher=Transition(calibrate_trace=path), reset_per_seq=True)
    assert reads == [path]


def test_policy_modules_never_import_the_importers():
    """Policies open no files: no module of strategies/ imports moesim.importers, except the policy interface's
    default reader for Context.open_trace (strategies/__init__.py: default_open_trace)."""
    root = Path(__file__).resolve().parents[1] / "strategies"
    found = []
    for path in sorted(root.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        allowed = set()
        if path.name == "__init__.py":
            allowed = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
                       and f.name == "default_open_trace" for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = "." * node.level + (node.module or "")
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            if id(node) not in allowed and any(n == "moesim.importers" or n.startswith("moesim.importers.")
                                               for n in names):
                found.append(f"{path.name}:{node.lineno}")
    assert found == [], f"policy modules import moesim.importers (calibration data comes through Context): {found}"
    assert len(list(root.glob("*.py"))) > 10  # the check saw the policies


def test_static_bad_parameters_name_the_field():
    tr = trace_of([[0, 1]])
    with pytest.raises(MoesimError, match="lru_slots=1 is less than top_k=2"):
        Static(lru_slots=1).setup(Context(tr, tr.spec, (0,), 4, "per_layer"))
    for kw, field in [({"calibrate_tokens": 0}, "calibrate_tokens"), ({"calibrate_fraction": 1.5}, "calibrate_fraction"),
                      ({"lru_slots": -1}, "lru_slots")]:
        with pytest.raises(MoesimError, match=field):
            Static(**kw)
    for cls, kw, field in [(LFU, {"decay": 0}, "decay"), (LFU, {"decay_every": 0}, "decay_every"),
                           (LFRU, {"decay": 2}, "decay"), (LFRU, {"alpha": -1}, "alpha")]:
        with pytest.raises(MoesimError, match=field):
            cls(**kw)


def test_belady_evicts_furthest_next_use():
    # capacity 2: 2 at step 2 evicts 1 (next at 4; 0 next at 3); 1 at step 4 evicts 0 (never again; 2 at 5)
    assert victims(trace_of([[0], [1], [2], [0], [1], [2]]), Belady, 2) == [1, 0]


def test_belady_never_evicts_the_running_rows_experts():
    # step 2 needs {0, 2}: 0 is a hit and pinned; 1 and 0 are both never used again (a tie that the
    # smallest key would win): 1 must go
    assert victims(trace_of([[1], [0], [0, 2]]), Belady, 2) == [1]
    assert Belady.bound and not LRU.bound


@pytest.mark.parametrize("name", POLICIES)
def test_victim_is_always_a_candidate(name):
    """Whatever a policy prefers, it returns a candidate: take away its choice and it picks another."""
    rows = [[0], [1], [2], [3], [0], [4]]
    tr = trace_of(rows)
    p = POLICIES[name]()
    p.setup(Context(tr, tr.spec, (0,), 4, "per_layer"))
    for pos, e in enumerate([0, 1, 2, 3]):
        p.on_access(pos, [])
        p.on_insert(pos, (0, e), False)
    p.on_access(4, [(0, 0)])
    keys = {(0, e) for e in range(4)}
    first = p.victim(keys)
    assert first in keys
    second = p.victim(keys - {first})
    assert second in keys - {first}
    assert p.victim({second}) == second


# --------------------------------------------------------------------------- Belady vs exhaustive search
def requests_by_partition(trace, slots: int, scope: str):
    """[(capacity, [set of keys per position, in position order])] of each partition."""
    L = trace.n_layers
    rows = np.asarray(trace.experts)
    per_pos = []
    for s in range(trace.n_steps):
        lo, hi = trace.step_starts[s], trace.step_starts[s + 1]
        for layer in range(L):
            per_pos.append((layer, frozenset((layer, int(e)) for e in rows[lo:hi, layer].reshape(-1) if e >= 0)))
    if scope == "global":
        return [(slots, [r for _, r in per_pos])]
    return [(slots // L, [r for layer_, r in per_pos if layer_ == layer]) for layer in range(L)]


def optimal_hits(capacity: int, requests: list[frozenset]) -> int:
    """Most hits any eviction choices can get (set requests, demand loads), by exhaustive search."""

    @lru_cache(maxsize=None)
    def best(i: int, cache: frozenset) -> int:
        if i == len(requests):
            return 0
        req = requests[i]
        hits = len(req & cache)
        n_evict = max(0, len(cache) + len(req - cache) - capacity)
        out = -1
        for gone in itertools.combinations(sorted(cache - req), n_evict):
            out = max(out, best(i + 1, (cache - frozenset(gone)) | req))
        return hits + out

    return best(0, frozenset())


tiny_traces = st.builds(
    lambda L, E, K, T, seed: _random_rows(L, E, K, T, seed),
    L=st.integers(1, 2), E=st.integers(3, 6), K=st.integers(1, 3), T=st.integers(1, 9), seed=st.integers(0, 2**31))


def _random_rows(L, E, K, T, seed):
    rng = np.random.default_rng(seed)
    K = min(K, E)
    rows = [[[int(x) for x in rng.choice(E, size=K, replace=False, p=_skew(E, rng))] for _ in range(L)]
            for _ in range(T)]
    return trace_of(rows, E=E, L=L)


def _skew(E, rng):
    w = rng.dirichlet(np.full(E, 0.7))
    return (w + 1e-3) / (w + 1e-3).sum()


def budgets(trace, scope: str) -> list[int]:
    L, E, K = trace.n_layers, trace.spec.experts, trace.top_k
    if scope == "per_layer":
        return [c * L for c in range(K, E + 1)]
    return list(range(K, E * L + 1))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trace=tiny_traces, scope=st.sampled_from(["per_layer", "global"]))
def test_belady_is_optimal(trace, scope):
    for slots in budgets(trace, scope):
        counters = run(trace, Belady, slots, scope)[0]
        best = sum(optimal_hits(cap, reqs) for cap, reqs in requests_by_partition(trace, slots, scope))
        assert counters.hits == best, (slots, scope)


# ------------------------------------------------------------------------------ properties (hypothesis)
small_traces = st.builds(
    lambda L, E, K, T, seed: _random_rows(L, E, K, T, seed),
    L=st.integers(1, 3), E=st.integers(3, 8), K=st.integers(1, 3), T=st.integers(1, 40), seed=st.integers(0, 2**31))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trace=small_traces, scope=st.sampled_from(["per_layer", "global"]))
def test_properties_on_random_traces(trace, scope):
    hits = {name: [] for name in POLICIES}
    for slots in budgets(trace, scope):
        for name, cls in POLICIES.items():
            c, evicted, cache = run(trace, cls, slots, scope)
            # counters balance, and the cache never holds more than its slots
            assert c.requests == c.hits + c.misses
            assert c.loads == c.misses and c.prefetch_loads == 0
            assert c.evictions == len(evicted) == c.loads - cache.resident_count()
            assert all(len(p.resident) <= p.capacity for p in cache.partitions)
            hits[name].append(c.hits)
        for name in POLICIES:
            assert hits["belady"][-1] >= hits[name][-1], (name, slots, scope)
    for name in ("lru", "belady"):  # more slots never lose a hit
        h = hits[name]
        assert all(a <= b for a, b in zip(h, h[1:])), (name, scope, h)
    assert hits["belady"][-1] == hits["lru"][-1]  # every expert fits: only cold misses remain


def test_request_positions_match_a_naive_scan():
    rng = np.random.default_rng(3)
    T, L, E, K = 60, 3, 6, 2
    rows = [[[int(x) for x in rng.choice(E, K, replace=False)] for _ in range(L)] for _ in range(T)]
    steps = np.cumsum(rng.random(T) < 0.6).astype(np.int32)  # several tokens per step now and then
    tr = trace_of(rows, E=E, L=L, steps=steps)
    positions, offsets = request_positions(tr, (2, 0))
    for i, layer in enumerate((2, 0)):
        for e in range(E):
            want = sorted({s * L + layer for s in range(tr.n_steps)
                           if e in np.asarray(tr.experts)[tr.step_starts[s]:tr.step_starts[s + 1], layer]})
            got = positions[offsets[i * E + e]:offsets[i * E + e + 1]].tolist()
            assert got == want
    p = Belady()
    p.setup(Context(tr, tr.spec, (2, 0), 4, "global"))
    key = (0, int(rows[0][0][0]))
    first = positions[offsets[E + key[1]]:offsets[E + key[1] + 1]].tolist()
    assert p._next_after(first[0], key) == (first[1] if len(first) > 1 else NEVER)


@pytest.mark.parametrize("name", POLICIES)
def test_config_instantiates_the_policy(name):
    from hydra.utils import instantiate

    from moesim.__main__ import compose

    cfg = compose("run", [f"strategy={name}"])
    assert cfg.strategy.name == name
    policy = instantiate(cfg.strategy.cache)
    assert type(policy) is POLICIES[name]
    tr = trace_of([[0, 1], [2, 3], [0, 2]] * 5, L=1)
    b = parse_budget(3, tr.spec, "per_layer")
    assert run(tr, lambda: instantiate(cfg.strategy.cache), b.slots)[0].requests == 30
