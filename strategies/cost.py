"""Cost: per miss, whichever is faster for this step's token count under the hardware profile: load the
expert and compute it on the device, or compute it on the host. `offload=cost`.

    fetch  if  fetch_ms(key) + device_ms(key, n_tokens)  <=  host_ms(key, n_tokens)   else  host

(moesim/hardware.py: Cost; host_ms includes the activations' round trip.) This is Fiddler's rule
(Kamahori et al. 2024, arXiv:2402.07033: per expert, by its input tokens, from a latency model of both
sides) and, with a fixed threshold instead of a cost model, llama.cpp's for experts kept in host memory
(computed on the CPU; copied to the GPU for batches of at least GGML_OP_OFFLOAD_MIN_BATCH = 32 tokens).
A batch-1 decode miss mostly runs on the host; a long prefill chunk is fetched. The options of
`offload=host` apply (device_set, share, fill_first, load, max_inflight, calibrate_*) to the misses the
rule sends to the host; a key of the device set is always fetched.
"""
from __future__ import annotations

from .host import Host


class Cost(Host):
    def setup(self, ctx) -> None:
        super().setup(ctx)
        self._fetch_faster: dict[int, bool] = {}  # n_tokens -> decision (every routed expert costs the same)

    def on_miss(self, key, n_tokens: int, cost) -> str:
        if key in self.device:
            return "fetch"
        return "fetch" if self.fetch_is_faster(key, n_tokens, cost) else self.other_miss(key, n_tokens, cost)

    def fetch_is_faster(self, key, n_tokens: int, cost) -> bool:
        """Whether loading `key` and computing it on the device beats computing it on the host."""
        faster = self._fetch_faster.get(n_tokens)
        if faster is None:
            faster = self._fetch_faster[n_tokens] = (
                cost.fetch_ms(key) + cost.device_ms(key, n_tokens) <= cost.host_ms(key, n_tokens))
        return faster
