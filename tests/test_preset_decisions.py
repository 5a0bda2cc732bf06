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


def trace_of(rows, predicted=None, step=None):
    """A trace: rows[t][l] = the two experts token t routes to at layer l (of 4 experts); predicted[t][l]
    (optional) = the experts guessed for layer l of token t before that layer ran (prefetch=recorded reads them);
    step[t] (optional) = token t's step (default: one token per step)."""
    e = np.asarray(rows, dtype=np.int64)
    spec = dataclasses.replace(SPEC, layers=e.shape[1])
    guesses = None if predicted is None else np.asarray(predicted, dtype=np.int64)
    return from_arrays(spec, e, np.full(e.shape, 0.5), step=step, seq=np.zeros(len(rows), dtype=np.int64),
                       predicted=guesses)


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

    def inflight_bytes(self):  # a max_inflight cap reads the copy queue (the sim's)
        return self.sim.inflight_bytes()

    def end_step(self):
        self.sim.end_step()

    def finish(self):
        pass

    def device_bytes(self):
        return self.sim.device_bytes()


def decisions(strategy: str, rows, slots: int, *overrides, predicted=None, step=None) -> list:
    """The decisions of preset `strategy` with `slots` slots on the trace of `rows` (and `predicted` guesses), by
    the Python driver; the compiled core's recorded script must give the same ones."""
    tr = trace_of(rows, predicted, step)
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

    def recorded():
        """The core's recorded decisions played onto Decisions, as replay_parts does on a backend other than sim;
        called here directly where a max_inflight cap makes replay_parts take the Python driver (the cap reads
        the backend's copy queue, which is this same rtx-4090 sim's, the core's own clock)."""
        from moesim import core
        from moesim.engine import play, scratch_slots
        from moesim.profiler import Profiler

        backend = Decisions()
        pre = build(st.prefetch, "prefetch") if st.get("prefetch") else None
        off = build(st.offload, "offload") if st.get("offload") else None
        sim = core.simulate(tr, tr.spec, slots, scope, lambda: build(st.cache, "strategy.cache"), pre, off,
                            "rtx-4090", record=True)
        backend.setup(tr.spec, slots + scratch_slots(tr.spec, build(st.cache, "strategy.cache"), off),
                      Profiler(tr.spec.layers))
        play(tr, backend, sim.script)
        return backend.log

    python = once(False)
    assert once("auto") == python, "the compiled core decides differently from the Python driver"
    if any(st.get(part) and st[part].get("max_inflight") is not None for part in ("prefetch", "offload")):
        assert recorded() == python, "the compiled core decides differently from the Python driver"
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


def test_mixtral_offloading_paper_lru_per_layer_with_recorded_guesses():
    """arXiv:2312.17238 sections 3.1-3.2 (mixtral_offloading_paper.yaml, prefetch recorded, lookahead 1): one LRU
    of k = 3 experts per layer (budget 6); once layer l is routed, after its own misses are loaded and before it
    computes, the guesses for layer l + 1 (predicted[t][l + 1]; at the last layer, predicted[t + 1][0]) that are
    not resident are loaded as prefetches into that layer's LRU (a prefetched load is its most recent entry; the
    guessed keys are pinned meanwhile, and a guessed key already resident is skipped, not touched). By hand:
    t0 L0: 0, 1 miss (demand), then the guesses (2, 1) for L1 are prefetched into free slots: L1 LRU [2, 1].
    t0 L1: 2 hits (a used prefetch), 3 loads (free slot): [1, 2, 3]; the guesses (0, 2) for t1 L0: 0 resident,
    2 prefetched (free slot): L0 [0, 1, 2]. t1 L0: 0, 2 hit (2 a used prefetch): [1, 0, 2]; guesses (3, 0) for
    L1: 3 resident (pinned), 0 evicts the LRU of {1, 2} = 1: a prefetch never used (wasted): L1 [2, 3, 0].
    t1 L1: 2, 0 hit (0 a used prefetch): [3, 2, 0]; guesses (3, 1) for t2 L0: 1 resident and pinned, so 3
    evicts 0, not the LRU 1: L0 [1, 2, 3]. t2 L0: 1 hits, 0 evicts the LRU of {2, 3} = 2 (demand) before the
    guesses (1, 2) for L1: 2 resident (pinned), 1 evicts the LRU of {3, 0} = 3: L1 [2, 0, 1]. t2 L1: 1 hits (a
    used prefetch), 3 evicts the LRU of {2, 0} = 2 (demand); no step follows, no guess. All on the GPU."""
    rows = [[(0, 1), (2, 3)], [(0, 2), (2, 0)], [(1, 0), (3, 1)]]
    predicted = [[(0, 1), (2, 1)], [(0, 2), (3, 0)], [(3, 1), (1, 2)]]  # [t][l]: guessed for layer l of token t
    log = decisions("mixtral_offloading_paper", rows, 6, predicted=predicted)
    assert loads(log) == [((0, 0), False), ((0, 1), False), ((1, 2), True), ((1, 1), True),  # t0 L0
                          ((1, 3), False), ((0, 2), True),  # t0 L1
                          ((1, 0), True),  # t1 L0
                          ((0, 3), True),  # t1 L1
                          ((0, 0), False), ((1, 1), True),  # t2 L0: its own miss first, then the guess
                          ((1, 3), False)]  # t2 L1
    assert all(host == [] for _, _, host in computes(log))


