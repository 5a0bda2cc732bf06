"""Results directories: round trip, atomic writes, errors that name the file."""
import json
import os

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from moesim import results
from moesim.errors import MoesimError
from moesim.profiler import Profiler
from moesim.results import default_run_dir, is_complete, read_run, write_run


def _run_parts():
    p = Profiler(n_layers=2)
    p.copy((0, 1), 1000, 0.0, 1.0, False)
    p.compute(0, 1.0, 2.0, 1.0)
    p.compute(1, 2.0, 3.0, 0.0)
    p.step(0, 1, 0.0, 3.0)
    summary = {"strategy": "lru", "metrics": p.metrics(), "device_bytes": np.int64(4096), "nan": float("nan")}
    return summary, p.steps_table(), p.layers_table(), p.timeline()


def test_round_trip(tmp_path):
    summary, steps, layers, timeline = _run_parts()
    cfg = OmegaConf.create({"strategy": "lru", "budget": {"slots": 8}, "ref": "${strategy}"})
    out = write_run(tmp_path / "run", cfg, summary, steps, layers, timeline)
    assert sorted(os.listdir(out)) == sorted([*results.FILES, results.TIMELINE])  # a timeline was given
    assert is_complete(out)
    back = read_run(out)
    assert back["summary"]["device_bytes"] == 4096 and back["summary"]["nan"] is None
    assert back["summary"]["metrics"]["latency_ms"]["p50"] == pytest.approx(3.0)
    assert back["config"] == {"strategy": "lru", "budget": {"slots": 8}, "ref": "lru"}  # resolved
    pd.testing.assert_frame_equal(back["steps"], steps)
    pd.testing.assert_frame_equal(back["layers"], layers)
    assert json.loads(back["timeline_path"].read_text()) == json.loads(json.dumps(timeline))


def test_config_may_be_a_dict(tmp_path):
    summary, steps, layers, timeline = _run_parts()
    out = write_run(tmp_path / "r", {"a": 1, "path": tmp_path}, summary, steps, layers, timeline)
    assert read_run(out)["config"] == {"a": 1, "path": str(tmp_path)}


def test_summary_is_written_last(tmp_path, monkeypatch):
    order = []
    real = os.replace
    monkeypatch.setattr(results.os, "replace", lambda a, b: (order.append(os.path.basename(b)), real(a, b)))
    write_run(tmp_path / "r", {}, *_run_parts())
    assert order[-1] == "summary.json" and len(order) == 5


@pytest.mark.parametrize("fail_at", [0, 1, 2, 3, 4])
def test_a_crash_mid_write_leaves_no_complete_looking_run(tmp_path, monkeypatch, fail_at):
    out = tmp_path / "r"
    write_run(out, {"first": True}, *_run_parts())  # an earlier complete run in the same directory
    calls = []
    real = os.replace

    def crashing_replace(a, b):
        calls.append(b)
        if len(calls) - 1 == fail_at:
            raise OSError("disk full (simulated)")
        return real(a, b)

    monkeypatch.setattr(results.os, "replace", crashing_replace)
    with pytest.raises(OSError, match="simulated"):
        write_run(out, {"second": True}, *_run_parts())
    assert not (out / "summary.json").exists()
    assert not is_complete(out)
    assert not [n for n in os.listdir(out) if n.startswith(".tmp")]  # temp files removed
    with pytest.raises(MoesimError, match=r"summary\.json.*did not finish"):
        read_run(out)


def test_a_crash_inside_a_writer_removes_its_temp_file(tmp_path, monkeypatch):
    summary, steps, layers, timeline = _run_parts()

    def boom(*a, **k):
        raise RuntimeError("killed")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", boom)
    with pytest.raises(RuntimeError):
        write_run(tmp_path / "r", {}, summary, steps, layers, timeline)
    assert os.listdir(tmp_path / "r") == ["config.yaml"]


@pytest.mark.parametrize("name, content, message", [
    ("summary.json", b"{not json", r"summary\.json: not valid JSON"),
    ("summary.json", b"[1, 2]", r"summary\.json: expected a JSON object"),
    ("summary.json", b"\xff\xfe", r"summary\.json: not valid JSON"),
    ("steps.parquet", b"PAR1 but not really", r"steps\.parquet: not a readable parquet"),
    ("layers.parquet", b"", r"layers\.parquet: not a readable parquet"),
    ("config.yaml", b"a: [1, 2\n", r"config\.yaml: not valid YAML"),
    ("config.yaml", b"- 1\n", r"config\.yaml: expected a mapping"),
    ("config.yaml", b"!!python/object/apply:os.system ['true']\n", r"config\.yaml: not valid YAML"),
])
def test_malformed_files_name_the_file(tmp_path, name, content, message):
    out = write_run(tmp_path / "r", {}, *_run_parts())
    (out / name).write_bytes(content)
    with pytest.raises(MoesimError, match=message):
        read_run(out)


def test_missing_file_or_column_names_it(tmp_path):
    out = write_run(tmp_path / "r", {}, *_run_parts())
    (out / "layers.parquet").unlink()
    assert not is_complete(out)
    with pytest.raises(MoesimError, match=r"layers\.parquet: missing"):
        read_run(out)
    summary, steps, layers, timeline = _run_parts()
    out = write_run(tmp_path / "r2", {}, summary, steps.drop(columns=["stall_ms"]), layers, timeline)
    with pytest.raises(MoesimError, match=r"steps\.parquet: column\(s\) \['stall_ms'\] missing"):
        read_run(out)
    with pytest.raises(MoesimError, match="no such results directory"):
        read_run(tmp_path / "nothing")


