"""The planner: which strategy, and how much VRAM for experts, for this model on this machine. `python -m moesim plan`.

    python -m moesim plan model=gpt-oss-20b hardware=rtx-4090 [host=i9-13900k] [vram=12] [context=4096]
        [batch=1] [trace=...] [target=40] [strategies=[lru,fiddler,...]] [sizes=8] [jobs=2] [out=DIR]
        [ram=64 disk=nvme-pcie4 [disk_policy=lru]]   # a model larger than VRAM + RAM, read from disk
        [overrides=['model.experts_format=q4_k']]   # formats and any other run option, for every replay
    moesim.plan(model="gpt-oss-20b", hardware="rtx-4090", vram=12) -> Plan

What it does, in order:
  1. the machine: the GPU preset (or a calibrated profile) on `host`'s CPU and memory (hardware=<gpu>+<host>),
     with `vram` GiB usable (default: the card's);
  2. what fits: the whole model's VRAM plan (moesim/whole.py: non-expert weights, KV cache for `batch`
     sequences of `context` tokens, workspace, runtime reserve) leaves room for so many experts; a model larger
     than VRAM + `ram` is refused with the numbers, unless `disk` names a storage preset: then the experts
     live on disk and `ram` GiB of them in a host cache (`disk_policy`, moesim/disk.py) in every replay;
  3. the search: every strategy (default: every deployable preset and policy but layer_offload, whose budget
     is fixed by its definition) x `sizes` expert-cache sizes from top-k per layer up to all that fits
     (placements follow the size: llama_cpp_ncmoe's host layers are L - slots // E), each replayed by the
     compiled core with the whole model timed, keeping sums instead of events (core.simulate(events=False)),
     and the bound (Belady + oracle prefetch, 4 layers ahead) at each size; presets whose configuration is
     another's (lru and mixtral_offloading, lfru and vllm_lfru) replay once, and so do the demand caches (no
     prefetcher, no offload policy) at a size where every expert fits (none of them evicts there), and the
     per-layer ones at top-k slots per layer where every request names top-k experts (each evicts all the
     latest request did not name); a static split (ktransformers, llama_cpp_ncmoe) replays once per set of
     host layers (the other layers' experts all fit: nothing is evicted);
  4. the answer: a table ranked by tokens/s at the largest size, the recommendation, the least VRAM that
     reaches `target`, and the real system's settings for it where one exists; `out` gets plan.json and
     report.html (the frontier: tokens/s against VRAM, one line per strategy, the bound dashed).
Trace: `trace=` (any trace moesim reads), else the real trace shipped for the model (trace=gpt-oss-20b,
traces/README.md), else the synthetic preset fitted to it (moesim/synthetic.py).
"""
from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import MoesimError, NotApplicable

GIB = 2**30
BOUND = "belady + oracle"  # the bound the table compares with: Belady's eviction + perfect prefetch, 4 layers ahead
NOT_DEPLOYABLE = ("belady",)  # reads the future
# not searched by default: a baseline whose budget is part of its definition (two layers' experts, its yaml: "a
# larger budget keeps experts and is no longer this system"); strategies=[layer_offload,...] still runs it
FIXED_BUDGET = ("layer_offload",)
NEAR = 0.95  # "near the best": the least VRAM that keeps 95% of the best tokens/s


@dataclass
class Row:
    """One replay of the plan: a strategy at an expert-cache size."""

    strategy: str
    size: int  # the plan's expert-cache size (slots) this row stands for
    slots: int  # the slots it ran with: the size less its stream scratch, where it has one
    vram_gib: float | None = None  # the whole run's VRAM plan
    expert_gib: float | None = None  # the expert cache's part of it
    tokens_per_s: float | None = None  # decode tokens/s (all tokens/s where the trace has no decode)
    ttft_p50_ms: float | None = None
    mib_per_token: float | None = None  # PCIe host->device traffic
    host_hit_rate: float | None = None  # with a disk tier: device misses found in host memory
    disk_mib_per_token: float | None = None  # with a disk tier: bytes read from disk
    stall_share: float | None = None  # of a step's time, waiting for copies
    hit_rate: float | None = None
    scope: str | None = None
    bound: bool = False
    status: str = "ok"  # or "not applicable: ..." or "error: ..."
    seconds: float = 0.0


@dataclass
class Plan:
    """What `plan` found: every row, the recommendation and the settings that reproduce it."""

    model: str
    hardware: str
    trace: str
    vram_gib: float  # usable
    max_slots: int  # experts that fit beside the rest of the plan
    sizes: list[int]
    rows: list[Row]
    recommendation: dict | None  # strategy, slots, tokens/s, VRAM, bound ratio, settings
    target: float | None = None
    least_for_target: dict | None = None
    near_best: dict | None = None  # the least VRAM within NEAR of the best tokens/s
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    disk: dict | None = None  # with a disk tier: storage, host cache GiB, slots and policy

    def ranked(self, slots: int | None = None) -> list[Row]:
        """The deployable rows at size `slots` (default: the largest), fastest first."""
        slots = self.sizes[-1] if slots is None else slots
        ok = [r for r in self.rows if r.size == slots and not r.bound and r.status == "ok"]
        return sorted(ok, key=lambda r: -r.tokens_per_s)

    def bound_at(self, slots: int) -> float | None:
        return next((r.tokens_per_s for r in self.rows if r.bound and r.size == slots and r.status == "ok"), None)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["format"] = "moesim-plan"
        return d


