"""LFRU: evict the resident expert with the lowest frequency-weighted recency. `strategy=lfru`.

The policy proposed for vLLM's GPU expert cache (vllm-project/vllm PR #37190, RFC #38256: "LFRU prevents
early layers from monopolizing the cache"; a published port, caiovicentino/vllm-expert-offload commit
f746d07, scores an expert as decayed frequency / (1 + steps since its last use), decay 0.95 per step).
Our definition, with time t in steps (request position / MoE layers, so one step per forward pass):

    f     = decayed use count: at each use f <- f * decay**(t - t_last) + 1   (history kept after eviction)
    score = f * decay**age / (1 + age)**alpha,   age = t_now - t_last         (lowest score is evicted)

Parameters (`strategy.cache.<name>=...`): `decay` in (0, 1], per step (0.95); `alpha` >= 0, the weight of
recency (1.0; 0 leaves only the decayed count). Ties go to the least recently used. A prefetched load
counts as a use. Victims are found by a scan of the partition: fine per layer, O(slots) per miss globally.
"""
from __future__ import annotations

import math
from typing import Iterable

from moesim.errors import MoesimError

from . import CachePolicy, Key


class LFRU(CachePolicy):
    def __init__(self, decay: float = 0.95, alpha: float = 1.0):
        if not (isinstance(decay, (int, float)) and 0 < decay <= 1):
            raise MoesimError(f"strategy.cache.decay: expected a number in (0, 1] (per step), got {decay!r}")
        if not (isinstance(alpha, (int, float)) and alpha >= 0):
            raise MoesimError(f"strategy.cache.alpha: expected a number >= 0, got {alpha!r}")
        self.decay = float(decay)
        self.alpha = float(alpha)

    def setup(self, ctx) -> None:
        self.layers = ctx.spec.layers  # request positions per step
        self.log_decay = math.log(self.decay)
        self.log_f: dict[Key, float] = {}  # log of the decayed count at the last use (all keys seen)
        self.last: dict[Key, float] = {}  # step of the last use
        self.touch: dict[Key, int] = {}  # touch number of the last use: the tie-break
        self.resident: set[Key] = set()
        self.n_touch = 0
        self.now = 0.0  # step of the latest access or insert: victims are ranked at this time

    def _use(self, t: float, key: Key) -> None:
        lf = self.log_f.get(key)
        if lf is None:
            self.log_f[key] = 0.0  # log 1
        else:  # log(f * decay**dt + 1), without underflow for long gaps
            x = lf + (t - self.last[key]) * self.log_decay
            self.log_f[key] = x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x))
        self.last[key] = self.now = t
        self.n_touch += 1
        self.touch[key] = self.n_touch

    def on_access(self, pos: int, keys: Iterable[Key]) -> None:
        t = self.now = pos / self.layers
        for key in keys:
            self._use(t, key)

    def on_insert(self, pos: int, key: Key, prefetched: bool) -> None:
        self._use(pos / self.layers, key)
        self.resident.add(key)

    def on_evict(self, key: Key) -> None:
        self.resident.discard(key)

    def log_score(self, key: Key, t: float) -> float:
        age = t - self.last[key]
        return self.log_f[key] + age * self.log_decay - self.alpha * math.log1p(age)

    def victim(self, candidates) -> Key:
        best, best_rank = None, None
        for key in self.resident:
            if key in candidates:
                rank = (self.log_score(key, self.now), self.touch[key])
                if best_rank is None or rank < best_rank:
                    best, best_rank = key, rank
        if best is None:
            raise ValueError(f"LFRU.victim: none of the candidates {sorted(candidates)} is resident")
        return best
