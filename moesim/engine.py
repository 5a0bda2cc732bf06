"""The replay loop: every step of a trace, through a strategy, onto a backend. `python -m moesim run`.

    python -m moesim run strategy=lru                       # embedded default: synthetic GPT-OSS-like trace
    python -m moesim run strategy=belady budget=192 trace=../shared/traces/gpt-oss-20b hardware=h200

Per step and per layer (position `pos = step * L + layer`): the layer's distinct experts are looked up
(all pinned while the layer computes), each miss is fetched into the cache (the policy picks a victim) or,
if the offload policy says so, computed on the host; the backend computes the layer; the cache unpins.
A layer that needs more distinct experts than its slots (a prefill chunk, a large batch) runs in waves of
at most that many experts, hits first, each wave pinned while it computes;
the prefetcher observes and may load experts of later layers ahead. With `backend=None` the same loop
only counts hits (the cache-only replay that policies are tested with).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np

from strategies import CachePolicy, Context, Key, OffloadPolicy, Prefetcher

from .cache import Budget, Cache, Counters, parse_budget
from .errors import MoesimError
from .trace import Trace


def step_requests(trace: Trace, chunk: int = 8192):
    """Per step: (step index, first token, n_tokens, [per layer: (ids, counts)]) in trace order, as Python
    lists (the loop is faster on lists than on small arrays); `counts` (tokens per id) is None when each id
    was chosen by one token (batch-1 steps). Reads the trace `chunk` tokens at a time."""
    starts = trace.step_starts
    experts = trace.experts
    s, n_steps = 0, len(starts) - 1
    while s < n_steps:
        lo = int(starts[s])
        e = s + 1
        while e < n_steps and starts[e + 1] - lo <= chunk:  # whole steps only
            e += 1
        rows = np.asarray(experts[lo:int(starts[e])]).tolist()  # [n, L, K]
        for i in range(s, e):
            a, b = int(starts[i]) - lo, int(starts[i + 1]) - lo
            if b - a == 1:  # batch-1 decode: the row itself (ids are unique per row)
                req = [([x for x in r if x >= 0], None) for r in rows[a]]
            else:
                req = [_merge([rows[t][layer] for t in range(a, b)]) for layer in range(trace.n_layers)]
            yield i, a + lo, b - a, req
        s = e


def _merge(layer_rows: list[list[int]]) -> tuple[list[int], list[int]]:
    """Distinct ids of several tokens' rows in order of first appearance, and how many tokens chose each."""
    count: dict[int, int] = {}
    for r in layer_rows:
        for x in r:
            if x >= 0:
                count[x] = count.get(x, 0) + 1
    return list(count), list(count.values())


def replay(trace: Trace, cache: Cache, backend=None, prefetcher: Prefetcher | None = None,
           offload: OffloadPolicy | None = None, cost=None, reset_per_seq: bool = False,
           prefetch_max: int = 0, progress: bool = False) -> Counters:
    """Replay `trace` through `cache` (and `backend`, if given). Returns the cache's counters.

    `prefetch_max`: at most this many keys of each `predict` are loaded (0: the prefetcher is not asked)."""
    L = trace.n_layers
    seq = np.asarray(trace.seq)
    seen_seqs: set[int] = set()
    if prefetcher is not None:
        prefetcher.setup(Context(trace, trace.spec, tuple(range(L)), cache.n_slots, cache.scope))
    if offload is not None:
        offload.setup(Context(trace, trace.spec, tuple(range(L)), cache.n_slots, cache.scope))
    steps = step_requests(trace)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, total=trace.n_steps, unit="step", desc="replay", file=sys.stderr,
                     disable=None, mininterval=0.5)
    for s, start, n_tokens, requests in steps:
        if reset_per_seq:
            new = set(seq[start:start + n_tokens].tolist()) - seen_seqs
            if new:
                if seen_seqs:
                    cache.reset()
                seen_seqs |= new
        if backend is not None:
            backend.begin_step(s, n_tokens)
        for layer, (ids, counts) in enumerate(requests):
            pos = s * L + layer
            ns = counts or [1] * len(ids)
            cap = cache.capacity_of(layer)
            if len(ids) <= cap:
                _serve(cache, backend, offload, cost, pos, layer, ids, ns)
            else:  # more distinct experts than the layer's slots (prefill, big batches): stream in waves
                order = sorted(range(len(ids)), key=lambda i: not cache.is_resident((layer, ids[i])))  # hits first
                for w in range(0, len(order), cap):
                    wave = order[w:w + cap]
                    _serve(cache, backend, offload, cost, pos, layer, [ids[i] for i in wave], [ns[i] for i in wave])
            if prefetcher is not None:
                prefetcher.observe(pos, layer, ids)
                if prefetch_max:
                    _prefetch(cache, backend, prefetcher.predict(pos, layer)[:prefetch_max], pos)
        if backend is not None:
            backend.end_step()
    if backend is not None:
        backend.finish()
    return cache.counters


def _serve(cache: Cache, backend, offload, cost, pos: int, layer: int, ids: list[int], ns: list[int]) -> None:
    """One layer's experts `ids` (chosen by `ns` tokens each): look up (pinning them), fetch or host-compute
    each miss, compute, unpin."""
    keys = [(layer, e) for e in ids]
    misses = cache.lookup(pos, layer, keys)
    host: list[tuple[Key, int]] = []
    for key in misses:
        if offload is not None:
            n = ns[ids.index(key[1])]
            if offload.on_miss(key, n, cost) == "host":
                host.append((key, n))
                cache.counters.host_computes += 1
                continue
        slot, _ = cache.insert(pos, key)
        if backend is not None:
            backend.load(key, slot, False)
    if backend is not None:
        hosted = {k for k, _ in host}
        backend.compute(layer, [(k, cache.slot_of(k), n) for k, n in zip(keys, ns) if k not in hosted], host)
    cache.release()


