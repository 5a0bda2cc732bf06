"""Residency of routed experts in device memory: slots, scope, pinning, the one miss path, counters.

    cache = Cache(spec, n_slots=192, scope="per_layer", make_policy=LRU, trace=trace)
    misses = cache.lookup(pos, layer, keys)     # pins `keys`; the policy sees the hits
    for key in misses: slot, evicted = cache.insert(pos, key)
    cache.release()                             # the layer has computed: unpin

The cache owns capacity, scope, pinning and counters; a policy (strategies/) only chooses victims among
the keys that are resident in its partition and not pinned. In `per_layer` scope each layer owns an equal
share of the slots (budget // layers; the remainder stays unused and is reported); in `global` scope one
pool serves all layers. Slots are indices into the device pool a backend allocates once.
`cache.prefetch` follows each prefetched key to its first request (used) or its eviction (wasted).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

from strategies import CachePolicy, Context, Key

from .errors import MoesimError
from .trace import ModelSpec, Trace
from .units import SCOPES


class _Candidates:
    """Keys of one partition that are resident and not pinned (what a policy may evict)."""

    __slots__ = ("_resident", "_pinned", "pos")

    def __init__(self, resident: dict, pinned: set, pos: int = -1):
        self._resident, self._pinned = resident, pinned
        self.pos = pos  # the request position the eviction happens at

    def __contains__(self, key: Key) -> bool:
        return key in self._resident and key not in self._pinned

    def __iter__(self) -> Iterator[Key]:
        return (k for k in self._resident if k not in self._pinned)

    def __len__(self) -> int:
        return sum(1 for k in self._resident if k not in self._pinned)


@dataclass
class Partition:
    capacity: int
    layers: tuple[int, ...]
    policy: CachePolicy
    slots: list[int]  # the device slots this partition owns
    resident: dict = field(default_factory=dict)  # Key -> slot
    free: list = field(default_factory=list)  # free slots


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
                "prefetch_unused_at_end": len(self.unused)}


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
            p.free = list(reversed(p.slots))
            p.policy.setup(Context(self.trace, self.spec, p.layers, p.capacity, self.scope))
        self.pinned.clear()

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
        hits = [k for k in keys if k in p.resident]
        misses = [k for k in keys if k not in p.resident]
        self.pinned.update(keys)
        c = self.counters
        c.requests += len(keys)
        c.hits += len(hits)
        c.misses += len(misses)
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
        Returns (slot, evicted key or None), or None if every resident is pinned (a prefetch then waits;
        a demand miss cannot hit this case, since the budget holds top-k per layer)."""
        p = self.partitions[self.part_of_layer[key[0]]]
        evicted = None
        if p.free:
            slot = p.free.pop()
        else:
            resident = p.resident
            pinned = self.pinned
            if len(resident) <= len(pinned) and len(resident) <= sum(1 for k in pinned if k in resident):
                return None  # everything resident is in use
            cand = _Candidates(resident, self.pinned, pos)
            evicted = p.policy.victim(cand)
            if evicted not in cand:
                raise RuntimeError(f"{type(p.policy).__name__}.victim returned {evicted}, which is not a "
                                   f"resident, unpinned key of its partition")
            slot = p.resident.pop(evicted)
            p.policy.on_evict(evicted)
            self.counters.evictions += 1
            unused = self.prefetch.unused
            if unused and evicted in unused:  # prefetched, never requested: its copy was wasted
                unused.discard(evicted)
                self.prefetch.wasted += 1
        p.resident[key] = slot
        p.policy.on_insert(pos, key, prefetched)
        self.counters.loads += 1
        if prefetched:
            self.counters.prefetch_loads += 1
            self.prefetch.unused.add(key)
        return slot, evicted

    def release(self) -> None:
        """The running layer has computed: its experts may be evicted again."""
        self.pinned.clear()

    def resident_count(self) -> int:
        return sum(len(p.resident) for p in self.partitions)
