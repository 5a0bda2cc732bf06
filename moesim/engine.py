"""The Python replay driver: every step of a trace, through a strategy, onto a backend. `python -m moesim run`.

    python -m moesim run strategy=lru                       # embedded default: synthetic GPT-OSS-like trace
    python -m moesim run strategy=lru fast=false            # this loop, also for built-in strategies

Built-in strategies run in the compiled core (moesim/core/; moesim.api.replay_parts picks the driver): on the
sim backend wholly, on the torch backend through `play`, which feeds the core's recorded decisions to it.
`replay` runs what the core cannot: a user's own Python cache policy, prefetcher or offload policy (the hooks
of strategies/: CachePolicy, Prefetcher, OffloadPolicy), and a torch run whose max_inflight cap reads the
backend's own copy queue. Requests are encoded once as lists of shared key tuples (`key_table`), so no tuple
is built per request.

Per step and per layer (position `pos = step * L + layer`): the layer's distinct experts are looked up
(all pinned while the layer computes), each miss is fetched into the cache (the policy picks a victim) or,
if the offload policy says so, computed on the host (and with "host_and_load" also copied into the cache in
the background) or streamed (copied into a scratch slot past the cache's, computed, dropped: the cache never
sees it); the backend computes the layer; the cache unpins.
A layer that needs more distinct experts than its slots (a prefill chunk, a large batch) runs in waves of
at most that many experts, hits first, each wave pinned while it computes.
Prefetch: once a layer is routed, the prefetcher observes its experts and predicts keys of later layers;
after the layer's own misses are issued and before it computes, those not resident are loaded (prefetched)
through the same cache mechanism, the predicted keys pinned meanwhile so one prefetch does not evict
another, until the copy engine holds `max_inflight`. Their copies overlap the layer's compute.
With no backend, prefetcher or offload policy (`hit_counts`: the cache-only replay policies are tested and
compared with) runs of batch-1 steps go through `Cache.serve_rows`, the same decisions in one fused loop
whose only calls per request are the policy's hooks: a user's OrderedDict LRU takes about 2.5x the time of a
plain OrderedDict loop over the same requests (tests/bench/test_bench_hooks.py).
"""
from __future__ import annotations

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
    was chosen by one token (batch-1 steps). Reads the trace `chunk` tokens at a time. For readers of the
    requests as expert ids; the replay itself reads them as keys (`key_steps`, `Cache.serve_rows`)."""
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


ROWS_PER_CALL = 16  # batch-1 tokens handed to Cache.serve_rows at once: their key lists die young, so the
#                    cyclic GC never promotes them (8192 at once cost ~15% of a user policy's replay in GC)
ENCODE_TOKENS = 4096  # tokens of the trace turned into key-table indices by one numpy operation


def key_table(n_layers: int, n_experts: int) -> np.ndarray:
    """object [L * E + 1]: the key (layer, expert) at layer * E + expert, None at L * E (where ids are -1).
    Every request of a replay holds these same tuples: none is built per request."""
    table = np.empty(n_layers * n_experts + 1, dtype=object)
    table[:-1] = [(layer, e) for layer in range(n_layers) for e in range(n_experts)]
    return table


def _key_rows(trace: Trace, lo: int, hi: int) -> tuple[np.ndarray, bool]:
    """(indices into key_table [hi - lo, L, K], whether any id was -1) of tokens lo .. hi."""
    L, E = trace.n_layers, trace.spec.experts
    ids = np.asarray(trace.experts[lo:hi])  # int16 [n, L, K]
    idx = ids.astype(np.intp) + (np.arange(L, dtype=np.intp) * E)[:, None]
    pad = ids < 0
    if pad.any():
        idx[pad] = L * E
        return idx, True
    return idx, False


def _unpadded(rows: list) -> list:
    """rows [t][layer] of keys with the padding (None where the trace holds -1) left out."""
    return [[[k for k in r if k is not None] for r in row] for row in rows]


def key_steps(trace: Trace, table: np.ndarray | None = None, chunk: int = 256):
    """Per step, as `step_requests` but with keys: (step index, first token, n_tokens, [per layer: keys],
    [per layer: counts] or None). Keys are the `key_table` tuples, distinct per layer in order of first
    appearance; counts (tokens per key) is None for a batch-1 step (one token each)."""
    table = key_table(trace.n_layers, trace.spec.experts) if table is None else table
    starts = trace.step_starts
    s, n_steps = 0, len(starts) - 1
    while s < n_steps:
        lo = int(starts[s])
        e = s + 1
        while e < n_steps and starts[e + 1] - lo <= chunk:  # whole steps only
            e += 1
        idx, pad = _key_rows(trace, lo, int(starts[e]))
        rows = table[idx].tolist()  # [n][L][K] keys
        if pad:
            rows = _unpadded(rows)
        for i in range(s, e):
            a, b = int(starts[i]) - lo, int(starts[i + 1]) - lo
            if b - a == 1:
                yield i, a + lo, 1, rows[a], None
            else:
                merged = [_merge_keys([rows[t][layer] for t in range(a, b)]) for layer in range(trace.n_layers)]
                yield i, a + lo, b - a, [m[0] for m in merged], [m[1] for m in merged]
        s = e


def _merge_keys(layer_rows: list[list[Key]]) -> tuple[list[Key], list[int]]:
    """Distinct keys of several tokens' rows in order of first appearance, and how many tokens chose each."""
    count: dict[Key, int] = {}
    for r in layer_rows:
        for k in r:
            count[k] = count.get(k, 0) + 1
    return list(count), list(count.values())


