"""HTML reports (`python -m moesim report DIR...`), built from real runs of a tiny trace: contents, figures,
self-containment, escaping, the best-strategy sentence, the Pareto front, the experts table, the command."""
import base64
import dataclasses
import re
import json
import shutil
import subprocess
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moesim.__main__ import compose
from moesim.api import run
from moesim.errors import MoesimError
from moesim.report import (build_comparison_report, build_report, build_run_report, report_command,
                           version_info, write_run_report)
from moesim.report.tables import comparison_table, expert_use, pareto_front
from moesim.results import EXPERTS, read_run, write_run
from moesim.trace import MODEL_SPECS, from_arrays, load_trace, save_trace

EVIL = "<script>alert(1)</script>"


def tiny_trace(path, name="tiny-moe", tokens=200, source=None):
    """A 200-token, 4-layer, 16-expert top-2 trace with skewed routing, saved to `path`."""
    spec = dataclasses.replace(MODEL_SPECS["gpt-oss-20b"], name=name, layers=4, experts=16, top_k=2)
    rng = np.random.default_rng(3)
    p = 1.0 / np.arange(1, 17)
    p /= p.sum()
    e = np.array([[rng.choice(16, 2, replace=False, p=p) for _ in range(4)] for _ in range(tokens)])
    tr = from_arrays(spec, e, np.full(e.shape, 0.5), seq=np.repeat([0, 1], tokens // 2), source=source)
    return str(save_trace(tr, Path(path)))


def do_run(trace, out, *overrides):
    return run(compose("run", [f"trace={trace}", f"out='{out}'", "progress=false", *overrides]))  # quoted: , and =


class Page(HTMLParser):
    """Tags, their attributes and the text of an HTML page."""

    def __init__(self, html: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def all(self, tag):
        return [a for t, a in self.tags if t == tag]


def assert_self_contained(html: str) -> list[bytes]:
    """No script, no stylesheet link, no remote or file URL; every image an inline PNG. Returns the PNGs."""
    page = Page(html)
    assert not page.all("script") and not page.all("link") and not page.all("iframe")
    for _, attrs in page.tags:
        for k in ("src", "href"):
            assert k not in attrs or attrs[k].startswith("data:"), attrs
    assert "url(" not in html and "@import" not in html
    pngs = []
    for img in page.all("img"):
        head, _, data = img["src"].partition(",")
        assert head == "data:image/png;base64"
        png = base64.b64decode(data, validate=True)
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 2000
        pngs.append(png)
    return pngs


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    return tiny_trace(tmp_path_factory.mktemp("trace") / "tiny.moetrace.safetensors",
                      source={"generator": "tests", "licence": "CC0-1.0"})


@pytest.fixture(scope="module")
def grid(trace, tmp_path_factory):
    """Real runs: lru, fifo and belady at 12.5% and 25% (6 results directories in one root)."""
    root = tmp_path_factory.mktemp("grid")
    for strategy in ("lru", "fifo", "belady"):
        for budget in ("12.5%", "25%"):
            do_run(trace, root / f"budget={budget},strategy={strategy}", f"strategy={strategy}", f"budget={budget}")
    return root


# ------------------------------------------------------------------------------------------- run report
def test_run_report_has_summary_figures_and_provenance(grid):
    d = grid / "budget=25%,strategy=lru"
    path = write_run_report(d)
    assert path == d / "report.html"
    html = path.read_text()
    assert len(assert_self_contained(html)) == 4  # latency, stall, bandwidth, expert heatmap
    s = read_run(d)["summary"]
    text = " ".join(Page(html).text)
    for needle in ("Per-token latency", "waited for expert copies", "Host-to-device bytes", "Expert use", "Provenance",
                   "CC0-1.0", "tiny-moe", "rtx-4090", f"{s['hit_rate']:.4f}", f"{s['tokens_per_s']:.1f}",
                   f"{s['latency_ms']['p50']:.2f}", "Resolved config", version_info()["version"],
                   version_info()["commit"], "(experts.parquet)"):
        assert needle in text, needle
    assert "bound: not deployable" not in text
    assert "bound" in build_run_report(grid / "budget=25%,strategy=belady").read_text()


def test_experts_table_round_trip_and_counts(trace, tmp_path):
    tr = load_trace(trace)
    table = expert_use(tr, chunk=37)  # chunks that do not divide the trace
    # independent count: token by token
    want = Counter((layer, int(e)) for t in range(tr.n_tokens) for layer in range(4)
                   for e in np.asarray(tr.experts[t, layer]) if e >= 0)
    assert len(table) == 4 * 16 and table["requests"].sum() == tr.n_tokens * 4 * 2
    for row in table.itertuples():
        assert row.requests == want.get((row.layer, row.expert), 0)
    src = read_run(do_run(trace, tmp_path / "a").out_dir)
    d = write_run(tmp_path / "b", src["config"], src["summary"], src["steps"], src["layers"],
                  {"traceEvents": []}, experts=table)
    back = read_run(d)["experts"]
    pd.testing.assert_frame_equal(back, table)
    # the report uses the table when there is one
    assert "(experts.parquet)" in build_run_report(d).read_text()
    # rewriting the directory without experts removes the stale table; such a run reads back without one
    write_run(d, src["config"], src["summary"], src["steps"], src["layers"], {"traceEvents": []})
    assert not (d / EXPERTS).exists() and read_run(d)["experts"] is None


def test_a_report_never_opens_files_its_results_directory_names(trace, tmp_path):
    """issue 17: rendering someone else's results directory read the local files it named (the trace's first 8
    bytes shown as a header length; a local hardware YAML's keys). Without experts.parquet the report says the
    experts were not recorded; a hardware profile file is named, not opened."""
    d = do_run(trace, tmp_path / "r").out_dir
    (d / EXPERTS).unlink(missing_ok=True)  # as a run written before experts.parquet existed
    secret = tmp_path / "secret.yaml"
    secret.write_text("name: mine\nsecret_key_name: 1\n")
    summary = json.loads((d / "summary.json").read_text())
    summary["trace"]["path"] = str(secret)
    summary.pop("hardware_profile")
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "config.yaml").write_text((d / "config.yaml").read_text().replace("hardware: rtx-4090",
                                                                         f"hardware: {secret}"))
    opened = []
    real_open = open

    def spy(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    import builtins

    builtins.open = spy
    try:
        html = build_run_report(d).read_text()
    finally:
        builtins.open = real_open
    assert len(assert_self_contained(html)) == 3 and "Expert use was not recorded" in html
    assert "secret_key_name" not in html and "does not open files it names" in html
    assert not [f for f in opened if "secret" in f]


def test_strings_from_traces_and_configs_are_escaped(tmp_path):
    evil = tiny_trace(tmp_path / "evil.moetrace.safetensors", name=EVIL, source={"licence": "<b>x</b>", "model": EVIL})
    a = do_run(evil, tmp_path / "a", "strategy.name='<img src=x onerror=alert(2)>'").out_dir
    b = do_run(evil, tmp_path / "b", "budget=12.5%").out_dir
    for html in (build_run_report(a).read_text(), build_comparison_report([a, b], tmp_path / "c.html").read_text()):
        assert EVIL not in html and "<img src=x" not in html and "<b>x</b>" not in html
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
        assert_self_contained(html)
        text = " ".join(Page(html).text)  # what a reader sees: the text itself
        assert EVIL in text
    assert "&lt;img src=x onerror=alert(2)&gt;" in build_run_report(a).read_text()


# ------------------------------------------------------------------------------------ comparison report
def test_comparison_names_best_per_budget_and_bound_separately(grid):
    runs = [read_run(d) for d in sorted(grid.iterdir()) if d.is_dir()]
    path = build_comparison_report(runs, grid / "report.html", root=grid)
    html = path.read_text()
    assert len(assert_self_contained(html)) == 3  # hit rate vs budget, speed vs memory, bytes moved
    lead = re.search(r'<div class="lead">(.*?)</div>', html, re.S).group(1)
    for budget in ("12.5%", "25%"):
        cells = [r["summary"] for r in runs if r["config"]["budget"] == budget]
        top = max(s["tokens_per_s"] for s in cells if not s["bound"])
        best = sorted(s["strategy"] for s in cells if not s["bound"] and s["tokens_per_s"] == top)
        bound = next(s for s in cells if s["bound"])
        assert "belady" not in best and bound["strategy"] == "belady"
        if len(best) == 1:
            assert f"budget={budget}: <strong>{best[0]}</strong>, {top:.1f} tokens/s" in lead
        else:  # at 12.5% every slot holds the layer's top-k: lru and fifo make the same moves
            line = re.search(f"budget={re.escape(budget)}: (.*?)<span", lead).group(1)
            assert line.startswith(f"tied at {top:.1f} tokens/s:")
            assert re.findall(r"<strong>(.*?)</strong>", line) == best
        assert f"belady (bound): {bound['tokens_per_s']:.1f} tokens/s" in lead
    text = " ".join(Page(html).text)
    for r in runs:
        assert r["dir"].name in text
    assert "CC0-1.0" in text and "tiny-moe" in text


def test_comparison_table_columns_types_and_order(grid):
    runs = [read_run(d) for d in sorted(grid.iterdir()) if d.is_dir()]
    t = comparison_table(runs)
    assert len(t) == 6
    assert list(t["budget_slots"]) == sorted(t["budget_slots"])
    assert set(t["setting"]) == {"budget=12.5%", "budget=25%"}
    assert set(t["label"]) == {"lru", "fifo", "belady"}
    assert t["bound"].dtype == bool and list(t[t["bound"]]["label"].unique()) == ["belady"]
    for col in ("hit_rate", "tokens_per_s", "bytes_h2d", "peak_device_bytes", "latency_p99_ms"):
        assert t[col].dtype == np.float64 and t[col].notna().all()
    assert "cfg.budget" in t and "cfg.strategy.name" in t and "cfg.out" not in t
    by_dir = {Path(r["dir"]).resolve(): r["summary"] for r in runs}
    for row in t.itertuples():
        assert row.hits == by_dir[Path(row.dir)]["hits"]

def test_comparison_table_survives_parquet(grid, tmp_path):
    t = comparison_table([read_run(d) for d in sorted(grid.iterdir()) if d.is_dir()])
    t.to_parquet(tmp_path / "t.parquet", index=False)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "t.parquet"), t)


def test_strategy_parameters_label_runs_apart(trace, tmp_path):
    a = do_run(trace, tmp_path / "a", "strategy=lfu", "strategy.cache.decay=0.5").out_dir
    b = do_run(trace, tmp_path / "b", "strategy=lfu", "strategy.cache.decay=1.0").out_dir
    t = comparison_table([read_run(a), read_run(b)])
    assert sorted(t["label"]) == ["lfu (cache.decay=0.5)", "lfu (cache.decay=1.0)"]
    assert set(t["setting"]) == {""}


def test_pareto_front():
    vram = np.array([1.0, 2.0, 2.0, 3.0, 1.5, np.nan])
    speed = np.array([10.0, 20.0, 15.0, 20.0, 9.0, 99.0])
    assert pareto_front(vram, speed).tolist() == [True, True, False, False, False, False]
    assert pareto_front(np.array([1.0, 1.0]), np.array([5.0, 5.0])).tolist() == [True, True]  # ties both stay


# ------------------------------------------------------------------------------------------- the command
def test_report_command_run_root_and_several(grid, tmp_path, capsys):
    one = grid / "budget=12.5%,strategy=fifo"
    (one / "report.html").unlink(missing_ok=True)
    assert report_command([str(one)]) == one / "report.html"
    assert "moesim run: fifo" in (one / "report.html").read_text()
    root_report = report_command([str(grid)])
    assert root_report == grid / "report.html"
    assert "moesim sweep: " + grid.name in root_report.read_text()
    out = tmp_path / "sub" / "two.html"
    assert report_command([str(one), str(grid / "budget=25%,strategy=fifo"), f"out={out}"]) == out
    assert "comparison of 2 runs" in out.read_text()
    assert f"report: {out}" in capsys.readouterr().out


def test_report_mistakes_name_the_directory(grid, tmp_path, capsys):
    with pytest.raises(MoesimError, match="no such results directory"):
        build_report([tmp_path / "nope"])
    with pytest.raises(MoesimError, match="name at least one"):
        report_command([])
    with pytest.raises(MoesimError, match="unknown option 'colour'"):
        report_command([str(grid), "colour=blue"])
    half = tmp_path / "root" / "budget=50%,strategy=lru"
    shutil.copytree(grid / "budget=25%,strategy=lru", half)
    (half / "summary.json").unlink()
    with pytest.raises(MoesimError, match=r"summary\.json: missing \(summary\.json is written last"):
        build_report([half])
    with pytest.raises(MoesimError, match="neither a results directory"):
        build_report([half.parent])
    # a root with one finished and one unfinished cell: the unfinished one is skipped, loudly
    shutil.copytree(grid / "budget=25%,strategy=fifo", half.parent / "budget=25%,strategy=fifo")
    path = build_report([half.parent])
    assert "budget=25%,strategy=fifo" in path.read_text() and "budget=50%" not in path.read_text()
    assert "skipping" in capsys.readouterr().err


def test_version_info_names_this_checkout():
    info = version_info()
    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=5)
    except OSError:
        head = None
    if head is not None and head.returncode == 0:
        assert info["commit"] == head.stdout.strip()
    else:
        assert info["commit"] == "unknown"


