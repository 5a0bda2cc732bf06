"""The torch backend on a real GPU, in one report: `bash scripts/gpu_check.sh` (under 5 minutes on an H200).

    bash scripts/gpu_check.sh                        # writes docs/gpu/<date>-<gpu>.md
    python scripts/gpu_check.py --device cpu --quick # the same checks on the CPU, small (what tests run)

What it measures, each part on the same device in the same run:
  1. copies    the backend's achieved host->device bandwidth (its loads, timed by its events) against a plain
               pinned memcpy of the same size and count (goal: >= 90%)
  2. overlap   a replay with LRU and a perfect prefetcher (NextLayerOracle: the true experts two layers ahead,
               an oracle, a bound) against LRU alone: stall, latency, share of copy time under compute
  3. memory    peak VRAM (torch's max allocated, NVML's used) against budget + shared experts + workspace
  4. fidelity  a profile calibrated here, then the sim against the torch backend on the same trace,
               strategy and budget: hits and bytes must match; latency, stall errors
  5. tests     the tests marked `gpu` (pytest -m gpu), with the time left, and their outcome
The report is Markdown, named <date>-<device name>.md under --out (default docs/gpu/), and copied into $OUT
when that variable is set (the device machine hands back what is there).
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: the repository's packages first
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from moesim.backends.torch import TorchBackend, device_name, memcpy, resolve_device, scale_spec, stored_spec  # noqa: E402
from moesim.calibrate import Sampling, measure, to_profile  # noqa: E402
from moesim.engine import drive, step_requests  # noqa: E402
from moesim.fidelity import compare_backends  # noqa: E402
from moesim.profiler import Profiler  # noqa: E402
from moesim.units import parse_budget  # noqa: E402
from moesim.trace import MODEL_SPECS, ModelSpec, from_arrays  # noqa: E402
from strategies import Prefetcher  # noqa: E402
from strategies.lru import LRU  # noqa: E402


# ------------------------------------------------------------------------------------------ helpers
class NextLayerOracle(Prefetcher):
    """Perfect prefetch `ahead` layers ahead: after (step, layer), the true experts of position pos + ahead
    (layers run on into the next step). Reads the trace: a bound, not deployable.

    ahead=2 by default: the engine asks after a layer has computed, when the next layer's own misses are
    issued anyway; a copy overlaps compute only if it is needed one layer later than it is issued."""

    bound = True

    def __init__(self, ahead: int = 2):
        self.ahead = ahead

    def setup(self, ctx) -> None:
        self.L = ctx.trace.n_layers
        self.requests = [req for _, _, _, req in step_requests(ctx.trace)]  # [step][layer] = (ids, counts)

    def predict(self, pos: int, layer: int):
        step, nxt = divmod(pos + self.ahead, self.L)
        if step >= len(self.requests):
            return []
        return [(nxt, e) for e in self.requests[step][nxt][0]]


def locality_trace(spec: ModelSpec, steps: int, batch: int = 1, reuse: float = 0.5, skew: float = 1.0,
                   seed: int = 0):
    """A routing trace of `steps` decode steps of `batch` tokens: per layer, Zipf(`skew`) popularity over a
    random order of experts; each token keeps each expert of its predecessor's row with probability `reuse`."""
    rng = np.random.default_rng(seed)
    L, E, K = spec.layers, spec.experts, spec.top_k
    T = steps * batch
    p = np.arange(1, E + 1, dtype=np.float64) ** -skew
    p /= p.sum()
    order = np.stack([rng.permutation(E) for _ in range(L)])  # popularity rank -> expert, per layer
    experts = np.empty((T, L, K), dtype=np.int16)
    for t in range(T):
        for layer in range(L):
            row: list[int] = []
            if t >= batch:
                row = [int(e) for e in experts[t - batch, layer] if rng.random() < reuse]
            while len(row) < K:
                e = int(order[layer, rng.choice(E, p=p)])
                if e not in row:
                    row.append(e)
            experts[t, layer] = row
    weights = np.full((T, L, K), 1.0 / K, dtype=np.float16)
    step = np.repeat(np.arange(steps, dtype=np.int32), batch)
    seq = np.tile(np.arange(batch, dtype=np.int32), steps)
    return from_arrays(spec, experts, weights, step=step, seq=seq)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------- checks
