"""The replay loop: every step of a trace, through a strategy, onto a backend. `python -m moesim run`.

    python -m moesim run strategy=lru                       # embedded default: synthetic GPT-OSS-like trace
    python -m moesim run strategy=belady budget=192 trace=../shared/traces/gpt-oss-20b hardware=h200

Per step and per layer (position `pos = step * L + layer`): the layer's distinct experts are looked up
(all pinned while the layer computes), each miss is fetched into the cache (the policy picks a victim) or,
if the offload policy says so, computed on the host (and with "host_and_load" also copied into the cache in
the background); the backend computes the layer; the cache unpins.
A layer that needs more distinct experts than its slots (a prefill chunk, a large batch) runs in waves of
at most that many experts, hits first, each wave pinned while it computes.
Prefetch: once a layer is routed, the prefetcher observes its experts and predicts keys of later layers;
after the layer's own misses are issued and before it computes, those not resident are loaded (prefetched)
through the same cache mechanism, the predicted keys pinned meanwhile so one prefetch does not evict
another, until the copy engine holds `max_inflight`. Their copies overlap the layer's compute.
With `backend=None` the same loop only counts hits (the cache-only replay that policies are tested with).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np

from strategies import CachePolicy, Context, Key, OffloadPolicy, Prefetcher

from .backends import Backend
from .cache import Budget, Cache, Counters, parse_budget, parse_inflight
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
           prefetch_max: int | None = None, progress: bool = False) -> Counters:
    """Replay `trace` through `cache` (and `backend`, if given). Returns the cache's counters; what became
    of prefetches is in `cache.prefetch`, the backend's served-request counts in `backend.request_stats()`.

    `prefetch_max`: at most this many keys of each `predict` are loaded (None: all it returns; 0: the
    prefetcher observes but is not asked)."""
    L = trace.n_layers
    seq = np.asarray(trace.seq)
    seen_seqs: set[int] = set()
    if prefetcher is not None:
        prefetcher.setup(Context(trace, trace.spec, tuple(range(L)), cache.n_slots, cache.scope))
    if offload is not None:
        offload.setup(Context(trace, trace.spec, tuple(range(L)), cache.n_slots, cache.scope))
    ask = prefetcher is not None and prefetch_max != 0
    ahead = None  # keys to prefetch once the current layer's misses are issued
    nbytes = cache.spec.bytes_per_expert  # the stored size (model.scale and dtype apply)
    pf_cap = _inflight_cap(prefetcher, backend, "prefetch.max_inflight", nbytes) if ask else None
    host_cap = _inflight_cap(offload, backend, "offload.max_inflight", nbytes) if offload is not None else None
    steps = step_requests(trace)
    route = getattr(backend, "route", None)  # optional: a backend written before it, or for tests, may lack it
    if getattr(route, "__func__", None) is Backend.route:  # the base's no-op (sim): no trace slices per step
        route = None
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
            if route is not None:
                route(trace.experts[start:start + n_tokens], trace.weights[start:start + n_tokens])
        for layer, (ids, counts) in enumerate(requests):
            pos = s * L + layer
            ns = counts or [1] * len(ids)
            cap = cache.capacity_of(layer)
            if prefetcher is not None:  # the layer is routed: its experts are known before they compute
                prefetcher.observe(pos, layer, ids)
                if ask:
                    ahead = prefetcher.predict(pos, layer)
                    if prefetch_max is not None:
                        ahead = ahead[:prefetch_max]
            if len(ids) <= cap:
                _serve(cache, backend, offload, cost, pos, layer, ids, ns, ahead, pf_cap, host_cap)
            else:  # more distinct experts than the layer's slots (prefill, big batches): stream in waves
                order = sorted(range(len(ids)), key=lambda i: not cache.is_resident((layer, ids[i])))  # hits first
                for w in range(0, len(order), cap):
                    wave = order[w:w + cap]
                    _serve(cache, backend, offload, cost, pos, layer, [ids[i] for i in wave], [ns[i] for i in wave],
                           ahead if w == 0 else None, pf_cap, host_cap)
        if backend is not None:
            backend.end_step()
    if backend is not None:
        backend.finish()
    return cache.counters


def _serve(cache: Cache, backend, offload, cost, pos: int, layer: int, ids: list[int], ns: list[int],
           ahead: list[Key] | None = None, pf_cap: int | None = None, host_cap: int | None = None) -> None:
    """One layer's experts `ids` (chosen by `ns` tokens each): look up (pinning them), fetch or host-compute
    each miss, prefetch `ahead`, compute, unpin."""
    keys = [(layer, e) for e in ids]
    misses = cache.lookup(pos, layer, keys)
    host: list[tuple[Key, int]] = []
    for key in misses:
        if offload is not None:
            n = ns[ids.index(key[1])]
            decision = offload.on_miss(key, n, cost)
            if decision == "host" or decision == "host_and_load":
                host.append((key, n))
                cache.counters.host_computes += 1
                if decision == "host_and_load" and _room(backend, host_cap, cache.spec.bytes_per_expert):
                    got = cache.insert(pos, key)  # a background copy for later requests; nobody waits for it
                    if got is not None and backend is not None:
                        backend.load(key, got[0], False)
                continue
            if decision != "fetch":
                raise MoesimError(f"{type(offload).__name__}.on_miss returned {decision!r}; expected "
                                  f"'fetch', 'host' or 'host_and_load'")
        slot, _ = cache.insert(pos, key)
        if backend is not None:
            backend.load(key, slot, False)
    if ahead:
        _prefetch(cache, backend, ahead, pos, pf_cap)
    if backend is not None:
        if host:
            hosted = {k for k, _ in host}
            device = [(k, cache.slot_of(k), n) for k, n in zip(keys, ns) if k not in hosted]
        else:
            device = [(k, cache.slot_of(k), n) for k, n in zip(keys, ns)]
        backend.compute(layer, device, host)
    cache.release()


def _prefetch(cache: Cache, backend, keys: list[Key], pos: int, cap: int | None = None) -> None:
    """Load the keys of `keys` that are not resident, in order, marked prefetched, while the copy engine
    holds less than `cap` bytes. The predicted keys are pinned meanwhile (with the running layer's), so a
    prefetch never evicts a key the same prediction wants; a key whose partition is all pinned is skipped."""
    parts, part_of = cache.partitions, cache.part_of_layer
    missing = [k for k in keys if k not in parts[part_of[k[0]]].resident]
    if not missing:  # a good prediction is mostly resident already
        return
    pinned = cache.pinned
    added = [k for k in keys if k not in pinned]
    pinned.update(added)
    nbytes = cache.spec.bytes_per_expert
    try:
        for key in missing:
            if key in parts[part_of[key[0]]].resident:  # listed twice in `keys`
                continue
            if not _room(backend, cap, nbytes):
                break
            got = cache.insert(pos, key, prefetched=True)
            if got is not None and backend is not None:
                backend.load(key, got[0], True)
    finally:
        pinned.difference_update(added)


def _room(backend, cap: int | None, nbytes: int) -> bool:
    """Whether one more copy of `nbytes` fits under `cap` bytes queued on the backend's copy engine."""
    return cap is None or backend is None or backend.inflight_bytes() + nbytes <= cap


def _inflight_cap(policy, backend, where: str, bytes_per_expert: int) -> int | None:
    """The policy's `max_inflight` in bytes, checked against what the backend can report."""
    cap = parse_inflight(getattr(policy, "max_inflight", None), bytes_per_expert, where)
    if cap is not None and backend is not None and not hasattr(backend, "inflight_bytes"):
        raise MoesimError(f"{where}: backend {getattr(backend, 'name', type(backend).__name__)} cannot report "
                          f"the bytes of copies in flight; use backend=sim or set {where}=null")
    return cap


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
    from .report import version_info
    from .report.tables import expert_use
    from .results import default_run_dir, write_run
    from .trace import scale_spec, stored_spec

    cfg = resolve_strategy(cfg)
    trace = open_trace(str(cfg.trace))
    budget = parse_budget(cfg.budget, trace.spec, cfg.scope)  # slots from the real model: same decisions at any scale
    spec = scale_spec(trace.spec, float(cfg.model.scale))
    if cfg.model.dtype:
        spec = stored_spec(spec, str(cfg.model.dtype))
    hardware = load_hardware(str(cfg.hardware))
    strat = cfg.strategy
    make_policy = lambda: instantiate(strat.cache)  # noqa: E731  one instance per partition
    cache = Cache(spec, budget.slots, cfg.scope, make_policy, trace)
    prefetcher = instantiate(strat.prefetch) if strat.get("prefetch") else None
    offload = instantiate(strat.offload) if strat.get("offload") else None
    backend = instantiate(cfg.backend, hardware=hardware)
    compiled = fast_path(cfg, prefetcher, offload)
    if compiled is not None:  # the same decisions and clocks, compiled (tests/test_fast.py checks equality)
        from . import fast

        sim = fast.replay_sim(trace, *compiled, budget.slots, cfg.scope, hardware, bool(cfg.reset_per_seq),
                              pinned=bool(cfg.backend.get("pinned", True)), spec=spec)
        counters, profiler, served = Counters(**sim.counters), sim.profiler, sim.request_stats
        device_bytes = sim.device_bytes
    else:
        profiler = Profiler(n_layers=spec.layers)
        backend.setup(spec, budget.slots, profiler)
        counters = replay(trace, cache, backend, prefetcher, offload, Cost(hardware, spec),
                          reset_per_seq=bool(cfg.reset_per_seq), progress=bool(cfg.progress))
        served = backend.request_stats() if hasattr(backend, "request_stats") else None
        device_bytes = backend.device_bytes()
    metrics = profiler.metrics()
    bounds = [type(x).__name__ for x in (cache.partitions[0].policy, prefetcher, offload)
              if x is not None and getattr(x, "bound", False)]
    summary = {
        "hit_rate": counters.hits / counters.requests if counters.requests else float("nan"),
        **counters.to_dict(),
        "bytes_h2d": counters.loads * spec.bytes_per_expert,
        **metrics,
        **request_metrics(counters, cache.prefetch, served, spec.bytes_per_expert),
        "peak_device_bytes": device_bytes,
        "strategy": strat.name,
        "bound": bool(bounds),  # an oracle took part: a bound, not a deployable result
        "budget": budget.to_dict() | {"bytes": budget.slots * spec.bytes_per_expert},
        "scope": cfg.scope,
        "trace": {"name": str(cfg.trace), "path": str(trace.path) if trace.path else None,
                  "tokens": trace.n_tokens, "steps": trace.n_steps, "sequences": trace.n_seqs,
                  "source": trace.source},
        "model": spec.to_dict() | {"bytes_per_expert": spec.bytes_per_expert, "scale": float(cfg.model.scale)},
        "hardware": hardware.name,
        "hardware_profile": hardware.to_dict(),
        "moesim": version_info(),
        "backend": backend.name,
        "fast_path": compiled is not None,
    }
    for extra in ("memory", "info"):  # what only some backends can tell (torch: peak RSS, VRAM, device name)
        if hasattr(backend, extra):
            summary[f"backend_{extra}" if extra == "info" else extra] = getattr(backend, extra)()
    out_dir = None
    if write:
        out_dir = default_run_dir(strat.name) if cfg.out is None else cfg.out
        out_dir = write_run(out_dir, OmegaConf.to_container(cfg, resolve=True), summary,
                            profiler.steps_table(), profiler.layers_table(), profiler.timeline(),
                            experts=expert_use(trace))
    return RunOutput(summary, out_dir)


def fast_path(cfg, prefetcher, offload) -> tuple[str, dict] | None:
    """(policy, params) when `fast=auto|true` and the compiled loop of moesim/fast.py covers this run
    (backend sim, a built-in cache policy, no prefetcher, no offload policy); else None (the Python loop).
    `fast=true` refuses a run it does not cover; `fast=false` always takes the Python loop."""
    mode = str(cfg.get("fast", "auto")).lower()
    if mode in ("false", "off", "no"):
        return None
    from . import fast

    compiled = fast.compiled_policy(cfg.strategy.cache)
    covered = (str(cfg.backend.get("_target_", "")).endswith("sim.SimBackend") and compiled is not None
               and prefetcher is None and offload is None)
    if mode in ("true", "on", "yes") and not covered:
        raise MoesimError("fast=true: the compiled loop covers backend=sim with a built-in cache policy "
                          "and no prefetcher or offload policy; use fast=auto")
    if mode not in ("auto", "true", "on", "yes"):
        raise MoesimError(f"fast={cfg.fast!r}: expected auto, true or false")
    return compiled if covered else None


def resolve_strategy(cfg):
    """A copy of `cfg` in which the top-level `prefetch=` / `offload=` choices, when made, replace the
    strategy's own `prefetch` / `offload` block, and the strategy's name says so (`lru+transition+cost`)."""
    from omegaconf import OmegaConf, open_dict

    chosen = {g: cfg.get(g) for g in ("prefetch", "offload") if cfg.get(g) is not None}
    if not chosen:
        return cfg
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(cfg):
        for group, block in chosen.items():
            cfg.strategy[group] = OmegaConf.create(OmegaConf.to_container(block, resolve=True))
        cfg.strategy.name = str(cfg.strategy.name) + "".join(f"+{policy_name(b)}" for b in chosen.values())
    return cfg


def policy_name(block) -> str:
    """A policy config's short name: the module of its `_target_` (strategies.transition.Transition -> transition)."""
    target = str(block.get("_target_", "")) if hasattr(block, "get") else ""
    parts = target.split(".")
    return parts[-2] if len(parts) >= 2 else (target or "?")


def request_metrics(counters: Counters, prefetch, served: dict | None, bytes_per_expert: int) -> dict:
    """summary.json's prefetch and stall metrics (see docs/strategies.md for the definitions):

    prefetch_precision = prefetched keys requested while resident / prefetched loads
    prefetch_recall    = those requests / (those requests + misses): of the requests not already resident
                         by earlier use, the share a prefetch brought in
    late_prefetches    = used prefetches whose copy completed after their layer could start (backend)
    wasted_prefetches  = prefetched keys evicted before any request; wasted_prefetch_bytes = that x bytes
    stall_free_rate    = expert requests served from device weights that were ready when their layer could
                         start / all expert requests (host-computed misses are not stall-free)
    The backend's counts (`served`, from request_stats()) are None where it cannot time requests."""
    used = prefetch.used
    stall_free = served.get("stall_free_requests") if served else None
    return {
        "prefetch_used": used,
        "prefetch_precision": used / counters.prefetch_loads if counters.prefetch_loads else None,
        "prefetch_recall": used / (used + counters.misses) if used + counters.misses else None,
        "late_prefetches": served.get("late_prefetches") if served else None,
        "wasted_prefetches": prefetch.wasted,
        "wasted_prefetch_bytes": prefetch.wasted * bytes_per_expert,
        "prefetch_unused_at_end": len(prefetch.unused),
        "stall_free_requests": stall_free,
        "stall_free_rate": stall_free / counters.requests if stall_free is not None and counters.requests else None,
    }


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
        ("stall-free requests", "n/a" if s.get("stall_free_rate") is None else f"{s['stall_free_rate']:.4f}"),
        ("peak device memory", f"{s['peak_device_bytes'] / 2**30:.2f} GiB"),
    ]
    if s.get("prefetch_loads"):
        late = "n/a" if s.get("late_prefetches") is None else s["late_prefetches"]
        rows.insert(7, ("prefetch precision / recall", f"{s['prefetch_precision']:.4f} / {s['prefetch_recall']:.4f}"
                                                        f"  ({late} late, {s['wasted_prefetch_bytes'] / 2**30:.2f} "
                                                        f"GiB wasted)"))
    if s.get("host_computes"):
        rows.insert(7, ("host computes", f"{s['host_computes']}"))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def run_command(cfg) -> None:
    """`python -m moesim run ...`: replay, print the summary, write the results directory."""
    from .report import write_run_report

    out = run(cfg)
    print(summary_table(out.summary))
    print(f"results: {out.out_dir}")
    print(f"report: {write_run_report(out.out_dir)}")
