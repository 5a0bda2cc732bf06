"""moesim as a library: replay a trace through a strategy from Python, and the `run` command over the same code.

    import moesim
    r = moesim.simulate("gpt-oss-like", strategy="lfu", budget="25%", scope="global",
                        overrides=["strategy.cache.decay=0.5"])
    r.summary["tokens_per_s"], r.steps, r.layers      # summary dict; per-step and per-layer DataFrames
    r.report("reports/runs/mine")                      # results directory + report.html, as `moesim run` writes
    moesim.sweep("gpt-oss-like", strategies=["lru", "lfu"], budgets=["12.5%", "25%"])   # one row per run

Options resolve exactly as on the command line: `simulate` composes moesim/conf/run.yaml with Hydra from
keyword arguments (top-level run options: scope=, prefetch=, offload=, reset_per_seq=, fast=, model=...) and
`overrides=` (dotted Hydra overrides for anything deeper). `python -m moesim run` (run_command) composes the
same file from the command line and calls the same `replay_config`.
"""
from __future__ import annotations

import functools
import os
import re
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .cache import Counters
from .engine import drive, play, scratch_slots
from .errors import MoesimError
from .trace import Trace
from .units import parse_budget

# run.yaml keys given as simulate()'s own parameters, not as keyword options
_OWN = ("trace", "strategy", "budget", "hardware", "backend")
_CHOICES = ("prefetch", "offload")  # option groups whose default is no choice: None keeps the strategy's own
TIMELINE_AUTO_STEPS = 5000  # timeline=auto writes timeline.json for runs of at most this many steps
_PLAIN = re.compile(r"[A-Za-z0-9_./%+@-]+")  # a value Hydra reads unquoted exactly as the CLI would pass it


# ------------------------------------------------------------------------------------------- the library
def simulate(trace, strategy="lru", budget="25%", hardware="rtx-4090", backend="sim", *, overrides=(),
             **options) -> Result:
    """Replay `trace` through `strategy` with a device budget on a hardware profile; returns a Result.

        moesim.simulate("gpt-oss-like", strategy="lru", budget="25%", scope="global")

    trace: anything `trace=` takes (a .moetrace.safetensors file, a foreign trace, a synthetic preset name
        such as "gpt-oss-like") or a moesim.trace.Trace already loaded (moesim.load_trace).
    strategy: a built-in name (lru, lfu, fiddler, moe_infinity, ...; moesim/conf/strategy/), a strategy
        .yaml file like moesim/conf/strategy/lru.yaml, or that config as a dict (name, cache, prefetch, offload).
    budget: slots (192), a share of all experts ("25%") or bytes ("4GiB"). hardware: a preset or a profile
        written by `calibrate`. backend: "sim" or "torch".
    **options: the other top-level run options of moesim/conf/run.yaml: scope="global", prefetch="transition",
        offload="host", reset_per_seq=True, fast=False, progress=True, model={"scale": 0.125}, ...
    overrides: dotted Hydra overrides for anything deeper, as on the command line:
        ["strategy.cache.decay=0.5", "prefetch.lookahead=2"].
    Progress is off unless progress=True. Raises MoesimError naming a bad option or value."""
    cfg = compose_run(trace_label(trace), strategy, budget, hardware, backend, overrides, options)
    return replay_config(cfg, trace if isinstance(trace, Trace) else None)


def load_trace(path_or_preset) -> Trace:
    """The Trace that `trace=` names (a .moetrace.safetensors file, a foreign trace file or directory, converted
    once and cached under traces/cache/, or a synthetic preset name), to replay several times:
    `t = moesim.load_trace("gpt-oss-like"); moesim.simulate(t, strategy="lru")`."""
    from .importers import open_trace

    return open_trace(str(path_or_preset))  # a Path's str is its file system path


def sweep(trace, strategies=("lru",), budgets=("25%",), hardware=("rtx-4090",), backend="sim", *, out=None,
          overrides=(), **options):
    """A grid of runs, every strategy x budget x hardware profile, as a pandas DataFrame with one row per run
    and the columns of the sweep command's results.parquet (moesim.report.tables.comparison_table).

        moesim.sweep("gpt-oss-like", strategies=["lru", "lfu"], budgets=["12.5%", "25%"], scope="global")

    Each list also takes one value. `overrides` and `**options` apply to every run, as in `simulate`;
    progress=False hides the sweep's progress bar (on stderr, shown on a terminal). `out=DIR` also writes each
    run's results directory (DIR/<swept key=value,...>, as the sweep command names them) and DIR/results.parquet
    and DIR/report.html; the returned table is then that results.parquet. Every run is composed before the
    first one starts, so a bad option fails at once."""
    import pandas as pd
    from .progress import progress as bar

    from .report.tables import comparison_table
    from .sweep import cell_name, write_sweep_results

    progress = bool(options.pop("progress", True))  # the sweep's bar; each run's own bar stays off
    grid = {"strategy": _listed(strategies, "strategies"), "budget": _listed(budgets, "budgets"),
            "hardware": _listed(hardware, "hardware")}
    swept = [k for k, v in grid.items() if len(v) > 1]
    opened = trace if isinstance(trace, Trace) else load_trace(trace)  # read once for every run
    label = trace_label(trace)
    cells = []
    for s in grid["strategy"]:
        for b in grid["budget"]:
            for h in grid["hardware"]:
                name = cell_name([f"strategy={_strategy_label(s)}", f"budget={b}", f"hardware={h}"], swept)
                cells.append((name, compose_run(label, s, b, h, backend, overrides, options)))
    names = [n for n, _ in cells]
    shared = sorted({n for n in names if names.count(n) > 1})
    if shared:
        raise MoesimError(f"sweep: several runs would be named {', '.join(shared)}: give every strategy a "
                          "different name (a dict's or .yaml file's `name:`)")
    results = []
    for name, cfg in bar(cells, desc="sweep", unit="run", enabled=progress):
        result = replay_config(cfg, opened)
        if out is not None:
            result.write(Path(out) / name)
        results.append(result)
    if out is not None:
        return pd.read_parquet(write_sweep_results(out, [r.out_dir for r in results])["results"])
    table = comparison_table([{"dir": n, "summary": r.summary, "config": r.config}
                              for n, r in zip(names, results)])
    table["dir"] = None  # written nowhere (comparison_table names each run's directory)
    return table


