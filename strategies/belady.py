"""Belady's MIN: evict the expert whose next request is furthest in the future. `strategy=belady`.

An oracle, reported as a bound (`bound = True`): it reads the whole trace in `setup`. Requests are sets:
the experts a layer needs at one (step, layer) are pinned together, so the victim is the unpinned resident
whose next request position comes last; one never requested again is infinitely far. Ties (several
never used again, or two next requested by the same row) go to the smallest key; they cannot change the
hit count. With set requests furthest-next-use is still optimal (tests/test_policies.py checks it against
exhaustive search).

Next uses come from one sorted array of request positions per key, built with numpy in `setup`
(pos = step_index * L + layer); each key keeps a pointer into its array that only moves forward, and
victims come from a max-heap with lazy deletion: O(log n) per miss.
"""
from __future__ import annotations

import heapq
from array import array
from typing import Iterable

import numpy as np

from . import CachePolicy, Key

NEVER = 1 << 62  # next use of a key that is not requested again


class Belady(CachePolicy):
    bound = True

    def setup(self, ctx) -> None:
        self.E = ctx.spec.experts
        positions, offsets = self.request_positions(ctx)
        self.positions = array("q", positions.tobytes())  # per key id, its request positions, ascending
        self.offsets = offsets.tolist()  # key id -> start of its run in `positions`; [n_keys + 1]
        self.ptr = self.offsets[:-1]  # key id -> first entry not yet passed
        self.index = {layer: i for i, layer in enumerate(ctx.layers)}  # layer -> row of the key id
        self.next_use: dict[Key, int] = {}  # resident key -> position of its next request
        self.heap: list[tuple[int, Key]] = []  # (-next use, key); stale entries skipped

    def request_positions(self, ctx) -> tuple[np.ndarray, np.ndarray]:
        """The future it reads: each key's request positions (request_positions below)."""
        return request_positions(ctx.trace, ctx.layers)

    def _next_after(self, pos: int, key: Key) -> int:
        kid = self.index[key[0]] * self.E + key[1]
        p, end, positions = self.ptr[kid], self.offsets[kid + 1], self.positions
        while p < end and positions[p] <= pos:
            p += 1
        self.ptr[kid] = p
        return positions[p] if p < end else NEVER

    def _note(self, pos: int, key: Key) -> None:
        nu = self.next_use[key] = self._next_after(pos, key)
        heapq.heappush(self.heap, (-nu, key))
        if len(self.heap) > 4 * len(self.next_use) + 64:  # drop stale entries now and then
            self.heap = [(-n, k) for k, n in self.next_use.items()]
            heapq.heapify(self.heap)

    def on_access(self, pos: int, keys: Iterable[Key]) -> None:
        for key in keys:
            self._note(pos, key)

    def on_insert(self, pos: int, key: Key, prefetched: bool) -> None:
        self._note(pos, key)

    def on_evict(self, key: Key) -> None:
        del self.next_use[key]

    def victim(self, candidates) -> Key:
        heap, skipped = self.heap, []
        try:
            while heap:
                entry = heapq.heappop(heap)
                if self.next_use.get(entry[1]) != -entry[0]:  # stale: evicted or used since
                    continue
                skipped.append(entry)  # still valid: it stays in the heap until on_evict
                if entry[1] in candidates:
                    return entry[1]
        finally:
            for entry in skipped:
                heapq.heappush(heap, entry)
        raise ValueError(f"Belady.victim: none of the candidates {sorted(candidates)} is resident")


class GivenBelady(Belady):
    """Belady over given request positions instead of the trace's: the disk tier's host cache, whose requests
    are the device's misses (moesim.disk.host_requests). positions, offsets: as request_positions lays them out,
    for keys layer * E + expert of every layer."""

    def __init__(self, positions, offsets):
        self.given = (np.asarray(positions, np.int64), np.asarray(offsets, np.int64))

    def request_positions(self, ctx) -> tuple[np.ndarray, np.ndarray]:
        return self.given


def request_positions(trace, layers) -> tuple[np.ndarray, np.ndarray]:
    """(positions int64, offsets int64 [len(layers) * E + 1]): the request positions of key id
    i * E + expert (i indexing `layers`) are positions[offsets[id]:offsets[id + 1]], ascending, one per
    (step, layer) that requested the expert."""
    E, L = trace.spec.experts, trace.n_layers
    starts = trace.step_starts
    step_of_token = np.repeat(np.arange(len(starts) - 1, dtype=np.int64), np.diff(starts))
    runs, counts = [], []
    for layer in layers:
        e = np.asarray(trace.experts[:, layer, :], dtype=np.int64)  # [T, K]
        pos = step_of_token * L + layer  # [T]
        code = np.unique((e * (len(starts) * L) + pos[:, None])[e >= 0])  # sorted by expert, then position
        expert = code // (len(starts) * L)
        runs.append(code - expert * (len(starts) * L))
        counts.append(np.bincount(expert, minlength=E))
    positions = np.concatenate(runs) if runs else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(counts))]) if counts else np.zeros(1, np.int64)
    return positions.astype(np.int64), offsets.astype(np.int64)
