"""moesim as a library, and the `run` command over it. `python -m moesim run strategy=lru`.

    from moesim.api import run          # run(cfg) with a config composed from moesim/conf/run.yaml
"""
from __future__ import annotations

from dataclasses import dataclass

from .cache import Cache, Counters
from .engine import replay
from .errors import MoesimError
from .units import parse_budget


@dataclass
class RunOutput:
    summary: dict
    out_dir: object  # pathlib.Path of the results directory, or None


def run(cfg, write: bool = True) -> RunOutput:
    """Run one configuration (as composed from moesim/conf/run.yaml) and write its results directory."""
    from omegaconf import OmegaConf

    from .hardware import load_hardware
    from .importers import open_trace
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
    ex = execute(trace, spec, budget.slots, str(cfg.scope), strat, cfg.backend, hardware,
                 reset_per_seq=bool(cfg.reset_per_seq), progress=bool(cfg.progress), fast=cfg.get("fast", "auto"))
    counters, profiler, served, device_bytes, backend = ex.counters, ex.profiler, ex.served, ex.device_bytes, ex.backend
    metrics = profiler.metrics()
    summary = {
        "hit_rate": counters.hits / counters.requests if counters.requests else float("nan"),
        **counters.to_dict(),
        "bytes_h2d": counters.loads * spec.bytes_per_expert,
        **metrics,
        **request_metrics(counters, ex.prefetch, served, spec.bytes_per_expert),
        "peak_device_bytes": device_bytes,
        "strategy": strat.name,
        "bound": ex.bound,  # an oracle took part: a bound, not a deployable result
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
        "fast_path": ex.compiled,
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


@dataclass
class Execution:
    """What one replay produced, whichever driver ran it (see `execute`)."""

    counters: Counters
    prefetch: object  # .used, .wasted, .unused (moesim.cache.PrefetchCounters)
    profiler: object  # moesim.profiler.Profiler (metrics, tables, timeline)
    served: dict | None  # backend.request_stats(): stall-free requests, late prefetches
    device_bytes: int
    backend: object  # the backend instance (name; memory() and info() where it has them)
    bound: bool  # an oracle took part
    compiled: bool  # the compiled loop ran it


def execute(trace, spec, n_slots: int, scope: str, strat, backend_cfg, hardware, reset_per_seq: bool = False,
            progress: bool = False, fast="auto") -> Execution:
    """Replay `trace` through the strategy config `strat` (cache/prefetch/offload blocks) on the backend of
    `backend_cfg` with `n_slots` slots in `scope`: the compiled loop where it covers the run, else the Python
    loop (engine.replay). `spec` is the stored model (scale and dtype applied)."""
    from hydra.utils import instantiate

    from .hardware import Cost
    from .profiler import Profiler

    make_policy = lambda: instantiate(strat.cache)  # noqa: E731  one instance per partition
    cache = Cache(spec, n_slots, scope, make_policy, trace)
    prefetcher = instantiate(strat.prefetch) if strat.get("prefetch") else None
    offload = instantiate(strat.offload) if strat.get("offload") else None
    backend = instantiate(backend_cfg, hardware=hardware)
    bound = any(getattr(x, "bound", False) for x in (cache.partitions[0].policy, prefetcher, offload)
                if x is not None)
    compiled = fast_path(fast, strat, backend_cfg, prefetcher, offload)
    if compiled is not None:  # the same decisions and clocks, compiled (tests/test_fast.py checks equality)
        from . import fast as fast_mod

        sim = fast_mod.replay_sim(trace, *compiled, n_slots, scope, hardware, reset_per_seq,
                                  pinned=bool(backend_cfg.get("pinned", True)), spec=spec)
        return Execution(Counters(**sim.counters), cache.prefetch, sim.profiler, sim.request_stats,
                         sim.device_bytes, backend, bound, True)
    profiler = Profiler(n_layers=spec.layers)
    backend.setup(spec, n_slots, profiler)
    counters = replay(trace, cache, backend, prefetcher, offload, Cost(hardware, spec),
                      reset_per_seq=reset_per_seq, progress=progress)
    served = backend.request_stats() if hasattr(backend, "request_stats") else None
    return Execution(counters, cache.prefetch, profiler, served, backend.device_bytes(), backend, bound, False)


def fast_path(mode, strat, backend_cfg, prefetcher, offload) -> tuple[str, dict] | None:
    """(policy, params) when `fast=auto|true` and the compiled loop of moesim/fast.py covers this run
    (backend sim, a built-in cache policy, no prefetcher, no offload policy); else None (the Python loop).
    `mode` is the run's `fast=` value: `true` refuses a run it does not cover; `fast=false` always takes the Python loop."""
    mode = str(mode).lower()
    if mode in ("false", "off", "no"):
        return None
    from . import fast

    compiled = fast.compiled_policy(strat.cache)
    covered = (str(backend_cfg.get("_target_", "")).endswith("sim.SimBackend") and compiled is not None
               and prefetcher is None and offload is None)
    if mode in ("true", "on", "yes") and not covered:
        raise MoesimError("fast=true: the compiled loop covers backend=sim with a built-in cache policy "
                          "and no prefetcher or offload policy; use fast=auto")
    if mode not in ("auto", "true", "on", "yes"):
        raise MoesimError(f"fast={mode!r}: expected auto, true or false")
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
