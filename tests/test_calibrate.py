"""`python -m moesim calibrate` (moesim/calibrate.py): fits, measurements, the profile it writes.

    pytest tests/test_calibrate.py -q
"""
from __future__ import annotations

import math

import pytest
import torch
import yaml

from moesim.backends.torch import scale_spec, stored_spec
from moesim import calibrate as C
from moesim.calibrate import Sampling, fit_latency_rate, measure, to_profile
from moesim.errors import MoesimError
from moesim.hardware import load_hardware, save_hardware
from moesim.models import with_formats
from moesim.trace import MODEL_SPECS, ModelSpec

CUDA = torch.cuda.is_available()
FAST = Sampling(min_n=3, min_ms=2.0, max_n=20)  # a few calls per point: tests check shapes, not speeds
SMALL = 8 * 2**20  # bytes of the host memory read in tests (the default, 4x the last-level cache, is ~2 GB here)


def test_fit_recovers_latency_and_bandwidth():
    # 20 us + bytes / 5 GB/s, exactly
    points = [(b, 0.02 + b / 5e6) for b in (2**16, 2**20, 2**22, 2**24)]
    latency_ms, bytes_per_ms = fit_latency_rate(points)
    assert latency_ms == pytest.approx(0.02, rel=1e-6)
    assert bytes_per_ms == pytest.approx(5e6, rel=1e-6)


def test_fit_without_a_positive_intercept_goes_through_the_origin():
    points = [(1e6, 0.1), (2e6, 0.25), (4e6, 0.55)]  # the line would cross at -0.05 ms
    latency_ms, bytes_per_ms = fit_latency_rate(points)
    assert latency_ms == 0.0
    assert 7e6 < bytes_per_ms < 1e7
    assert fit_latency_rate([(1e6, 0.2)]) == (0.0, pytest.approx(5e6))
    with pytest.raises(ValueError):
        fit_latency_rate([(1e6, 0.0)])


def test_host_memory_and_gemm_give_positive_finite_rates():
    gbps = C.measure_host_memory(SMALL, repeats=2)
    assert gbps > 0 and math.isfinite(gbps)
    gflops, n = C.measure_host_gemm(torch.float32, repeats=2, min_ms=0.0)
    assert gflops > 0 and math.isfinite(gflops) and n == 256  # min_ms=0: the first size is enough
    gflops, n = C.measure_host_gemm(torch.float32, repeats=1, min_ms=1e9, largest=512)
    assert gflops > 0 and n == 512  # never long enough: doubled up to the largest size


def test_last_level_cache_and_the_default_read_size(tmp_path, monkeypatch):
    for index, size in (("index0", "48K"), ("index2", "2048K"), ("index3", "491520K")):
        (tmp_path / index).mkdir()
        (tmp_path / index / "size").write_text(size + "\n")
    assert C.last_level_cache_bytes(tmp_path) == 491520 * 1024
    assert C.last_level_cache_bytes(tmp_path / "absent") is None
    # STREAM's rule: 4x the last-level cache, within [64 MiB, host memory / 8]
    monkeypatch.setattr(C, "host_memory_total", lambda: 64 * 2**30)
    monkeypatch.setattr(C, "last_level_cache_bytes", lambda: 32 * 2**20)
    assert C.host_read_bytes() == 128 * 2**20
    monkeypatch.setattr(C, "last_level_cache_bytes", lambda: 2**20)
    assert C.host_read_bytes() == 64 * 2**20
    monkeypatch.setattr(C, "last_level_cache_bytes", lambda: 4 * 2**30)
    assert C.host_read_bytes() == 8 * 2**30
    monkeypatch.setattr(C, "last_level_cache_bytes", lambda: None)
    assert C.host_read_bytes() == 2**30


