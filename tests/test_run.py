"""`python -m moesim run`: composes the config, replays, writes the results directory of DESIGN.md."""
import json

import numpy as np
import pytest

from moesim.__main__ import compose, main
from moesim.api import run
from moesim.results import is_complete, read_run
from moesim.trace import MODEL_SPECS, from_arrays, save_trace


@pytest.fixture(scope="module")
def small_trace(tmp_path_factory):
    """A 300-token GPT-OSS-shaped trace with skewed routing, as a file."""
    rng = np.random.default_rng(7)
    p = 1.0 / np.arange(1, 33)
    p /= p.sum()
    e = np.array([[rng.choice(32, 4, replace=False, p=p) for _ in range(24)] for _ in range(300)])
    tr = from_arrays(MODEL_SPECS["gpt-oss-20b"], e, np.full(e.shape, 0.25), seq=np.repeat([0, 1, 2], 100))
    return str(save_trace(tr, tmp_path_factory.mktemp("t") / "small.moetrace.safetensors"))


def _run(trace, tmp_path, *overrides):
    cfg = compose("run", [f"trace={trace}", f"out={tmp_path / 'run'}", "progress=false", *overrides])
    return run(cfg)


def test_summary_fields_and_results_dir(small_trace, tmp_path):
    out = _run(small_trace, tmp_path, "strategy=lru", "budget=192")
    s = out.summary
    for k in ("hit_rate", "hits", "requests", "misses", "bytes_h2d", "tokens", "tokens_per_s", "latency_ms",
              "stall_ms", "peak_device_bytes", "strategy", "budget", "scope", "trace", "hardware"):
        assert k in s, k
    assert set(s["latency_ms"]) >= {"p50", "p90", "p99"}
    assert s["requests"] == s["hits"] + s["misses"] == 300 * 24 * 4
    assert s["hit_rate"] == pytest.approx(s["hits"] / s["requests"])
    assert s["bytes_h2d"] == s["misses"] * MODEL_SPECS["gpt-oss-20b"].bytes_per_expert
    assert s["budget"]["slots"] == 192 and s["budget"]["bytes"] == 192 * MODEL_SPECS["gpt-oss-20b"].bytes_per_expert
    assert s["tokens"] == 300 and s["tokens_per_s"] > 0
    assert s["strategy"] == "lru" and s["scope"] == "per_layer" and s["bound"] is False
    d = out.out_dir
    assert is_complete(d)
    for f in ("config.yaml", "summary.json", "steps.parquet", "layers.parquet", "timeline.json"):
        assert (d / f).is_file(), f
    back = read_run(d)
    assert back["summary"]["hits"] == s["hits"]
    assert len(back["steps"]) == 300 and len(back["layers"]) == 24
    assert json.loads((d / "timeline.json").read_text())["traceEvents"]


def test_belady_is_marked_as_bound_and_beats_lru(small_trace, tmp_path):
    lru = _run(small_trace, tmp_path / "a", "strategy=lru", "budget=12.5%").summary
    bel = _run(small_trace, tmp_path / "b", "strategy=belady", "budget=12.5%").summary
    assert bel["bound"] is True
    assert bel["hits"] >= lru["hits"]
    assert bel["bytes_h2d"] <= lru["bytes_h2d"]


def test_more_budget_fewer_bytes_and_faster(small_trace, tmp_path):
    small = _run(small_trace, tmp_path / "a", "budget=12.5%").summary
    large = _run(small_trace, tmp_path / "b", "budget=50%").summary
    assert large["hit_rate"] > small["hit_rate"]
    assert large["bytes_h2d"] < small["bytes_h2d"]
    assert large["tokens_per_s"] > small["tokens_per_s"]
    assert large["peak_device_bytes"] > small["peak_device_bytes"]


def test_cli_run_prints_summary(small_trace, tmp_path, capsys):
    assert main(["run", f"trace={small_trace}", f"out={tmp_path / 'r'}", "progress=false", "hardware=h200"]) == 0
    out = capsys.readouterr().out
    assert "hit rate" in out and "tokens/s" in out and str(tmp_path / "r") in out


@pytest.mark.parametrize("override, words", [
    ("budget=2", ["budget='2'", "top-k"]),
    ("hardware=nosuchgpu", ["nosuchgpu"]),
    ("strategy=nosuch", ["strategy"]),
    ("scope=diagonal", ["diagonal"]),
    ("trace=/no/such/file.moetrace.safetensors", ["/no/such/file"]),
])
def test_user_mistakes_are_one_line(small_trace, tmp_path, capsys, override, words):
    args = ["run", f"trace={small_trace}", f"out={tmp_path / 'r'}", "progress=false", override]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err
    assert not (tmp_path / "r" / "summary.json").exists()
