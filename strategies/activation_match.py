"""Activation match: MoE-Infinity's prefetch as its code runs it: at every layer, match the sequence's expert
activation matrix against past ones on the layers still to run, and rank every expert of every later layer by
the match's counts, nearer layers weighed more. `prefetch=activation_match`, the prefetcher of
`strategy=moe_infinity`.

From EfficientMoE/MoE-Infinity@5e096b402303c57fab5b9122252376869a81e9dd (moe_infinity/models/mixtral.py L64-71,
moe_infinity/memory/expert_tracer.py find_most_similar, expert_predictor.py, expert_prefetcher.py;
docs/preset-sources.md section 3):
  - at every MoE layer l of every forward pass the sequence's matrix (tokens per expert per layer so far) is
    matched against the collection (the calibration trace's sequences, as prefetch=history): per layer the
    cosine of the two rows, averaged; the collection's layers <= l are made uniform, so only the layers after l
    decide (argmax; ties and an empty matrix: the first sequence);
  - the match's row of each layer m > l, plus 1e-8, times 1 - (m - l) / (L + 1), scores every expert of every
    later layer; all of them are queued, best first (ties: nearer layer, then lower id), which replaces the
    previous layer's queue; nothing is predicted past the forward pass's last layer.
The table is `flat` (one ranking over the layers ahead). Here the matrix holds the steps before the current one
(the running step's layers <= l do not change the match: the collection is uniform there); a step's sequence is
its first token's (the code matches each batch row). `per_layer` caps the ranking's length (null: every expert
of every later layer). The code cancels the queue at every layer; moesim cannot cancel an issued copy, so a
`max_inflight` cap stands in for it (strategy=moe_infinity: 2 experts, moesim's choice).
"""
from __future__ import annotations

import numpy as np

from .history import History, _unit_rows, sequence_so_far

MATCH_CHUNK = 512  # steps per vectorised match: [512, N, L] similarities


class ActivationMatch(History):
    flat = True

    def __init__(self, per_layer: int | None = None, max_inflight=None, calibrate_tokens: int | None = None,
                 calibrate_fraction: float = 0.1, calibrate_trace: str | None = None):
        super().__init__(1, per_layer, max_inflight, calibrate_tokens, calibrate_fraction, calibrate_trace)

    def build(self, ctx):
        tr = ctx.trace
        S, L, E = tr.n_steps, tr.n_layers, ctx.spec.experts
        C = self.matrices if len(self.matrices) else np.zeros((1, L, E))  # no collection: zero rows, as the code's
        N = len(C)
        Cu = _unit_rows(C)  # [N, L, E]
        W = max(L - 1, 1) * E
        # the ranking depends only on (matched sequence, layer): one row each, and per position its row
        ranking = np.full((N, L, W), -1, np.int16)
        for layer in range(L - 1):
            weight = 1.0 - np.arange(1, L - layer)[None, :, None] / (L + 1)
            score = ((C[:, layer + 1:, :] + 1e-8) * weight).reshape(N, -1)
            order = np.argsort(-score, axis=1, kind="stable")  # ties: nearer layer, then lower id
            ranking[:, layer, : order.shape[1]] = order
        rows = np.empty((S, L), np.int64)
        for s0, s1, eam in sequence_so_far(tr, MATCH_CHUNK):
            D = np.einsum("cle,nle->cnl", _unit_rows(eam), Cu)  # [c, N, L]: per-layer cosines
            after = np.cumsum(D[:, :, ::-1], axis=2)[:, :, ::-1] - D  # [c, N, L]: sum over layers m > l
            rows[s0:s1] = np.argmax(after, axis=1) * L + np.arange(L)  # [c, L]: the match's row of each layer
        return ranking.reshape(N * L, 1, W), rows.reshape(S * L)