def test_measure_and_profile_on_cpu(tmp_path):
    m = measure(device="cpu", dtype="fp32", dims=[32, (48, 64)], tokens=(1, 2, 4), sampling=FAST,
                host_mem_bytes=SMALL, log=lambda s: None)
    assert (m.device, m.dtype, m.copies, m.threads, m.formats) == ("cpu", "fp32", "sync", 1, ["fp32"])
    sizes = {3 * 32 * 32 * 4, 3 * 48 * 64 * 4}
    assert {b for b, _ in m.copy_points["pinned"]} >= sizes  # the expert sizes are among the copies
    assert all(ms > 0 for _, ms in m.copy_points["pinned"])
    for where in ("device", "host"):
        got = {(p["expert_bytes"], p["tokens"]) for p in m.ffn_points if p["where"] == where}
        assert got == {(b, n) for b in sizes for n in (1, 2, 4)}
    p = to_profile(m, name="test-cpu")
    assert p.name == "test-cpu" and "calibrate" in p.source and "fp32" in p.source and "memcpy" in p.source
    assert p.h2d_pinned_gbps > 0 and p.h2d_pinned_gbps == p.h2d_pageable_gbps
    assert p.device_mem_gbps > 0 and p.device_tflops > 0 and p.vram_gib > 0
    # the host's own read and GEMM measurements, not the FFN fit
    assert m.host_mem_bytes == SMALL and m.host_gemm_n >= 256
    assert p.host_mem_gbps == round(m.host_mem_gbps, 4) > 0 and p.host_gflops == round(m.host_gflops, 4) > 0
    assert "host memory read over 8 MiB" in p.source
    # the sim reads the measured FFN times back from the table
    spec = ModelSpec("t", 1, 4, 1, 48, 64, dtype="fp32", bits_per_weight=32)
    point = next(q for q in m.ffn_points if q["where"] == "device" and q["expert_bytes"] == spec.bytes_per_expert
                 and q["tokens"] == 2)
    assert p.expert_ms(2, spec) == pytest.approx(point["ms"], rel=1e-4)
    # copies: the measured points are in the profile, and copy_ms gives them back at their sizes
    assert {(q["bytes"], q["pinned"]) for q in p.copy_table} == {(b, k) for b, _ in m.copy_points["pinned"]
                                                                 for k in (True, False)}
    b, ms = m.copy_points["pinned"][-1]
    assert p.copy_ms(b) == pytest.approx(ms, rel=1e-4)
    # the replay's own time: a Python engine spends some on every layer (or on every expert / load)
    o = m.overheads
    assert set(o) == {"layer_overhead_us", "expert_overhead_us", "load_overhead_us"}  # (>= 0 by construction)
    assert p.replay_overhead_ms(1, 1) > 0.001  # > 1 us per layer
    path = save_hardware(p, tmp_path / "cpu.yaml")
    assert load_hardware(str(path)) == p
    written = yaml.safe_load(path.read_text())
    assert (written["host_mem_gbps"], written["host_gflops"]) == (p.host_mem_gbps, p.host_gflops)
    quick = measure(device="cpu", dtype="fp32", dims=[32], tokens=(1,), sampling=FAST, replay=False,
                    host_mem_bytes=SMALL, log=lambda s: None)
    assert quick.overheads == {} and to_profile(quick).replay_overhead_ms(4, 4) == 0.0


def test_model_option_measures_that_exact_expert_size():
    """By default the model's experts as the torch backend stores them: gpt-oss-20b's mxfp4, packed, keyed by its
    packed bytes (what the sim looks up), decoded to bf16; the replay's overheads measured on packed slots."""
    m = measure(device="cpu", model="gpt-oss-20b", scale=1 / 32, dims=[], tokens=(1, 2), sampling=FAST,
                host_mem_bytes=SMALL, log=lambda s: None)
    spec = stored_spec(scale_spec(MODEL_SPECS["gpt-oss-20b"], 1 / 32))  # 90 x 90: 3 rows x 3 blocks x 17 B each
    assert spec.dtype == "mxfp4" and spec.bytes_per_expert == 3 * 90 * 3 * 17
    assert (m.formats, m.dtype) == (["mxfp4"], "bf16")
    assert {p["expert_bytes"] for p in m.ffn_points} == {spec.bytes_per_expert}
    assert spec.bytes_per_expert in {b for b, _ in m.copy_points["pinned"]}  # a load's exact bytes, copied
    o = m.overheads
    assert set(o) == {"layer_overhead_us", "expert_overhead_us", "load_overhead_us"}  # (>= 0 by construction)
    p = to_profile(m)
    assert "mxfp4" in p.source and p.replay_overhead_ms(1, 1) > 0.001
    # the 1-token time the sim reads is the measured one: decode included
    point = next(q for q in m.ffn_points if q["where"] == "device" and q["tokens"] == 1)
    assert p.expert_ms(1, spec) == pytest.approx(point["ms"], rel=1e-4)
    # backend.dtype=bf16 stores them unpacked, as a torch run with that option does
    m = measure(device="cpu", dtype="bf16", model="gpt-oss-20b", scale=1 / 32, dims=[], tokens=(1,), sampling=FAST,
                replay=False, host_mem_bytes=SMALL, log=lambda s: None)
    assert m.formats == ["bf16"] and {p["expert_bytes"] for p in m.ffn_points} == {3 * 90 * 90 * 2}


