"""Residency of routed experts in device memory: slots, scope, pinning, the one miss path, counters.

    cache = Cache(spec, n_slots=192, scope="per_layer", make_policy=LRU, trace=trace)
    misses = cache.lookup(pos, layer, keys)     # pins `keys`; the policy sees the hits
    for key in misses: slot, evicted = cache.insert(pos, key)
    cache.release()                             # the layer has computed: unpin

The mechanism of the Python driver (moesim/engine.py), which runs a user's Python policy, prefetcher or
offload policy and the torch backend; built-in strategies run compiled (moesim/core/) with the same rules.
The cache owns capacity, scope, pinning and counters; a policy (strategies/) only chooses victims among
the keys that are resident in its partition and not pinned. In `per_layer` scope each layer owns an equal
share of the slots (budget // layers; the remainder stays unused and is reported); in `global` scope one
pool serves all layers. Slots are indices into the device pool a backend allocates once.
`cache.prefetch` follows each prefetched key to its first request (used) or its eviction (wasted).
A partition keeps its candidates (resident, not pinned) as a set updated on every insert, eviction, pin and
release, so `key in candidates` in a policy's `victim` is one C-level lookup. `serve_rows` is `lookup`,
`insert` and `release` fused into one loop for cache-only runs of batch-1 steps (tests/test_hooks.py holds
it to the general path, call for call).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

from strategies import CachePolicy, Context, Key

from .errors import MoesimError
from .trace import ModelSpec, Trace
from .units import SCOPES


class _Candidates(set):
    """Keys of one partition that are resident and not pinned (what a policy may evict). A set the cache keeps
    up to date as keys are inserted, evicted, pinned and released, so `key in candidates` (every policy's hot
    path) is one C-level lookup; iteration follows the partition's resident order (insertion order), as a
    policy that breaks ties by iterating expects. Policies must not change it."""

    __slots__ = ("resident", "pos")

    def __init__(self, resident: dict):
        super().__init__()
        self.resident = resident  # the partition's Key -> slot, in insertion order
        self.pos = -1  # the request position the eviction happens at

    def __iter__(self) -> Iterator[Key]:
        return (k for k in self.resident if k in self)


@dataclass
class Partition:
    capacity: int
    layers: tuple[int, ...]
    policy: CachePolicy
    slots: list[int]  # the device slots this partition owns
    resident: dict = field(default_factory=dict)  # Key -> slot
    free: list = field(default_factory=list)  # free slots
    candidates: _Candidates = None  # resident and not pinned: set in __post_init__, kept up to date by Cache

    def __post_init__(self):
        if self.candidates is None:
            self.candidates = _Candidates(self.resident)


@dataclass
class Counters:
    """Owned by the mechanism, never by policies."""

    requests: int = 0  # expert requests: distinct experts per (step, layer)
    hits: int = 0
    misses: int = 0
    loads: int = 0  # copies into the device (demand + prefetch)
    prefetch_loads: int = 0
    evictions: int = 0
    host_computes: int = 0  # misses computed on the host instead of loaded
    streams: int = 0  # misses copied into a scratch slot, computed on the device and dropped (not in loads)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class PrefetchCounters:
    """What became of prefetched loads (kept apart from Counters, whose fields the compiled path mirrors)."""

    used: int = 0  # prefetched keys requested while still resident (their first request)
    wasted: int = 0  # prefetched keys evicted (or reset away) before any request
    unused: set = field(default_factory=set)  # resident prefetched keys not requested yet

    def to_dict(self) -> dict:
        return {"prefetch_used": self.used, "prefetch_wasted": self.wasted,
                "prefetch_unused_at_end": self.unused_at_end}

    @property
    def unused_at_end(self) -> int:
        """Prefetched keys still resident and not requested (at the replay's end: never used)."""
        return len(self.unused)


class Cache:
    """Device residency of routed experts under one budget and scope; see the module docstring."""

    def __init__(self, spec: ModelSpec, n_slots: int, scope: str, make_policy: Callable[[], CachePolicy],
                 trace: Trace | None = None):
        if scope not in SCOPES:
            raise MoesimError(f"scope={scope!r}: expected one of {', '.join(SCOPES)}")
        self.spec, self.n_slots, self.scope, self.trace = spec, n_slots, scope, trace
        L = spec.layers
        if scope == "per_layer":
            share = n_slots // L
            groups = [((l,), list(range(l * share, (l + 1) * share))) for l in range(L)]
        else:
            groups = [(tuple(range(L)), list(range(n_slots)))]
        self.partitions = [Partition(len(slots), layers, make_policy(), slots) for layers, slots in groups]
        self.part_of_layer = [0] * L if scope == "global" else list(range(L))
        self.pinned: set[Key] = set()
        self._pinned_parts: list[Partition] = []  # partitions keys were pinned in since the last release
        self.counters = Counters()
        self.prefetch = PrefetchCounters()
        self.reset()

    def reset(self) -> None:
        """Empty the cache (counters are kept) and set the policies up again."""
        unused = self.prefetch.unused
        self.prefetch.wasted += len(unused)  # reset away before their first request
        unused.clear()
        for p in self.partitions:
            for key in list(p.resident):
                p.policy.on_evict(key)
            p.resident.clear()
            p.candidates.clear()
            p.free = list(reversed(p.slots))
            p.policy.setup(Context(self.trace, self.spec, p.layers, p.capacity, self.scope))
        self.pinned.clear()
        self._pinned_parts.clear()

    def capacity_of(self, layer: int) -> int:
        """Slots of the partition that holds `layer`'s experts."""
        return self.partitions[self.part_of_layer[layer]].capacity

    def is_resident(self, key: Key) -> bool:
        return key in self.partitions[self.part_of_layer[key[0]]].resident

    def slot_of(self, key: Key) -> int:
        return self.partitions[self.part_of_layer[key[0]]].resident[key]

    def lookup(self, pos: int, layer: int, keys: list[Key]) -> list[Key]:
        """Request `keys` (distinct, best first) of `layer` at `pos`: pins them all, tells the policy the
        hits (in order), counts, and returns the misses in order."""
        p = self.partitions[self.part_of_layer[layer]]
        resident = p.resident
        hits, misses = [], []
        for k in keys:
            if k in resident:
                hits.append(k)
            else:
                misses.append(k)
        c = self.counters
        c.requests += len(keys)
        c.hits += len(hits)
        c.misses += len(misses)
        self.pinned.update(keys)
        p.candidates.difference_update(hits)  # the misses are not resident: not candidates anyway
        self._pinned_parts.append(p)
        if hits:
            unused = self.prefetch.unused
            if unused:  # a prefetched key's first request: the prefetch was used
                for k in hits:
                    if k in unused:
                        unused.discard(k)
                        self.prefetch.used += 1
        p.policy.on_access(pos, hits)  # also with no hits: policies that age with time see every position
        return misses

    def insert(self, pos: int, key: Key, prefetched: bool = False) -> tuple[int, Key | None] | None:
        """Make `key` resident: a free slot, else the policy's victim among unpinned residents.
        Returns (slot, evicted key or None), or None if every resident is pinned or the policy refuses (a
        prefetch is then skipped; a demand miss is streamed where the policy `refuses`, and cannot meet a
        pinned partition otherwise, since the budget holds top-k per layer).
        The miss path; `serve_rows` is the same path fused into one loop for the cache-only replay."""
        p = self.partitions[self.part_of_layer[key[0]]]
        evicted = None
        cand = p.candidates
        if p.free:
            slot = p.free.pop()
        else:
            if not cand:
                return None  # everything resident is in use
            cand.pos = pos
            evicted = p.policy.victim(cand)
            if evicted not in cand:
                if evicted is None and getattr(p.policy, "refuses", False):
                    return None  # the policy may evict nothing now
                raise _bad_victim(p.policy, evicted)
            cand.discard(evicted)
            slot = p.resident.pop(evicted)
            p.policy.on_evict(evicted)
            self.counters.evictions += 1
            unused = self.prefetch.unused
            if unused and evicted in unused:  # prefetched, never requested: its copy was wasted
                unused.discard(evicted)
                self.prefetch.wasted += 1
        p.resident[key] = slot
        if key not in self.pinned:  # inserted outside a request (not pinned): evictable at once
            cand.add(key)
        p.policy.on_insert(pos, key, prefetched)
        self.counters.loads += 1
        if prefetched:
            self.counters.prefetch_loads += 1
            self.prefetch.unused.add(key)
        return slot, evicted

    def pin(self, keys: list[Key]) -> None:
        """Pin `keys` (of any layers) until `unpin` or `release`: no policy may evict them meanwhile."""
        self.pinned.update(keys)
        parts, part_of = self.partitions, self.part_of_layer
        for k in keys:
            p = parts[part_of[k[0]]]
            p.candidates.discard(k)
            self._pinned_parts.append(p)

    def unpin(self, keys: list[Key]) -> None:
        """Undo `pin(keys)`: those of `keys` that are resident become candidates again."""
        self.pinned.difference_update(keys)
        parts, part_of = self.partitions, self.part_of_layer
        for k in keys:
            p = parts[part_of[k[0]]]
            if k in p.resident:
                p.candidates.add(k)

    def release(self) -> None:
        """The running layer has computed: its experts may be evicted again."""
        pinned = self.pinned
        if pinned:
            parts = self._pinned_parts
            if len(parts) > 1:  # each once (`pin` may list one many times)
                parts = {id(p): p for p in parts}.values()
            for p in parts:
                p.candidates.update(p.resident.keys() & pinned)
            pinned.clear()
        self._pinned_parts.clear()

    def serve_rows(self, pos: int, rows: list[list[list[Key]]]) -> int:
        """The cache-only replay of batch-1 steps, fused: `rows[t][layer]` are the keys token t asks of
        `layer` (distinct, best first, at most the layer's capacity), requested at positions pos, pos + 1, ...
        Decides and counts exactly as `lookup`, `insert` of each miss, `release` per (token, layer), in one
        loop with no call but the policy's; the counters are added once, at the end of the call. Needs no
        prefetched key pending (`prefetch.unused` empty) and no pin held. Returns the next position."""
        hot = [(p.policy.on_access, p.resident, p.policy.victim, p.policy.on_evict, p.policy.on_insert,
                p.candidates, p.free) for p in (self.partitions[i] for i in self.part_of_layer)]  # per layer
        free_before = sum(len(p.free) for p in self.partitions)
        requests = misses = 0
        for row in rows:
            for (on_access, resident, victim, on_evict, on_insert, cand, free), keys in zip(hot, row):
                hit = []  # a plain loop: ~1/3 faster than a list comprehension's call on Python 3.11
                miss = []
                for k in keys:
                    if k in resident:
                        hit.append(k)
                    else:
                        miss.append(k)
                if miss:  # pin the hits (the misses are not candidates yet) before the policy sees the list
                    cand.difference_update(hit)
                on_access(pos, hit)
                if miss:  # fetch each miss
                    misses += len(miss)
                    cand.pos = pos
                    for k in miss:
                        if free:
                            slot = free.pop()
                        else:
                            v = victim(cand)
                            if v not in cand:
                                raise _bad_victim(victim.__self__, v)
                            cand.discard(v)
                            slot = resident.pop(v)
                            on_evict(v)
                        resident[k] = slot
                        on_insert(pos, k, False)
                    cand.update(keys)  # release: every key of the request is resident now
                pos += 1
            requests += sum(map(len, row))
        c = self.counters
        c.requests += requests
        c.hits += requests - misses
        c.misses += misses
        c.loads += misses
        c.evictions += misses - (free_before - sum(len(p.free) for p in self.partitions))
        return pos

    def resident_count(self) -> int:
        return sum(len(p.resident) for p in self.partitions)


def _bad_victim(policy, key) -> RuntimeError:
    return RuntimeError(f"{type(policy).__name__}.victim returned {key}, which is not a resident, unpinned key "
                        f"of its partition")
