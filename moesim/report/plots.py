"""Figures of the reports (`python -m moesim report DIR...`), each returned as a PNG `data:` URI so that the
HTML file holds everything it shows and needs no network.

matplotlib is used through `Figure` directly (no pyplot, no GUI backend, no global figure state); text from
traces and configs is drawn as plain text (mathtext off: a `$` in a model name stays a `$`).
"""
from __future__ import annotations

import base64
import io
from contextlib import contextmanager

import numpy as np
import pandas as pd

GIB = 2**30
WIDTH, HEIGHT, DPI = 7.6, 3.3, 110  # inches, inches, dots per inch: ~840 x 360 px, sharp on a laptop
STYLE = {"font.size": 9, "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
         "grid.alpha": 0.3, "text.parse_math": False, "legend.frameon": False, "svg.fonttype": "path"}
BOUND_COLOR = "#222222"
FRONT_COLOR = "#d62728"
MARKERS = "osD^v<>ph"  # with tab20's 20 colours: 180 strategies before a colour and marker pair repeats


def _style(i: int) -> dict:
    """Colour and marker of the i-th series: every strategy of a comparison looks different (tab10 repeated its
    colours after ten)."""
    import matplotlib

    colours = matplotlib.colormaps["tab20"].colors
    return {"color": colours[(i * 2) % 20 if i < 10 else (i * 2 + 1) % 20], "marker": MARKERS[(i // 20 + i) % 9]}


@contextmanager
def _figure(height: float = HEIGHT, bottom: float = 0.5, right: float = 0.15):
    """A Figure with fixed margins (inches): a layout engine would double the drawing time."""
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(WIDTH, height), dpi=DPI)
        fig.subplots_adjust(left=0.75 / WIDTH, right=1 - right / WIDTH, bottom=bottom / height, top=1 - 0.35 / height)
        yield fig


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#666666")
    ax.set_xticks([])
    ax.set_yticks([])


# ------------------------------------------------------------------------------------------------ a run
def latency_distribution(steps: pd.DataFrame, latency: dict) -> str:
    """Histogram of per-token latency (each token waits for its whole step), with p50/p90/p99 marked."""
    with _figure() as fig:
        ax = fig.add_subplot()
        lat = steps["latency_ms"].to_numpy(float)
        n_tok = steps["n_tokens"].to_numpy(float)
        if len(lat) and n_tok.sum() > 0:
            ax.hist(lat, bins=latency_bins(lat), weights=n_tok, color="#4c72b0")
            for q, style in (("p50", "-"), ("p90", "--"), ("p99", ":")):
                if latency.get(q) is not None:
                    ax.axvline(latency[q], color="#222222", linestyle=style, linewidth=1,
                               label=f"{q} {latency[q]:.2f} ms")
            ax.legend(loc="upper right")
            ax.set_xlabel("per-token latency (ms)")
            ax.set_ylabel("tokens")
        else:
            _empty(ax, "no steps")
        ax.set_title("per-token latency")
        return _png(fig)


def latency_bins(lat: np.ndarray, most: int = 60) -> np.ndarray:
    """Bin edges for step latencies, which come in quanta (a step's time is its compute plus whole copies): each
    bin spans a whole number of the smallest gap between distinct latencies, with the edges half a gap off the
    values, so that no bin catches one more quantum than its neighbour (the comb of evenly spaced edges); at most `most`
    bins."""
    u = np.unique(np.round(lat, 6))
    if len(u) < 2:
        return np.array([u[0] - 0.5, u[0] + 0.5]) if len(u) else np.array([0.0, 1.0])
    span = u[-1] - u[0]
    gaps = np.diff(u)
    quantum = float(gaps.min())
    if quantum < span / (100 * most):  # not quantised at this scale: even bins
        return np.linspace(u[0], u[-1], most + 1)
    width = quantum * max(1, int(np.ceil(span / (quantum * most))))
    return np.arange(u[0] - quantum / 2, u[-1] + width, width)  # whole quanta in each bin from the first


def layer_stall(layers: pd.DataFrame) -> str:
    """Bars: per layer, time the compute waited for copies (ms, summed over the run)."""
    with _figure() as fig:
        ax = fig.add_subplot()
        if len(layers):
            ax.bar(layers["layer"], layers["stall_ms"], color="#dd8452", width=0.8)
            ax.set_xlabel("layer")
            ax.set_ylabel("stall (ms)")
            ax.set_xlim(-0.6, len(layers) - 0.4)
        else:
            _empty(ax, "no layers")
        ax.set_title("stall per layer: compute waiting for expert copies")
        return _png(fig)


def bandwidth_over_time(steps: pd.DataFrame) -> str:
    """Host->device GB/s over the run: each step's bytes spread over its span, summed in time bins."""
    with _figure() as fig:
        ax = fig.add_subplot()
        start = steps["start_ms"].to_numpy(float)
        end = steps["end_ms"].to_numpy(float)
        nbytes = steps["bytes_h2d"].to_numpy(float)
        if len(start) and end.max() > start.min():
            t0, t1 = start.min(), end.max()
            n_bins = int(min(200, max(10, len(start) // 4)))
            edges = np.linspace(t0, t1, n_bins + 1)
            # bytes per bin: each step's bytes at a uniform rate between its start and end
            rate = nbytes / np.maximum(end - start, 1e-12)  # bytes per ms
            # bytes moved before each edge; one pass over the steps per edge (memory O(steps))
            cum = np.array([float((np.clip(edge, start, end) - start) @ rate) for edge in edges])
            per_bin = np.diff(cum)  # bytes
            width_s = (edges[1] - edges[0]) / 1e3
            gbps = per_bin / width_s / 1e9
            ax.stairs(gbps, (edges - t0) / 1e3, fill=True, color="#55a868", alpha=0.8)
            ax.set_xlabel("time (s)")
            ax.set_ylabel("host -> device (GB/s)")
            ax.set_ylim(bottom=0)
        else:
            _empty(ax, "no time elapsed")
        ax.set_title("copy bandwidth over time")
        return _png(fig)


def expert_heatmap(matrix: np.ndarray) -> str:
    """Heatmap [layer, expert]: tokens that chose each expert."""
    L, E = matrix.shape
    with _figure(height=min(7.0, max(2.6, 0.12 * L + 1.2)), right=0.75) as fig:
        ax = fig.add_subplot()
        im = ax.imshow(matrix, aspect="auto", interpolation="nearest", cmap="viridis", origin="lower")
        fig.colorbar(im, ax=ax, label="tokens", fraction=0.05, pad=0.015)
        ax.set_xlabel(f"expert (0..{E - 1})")
        ax.set_ylabel(f"layer (0..{L - 1})")
        ax.grid(False)
        ax.set_title("expert use: tokens choosing each expert, per layer")
        return _png(fig)


# ------------------------------------------------------------------------------------------ comparisons
def _series(table: pd.DataFrame):
    """(name, rows) per line of the budget plots: a strategy label, per value of the other varied settings."""
    other = table["other_settings"]
    keyed = table.assign(_series=table["label"] + np.where(other != "", " | " + other, ""))
    for name, g in keyed.groupby("_series", sort=False):
        yield name, g.sort_values("budget_slots")


def _budget_ticks(ax, table: pd.DataFrame) -> None:
    ticks = table.drop_duplicates("budget_slots").sort_values("budget_slots")
    ax.set_xticks(ticks["budget_slots"], [f"{b}\n{int(s)} slots" for b, s in zip(ticks["budget"],
                                                                                  ticks["budget_slots"])])


def hit_rate_vs_budget(table: pd.DataFrame) -> str:
    """Lines: hit rate against budget (slots), one per strategy; bounds (Belady) drawn dashed and dark. With one
    budget, a line per strategy would be a column of dots: then the strategies ranked by hit rate, as bars."""
    data = table[table["budget_slots"].notna() & table["hit_rate"].notna()]
    if len(data) and data["budget_slots"].nunique() == 1:
        return _ranked_hit_rates(data)
    with _figure(height=3.6, bottom=0.7) as fig:
        ax = fig.add_subplot()
        if len(data):
            for i, (name, g) in enumerate(_series(data)):
                bound = bool(g["bound"].iloc[0])
                style = _style(i)
                ax.plot(g["budget_slots"], g["hit_rate"], marker=style["marker"], markersize=4,
                        linestyle="--" if bound else "-", color=BOUND_COLOR if bound else style["color"],
                        linewidth=1.8 if bound else 1.4, label=f"{name} (bound)" if bound else name)
            _budget_ticks(ax, data)
            ax.set_xlabel("budget")
            ax.set_ylabel("hit rate")
            ax.set_ylim(0, 1.02)
            ax.legend(loc="lower right", fontsize=8)
        else:
            _empty(ax, "no hit rates")
        ax.set_title("hit rate against budget (dashed: bound, not deployable)")
        return _png(fig)


def _ranked_hit_rates(data: pd.DataFrame) -> str:
    """Horizontal bars: each run's hit rate at the one budget of the comparison, highest on top."""
    rows = data.sort_values("hit_rate")
    names = [f"{r.label}{' | ' + r.other_settings if r.other_settings else ''}{' (bound)' if r.bound else ''}"
             for r in rows.itertuples()]
    height = max(2.4, 0.7 + 0.24 * len(rows))
    with _figure(height=height, bottom=0.45) as fig:
        fig.subplots_adjust(left=min(0.45, (0.3 + 0.065 * max(map(len, names))) / WIDTH))
        ax = fig.add_subplot()
        colours = [BOUND_COLOR if b else "#4c72b0" for b in rows["bound"]]
        ax.barh(range(len(rows)), rows["hit_rate"], color=colours, alpha=0.85)
        for y, v in enumerate(rows["hit_rate"]):
            ax.text(v + 0.01, y, f"{v:.3f}", va="center", fontsize=8)
        ax.set_yticks(range(len(rows)), names, fontsize=8)
        ax.set_xlim(0, 1.08)
        ax.set_xlabel("hit rate")
        b = rows.iloc[0]
        ax.set_title(f"hit rate at {b['budget']} ({int(b['budget_slots'])} slots), ranked (dark: bound)")
        return _png(fig)


def speed_vs_memory(table: pd.DataFrame, front: np.ndarray) -> str:
    """Scatter: tokens/s against peak device memory; the Pareto front of deployable runs drawn as a line."""
    with _figure(height=3.8) as fig:
        ax = fig.add_subplot()
        x = table["peak_device_bytes"].to_numpy(float) / GIB
        y = table["tokens_per_s"].to_numpy(float)
        ok = ~(np.isnan(x) | np.isnan(y))
        if ok.any():
            for i, (name, g) in enumerate(table[ok].groupby("label", sort=False)):
                bound = bool(g["bound"].iloc[0])
                style = _style(i)
                ax.scatter(g["peak_device_bytes"] / GIB, g["tokens_per_s"], s=28,
                           label=name + (" (bound)" if bound else ""),
                           facecolors="none" if bound else style["color"],
                           edgecolors=BOUND_COLOR if bound else style["color"],
                           marker="D" if bound else style["marker"], zorder=3)
            order = np.argsort(x[front])
            fx, fy = x[front][order], y[front][order]
            if len(fx):
                ax.step(fx, fy, where="post", color=FRONT_COLOR, linewidth=1.2, zorder=2, label="Pareto front")
                ax.scatter(fx, fy, s=90, facecolors="none", edgecolors=FRONT_COLOR, linewidths=1.2, zorder=4)
            ax.set_xlabel("peak device memory (GiB)")
            ax.set_ylabel("tokens/s")
            ax.legend(loc="lower right", fontsize=8)
        else:
            _empty(ax, "no timings")
        ax.set_title("tokens/s against VRAM (circled: Pareto front of deployable runs)")
        return _png(fig)


def bytes_moved(table: pd.DataFrame) -> str:
    """Grouped bars: GiB copied host->device per budget, one bar per strategy."""
    data = table[table["budget_slots"].notna() & table["bytes_h2d"].notna()]
    groups = list(dict.fromkeys(data["setting"]))
    with _figure(height=3.6, bottom=0.9 if len(groups) > 4 else 0.5) as fig:
        ax = fig.add_subplot()
        if len(data):
            series = list(dict.fromkeys(data["label"]))
            width = 0.8 / max(1, len(series))
            for j, name in enumerate(series):
                g = data[data["label"] == name]
                pos = [groups.index(s) + (j - (len(series) - 1) / 2) * width for s in g["setting"]]
                bound = bool(g["bound"].iloc[0])
                ax.bar(pos, g["bytes_h2d"] / GIB, width=width * 0.95, label=name + (" (bound)" if bound else ""),
                       color=BOUND_COLOR if bound else _style(j)["color"], alpha=0.55 if bound else 1.0)
            ax.set_xticks(range(len(groups)), [g or "all runs" for g in groups], fontsize=8,
                          rotation=20 if len(groups) > 4 else 0)
            ax.set_ylabel("host -> device (GiB)")
            ax.legend(fontsize=8)
        else:
            _empty(ax, "no byte counts")
        ax.set_title("bytes moved")
        return _png(fig)