def reset_steps(trace: Trace) -> set[int]:
    """Steps at which `reset_per_seq` empties the cache: those holding a sequence's first token, but the first."""
    _, first = np.unique(np.asarray(trace.seq), return_index=True)  # first token of each sequence
    steps = np.searchsorted(trace.step_starts, first, side="right") - 1
    return set(steps.tolist()) - {0}


def replay(trace: Trace, cache: Cache, backend=None, prefetcher: Prefetcher | None = None,
           offload: OffloadPolicy | None = None, cost=None, reset_per_seq: bool = False,
           prefetch_max: int | None = None, progress: bool = False, disk=None) -> Counters:
    """Replay `trace` through `cache` (and `backend`, if given). Returns the cache's counters; what became
    of prefetches is in `cache.prefetch`, the backend's served-request counts in `backend.request_stats()`.

    `prefetch_max`: at most this many keys of each `predict` are loaded (None: all it returns; 0: the
    prefetcher observes but is not asked). `disk`: the disk tier (moesim.disk.DiskTier): each device miss
    needs its expert in host memory, read from disk where the host cache misses it (backend.read)."""
    policy = cache.partitions[0].policy
    if (backend is None and prefetcher is None and offload is None and disk is None and not progress
            and not cache.prefetch.unused
            and not cache.pinned and min(p.capacity for p in cache.partitions) >= trace.experts.shape[2]
            and not getattr(policy, "refuses", False)):
        _replay_cache_only(trace, cache, reset_per_seq)
        return cache.counters
    L = trace.n_layers
    resets = reset_steps(trace) if reset_per_seq else ()
    if prefetcher is not None:
        prefetcher.setup(Context(trace, trace.spec, tuple(range(L)), cache.n_slots, cache.scope))
    if offload is not None:
        offload.setup(Context(trace, trace.spec, tuple(range(L)), cache.n_slots, cache.scope))
    scratch = (cache.n_slots, scratch_slots(trace.spec, policy, offload))
    if offload is not None and backend is not None:
        backend.host_after_device = bool(offload.host_after_device)
    ask = prefetcher is not None and prefetch_max != 0
    ahead = None  # keys to prefetch once the current layer's misses are issued
    nbytes = cache.spec.bytes_per_expert  # the stored size (model.scale and dtype apply)
    pf_cap = _inflight_cap(prefetcher, backend, "prefetch.max_inflight", nbytes) if ask else None
    host_cap = _inflight_cap(offload, backend, "offload.max_inflight", nbytes) if offload is not None else None
    steps = key_steps(trace)
    route = getattr(backend, "route", None)  # optional: a backend written before it, or for tests, may lack it
    if getattr(route, "__func__", None) is Backend.route:  # the base's no-op (sim): no trace slices per step
        route = None
    if progress:
        from .progress import progress as bar

        steps = bar(steps, total=trace.n_steps, unit="step", desc="replay")
    caps = [cache.capacity_of(layer) for layer in range(L)]
    begin_layer = getattr(backend, "begin_layer", None)  # a backend written before it may lack it
    for s, start, n_tokens, keys_of, counts_of in steps:
        if s in resets:
            cache.reset()
        if offload is not None:
            offload.begin_step(n_tokens)
        if backend is not None:
            backend.begin_step(s, n_tokens)
            if route is not None:
                route(trace.experts[start:start + n_tokens], trace.weights[start:start + n_tokens])
        pos = s * L
        for layer, keys in enumerate(keys_of):
            if begin_layer is not None:
                begin_layer(layer)
            if prefetcher is not None:  # the layer is routed: its experts are known before they compute
                prefetcher.observe(pos, layer, [k[1] for k in keys])
                if ask:
                    ahead = prefetcher.predict(pos, layer)
                    if prefetch_max is not None:
                        ahead = ahead[:prefetch_max]
            ns = counts_of[layer] if counts_of is not None else None
            if len(keys) <= caps[layer]:
                _serve(cache, backend, offload, cost, pos, layer, keys, ns, ahead, pf_cap, host_cap, scratch, disk)
            else:
                _serve_waves(cache, backend, offload, cost, pos, layer, keys, ns, ahead, pf_cap, host_cap, scratch,
                             disk)
            pos += 1
        if backend is not None:
            backend.end_step()
    if backend is not None:
        backend.finish()
    return cache.counters


