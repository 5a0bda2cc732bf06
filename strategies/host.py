"""Host: compute misses on the host from their host copies, moving the layer's activations instead of the
experts' weights. `offload=host`.

As Fiddler (Kamahori et al. 2024, arXiv:2402.07033) does for single-token decode: a batch-1 expert FFN on
the CPU reads the expert's weights from host memory once, which can cost less than copying them over PCIe.
Options:
  device_set: none     no expert is kept on the device for good
              popular  the experts most requested in calibration (strategies/calibration.py), as many as the
                       budget holds (per layer in `per_layer` scope, over all layers in `global`), are
                       fetched on first use; nothing else is loaded, so nothing evicts them: Fiddler's
                       popularity-profiled placement, warmed on first use instead of at load time
  share: 1.0           the share of the other misses computed on the host, spread evenly (the rest are
                       fetched); `auto`: fetch_ms / (fetch_ms + host_ms) at the miss's token count, the
                       share that keeps the copy engine and the CPU equally busy (moesim's own rule)
  fill_first: false    true: fetch every miss until the cache (the miss's partition) has been filled once
                       (counts this policy's fetches only)
  load: false          true: also copy a host-computed miss into the cache in the background for later
                       requests (as a llama.cpp fork's MoE cache: strategy=llama_cpp_fork_moe_cache), while the
                       copy engine holds less than `max_inflight` (null: no cap; bytes, `256MiB`, or `4 experts`)
  loads_per_layer: null  with load: at most this many background loads per layer per step; the layer's other
                       host misses are computed on the host only (llama.cpp PR #27861's
                       `--moe-expert-cache-inserts`: strategy=llama_cpp_moe_expert_cache)
"""
from __future__ import annotations

import numpy as np

from moesim.errors import MoesimError

from . import OffloadPolicy
from .calibration import Calibrated

DEVICE_SETS = ("none", "popular")


class Host(OffloadPolicy, Calibrated):
    where = "offload"

    def __init__(self, device_set: str = "none", share=1.0, fill_first: bool = False, load: bool = False,
                 max_inflight=None, loads_per_layer: int | None = None, calibrate_tokens: int | None = None,
                 calibrate_fraction: float = 0.1, calibrate_trace: str | None = None):
        from moesim.units import parse_inflight

        if device_set not in DEVICE_SETS:
            raise MoesimError(f"offload.device_set={device_set!r}: expected one of {', '.join(DEVICE_SETS)}")
        if share != "auto" and not (isinstance(share, (int, float)) and not isinstance(share, bool)
                                    and 0 <= share <= 1):
            raise MoesimError(f"offload.share={share!r}: expected a number in [0, 1] or auto")
        for name, v in (("fill_first", fill_first), ("load", load)):
            if not isinstance(v, bool):
                raise MoesimError(f"offload.{name}: expected true or false, got {v!r}")
        if loads_per_layer is not None and (not isinstance(loads_per_layer, int) or isinstance(loads_per_layer, bool)
                                            or loads_per_layer < 0):
            raise MoesimError(f"offload.loads_per_layer={loads_per_layer!r}: expected a whole number >= 0 or null")
        self.device_set, self.share, self.fill_first, self.load = device_set, share, fill_first, load
        self.loads_per_layer = loads_per_layer
        parse_inflight(max_inflight, 1, "offload.max_inflight")  # checks the form; the engine resolves it
        self.max_inflight = max_inflight
        self.init_calibration(calibrate_tokens, calibrate_fraction, calibrate_trace)
        self.device: frozenset = frozenset()

    def setup(self, ctx) -> None:
        self.device = frozenset() if self.device_set == "none" else popular_keys(self.calibration(ctx), ctx)
        self.miss = "host_and_load" if self.load else "host"
        per_layer = ctx.scope == "per_layer"
        self.partition_of = list(range(ctx.spec.layers)) if per_layer else [0] * ctx.spec.layers
        self.room = [ctx.capacity // ctx.spec.layers if per_layer else ctx.capacity] * (ctx.spec.layers if per_layer else 1)
        self.owed = 0.0  # host share accumulated and not yet paid by a host decision
        self._auto: dict[int, float] = {}  # n_tokens -> auto share
        self.loaded = [0] * ctx.spec.layers  # background loads per layer in the current step (loads_per_layer)

    def begin_step(self, n_tokens: int) -> None:
        if self.loads_per_layer is not None:
            self.loaded = [0] * len(self.loaded)

    def _host(self, layer: int) -> str:
        """The host decision for a miss of `layer`: with load, a background load while the layer has any left."""
        if self.miss == "host_and_load" and self.loads_per_layer is not None:
            if self.loaded[layer] >= self.loads_per_layer:
                return "host"
            self.loaded[layer] += 1
        return self.miss

    def on_miss(self, key, n_tokens: int, cost) -> str:
        if key in self.device:
            return "fetch"
        return self.other_miss(key, n_tokens, cost)

    def other_miss(self, key, n_tokens: int, cost) -> str:
        """A miss outside the device set: fill the cache first if asked, then host by the share."""
        if self.fill_first:
            p = self.partition_of[key[0]]
            if self.room[p] > 0:
                self.room[p] -= 1
                return "fetch"
        share = self.share if self.share != "auto" else self.share_at(key, n_tokens, cost)
        if share >= 1.0:
            return self._host(key[0])
        self.owed += share  # error diffusion: over n misses, round(n * share) go to the host, evenly spread
        if self.owed >= 1.0 - 1e-12:
            self.owed -= 1.0
            return self._host(key[0])
        return "fetch"

    def share_at(self, key, n_tokens: int, cost) -> float:
        """The share of misses over `n_tokens` tokens to compute on the host: `share`, or with `auto`
        fetch_ms / (fetch_ms + host_ms), which keeps the copy engine and the CPU equally busy."""
        if self.share != "auto":
            return float(self.share)
        share = self._auto.get(n_tokens)
        if share is None:
            f, h = cost.fetch_ms(key), cost.host_ms(key, n_tokens)
            share = self._auto[n_tokens] = f / (f + h)
        return share


def popular_keys(calib, ctx) -> frozenset:
    """The keys requested at the most (step, layer) positions of `calib`, as many as the budget holds:
    capacity // L per layer in `per_layer` scope, `capacity` over all layers in `global` (ties: lower key)."""
    from .static import request_counts

    L = ctx.spec.layers
    counts = request_counts(calib, tuple(range(L)))  # [L, E]
    if ctx.scope == "per_layer":
        per = ctx.capacity // L
        order = np.argsort(-counts, axis=1, kind="stable")[:, :per]
        return frozenset((int(l), int(e)) for l in range(L) for e in order[l] if counts[l, e] > 0)
    flat = counts.reshape(-1)
    order = np.argsort(-flat, kind="stable")[: ctx.capacity]
    E = counts.shape[1]
    return frozenset((int(i // E), int(i % E)) for i in order if flat[i] > 0)
