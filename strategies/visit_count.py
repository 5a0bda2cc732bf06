"""Visit count: MoE-Infinity's eviction as its code runs it with prefetch on: never an expert of the running
layer or a later one; among the earlier layers' experts, the most visited first; nothing evictable: the miss
runs from a scratch slot and is dropped. `cache=visit_count`, the cache of `strategy=moe_infinity`.

From EfficientMoE/MoE-Infinity@5e096b402303c57fab5b9122252376869a81e9dd core/prefetch/task_scheduler.cpp
(RemoveCachedSparseNode, L223-296; docs/preset-sources.md section 3):
  - at every MoE layer the prefetcher names every expert of that layer and all later ones as candidates, and
    eviction skips candidates: only experts of earlier layers (of the running forward pass) can be evicted;
  - the evictable experts are taken in descending `incache_visit_count` (the sort comparator is `>`: the most
    visited first, as written), and the count is reset to 0 on eviction. Here a count is 1 when an expert is
    loaded and grows by 1 per hit; ties go to the lower (layer, expert);
  - when no expert can be evicted, an on-demand fetch loads the expert anyway, runs it and evicts it
    (core/parallel/expert_dispatcher.cpp: `exec_args.evict = !success`), and a prefetch is dropped
    ("evict failed"): `refuses`, the engine streams the demand miss and skips the prefetch.
Needs one pool over all layers (scope global): in a per-layer pool every resident is of the running layer.
Not modelled: the code's count also grows when a queued prefetch task runs for an expert already resident.
"""
from __future__ import annotations

from typing import Iterable

from . import CachePolicy, Key


class VisitCount(CachePolicy):
    refuses = True  # victim() may return None: nothing may be evicted now

    def setup(self, ctx) -> None:
        self.L = ctx.spec.layers
        self.count: dict[Key, int] = {}  # resident key -> visits since it was loaded (1 at the load)

    def on_access(self, pos: int, keys: Iterable[Key]) -> None:
        count = self.count
        for key in keys:
            count[key] += 1

    def on_insert(self, pos: int, key: Key, prefetched: bool) -> None:
        self.count[key] = 1

    def on_evict(self, key: Key) -> None:
        del self.count[key]

    def victim(self, candidates) -> Key | None:
        layer = candidates.pos % self.L  # the running layer: it and every later one are protected
        best, most = None, -1
        for key in candidates:
            if key[0] < layer:
                c = self.count[key]
                if c > most or (c == most and key < best):
                    best, most = key, c
        return best