def test_llama_cpp_fork_moe_cache_misses_on_the_cpu_and_copied_behind():
    """leloch/llama.cpp docs/moe-cache.md, ggml-cuda/expert-cache.cu (llama_cpp_fork_moe_cache.yaml): one LRU
    pool over every layer (here 3 slots for 2 layers); a hit is computed on the GPU; every miss is computed by
    the CPU and also copied into the pool in the background (taking the LRU slot of any layer; pinned while its
    layer runs), while fewer than 8 experts' copies are queued: this trace copies 8 in all, so the cap never
    refuses one. By hand: t0 L0: 0, 1 miss: CPU, copied into free slots: [00, 01]; L1: 2, 3 miss: CPU, 2 into
    the free slot, 3 over the LRU (0,0): [01, 12, 13]. t1 L0: 1 hits (GPU; it came in behind t0's miss), 2
    misses (CPU) and is copied over the LRU of {12, 13} = (1,2) (another layer's): [13, 01, 02]. t1 L1: 3 hits,
    2 misses, copied over the LRU of {01, 02} = (0,1): [02, 13, 12]. t2 L0: 2 hits, 0 misses, over (1,3):
    [12, 02, 00]; L1: 2 hits, 1 misses, over the LRU of {02, 00} = (0,2)."""
    rows = [[(0, 1), (2, 3)], [(1, 2), (3, 2)], [(2, 0), (2, 1)]]
    log = decisions("llama_cpp_fork_moe_cache", rows, 3)
    assert loads(log) == [((0, 0), False), ((0, 1), False), ((1, 2), False), ((1, 3), False),
                          ((0, 2), False), ((1, 2), False), ((0, 0), False), ((1, 1), False)]
    assert computes(log) == [(0, [], [(0, 0), (0, 1)]), (1, [], [(1, 2), (1, 3)]),
                             (0, [(0, 1)], [(0, 2)]), (1, [(1, 3)], [(1, 2)]),
                             (0, [(0, 2)], [(0, 0)]), (1, [(1, 2)], [(1, 1)])]
    assert log.index(("load", (0, 2), False)) < log.index(("compute", 0, [(0, 1)], [(0, 2)]))  # copy, then compute


