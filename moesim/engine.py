"""The replay loop: every step of a trace, through a strategy, onto a backend. `python -m moesim run`.

    python -m moesim run strategy=lru                       # embedded default: synthetic GPT-OSS-like trace
    python -m moesim run strategy=belady budget=192 trace=../shared/traces/gpt-oss-20b hardware=h200

Per step and per layer (position `pos = step * L + layer`): the layer's distinct experts are looked up
(all pinned while the layer computes), each miss is fetched into the cache (the policy picks a victim) or,
if the offload policy says so, computed on the host (and with "host_and_load" also copied into the cache in
the background); the backend computes the layer; the cache unpins.
A layer that needs more distinct experts than its slots (a prefill chunk, a large batch) runs in waves of
at most that many experts, hits first, each wave pinned while it computes.
Prefetch: once a layer is routed, the prefetcher observes its experts and predicts keys of later layers;
after the layer's own misses are issued and before it computes, those not resident are loaded (prefetched)
through the same cache mechanism, the predicted keys pinned meanwhile so one prefetch does not evict
another, until the copy engine holds `max_inflight`. Their copies overlap the layer's compute.
With `backend=None` the same loop only counts hits (the cache-only replay that policies are tested with).
"""
from __future__ import annotations

import sys
from typing import Callable

import numpy as np

from strategies import CachePolicy, Context, Key, OffloadPolicy, Prefetcher

from .backends import Backend
from .cache import Cache, Counters
from .errors import MoesimError
from .trace import Trace
from .units import Budget, parse_budget, parse_inflight


def step_requests(trace: Trace, chunk: int = 8192):
    """Per step: (step index, first token, n_tokens, [per layer: (ids, counts)]) in trace order, as Python
    lists (the loop is faster on lists than on small arrays); `counts` (tokens per id) is None when each id
    was chosen by one token (batch-1 steps). Reads the trace `chunk` tokens at a time."""
    starts = trace.step_starts
    experts = trace.experts
    s, n_steps = 0, len(starts) - 1
    while s < n_steps:
        lo = int(starts[s])
        e = s + 1
        while e < n_steps and starts[e + 1] - lo <= chunk:  # whole steps only
            e += 1
        rows = np.asarray(experts[lo:int(starts[e])]).tolist()  # [n, L, K]
        for i in range(s, e):
            a, b = int(starts[i]) - lo, int(starts[i + 1]) - lo
            if b - a == 1:  # batch-1 decode: the row itself (ids are unique per row)
                req = [([x for x in r if x >= 0], None) for r in rows[a]]
            else:
                req = [_merge([rows[t][layer] for t in range(a, b)]) for layer in range(trace.n_layers)]
            yield i, a + lo, b - a, req
        s = e


def _merge(layer_rows: list[list[int]]) -> tuple[list[int], list[int]]:
    """Distinct ids of several tokens' rows in order of first appearance, and how many tokens chose each."""
    count: dict[int, int] = {}
    for r in layer_rows:
        for x in r:
            if x >= 0:
                count[x] = count.get(x, 0) + 1
    return list(count), list(count.values())


def replay(trace: Trace, cache: Cache, backend=None, prefetcher: Prefetcher | None = None,
           offload: OffloadPolicy | None = None, cost=None, reset_per_seq: bool = False,
           prefetch_max: int | None = None, progress: bool = False) -> Counters:
    """Replay `trace` through `cache` (and `backend`, if given). Returns the cache's counters; what became
    of prefetches is in `cache.prefetch`, the backend's served-request counts in `backend.request_stats()`.

    `prefetch_max`: at most this many keys of each `predict` are loaded (None: all it returns; 0: the
    prefetcher observes but is not asked)."""
    L = trace.n_layers
    seq = np.asarray(trace.seq)
    seen_seqs: set[int] = set()
    if prefetcher is not None:
        prefetcher.setup(Context(trace, trace.spec, tuple(range(L)), cache.n_slots, cache.scope))
    if offload is not None:
        offload.setup(Context(trace, trace.spec, tuple(range(L)), cache.n_slots, cache.scope))
    ask = prefetcher is not None and prefetch_max != 0
    ahead = None  # keys to prefetch once the current layer's misses are issued
    nbytes = cache.spec.bytes_per_expert  # the stored size (model.scale and dtype apply)
    pf_cap = _inflight_cap(prefetcher, backend, "prefetch.max_inflight", nbytes) if ask else None
    host_cap = _inflight_cap(offload, backend, "offload.max_inflight", nbytes) if offload is not None else None
    steps = step_requests(trace)
    route = getattr(backend, "route", None)  # optional: a backend written before it, or for tests, may lack it
    if getattr(route, "__func__", None) is Backend.route:  # the base's no-op (sim): no trace slices per step
        route = None
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, total=trace.n_steps, unit="step", desc="replay", file=sys.stderr,
                     disable=None, mininterval=0.5)
    for s, start, n_tokens, requests in steps:
        if reset_per_seq:
            new = set(seq[start:start + n_tokens].tolist()) - seen_seqs
            if new:
                if seen_seqs:
                    cache.reset()
                seen_seqs |= new
        if backend is not None:
            backend.begin_step(s, n_tokens)
            if route is not None:
                route(trace.experts[start:start + n_tokens], trace.weights[start:start + n_tokens])
        for layer, (ids, counts) in enumerate(requests):
            pos = s * L + layer
            ns = counts or [1] * len(ids)
            cap = cache.capacity_of(layer)
            if prefetcher is not None:  # the layer is routed: its experts are known before they compute
                prefetcher.observe(pos, layer, ids)
                if ask:
                    ahead = prefetcher.predict(pos, layer)
                    if prefetch_max is not None:
                        ahead = ahead[:prefetch_max]
            if len(ids) <= cap:
                _serve(cache, backend, offload, cost, pos, layer, ids, ns, ahead, pf_cap, host_cap)
            else:  # more distinct experts than the layer's slots (prefill, big batches): stream in waves
                order = sorted(range(len(ids)), key=lambda i: not cache.is_resident((layer, ids[i])))  # hits first
                for w in range(0, len(order), cap):
                    wave = order[w:w + cap]
                    _serve(cache, backend, offload, cost, pos, layer, [ids[i] for i in wave], [ns[i] for i in wave],
                           ahead if w == 0 else None, pf_cap, host_cap)
        if backend is not None:
            backend.end_step()
    if backend is not None:
        backend.finish()
    return cache.counters


