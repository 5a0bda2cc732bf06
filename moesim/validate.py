"""Hold the simulator against published measurements of real offloading systems: `python -m moesim validate`.

    python -m moesim validate                                # every case file of validation/cases/
    python -m moesim validate cases=[ktransformers]          # the files named (stem) or paths
    python -m moesim validate write_docs=true                # and write docs/validation.md from this run
    python -m moesim validate cases=[...] pin=tests/baseline/validation.json   # pin predictions for CI

A case file (validation/README.md gives the format) holds the rows of one published table: each row a
configuration the source measured (machine, model, formats, system, prompt and generation lengths) with its
published figure and citation, mapped onto run options. Each row is replayed with the whole-model simulation
(`python -m moesim run` with the row's options on a synthetic trace of the row's shape) and compared:
  per row     published vs predicted, relative error (predicted / published - 1) and factor (the larger of
              the two over the smaller);
  per table   whether moesim orders the rows as the source does (pairs in the published order / pairs with
              distinct published figures), and for each row its ratio to the table's first row, predicted vs
              published (ratio error = predicted ratio / published ratio - 1);
  overall     median absolute error, rows within a factor of 2, ratios within 15%, tables ranked right: the
              goals of issue 14, each reported as met or not.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import MoesimError
from .files import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]  # the repository (validation/ and docs/ live there)
CASES_DIR = ROOT / "validation" / "cases"
DOCS = ROOT / "docs" / "validation.md"
# decode_tokens_per_s: decode tokens over the decode steps' time; output_tokens_per_s: decode tokens over the whole
# run's time, prefill included (a harness that times generate()); prefill_tokens_per_s: prompt tokens over their
# time to first token; ttft_ms: its median; token_latency_ms: 1000 / decode_tokens_per_s; hit_rate: the cache's
# weight_gib: the whole model's weights as stored, GiB (a check of the formats' bytes)
METRICS = ("decode_tokens_per_s", "output_tokens_per_s", "prefill_tokens_per_s", "hit_rate", "ttft_ms",
           "token_latency_ms", "weight_gib")
GOAL_MEDIAN = 0.30  # median |relative error| of absolute figures
GOAL_FACTOR = 2.0  # every row within this factor
GOAL_RATIO = 0.15  # ratio between a table's configurations within this of the published ratio
_FILE_KEYS = {"source", "title", "citation", "url", "system", "metric", "trace", "options", "rows", "tables",
              "notes"}
_ROW_KEYS = {"id", "published", "machine", "options", "note", "metric", "trace", "citation"}
_TRACE_KEYS = {"preset", "path", "prompt", "decode", "batch", "sequences", "seed", "top_k", "prefill_chunk", "model"}
_GROUPS = ("strategy", "prefetch", "offload", "backend")  # Hydra config groups: their choice comes first


# ------------------------------------------------------------------------------------------- case files
@dataclass(frozen=True)
class Row:
    """One published figure and the run options that model its configuration."""

    id: str
    published: float
    metric: str
    options: dict  # run options, the file's merged with the row's
    trace: dict  # the trace shape, the file's merged with the row's
    machine: str = ""
    note: str = ""
    citation: str = ""


@dataclass(frozen=True)
class Table:
    id: str
    caption: str
    rows: tuple  # row ids, the first one the reference of the ratios
    note: str = ""  # why moesim does or does not reproduce it


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: one object per file read
class CaseFile:
    """One source: its citation, its rows and the tables that group them."""

    path: Path
    source: str
    title: str
    citation: str
    url: str
    system: str
    notes: str
    rows: tuple
    tables: tuple

    def row(self, row_id: str) -> Row:
        return next(r for r in self.rows if r.id == row_id)


def _text(d: dict, key: str, where: str, required: bool = False) -> str:
    v = d.get(key, "")
    if v is None:
        v = ""
    if not isinstance(v, str) or (required and not v.strip()):
        raise MoesimError(f"{where}: field {key!r} must be a {'non-empty ' if required else ''}string, got {v!r}")
    return v.strip()


def _mapping(d: dict, key: str, where: str) -> dict:
    v = d.get(key) or {}
    if not isinstance(v, dict):
        raise MoesimError(f"{where}: field {key!r} must be a mapping, got {type(v).__name__}")
    return v


def _unknown(d: dict, known: set, where: str) -> None:
    extra = sorted(set(map(str, d)) - known)
    if extra:
        raise MoesimError(f"{where}: unknown field(s) {extra}; known: {sorted(known)}")


def _entries(items: list, where: str):
    """(where[i], item) for each item of a list that must hold mappings."""
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise MoesimError(f"{where}[{i}]: expected a mapping, got {type(item).__name__}")
        yield f"{where}[{i}]", item


def _check_trace(t: dict, where: str) -> dict:
    _unknown(t, _TRACE_KEYS, where)
    if ("preset" in t) == ("path" in t):
        raise MoesimError(f"{where}: give exactly one of 'preset' (a synthetic preset) or 'path' (a trace file)")
    for k in ("prompt", "decode", "batch", "sequences", "seed", "top_k", "prefill_chunk"):
        v = t.get(k)
        least = 0 if k in ("prompt", "seed") else 1
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < least):
            raise MoesimError(f"{where}.{k}: expected an integer >= {least}, got {v!r}")
    if "preset" in t:
        from .synthetic import PRESETS

        if t["preset"] not in PRESETS:
            raise MoesimError(f"{where}.preset: unknown synthetic preset {t['preset']!r}; known: {', '.join(PRESETS)}")
    if t.get("model") is not None:
        from .models import MODEL_SPECS

        if "path" in t or str(t["model"]) not in MODEL_SPECS:
            raise MoesimError(f"{where}.model: expected a catalogue model ({', '.join(MODEL_SPECS)}) beside 'preset', "
                              f"got {t['model']!r}")
    return t


def load_case(path) -> CaseFile:
    """A case file, every field checked; errors name the file and the field."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MoesimError(f"{path}: no such case file") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise MoesimError(f"{path}: not a YAML file ({' '.join(str(e).split())})") from None
    where = str(path)
    if not isinstance(data, dict):
        raise MoesimError(f"{where}: expected a mapping (see validation/README.md), got {type(data).__name__}")
    _unknown(data, _FILE_KEYS, where)
    metric = data.get("metric", "decode_tokens_per_s")
    file_trace = _mapping(data, "trace", where)
    file_options = _mapping(data, "options", where)
    raw_rows = data.get("rows")
    if not isinstance(raw_rows, list) or not raw_rows:
        raise MoesimError(f"{where}: field 'rows' must be a non-empty list of rows")
    rows = []
    for at, r in _entries(raw_rows, f"{where}: rows"):
        _unknown(r, _ROW_KEYS, at)
        rid = _text(r, "id", at, required=True)
        at = f"{where}: row {rid!r}"
        if any(x.id == rid for x in rows):
            raise MoesimError(f"{at}: id used twice")
        pub = r.get("published")
        if isinstance(pub, bool) or not isinstance(pub, (int, float)) or not math.isfinite(pub) or pub <= 0:
            raise MoesimError(f"{at}: field 'published' must be a positive number, got {pub!r}")
        m = r.get("metric", metric)
        if m not in METRICS:
            raise MoesimError(f"{at}: metric {m!r} unknown; known: {', '.join(METRICS)}")
        trace = _check_trace({**file_trace, **_mapping(r, "trace", at)}, f"{at}: trace")
        rows.append(Row(id=rid, published=float(pub), metric=m, options={**file_options, **_mapping(r, "options", at)},
                        trace=trace, machine=_text(r, "machine", at), note=_text(r, "note", at),
                        citation=_text(r, "citation", at)))
    ids = [r.id for r in rows]
    by_metric: dict[str, list[str]] = {}  # no tables given: one per metric, of all its rows
    for r in rows:
        by_metric.setdefault(r.metric, []).append(r.id)
    raw_tables = data.get("tables") or [{"id": m, "rows": ids_} for m, ids_ in by_metric.items() if len(ids_) > 1]
    if not isinstance(raw_tables, list):
        raise MoesimError(f"{where}: field 'tables' must be a list")
    tables = []
    for at, t in _entries(raw_tables, f"{where}: tables"):
        _unknown(t, {"id", "caption", "rows", "note"}, at)
        members = t.get("rows")
        if not isinstance(members, list) or len(members) < 2:
            raise MoesimError(f"{at}: field 'rows' must list at least two row ids")
        missing = [m for m in members if m not in ids]
        if missing:
            raise MoesimError(f"{at}: row(s) {missing} not in the file; rows: {ids}")
        if len({rows[ids.index(m)].metric for m in members}) > 1:
            raise MoesimError(f"{at}: its rows measure different metrics; a table compares one")
        tables.append(Table(id=_text(t, "id", at, required=True), caption=_text(t, "caption", at),
                            rows=tuple(members), note=_text(t, "note", at)))
    return CaseFile(path=path, source=_text(data, "source", where) or path.stem, title=_text(data, "title", where),
                    citation=_text(data, "citation", where, required=True), url=_text(data, "url", where),
                    system=_text(data, "system", where), notes=_text(data, "notes", where), rows=tuple(rows),
                    tables=tuple(tables))


