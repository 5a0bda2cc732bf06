"""Each system preset makes, on a small hand-made trace, exactly the decisions its source's rules give when applied
by hand (the rules and their citations are in the preset's YAML and docs/preset-sources.md; the derivation is in
each test's comments). A decision is a load (key, prefetch or demand) or a computation (which keys on the device,
which on the host), in the order the drivers make them; both drivers (the compiled core and the Python loop)
must give the same sequence.

    python -m pytest tests/test_preset_decisions.py -q
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from moesim.api import build, compose_run, replay_parts, resolve_strategy, run_scope
from moesim.trace import ModelSpec, from_arrays

SPEC = ModelSpec("toy4", layers=2, experts=4, top_k=2, hidden=64, ffn=64, bits_per_weight=16)


def trace_of(rows):
    """A batch-1 trace: rows[t][l] = the two experts token t routes to at layer l (of 4 experts)."""
    e = np.asarray(rows, dtype=np.int64)
    spec = dataclasses.replace(SPEC, layers=e.shape[1])
    return from_arrays(spec, e, np.full(e.shape, 0.5), seq=np.zeros(len(rows), dtype=np.int64))


class Decisions:
    """A backend that keeps the decisions the drivers hand it: ("load", (layer, expert), prefetch) and
    ("compute", layer, device keys in order, host keys in order)."""

    name = "decisions"

    def __init__(self):
        from moesim.backends.sim import SimBackend

        self.sim, self.log = SimBackend("rtx-4090"), []
        self.hardware, self.pinned = self.sim.hardware, self.sim.pinned

    def setup(self, spec, n_slots, profiler):
        self.sim.setup(spec, n_slots, profiler)

    def begin_step(self, step, n_tokens):
        self.sim.begin_step(step, n_tokens)

    def route(self, experts, weights):
        pass

    def begin_layer(self, layer):
        pass

    def load(self, key, slot, prefetch):
        self.log.append(("load", tuple(key), bool(prefetch)))
        self.sim.load(key, slot, prefetch)

    def compute(self, layer, device, host):
        self.log.append(("compute", layer, [tuple(k) for k, _, _ in device], [tuple(k) for k, _ in host]))
        self.sim.compute(layer, device, host)

    def end_step(self):
        self.sim.end_step()

    def finish(self):
        pass

    def device_bytes(self):
        return self.sim.device_bytes()


def decisions(strategy: str, rows, slots: int, *overrides) -> list:
    """The decisions of preset `strategy` with `slots` slots on the trace of `rows`, by the Python driver; the
    compiled core's recorded script must give the same ones."""
    tr = trace_of(rows)
    cfg = resolve_strategy(compose_run("gpt-oss-like", strategy, overrides=list(overrides)))  # the trace: below
    st = cfg.strategy
    scope = run_scope(cfg)

    def once(fast):
        backend = Decisions()
        make_policy = lambda: build(st.cache, "strategy.cache")  # noqa: E731
        pre = build(st.prefetch, "prefetch") if st.get("prefetch") else None
        off = build(st.offload, "offload") if st.get("offload") else None
        replay_parts(tr, tr.spec, slots, scope, make_policy, pre, off, backend, "rtx-4090", fast=fast)
        return backend.log

    python = once(False)
    assert once("auto") == python, "the compiled core decides differently from the Python driver"
    return python


def loads(log):
    return [(key, pre) for kind, key, pre in (x for x in log if x[0] == "load")]


def computes(log):
    return [x[1:] for x in log if x[0] == "compute"]


ROWS = [  # token: (layer 0's experts, layer 1's experts)
    [(0, 1), (2, 3)],
    [(0, 2), (2, 0)],
    [(3, 1), (1, 3)],
]


def test_mixtral_offloading_released_code():
    """dvmazur/mixtral-offloading@ce545188: one LRU per layer of k slots (here k = 3: budget 6 over 2 layers);
    load_experts marks every requested expert used, then swaps each miss in over the layer's least recently
    used expert; all computed on the GPU; no prefetch. By hand, layer 0: t0 loads 0, 1; t1 hits 0, loads 2
    (3 slots: nothing evicted); t2 marks 1 used, loads 3 over the LRU of {0, 2} = 0 (used at t1 before 2).
    Layer 1: t0 loads 2, 3; t1 hits 2, loads 0; t2 marks 3 used (a hit), loads 1 over the LRU of {2, 0} = 2 (used
    at t1 before 0 was loaded)."""
    log = decisions("mixtral_offloading", ROWS, 6)
    assert loads(log) == [((0, 0), False), ((0, 1), False), ((1, 2), False), ((1, 3), False),
                          ((0, 2), False), ((1, 0), False),
                          ((0, 3), False), ((1, 1), False)]
    assert all(host == [] for _, _, host in computes(log))


