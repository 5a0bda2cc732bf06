"""Transition prefetch: experts that follow the experts just routed, learned from calibration data.
`prefetch=transition`.

From the calibration trace only (strategies/calibration.py) it counts, within each sequence:

    P_d[l, e, f] = P(expert f at the position d layers later | expert e at layer l)     d = 1 .. lookahead
    R[m, e, f]   = P(expert f at layer m of the next token | expert e at layer m)       token-to-token reuse

(a position d layers after layer l is layer l + d of the same token, or layer l + d - L of the next one).
Once layer l of step s is routed it scores each expert f of each predicted layer m as

    score = (1 - reuse_weight) * mean over the experts e routed at l of P_d[l, e, f]
          +      reuse_weight  * mean over the experts e last routed at m of R[m, e, f]

("last routed at m": this step's layer m when m <= l, else the previous step's), and prefetches the
`per_layer` best (default top_k). reuse_weight 0.25 was chosen on calibration data alone: learning on the
first half of the comparison's calibration part and scoring the second, the share of next-layer experts
among the top 4 was 0.563, 0.565, 0.555, 0.516 for 0, 0.25, 0.5, 0.75. Source experts never seen in calibration fall back to layer m's
popularity in calibration. Means over a batched step weigh each expert by its tokens.
"""
from __future__ import annotations

import numpy as np

from moesim.errors import MoesimError

from .calibration import Calibrated, popularity
from .prefetch_table import CHUNK_STEPS, TablePrefetcher, rank, step_matrix, targets

CHUNK_TOKENS = 8192  # calibration tokens per vectorised chunk


class Transition(TablePrefetcher, Calibrated):
    where = "prefetch"

    def __init__(self, lookahead: int = 1, per_layer: int | None = None, max_inflight=None,
                 reuse_weight: float = 0.25, calibrate_tokens: int | None = None, calibrate_fraction: float = 0.1,
                 calibrate_trace: str | None = None):
        super().__init__(lookahead, per_layer, max_inflight)
        if not (isinstance(reuse_weight, (int, float)) and not isinstance(reuse_weight, bool)
                and 0 <= reuse_weight <= 1):
            raise MoesimError(f"prefetch.reuse_weight: expected a number in [0, 1], got {reuse_weight!r}")
        self.reuse_weight = float(reuse_weight)
        self.init_calibration(calibrate_tokens, calibrate_fraction, calibrate_trace)

    def setup(self, ctx) -> None:
        self.learn(self.calibration(ctx))
        super().setup(ctx)

    # ----------------------------------------------------------------------------------------- learning
    def learn(self, calib) -> None:
        """P (float32 [lookahead, L, E, E]), R ([L, E, E]) and the fallback popularity ([L, E]) from `calib`."""
        L, E, D, T = calib.n_layers, calib.spec.experts, self.lookahead, calib.n_tokens
        seq = np.asarray(calib.seq)
        span = (D // L) + 1  # tokens a target can be ahead of its source
        P = np.zeros((D, L, E * E), np.int64)  # pair counts, code = source * E + target
        R = np.zeros((L, E * E), np.int64)
        for lo in range(0, T, CHUNK_TOKENS):
            hi = min(T, lo + CHUNK_TOKENS)
            ex = np.asarray(calib.experts[lo:min(T, hi + span)], dtype=np.int64)  # [n, L, K]
            src = np.arange(lo, hi)
            for dt in range(span + 1):
                ok = src + dt < T
                ok[ok] &= seq[src[ok] + dt] == seq[src[ok]]  # never across two sequences
                t = src[ok] - lo
                if dt == 1:
                    for m in range(L):
                        R[m] += _pair_counts(ex[t, m], ex[t + 1, m], E)
                for layer, ts in enumerate(targets(L, D)):
                    for i, (dti, m) in enumerate(ts):
                        if dti == dt:
                            P[i, layer] += _pair_counts(ex[t, layer], ex[t + dt, m], E)
        self.popularity = popularity(calib)  # [L, E]
        tl = [[m for _, m in ts] for ts in zip(*targets(L, D))]  # tl[d][l]: target layer of l at distance d
        self.P = _normalise(P.reshape(D, L, E, E), self.popularity, tl)
        self.R = _normalise(R.reshape(1, L, E, E), self.popularity, [list(range(L))])[0]

    # ---------------------------------------------------------------------------------------- predicting
    def build(self, ctx):
        tr = ctx.trace
        S, L, E, D = tr.n_steps, tr.n_layers, tr.spec.experts, self.lookahead
        width = self.per_layer or ctx.spec.top_k
        w = self.reuse_weight
        table = np.empty((S, L, D, width), np.int16)
        prev = np.zeros((1, L, E), np.float32)  # the step before the chunk (none before step 0)
        for s0 in range(0, S, CHUNK_STEPS):
            s1 = min(S, s0 + CHUNK_STEPS)
            X = step_matrix(tr, s0, s1)  # [c, L, E]
            X = X / np.maximum(1.0, X.sum(axis=2, keepdims=True))  # each layer's routing as weights summing to 1
            before = np.concatenate([prev, X[:-1]])  # the step before each step of the chunk
            if s0 == 0:
                before[0] = 0.0
            for layer, ts in enumerate(targets(L, D)):
                for i, (dt, m) in enumerate(ts):
                    follow = X[:, layer] @ self.P[i, layer]  # [c, E]
                    last = X[:, m] if m <= layer else before[:, m]  # routing of layer m the engine has seen
                    seen = last.sum(axis=1, keepdims=True) > 0  # no reuse term before the first step
                    score = (1 - w) * follow + w * np.where(seen, last @ self.R[m], follow)
                    table[s0:s1, layer, i] = rank(score, width)
            prev = X[-1:]
        return table.reshape(S * L, D, width)


def _pair_counts(src: np.ndarray, dst: np.ndarray, E: int) -> np.ndarray:
    """int64 [E * E]: over rows, how often expert e in `src` [n, K] met expert f in `dst` [n, K] (-1: none)."""
    a = src[:, :, None]
    b = dst[:, None, :]
    ok = (a >= 0) & (b >= 0)
    return np.bincount((a * E + b)[ok], minlength=E * E)


def _normalise(counts: np.ndarray, pop: np.ndarray, target_layers: list[list[int]]) -> np.ndarray:
    """Rows of `counts` [D, L, E, E] as conditional distributions; a source never seen gets the target
    layer's popularity (`target_layers[d][l]` is the target layer of source layer l at distance d)."""
    out = np.empty(counts.shape, np.float32)
    for i in range(counts.shape[0]):
        for layer in range(counts.shape[1]):
            c = counts[i, layer]
            total = c.sum(axis=1, keepdims=True)
            fallback = pop[target_layers[i][layer]]
            out[i, layer] = np.where(total > 0, c / np.maximum(total, 1e-300), fallback[None, :])
    return out
