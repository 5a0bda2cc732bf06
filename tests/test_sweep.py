"""`python -m moesim sweep`: Hydra multirun over `run`'s config, one results directory per cell, a combined
results.parquet and report.html, resuming after SIGKILL, and the joblib and submitit launchers."""
import dataclasses
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from moesim.__main__ import COMMANDS, compose, main
from moesim.api import run
from moesim.errors import MoesimError
from moesim.report.tables import SUMMARY_COLUMNS
from moesim.results import is_complete, read_run
from moesim.sweep import cell_name, default_root, sweep
from moesim.trace import MODEL_SPECS, from_arrays, save_trace

REPO = Path(__file__).resolve().parents[1]
GRID = ["strategy=lru,belady", "budget=12.5%,25%"]
CELLS = ["budget=12.5%,strategy=belady", "budget=12.5%,strategy=lru", "budget=25%,strategy=belady",
         "budget=25%,strategy=lru"]


def tiny_trace(path, tokens=200):
    """A 200-token, 4-layer, 16-expert top-2 trace with skewed routing, saved to `path`."""
    spec = dataclasses.replace(MODEL_SPECS["gpt-oss-20b"], name="tiny-moe", layers=4, experts=16, top_k=2)
    rng = np.random.default_rng(3)
    p = 1.0 / np.arange(1, 17)
    p /= p.sum()
    e = np.array([[rng.choice(16, 2, replace=False, p=p) for _ in range(4)] for _ in range(tokens)])
    return str(save_trace(from_arrays(spec, e, np.full(e.shape, 0.5), seq=np.repeat([0, 1], tokens // 2)),
                          Path(path)))


def args(trace, out, *extra):
    return [f"trace={trace}", f"out={out}", "progress=false", *extra]


def results_without_dir(root) -> pd.DataFrame:
    return pd.read_parquet(Path(root) / "results.parquet").drop(columns=["dir"])


def mtimes(root) -> dict:
    return {c.name: (c / "summary.json").stat().st_mtime_ns for c in Path(root).iterdir()
            if (c / "summary.json").exists()}


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    return tiny_trace(tmp_path_factory.mktemp("trace") / "tiny.moetrace.safetensors")


@pytest.fixture(scope="module")
def reference(trace, tmp_path_factory):
    """The 2 x 2 grid, swept in-process without interruption: (root, what sweep() returned)."""
    root = tmp_path_factory.mktemp("reference") / "sweep"
    return root, sweep(args(trace, root, *GRID))


# ------------------------------------------------------------------------------------------- cell names
def test_cell_names_are_deterministic_and_safe():
    task = ["trace=/a/b.safetensors", "strategy=lru", "budget=25%", "out='/x'", "sweep.cells=4"]
    assert cell_name(task, ["strategy", "budget"]) == "budget=25%,strategy=lru"
    assert cell_name(list(reversed(task)), ["budget", "strategy"]) == "budget=25%,strategy=lru"
    assert cell_name(task, []) == "run"
    a = cell_name(["trace=/a/b.safetensors"], ["trace"])
    b = cell_name(["trace=_a_b.safetensors"], ["trace"])
    assert "/" not in a and a != b and a.startswith("trace=_a_b.safetensors-")
    assert cell_name(["+strategy.cache.decay=0.5"], ["strategy.cache.decay"]) == "strategy.cache.decay=0.5"
    long = cell_name([f"trace={'x' * 400}"], ["trace"])
    assert len(long) <= 150 and long != cell_name([f"trace={'x' * 399}y"], ["trace"])


def test_default_root_is_the_same_for_the_same_sweep():
    a = default_root(["strategy=lru,lfu", "budget=25%,50%", "trace=t"], ["budget", "strategy"])
    b = default_root(["trace=t", "budget=25%,50%", "strategy=lru,lfu", "progress=false"], ["budget", "strategy"])
    c = default_root(["strategy=lru,lfu", "budget=25%,50%", "trace=u"], ["budget", "strategy"])
    assert a == b != c and a.parent == Path("reports/sweeps") and a.name.startswith("budget+strategy-")


# --------------------------------------------------------------------------------------------- in-process
def test_sweep_writes_cells_table_and_report(reference, trace, tmp_path):
    root, done = reference
    assert sorted(c.name for c in done["cells"]) == CELLS
    for name in CELLS:
        assert is_complete(root / name)
    # a cell is exactly a `run` of its options: same config (but out), same numbers
    direct = run(compose("run", args(trace, tmp_path / "direct", "strategy=lru", "budget=25%")))
    cell = read_run(root / "budget=25%,strategy=lru")
    want = OmegaConf.to_container(compose("run", args(trace, "X", "strategy=lru", "budget=25%")), resolve=True)
    assert cell["config"] == want | {"out": str(root / "budget=25%,strategy=lru")}
    for k in ("hits", "loads", "bytes_h2d", "tokens_per_s", "wall_ms", "peak_device_bytes"):
        assert cell["summary"][k] == direct.summary[k], k
    table = pd.read_parquet(root / "results.parquet")
    assert sorted(table["run"]) == CELLS and table["bound"].sum() == 2
    assert done["results"] == root / "results.parquet" and done["report"] == root / "report.html"
    html = (root / "report.html").read_text()
    assert "belady (bound)" in html and "budget=12.5%" in html
    assert not list(root.rglob(".tmp-*"))


def test_rerun_skips_complete_cells_and_rerun_with_other_options_does_not(reference, trace, capfd):
    root, _ = reference
    before = mtimes(root)
    table = results_without_dir(root)
    sweep(args(trace, root, *reversed(GRID)))  # same sweep, keys in another order
    err = capfd.readouterr().err
    assert err.count("complete, skipped") == 4 and "done in" not in err
    assert mtimes(root) == before
    pd.testing.assert_frame_equal(results_without_dir(root), table)
    # same root, another hardware: the stored cells are not this sweep's, so they are run again
    copy = root.parent / "other"
    shutil.copytree(root, copy)
    sweep(args(trace, copy, *GRID, "hardware=h200"))
    err = capfd.readouterr().err
    assert "skipped" not in err and err.count("done in") == 4
    assert all(read_run(copy / c)["summary"]["hardware"] == "h200" for c in CELLS)


def test_progress_lines_cell_reports_and_an_awkward_root(trace, tmp_path, capfd):
    root = tmp_path / "my sweep, v=1 'x' \\ y"  # spaces, a comma, =, quotes, a backslash
    done = sweep([f"trace={trace}", f"out=\"{root}\"", "progress=false", "strategy=lru,fifo,lfu", "report=false",
                  "cell_reports=true"])
    err = capfd.readouterr().err
    assert f"sweep: 3 cells -> {root}" in err
    for i in (1, 2, 3):
        assert f"[{i}/3] " in err
    assert err.count("done in") == 3
    assert done["root"] == root and sorted(c.parent for c in done["cells"]) == [root] * 3
    for c in done["cells"]:
        assert is_complete(c) and (c / "report.html").is_file()  # cell_reports=true
    assert not (root / "results.parquet").exists()  # report=false


def test_sigkill_loses_no_finished_cell(reference, trace, tmp_path):
    """A real sweep, killed (SIGKILL) right after its first cell completes, then run again."""
    root = tmp_path / "killed"
    code = "import sys; from moesim.sweep import sweep_command; sweep_command(sys.argv[1:])"
    proc = subprocess.Popen([sys.executable, "-c", code, *args(trace, root, *GRID)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not any(is_complete(c) for c in root.glob("*")):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no cell completed in 120 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    finished = {c.name for c in root.iterdir() if is_complete(c)}
    assert finished and len(finished) < 4, finished  # killed mid-sweep
    for c in root.iterdir():  # nothing half-written looks complete
        if c.is_dir():
            assert is_complete(c) == (c / "summary.json").exists()
            if is_complete(c):
                read_run(c)
    assert not (root / "results.parquet").exists() and not (root / "report.html").exists()
    before = mtimes(root)
    done = sweep(args(trace, root, *GRID))
    after = mtimes(root)
    assert {k: after[k] for k in finished} == {k: before[k] for k in finished}  # not recomputed
    assert sorted(c.name for c in done["cells"]) == CELLS and all(is_complete(root / c) for c in CELLS)
    pd.testing.assert_frame_equal(results_without_dir(root), results_without_dir(reference[0]))


def test_failed_cells_are_named_and_the_others_finish(trace, tmp_path, capfd):
    with pytest.raises(MoesimError, match=r"sweep: 2 of 3 cells failed .* cell budget=1: budget='1' .*; "
                                          r"cell budget=2: budget='2'"):
        sweep(args(trace, tmp_path / "s", "strategy=lru", "budget=1,25%,2"))
    assert "budget=2 ... failed: budget='2'" in capfd.readouterr().err
    assert is_complete(tmp_path / "s" / "budget=25%")
    assert not is_complete(tmp_path / "s" / "budget=2") and not is_complete(tmp_path / "s" / "budget=1")
    assert len(pd.read_parquet(tmp_path / "s" / "results.parquet")) == 1  # the cell that ran; the report lists all
    assert "Cells that failed (2)" in (tmp_path / "s" / "report.html").read_text()


def test_a_strategy_that_cannot_run_on_the_trace_is_not_applicable_not_a_failure(trace, tmp_path, capfd):
    """mixtral_offloading_paper reads recorded guesses, which this trace lacks: its cell says why, the sweep finishes,
    and the table and both reports list it as not applicable."""
    root = tmp_path / "s"
    done = sweep(args(trace, root, "strategy=lru,mixtral_offloading_paper", "budget=25%"))
    (cell, why), = done["not_applicable"]
    assert cell == "strategy=mixtral_offloading_paper" and "no 'predicted' tensor" in why
    assert "strategy=mixtral_offloading_paper ... not applicable: prefetch=recorded" in capfd.readouterr().err
    table = pd.read_parquet(root / "results.parquet").set_index("label")
    assert "no 'predicted' tensor" in table.loc["mixtral_offloading_paper", "not_applicable"]
    assert np.isnan(table.loc["mixtral_offloading_paper", "tokens_per_s"]) and table.loc["lru", "not_applicable"] == ""
    assert "(not applicable: prefetch=recorded" in (root / "report.html").read_text()
    assert main(["report", str(root), f"out={tmp_path / 'again.html'}"]) == 0
    assert "(not applicable: prefetch=recorded" in (tmp_path / "again.html").read_text()


@pytest.mark.parametrize("bad, words", [
    (["strategy=lru,nosuch"], ["strategy=nosuch: unknown", "one of: activation_aware"]),
    (["stratgy=lru,lfu"], ["unknown option 'stratgy'; did you mean strategy=?"]),
    (["out=a,b"], ["cannot be swept"]),
    (["sweep.cells=3"], ["set by the sweep command"]),
    (["budget=[1"], ["bad option"]),
])
def test_sweep_mistakes_are_moesim_errors(trace, tmp_path, bad, words):
    base = [a for a in args(trace, tmp_path / "s") if not (bad[0].startswith("out=") and a.startswith("out="))]
    with pytest.raises(MoesimError) as e:
        sweep([*base, *bad])
    for w in words:
        assert w in str(e.value)


def test_every_value_is_checked_before_the_first_cell(trace, tmp_path):
    """budget=25%,abc,50% and a misspelt hardware fail at once, naming each bad value; no cell directory."""
    root = tmp_path / "s"
    with pytest.raises(MoesimError) as e:
        sweep(args(trace, root, "strategy=lru,lfu", "budget=25%,abc,50%", "hardware=rtx-4090,rtx-9999"))
    msg = str(e.value)
    assert msg.startswith("sweep: bad values, no cell was run:")
    assert "budget=abc: budget='abc': expected a number of slots" in msg and "hardware=rtx-9999" in msg
    assert "budget=50%" not in msg and not root.exists()


def test_a_failed_cell_is_reported_with_the_others(trace, tmp_path, capsys):
    """A cell that fails at run time (here: a budget too small for the layer's top-2) is listed with its error in
    report.html, beside the cells that ran; the command prints the ranked table of those and exits 2."""
    root = tmp_path / "s"
    assert main(["sweep", *args(trace, root, "strategy=lru,belady", "budget=1,25%")]) == 2
    captured = capsys.readouterr()
    assert "cells failed" in captured.err and f"the report of the others: {root / 'report.html'}" in captured.err
    html = (root / "report.html").read_text()
    assert "Cells that failed (2)" in html and "budget=1,strategy=lru" in html
    assert len(pd.read_parquet(root / "results.parquet")) == 2
    assert main(["sweep", *args(trace, root, "strategy=lru,belady", "budget=25%")]) == 0
    lines = capsys.readouterr().out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("cell"))
    assert "tokens/s" in lines[head] and lines[head + 1].startswith("belady (bound)") and "lru" in lines[head + 2]


# ---------------------------------------------------------------------------------------------- launchers
@pytest.mark.parametrize("launcher", [
    ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
    ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5"],
], ids=["joblib", "submitit_local"])
def test_launchers_give_the_same_results(reference, trace, tmp_path, launcher):
    root = tmp_path / "s"
    done = sweep(args(trace, root, "strategy=lru,belady", "budget=25%", *launcher))  # two cells: keep it short
    assert sorted(c.name for c in done["cells"]) == ["strategy=belady", "strategy=lru"]
    numbers = [c for c, _ in SUMMARY_COLUMNS]
    got = pd.read_parquet(root / "results.parquet")[numbers]
    want = pd.read_parquet(reference[0] / "results.parquet").query("budget == '25%'")[numbers]
    pd.testing.assert_frame_equal(got.reset_index(drop=True), want.reset_index(drop=True))
    again = mtimes(root)
    sweep(args(trace, root, "strategy=lru,belady", "budget=25%", *launcher))  # resuming works through it too
    assert mtimes(root) == again


# ---------------------------------------------------------------------------------------------- the CLI
def test_cli_sweep_and_report(trace, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(COMMANDS, "sweep", COMMANDS.get("sweep", ("moesim.sweep:sweep_command", "a grid of runs")))
    monkeypatch.setitem(COMMANDS, "report", COMMANDS.get("report", ("moesim.report:report_command", "HTML report")))
    root = tmp_path / "cli"
    assert main(["sweep", *args(trace, root, "strategy=lru,fifo", "budget=25%")]) == 0
    out = capsys.readouterr().out
    assert f"results: {root / 'results.parquet'}" in out and f"report: {root / 'report.html'}" in out
    (root / "report.html").unlink()
    assert main(["report", str(root)]) == 0 and (root / "report.html").is_file()
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err == f"moesim: error: {tmp_path / 'nope'}: no such results directory\n"
    assert main(["sweep", *args(trace, root, "strategy=lru,nosuch")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moesim: error: sweep: strategy=nosuch: unknown") and len(err.strip().splitlines()) == 1
    assert main(["sweep", "--help"]) == 0 and "strategy=lru,lfu,belady" in capsys.readouterr().out
