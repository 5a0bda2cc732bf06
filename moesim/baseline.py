"""Regression baselines: the deterministic results of a grid of runs, committed as JSON, checked in CI.

    python -m moesim.baseline write out=baseline.json trace=my.moetrace.safetensors [strategies=lru,mine.yaml]
    python -m moesim.baseline check baseline.json            # exit 1 and a table of what changed
    python -m moesim.baseline project                        # regenerate tests/baseline/*.json (tox -e baseline)

`write` replays the first `tokens` tokens (or `sequences` sequences) of a trace through every strategy at
every budget with the simulated backend, and keeps per cell the counts (hits, misses, loads, bytes moved,
prefetches, stall-free requests) and the simulated times (tokens/s, stall, per-token latency p50/p99). The
file records how it was made (trace, subset, strategies, budgets, other `run` options, a fingerprint of the
trace's routing), so `check` repeats exactly that grid and compares: counts exactly, times with a relative
tolerance of 1e-9 (the sim is pure floating-point arithmetic: equal code gives equal numbers; the tolerance
only forgives a different order of float operations on another platform). A cell that fails keeps its error
message, which is compared too. `strategies=all` means every config in moesim/conf/strategy/, read when the
grid runs, so a strategy added later shows as a new cell until the baseline is written again.

A cell is `moesim.api.run(cfg, write=False)`: what `python -m moesim run` does, on a temporary file of
the subset (compiled where moesim/core covers the run, `fast=auto`; add fast=false for the Python driver).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

from .api import strategy_names  # noqa: F401  (also this module's: tests and callers use it)
from .errors import MoesimError

FORMAT = "moesim-baseline"
FORMAT_VERSION = 1
BUDGETS = ("12.5%", "25%", "50%")
RTOL = 1e-9  # relative tolerance of the simulated times
COUNTS = ("requests", "hits", "misses", "loads", "prefetch_loads", "evictions", "host_computes", "streams", "bytes_h2d",
          "prefetch_bytes_h2d", "prefetch_used", "wasted_prefetches", "late_prefetches", "stall_free_requests")
TIMES = ("tokens_per_s", "stall_ms", "latency_p50_ms", "latency_p99_ms")
# The project's own baselines (tests/baseline/<name>.json, checked by tests/test_baseline.py): every built-in
# strategy as its config says (its own scope where it names one: llama_cpp_ncmoe and layer_offload run in one
# global pool). The subsets are small so that the test takes under a minute on 2 cores: half the
# strategies have no compiled path and replay under 1,000 tokens/s in the Python loop, at three budgets each.
PROJECT_STRATEGIES = ["all"]
PROJECT = {
    # the default synthetic trace (fitted to gpt-oss-20b): its first 2 sequences, 483 decode tokens
    "synthetic": {"trace": "gpt-oss-like", "sequences": 2, "strategies": PROJECT_STRATEGIES},
    # the real gpt-oss-20b trace shipped in traces/: its first 600 decode tokens, the first file (511) and 89 of the second
    "gpt-oss-20b": {"trace": "gpt-oss-20b", "tokens": 600, "strategies": PROJECT_STRATEGIES},
}
PROJECT_DIR = Path("tests") / "baseline"  # relative to the repository root (the working directory)
_SUBSET_KEYS = ("tokens", "sequences")
_OWN_KEYS = ("out", "trace", "strategies", "budgets") + _SUBSET_KEYS


# --------------------------------------------------------------------------------------------- the grid
def resolve_strategies(value) -> list[str]:
    """The grid's strategy entries from `all`, names, strategy config files (.yaml), each optionally followed
    by run options for that strategy alone (`llama_cpp_ncmoe scope=global`); a list or comma-separated text."""
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [" ".join(str(x).split()) for x in items if str(x).strip()]
    if not items:
        raise MoesimError("strategies: empty; give `all` or names like lru,lfu")
    known = strategy_names()
    out: list[str] = []
    for item in items:
        name, *options = item.split()
        _check_overrides(options, f"strategies: {item!r}")
        if name == "all":
            out += [" ".join([n, *options]) for n in known]
        elif name.endswith((".yaml", ".yml")):
            if not Path(name).is_file():
                raise MoesimError(f"strategies: {name}: no such strategy config file")
            out.append(item)
        elif name in known:
            out.append(item)
        else:
            raise MoesimError(f"strategies: unknown strategy {name!r}; built-in: {', '.join(known)}, or a .yaml "
                              f"file like moesim/conf/strategy/lru.yaml (name, cache, prefetch, offload)")
    return out


# a baseline's run options are plain values of run options: a baseline file comes from others, and an override
# of `_target_` (or a list, dict or ${...} interpolation) would make Hydra build or read what the file names
_PLAIN_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z][A-Za-z0-9_]*)*")  # no _target_, _args_, +, ~, @
_PLAIN_VALUE = re.compile(r"[A-Za-z0-9_.%+:/ -]*")  # no ${...}, [lists], {dicts}, quotes


def _check_overrides(options: list[str], where: str) -> None:
    for o in options:
        key, sep, value = o.partition("=")
        if not sep:
            raise MoesimError(f"{where}: {o!r} is not a run option (key=value)")
        if key.lstrip("+~") in ("strategy", "budget", "trace"):
            raise MoesimError(f"{where}: {o}: give strategies= and budgets= (lists) instead; the trace is trace=")
        if not _PLAIN_KEY.fullmatch(key) or key.split(".")[0] == "hydra" or not _PLAIN_VALUE.fullmatch(value):
            raise MoesimError(f"{where}: {o!r}: a baseline takes plain values of run options (key.sub=value of "
                              "letters, digits and _ . % + : / -; no _target_, hydra, lists or ${...})")


def subset(trace, tokens: int | None = None, sequences: int | None = None):
    """The first `tokens` tokens and/or the tokens before the (`sequences` + 1)-th sequence starts (the first
    `sequences` sequences of a batch-1 trace), cut at a step boundary."""
    end = trace.n_tokens
    for name, n in (("tokens", tokens), ("sequences", sequences)):
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise MoesimError(f"{name}={n!r}: expected a whole number >= 1 (or leave it out: the whole trace)")
    if tokens is not None:
        end = min(end, tokens)
    if sequences is not None:
        seq = np.asarray(trace.seq)
        _, first = np.unique(seq, return_index=True)  # each sequence's first token
        firsts = np.sort(first)
        if len(firsts) > sequences:
            end = min(end, int(firsts[sequences]))
    starts = trace.step_starts
    end = int(starts[np.searchsorted(starts, end, side="right") - 1])  # whole steps only
    if end == 0:
        raise MoesimError(f"tokens={tokens}, sequences={sequences}: the subset holds no whole step of the trace "
                          f"(its first step has {int(starts[1]) if len(starts) > 1 else 0} tokens)")
    return trace if end == trace.n_tokens else trace.slice_tokens(0, end)


def fingerprint(trace) -> str:
    """sha256 of what the replay reads from a trace: expert ids, steps, sequences, phases, and the model. The
    whole-model fields (moesim.whole.WHOLE_FIELDS) count only where set, so a trace whose model describes its
    experts only keeps the fingerprint it had before ModelSpec grew them."""
    from .whole import WHOLE_FIELDS

    blank = type(trace.spec)("", 1, 1, 1, 1, 1)  # every field at its default
    spec = {k: v for k, v in trace.spec.to_dict().items() if k not in WHOLE_FIELDS or v != getattr(blank, k)}
    h = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
    for a in (trace.experts, trace.step, trace.seq, trace.phase):
        arr = np.ascontiguousarray(a)
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(arr.tobytes())
    return "sha256:" + h.hexdigest()


def compose_strategy(strategy: str, trace_path: str, overrides: list[str]):
    """The `run` config of one strategy's cells (budget set per cell): moesim.api.compose_run, where a strategy
    given as a .yaml file replaces the `strategy` block. Composing costs ~0.2 s, so it is done once per
    strategy, not per cell."""
    from .api import compose_run

    cfg = compose_run(trace_path, strategy, overrides=overrides)
    backend = str(cfg.backend.get("_target_", ""))
    if not backend.endswith("backends.sim.SimBackend"):
        raise MoesimError(f"backend={backend}: a baseline needs the simulated backend (backend=sim): the times of "
                          f"real copies and FFNs differ from run to run")
    return cfg


def metrics_of(summary: dict) -> dict:
    """The baseline's numbers of one run's summary (as `api.run` returns it)."""
    flat = dict(summary)
    lat = summary.get("latency_ms") or {}
    flat["latency_p50_ms"], flat["latency_p99_ms"] = lat.get("p50"), lat.get("p99")
    return {k: flat.get(k) for k in COUNTS + TIMES}


def run_cell(cfg, budget: str) -> dict:
    """Metrics of the strategy of `cfg` (from compose_strategy) at `budget`, or {"error": message} where the
    run refuses it."""
    from omegaconf import OmegaConf

    from .api import run

    cfg = OmegaConf.create(OmegaConf.to_container(cfg))
    cfg.budget = str(budget)
    try:
        summary = run(cfg, write=False).summary
    except MoesimError as e:  # the message names the temporary subset file: say `<trace>` instead
        return {"error": str(e).replace(str(cfg.trace), "<trace>")}
    return metrics_of(summary)


def make_baseline(trace_value: str, strategies="all", budgets=BUDGETS, overrides=(), tokens: int | None = None,
                  sequences: int | None = None, trace=None, progress: bool = True) -> dict:
    """The baseline of a grid: `trace_value` as `trace=` takes it (or the Trace `trace`, already open), cut
    to `tokens` / `sequences`, every strategy x budget, `overrides` (run options) applied to every cell."""
    from .progress import progress as show

    from .importers import open_trace
    from .trace import save_trace

    names = resolve_strategies(strategies)
    budgets = [str(b).strip() for b in (budgets.split(",") if isinstance(budgets, str) else budgets) if str(b).strip()]
    if not budgets:
        raise MoesimError("budgets: empty; give budgets like 12.5%,25%,50% (shares), 192 (slots) or 4GiB")
    overrides = [str(o) for o in overrides]
    _check_overrides(overrides, "options")
    full = open_trace(str(trace_value)) if trace is None else trace
    part = subset(full, tokens, sequences)
    cells: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="moesim-baseline-") as tmp:
        path = str(save_trace(part, Path(tmp) / "subset.moetrace.safetensors"))  # what `run` opens
        bar = show(total=len(names) * len(budgets), desc="baseline", unit="cell", enabled=progress)
        for entry in names:
            name, *options = entry.split()
            cfg = compose_strategy(name, path, overrides + options)
            for b in budgets:
                cells.setdefault(entry, {})[b] = run_cell(cfg, b)
                bar.update()
        bar.close()
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "trace": str(trace_value), "tokens": tokens, "sequences": sequences,
        "strategies": strategies if isinstance(strategies, str) else list(strategies),
        "budgets": budgets, "overrides": overrides, "rtol": RTOL,
        "subset": {"tokens": part.n_tokens, "steps": part.n_steps, "sequences": part.n_seqs,
                   "model": part.spec.name, "fingerprint": fingerprint(part)},
        "cells": cells,
    }


# ------------------------------------------------------------------------------------------ comparing
def read_baseline(path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MoesimError(f"{path}: no such baseline file (write one: python -m moesim.baseline write out={path} "
                          f"trace=...)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise MoesimError(f"{path}: not a readable baseline JSON file ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise MoesimError(f"{path}: not a moesim baseline (expected \"format\": \"{FORMAT}\")")
    if data.get("format_version") != FORMAT_VERSION:
        raise MoesimError(f"{path}: baseline format version {data.get('format_version')!r}; this moesim reads "
                          f"{FORMAT_VERSION}: write it again")
    for key in ("trace", "strategies", "budgets", "overrides", "cells", "subset"):
        if key not in data:
            raise MoesimError(f"{path}: baseline lacks the field {key!r}")
    lists = {}
    for key in ("strategies", "budgets", "overrides"):  # as written: a list of strings, or one comma-separated
        v = data[key]
        lists[key] = v.split(",") if isinstance(v, str) else v
        if not isinstance(lists[key], list) or not all(isinstance(x, str) for x in lists[key]):
            raise MoesimError(f"{path}: {key} must be a list of strings")
    _check_overrides(lists["overrides"], f"{path}: overrides")  # a received file must not build or read anything
    for entry in lists["strategies"]:
        _check_overrides(entry.split()[1:], f"{path}: strategies: {entry!r}")
    return data


def write_baseline(data: dict, path) -> Path:
    """Write atomically, one number per line, so that an intended change is a readable diff."""
    from .files import atomic_write_text

    return atomic_write_text(path, json.dumps(data, indent=2, allow_nan=True) + "\n")


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _same(a, b, rtol: float, exact: bool) -> bool:
    if exact or not (_number(a) and _number(b)):
        return a == b
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= rtol * max(abs(a), abs(b))


def compare(baseline: dict, current: dict) -> list[tuple[str, str, str, object, object]]:
    """Differences (strategy, budget, field, baseline value, current value): cells present in one only
    ("(cell)"), a different trace subset ("(trace)"), and every metric not equal (counts and errors exactly,
    times within the baseline's rtol)."""
    rtol = float(baseline.get("rtol", RTOL))
    diffs = []
    old_fp, new_fp = baseline["subset"].get("fingerprint"), current["subset"].get("fingerprint")
    if old_fp != new_fp:
        diffs.append(("(trace)", "", "fingerprint", old_fp, new_fp))
    old, new = baseline["cells"], current["cells"]
    for s in list(old) + [s for s in new if s not in old]:
        budgets = list(old.get(s, {})) + [b for b in new.get(s, {}) if b not in old.get(s, {})]
        for b in budgets:
            a, c = old.get(s, {}).get(b), new.get(s, {}).get(b)
            if a is None or c is None:
                diffs.append((s, b, "(cell)", "absent" if a is None else "present", "absent" if c is None else "present"))
                continue
            for key in list(a) + [k for k in c if k not in a]:
                if not _same(a.get(key), c.get(key), rtol, exact=key not in TIMES):
                    diffs.append((s, b, key, a.get(key), c.get(key)))
    return diffs


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.10g}"
    text = str(v)
    return text if len(text) <= 60 else text[:57] + "..."