def check_copies(device: torch.device, spec: ModelSpec, n_copies: int = 32) -> dict:
    """The backend's achieved host->device bandwidth on `n_copies` expert loads against a plain pinned
    memcpy (cpu: memcpy between two host blocks) of the same bytes (info()["bytes_per_expert"]: the stored,
    possibly packed, expert) and count, timed the same way."""
    n_slots = min(n_copies, spec.layers * spec.experts)
    backend = TorchBackend(device=str(device))
    profiler = Profiler(spec.layers)
    backend.setup(spec, n_slots, profiler)
    nbytes = backend.info()["bytes_per_expert"]
    backend.begin_step(0, 1)
    for i in range(n_copies):
        key = divmod(i % (spec.layers * spec.experts), spec.experts)
        backend.load(key, i % n_slots, True)
    backend.compute(0, [], [])
    backend.end_step()
    backend.finish()
    m = profiler.metrics()
    backend_gbps = m["h2d_gbps"]
    # the plain copy: the same bytes (uint8 rows of the packed expert, as the backend's pools), pinned source,
    # back to back on one stream
    src = torch.empty((n_copies, nbytes), dtype=torch.uint8, pin_memory=device.type == "cuda").fill_(1)
    dst = torch.empty((n_slots, nbytes), dtype=torch.uint8, device=device).zero_()  # pages touched, as the backend does
    if device.type == "cuda":
        stream = torch.cuda.Stream(device)
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            dst[0].copy_(src[0], non_blocking=True)  # warm-up
            e0.record(stream)
            for i in range(n_copies):
                dst[i % n_slots].copy_(src[i], non_blocking=True)
            e1.record(stream)
        e1.synchronize()
        plain_ms = e0.elapsed_time(e1)
    else:
        memcpy(dst[0], src[0])
        t0 = time.perf_counter()
        for i in range(n_copies):
            memcpy(dst[i % n_slots], src[i])
        plain_ms = (time.perf_counter() - t0) * 1e3
    plain_gbps = n_copies * nbytes / (plain_ms * 1e6)
    del backend, src, dst
    return {"bytes_per_copy": nbytes, "copies": n_copies, "backend_gbps": backend_gbps, "plain_gbps": plain_gbps,
            "ratio": backend_gbps / plain_gbps if backend_gbps and plain_gbps else None}


def _replay(device: torch.device, spec: ModelSpec, trace, slots: int, prefetch: bool) -> tuple[dict, dict, TorchBackend]:
    backend = TorchBackend(device=str(device))
    _, profiler, c = drive(trace, spec, slots, "per_layer", LRU, backend, NextLayerOracle() if prefetch else None,
                           prefetch_max=spec.top_k if prefetch else 0)
    return c.to_dict(), profiler.metrics(), backend


def check_overlap(device: torch.device, spec: ModelSpec, trace, budget="25%") -> dict:
    """LRU alone against LRU + NextLayerOracle on the torch backend: stall, latency, overlap, loads."""
    slots = parse_budget(budget, trace.spec, "per_layer").slots
    out = {"slots": slots}
    for name, prefetch in (("lru", False), ("lru+oracle", True)):
        counters, m, backend = _replay(device, spec, trace, slots, prefetch)
        out[name] = {"latency_p50_ms": m["latency_ms"]["p50"], "stall_ms": m["stall_ms"], "overlap": m["overlap"],
                     "loads": m["loads"], "prefetch_loads": m["prefetch_loads"], "hits": counters["hits"],
                     "h2d_gbps": m["h2d_gbps"]}
        del backend
    return out


def check_memory(device: torch.device, spec: ModelSpec, trace, budget="25%") -> dict:
    """Peak memory of a replay against what the plan says the run needs (budget + shared + workspace)."""
    slots = parse_budget(budget, trace.spec, "per_layer").slots
    _, _, backend = _replay(device, spec, trace, slots, False)
    mem, plan = backend.memory(), backend.plan
    expected = plan.device_pool + plan.shared + plan.workspace
    peak = mem["peak_device_allocated_bytes"] if device.type == "cuda" else plan.device_pool + plan.shared
    nvml = mem["peak_nvml_used_bytes"]
    before = mem["nvml_used_before_bytes"]
    return {"budget_bytes": plan.device_pool, "shared_bytes": plan.shared, "workspace_estimate_bytes": plan.workspace,
            "expected_bytes": expected, "peak_allocated_bytes": peak,
            "peak_over_expected": peak / expected if peak else None,
            "nvml_peak_used_bytes": nvml, "nvml_used_before_bytes": before,
            "nvml_run_bytes": nvml - before if nvml is not None and before is not None else None,
            "peak_rss_bytes": mem["peak_rss_bytes"]}


