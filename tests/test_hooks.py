"""The hook driver: the cache-only replay of a Python policy (Cache.serve_rows, the miss path fused into one loop)
decides, counts and calls the policy exactly as the general loop (lookup / insert / release per request).

    python -m pytest tests/test_hooks.py -q

The general loop runs when a prefetcher is given, so a prefetcher that predicts nothing forces it with no other
change. Random traces mix batch-1 steps, batched steps (some wider than a layer's slots: waves), -1 padding and
several sequences (reset_per_seq), in both scopes; every policy call is logged, with the candidates as the
policy iterates them.
"""
import numpy as np
import pytest

from moesim.cache import Cache
from moesim.engine import hit_counts, replay
from moesim.trace import ModelSpec, from_arrays
from strategies import CachePolicy, Prefetcher
from strategies.belady import Belady
from strategies.fifo import FIFO
from strategies.lfu import LFU
from strategies.lru import LRU

SPEC = ModelSpec("toy", layers=3, experts=8, top_k=3, hidden=4, ffn=4)


class Recorder(CachePolicy):
    """Logs every call into a list shared by a run's partitions; picks a victim by position in the candidates'
    iteration order, so a changed order or `pos` changes the decisions."""

    def __init__(self, log: list):
        self.log = log

    def setup(self, ctx):
        self.log.append(("setup", ctx.layers, ctx.capacity))

    def on_access(self, pos, keys):
        self.log.append(("access", pos, list(keys)))

    def on_insert(self, pos, key, prefetched):
        self.log.append(("insert", pos, key, prefetched))

    def on_evict(self, key):
        self.log.append(("evict", key))

    def victim(self, candidates):
        keys = list(candidates)
        assert len(candidates) == len(keys) and all(k in candidates for k in keys)
        self.log.append(("victim", candidates.pos, keys))
        return keys[(candidates.pos * 7) % len(keys)]


def random_trace(seed: int):
    """60 tokens: steps of 1 token (mostly) or 2-5 tokens, 3 sequences, some rows padded with -1."""
    rng = np.random.default_rng(seed)
    T, L, K = 60, SPEC.layers, SPEC.top_k
    experts = np.stack([np.stack([rng.permutation(SPEC.experts)[:K] for _ in range(L)]) for _ in range(T)])
    experts[rng.random((T, L)) < 0.15, K - 1] = -1  # fewer than K chosen
    sizes = []
    while sum(sizes) < T:
        sizes.append(1 if rng.random() < 0.7 else int(rng.integers(2, 6)))
    step = np.repeat(np.arange(len(sizes)), sizes)[:T]
    seq = np.searchsorted([0, 20, 41], step, side="right") - 1  # new sequences at steps 20 and 41
    return from_arrays(SPEC, experts, np.ones(experts.shape) / K, step=step, seq=seq)


def run(trace, make_policy, slots: int, scope: str, reset: bool, general: bool):
    cache = Cache(trace.spec, slots, scope, make_policy, trace)
    counters = replay(trace, cache, prefetcher=Prefetcher() if general else None, reset_per_seq=reset)
    return counters.to_dict(), {k: s for p in cache.partitions for k, s in p.resident.items()}


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("scope, slots", [("per_layer", 12), ("global", 5), ("global", 9)])
@pytest.mark.parametrize("reset", [False, True])
def test_fused_cache_only_loop_calls_the_policy_as_the_general_loop(seed, scope, slots, reset):
    trace = random_trace(seed)
    logs = {}
    out = {}
    for general in (False, True):
        logs[general] = []
        out[general] = run(trace, lambda: Recorder(logs[general]), slots, scope, reset, general)
    assert out[False] == out[True]
    assert logs[False] == logs[True]
    assert any(e[0] == "victim" for e in logs[False])


@pytest.mark.parametrize("policy", [LRU, FIFO, LFU, Belady])
@pytest.mark.parametrize("scope, slots", [("per_layer", 12), ("global", 7)])
def test_fused_loop_counts_as_the_general_loop(policy, scope, slots):
    for seed in range(3):
        trace = random_trace(seed)
        assert run(trace, policy, slots, scope, True, False) == run(trace, policy, slots, scope, True, True)


def test_bad_victim_is_caught_in_the_fused_loop():
    class Bad(Recorder):
        def victim(self, candidates):
            return (0, 99)

    with pytest.raises(RuntimeError, match="Bad.victim returned"):
        hit_counts(random_trace(0), lambda: Bad([]), 3, "global")
