"""The compiled replay core (numba): every built-in cache policy, prefetcher and offload policy of strategies/,
written once against one cache state and the sim clocks, in one loop. `python -m moesim run` uses it for
every run whose parts are all built in (`fast=auto`): on the sim backend it runs the whole run; for the torch
backend it records its decisions and moesim.engine.play feeds them to the backend. Anything with a user's
Python part runs in the Python driver (moesim/engine.py), which calls the parts' hooks.

    from moesim import core
    core.hit_counts(trace, "lru", {}, n_slots=192, scope="per_layer")     # Counters.to_dict()
    run = core.simulate(trace, spec, 192, "global", make_policy, prefetcher, offload, "h200")
    run.counters, run.prefetch, run.profiler.metrics(), run.device_bytes
    with core.budgets_ahead([120, 240]): ...    # simulate decides a learned policy's hits at both in one pass

    python -m pytest tests/test_core.py              # identical to the Python driver + strategies/, every part
    python -m pytest tests/bench --benchmark-enable   # rates against the Python loop and libCacheSim

Modules: requests.py (the trace as flat request arrays), state.py (cache state and its data structures),
policies.py (the cache policies), clock.py (the sim's timelines), loop.py (the drivers), slots.py (the caches
of one partition per layer, and LRU's one pool, in their fastest form), parts.py (from policy objects to the
loop's arguments). The plain-Python policies of strategies/ are the reference: tests/test_core.py holds the
core to identical counters and identical profiler events.

A replay that keeps sums (events=False: plan's), with no prefetcher and no disk tier, whose offload policy (if
any) decides without the clocks, is run in two passes: what becomes of each request element is decided first
(a slot kernel of slots.py, the learned policy's pass over several budgets, or run_hits on the cache state),
then loop.time_hits times it. The same counters, steps and sums as run_sim's one pass (tests/test_core.py).
"""
from __future__ import annotations

import hashlib
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple


def _drop_stale_cache() -> None:
    """numba's on-disk cache checks only the source file of the cached function, not the modules it calls:
    after an edit of state.py, loop.py's cached kernels would still run the old state code. So the cache of
    this package is dropped whenever any of its sources changed (a hash of them is kept beside the cache)."""
    here = Path(__file__).parent
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(here.glob("*.py")))).hexdigest()
    cache = here / "__pycache__"
    stamp = cache / "core-sources.sha256"
    try:
        if stamp.read_text() == digest:
            return
    except OSError:
        pass
    try:
        cache.mkdir(exist_ok=True)
        for f in list(cache.glob("*.nbi")) + list(cache.glob("*.nbc")):
            f.unlink(missing_ok=True)
        stamp.write_text(digest)
    except OSError:  # a read-only install: numba then compiles in memory (it warns, once)
        pass


_drop_stale_cache()

import numpy as np  # noqa: E402

from ..errors import MoesimError  # noqa: E402
from ..profiler import Profiler  # noqa: E402
from . import loop  # noqa: E402
from .parts import CACHE, cache_state, class_path, offload_arrays, prefetch_table, uncovered  # noqa: E402
from .policies import LEARNED  # noqa: E402
from ..engine import scratch_slots  # noqa: E402
from .requests import encode, reset_steps  # noqa: E402
from .slots import clockless, slot_kernel  # noqa: E402
from .state import CAP, PART  # noqa: E402

# simulate decides a demand cache's hits before it times them, and hit_counts takes the slot kernels (slots.py);
# tests/test_core.py switches both off to compare with the cache state's replays (run_sim, run_hits)
DECIDE = True
# budgets_ahead: the budgets whose hits simulate decides together, and those decided and not taken yet
_AHEAD: tuple = ()
_DECIDED: dict = {}

__all__ = ["hit_counts", "hit_flags", "simulate", "budgets_ahead", "uncovered", "encode", "reset_steps", "SimRun",
           "Script"]