def _replay_cache_only(trace: Trace, cache: Cache, reset_per_seq: bool) -> None:
    """`replay` with no backend, prefetcher or offload policy: runs of batch-1 steps go through
    Cache.serve_rows (the miss path fused into one loop; the policy's hooks are the only calls per request),
    wider steps through `_serve` (or `_serve_waves`); resets where `replay` makes them. Needs every partition
    to hold top-k."""
    L = trace.n_layers
    table = key_table(L, trace.spec.experts)
    starts = trace.step_starts
    sizes = np.diff(starts)
    n_steps = len(sizes)
    resets = reset_steps(trace) if reset_per_seq else set()
    # the steps a run of batch-1 steps ends at: a wider step, a reset, the end
    stops = sorted(set(np.flatnonzero(sizes != 1).tolist()) | resets) + [n_steps]
    s = 0
    for b in stops:
        pos = s * L
        for lo in range(int(starts[s]), int(starts[b]), ENCODE_TOKENS):  # batch-1 steps s .. b - 1: one token each
            idx, pad = _key_rows(trace, lo, min(lo + ENCODE_TOKENS, int(starts[b])))
            for a in range(0, len(idx), ROWS_PER_CALL):
                rows = table[idx[a:a + ROWS_PER_CALL]].tolist()  # [t][layer] keys
                pos = cache.serve_rows(pos, _unpadded(rows) if pad else rows)
        if b == n_steps:
            break
        if b in resets:
            cache.reset()
        if sizes[b] == 1:  # a batch-1 step where a sequence starts: it begins the next run
            s = b
            continue
        lo, hi = int(starts[b]), int(starts[b + 1])
        idx, pad = _key_rows(trace, lo, hi)
        rows = table[idx].tolist()
        if pad:
            rows = _unpadded(rows)
        pos = b * L
        for layer in range(L):
            keys, ns = _merge_keys([r[layer] for r in rows])
            if len(keys) <= cache.capacity_of(layer):
                _serve(cache, None, None, None, pos + layer, layer, keys, ns)
            else:
                _serve_waves(cache, None, None, None, pos + layer, layer, keys, ns)
        s = b + 1


def _serve_waves(cache: Cache, backend, offload, cost, pos: int, layer: int, keys: list[Key], ns: list[int] | None,
                 ahead: list[Key] | None = None, pf_cap: int | None = None, host_cap: int | None = None,
                 scratch: tuple[int, int] | None = None, disk=None) -> None:
    """A layer that needs more distinct keys than its slots (prefill, big batches): `_serve` in waves of at
    most that many keys, hits first, each wave pinned while it computes; `ahead` with the first."""
    cap = cache.capacity_of(layer)
    ns = ns or [1] * len(keys)
    order = sorted(range(len(keys)), key=lambda i: not cache.is_resident(keys[i]))  # hits first
    for w in range(0, len(order), cap):
        wave = order[w:w + cap]
        _serve(cache, backend, offload, cost, pos, layer, [keys[i] for i in wave], [ns[i] for i in wave],
               ahead if w == 0 else None, pf_cap, host_cap, scratch, disk)


