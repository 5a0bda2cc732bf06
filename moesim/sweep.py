"""Sweeps: a grid of runs through Hydra's multirun, one results directory per cell, then a combined table and
report. `python -m moesim sweep strategy=lru,lfu,belady budget=12.5%,25%,50% [out=DIR]`.

Every option of `run` works (moesim/conf/sweep.yaml includes run.yaml); a comma list, `range(...)` or
`glob(...)` sweeps it. Cells run through Hydra's sweeper and launcher, so `hydra/launcher=joblib` uses every
local core and `hydra/launcher=submitit_slurm` a SLURM cluster (docs/sweeps.md). A cell's directory is
named by its swept values (`<out>/budget=25%,strategy=lru`), the same on every run of the same command: a
cell whose results are complete (moesim.results.is_complete) and whose resolved config is unchanged is
skipped, so a sweep killed at any moment is resumed by running it again. Once every cell is done the root
gets results.parquet (moesim.report.tables.comparison_table) and report.html.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import MoesimError, NotApplicable
from .files import atomic_write
from .results import CONFIG, NOT_APPLICABLE, is_complete, write_not_applicable

RESULTS = "results.parquet"
REPORT = "report.html"
SWEEP_ONLY = ("report", "cell_reports", "sweep")  # keys of sweep.yaml that `run` does not have
NOT_COMPARED = ("out", "progress")  # config keys a resumed cell may differ in
_SAFE = re.compile(r"[^A-Za-z0-9._%+@-]")


# ---------------------------------------------------------------------------------------- cell names
def _safe(text: str) -> str:
    """`text` with every character that is awkward in a file name replaced by `_`, plus a short hash of the
    original when anything was replaced (so `a/b` and `a_b` stay apart)."""
    safe = _SAFE.sub("_", text)
    if safe != text:
        safe += "-" + hashlib.sha1(text.encode()).hexdigest()[:6]
    return safe


def cell_name(task_overrides, keys) -> str:
    """The directory name of the cell whose Hydra overrides are `task_overrides`: its values of the swept
    `keys`, sorted by key (`budget=25%,strategy=lru`), "run" when nothing is swept. Deterministic, so that a
    re-run finds its cells."""
    keys = {str(k) for k in keys}
    items = []
    for override in task_overrides:
        key, sep, value = str(override).partition("=")
        key = key.lstrip("+~")
        if sep and key in keys:
            items.append((key, value))
    name = ",".join(f"{_safe(k)}={_safe(v)}" for k, v in sorted(items)) or "run"
    if len(name) > 150:  # file names stop at 255 bytes; keep a readable start and make it unique
        name = name[:140] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return name


# Hydra evaluates hydra.sweep.subdir with this in every job (in its own process too: importing this module,
# which unpickling the task function does, registers it)
OmegaConf.register_new_resolver("moesim_cell", cell_name, replace=True)


# ------------------------------------------------------------------------------------------ one cell
def _run_config(cfg, cell_dir: Path):
    """The config `run` would have composed for this cell: the sweep's own keys removed, out = the cell."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    for key in SWEEP_ONLY:
        plain.pop(key, None)
    plain["out"] = str(cell_dir)
    return OmegaConf.create(plain)


def _comparable(config: dict) -> str:
    return json.dumps({k: v for k, v in config.items() if k not in NOT_COMPARED}, sort_keys=True, default=str)


def _unchanged(cell_dir: Path, run_cfg) -> bool:
    """True when the cell's stored config.yaml is the config this sweep would run now."""
    from .files import read_yaml

    try:
        stored = read_yaml(cell_dir / CONFIG)
    except (OSError, ValueError):  # unreadable: the cell runs again
        return False
    return isinstance(stored, dict) and _comparable(stored) == _comparable(OmegaConf.to_container(run_cfg))


