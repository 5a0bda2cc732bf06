"""The torch backend (moesim/backends/torch/): pools, copies, compute, offload, events, memory checks, and
the CPU-only parts of scripts/gpu_check.py. Tests marked `gpu` need CUDA and skip without it.

    pytest tests/test_torch_backend.py -q
"""
from __future__ import annotations

import importlib.util
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moesim.backends.torch import memory as tb_memory
from moesim.backends.torch import (TorchBackend, expert_ffn, plan_memory, resolve_device, scale_spec, stored_spec,
                                   weights_dtype)
from moesim.cache import Cache
from moesim.units import parse_budget
from moesim.engine import hit_counts, replay
from moesim.errors import MoesimError
from moesim.profiler import Profiler
from moesim.trace import MODEL_SPECS, ModelSpec
from strategies.lru import LRU

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs an NVIDIA GPU with CUDA (torch.cuda.is_available() is False)")

# 4 layers x 16 experts, top-2; fp32 so CPU matmuls are fast; 3 * 64 * 96 * 4 = 72 KiB per expert
SPEC = ModelSpec("tiny", layers=4, experts=16, top_k=2, hidden=64, ffn=96, dtype="fp32", bits_per_weight=32)


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gpu_check = _gpu_check()


def _trace(spec=SPEC, steps=40, batch=1, seed=0):
    return gpu_check.locality_trace(spec, steps, batch=batch, reuse=0.5, skew=1.0, seed=seed)


def _run(trace, spec, budget="25%", prefetch=False, **options):
    slots = parse_budget(budget, trace.spec, "per_layer").slots
    backend = TorchBackend(device="cpu", **options)
    profiler = Profiler(spec.layers)
    backend.setup(spec, slots, profiler)
    cache = Cache(spec, slots, "per_layer", LRU, trace)
    counters = replay(trace, cache, backend, gpu_check.NextLayerOracle() if prefetch else None,
                      prefetch_max=spec.top_k if prefetch else 0)
    return backend, profiler, counters


# --------------------------------------------------------------------------------------------- specs
def test_scale_spec_shrinks_sizes_not_routing():
    gpt = MODEL_SPECS["gpt-oss-20b"]
    s = scale_spec(gpt, 0.25)
    assert (s.hidden, s.ffn) == (720, 720)
    assert (s.layers, s.experts, s.top_k, s.dtype) == (gpt.layers, gpt.experts, gpt.top_k, gpt.dtype)
    assert s.name == "gpt-oss-20b@0.25"
    assert scale_spec(gpt, 1.0) is gpt
    q = scale_spec(MODEL_SPECS["qwen1.5-moe-a2.7b"], 0.5)
    assert (q.hidden, q.ffn, q.shared_ffn) == (1024, 704, 2816)


@pytest.mark.parametrize("scale, words", [
    (1e-4, ["model.scale=0.0001", "hidden = 2880", "= 0", "smallest usable scale"]),
    (0, ["model.scale=0", "> 0"]),
    (-1, ["model.scale=-1"]),
    (float("nan"), ["model.scale=nan"]),
])
def test_scale_spec_refuses_a_zero_dimension(scale, words):
    with pytest.raises(MoesimError) as e:
        scale_spec(MODEL_SPECS["gpt-oss-20b"], scale)
    for w in words:
        assert w in str(e.value)


def test_stored_spec_uses_bf16_for_quantised_formats():
    gpt = MODEL_SPECS["gpt-oss-20b"]  # mxfp4, 4.25 bits
    s = stored_spec(gpt)
    assert (s.dtype, s.bits_per_weight) == ("bf16", 16.0)
    assert s.bytes_per_expert == 3 * 2880 * 2880 * 2
    assert stored_spec(MODEL_SPECS["deepseek-v3"]).dtype == "bf16"  # fp8
    assert stored_spec(SPEC) is SPEC  # fp32 stays
    assert stored_spec(gpt, "fp32").bytes_per_expert == 3 * 2880 * 2880 * 4
    assert weights_dtype("float16") == "fp16"
    with pytest.raises(MoesimError, match="backend.dtype='int3'"):
        weights_dtype("bf16", "int3")