def case_paths(cases, cases_dir=None) -> list[Path]:
    """The case files `cases` names: `all`, or a list of stems (files of `cases_dir`) and paths."""
    folder = Path(cases_dir) if cases_dir else CASES_DIR
    if cases in (None, "all") or cases == ["all"]:
        if not folder.is_dir():
            raise MoesimError(f"validate: no case folder {folder} (the cases live in a clone's validation/cases/)")
        found = sorted(folder.glob("*.yaml"))
        if not found:
            raise MoesimError(f"validate: no case files (*.yaml) in {folder}")
        return found
    names = [cases] if isinstance(cases, str) else list(cases)
    out = []
    for n in map(str, names):
        p = Path(n)
        if p.suffix not in (".yaml", ".yml"):
            p = folder / f"{n}.yaml"
        if not p.is_file():
            known = ", ".join(sorted(x.stem for x in folder.glob("*.yaml"))) if folder.is_dir() else "none"
            raise MoesimError(f"validate: cases: no case file {str(p)!r}; known: {known}")
        out.append(p)
    return out


# ------------------------------------------------------------------------------------------- running
_traces: dict = {}  # trace shape (as JSON) -> Trace, within one process


def case_trace(shape: dict):
    """The trace a row replays: the synthetic preset's routing knobs at the row's shape (prompt and decode
    tokens per sequence, batch, sequences, seed; top_k: the model routing that many experts; model: another
    catalogue model routed with the preset's knobs, per-layer knobs stretched to its layers), or a file."""
    key = json.dumps(shape, sort_keys=True)
    if key in _traces:
        return _traces[key]
    if "path" in shape:
        from .api import load_trace

        tr = load_trace(shape["path"])
    else:
        from .models import model_spec
        from .synthetic import PRESETS, generate, resampled

        cfg, model = PRESETS[shape["preset"]]
        if shape.get("model"):
            model = str(shape["model"])
            cfg = resampled(cfg, model_spec(model).layers)
        changes = {"seed": shape.get("seed", cfg.seed), "sequences": shape.get("sequences", cfg.sequences),
                   "batch": shape.get("batch", cfg.batch),
                   "prefill_chunk": shape.get("prefill_chunk", cfg.prefill_chunk)}
        for k, knob in (("prompt", "prompt_tokens"), ("decode", "decode_tokens")):
            if k in shape:
                changes[knob] = (shape[k], shape[k])
        spec = model_spec(model)
        if shape.get("top_k"):
            if shape["top_k"] > spec.experts:
                raise MoesimError(f"trace.top_k: {shape['top_k']} is more than the model's {spec.experts} experts")
            spec = dataclasses.replace(spec, top_k=int(shape["top_k"]))
        tr = generate(dataclasses.replace(cfg, **changes), spec)
        tr.source["preset"] = shape["preset"]
    _traces[key] = tr
    return tr


