"""Fidelity and calibration benchmarks: how well the sim, with a profile `calibrate` measured on this machine,
predicts the torch backend; and how long `calibrate` takes (goal: under 2 minutes on a 2-core CPU).

    pytest tests/bench/test_bench_fidelity.py --benchmark-enable -s

The errors go into the benchmark's extra_info (saved with --benchmark-autosave) and are printed. Goal:
median per-token latency within 10% (5% ideally) on CPU, hits and bytes identical. Both benchmarks run only
with --benchmark-enable: each takes a minute or more. docs/fidelity.md gives the figures measured here.
The cases store the experts as bf16 (backend.dtype=bf16), or packed in their format (real-mxfp4: gpt-oss's
own; real-q4_k), and calibrate them as stored: a packed expert's decode is timed with its FFN and keyed by
its packed bytes, as the sim looks it up (before, calibrate timed bf16 FFNs only: the sim was 93% and 97%
low for mxfp4 and q4_k).
"""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest

from moesim.calibrate import Sampling, measure, to_profile
from moesim.fidelity import compare_backends, comparison_table
from moesim.trace import MODEL_SPECS
from strategies.lru import LRU

REPO = Path(__file__).resolve().parents[2]
LATENCY_GOAL = 0.10  # |sim - torch| / torch of the median per-token latency, CPU
CALIBRATE_GOAL_S = 120.0
SCALE = 0.125  # gpt-oss-20b at 1/8: 360 x 360 experts; bf16 0.74 MiB each (576 MiB host pool), mxfp4 220,320 B


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _need_enabled(benchmark):
    if benchmark.disabled:
        pytest.skip("a minute-long benchmark: run with --benchmark-enable")


@pytest.mark.parametrize("case", ["real", "real+prefetch", "real+host", "batch1", "batch8", "real-mxfp4",
                                  "real-q4_k"])
def test_bench_fidelity_cpu(benchmark, request, case):
    """real: the first 150 decode steps of the gpt-oss-20b trace (+prefetch: a perfect next-layer
    prefetcher; +host: half the misses computed on the host, offload=host share=0.5); batchN: synthetic steps
    of N tokens; real-FORMAT: the experts packed in FORMAT. LRU at 25% in every case."""
    _need_enabled(benchmark)
    gpt = MODEL_SPECS["gpt-oss-20b"]
    packed = case.split("-")[1] if "-" in case else None
    options = {"device": "cpu"} if packed else {"device": "cpu", "dtype": "bf16"}
    extra = {"experts_format": packed} if packed else {}
    if case == "real+prefetch":
        extra = {"make_prefetcher": _gpu_check().NextLayerOracle, "prefetch_max": gpt.top_k}
    elif case == "real+host":
        from strategies.host import Host

        extra = {"make_offload": lambda: Host(share=0.5)}
    if case.startswith("real"):
        real = request.getfixturevalue("real_trace")
        trace = real.slice_tokens(0, int(real.step_starts[150]))
    else:
        batch = int(case[5:])
        trace = _gpu_check().locality_trace(gpt, 150 if batch == 1 else 40, batch=batch, reuse=0.5, skew=1.0,
                                            seed=0)
    # calibrated as the torch run stores its experts: bf16 (backend.dtype=bf16), or packed in FORMAT
    m = measure(device="cpu", model="gpt-oss-20b", scale=SCALE, dims=[], tokens=(1, 2, 4, 8),
                dtype=options.get("dtype", "auto"), experts_format=packed,
                sampling=Sampling(min_n=20, min_ms=200.0, max_n=2000), log=lambda s: None)
    profile = to_profile(m)
    result = {}

    def run():
        result.update(compare_backends(trace, profile, LRU, "25%", "per_layer", SCALE, options, **extra))

    benchmark.pedantic(run, rounds=1, iterations=1)
    print(f"\n{case}: {trace.describe()}, scale {SCALE}, lru, 25%:\n{comparison_table(result)}")
    benchmark.extra_info.update({f"error_{k}": v for k, v in result["error"].items()})
    benchmark.extra_info.update(real_p50_ms=result["real"]["latency_p50_ms"], sim_p50_ms=result["sim"]["latency_p50_ms"])
    assert result["same_decisions"]
    assert result["real"]["bytes_h2d"] == result["real"]["loads"] * result["real"]["info"]["bytes_per_expert"]
    assert result["real"]["info"]["weights_format"] == (packed or "bf16")
    assert abs(result["error"]["latency_p50_ms"]) < LATENCY_GOAL, result["error"]


def test_bench_calibrate_time(benchmark):
    _need_enabled(benchmark)
    took = {}

    def run():
        t0 = time.perf_counter()
        took["profile"] = to_profile(measure(log=lambda s: None))
        took["s"] = time.perf_counter() - t0

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info["calibrate_s"] = took["s"]
    print(f"\ncalibrate (defaults, {took['profile'].name}): {took['s']:.1f} s")
    assert took["s"] < CALIBRATE_GOAL_S


def test_bench_copy_worker(benchmark):
    """Copies inline (copy_worker=false) against on a worker thread (true), with LRU alone and with a perfect
    prefetcher, and inline with 2 compute threads, on gpt-oss-20b at 1/8; rounds alternate so that load from
    other processes hits all alike. The fastest is the default in moesim/conf/backend/torch.yaml."""
    _need_enabled(benchmark)
    gc = _gpu_check()
    from moesim.backends.torch import TorchBackend, scale_spec, stored_spec
    from moesim.cache import Cache
    from moesim.units import parse_budget
    from moesim.engine import replay
    from moesim.profiler import Profiler

    gpt = MODEL_SPECS["gpt-oss-20b"]
    trace = gc.locality_trace(gpt, 100, batch=1, reuse=0.5, skew=1.0, seed=0)
    spec = stored_spec(scale_spec(gpt, SCALE))
    slots = parse_budget("25%", gpt, "per_layer").slots
    configs = [(False, 1, False), (False, 1, True), (True, 1, False), (True, 1, True), (False, 2, False)]
    p50: dict = {}
    overlap: dict = {}

    def run():
        for _ in range(3):
            for worker, threads, prefetch in configs:
                backend = TorchBackend(device="cpu", copy_worker=worker, threads=threads)
                profiler = Profiler(spec.layers)
                backend.setup(spec, slots, profiler)
                replay(trace, Cache(spec, slots, "per_layer", LRU, trace), backend,
                       gc.NextLayerOracle() if prefetch else None, prefetch_max=spec.top_k if prefetch else 0)
                m = profiler.metrics()
                p50.setdefault((worker, threads, prefetch), []).append(m["latency_ms"]["p50"])
                overlap.setdefault((worker, threads, prefetch), []).append(m["overlap"])

    benchmark.pedantic(run, rounds=1, iterations=1)
    for key in configs:
        worker, threads, prefetch = key
        name = f"copy_worker={str(worker).lower()} threads={threads} {'lru+oracle' if prefetch else 'lru'}"
        best = min(p50[key])
        benchmark.extra_info[name] = best
        print(f"\n{name}: p50 per token {', '.join(f'{x:.2f}' for x in p50[key])} ms (best {best:.2f}); "
              f"copy time under compute {', '.join(f'{x:.2f}' for x in overlap[key])}")
    assert all(min(v) > 0 for v in p50.values())