def reference_class(policy: str):
    """The plain-Python cache policy class of a compiled policy name (lru -> strategies.lru.LRU)."""
    import importlib

    for path, (name, _) in CACHE.items():
        if name == policy:
            module, cls = path.rsplit(".", 1)
            return getattr(importlib.import_module(module), cls)
    raise MoesimError(f"unknown compiled policy {policy!r}; compiled ones: "
                      f"{', '.join(n for n, _ in CACHE.values())}")


def compiled_policy(block) -> tuple[str, dict] | None:
    """(policy, params) for a strategy's `cache` config block (a mapping with `_target_`) naming a built-in
    class, e.g. {"_target_": "strategies.lfu.LFU", "decay": 0.5} -> ("lfu", {"decay": 0.5}); else None."""
    target = str(block.get("_target_", "")) if hasattr(block, "get") else ""
    if target not in CACHE:
        return None
    return CACHE[target][0], {str(k): (v if not hasattr(v, "items") else dict(v))
                              for k, v in block.items() if k != "_target_"}


def kernel_error(status: int, req, slots_per_partition: int, pos: int) -> MoesimError:
    """The error of a kernel that stopped with `status` at request position `pos`."""
    s, layer = divmod(int(pos), req.n_layers)
    n = int(req.ptr[pos + 1] - req.ptr[pos])
    if status == loop.LFU_OVERFLOW:
        return MoesimError(f"lfu: the aging factor decay**-(epochs) overflows a float at step {s}, layer {layer} "
                           f"(strategies/lfu.py raises OverflowError here too: after a reset, epoch0 restarts "
                           f"at 0); use a decay closer to 1, a longer decay_every, or reset_per_seq=false")
    return MoesimError(f"step {s}, layer {layer} requests {n} distinct experts but its cache partition holds "
                       f"{slots_per_partition} slots: a layer's experts are pinned while it computes, so every "
                       f"request must fit; raise the budget")


def _error(status, req, st, pos):
    return kernel_error(status, req, int(st.I[CAP, st.I[PART, int(pos) % req.n_layers]]), pos)


def counters(cnt: np.ndarray) -> dict:
    """moesim.cache.Counters.to_dict() from the loop's counter array."""
    c = [int(x) for x in cnt]
    return {"requests": c[loop.REQUESTS], "hits": c[loop.HITS], "misses": c[loop.REQUESTS] - c[loop.HITS],
            "loads": c[loop.LOADS_N], "prefetch_loads": c[loop.PF_LOADS], "evictions": c[loop.EVICTIONS],
            "host_computes": c[loop.HOST_COMPUTES], "streams": c[loop.STREAMS]}


class PrefetchOutcome(NamedTuple):
    """What became of prefetched loads (moesim.cache.PrefetchCounters' numbers)."""

    used: int
    wasted: int
    unused_at_end: int


@contextmanager
def compile_notice(kernel, after_s: float = 1.5):
    """Around the first call of `kernel` in this process, a call of no steps (the callers make it so): if it has
    not returned after `after_s` seconds (numba is compiling it: ~20 s on a 2-core machine, once per install and
    kind of input; later runs load it from __pycache__), say so on stderr, so that a first run does not look
    hung."""
    if kernel.signatures:  # compiled or loaded already in this process
        yield
        return
    timer = threading.Timer(after_s, lambda: print(
        "moesim: compiling the replay loop (numba, once; later runs load it from the cache) ...",
        file=sys.stderr, flush=True))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _policy_factory(policy: str, params: dict | None):
    cls = reference_class(policy)
    cls(**(params or {}))  # validates params as the reference does, before anything runs
    return lambda: cls(**(params or {}))


