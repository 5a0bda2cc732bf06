"""Results directories: what `python -m moesim run ...` writes, and how sweeps and reports read it back.

    reports/runs/<YYYYmmdd-HHMMSS>-<name>/
        config.yaml      the resolved config of the run
        steps.parquet    one row per step (moesim.profiler.STEPS_TABLE_COLUMNS)
        layers.parquet   one row per layer (moesim.profiler.LAYERS_TABLE_COLUMNS)
        timeline.json    optional (run option timeline=): Chrome trace format, open in https://ui.perfetto.dev
        experts.parquet  optional: tokens that chose each (layer, expert) (moesim.report.expert_use)
        summary.json     metrics; written last, so its presence marks a complete run

Every file is written to a temp file in the same directory and renamed into place (os.replace), so a
killed run never leaves a partial file under a final name. Reading uses JSON, YAML (safe loader) and
parquet (pyarrow) only: result directories may come from other people, and nothing is unpickled.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .errors import MoesimError
from .files import atomic_write, atomic_write_text
from .profiler import LAYERS_TABLE_COLUMNS, STEPS_TABLE_COLUMNS

CONFIG, SUMMARY, TIMELINE = "config.yaml", "summary.json", "timeline.json"
STEPS, LAYERS = "steps.parquet", "layers.parquet"
FILES = (CONFIG, STEPS, LAYERS, SUMMARY)  # in the order they are written: summary last
NOT_APPLICABLE = "not_applicable.json"  # a sweep cell whose strategy cannot run on its input: why, and its config
EXPERTS = "experts.parquet"  # optional (runs written before it existed lack it), so not in FILES
EXPERTS_TABLE_COLUMNS = ("layer", "expert", "requests")


def _jsonable(x):
    """Plain JSON values: numpy scalars and arrays to Python, NaN and infinities to null, paths to strings."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, os.PathLike):
        return str(x)
    return x


def _config_yaml(config) -> str:
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(config, DictConfig):
        config = OmegaConf.create(_jsonable(dict(config)))
    return OmegaConf.to_yaml(config, resolve=True)


def write_run(out_dir, config, summary: dict, steps, layers, timeline: dict | None, experts=None) -> Path:
    """Write a run's results directory (created if needed); summary.json last. Returns the directory.
    `timeline`: the Chrome trace (None: none written); `experts`: optional DataFrame of EXPERTS_TABLE_COLUMNS
    (moesim.report.expert_use(trace)). A rewritten directory keeps no optional file of another run."""
    import orjson

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # rewriting a directory: it must not look complete while its other files are being replaced, nor keep the
    # report of the run it held (a run killed before its report was written left the old one beside new data)
    (out / SUMMARY).unlink(missing_ok=True)
    (out / "report.html").unlink(missing_ok=True)
    atomic_write_text(out / CONFIG, _config_yaml(config))
    atomic_write(out / STEPS, lambda tmp: steps.to_parquet(tmp, engine="pyarrow", index=False))
    atomic_write(out / LAYERS, lambda tmp: layers.to_parquet(tmp, engine="pyarrow", index=False))
    if timeline is not None:
        atomic_write(out / TIMELINE, lambda tmp: Path(tmp).write_bytes(
            orjson.dumps(timeline, option=orjson.OPT_SERIALIZE_NUMPY)))
    else:
        (out / TIMELINE).unlink(missing_ok=True)
    if experts is not None:
        atomic_write(out / EXPERTS, lambda tmp: experts.to_parquet(tmp, engine="pyarrow", index=False))
    else:  # a rewritten directory must not keep another run's table
        (out / EXPERTS).unlink(missing_ok=True)
    atomic_write_text(out / SUMMARY, json.dumps(_jsonable(summary), indent=2, allow_nan=False) + "\n")
    return out


# summary.json fields that are objects, and that are text, where present (what reports and tables read)
SUMMARY_OBJECTS = ("trace", "budget", "model", "vram_plan", "step_ms_split", "latency_ms", "ttft_ms",
                   "hardware_profile", "backend_info", "memory", "counters", "profile_check")
SUMMARY_TEXT = ("strategy", "hardware", "backend", "scope", "not_applicable")
LOCK = ".moesim-lock"  # in a results directory while a run writes it: the writer's pid