def row_overrides(options: dict) -> list[str]:
    """A row's run options as Hydra overrides: config group choices first, so dotted keys under them apply."""
    from .api import _overrides

    first = [k for k in _GROUPS if k in options]
    rest = [k for k in options if k not in _GROUPS]
    return [o for k in first + rest for o in _overrides(str(k), options[k])]


def predict(row: Row) -> dict:
    """Replay `row` and return its predicted metric and the step split (where the time went)."""
    from .__main__ import compose
    from .api import replay_config
    from .whole import ttft_ms

    trace = case_trace(row.trace)
    cfg = compose("run", ["progress=false", *row_overrides(row.options)])
    result = replay_config(cfg, trace)
    s = result.summary
    steps = result._profiler.arrays()[0]
    if row.metric == "decode_tokens_per_s":
        value = s.get("decode_tokens_per_s")
    elif row.metric == "token_latency_ms":
        rate = s.get("decode_tokens_per_s")
        value = 1e3 / rate if rate else None
    elif row.metric == "output_tokens_per_s":
        total_ms = float((steps[:, 3] - steps[:, 2]).sum())
        value = int((np.asarray(trace.phase) != 0).sum()) / (total_ms / 1e3) if total_ms > 0 else None
    elif row.metric == "hit_rate":
        value = s["hit_rate"]
    elif row.metric == "weight_gib":
        value = sum(s["model"]["weight_bytes"].values()) / 2**30
    else:
        ttft = ttft_ms(trace, steps[:, 2], steps[:, 3])
        prompt = int((np.asarray(trace.phase) == 0).sum())
        if not len(ttft):
            raise MoesimError(f"row {row.id!r}: metric {row.metric} needs prompt tokens; the trace has none "
                              "(set trace.prompt)")
        value = float(np.median(ttft)) if row.metric == "ttft_ms" else prompt / (float(ttft.sum()) / 1e3)
    if value is None or not math.isfinite(value):
        raise MoesimError(f"row {row.id!r}: the run gives no {row.metric} (no decode steps?)")
    return {"predicted": float(value), "split": s.get("step_ms_split"), "hit_rate": s["hit_rate"],
            "whole_model": s["whole_model"], "notes": s.get("notes", []),
            "budget_slots": s["budget"].get("slots"), "hardware": s["hardware"]}