class Result:
    """What one run produced: `.summary` (the dict summary.json holds), `.steps` and `.layers` (pandas
    DataFrames, one row per step / per layer: moesim.profiler STEPS_TABLE_COLUMNS, LAYERS_TABLE_COLUMNS),
    `.config` (the resolved run config, a plain dict), `.write(dir)` (the results directory that
    `python -m moesim run` writes) and `.report(dir)` (that directory plus report.html).
    `.out_dir` is the directory last written, or None."""

    def __init__(self, summary: dict, config: dict, profiler, trace: Trace):
        self.summary = summary
        self.config = config
        self.out_dir: Path | None = None
        self._profiler = profiler  # moesim.profiler.Profiler or the compiled loop's equivalent
        self._trace = trace  # for the per-expert table of the results directory

    @cached_property
    def steps(self):
        return self._profiler.steps_table()

    @cached_property
    def layers(self):
        return self._profiler.layers_table()

    def write(self, out_dir) -> Path:
        """Write the results directory (config.yaml, steps.parquet, layers.parquet, timeline.json where
        `writes_timeline()`, experts.parquet, summary.json last; each file atomically: moesim.results.write_run);
        returns it."""
        from .report.tables import expert_use
        from .results import write_run

        self.out_dir = write_run(out_dir, self.config, self.summary, self.steps, self.layers,
                                 self._profiler.timeline() if self.writes_timeline() else None,
                                 experts=expert_use(self._trace))
        return self.out_dir

    def writes_timeline(self) -> bool:
        """The run option `timeline`: true, false, or auto (the default): for runs of at most TIMELINE_AUTO_STEPS
        steps (a long run's timeline, cut at the profiler's 200,000 spans, is about 28 MB of JSON)."""
        value = self.config.get("timeline", "auto")  # checked by replay_config
        return value if value in (True, False) else self.summary["steps"] <= TIMELINE_AUTO_STEPS

    def report(self, out_dir=None) -> Path:
        """Write the HTML run report (report.html) into `out_dir`, writing the results directory there first
        unless this result was already written there; with no `out_dir`, the directory written last, else a
        new reports/runs/<time>-<strategy>. Returns the report's path."""
        from .report import write_run_report
        from .results import default_run_dir

        if out_dir is not None and (self.out_dir is None or Path(out_dir).resolve() != self.out_dir.resolve()):
            self.write(out_dir)
        elif self.out_dir is None:
            self.write(default_run_dir(self.summary["strategy"]))
        return write_run_report(self.out_dir)

    def __repr__(self) -> str:
        s = self.summary
        return (f"Result(strategy={s['strategy']!r}, budget={s['budget'].get('slots')} slots, "
                f"hit_rate={s['hit_rate']:.4f}, tokens_per_s={s['tokens_per_s']:.1f})")


# ------------------------------------------------------------------------------------ composing a run
def compose_run(trace, strategy=None, budget=None, hardware=None, backend=None, overrides=(), options=None):
    """The `run` config (moesim/conf/run.yaml composed by Hydra, as the command line does) for these values;
    None leaves run.yaml's default. `strategy` may be a .yaml file or a dict (it replaces the strategy block);
    `options` are top-level run options (checked against run.yaml); `overrides` dotted Hydra overrides.
    progress is false unless an option or override says otherwise."""
    from omegaconf import OmegaConf, open_dict

    from .__main__ import compose

    options = dict(options or {})
    known = run_option_names()
    for key in options:
        if key in _OWN or key == "out":
            raise MoesimError(f"{key}: give it as simulate()'s own argument" if key in _OWN else
                              "out: write the results with Result.write(dir) or Result.report(dir)")
        if key not in known:
            raise MoesimError(f"unknown run option {key!r}; known: {', '.join(sorted(known))} (and trace, strategy, "
                              "budget, hardware, backend); deeper keys go in overrides=['a.b=value']")
    block = strategy_block(strategy)
    own = {"trace": trace, "strategy": "lru" if block is not None else strategy, "budget": budget,
           "hardware": hardware, "backend": backend}
    args = ["progress=false"]
    for key, value in [*own.items(), *options.items()]:
        if value is None and (key in own or key in _CHOICES):  # run.yaml's default (Hydra refuses `group=null`)
            continue
        args += _overrides(key, value)
    if isinstance(overrides, str):
        overrides = [overrides]
    for o in overrides:
        if not isinstance(o, str) or "=" not in o:
            raise MoesimError(f"overrides: {o!r} is not a Hydra override 'key=value' (e.g. 'strategy.cache.decay=0.5')")
    # with a strategy file or dict, `strategy.*` overrides apply to that block, not to the composed stand-in
    inner = [o for o in overrides if block is not None and o.startswith("strategy.")]
    cfg = compose("run", [*args, *(o for o in overrides if o not in inner)])
    if block is not None:
        with open_dict(cfg):
            cfg.strategy = _override_block(OmegaConf.merge({"prefetch": None, "offload": None}, block), inner)
    return cfg


