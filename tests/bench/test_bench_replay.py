"""Speed of the compiled core (moesim/core/) and curves (moesim/curves.py): against libCacheSim's C loop and
against the plain-Python loop, measured side by side in one run (ratios, not absolute times, are asserted).

    python -m pytest tests/bench --benchmark-enable            # add -s to see the rates printed

The trace is the whole real gpt-oss-20b trace shipped in traces/ (all 532 files, 155k tokens x 24 layers x
top-4). The
budget is 25% of the experts: 8 slots per layer, per_layer scope. The slow Python reference replays a fixed
prefix (REFERENCE_TOKENS); rates (requests or layer-steps per second) are compared.

libCacheSim runs its own C loop (`cache.process_trace(reader)`, the reader a C++ reader of a binary file):
one stream per layer, key = expert id, each (token, layer) ordered hits first (the experts our LRU has
resident, then the others), so that its sequential LRU makes the same decisions as our set LRU; the test
checks that its miss count equals ours. Readers and caches are built before the clock starts.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from moesim import core, curves

SLOTS = 192  # 25% of 24 x 32 experts: 8 per layer
SCOPE = "per_layer"
REFERENCE_TOKENS = 2000  # prefix replayed by the plain-Python loop (48k layer-steps)
# floors measured on a shared 2-core machine with margin (what each test prints is the measurement)
LIBCACHESIM_FLOOR = 3.0  # the goal
PYTHON_CACHE_ONLY_FLOOR = 8.0  # measured 18-71x (2026-12-06, after the Python driver got 2.5x faster)
PYTHON_TIMED_FLOOR = 5.0  # measured 14-91x over every strategy (2026-12-06), lru the lowest
LEARNED_GOAL = 2e5  # layer-steps/s of the learned policy's compiled replay on one core (issue 20): printed
TIMED_GOAL = 1e6  # layer-steps/s of the compiled loop on the whole trace, every strategy (issue 12): printed and
#                   kept in the benchmark's extra_info, not asserted (an absolute rate depends on the machine)


@pytest.fixture(scope="session")
def bench_trace(real_trace):
    """The shipped real trace, encoded once for the fast path."""
    trace = real_trace
    t0 = time.perf_counter()
    core.encode(trace)
    trace._bench_encode_s = time.perf_counter() - t0
    core.hit_counts(trace.slice_tokens(0, 100), "lru", {}, SLOTS, SCOPE)  # compile or load the kernels
    return trace


def timed(benchmark, fn, args, rounds: int = 1, warmup_rounds: int = 0) -> tuple[object, float]:
    """(result, fastest wall time): pytest-benchmark's measurement with --benchmark-enable; with the default
    --benchmark-disable (plain `pytest`, CI) the same rounds timed here, so the ratio floors hold either way."""
    if getattr(benchmark, "disabled", False):
        for _ in range(warmup_rounds):
            fn(*args)
        wall, out = best_time(lambda: fn(*args), rounds=rounds)
        benchmark(lambda: out)  # keeps the fixture used; costs nothing
        return out, wall
    out = benchmark.pedantic(fn, args=args, rounds=rounds, warmup_rounds=warmup_rounds)
    return out, benchmark.stats.stats.min


def best_time(fn, rounds: int = 3, clock=time.perf_counter) -> tuple[float, object]:
    """(fastest time of `rounds` calls on `clock`, last result)."""
    best, out = float("inf"), None
    for _ in range(rounds):
        t0 = clock()
        out = fn()
        best = min(best, clock() - t0)
    return best, out


def report(benchmark, **numbers) -> None:
    benchmark.extra_info.update(numbers)
    print("\n" + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in numbers.items()))


# ------------------------------------------------------------------------------------- libCacheSim
def write_layer_streams(trace, flags: np.ndarray, folder) -> list[tuple[str, int]]:
    """One binary file of uint32 keys (expert id + 1) per layer, hits first within each (token, layer);
    returns (path, requests) per layer."""
    req = core.encode(trace)
    L = req.n_layers
    pos = np.repeat(np.arange(len(req.ptr) - 1), np.diff(req.ptr))  # request position of each element
    order = np.lexsort((np.arange(len(req.ids)), 1 - flags, pos, pos % L))  # layer, position, hits first, row
    layer_of = (pos % L)[order]
    bounds = np.searchsorted(layer_of, np.arange(L + 1))
    out = []
    for layer in range(L):
        keys = req.ids[order[bounds[layer]:bounds[layer + 1]]].astype(np.uint32) + 1
        path = str(folder / f"layer{layer}.bin")
        keys.tofile(path)
        out.append((path, len(keys)))
    return out


def libcachesim_lru(streams, slots_per_layer: int):
    """A function that replays every layer's stream through libCacheSim's LRU in its C loop and returns the
    total misses; readers and caches are made (fresh) when it is built, outside the timed call."""
    import libcachesim as lc

    def make_reader(path):
        params = lc.ReaderInitParam(binary_fmt_str="<I", ignore_obj_size=True)
        params.obj_id_field = 1
        return lc.TraceReader(path, lc.TraceType.BIN_TRACE, params)

    readers = [(make_reader(path), n) for path, n in streams]
    caches = [lc.LRU(slots_per_layer) for _ in streams]

    def run():
        misses = 0
        for (reader, n), cache in zip(readers, caches):
            miss_ratio, _ = cache.process_trace(reader)
            misses += round(miss_ratio * n)
        return misses

    return run


def test_lru_cache_only_vs_libcachesim(benchmark, bench_trace, tmp_path):
    """Goal: the compiled cache-only LRU replay of the whole trace at >= 3x libCacheSim's C loop. Both run in
    this process on one thread; the asserted ratio is of CPU time (time.process_time, best of several rounds),
    which other jobs on a shared machine disturb less than wall time (both are reported)."""
    trace = bench_trace
    L = trace.n_layers
    ours, fast_wall = timed(benchmark, core.hit_counts, (trace, "lru", {}, SLOTS, SCOPE), rounds=5, warmup_rounds=1)
    # best of 9: the kernel takes ~0.13 s, and in CI (2026-12-07) its best of 5 once came out 15% slow (97 against
    # 110-118 M requests/s alone), for a ratio of 2.75 where four runs alone gave 3.14-3.34
    fast_cpu = best_time(lambda: core.hit_counts(trace, "lru", {}, SLOTS, SCOPE), rounds=9, clock=time.process_time)[0]
    flags = core.hit_flags(trace, "lru", {}, SLOTS, SCOPE)
    assert int(flags.sum()) == ours["hits"]
    streams = write_layer_streams(trace, flags, tmp_path)
    lcs_wall = lcs_cpu = float("inf")
    for _ in range(3):  # fresh readers and caches each round, made before the clocks start
        run = libcachesim_lru(streams, SLOTS // L)
        w0, c0 = time.perf_counter(), time.process_time()
        lcs_misses = run()
        lcs_cpu = min(lcs_cpu, time.process_time() - c0)
        lcs_wall = min(lcs_wall, time.perf_counter() - w0)
    assert lcs_misses == ours["misses"], "libCacheSim's LRU on hits-first streams must decide as our set LRU"
    n = ours["requests"]
    ratio = lcs_cpu / fast_cpu
    report(benchmark, requests=n, fast_cpu_s=fast_cpu, libcachesim_cpu_s=lcs_cpu, fast_mreq_s=n / fast_cpu / 1e6,
           libcachesim_mreq_s=n / lcs_cpu / 1e6, ratio_cpu=ratio, ratio_wall=lcs_wall / fast_wall,
           encode_s=trace._bench_encode_s, ratio_wall_with_encode=lcs_wall / (fast_wall + trace._bench_encode_s))
    assert ratio >= LIBCACHESIM_FLOOR, (
        f"compiled LRU {n / fast_cpu / 1e6:.1f} M requests/s (CPU time) is only {ratio:.2f}x libCacheSim's C "
        f"loop ({n / lcs_cpu / 1e6:.1f} M requests/s); the goal is >= {LIBCACHESIM_FLOOR}x")


# ---------------------------------------------------------------------------------------- Python loop
@pytest.mark.parametrize("policy", ["lru", "lfu", "belady", "learned"])
def test_cache_only_fast_vs_python_reference(benchmark, bench_trace, policy):
    """Requests per second: the compiled replay of the whole trace against moesim.engine.hit_counts (the
    plain-Python loop and strategies) on the first REFERENCE_TOKENS tokens; equal counters on that prefix.
    learned (its shipped gpt-oss-20b model): issue 20's goal is LEARNED_GOAL layer-steps/s on one core, printed
    and kept in extra_info (an absolute rate depends on the machine)."""
    from moesim.engine import hit_counts

    trace = bench_trace
    ours, fast_s = timed(benchmark, core.hit_counts, (trace, policy, {}, SLOTS, SCOPE), rounds=3, warmup_rounds=1)
    fast_rate = ours["requests"] / fast_s
    head = trace.slice_tokens(0, REFERENCE_TOKENS)
    cls = core.reference_class(policy)
    ref_s, ref = best_time(lambda: hit_counts(head, cls, SLOTS, SCOPE).to_dict(), rounds=1)
    assert core.hit_counts(head, policy, {}, SLOTS, SCOPE) == ref
    ref_rate = ref["requests"] / ref_s
    layer_steps_s = trace.n_steps * trace.n_layers / fast_s
    report(benchmark, policy=policy, fast_mreq_s=fast_rate / 1e6, python_mreq_s=ref_rate / 1e6,
           ratio=fast_rate / ref_rate, layer_steps_per_s=layer_steps_s,
           **({"meets_learned_goal": layer_steps_s >= LEARNED_GOAL} if policy == "learned" else {}))
    assert fast_rate / ref_rate >= PYTHON_CACHE_ONLY_FLOOR, (
        f"{policy}: compiled {fast_rate / 1e6:.2f} M requests/s is only {fast_rate / ref_rate:.1f}x the Python "
        f"loop ({ref_rate / 1e6:.3f} M requests/s); expected >= {PYTHON_CACHE_ONLY_FLOOR}x")


# ---------------------------------------------------------------------------------------------- curves
@pytest.mark.parametrize("policy", ["lru", "belady"])
def test_hit_ratio_curve_one_pass(benchmark, bench_trace, policy):
    """Every per-layer budget (top-k .. 32 slots) in one pass, against replaying each budget once (the time of
    one compiled replay times the number of budgets)."""
    trace = bench_trace
    df, curve_s = timed(benchmark, curves.hit_ratio_curve, (trace, policy, SCOPE), rounds=1, warmup_rounds=1)
    one_s, one = best_time(lambda: core.hit_counts(trace, policy, {}, SLOTS, SCOPE), rounds=1)
    assert int(df.hits[df.slots == SLOTS].iloc[0]) == one["hits"]
    per_budget_s = one_s * len(df)
    report(benchmark, policy=policy, budgets=len(df), curve_s=curve_s, per_budget_replays_s=per_budget_s,
           speedup=per_budget_s / curve_s)
    assert curve_s < per_budget_s, (f"{policy}: the one-pass curve ({curve_s:.2f} s) is slower than "
                                    f"{len(df)} compiled replays ({per_budget_s:.2f} s)")


# -------------------------------------------------------------------------------------- timed sim loop
def _strategy_cases() -> list[tuple[str, str, list[str]]]:
    """(case id, strategy, overrides): every strategy config of moesim/conf/strategy/ (presets with their
    prefetch and offload) in its own scope, and every cache policy in a global pool."""
    from importlib.resources import files

    names = sorted(p.name[:-5] for p in files("moesim.conf").joinpath("strategy").iterdir() if p.name.endswith(".yaml"))
    cases = []
    for name in names:
        extra = []
        if name == "mixtral_offloading_paper":  # the real trace has no recorded guesses: transition stands in
            extra = ["prefetch=transition"]
        cases.append((name, name, extra))
    for name in ("lru", "fifo", "lfu", "lfru", "belady", "static", "class_lru", "activation_aware"):
        cases.append((f"{name}-global", name, ["scope=global"]))
    return cases


def _parts(strategy: str, overrides: list[str]):
    """(scope, make_policy, make_prefetcher, make_offload) of a composed run config."""
    from hydra.utils import instantiate

    from moesim.api import compose_run, resolve_strategy, run_scope

    cfg = resolve_strategy(compose_run("gpt-oss-like", strategy, overrides=overrides))
    st = cfg.strategy
    return (run_scope(cfg), lambda: instantiate(st.cache),
            (lambda: instantiate(st.prefetch)) if st.get("prefetch") else (lambda: None),
            (lambda: instantiate(st.offload)) if st.get("offload") else (lambda: None))


@pytest.mark.parametrize("case,strategy,overrides", _strategy_cases(), ids=[c[0] for c in _strategy_cases()])
def test_timed_sim_every_strategy(benchmark, bench_trace, case, strategy, overrides):
    """Layer-steps per second of the compiled timed replay (sim backend, hardware h200, 25% of the experts)
    for every strategy and preset, prefetch and offload included, on the whole trace keeping sums, not events
    (core.simulate(events=False), as plan's replays; goal TIMED_GOAL on one core; the policies' setup, e.g. a
    prefetch table, is timed apart), against the Python driver
    (moesim.engine.replay + SimBackend + Profiler) on the first REFERENCE_TOKENS tokens, where both must give
    the same counters and per-step latencies."""
    from moesim.backends.sim import SimBackend
    from moesim.cache import Cache
    from moesim.engine import replay, scratch_slots
    from moesim.hardware import Cost, load_hardware
    from moesim.profiler import Profiler

    trace = bench_trace
    scope, make_policy, make_prefetcher, make_offload = _parts(strategy, overrides)

    def compiled(tr, events=False):  # the whole trace keeps sums: layer_offload's 100 M copy rows took 6 GB
        return core.simulate(tr, tr.spec, SLOTS, scope, make_policy, make_prefetcher(), make_offload(), "h200",
                             events=events)

    head = trace.slice_tokens(0, REFERENCE_TOKENS)
    small = compiled(head, events=True)  # compiles or loads the kernels
    run, _ = timed(benchmark, compiled, (trace,), rounds=1)
    layer_steps = trace.n_steps * trace.n_layers
    loop_rate = layer_steps / run.seconds["loop"]

    def reference():
        cache = Cache(head.spec, SLOTS, scope, make_policy, head)
        backend, profiler = SimBackend("h200"), Profiler(head.n_layers)
        offload = make_offload()
        backend.setup(head.spec, SLOTS + scratch_slots(head.spec, cache.partitions[0].policy, offload), profiler)
        c = replay(head, cache, backend, make_prefetcher(), offload, Cost(load_hardware("h200"), head.spec))
        return c.to_dict(), profiler

    ref_s, (ref_counters, ref_profiler) = best_time(reference, rounds=1)
    ref_rate = head.n_steps * head.n_layers / ref_s
    if loop_rate / ref_rate < PYTHON_TIMED_FLOOR:
        # one 3-15 s round is at the mercy of the shared machine (CI once timed lfu's loop at 13.9 s, 3.1 s alone):
        # below the floor both sides are timed once more and the faster of each kept
        loop_rate = max(loop_rate, layer_steps / compiled(trace).seconds["loop"])
        ref_rate = max(ref_rate, head.n_steps * head.n_layers / best_time(reference, rounds=1)[0])
    assert small.counters == ref_counters
    np.testing.assert_array_equal(small.profiler.arrays()[0], ref_profiler.arrays()[0])  # step latencies
    report(benchmark, case=case, loop_layer_steps_per_s=loop_rate, meets_goal=loop_rate >= TIMED_GOAL,
           setup_s=run.seconds["setup"],
           loop_s=layer_steps / loop_rate, python_layer_steps_per_s=ref_rate, ratio=loop_rate / ref_rate,
           hit_rate=run.counters["hits"] / run.counters["requests"])
    assert loop_rate / ref_rate >= PYTHON_TIMED_FLOOR, (
        f"{case}: compiled {loop_rate:,.0f} layer-steps/s is only {loop_rate / ref_rate:.1f}x the Python driver "
        f"({ref_rate:,.0f} layer-steps/s); expected >= {PYTHON_TIMED_FLOOR}x")
