"""Fidelity: the sim backend with a profile `calibrate` measured here predicts the torch backend on the same
trace, strategy and budget. Same decisions exactly (hits, bytes); the latency error of three calibrate-and-compare
runs, their median, within 10% for fp32 experts larger than the CPU's cache (35% for packed mxfp4 ones that fit
in it; the measured error on a larger trace is reported by tests/bench/test_bench_fidelity.py and
docs/fidelity.md). A run's latency error is the median over steps of sim / torch - 1, step by step (the same
decisions, so the same work per step): steps that other work on the shared machine slowed do not move it.

    pytest tests/test_fidelity.py -q
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from moesim.calibrate import Sampling, measure, to_profile
from moesim.fidelity import compare_backends
from moesim.trace import MODEL_SPECS, ModelSpec
from strategies.lru import LRU

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
ATTEMPTS = 3  # calibrate-and-compare runs; their median error is held to the bound
MORE = 2  # runs added where those three miss it: the median of five (CI, 2026-12-07: -11, +4, -19% on a slow day)
# the p50 of each run's own steps, compared, had failed CI in 2 of 5 runs on 2026-12-07 (medians -10.3 to -14.8%
# against 10%); idle, three runs gave p50 errors of -5.9, -9.1 and +1.4% where the step-by-step median gave -3.2,
# -6.0 and +2.0% (python: compare_backends on BIG, 60 steps, three times)
CUDA_BOUND = 0.35  # the GPU check's tolerance, one run (scripts/gpu_check.py reports the measured error)
# 4 layers x 16 experts, top-2, fp32 (fast CPU matmuls): 1.5 MiB per expert, copies and FFNs both count
SPEC = ModelSpec("fidelity", layers=4, experts=16, top_k=2, hidden=256, ffn=512, dtype="fp32", bits_per_weight=32)
# the same shape with 24 MiB experts: all 64 (1.5 GiB) are more than this machine's 480 MiB L3, as a real model's
# are. With SPEC (96 MiB in all) the replay runs from cache while calibrate measures memory-bound copies and
# FFNs: the sim came out 23-28% slow on an idle machine, run after run; with BIG, +1, -8 and -6% (2026-12-06)
BIG = ModelSpec("fidelity-big", layers=4, experts=16, top_k=2, hidden=1024, ffn=2048, dtype="fp32",
                bits_per_weight=32)


def _locality_trace(spec, steps, batch=1):
    path = REPO / "scripts" / "gpu_check.py"
    mod_spec = importlib.util.spec_from_file_location("gpu_check", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.locality_trace(spec, steps, batch=batch, reuse=0.5, skew=1.0, seed=3)


def _profile(device: str, model, scale: float, experts_format=None):
    m = measure(device=device, model=model, scale=scale, dims=[], tokens=(1, 2, 4, 8), experts_format=experts_format,
                sampling=Sampling(min_n=10, min_ms=25.0, max_n=300), log=lambda s: None)
    return to_profile(m)


@pytest.mark.parametrize("fmt, spec, steps, bound", [
    (None, BIG, 60, 0.10),  # issue 17's bound, in plain pytest
    ("mxfp4", SPEC, 100, 0.35),  # packed experts that fit in cache: the cache bias above, so a looser bound
])
def test_sim_predicts_torch_on_cpu(fmt, spec, steps, bound):
    """Calibrate, then replay on both backends, ATTEMPTS times; the median of their p50 latency errors within
    `bound` (one run on a shared 2-core machine can be off by 30% when other work starts mid-run; the median of
    three mostly is not, and where it is, that of five). Decisions and bytes must be equal every time. A broken
    model (bytes, copies or FFNs mispriced) misses by a factor, in all five. fmt: the experts as stored (None: fp32, the spec's own; mxfp4: packed, each expert
    decoded before its FFN in both the calibration and the torch run; a profile without the decode predicted a
    tenth of the torch run's time)."""
    import statistics

    trace = _locality_trace(spec, steps=steps)
    errors = []
    for i in range(ATTEMPTS + MORE):
        if i == ATTEMPTS and abs(statistics.median(errors)) < bound:
            break
        r = compare_backends(trace, _profile("cpu", spec.to_dict(), 1.0, fmt), LRU, "25%", "per_layer", 1.0,
                             {"device": "cpu"}, experts_format=fmt)
        assert r["same_decisions"], r
        assert r["real"]["info"]["weights_format"] == (fmt or "fp32")
        assert r["real"]["hits"] == r["sim"]["hits"] and r["real"]["bytes_h2d"] == r["sim"]["bytes_h2d"]
        assert r["real"]["loads"] == r["sim"]["loads"] > 0
        assert r["real"]["own_ms_per_step"] > 0 and r["sim"]["own_ms_per_step"] > 0  # the replay's own time, both
        errors.append(r["error"]["step_latency_paired"])
    assert abs(statistics.median(errors)) < bound, errors


def test_decisions_do_not_depend_on_scale():
    gpt = MODEL_SPECS["gpt-oss-20b"]
    trace = _locality_trace(gpt, steps=6)
    profile = _profile("cpu", "gpt-oss-20b", 1 / 64)
    a = compare_backends(trace, profile, LRU, "25%", "per_layer", 1 / 64, {"device": "cpu"})
    b = compare_backends(trace, profile, LRU, "25%", "per_layer", 1 / 32, {"device": "cpu"})
    assert a["same_decisions"] and b["same_decisions"]
    assert a["real"]["hits"] == b["real"]["hits"] and a["real"]["loads"] == b["real"]["loads"]
    # mxfp4 experts, packed: 45-wide rows take 2 blocks of 17 bytes, 90-wide rows 3
    assert (a["spec"]["dtype"], a["real"]["info"]["weights_format"]) == ("mxfp4", "mxfp4")
    assert a["real"]["bytes_h2d"] == a["real"]["loads"] * 3 * 45 * 2 * 17
    assert b["real"]["bytes_h2d"] == b["real"]["loads"] * 3 * 90 * 3 * 17


@pytest.mark.parametrize("fmt, options", [("q4_k", {}), (None, {"dtype": "bf16"})])
def test_a_quantised_and_an_unpacked_store_move_what_the_sim_counts(fmt, options):
    """The same decisions and bytes on both backends with experts packed in a GGUF format, and stored as
    bf16 (backend.dtype=bf16); the bytes are each store's own."""
    gpt = MODEL_SPECS["gpt-oss-20b"]
    trace = _locality_trace(gpt, steps=6)
    r = compare_backends(trace, _profile("cpu", "gpt-oss-20b", 1 / 64), LRU, "25%", "per_layer", 1 / 64,
                         {"device": "cpu", **options}, experts_format=fmt)
    assert r["same_decisions"] and r["real"]["loads"] == r["sim"]["loads"] > 0
    per_expert = 3 * 45 * 144 if fmt == "q4_k" else 3 * 45 * 45 * 2  # 45-wide rows: one q4_k block each
    assert r["real"]["bytes_h2d"] == r["sim"]["bytes_h2d"] == r["real"]["loads"] * per_expert


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs an NVIDIA GPU with CUDA (torch.cuda.is_available() is False)")
def test_sim_predicts_torch_on_cuda():
    gpt = MODEL_SPECS["gpt-oss-20b"]
    trace = _locality_trace(gpt, steps=100, batch=8)
    # gpt-oss's own mxfp4 (decoded before each FFN) and a bf16 store, both in one profile (both compute in bf16)
    profile = _profile("cuda", "gpt-oss-20b", 0.5, ["mxfp4", "bf16"])
    r = compare_backends(trace, profile, LRU, "25%", "per_layer", 0.5, {"device": "cuda", "dtype": "bf16"})
    assert r["same_decisions"], r
    assert abs(r["error"]["latency_p50_ms"]) < CUDA_BOUND, r
    packed = compare_backends(trace, profile, LRU, "25%", "per_layer", 0.5, {"device": "cuda"})  # mxfp4
    assert packed["same_decisions"] and packed["real"]["bytes_h2d"] == packed["real"]["loads"] * 3 * 1440 * 45 * 17
    assert abs(packed["error"]["latency_p50_ms"]) < CUDA_BOUND, packed
