"""Fidelity: how well the sim backend, with a hardware profile `calibrate` measured, predicts the torch backend.
`compare_backends` replays one trace through the same strategy and budget on both backends and returns both
runs' numbers with the sim's relative errors (the decisions, hits and bytes, must be identical).

    python -m moesim calibrate check=gpt-oss-20b check_tokens=150 scale=0.125   # from the CLI
    pytest tests/test_fidelity.py -q                                  # a tolerant bound on a small trace
    pytest tests/bench/test_bench_fidelity.py --benchmark-enable -s  # the errors docs/fidelity.md reports

Measuring the machine is moesim/calibrate.py's; this module only replays and compares.
"""
from __future__ import annotations

import time

import numpy as np

from .hardware import Cost, HardwareProfile
from .models import scale_spec, with_formats


def check_trace(value: str, tokens: int):
    """The first whole steps of trace `value` (file or preset) covering at most `tokens` tokens (one step
    at least)."""
    from .importers import open_trace

    trace = open_trace(value)
    starts = trace.step_starts
    i = int(np.searchsorted(starts, tokens, side="right")) - 1
    cut = int(starts[max(1, min(i, len(starts) - 1))])
    return trace.slice_tokens(0, cut)



def compare_backends(trace, profile: HardwareProfile, make_policy, budget="25%", scope: str = "per_layer",
                     scale: float = 1.0, backend_options: dict | None = None, make_prefetcher=None,
                     prefetch_max: int = 0, make_offload=None, experts_format: str | None = None) -> dict:
    """Replay `trace` (model at `scale`, weights as the torch backend stores them: packed in their format
    unless backend_options["dtype"] names bf16, fp16 or fp32) through the same strategy and budget on the
    torch backend and on the sim backend with `profile`; returns both runs' numbers and the sim's relative
    errors: {"real": {...}, "sim": {...}, "error": {...}, "spec": ..., "slots": ...}.

    `make_policy`: a CachePolicy class or factory; `make_prefetcher`: a Prefetcher factory (or None);
    `make_offload`: an OffloadPolicy factory (or None), asked with `profile`'s costs on both backends;
    `experts_format`: store the routed experts in this format instead of the trace's (q4_k, mxfp4 ...).
    Experts only: the torch backend runs no attention, embeddings or LM head, so no dense times
    (moesim/whole.py) are given to the sim either (a sim `run` adds them: its `whole_model`)."""
    from .api import replay_parts
    from .backends.sim import SimBackend
    from .backends.torch import TorchBackend, stored_spec
    from .units import parse_budget

    options = dict(backend_options or {})
    torch_backend = TorchBackend(**options)
    spec = stored_spec(scale_spec(with_formats(trace.spec, experts=experts_format), scale),
                       options.get("dtype", "auto"))
    slots = parse_budget(budget, trace.spec, scope).slots  # slots: the same decisions at any scale
    runs = {}
    for name, backend in (("real", torch_backend), ("sim", SimBackend(profile, pinned=options.get("pinned", True)))):
        t0 = time.perf_counter()
        offload = make_offload() if make_offload else None
        cost = Cost(profile, spec, options.get("pinned", True))
        # as a run replays: the compiled core decides where every part is built in (torch: engine.play)
        ex = replay_parts(trace, spec, slots, scope, make_policy, make_prefetcher() if make_prefetcher else None,
                          offload, backend, profile, cost, prefetch_max=prefetch_max if make_prefetcher else None)
        profiler, c = ex.profiler, ex.counters
        wall = time.perf_counter() - t0
        mt = profiler.metrics()
        st = profiler.arrays()[0]
        lat = st[:, 3] - st[:, 2]  # each step's latency, ms
        step_ms = float(np.sum(lat))
        runs[name] = {"hits": c.hits, "misses": c.misses, "loads": mt["loads"], "bytes_h2d": mt["bytes_h2d"],
                      "host_computes": c.host_computes,
                      "latency_p50_ms": mt["latency_ms"]["p50"], "latency_mean_ms": mt["latency_ms"]["mean"],
                      "stall_ms": mt["stall_ms"], "compute_ms": mt["compute_busy_ms"],
                      "overlap": mt["overlap"], "replay_s": wall,
                      # what is neither compute nor waiting for copies: the replay's own time, per step
                      "own_ms_per_step": (step_ms - mt["compute_busy_ms"] - mt["stall_ms"]) / max(1, len(st)),
                      "step_ms": lat}
        if name == "real":
            runs[name]["memory"] = backend.memory()
            runs[name]["info"] = backend.info()
    real, sim = runs["real"], runs["sim"]
    # step by step (the same decisions, so the same work in each step): the median of sim / torch - 1, which a
    # few steps slowed by other work on the machine do not move, where they can move the two runs' own p50s
    paired = float(np.median(sim.pop("step_ms") / real.pop("step_ms")) - 1) if len(st) else None

    def err(k):
        r, s = real[k], sim[k]
        return None if r is None or s is None or r == 0 else (s - r) / r

    return {**runs, "error": {**{k: err(k) for k in ("latency_p50_ms", "latency_mean_ms", "stall_ms", "compute_ms",
                                                     "own_ms_per_step")}, "step_latency_paired": paired},
            "same_decisions": (real["hits"] == sim["hits"] and real["bytes_h2d"] == sim["bytes_h2d"]
                               and real["host_computes"] == sim["host_computes"]),
            "spec": spec.to_dict(), "slots": slots, "scope": scope, "tokens": trace.n_tokens}


def comparison_table(r: dict) -> str:
    """The rows of compare_backends' result, for a terminal."""
    real, sim, e = r["real"], r["sim"], r["error"]

    def pct(x):
        return "n/a" if x is None else f"{x * 100:+.1f}%"

    rows = [("", "torch (measured)", "sim (predicted)", "error"),
            ("hits", str(real["hits"]), str(sim["hits"]), "same" if real["hits"] == sim["hits"] else "DIFFERENT"),
            ("bytes moved", str(real["bytes_h2d"]), str(sim["bytes_h2d"]),
             "same" if real["bytes_h2d"] == sim["bytes_h2d"] else "DIFFERENT"),
            ("latency p50 ms", f"{real['latency_p50_ms']:.3f}", f"{sim['latency_p50_ms']:.3f}", pct(e["latency_p50_ms"])),
            ("latency mean ms", f"{real['latency_mean_ms']:.3f}", f"{sim['latency_mean_ms']:.3f}", pct(e["latency_mean_ms"])),
            ("stall ms", f"{real['stall_ms']:.1f}", f"{sim['stall_ms']:.1f}", pct(e["stall_ms"])),
            ("compute ms", f"{real['compute_ms']:.1f}", f"{sim['compute_ms']:.1f}", pct(e["compute_ms"])),
            ("own time ms/step", f"{real['own_ms_per_step']:.3f}", f"{sim['own_ms_per_step']:.3f}",
             pct(e["own_ms_per_step"]))]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)