def run_cell(cfg) -> dict:
    """Hydra's task function: one cell. Skips a complete cell whose config is unchanged; otherwise runs it
    (moesim.api.run writes summary.json last). Returns {"dir", "skipped", "seconds", "error"}: a user
    mistake (MoesimError) is returned, so that the other cells still run and the sweep reports them all
    in one line; anything else is a bug and propagates through Hydra with its traceback."""
    from hydra.core.hydra_config import HydraConfig

    from .api import run

    hydra = HydraConfig.get()
    cell_dir = Path(hydra.runtime.output_dir)
    label = f"[{hydra.job.num + 1}/{cfg.sweep.cells}] {cell_dir.name.replace(',', ' ')}"
    if hydra.job.num == 0:  # here, not before Hydra starts: a mistake it finds first stays a one-line error
        print(f"sweep: {cfg.sweep.cells} cells -> {cell_dir.parent}", file=sys.stderr, flush=True)
    try:
        run_cfg = _run_config(cfg, cell_dir)
    except OmegaConfBaseException as e:  # a bad ${...} in an option
        error = f"bad option: {' '.join(str(e).split())}"
        print(f"{label} ... failed: {error}", file=sys.stderr, flush=True)
        return {"dir": str(cell_dir), "skipped": False, "seconds": 0.0, "error": error}
    if is_complete(cell_dir) and _unchanged(cell_dir, run_cfg):
        print(f"{label} ... complete, skipped", file=sys.stderr, flush=True)
        return {"dir": str(cell_dir), "skipped": True, "seconds": 0.0, "error": None}
    start = time.perf_counter()
    (cell_dir / NOT_APPLICABLE).unlink(missing_ok=True)  # an earlier verdict on this cell's old config
    try:
        result = run(run_cfg)
        if cfg.cell_reports:
            result.report()
    except NotApplicable as e:  # the strategy cannot run on this input: said, kept in the results, not a failure
        config = OmegaConf.to_container(run_cfg, resolve=True)
        write_not_applicable(cell_dir, config, str(run_cfg.strategy.get("name")), str(e))
        print(f"{label} ... not applicable: {e}", file=sys.stderr, flush=True)
        return {"dir": str(cell_dir), "skipped": False, "seconds": time.perf_counter() - start, "error": None,
                "not_applicable": str(e)}
    except MoesimError as e:
        print(f"{label} ... failed: {e}", file=sys.stderr, flush=True)
        return {"dir": str(cell_dir), "skipped": False, "seconds": time.perf_counter() - start, "error": str(e)}
    seconds = time.perf_counter() - start
    print(f"{label} ... done in {seconds:.1f} s", file=sys.stderr, flush=True)
    return {"dir": str(cell_dir), "skipped": False, "seconds": seconds, "error": None}


# ------------------------------------------------------------------------------------------ the sweep
def _quote(value: str) -> str:
    """`value` as a quoted Hydra override value (any characters, commas and spaces included). Hydra's rule:
    in quotes, backslashes are literal except a run of them before a quote (or the closing quote), which
    is doubled; the quote itself is escaped."""
    return "'" + re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), value) + "'"


def _plan(overrides: list[str]):
    """(swept keys, number of cells, the user's out or None, the overrides without out), parsed by Hydra's own
    override parser (what its sweeper will do)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader()).parse_overrides(overrides)
    keys, n_cells, out, rest = [], 1, None, []
    for text, o in zip(overrides, parsed):
        key = o.key_or_group
        if key == "out":
            if o.is_sweep_override():
                raise MoesimError(f"sweep: {text!r}: out is the sweep's root and cannot be swept")
            out = o.value()
            continue
        if key == "sweep" or key.startswith("sweep."):
            raise MoesimError(f"sweep: {text!r}: {key} is set by the sweep command")
        rest.append(text)
        if o.is_sweep_override():
            n = len(list(o.sweep_string_iterator()))
            n_cells *= n
            if not o.is_hydra_override():
                keys.append(key)
    return sorted(set(keys)), n_cells, out, rest


def default_root(overrides: list[str], keys: list[str], base="reports/sweeps") -> Path:
    """reports/sweeps/<swept keys>-<hash of the options>: the same command, in any order, finds the same root."""
    what = sorted(o for o in overrides if not o.startswith(("hydra", "progress=", "report=", "cell_reports=")))
    digest = hashlib.sha1("\n".join(what).encode()).hexdigest()[:8]
    return Path(base) / f"{_safe('+'.join(keys) or 'sweep')}-{digest}"


def sweep(overrides: list[str]) -> dict:
    """Run the sweep of `overrides` (Hydra syntax) and write results.parquet and report.html at its root.
    Returns {"root", "cells" (directories, in job order), "results", "report"}; raises MoesimError."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import ConfigCompositionException, HydraException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    def bad_option(e: Exception) -> MoesimError:
        from .__main__ import _plain

        return MoesimError(_plain("sweep", " ".join(str(e).split()), [a for a in overrides if "," not in a]))

    with initialize_config_module(config_module="moesim.conf", version_base="1.3", job_name="sweep"):
        try:
            keys, n_cells, out, rest = _plan(list(overrides))
        except (HydraException, OmegaConfBaseException, ValueError) as e:  # ValueError: Hydra on `=1`
            raise bad_option(e) from None
        try:
            check_values(rest)
        except (HydraException, OmegaConfBaseException, ValueError) as e:
            raise bad_option(e) from None
        root = (Path(out) if out is not None else default_root(rest, keys)).resolve()
        args = [*rest, f"out={_quote(str(root))}", f"sweep.keys=[{','.join(map(_quote, keys))}]",
                f"sweep.cells={n_cells}"]
        try:
            batches = GlobalHydra.instance().hydra.multirun(config_name="sweep", task_function=run_cell,
                                                            overrides=args)
        except (ConfigCompositionException, OverrideParseException) as e:  # Hydra composes every cell first
            raise bad_option(e) from None
    jobs = [job for batch in batches for job in batch]
    cells = [Path(job.return_value["dir"]) for job in jobs]
    failed = [(c.name, job.return_value["error"]) for c, job in zip(cells, jobs) if job.return_value["error"]]
    ok = [c for c, job in zip(cells, jobs) if not job.return_value["error"]]
    done = {"root": root, "cells": cells, "results": None, "report": None,
            "not_applicable": [(c.name, job.return_value.get("not_applicable")) for c, job in zip(cells, jobs)
                               if job.return_value.get("not_applicable")]}
    if jobs and jobs[0].cfg.report and ok:  # failed cells too: the report lists them with their errors
        done.update(write_sweep_results(root, ok, failed))
    if failed:
        raise MoesimError(f"sweep: {len(failed)} of {len(cells)} cells failed (the others are kept; run the "
                          "sweep again once fixed): " + "; ".join(f"cell {n}: {e}" for n, e in failed)
                          + (f"; the report of the others: {done['report']}" if done["report"] else ""))
    return done