def hit_counts(trace, policy: str, params: dict | None, n_slots: int, scope: str = "per_layer",
               reset_per_seq: bool = False) -> dict:
    """Cache-only replay, compiled: the counters moesim.engine.hit_counts gives for the reference policy
    `policy` built from `params`, with `n_slots` slots in `scope` (as Counters.to_dict())."""
    make = _policy_factory(policy, params)
    resets = reset_steps(trace, reset_per_seq)
    req = encode(trace)
    cap = n_slots // req.n_layers
    if DECIDE and policy in ("lru", "fifo") and scope == "per_layer" and 0 < req.width <= cap:
        # their slot kernels need no cache state: not built (a short trace's replay had taken twice as long)
        from .slots import no_offload, slots_fifo, slots_lru

        found = (slots_fifo, ()) if policy == "fifo" else (slots_lru, (no_offload(req.n_layers, req.n_experts),))
        return counters(_slot_run(*found, req, cap, resets, np.zeros(0, np.uint8))[0])  # no flags: counts only
    return counters(_hits(trace, make, n_slots, scope, resets, None))


def hit_flags(trace, policy: str, params: dict | None, n_slots: int, scope: str = "per_layer",
              reset_per_seq: bool = False) -> np.ndarray:
    """uint8 [N]: 1 where element i of `encode(trace).ids` was a hit in the compiled replay (the order of a
    request's hits and misses, e.g. to feed another simulator hits first)."""
    flags = np.zeros(len(encode(trace).ids), np.uint8)
    _hits(trace, _policy_factory(policy, params), n_slots, scope, reset_steps(trace, reset_per_seq), flags)
    return flags


def _hits(trace, make_policy, n_slots, scope, resets, flags) -> np.ndarray:
    st, prm = cache_state(trace, trace.spec, n_slots, scope, make_policy)
    loop.reset(st.I, st.F, prm)
    return _decide(st, prm, encode(trace), n_slots, scope, resets, flags)[0]


def _decide(st, prm, req, n_slots, scope, resets, flags, offload=None, prefetch=None) -> tuple | None:
    """(counters (loop's cnt), prefetches) of the replay from the state `st` (reset) that decides, without the
    clocks, what becomes of each element (`flags`: uint8 [N], or None; see loop.time_hits): by a slot kernel
    where one decides this cache (moesim/core/slots.py: no request wider than a partition), else by run_hits on
    the state. prefetches: (keys in order, count up to each request position), or empty arrays. With an offload
    policy or a prefetcher (`offload`, `prefetch`: see slots.slot_kernel), None where no slot kernel takes it."""
    cnt = np.zeros(loop.N_CNT, np.int64)
    none = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    cap = n_slots // req.n_layers if scope == "per_layer" else int(st.I[CAP, 0])
    found = slot_kernel(st, prm, scope, offload, prefetch) if DECIDE and 0 < req.width <= cap else None
    if found is not None:
        return _slot_run(*found, req, cap, resets, flags)
    if offload is not None or prefetch is not None:
        return None
    args = [st.I, st.F, st.nxt, st.seqs, prm, req.ids, req.ptr, resets,
            np.zeros(0, np.uint8) if flags is None else flags, cnt]
    with compile_notice(loop.run_hits):
        loop.run_hits(*args[:7], resets[:0], *args[8:])
    status, where = loop.run_hits(*args)
    if status < 0:
        raise _error(status, req, st, where)
    return cnt, none


def _slot_run(kernel, extra, req, cap, resets, flags) -> tuple:
    """(counters, prefetches) of a slot kernel's replay (see _decide)."""
    cnt = np.zeros(loop.N_CNT, np.int64)
    f = np.zeros(len(req.ids), np.uint8) if flags is None else flags
    args = [req.ids, req.ptr, req.n_layers, req.n_experts, cap, resets, f, cnt, *extra]
    with compile_notice(kernel):  # around a call of no steps: compiling or loading, not replaying
        kernel(*args[:5], resets[:0], *args[6:])
    out = kernel(*args)
    if out[0] < 0:
        raise kernel_error(out[0], req, cap, out[1])
    return cnt, (out[2:] if len(out) > 2 else (np.zeros(0, np.int64), np.zeros(0, np.int64)))