def default_strategies() -> list[str]:
    """Every built-in strategy but the bounds and the fixed-budget baselines."""
    from .api import strategy_names

    return [s for s in strategy_names() if s not in NOT_DEPLOYABLE + FIXED_BUDGET]


def default_trace(model: str) -> str:
    """The real trace shipped for `model` (traces/, moesim.importers.SHIPPED), else the synthetic preset fitted to
    it (the first one named for it, batch-1 first)."""
    from .importers import SHIPPED, SHIPPED_DIR
    from .synthetic import PRESETS

    if model in SHIPPED and (SHIPPED_DIR / SHIPPED[model][0]).is_file():
        return model

    names = [n for n, (_, m) in PRESETS.items() if m == model]
    if not names:
        known = sorted({m for _, m in PRESETS.values()})
        raise MoesimError(f"plan: no trace of model {model!r} is known; give trace=PATH, or a model with a "
                          f"synthetic preset: {', '.join(known)}")
    return sorted(names, key=lambda n: ("batch" in n, n))[0]


def sizes_between(lo: int, hi: int, n: int, step: int) -> list[int]:
    """About `n` expert-cache sizes from `lo` to `hi` slots, spaced geometrically, multiples of `step`."""
    if hi <= lo:
        return [hi]
    raw = np.geomspace(lo, hi, max(n, 2))
    out = sorted({min(hi, max(lo, int(round(x / step)) * step)) for x in raw} | {lo, hi})
    return out


