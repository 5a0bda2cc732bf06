"""LFU: evict the resident expert used least often since it was loaded. `strategy=lfu`.

A count starts at 1 when an expert is loaded, grows by 1 per hit and is forgotten when the expert leaves.
Ties go to the least recently used (touch order: hits of a row in row order, then its misses). With
`decay` < 1 counts age: every `decay_every` request positions all counts are multiplied by `decay`
(`strategy.cache.decay=0.5 strategy.cache.decay_every=240`), so a once-hot expert does not stay forever.

Aging is lazy: a count is stored divided by the global factor decay**(pos // decay_every), which every
count shares, so comparing stored values compares aged counts and nothing is walked per step. Victims
come from a heap with lazy deletion: O(log n) per miss, also for a global pool of hundreds of slots.
"""
from __future__ import annotations

import heapq
from typing import Iterable

from moesim.errors import MoesimError

from . import CachePolicy, Key

RESCALE_AT = 1e100  # stored counts are renormalised when the global factor's inverse passes this


class LFU(CachePolicy):
    def __init__(self, decay: float = 1.0, decay_every: int | None = None):
        if not (isinstance(decay, (int, float)) and 0 < decay <= 1):
            raise MoesimError(f"strategy.cache.decay: expected a number in (0, 1], got {decay!r}")
        if decay_every is not None and (not isinstance(decay_every, int) or decay_every <= 0):
            raise MoesimError(f"strategy.cache.decay_every: expected a positive integer (request positions) "
                              f"or null (one step), got {decay_every!r}")
        self.decay = float(decay)
        self.decay_every = decay_every  # request positions; None: one step (= the model's MoE layers)

    def setup(self, ctx) -> None:
        self.period = self.decay_every or ctx.spec.layers  # request positions per aging
        self.epoch0 = 0  # aging epochs already folded into the stored counts
        self.unit = 1.0  # what one access adds to a stored count: 1 / decay**(epochs since epoch0)
        self.count: dict[Key, float] = {}  # stored count; the aged count is count * decay**(epoch - epoch0)
        self.touch: dict[Key, int] = {}  # touch number of the last use: the tie-break
        self.n_touch = 0
        self.heap: list[tuple[float, int, Key]] = []  # (stored count, touch, key); stale entries skipped

    def _advance(self, pos: int) -> None:
        if self.decay == 1.0:
            return
        if not self.count:  # nothing counted (start, or after a reset): age from now, so powers stay finite
            self.epoch0 = pos // self.period
        self.unit = self.decay ** (self.epoch0 - pos // self.period)  # a power: exact for decay = 2**-n
        if self.unit > RESCALE_AT:  # fold the factor into every count: rare, keeps floats finite
            for key in self.count:
                self.count[key] /= self.unit
            self.epoch0 = pos // self.period
            self.unit = 1.0
            self.heap = [(self.count[k], self.touch[k], k) for k in self.count]
            heapq.heapify(self.heap)

    def _bump(self, key: Key, start: float) -> None:
        self.n_touch += 1
        c = self.count[key] = start + self.unit
        self.touch[key] = self.n_touch
        heapq.heappush(self.heap, (c, self.n_touch, key))
        if len(self.heap) > 4 * len(self.count) + 64:  # drop stale entries now and then
            self.heap = [(self.count[k], self.touch[k], k) for k in self.count]
            heapq.heapify(self.heap)

    def on_access(self, pos: int, keys: Iterable[Key]) -> None:
        self._advance(pos)
        for key in keys:
            self._bump(key, self.count[key])

    def on_insert(self, pos: int, key: Key, prefetched: bool) -> None:
        self._advance(pos)
        self._bump(key, 0.0)

    def on_evict(self, key: Key) -> None:
        del self.count[key], self.touch[key]

    def victim(self, candidates) -> Key:
        heap, skipped = self.heap, []
        try:
            while heap:
                entry = heapq.heappop(heap)
                c, t, key = entry
                if self.touch.get(key) != t:  # stale: evicted or touched again since
                    continue
                skipped.append(entry)  # still valid: it stays in the heap until on_evict
                if key in candidates:
                    return key
        finally:
            for entry in skipped:
                heapq.heappush(heap, entry)
        raise ValueError(f"LFU.victim: none of the candidates {sorted(candidates)} is resident")