def _serve(cache: Cache, backend, offload, cost, pos: int, layer: int, keys: list[Key], ns: list[int] | None,
           ahead: list[Key] | None = None, pf_cap: int | None = None, host_cap: int | None = None,
           scratch: tuple[int, int] | None = None, disk=None) -> None:
    """One layer's keys `keys` (chosen by `ns` tokens each; None: one each): look up (pinning them), fetch,
    host-compute or stream each miss, prefetch `ahead`, compute, unpin. `scratch`: (first scratch slot, count).
    `disk`: each miss is first read from disk where the host cache misses it (moesim/disk.py)."""
    misses = cache.lookup(pos, layer, keys)
    if ns is None and (offload is not None or backend is not None):
        ns = [1] * len(keys)
    host: list[tuple[Key, int]] = []
    streamed: dict[Key, int] = {}  # key -> scratch slot
    for key in misses:
        if disk is not None:  # its copy, or its host compute, reads it from host memory
            _read(disk, backend, pos, key)
        if offload is not None:
            n = ns[keys.index(key)]
            decision = offload.on_miss(key, n, cost)
            if decision == "stream":
                if not scratch or scratch[1] <= 0:
                    raise MoesimError(f"{type(offload).__name__}.on_miss returned 'stream' but its "
                                      f"scratch_slots() is 0: it must name the scratch slots it streams into")
                _stream(cache, backend, key, streamed, scratch)
                continue
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
                                  f"'fetch', 'host', 'host_and_load' or 'stream'")
        got = cache.insert(pos, key)
        if got is None:  # nothing may be evicted: pinned (a bug: a demand miss always has room) or refused
            if not getattr(cache.partitions[cache.part_of_layer[layer]].policy, "refuses", False):
                raise RuntimeError(f"no slot for demand miss {key} at position {pos}: every resident is pinned")
            _stream(cache, backend, key, streamed, scratch)
            continue
        if backend is not None:
            backend.load(key, got[0], False)
    if ahead:
        _prefetch(cache, backend, ahead, pos, pf_cap, disk)
    if backend is not None:
        slot = cache.partitions[cache.part_of_layer[layer]].resident  # key -> slot (Cache.slot_of, once per layer)
        if streamed:
            slot = {**slot, **streamed}
        if host:
            hosted = {k for k, _ in host}
            device = [(k, slot[k], n) for k, n in zip(keys, ns) if k not in hosted]
        else:
            device = [(k, slot[k], n) for k, n in zip(keys, ns)]
        backend.compute(layer, device, host)
    cache.release()


def _stream(cache: Cache, backend, key: Key, streamed: dict, scratch: tuple[int, int]) -> None:
    """Copy `key` into the next scratch slot (the layer's streamed experts take them in turn), for this layer only:
    the cache never holds it."""
    streamed[key] = s = scratch[0] + len(streamed) % scratch[1]
    cache.counters.streams += 1
    if backend is not None:
        backend.load(key, s, False)


def scratch_slots(spec, policy, offload) -> int:
    """Device slots past the cache's for streamed experts: the offload policy's (OffloadPolicy.scratch_slots), or
    a layer's experts where the cache policy may refuse to evict (CachePolicy.refuses)."""
    n = offload.scratch_slots(spec) if offload is not None else 0
    return max(n, spec.experts) if getattr(policy, "refuses", False) else n


def _read(disk, backend, pos: int, key: Key) -> None:
    """The disk tier: `key` read from disk into host memory where the host cache misses it."""
    miss, slot = disk.need(pos, key)
    if miss and backend is not None:
        backend.read(key, slot)