def _override_block(block, overrides: list[str]):
    """`block` with the dotted `strategy.a.b=value` overrides applied; a key the block lacks is refused."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    OmegaConf.set_struct(block, True)  # as Hydra does: an override may change a key, not invent one
    try:
        block.merge_with(OmegaConf.from_dotlist([o[len("strategy."):] for o in overrides]))
    except OmegaConfBaseException as e:
        raise MoesimError(f"overrides: {', '.join(overrides)}: {' '.join(str(e).split())}") from None
    OmegaConf.set_struct(block, False)
    return block


def run_option_names() -> set[str]:
    """The top-level options of moesim/conf/run.yaml: its keys and its config groups (prefetch, offload, ...)."""
    from importlib.resources import files

    from omegaconf import OmegaConf

    conf = OmegaConf.load(files("moesim.conf").joinpath("run.yaml"))
    groups = {k for d in conf.get("defaults", []) if hasattr(d, "keys") for k in d.keys()}
    return (set(conf.keys()) - {"defaults"}) | groups


def strategy_names() -> list[str]:
    """Every built-in strategy: the configs in moesim/conf/strategy/, by name."""
    from importlib.resources import files

    folder = files("moesim.conf").joinpath("strategy")
    return sorted(f.name[:-5] for f in folder.iterdir() if f.name.endswith(".yaml"))


def strategy_block(strategy):
    """The strategy config block `strategy` gives when it is a .yaml file or a dict (checked for `name:` and
    `cache:`), or None when it is a built-in name (composed by Hydra) or None."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if strategy is None:
        return None
    if isinstance(strategy, (dict, DictConfig)):
        where, block = "strategy (dict)", OmegaConf.create(strategy)
    elif isinstance(strategy, (str, os.PathLike)) and str(strategy).endswith((".yaml", ".yml")):
        where = f"strategy={os.fspath(strategy)}"
        if not Path(strategy).is_file():
            raise MoesimError(f"{where}: no such strategy config file")
        try:
            block = OmegaConf.load(strategy)
        except (OmegaConfBaseException, ValueError) as e:  # e.g. a YAML syntax error
            raise MoesimError(f"{where}: not a readable strategy config ({' '.join(str(e).split())})") from None
    elif isinstance(strategy, str):
        if strategy not in strategy_names():
            raise MoesimError(f"strategy={strategy!r}: unknown; built-in: {', '.join(strategy_names())}; or a "
                              ".yaml file or dict like moesim/conf/strategy/lru.yaml (name, cache, prefetch, offload)")
        return None
    else:
        raise MoesimError(f"strategy={strategy!r}: expected a built-in name, a .yaml file or a dict")
    for key in ("name", "cache"):
        if not isinstance(block, DictConfig) or key not in block:
            raise MoesimError(f"{where}: a strategy config needs `{key}:` (see moesim/conf/strategy/lru.yaml)")
    return block


def trace_label(trace) -> str:
    """The `trace=` value of a run: the value given, or for a Trace object its file, its preset's name, or
    a description of an in-memory trace (then the run's config.yaml cannot reopen it)."""
    if not isinstance(trace, Trace):
        return os.fspath(trace) if isinstance(trace, os.PathLike) else str(trace)
    if trace.path is not None:
        return str(trace.path)
    preset = trace.source.get("preset") if isinstance(trace.source, dict) else None
    return str(preset) if preset else f"<in-memory trace: {trace.spec.name}, {trace.n_tokens} tokens>"


def _overrides(key: str, value) -> list[str]:
    """`key=value` as Hydra overrides; a dict (model={"scale": 0.5}) becomes one per leaf (model.scale=0.5),
    except where run.yaml's value is null (disk.storage): there the dict is the value, one Hydra dict."""
    if isinstance(value, dict):
        if key in _null_run_keys():
            return [f"{key}={_hydra_value(value, key)}"]
        return [o for k, v in value.items() for o in _overrides(f"{key}.{k}", v)]
    return [f"{key}={_hydra_value(value, key)}"]


def _hydra_value(value, key: str) -> str:
    """`value` as Hydra's override grammar writes it (a dict as {a:1,b:x})."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_hydra_value(v, f'{key}.{k}')}" for k, v in value.items()) + "}"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, os.PathLike)):
        from .sweep import _quote

        text = os.fspath(value)
        return text if _PLAIN.fullmatch(text) else _quote(text)
    raise MoesimError(f"{key}={value!r}: expected a string, number, bool, None or (for a nested block) a dict")


@functools.lru_cache(maxsize=1)
def _null_run_keys() -> frozenset:
    """Dotted keys of moesim/conf/run.yaml whose value is null (a mapping given there replaces it whole)."""
    from importlib.resources import files

    from omegaconf import OmegaConf

    out = set()

    def walk(node, prefix):
        for k, v in node.items():
            if v is None:
                out.add(prefix + str(k))
            elif isinstance(v, dict):
                walk(v, f"{prefix}{k}.")

    walk(OmegaConf.to_container(OmegaConf.load(str(files("moesim.conf").joinpath("run.yaml")))), "")
    return frozenset(out)


def _listed(value, name: str) -> list:
    """A sweep axis as a list: one value or a list/tuple of them."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise MoesimError(f"sweep: {name} is empty; give one value or a list")
    return values


def _strategy_label(strategy) -> str:
    """A strategy's name in a sweep's cell name: its name, its file, or a dict's `name`."""
    if isinstance(strategy, dict) or hasattr(strategy, "keys"):
        return str(strategy.get("name", "strategy"))
    return os.fspath(strategy) if isinstance(strategy, os.PathLike) else str(strategy)


