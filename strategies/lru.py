"""LRU: evict the resident expert whose last use is oldest. `strategy=lru`.

An OrderedDict from least to most recently used. Within one (step, layer) the cache reports the hits in
row order (best first) and inserts the misses after them, so the last expert of the row is the most recent.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterable

from . import CachePolicy, Key


class LRU(CachePolicy):
    def setup(self, ctx) -> None:
        self.order: OrderedDict[Key, None] = OrderedDict()  # least recently used first

    def on_access(self, pos: int, keys: Iterable[Key]) -> None:
        move = self.order.move_to_end
        for key in keys:
            move(key)

    def on_insert(self, pos: int, key: Key, prefetched: bool) -> None:
        self.order[key] = None

    def on_evict(self, key: Key) -> None:
        del self.order[key]

    def victim(self, candidates) -> Key:
        for key in self.order:  # the experts pinned by the running layer are the most recent: few are skipped
            if key in candidates:
                return key
        raise ValueError(f"LRU.victim: none of the candidates {sorted(candidates)} is resident")
