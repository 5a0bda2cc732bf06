"""Fetch: load every miss into the cache and wait for it (demand loading). `offload=fetch`, the default.

The same as no offload policy at all; named so that a preset's offload can be replaced by plain loading
(`strategy=fiddler offload=fetch`).
"""
from __future__ import annotations

from . import OffloadPolicy


class Fetch(OffloadPolicy):
    def on_miss(self, key, n_tokens: int, cost) -> str:
        return "fetch"
