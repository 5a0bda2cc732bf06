"""A trace's requests as flat arrays, the input of every compiled loop (moesim/core/loop.py).

    req = encode(trace)     # cached on the Trace object
    req.ids[req.ptr[pos]:req.ptr[pos + 1]]   # the distinct experts of request position pos = step * L + layer

Per request position, the distinct expert ids of that (step, layer) in order of first appearance (row order,
best first; what moesim.engine's `step_requests` yields) with the number of the step's tokens that chose each.
A key is kid = layer * E + expert.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

NEVER = 1 << 62  # next use of a key not requested again (strategies/belady.py: NEVER)


class Requests(NamedTuple):
    """A trace's requests as flat arrays (see the module docstring)."""

    ids: np.ndarray  # int16 [N] expert ids, per (step, layer) distinct, first appearance first
    counts: np.ndarray | None  # int32 [N] tokens that chose each id in its step; None: all 1 (batch-1 steps)
    ptr: np.ndarray  # int64 [S * L + 1] start of each (step, layer) in `ids`
    step_tokens: np.ndarray  # int64 [S] tokens per step
    n_layers: int
    n_experts: int
    width: int  # the most ids of one request

    @property
    def n_steps(self) -> int:
        return len(self.step_tokens)

    def token_counts(self) -> np.ndarray:
        """int32 [N]: `counts`, or ones, shared by the traces of N elements (a plan's every replay had made its own,
        16 ms for the real trace). Not to be written: the kernels reorder a copy (loop.request_arrays), and a
        read-only array would be another type to them (compiled again)."""
        if self.counts is not None:
            return self.counts
        ones = _ONES.get(len(self.ids))
        if ones is None:
            _ONES.clear()  # one length at a time: a process replays one trace
            ones = _ONES[len(self.ids)] = np.ones(len(self.ids), np.int32)
        return ones


_ONES: dict = {}


def encode(trace) -> Requests:
    """The trace's requests as flat arrays; computed once per Trace object and kept on it."""
    got = getattr(trace, "_core_requests", None)
    if got is not None:
        return got
    starts = np.asarray(trace.step_starts, dtype=np.int64)
    experts = np.ascontiguousarray(trace.experts, dtype=np.int16)  # [T, L, K]; reads a memmap once
    T, L, K = experts.shape
    if len(starts) == T + 1 and (experts >= 0).all():  # one token per step, K ids per row: the rows themselves
        ids = experts.reshape(-1).copy()  # ids of a row are distinct (validated)
        counts = None  # every id chosen by one token (token_counts() makes the ones when a kernel needs them)
        ptr = np.arange(T * L + 1, dtype=np.int64) * K
        width = K if T else 0
    else:
        ids, counts, ptr = _encode(experts, starts, trace.spec.experts)
        width = int(np.diff(ptr).max()) if len(ptr) > 1 else 0
    req = Requests(ids, counts, ptr, np.diff(starts), trace.n_layers, trace.spec.experts, width)
    trace._core_requests = req
    return req


@njit(cache=True, nogil=True)
def _encode(experts, starts, E):
    T, L, K = experts.shape
    S = len(starts) - 1
    ids = np.empty(T * L * K, np.int16)
    counts = np.empty(T * L * K, np.int32)
    ptr = np.empty(S * L + 1, np.int64)
    where = np.full(E, -1, np.int64)  # index in `ids` of an expert within the current (step, layer)
    stamp = np.full(E, -1, np.int64)  # request position that `where` belongs to
    n = 0
    for s in range(S):
        lo, hi = starts[s], starts[s + 1]
        for l in range(L):
            pos = s * L + l
            ptr[pos] = n
            for t in range(lo, hi):
                for k in range(K):
                    e = experts[t, l, k]
                    if e < 0:
                        continue
                    if stamp[e] == pos:
                        counts[where[e]] += 1
                    else:
                        stamp[e] = pos
                        where[e] = n
                        ids[n] = e
                        counts[n] = 1
                        n += 1
    ptr[S * L] = n
    return ids[:n].copy(), counts[:n].copy(), ptr


@njit(cache=True, nogil=True)
def next_use(ids, ptr, L, E):
    """int64 [N]: for each request element, the next request position of the same key (NEVER if none)."""
    n_pos = len(ptr) - 1
    nxt = np.empty(len(ids), np.int64)
    upcoming = np.full(L * E, NEVER, np.int64)
    for pos in range(n_pos - 1, -1, -1):
        base = (pos % L) * E
        for i in range(ptr[pos], ptr[pos + 1]):
            kid = base + ids[i]
            nxt[i] = upcoming[kid]
            upcoming[kid] = pos
    return nxt


@njit(cache=True, nogil=True)
def key_positions(ids, ptr, L, E):
    """(positions int64 [N], offsets int64 [L * E + 1]): each key's request positions, ascending, at
    positions[offsets[kid]:offsets[kid + 1]]: a counting sort of the elements by key, one pass to count and one
    to place (numpy's stable argsort with its repeat and casts took 1.9 s on the real trace)."""
    offsets = np.zeros(L * E + 1, np.int64)
    for pos in range(len(ptr) - 1):
        base = (pos % L) * E + 1
        for i in range(ptr[pos], ptr[pos + 1]):
            offsets[base + ids[i]] += 1
    for k in range(L * E):
        offsets[k + 1] += offsets[k]
    fill = offsets[:-1].copy()
    positions = np.empty(ptr[-1], np.int64)
    for pos in range(len(ptr) - 1):  # positions ascend, so each key's run does too
        base = (pos % L) * E
        for i in range(ptr[pos], ptr[pos + 1]):
            kid = base + ids[i]
            positions[fill[kid]] = pos
            fill[kid] += 1
    return positions, offsets


def reset_steps(trace, reset_per_seq: bool) -> np.ndarray:
    """uint8 [S]: 1 where the engine empties the cache before the step (a step holding a sequence not seen
    before, except the first such step), as moesim.engine.replay does with reset_per_seq."""
    S = trace.n_steps
    out = np.zeros(S, np.uint8)
    if not reset_per_seq or S == 0:
        return out
    seq = np.asarray(trace.seq)
    _, first = np.unique(seq, return_index=True)  # first token of each sequence
    step_of_token = np.repeat(np.arange(S), np.diff(trace.step_starts))
    out[step_of_token[first]] = 1
    out[0] = 0  # the first step starts empty anyway: no reset
    return out


@njit(cache=True, nogil=True)
def width(ptr):
    """The most ids of one request."""
    w = 1
    for pos in range(len(ptr) - 1):
        w = max(w, ptr[pos + 1] - ptr[pos])
    return w



def next_uses(trace) -> np.ndarray:
    """int64 [N]: `next_use` of the trace's requests, computed once per Trace object (Belady's ranks)."""
    nxt = getattr(trace, "_core_next_use", None)
    if nxt is None:
        req = encode(trace)
        nxt = trace._core_next_use = next_use(req.ids, req.ptr, req.n_layers, req.n_experts)
    return nxt
