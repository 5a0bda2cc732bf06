"""Class LRU: one LRU list per frequency class; the victim is the least recently used expert of the class
list whose oldest entry is oldest for its class. `strategy=class_lru`.

moesim's own design (no public source has it: llama.cpp's MoE caches, src/llama-moe-cache.cpp upstream and a
fork's docs/moe-cache.md, are plain LRUs; docs/preset-sources.md section 5(c)). Each expert has a CRF (combined recency and frequency): its uses, decayed with a half-life of
`half_life` tokens (128), kept across evictions. Its class is floor(log2(CRF)), at most `classes` - 1
(8 classes). A resident expert sits in the LRU list of its class as of its last use; the victim is,
among the least recently used evictable expert of each list, the one with the largest
age / 2**class (age: request positions since its last use), so an expert used often must be idle
2**class times longer than a cold one to be evicted. Time: one step = one token (decode); a prefetched load
enters the list of its current class without counting as a use.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Iterable

from moesim.errors import MoesimError

from . import CachePolicy, Key


class ClassLRU(CachePolicy):
    def __init__(self, half_life: float = 128.0, classes: int = 8):
        if not (isinstance(half_life, (int, float)) and not isinstance(half_life, bool) and half_life > 0):
            raise MoesimError(f"strategy.cache.half_life: expected a positive number of tokens, got {half_life!r}")
        if not isinstance(classes, int) or isinstance(classes, bool) or classes < 1:
            raise MoesimError(f"strategy.cache.classes: expected a whole number >= 1, got {classes!r}")
        self.half_life, self.classes = float(half_life), classes

    def setup(self, ctx) -> None:
        self.L = ctx.spec.layers
        self.decay_per_pos = -math.log(2) / (self.half_life * self.L)  # ln of the CRF factor per position
        self.crf: dict[Key, float] = {}  # at the last update (kept across evictions)
        self.updated: dict[Key, int] = {}  # position of the CRF's last update
        self.last_use: dict[Key, int] = {}  # resident key -> position of its last use
        self.class_of: dict[Key, int] = {}  # resident key -> its class list
        self.lists = [OrderedDict() for _ in range(self.classes)]  # least recently used first
        self.now = 0  # position of the latest use (ages are measured from the eviction's position)

    def _crf_now(self, key: Key, pos: int) -> float:
        c = self.crf.get(key)
        return 0.0 if c is None else c * math.exp((pos - self.updated[key]) * self.decay_per_pos)

    def _place(self, key: Key, pos: int, crf: float) -> None:
        self.crf[key], self.updated[key], self.last_use[key] = crf, pos, pos
        self.now = max(self.now, pos)
        cls = min(self.classes - 1, int(math.floor(math.log2(crf)))) if crf >= 1 else 0
        old = self.class_of.get(key)
        if old is not None:
            del self.lists[old][key]
        self.class_of[key] = cls
        self.lists[cls][key] = None

    def on_access(self, pos: int, keys: Iterable[Key]) -> None:
        for key in keys:
            self._place(key, pos, self._crf_now(key, pos) + 1.0)

    def on_insert(self, pos: int, key: Key, prefetched: bool) -> None:
        self._place(key, pos, self._crf_now(key, pos) + (0.0 if prefetched else 1.0))

    def on_evict(self, key: Key) -> None:
        del self.lists[self.class_of.pop(key)][key]
        del self.last_use[key]

    def victim(self, candidates) -> Key:
        now = getattr(candidates, "pos", self.now)
        best, best_age = None, -1.0
        for cls, lst in enumerate(self.lists):
            for key in lst:  # its least recently used evictable entry
                if key in candidates:
                    age = (now - self.last_use[key]) / 2.0 ** cls
                    if age > best_age:
                        best, best_age = key, age
                    break
        if best is None:
            raise ValueError(f"ClassLRU.victim: none of the candidates {sorted(candidates)} is resident")
        return best
