"""Static split: the experts of chosen layers live on the host for good and are computed there; the other
layers' experts are loaded on a miss. `offload=static_split`.

As llama.cpp's `--n-cpu-moe N` (keep the MoE weights of the first N layers in host memory, computed by the
CPU; the rest on the GPU). `host_layers`:
  N (an integer)   the first N layers
  [l, ...]         these layers
  all              every layer: all routed experts computed by the host (KTransformers' placement)
  auto             as many first layers as needed for the rest to fit the budget whole: N = L - slots // E.
                   Needs `scope=global` (per layer, a layer's share of the slots never holds all its experts).
With `scope=global` and `auto` the device layers' experts all fit, so after each is loaded once nothing is
evicted: llama.cpp's load-time placement, warmed on first use.
`min_batch` (null: never): in a step of at least this many tokens a host layer's experts are streamed instead:
copied into scratch slots on the device (one per expert of a layer), computed there, and dropped. llama.cpp's
rule for a host weight under a batch of 32+ tokens (GGML_OP_OFFLOAD_MIN_BATCH, default 32: ggml's scheduler
copies only the experts the batch uses and keeps none).
"""
from __future__ import annotations

from moesim.errors import MoesimError

from . import OffloadPolicy


class StaticSplit(OffloadPolicy):
    def __init__(self, host_layers="auto", min_batch: int | None = None):
        ok = (host_layers in ("auto", "all") or (isinstance(host_layers, int) and not isinstance(host_layers, bool)
                                        and host_layers >= 0)
              or (hasattr(host_layers, "__iter__") and not isinstance(host_layers, str)
                  and all(isinstance(x, int) and not isinstance(x, bool) for x in host_layers)))
        if not ok:
            raise MoesimError(f"offload.host_layers={host_layers!r}: expected auto, all, a number of first layers, "
                              f"or a list of layer indices")
        self.host_layers = host_layers if isinstance(host_layers, (int, str)) else [int(x) for x in host_layers]
        if min_batch is not None and (not isinstance(min_batch, int) or isinstance(min_batch, bool) or min_batch < 1):
            raise MoesimError(f"offload.min_batch={min_batch!r}: expected a whole number of tokens >= 1, or null")
        self.min_batch = min_batch
        self.step_tokens = 1

    def setup(self, ctx) -> None:
        L, E = ctx.spec.layers, ctx.spec.experts
        spec = self.host_layers
        if spec == "auto":
            if ctx.scope != "global":
                raise MoesimError("offload.host_layers=auto: the device layers must fit the budget whole, which "
                                  "needs one pool; add scope=global (or give host_layers=N)")
            n = max(0, L - ctx.capacity // E)
            layers = range(n)
        elif spec == "all":
            layers = range(L)
        elif isinstance(spec, int):
            if spec > L:
                raise MoesimError(f"offload.host_layers={spec}: the model has {L} layers")
            layers = range(spec)
        else:
            bad = [x for x in spec if not 0 <= x < L]
            if bad:
                raise MoesimError(f"offload.host_layers: layer(s) {bad} out of range 0..{L - 1}")
            layers = spec
        self.host = frozenset(layers)

    def scratch_slots(self, spec) -> int:
        return spec.experts if self.min_batch is not None else 0

    def begin_step(self, n_tokens: int) -> None:
        self.step_tokens = n_tokens

    def on_miss(self, key, n_tokens: int, cost) -> str:
        if key[0] not in self.host:
            return "fetch"
        return "stream" if self.min_batch is not None and self.step_tokens >= self.min_batch else "host"
