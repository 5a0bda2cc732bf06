"""Activation-aware: evict the expert the current sequence has needed least, weighed by how often it was
needed overall. `strategy=activation_aware`.

After MoE-Infinity's activation-aware expert cache (Xue et al. 2024, arXiv:2401.14361; the released
priority in TorchMoE/MoE-Infinity moe_infinity/memory/expert_priority_score.py multiplies the current
request's expert activation matrix, normalised per layer, by the experts' overall frequency and by a
weight that favours earlier layers). Here a resident key (l, e) has the priority

    (share of the current sequence's requests at layer l that went to e + 1e-6)
  x (share of all requests at layer l since the replay started that went to e + 1e-6)
  x (1 - l / (L + 1))  in `global` scope (in `per_layer` scope the factor is the same for every candidate)

and the lowest priority is evicted, ties to the least recently used. Requests are what the cache sees:
hits and demand loads (a prefetched load is not a request). The sequence of a step is read from the
trace's `seq` (a server knows which request a token belongs to); a new sequence starts an empty matrix.
"""
from __future__ import annotations

from typing import Iterable

from . import CachePolicy, Key

EPS = 1e-6


class ActivationAware(CachePolicy):
    def setup(self, ctx) -> None:
        L, E = ctx.spec.layers, ctx.spec.experts
        self.L = L
        self.step_seq = ctx.trace.step_seq().tolist() if ctx.trace is not None else []
        self.layer_weight = [1.0 - l / (L + 1) if ctx.scope == "global" else 1.0 for l in range(L)]
        self.seq = None
        self.eam = [[0] * E for _ in range(L)]  # current sequence: requests per expert per layer
        self.eam_rows = [0] * L
        self.freq = [[0] * E for _ in range(L)]  # since the replay started
        self.freq_rows = [0] * L
        self.touch: dict[Key, int] = {}  # resident key -> touch number of its last use
        self.n_touch = 0

    def _at(self, pos: int) -> None:
        step = pos // self.L
        seq = self.step_seq[step] if step < len(self.step_seq) else None
        if seq != self.seq:  # a new sequence: its matrix starts empty
            self.seq = seq
            for row in self.eam:
                row[:] = [0] * len(row)
            self.eam_rows = [0] * self.L

    def _use(self, key: Key) -> None:
        l, e = key
        self.eam[l][e] += 1
        self.eam_rows[l] += 1
        self.freq[l][e] += 1
        self.freq_rows[l] += 1
        self.n_touch += 1
        self.touch[key] = self.n_touch

    def on_access(self, pos: int, keys: Iterable[Key]) -> None:
        self._at(pos)
        for key in keys:
            self._use(key)

    def on_insert(self, pos: int, key: Key, prefetched: bool) -> None:
        self._at(pos)
        if prefetched:  # not a request: it ranks as unused so far
            self.n_touch += 1
            self.touch[key] = self.n_touch
        else:
            self._use(key)

    def on_evict(self, key: Key) -> None:
        del self.touch[key]

    def priority(self, key: Key) -> float:
        l, e = key
        share = self.eam[l][e] / self.eam_rows[l] if self.eam_rows[l] else 0.0
        freq = self.freq[l][e] / self.freq_rows[l] if self.freq_rows[l] else 0.0
        return (share + EPS) * (freq + EPS) * self.layer_weight[l]

    def victim(self, candidates) -> Key:
        best, best_rank = None, None
        for key in self.touch:
            if key in candidates:
                rank = (self.priority(key), self.touch[key])
                if best_rank is None or rank < best_rank:
                    best, best_rank = key, rank
        if best is None:
            raise ValueError(f"ActivationAware.victim: none of the candidates {sorted(candidates)} is resident")
        return best
