"""Linux's page cache over an mmap'd model file, one expert as one page: `disk.policy=page_cache` (the host
cache of the disk tier, moesim/disk.py), or `strategy=page_cache` for any cache.

Followed from mm/workingset.c ("Double CLOCK lists", CachyOS/linux@df0c750533294b26b079c99476cbbe376f8a5caa)
and inactive_is_low() and shrink_active_list() of mm/vmscan.c (CachyOS/linux@04a07002f646f55dd7eab762ff7f659231ffc212),
without multi-gen LRU:
  - a faulted page (an inserted expert) enters the inactive list; reclaim takes the inactive list's oldest;
  - a page accessed again while inactive is promoted to the active list; an access to an active page does not
    move it (shrink_active_list gives referenced pages another trip only where they are executable, VM_EXEC:
    a mapped model file's are deactivated in list order);
  - before reclaim, active pages are demoted, oldest first, to the inactive list while it is low:
    inactive * ratio < active, ratio = int_sqrt(10 * GiB of the cache) (1 under 1 GiB);
  - refaults: each eviction leaves a shadow entry holding the node's nonresident age (evictions + activations
    so far), then ages it; a page faulting back in with (age now - its shadow) <= the active list's size is
    activated at once (the refault distance fits in the memory the active pages hold).
Approximated: experts, not 4 KiB pages (readahead within an expert is its one read); one node, no cgroups;
promotion at the second access rather than at the reclaim scan that finds it referenced twice; shadow entries
are never reclaimed. Pinned keys (the running request)
are skipped by reclaim; if every inactive key is pinned, the active list's oldest unpinned goes.
"""
from __future__ import annotations

from collections import OrderedDict
from math import isqrt
from typing import Iterable

from . import CachePolicy, Key


def inactive_ratio(slots: int, bytes_per_expert: int) -> int:
    """mm/vmscan.c inactive_is_low(): int_sqrt(10 * gb), gb the cache's size in whole GiB; 1 below 1 GiB."""
    gb = slots * bytes_per_expert >> 30
    return isqrt(10 * gb) if gb else 1


class PageCache(CachePolicy):
    def setup(self, ctx) -> None:
        self.inactive: OrderedDict[Key, None] = OrderedDict()  # oldest first
        self.active: OrderedDict[Key, None] = OrderedDict()  # oldest first
        self.age = 0  # nonresident_age: evictions + activations so far
        self.shadow: dict[Key, int] = {}  # evicted key -> the age at its eviction
        self.ratio = inactive_ratio(ctx.capacity, ctx.spec.bytes_per_expert)

    def on_access(self, pos: int, keys: Iterable[Key]) -> None:
        for key in keys:
            if key in self.inactive:  # the second access: promoted (an active key stays where it is)
                del self.inactive[key]
                self.active[key] = None
                self.age += 1

    def on_insert(self, pos: int, key: Key, prefetched: bool) -> None:
        evicted_at = self.shadow.pop(key, None)
        if evicted_at is not None and self.age - evicted_at <= len(self.active):  # a refault within reach
            self.active[key] = None
            self.age += 1
        else:
            self.inactive[key] = None

    def on_evict(self, key: Key) -> None:
        if key in self.inactive:
            del self.inactive[key]
        else:
            del self.active[key]
        self.shadow[key] = self.age
        self.age += 1

    def victim(self, candidates) -> Key:
        while self.active and len(self.inactive) * self.ratio < len(self.active):  # inactive is low: demote
            key, _ = self.active.popitem(last=False)
            self.inactive[key] = None
        for lst in (self.inactive, self.active):
            for key in lst:
                if key in candidates:
                    return key
        raise ValueError(f"PageCache.victim: none of the candidates {sorted(candidates)} is resident")