def test_default_run_dir_never_collides(tmp_path):
    a = default_run_dir("lru + belady/x", root=tmp_path / "runs")
    b = default_run_dir("lru + belady/x", root=tmp_path / "runs")
    assert a != b and a.is_dir() and b.is_dir() and a.parent == b.parent == tmp_path / "runs"
    assert a.name.endswith("-lru-+-belady-x") and "/" not in a.name
    assert not os.listdir(a)


@pytest.mark.parametrize("text, why", [
    ("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: [*b, *b, *b, *b]\n",
     "line 2: YAML aliases"),  # the head of an alias bomb (a few KB of these reach gigabytes)
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    ("a: [1, 2\n", "not valid YAML"),
    ("a: " + "x" * (5 * 2**20) + "\n", "more than the 4,194,304 such a file may have"),
])
def test_a_strangers_config_yaml_is_refused_in_one_line(tmp_path, text, why):
    """A results directory is meant to be shared: its config.yaml is read without aliases, with a size cap and a
    nesting cap (issue 17: an alias bomb reached 2 GB in `report`)."""
    summary, steps, layers, timeline = _run_parts()
    out = write_run(tmp_path / "run", OmegaConf.create({"strategy": "lru"}), summary, steps, layers, None)
    (out / "config.yaml").write_text(text)
    with pytest.raises(MoesimError) as e:
        read_run(out)
    assert str(e.value).startswith(f"{out / 'config.yaml'}: ") and why in str(e.value)


def test_a_results_directory_has_one_writer_and_bad_out_fails_before_the_run(tmp_path, monkeypatch):
    """issue 17: two runs with the same out= both exited 0 and one's results were lost; out= on a read-only
    directory failed after the whole simulation; out= naming a file raised FileExistsError. Now the second writer
    is refused at once, a lock left by a killed run (its pid gone) is taken over with its .tmp-* files, and a bad
    out= fails before anything is replayed."""
    import moesim.api as api
    from moesim.__main__ import compose
    from moesim.results import LOCK, claimed

    out = tmp_path / "r"
    out.mkdir()  # the user's own (empty) directory: kept, unlike one a failed run made
    with claimed(out):
        assert (out / LOCK).read_text() == str(os.getpid())
        with pytest.raises(MoesimError, match=rf"another moesim run \(pid {os.getpid()}\) is writing there"):
            with claimed(out):
                pass
    assert not (out / LOCK).exists() and out.is_dir()
    (out / LOCK).write_text("999999999")  # a pid that is not running: a killed run's lock
    (out / ".tmp-summary.json-x").write_text("half")
    with claimed(out):
        assert not (out / ".tmp-summary.json-x").exists()
    replayed = []
    monkeypatch.setattr(api, "replay_config", lambda cfg: replayed.append(cfg))
    afile = tmp_path / "a-file"
    afile.write_text("x")
    with pytest.raises(MoesimError, match="is a file, not a directory"):
        api.run(compose("run", [f"out={afile}", "progress=false"]))
    with pytest.raises(MoesimError, match="cannot write there"):  # under a file: mkdir fails, root or not
        api.run(compose("run", [f"out={afile / 'sub'}", "progress=false"]))
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(MoesimError, match="cannot write there"):
            api.run(compose("run", [f"out={ro / 'x'}", "progress=false"]))
    assert replayed == []  # refused before the replay


@pytest.mark.parametrize("field, value", [("trace", [1, 2]), ("budget", "25%"), ("strategy", {"a": 1}),
                                          ("vram_plan", 3)])
def test_a_summary_of_the_wrong_shape_is_one_error(tmp_path, field, value):
    """issue 17: summary.json with "trace": [1, 2] raised AttributeError in the report."""
    summary, steps, layers, _ = _run_parts()
    out = write_run(tmp_path / "run", OmegaConf.create({"strategy": "lru"}), summary, steps, layers, None)
    data = json.loads((out / "summary.json").read_text())
    data[field] = value
    (out / "summary.json").write_text(json.dumps(data))
    with pytest.raises(MoesimError, match=rf"summary.json: field '{field}' must be"):
        read_run(out)


def test_a_run_that_fails_leaves_no_empty_results_directory(tmp_path, monkeypatch):
    import moesim.api as api
    from moesim.__main__ import compose

    def fail(cfg):
        raise MoesimError("the replay failed")

    monkeypatch.setattr(api, "replay_config", fail)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MoesimError, match="the replay failed"):
        api.run(compose("run", ["progress=false"]))  # default out: reports/runs/<time>-lru
    assert list((tmp_path / "reports" / "runs").iterdir()) == []


def test_json_nested_too_deep_is_one_error(tmp_path):
    """A stranger's summary.json (or baseline, or config.json) nested 100,000 deep: one line, no RecursionError."""
    from moesim import baseline
    from moesim.hf_config import spec_from_hf_config

    summary, steps, layers, _ = _run_parts()
    out = write_run(tmp_path / "run", OmegaConf.create({"strategy": "lru"}), summary, steps, layers, None)
    deep = "[" * 100_000 + "]" * 100_000
    (out / "summary.json").write_text(deep)
    with pytest.raises(MoesimError, match="nested too deeply"):
        read_run(out)
    (tmp_path / "b.json").write_text(deep)
    with pytest.raises(MoesimError, match="RecursionError"):
        baseline.read_baseline(tmp_path / "b.json")
    (tmp_path / "config.json").write_text(deep)
    with pytest.raises(MoesimError, match="RecursionError"):
        spec_from_hf_config(str(tmp_path / "config.json"))
