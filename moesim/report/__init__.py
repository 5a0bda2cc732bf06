"""HTML reports of results directories. `python -m moesim report DIR... [out=FILE]`.

    python -m moesim report reports/runs/20250101-120000-lru      # one run -> its report.html
    python -m moesim report reports/sweeps/budget+strategy-1a2b3c  # a sweep's root -> comparison report
    python -m moesim report runA runB runC out=cmp.html             # several runs -> comparison report

A report is one self-contained HTML file: figures are inline PNG (`data:` URIs), styles are inline, there
is no script and nothing is fetched from the network. It is rebuilt from results directories alone
(moesim.results.read_run). Every string that comes from a trace or a config goes through jinja2's
autoescape, so a model named `<script>...` is shown as text.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..api import disk_rows, machine_label, ms_text
from ..errors import MoesimError
from ..files import atomic_write_text
from ..results import CONFIG, FILES, NOT_APPLICABLE, SUMMARY, is_complete, read_result, read_run
from . import plots
from .tables import (best_per_setting, comparison_table, expert_matrix, expert_use, flatten, pareto_front,
                     varied_keys)

__all__ = ["build_report", "build_run_report", "build_comparison_report", "write_run_report",
           "collect_runs", "expert_use", "version_info", "report_command"]

GIB = 2**30
REPORT = "report.html"


# --------------------------------------------------------------------------------------------- helpers
@lru_cache(maxsize=1)
def version_info() -> dict:
    """{"version": moesim's version, "commit": the git commit of the checkout moesim runs from, or "unknown"
    (an installed package, no git, or moesim not at the top of that repository)}."""
    from .. import __version__

    src = Path(__file__).resolve().parents[2]  # the directory holding the moesim package
    commit = "unknown"
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=src, capture_output=True,
                             text=True, timeout=5)
        lines = top.stdout.split()
        if top.returncode == 0 and len(lines) == 2 and Path(lines[0]).resolve() == src:
            commit = lines[1]
    except (OSError, subprocess.SubprocessError):
        pass
    return {"version": __version__, "commit": commit}


def _built() -> dict:
    return {**version_info(), "time": time.strftime("%Y-%m-%d %H:%M:%S %z")}


def _environment():
    import jinja2

    return jinja2.Environment(loader=jinja2.PackageLoader("moesim", "report"), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def _write_html(path: Path, template: str, **context) -> Path:
    html = _environment().get_template(template).render(built=_built(), **context)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, html)  # atomic: a half-written report never sits under the final name
    return path


def _fmt(x, spec: str = ".4g", scale: float = 1.0, unit: str = "") -> str:
    """A number for a table cell; '-' where undefined (None, NaN)."""
    if x is None or isinstance(x, str):
        return "-" if x is None else x
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if np.isnan(v):
        return "-"
    return f"{v / scale:{spec}}{unit}"


def _value(v) -> str:
    return json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else "-" if v is None else str(v)


def _g(d: dict, *path, default=None):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return default
        d = d[p]
    return d


# ---------------------------------------------------------------------------------------------- inputs
def _looks_like_run(d: Path) -> bool:
    return any((d / name).exists() for name in (*FILES, NOT_APPLICABLE))


def collect_runs(dirs) -> tuple[str, list[dict], Path | None]:
    """("run" | "comparison", runs as read by read_run, the root when one sweep root was given).

    One directory that is a run -> "run". A directory holding run directories (a sweep's root) and several
    directories -> "comparison" of every complete run in them; incomplete ones are skipped with a warning
    on stderr (a sweep still running, or killed)."""
    dirs = [Path(d) for d in dirs]
    if not dirs:
        raise MoesimError("report: name at least one results directory: python -m moesim report DIR... [out=FILE]")
    runs, root = [], None
    for d in dirs:
        if not d.is_dir():
            raise MoesimError(f"{d}: no such results directory")
        if _looks_like_run(d):
            runs.append(read_run(d))  # a named run must be complete: read_run says what is missing
            continue
        cells = sorted(c for c in d.iterdir() if c.is_dir() and not c.name.startswith(".") and _looks_like_run(c))
        done = [c for c in cells if is_complete(c) or (c / NOT_APPLICABLE).is_file()]
        for c in cells:
            if c not in done:
                print(f"moesim: report: skipping {c}: incomplete (no {SUMMARY}; still running or killed)",
                      file=sys.stderr)
        if not done:
            raise MoesimError(f"{d}: neither a results directory ({', '.join(FILES)}) nor a sweep root "
                              "holding complete results directories")
        runs += [read_result(c) for c in done]
        root = d if len(dirs) == 1 else None
    kind = "run" if len(dirs) == 1 and root is None else "comparison"
    return kind, runs, root


def build_report(dirs, out=None) -> Path:
    """The report of `dirs` (see collect_runs) written to `out` (default: DIR/report.html for one run or one
    sweep root, reports/comparison-<time>.html for several). Returns its path."""
    kind, runs, root = collect_runs(dirs)
    if kind == "run":
        return build_run_report(runs[0], out)
    if out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = root / REPORT if root is not None else Path("reports") / f"comparison-{stamp}.html"
    return build_comparison_report(runs, out, root=root)


# ------------------------------------------------------------------------------------------- run report
def write_run_report(run_dir) -> Path:
    """Write `run_dir`/report.html from the results directory (what `run` calls once the run is written)."""
    return build_run_report(read_run(run_dir))


def _experts(run: dict) -> tuple[np.ndarray | None, str]:
    """(matrix [layers, experts] or None, a sentence saying where it came from). Only the directory's own
    experts.parquet: a results directory comes from others, and a report never opens a file it names."""
    if run["experts"] is not None:
        return expert_matrix(run["experts"]), "Tokens that chose each expert, per layer (experts.parquet)."
    return None, "Expert use was not recorded: the results directory has no experts.parquet."


def _hardware(run: dict) -> tuple[list, str]:
    recorded = run["summary"].get("hardware_profile")
    if isinstance(recorded, dict):
        return [(k, _value(v)) for k, v in recorded.items()], "As recorded with the run."
    name = str(run["config"].get("hardware", run["summary"].get("hardware")))
    from ..hardware import HOSTS, PRESETS, load_hardware

    gpu, _, host = name.partition("+")
    if gpu not in PRESETS or (host and host not in HOSTS):  # a profile file: a report opens none it is told of
        return [], f"Profile {name}: the run did not record its numbers, and a report does not open files it names."
    try:
        profile = load_hardware(name)
    except (MoesimError, OSError) as e:
        return [], f"Profile {name}: the run did not record its numbers, and it cannot be loaded here ({e})."
    return ([(k, _value(v)) for k, v in profile.to_dict().items()],
            f"Profile {name} as loaded now (a preset; the run recorded its name, not its numbers).")


def _plan_rows(s: dict) -> tuple[list, list]:
    """The VRAM plan's rows and the split of a step's time (summary.json's vram_plan, step_ms_split)."""
    plan, split = s.get("vram_plan"), s.get("step_ms_split")
    plan_rows, split_rows = [], []
    if isinstance(plan, dict):
        names = (("non-expert weights", "weights"), ("KV cache", "kv_cache"), ("activation workspace", "workspace"),
                 ("runtime reserve", "reserve"), ("expert cache", "experts"), ("stream scratch", "scratch"),
                 ("total", "total"), ("card", "card"))
        plan_rows = [(k, _fmt(plan.get(f), ".2f", GIB, " GiB")) for k, f in names]
        plan_rows.insert(2, ("KV cache holds", f"{plan.get('context')} tokens x {plan.get('batch')} sequences"))
        if not plan.get("whole_model"):
            plan_rows.append(("note", "the model spec does not describe attention or embeddings: experts only"))
    if isinstance(split, dict):
        names = (("dense part (attention, dense layers, LM head)", "dense"), ("expert compute", "expert_compute"),
                 ("stall (waiting for copies)", "stall"), ("other (host experts not hidden, replay's own)", "other"),
                 ("host compute (overlaps)", "host_compute"), ("copy engine busy (overlaps)", "copies"))
        split_rows = [(k, _fmt(split.get(f), ".3f", 1, " ms")) for k, f in names]
    return plan_rows, split_rows


def build_run_report(run, out=None) -> Path:
    """Write the report of one run (a dict from read_run, or its directory) to `out` (default
    <run dir>/report.html). Returns its path."""
    if not isinstance(run, dict):
        run = read_run(run)
    s, d = run["summary"], Path(run["dir"])
    lat = s.get("latency_ms") or {}
    budget = s.get("budget") or {}
    trace = s.get("trace") or {}
    strategy = str(s.get("strategy"))
    summary_rows = [
        ("strategy", strategy + ("  (bound: not deployable)" if s.get("bound") else "")),
        ("trace", f"{trace.get('name')}: {trace.get('tokens')} tokens, {trace.get('steps')} steps, "
                  f"{trace.get('sequences')} sequences"),
        ("budget", f"{budget.get('requested')}: {budget.get('slots')} slots "
                   f"({_fmt(budget.get('bytes'), '.2f', GIB, ' GiB')}), scope {s.get('scope')}"),
        ("hardware / backend", machine_label(s)),
        ("hit rate", f"{_fmt(s.get('hit_rate'), '.4f')} ({s.get('hits')} of {s.get('requests')} expert requests)"
         + ("" if s.get("belady_hit_rate") is None
            else f"; Belady's at this budget: {_fmt(s['belady_hit_rate'], '.4f')}")),
        ("loads / prefetch loads / evictions", f"{s.get('loads')} / {s.get('prefetch_loads')} / {s.get('evictions')}"),
        ("host computes", _value(s.get("host_computes"))),
        ("streamed (copied into scratch, computed, dropped)", _value(s.get("streams"))),
        ("bytes host->device", f"{_fmt(s.get('bytes_h2d'), '.3f', GIB, ' GiB')} "
                               f"(at {_fmt(s.get('h2d_gbps'), '.1f', 1, ' GB/s')} while copying)"),
        ("copy time hidden under compute", _fmt(s.get("overlap"), ".1%")),
        ("tokens/s", _fmt(s.get("tokens_per_s"), ".1f")),
        ("latency per token p50 / p90 / p99 / mean",
         " / ".join(_fmt(lat.get(q), ".2f") for q in ("p50", "p90", "p99", "mean")) + " ms"),
        ("stall", ms_text(s.get("stall_ms"))),
        ("wall time", ms_text(s.get("wall_ms"))),
        ("peak device memory", _fmt(s.get("peak_device_bytes"), ".2f", GIB, " GiB") + " (expert slots and shared "
                               "experts)"),
    ]
    if s.get("decode_tokens_per_s") is not None:
        summary_rows.insert(10, ("decode tokens/s", _fmt(s.get("decode_tokens_per_s"), ".1f")
                                 + ("" if s.get("whole_model") else " (MoE layers only)")))
    ttft = s.get("ttft_ms")
    if isinstance(ttft, dict):
        summary_rows.insert(10, ("time to first token p50 / p90", " / ".join(_fmt(ttft.get(q), ".1f") for q in
                                                                            ("p50", "p90"))
                                 + f" ms over {ttft.get('sequences')} prompts"))
    summary_rows += disk_rows(s.get("disk"))
    for note in s.get("notes") or []:  # budget=auto's scope, a forced plan over the card
        summary_rows.append(("note", str(note)))
    matrix, experts_note = _experts(run)
    plan_rows, split_rows = _plan_rows(s)
    figures = {"latency": plots.latency_distribution(run["steps"], lat), "stall": plots.layer_stall(run["layers"]),
               "bandwidth": plots.bandwidth_over_time(run["steps"]),
               "experts": plots.expert_heatmap(matrix) if matrix is not None else None}
    source = trace.get("source") or {}
    trace_rows = [("name", _value(trace.get("name"))), ("file", _value(trace.get("path"))),
                  ("tokens / steps / sequences",
                   f"{trace.get('tokens')} / {trace.get('steps')} / {trace.get('sequences')}")]
    trace_rows += [(f"source: {k}", _value(v)) for k, v in flatten(source).items()] or [("source", "not recorded")]
    if not any(k.lower().startswith("licen") for k in flatten(source)):
        trace_rows.append(("licence", "not recorded in the trace"))
    hardware_rows, hardware_note = _hardware(run)
    ran_with = s.get("moesim")
    software_rows = [
        ("run by", f"moesim {ran_with.get('version')} (commit {ran_with.get('commit')})" if isinstance(ran_with, dict)
         else "not recorded in summary.json"),
        ("report built by", f"moesim {version_info()['version']} (commit {version_info()['commit']})"),
    ]
    out = Path(out) if out is not None else d / REPORT
    return _write_html(
        out, "run.html.j2", title=f"moesim run: {strategy}, budget {budget.get('requested')}, {trace.get('name')}",
        run_dir=str(d.resolve()), bound=bool(s.get("bound")), strategy=strategy, summary_rows=summary_rows,
        figures=figures, experts_note=experts_note, trace_rows=trace_rows,
        model_rows=[(k, _value(v)) for k, v in (s.get("model") or {}).items()],
        hardware_rows=hardware_rows, hardware_note=hardware_note, software_rows=software_rows,
        plan_rows=plan_rows, split_rows=split_rows,
        config_text=(d / CONFIG).read_text(encoding="utf-8", errors="replace"))


# ------------------------------------------------------------------------------------ comparison report
TABLE_COLUMNS = (  # (heading, column, format, scale)
    ("hit rate", "hit_rate", ".4f", 1), ("tokens/s", "tokens_per_s", ".1f", 1),
    ("p50 ms", "latency_p50_ms", ".2f", 1), ("p99 ms", "latency_p99_ms", ".2f", 1),
    ("stall s", "stall_ms", ".2f", 1e3), ("moved GiB", "bytes_h2d", ".2f", GIB),
    ("peak device GiB", "peak_device_bytes", ".2f", GIB),
)


def build_comparison_report(runs: list, out, root=None, title: str | None = None, failed=()) -> Path:
    """Write the comparison report of `runs` (dicts from read_run, or their directories) to `out`; `failed`:
    (cell, error) of a sweep's cells that failed, listed with their errors."""
    runs = [r if isinstance(r, dict) else read_run(r) for r in runs]
    table = comparison_table(runs)
    best = best_per_setting(table)
    best_runs = {row["run"] for b in best for row in b["best"]}

    def brief(row) -> dict:
        return {"label": row["label"], "tokens_per_s_text": _fmt(row["tokens_per_s"], ".1f"),
                "hit_rate_text": _fmt(row["hit_rate"], ".3f")}

    best_text = [{"setting": b["setting"], "best": [brief(x) for x in b["best"]],
                  "bounds": [brief(x) for x in b["bounds"]]} for b in best]
    configs = [r["config"] for r in runs]
    varied = varied_keys(configs)
    other = [k for k in varied if not k.startswith("strategy.") and k != "budget"]  # budget has its columns
    head = ["run", "strategy", *other, "budget", "slots", *(h for h, *_ in TABLE_COLUMNS)]
    rows = []
    for _, r in table.iterrows():
        na = f" (not applicable: {r['not_applicable']})" if r["not_applicable"] else ""
        cells = [{"text": r["run"], "num": False},
                 {"text": r["label"] + (" (bound)" if r["bound"] else "") + na, "num": False}]
        cells += [{"text": r[f"cfg.{k}"], "num": False} for k in other]
        cells += [{"text": r["budget"], "num": False}, {"text": _fmt(r["budget_slots"], ".0f"), "num": True}]
        cells += [{"text": _fmt(r[col], spec, scale), "num": True} for _, col, spec, scale in TABLE_COLUMNS]
        rows.append({"cells": cells, "bound": bool(r["bound"]), "best": r["run"] in best_runs})
    front = pareto_front(np.where(table["bound"], np.nan, table["peak_device_bytes"].to_numpy(float)),
                         table["tokens_per_s"].to_numpy(float))
    figures = {"hit_rate": plots.hit_rate_vs_budget(table), "speed": plots.speed_vs_memory(table, front),
               "bytes": plots.bytes_moved(table)}
    common = {k: v for k, v in flatten(configs[0]).items() if k not in varied and k != "out"} if configs else {}
    sources = [_g(r["summary"], "trace", "source") or {} for r in runs]
    licences = sorted({_value(v) for src in sources for k, v in flatten(src).items() if k.lower().startswith("licen")})
    provenance_rows = [
        ("traces", ", ".join(sorted(set(table["trace"])))),
        ("trace licences", ", ".join(licences) or "not recorded in the traces"),
        ("models", ", ".join(sorted(set(table["model"])))),
        ("hardware profiles", ", ".join(sorted(set(table["hardware"])))),
        ("backends", ", ".join(sorted(set(table["backend"])))),
        ("report built by", f"moesim {version_info()['version']} (commit {version_info()['commit']})"),
    ]
    out = Path(out)
    if title is None:
        title = f"moesim sweep: {root.name}" if root is not None else f"moesim: comparison of {len(runs)} runs"
    return _write_html(
        out, "comparison.html.j2", title=title, n_runs=len(runs), root=str(Path(root).resolve()) if root else None,
        varied=[k for k in varied if not k.startswith("strategy.")]
        + (["strategy"] if any(k.startswith("strategy.") for k in varied) else []),
        best=best_text, table_head=head, table_rows=rows, figures=figures,
        provenance_rows=provenance_rows, common_config="\n".join(f"{k}: {_value(v)}" for k, v in common.items()),
        failed=list(failed),
        dirs=[str(Path(r["dir"]).resolve()) for r in runs])


# ------------------------------------------------------------------------------------------------- CLI
def report_command(args: list[str]) -> Path:
    """`python -m moesim report DIR... [out=FILE]`: arguments are results directories, and key=value options
    of moesim/conf/report.yaml (an existing directory is a directory even if its name holds a `=`)."""
    from ..__main__ import compose

    dirs = [a for a in args if Path(a).exists() or "=" not in a]
    cfg = compose("report", [a for a in args if a not in dirs])
    path = build_report(dirs, out=cfg.out)
    print(f"report: {path}")
    return path


report_command.raw_args = True  # the CLI hands over the arguments as given (directories are not key=value)