# ---------------------------------------------------------------------------------------- one replay
def replay_config(cfg, trace: Trace | None = None, events: bool = True) -> Result:
    """Replay the run config `cfg` (composed from moesim/conf/run.yaml): `python -m moesim run`, `simulate`
    and `sweep` all come here. `trace`: the already opened trace of cfg.trace, else it is opened here.
    `events=False` (plan's replays): a compiled sim run keeps sums, not every event (moesim.core.simulate): the
    same summary but for the busy-time unions and overlap (None), and no tables or timeline."""
    from omegaconf import OmegaConf

    from .hardware import load_hardware
    from .models import scale_spec, stored_spec
    from .report import version_info
    from .whole import contexts, decode_rate, dense_times, percentiles, step_split, ttft_ms, weight_bytes

    cfg = resolve_strategy(cfg)
    if trace is None:
        trace = load_trace(cfg.trace)
    tokens, seqs = _run_values(cfg)  # checked before the replay, not after it
    if tokens is not None or seqs is not None:  # a prefix: tokens=N, seqs=N
        from .baseline import subset

        trace = subset(trace, tokens, seqs)
    _fits_in_memory(trace)
    model = run_model(cfg, trace.spec)  # the real model in the run's formats
    hardware = load_hardware(str(cfg.hardware))
    ctx = contexts(trace, model.sliding_window)
    plan, budget, scope, notes = vram_plan(cfg, model, hardware, ctx)  # slots of the real model: same at any scale
    for note in notes:
        print(note, file=sys.stderr)
    spec = scale_spec(model, float(cfg.model.scale))
    if cfg.model.dtype:
        spec = stored_spec(spec, str(cfg.model.dtype))
    strat = cfg.strategy
    sim = str(cfg.backend.get("_target_", "")).endswith("SimBackend")  # the torch backend runs no attention
    whole = bool(cfg.get("whole_model", True)) and spec.whole and sim
    dense = dense_times(spec, hardware, ctx) if whole else None
    disk = disk_tier(cfg, trace, spec)
    ex = execute(trace, spec, budget.slots, scope, strat, cfg.backend, hardware,
                 reset_per_seq=bool(cfg.reset_per_seq), progress=bool(cfg.progress), fast=cfg.get("fast", "auto"),
                 dense=dense, events=events, disk=disk)
    counters, profiler, served, device_bytes, backend = ex.counters, ex.profiler, ex.served, ex.device_bytes, ex.backend
    metrics = profiler.metrics()
    steps_arr = profiler.arrays()
    ttft = ttft_ms(trace, steps_arr[0][:, 2], steps_arr[0][:, 3]) if len(steps_arr[0]) == trace.n_steps else []
    summary = {
        "hit_rate": counters.hits / counters.requests if counters.requests else float("nan"),
        **counters.to_dict(),
        "bytes_h2d": counters.loads * spec.bytes_per_expert,
        **metrics,
        **request_metrics(counters, ex.prefetch, served, spec.bytes_per_expert),
        "peak_device_bytes": device_bytes,
        "vram_plan": plan.to_dict(),
        "whole_model": whole,  # the step times include attention, dense layers and the LM head
        "decode_tokens_per_s": decode_rate(trace, steps_arr[0]),
        "ttft_ms": percentiles(ttft) | {"sequences": len(ttft)} if len(ttft) else None,
        "step_ms_split": step_split(steps_arr, dense, getattr(profiler, "totals", None)),
        "strategy": strat.name,
        "bound": ex.bound,  # an oracle took part: a bound, not a deployable result
        "belady_hit_rate": _belady_hit_rate(trace, budget.slots, scope, bool(cfg.reset_per_seq)) if events else None,
        "budget": budget.to_dict() | {"bytes": budget.slots * spec.bytes_per_expert},
        "scope": scope,
        "notes": notes,
        "trace": {"name": str(cfg.trace), "path": str(trace.path) if trace.path else None,
                  "tokens": trace.n_tokens, "steps": trace.n_steps, "sequences": trace.n_seqs,
                  "source": trace.source},
        "model": spec.to_dict() | {"bytes_per_expert": spec.bytes_per_expert, "scale": float(cfg.model.scale),
                                   "weight_bytes": weight_bytes(model)},
        "hardware": hardware.name,
        "hardware_profile": hardware.to_dict(),
        "moesim": version_info(),
        "backend": backend.name,
        "fast_path": ex.compiled,
    }
    if disk is not None:
        counts = ex.disk if ex.disk is not None else disk.counts(getattr(backend, "disk_busy_ms", None))
        summary["disk"] = disk.summary(spec, trace.n_tokens, counts, metrics.get("wall_ms") or 0.0)
        if hasattr(backend, "disk_stats"):  # torch: what its reads from the experts' file measured
            summary["disk"]["measured"] = backend.disk_stats()
    for extra in ("memory", "info"):  # what only some backends can tell (torch: peak RSS, VRAM, device name)
        if hasattr(backend, extra):
            summary[f"backend_{extra}" if extra == "info" else extra] = getattr(backend, extra)()
    check = backend.profile_check() if hasattr(backend, "profile_check") else None
    if check:  # torch: its copy and FFN times against the profile's (moesim/backends/torch/drift.py)
        summary["profile_check"] = {k: v for k, v in check.items() if k != "notes"}
        for note in check["notes"]:
            notes.append(note)
            print(note, file=sys.stderr)
    return Result(summary, OmegaConf.to_container(cfg, resolve=True), profiler, trace)


def disk_tier(cfg, trace, spec):
    """The run's disk tier (moesim/disk.py) from its `disk` block, or None where `disk.storage` is null: a host
    cache of `disk.ram` expert slots (one pool) with the cache policy named by `disk.policy`."""
    from .disk import DiskTier, load_storage
    from .units import parse_budget

    block = cfg.get("disk")
    if block is None or block.get("storage") is None:
        return None
    storage = load_storage(block.storage)
    try:
        ram = parse_budget(block.get("ram", "50%"), spec, "global")
    except MoesimError as e:
        raise MoesimError(f"disk.ram: {e}") from None
    from .core import reference_class

    name = str(block.get("policy", "lru"))
    try:
        cls = reference_class(name)
    except MoesimError:
        from .core.parts import CACHE

        raise MoesimError(f"disk.policy={name!r}: expected one of {', '.join(n for n, _ in CACHE.values())}") from None
    if name == "learned":  # its features are a layer's whole requests; the host cache sees single loads
        raise MoesimError("disk.policy=learned: the learned policy ranks a layer's residents from its requests and "
                          "is trained for the device cache; give the host cache another policy (lru, page_cache, ...)")
    import dataclasses

    from .disk import request_bytes

    storage = dataclasses.replace(storage, request_bytes=request_bytes(block.get("read_size", "auto"), name,
                                                                       spec.bytes_per_expert))
    tier = DiskTier(spec, ram.slots, cls, storage, trace)
    tier.wants_bound = name == "belady"  # the host's own Belady: bound to the host's requests before the replay
    return tier


