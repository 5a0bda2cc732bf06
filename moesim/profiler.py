"""Profiler: the events a backend reports during `python -m moesim run`, turned into metrics, tables and a
Chrome-trace timeline (open timeline.json in https://ui.perfetto.dev).

A backend calls, in time order of issue (all times in ms on the backend's clock):

    copy(key, nbytes, start_ms, end_ms, prefetch)       one host->device copy of an expert
    compute(layer, start_ms, end_ms, stall_ms, where)   one layer's experts on "device" or "host"
    step(index, n_tokens, start_ms, end_ms)             after the step's own events: the step is over

Events that arrive between two `step` calls belong to the later step (prefetches issued after a step's
last layer belong to that step). Events are appended to flat array.array('d') buffers, one row of doubles
per event: one C call per event, amortised O(1) growth, 40-48 bytes per event and no Python object kept
(a 150k-step x 24-layer run is 3.6M compute events, ~145 MB). Metrics and tables read them as numpy
arrays once the replay is over.

Per-token latency: every token of a step waits for the whole step, so each token's latency is its step's
latency (for batch-1 decode, token latency = step latency); percentiles are over tokens, so a prefill
step of 512 tokens weighs 512 times.
"""
from __future__ import annotations

from array import array

import numpy as np
from numba import njit

# columns of the event buffers
COPY_COLUMNS = ("layer", "expert", "nbytes", "start_ms", "end_ms", "prefetch")
COMPUTE_COLUMNS = ("layer", "start_ms", "end_ms", "stall_ms", "host")
_STEP_COLUMNS = ("step", "n_tokens", "start_ms", "end_ms", "copies_end", "computes_end")  # event counts at its end
# columns of the tables (results.py checks these when it reads a run)
STEPS_TABLE_COLUMNS = ("step", "n_tokens", "start_ms", "end_ms", "latency_ms", "stall_ms", "loads", "bytes_h2d")
LAYERS_TABLE_COLUMNS = ("layer", "compute_ms", "host_ms", "stall_ms", "loads", "prefetch_loads", "bytes_h2d")
TIMELINE_THREADS = {1: "copy engine", 2: "compute", 3: "host compute", 4: "steps"}
MAX_TIMELINE_EVENTS = 200_000  # Perfetto stays responsive; whole steps from the start up to this many


