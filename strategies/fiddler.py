"""Fiddler's CPU/GPU rule: a fixed popular set on the device, every other expert computed by the CPU or, for
enough tokens, copied into a scratch buffer, run on the GPU and dropped. `offload=fiddler`, the offload policy
of `strategy=fiddler`.

From the released code (efeslab/fiddler@227715bfd6e8c731b29548eab01d9919c4fe9564 src/fiddler/mixtral.py;
docs/preset-sources.md section 2):
  - the device set: the most popular (layer, expert) pairs, as many as the budget holds over all layers
    (Fiddler's hard-coded popularity list; here the calibration trace's most requested experts, as offload=host
    `device_set: popular`), fetched on first use and never evicted (nothing else enters the cache);
  - any other expert routed n tokens runs on the CPU when n * latency_cpu < latency_gpu (the code's constants
    7 and 70: n <= 9), else it is copied into a scratch slot on the device, computed there and dropped
    (the code's `expert_placeholder`, overwritten by the next such expert);
  - a layer's CPU experts run after its GPU experts (`host_after_device`), not beside them.
"""
from __future__ import annotations

from moesim.errors import MoesimError

from .host import Host


class Fiddler(Host):
    host_after_device = True

    def __init__(self, latency_cpu: float = 7, latency_gpu: float = 70, calibrate_tokens: int | None = None,
                 calibrate_fraction: float = 0.1, calibrate_trace: str | None = None):
        for name, v in (("latency_cpu", latency_cpu), ("latency_gpu", latency_gpu)):
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0):
                raise MoesimError(f"offload.{name}={v!r}: expected a number >= 0 (Fiddler's cost units)")
        super().__init__(device_set="popular", calibrate_tokens=calibrate_tokens,
                         calibrate_fraction=calibrate_fraction, calibrate_trace=calibrate_trace)
        self.latency_cpu, self.latency_gpu = float(latency_cpu), float(latency_gpu)

    def scratch_slots(self, spec) -> int:
        return spec.experts  # the code reuses one placeholder in turn; moesim copies a layer's streamed experts first

    def streams(self, n_tokens: int) -> bool:
        """Whether an expert outside the device set, routed `n_tokens` tokens, is copied to the GPU (else the CPU
        computes it): the code's `cost_cpu = n * latency_cpu` against `cost_gpu = latency_gpu`, ties to the GPU."""
        return n_tokens * self.latency_cpu >= self.latency_gpu

    def on_miss(self, key, n_tokens: int, cost) -> str:
        if key in self.device:
            return "fetch"
        return "stream" if self.streams(n_tokens) else "host"