def _fits_in_memory(trace) -> None:
    """Refuse, before anything is allocated, a replay whose arrays cannot fit in this machine's memory (a trace
    claiming 2**28 tokens had grown a run to 4 GB before failing): the flat requests (ids, token counts, next
    uses: ~20 bytes each) and the per-step and per-layer rows (~48 bytes each), against MemAvailable."""
    requests = trace.n_tokens * trace.n_layers * trace.spec.top_k
    need = requests * 20 + trace.n_steps * trace.n_layers * 48
    from . import hardware

    have = hardware.host_memory_available()
    if have is not None and need > have:
        raise MoesimError(f"trace {trace_label(trace)}: {trace.n_tokens:,} tokens x {trace.n_layers} layers x top-"
                          f"{trace.spec.top_k} = {requests:,} expert requests need about {need / 2**30:.1f} GiB to "
                          f"replay, more than the {have / 2**30:.1f} GiB available here; replay a part of it "
                          f"(tokens=N or seqs=N)")


def check_run_config(cfg) -> None:
    """The checks of a run config that need no trace (a sweep runs them on every swept value before its first
    cell): the strategy's parts build; budget, scope, hardware, trace name, tokens, seqs and timeline are
    values they take. Raises MoesimError naming the first bad one."""
    from .hardware import load_hardware
    from .importers import check_trace_name
    from .units import budget_value

    cfg = resolve_strategy(cfg)
    st = cfg.strategy
    build(st.cache, "strategy.cache")
    for part in ("prefetch", "offload"):
        if st.get(part):
            build(st[part], part)
    run_scope(cfg)
    if str(cfg.budget) != "auto":
        budget_value(cfg.budget)
    load_hardware(str(cfg.hardware))
    check_trace_name(cfg.trace)
    _run_values(cfg)


BELADY_MAX_REQUESTS = 50_000_000  # the summary's Belady hit rate is computed up to this many expert requests


def _belady_hit_rate(trace, slots: int, scope: str, reset_per_seq: bool) -> float | None:
    """The hit rate of Belady's eviction (the best any cache policy can do without prefetch) at the run's budget
    and scope, cache-only and compiled (about a second for 15 M requests), or None where it cannot run there or
    the trace is too large for it to be cheap: the run's distance to the bound."""
    from . import core

    if trace.n_tokens * trace.n_layers * trace.spec.top_k > BELADY_MAX_REQUESTS:
        return None
    known = trace.__dict__.setdefault("_belady_hit_rates", {})  # the runs of a sweep at one budget share it
    key = (slots, scope, reset_per_seq)
    if key not in known:
        try:
            c = core.hit_counts(trace, "belady", {}, slots, scope, reset_per_seq)
            known[key] = c["hits"] / c["requests"] if c["requests"] else None
        except MoesimError:  # e.g. a budget too small for a layer's experts: the run itself said so
            known[key] = None
    return known[key]


def _run_values(cfg) -> tuple[int | None, int | None]:
    """(tokens, seqs) of a run config, each a whole number >= 1 or None; timeline true, false or auto. Raises
    MoesimError naming the bad one."""
    if cfg.get("timeline", "auto") not in (True, False, "auto"):
        raise MoesimError(f"timeline={cfg.get('timeline')!r}: expected true, false or auto")
    return _whole(cfg.get("tokens"), "tokens"), _whole(cfg.get("seqs"), "seqs")


