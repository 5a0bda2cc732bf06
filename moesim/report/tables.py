"""Tables behind the reports (`python -m moesim report DIR...`, `python -m moesim sweep ...`): one row per
run (what a sweep writes to results.parquet), the settings that vary between runs, the best strategy per
setting, the Pareto front of speed against memory, and expert use per layer.

Everything here reads results directories (moesim.results.read_run) only, so a report can be rebuilt from
them alone, by anyone who has them.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

# results.parquet columns taken from summary.json: (column, path in the summary)
SUMMARY_COLUMNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("strategy", ("strategy",)),
    ("bound", ("bound",)),  # an oracle took part: a bound, not deployable
    ("budget", ("budget", "requested")),  # as the user wrote it: 192, 25%, 4GiB
    ("budget_slots", ("budget", "slots")),
    ("budget_bytes", ("budget", "bytes")),
    ("scope", ("scope",)),
    ("hardware", ("hardware",)),
    ("backend", ("backend",)),
    ("trace", ("trace", "name")),
    ("model", ("model", "name")),
    ("tokens", ("tokens",)),
    ("hit_rate", ("hit_rate",)),
    ("requests", ("requests",)),
    ("hits", ("hits",)),
    ("loads", ("loads",)),
    ("prefetch_loads", ("prefetch_loads",)),
    ("evictions", ("evictions",)),
    ("host_computes", ("host_computes",)),
    ("streams", ("streams",)),
    ("bytes_h2d", ("bytes_h2d",)),  # bytes
    ("tokens_per_s", ("tokens_per_s",)),
    ("latency_p50_ms", ("latency_ms", "p50")),  # per token
    ("latency_p90_ms", ("latency_ms", "p90")),
    ("latency_p99_ms", ("latency_ms", "p99")),
    ("latency_mean_ms", ("latency_ms", "mean")),
    ("stall_ms", ("stall_ms",)),
    ("wall_ms", ("wall_ms",)),
    ("h2d_gbps", ("h2d_gbps",)),
    ("overlap", ("overlap",)),
    ("peak_device_bytes", ("peak_device_bytes",)),  # bytes
    ("decode_tokens_per_s", ("decode_tokens_per_s",)),  # the whole model's where whole_model is true
    ("ttft_p50_ms", ("ttft_ms", "p50")),
    ("vram_plan_bytes", ("vram_plan", "total")),  # the whole plan: weights, KV, workspace, reserve, experts
    ("whole_model", ("whole_model",)),
    ("not_applicable", ("not_applicable",)),  # why the strategy could not run on this input (a sweep's cell)
    ("host_hit_rate", ("disk", "host_hit_rate")),  # the disk tier's host cache (moesim/disk.py); empty without one
    ("bytes_disk", ("disk", "bytes_disk")),  # bytes read from disk
)
TEXT_COLUMNS = ("strategy", "budget", "scope", "hardware", "backend", "trace", "model", "not_applicable")
# config keys that say where or how a run was written, not what was run
# config keys (and their sub-keys) that never separate settings: where results went, how they were shown or
# computed (the compiled and Python drivers give the same results), and the top-level prefetch/offload choices,
# which the strategy's name and block already carry (lru+transition); merged runs of other days must not split
# the best into settings keyed on them
NOT_SETTINGS = ("out", "progress", "fast", "timeline", "prefetch", "offload")


def _get(d, path: tuple[str, ...]):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists become JSON text (a value to compare and show, not to index)."""
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, dict)):
            out[key] = json.dumps(v)
        else:
            out[key] = v
    return out


def varied_keys(configs: list[dict]) -> list[str]:
    """Flattened config keys whose values differ between runs (a key missing in a run counts as a value)."""
    flat = [flatten(c) for c in configs]
    keys = sorted(k for k in {k for f in flat for k in f} if k.split(".")[0] not in NOT_SETTINGS)
    return [k for k in keys if len({_text(f.get(k)) for f in flat}) > 1]