def _prefetch(cache: Cache, backend, keys: list[Key], pos: int, cap: int | None = None, disk=None) -> None:
    """Load the keys of `keys` that are not resident, in order, marked prefetched, while the copy engine
    holds less than `cap` bytes. The predicted keys are pinned meanwhile (with the running layer's), so a
    prefetch never evicts a key the same prediction wants; a key whose partition is all pinned is skipped."""
    parts, part_of = cache.partitions, cache.part_of_layer
    missing = [k for k in keys if k not in parts[part_of[k[0]]].resident]
    if not missing:  # a good prediction is mostly resident already
        return
    pinned = cache.pinned
    added = [k for k in keys if k not in pinned]
    cache.pin(added)
    nbytes = cache.spec.bytes_per_expert
    try:
        for key in missing:
            if key in parts[part_of[key[0]]].resident:  # listed twice in `keys`
                continue
            if not _room(backend, cap, nbytes):
                break
            got = cache.insert(pos, key, prefetched=True)
            if got is not None:
                if disk is not None:
                    _read(disk, backend, pos, key)
                if backend is not None:
                    backend.load(key, got[0], True)
    finally:
        cache.unpin(added)


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


def drive(trace: Trace, spec, n_slots: int, scope: str, make_policy: Callable[[], CachePolicy], backend,
          prefetcher: Prefetcher | None = None, offload: OffloadPolicy | None = None, cost=None,
          reset_per_seq: bool = False, prefetch_max: int | None = None, progress: bool = False, disk=None):
    """A timed replay on `backend` (set up here with `spec` and `n_slots`): (cache, profiler, counters). What
    moesim.api.execute does for the Python driver, and what the fidelity check and calibrate do per backend."""
    from .profiler import Profiler

    cache = Cache(spec, n_slots, scope, make_policy, trace)
    profiler = Profiler(spec.layers)
    if disk is not None:  # before setup: the backend's host memory is then the host cache's slots
        if not hasattr(backend, "read"):
            raise MoesimError(f"disk.storage: backend {getattr(backend, 'name', type(backend).__name__)} does not "
                              f"read experts from disk; use backend=sim or backend=torch")
        backend.setup_disk(disk.storage, disk.n_slots)
    backend.setup(spec, n_slots + scratch_slots(spec, cache.partitions[0].policy, offload), profiler)
    counters = replay(trace, cache, backend, prefetcher, offload, cost, reset_per_seq=reset_per_seq,
                      prefetch_max=prefetch_max, progress=progress, disk=disk)
    return cache, profiler, counters


def play(trace: Trace, backend, script, progress: bool = False) -> None:
    """Run the decisions the compiled core made (moesim.core.Script, from `core.simulate(record=True)`) on
    `backend`, set up already: the same calls, in the same order, as `replay` makes with the same parts
    where no decision depends on the backend's clock (tests/test_core.py holds them equal call for call).
    How the torch backend runs built-in strategies: the core decides, the backend moves the weights."""
    E = trace.spec.experts
    keys = key_table(trace.n_layers, E).reshape(-1).tolist()  # key id -> (layer, expert)
    copies = script.copies.tolist()
    waves = script.waves.tolist()
    served = script.served.tolist()
    route = getattr(backend, "route", None)
    if getattr(route, "__func__", None) is Backend.route:
        route = None
    starts = trace.step_starts
    begin_layer = getattr(backend, "begin_layer", None)
    c = v = r = 0  # next copy, wave, served row
    step_ends = enumerate(script.step_waves.tolist())
    if progress:
        from .progress import progress as bar

        step_ends = bar(step_ends, total=trace.n_steps, unit="step", desc="replay")
    for s, end in step_ends:
        lo, hi = int(starts[s]), int(starts[s + 1])
        backend.begin_step(s, hi - lo)
        if route is not None:
            route(trace.experts[lo:hi], trace.weights[lo:hi])
        prev = -1
        while v < end:
            layer, issued, last = waves[v]
            if layer != prev and begin_layer is not None:  # a layer's first wave
                begin_layer(layer)
                prev = layer
            for layer_c, expert, slot, prefetch in copies[c:issued]:
                backend.load(keys[layer_c * E + expert], slot, bool(prefetch))
            c = issued
            device = [(keys[k], slot, n) for k, slot, n, host in served[r:last] if not host]
            host = [(keys[k], n) for k, _, n, on_host in served[r:last] if on_host]
            backend.compute(layer, device, host)
            r, v = last, v + 1
        backend.end_step()
    backend.finish()
