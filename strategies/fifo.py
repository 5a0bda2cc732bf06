"""FIFO: evict the expert that was loaded longest ago; hits do not reorder. `strategy=fifo`.

The simplest baseline: it ignores reuse entirely, so it shows how much the recency of LRU is worth.
"""
from __future__ import annotations

from collections import OrderedDict

from . import CachePolicy, Key


class FIFO(CachePolicy):
    def setup(self, ctx) -> None:
        self.order: OrderedDict[Key, None] = OrderedDict()  # oldest insertion first

    def on_insert(self, pos: int, key: Key, prefetched: bool) -> None:
        self.order[key] = None

    def on_evict(self, key: Key) -> None:
        del self.order[key]

    def victim(self, candidates) -> Key:
        for key in self.order:  # pinned keys are skipped, so the oldest unpinned one goes
            if key in candidates:
                return key
        raise ValueError(f"FIFO.victim: none of the candidates {sorted(candidates)} is resident")
