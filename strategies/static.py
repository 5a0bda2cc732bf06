"""Static: the experts most used in a calibration trace stay resident for good; the rest share a small LRU
area. `strategy=static`.

Per partition, the `capacity - lru_slots` keys requested at the most (step, layer) positions of the
calibration trace are static: never offered as victims. Every other expert is loaded on a miss into the
LRU area of `lru_slots` slots (default: top_k per layer of the partition). Static experts are loaded on
their first use like any miss (the cache has no preload); a warm start would preload them.

The calibration trace is the first `calibrate_tokens` tokens of the replayed trace (default: the first
`calibrate_fraction` = 10%), or another trace file (`calibrate_trace=PATH`). With a prefix the policy has
seen the start of what it is judged on: report its results on the tokens after `calibration_tokens`.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Iterable

import numpy as np

from moesim.errors import MoesimError

from . import CachePolicy, Key


class Static(CachePolicy):
    def __init__(self, calibrate_tokens: int | None = None, calibrate_fraction: float = 0.1,
                 calibrate_trace: str | None = None, lru_slots: int | None = None):
        if calibrate_tokens is not None and (not isinstance(calibrate_tokens, int) or calibrate_tokens <= 0):
            raise MoesimError(f"strategy.cache.calibrate_tokens: expected a positive integer or null, "
                              f"got {calibrate_tokens!r}")
        if not (isinstance(calibrate_fraction, (int, float)) and 0 < calibrate_fraction <= 1):
            raise MoesimError(f"strategy.cache.calibrate_fraction: expected a number in (0, 1], "
                              f"got {calibrate_fraction!r}")
        if lru_slots is not None and (not isinstance(lru_slots, int) or lru_slots <= 0):
            raise MoesimError(f"strategy.cache.lru_slots: expected a positive integer or null, got {lru_slots!r}")
        self.calibrate_tokens = calibrate_tokens
        self.calibrate_fraction = float(calibrate_fraction)
        self.calibrate_trace = calibrate_trace
        self.lru_slots = lru_slots

    def setup(self, ctx) -> None:
        calib = self._calibration(ctx)
        lru_slots = self.lru_slots if self.lru_slots is not None else ctx.spec.top_k * len(ctx.layers)
        if lru_slots < ctx.spec.top_k:
            raise MoesimError(f"strategy.cache.lru_slots={lru_slots} is less than top_k={ctx.spec.top_k}: "
                              f"the experts of one token would have to evict static ones")
        n_static = max(0, ctx.capacity - lru_slots)
        counts = request_counts(calib, ctx.layers)  # [len(layers), E]
        flat = counts.reshape(-1)
        order = np.argsort(-flat, kind="stable")[:n_static]  # most requested first; ties: lower key
        order = order[flat[order] > 0]
        E = counts.shape[1]
        self.static: dict[Key, int] = {(ctx.layers[i // E], int(i % E)): int(flat[i]) for i in order}
        self.order: OrderedDict[Key, None] = OrderedDict()  # resident non-static keys, least recent first

    def _calibration(self, ctx):
        if self.calibrate_trace is not None:  # read by the Context: policies open no files
            calib = ctx.calibration_trace(self.calibrate_trace, "strategy.cache.calibrate_trace")
            self.calibration_tokens = 0  # tokens of the replayed trace the policy has seen
            return calib
        T = ctx.trace.n_tokens
        n = self.calibrate_tokens if self.calibrate_tokens is not None else math.ceil(self.calibrate_fraction * T)
        self.calibration_tokens = min(n, T)
        return ctx.trace.slice_tokens(0, self.calibration_tokens)

    def on_access(self, pos: int, keys: Iterable[Key]) -> None:
        move = self.order.move_to_end
        for key in keys:
            if key not in self.static:
                move(key)

    def on_insert(self, pos: int, key: Key, prefetched: bool) -> None:
        if key not in self.static:
            self.order[key] = None

    def on_evict(self, key: Key) -> None:
        self.order.pop(key, None)

    def victim(self, candidates) -> Key:
        for key in self.order:
            if key in candidates:
                return key
        # only when one layer's request (a batched step) outgrows the LRU area: the least used static goes
        static = [k for k in candidates if k in self.static]
        if not static:
            raise ValueError(f"Static.victim: none of the candidates {sorted(candidates)} is resident")
        return min(static, key=lambda k: (self.static[k], k))


def request_counts(trace, layers) -> np.ndarray:
    """int64 [len(layers), E]: at how many steps each expert of each layer was requested."""
    E = trace.spec.experts
    starts = trace.step_starts
    step_of_token = np.repeat(np.arange(len(starts) - 1, dtype=np.int64), np.diff(starts))
    out = np.zeros((len(layers), E), dtype=np.int64)
    seen = np.zeros((len(starts) - 1, E), dtype=bool)  # [S, E]: one request per (step, expert)
    for i, layer in enumerate(layers):
        e = np.asarray(trace.experts[:, layer, :], dtype=np.int64)  # [T, K]
        chosen = e >= 0
        seen[:] = False
        seen[np.broadcast_to(step_of_token[:, None], e.shape)[chosen], e[chosen]] = True  # (np.unique: 10x slower)
        out[i] = seen.sum(axis=0)
    return out