def test_vllm_lfru_keeps_a_frequent_expert_that_lru_evicts():
    """vllm-project/vllm PR #37190 as vllm_lfru.yaml gives it: a per-layer cache (3 slots each, budget 6) evicted
    by LFRU (strategies/lfru.py): t in steps (layer 0 at t = s, layer 1 at s + 0.5); at each use (a hit or a
    load) f <- f * 0.95**(t - t_last) + 1, kept after eviction; the lowest f * 0.95**age / (1 + age) is evicted,
    a tie to the least recently touched; misses fetched on demand, all on the GPU. By hand, layer 0: t0 loads 0,
    1 (f 1); t1 hits both (f 1.95 at 1); t2 hits 1 (f 2.8525), loads 2 (free; f 1 at 2); t3 hits 1, loads 3:
    of {0, 2}, 0 scores 1.95 * 0.95**2 / 3 = 0.587, 2 scores 0.95 / 2 = 0.475: 2 goes, though 0 is the least
    recently used; t4 hits 0, loads 2 again over the lower of 1 (3.71 * 0.95 / 2) and 3 (0.475): 3.
    Layer 1 (ties): t0 loads 1, 0 (f 1 at 0.5, 1 touched first); t1 loads 2 (free), then 3 over the tie of 1 and
    0 (f 1, age 1): the first touched, 1; t2 hits 0 (f 1.9025), loads 1 over the tie of 2 and 3 (f 1, age 1): 2,
    inserted first; 1 comes back with its history, f 1 * 0.95**2 + 1 = 1.9025, as 0's; t3 hits 3, loads 2 over
    the tie of 0 and 1 (both 1.9025, age 1): 0, touched before 1 (with 1's history lost 1 would go); t4 hits 1,
    loads 0 (over 3, touched before 2)."""
    rows = [[(0, 1), (1, 0)], [(0, 1), (2, 3)], [(1, 2), (1, 0)], [(1, 3), (2, 3)], [(0, 2), (1, 0)]]
    log = decisions("vllm_lfru", rows, 6)
    assert loads(log) == [((0, 0), False), ((0, 1), False), ((1, 1), False), ((1, 0), False),  # t0
                          ((1, 2), False), ((1, 3), False),  # t1
                          ((0, 2), False), ((1, 1), False),  # t2
                          ((0, 3), False), ((1, 2), False),  # t3
                          ((0, 2), False), ((1, 0), False)]  # t4
    assert all(host == [] for _, _, host in computes(log))
    # per-layer LRU (mixtral_offloading: the same cache, fetch, no prefetch) evicts layer 0's 0 at t3 instead
    # (used at t1, before 2 at t2), so at t4 0 misses and 2 hits; layer 1's ties are LRU's order anyway
    lru = loads(decisions("mixtral_offloading", rows, 6))
    assert lru == loads(log)[:10] + [((0, 0), False), ((1, 0), False)]


def test_class_lru_host_fills_first_then_hosts_a_share_and_keeps_frequent_experts():
    """moesim's own design (class_lru_host.yaml): per-layer cache (3 slots each, budget 6) evicted by class LRU
    (strategies/class_lru.py: a key's CRF is its use count decayed with a half-life of 128 tokens (x 0.9946 per
    step), its class floor(log2 CRF); the victim is, of the least recently used candidate of each class list,
    the one with the largest idle positions / 2**class; a step is 2 positions); offload host: every miss is
    fetched until its layer's 3 slots are filled once (fill_first), then a share F of the misses (error
    diffusion over all layers: owed += F, host when owed >= 1) is computed on the CPU and not cached, the others
    fetched. F = fetch_ms / (fetch_ms + host_ms) is 0.179 for this toy on rtx-4090: the 6th miss after the fill
    is the first on the CPU. By hand, layer 0 (layer 1 loads 2, 3 at t0 and then hits them): t0, t1 fetch 0, 1,
    2 (the fill). t2-t4 hit 0 and 2: 0 is used 5 times (CRF 4.95: class 2, last at t4), 2 four (3.97: class 1).
    t5 (2, 3): 2 hits (class 2); 3, miss 1 after the fill (owed 0.18), is fetched over 1 (idle 10 / 2**0)
    rather than 0 (2 / 4). t6 (2, 1): 1, miss 2 (0.36), fetched over 3 (idle 2 / 1) rather than 0 (4 / 4 = 1),
    which LRU would evict (last used at t4, 3 at t5). t7 (3, 0): 0 hits (class 2); 3, miss 3 (0.54), over 1
    (class 0, 2 / 1) rather than 2 (2 / 4). t8 (1, 2): 1, miss 4 (0.72), over 3 (2 / 1) rather than 0 (2 / 4).
    t9 (3, 1): 1 hits; 3, miss 5 (0.89), over the head of class 2's list, 0 (4 / 4; 1 is class 1 and pinned).
    t10 (0, 1): 1 hits; 0, miss 6 (owed 1.07), is computed on the CPU and not loaded. t11 (0, 2): 2 hits; 0,
    miss 7 (0.25), misses again and is fetched, over 3 (class 1, 4 / 2) rather than 1 (class 2 since t10, 2 / 4)."""
    from moesim.hardware import Cost, load_hardware

    cost = Cost(load_hardware("rtx-4090"), SPEC)
    share = cost.fetch_ms((0, 0)) / (cost.fetch_ms((0, 0)) + cost.host_ms((0, 0), 1))
    assert 1 / 6 <= share < 1 / 5  # the derivation's F: the 6th miss after the fill is the first on the host
    layer0 = [(0, 1), (0, 2), (0, 2), (0, 2), (0, 2), (2, 3), (2, 1), (3, 0), (1, 2), (3, 1), (0, 1), (0, 2)]
    rows = [[e, (2, 3)] for e in layer0]
    log = decisions("class_lru_host", rows, 6)
    assert loads(log) == [((0, 0), False), ((0, 1), False), ((1, 2), False), ((1, 3), False),  # t0
                          ((0, 2), False),  # t1: the fill ends
                          ((0, 3), False), ((0, 1), False), ((0, 3), False), ((0, 1), False), ((0, 3), False),  # t5-t9
                          ((0, 0), False)]  # t11 (t10's miss went to the CPU)
    on_host = [(i, c) for i, c in enumerate(computes(log)) if c[2]]
    assert on_host == [(2 * 10, (0, [(0, 1)], [(0, 0)]))]  # t10, layer 0: the hit on the GPU, the miss on the CPU