def test_experts_format_measures_each_format_at_its_packed_size():
    gpt = MODEL_SPECS["gpt-oss-20b"]
    m = measure(device="cpu", model="gpt-oss-20b", scale=1 / 32, dims=[64], experts_format=["q4_k", "mxfp4"],
                tokens=(1, 2), sampling=FAST, replay=False, host_mem_bytes=SMALL, log=lambda s: None)
    want = {stored_spec(scale_spec(with_formats(gpt, experts=f), 1 / 32)).bytes_per_expert: f
            for f in ("q4_k", "mxfp4")}
    assert set(want) == {3 * 90 * 144, 3 * 90 * 3 * 17}  # q4_k: one 256-weight block of 144 B per 90-wide row
    assert m.formats == ["q4_k", "mxfp4"]
    # the model's sizes first, then the dims in each format; every point at a size's packed bytes
    assert list(m.ffn_sizes.values()) == [("q4_k", 90, 90), ("mxfp4", 90, 90), ("q4_k", 64, 64), ("mxfp4", 64, 64)]
    assert {p["expert_bytes"] for p in m.ffn_points} == set(m.ffn_sizes) == set(want) | {3 * 64 * 144, 3 * 64 * 2 * 17}
    p = to_profile(m)
    for nbytes, fmt in want.items():  # the sim finds each format's measured time at exactly its bytes
        spec = stored_spec(scale_spec(with_formats(gpt, experts=fmt), 1 / 32))
        point = next(q for q in m.ffn_points if q["expert_bytes"] == nbytes and q["tokens"] == 2)
        assert p.expert_ms(2, spec) == pytest.approx(point["ms"], rel=1e-4)
    assert "q4_k/mxfp4" in p.source


def test_formats_of_equal_bytes_are_refused_or_dropped():
    # q4_0 (18 B per 32 weights) and q4_k (144 B per 256) pack a 256-wide row into the same 144 bytes
    spec = ModelSpec("t", 2, 8, 2, 256, 256, dtype="q4_0", bits_per_weight=4.5).to_dict()
    with pytest.raises(MoesimError, match="both pack into 110592 bytes.*separate profiles"):
        measure(device="cpu", model=spec, dims=[], experts_format=["q4_0", "q4_k"], log=lambda s: None)
    lines = []
    m = measure(device="cpu", dims=[256, 64], experts_format="q4_0 q4_k".split(), tokens=(1,), sampling=FAST,
                replay=False, host_mem_bytes=SMALL, log=lines.append)
    assert m.dropped == ["q4_k 256x256 (dims): 110592 bytes, as q4_0 256x256 (dims)"]
    assert list(m.ffn_sizes.values()) == [("q4_0", 256, 256), ("q4_0", 64, 64), ("q4_k", 64, 64)]
    assert any("dropped q4_k 256x256" in s for s in lines)
    with pytest.raises(MoesimError, match="different dtypes"):  # fp16 computes in fp16, q4_k in bf16
        measure(device="cpu", model="gpt-oss-20b", scale=1 / 32, dims=[], experts_format=["fp16", "q4_k"],
                log=lambda s: None)
    with pytest.raises(MoesimError, match="experts_format='q9'"):
        measure(device="cpu", dims=[32], experts_format="q9", log=lambda s: None)


def test_expert_sizes_follow_the_torch_backends_store():
    qwen = MODEL_SPECS["qwen1.5-moe-a2.7b"]  # bf16 routed experts and a wider bf16 shared expert
    s = scale_spec(qwen, 1 / 16)
    assert C.expert_sizes("qwen1.5-moe-a2.7b", 1 / 16, None, "auto", [(32, 32)]) == [
        ("bf16", s.hidden, s.ffn, "bf16", "routed"), ("bf16", s.hidden, s.shared_ffn, "bf16", "shared"),
        ("bf16", 32, 32, "bf16", "dims")]
    # packed routed experts decode to bf16, and so does the shared expert (the backend's one compute dtype)
    sizes = C.expert_sizes("qwen1.5-moe-a2.7b", 1 / 16, "q4_k", "auto", [])
    assert [x[0] for x in sizes] == ["q4_k", "bf16"] and {x[3] for x in sizes} == {"bf16"}
    # backend.dtype=fp32 stores the routed experts unpacked in fp32 whatever the format
    assert C.expert_sizes("gpt-oss-20b", 1 / 32, "q4_k", "fp32", [(8, 8)]) == [
        ("fp32", 90, 90, "fp32", "routed"), ("fp32", 8, 8, "fp32", "dims")]
    assert C.expert_sizes(None, 1.0, None, "auto", [(8, 8)]) == [("bf16", 8, 8, "bf16", "dims")]
    assert C.expert_sizes(None, 1.0, "mxfp4", "auto", [(8, 8)]) == [("mxfp4", 8, 8, "bf16", "dims")]