def _whole(value, name: str):
    """A run option that takes a whole number >= 1 or null, as given (an int), or a MoesimError naming it."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MoesimError(f"{name}={value!r}: expected a whole number >= 1 (or null: the whole trace)")
    return value


def run_model(cfg, spec):
    """The trace's model as the run stores it: completed with the rest of the architecture (model.config, else the
    catalogue; moesim.whole.completed), in the formats model.recipe and model.<class>_format ask for."""
    from .models import with_formats
    from .whole import completed

    m = cfg.model
    config = m.get("config")
    spec = completed(spec, str(config) if config else None)
    if m.get("recipe"):
        from .formats import recipe

        spec = with_formats(spec, **recipe(str(m.recipe)))
    return with_formats(spec, **{cls: (None if m.get(f"{cls}_format") is None else str(m.get(f"{cls}_format")))
                                 for cls in ("experts", "attention", "dense", "embed", "kv")})


SCOPES = ("per_layer", "global")


def run_scope(cfg) -> str:
    """The run's scope: `scope=` as given, or for `auto` the strategy config's own `scope:` (a preset that only
    works in one pool says so there), else per_layer."""
    scope = str(cfg.get("scope", "auto"))
    if scope == "auto":
        scope = str(cfg.strategy.get("scope") or "per_layer")
        where = f"strategy {cfg.strategy.get('name')!r}: scope"
    else:
        where = "scope"
    if scope not in SCOPES:
        raise MoesimError(f"{where}={scope!r}: expected auto, per_layer or global")
    return scope


def vram_plan(cfg, model, hardware, ctx):
    """(VramPlan, Budget, scope, notes) of a run of the real model `model` on `hardware`'s card: budget=auto takes
    what the rest of the plan leaves (in one global pool where per_layer cannot hold top-k per layer); a plan over
    the card is refused with its lines (vram.force=true: a warning in `notes` instead)."""
    from .units import parse_bytes
    from .whole import check_plan, plan_vram

    v = cfg.get("vram") or {}

    def count(name, auto):
        value = v.get(name, "auto")
        if str(value) == "auto":
            return auto
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MoesimError(f"vram.{name}={value!r}: expected auto or a whole number >= 1")
        return value

    context, batch = count("context", max(ctx.max_context, 1)), count("batch", max(ctx.max_batch, 1))
    reserve = parse_bytes(v.get("reserve", "512MiB"), "vram.reserve")

    strat = cfg.strategy
    offload = build(strat.offload, "offload") if strat.get("offload") else None
    scratch = scratch_slots(model, build(strat.cache, "strategy.cache"), offload) * model.bytes_per_expert

    def plan_with(expert_bytes):
        return plan_vram(model, hardware.vram_bytes, expert_bytes, context, batch, ctx.max_tokens, ctx.max_logits,
                         reserve, scratch)

    requested, scope, notes = str(cfg.budget).strip(), run_scope(cfg), []
    if requested == "auto":
        rest = plan_with(0)
        slots = min(max(rest.card - rest.total, 0) // model.bytes_per_expert, model.total_experts)
        if scope == "per_layer" and model.top_k <= slots < model.top_k * model.layers:
            scope = "global"  # one pool is the only way to run it: say so rather than refuse
            notes.append(f"note: budget=auto leaves room for {slots} experts, fewer than top-k x layers = "
                         f"{model.top_k * model.layers} that scope=per_layer needs; running with scope=global")
        if slots < model.top_k:
            raise MoesimError("budget=auto: the card has no room for the experts one layer needs after the rest of "
                              "the plan:\n" + "\n".join(rest.lines()) + f"\none expert takes "
                              f"{model.bytes_per_expert / 2**20:.1f} MiB and a layer needs top-k = {model.top_k}; "
                              f"pick a smaller format (model.experts_format=q4_k), context or batch (vram.context, "
                              f"vram.batch)")
        budget = parse_budget(str(slots), model, scope)
        budget = type(budget)(budget.slots, "auto", budget.bytes, budget.per_layer_slots)
    else:
        budget = parse_budget(requested, model, scope)
    plan = plan_with(budget.slots * model.bytes_per_expert)
    warning = check_plan(plan, bool(v.get("force", False)))
    return plan, budget, scope, notes + ([warning] if warning else [])


def run(cfg, write: bool = True, report: bool = False) -> Result:
    """The `run` command's work on a composed config (moesim/conf/run.yaml): replay, then write the results
    directory (cfg.out, else a new reports/runs/<time>-<strategy>) unless write=False, and its report.html with
    `report`; the directory is held for this run meanwhile (moesim.results.claimed). Result.out_dir says where."""
    from .results import claimed, default_run_dir

    if not write:
        return replay_config(cfg)
    name = str(resolve_strategy(cfg).strategy.get("name") or "run")  # as the summary will name it
    with claimed(default_run_dir(name) if cfg.out is None else cfg.out, fresh=cfg.out is None) as out:
        result = replay_config(cfg)  # out= is checked writable and locked before the replay, not after it
        result.write(out)
        if report:
            result.report()
    return result


@dataclass
class Execution:
    """What one replay produced, whichever driver ran it (see `execute`)."""

    counters: Counters
    prefetch: object  # .used, .wasted, .unused_at_end (moesim.cache.PrefetchCounters or core.PrefetchOutcome)
    profiler: object  # moesim.profiler.Profiler (metrics, tables, timeline)
    served: dict | None  # backend.request_stats(): stall-free requests, late prefetches
    device_bytes: int
    backend: object  # the backend instance (name; memory() and info() where it has them)
    bound: bool  # an oracle took part
    compiled: bool  # the compiled loop ran it
    disk: dict | None = None  # the compiled core's disk tier counts (moesim.core.SimRun.disk); None: see the DiskTier


def execute(trace, spec, n_slots: int, scope: str, strat, backend_cfg, hardware, reset_per_seq: bool = False,
            progress: bool = False, fast="auto", dense=None, events: bool = True, disk=None) -> Execution:
    """Replay `trace` through the strategy config `strat` (cache/prefetch/offload blocks) on the backend of
    `backend_cfg` with `n_slots` slots in `scope` (see `replay_parts`). `spec` is the stored model (scale and
    dtype applied); `hardware` the run's profile."""
    make_policy = lambda: build(strat.cache, "strategy.cache")  # noqa: E731  one instance per partition
    prefetcher = build(strat.prefetch, "prefetch") if strat.get("prefetch") else None
    offload = build(strat.offload, "offload") if strat.get("offload") else None
    backend = build(backend_cfg, "backend", hardware=hardware)
    return replay_parts(trace, spec, n_slots, scope, make_policy, prefetcher, offload, backend, hardware,
                        reset_per_seq=reset_per_seq, progress=progress, fast=fast, dense=dense, events=events,
                        disk=disk)


def replay_parts(trace, spec, n_slots: int, scope: str, make_policy, prefetcher, offload, backend, hardware=None,
                 cost=None, reset_per_seq: bool = False, progress: bool = False, fast="auto",
                 prefetch_max: int | None = None, dense=None, events: bool = True, disk=None) -> Execution:
    """Replay `trace` through built parts (`make_policy` builds the cache policy of one partition) on `backend`
    (not set up yet). Where every part is built in, the compiled core (moesim/core/) decides: on the sim
    backend it runs the whole run; on another (torch) it records its decisions and the backend executes them
    (moesim.engine.play), unless a max_inflight cap makes a decision read that backend's clock. Otherwise the
    Python driver (moesim/engine.py) calls the parts' hooks. `hardware`: the profile whose costs an offload
    policy is asked with (`cost`, default moesim.hardware.Cost(hardware, spec)); None: the h200 preset, for runs
    without an offload policy. `fast`: see `compiled_run`; `prefetch_max` (the Python driver's, for checks
    with a custom prefetcher) takes the Python driver. `dense`: the model's non-expert part per step
    (moesim.whole.DenseTimes), timed by the sim backend only. `events`: see replay_config. `disk`: the disk tier
    (moesim.disk.DiskTier): its host cache, in either driver."""
    from . import core
    from .hardware import Cost, load_hardware
    from .profiler import Profiler

    hardware = load_hardware(hardware if hardware is not None else "h200")
    cost = cost if cost is not None else Cost(hardware, spec)
    first = make_policy()
    bound = any(getattr(x, "bound", False) for x in (first, prefetcher, offload) if x is not None)
    if disk is not None and getattr(disk, "wants_bound", False):
        _bind_host_bound(disk, trace, spec, n_slots, scope, make_policy, first, prefetcher, offload, hardware,
                         reset_per_seq, cost)
    way = compiled_run(fast, backend, first, prefetcher, offload) if prefetch_max is None else None
    if way == "play" and disk is not None:  # a recorded script has no disk reads: the Python driver tells them
        if str(fast).lower() in ("true", "on", "yes"):
            raise MoesimError(f"fast={fast}: the compiled core cannot run this: with backend {backend.name}, the "
                              f"disk tier's reads are told by the Python driver; use fast=auto")
        way = None
    if way == "sim":  # tests/test_core.py: equal to the Python driver, event for event
        sim = core.simulate(trace, spec, n_slots, scope, make_policy, prefetcher, offload, backend.hardware,
                            reset_per_seq, pinned=backend.pinned, cost=cost, dense=dense, events=events, disk=disk)
        return Execution(Counters(**sim.counters), sim.prefetch, sim.profiler, sim.request_stats,
                         sim.device_bytes, backend, bound, True, sim.disk)
    if way == "play":  # the core decides; the backend executes (tests/test_core.py: the same calls)
        sim = core.simulate(trace, spec, n_slots, scope, make_policy, prefetcher, offload, hardware, reset_per_seq,
                            cost=cost, record=True)
        profiler = Profiler(spec.layers)
        if offload is not None:
            backend.host_after_device = bool(offload.host_after_device)
        backend.setup(spec, n_slots + scratch_slots(spec, first, offload), profiler)
        play(trace, backend, sim.script, progress=progress)
        served = backend.request_stats() if hasattr(backend, "request_stats") else None
        return Execution(Counters(**sim.counters), sim.prefetch, profiler, served, backend.device_bytes(), backend,
                         bound, True)
    if dense is not None and hasattr(backend, "dense"):
        backend.dense = dense
    cache, profiler, counters = drive(trace, spec, n_slots, scope, make_policy, backend, prefetcher, offload, cost,
                                     reset_per_seq=reset_per_seq, prefetch_max=prefetch_max, progress=progress,
                                     disk=disk)
    served = backend.request_stats() if hasattr(backend, "request_stats") else None
    return Execution(counters, cache.prefetch, profiler, served, backend.device_bytes(), backend, bound, False)