@contextmanager
def budgets_ahead(budgets):
    """Within it, `simulate` of the learned policy per layer with demand misses only, keeping sums (what plan
    replays), decides the hits of every budget (n_slots) in `budgets` at its first call for one of them, in one
    pass (loop.run_hits_budgets: the policy's history and its network's outputs are the trace's, computed once
    for all budgets instead of once per budget), and each call times its budget's (run_sim's `pre`). The same
    counters, steps and sums as a replay on its own (tests/test_core.py)."""
    global _AHEAD
    _AHEAD = tuple(int(b) for b in budgets)
    _DECIDED.clear()
    try:
        yield
    finally:
        _AHEAD = ()
        _DECIDED.clear()


def _decided(trace, spec, n_slots, make_policy, resets, reset_per_seq):
    """(hit flags, cache counters) of budget n_slots from budgets_ahead's pass, or None where it cannot run."""
    obj = make_policy()
    key = (id(trace), class_path(obj), repr(sorted(vars(obj).items())), bool(reset_per_seq))
    if (key, n_slots) not in _DECIDED:
        req = encode(trace)
        L = req.n_layers
        budgets = [b for b in dict.fromkeys(_AHEAD) if b // L >= max(req.width, 1)]  # no waves
        if n_slots not in budgets:
            return None
        st, prm = cache_state(trace, spec, budgets[0], "per_layer", make_policy, copies=[b // L for b in budgets])
        loop.reset(st.I, st.F, prm)
        flags = np.zeros((len(budgets), len(req.ids)), np.uint8)
        cnt = np.zeros((len(budgets), loop.N_CNT), np.int64)
        with compile_notice(loop.run_hits_budgets):
            loop.run_hits_budgets(st.I, st.F, st.seqs, prm, req.ids, req.ptr, resets[:0], flags, cnt)
        status, _, _ = loop.run_hits_budgets(st.I, st.F, st.seqs, prm, req.ids, req.ptr, resets, flags, cnt)
        if status < 0:  # the replay on its own says what went wrong
            return None
        for k, b in enumerate(budgets):
            _DECIDED[(key, b)] = (flags[k], cnt[k], trace)
    flags, decided, _ = _DECIDED.pop((key, n_slots))
    return flags, decided


class ArrayProfiler(Profiler):
    """A moesim.profiler.Profiler whose events come as finished arrays (rows as `Profiler.arrays()` returns
    them), so its metrics, tables and timeline are computed by the Profiler's own code."""

    def __init__(self, n_layers: int, steps: np.ndarray, copies: np.ndarray, computes: np.ndarray,
                 totals: dict | None = None):
        super().__init__(n_layers)
        self._event_arrays = (steps, copies, computes)
        self.totals = totals  # a replay that kept sums, not events (simulate(events=False)): see metrics()

    def metrics(self) -> dict:
        """The Profiler's metrics; for a replay without events, those its sums give (the busy times' unions and
        the overlap, which need every interval, are None; the copy engine's busy time is loads x one copy's,
        as copies queue on it one after another)."""
        if self.totals is None:
            return super().metrics()
        t = self.totals
        m = super().metrics()  # of the steps alone: no copies or computes
        busy = t["loads"] * t["copy_ms"]
        return m | {"stall_ms": t["stall_ms"], "stall_ms_per_layer": list(t["stall_ms_per_layer"]),
                    "loads": t["loads"], "prefetch_loads": t["prefetch_loads"], "bytes_h2d": t["bytes_h2d"],
                    "prefetch_bytes_h2d": t["prefetch_loads"] * t["bytes_per_load"], "h2d_busy_ms": busy,
                    "h2d_gbps": t["bytes_h2d"] / (busy * 1e6) if busy > 0 else None,
                    "compute_busy_ms": None, "host_compute_ms": t["host_compute_ms"], "overlap": None}

    def _no_events(self, what: str):
        if self.totals is not None:
            raise MoesimError(f"{what}: this replay kept sums, not events (core.simulate(events=False))")

    def steps_table(self):
        self._no_events("steps_table")
        return super().steps_table()

    def layers_table(self):
        self._no_events("layers_table")
        return super().layers_table()

    def timeline(self, *args, **kwargs):
        self._no_events("timeline")
        return super().timeline(*args, **kwargs)

    def arrays(self):
        return self._event_arrays

    @property
    def n_steps(self) -> int:
        return len(self._event_arrays[0])


class Script(NamedTuple):
    """A replay's decisions in the order a backend is told them (moesim.engine.play feeds them to one):
    before wave v computes, copies[:waves[v, 1]] have been issued; wave v computes layer waves[v, 0] with the
    experts served[waves[v - 1, 2]:waves[v, 2]]; step s ends after wave step_waves[s] - 1."""

    copies: np.ndarray  # int64 [C, 4]: layer, expert, slot, prefetch (0/1)
    waves: np.ndarray  # int64 [V, 3]: layer, copies issued before it, end of its rows in `served`
    served: np.ndarray  # int64 [R, 4]: key id (layer * E + expert), slot, tokens, on the host (0/1)
    step_waves: np.ndarray  # int64 [S]


class SimRun(NamedTuple):
    """What `simulate` returns: what a run reads from the cache, backend and profiler of the Python driver."""

    counters: dict  # Counters.to_dict()
    prefetch: PrefetchOutcome
    profiler: ArrayProfiler  # metrics(), steps_table(), layers_table(), timeline() as the Profiler gives them
    device_bytes: int  # SimBackend.device_bytes()
    request_stats: dict  # SimBackend.request_stats()
    seconds: dict  # wall time of "setup" (policies' setup, tables, state) and of the compiled "loop"
    script: Script | None = None  # with record=True: the decisions, for another backend (moesim.engine.play)
    disk: dict | None = None  # with a disk tier: its host cache's requests and hits, disk reads, reads not kept,
    #                           the disk's busy ms (moesim.disk.DiskTier.counts)


def simulate(trace, spec, n_slots: int, scope: str, make_policy, prefetcher=None, offload=None, hardware="h200",
             reset_per_seq: bool = False, pinned: bool = True, record: bool = False, cost=None, dense=None,
             events: bool = True, disk=None) -> SimRun:
    """The timed replay, compiled: moesim.engine.replay(trace, Cache(spec, n_slots, scope, make_policy),
    SimBackend(hardware, pinned) set up with `spec`, prefetcher, offload, Cost(hardware, spec)) with every part
    built in (see `uncovered`). `spec` is the stored model (a scaled or re-typed spec changes times and bytes,
    not decisions). The same counters and the same events (hence latencies, stalls, metrics, tables).
    `cost`: what the offload policy is asked with (default moesim.hardware.Cost(hardware, spec)).
    `record`: also keep the decisions as a Script, to run them on another backend (moesim.engine.play); they
    are the Python driver's there too where none depends on that backend's clock (no max_inflight cap).
    `dense`: the model's non-expert part per step (moesim.whole.DenseTimes), as SimBackend.dense; None: none.
    `events=False`: keep sums instead of every copy and compute (the profiler's `totals`; its metrics, not its
    tables or timeline): the same steps, counters and sums, faster and in less memory (plan's many replays).
    `disk`: the disk tier (moesim.disk.DiskTier: its host cache's policy and slots, its storage), as the Python
    driver runs it."""
    from ..backends.sim import SimBackend
    from ..hardware import Cost

    t0 = time.perf_counter()
    backend = SimBackend(hardware, pinned=pinned)
    hw = backend.hardware
    req = encode(trace)
    nbytes = spec.bytes_per_expert
    st, prm = cache_state(trace, spec, n_slots, scope, make_policy, prefetcher is not None)
    pf, pf_rows, pf_cap = prefetch_table(trace, prefetcher, n_slots, scope, nbytes)
    counts = req.token_counts()
    max_count = 1 if req.counts is None else int(counts.max()) if len(counts) else 1  # 1: the ones
    offl = offload_arrays(trace, offload, n_slots, scope, cost if cost is not None else Cost(hw, spec), max_count,
                          nbytes)
    offl[0][5] = scratch_slots(trace.spec, make_policy(), offload)  # as the Python driver's
    device_ms = np.array([hw.expert_ms(n, spec, "device") for n in range(max_count + 1)])  # per token count
    host_ms = np.array([hw.expert_ms(n, spec, "host") for n in range(max_count + 1)]) if offload is not None \
        else np.zeros(max_count + 1)
    max_step = int(req.step_tokens.max()) if len(req.step_tokens) else 1
    act_ms = np.array([hw.activations_ms(n, spec) for n in range(max_step + 1)]) if offload is not None \
        else np.zeros(1)
    tokens, inverse = np.unique(req.step_tokens, return_inverse=True)
    shared_ms = np.array([spec.shared_experts * hw.expert_ms(int(n), spec, "device", shared=True)
                          for n in tokens])[inverse.reshape(-1)]  # per step
    own = np.array([hw.replay_overhead_ms(0, 0), hw.expert_overhead_us * 1e-3, hw.load_overhead_us * 1e-3,
                    hw.writeback_ms(nbytes)])  # as SimBackend.setup
    if dense is None:
        from ..whole import DenseTimes

        dense = DenseTimes.none(trace.n_steps, trace.n_layers)
    loop.reset(st.I, st.F, prm)
    cnt = np.zeros(loop.N_CNT, np.int64)
    served = np.zeros(2, np.int64)
    from .clock import new_clock

    ck = new_clock()
    agg = np.zeros(0 if events else loop.AGG + trace.n_layers)
    if disk is not None:  # the host cache as moesim.disk.DiskTier builds it: one pool; Belady reads key positions
        dst, dprm = cache_state(trace, spec, disk.n_slots, "global", disk.make_policy, True)
        loop.reset(dst.I, dst.F, dprm)
        hready = np.zeros(trace.n_layers * trace.spec.experts)
        from ..disk import disk_queue

        dq = disk_queue(disk.storage, nbytes)
    else:
        dst, dprm, hready, dq = st, prm, np.zeros(0), np.array([-1.0])  # no disk: dq[0] < 0
    dcnt = np.zeros(loop.N_CNT, np.int64)
    resets = reset_steps(trace, reset_per_seq)
    t1 = time.perf_counter()  # the loop's time from here: deciding first is part of it
    pre, decided = np.zeros(0, np.uint8), None  # decided: the counters of a replay decided before it is timed
    prefetched = (np.zeros(0, np.int64), np.zeros(0, np.int64))  # its prefetches: keys, count up to each position
    if (DECIDE and not events and not record and pf_cap < 0 and disk is None
            and (offload is None or clockless(offl[0], offl[8])) and 0 < req.width <= st.I[CAP, :prm.P].min()):
        # keeping sums, no cap on the bytes in flight (a prefetcher's or an offload policy's), no disk tier, no
        # request wider than a partition: what becomes of each element does not depend on the clocks, so it is
        # decided first (a slot kernel, the learned policy's pass over several budgets, or the cache-only replay)
        # and time_hits times it
        if (offload is None and prefetcher is None and prm.code == LEARNED and n_slots in _AHEAD
                and scope == "per_layer"):
            pre, decided = _decided(trace, spec, n_slots, make_policy, resets, reset_per_seq) or (pre, None)
        if decided is None:
            pre = np.zeros(len(req.ids), np.uint8)
            got = _decide(st, prm, req, n_slots, scope, resets, pre,
                          None if offload is None else (*offl[:8], counts, req.step_tokens),
                          None if prefetcher is None else (pf, pf_rows, bool(getattr(prefetcher, "flat", False))))
            if got is not None:
                decided, prefetched = got
    copy_ms = hw.copy_ms(nbytes, pinned)
    if decided is not None:  # hits decided, no request wider than its partition: timed with the clocks alone
        args = [pre, req.ids, req.ptr, req.n_experts, counts, req.step_tokens, shared_ms, device_ms, host_ms, act_ms,
                copy_ms, own, bool(hw.serial_copies), bool(offl[0][4]), dense.attention, dense.cls, dense.head,
                dense.tail, served, ck, agg, *prefetched]
        with compile_notice(loop.time_hits):  # a call of no steps
            loop.time_hits(*args[:5], args[5][:0], *args[6:])
        steps = loop.time_hits(*args)
        cnt[:] = decided
        status, where, copies, computes = 0, 0, np.empty((0, 7)), np.empty((0, 5))
        waves = served_rows = step_waves = None  # record: never with decided hits
    else:
        args = [st.I, st.F, st.nxt, st.seqs, st.kpos, st.koff, prm, req.ids, counts, req.ptr,
                resets, req.step_tokens, shared_ms, device_ms, host_ms, act_ms, copy_ms, own,
                bool(hw.serial_copies), nbytes, n_slots, pf, pf_rows, pf_cap, bool(getattr(prefetcher, "flat", False)),
                *offl, cnt, served, ck, record, dense.attention, dense.cls, dense.head, dense.tail, agg, dst.I, dst.F,
                dst.seqs, dst.kpos, dst.koff, dprm, dcnt, hready, dq]
        # the notice times a call of no steps (resets[:0]): compiling or loading the kernel, not a long replay
        # (a 2.4 s replay of the real trace had said "compiling" on every first call of a process)
        with compile_notice(loop.run_sim):
            loop.run_sim(*args[:10], args[10][:0], *args[11:])
        status, where, steps, copies, computes, waves, served_rows, step_waves = loop.run_sim(*args)
    t2 = time.perf_counter()
    if status < 0:
        raise _error(status, req, st, where)
    totals = None
    if not events:
        n_loads = int(steps[-1, 4]) if len(steps) else 0
        totals = {"loads": n_loads, "prefetch_loads": int(cnt[loop.PF_LOADS]), "bytes_per_load": nbytes,
                  "bytes_h2d": n_loads * nbytes, "copy_ms": copy_ms,
                  "stall_ms": float(agg[loop.AGG_STALL]), "device_compute_ms": float(agg[loop.AGG_DEVICE]),
                  "host_compute_ms": float(agg[loop.AGG_HOST]), "stall_ms_per_layer": agg[loop.AGG:].tolist()}
    profiler = ArrayProfiler(trace.n_layers, steps, np.ascontiguousarray(copies[:, :6]), computes, totals)
    backend.dense = dense
    backend.setup(spec, n_slots + int(offl[0][5]), profiler)  # only for device_bytes(): the events are there
    script = None
    if record:
        script = Script(copies[:, [0, 1, 6, 5]].astype(np.int64), waves, served_rows, step_waves)
    from .loop import PF_UNUSED, PF_USED, PF_WASTED

    disk_counts = None
    if disk is not None:
        from .clock import DISK_BUSY

        req, hits = int(dcnt[loop.REQUESTS]), int(dcnt[loop.HITS])
        disk_counts = {"requests": req, "hits": hits, "reads": req - hits, "unkept": int(dcnt[loop.STREAMS]),
                       "busy_ms": float(ck[DISK_BUSY])}
    return SimRun(counters(cnt), PrefetchOutcome(int(cnt[PF_USED]), int(cnt[PF_WASTED]), int(cnt[PF_UNUSED])),
                  profiler, backend.device_bytes(),
                  {"stall_free_requests": int(served[0]), "late_prefetches": int(served[1])},
                  {"setup": t1 - t0, "loop": t2 - t1}, script, disk_counts)