# ------------------------------------------------------------------------------------------- devices
def test_device_auto_is_cpu_without_cuda():
    assert resolve_device("auto").type == ("cuda" if CUDA else "cpu")
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(MoesimError, match="expected auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")


@pytest.mark.skipif(CUDA, reason="checks the refusal where CUDA is absent")
@pytest.mark.parametrize("value", ["cuda", "cuda:0"])
def test_device_cuda_refused_without_cuda(value):
    with pytest.raises(MoesimError) as e:
        TorchBackend(device=value).setup(SPEC, 8, Profiler())
    assert f"backend.device={value}" in str(e.value)
    assert "backend.device=cpu" in str(e.value)


def test_cpu_path_makes_no_cuda_call(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a CUDA-only call on the cpu path")

    for name in ("Stream", "Event", "synchronize", "mem_get_info", "set_device", "reset_peak_memory_stats",
                 "max_memory_allocated", "current_device", "get_device_name"):
        monkeypatch.setattr(torch.cuda, name, boom)
    monkeypatch.setattr(torch.Tensor, "pin_memory", boom)
    monkeypatch.setattr(torch.Tensor, "cuda", boom)
    for worker in (False, True):
        backend, profiler, counters = _run(_trace(steps=10), SPEC, prefetch=True, copy_worker=worker)
        backend.finish()
        assert backend.memory()["peak_device_allocated_bytes"] is None
        assert not backend.host_pool.is_pinned()


# -------------------------------------------------------------------------------------------- memory
def test_host_memory_refused_before_allocating_with_numbers_and_hint(monkeypatch):
    monkeypatch.setattr(tb_memory, "host_memory_available", lambda: 8 * 2**30)
    spec = stored_spec(MODEL_SPECS["gpt-oss-20b"])  # 768 experts x 47.5 MiB = 35.6 GiB host pool
    backend = TorchBackend(device="cpu")
    allocated = []
    monkeypatch.setattr(torch, "empty", lambda *a, **k: allocated.append(a) or pytest.fail("allocated"))
    with pytest.raises(MoesimError) as e:
        backend.setup(spec, 192, Profiler())
    msg = str(e.value)
    for w in ("host memory", "768 experts x 47.5 MiB", "35.60 GiB", "8.00 GiB is available", "model.scale=0.4",
              "smaller budget"):
        assert w in msg, (w, msg)
    assert not allocated


def test_suggested_scale_fits():
    spec = stored_spec(MODEL_SPECS["gpt-oss-20b"])
    room = int(0.9 * 8 * 2**30)
    plan = plan_memory(spec, 192, "bf16", 512, on_cpu=True)
    s = tb_memory._fitting_scale(plan.host_pool + plan.device_pool, plan.workspace, room)
    small = plan_memory(stored_spec(scale_spec(spec, s)), 192, "bf16", 512, on_cpu=True)
    assert small.host_total <= room
    bigger = plan_memory(stored_spec(scale_spec(spec, s * 1.1)), 192, "bf16", 512, on_cpu=True)
    assert bigger.host_total > room * 0.95  # the suggestion is not needlessly small


def test_plan_counts_every_part():
    spec = ModelSpec("sh", 2, 8, 2, 32, 48, shared_experts=2, shared_ffn=64, dtype="fp32", bits_per_weight=32)
    plan = plan_memory(spec, 6, "fp32", 10, on_cpu=True)
    assert plan.host_pool == 2 * 8 * 3 * 32 * 48 * 4
    assert plan.device_pool == 6 * 3 * 32 * 48 * 4
    assert plan.shared == 2 * 2 * 3 * 32 * 64 * 4
    assert plan.workspace == 10 * (5 * 32 + 3 * 64) * 4
    assert plan.host_total == plan.host_pool + plan.device_pool + plan.shared + plan.workspace
    gpu_plan = plan_memory(spec, 6, "fp32", 10, on_cpu=False)
    assert gpu_plan.host_total == plan.host_pool + plan.workspace
    pinned = plan_memory(spec, 6, "fp32", 10, on_cpu=False, pinned=True)  # torch rounds pinned blocks up
    assert pinned.host_pool_reserved == 2 ** 19 > plan.host_pool  # 2 x 8 x 3 x 32 x 48 x 4 = 294912 bytes
    assert plan_memory(spec, 6, "fp32", 10, on_cpu=True, pinned=True).host_pool_reserved == plan.host_pool


# --------------------------------------------------------------------------------------- pools, copies
@pytest.mark.parametrize("worker", [False, True])
def test_loads_copy_exactly_the_expert_block(worker):
    backend = TorchBackend(device="cpu", copy_worker=worker)
    profiler = Profiler(SPEC.layers)
    backend.setup(SPEC, 8, profiler)
    W = 3 * SPEC.hidden * SPEC.ffn
    assert backend.host_pool.shape == (SPEC.layers * SPEC.experts, W) and backend.host_pool.is_contiguous()
    assert backend.device_pool.shape == (8, W)
    assert backend.device_pool.data_ptr() != backend.host_pool.data_ptr()
    keys = [(0, 3), (1, 15), (3, 0), (2, 7)]
    backend.begin_step(0, 1)
    for slot, key in enumerate(keys):
        backend.load(key, slot, prefetch=slot % 2 == 1)
    backend.compute(0, [(k, s, 1) for s, k in enumerate(keys)], [])
    backend.end_step()
    backend.finish()
    for slot, (layer, e) in enumerate(keys):
        assert torch.equal(backend.device_pool[slot], backend.host_pool[layer * SPEC.experts + e])
    _, cp, cm = profiler.arrays()
    assert cp[:, :3].astype(int).tolist() == [[l, e, W * 4] for l, e in keys]
    assert cp[:, 5].tolist() == [0, 1, 0, 1]  # prefetch flags
    assert (cp[:, 4] >= cp[:, 3]).all()
    assert len(cm) == 1 and cm[0, 3] >= 0  # one layer, a stall >= 0


def test_expert_ffn_is_swiglu_of_the_block():
    torch.manual_seed(0)
    H, Fd, n = 8, 12, 5
    gate, up, down = torch.randn(Fd, H), torch.randn(Fd, H), torch.randn(H, Fd)
    block = torch.cat([gate.reshape(-1), up.reshape(-1), down.reshape(-1)])
    x, out = torch.randn(n, H), torch.ones(n, H)
    expert_ffn(block, x, out, H, Fd, 0.5)
    ref = 1 + 0.5 * (F.silu(x @ gate.T) * (x @ up.T)) @ down.T
    torch.testing.assert_close(out, ref)


def test_compute_adds_device_and_host_experts_to_the_output():
    spec = ModelSpec("sh", 2, 8, 2, 16, 24, shared_experts=1, dtype="fp32", bits_per_weight=32)
    backend = TorchBackend(device="cpu", workspace_tokens=4)
    profiler = Profiler(spec.layers)
    backend.setup(spec, 4, profiler)
    backend.begin_step(0, 3)
    backend.load((1, 5), 2, False)
    backend.compute(1, [((1, 5), 2, 2)], [((1, 6), 3)])  # expert 5 on the device (2 tokens), 6 on the host (3)
    backend.end_step()
    backend.finish()
    x = backend._x[:3]
    want = torch.zeros(3, 16)
    expert_ffn(backend.shared_pool[1], x, want, 16, 24, 1.0)  # the layer's shared expert, every token, weight 1
    expert_ffn(backend.host_pool[1 * 8 + 5], x[:2], want[:2], 16, 24, 0.5)  # 1/top_k
    expert_ffn(backend.host_pool[1 * 8 + 6], x[:3], want[:3], 16, 24, 0.5)
    torch.testing.assert_close(backend._out[:3], want)
    _, _, cm = profiler.arrays()
    assert cm[:, 4].tolist() == [0, 1]  # a device event and a host event for the layer
    assert backend.device_bytes() == 4 * 3 * 16 * 24 * 4 + 2 * 3 * 16 * 24 * 4


@pytest.mark.parametrize("batch", [1, 2])
def test_each_expert_computes_its_own_tokens_weighted_by_the_trace_gates(batch):
    """One layer through the engine: every token's output is the sum over its routed experts of the gate
    weight times the expert's FFN of that token's row (batch 1: the row; batch 2: gathered, scattered back)."""
    from moesim.trace import from_arrays

    spec = ModelSpec("g", 1, 4, 2, 8, 12, dtype="fp32", bits_per_weight=32)
    rows = [[[0, 1]], [[1, 2]]][:batch]  # token 0: experts 0, 1; token 1: experts 1, 2
    gates = [[[0.75, 0.25]], [[0.625, 0.375]]][:batch]  # exact in fp16
    trace = from_arrays(spec, rows, gates, step=[0] * batch)
    backend, profiler = TorchBackend(device="cpu", workspace_tokens=4), Profiler(1)
    backend.setup(spec, 4, profiler)
    replay(trace, Cache(spec, 4, "per_layer", LRU, trace), backend)
    x = backend._x[:batch]
    want = torch.zeros(batch, 8)
    for t in range(batch):
        for e, g in zip(rows[t][0], gates[t][0]):
            expert_ffn(backend.host_pool[e], x[t:t + 1], want[t:t + 1], 8, 12, g)
    torch.testing.assert_close(backend._out[:batch], want)


def test_replay_events_match_the_decisions():
    trace = _trace(steps=30, batch=2)
    backend, profiler, counters = _run(trace, SPEC)
    m = profiler.metrics()
    assert counters.hits == hit_counts(trace, LRU, "25%").hits  # the backend changes no decision
    assert m["steps"] == trace.n_steps and m["tokens"] == trace.n_tokens
    assert m["loads"] == counters.loads
    assert m["bytes_h2d"] == counters.loads * 3 * SPEC.hidden * SPEC.ffn * 4
    st, cp, cm = profiler.arrays()
    assert len(cm) == trace.n_steps * SPEC.layers
    assert (st[:, 3] > st[:, 2]).all() and (cm[:, 3] >= 0).all()
    assert m["stall_ms"] > 0  # the demand misses waited for their copies
    # no prefetch: exactly the hits were served without waiting, as the sim counts them
    assert backend.request_stats() == {"stall_free_requests": counters.hits, "late_prefetches": 0}


def test_no_allocation_per_step():
    trace = _trace(steps=20)
    slots = parse_budget("25%", SPEC, "per_layer").slots
    backend = TorchBackend(device="cpu")
    backend.setup(SPEC, slots, Profiler(SPEC.layers))
    ptrs = [t.data_ptr() for t in (backend.host_pool, backend.device_pool, backend.shared_pool, backend._x, backend._out)]
    replay(trace, Cache(SPEC, slots, "per_layer", LRU, trace), backend)
    assert [t.data_ptr() for t in (backend.host_pool, backend.device_pool, backend.shared_pool, backend._x,
                                   backend._out)] == ptrs


def test_a_larger_step_grows_the_activations_once():
    backend = TorchBackend(device="cpu", workspace_tokens=2)
    backend.setup(SPEC, 8, Profiler(SPEC.layers))
    backend.begin_step(0, 5)
    backend.load((0, 1), 0, False)
    backend.compute(0, [((0, 1), 0, 5)], [])
    backend.end_step()
    backend.finish()
    assert backend._x.shape[0] >= 5


def test_scaled_model_runs_and_keeps_decisions():
    gpt = MODEL_SPECS["gpt-oss-20b"]
    trace = _trace(gpt, steps=8)
    spec = stored_spec(scale_spec(gpt, 1 / 64))  # hidden = ffn = 45
    backend, profiler, counters = _run(trace, spec)
    assert counters.hits == hit_counts(trace, LRU, "25%").hits
    assert profiler.metrics()["bytes_h2d"] == counters.loads * 3 * 45 * 45 * 2
    assert backend.info()["weights_dtype"] == "bf16"


def test_memory_and_info_fields_on_cpu():
    backend, _, _ = _run(_trace(steps=5), SPEC)
    mem = backend.memory()
    assert mem["device_pool_bytes"] == backend.n_slots * 3 * 64 * 96 * 4
    assert mem["host_pool_bytes"] == 64 * 3 * 64 * 96 * 4
    assert mem["peak_rss_bytes"] >= mem["host_pool_bytes"]
    assert mem["peak_device_allocated_bytes"] is None and mem["peak_nvml_used_bytes"] is None
    info = backend.info()
    assert (info["device"], info["copies"], info["weights_dtype"], info["threads"]) == ("cpu", "sync", "fp32", 1)


def test_copy_worker_overlaps_prefetches_with_compute():
    backend, profiler, counters = _run(_trace(steps=40), SPEC, prefetch=True, copy_worker=True)
    m = profiler.metrics()
    assert counters.prefetch_loads > 0
    assert m["overlap"] is not None and m["overlap"] > 0  # some copy time ran under compute
    sync_backend, sync_profiler, _ = _run(_trace(steps=40), SPEC, prefetch=True, copy_worker=False)
    assert sync_profiler.metrics()["overlap"] == 0  # inline copies never run under compute


def test_bad_options_refused():
    with pytest.raises(MoesimError, match="backend.threads=0"):
        TorchBackend(device="cpu", threads=0).setup(SPEC, 8, Profiler())
    with pytest.raises(MoesimError, match="backend.workspace_tokens=0"):
        TorchBackend(device="cpu", workspace_tokens=0).setup(SPEC, 8, Profiler())


# ------------------------------------------------------------------------------- scripts/gpu_check.py
def test_oracle_predicts_the_true_experts_two_layers_ahead():
    trace = _trace(steps=6, batch=2)
    oracle = gpu_check.NextLayerOracle()
    from strategies import Context

    oracle.setup(Context(trace, trace.spec, tuple(range(4)), 0, "per_layer"))
    e = np.asarray(trace.experts)
    for pos in range(6 * 4 - 2):
        step, layer = divmod(pos + 2, 4)
        rows = e[2 * step:2 * step + 2, layer]
        assert sorted(k[1] for k in oracle.predict(pos, pos % 4)) == sorted(set(rows.reshape(-1).tolist()))
        assert all(k[0] == layer for k in oracle.predict(pos, pos % 4))
    assert oracle.predict(6 * 4 - 1, 3) == []


def test_gpu_check_runs_on_cpu_and_writes_a_dated_report(tmp_path, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    status = gpu_check.main(["--device", "cpu", "--quick", "--skip-tests", "--out", str(tmp_path)])
    reports = list(tmp_path.glob("*.md"))
    assert len(reports) == 1
    name = reports[0].name
    assert name == gpu_check.report_name(torch.device("cpu")) and name[:4].isdigit() and "cpu" in name
    text = reports[0].read_text()
    for section in ("## Copy bandwidth", "## Overlap with a perfect prefetcher", "## Peak device memory",
                    "## Fidelity: sim (calibrated here) against torch"):
        assert section in text
    assert "## Errors" not in text, text
    assert status == 0


def test_gpu_check_sh_is_valid_bash():
    subprocess.run(["bash", "-n", str(REPO / "scripts" / "gpu_check.sh")], check=True)


# ---------------------------------------------------------------------------------------------- gpu
@gpu
@needs_cuda
def test_gpu_pinned_pool_copies_and_events():
    backend = TorchBackend(device="cuda")
    profiler = Profiler(SPEC.layers)
    backend.setup(SPEC, 8, profiler)
    assert backend.host_pool.is_pinned() and backend.device_pool.is_cuda
    keys = [(0, 3), (1, 15), (3, 0), (2, 7)]
    backend.begin_step(0, 2)
    for slot, key in enumerate(keys):
        backend.load(key, slot, False)
    backend.compute(0, [(k, s, 2) for s, k in enumerate(keys)], [((0, 9), 2)])
    backend.end_step()
    backend.finish()
    for slot, (layer, e) in enumerate(keys):
        assert torch.equal(backend.device_pool[slot].cpu(), backend.host_pool[layer * SPEC.experts + e])
    st, cp, cm = profiler.arrays()
    assert len(cp) == 4 and (cp[:, 4] > cp[:, 3]).all()
    assert (cm[:, 2] >= cm[:, 1]).all() and cm[:, 4].tolist() == [0, 1]
    mem = backend.memory()
    assert mem["peak_device_allocated_bytes"] >= mem["device_pool_bytes"]


@gpu
@needs_cuda
def test_gpu_prefetch_overlaps_compute():
    spec = stored_spec(scale_spec(MODEL_SPECS["gpt-oss-20b"], 0.5))
    trace = _trace(MODEL_SPECS["gpt-oss-20b"], steps=40)
    slots = parse_budget("25%", trace.spec, "per_layer").slots
    backend = TorchBackend(device="cuda")
    profiler = Profiler(spec.layers)
    backend.setup(spec, slots, profiler)
    replay(trace, Cache(spec, slots, "per_layer", LRU, trace), backend, gpu_check.NextLayerOracle(),
           prefetch_max=spec.top_k)
    m = profiler.metrics()
    assert m["prefetch_loads"] > 0 and m["overlap"] > 0.2


@gpu
@needs_cuda
def test_gpu_budget_larger_than_free_vram_refused():
    spec = stored_spec(MODEL_SPECS["mixtral-8x7b"])  # 336 MiB per expert
    free, _ = torch.cuda.mem_get_info()
    slots = min(spec.layers * spec.experts, math.ceil(free / spec.bytes_per_expert) + 8)
    if slots * spec.bytes_per_expert <= free:
        pytest.skip("this GPU holds every expert of mixtral-8x7b")
    backend = TorchBackend(device="cuda")
    with pytest.raises(MoesimError) as e:
        backend.setup(spec, slots, Profiler())
    assert "device memory" in str(e.value) and "budget=" in str(e.value)


@gpu
@needs_cuda
def test_gpu_check_report_on_cuda(tmp_path, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    status = gpu_check.main(["--device", "cuda", "--quick", "--skip-tests", "--out", str(tmp_path)])
    text = next(tmp_path.glob("*.md")).read_text()
    assert "## Errors" not in text, text
    assert status == 0


def test_request_stats_and_inflight_bytes_agree_with_the_sim_counts():
    """Stall-free requests and late prefetches, counted as the sim counts them; inline copies are never in
    flight, the worker's queue is."""
    trace = _trace(steps=30)
    backend, profiler, counters = _run(trace, SPEC, prefetch=True)
    stats = backend.request_stats()
    device_requests = counters.requests - counters.host_computes
    # inline copies: a request waited exactly when its slot was loaded since the last layer (a miss or a
    # prefetch issued after the previous layer) -- every other request was served stall-free
    assert 0 < stats["stall_free_requests"] < device_requests
    assert stats["late_prefetches"] <= counters.prefetch_loads
    assert backend.inflight_bytes() == 0
    worker = TorchBackend(device="cpu", copy_worker=True)
    worker.setup(SPEC, 8, Profiler(SPEC.layers))
    worker.begin_step(0, 1)
    for slot in range(8):
        worker.load((0, slot), slot, True)
    assert 0 <= worker.inflight_bytes() <= 8 * 3 * 64 * 96 * 4
    worker.compute(0, [((0, s), s, 1) for s in range(8)], [])
    worker.end_step()
    worker.finish()
    assert worker.inflight_bytes() == 0
    assert worker.request_stats()["stall_free_requests"] + worker.request_stats()["late_prefetches"] == 8
