"""The torch backend (moesim/backends/torch/): packed experts (each format's bytes and decode), pools,
copies, compute, offload, events, memory checks and pinned chunks, and the CPU-only parts of
scripts/gpu_check.py. Tests marked `gpu` need CUDA and skip without it.

    pytest tests/test_torch_backend.py -q
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import moesim
from moesim.backends.torch import memory as tb_memory
from moesim.backends.torch import (ExpertCodec, TorchBackend, expert_ffn, fill_experts, pinned_bytes,
                                   pinned_chunks, plan_memory, resolve_device, scale_spec, stored_spec,
                                   weights_dtype)
from moesim.backends.torch.packed import TensorCodec
from moesim.formats import FORMATS, get_format
from moesim.models import with_formats
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


def test_stored_spec_keeps_packed_formats():
    gpt = MODEL_SPECS["gpt-oss-20b"]  # mxfp4, 4.25 bits
    assert stored_spec(gpt) is gpt and gpt.bytes_per_expert == 13_219_200  # stored packed, as the sim counts
    assert stored_spec(MODEL_SPECS["deepseek-v3"]) is MODEL_SPECS["deepseek-v3"]  # fp8 with its tile scales
    assert stored_spec(SPEC) is SPEC  # fp32 stays
    s = stored_spec(gpt, "bf16")  # a dtype forces an unpacked store
    assert (s.dtype, s.bits_per_weight, s.bytes_per_expert) == ("bf16", 16.0, 3 * 2880 * 2880 * 2)
    assert stored_spec(gpt, "fp32").bytes_per_expert == 3 * 2880 * 2880 * 4
    # a format moesim does not know, or other bits than the format's, cannot be packed: bf16
    assert stored_spec(dataclasses.replace(gpt, dtype="int3", bits_per_weight=3.0)).dtype == "bf16"
    assert stored_spec(dataclasses.replace(gpt, bits_per_weight=4.0)).dtype == "bf16"
    assert weights_dtype("float16") == "fp16" and weights_dtype("mxfp4") == "bf16"  # packed: decoded to bf16
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
    gpt = MODEL_SPECS["gpt-oss-20b"]  # packed (mxfp4): decoded on the cpu, still no CUDA call
    backend, _, _ = _run(_trace(gpt, steps=4), stored_spec(scale_spec(gpt, 1 / 64)), copy_worker=True)
    backend.finish()
    assert backend.memory()["host_pool_pinned_bytes"] is None and not backend.host_pool.is_pinned()


# -------------------------------------------------------------------------------------------- memory
def test_host_memory_refused_before_allocating_with_numbers_and_hint(monkeypatch):
    monkeypatch.setattr(tb_memory, "host_memory_available", lambda: 8 * 2**30)
    spec = stored_spec(MODEL_SPECS["gpt-oss-20b"], "bf16")  # 768 experts x 47.5 MiB = 35.6 GiB host pool
    backend = TorchBackend(device="cpu", dtype="bf16")
    allocated = []
    monkeypatch.setattr(torch, "empty", lambda *a, **k: allocated.append(a) or pytest.fail("allocated"))
    with pytest.raises(MoesimError) as e:
        backend.setup(spec, 192, Profiler())
    msg = str(e.value)
    for w in ("host memory", "768 experts x 47.5 MiB (bf16)", "35.60 GiB", "8.00 GiB is available",
              "model.scale=0.4", "smaller budget"):
        assert w in msg, (w, msg)
    assert not allocated


def test_suggested_scale_fits():
    spec = stored_spec(MODEL_SPECS["gpt-oss-20b"], "bf16")
    room = int(0.9 * 8 * 2**30)
    plan = plan_memory(spec, 192, "bf16", 512, on_cpu=True)
    s = tb_memory._fitting_scale(plan.host_pool + plan.device_pool, plan.workspace, room)
    small = plan_memory(scale_spec(spec, s), 192, "bf16", 512, on_cpu=True)
    assert small.host_total <= room
    bigger = plan_memory(scale_spec(spec, s * 1.1), 192, "bf16", 512, on_cpu=True)
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
    # 16 experts of 18,432 bytes (294,912): one pinned block would reserve 2^19 = 524,288; a chunk of 14
    # experts (258,048 -> 262,144) and one of 2 (36,864 -> 65,536) reserve 327,680
    assert pinned.host_pool_reserved == 2**18 + 2**16 < 2**19
    assert plan_memory(spec, 6, "fp32", 10, on_cpu=True, pinned=True).host_pool_reserved == plan.host_pool


def test_plan_counts_packed_experts_and_their_decoded_copy():
    spec = stored_spec(scale_spec(MODEL_SPECS["gpt-oss-20b"], 0.125))  # mxfp4, 360 x 360
    plan = plan_memory(spec, 192, "bf16", 16, on_cpu=False)
    assert plan.host_pool == 768 * 220_320 and plan.device_pool == 192 * 220_320  # 3 x 360 rows x 12 x 17
    assert plan.workspace == 16 * (5 * 360 + 3 * 360) * 2 + 3 * 360 * 360 * 2  # + the decoded expert
    assert plan.host_decode == 3 * 360 * 360 * 2  # host experts decode on the host
    bf16 = plan_memory(stored_spec(spec, "bf16"), 192, "bf16", 16, on_cpu=False)
    assert bf16.workspace == 16 * (5 * 360 + 3 * 360) * 2 and bf16.host_decode == 0  # the bytes are weights


def test_pinned_chunks_keep_rounding_within_one_chunk():
    """torch rounds each pinned block up to a power of two; the pool is chunked so that what it reserves
    exceeds its bytes by at most one chunk, every expert whole in one chunk."""
    for n, nbytes in [(768, 49_766_400), (768, 13_219_200), (768, 220_320), (61 * 256, 44_061_184), (1, 7),
                      (5, 2**20), (16, 18_432), (3, 3 * 2**20 + 1)]:
        counts = pinned_chunks(n, nbytes)
        assert sum(counts) == n and all(k >= 1 for k in counts)
        chunk = max(1 << (k * nbytes - 1).bit_length() for k in counts)  # the largest chunk, as reserved
        total = pinned_bytes(counts, nbytes)
        assert n * nbytes <= total <= n * nbytes + chunk, (n, nbytes, counts)
    # gpt-oss-20b in bf16: 35.6 GiB pinned in 36 GiB, not 64
    assert pinned_bytes(pinned_chunks(768, 49_766_400), 49_766_400) == 36 * 2**30
    assert pinned_chunks(0, 100) == []


def test_chunked_pool_indexes_its_experts_like_one_tensor(monkeypatch):
    """The pinned pool's layout, on the CPU (pin_memory needs CUDA: allocated unpinned here): expert i is
    row i across the chunks, and a fill over the chunks makes every expert a valid one."""
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **k: empty(*a, **k))
    codec = ExpertCodec("q4_0", 32, 64, torch.float32)
    counts = pinned_chunks(23, codec.nbytes)
    pool = tb_memory.ChunkedPool(counts, codec.nbytes)
    assert len(counts) > 1 and len(pool) == 23 and pool.shape == (23, codec.nbytes)
    assert [c.shape[0] for c in pool.chunks] == counts
    assert pool[counts[0]].data_ptr() == pool.chunks[1].data_ptr()  # the second chunk's first expert
    assert pool[22].data_ptr() == pool.chunks[-1][-1].data_ptr()
    fill_experts(pool.chunks, codec, seed=4, bound=0.1)
    weights = [codec.decode(pool[i], torch.empty(codec.width)).clone() for i in range(23)]
    assert all(torch.isfinite(w).all() and 0 < w.abs().max() <= 0.1 for w in weights)
    assert not torch.equal(weights[counts[0] - 1], weights[counts[0]])  # chunks are not copies of each other


# ------------------------------------------------------------------------------------ packed experts
def _f16(x: float) -> bytes:
    return struct.pack("<e", x)


def _decode(name: str, rows: int, cols: int, data: bytes) -> torch.Tensor:
    codec = TensorCodec(get_format(name), rows, cols)
    assert len(data) == codec.nbytes
    out = torch.empty(rows, cols)
    codec.decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), out)
    return out


def _ggml_reference(name: str, block: bytes) -> list[float]:
    """One block decoded as ggml-quants.c's dequantize_row_* does it, element by element."""
    d = struct.unpack("<e", block[:2])[0]
    if name == "q8_0":
        return [d * struct.unpack("<b", block[2 + j:3 + j])[0] for j in range(32)]
    if name == "q4_0":
        qs = block[2:18]
        return [((qs[j] & 15) - 8) * d for j in range(16)] + [((qs[j] >> 4) - 8) * d for j in range(16)]
    if name == "q4_1":
        m, qs = struct.unpack("<e", block[2:4])[0], block[4:20]
        return [(qs[j] & 15) * d + m for j in range(16)] + [(qs[j] >> 4) * d + m for j in range(16)]
    if name in ("q5_0", "q5_1"):
        m = struct.unpack("<e", block[2:4])[0] if name == "q5_1" else None
        at = 4 if m is not None else 2
        qh = struct.unpack("<I", block[at:at + 4])[0]
        qs = block[at + 4:at + 20]
        lo = [(qs[j] & 15) | (((qh >> j) << 4) & 0x10) for j in range(16)]
        hi = [(qs[j] >> 4) | ((qh >> (j + 12)) & 0x10) for j in range(16)]
        return [q * d + m for q in lo + hi] if m is not None else [(q - 16) * d for q in lo + hi]
    if name == "mxfp4":  # kvalues_mxfp4 (E2M1 doubled) times the E8M0 scale halved
        kv = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12]
        scale = 2.0 ** (block[0] - 128)
        return [kv[b & 15] * scale for b in block[1:17]] + [kv[b >> 4] * scale for b in block[1:17]]
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "mxfp4"])
def test_ggml_blocks_decode_as_ggml_does(name):
    """Two rows of 40 weights (2 blocks each, the second padded): random bytes with sane scales, decoded
    against ggml's element loops."""
    f = get_format(name)
    rng = np.random.default_rng(1)
    blocks = []
    for _ in range(4):
        b = bytearray(rng.integers(0, 256, f.block_bytes, dtype=np.uint8).tobytes())
        if name == "mxfp4":
            b[0] = int(rng.integers(110, 140))
        else:
            b[0:2] = _f16(float(rng.uniform(-0.1, 0.1)))
            if name in ("q4_1", "q5_1"):
                b[2:4] = _f16(float(rng.uniform(-1, 1)))
        blocks.append(bytes(b))
    got = _decode(name, 2, 40, b"".join(blocks))
    want = [(_ggml_reference(name, blocks[2 * r]) + _ggml_reference(name, blocks[2 * r + 1]))[:40] for r in range(2)]
    torch.testing.assert_close(got, torch.tensor(want), rtol=0, atol=0)