def _text(v) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def comparison_table(runs: list[dict]) -> pd.DataFrame:
    """One row per run (as read by moesim.results.read_run): "run" (directory name), "dir", "label" (the
    strategy, with its varied parameters), "setting" (the other varied config keys, e.g. "budget=25%"),
    "other_settings" (the same without budget: what separates the lines of a plot against budget), the
    SUMMARY_COLUMNS, and "cfg.<key>" for every config key that varies between runs. Sorted by setting,
    then label."""
    configs = [r["config"] for r in runs]
    varied = varied_keys(configs)
    flat = [flatten(c) for c in configs]
    by_name: dict[str, list[int]] = {}
    for i, r in enumerate(runs):
        by_name.setdefault(str(r["summary"].get("strategy")), []).append(i)
    labels = [""] * len(runs)
    for name, idx in by_name.items():  # a strategy's parameters that vary among its own runs
        own = varied_keys([configs[i] for i in idx])
        params = [k for k in own if k.startswith("strategy.") and k != "strategy.name"
                  and not k.endswith("_target_")]
        for i in idx:
            extra = ", ".join(f"{k[len('strategy.'):]}={_text(flat[i].get(k))}" for k in params)
            labels[i] = f"{name} ({extra})" if extra else name
    setting_keys = [k for k in varied if not k.startswith("strategy.")]
    rows = []
    for i, r in enumerate(runs):
        s = r["summary"]
        row = {"run": Path(r["dir"]).name, "dir": str(Path(r["dir"]).resolve()), "label": labels[i],
               "setting": ", ".join(f"{k}={_text(flat[i].get(k))}" for k in setting_keys),
               "other_settings": ", ".join(f"{k}={_text(flat[i].get(k))}" for k in setting_keys if k != "budget")}
        row.update({col: _get(s, path) for col, path in SUMMARY_COLUMNS})
        row.update({f"cfg.{k}": _text(flat[i].get(k)) for k in varied})
        rows.append(row)
    columns = ["run", "dir", "label", "setting", "other_settings", *(c for c, _ in SUMMARY_COLUMNS),
               *(f"cfg.{k}" for k in varied)]
    table = pd.DataFrame(rows, columns=columns)
    # fixed dtypes, so that results.parquet has one type per column whatever the summaries held
    for col, _ in SUMMARY_COLUMNS:
        if col == "bound":
            table[col] = table[col].fillna(False).astype(bool)
        elif col in TEXT_COLUMNS:
            table[col] = table[col].map(_text).astype("str")
        else:
            table[col] = pd.to_numeric(table[col], errors="coerce").astype("float64")
    table = table.sort_values(["budget_slots", "setting", "bound", "label", "run"], kind="stable")
    return table.reset_index(drop=True)


TIE = 1e-9  # relative: tokens/s this close count as a tie (the sim is deterministic: ties are exact)


def best_per_setting(table: pd.DataFrame) -> list[dict]:
    """Per setting (in table order): {"setting", "best": [rows], "bounds": [rows]}; best = the runs that are
    not bounds with the highest tokens/s (several when they tie; none when no run is deployable)."""
    out = []
    for setting, g in table.groupby("setting", sort=False):
        real = g[~g["bound"] & g["tokens_per_s"].notna()]
        top = real["tokens_per_s"].max() if len(real) else np.nan
        best = real[real["tokens_per_s"] >= top * (1 - TIE)].sort_values("label")
        out.append({"setting": setting, "best": [row.to_dict() for _, row in best.iterrows()],
                    "bounds": [row.to_dict() for _, row in g[g["bound"]].iterrows()]})
    return out


def pareto_front(vram: np.ndarray, speed: np.ndarray) -> np.ndarray:
    """bool [n]: points no other point beats (as little or less memory and as fast or faster, one strictly);
    NaN points are never on the front."""
    vram, speed = np.asarray(vram, float), np.asarray(speed, float)
    ok = ~(np.isnan(vram) | np.isnan(speed))
    front = np.zeros(len(vram), dtype=bool)
    for i in np.flatnonzero(ok):
        other = ok & (vram <= vram[i]) & (speed >= speed[i]) & ((vram < vram[i]) | (speed > speed[i]))
        front[i] = not other.any()
    return front


def expert_use(trace, chunk: int = 65536) -> pd.DataFrame:
    """[layer, expert, requests]: how many tokens chose each routed expert of each layer (every
    (layer, expert) of the model spec, zeros included), read `chunk` tokens at a time."""
    L, E = trace.spec.layers, trace.spec.experts
    counts = np.zeros(L * E, dtype=np.int64)
    offsets = (np.arange(L, dtype=np.int64) * E)[None, :, None]  # [1, L, 1]
    for lo in range(0, trace.n_tokens, chunk):
        ids = np.asarray(trace.experts[lo:lo + chunk]).astype(np.int64)  # [n, L, K]; -1: no expert
        flat = (ids + offsets)[ids >= 0]
        counts += np.bincount(flat, minlength=L * E)[: L * E]
    return pd.DataFrame({"layer": np.repeat(np.arange(L, dtype=np.int64), E),
                         "expert": np.tile(np.arange(E, dtype=np.int64), L), "requests": counts})


def expert_matrix(experts: pd.DataFrame) -> np.ndarray:
    """int64 [layers, experts] from an experts table."""
    L, E = int(experts["layer"].max()) + 1, int(experts["expert"].max()) + 1
    m = np.zeros((L, E), dtype=np.int64)
    m[experts["layer"].to_numpy(np.int64), experts["expert"].to_numpy(np.int64)] = experts["requests"].to_numpy()
    return m