def check_fidelity(device: torch.device, trace, scale: float, budget="25%", max_s: float = 60.0,
                   quick: bool = False) -> dict:
    """Calibrate here on the trace's experts at `scale` as the torch backend stores them (gpt-oss-20b: mxfp4,
    each decoded before its FFN), then compare the sim with the torch backend storing them so."""
    spec = scale_spec(trace.spec, scale)
    t0 = time.perf_counter()
    small = {"dims": [], "tokens": (1, 2, 4), "sampling": Sampling(min_n=5, min_ms=10.0, max_n=100)} if quick else {}
    m = measure(device=str(device), model=trace.spec.to_dict(), scale=scale, max_s=max_s,
                log=lambda s: print(s, file=sys.stderr), **small)
    profile = to_profile(m)
    result = compare_backends(trace, profile, LRU, budget, "per_layer", scale, {"device": str(device)})
    result["calibrate_s"] = time.perf_counter() - t0 - result["real"]["replay_s"] - result["sim"]["replay_s"]
    result["profile"] = {k: v for k, v in profile.to_dict().items() if k != "ffn_table"}
    result["expert_bytes"] = stored_spec(spec).bytes_per_expert
    return result


def run_gpu_tests(timeout_s: float = 150) -> dict:
    """pytest -m gpu over the torch backend's tests; its summary line and exit status."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
           "tests/test_torch_backend.py", "tests/test_calibrate.py", "tests/test_fidelity.py"]
    try:
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": None, "summary": f"timed out after {timeout_s:g} s", "command": " ".join(cmd[1:])}
    lines = [s for s in (p.stdout + p.stderr).strip().splitlines() if s.strip()]
    return {"status": p.returncode, "summary": lines[-1] if lines else "(no output)", "tail": lines[-30:],
            "command": "python " + " ".join(cmd[1:])}


# --------------------------------------------------------------------------------------------- report
def _gb(x) -> str:
    return "n/a" if x is None else f"{x:.2f} GB/s"


def _mib(x) -> str:
    return "n/a" if x is None else f"{x / 2**20:.1f} MiB"


def _pct(x) -> str:
    return "n/a" if x is None else f"{x * 100:+.1f}%"


def report_name(device: torch.device, when: datetime.date | None = None) -> str:
    """<date>-<device name>.md, the name in letters, digits and dashes."""
    when = when or datetime.date.today()
    slug = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    return f"{when.isoformat()}-{slug}.md"


def render(results: dict, device: torch.device, seconds: float) -> str:
    """The Markdown report of the results of `main`'s checks."""
    cuda = device.type == "cuda"
    lines = [f"# GPU check: {device_name(device)}", "",
             f"`bash scripts/gpu_check.sh` on {datetime.datetime.now().isoformat(timespec='seconds')}, "
             f"device {device}, torch {torch.__version__}"
             + (f", CUDA {torch.version.cuda}" if torch.version.cuda else "") + f"; took {seconds:.0f} s.", ""]
    t = results.get("tests")
    if t:
        lines += ["## Tests marked gpu", "", f"`{t['command']}` -> exit status {t['status']}: {t['summary']}", ""]
        if t.get("status") not in (0, None):
            lines += ["```", *t.get("tail", []), "```", ""]
    c = results.get("copies")
    if c:
        ratio = "n/a" if c["ratio"] is None else f"{c['ratio'] * 100:.1f}%"
        lines += ["## Copy bandwidth", "",
                  f"{c['copies']} copies of {_mib(c['bytes_per_copy'])} (one expert each).", "",
                  "| path | achieved |", "| --- | --- |",
                  f"| torch backend loads ({'copy stream, CUDA events' if cuda else 'memcpy, perf_counter'}) | "
                  f"{_gb(c['backend_gbps'])} |",
                  f"| plain {'pinned ' if cuda else ''}memcpy, same size and count, back to back | "
                  f"{_gb(c['plain_gbps'])} |",
                  f"| ratio (goal >= 90%) | {ratio} |", ""]
    o = results.get("overlap")
    if o:
        lines += ["## Overlap with a perfect prefetcher", "",
                  f"{o['trace']}; budget {o['slots']} slots per_layer. NextLayerOracle is an oracle (a bound).", "",
                  "| strategy | latency p50 ms | stall ms | copy time under compute | loads (prefetch) |",
                  "| --- | --- | --- | --- | --- |"]
        for name in ("lru", "lru+oracle"):
            r = o[name]
            ov = "n/a" if r["overlap"] is None else f"{r['overlap'] * 100:.1f}%"
            lines.append(f"| {name} | {r['latency_p50_ms']:.3f} | {r['stall_ms']:.1f} | {ov} | "
                         f"{r['loads']} ({r['prefetch_loads']}) |")
        lines.append("")
    mem = results.get("memory")
    if mem:
        lines += ["## Peak device memory", "", "| what | bytes |", "| --- | --- |",
                  f"| budget (slots) | {_mib(mem['budget_bytes'])} |",
                  f"| shared experts | {_mib(mem['shared_bytes'])} |",
                  f"| workspace estimate | {_mib(mem['workspace_estimate_bytes'])} |",
                  f"| expected = budget + shared + workspace | {_mib(mem['expected_bytes'])} |",
                  f"| peak allocated ({'torch.cuda.max_memory_allocated' if cuda else 'device=cpu: the pools'}) | "
                  f"{_mib(mem['peak_allocated_bytes'])} |",
                  f"| NVML used, peak during the run minus before | {_mib(mem['nvml_run_bytes'])} |",
                  f"| process peak RSS | {_mib(mem['peak_rss_bytes'])} |", ""]
        if mem["peak_over_expected"] is not None:
            lines += [f"Peak allocated / expected = {mem['peak_over_expected']:.3f}.", ""]
    f = results.get("fidelity")
    if f:
        from moesim.fidelity import comparison_table

        p = f["profile"]
        lines += ["## Fidelity: sim (calibrated here) against torch", "",
                  f"{f['trace']}; model {f['spec']['name']} stored as {f['spec']['dtype']} "
                  f"({_mib(f['expert_bytes'])} per expert), LRU, {f['slots']} slots per_layer. "
                  f"Calibration took {f['calibrate_s']:.0f} s: pinned {p['h2d_pinned_gbps']:.2f} GB/s, "
                  f"pageable {p['h2d_pageable_gbps']:.2f} GB/s, {p['copy_latency_us']:.1f} us per copy.", "",
                  "```", comparison_table(f), "```", ""]
    errors = results.get("errors")
    if errors:
        lines += ["## Errors", "", *[f"- {e}" for e in errors], ""]
    return "\n".join(lines)


