"""Every strategy on the real gpt-oss-20b trace: tokens/s, hit rate, stall-free rate and bytes moved, per
budget and hardware profile, written into docs/strategies.md (between its generated-table markers).

    python scripts/compare_strategies.py                       # 2 processes; reruns only what is missing
    python scripts/compare_strategies.py --jobs 1 --stride 2   # every 2nd evaluation sequence only (new runs)

Split (fixed): the trace's sequences in path order (the importer sorts the files by path); the first half is
the calibration part, the rest the evaluation part. Learned policies (static, transition, history, Fiddler's
popular set) learn from the calibration part only (`calibrate_trace`); every strategy is replayed on the same
evaluation part: all of it by default (`--stride N`: every N-th evaluation sequence). The two parts are
written once as .moetrace.safetensors files under traces/cache/.

Each run's result is kept as JSON under reports/compare/ (atomic writes), keyed by the run and a hash of the
code and configs it depends on, so a rerun only does what changed. Every run goes through moesim.simulate,
the `python -m moesim run` path, which replays every strategy here in the compiled core (moesim/core, held to
the Python driver's events by tests/test_core.py).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BUDGETS = ("12.5%", "25%", "50%")
HARDWARE = ("rtx-4090", "h200")
CALIB = "{calib}"  # replaced by the calibration trace's path
DEPENDS = ["moesim/api.py", "moesim/engine.py", "moesim/cache.py", "moesim/backends/sim.py", "moesim/hardware.py",
           "moesim/profiler.py", "moesim/core", "moesim/trace.py", "moesim/models.py", "moesim/conf", "strategies",
           "moesim/whole.py", "moesim/catalogue.py", "moesim/formats.py", "moesim/hf_config.py", "moesim/units.py",
           "moesim/data"]

# (row label, Hydra overrides of `python -m moesim run`, what it is). Bounds are recognised by summary["bound"].
STRATEGIES = [
    ("lru", ["strategy=lru"], "demand loading, LRU per layer: the baseline"),
    ("fifo", ["strategy=fifo"], "demand loading, FIFO"),
    ("lfu", ["strategy=lfu"], "demand loading, LFU"),
    ("static", ["strategy=static", f"strategy.cache.calibrate_trace={CALIB}"],
     "calibration's hottest experts pinned + LRU rest"),
    ("class_lru", ["strategy=class_lru"], "moesim's frequency-class LRU, demand loading"),
    ("activation_aware", ["strategy=activation_aware"], "after MoE-Infinity's (unused) priority score, demand loading"),
    ("lru + transition", ["strategy=lru", "prefetch=transition", f"prefetch.calibrate_trace={CALIB}"],
     "LRU + learned transition prefetch (top-k of the next layer)"),
    ("lru + transition, idle link", ["strategy=lru", "prefetch=transition", f"prefetch.calibrate_trace={CALIB}",
                                     "prefetch.max_inflight=1 experts"],
     "the same, prefetching only while the link holds under one expert"),
    ("lru + history", ["strategy=lru", "prefetch=history", f"prefetch.calibrate_trace={CALIB}"],
     "LRU + activation-matrix history prefetch"),
    ("lru + cost", ["strategy=lru", "offload=cost"], "LRU + per-miss host-or-fetch by cost (host = identical here)"),
    ("mixtral_offloading", ["strategy=mixtral_offloading"], "preset: the released code (LRU per layer)"),
    ("mixtral_offloading_paper*", ["strategy=mixtral_offloading_paper", "prefetch=transition",
                                   f"prefetch.calibrate_trace={CALIB}"],
     "preset, transition standing in for the recorded guesses the trace lacks"),
    ("moe_infinity", ["strategy=moe_infinity", f"strategy.prefetch.calibrate_trace={CALIB}"], "preset (its scope)"),
    ("fiddler", ["strategy=fiddler", f"strategy.offload.calibrate_trace={CALIB}"], "preset (its scope)"),
    ("llama_cpp_ncmoe", ["strategy=llama_cpp_ncmoe"], "preset (its scope)"),
    ("llama_cpp_moe_cache", ["strategy=llama_cpp_moe_cache"], "preset: upstream --moe-cache-mib (its scope)"),
    ("llama_cpp_fork_moe_cache", ["strategy=llama_cpp_fork_moe_cache"], "preset: a fork's cache (its scope)"),
    ("llama_cpp_moe_expert_cache", ["strategy=llama_cpp_moe_expert_cache"], "preset: open PR #27861"),
    ("ktransformers", ["strategy=ktransformers"], "preset: every routed expert on the CPU (its scope)"),
    ("layer_offload", ["strategy=layer_offload"], "preset: whole layers moved (its scope)"),
    ("class_lru_host", ["strategy=class_lru_host"], "moesim's own (was named llama_cpp_moe_cache until 2026-12-06)"),
    ("class_lru_host, global", ["strategy=class_lru_host", "scope=global"], "the same in one pool"),
    ("vllm_lfru", ["strategy=vllm_lfru"], "preset"),
    ("belady", ["strategy=belady"], "bound: Belady's MIN, demand loading"),
    ("lru + oracle", ["strategy=lru", "prefetch=oracle", "prefetch.lookahead=4"],
     "bound: perfect prefetch 4 layers ahead"),
    ("belady + oracle", ["strategy=belady", "prefetch=oracle", "prefetch.lookahead=4"],
     "bound: Belady + perfect prefetch 4 layers ahead"),
    ("belady + cpu share", ["strategy=belady", "offload=host", "offload.share=auto", "offload.fill_first=true"],
     "bound: Belady's cache with moesim's CPU share (auto)"),
]


# ------------------------------------------------------------------------------------------------ split
def split_traces(source: str, stride: int, cache_dir: Path) -> tuple[Path, Path, dict]:
    """(calibration file, evaluation file, split facts): written once, named by the source and the split."""
    from moesim.importers import open_trace
    from moesim.trace import from_arrays, save_trace

    trace = open_trace(source)
    seq = np.asarray(trace.seq)
    order = list(dict.fromkeys(seq.tolist()))  # sequences in trace (= path) order
    half = len(order) // 2
    calib_seqs, eval_seqs = order[:half], order[half:][::stride]
    tag = hashlib.sha256(f"{trace.path}|{half}|{stride}".encode()).hexdigest()[:12]
    paths = (cache_dir / f"compare-calib-{tag}.moetrace.safetensors",
             cache_dir / f"compare-eval-s{stride}-{tag}.moetrace.safetensors")
    facts = {"sequences": len(order), "calibration_sequences": len(calib_seqs),
             "evaluation_sequences": len(order) - half, "evaluated_sequences": len(eval_seqs), "stride": stride}
    for path, seqs, part in zip(paths, (calib_seqs, eval_seqs), ("calibration", "evaluation")):
        mask = np.isin(seq, np.asarray(seqs))
        facts[f"{part}_tokens"] = int(mask.sum())
        if path.is_file():
            continue
        sub = from_arrays(trace.spec, np.asarray(trace.experts)[mask], np.asarray(trace.weights)[mask],
                          np.asarray(trace.step)[mask], seq[mask], np.asarray(trace.phase)[mask],
                          None if trace.predicted is None else np.asarray(trace.predicted)[mask],
                          {"derived_from": str(trace.path), "part": part, "sequences": [int(s) for s in seqs],
                           "split": "sequences in path order: first half calibration, the rest evaluation, "
                                    f"every {stride}-th evaluation sequence evaluated"})
        save_trace(sub, path)
    return paths[0], paths[1], facts


# ------------------------------------------------------------------------------------------------- runs
def code_hash() -> str:
    h = hashlib.sha256()
    for rel in DEPENDS:
        p = REPO / rel
        files = sorted(p.rglob("*")) if p.is_dir() else [p]
        for f in files:
            if f.is_file() and f.suffix in (".py", ".yaml", ".json"):  # .json: the catalogue's configs
                h.update(str(f.relative_to(REPO)).encode())
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


_TRACES: dict = {}  # per worker process: the evaluation trace, opened once (its encoding and learned tables
#                     are then reused by every run of the process)


def _trace(path: str):
    from moesim import load_trace

    if path not in _TRACES:
        _TRACES[path] = load_trace(path)
    return _TRACES[path]


def run_one(job: dict) -> dict:
    """One (strategy, budget, hardware) run on the evaluation trace: the numbers the tables need."""
    from moesim import simulate

    overrides = [o.replace(CALIB, job["calib"]) for o in job["overrides"]]  # strategy=... among them
    t0 = time.time()
    s = simulate(_trace(job["eval"]), budget=job["budget"], hardware=job["hardware"], overrides=overrides).summary
    keep = ("strategy", "bound", "hit_rate", "hits", "requests", "misses", "loads", "prefetch_loads",
            "host_computes", "tokens_per_s", "bytes_h2d", "stall_ms", "stall_free_rate", "prefetch_precision",
            "prefetch_recall", "late_prefetches", "wasted_prefetch_bytes", "tokens", "budget", "scope",
            "fast_path", "streams")
    out = {k: s.get(k) for k in keep}
    out["latency_p50_ms"] = s["latency_ms"]["p50"]
    out.update(label=job["label"], hardware=job["hardware"], budget_requested=job["budget"],
               seconds=round(time.time() - t0, 1))
    return out


def _write_json(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _job_worker(job: dict) -> dict:
    try:
        res = run_one(job)
    except Exception as e:  # reported in the table, never silently dropped
        res = {"label": job["label"], "hardware": job["hardware"], "budget_requested": job["budget"],
               "error": f"{type(e).__name__}: {e}"}
    if "error" not in res:
        _write_json(Path(job["result"]), res)
    return res


# ----------------------------------------------------------------------------------------------- tables
def _fmt(x, spec: str, none: str = "–") -> str:
    return none if x is None else format(x, spec)


def tables(results: dict, facts: dict) -> str:
    """The generated part of docs/strategies.md: one table per hardware profile and budget, then a summary."""
    lines = []
    labels = [s[0] for s in STRATEGIES]
    summary = []
    for hw in HARDWARE:
        for budget in BUDGETS:
            cell = {lab: results.get((lab, hw, budget)) for lab in labels}
            lru = cell.get("lru") or {}
            base = lru.get("tokens_per_s")
            slots = (lru.get("budget") or {}).get("slots")
            lines += [f"### {hw}, budget {budget}" + (f" ({slots} slots)" if slots else ""), "",
                      "| strategy | tokens/s | × lru | hit rate | stall-free | MiB moved / token | host computes | "
                      "prefetch precision / recall |",
                      "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
            for lab in labels:
                r = cell[lab]
                if r is None:
                    lines.append(f"| {lab} | not run | | | | | | |")
                    continue
                if "error" in r:
                    lines.append(f"| {lab} | error: {r['error']} | | | | | | |")
                    continue
                name = f"{lab} (bound)" if r["bound"] else lab
                if r.get("scope") == "global" and "global" not in lab:
                    name += " [global]"
                pf = (f"{r['prefetch_precision']:.2f} / {r['prefetch_recall']:.2f}"
                      if r.get("prefetch_precision") is not None else "–")
                lines.append(f"| {name} | {r['tokens_per_s']:.1f} | "
                             f"{_fmt(r['tokens_per_s'] / base if base else None, '.2f')} | {r['hit_rate']:.3f} | "
                             f"{_fmt(r['stall_free_rate'], '.3f')} | {r['bytes_h2d'] / r['tokens'] / 2**20:.0f} | "
                             f"{r['host_computes']:,} | {pf} |")
            lines.append("")
            ok = {lab: r for lab, r in cell.items() if r and "error" not in r}
            deploy = {lab: r for lab, r in ok.items() if not r["bound"]}
            if deploy and base:
                best = max(deploy, key=lambda lab: deploy[lab]["tokens_per_s"])
                b = deploy[best]["tokens_per_s"]
                ref = {lab: ok[lab]["tokens_per_s"] for lab in ("lru + oracle", "belady", "belady + oracle",
                                                               "belady + cpu share") if lab in ok}
                summary.append((hw, budget, best, b, b / base, ref))
    out = ["| hardware | budget | best deployable strategy | tokens/s | × lru | × lru + oracle | × belady | "
           "× belady + oracle | × belady + cpu share |", "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for hw, budget, best, b, x, ref in summary:
        rel = [_fmt(b / ref[k] if k in ref else None, ".2f") for k in
               ("lru + oracle", "belady", "belady + oracle", "belady + cpu share")]
        out.append(f"| {hw} | {budget} | {best} | {b:.1f} | {x:.2f} | " + " | ".join(rel) + " |")
    which = "all" if facts["stride"] == 1 else f"every {facts['stride']}th"
    head = [f"Evaluation: {facts['evaluated_sequences']} of the {facts['evaluation_sequences']} evaluation sequences "
            f"({which}, {facts['evaluation_tokens']:,} decode tokens); calibration: the first "
            f"{facts['calibration_sequences']} sequences ({facts['calibration_tokens']:,} tokens). Scope per_layer "
            f"unless marked [global] (a preset's own scope). Produced by `python scripts/compare_strategies.py` "
            f"({facts['when']}).", ""]
    return "\n".join(head + ["### Summary", ""] + out + [""] + lines)


def write_doc(doc: Path, generated: str) -> None:
    begin, end = "<!-- BEGIN GENERATED: scripts/compare_strategies.py -->", "<!-- END GENERATED -->"
    text = doc.read_text() if doc.is_file() else f"# Strategies\n\n{begin}\n{end}\n"
    if begin not in text or end not in text:
        raise SystemExit(f"{doc}: the markers {begin!r} and {end!r} are missing")
    a, rest = text.split(begin, 1)
    _, b = rest.split(end, 1)
    new = f"{a}{begin}\n{generated}\n{end}{b}"
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".md", dir=doc.parent)
    with os.fdopen(fd, "w") as f:
        f.write(new)
    os.replace(tmp, doc)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trace", default=str(REPO.parent / "shared" / "traces" / "gpt-oss-20b"))
    ap.add_argument("--stride", type=int, default=1, help="evaluate every N-th evaluation sequence (1: all)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--results", default=str(REPO / "reports" / "compare"))
    ap.add_argument("--doc", default=str(REPO / "docs" / "strategies.md"))
    ap.add_argument("--only", nargs="*", help="run only these row labels (tables still list every row)")
    args = ap.parse_args(argv)

    from tqdm import tqdm

    cache_dir = Path(os.environ.get("MOESIM_TRACE_CACHE", REPO / "traces" / "cache"))
    cache_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MOESIM_TRACE_CACHE", str(cache_dir))
    calib, evalp, facts = split_traces(args.trace, args.stride, cache_dir)
    res_dir = Path(args.results)
    res_dir.mkdir(parents=True, exist_ok=True)
    code = code_hash()
    jobs, results = [], {}
    for label, overrides, _ in STRATEGIES:
        for hw in HARDWARE:
            for budget in BUDGETS:
                key = hashlib.sha256(json.dumps([label, overrides, hw, budget, evalp.name, code]).encode()).hexdigest()[:20]
                path = res_dir / f"{key}.json"
                if path.is_file():
                    results[(label, hw, budget)] = json.loads(path.read_text())
                elif not args.only or label in args.only:
                    jobs.append({"label": label, "overrides": overrides, "hardware": hw, "budget": budget,
                                 "calib": str(calib), "eval": str(evalp), "result": str(path)})
    print(f"{len(results)} runs cached, {len(jobs)} to run ({args.jobs} processes); code {code}", file=sys.stderr)
    t0 = time.time()
    with Pool(args.jobs) as pool:
        for r in tqdm(pool.imap_unordered(_job_worker, jobs), total=len(jobs), file=sys.stderr, disable=None):
            results[(r["label"], r["hardware"], r["budget_requested"])] = r
            if "error" in r:
                print(f"error: {r['label']} {r['hardware']} {r['budget_requested']}: {r['error']}", file=sys.stderr)
    replay_s = sum(r.get("seconds", 0) for r in results.values() if "error" not in r)
    facts["when"] = (time.strftime("%Y-%m-%d") + f"; {len(results)} runs, {replay_s / 60:.0f} min of replay in all, "
                     f"{len(jobs)} of them run by this invocation in {(time.time() - t0) / 60:.0f} min, {args.jobs} processes")
    write_doc(Path(args.doc), tables(results, facts))
    print(f"wrote {args.doc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