@dataclass
class Outcome:
    """Published vs predicted for one row."""

    case: CaseFile
    row: Row
    predicted: float | None = None
    error: str | None = None  # the run failed: why
    info: dict = field(default_factory=dict)

    @property
    def rel(self) -> float | None:
        return None if self.predicted is None else self.predicted / self.row.published - 1

    @property
    def gap_ms(self) -> float | None:
        """For a tokens/s metric: ms per token the source spent beyond moesim's prediction (1000/published -
        1000/predicted; negative: moesim predicts more time). A constant gap across a table's configurations
        points to a fixed cost per token that moesim does not model."""
        if not self.predicted or not self.row.metric.endswith("tokens_per_s"):
            return None
        return 1e3 / self.row.published - 1e3 / self.predicted

    @property
    def factor(self) -> float | None:
        if not self.predicted:
            return None
        r = self.predicted / self.row.published
        return max(r, 1 / r)


def run_cases(paths, progress=print) -> list[Outcome]:
    """Every row of every case file in `paths`, in order; a row whose run fails keeps its error."""
    out = []
    cases = [load_case(p) for p in paths]
    n, i = sum(len(c.rows) for c in cases), 0
    for case in cases:
        for row in case.rows:
            i += 1
            o = Outcome(case, row)
            try:
                info = predict(row)
                o.predicted, o.info = info.pop("predicted"), info
            except MoesimError as e:
                o.error = str(e)
            if progress:
                shown = f"{o.predicted:.4g}" if o.predicted is not None else f"failed: {o.error.splitlines()[0]}"
                progress(f"[{i}/{n}] {case.source}/{row.id}: published {row.published:g}, predicted {shown}")
            out.append(o)
    return out


# ------------------------------------------------------------------------------------------- judging
def table_checks(case: CaseFile, outcomes: list[Outcome]) -> list[dict]:
    """Per table of `case`: order agreement and ratios to its first row."""
    by_id = {o.row.id: o for o in outcomes if o.case is case}
    checks = []
    for t in case.tables:
        members = [by_id[r] for r in t.rows]
        ok = [o for o in members if o.predicted is not None]
        pairs = agree = 0
        for a in range(len(ok)):
            for b in range(a + 1, len(ok)):
                dp = ok[a].row.published - ok[b].row.published
                if dp == 0:
                    continue
                pairs += 1
                agree += (ok[a].predicted - ok[b].predicted) * dp > 0
        ref = members[0]
        ratios = []
        for o in members[1:]:
            pub = o.row.published / ref.row.published
            pred = o.predicted / ref.predicted if o.predicted and ref.predicted else None
            ratios.append({"row": o.row.id, "published": pub, "predicted": pred,
                           "error": None if pred is None else pred / pub - 1})
        checks.append({"table": t, "pairs": pairs, "agree": agree, "complete": len(ok) == len(members),
                       "ranked": pairs > 0 and agree == pairs and len(ok) == len(members),
                       "reference": ref.row.id, "ratios": ratios})
    return checks