def _prefetch(cache: Cache, backend, keys: list[Key], pos: int) -> None:
    for key in keys:
        if cache.is_resident(key):
            continue
        got = cache.insert(pos, key, prefetched=True)
        if got is not None and backend is not None:
            backend.load(key, got[0], True)


def hit_counts(trace: Trace, make_policy: Callable[[], CachePolicy], budget, scope: str = "per_layer",
               reset_per_seq: bool = False) -> Counters:
    """Cache-only replay (no timing): the counters of `make_policy` under `budget` and `scope`."""
    b = budget if isinstance(budget, Budget) else parse_budget(budget, trace.spec, scope)
    cache = Cache(trace.spec, b.slots, scope, make_policy, trace)
    return replay(trace, cache, reset_per_seq=reset_per_seq)


# ---------------------------------------------------------------------------------------------- command
@dataclass
class RunOutput:
    summary: dict
    out_dir: object  # pathlib.Path of the results directory, or None


def run(cfg, write: bool = True) -> RunOutput:
    """Run one configuration (as composed from moesim/conf/run.yaml) and write its results directory."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from .hardware import Cost, load_hardware
    from .importers import open_trace
    from .profiler import Profiler
    from .results import default_run_dir, write_run

    trace = open_trace(str(cfg.trace))
    spec = trace.spec
    budget = parse_budget(cfg.budget, spec, cfg.scope)
    hardware = load_hardware(str(cfg.hardware))
    strat = cfg.strategy
    make_policy = lambda: instantiate(strat.cache)  # noqa: E731  one instance per partition
    cache = Cache(spec, budget.slots, cfg.scope, make_policy, trace)
    prefetcher = instantiate(strat.prefetch) if strat.get("prefetch") else None
    offload = instantiate(strat.offload) if strat.get("offload") else None
    backend = instantiate(cfg.backend, hardware=hardware)
    profiler = Profiler(n_layers=spec.layers)
    backend.setup(spec, budget.slots, profiler)
    counters = replay(trace, cache, backend, prefetcher, offload, Cost(hardware, spec),
                      reset_per_seq=bool(cfg.reset_per_seq), prefetch_max=int(strat.get("prefetch_max", 0) or 0),
                      progress=bool(cfg.progress))
    metrics = profiler.metrics()
    bounds = [type(x).__name__ for x in (cache.partitions[0].policy, prefetcher, offload)
              if x is not None and getattr(x, "bound", False)]
    summary = {
        "hit_rate": counters.hits / counters.requests if counters.requests else float("nan"),
        **counters.to_dict(),
        "bytes_h2d": counters.loads * spec.bytes_per_expert,
        **metrics,
        "peak_device_bytes": backend.device_bytes(),
        "strategy": strat.name,
        "bound": bool(bounds),  # an oracle took part: a bound, not a deployable result
        "budget": budget.to_dict(),
        "scope": cfg.scope,
        "trace": {"name": str(cfg.trace), "path": str(trace.path) if trace.path else None,
                  "tokens": trace.n_tokens, "steps": trace.n_steps, "sequences": trace.n_seqs,
                  "source": trace.source},
        "model": spec.to_dict() | {"bytes_per_expert": spec.bytes_per_expert},
        "hardware": hardware.name,
        "backend": backend.name,
    }
    out_dir = None
    if write:
        out_dir = default_run_dir(strat.name) if cfg.out is None else cfg.out
        out_dir = write_run(out_dir, OmegaConf.to_container(cfg, resolve=True), summary,
                            profiler.steps_table(), profiler.layers_table(), profiler.timeline())
    return RunOutput(summary, out_dir)


def summary_table(s: dict) -> str:
    """A short terminal table of a run's summary."""
    lat = s.get("latency_ms", {})
    rows = [
        ("strategy", f"{s['strategy']}" + ("  (bound: not deployable)" if s.get("bound") else "")),
        ("trace", f"{s['trace']['name']}: {s['trace']['tokens']} tokens, {s['trace']['sequences']} sequences"),
        ("budget", f"{s['budget']['slots']} slots ({s['budget']['bytes'] / 2**30:.2f} GiB), scope {s['scope']}"),
        ("hardware / backend", f"{s['hardware']} / {s['backend']}"),
        ("hit rate", f"{s['hit_rate']:.4f}  ({s['hits']} of {s['requests']} expert requests)"),
        ("loads / evictions", f"{s['loads']} / {s['evictions']}"),
        ("bytes host->device", f"{s['bytes_h2d'] / 2**30:.2f} GiB"),
        ("tokens/s", f"{s['tokens_per_s']:.1f}"),
        ("latency ms p50/p90/p99", f"{lat.get('p50', float('nan')):.2f} / {lat.get('p90', float('nan')):.2f} / "
                                   f"{lat.get('p99', float('nan')):.2f}"),
        ("stall", f"{s['stall_ms']:.1f} ms"),
        ("peak device memory", f"{s['peak_device_bytes'] / 2**30:.2f} GiB"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def run_command(cfg) -> None:
    """`python -m moesim run ...`: replay, print the summary, write the results directory."""
    out = run(cfg)
    print(summary_table(out.summary))
    print(f"results: {out.out_dir}")
