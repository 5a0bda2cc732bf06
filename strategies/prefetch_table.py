"""Prefetchers whose predictions are computed once, with numpy, in `setup`: the shared base and helpers.

Every prefetcher here is causal: what it predicts at request position pos = step * L + layer depends only
on routing the engine has already seen there (steps before `step`, and layers <= `layer` of `step`) plus
what it learned from calibration data. So the predictions for the whole replayed trace can be computed in
one vectorised pass before the replay, and `predict` is a table lookup (microseconds per call instead of a
numpy call per layer). tests/test_prefetch.py checks the causality: changing the trace after a position
never changes the predictions at or before it.

Table layout: `table[pos, d - 1, j]` = the j-th most wanted expert of layer (layer + d) % L (of the next
step when layer + d >= L) predicted at pos, -1 past the end of the ranking; d = 1 .. lookahead.
A `flat` table ranks keys across layers instead: `table[pos, 0, j]` = (d - 1) * E + expert, the j-th most
wanted key over all the layers ahead (d = 1, 2, ...), -1 past the end.
`build` may also return (table, rows): then position pos reads table[rows[pos]] (-1: no prediction), for
predictions that repeat (activation_match: one ranking per past sequence and layer, not per position).
"""
from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_limits

from . import Key, Prefetcher

CHUNK_STEPS = 4096  # steps per vectorised chunk: [4096, L, E] float32 arrays stay ~12 MB for 24 x 32