def test_fp8_decodes_each_tile_with_its_scale():
    rows, cols = 130, 200  # 2 x 2 tiles, the last ones partial
    rng = np.random.default_rng(2)
    vals = torch.from_numpy(rng.uniform(-400, 400, (rows, cols)).astype(np.float32)).to(torch.float8_e4m3fn)
    scales = torch.tensor([[0.5, 2.0], [0.25, 8.0]])
    data = vals.view(torch.uint8).numpy().tobytes() + scales.numpy().tobytes()
    want = vals.float().clone()
    for i in range(rows):
        for j in range(cols):
            want[i, j] *= scales[i // 128, j // 128]
    torch.testing.assert_close(_decode("fp8", rows, cols, data), want, rtol=0, atol=0)


def _hqq_pack(q: np.ndarray, bits: int) -> np.ndarray:
    """hqq's BitPack (hqq/core/bitpack.py): rows [step*i, step*(i+1)) go to field i, the first in the top bits."""
    if bits == 3:
        rows = 10 * math.ceil(q.shape[0] / 10)
        q = np.concatenate([q, np.zeros((rows - q.shape[0], q.shape[1]), q.dtype)]).astype(np.int32)
        step = rows // 10
        return sum(q[i * step:(i + 1) * step] << (27 - 3 * i) for i in range(10)).astype(np.int32)
    per = 8 // bits
    step = q.shape[0] // per
    return sum(q[i * step:(i + 1) * step].astype(np.uint8) << (8 - bits * (i + 1)) for i in range(per)).astype(np.uint8)


@pytest.mark.parametrize("name, bits, group", [("hqq4_g64", 4, 64), ("hqq3_g64", 3, 64), ("hqq2_g16", 2, 16)])
def test_hqq_decodes_its_packed_codes_with_scale_and_zero(name, bits, group):
    """hqq axis=1: W.reshape(-1, group) -> codes [G, group], packed; scale and zero per group, fp16;
    W = (q - zero) * scale."""
    rows, cols = 64, 96
    G = rows * cols // group
    rng = np.random.default_rng(3)
    q = rng.integers(0, 2**bits, (G, group))
    scale = rng.uniform(0.01, 0.1, G).astype(np.float16)
    zero = rng.uniform(0, 2**bits - 1, G).astype(np.float16)
    data = _hqq_pack(q, bits).tobytes() + scale.tobytes() + zero.tobytes()
    want = (q - zero.astype(np.float32)[:, None]) * scale.astype(np.float32)[:, None]
    torch.testing.assert_close(_decode(name, rows, cols, data), torch.from_numpy(want.reshape(rows, cols)).float())


def _hqq_mo_tensor(q: np.ndarray, bits: int, seed: int) -> tuple[bytes, np.ndarray]:
    """The bytes of codes q [group, G] (axis=0) with random 8-bit scales and zeros as hqq@37502bea quantises them
    (an fp16 scale and zero per 128 scales; one fp16 scale and zero for the zeros), and the weights they mean."""
    G = q.shape[1]
    rng = np.random.default_rng(seed)
    sq, zq = rng.integers(0, 256, G).astype(np.uint8), rng.integers(0, 256, G).astype(np.uint8)
    ms = rng.uniform(1e-4, 1e-3, G // 128).astype(np.float16)
    mz = rng.uniform(-20, 20, G // 128).astype(np.float16)
    zs, zz = np.float16((2**bits - 1) / 255), np.float16(-10)
    data = (_hqq_pack(q, bits).tobytes() + sq.tobytes() + ms.tobytes() + mz.tobytes() + zq.tobytes()
            + zs.tobytes() + zz.tobytes())
    scale = (sq - np.repeat(mz.astype(np.float32), 128)) * np.repeat(ms.astype(np.float32), 128)
    zero = (zq - np.float32(zz)) * np.float32(zs)
    return data, ((q - zero[None, :]) * scale[None, :]).astype(np.float32)


def test_hqq_mixtral_offloading_config_decodes_its_quantised_meta():
    """hqq@37502bea axis=0 as mixtral-offloading used it: codes [group * 2 / 8, G]; 8-bit scales with an
    fp16 scale and zero per 128 of them; 8-bit zeros with one fp16 scale and zero."""
    rows, cols, group = 64, 512, 16
    G = rows * cols // group  # 2048: 16 meta-groups of 128
    q = np.random.default_rng(4).integers(0, 4, (group, G))
    data, want = _hqq_mo_tensor(q, 2, seed=4)
    torch.testing.assert_close(_decode("hqq2_g16_mo", rows, cols, data), torch.from_numpy(want.reshape(rows, cols)))


def test_hqq_3bit_axis0_drops_the_padding_rows():
    """hqq3_g64_mo: axis=0 codes [64, G] padded to 70 rows and packed 10 per int32 row ([7, G], 28 bytes per
    group), the same quantised meta as hqq2_g16_mo; the decode reads 28 bytes per group and drops rows 64..69."""
    rows, cols, group = 64, 256, 64
    G = rows * cols // group  # 256: 2 meta-groups of 128
    q = np.random.default_rng(5).integers(0, 8, (group, G))
    assert _hqq_pack(q, 3).nbytes == 28 * G
    data, want = _hqq_mo_tensor(q, 3, seed=5)
    assert len(data) == get_format("hqq3_g64_mo").tensor_bytes(rows, cols)
    torch.testing.assert_close(_decode("hqq3_g64_mo", rows, cols, data), torch.from_numpy(want.reshape(rows, cols)))


@pytest.mark.parametrize("name", ["q4_k", "q2_k", "iq1_m", "iq4_xs", "q6_k"])
def test_generic_blocks_read_every_byte(name):
    """k-quants and iq formats: moesim's own block (not GGUF's bits), but every byte of the block changes
    the weights it decodes to."""
    f = get_format(name)
    rng = np.random.default_rng(5)
    block = bytearray(rng.integers(0, 256, f.block_bytes, dtype=np.uint8).tobytes())
    block[0:2] = _f16(0.01)
    base = _decode(name, 1, f.block, bytes(block))
    assert torch.isfinite(base).all()
    for i in range(f.block_bytes):
        changed = bytearray(block)
        changed[i] ^= 0x81  # the lowest and highest bit: every code width sees a change
        assert not torch.equal(_decode(name, 1, f.block, bytes(changed)), base), (name, i)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_random_experts_decode_finite_and_bounded(name):
    codec = ExpertCodec(name, 40, 72, torch.float32)
    pool = torch.empty((2, codec.nbytes), dtype=torch.uint8)
    fill_experts([pool], codec, seed=0, bound=0.1)
    assert codec.nbytes == 2 * get_format(name).tensor_bytes(72, 40) + get_format(name).tensor_bytes(40, 72)
    w = codec.decode(pool[1], torch.empty(codec.width))
    assert w.shape == (3 * 40 * 72,) and torch.isfinite(w).all()
    assert 0.01 < w.abs().max() <= 0.2 and w.std() > 0.003  # within about the bound, not degenerate


@pytest.mark.parametrize("fmt", ["mxfp4", "q4_k", "q8_0", "fp8", "hqq4_g64", "bf16"])
def test_a_packed_expert_moves_its_bytes_and_computes_its_decoded_weights(fmt):
    """The host pool holds bytes_per_expert bytes per expert in the format; a load copies them; the layer's
    output is the FFN of the decoded weights."""
    spec = with_formats(ModelSpec("p", 2, 8, 2, 40, 72, dtype="fp32", bits_per_weight=32), experts=fmt)
    backend, profiler = TorchBackend(device="cpu", workspace_tokens=4), Profiler(2)
    backend.setup(spec, 4, profiler)
    assert backend.host_pool.dtype == torch.uint8 and backend.host_pool.shape == (16, spec.bytes_per_expert)
    assert backend.info()["weights_dtype"] == "bf16" and backend.info()["weights_format"] == fmt
    backend.begin_step(0, 2)
    backend.load((1, 3), 1, False)
    backend.compute(1, [((1, 3), 1, 2)], [((1, 4), 2)])  # one expert on the device, one on the host
    backend.end_step()
    backend.finish()
    assert torch.equal(backend.device_pool[1], backend.host_pool[1 * 8 + 3])
    assert profiler.metrics()["bytes_h2d"] == spec.bytes_per_expert
    x, want = backend._x[:2], torch.zeros(2, 40, dtype=torch.bfloat16)
    expert_ffn(backend.expert_weights(1 * 8 + 3), x, want, 40, 72, 0.5)
    expert_ffn(backend.expert_weights(1 * 8 + 4), x, want, 40, 72, 0.5)
    torch.testing.assert_close(backend._out[:2], want)
    assert torch.isfinite(backend._out[:2]).all() and backend._out[:2].abs().max() > 0


def _sim_and_torch(trace, **options):
    runs = [moesim.simulate(trace, backend=b, overrides=["model.scale=0.125"] + (["backend.device=cpu"]
                                                                                 if b == "torch" else []),
                            **options).summary for b in ("sim", "torch")]
    return runs


def test_torch_and_sim_move_the_same_bytes_for_mxfp4():
    """gpt-oss-20b (mxfp4) at model.scale=0.125, budget 25%: the same hits and bytes_h2d on both backends,
    220,320 bytes per expert (3 x 360 rows x 12 blocks x 17 bytes), not bf16's 777,600."""
    trace = moesim.load_trace("gpt-oss-like")
    trace = trace.slice_tokens(0, int(trace.step_starts[6]))
    sim, real = _sim_and_torch(trace, budget="25%")
    assert real["model"]["bytes_per_expert"] == sim["model"]["bytes_per_expert"] == 220_320
    assert (real["hits"], real["loads"], real["bytes_h2d"]) == (sim["hits"], sim["loads"], sim["bytes_h2d"])
    assert real["bytes_h2d"] == real["loads"] * 220_320 and real["loads"] > 0
    assert real["memory"]["host_pool_bytes"] == 768 * 220_320


def test_torch_and_sim_move_the_same_bytes_for_a_gguf_format():
    trace = moesim.load_trace("gpt-oss-like")
    trace = dataclasses.replace(trace.slice_tokens(0, int(trace.step_starts[4])),
                                spec=with_formats(trace.spec, experts="q4_k"))
    sim, real = _sim_and_torch(trace, budget="25%")
    assert real["model"]["bytes_per_expert"] == 3 * 360 * 2 * 144  # 360-wide rows: 2 blocks of 144 bytes
    assert (real["hits"], real["bytes_h2d"]) == (sim["hits"], sim["bytes_h2d"]) and real["loads"] > 0


# --------------------------------------------------------------------------------------- pools, copies
@pytest.mark.parametrize("worker", [False, True])
def test_loads_copy_exactly_the_expert_block(worker):
    backend = TorchBackend(device="cpu", copy_worker=worker)
    profiler = Profiler(SPEC.layers)
    backend.setup(SPEC, 8, profiler)
    W = 3 * SPEC.hidden * SPEC.ffn  # fp32 values: 4 bytes each
    assert backend.host_pool.shape == (SPEC.layers * SPEC.experts, W * 4) and backend.host_pool.is_contiguous()
    assert backend.host_pool.dtype == backend.device_pool.dtype == torch.uint8
    assert backend.device_pool.shape == (8, W * 4)
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
    expert_ffn(backend.expert_weights(1, shared=True), x, want, 16, 24, 1.0)  # the shared expert, every token
    expert_ffn(backend.expert_weights(1 * 8 + 5), x[:2], want[:2], 16, 24, 0.5)  # 1/top_k
    expert_ffn(backend.expert_weights(1 * 8 + 6), x[:3], want[:3], 16, 24, 0.5)
    torch.testing.assert_close(backend._out[:3], want)
    _, _, cm = profiler.arrays()
    assert cm[:, 4].tolist() == [0, 1]  # a device event and a host event for the layer
    assert backend.device_bytes() == 4 * 3 * 16 * 24 * 4 + 2 * 3 * 16 * 24 * 4


@pytest.mark.parametrize("batch, where", [(1, "device"), (2, "device"), (3, "host"), (3, "both"), (1, "host")])
def test_each_expert_computes_its_own_tokens_weighted_by_the_trace_gates(batch, where):
    """One layer through the engine: every token's output is the sum over its routed experts of the gate
    weight times the expert's FFN of that token's row (batch 1: the row; more: gathered, scattered back), on
    the device, on the host (every miss computed there: static_split of all layers), or both (experts 0 and 1
    resident, the others on the host). Against a dense reference: each token, each of its experts."""
    from moesim.trace import from_arrays
    from strategies.static_split import StaticSplit

    spec = ModelSpec("g", 1, 4, 2, 8, 12, dtype="fp32", bits_per_weight=32)
    rows = [[[0, 1]], [[1, 2]], [[3, 1]]][:batch]  # token 0: experts 0, 1; token 1: 1, 2; token 2: 3, 1
    gates = [[[0.75, 0.25]], [[0.625, 0.375]], [[0.5, 0.5]]][:batch]  # exact in fp16
    trace = from_arrays(spec, rows, gates, step=[0] * batch)
    backend, profiler = TorchBackend(device="cpu", workspace_tokens=4), Profiler(1)
    backend.setup(spec, 4, profiler)
    if where == "both":  # by hand: experts 0 and 1 loaded and computed on the device, 2 and 3 on the host
        backend.begin_step(0, batch)
        backend.route(np.array(rows), np.array(gates))
        backend.load((0, 0), 0, False)
        backend.load((0, 1), 1, False)
        backend.compute(0, [((0, 0), 0, 1), ((0, 1), 1, 3 if batch == 3 else 2)],
                        [((0, 2), 1), ((0, 3), 1)][: batch - 1])
        backend.end_step()
        backend.finish()
    else:
        offload = StaticSplit(host_layers="all") if where == "host" else None
        replay(trace, Cache(spec, 4, "per_layer", LRU, trace), backend, offload=offload)
        _, _, cm = profiler.arrays()
        assert set(cm[:, 4]) == ({0.0, 1.0} if where == "host" else {0.0})  # a host event beside the (empty)
        #                                                                     device part / the device only
    x = backend._x[:batch]
    want = torch.zeros(batch, 8)
    for t in range(batch):
        for e, g in zip(rows[t][0], gates[t][0]):
            expert_ffn(backend.expert_weights(e), x[t:t + 1], want[t:t + 1], 8, 12, g)
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
    spec = stored_spec(scale_spec(gpt, 1 / 64))  # hidden = ffn = 45, mxfp4: 2 blocks of 17 bytes per row
    backend, profiler, counters = _run(trace, spec)
    assert counters.hits == hit_counts(trace, LRU, "25%").hits
    assert profiler.metrics()["bytes_h2d"] == counters.loads * 3 * 45 * 2 * 17
    assert (backend.info()["weights_format"], backend.info()["weights_dtype"]) == ("mxfp4", "bf16")
    assert backend.info()["bytes_per_expert"] == 3 * 45 * 2 * 17


def test_memory_and_info_fields_on_cpu():
    backend, _, _ = _run(_trace(steps=5), SPEC)
    mem = backend.memory()
    assert mem["device_pool_bytes"] == backend.n_slots * 3 * 64 * 96 * 4
    assert mem["host_pool_bytes"] == 64 * 3 * 64 * 96 * 4
    assert mem["host_pool_pinned_bytes"] is None  # cpu: nothing pinned
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
    import threading

    from moesim.backends.torch import copies

    gate, real_memcpy = threading.Event(), copies.memcpy
    worker = TorchBackend(device="cpu", copy_worker=True)
    worker.setup(SPEC, 8, Profiler(SPEC.layers))
    worker.begin_step(0, 1)
    copies.memcpy = lambda dst, src: (gate.wait(30), real_memcpy(dst, src))  # the worker's copies wait for us
    try:
        for slot in range(8):
            worker.load((0, slot), slot, True)
        assert worker.inflight_bytes() == 8 * 3 * 64 * 96 * 4  # all eight queued, none done: each expert's bytes
    finally:
        gate.set()
        copies.memcpy = real_memcpy
    worker.compute(0, [((0, s), s, 1) for s in range(8)], [])
    worker.end_step()
    worker.finish()
    assert worker.inflight_bytes() == 0
    assert worker.request_stats()["stall_free_requests"] + worker.request_stats()["late_prefetches"] == 8