def test_time_limit_skips_and_says_so():
    lines = []
    m = measure(device="cpu", dtype="fp32", dims=[16, 24, 32], tokens=(1,), sampling=FAST, max_s=0.0,
                host_mem_bytes=SMALL, log=lines.append)
    assert m.skipped == ["device ffn fp32 24x24", "device ffn fp32 32x32"]  # the first size is always measured
    assert {p["expert_bytes"] for p in m.ffn_points} == {3 * 16 * 16 * 4}
    assert any("skipped" in s for s in lines)
    assert "skipped (time limit)" in to_profile(m).source


def test_bad_model_scale_refused():
    with pytest.raises(MoesimError, match="model.scale"):
        measure(device="cpu", model="gpt-oss-20b", scale=1e-5, dims=[], log=lambda s: None)


def test_calibrate_command_writes_a_loadable_profile(tmp_path, capsys):
    pytest.importorskip("hydra")
    from moesim.__main__ import compose
    from moesim.calibrate import calibrate_command

    out = tmp_path / "mine.yaml"
    cfg = compose("calibrate", [f"out={out}", "dims=[32]", "tokens=[1,2]", "backend.dtype=fp32", "name=mine",
                                "max_s=30"])
    calibrate_command(cfg)
    printed = capsys.readouterr().out
    assert "host->device pinned" in printed and "host memory" in printed and str(out) in printed
    p = load_hardware(str(out))
    assert p.name == "mine" and len(p.ffn_table) == 4  # 1 size x 2 token counts x device, host
    written = yaml.safe_load(out.read_text())  # the host's measured read bandwidth and GEMM rate
    assert written["host_mem_gbps"] > 0 and written["host_gflops"] > 0 and "host memory read over" in p.source


def test_calibrate_check_compares_on_a_trace(tmp_path, capsys):
    pytest.importorskip("hydra")
    from moesim.__main__ import compose
    from moesim.calibrate import calibrate_command

    from moesim.trace import from_arrays, save_trace

    spec = MODEL_SPECS["olmoe-1b-7b"]  # 16 layers x 64 experts, top-8
    rows = [[list(range((t + l) % 8, (t + l) % 8 + 8)) for l in range(16)] for t in range(10)]
    trace = save_trace(from_arrays(spec, rows, [[[0.125] * 8] * 16] * 10), tmp_path / "t.moetrace.safetensors")
    cfg = compose("calibrate", [f"out={tmp_path / 'c.yaml'}", "dims=[]", "tokens=[1,2]", f"check={trace}",
                                "check_tokens=6", "scale=0.03125", "max_s=30"])
    calibrate_command(cfg)
    printed = capsys.readouterr().out
    assert "check: 6 tokens" in printed and "strategy lru" in printed
    assert "hits" in printed and "DIFFERENT" not in printed
    # two formats in one profile, each checked as a run stores it (olmoe at 1/32: 64 x 32 experts)
    cfg = compose("calibrate", [f"out={tmp_path / 'f.yaml'}", "dims=[]", "tokens=[1,2]", f"check={trace}",
                                "check_tokens=6", "scale=0.03125", "max_s=30", "replay=false",
                                "experts_format=[bf16,q4_k]"])
    calibrate_command(cfg)
    printed = capsys.readouterr().out
    assert "bf16, q4_k, computed in bf16" in printed  # the table's experts row
    q4_k = (32 + 32 + 64) * 144  # gate and up: 32 rows of 64, down: 64 rows of 32; one 144-byte block per row
    assert f"experts bf16 ({3 * 64 * 32 * 2:,} B)" in printed and f"experts q4_k ({q4_k:,} B)" in printed
    assert "DIFFERENT" not in printed
    assert {q["expert_bytes"] for q in load_hardware(str(tmp_path / "f.yaml")).ffn_table} == {3 * 64 * 32 * 2, q4_k}


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs an NVIDIA GPU with CUDA (torch.cuda.is_available() is False)")
def test_calibrate_on_cuda():
    m = measure(device="cuda", dims=[512], tokens=(1, 8, 64), sampling=FAST, host_mem_bytes=SMALL,
                log=lambda s: None)
    assert m.copies == "stream"
    p = to_profile(m)
    assert p.h2d_pinned_gbps > 1 and p.h2d_pageable_gbps > 0 and p.vram_gib > 1
    assert {q["where"] for q in p.ffn_table} == {"device", "host"}
