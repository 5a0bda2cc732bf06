"""The cache mechanism: budgets, scopes, pinning, counters, resets (policies are tested in test_policies.py)."""
from collections import OrderedDict

import numpy as np
import pytest

from moesim.cache import Cache
from moesim.units import parse_budget
from moesim.engine import hit_counts, replay, step_requests
from moesim.errors import MoesimError
from moesim.trace import MODEL_SPECS, ModelSpec, from_arrays
from strategies import CachePolicy

GPT = MODEL_SPECS["gpt-oss-20b"]  # 24 layers x 32 experts, top-4, 13.2 MB per expert


class TinyLRU(CachePolicy):
    """A test-local LRU, independent of strategies/lru.py."""

    def setup(self, ctx):
        self.order = OrderedDict()
        self.ctx = ctx

    def on_access(self, pos, keys):
        for k in keys:
            self.order.move_to_end(k)

    def on_insert(self, pos, key, prefetched):
        self.order[key] = None

    def on_evict(self, key):
        del self.order[key]

    def victim(self, candidates):
        return next(k for k in self.order if k in candidates)


@pytest.mark.parametrize("value, slots", [
    ("192", 192), (192, 192), ("25%", 192), ("12.5%", 96), ("100%", 768), ("50%", 384),
    (f"{192 * GPT.bytes_per_expert}B", 192), ("4GiB", (4 * 2**30 // GPT.bytes_per_expert) // 24 * 24),
    ("100000", 768),  # more than all experts: everything fits, no more
])
def test_budget_forms_per_layer(value, slots):
    b = parse_budget(value, GPT, "per_layer")
    assert b.slots == slots
    assert b.per_layer_slots == slots // 24
    assert b.bytes == slots * GPT.bytes_per_expert


def test_budget_per_layer_rounds_down_to_equal_shares():
    b = parse_budget("200", GPT, "per_layer")
    assert (b.slots, b.per_layer_slots) == (192, 8)
    assert parse_budget("200", GPT, "global").slots == 200


@pytest.mark.parametrize("value, scope, words", [
    ("95", "per_layer", ["95 slots", "3 per layer", "top-k = 4", "96 slots"]),
    ("3", "global", ["3 slots", "top-k = 4"]),
    ("10MiB", "global", ["0 slots"]),
    ("0%", "per_layer", ["share"]),
    ("lots", "per_layer", ["budget='lots'"]),
    ("4XB", "per_layer", ["unknown unit"]),
    ("1.5", "global", ["whole"]),
    ("25%", "sideways", ["scope='sideways'"]),
])
def test_budget_refused_with_the_numbers(value, scope, words):
    with pytest.raises(MoesimError) as e:
        parse_budget(value, GPT, scope)
    for w in words:
        assert w in str(e.value)


def _trace(rows, spec, step=None, seq=None):
    e = np.array(rows)
    return from_arrays(spec, e, np.ones(e.shape) / e.shape[2], step=step, seq=seq)


def test_hits_misses_and_pinning_in_one_layer():
    spec = ModelSpec("toy", layers=1, experts=8, top_k=2, hidden=4, ffn=4)
    # capacity 3, LRU order oldest first. t0: miss 0, 1 -> [0 1]. t1: hit 0, miss 2 -> [1 0 2].
    # t2 asks {3, 1}: hit 1 -> [0 2 1]; miss 3 evicts 0 -> [2 1 3].
    # t3 asks {0, 2}: hit 2 -> [1 3 2]; miss 0 evicts 1 (2 is pinned by this row) -> [3 2 0].
    tr = _trace([[[0, 1]], [[2, 0]], [[3, 1]], [[0, 2]]], spec)
    c = hit_counts(tr, TinyLRU, 3, scope="global")
    assert (c.requests, c.hits, c.misses, c.loads, c.evictions) == (8, 3, 5, 5, 2)


def test_counters_balance_and_resident_bound():
    rng = np.random.default_rng(1)
    spec = ModelSpec("toy", layers=3, experts=10, top_k=3, hidden=4, ffn=4)
    rows = [[rng.permutation(10)[:3] for _ in range(3)] for _ in range(200)]
    tr = _trace(rows, spec)
    for scope, budget in (("per_layer", 15), ("global", 7)):
        cache = Cache(spec, parse_budget(budget, spec, scope).slots, scope, TinyLRU, tr)
        c = replay(tr, cache)
        assert c.requests == c.hits + c.misses == 200 * 3 * 3
        assert c.loads == c.misses
        assert c.evictions == c.loads - cache.resident_count()
        assert cache.resident_count() <= cache.n_slots
        if scope == "per_layer":
            assert all(len(p.resident) <= 5 for p in cache.partitions)


def test_policy_sees_only_its_partition():
    spec = ModelSpec("toy", layers=2, experts=6, top_k=2, hidden=4, ffn=4)
    seen = []

    class Spy(TinyLRU):
        def victim(self, candidates):
            keys = list(candidates)
            seen.append({k[0] for k in keys})
            assert all(k in candidates for k in keys)
            return super().victim(candidates)

    rng = np.random.default_rng(2)
    tr = _trace([[rng.permutation(6)[:2] for _ in range(2)] for _ in range(50)], spec)
    hit_counts(tr, Spy, 6, scope="per_layer")
    assert seen and all(len(layers) == 1 for layers in seen)


def test_reset_per_seq_empties_at_each_new_sequence():
    spec = ModelSpec("toy", layers=1, experts=4, top_k=1, hidden=4, ffn=4)
    tr = _trace([[[0]], [[0]], [[0]], [[0]]], spec, seq=[0, 0, 1, 1])
    assert hit_counts(tr, TinyLRU, 2, "global").hits == 3  # persists across sequences
    assert hit_counts(tr, TinyLRU, 2, "global", reset_per_seq=True).hits == 2  # cold start per sequence


def test_policy_returning_a_pinned_key_is_caught():
    spec = ModelSpec("toy", layers=1, experts=4, top_k=2, hidden=4, ffn=4)

    class Bad(TinyLRU):
        def victim(self, candidates):
            return (0, 1)  # requested by the running row below: pinned

    tr = _trace([[[0, 2]], [[1, 3]]], spec)
    with pytest.raises(RuntimeError, match="not a resident, unpinned key"):
        hit_counts(tr, Bad, 2, "global")


def test_step_requests_merge_batched_tokens():
    spec = ModelSpec("toy", layers=2, experts=6, top_k=2, hidden=4, ffn=4)
    rows = [[[0, 1], [2, 3]], [[1, 4], [3, 5]], [[5, 0], [2, 3]]]
    tr = _trace(rows, spec, step=[0, 0, 1])
    out = list(step_requests(tr))
    assert [(s, start, n) for s, start, n, _ in out] == [(0, 0, 2), (1, 2, 1)]
    assert out[0][3][0] == ([0, 1, 4], [1, 2, 1])
    assert out[0][3][1] == ([2, 3, 5], [1, 2, 1])
    assert out[1][3][0] == ([5, 0], None)


def test_layer_needing_more_experts_than_slots_runs_in_waves():
    """A prefill step whose layer needs 6 distinct experts with 4 slots: served in waves, hits first."""
    spec = ModelSpec("toy", layers=1, experts=8, top_k=2, hidden=4, ffn=4)
    rows = [[[0, 1]], [[0, 1]], [[2, 3]], [[4, 5]], [[0, 1]]]
    tr = _trace(rows, spec, step=[0, 1, 1, 1, 2])  # step 1: three tokens, experts {0..5}

    calls = []

    class Recorder:
        def begin_step(self, s, n):
            pass

        def load(self, key, slot, prefetch):
            calls.append(("load", key))

        def compute(self, layer, device, host):
            calls.append(("compute", sorted(k[1] for k, _, _ in device)))

        def end_step(self):
            pass

        def finish(self):
            pass

    cache = Cache(spec, 4, "global", TinyLRU, tr)
    c = replay(tr, cache, backend=Recorder())
    computes = [x[1] for x in calls if x[0] == "compute"]
    # step 0: {0,1}; step 1: wave 1 = hits 0, 1 first, then 2, 3; wave 2 = 4, 5; step 2: {0, 1} again
    assert computes == [[0, 1], [0, 1, 2, 3], [4, 5], [0, 1]]
    assert (c.requests, c.hits) == (2 + 6 + 2, 2 + 0)
    assert c.requests == c.hits + c.misses and c.loads == c.misses
