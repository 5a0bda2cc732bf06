"""Profiles that know when they are stale: the conditions `calibrate` records (and refuses or warns on), and the
torch backend's comparison of its own copy and FFN times with its profile's (moesim/backends/torch/drift.py).
No assertion here depends on how fast this machine is: profiles are off by factors of 1e4, spreads are given.

    pytest tests/test_drift.py -q
"""
from __future__ import annotations

import dataclasses

import pytest
import yaml

import moesim
from moesim import calibrate as C
from moesim.backends.torch import TorchBackend
from moesim.backends.torch.drift import DRIFT, DriftCheck, drift_notes
from moesim.errors import MoesimError
from moesim.hardware import PRESETS, HardwareProfile, load_hardware, profile_from_dict, save_hardware
from moesim.profiler import Profiler
from moesim.trace import MODEL_SPECS, ModelSpec, from_arrays

CONDITIONS = {"measured_at": "2026-12-06T16:55:25", "cpus": 2, "load_before": 0.33, "load_after": 0.38,
              "other_cpus": 0.01, "spread_points": 41, "spread_median": 0.0671, "spread_worst": 0.7171,
              "spread_worst_at": "copy pinned 65,536 B"}
SPEC = ModelSpec("tiny", layers=2, experts=8, top_k=2, hidden=32, ffn=48, dtype="fp32", bits_per_weight=32)


def _profile(**fields) -> HardwareProfile:
    base = dict(name="p", h2d_pinned_gbps=10.0, h2d_pageable_gbps=5.0, copy_latency_us=10.0, device_mem_gbps=100.0,
                device_tflops=1.0, host_mem_gbps=10.0, host_gflops=100.0, vram_gib=8.0, kernel_overhead_us=5.0,
                host_overhead_us=30.0, source="python -m moesim calibrate on a test")
    return HardwareProfile(**(base | fields))


# ------------------------------------------------------------------------------------ the profile's field
def test_conditions_round_trip_through_the_yaml_file(tmp_path):
    p = _profile(conditions=dict(CONDITIONS, warnings=["calibrate: warning: ..."], forced=True))
    path = save_hardware(p, tmp_path / "p.yaml")
    back = load_hardware(str(path))
    assert back == p and back.conditions["spread_worst_at"] == "copy pinned 65,536 B"
    assert yaml.safe_load(path.read_text())["conditions"]["cpus"] == 2


def test_profiles_without_conditions_still_load_and_presets_have_none():
    d = _profile().to_dict()
    del d["conditions"]  # a profile written before the field existed
    assert profile_from_dict(d, "old.yaml").conditions == {}
    assert profile_from_dict(d | {"conditions": None}, "old.yaml").conditions == {}
    assert all(p.conditions == {} for p in PRESETS.values())


@pytest.mark.parametrize("conditions, words", [
    ({"cpus": 0}, "field 'conditions.cpus' must be a positive integer, got 0"),
    ({"spread_median": -0.1}, "field 'conditions.spread_median' must be a number >= 0"),
    ({"load_before": "high"}, "field 'conditions.load_before' must be a number >= 0, got 'high'"),
    ({"forced": "yes"}, "field 'conditions.forced' must be true or false"),
    ({"warnings": "busy"}, "field 'conditions.warnings' must be a list of strings"),
    ({"loadavg": 1.0}, r"unknown key\(s\) \['loadavg'\] in field 'conditions'"),
    ([1, 2], "field 'conditions' must be a mapping"),
])
def test_a_bad_conditions_field_is_refused_naming_it(conditions, words):
    d = _profile().to_dict() | {"conditions": conditions}
    with pytest.raises(MoesimError, match=f"mine.yaml: {words}"):
        profile_from_dict(d, "mine.yaml")


# ------------------------------------------------------------------------------- calibrate's judgement
def test_conditions_summarise_the_spreads_of_calls_long_enough_to_judge():
    spreads = [("copy 65,536 B", 0.9, 0.01),  # too short to judge (timer and cache noise): left out
               ("ffn a", 0.05, 0.5), ("ffn b", 0.10, 1.0), ("ffn c", 0.30, 2.0)]
    c = C.conditions(spreads, 0.5, 0.7, cpus=4, other=0.25)
    assert (c["cpus"], c["load_before"], c["load_after"], c["other_cpus"]) == (4, 0.5, 0.7, 0.25)
    assert (c["spread_points"], c["spread_median"], c["spread_worst"], c["spread_worst_at"]) == (3, 0.1, 0.3, "ffn c")
    profile_from_dict(_profile().to_dict() | {"conditions": c}, "x")  # what calibrate writes loads
    short = C.conditions([("copy", 0.9, 0.01)], 0.0, 0.0, cpus=2)
    assert "spread_median" not in short and short["spread_points"] == 0
    assert "not judged" in C.conditions_line(short) and C.judge_conditions(short) == ([], None)


