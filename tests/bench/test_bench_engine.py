"""Speed of replaying and of the torch backend, as ratios to references that do not change with moesim's code.

    python -m pytest tests/bench/test_bench_engine.py -s                     # floors enforced, rates printed
    python -m pytest tests/bench/test_bench_engine.py --benchmark-enable     # + timings for --benchmark-compare

cache-only replay   every distinct cache policy of moesim/conf/strategy/*.yaml (read at collection, so a new
                    strategy is measured too): moesim.core.hit_counts where the policy is compiled, else
                    moesim.engine.hit_counts, against `plain_lru` (test_bench_hooks.py: an OrderedDict per layer) over the
                    same requests; plain_lru must count the hits that our LRU counts
timed sim loop      every strategy through `moesim.api.run` (what `python -m moesim run` does, compiled where
                    moesim/core covers the run; results not written), against `plain_timed_lru` below
                    (plain_lru plus a copy-engine clock)
torch backend, CPU  bytes per second of the expert copies the backend timed during a replay, against
                    np.copyto of the same rows into the same slots in a plain loop
The test/bench_replay.py benchmarks compare the compiled path with our own Python loop and libCacheSim; these
compare every policy and strategy with fixed plain-Python and plain-copy references. Each ratio is our rate /
the reference's rate (higher is faster), the best of a few interleaved rounds timed with time.perf_counter in
the test, so the floors hold in plain `pytest` (--benchmark-disable times nothing). Floors are about half the
worst ratio measured on the project's shared 2-core machine; docs/ci.md lists the measurements.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from importlib.resources import files

import numpy as np
import pytest
from omegaconf import OmegaConf

from test_bench_hooks import layer_requests, plain_lru  # the references, written once

from moesim import core

CACHE_TOKENS = 600  # tokens of the synthetic gpt-oss-like trace in the cache-only replays
TIMED_TOKENS = 120  # ... in the timed runs (a Python-loop run costs ~3 ms a token)
TORCH_TOKENS = 64  # ... replayed on the torch backend (~30 ms a token at 12.5% on 2 cores)
BUDGET = "25%"  # 192 slots: 8 per layer of gpt-oss-20b
SLOTS_PER_LAYER = 8
COPY_MS = 0.5  # plain_timed_lru's clock: per copy, per layer (any fixed numbers: only its speed matters)
COMPUTE_MS = 0.1
# Floors of ours / reference: about half the worst of 9 runs on the project's shared 2-core machine (docs/ci.md
# lists the measured ranges). A policy or strategy not listed gets the lowest floor of its table.
CACHE_FLOORS = {  # cache-only replay, by policy module
    "lru": 16.0, "fifo": 7.0, "belady": 1.9, "lfu": 1.8, "lfru": 1.4, "static": 1.5,  # compiled (moesim/core)
    "activation_aware": 0.029, "class_lru": 0.025,  # compiled since issue 12; floors of their Python days
}
TIMED_FLOORS = {  # timed sim run, by strategy (5 runs each since `run` took the compiled path)
    "lru": 0.1, "fifo": 0.08, "belady": 0.08, "lfu": 0.09, "lfru": 0.1, "vllm_lfru": 0.073, "static": 0.057,
    "activation_aware": 0.027, "class_lru": 0.019, "fiddler": 0.031, "class_lru_host": 0.028,
    "llama_cpp_ncmoe": 0.05, "moe_infinity": 0.012,
}
TORCH_COPY_FLOOR = 0.35  # measured 0.75-1.18
TORCH_SCALE = 1 / 16  # gpt-oss-20b experts at 1/16: 190 KiB each (bf16), a 146 MiB host pool


def _strategies() -> dict[str, dict]:
    """name -> strategy config as written, for every moesim/conf/strategy/*.yaml."""
    folder = files("moesim.conf").joinpath("strategy")
    return {f.name[:-5]: OmegaConf.to_container(OmegaConf.create(f.read_text())) for f in
            sorted(folder.iterdir(), key=lambda f: f.name) if f.name.endswith(".yaml")}


def _cache_policies() -> dict[str, dict]:
    """Every distinct `cache:` block of the strategies (lru is the cache of fiddler and others too: measured
    once), named by the policy's module (strategies.lfru.LFRU -> lfru; lfru-2 for other parameters)."""
    from moesim.api import policy_name

    out: dict[str, dict] = {}
    for cfg in _strategies().values():
        block = cfg.get("cache") or {}
        if block in out.values():
            continue
        name = policy_name(OmegaConf.create(block))
        n = sum(1 for k in out if k.split("-")[0] == name)
        out[name if not n else f"{name}-{n + 1}"] = block
    return out


def best_times(fns: dict, rounds: int) -> tuple[dict, dict]:
    """(fastest wall time in s, last result) of each function over `rounds` rounds that run them in turn,
    so that load from other processes hits all alike."""
    best, out = dict.fromkeys(fns, float("inf")), {}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            out[name] = fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best, out


def measure(benchmark, fns: dict, rounds: int, ours=None, ours_rounds: int = 3) -> tuple[dict, dict]:
    """best_times of `fns`; with --benchmark-enable the benchmark then also times `ours` (default fns["ours"])
    alone for the saved JSON. Under --benchmark-disable the benchmark fixture runs the rounds once."""
    if benchmark.disabled:
        return benchmark(best_times, fns, rounds)
    result = best_times(fns, rounds)
    benchmark.pedantic(ours or fns["ours"], rounds=ours_rounds)
    return result


def check_floor(benchmark, what: str, ratio: float, floor: float, detail: str, again=None) -> None:
    """Assert ratio >= floor. `again()` -> (ratio, detail) times both sides once more: below the floor, the
    better of the two measurements counts (a shared machine's burst of other work must not fail a run; CI once
    timed lfu at exactly its floor while other tests ran beside it)."""
    if ratio < floor and again is not None:
        ratio2, detail2 = again()
        if ratio2 > ratio:
            ratio, detail = ratio2, detail2 + " (timed again)"
    benchmark.extra_info.update(ratio=ratio, floor=floor)
    print(f"\n{what}: {detail}, ratio {ratio:.3g} (floor {floor})")
    assert ratio >= floor, f"{what}: {detail}: {ratio:.3g}x the reference, below the floor {floor}x (docs/ci.md)"


# ------------------------------------------------------------------------------------------ references
def plain_timed_lru(requests: list[list[int]], n_layers: int, slots: int) -> tuple[int, float]:
    """plain_lru with a clock: misses queue on one copy engine, a layer computes once its copies are in."""
    caches = [OrderedDict() for _ in range(n_layers)]
    hits, now, copy_free = 0, 0.0, 0.0
    for pos, ids in enumerate(requests):
        c = caches[pos % n_layers]
        ready = now
        for e in ids:
            if e in c:
                c.move_to_end(e)
                hits += 1
        for e in ids:
            if e not in c:
                if len(c) >= slots:
                    for victim in c:
                        if victim not in ids:
                            break
                    del c[victim]
                c[e] = None
                copy_free = max(copy_free, now) + COPY_MS
                ready = max(ready, copy_free)
        now = ready + COMPUTE_MS * len(ids)
    return hits, now


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def gpt_oss_like():
    from moesim.importers import open_trace

    return open_trace("gpt-oss-like")


@pytest.fixture(scope="module")
def cache_trace(gpt_oss_like):
    return gpt_oss_like.slice_tokens(0, CACHE_TOKENS)


@pytest.fixture(scope="module")
def timed_file(gpt_oss_like, tmp_path_factory):
    from moesim.trace import save_trace

    path = tmp_path_factory.mktemp("bench-engine") / "timed.moetrace.safetensors"
    return save_trace(gpt_oss_like.slice_tokens(0, TIMED_TOKENS), path)


# ---------------------------------------------------------------------------------- cache-only replay
@pytest.mark.parametrize("policy", list(_cache_policies()))
def test_bench_cache_only_replay(benchmark, cache_trace, policy):
    from hydra.utils import instantiate

    from moesim.units import parse_budget
    from moesim.engine import hit_counts

    trace = cache_trace
    block = OmegaConf.create(_cache_policies()[policy])
    compiled = core.compiled_policy(block)  # (policy, params), or None: only the Python driver runs it
    slots = parse_budget(BUDGET, trace.spec, "per_layer").slots
    if compiled:
        def ours():
            return core.hit_counts(trace, *compiled, slots)
    else:
        def ours():
            return hit_counts(trace, lambda: instantiate(block), slots).to_dict()

    requests = layer_requests(trace)
    fns = {"ours": ours, "reference": lambda: plain_lru(requests, trace.n_layers, SLOTS_PER_LAYER)}
    best, out = measure(benchmark, fns, rounds=5 if compiled else 2)
    assert out["reference"] == core.hit_counts(trace, "lru", {}, slots)["hits"], "plain_lru must decide as our LRU"
    n = out["ours"]["requests"]
    benchmark.extra_info.update(policy=policy, compiled=bool(compiled), requests=n, ours_s=best["ours"],
                                reference_s=best["reference"], hit_rate=out["ours"]["hits"] / n)
    floor = CACHE_FLOORS.get(policy, min(CACHE_FLOORS.values()))
    def rates(b):
        return b["reference"] / b["ours"], f"{n / b['ours'] / 1e6:.3f} M requests/s against plain_lru's " \
                                            f"{n / b['reference'] / 1e6:.3f}"

    ratio, detail = rates(best)
    check_floor(benchmark, f"cache-only {policy} ({'compiled' if compiled else 'Python'})", ratio, floor, detail,
                again=lambda: rates(best_times(fns, 5 if compiled else 2)[0]))


# ------------------------------------------------------------------------------------- timed sim loop
@pytest.mark.parametrize("strategy", list(_strategies()))
def test_bench_timed_sim_run(benchmark, gpt_oss_like, timed_file, strategy):
    """A strategy that refuses per_layer scope (llama_cpp_ncmoe: host_layers=auto) runs in one global pool."""
    from moesim.baseline import compose_strategy
    from moesim.api import resolve_strategy, run
    from moesim.errors import MoesimError, NotApplicable

    cfg = resolve_strategy(compose_strategy(strategy, str(timed_file), [f"budget={BUDGET}"]))
    try:
        run(cfg, write=False)
    except NotApplicable as e:  # only a strategy that cannot run on this input skips (recorded guesses absent)
        pytest.skip(f"{strategy} refuses this trace: {e}")
    except MoesimError as e:  # any other error fails, except the one scope it asks for
        if "scope=global" not in str(e):
            raise
        cfg.scope = "global"
    requests = layer_requests(gpt_oss_like.slice_tokens(0, TIMED_TOKENS))
    n_layers = gpt_oss_like.n_layers
    fns = {"ours": lambda: run(cfg, write=False).summary,
           "reference": lambda: plain_timed_lru(requests, n_layers, SLOTS_PER_LAYER)}
    best, out = measure(benchmark, fns, rounds=2)
    layer_steps = out["ours"]["steps"] * n_layers
    benchmark.extra_info.update(strategy=strategy, scope=cfg.scope, layer_steps=layer_steps, ours_s=best["ours"],
                                reference_s=best["reference"], tokens_per_s_simulated=out["ours"]["tokens_per_s"])
    floor = TIMED_FLOORS.get(strategy, min(TIMED_FLOORS.values()))
    def rates(b):
        return b["reference"] / b["ours"], f"{layer_steps / b['ours']:,.0f} layer-steps/s against " \
                                            f"plain_timed_lru's {layer_steps / b['reference']:,.0f}"

    ratio, detail = rates(best)
    check_floor(benchmark, f"timed sim run {strategy} ({cfg.scope})", ratio, floor, detail,
                again=lambda: rates(best_times(fns, 2)[0]))


# ------------------------------------------------------------------------------------ torch backend
def test_bench_torch_cpu_copies(benchmark, gpt_oss_like):
    """A timed replay on the torch backend (cpu, LRU at 12.5%: most requests miss); the copy bandwidth its
    profiler measured against np.copyto of the same (row, slot) pairs in a plain loop."""
    torch = pytest.importorskip("torch")
    from moesim.backends.torch import TorchBackend
    from moesim.cache import Cache
    from moesim.units import parse_budget
    from moesim.engine import replay
    from moesim.profiler import Profiler
    from moesim.trace import scale_spec, stored_spec
    from strategies.lru import LRU

    trace = gpt_oss_like.slice_tokens(0, TORCH_TOKENS)
    # stored bf16 (model.dtype=bf16), as measured before experts moved packed: the copy path is the same, and
    # 190 KiB copies keep the ratio about bandwidth (mxfp4's 54 KiB ones measure the fixed cost per copy)
    spec = stored_spec(scale_spec(trace.spec, TORCH_SCALE), "bf16")
    slots = parse_budget("12.5%", trace.spec, "per_layer").slots
    backend = TorchBackend(device="cpu")
    backend.setup(spec, slots, Profiler(spec.layers))
    copies: list[tuple[int, int]] = []  # (host pool row, device slot) of each load, in order
    load = backend.load

    def recording_load(key, slot, prefetch):
        copies.append((key[0] * spec.experts + key[1], slot))
        load(key, slot, prefetch)

    backend.load = recording_load
    t0 = time.perf_counter()
    replay(trace, Cache(spec, slots, "per_layer", LRU, trace), backend)
    replay_s = time.perf_counter() - t0
    metrics = backend.profiler.metrics()
    ours_gbps = metrics["h2d_gbps"]  # bytes / ms busy copying, x 1e-6: GB/s
    # the same bytes as plain numpy arrays (uint8 rows of bf16 values viewed as int16)
    host = backend.host_pool.view(torch.int16).numpy()
    device = backend.device_pool.view(torch.int16).numpy()
    nbytes = host[0].nbytes
    pairs = [(device[s], host[r]) for r, s in copies]

    def reference():
        for d, s in pairs:
            np.copyto(d, s)

    def whole():  # the timed replay, backend set up anew (what --benchmark-enable times)
        b = TorchBackend(device="cpu")
        b.setup(spec, slots, Profiler(spec.layers))
        replay(trace, Cache(spec, slots, "per_layer", LRU, trace), b)

    best, _ = measure(benchmark, {"reference": reference}, rounds=3, ours=whole, ours_rounds=2)
    ref_gbps = len(copies) * nbytes / best["reference"] / 1e9
    assert len(copies) == metrics["loads"] > 0
    benchmark.extra_info.update(copies=len(copies), bytes_per_copy=nbytes, ours_gbps=ours_gbps, reference_gbps=ref_gbps,
                                replay_s=replay_s, tokens_per_s=metrics["tokens_per_s"])
    check_floor(benchmark, "torch backend cpu copies", ours_gbps / ref_gbps, TORCH_COPY_FLOOR,
                f"{len(copies)} copies of {nbytes / 2**10:.0f} KiB at {ours_gbps:.2f} GB/s against np.copyto in a "
                f"loop at {ref_gbps:.2f} GB/s (replay {replay_s:.2f} s, {metrics['tokens_per_s']:.0f} tokens/s)")
