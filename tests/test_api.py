"""The library API (moesim/api.py): simulate, load_trace, sweep and Result, against the `run` and `sweep`
commands they must agree with.

    python -m pytest -q tests/test_api.py

Every run replays a 120-token GPT-OSS-shaped trace (3 sequences, skewed routing): a few seconds in all.
"""
import json

import numpy as np
import pandas as pd
import pytest

import moesim
from moesim.__main__ import compose
from moesim.api import run
from moesim.errors import MoesimError
from moesim.results import is_complete, read_run
from moesim.trace import MODEL_SPECS, from_arrays, save_trace

TOKENS = 120


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(the trace as a .moetrace.safetensors path, the same trace as an in-memory Trace)."""
    rng = np.random.default_rng(11)
    p = 1.0 / np.arange(1, 33)
    p /= p.sum()
    e = np.array([[rng.choice(32, 4, replace=False, p=p) for _ in range(24)] for _ in range(TOKENS)])
    trace = from_arrays(MODEL_SPECS["gpt-oss-20b"], e, np.full(e.shape, 0.25), seq=np.repeat([0, 1, 2], TOKENS // 3))
    path = save_trace(trace, tmp_path_factory.mktemp("t") / "tiny.moetrace.safetensors")
    return str(path), trace


def _same(a: dict, b: dict) -> bool:
    """Equal summaries, NaN included (json writes NaN as NaN on both sides)."""
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


@pytest.mark.parametrize("options, cli", [
    ({"strategy": "lru", "budget": "25%"}, ["strategy=lru", "budget=25%"]),
    ({"strategy": "lfu", "budget": 96, "scope": "global", "hardware": "h200"},
     ["strategy=lfu", "budget=96", "scope=global", "hardware=h200"]),
    ({"strategy": "lru", "prefetch": "transition", "offload": "cost", "fast": False},
     ["strategy=lru", "prefetch=transition", "offload=cost", "fast=false"]),
])
def test_simulate_gives_the_run_commands_summary(tiny, options, cli):
    path, _ = tiny
    lib = moesim.simulate(path, **options).summary
    cmd = run(compose("run", [f"trace={path}", "progress=false", *cli]), write=False).summary
    assert lib["requests"] == 24 * 4 * TOKENS
    assert _same(lib, cmd)


def test_a_loaded_trace_object_replays_like_its_file(tiny):
    path, trace = tiny
    from_file = moesim.simulate(path, strategy="lfu", budget="12.5%").summary
    in_memory = moesim.simulate(trace, strategy="lfu", budget="12.5%")
    loaded = moesim.simulate(moesim.load_trace(path), strategy="lfu", budget="12.5%").summary
    for key in ("hits", "misses", "loads", "evictions", "tokens_per_s", "stall_ms", "latency_ms"):
        assert in_memory.summary[key] == from_file[key] == loaded[key], key
    assert "in-memory" in in_memory.summary["trace"]["name"] and in_memory.config["trace"].startswith("<in-memory")
    assert loaded["trace"]["name"] == path  # a trace read from a file is named by it
    assert moesim.load_trace("gpt-oss-like").n_tokens > 0  # a synthetic preset by name


def test_top_level_options_and_dotted_overrides_reach_the_run(tiny):
    path, trace = tiny
    per_layer = moesim.simulate(trace, strategy="lfu", budget=96).summary
    pooled = moesim.simulate(trace, strategy="lfu", budget=96, scope="global").summary
    assert per_layer["budget"]["per_layer_slots"] == 4 and pooled["budget"]["per_layer_slots"] is None
    assert pooled["scope"] == "global" and pooled["hits"] != per_layer["hits"]

    # at 8 slots per layer (4 are the step's own top-k) which expert LFU evicts depends on the counts
    plain = moesim.simulate(trace, strategy="lfu", budget="25%").summary
    decayed = moesim.simulate(trace, strategy="lfu", budget="25%", overrides=["strategy.cache.decay=0.5"])
    assert decayed.config["strategy"]["cache"]["decay"] == 0.5
    assert decayed.summary["hits"] != plain["hits"]

    scaled = moesim.simulate(trace, model={"scale": 0.5}, reset_per_seq=True)
    assert scaled.config["model"]["scale"] == 0.5 and scaled.config["reset_per_seq"] is True
    assert scaled.summary["model"]["bytes_per_expert"] < per_layer["model"]["bytes_per_expert"]


def test_a_strategy_as_a_dict_or_a_yaml_file_equals_the_built_in_with_the_same_parameters(tiny, tmp_path):
    _, trace = tiny
    block = {"name": "my_lfu", "cache": {"_target_": "strategies.lfu.LFU", "decay": 0.5}}
    built_in = moesim.simulate(trace, strategy="lfu", overrides="strategy.cache.decay=0.5").summary
    as_dict = moesim.simulate(trace, strategy=block).summary
    yaml_file = tmp_path / "my_lfu.yaml"
    yaml_file.write_text("name: my_lfu\ncache:\n  _target_: strategies.lfu.LFU\n  decay: 0.5\n")
    as_file = moesim.simulate(trace, strategy=yaml_file).summary
    assert as_dict["strategy"] == as_file["strategy"] == "my_lfu"
    for key in ("hits", "loads", "tokens_per_s"):
        assert as_dict[key] == as_file[key] == built_in[key], key

    # dotted strategy overrides reach the given block, and refuse a key it does not have
    plain = {"name": "my_lfu", "cache": {"_target_": "strategies.lfu.LFU", "decay": 1.0}}
    overridden = moesim.simulate(trace, strategy=plain, overrides=["strategy.cache.decay=0.5"])
    assert overridden.config["strategy"]["cache"]["decay"] == 0.5 and overridden.summary["hits"] == built_in["hits"]
    with pytest.raises(MoesimError, match="strategy.cache.nosuch"):
        moesim.simulate(trace, strategy=yaml_file, overrides=["strategy.cache.nosuch=1"])


@pytest.mark.parametrize("call, words", [
    ({"scop": "global"}, ["'scop'", "scope", "reset_per_seq"]),
    ({"out": "x"}, ["Result.write"]),
    ({"overrides": ["strategy.cache.nosuch=1"]}, ["strategy.cache.nosuch"]),
    ({"overrides": ["decay"]}, ["'decay'", "key=value"]),
    ({"strategy": "nosuch"}, ["'nosuch'", "lru", "fiddler"]),
    ({"strategy": {"name": "x"}}, ["cache:"]),
    ({"strategy": "missing.yaml"}, ["missing.yaml", "no such"]),
    ({"scope": "diagonal"}, ["diagonal", "per_layer"]),
    ({"budget": 2}, ["budget", "top-k"]),
    ({"hardware": "nosuchgpu"}, ["nosuchgpu"]),
    ({"fast": "maybe"}, ["fast='maybe'"]),
    ({"model": {"scale": [1]}}, ["model.scale", "expected"]),
])
def test_bad_options_and_values_are_named(tiny, call, words):
    _, trace = tiny
    with pytest.raises(MoesimError) as e:
        moesim.simulate(trace, **call)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_a_bad_trace_is_named():
    with pytest.raises(MoesimError, match="no-such-trace"):
        moesim.simulate("no-such-trace")


def test_write_and_report_produce_what_the_run_command_writes(tiny, tmp_path):
    path, _ = tiny
    r = moesim.simulate(path, strategy="lru", budget="25%")
    assert len(r.steps) == TOKENS and len(r.layers) == 24
    d = r.write(tmp_path / "lib")
    assert is_complete(d) and r.out_dir == d
    cli = run(compose("run", [f"trace={path}", "progress=false", f"out={tmp_path / 'cli'}"])).out_dir
    assert sorted(p.name for p in d.iterdir()) == sorted(p.name for p in cli.iterdir())
    mine, theirs = read_run(d), read_run(cli)
    assert _same(mine["summary"], theirs["summary"]) and _same(mine["summary"], r.summary)
    pd.testing.assert_frame_equal(mine["steps"], theirs["steps"])
    pd.testing.assert_frame_equal(mine["layers"], theirs["layers"])
    pd.testing.assert_frame_equal(mine["experts"], theirs["experts"])

    report = r.report()  # the directory is written: only the report is added
    assert report == d / "report.html" and report.stat().st_size > 0
    elsewhere = r.report(tmp_path / "other")  # another directory: the results go there first
    assert is_complete(tmp_path / "other") and elsewhere == tmp_path / "other" / "report.html"


def test_sweep_has_one_row_per_run_and_the_sweep_commands_columns(tiny, tmp_path):
    from moesim.sweep import sweep as sweep_command

    path, trace = tiny
    table = moesim.sweep(moesim.load_trace(path), strategies=["lru", "lfu"], budgets=["12.5%", "25%"], progress=False)
    assert len(table) == 4 and table["dir"].isna().all()
    assert sorted(table["run"]) == ["budget=12.5%,strategy=lfu", "budget=12.5%,strategy=lru",
                                    "budget=25%,strategy=lfu", "budget=25%,strategy=lru"]
    one = moesim.simulate(trace, strategy="lfu", budget="25%").summary
    assert table.set_index("run").loc["budget=25%,strategy=lfu", "hit_rate"] == one["hit_rate"]

    written = moesim.sweep(path, strategies=["lru", "lfu"], budgets=["12.5%", "25%"], out=tmp_path / "lib",
                           progress=False)
    assert (tmp_path / "lib" / "results.parquet").is_file() and (tmp_path / "lib" / "report.html").is_file()
    assert all(is_complete(tmp_path / "lib" / name) for name in written["run"])
    done = sweep_command([f"trace={path}", "strategy=lru,lfu", "budget=12.5%,25%", "progress=false",
                          f"out={tmp_path / 'cmd'}"])
    theirs = pd.read_parquet(done["results"])
    assert list(written.columns) == list(theirs.columns)
    numbers = [c for c in theirs.columns if c not in ("dir",)]
    pd.testing.assert_frame_equal(written[numbers].reset_index(drop=True), theirs[numbers].reset_index(drop=True))
    pd.testing.assert_frame_equal(table.drop(columns="dir").reset_index(drop=True),
                                  written.drop(columns="dir").reset_index(drop=True), check_dtype=False)


def test_sweep_refuses_an_empty_axis_and_runs_of_one_name(tiny):
    with pytest.raises(MoesimError, match="budgets is empty"):
        moesim.sweep(tiny[1], budgets=[])
    twin = {"name": "mine", "cache": {"_target_": "strategies.lru.LRU"}}
    with pytest.raises(MoesimError, match="strategy=mine"):
        moesim.sweep(tiny[1], strategies=[twin, dict(twin)], progress=False)


@pytest.mark.parametrize("overrides,words", [
    (["+strategy.cache.foo=1"], ["strategy.cache", "strategies.lru.LRU", "arguments"]),
    (["strategy.cache._target_=strategies.lru.NoSuchPolicy"], ["strategy.cache", "NoSuchPolicy"]),
])
def test_a_part_that_cannot_be_built_is_named_not_a_traceback(tiny, overrides, words):
    with pytest.raises(MoesimError) as e:
        moesim.simulate(tiny[1], "lru", overrides=overrides)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_fast_true_refuses_what_the_core_does_not_cover_and_says_why(tiny, tmp_path):
    policy = tmp_path / "mine.py"
    policy.write_text("from strategies.lru import LRU\n\n\nclass Mine(LRU):\n    pass\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        block = {"name": "mine", "cache": {"_target_": "mine.Mine"}}
        with pytest.raises(MoesimError, match="fast=true.*mine.Mine"):
            moesim.simulate(tiny[1], block, fast=True)
        auto = moesim.simulate(tiny[1], block).summary  # the Python driver runs it, and decides as LRU does
        lru = moesim.simulate(tiny[1], "lru").summary
        assert not auto["fast_path"] and lru["fast_path"]
        assert (auto["hits"], auto["latency_ms"]) == (lru["hits"], lru["latency_ms"])
    finally:
        sys.path.remove(str(tmp_path))


def test_the_torch_backend_executes_the_cores_decisions(tiny):
    """backend=torch with built-in parts: the compiled core decides, the torch backend moves the weights
    (moesim.engine.play); the same decisions as the Python driver (fast=false). A max_inflight cap reads the
    torch backend's own queue, so such a run stays in the Python driver."""
    pytest.importorskip("torch")
    opts = dict(backend="torch", model={"scale": 1 / 64})
    streaming = {"overrides": ["strategy.offload.min_batch=1"]}  # every step streams the host layers' experts
    refusing = {"overrides": ["strategy.prefetch.max_inflight=null"]}  # visit_count streams what it may not evict
    for strategy, extra in (("llama_cpp_moe_cache", {}), ("lru", {"prefetch": "oracle"}), ("fiddler", {}),
                            ("llama_cpp_ncmoe", streaming), ("moe_infinity", refusing)):
        core_run = moesim.simulate(tiny[1], strategy, **opts, **extra).summary
        python = moesim.simulate(tiny[1], strategy, fast=False, **opts, **extra).summary
        assert core_run["fast_path"] and not python["fast_path"]
        for k in ("hits", "misses", "loads", "prefetch_loads", "evictions", "host_computes", "prefetch_used",
                  "streams"):
            assert core_run[k] == python[k], k
        assert core_run["backend"] == "torch" and core_run["tokens_per_s"] > 0
        assert core_run["streams"] > 0 or extra is not streaming and extra is not refusing, strategy
    capped = moesim.simulate(tiny[1], "lru", prefetch="oracle", overrides=["prefetch.max_inflight=2 experts"],
                             **opts).summary
    assert not capped["fast_path"]
    with pytest.raises(MoesimError, match="max_inflight"):
        moesim.simulate(tiny[1], "lru", prefetch="oracle", overrides=["prefetch.max_inflight=2 experts"], fast=True,
                        **opts)