COMMIT = r"[0-9a-f]{40}"


# vllm_lfru is left out: its source is a PR whose head commit is not visible (its YAML says so), nothing pinned;
# class_lru_host is moesim's own design, with no source (tests/test_presets.py checks that it says so)
@pytest.mark.parametrize("strategy, pinned", [
    ("mixtral_offloading", COMMIT), ("llama_cpp_moe_cache", COMMIT), ("ktransformers", COMMIT),
    ("llama_cpp_ncmoe", COMMIT), ("llama_cpp_fork_moe_cache", COMMIT),
    ("mixtral_offloading_paper", r"arXiv:2312\.17238, section 3\.1"),  # a paper: its arXiv number and sections
])
def test_each_tested_preset_still_names_its_pinned_source(strategy, pinned):
    from importlib.resources import files
    import re

    text = files("moesim.conf").joinpath("strategy", f"{strategy}.yaml").read_text()
    assert re.search(pinned, text), strategy


# Fiddler and llama.cpp's big-batch rule need steps of many tokens: step 2 below has 12 (rows 2 .. 13).
BIG = ([[(0, 1), (2, 3)], [(0, 2), (2, 0)]]
       + [[(0, 3), (2, 1)]] * 9 + [[(0, 3), (2, 0)]] + [[(0, 1), (2, 0)]] * 2  # L0: 0 x12, 3 x10, 1 x2; L1: 2, 1 x9, 0 x3
       + [[(3, 1), (1, 3)]])
BIG_STEPS = [0, 1] + [2] * 12 + [3]


def test_fiddler_places_a_popular_set_and_runs_the_rest_on_the_cpu_or_streams_it():
    """efeslab/fiddler@227715b src/fiddler/mixtral.py: the most popular (layer, expert) pairs, as many as fit over
    all layers (3 slots; the profile: the first 2 tokens, offload.calibrate_tokens=2, where (0,0) and (1,2) are
    requested twice and the rest once, ties to the lower pair: (0,1)) live on the GPU, and no other expert is
    ever cached; a non-placed expert with n tokens runs on the CPU when 7 n < 70, else it is copied into the
    placeholder, run on the GPU and dropped. By hand: t0 L0 fetches (0,0) and (0,1) (placed, first use); L1
    fetches (1,2), runs (1,3) on the CPU. t1: (0,0), (1,2) hit; (0,2), (1,0) on the CPU. Step 2 (12 tokens), L0 in
    order of first appearance: 0 (hit), 3 (n = 10: 70 >= 70, streamed: one copy, nothing kept), 1 (hit); L1: 2
    (hit), 1 (n = 9: 63 < 70, CPU), 0 (n = 3: CPU). Step 3: (0,3) was not kept: CPU; (0,1) hits; (1,1), (1,3) on
    the CPU. Nothing is ever evicted."""
    log = decisions("fiddler", BIG, 3, "strategy.offload.calibrate_tokens=2", step=BIG_STEPS)
    assert loads(log) == [((0, 0), False), ((0, 1), False), ((1, 2), False), ((0, 3), False)]
    assert computes(log) == [(0, [(0, 0), (0, 1)], []), (1, [(1, 2)], [(1, 3)]),
                             (0, [(0, 0)], [(0, 2)]), (1, [(1, 2)], [(1, 0)]),
                             (0, [(0, 0), (0, 3), (0, 1)], []), (1, [(1, 2)], [(1, 1), (1, 0)]),
                             (0, [(0, 1)], [(0, 3)]), (1, [], [(1, 1), (1, 3)])]