def _bind_host_bound(disk, trace, spec, n_slots, scope, make_policy, first, prefetcher, offload, hardware,
                     reset_per_seq, cost) -> None:
    """disk.policy=belady: replay once without the disk tier, recording the decisions (the compiled core), and
    make the host cache Belady over the host requests they imply (moesim.disk.host_requests). Exact where the
    device's decisions do not depend on the disk's timing (no max_inflight cap)."""
    import numpy as np

    from . import core
    from .disk import host_requests

    why = core.uncovered(first, prefetcher, offload)
    if why:
        raise MoesimError(f"disk.policy=belady: the host's bound replays the device's decisions first in the "
                          f"compiled core, which cannot run this: {why}")
    rec = core.simulate(trace, spec, n_slots, scope, make_policy, prefetcher, offload, hardware, reset_per_seq,
                        cost=cost, record=True).script  # a script needs the events (the copies in order)
    ends = np.asarray(rec.step_waves, np.int64)
    step_of_wave = np.repeat(np.arange(len(ends), dtype=np.int64), np.diff(np.concatenate([[0], ends])))
    disk.bind(*host_requests(rec, trace.n_layers, trace.spec.experts, step_of_wave))


def build(block, where: str, **kwargs):
    """Hydra's instantiate of a config block, with a user's mistake (an unknown parameter, a class that cannot
    be imported, torch missing for backend=torch) as a MoesimError that names the block, not a traceback."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(block, **kwargs)
    except InstantiationException as e:
        from .errors import install_hint

        cause = e.__cause__ or e.__context__
        hint = install_hint(e)
        if hint:
            raise MoesimError(f"{where}: {block.get('_target_', '?')} needs {hint}") from None
        why = f"{type(cause).__name__}: {cause}" if cause is not None else str(e).splitlines()[0]
        raise MoesimError(f"{where}: cannot build {block.get('_target_', '?')}: {why}") from None


def compiled_run(mode, backend, cache_policy, prefetcher, offload) -> str | None:
    """How the compiled core takes part in this run: "sim" (it runs the whole run, clocks included), "play" (it
    makes the decisions and another backend, torch, executes them: moesim.engine.play), or None (the Python
    driver). `mode` is the run's `fast=`: auto (the core wherever it covers the run), true (refuse, saying why,
    a run it does not cover), false (never)."""
    from . import core
    from .backends.sim import SimBackend

    mode = str(mode).lower()
    if mode not in ("auto", "true", "on", "yes", "false", "off", "no"):
        raise MoesimError(f"fast={mode!r}: expected auto, true or false")
    if mode in ("false", "off", "no"):
        return None
    sim = type(backend) is SimBackend
    why = core.uncovered(cache_policy, prefetcher, offload)
    if why is None and not sim and any(getattr(x, "max_inflight", None) is not None for x in (prefetcher, offload)):
        why = f"with backend {backend.name}, a max_inflight cap makes decisions depend on the backend's own clock"
    if why and mode != "auto":
        raise MoesimError(f"fast={mode}: the compiled core cannot run this: {why}; use fast=auto")
    return None if why else ("sim" if sim else "play")


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
        "prefetch_unused_at_end": prefetch.unused_at_end,
        "stall_free_requests": stall_free,
        "stall_free_rate": stall_free / counters.requests if stall_free is not None and counters.requests else None,
    }


def machine_label(s: dict) -> str:
    """What ran the run: the hardware profile and backend, and for a backend that ran on a real device (torch)
    that device, not the profile's name (a CPU run is not an RTX 4090)."""
    device = (s.get("backend_info") or {}).get("device_name")
    if device:
        return f"{s.get('backend')} on {device} (profile {s.get('hardware')}: the VRAM plan and offload costs)"
    return f"{s.get('hardware')} / {s.get('backend')}"


def ms_text(ms) -> str:
    """A duration for people: ms below 10 s, then s, min or h (558019.9 ms -> 9.3 min)."""
    if ms is None or ms != ms:
        return "n/a"
    for unit, size, above in (("h", 3.6e6, 3.6e6), ("min", 6e4, 6e5), ("s", 1e3, 1e4)):  # from 1 h, 10 min, 10 s
        if abs(ms) >= above:
            return f"{ms / size:.1f} {unit}"
    return f"{ms:.1f} ms"


