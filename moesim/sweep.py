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
    import yaml

    try:
        stored = yaml.safe_load((cell_dir / CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
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
    for stale in cell_dir.glob(".tmp-*"):  # left by a kill in the middle of an atomic write
        stale.unlink(missing_ok=True)
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
        return MoesimError(f"sweep: bad option: {' '.join(str(e).split())}")

    with initialize_config_module(config_module="moesim.conf", version_base="1.3", job_name="sweep"):
        try:
            keys, n_cells, out, rest = _plan(list(overrides))
        except (HydraException, OmegaConfBaseException, ValueError) as e:  # ValueError: Hydra on `=1`
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
    if failed:
        raise MoesimError(f"sweep: {len(failed)} of {len(cells)} cells failed (the others are kept; run the "
                          "sweep again once fixed): " + "; ".join(f"cell {n}: {e}" for n, e in failed))
    done = {"root": root, "cells": cells, "results": None, "report": None,
            "not_applicable": [(c.name, job.return_value.get("not_applicable")) for c, job in zip(cells, jobs)
                               if job.return_value.get("not_applicable")]}
    if jobs and jobs[0].cfg.report:
        done.update(write_sweep_results(root, cells))
    return done


def write_sweep_results(root, cells) -> dict:
    """results.parquet (one row per cell) and report.html at the sweep's `root`, from the cells' results
    directories. Returns {"results", "report"} paths."""
    from .report import build_comparison_report
    from .report.tables import comparison_table
    from .results import read_result

    root = Path(root)
    runs = [read_result(c) for c in cells]
    table = comparison_table(runs)
    atomic_write(root / RESULTS, lambda tmp: table.to_parquet(tmp, engine="pyarrow", index=False))
    report = build_comparison_report(runs, root / REPORT, root=root)
    return {"results": root / RESULTS, "report": report}


def sweep_command(args: list[str]) -> None:
    """`python -m moesim sweep key=a,b ...`: the arguments go to Hydra as given (its sweep syntax)."""
    start = time.perf_counter()
    done = sweep(args)
    print(f"{len(done['cells'])} cells in {done['root']} ({time.perf_counter() - start:.1f} s)")
    for name, why in done["not_applicable"]:
        print(f"not applicable: cell {name}: {why}")
    if done["results"] is not None:
        print(f"results: {done['results']}")
        print(f"report: {done['report']}")


sweep_command.raw_args = True  # the CLI must not compose: `a,b` is sweep syntax that a single run refuses