def difference_table(diffs) -> str:
    """A text table of `compare`'s differences, with the relative change of numbers."""
    rows = [("strategy", "budget", "field", "baseline", "now", "change")]
    for s, b, key, a, c in diffs:
        change = ""
        if _number(a) and _number(c) and a:
            rel = (c - a) / abs(a)
            change = f"{rel:+.3%}" if abs(rel) >= 1e-5 else f"{rel:+.2e}"
        rows.append((s, b, key, _fmt(a), _fmt(c), change))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip() for r in rows)


def check(baseline_path, trace_value: str | None = None, trace=None, progress: bool = True):
    """(differences, current baseline) of the grid recorded in `baseline_path`, run again now (on
    `trace_value` or the open Trace `trace` instead of the recorded trace, when given)."""
    old = read_baseline(baseline_path)
    current = make_baseline(trace_value or old["trace"], old["strategies"], old["budgets"], old["overrides"],
                            old.get("tokens"), old.get("sequences"), trace=trace, progress=progress)
    current["trace"] = old["trace"]  # where the trace was found this time is not a result
    return compare(old, current), current


def failure_message(path, diffs, regenerate: str) -> str:
    n = len({(s, b) for s, b, *_ in diffs})
    return (f"{path}: {len(diffs)} difference(s) in {n} cell(s) against the committed baseline "
            f"(counts exact, times within rtol {RTOL:g}):\n{difference_table(diffs)}\n"
            f"If the change is intended, regenerate and commit the baseline: {regenerate}")


