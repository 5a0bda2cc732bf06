"""Speed of the hook driver: a user's own Python cache policy (not built in, so never compiled) replayed
cache-only through `moesim.engine.hit_counts`, against a plain OrderedDict LRU loop over the same requests.

    python -m pytest tests/bench/test_bench_hooks.py -s                     # floor enforced, ratios printed
    python -m pytest tests/bench/test_bench_hooks.py --benchmark-enable     # + timings for --benchmark-compare

`UserLRU` below is what a user writes against the CachePolicy protocol (cachetools style, as strategies/lru.py);
`plain_lru` is an OrderedDict per layer with the same decisions inline and no driver at all (the test checks
that both count the same hits). The traces: the whole real gpt-oss-20b trace (155,103 tokens x 24 layers,
top-4; shipped in traces/) and the synthetic gpt-oss-like preset (29,664 tokens), both at
25% (8 slots per layer). Issue 12's goal: the user policy's whole run at most 3x the plain loop's time.
The ratio asserted is the reference's time / ours (higher is faster, as in the other files here), the best of
ROUNDS interleaved rounds timed with time.perf_counter, so the floor holds in plain `pytest` too
(--benchmark-disable times nothing). docs/ci.md lists the measured ratios.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Iterable

import numpy as np
import pytest

from strategies import CachePolicy, Key

BUDGET = "25%"  # 192 slots of gpt-oss-20b's 24 x 32: 8 per layer
SLOTS_PER_LAYER = 8
ROUNDS = 3
# reference time / ours; issue 12's goal is 1/3 (ours at most 3x the plain loop). Measured on the shared 2-core machine
# (load 1.2-3, 6 runs, docs/ci.md): 0.379-0.402 on the real trace, 0.389-0.410 on the synthetic one; 0.153 and 0.138
# with the driver before it was made lean. Both sides are plain Python, so load moves them alike; the floor (ours at
# most 3.33x) leaves 20% below the worst run for noise and fails once a replay is ~25% slower than that run.
HOOKS_FLOOR = 0.3


class UserLRU(CachePolicy):
    """A user's LRU, written against the protocol only: an OrderedDict from least to most recently used."""

    def setup(self, ctx) -> None:
        self.order: OrderedDict[Key, None] = OrderedDict()

    def on_access(self, pos: int, keys: Iterable[Key]) -> None:
        move = self.order.move_to_end
        for key in keys:
            move(key)

    def on_insert(self, pos: int, key: Key, prefetched: bool) -> None:
        self.order[key] = None

    def on_evict(self, key: Key) -> None:
        del self.order[key]

    def victim(self, candidates) -> Key:
        for key in self.order:  # the running layer's keys are the most recent: few are skipped
            if key in candidates:
                return key
        raise ValueError("UserLRU.victim: no candidate")


def layer_requests(trace) -> list[list[int]]:
    """Per (token, layer) of a batch-1 trace, in replay order: the expert ids the layer needs."""
    assert trace.n_steps == trace.n_tokens, "the reference replays batch-1 traces"
    e = np.asarray(trace.experts)
    return [[x for x in row if x >= 0] for row in e.reshape(-1, e.shape[2]).tolist()]


def plain_lru(requests: list[list[int]], n_layers: int, slots: int) -> int:
    """Hits of one LRU of `slots` per layer: a request's hits move to the back first, then each miss evicts
    the front-most key the request does not hold."""
    caches = [OrderedDict() for _ in range(n_layers)]
    hits = 0
    for pos, ids in enumerate(requests):
        c = caches[pos % n_layers]
        for e in ids:
            if e in c:
                c.move_to_end(e)
                hits += 1
        for e in ids:
            if e not in c:
                if len(c) >= slots:
                    for victim in c:
                        if victim not in ids:
                            break
                    del c[victim]
                c[e] = None
    return hits


@pytest.fixture(scope="module", params=["gpt-oss-20b", "gpt-oss-like"])
def trace(request):
    if request.param == "gpt-oss-20b":
        return request.getfixturevalue("real_trace")  # the shipped trace (traces/)
    from moesim.importers import open_trace

    return open_trace("gpt-oss-like")


def test_bench_user_policy_cache_only(benchmark, trace):
    from moesim.engine import hit_counts
    from moesim.units import parse_budget

    slots = parse_budget(BUDGET, trace.spec, "per_layer").slots
    assert slots == SLOTS_PER_LAYER * trace.n_layers
    requests = layer_requests(trace)
    fns = {"ours": lambda: hit_counts(trace, UserLRU, slots).to_dict(),
           "reference": lambda: plain_lru(requests, trace.n_layers, SLOTS_PER_LAYER)}
    best, out = dict.fromkeys(fns, float("inf")), {}
    for _ in range(ROUNDS):  # in turn, so that load from other processes hits both alike
        for name, fn in fns.items():
            t0 = time.perf_counter()
            out[name] = fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    if benchmark.disabled:
        benchmark(lambda: None)  # keeps the fixture used; costs nothing
    else:
        benchmark.pedantic(fns["ours"], rounds=1)
    assert out["ours"]["hits"] == out["reference"], "plain_lru must decide as UserLRU through the driver"
    n = out["ours"]["requests"]
    ratio = best["reference"] / best["ours"]
    benchmark.extra_info.update(trace=trace.spec.name, tokens=trace.n_tokens, requests=n, ours_s=best["ours"],
                                reference_s=best["reference"], ratio=ratio, floor=HOOKS_FLOOR)
    detail = (f"{trace.n_tokens} tokens, {n / best['ours'] / 1e6:.3f} M requests/s against plain_lru's "
              f"{n / best['reference'] / 1e6:.3f}: ours takes {best['ours'] / best['reference']:.2f}x its time")
    print(f"\nuser policy through the hook driver: {detail}, ratio {ratio:.3g} (floor {HOOKS_FLOOR})")
    assert ratio >= HOOKS_FLOOR, (f"user policy through the hook driver: {detail}: ratio {ratio:.3g}, below the "
                                  f"floor {HOOKS_FLOOR} (docs/ci.md)")