def check_values(overrides: list[str]) -> None:
    """Every value of every swept option checked before the first cell runs (moesim.api.check_run_config, with
    the other options at their first value): `budget=25%,abc,50%` fails here, not after two cells."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from .api import check_run_config

    parsed = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader()).parse_overrides(overrides)
    plain = [(text, o) for text, o in zip(overrides, parsed) if not o.is_hydra_override()]
    choices = [[f"{text.split('=', 1)[0]}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
               else [text] for text, o in plain]
    base = [c[0] for c in choices]
    seen, errors = set(), []
    for i, values in enumerate(choices):
        for value in values[1:] if i else values:  # the first values are checked once, with the base
            variant = [*base[:i], value, *base[i + 1:]]
            try:
                plain = OmegaConf.to_container(compose(config_name="sweep", overrides=variant))
                for key in SWEEP_ONLY:
                    plain.pop(key, None)
                check_run_config(OmegaConf.create(plain))
            except MoesimError as e:
                if str(e) not in seen:
                    seen.add(str(e))
                    errors.append(f"{value}: {e}")
    if errors:
        raise MoesimError("sweep: bad values, no cell was run: " + "; ".join(errors))


def ranked_lines(table) -> list[str]:
    """The sweep's results as a terminal table: one line per cell, fastest first, bounds marked."""
    cols = [("tokens/s", "tokens_per_s", ".1f", 1), ("hit rate", "hit_rate", ".4f", 1),
            ("stall s", "stall_ms", ".1f", 1e3), ("moved GiB", "bytes_h2d", ".2f", 2**30),
            ("peak GiB", "peak_device_bytes", ".2f", 2**30)]
    t = table.sort_values("tokens_per_s", ascending=False, na_position="last")
    names = [f"{r.label}{' (bound)' if r.bound else ''}" + (f"  [{r.setting}]" if r.setting else "")
             for r in t.itertuples()]
    w = max([len(n) for n in names] + [4])
    lines = [f"{'cell':<{w}}" + "".join(f"{h:>11}" for h, *_ in cols)]
    for name, (_, r) in zip(names, t.iterrows()):
        if r.get("not_applicable"):
            lines.append(f"{name:<{w}}  not applicable: {r['not_applicable']}")
            continue
        lines.append(f"{name:<{w}}" + "".join(
            f"{'-' if r[c] != r[c] else format(r[c] / scale, spec):>11}" for _, c, spec, scale in cols))
    return lines


def write_sweep_results(root, cells, failed=()) -> dict:
    """results.parquet (one row per cell) and report.html at the sweep's `root`, from the cells' results
    directories (`failed`: (cell, error) of cells that failed, listed in the report). Returns {"results",
    "report", "table"}."""
    from .report import build_comparison_report
    from .report.tables import comparison_table
    from .results import read_result

    root = Path(root)
    runs = [read_result(c) for c in cells]
    table = comparison_table(runs)
    atomic_write(root / RESULTS, lambda tmp: table.to_parquet(tmp, engine="pyarrow", index=False))
    report = build_comparison_report(runs, root / REPORT, root=root, failed=failed)
    return {"results": root / RESULTS, "report": report, "table": table}


def sweep_command(args: list[str]) -> None:
    """`python -m moesim sweep key=a,b ...`: the arguments go to Hydra as given (its sweep syntax)."""
    start = time.perf_counter()
    done = sweep(args)
    print(f"{len(done['cells'])} cells in {done['root']} ({time.perf_counter() - start:.1f} s)")
    if done.get("table") is not None:
        print("\n".join(ranked_lines(done["table"])))
    for name, why in done["not_applicable"]:
        print(f"not applicable: cell {name}: {why}")
    if done["results"] is not None:
        print(f"results: {done['results']}")
        print(f"report: {done['report']}")


sweep_command.raw_args = True  # the CLI must not compose: `a,b` is sweep syntax that a single run refuses