# ------------------------------------------------------------------------------------------------ CLI
USAGE = """usage:
  python -m moesim.baseline write out=FILE trace=TRACE [tokens=N] [sequences=N] [strategies=all|a,b,my.yaml]
                                  [budgets=12.5%,25%,50%] [KEY=VALUE ...]   (any `run` option, e.g. hardware=h200)
  python -m moesim.baseline check FILE [trace=TRACE]     exit 1 with a table of differences, 0 when equal
  python -m moesim.baseline project [NAME ...]            regenerate tests/baseline/*.json (tox -e baseline)"""


def _parse(args: list[str]) -> tuple[dict, list[str], list[str]]:
    """({own key: value}, run overrides, positional arguments)."""
    own, overrides, positional = {}, [], []
    for a in args:
        key, sep, value = a.partition("=")
        if not sep:
            positional.append(a)
        elif key in _OWN_KEYS or key == "baseline":
            own[key] = value
        else:
            overrides.append(a)
    for key in _SUBSET_KEYS:
        if key in own:
            try:
                own[key] = int(own[key])
            except ValueError:
                raise MoesimError(f"{key}={own[key]!r}: expected a whole number") from None
    return own, overrides, positional


def _cells_line(data: dict) -> str:
    cells = [c for v in data["cells"].values() for c in v.values()]
    refused = sum("error" in c for c in cells)
    return (f"{len(cells)} cells ({len(data['cells'])} strategies x {len(data['budgets'])} budgets)"
            + (f", {refused} refused by the run (their messages are in the file)" if refused else ""))


