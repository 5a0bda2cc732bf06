"""History prefetch: match the current sequence's expert activations so far against past sequences, and
prefetch what the closest one used. `prefetch=history`.

After MoE-Infinity's expert activation matrix (Xue et al. 2024, arXiv:2401.14361: per request, an L x E
matrix of how many tokens each expert of each layer served; the current request's matrix is matched by
cosine similarity against a collection of past ones, and the best match's rows for the coming layers
rank what to prefetch). Here:

- the collection is one matrix per sequence of the calibration trace (strategies/calibration.py);
- the current sequence's matrix counts its tokens before the current step; its similarity to a past one
  is the mean over layers of the cosine of their rows (rows the sequence has not used count 0);
- the match is made once per step (MoE-Infinity matches again at every layer, with the current token's
  earlier layers; approximated);
- for each predicted layer the best match's experts are ranked by its counts (ties: lower id); before a
  sequence's first step is routed, by their popularity in calibration.
"""
from __future__ import annotations

import numpy as np

from .calibration import Calibrated
from .prefetch_table import CHUNK_STEPS, TablePrefetcher, rank, step_matrix, targets


class History(TablePrefetcher, Calibrated):
    where = "prefetch"

    def __init__(self, lookahead: int = 1, per_layer: int | None = None, max_inflight=None,
                 calibrate_tokens: int | None = None, calibrate_fraction: float = 0.1,
                 calibrate_trace: str | None = None):
        super().__init__(lookahead, per_layer, max_inflight)
        self.init_calibration(calibrate_tokens, calibrate_fraction, calibrate_trace)

    def setup(self, ctx) -> None:
        self.learn(self.calibration(ctx))
        super().setup(ctx)

    def learn(self, calib) -> None:
        """The collection: `matrices` (float64 [N, L, E], tokens per expert per sequence), their rows as unit
        vectors flattened (`unit` [N, L * E]) and the popularity ranking fallback (`popular` [L, E])."""
        L, E = calib.n_layers, calib.spec.experts
        _, seq_index = np.unique(np.asarray(calib.seq), return_inverse=True)
        N = int(seq_index.max()) + 1 if calib.n_tokens else 0
        e = np.asarray(calib.experts, dtype=np.int64)  # [T, L, K]
        t, l, k = np.nonzero(e >= 0)
        code = (seq_index[t] * L + l) * E + e[t, l, k]
        self.matrices = np.bincount(code, minlength=N * L * E).astype(np.float64).reshape(N, L, E)
        self.unit = _unit_rows(self.matrices).reshape(N, L * E)
        self.popular = rank(self.matrices.sum(axis=0), E)  # [L, E]

    def build(self, ctx):
        tr = ctx.trace
        S, L, D = tr.n_steps, tr.n_layers, self.lookahead
        width = self.per_layer or ctx.spec.top_k
        match = self.matches(tr)  # [S]: best past sequence per step, -1 before a sequence's first step
        ranked = rank(self.matrices, width) if len(self.matrices) else np.full((1, L, width), -1, np.int16)
        per_step = np.where((match >= 0)[:, None, None], ranked[np.maximum(match, 0)],
                            self.popular[None, :, :width])  # [S, L, width]
        table = np.empty((S, L, D, width), np.int16)
        for layer, ts in enumerate(targets(L, D)):
            for i, (_, m) in enumerate(ts):
                table[:, layer, i] = per_step[:, m]  # the match made at this step, also for the next step's layers
        return table.reshape(S * L, D, width)

    def matches(self, tr) -> np.ndarray:
        """int64 [S]: per step, the calibration sequence closest to the current sequence's tokens before it."""
        S, L, E = tr.n_steps, tr.n_layers, tr.spec.experts
        out = np.full(S, -1, np.int64)
        if not len(self.unit):
            return out
        for s0, s1, eam in sequence_so_far(tr):
            seen = eam.reshape(s1 - s0, -1).sum(axis=1) > 0
            sim = _unit_rows(eam).reshape(s1 - s0, L * E) @ self.unit.T  # [c, N]: sum of row cosines
            out[s0:s1] = np.where(seen, np.argmax(sim, axis=1), -1)
        return out


def sequence_so_far(tr, chunk: int = CHUNK_STEPS):
    """Per chunk of steps: (s0, s1, eam float64 [s1 - s0, L, E]), eam[i] = the tokens per expert of step s0 + i's
    sequence (its first token's) over that sequence's steps before s0 + i: the expert activation matrix so far."""
    S, L, E = tr.n_steps, tr.n_layers, tr.spec.experts
    step_seq = tr.step_seq()
    carry, carry_seq = np.zeros((L, E)), None  # the running matrix of the sequence open at a chunk's start
    for s0 in range(0, S, chunk):
        s1 = min(S, s0 + chunk)
        X = step_matrix(tr, s0, s1).astype(np.float64)  # [c, L, E]
        sq = step_seq[s0:s1]
        before = _running_sum(X) - X  # sums of the chunk's earlier steps
        start = np.r_[True, sq[1:] != sq[:-1]]
        first = np.maximum.accumulate(np.where(start, np.arange(s1 - s0), 0))  # first step of each one's sequence
        eam = before - before[first]  # this sequence's steps before each step, within the chunk
        eam[sq == carry_seq] += carry  # and before the chunk
        yield s0, s1, eam
        carry, carry_seq = eam[-1] + X[-1], sq[-1]


def _running_sum(X: np.ndarray) -> np.ndarray:
    """np.cumsum(X, axis=0), the same additions in the same order, a row at a time: numpy's own walks the
    axis element by element (4 ms against 0.5 for a chunk of the real trace)."""
    out = np.empty_like(X)
    if len(X):
        out[0] = X[0]
    for i in range(1, len(X)):
        np.add(out[i - 1], X[i], out=out[i])
    return out


def _unit_rows(m: np.ndarray) -> np.ndarray:
    """`m` [..., L, E] with each row scaled to unit length (zero rows stay zero)."""
    norm = np.linalg.norm(m, axis=-1, keepdims=True)
    return m / np.where(norm > 0, norm, 1.0)