def test_fiddler_runs_a_layers_cpu_experts_after_its_gpu_experts():
    """src/fiddler/mixtral.py L602-637: the GPU experts are launched first, then the CPU experts one by one in the
    same thread (commit aeba581 removed the CPU thread): on the sim clock, every layer's host part starts when its
    device part ends. With `offload=host` (the same popular set) they run beside each other: at t0 layer 1 the
    host part starts while the device part still waits for (1,2)'s copy."""
    from moesim.backends.sim import SimBackend

    tr = trace_of(BIG, step=BIG_STEPS)
    calib = "strategy.offload.calibrate_tokens=2"
    for overrides, after in (([calib], True), (["offload=host", "offload.device_set=popular", "offload.calibrate_tokens=2"], False)):
        st = resolve_strategy(compose_run("gpt-oss-like", "fiddler", overrides=overrides)).strategy
        for fast in (False, "auto"):
            run = replay_parts(tr, tr.spec, 3, "global", lambda: build(st.cache, "c"), None, build(st.offload, "o"),
                               SimBackend("rtx-4090"), "rtx-4090", fast=fast)
            comp = run.profiler.arrays()[2]  # layer, start, end, stall, host
            pairs = [(comp[i], comp[i + 1]) for i in range(len(comp) - 1) if comp[i, 4] == 0 and comp[i + 1, 4] == 1]
            assert len(pairs) >= 4, overrides
            overlaps = [host[1] < dev[2] for dev, host in pairs]  # the host part starts before the device's ends
            assert (not any(overlaps)) if after else any(overlaps), (overrides, fast, pairs)


def test_llama_cpp_ncmoe_streams_a_host_layers_experts_for_a_batch_of_32():
    """ggml-org/ggml@d99724f src/ggml-cuda/ggml-cuda.cu (GGML_OP_OFFLOAD_MIN_BATCH = 32) and src/ggml-backend.cpp:
    a host weight under a batch of at least 32 tokens runs on the GPU, after a copy of only the experts the batch
    uses, kept by nothing. min_batch=12 here (the 12-token step; the preset's 32 needs a longer trace). With 4
    slots in one pool, N = 1: layer 0 on the host. By hand: t0, t1 (one token): layer 0's experts on the CPU,
    layer 1's fetched on first use (2, 3, then 0). Step 2 (12 tokens): layer 0's 0, 3, 1 are each copied and
    computed on the GPU (streamed); layer 1's 2 and 0 hit, 1 is fetched. Step 3: layer 0 on the CPU again
    (nothing was kept), layer 1 all hits."""
    log = decisions("llama_cpp_ncmoe", BIG, 4, "strategy.offload.min_batch=12", step=BIG_STEPS)
    assert loads(log) == [((1, 2), False), ((1, 3), False), ((1, 0), False),
                          ((0, 0), False), ((0, 3), False), ((0, 1), False), ((1, 1), False)]
    assert computes(log) == [(0, [], [(0, 0), (0, 1)]), (1, [(1, 2), (1, 3)], []),
                             (0, [], [(0, 0), (0, 2)]), (1, [(1, 2), (1, 0)], []),
                             (0, [(0, 0), (0, 3), (0, 1)], []), (1, [(1, 2), (1, 1), (1, 0)], []),
                             (0, [], [(0, 3), (0, 1)]), (1, [(1, 1), (1, 3)], [])]
    default = decisions("llama_cpp_ncmoe", BIG, 4, step=BIG_STEPS)  # min_batch 32: the 12-token step stays on the CPU
    assert not any(key[0] == 0 for key, _ in loads(default))
    assert computes(default)[4] == (0, [], [(0, 0), (0, 3), (0, 1)])