def goals(outcomes: list[Outcome], checks: list[dict]) -> dict:
    """The figures issue 14's goals are judged on: absolute errors over the tokens/s rows (the goal is about
    speed; sizes and hit rates are reported beside it), order and ratios over every table."""
    speed = [o for o in outcomes if o.row.metric.endswith("tokens_per_s")]
    errs = [abs(o.rel) for o in speed if o.rel is not None]
    factors = [o.factor for o in speed if o.factor is not None]
    other = [abs(o.rel) for o in outcomes if o.rel is not None and not o.row.metric.endswith("tokens_per_s")]
    ratio_errs = [abs(r["error"]) for c in checks for r in c["ratios"] if r["error"] is not None]
    return {
        "rows": len(speed), "failed": sum(o.error is not None for o in outcomes),
        "median_abs_error": statistics.median(errs) if errs else None,
        "within_factor_2": sum(f <= GOAL_FACTOR for f in factors), "worst_factor": max(factors, default=None),
        "other_rows": len(other), "other_median_abs_error": statistics.median(other) if other else None,
        "tables": len(checks), "tables_ranked": sum(c["ranked"] for c in checks),
        "ratios": len(ratio_errs), "ratios_within": sum(e <= GOAL_RATIO for e in ratio_errs),
    }


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x * 100:+.0f}%"


def report_lines(outcomes: list[Outcome]) -> list[str]:
    """What `validate` prints: per row, per table, and the goals."""
    lines = []
    cases = list(dict.fromkeys(o.case for o in outcomes))
    checks = [c for case in cases for c in table_checks(case, outcomes)]
    for case in cases:
        lines += ["", f"{case.source}: {case.title} ({case.citation})"]
        w = max(len(o.row.id) for o in outcomes if o.case is case)
        lines.append(f"  {'row':<{w}}  {'metric':<20} {'published':>10} {'predicted':>10} {'error':>7}")
        for o in outcomes:
            if o.case is not case:
                continue
            pred = f"{o.predicted:10.4g}" if o.predicted is not None else f"{'failed':>10}"
            lines.append(f"  {o.row.id:<{w}}  {o.row.metric:<20} {o.row.published:10.4g} {pred} {_pct(o.rel):>7}"
                         + (f"  ({o.error.splitlines()[0]})" if o.error else ""))
        for c in (c for c in checks if c["table"] in case.tables):
            t = c["table"]
            order = "yes" if c["ranked"] else "no"
            lines.append(f"  table {t.id}: published order reproduced: {order} ({c['agree']}/{c['pairs']} pairs)")
            for r in c["ratios"]:
                pred = "–" if r["predicted"] is None else f"{r['predicted']:.3f}"
                lines.append(f"    {r['row']} / {c['reference']}: published {r['published']:.3f}, predicted {pred} "
                             f"({_pct(r['error'])})")
    g = goals(outcomes, checks)
    lines += ["", "goals (issue 14):"] + goal_lines(g)
    return lines


def goal_lines(g: dict) -> list[str]:
    med = g["median_abs_error"]
    failed = [f"  rows whose run failed: {g['failed']} (not judged: the goals below are not met)"] if g["failed"] else []
    return failed + [
        f"  tokens/s rows: median |error| {_pct(med).lstrip('+')} (goal <= {GOAL_MEDIAN:.0%}): "
        f"{'met' if med is not None and med <= GOAL_MEDIAN and not g['failed'] else 'not met'}",
        f"  tokens/s rows within a factor of 2: {g['within_factor_2']}/{g['rows']} (worst x{g['worst_factor'] or 0:.2f}): "
        f"{'met' if g['within_factor_2'] == g['rows'] else 'not met'}",
        f"  ratios within {GOAL_RATIO:.0%} of the published: {g['ratios_within']}/{g['ratios']}: "
        f"{'met' if g['ratios_within'] == g['ratios'] and not g['failed'] else 'not met'}",
        f"  tables in the published order: {g['tables_ranked']}/{g['tables']}: "
        f"{'met' if g['tables_ranked'] == g['tables'] else 'not met'}",
    ] + ([f"  other rows (sizes, hit rates): median |error| {_pct(g['other_median_abs_error']).lstrip('+')} over "
          f"{g['other_rows']} rows"] if g["other_rows"] else [])