@pytest.mark.parametrize("spread, warned, refused", [
    (0.05, False, False), (C.SPREAD_WARN - 0.01, False, False), (C.SPREAD_WARN + 0.01, True, False),
    (C.SPREAD_REFUSE + 0.01, False, True), (3.0, False, True)])
def test_spread_warns_then_refuses(spread, warned, refused):
    warnings, refusal = C.judge_conditions({"cpus": 2, "other_cpus": 0.0, "spread_median": spread})
    assert bool(warnings) == warned and (refusal is not None) == refused
    line = (warnings or [refusal])[0] if warned or refused else ""
    if warned:
        assert f"{spread * 100:.0f}%" in line and f"warned above {C.SPREAD_WARN * 100:.0f}%" in line
    if refused:
        assert f"refused above {C.SPREAD_REFUSE * 100:.0f}%" in refusal


def test_other_work_warns_and_the_load_average_stands_in_without_it():
    busy = C.judge_conditions({"cpus": 2, "other_cpus": 1.3, "spread_median": 0.05})[0]
    assert len(busy) == 1 and "1.30 CPUs busy with other processes" in busy[0] and "0.5 x 2 CPUs" in busy[0]
    assert C.judge_conditions({"cpus": 2, "other_cpus": 0.2, "load_before": 3.0})[0] == []  # measured beats lagging
    # no /proc/stat: the load average, less calibrate's own threads
    assert C.judge_conditions({"cpus": 2, "load_before": 0.2, "load_after": 1.9}, threads=1)[0] == []
    assert "load average" in C.judge_conditions({"cpus": 2, "load_before": 1.5, "load_after": 1.0})[0][0]


def test_other_cpus_from_two_readings():
    assert C.other_cpus((0.0, 100.0, 10.0), (10.0, 125.0, 20.0)) == pytest.approx(1.5)  # 25 busy s, 10 our own
    assert C.other_cpus((0.0, 100.0, 10.0), (10.0, 105.0, 20.0)) == 0.0  # never negative
    assert C.other_cpus(None, (1.0, 1.0, 1.0)) is None


def _compose(tmp_path, *extra):
    pytest.importorskip("hydra")
    from moesim.__main__ import compose

    return compose("calibrate", [f"out={tmp_path / 'p.yaml'}", "dims=[32]", "tokens=[1]", "backend.dtype=fp32",
                                 "replay=false", "max_s=5", *extra])


def test_calibrate_refuses_a_busy_machine_and_writes_nothing_unless_forced(tmp_path, monkeypatch, capsys):
    busy = dict(CONDITIONS, spread_median=C.SPREAD_REFUSE * 2, other_cpus=1.5)
    monkeypatch.setattr(C, "conditions", lambda *a, **k: dict(busy))
    with pytest.raises(MoesimError, match="refused above .*nothing written.*force=true"):
        C.calibrate_command(_compose(tmp_path))
    assert not (tmp_path / "p.yaml").exists()
    C.calibrate_command(_compose(tmp_path, "force=true"))
    err = capsys.readouterr().err
    assert "written anyway (force=true)" in err and "other work loaded the machine" in err
    c = load_hardware(str(tmp_path / "p.yaml")).conditions
    assert c["forced"] is True and len(c["warnings"]) == 2 and c["spread_median"] == busy["spread_median"]