def test_latency_bins_follow_the_quantum_and_styles_do_not_repeat():
    """Step latencies come in quanta: every bin spans whole quanta, edges between values (no comb of bins that
    catch one more value than their neighbours); continuous data gets even bins. Thirty series, thirty looks."""
    from moesim.report.plots import _style, latency_bins

    q = 0.7
    lat = 3.0 + q * np.random.default_rng(0).integers(0, 400, 5000)
    edges = latency_bins(lat)
    widths = np.diff(edges)
    assert len(edges) <= 61 and np.allclose(widths, widths[0]) and np.isclose(widths[0] / q, round(widths[0] / q))
    counts, _ = np.histogram(lat, edges)
    per_bin = np.histogram(np.unique(lat), edges)[0]
    assert len(set(per_bin[:-1])) == 1 and per_bin[-1] <= per_bin[0]  # the same number of quanta in each (last: the rest)
    assert counts.sum() == len(lat)
    assert len(latency_bins(np.random.default_rng(1).normal(10, 1, 1000))) == 61
    looks = {(tuple(_style(i)["color"]), _style(i)["marker"]) for i in range(30)}
    assert len(looks) == 30 and len({tuple(_style(i)["color"]) for i in range(20)}) == 20


def test_one_budget_comparison_ranks_hit_rates_instead_of_a_column_of_dots(monkeypatch):
    from moesim.report import plots

    table = pd.DataFrame({"label": ["lru", "lfu", "belady"], "other_settings": ["", "", ""], "bound": [False, False, True],
                          "budget": ["25%"] * 3, "budget_slots": [192] * 3, "hit_rate": [0.6, 0.5, 0.8]})
    seen = []
    monkeypatch.setattr(plots, "_ranked_hit_rates", lambda data: seen.append(list(data["label"])) or "ranked")
    assert plots.hit_rate_vs_budget(table) == "ranked" and seen == [["lru", "lfu", "belady"]]
    two = pd.concat([table, table.assign(budget="50%", budget_slots=384)])
    assert plots.hit_rate_vs_budget(two).startswith("data:image/png;base64,")


def test_merged_runs_are_not_split_by_how_they_were_run(tmp_path):
    """`report A B` of runs that differ only in fast=, timeline=, progress= or a chosen prefetch/offload (which the
    strategy label carries): one setting, one best, not one per internal field."""
    from moesim.report.tables import best_per_setting, comparison_table

    trace = tiny_trace(tmp_path / "t.moetrace.safetensors")
    a = do_run(trace, tmp_path / "a", "strategy=lru", "fast=false", "timeline=true").out_dir
    b = do_run(trace, tmp_path / "b", "strategy=lfu").out_dir
    c = do_run(trace, tmp_path / "c", "strategy=lru", "prefetch=transition").out_dir
    table = comparison_table([read_run(d) for d in (a, b, c)])
    assert set(table["setting"]) == {""} and len(best_per_setting(table)) == 1
    assert set(table["label"]) == {"lru", "lfu", "lru+transition"}