def test_tokens_and_seqs_replay_a_prefix(tiny):
    """tokens=N / seqs=N: the run of the first N tokens / sequences, as the trace sliced by hand gives."""
    path, trace = tiny
    s = moesim.simulate(path, tokens=50).summary
    assert s["trace"]["tokens"] == 50 and s["tokens"] == 50
    assert _same(s["step_ms_split"], moesim.simulate(trace.slice_tokens(0, 50)).summary["step_ms_split"])
    two = moesim.simulate(path, seqs=2).summary
    assert two["trace"]["tokens"] == 80 and two["trace"]["sequences"] == 2
    for bad in (0, -3, "x", 1.5):
        with pytest.raises(MoesimError, match="expected a whole number"):
            moesim.simulate(path, tokens=bad)


@pytest.mark.parametrize("value, steps, written", [("auto", 120, True), (False, 120, False), (True, 120, True)])
def test_timeline_is_optional(tiny, tmp_path, value, steps, written):
    """timeline=false writes no timeline.json (and removes another run's); auto writes it for short runs."""
    path, _ = tiny
    out = tmp_path / "r"
    moesim.simulate(path, timeline=True).write(out)
    assert (out / "timeline.json").is_file()
    r = moesim.simulate(path, timeline=value)
    assert r.summary["steps"] == steps and r.writes_timeline() is written
    r.write(out)
    assert (out / "timeline.json").is_file() is written and is_complete(out)
    assert (read_run(out)["timeline_path"] is not None) is written


def test_timeline_auto_skips_long_runs(monkeypatch, tiny):
    from moesim import api

    monkeypatch.setattr(api, "TIMELINE_AUTO_STEPS", 100)
    assert moesim.simulate(tiny[0]).writes_timeline() is False  # 120 steps
    with pytest.raises(MoesimError, match="timeline='sometimes'"):
        moesim.simulate(tiny[0], timeline="sometimes")


def test_a_replay_larger_than_memory_is_refused_before_it_starts(tiny, monkeypatch):
    """issue 17: a trace claiming 2**28 tokens grew a run to 4 GB before failing. The replay's arrays are sized
    from the trace and refused, with the numbers and the way out (tokens=N), before anything is allocated."""
    from moesim import hardware

    monkeypatch.setattr(hardware, "host_memory_available", lambda: 100_000)  # 100 kB: the 120-token trace needs ~300 kB
    with pytest.raises(MoesimError, match=r"120 tokens x 24 layers x top-4 = 11,520 expert requests need about "
                                          r"0\.0 GiB to replay, more than the 0\.0 GiB available here; replay a part"):
        moesim.simulate(tiny[0])
    assert moesim.simulate(tiny[0], tokens=30).summary["tokens"] == 30  # a prefix that fits (92 kB) runs