def test_calibrate_writes_its_conditions(tmp_path, capsys):
    calm = dict(CONDITIONS, spread_median=C.SPREAD_WARN / 2, other_cpus=0.0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(C, "conditions", lambda *a, **k: dict(calm))
        C.calibrate_command(_compose(tmp_path))
    assert "warning" not in capsys.readouterr().err
    assert load_hardware(str(tmp_path / "p.yaml")).conditions == calm  # no warnings, not forced
    # unpatched: measured (the values depend on the machine; only their presence and types are checked)
    m = C.measure(device="cpu", dtype="fp32", dims=[32], tokens=(1,), replay=False, sampling=C.Sampling(3, 1.0, 10),
                  host_mem_bytes=2**23, log=lambda s: None)
    assert {"measured_at", "cpus", "load_before", "load_after", "spread_points"} <= set(m.conditions)
    assert len(m.spreads) >= 2 and all(s >= 0 and ms > 0 for _, s, ms in m.spreads)
    assert C.to_profile(m).conditions == m.conditions


# --------------------------------------------------------------------------------- the torch run's check
def test_drift_check_arithmetic_and_sign():
    hw = _profile(copy_latency_us=0.0, h2d_pinned_gbps=1.0, kernel_overhead_us=0.0)  # 1 GB/s: 1 MB per ms
    d = DriftCheck(hw, SPEC, 10**6, True)
    for _ in range(4):
        d.load()
        d.observed_copy(0.5)  # twice as fast as the profile says
    d.layer([((0, 1), 0, 1), ((0, 2), 1, 1)], 1)
    d.observed_layer(2 * hw.expert_ms(1, SPEC) * 1.05)  # 5% slower than the profile: within DRIFT
    r = d.result("cpu test")
    assert r["copy_ms_profile"] == pytest.approx(1.0) and r["copy_ms_observed"] == 0.5
    assert r["copy_gbps_observed"] == pytest.approx(2.0) and r["copy_gbps_profile"] == pytest.approx(1.0)
    assert r["copy_error"] == pytest.approx(1.0)  # the profile's copy times +100%
    assert r["experts_computed"] == 2 and r["ffn_error"] == pytest.approx(1 / 1.05 - 1)
    assert r["drift"] and r["kind"] == "written" and len(r["notes"]) == 1  # neither a preset nor measured
    note = r["notes"][0]
    assert note.startswith("profile drift: copies ran at 2.00 GB/s, the profile says 1.00 (its copy times +100%)")
    assert "expert FFNs" not in note and "re-run calibrate" in note
    within = dict(r, copy_error=DRIFT * 0.9)
    assert drift_notes(within, "cpu") == []
    assert "busy machine" in drift_notes(r, "cpu", {"forced": True})[0]


def test_drift_check_charges_shared_experts_and_write_back():
    spec = dataclasses.replace(SPEC, shared_experts=1, shared_ffn=96)
    hw = _profile(writeback_us_per_mib=1000.0)  # 1 ms per MiB copied before a layer
    d = DriftCheck(hw, spec, 2**20, True)
    d.load()
    d.layer([((0, 1), 0, 2)], 3)
    want = hw.expert_ms(2, spec) + hw.expert_ms(3, spec, shared=True) + 1.0
    assert d.ffn_profile_ms == pytest.approx(want) and d.experts == 2
    d.layer([], 3)  # no loads since: no write-back
    assert d.ffn_profile_ms == pytest.approx(want + hw.expert_ms(3, spec, shared=True))


def _trace(spec, steps=12):
    """`steps` tokens, each routed to top_k consecutive experts that move along (misses and hits both occur)."""
    K = spec.top_k
    rows = [[[(t + layer + k) % spec.experts for k in range(K)] for layer in range(spec.layers)] for t in range(steps)]
    return from_arrays(spec, rows, [[[1.0 / K] * K] * spec.layers] * steps)


@pytest.mark.parametrize("factor", [1e-4, 1e4])
def test_a_torch_run_on_a_profile_far_off_says_so(tmp_path, factor, capsys):
    """A profile 1e4 x too slow (100 ms per copy and per expert) or too fast: a run on it notes the drift."""
    slow = factor > 1
    hw = _profile(name="off", copy_latency_us=1e5 if slow else 0.0, h2d_pinned_gbps=1e-3 if slow else 1e6,
                  h2d_pageable_gbps=1e-3 if slow else 1e6, kernel_overhead_us=1e5 if slow else 0.0,
                  device_mem_gbps=1e-3 if slow else 1e6, device_tflops=1e-3 if slow else 1e6,
                  conditions=dict(CONDITIONS))
    path = save_hardware(hw, tmp_path / "off.yaml")
    s = moesim.simulate(_trace(MODEL_SPECS["olmoe-1b-7b"]), hardware=str(path), backend="torch",
                        model={"scale": 1 / 32}, overrides=["backend.device=cpu"]).summary
    c = s["profile_check"]
    assert c["kind"] == "calibrated" and c["drift"] and c["copies"] > 0 and c["experts_computed"] > 0
    assert (c["copy_error"] > 10) == slow and (c["ffn_error"] > 10) == slow  # the profile's times 1e4 x too long
    assert (c["copy_error"] < -0.9) != slow and (c["ffn_error"] < -0.9) != slow
    note = [n for n in s["notes"] if n.startswith("profile drift:")]
    assert len(note) == 1 and "copies ran at" in note[0] and "expert FFNs took" in note[0]
    assert note[0] in capsys.readouterr().err


def test_a_torch_run_on_a_preset_says_the_difference_is_expected():
    s = moesim.simulate(_trace(MODEL_SPECS["olmoe-1b-7b"]), hardware="h200", backend="torch",
                        model={"scale": 1 / 32}, overrides=["backend.device=cpu"]).summary
    c = s["profile_check"]
    assert c["kind"] == "preset" and c["profile"] == "h200"
    assert {"copy_ms_observed", "copy_ms_profile", "ffn_ms_observed", "ffn_ms_profile"} <= set(c)
    for n in s["notes"]:
        assert not n.startswith("profile drift:")
        if n.startswith("profile check:"):
            assert "expected, the profile is the preset 'h200'" in n


def test_no_profile_no_check_and_the_sim_has_none():
    backend = TorchBackend(device="cpu")
    backend.setup(SPEC, 4, Profiler(SPEC.layers))
    assert backend.profile_check() is None
    s = moesim.simulate(_trace(MODEL_SPECS["olmoe-1b-7b"]), hardware="h200").summary
    assert "profile_check" not in s