def disk_rows(d) -> list[tuple[str, str]]:
    """The disk tier's lines of a summary (its `disk` section; none without one)."""
    if not isinstance(d, dict):
        return []
    st = d.get("storage") or {}
    rate = d.get("host_hit_rate")
    share = d.get("disk_busy_share")
    n = d.get("requests_per_read") or 1
    each = f", {n} requests of {st.get('request_bytes', 0) // 1024} KiB" if n > 1 else ""
    rows = [("disk / host cache", f"{st.get('name')} ({st.get('read_gbps')} GB/s, {d.get('read_ms', 0):.2f} ms per "
                                  f"expert{each}) / {d.get('host_slots')} slots ({d.get('host_gib', 0):.2f} GiB)"),
            ("host hit rate", "n/a" if rate is None else f"{rate:.4f}  ({d.get('host_hits')} of "
                                                         f"{d.get('host_requests')} device misses)"),
            ("bytes disk->host", f"{d.get('bytes_disk', 0) / 2**30:.2f} GiB, {d.get('disk_mib_per_token', 0):.1f} "
                                 f"MiB per token" + ("" if share is None else f"; disk busy {share:.0%} of the run"))]
    m = d.get("measured")
    if isinstance(m, dict) and m.get("gbps") is not None:  # torch: its real reads
        rows.append(("disk reads measured", f"{m.get('reads')} reads, {m['gbps']:.2f} GB/s ({m.get('io')})"))
    return rows


def summary_table(s: dict) -> str:
    """A short terminal table of a run's summary."""
    lat = s.get("latency_ms", {})
    rows = [
        ("strategy", f"{s['strategy']}" + ("  (bound: not deployable)" if s.get("bound") else "")),
        ("trace", f"{s['trace']['name']}: {s['trace']['tokens']} tokens, {s['trace']['sequences']} sequences"),
        ("budget", f"{s['budget']['slots']} slots ({s['budget']['bytes'] / 2**30:.2f} GiB), scope {s['scope']}"),
        ("hardware / backend", machine_label(s)),
        ("hit rate", f"{s['hit_rate']:.4f}  ({s['hits']} of {s['requests']} expert requests)" + (
            "" if s.get("belady_hit_rate") is None else f"; Belady's at this budget: {s['belady_hit_rate']:.4f}")),
        ("loads / evictions", f"{s['loads']} / {s['evictions']}"),
        ("bytes host->device", f"{s['bytes_h2d'] / 2**30:.2f} GiB"),
        ("tokens/s", f"{s['tokens_per_s']:.1f}"),
        ("latency ms p50/p90/p99", f"{lat.get('p50', float('nan')):.2f} / {lat.get('p90', float('nan')):.2f} / "
                                   f"{lat.get('p99', float('nan')):.2f}"),
        ("stall", ms_text(s["stall_ms"])),
        ("stall-free requests", "n/a" if s.get("stall_free_rate") is None else f"{s['stall_free_rate']:.4f}"),
        ("peak device memory", f"{s['peak_device_bytes'] / 2**30:.2f} GiB (the expert slots and shared experts the "
                               f"backend held)"),
    ]
    plan = s.get("vram_plan")
    if plan:
        rows.append(("VRAM plan", f"{plan['total'] / 2**30:.2f} of {plan['card'] / 2**30:.2f} GiB"
                                  + ("" if plan["whole_model"] else " (experts only: no whole-model spec)")))
    split = s.get("step_ms_split")
    if s.get("whole_model") and split:
        rows.insert(8, ("step ms: dense / experts / stall / other",
                        f"{split['dense']:.2f} / {split['expert_compute']:.2f} / {split['stall']:.2f} / "
                        f"{split['other']:.2f}"))
    if s.get("decode_tokens_per_s") is not None:
        rows.insert(8, ("decode tokens/s", f"{s['decode_tokens_per_s']:.1f}" + ("" if s.get("whole_model") else
                                                                               " (MoE layers only)")))
    if s.get("ttft_ms"):
        t = s["ttft_ms"]
        rows.insert(8, ("time to first token ms", f"p50 {t['p50']:.1f} / p90 {t['p90']:.1f} over {t['sequences']} "
                                                  f"prompts"))
    if s.get("prefetch_loads"):
        late = "n/a" if s.get("late_prefetches") is None else s["late_prefetches"]
        rows.insert(7, ("prefetch precision / recall", f"{s['prefetch_precision']:.4f} / {s['prefetch_recall']:.4f}"
                                                        f"  ({late} late, {s['wasted_prefetch_bytes'] / 2**30:.2f} "
                                                        f"GiB wasted)"))
    if s.get("streams"):
        rows.insert(7, ("streamed", f"{s['streams']} (copied into scratch slots, computed, dropped; in loads)"))
    if s.get("host_computes"):
        rows.insert(7, ("host computes", f"{s['host_computes']}"))
    rows += disk_rows(s.get("disk"))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def plan_lines(plan: dict) -> list[str]:
    """summary.json's vram_plan as the lines `run` prints (moesim.whole.VramPlan.lines)."""
    from .whole import VramPlan

    fields = {k: plan[k] for k in ("card", "weights", "kv_cache", "workspace", "reserve", "experts", "context",
                                   "batch")}
    return VramPlan(**fields, whole=plan["whole_model"], scratch=plan.get("scratch", 0)).lines()


def run_command(cfg) -> None:
    """`python -m moesim run ...`: replay, print the summary, write the results directory and its report."""
    result = run(cfg, report=True)
    plan = result.summary.get("vram_plan")
    if plan:
        print(f"VRAM plan ({result.summary['hardware']}):")
        print("\n".join(plan_lines(plan)))
    print(summary_table(result.summary))
    print(f"results: {result.out_dir}")
    print(f"report: {result.out_dir / 'report.html'}")