def plan(model: str | None = None, hardware: str = "rtx-4090", host: str | None = None, vram: float | None = None,
         ram: float | None = None, context: int | None = None, batch: int | None = None, trace=None,
         target: float | None = None, strategies=None, sizes: int = 8, overrides=(), progress: bool = False,
         jobs: int = 1, disk: str | None = None, disk_policy: str = "lru") -> Plan:
    """Plan a model on a machine (see the module docstring). Returns a Plan; raises MoesimError for bad input.
    `jobs`: replays run at once (processes; each replay is single-threaded). `disk`: a storage preset
    (moesim.disk.STORAGE) the model is read from when it is larger than VRAM + `ram` (then `ram` is needed)."""
    import dataclasses

    from .api import build, compose_run, load_trace, resolve_strategy, run_model, run_scope, trace_label
    from .core import encode
    from .api import vram_plan as run_plan
    from .engine import scratch_slots
    from .hardware import load_hardware
    from .whole import contexts, weight_bytes

    t0 = time.perf_counter()
    hw_name = f"{hardware}+{host}" if host else str(hardware)
    hw = load_hardware(hw_name)
    from .trace import Trace

    tr = trace if isinstance(trace, Trace) else load_trace(trace if trace is not None else
                                                            default_trace(_model_name(model)))
    if model is not None and _model_name(model) != tr.spec.name:
        raise MoesimError(f"plan: trace {trace_label(tr)} is of model {tr.spec.name}, not {model}")
    card = hw.vram_bytes
    usable = card if vram is None else _positive(vram, "vram") * GIB
    if usable > card:
        raise MoesimError(f"plan: vram={vram} GiB is more than {hw.name}'s {card / GIB:.1f} GiB")
    extra = [*overrides] + ([f"vram.context={int(context)}"] if context else []) + (
        [f"vram.batch={int(batch)}"] if batch else [])
    label = trace_label(tr)

    def config(name: str, scope: str | None = None):
        return resolve_strategy(compose_run(label, name, "auto", hw_name, overrides=extra + (
            [f"scope={scope}"] if scope else [])))

    replayers = _Replayers(tr, max(1, int(jobs)))  # started now: they import moesim and read the trace meanwhile
    try:
        cfg = config("lru", "global")
        real = run_model(cfg, tr.spec)  # the model as stored (formats applied)
        total = sum(weight_bytes(real).values())
        tier = None
        if disk is not None:
            from .disk import load_storage

            storage = load_storage(disk)
            if ram is None:
                raise MoesimError(f"plan: disk={disk} needs ram=<GiB of host memory for experts>")
            if total > usable + _positive(ram, "ram") * GIB:  # the experts live on disk, `ram` GiB of them in RAM
                tier = {"storage": storage.name, "ram_gib": float(ram), "policy": str(disk_policy),
                        "host_slots": int(float(ram) * GIB // real.bytes_per_expert)}
                extra += [f"disk.storage={storage.name}", f"disk.ram={float(ram)}GiB", f"disk.policy={disk_policy}"]
        if ram is not None and tier is None and total > usable + _positive(ram, "ram") * GIB:
            raise MoesimError(f"plan: {real.name} takes {total / GIB:.1f} GiB as stored, more than VRAM + RAM = "
                              f"{usable / GIB:.1f} + {ram:g} GiB: it does not fit this machine (try a smaller format: "
                              f"model.experts_format=q4_k)")
        small = dataclasses.replace(hw, vram_gib=usable / GIB)  # the plan of the usable VRAM
        try:
            rest, budget, _, _ = run_plan(cfg, real, small, contexts(tr, real.sliding_window))
        except MoesimError as e:
            raise MoesimError(f"plan: {e}") from None
        L, K = real.layers, real.top_k
        max_slots = budget.slots
        notes = []
        if tier is not None:
            notes.append(f"{real.name} takes {total / GIB:.1f} GiB, more than VRAM + RAM = {usable / GIB:.1f} + "
                         f"{tier['ram_gib']:g} GiB: every expert is read from {tier['storage']}, {tier['host_slots']} "
                         f"of them ({tier['ram_gib']:g} GiB) stay in RAM ({tier['policy']}; the bound's host cache: "
                         f"Belady over the host's own requests)")
        elif disk is not None:
            notes.append(f"{real.name} fits in VRAM + RAM: nothing is read from disk={disk}")
        lo = K * L if max_slots >= K * L else K
        if lo == K:
            notes.append(f"only {max_slots} experts fit, fewer than top-k x layers = {K * L}: every size runs in one "
                         f"pool")
        grid = sizes_between(lo, max_slots, sizes, L if lo == K * L else 1)
        names = list(strategies) if strategies else default_strategies()
        one_pool = lo == K  # too few slots for a layer's top-k in every layer: one pool for all
        configs, scratch, refuses, offloads = {}, {}, {}, {}  # composed once per strategy (each size sets its budget);
        for name in names:  # stream scratch slots, which come out of the same VRAM; whether its cache may refuse to
            configs[name] = config(name, "global" if one_pool else None)  # evict; its offload policy, built
            st = configs[name].strategy
            offloads[name] = build(st.offload, "offload") if st.get("offload") else None
            policy = build(st.cache, "strategy.cache")
            scratch[name] = scratch_slots(real, policy, offloads[name])
            refuses[name] = bool(getattr(policy, "refuses", False))
        configs[BOUND] = resolve_strategy(compose_run(label, "belady", "auto", hw_name, overrides=[
            *extra, "prefetch=oracle", "prefetch.lookahead=4", *(["scope=global"] if one_pool else []),
            *(["disk.policy=belady"] if tier else [])]))
        same = _same_runs(configs, names)  # presets that are another's configuration under a new name replay once
        for name, twin in same.items():
            if twin != name:
                notes.append(f"{name} runs the same cache, prefetch, offload and scope as {twin}: replayed once")
        # where every expert fits, a demand cache (no prefetcher, no offload policy) never evicts: each takes free slots
        # in the same order, so all of them give the same replay there, one of them replays it (tests/test_plan.py)
        full = [size for size in grid if size >= L * real.experts] if len(grid) > 1 else []
        demand = [n for n in names if same[n] == n and not configs[n].strategy.get("prefetch")
                  and not configs[n].strategy.get("offload")]
        demand.sort(key=lambda n: n != "lru")
        skip = {(n, size): demand[0] for n in demand[1:] for size in full}
        if full and len(demand) > 1:
            notes.append(f"at {', '.join(map(str, full))} slots every expert fits: the demand caches "
                         f"({', '.join(demand)}) evict nothing and give the same replay there: {demand[0]}'s")
        # at top-k slots per layer, where every request names top-k experts, a layer's partition holds just its latest
        # request: a miss finds as many unpinned residents as the request has misses, so every one of them is evicted
        # whatever the policy (one that may refuse aside), and the per-layer demand caches give the same replay. Kept
        # to grids with a third size, where each strategy still replays on its own (and says if it cannot run)
        forced = [n for n in demand if not refuses[n] and run_scope(configs[n]) == "per_layer"]
        widths = np.diff(encode(tr).ptr)  # experts each request names
        if (not one_pool and len(forced) > 1 and len(grid) > len(full) + 1 and grid[0] == K * L and len(widths)
                and widths.min() == widths.max() == K):
            skip.update({(n, grid[0]): forced[0] for n in forced[1:]})
            notes.append(f"at {grid[0]} slots each layer holds top-k = {K} experts and every request names {K}: the "
                         f"per-layer demand caches ({', '.join(forced)}) evict every expert the latest request did not "
                         f"name, whatever their policy, and give the same replay there: {forced[0]}'s")
        # a static split whose device layers' experts all fit replays the same at every size with the same host layers
        least = K if one_pool else K * L  # slots a replay needs at least
        moved = {}  # (name, size) -> the size whose replay it is
        for name in names:
            if same[name] != name or offloads[name] is None:
                continue
            first = {}
            for size in grid:
                if (name, size) in skip:
                    continue
                slots = min(size, max_slots - scratch[name])
                key = _placement(configs[name], tr, slots, offloads[name]) if slots >= least else None
                if key is not None and key in first:
                    moved[(name, size)] = first[key]
                elif key is not None:
                    first[key] = size
        for name in dict.fromkeys(n for n, _ in moved):
            to = {}
            for (n, size), at in moved.items():
                if n == name:
                    to.setdefault(at, []).append(size)
            notes.append(f"{name} keeps the same layers on the host, and evicts nothing else, at " + "; ".join(
                f"{', '.join(map(str, sizes))} slots as at {at}" for at, sizes in to.items()) + ": replayed once")
        # strategy-major: a strategy's learned prefetch table is built once for all sizes (moesim.core.parts)
        todo = [(name, size, min(size, max_slots - scratch.get(name, 0)), False) for name in names for size in grid
                if same[name] == name and (name, size) not in skip and (name, size) not in moved]
        todo += [(BOUND, size, size, True) for size in grid]
        rows = _run_all(tr, todo, configs, least, replayers, progress)
        replayers.close(wait=False)  # every replay is done
        rows += [_shared_row(rows, name, size, rep) for (name, size), rep in sorted(skip.items())]
        rows += [_moved_row(rows, name, size, at, min(size, max_slots - scratch[name]), configs[name], real, hw_name,
                            tr)
                 for (name, size), at in sorted(moved.items())]
        rows += [dataclasses.replace(r, strategy=name, seconds=0.0) for name, twin in same.items() if twin != name
                 for r in rows if r.strategy == twin and not r.bound]
        if max_slots == L * real.experts:
            notes.append(f"every expert fits in {usable / GIB:.1f} GiB beside the rest of the model: no offloading is "
                         f"needed at the largest size (the strategies differ only below it)")
        p = Plan(str(model or tr.spec.name), hw_name, label, usable / GIB, int(max_slots), grid, rows,
                 recommendation=None, target=target, notes=notes, disk=tier)
        best = p.ranked()
        if best:
            b = best[0]
            bound = p.bound_at(b.size)
            p.recommendation = {"strategy": b.strategy, "slots": b.slots, "tokens_per_s": b.tokens_per_s,
                                "vram_gib": b.vram_gib, "x_bound": b.tokens_per_s / bound if bound else None,
                                "settings": equivalent(b.strategy, b.slots, real), "host_hit_rate": b.host_hit_rate,
                                "disk_mib_per_token": b.disk_mib_per_token}
            near = [r for r in rows if not r.bound and r.status == "ok" and r.tokens_per_s >= NEAR * b.tokens_per_s]
            n = min(near, key=lambda r: (r.vram_gib, -r.tokens_per_s))
            p.near_best = {"strategy": n.strategy, "slots": n.slots, "tokens_per_s": n.tokens_per_s,
                           "vram_gib": n.vram_gib, "settings": equivalent(n.strategy, n.slots, real)}
        if target is not None:
            reach = [r for r in rows if not r.bound and r.status == "ok" and r.tokens_per_s >= target]
            if reach:
                r = min(reach, key=lambda r: (r.vram_gib, -r.tokens_per_s))
                p.least_for_target = {"strategy": r.strategy, "slots": r.slots, "vram_gib": r.vram_gib,
                                      "tokens_per_s": r.tokens_per_s, "settings": equivalent(r.strategy, r.slots, real)}
        p.seconds = time.perf_counter() - t0
        return p
    finally:
        replayers.close()


def _shared_row(rows: list, name: str, size: int, rep: str) -> Row:
    """Strategy `name` at `size`, where its replay is `rep`'s (every expert fits, or every eviction is forced):
    `rep`'s row there under its name, unless `name` failed at the other sizes (not applicable to this trace):
    then that status."""
    own = [r for r in rows if r.strategy == name and not r.bound]
    bad = next((r for r in own if r.status != "ok"), None)
    if bad is not None:
        return Row(name, size, size, status=bad.status)
    r = next(r for r in rows if r.strategy == rep and r.size == size and not r.bound)
    return dataclasses.replace(r, strategy=name, seconds=0.0)


def _placement(cfg, trace, slots: int, offload=None):
    """For a static split (llama.cpp's --n-cpu-moe, KTransformers' placement), without a prefetcher: the layers it
    keeps on the host at `slots` slots, where the other layers' experts all fit the cache (then none is ever
    evicted: each is loaded on its first use and stays, so the replay depends on these layers alone, not on the
    slots); else None. `offload`: cfg's offload policy, built already (else it is built here)."""
    from strategies import Context
    from strategies.static_split import StaticSplit

    from .api import build, run_scope

    st = cfg.strategy
    if not st.get("offload") or st.get("prefetch"):
        return None
    off = offload if offload is not None else build(st.offload, "offload")
    if not isinstance(off, StaticSplit):
        return None
    L, E = trace.n_layers, trace.spec.experts
    scope = run_scope(cfg)
    try:
        off.setup(Context(trace, trace.spec, tuple(range(L)), slots, scope))
    except MoesimError:
        return None  # its replay says why
    device = L - len(off.host)
    fits = slots >= device * E if scope == "global" else (device == 0 or slots // L >= E)
    return off.host if fits else None


def _moved_row(rows: list, name: str, size: int, at: int, slots: int, cfg, model, hardware: str, trace) -> Row:
    """Strategy `name` at `size` (`slots` slots), whose replay is its own at size `at` (_placement): that row
    with this size's VRAM plan."""
    import copy

    from .api import vram_plan
    from .hardware import load_hardware
    from .whole import contexts

    r = next(r for r in rows if r.strategy == name and r.size == at and not r.bound)
    if r.status != "ok":
        return dataclasses.replace(r, size=size, slots=slots, seconds=0.0)
    cfg = copy.deepcopy(cfg)
    cfg.budget = str(slots)
    plan_, _, _, _ = vram_plan(cfg, model, load_hardware(hardware), contexts(trace, model.sliding_window))
    d = plan_.to_dict()
    return dataclasses.replace(r, size=size, slots=slots, vram_gib=d.get("total", 0) / GIB,
                               expert_gib=d.get("experts", 0) / GIB, seconds=0.0)


def _same_runs(configs: dict, names: list) -> dict:
    """Each strategy -> the first of `names` whose run config is its own but for the strategy's name."""
    from omegaconf import OmegaConf

    first, same = {}, {}
    for name in names:
        d = OmegaConf.to_container(configs[name], resolve=True)
        d["strategy"].pop("name", None)
        same[name] = first.setdefault(json.dumps(d, sort_keys=True, default=str), name)
    return same


_WORK: dict = {}  # what each replay process holds: the trace, each strategy's run config, the least slots


def _init(work: dict) -> None:
    _WORK.update(work)


def _load(ref: dict) -> None:
    """A replay process's start: the trace from its file (see _Replayers)."""
    from .trace import load_trace

    tr = load_trace(ref["trace"])
    tr.path = Path(ref["path"]) if ref["path"] else None  # messages name the trace the user gave, not the copy
    _init(dict(tr=tr, configs={}, yaml={}))


def _ready() -> None:
    """A task that only starts a replay process (a pool spawns one per task submitted, up to its size)."""


def _task(group: list, least: int, configs: dict) -> list:
    """A replay process's task: its configs as YAML (parsed once per process and strategy), then _group."""
    from omegaconf import OmegaConf

    for name, text in configs.items():
        if _WORK["yaml"].get(name) != text:
            _WORK["configs"][name] = OmegaConf.create(text)
            _WORK["yaml"][name] = text
    _WORK["least"] = least
    return _group(group)


class _Replayers:
    """The replay processes of a plan with jobs > 1, spawned, not forked: a fork of a process whose thread pools
    (BLAS, numba, the importers') hold a lock can hang (a plan of the real trace did). They start as soon as the
    trace is known, so they import moesim and read it while the plan composes its configs (1.8 s of the real
    trace's plan); each task brings the configs it names. jobs=1, or a program read from standard input: none
    (the replays run in this process)."""

    def __init__(self, tr, jobs: int):
        self.pool, self._tmp = None, None
        if jobs > 1 and not _spawnable():
            print(f"plan: jobs={jobs} starts processes that import the calling program again, and it has no file "
                  f"to import (it was read from standard input): the replays run in this process", file=sys.stderr)
            jobs = 1
        self.jobs = jobs
        if jobs == 1:
            return
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import resource_tracker

        from .trace import save_trace

        # a worker that fails to start (a script that calls plan at its top level, imported again by each worker)
        # dies before it reads its arguments, and the parent, writing them into a pipe it holds open itself,
        # would wait forever once they pass the pipe's 64 KiB (the trace alone does). So the arguments are a
        # few KiB: the trace's file here, each task's configs as YAML. The resource tracker starts first: started
        # by the first spawn, it inherited that pipe too.
        resource_tracker.ensure_running()
        self._tmp = tempfile.TemporaryDirectory(prefix="moesim-plan-")
        path = Path(self._tmp.name) / "trace.moetrace.safetensors"
        save_trace(tr, path)
        self.pool = ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_load,
                                        initargs=({"trace": str(path), "path": str(tr.path) if tr.path else None},))
        for _ in range(jobs):  # a pool spawns its processes as tasks come
            self.pool.submit(_ready)

    def close(self, wait: bool = True) -> None:
        """Stop the processes: after every task is done they exit on their own (not waited for: 0.6 s of a plan
        of the real trace); after an error, any task still running ends first."""
        if self.pool is not None:
            self.pool.shutdown(wait=wait, cancel_futures=True)
            self.pool = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _run_all(tr, todo, configs: dict, least: int, replayers: _Replayers, progress: bool) -> list:
    """Every (name, size, slots, bound) of `todo` replayed; the rows in `todo`'s order, in `replayers`' processes
    (or this one). A strategy with a prefetcher or a learned policy runs all its sizes in one task (`_together`:
    the table is built once, the learned policy's hits decided at once) and those tasks start first (the
    longest); the others run a size per task, so the last to finish are short."""
    from omegaconf import OmegaConf

    together = {name: _together(cfg) for name, cfg in configs.items()}
    groups: dict = {}
    for i, job in enumerate(todo):
        groups.setdefault(job[0] if together[job[0]] else (job[0], job[1]), []).append((i, job))
    order = sorted(groups.values(), key=lambda g: (not together[g[0][1][0]], -len(g)))
    done: list = []
    if replayers.pool is not None:
        from concurrent.futures import as_completed
        from concurrent.futures.process import BrokenProcessPool

        yaml = {name: OmegaConf.to_yaml(cfg) for name, cfg in configs.items()}
        try:
            futures = [replayers.pool.submit(_task, g, least, {g[0][1][0]: yaml[g[0][1][0]]}) for g in order]
            for future in as_completed(futures):
                for row in future.result():
                    done.append(row)
                    _said(row[1], len(done), len(todo), progress)
        except BrokenProcessPool:
            raise MoesimError(
                f"plan: a replay process (jobs={replayers.jobs}) ended abruptly: out of memory, killed, or it could "
                f"not start. Each one imports the calling program again: in a script, call moesim.plan under "
                f"`if __name__ == \"__main__\":`; or give jobs=1") from None
    else:
        _init(dict(tr=tr, configs=configs, least=least))

        def one(row):
            done.append(row)
            _said(row[1], len(done), len(todo), progress)

        for g in order:
            _group(g, one)
    return [r for _, r in sorted(done, key=lambda x: x[0])]


def _together(cfg) -> bool:
    """Whether a strategy's sizes replay in one task, in one process: a prefetcher's table is built once there,
    and a learned policy's hits are decided for all of them at once (moesim.core.budgets_ahead)."""
    from . import core

    return bool(cfg.strategy.get("prefetch")) or (core.compiled_policy(cfg.strategy.cache) or ("",))[0] == "learned"


def _spawnable() -> bool:
    """Whether a spawned process can import this program's main module again (multiprocessing.spawn runs it by
    name or from its file): not where it came from standard input (`python -`: its file is '<stdin>'), where every
    worker would fail to start and the pool wait for them forever."""
    import os

    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None):
        return True
    path = getattr(main, "__file__", None)
    return path is None or os.path.isfile(path)


def _group(jobs: list, on_row=None) -> list:
    """The rows (index, Row) of one task's jobs; `on_row` is told each as it is done (jobs=1: progress per row)."""
    from . import core

    rows = []
    with core.budgets_ahead([job[2] for _, job in jobs]):  # the slots each replays with
        for i, job in jobs:
            rows.append((i, _job(job)))
            if on_row is not None:
                on_row(rows[-1])
    return rows


def _said(r, i: int, n: int, progress: bool) -> None:
    if progress:
        print(f"[{i}/{n}] {r.strategy} at {r.size} slots: "
              + (f"{r.tokens_per_s:.1f} tokens/s" if r.status == "ok" else r.status), file=sys.stderr)


def _job(job) -> Row:
    name, size, slots, is_bound = job
    w = _WORK
    if slots < w["least"]:
        return Row(name, size, slots, bound=is_bound, status="not applicable: its stream scratch leaves too few "
                   "slots at this size")
    return _one(w["tr"], w["configs"][name], name, size, slots, is_bound)


def _one(tr, cfg, name: str, size: int, slots: int, is_bound: bool) -> Row:
    """Replay the run config `cfg` of strategy `name` at `slots`, keeping sums, not events (the bound's config is
    Belady + oracle prefetch 4 layers ahead)."""
    import copy

    from .api import replay_config

    t = time.perf_counter()
    cfg = copy.deepcopy(cfg)
    cfg.budget = str(slots)
    try:
        s = replay_config(cfg, tr, events=False).summary
    except NotApplicable as e:
        return Row(name, size, slots, bound=is_bound, status=f"not applicable: {e}", seconds=time.perf_counter() - t)
    except MoesimError as e:
        return Row(name, size, slots, bound=is_bound, status=f"error: {e}", seconds=time.perf_counter() - t)
    split = s.get("step_ms_split") or {}
    step = sum(v for k, v in split.items() if k != "copies")  # copies are the stall's cause, not another part
    tps = s.get("decode_tokens_per_s") or s.get("tokens_per_s")
    plan_ = s.get("vram_plan") or {}
    ttft = s.get("ttft_ms") or {}
    d = s.get("disk") or {}
    return Row(name, size, slots, vram_gib=plan_.get("total", 0) / GIB, expert_gib=plan_.get("experts", 0) / GIB,
               host_hit_rate=d.get("host_hit_rate"), disk_mib_per_token=d.get("disk_mib_per_token"),
               tokens_per_s=float(tps), ttft_p50_ms=ttft.get("p50"),
               mib_per_token=s["bytes_h2d"] / max(s["tokens"], 1) / 2**20,
               stall_share=split.get("stall", 0.0) / step if step else None, hit_rate=s.get("hit_rate"),
               scope=s.get("scope"), bound=is_bound, seconds=time.perf_counter() - t)


def equivalent(strategy: str, slots: int, spec) -> str | None:
    """The real system's settings that reproduce `strategy` with `slots` expert slots, where one exists."""
    L, E, mib = spec.layers, spec.experts, slots * spec.bytes_per_expert / 2**20
    per_layer = slots // L
    if strategy == "llama_cpp_ncmoe":
        return f"llama-server -m MODEL.gguf -ngl 99 --n-cpu-moe {max(0, L - slots // E)}"
    if strategy == "llama_cpp_moe_cache":
        return f"llama-server -m MODEL.gguf -ngl 99 --cpu-moe --moe-cache-mib {int(mib)}  (experimental)"
    if strategy == "llama_cpp_moe_expert_cache":
        return (f"llama-server -m MODEL.gguf -ngl 99 --cpu-moe --moe-expert-cache {per_layer} "
                f"--moe-expert-cache-inserts 2  (open PR #27861, not merged)")
    if strategy == "llama_cpp_fork_moe_cache":
        return f"llama-server (github.com/leloch/llama.cpp) -m MODEL.gguf -ngl 99 --cpu-moe --moe-cache {int(mib)}"
    if strategy == "mixtral_offloading":
        return f"mixtral-offloading OffloadConfig: offload_per_layer={max(0, E - per_layer)}"
    if strategy == "ktransformers":
        return "ktransformers --optimize_config_path optimize_rules/DeepSeek-V3-Chat.yaml (routed experts on the CPU)"
    if strategy == "fiddler":
        return "python src/fiddler/infer.py --cpu-offload 1  (places as many popular experts as the GPU holds)"
    if strategy == "vllm_lfru":
        return f"vllm serve MODEL --moe-expert-cache-size {per_layer}  (open PR #37190, not merged)"
    return None  # moesim's own policies, and presets with no such knob


def _model_name(model) -> str:
    if model is None:
        raise MoesimError("plan: give model=<name> (e.g. gpt-oss-20b) or trace=<file>")
    from .models import MODEL_SPECS

    if str(model) not in MODEL_SPECS:
        raise MoesimError(f"plan: model={model!r}: expected one of {', '.join(sorted(MODEL_SPECS))}")
    return str(model)


def _positive(v, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise MoesimError(f"plan: {name}={v!r}: expected a number of GiB > 0")
    return float(v)


# ------------------------------------------------------------------------------------------- output
def table_lines(p: Plan) -> list[str]:
    """The ranked table at the largest size, as the terminal shows it."""
    slots = p.sizes[-1]
    bound = p.bound_at(slots)
    head = f"{'strategy':<28} {'VRAM GiB':>8} {'tokens/s':>9} {'TTFT ms':>8} {'MiB/token':>9} {'stall':>6} {'x bound':>7}"
    if p.disk:  # the disk tier: host hits and disk traffic per replay
        head += f" {'host hit':>8} {'disk MiB/tok':>12}"
    lines = [f"at {slots} expert slots (all that fits in {p.vram_gib:.1f} GiB):", head, "-" * len(head)]
    for r in p.ranked(slots):
        lines.append(f"{r.strategy:<28} {r.vram_gib:>8.2f} {r.tokens_per_s:>9.1f} "
                     f"{_f(r.ttft_p50_ms, '.0f'):>8} {r.mib_per_token:>9.0f} {_f(r.stall_share, '.0%'):>6} "
                     f"{_f(r.tokens_per_s / bound if bound else None, '.2f'):>7}"
                     + (f" {_f(r.host_hit_rate, '.3f'):>8} {_f(r.disk_mib_per_token, '.0f'):>12}" if p.disk else ""))
    if bound:
        lines.append(f"{BOUND + ' (bound)':<28} {'':>8} {bound:>9.1f}")
    for r in p.rows:
        if r.size == slots and r.status != "ok":
            lines.append(f"{r.strategy:<28} {r.status}")
    return lines


def answer_lines(p: Plan) -> list[str]:
    out = []
    rec = p.recommendation
    if rec:
        out.append(f"recommendation: {rec['strategy']} with {rec['slots']} expert slots: {rec['tokens_per_s']:.1f} "
                   f"tokens/s, {rec['vram_gib']:.2f} GiB of VRAM" + (f", {rec['x_bound']:.2f} of the bound"
                                                                      if rec.get("x_bound") else ""))
        out.append(f"  as the real system: {rec['settings']}" if rec["settings"] else
                   "  (moesim's own policy: no released system runs it)")
        if p.disk:
            d = p.disk
            out.append(f"  where the experts are: {rec['slots']} in VRAM, {d['host_slots']} in RAM ({d['ram_gib']:g} GiB, "
                       f"{d['policy']}: {_f(rec.get('host_hit_rate'), '.1%')} of the GPU's misses found there), all on "
                       f"{d['storage']} ({_f(rec.get('disk_mib_per_token'), '.0f')} MiB read per token)")
        n = p.near_best
        if n and n["vram_gib"] < rec["vram_gib"] - 1e-9:
            out.append(f"least VRAM within {1 - NEAR:.0%} of that: {n['vram_gib']:.2f} GiB with {n['strategy']} "
                       f"({n['slots']} slots, {n['tokens_per_s']:.1f} tokens/s)"
                       + (f"\n  as the real system: {n['settings']}" if n["settings"] else ""))
    if p.target is not None:
        t = p.least_for_target
        out.append(f"least VRAM for {p.target:g} tokens/s: " + (
            f"{t['vram_gib']:.2f} GiB with {t['strategy']} ({t['slots']} slots, {t['tokens_per_s']:.1f} tokens/s)"
            + (f"\n  as the real system: {t['settings']}" if t["settings"] else "")
            if t else f"not reached by any strategy at any size up to {p.vram_gib:.1f} GiB"))
    return out + [f"note: {n}" for n in p.notes]


def _f(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def frontier_png(p: Plan) -> str:
    """tokens/s against VRAM, one line per strategy, the bound dashed: a PNG data URI."""
    from .report.plots import BOUND_COLOR, _figure, _png

    with _figure(height=4.2, right=2.2) as fig:
        import matplotlib

        ax = fig.add_subplot()
        colors = matplotlib.colormaps["tab20"].colors  # 20 distinct colours; markers tell the 21st+ apart
        for i, name in enumerate(dict.fromkeys(r.strategy for r in p.rows)):
            pts = sorted((r.vram_gib, r.tokens_per_s) for r in p.rows if r.strategy == name and r.status == "ok")
            if not pts:
                continue
            x, y = zip(*pts)
            bound = name == BOUND
            ax.plot(x, y, "--" if bound else "-", marker="" if bound else ".o^sv"[i // 20 % 5],
                    color=BOUND_COLOR if bound else colors[i % 20],
                    label=f"{name} (bound)" if bound else name, linewidth=1.4 if bound else 1.0)
        ax.set_xlabel("VRAM used (GiB)")
        ax.set_ylabel("tokens/s")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        return _png(fig)


def write(p: Plan, out: Path) -> Path:
    """plan.json and report.html in `out` (written atomically); returns the report's path."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    from .files import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "plan.json", json.dumps(p.to_dict(), indent=1, default=str) + "\n")
    env = Environment(loader=PackageLoader("moesim", "report"), autoescape=select_autoescape(["html", "j2"]))
    html = env.get_template("plan.html.j2").render(
        p=p, table=table_lines(p), answer=answer_lines(p), figure=frontier_png(p), title=f"moesim plan: {p.model} on {p.hardware}",
        built={"version": _version()})
    return atomic_write_text(out / "report.html", html)


def _version() -> str:
    from . import __version__

    return __version__


def plan_command(cfg) -> int:
    """`python -m moesim plan ...`: search, print the ranked table and the answer, write plan.json and report.html."""
    from omegaconf import OmegaConf

    strategies = OmegaConf.to_container(cfg.strategies) if OmegaConf.is_config(cfg.strategies) else cfg.strategies
    if isinstance(strategies, str):
        strategies = None if strategies == "all" else [s for s in strategies.split(",") if s]
    extra = OmegaConf.to_container(cfg.overrides) if OmegaConf.is_config(cfg.overrides) else list(cfg.overrides or [])
    p = plan(cfg.model, cfg.hardware, cfg.host, cfg.vram, cfg.ram, cfg.context, cfg.batch, cfg.trace, cfg.target,
             strategies, int(cfg.sizes), overrides=[str(o) for o in extra], progress=bool(cfg.progress),
             jobs=int(cfg.jobs), disk=cfg.get("disk"), disk_policy=str(cfg.get("disk_policy", "lru")))
    print(f"plan: {p.model} on {p.hardware}, trace {p.trace}; {len(p.rows)} replays in {p.seconds:.1f} s; "
          f"sizes {', '.join(map(str, p.sizes))} slots")
    print("\n".join(table_lines(p)))
    print("\n".join(answer_lines(p)))
    out = Path(str(cfg.out)) if cfg.out else Path("reports") / "plans" / (
        f"{time.strftime('%Y%m%d-%H%M%S')}-{p.model}-{p.hardware}".replace("/", "_"))
    print(f"report: {write(p, out)}")
    return 0 if p.recommendation else 1


__all__ = ["Plan", "Row", "plan", "equivalent"]