def test_llama_cpp_moe_expert_cache_hits_on_the_gpu_misses_on_the_cpu_two_uploads_per_layer():
    """ggml-org/llama.cpp PR #27861 (description): N slots per host-resident expert layer, each an LRU; a cached
    expert runs on the GPU, the others on the CPU beside it; uploads capped per layer per step
    (--moe-expert-cache-inserts; set to 1 here so that the cap bites on a top-2 trace). 3 slots per layer (6).
    By hand: t0 L0: 0, 1 miss, both on the CPU; only 0 is uploaded (the cap); L1: 2 uploaded, 3 CPU only.
    t1 L0: 0 hits (GPU), 2 on the CPU and uploaded; L1: 2 hits, 0 on the CPU and uploaded. t2 L0: 3 and 1 miss:
    3 uploaded (L0 holds 0, 2, 3: full), 1 CPU only; L1: 1 uploaded over the LRU of {2, 0} = 2, 3 CPU only."""
    log = decisions("llama_cpp_moe_expert_cache", ROWS, 6, "strategy.offload.loads_per_layer=1")
    assert loads(log) == [((0, 0), False), ((1, 2), False), ((0, 2), False), ((1, 0), False),
                          ((0, 3), False), ((1, 1), False)]
    assert computes(log) == [(0, [], [(0, 0), (0, 1)]), (1, [], [(1, 2), (1, 3)]),
                             (0, [(0, 0)], [(0, 2)]), (1, [(1, 2)], [(1, 0)]),
                             (0, [], [(0, 3), (0, 1)]), (1, [], [(1, 1), (1, 3)])]


def test_moe_infinity_protects_later_layers_evicts_the_most_visited_and_streams_when_it_cannot():
    """EfficientMoE/MoE-Infinity@5e096b4: at every layer l, the closest past sequence (the collection: the first 2
    tokens, prefetch.calibrate_tokens=2, one sequence) ranks every expert of every later layer by its count + 1e-8
    times 1 - (m - l) / (L + 1) (L = 3: 0.75 for l + 1, 0.5 for l + 2) and all are prefetched in that order (no
    cap here: max_inflight=null); eviction never takes an expert of layer l or later, takes the most visited of the
    earlier layers' (a load counts 1, a hit 1 more), and when none may go a demand miss is streamed and a prefetch
    dropped. Collection counts: L1 {2: 2, 0: 1, 3: 1}, L2 {1: 2, 0: 1, 3: 1}, so at layer 0 the ranking is
    (1,2) 1.5, (2,1) 1.0, (1,0), (1,3) 0.75, (2,0), (2,3) 0.5, ...; at layer 1 (2,1), (2,0), (2,3), (2,2).
    3 slots in one pool. By hand, t0: L0 loads 0, 1, prefetches (1,2) into the last free slot; nothing else may
    go (the request and the ranking are pinned). L1: (1,2) hits; (1,3) misses: of layer 0's (0,0), (0,1), both
    visited once, the lower goes; the prefetch of (2,1) evicts (0,1); (2,0) finds nothing. L2: (2,1) hits; (2,0)
    evicts the most visited earlier expert: (1,2) (2 visits) rather than (1,3) (1). t1 L0: nothing is of an
    earlier layer: (0,0), (0,2) are streamed, prefetches dropped. L1: (1,2), (1,0) are streamed ((1,3) is of the
    running layer); the prefetch of (2,3) may not evict (1,3). L2: (2,1) hits, (2,3) evicts (1,3)."""
    rows = [[(0, 1), (2, 3), (0, 1)], [(0, 2), (2, 0), (1, 3)]]
    log = decisions("moe_infinity", rows, 3, "strategy.prefetch.calibrate_tokens=2",
                    "strategy.prefetch.max_inflight=null")
    assert loads(log) == [((0, 0), False), ((0, 1), False), ((1, 2), True), ((1, 3), False), ((2, 1), True),
                          ((2, 0), False),
                          ((0, 0), False), ((0, 2), False), ((1, 2), False), ((1, 0), False), ((2, 3), False)]
    assert computes(log) == [(0, [(0, 0), (0, 1)], []), (1, [(1, 2), (1, 3)], []), (2, [(2, 0), (2, 1)], []),
                             (0, [(0, 0), (0, 2)], []), (1, [(1, 2), (1, 0)], []), (2, [(2, 1), (2, 3)], [])]