def write_command(args: list[str]) -> int:
    own, overrides, positional = _parse(args)
    if positional or "out" not in own or "trace" not in own:
        raise MoesimError(f"write needs out=FILE and trace=TRACE (got {' '.join(args) or 'nothing'})\n{USAGE}")
    data = make_baseline(own["trace"], own.get("strategies", "all"), own.get("budgets", ",".join(BUDGETS)),
                         overrides, own.get("tokens"), own.get("sequences"))
    path = write_baseline(data, own["out"])
    print(f"{path}: {_cells_line(data)} on {data['subset']['tokens']} tokens of {own['trace']}")
    return 0


def write_command_line(data: dict, path) -> str:
    """The `write` command that makes the baseline `data` again, into `path`."""
    import shlex

    strategies = data["strategies"] if isinstance(data["strategies"], str) else ",".join(data["strategies"])
    words = ["python -m moesim.baseline write", f"out={path}", f"trace={data['trace']}"]
    words += [f"{k}={data[k]}" for k in _SUBSET_KEYS if data.get(k) is not None]
    words += [f"strategies={strategies}", f"budgets={','.join(data['budgets'])}", *data["overrides"]]
    return " ".join(words[:1] + [shlex.quote(w) for w in words[1:]])


def check_command(args: list[str]) -> int:
    own, overrides, positional = _parse(args)
    paths = positional + ([own["baseline"]] if "baseline" in own else [])
    if len(paths) != 1 or overrides or set(own) - {"baseline", "trace"}:
        raise MoesimError(f"check takes one baseline file and optionally trace=TRACE; the grid is the file's\n{USAGE}")
    diffs, current = check(paths[0], own.get("trace"))
    if diffs:
        print(failure_message(paths[0], diffs, write_command_line(read_baseline(paths[0]), paths[0])))
        return 1
    n = sum(len(v) for v in current["cells"].values())
    print(f"{paths[0]}: {n} cells equal to the baseline (counts exact, times within rtol {RTOL:g})")
    return 0