def _serve(cache: Cache, backend, offload, cost, pos: int, layer: int, ids: list[int], ns: list[int],
           ahead: list[Key] | None = None, pf_cap: int | None = None, host_cap: int | None = None) -> None:
    """One layer's experts `ids` (chosen by `ns` tokens each): look up (pinning them), fetch or host-compute
    each miss, prefetch `ahead`, compute, unpin."""
    keys = [(layer, e) for e in ids]
    misses = cache.lookup(pos, layer, keys)
    host: list[tuple[Key, int]] = []
    for key in misses:
        if offload is not None:
            n = ns[ids.index(key[1])]
            decision = offload.on_miss(key, n, cost)
            if decision == "host" or decision == "host_and_load":
                host.append((key, n))
                cache.counters.host_computes += 1
                if decision == "host_and_load" and _room(backend, host_cap, cache.spec.bytes_per_expert):
                    got = cache.insert(pos, key)  # a background copy for later requests; nobody waits for it
                    if got is not None and backend is not None:
                        backend.load(key, got[0], False)
                continue
            if decision != "fetch":
                raise MoesimError(f"{type(offload).__name__}.on_miss returned {decision!r}; expected "
                                  f"'fetch', 'host' or 'host_and_load'")
        slot, _ = cache.insert(pos, key)
        if backend is not None:
            backend.load(key, slot, False)
    if ahead:
        _prefetch(cache, backend, ahead, pos, pf_cap)
    if backend is not None:
        if host:
            hosted = {k for k, _ in host}
            device = [(k, cache.slot_of(k), n) for k, n in zip(keys, ns) if k not in hosted]
        else:
            device = [(k, cache.slot_of(k), n) for k, n in zip(keys, ns)]
        backend.compute(layer, device, host)
    cache.release()


def _prefetch(cache: Cache, backend, keys: list[Key], pos: int, cap: int | None = None) -> None:
    """Load the keys of `keys` that are not resident, in order, marked prefetched, while the copy engine
    holds less than `cap` bytes. The predicted keys are pinned meanwhile (with the running layer's), so a
    prefetch never evicts a key the same prediction wants; a key whose partition is all pinned is skipped."""
    parts, part_of = cache.partitions, cache.part_of_layer
    missing = [k for k in keys if k not in parts[part_of[k[0]]].resident]
    if not missing:  # a good prediction is mostly resident already
        return
    pinned = cache.pinned
    added = [k for k in keys if k not in pinned]
    pinned.update(added)
    nbytes = cache.spec.bytes_per_expert
    try:
        for key in missing:
            if key in parts[part_of[key[0]]].resident:  # listed twice in `keys`
                continue
            if not _room(backend, cap, nbytes):
                break
            got = cache.insert(pos, key, prefetched=True)
            if got is not None and backend is not None:
                backend.load(key, got[0], True)
    finally:
        pinned.difference_update(added)


def _room(backend, cap: int | None, nbytes: int) -> bool:
    """Whether one more copy of `nbytes` fits under `cap` bytes queued on the backend's copy engine."""
    return cap is None or backend is None or backend.inflight_bytes() + nbytes <= cap


def _inflight_cap(policy, backend, where: str, bytes_per_expert: int) -> int | None:
    """The policy's `max_inflight` in bytes, checked against what the backend can report."""
    cap = parse_inflight(getattr(policy, "max_inflight", None), bytes_per_expert, where)
    if cap is not None and backend is not None and not hasattr(backend, "inflight_bytes"):
        raise MoesimError(f"{where}: backend {getattr(backend, 'name', type(backend).__name__)} cannot report "
                          f"the bytes of copies in flight; use backend=sim or set {where}=null")
    return cap


def hit_counts(trace: Trace, make_policy: Callable[[], CachePolicy], budget, scope: str = "per_layer",
               reset_per_seq: bool = False) -> Counters:
    """Cache-only replay (no timing): the counters of `make_policy` under `budget` and `scope`."""
    b = budget if isinstance(budget, Budget) else parse_budget(budget, trace.spec, scope)
    cache = Cache(trace.spec, b.slots, scope, make_policy, trace)
    return replay(trace, cache, reset_per_seq=reset_per_seq)