@contextmanager
def claimed(out_dir, fresh: bool = False):
    """Hold `out_dir` (created if needed) for one writer: checked writable and locked before a run starts, so
    that a second run with the same out= is refused at once instead of one silently losing its results, and a
    read-only or file-shaped out= fails before the simulation, not after it. A lock left by a killed run (its
    pid gone) is taken over, with its `.tmp-*` leftovers. A directory made for this run (or `fresh`) that is
    still empty when the run ends, because it failed, is removed."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MoesimError(f"out={out}: is a file, not a directory")
    created = fresh or not out.exists()  # fresh: the caller just made it (default_run_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = _lock(out / LOCK)
    except OSError as e:
        raise MoesimError(f"out={out}: cannot write there ({e.strerror})") from None
    try:
        for stale in out.glob(".tmp-*"):  # a killed writer's half-written files
            stale.unlink(missing_ok=True)
        yield out
    finally:
        os.close(fd)
        (out / LOCK).unlink(missing_ok=True)
        if created:
            try:  # a run that failed before writing anything leaves no empty directory of its own behind
                out.rmdir()
            except OSError:  # not empty: its results are in it
                pass


def _lock(path: Path) -> int:
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            os.write(fd, str(os.getpid()).encode())
            return fd
        except FileExistsError:
            try:
                pid = int(path.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _alive(pid):
                raise MoesimError(f"out={path.parent}: another moesim run (pid {pid}) is writing there; wait "
                                  f"for it or give another out=") from None
            path.unlink(missing_ok=True)  # its writer is gone: take it over
    raise MoesimError(f"out={path.parent}: could not take {LOCK}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def is_complete(run_dir) -> bool:
    """True when `run_dir` holds a finished run: summary.json (written last) and every other file."""
    d = Path(run_dir)
    return all((d / name).is_file() for name in FILES)


def read_run(run_dir) -> dict:
    """{"dir", "summary", "config", "steps", "layers", "experts", "timeline_path"} of a complete run ("experts"
    and "timeline_path" are None where the run has no experts.parquet or timeline.json). Raises MoesimError naming the file when one is missing or
    malformed. The timeline is not parsed (it can be large)."""
    d = Path(run_dir)
    if not d.is_dir():
        raise MoesimError(f"{d}: no such results directory")
    for name in FILES:
        if not (d / name).is_file():
            hint = " (summary.json is written last: the run did not finish)" if name == SUMMARY else ""
            raise MoesimError(f"{d / name}: missing{hint}")
    path = d / SUMMARY
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MoesimError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:  # a stranger's file nested thousands deep
        raise MoesimError(f"{path}: JSON nested too deeply") from None
    if not isinstance(summary, dict):
        raise MoesimError(f"{path}: expected a JSON object, got {type(summary).__name__}")
    for key in SUMMARY_OBJECTS:  # a stranger's summary.json: the shapes the reports read, or one clear error
        if summary.get(key) is not None and not isinstance(summary[key], dict):
            raise MoesimError(f"{path}: field {key!r} must be a JSON object, got {type(summary[key]).__name__}")
    for key, value in summary.items():
        if key in SUMMARY_TEXT and value is not None and not isinstance(value, str):
            raise MoesimError(f"{path}: field {key!r} must be text, got {type(value).__name__}")
    from .files import read_yaml

    path = d / CONFIG
    try:
        config = read_yaml(path)
    except ValueError as e:
        raise MoesimError(f"{path}: {e}") from None
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise MoesimError(f"{path}: expected a mapping, got {type(config).__name__}")
    return {"dir": d, "summary": summary, "config": config,
            "steps": _read_table(d / STEPS, STEPS_TABLE_COLUMNS),
            "layers": _read_table(d / LAYERS, LAYERS_TABLE_COLUMNS),
            "experts": _read_table(d / EXPERTS, EXPERTS_TABLE_COLUMNS) if (d / EXPERTS).is_file() else None,
            "timeline_path": d / TIMELINE if (d / TIMELINE).is_file() else None}


def _read_table(path: Path, columns: tuple[str, ...]):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise MoesimError(f"{path}: not a readable parquet file ({' '.join(str(e).split())})") from None
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise MoesimError(f"{path}: column(s) {missing} missing; expected {list(columns)}")
    return table.to_pandas()


def default_run_dir(name: str, root="reports/runs") -> Path:
    """A new, empty directory `<root>/<YYYYmmdd-HHMMSS>-<name>` (suffix -2, -3, ... if taken). It is created
    here, with an exclusive mkdir, so two runs started in the same second never share one."""
    slug = re.sub(r"[^A-Za-z0-9._+-]+", "-", str(name)).strip("-.") or "run"
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    base = f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}"
    for i in range(1, 10_000):
        path = root / (base if i == 1 else f"{base}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise MoesimError(f"{root}: could not create a new run directory named {base}-N")


def write_not_applicable(run_dir, config: dict, strategy: str, reason: str) -> Path:
    """Mark `run_dir` as a cell whose strategy cannot run on its input (moesim.errors.NotApplicable)."""
    body = {"strategy": strategy, "not_applicable": reason, "config": config}
    return atomic_write_text(Path(run_dir) / NOT_APPLICABLE, json.dumps(body, indent=1, default=str) + "\n")


def read_not_applicable(run_dir) -> dict:
    """A not-applicable cell as read_run's dict: its summary holds the strategy, the reason and the settings a
    comparison shows; no steps or layers."""
    d = Path(run_dir)
    path = d / NOT_APPLICABLE
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
        config, strategy, reason = body["config"], str(body["strategy"]), str(body["not_applicable"])
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise MoesimError(f"{path}: not a not-applicable record ({type(e).__name__}: {e})") from None
    summary = {"strategy": strategy, "not_applicable": reason, "budget": {"requested": str(config.get("budget"))},
               "scope": config.get("scope"), "hardware": config.get("hardware"), "backend": None,
               "trace": {"name": config.get("trace")}, "bound": False}
    return {"dir": str(d), "summary": summary, "config": config, "steps": None, "layers": None, "experts": None,
            "timeline_path": None}


def read_result(run_dir) -> dict:
    """A sweep cell as a comparison reads it: the run (read_run) or, where its strategy could not run on the
    input, the not-applicable record (read_not_applicable)."""
    d = Path(run_dir)
    if not is_complete(d) and (d / NOT_APPLICABLE).is_file():
        return read_not_applicable(d)
    return read_run(d)