def write_report(text: str, out_dir: Path, name: str) -> Path:
    """Write the report atomically under `out_dir`, and a copy into $OUT when it is set."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    tmp = path.with_name(f".tmp-{name}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    if os.environ.get("OUT"):
        extra = Path(os.environ["OUT"]) / name
        extra.write_text(text, encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu")
    ap.add_argument("--out", default=str(REPO / "docs" / "gpu"), help="folder of the report")
    ap.add_argument("--quick", action="store_true", help="small sizes (what the CPU tests run)")
    ap.add_argument("--skip-tests", action="store_true", help="do not run pytest -m gpu")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    device = resolve_device(args.device)
    if args.quick:  # seconds on a CPU
        copy_spec = ModelSpec("copy-check", 2, 8, 2, 256, 512, dtype="fp32", bits_per_weight=32)
        replay_spec = ModelSpec("check", 4, 16, 2, 256, 512, dtype="fp32", bits_per_weight=32)
        steps, scale, n_copies, max_s = 40, 1.0, 16, 10.0
    else:  # copies: gpt-oss-20b's expert shape stored bf16 (47.5 MiB; its own mxfp4: 13.2 MB); replays: half size,
        # mxfp4 (the backend's default store for gpt-oss)
        gpt = MODEL_SPECS["gpt-oss-20b"]
        copy_spec = stored_spec(ModelSpec("gpt-oss-20b-copy", 2, 32, 4, gpt.hidden, gpt.ffn))
        replay_spec = gpt
        steps, scale, n_copies, max_s = 300, 0.5, 64, 60.0
    results: dict = {"errors": []}
    trace = locality_trace(replay_spec, steps, batch=1, reuse=0.5, skew=1.0, seed=0)
    desc = f"{trace.n_steps} decode steps of one token, model {replay_spec.name} at scale {scale:g}"
    run_spec = stored_spec(scale_spec(replay_spec, scale))
    checks = [("copies", lambda: check_copies(device, copy_spec, n_copies)),
              ("overlap", lambda: {**check_overlap(device, run_spec, trace), "trace": desc}),
              ("memory", lambda: check_memory(device, run_spec, trace)),
              ("fidelity", lambda: {**check_fidelity(device, trace, scale, max_s=max_s, quick=args.quick),
                                    "trace": desc})]
    if not args.skip_tests:  # last, with the time left of gpu_check.sh's 290 s
        checks.append(("tests", lambda: run_gpu_tests(max(30.0, 280.0 - (time.perf_counter() - started)))))
    name_md = report_name(device)
    for name, fn in checks:
        try:
            results[name] = fn()
        except Exception as e:  # noqa: BLE001 - one failed check must not hide the others
            results["errors"].append(f"{name}: {type(e).__name__}: {e}")
        print(f"gpu_check: {name} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
        # the report so far: a run stopped by its time limit still leaves what it measured
        write_report(render(results, device, time.perf_counter() - started), Path(args.out), name_md)
    text = render(results, device, time.perf_counter() - started)
    path = write_report(text, Path(args.out), name_md)
    print(text)
    print(f"report: {path}")
    failed = results["errors"] or (results.get("tests", {}).get("status") not in (0, 5, None))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