# ------------------------------------------------------------------------------------------- outputs
def to_records(outcomes: list[Outcome]) -> list[dict]:
    return [{"case": o.case.source, "row": o.row.id, "metric": o.row.metric, "published": o.row.published,
             "predicted": o.predicted, "rel_error": o.rel, "error": o.error, "options": o.row.options,
             "trace": o.row.trace, **{k: v for k, v in o.info.items() if k != "notes"}} for o in outcomes]


def write_pins(outcomes: list[Outcome], path) -> Path:
    """The predictions of `outcomes`, keyed case/row, written into the JSON file at `path` (what the CI test
    re-runs and compares): the cases run replace their old entries, other cases' entries stay."""
    path = Path(path)
    pins = json.loads(path.read_text()) if path.is_file() else {}
    run = {o.case.source for o in outcomes}
    pins = {k: v for k, v in pins.items() if k.split("/", 1)[0] not in run}
    for o in outcomes:
        if o.predicted is None:
            raise MoesimError(f"pin: {o.case.source}/{o.row.id} failed ({o.error}); nothing pinned")
        pins[f"{o.case.source}/{o.row.id}"] = o.predicted
    return atomic_write_text(path, json.dumps(dict(sorted(pins.items())), indent=1) + "\n")


def validate_command(cfg) -> int:
    """`python -m moesim validate ...`: run the cases, print the comparison; 0 whether or not goals are met
    (the goals are a report, not a gate), 1 when a row's run failed."""
    from omegaconf import OmegaConf

    cases = OmegaConf.to_container(cfg.cases) if OmegaConf.is_config(cfg.cases) else cfg.cases
    paths = case_paths(cases, cfg.get("cases_dir"))
    if cfg.write_docs and cases not in (None, "all", ["all"]):
        raise MoesimError("validate: write_docs=true needs every case (leave cases=all): the page covers them all")
    outcomes = run_cases(paths, progress=lambda s: print(s, file=sys.stderr))
    print("\n".join(report_lines(outcomes)))
    if cfg.out:
        out = Path(str(cfg.out))
        atomic_write_text(out / "validation.json", json.dumps(to_records(outcomes), indent=1, default=str) + "\n")
        print(f"results: {out / 'validation.json'}")
    if cfg.pin:
        print(f"pinned: {write_pins(outcomes, str(cfg.pin))}")
    if cfg.write_docs:
        print(f"docs: {atomic_write_text(DOCS, page(outcomes))}")
    return 1 if any(o.error for o in outcomes) else 0


BUCKETS = ((0.10, "within 10%"), (0.30, "10-30%"), (0.50, "30-50%"), (1.0, "50-100%"), (math.inf, "over 100%"))