class TablePrefetcher(Prefetcher):
    """`build(ctx)` returns the table (int16 [S * L, lookahead, width], or [S * L, 1, width] where `flat`), or
    (table, rows int64 [S * L]); `predict` reads it."""

    flat = False  # one ranking over all layers ahead (see the module docstring)

    def setup(self, ctx) -> None:
        self.L, self.E = ctx.trace.n_layers, ctx.spec.experts
        self.keys: list[list[Key]] = [[(m, e) for e in range(self.E)] for m in range(self.L)]  # no tuple per call
        # one BLAS thread: the products here are of [4096, E] blocks, too small to split, and OpenBLAS threads
        # that wait for a busy core made them 80x slower on a loaded 2-core machine (same results either way)
        with threadpool_limits(limits=1, user_api="blas"):
            built = self.build(ctx)
        table, rows = built if isinstance(built, tuple) else (built, None)
        if self.per_layer is not None:
            table = table[:, :, : self.per_layer]
        self.table = np.ascontiguousarray(table, dtype=np.int16)
        self.rows = None if rows is None else np.ascontiguousarray(rows, dtype=np.int64)

    def build(self, ctx) -> np.ndarray:
        raise NotImplementedError

    def predict(self, pos: int, layer: int) -> list[Key]:
        if self.rows is not None:
            if pos >= len(self.rows) or self.rows[pos] < 0:
                return []
            pos = int(self.rows[pos])
        elif pos >= len(self.table):
            return []
        out: list[Key] = []
        keys, L = self.keys, self.L
        if self.flat:
            E = self.E
            return [keys[(layer + 1 + x // E) % L][x % E] for x in self.table[pos, 0].tolist() if x >= 0]
        for d, row in enumerate(self.table[pos].tolist(), 1):
            km = keys[(layer + d) % L]
            out.extend([km[e] for e in row if e >= 0])
        return out


    def per_position(self) -> np.ndarray:
        """The table with one row per request position (`rows` applied; all -1 where there is none)."""
        if self.rows is None:
            return self.table
        out = self.table[np.maximum(self.rows, 0)]
        out[self.rows < 0] = -1
        return out


def step_matrix(trace, s0: int, s1: int) -> np.ndarray:
    """float32 [s1 - s0, L, E]: how many tokens of each step chose each expert at each layer."""
    starts = trace.step_starts
    lo, hi = int(starts[s0]), int(starts[s1])
    e = np.asarray(trace.experts[lo:hi], dtype=np.int64)  # [n, L, K]
    step_of_token = np.repeat(np.arange(s1 - s0), np.diff(starts[s0:s1 + 1]))
    shape = (s1 - s0, trace.n_layers, trace.spec.experts)
    t, l, k = np.nonzero(e >= 0)
    flat = np.ravel_multi_index((step_of_token[t], l, e[t, l, k]), shape)
    return np.bincount(flat, minlength=int(np.prod(shape))).astype(np.float32).reshape(shape)  # counts: exact


def rank(scores: np.ndarray, width: int) -> np.ndarray:
    """int16 [..., width]: expert ids by score, highest first (ties: the lower id), -1 where the score is
    not positive or past the E experts."""
    E = scores.shape[-1]
    order = np.argsort(-scores, axis=-1, kind="stable")[..., :width]
    top = np.take_along_axis(scores, order, axis=-1)
    out = np.where(top > 0, order, -1).astype(np.int16)
    if width > E:
        pad = np.full(out.shape[:-1] + (width - E,), -1, np.int16)
        out = np.concatenate([out, pad], axis=-1)
    return out


def targets(L: int, lookahead: int):
    """Per source layer l and distance d = 1..lookahead: (steps ahead, target layer) of position l + d."""
    return [[divmod(layer + d, L) for d in range(1, lookahead + 1)] for layer in range(L)]


def ranked_rows(trace, rows, width: int | None = None) -> np.ndarray:
    """int16 [S, L, width]: per step and layer, the distinct ids of `rows` (int [T, L, P]: the trace's
    experts, or its predicted guesses) over the step's tokens, most chosen first, ties in order of first
    appearance (a batch-1 step: the row itself, best first); -1 padded. `width` None: the widest."""
    single = _single_token_rows(trace, rows, width)
    return single if single is not None else _ranked_chunks(trace, rows, width)


def _single_token_rows(trace, rows, width: int | None):
    """ranked_rows where every step is one token and no row names an expert twice or holds a -1: then each
    row is its own ranking (every count is 1, so the order of first appearance decides); else None. The real
    decode trace is so: its ranking takes 0.18-0.34 s instead of 3.3-4.7 s (ranked_rows against _ranked_chunks
    of the gpt-oss-20b trace's experts, two runs on the project's 2-core VM)."""
    S, L, E = trace.n_steps, trace.n_layers, trace.spec.experts
    if S == 0 or trace.n_tokens != S:
        return None
    r = np.asarray(rows[:S])
    if r.ndim != 3 or r.shape[1] != L or not (r >= 0).all():
        return None
    ordered = np.sort(r, axis=-1)
    if (ordered[..., 1:] == ordered[..., :-1]).any():
        return None
    P = r.shape[2]
    out = np.full((S, L, P if width is None else min(width, E)), -1, np.int16)
    c = min(P, out.shape[2])
    out[:, :, :c] = r[:, :, :c]
    return out


def _ranked_chunks(trace, rows, width: int | None) -> np.ndarray:
    """ranked_rows for any trace: per chunk of steps, each expert's count and first appearance, ranked."""
    starts = trace.step_starts
    S, L, E = trace.n_steps, trace.n_layers, trace.spec.experts
    chunks = []
    for s0 in range(0, S, CHUNK_STEPS):
        s1 = min(S, s0 + CHUNK_STEPS)
        lo, hi = int(starts[s0]), int(starts[s1])
        r = np.asarray(rows[lo:hi], dtype=np.int64)  # [n, L, P]
        n, _, P = r.shape
        step_of_token = np.repeat(np.arange(s1 - s0), np.diff(starts[s0:s1 + 1]))
        count = np.zeros((s1 - s0, L, E), np.float64)
        first = np.full((s1 - s0, L, E), np.inf)
        t, l, k = np.nonzero(r >= 0)
        idx = (step_of_token[t], l, r[t, l, k])
        np.add.at(count, idx, 1.0)
        np.minimum.at(first, idx, (t * P + k).astype(np.float64))
        score = np.where(count > 0, count * (n * P + 1) - first, 0.0)  # count first, then earliest
        chunks.append(rank(score, E))
    out = np.concatenate(chunks) if chunks else np.zeros((0, L, E), np.int16)
    used = int((out >= 0).sum(axis=-1).max()) if out.size else 0
    return out[:, :, : (used if width is None else width)]


def shift_table(per_step: np.ndarray, lookahead: int) -> np.ndarray:
    """[S * L, lookahead, W]: for each position (step s, layer l) and d, the row per_step[s + ds, m] of
    position l + d = ds * L + m (-1 past the last step)."""
    S, L, W = per_step.shape
    pad = np.full(((lookahead // L) + 1, L, W), -1, per_step.dtype)
    padded = np.concatenate([per_step, pad])
    table = np.empty((S, L, lookahead, W), per_step.dtype)
    for layer, ts in enumerate(targets(L, lookahead)):
        for i, (ds, m) in enumerate(ts):
            table[:, layer, i] = padded[ds: ds + S, m]
    return table.reshape(S * L, lookahead, W)