def test_llama_cpp_moe_cache_one_pool_every_miss_uploaded():
    """ggml-org/llama.cpp@4b060f27 src/llama-moe-cache.cpp: one LRU over all host-expert layers (one pool, here
    3 slots for 2 layers), hits touched first, each miss takes the LRU slot of any layer and is uploaded; the
    GPU computes every selected expert. By hand: t0 L0 loads 0, 1; L1 loads 2 (free slot), then 3 over the LRU
    (0,0). t1 L0: 0 and 2 both miss (0,0 was evicted): 0 over (0,1), 2 over (1,2)... the pool's LRU order is
    (0,1), (1,2), (1,3): (0,0) takes (0,1)'s slot, (0,2) takes (1,2)'s; L1: (1,2) over (1,3), (1,0) over (0,0).
    Nothing is ever computed on the host."""
    log = decisions("llama_cpp_moe_cache", ROWS[:2], 3)
    assert loads(log) == [((0, 0), False), ((0, 1), False), ((1, 2), False), ((1, 3), False),
                          ((0, 0), False), ((0, 2), False), ((1, 2), False), ((1, 0), False)]
    assert all(host == [] for _, _, host in computes(log))


def test_ktransformers_every_routed_expert_on_the_cpu():
    """kvcache-ai/ktransformers@4e1359d DeepSeek-V3-Chat.yaml: KExpertsCPU for every MoE layer's experts when
    decoding: nothing is loaded, every routed expert of every token is a host computation, in routing order."""
    log = decisions("ktransformers", ROWS, 2)
    assert loads(log) == []
    assert computes(log) == [(0, [], [(0, 0), (0, 1)]), (1, [], [(1, 2), (1, 3)]),
                             (0, [], [(0, 0), (0, 2)]), (1, [], [(1, 2), (1, 0)]),
                             (0, [], [(0, 3), (0, 1)]), (1, [], [(1, 1), (1, 3)])]


def test_llama_cpp_ncmoe_first_layers_on_the_cpu():
    """ggml-org/llama.cpp@0017d6f common/arg.cpp: --n-cpu-moe N keeps the experts of the first N layers in host
    memory, computed by the CPU; the other layers' experts are in VRAM. With 4 slots (one layer of 4 experts) in
    one pool, auto gives N = 2 - 4 // 4 = 1: layer 0 on the host, layer 1 fetched once per expert (moesim warms
    the GPU layers on first use) and never evicted."""
    log = decisions("llama_cpp_ncmoe", ROWS, 4)
    assert loads(log) == [((1, 2), False), ((1, 3), False), ((1, 0), False), ((1, 1), False)]
    assert [host for layer, _, host in computes(log) if layer == 0] == [[(0, 0), (0, 1)], [(0, 0), (0, 2)],
                                                                      [(0, 3), (0, 1)]]
    assert all(host == [] for layer, _, host in computes(log) if layer == 1)


def test_layer_offload_moves_whole_layers():
    """accelerate / DeepSpeed ZeRO-Inference: every expert of a layer is brought each time the layer runs, whatever
    the routing; two layers' worth of slots (8 of 4-expert layers, 3 layers) keep nothing longer. By hand: t0 L0
    demand-loads its 2 routed experts (no layer precedes it); once L0 is routed all 4 of L1 are prefetched; once
    L1 is routed all 4 of L2, evicting L0's two (L1's are pinned); L2 brings all 4 of the next step's L0 over L1's;
    t1 L0 hits them and brings L1 over L2's, L1 brings L2 over L0's; the last layer has no next step."""
    rows = [[(0, 1), (2, 3), (1, 2)], [(0, 2), (2, 0), (3, 1)]]
    log = decisions("layer_offload", rows, 8)
    all_of = lambda layer: [((layer, e), True) for e in range(4)]  # noqa: E731
    assert loads(log) == [((0, 0), False), ((0, 1), False), *all_of(1), *all_of(2), *all_of(0), *all_of(1),
                          *all_of(2)]
    assert all(host == [] for _, _, host in computes(log))


@pytest.mark.parametrize("strategy", ["mixtral_offloading", "llama_cpp_moe_cache", "ktransformers", "llama_cpp_ncmoe"])
def test_each_tested_preset_still_names_its_pinned_source(strategy):
    from importlib.resources import files
    import re

    text = files("moesim.conf").joinpath("strategy", f"{strategy}.yaml").read_text()
    assert re.search(r"[0-9a-f]{40}", text), strategy
