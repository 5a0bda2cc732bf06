"""Strategy results cannot change silently: the committed baselines in tests/baseline/ against a run now.

    python -m pytest tests/test_baseline.py -q      # ~50 s on 2 cores
    tox -e baseline                                 # an intended change: regenerate, review the diff, commit

Every built-in strategy (moesim/conf/strategy/*.yaml, read now: a new one shows as a new cell) at 12.5%, 25%
and 50% on the first 483 tokens of the synthetic gpt-oss-like trace and the first 600 tokens of the real
gpt-oss-20b trace shipped in traces/. Counts must be equal, simulated times within a
relative 1e-9; a failure prints a table of every difference. The other tests hold the comparison and the
`python -m moesim.baseline` command to what docs/ci.md promises.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from moesim import baseline as B
from moesim.errors import MoesimError
from moesim.synthetic import SyntheticConfig, generate
from moesim.trace import model_spec, save_trace

REPO = Path(__file__).resolve().parents[1]
REGENERATE = "tox -e baseline (python -m moesim.baseline project), then review and commit tests/baseline/"


def _check_project(name: str, trace=None) -> None:
    path = REPO / B.PROJECT_DIR / f"{name}.json"
    assert path.is_file(), f"{path} missing: {REGENERATE}"
    diffs, current = B.check(path, trace=trace, progress=False)
    if diffs:
        pytest.fail(B.failure_message(path.relative_to(REPO), diffs, REGENERATE), pytrace=False)
    assert sum(len(v) for v in current["cells"].values()) >= 3 * len(B.strategy_names())


def test_project_baseline_synthetic():
    _check_project("synthetic")


def test_project_baseline_gpt_oss_20b(real_trace):
    _check_project("gpt-oss-20b", trace=real_trace)


def test_project_baselines_name_every_strategy():
    """The committed files hold a cell per built-in strategy and budget (else the table above says which)."""
    for name in B.PROJECT:
        data = B.read_baseline(REPO / B.PROJECT_DIR / f"{name}.json")
        assert data["budgets"] == list(B.BUDGETS)
        missing = set(B.strategy_names()) - {entry.split()[0] for entry in data["cells"]}
        assert not missing, f"{name}.json has no cells of {', '.join(sorted(missing))}: {REGENERATE}"


# ------------------------------------------------------------------------------------- small traces
@pytest.fixture(scope="module")
def small_trace():
    """Three short gpt-oss-20b sequences (~75 tokens), the routing of the fitted synthetic generator."""
    from moesim.synthetic import GPT_OSS_FIT

    return generate(SyntheticConfig(seed=3, sequences=3, decode_tokens=(20, 30), **GPT_OSS_FIT),
                    model_spec("gpt-oss-20b"))


@pytest.fixture(scope="module")
def small_file(small_trace, tmp_path_factory):
    return save_trace(small_trace, tmp_path_factory.mktemp("baseline") / "small.moetrace.safetensors")


def test_refused_cells_keep_their_error_without_the_temporary_path(small_file, tmp_path):
    """A cell the run refuses is recorded as its message (compared like a number), with `<trace>` for the
    temporary subset file the message names."""
    rec = tmp_path / "rec.yaml"
    rec.write_text("name: rec\ncache:\n  _target_: strategies.lru.LRU\nprefetch:\n"
                   "  _target_: strategies.recorded.Recorded\n")
    data = B.make_baseline(str(small_file), f"lru,{rec}", "1,25%", tokens=30, progress=False)
    assert "budget='1'" in data["cells"]["lru"]["1"]["error"]
    assert data["cells"]["lru"]["25%"]["requests"] == 30 * 24 * 4
    err = data["cells"][str(rec)]["25%"]["error"]
    assert "<trace>" in err and "predicted" in err
    assert "moesim-baseline-" not in json.dumps(data)


def _one(name, budget, metrics, fp="sha256:x") -> dict:
    return {"subset": {"fingerprint": fp}, "cells": {name: {budget: metrics}}}


# ---------------------------------------------------------------------------------------- comparing
METRICS = {"requests": 100, "hits": 60, "misses": 40, "tokens_per_s": 12.5, "stall_ms": 3.0,
           "latency_p50_ms": 10.0, "latency_p99_ms": None}


def test_compare_counts_exactly_and_times_within_rtol():
    base = _one("lru", "25%", METRICS)
    assert B.compare(base, _one("lru", "25%", dict(METRICS))) == []
    assert B.compare(base, _one("lru", "25%", METRICS | {"tokens_per_s": 12.5 * (1 + 1e-12)})) == []
    diffs = B.compare(base, _one("lru", "25%", METRICS | {"hits": 61, "tokens_per_s": 12.5 * (1 + 1e-8)}))
    assert [(d[2], d[3], d[4]) for d in diffs] == [("hits", 60, 61), ("tokens_per_s", 12.5, 12.5 * (1 + 1e-8))]
    assert B.compare(base, _one("lru", "25%", METRICS | {"latency_p99_ms": 1.0}))[0][2] == "latency_p99_ms"
    assert B.compare(base, _one("lru", "25%", {"error": "refused"}))[0][2:] == ("requests", 100, None)


def test_compare_names_new_and_missing_cells_and_a_changed_trace():
    base = {"subset": {"fingerprint": "sha256:a"}, "cells": {"lru": {"25%": METRICS, "50%": METRICS}}}
    now = {"subset": {"fingerprint": "sha256:b"}, "cells": {"lru": {"25%": METRICS}, "new": {"25%": METRICS}}}
    diffs = B.compare(base, now)
    assert diffs == [("(trace)", "", "fingerprint", "sha256:a", "sha256:b"),
                     ("lru", "50%", "(cell)", "present", "absent"),
                     ("new", "25%", "(cell)", "absent", "present")]
    table = B.difference_table(diffs + [("lru", "25%", "hits", 60, 66)])
    lines = table.splitlines()
    assert lines[0].split() == ["strategy", "budget", "field", "baseline", "now", "change"]
    assert lines[-1].split() == ["lru", "25%", "hits", "60", "66", "+10.000%"]


# ------------------------------------------------------------------------------------------ the grid
def test_strategies_are_read_from_the_configs():
    from importlib.resources import files

    on_disk = sorted(f.name[:-5] for f in files("moesim.conf").joinpath("strategy").iterdir()
                     if f.name.endswith(".yaml"))
    assert B.resolve_strategies("all") == on_disk
    assert B.resolve_strategies(["all", "lru scope=global"])[-1] == "lru scope=global"
    assert B.resolve_strategies("lfu,lru") == ["lfu", "lru"]
    for bad, msg in [("nope", "unknown strategy 'nope'"), ("", "empty"), ("lru budget=5", "budgets="),
                     ("lru scope", "not a run option"), ("missing.yaml", "no such strategy config")]:
        with pytest.raises(MoesimError, match=msg):
            B.resolve_strategies(bad)


def test_subset_cuts_whole_steps_and_sequences(small_trace):
    seq = list(small_trace.seq)
    assert B.subset(small_trace, sequences=1).n_tokens == seq.index(1)
    assert B.subset(small_trace, sequences=2).n_seqs == 2
    assert B.subset(small_trace, tokens=7).n_tokens == 7
    assert B.subset(small_trace, tokens=7, sequences=1).n_tokens == 7
    assert B.subset(small_trace, sequences=99) is small_trace
    for bad in (0, -1, True, 1.5):
        with pytest.raises(MoesimError, match="whole number"):
            B.subset(small_trace, tokens=bad)


def test_a_baseline_needs_the_sim_backend(small_file):
    with pytest.raises(MoesimError, match="simulated backend"):
        B.compose_strategy("lru", str(small_file), ["backend=torch"])


# --------------------------------------------------------------------------------------- the command
def test_command_write_then_check_then_a_regression(small_file, tmp_path, capsys):
    mine = tmp_path / "mine.yaml"
    mine.write_text("name: mine\ncache:\n  _target_: strategies.lfu.LFU\n  decay: 0.5\n")
    out = tmp_path / "baseline.json"
    assert B.main(["write", f"out={out}", f"trace={small_file}", "tokens=40", f"strategies=lru,{mine}",
                   "budgets=25%,50%", "hardware=h200"]) == 0
    data = json.loads(out.read_text())
    assert list(data["cells"]) == ["lru", str(mine)] and data["overrides"] == ["hardware=h200"]
    assert data["subset"]["tokens"] == 40 and data["cells"]["lru"]["25%"]["requests"] > 0
    assert data["cells"][str(mine)]["25%"] != data["cells"]["lru"]["25%"]
    capsys.readouterr()
    assert B.main(["check", str(out)]) == 0
    assert "4 cells equal" in capsys.readouterr().out

    data["cells"]["lru"]["50%"]["hits"] += 1
    data["cells"]["lru"]["50%"]["tokens_per_s"] *= 1.001
    out.write_text(json.dumps(data))
    assert B.main(["check", f"baseline={out}"]) == 1
    text = capsys.readouterr().out
    assert "2 difference(s) in 1 cell(s)" in text
    rows = {tuple(line.split()[:3]) for line in text.splitlines()}
    assert ("lru", "50%", "hits") in rows and ("lru", "50%", "tokens_per_s") in rows
    assert f"python -m moesim.baseline write out={out} trace={small_file} tokens=40 " in text  # to regenerate


def test_command_refuses_bad_input_with_one_line(small_file, tmp_path, capsys):
    cases = [
        (["write", f"trace={small_file}"], "write needs out=FILE"),
        (["write", f"out={tmp_path / 'b.json'}", f"trace={small_file}", "tokens=x"], "tokens='x'"),
        (["write", f"out={tmp_path / 'b.json'}", f"trace={small_file}", "nosuchoption=1", "strategies=lru"],
         "unknown option 'nosuchoption'"),
        (["check", str(tmp_path / "absent.json")], "no such baseline file"),
        (["check"], "check takes one baseline file"),
        (["project", "nope"], "unknown baseline"),
    ]
    for argv, msg in cases:
        assert B.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("moesim: error:") and msg in err, (argv, err)
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    assert B.main(["check", str(tmp_path / "bad.json")]) == 2
    assert "not a moesim baseline" in capsys.readouterr().err
    assert B.main([]) == 2 and "usage" in capsys.readouterr().err


def test_an_experts_only_trace_keeps_its_fingerprint():
    """ModelSpec gained whole-model fields (issue 13); a trace whose model describes only its experts hashes as
    before (its spec as the ten fields it had then), so users' committed baselines stay valid; a whole-model
    spec hashes its new fields too."""
    import dataclasses
    import hashlib

    import numpy as np

    from moesim.trace import ModelSpec, from_arrays

    spec = ModelSpec("old", 2, 4, 1, 8, 8)
    experts = np.zeros((3, 2, 1), np.int16)
    trace = from_arrays(spec, experts, np.ones((3, 2, 1), np.float16))
    old = {k: getattr(spec, k) for k in ("name", "layers", "experts", "top_k", "hidden", "ffn", "shared_experts",
                                         "shared_ffn", "dtype", "bits_per_weight")}
    h = hashlib.sha256(json.dumps(old, sort_keys=True).encode())
    for a in (trace.experts, trace.step, trace.seq, trace.phase):
        arr = np.ascontiguousarray(a)
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(arr.tobytes())
    assert B.fingerprint(trace) == "sha256:" + h.hexdigest()
    whole = dataclasses.replace(spec, attention="gqa", heads=2, kv_heads=1, head_dim=4, vocab=10)
    assert B.fingerprint(from_arrays(whole, experts, np.ones((3, 2, 1), np.float16))) != B.fingerprint(trace)


@pytest.mark.parametrize("override", ["strategy.cache._target_=builtins.open", "hydra.run.dir=/tmp/x",
                                      "model.config=${oc.env:HOME}", "+x=1", "strategy.cache={_target_:os.system}",
                                      "model.scale=[1,2]"])
def test_a_received_baseline_cannot_build_or_read_anything(small_file, tmp_path, override):
    """A baseline file's overrides and strategy options are plain values of run options: one naming a callable
    (_target_), a Hydra setting, an interpolation or a structure is refused when the file is read, before any
    run (issue 17: `strategy.cache._target_=builtins.open` had been instantiated)."""
    out = tmp_path / "b.json"
    B.write_baseline(B.make_baseline(str(small_file), ["lru"], ["25%"], [], 40, progress=False), out)
    for where in ("overrides", "strategies"):
        data = json.loads(out.read_text())
        if where == "overrides":
            data["overrides"] = [override]
        else:
            data["strategies"] = [f"lru {override}"]
        bad = tmp_path / f"bad-{where}.json"
        bad.write_text(json.dumps(data))
        with pytest.raises(MoesimError, match="a baseline takes plain values of run options"):
            B.check(bad)
    with pytest.raises(MoesimError, match="plain values"):
        B.make_baseline(str(small_file), ["lru"], ["25%"], [override], 40, progress=False)