def _md(text) -> str:
    """`text` safe inside a Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _grouped(items) -> list[tuple[list, str]]:
    """[(keys, text)] from (key, text) pairs: keys sharing a text together, in first-seen order."""
    groups: dict[str, list] = {}
    for key, text in items:
        if text:
            groups.setdefault(text, []).append(key)
    return [(keys, text) for text, keys in groups.items()]


def page(outcomes: list[Outcome]) -> str:
    """docs/validation.md: the goals, the error distribution, every source's rows and tables, the misses."""
    from . import __version__

    cases = list(dict.fromkeys(o.case for o in outcomes))
    checks = [c for case in cases for c in table_checks(case, outcomes)]
    g = goals(outcomes, checks)
    out = ["# Validation: moesim against published measurements", "",
           "<!-- written by `python -m moesim validate write_docs=true`; edit validation/cases/*.yaml, not this "
           "page -->", "",
           f"Made on {datetime.date.today().isoformat()} with moesim {__version__} by `python -m moesim validate "
           "write_docs=true`. Every row is a figure a source published for a real system; moesim replays the same "
           "configuration (model, formats, GPU, host, strategy, prompt and generation lengths) with the "
           "whole-model simulation on a synthetic trace of that shape; the error is predicted / published - 1. "
           "The sim is deterministic: the page does not depend on the machine that makes it. The case files, "
           "with every citation and assumption, are in `validation/cases/`; their format is in "
           "`validation/README.md`. Per row, `gap ms/token` is 1000 / published - 1000 / predicted: the time per "
           "token the system spent that moesim does not predict; the step split is moesim's mean step (prefill "
           "steps included).", "", "## Goals", ""] + [f"- {line.strip()}" for line in goal_lines(g)]
    errs = [abs(o.rel) for o in outcomes if o.rel is not None]
    out += ["", "## Error distribution (every row)", "", "| absolute error | rows |", "| --- | --- |"]
    lo = 0.0
    for hi, label in BUCKETS:
        out.append(f"| {label} | {sum(lo <= e < hi for e in errs)} |")
        lo = hi
    if g["failed"]:
        out.append(f"| run failed | {g['failed']} |")
    signed = sorted(o.rel for o in outcomes if o.rel is not None)
    if signed:
        q = np.percentile(signed, [10, 50, 90])
        out += ["", f"Signed error: p10 {_pct(q[0])}, median {_pct(q[1])}, p90 {_pct(q[2])} over {len(signed)} rows "
                f"({sum(e > 0 for e in signed)} predicted high, {sum(e < 0 for e in signed)} low)."]
        out += ["", "| source | rows | median error | within 2x |", "| --- | --- | --- | --- |"]
        for case in cases:
            rel = [o.rel for o in outcomes if o.case is case and o.rel is not None]
            within = sum(o.factor <= GOAL_FACTOR for o in outcomes if o.case is case and o.factor is not None)
            med = _pct(float(np.median(rel))) if rel else "–"
            out.append(f"| {_md(case.source)} | {len(rel)} | {med} | {within} |")
    for case in cases:
        rows = [o for o in outcomes if o.case is case]
        out += ["", f"## {_md(case.source)}", "", f"{_md(case.title)}. Source: {_md(case.citation)}"
                + (f", <{case.url}>" if case.url else "") + "." + (f" System: {_md(case.system)}." if case.system else ""),
                "", "| row | metric | published | predicted | error | gap ms/token | step ms: dense / experts / stall / "
                "host |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for o in rows:
            sp = o.info.get("split") or {}
            split = " / ".join(f"{sp.get(k, 0):.1f}" for k in ("dense", "expert_compute", "stall", "host_compute"))
            pred = f"{o.predicted:.4g}" if o.predicted is not None else f"failed: {_md(o.error.splitlines()[0])}"
            gap = "–" if o.gap_ms is None else f"{o.gap_ms:+.1f}"
            out.append(f"| {_md(o.row.id)} | {o.row.metric} | {o.row.published:g} | {pred} | {_pct(o.rel)} | {gap} | "
                       f"{split if sp else '–'} |")
        for c in (c for c in checks if c["table"] in case.tables):
            t = c["table"]
            out += ["", f"Table `{_md(t.id)}`" + (f" ({_md(t.caption)})" if t.caption else "")
                    + f": published order {'reproduced' if c['ranked'] else 'not reproduced'} "
                    f"({c['agree']} of {c['pairs']} pairs). Ratios to `{_md(c['reference'])}`: "
                    + "; ".join(f"`{_md(r['row'])}` {r['published']:.3f} published, "
                                + ("–" if r["predicted"] is None else f"{r['predicted']:.3f}")
                                + f" predicted ({_pct(r['error'])})" for r in c["ratios"]) + "."]
            if t.note:
                out += ["", _md(t.note)]
        out += ["", "Machines:", ""] + [f"- {', '.join(f'`{_md(k)}`' for k in keys)}: {_md(text)}"
                                         for keys, text in _grouped((o.row.id, o.row.machine) for o in rows)]
        notes = _grouped((o.row.id, o.row.note) for o in rows)
        if notes:
            out += ["", "How the rows map onto moesim:", ""] + [
                f"- {', '.join(f'`{_md(k)}`' for k in keys)}: {_md(text)}" for keys, text in notes]
        for para in (p for p in case.notes.split("\n\n") if p.strip()):  # the file's paragraphs, as written
            out += ["", _md(para)]
    misses = [o for o in outcomes if o.error or (o.rel is not None and abs(o.rel) > GOAL_MEDIAN)]
    out += ["", "## Misses explained", "",
            "Rows more than 30% off, by source, with the source's own reading of the comparison (the paragraph of "
            "its case file that starts 'What the comparison shows').", ""]
    for case in cases:
        m = [o for o in misses if o.case is case]
        if m:
            out += [f"- **{_md(case.source)}**: " + ", ".join(
                f"`{_md(o.row.id)}` {_pct(o.rel) if o.rel is not None else 'failed'}" for o in m)]
            why = [p for p in case.notes.split("\n\n") if p.strip().startswith("What the comparison shows")]
            out += [f"  {_md(p)}" for p in why] or ["  (no reading recorded)"]
    if not misses:
        out.append("- none")
    return "\n".join(out) + "\n"