def project_command(args: list[str]) -> int:
    """Regenerate the project's baselines in tests/baseline/ (from the repository root)."""
    from .importers import SHIPPED, SHIPPED_DIR
    from .synthetic import PRESETS

    names = args or list(PROJECT)
    unknown = [n for n in names if n not in PROJECT]
    if unknown:
        raise MoesimError(f"project: unknown baseline(s) {', '.join(unknown)}; known: {', '.join(PROJECT)}")
    if not Path("tests").is_dir():
        raise MoesimError(f"project: no tests/ folder under {Path.cwd()}: run from the repository root")
    for name in names:
        opts = dict(PROJECT[name])
        shipped = opts["trace"] in SHIPPED and (SHIPPED_DIR / SHIPPED[opts["trace"]][0]).is_file()
        if opts["trace"] not in PRESETS and not shipped and not Path(opts["trace"]).exists():
            print(f"moesim: warning: {opts['trace']} not present: {PROJECT_DIR / name}.json left as it is",
                  file=sys.stderr)
            continue
        data = make_baseline(opts.pop("trace"), **opts)
        path = write_baseline(data, PROJECT_DIR / f"{name}.json")
        print(f"{path}: {_cells_line(data)} on {data['subset']['tokens']} tokens")
    return 0


def baseline_command(argv: list[str]) -> int:
    """`python -m moesim baseline write|check|project ...` (the CLI turns MoesimError into one line, exit 2)."""
    commands = {"write": write_command, "check": check_command, "project": project_command}
    if not argv or argv[0] not in commands:
        print(USAGE, file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


baseline_command.raw_args = True  # subcommand and key=value pairs of its own, not one Hydra config
baseline_command.usage = USAGE


def main(argv: list[str] | None = None) -> int:
    """`python -m moesim.baseline ...`: the same as `python -m moesim baseline ...`."""
    from .__main__ import main as cli

    return cli(["baseline", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
