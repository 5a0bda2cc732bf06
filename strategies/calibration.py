"""Calibration data for the learned policies (prefetchers `transition` and `history`, offload `host`/`cost`
with `device_set: popular`): what they may learn from, and nothing else.

    prefetch.calibrate_trace=traces/calib.moetrace.safetensors   # another trace (any format moesim reads)
    prefetch.calibrate_fraction=0.1                              # else: this share of the replayed trace's start

A learned policy reads its calibration trace once in `setup` and keeps only tables computed from it.
With a prefix of the replayed trace the policy has seen the start of what it is judged on, so judge its
results on the tokens after `calibration_tokens` (scripts/compare_strategies.py uses a separate trace).
"""
from __future__ import annotations

import math

import numpy as np

from moesim.errors import MoesimError


class Calibrated:
    """The calibration options shared by learned policies; `where` names the config block in errors."""

    where = "strategy"

    def init_calibration(self, calibrate_tokens: int | None, calibrate_fraction: float,
                         calibrate_trace: str | None) -> None:
        if calibrate_tokens is not None and (not isinstance(calibrate_tokens, int) or isinstance(calibrate_tokens, bool)
                                             or calibrate_tokens <= 0):
            raise MoesimError(f"{self.where}.calibrate_tokens: expected a positive integer or null, "
                              f"got {calibrate_tokens!r}")
        if not (isinstance(calibrate_fraction, (int, float)) and not isinstance(calibrate_fraction, bool)
                and 0 < calibrate_fraction <= 1):
            raise MoesimError(f"{self.where}.calibrate_fraction: expected a number in (0, 1], "
                              f"got {calibrate_fraction!r}")
        self.calibrate_tokens = calibrate_tokens
        self.calibrate_fraction = float(calibrate_fraction)
        self.calibrate_trace = calibrate_trace
        self.calibration_tokens = 0  # tokens of the replayed trace the policy has seen

    def calibration(self, ctx):
        """The calibration Trace: `calibrate_trace` (a Trace, or a reference `ctx` reads: policies open no
        files), else the first tokens of the replayed trace."""
        if self.calibrate_trace is not None:
            calib = ctx.calibration_trace(self.calibrate_trace, f"{self.where}.calibrate_trace")
            self.calibration_tokens = 0
            return calib
        T = ctx.trace.n_tokens
        n = self.calibrate_tokens if self.calibrate_tokens is not None else math.ceil(self.calibrate_fraction * T)
        self.calibration_tokens = min(n, T)
        return ctx.trace.slice_tokens(0, self.calibration_tokens)


def token_onehot(trace, lo: int, hi: int) -> np.ndarray:
    """float32 [hi - lo, L, E]: 1 where token t chose expert e at layer l (the rows of tokens lo..hi-1)."""
    e = np.asarray(trace.experts[lo:hi], dtype=np.int64)  # [n, L, K]
    n, L, K = e.shape
    out = np.zeros((n, L, trace.spec.experts), np.float32)
    t, l, k = np.nonzero(e >= 0)
    out[t, l, e[t, l, k]] = 1.0
    return out


def popularity(trace) -> np.ndarray:
    """float64 [L, E]: the share of tokens that chose each expert at each layer (0 rows for an empty trace)."""
    L, E = trace.n_layers, trace.spec.experts
    counts = np.zeros((L, E), np.float64)
    for lo in range(0, trace.n_tokens, 16384):
        counts += token_onehot(trace, lo, min(trace.n_tokens, lo + 16384)).sum(axis=0)
    return counts / max(1, trace.n_tokens)