class Profiler:
    """Collects a run's events; `metrics()`, `steps_table()`, `layers_table()`, `timeline()` read them."""

    def __init__(self, n_layers: int | None = None):
        self.n_layers = n_layers  # tables list every layer 0..n_layers-1 even without events
        self._copies = array("d")  # rows of COPY_COLUMNS
        self._computes = array("d")  # rows of COMPUTE_COLUMNS
        self._steps = array("d")  # rows of _STEP_COLUMNS
        self._add_copy = self._copies.extend  # bound once: the calls below are on the replay's hot path
        self._add_compute = self._computes.extend
        self._cache: tuple | None = None

    # ----------------------------------------------------------------------------------------- events
    def copy(self, key, nbytes: int, start_ms: float, end_ms: float, prefetch: bool) -> None:
        self._add_copy((key[0], key[1], nbytes, start_ms, end_ms, prefetch))

    def compute(self, layer: int, start_ms: float, end_ms: float, stall_ms: float, where: str = "device") -> None:
        self._add_compute((layer, start_ms, end_ms, stall_ms, where == "host"))

    def step(self, index: int, n_tokens: int, start_ms: float, end_ms: float) -> None:
        self._steps.extend((index, n_tokens, start_ms, end_ms, len(self._copies) // 6, len(self._computes) // 5))

    @property
    def n_steps(self) -> int:
        return len(self._steps) // 6

    # ---------------------------------------------------------------------------------------- arrays
    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(steps [S, 6], copies [C, 6], computes [M, 5]) as float64 numpy copies (cached until new events)."""
        lens = (len(self._steps), len(self._copies), len(self._computes))
        if self._cache is None or self._cache[0] != lens:
            # copy: a numpy view would lock the array.array against further appends
            st = np.array(self._steps, dtype=np.float64).reshape(-1, 6)
            cp = np.array(self._copies, dtype=np.float64).reshape(-1, 6)
            cm = np.array(self._computes, dtype=np.float64).reshape(-1, 5)
            self._cache = (lens, (st, cp, cm))
        return self._cache[1]

    def _layers(self, cp: np.ndarray, cm: np.ndarray) -> int:
        seen = max([int(a[:, 0].max()) + 1 for a in (cp, cm) if len(a)], default=0)
        return max(self.n_layers or 0, seen)

    # --------------------------------------------------------------------------------------- metrics
    def metrics(self) -> dict:
        """Plain-Python metrics for summary.json (None where undefined, e.g. overlap without copies)."""
        st, cp, cm = self.arrays()
        n_tok = st[:, 1].astype(np.int64)
        lat = st[:, 3] - st[:, 2]
        tokens = int(n_tok.sum())
        wall = float(st[:, 3].max() - st[:, 2].min()) if len(st) else 0.0
        per_token = np.repeat(lat, n_tok)
        if len(per_token):
            p50, p90, p99 = (float(x) for x in np.percentile(per_token, [50, 90, 99]))
            latency = {"p50": p50, "p90": p90, "p99": p99, "mean": float(per_token.mean())}
        else:
            latency = {"p50": None, "p90": None, "p99": None, "mean": None}
        dev = cm[:, 4] == 0
        n_layers = self._layers(cp, cm)
        stall_per_layer = np.bincount(cm[dev, 0].astype(np.int64), weights=cm[dev, 3], minlength=n_layers)
        copy_busy = covered_ms([(cp[:, 3], cp[:, 4])])
        compute_busy = covered_ms([(cm[:, 1], cm[:, 2])])
        hidden = covered_ms([(cp[:, 3], cp[:, 4]), (cm[:, 1], cm[:, 2])])
        bytes_h2d = int(cp[:, 2].sum())
        pf = cp[:, 5] != 0
        return {
            "steps": int(len(st)),
            "tokens": tokens,
            "wall_ms": wall,
            "tokens_per_s": tokens / (wall / 1e3) if wall > 0 else None,
            "latency_ms": latency,  # per token (= its step's latency)
            "step_latency_ms_mean": float(lat.mean()) if len(lat) else None,
            "stall_ms": float(cm[dev, 3].sum()),
            "stall_ms_per_layer": [float(x) for x in stall_per_layer],
            "loads": int(len(cp)),
            "prefetch_loads": int(pf.sum()),
            "bytes_h2d": bytes_h2d,
            "prefetch_bytes_h2d": int(cp[pf, 2].sum()),
            "h2d_busy_ms": copy_busy,
            "h2d_gbps": bytes_h2d / (copy_busy * 1e6) if copy_busy > 0 else None,  # achieved while copying
            "compute_busy_ms": compute_busy,  # device and host compute together
            "host_compute_ms": float((cm[~dev, 2] - cm[~dev, 1]).sum()),
            "overlap": hidden / copy_busy if copy_busy > 0 else None,  # share of copy time under compute
        }

    # ---------------------------------------------------------------------------------------- tables
    def steps_table(self):
        """pandas DataFrame, one row per step: STEPS_TABLE_COLUMNS."""
        import pandas as pd

        st, cp, cm = self.arrays()
        S = len(st)
        copy_step = _event_steps(st[:, 4])
        comp_step = _event_steps(st[:, 5])
        dev = cm[: len(comp_step), 4] == 0
        stall = np.bincount(comp_step[dev], weights=cm[: len(comp_step)][dev, 3], minlength=S)[:S]
        nbytes = np.bincount(copy_step, weights=cp[: len(copy_step), 2], minlength=S)[:S]
        loads = np.bincount(copy_step, minlength=S)[:S]
        return pd.DataFrame({
            "step": st[:, 0].astype(np.int64), "n_tokens": st[:, 1].astype(np.int64),
            "start_ms": st[:, 2], "end_ms": st[:, 3], "latency_ms": st[:, 3] - st[:, 2], "stall_ms": stall,
            "loads": loads.astype(np.int64), "bytes_h2d": nbytes.astype(np.int64),
        }, columns=list(STEPS_TABLE_COLUMNS))

    def layers_table(self):
        """pandas DataFrame, one row per layer: LAYERS_TABLE_COLUMNS (ms summed over the run)."""
        import pandas as pd

        _, cp, cm = self.arrays()
        L = self._layers(cp, cm)
        dev = cm[:, 4] == 0
        ml, cl = cm[:, 0].astype(np.int64), cp[:, 0].astype(np.int64)
        dur = cm[:, 2] - cm[:, 1]
        pf = cp[:, 5] != 0
        return pd.DataFrame({
            "layer": np.arange(L, dtype=np.int64),
            "compute_ms": np.bincount(ml[dev], weights=dur[dev], minlength=L),
            "host_ms": np.bincount(ml[~dev], weights=dur[~dev], minlength=L),
            "stall_ms": np.bincount(ml[dev], weights=cm[dev, 3], minlength=L),
            "loads": np.bincount(cl, minlength=L).astype(np.int64),
            "prefetch_loads": np.bincount(cl[pf], minlength=L).astype(np.int64),
            "bytes_h2d": np.bincount(cl, weights=cp[:, 2], minlength=L).astype(np.int64),
        }, columns=list(LAYERS_TABLE_COLUMNS))

    # -------------------------------------------------------------------------------------- timeline
    def timeline(self, max_events: int = MAX_TIMELINE_EVENTS) -> dict:
        """Chrome trace format (JSON object form): "X" spans with ts/dur in microseconds, pid 1, one thread
        per timeline. Shows whole steps from the first while they fit in `max_events` spans (at least one
        step); otherData says how many steps are shown and whether the timeline was cut."""
        st, cp, cm = self.arrays()
        S = len(st)
        if S:
            spans_to = st[:, 4] + st[:, 5] + np.arange(1, S + 1)  # spans up to each step's end, its own too
            shown = min(S, max(1, int(np.searchsorted(spans_to, max_events, side="right"))))
            n_cp, n_cm = int(st[shown - 1, 4]), int(st[shown - 1, 5])
        else:  # events without steps (an engine that never ended a step): cap the events themselves
            shown, n_cp = 0, min(len(cp), max_events)
            n_cm = min(len(cm), max_events - n_cp)
        ev: list[dict] = [{"name": "process_name", "ph": "M", "pid": 1, "args": {"name": "moesim"}}]
        ev += [{"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": name}}
               for tid, name in TIMELINE_THREADS.items()]
        for layer, expert, nbytes, s, e, pf in cp[:n_cp].tolist():
            ev.append({"name": f"{'prefetch' if pf else 'load'} L{int(layer)} E{int(expert)}", "ph": "X",
                       "pid": 1, "tid": 1, "ts": s * 1e3, "dur": (e - s) * 1e3,
                       "args": {"layer": int(layer), "expert": int(expert), "bytes": int(nbytes)}})
        for layer, s, e, stall, host in cm[:n_cm].tolist():
            ev.append({"name": f"layer {int(layer)}{' host' if host else ''}", "ph": "X", "pid": 1,
                       "tid": 3 if host else 2, "ts": s * 1e3, "dur": (e - s) * 1e3,
                       "args": {"layer": int(layer), "stall_ms": stall}})
        for index, n, s, e, _, _ in st[:shown].tolist():
            ev.append({"name": f"step {int(index)}", "ph": "X", "pid": 1, "tid": 4, "ts": s * 1e3,
                       "dur": (e - s) * 1e3, "args": {"n_tokens": int(n)}})
        truncated = shown < S or n_cp < len(cp) or n_cm < len(cm)
        return {"traceEvents": ev, "displayTimeUnit": "ms",
                "otherData": {"generator": "moesim", "steps_shown": shown, "steps_total": S,
                              "truncated": truncated,
                              "note": ("all events" if not truncated
                                       else f"first {shown} of {S} steps (at most {max_events} spans)" if S
                                       else f"no steps ended; first {n_cp} copies and {n_cm} computes")}}


def _event_steps(ends: np.ndarray) -> np.ndarray:
    """int64 [events inside steps]: the step of each event, from the event counts at each step's end."""
    counts = np.diff(np.concatenate([[0], ends])).astype(np.int64)
    return np.repeat(np.arange(len(ends), dtype=np.int64), counts)


def covered_ms(sets: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Length of time covered by every set at once, each set being possibly overlapping intervals
    (starts, ends): one set -> the union's length; two sets -> the length of the intersection of unions.
    Each set is merged into disjoint intervals by one sweep in start order (a replay's copies and layers come
    in that order already: no sort then), and two unions are intersected by a two-pointer walk."""
    if not sets:
        return 0.0
    unions = [_union(np.ascontiguousarray(s, np.float64), np.ascontiguousarray(e, np.float64)) for s, e in sets]
    us, ue = unions[0]
    for vs, ve in unions[1:]:
        us, ue = _intersect(us, ue, vs, ve)
    return float((ue - us).sum())


def _union(s: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of the disjoint intervals, in order, that cover the union of the intervals (s, e)."""
    if len(s) > 1 and not (s[1:] >= s[:-1]).all():
        order = np.argsort(s, kind="stable")
        s, e = s[order], e[order]
    return _merge(s, e)


@njit(cache=True, nogil=True)
def _merge(s, e):
    n = len(s)
    os_, oe = np.empty(n), np.empty(n)
    k = -1
    for i in range(n):
        if e[i] <= s[i]:  # empty: covers nothing
            continue
        if k >= 0 and s[i] <= oe[k]:
            if e[i] > oe[k]:
                oe[k] = e[i]
        else:
            k += 1
            os_[k], oe[k] = s[i], e[i]
    return os_[:k + 1], oe[:k + 1]


@njit(cache=True, nogil=True)
def _intersect(as_, ae, bs, be):
    n = len(as_) + len(bs)
    os_, oe = np.empty(n), np.empty(n)
    i = j = k = 0
    while i < len(as_) and j < len(bs):
        lo = as_[i] if as_[i] > bs[j] else bs[j]
        hi = ae[i] if ae[i] < be[j] else be[j]
        if hi > lo:
            os_[k], oe[k] = lo, hi
            k += 1
        if ae[i] < be[j]:
            i += 1
        else:
            j += 1
    return os_[:k], oe[:k]
