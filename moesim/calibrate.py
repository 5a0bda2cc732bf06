"""Measure this machine into a hardware profile for the sim backend: `python -m moesim calibrate [out=FILE]`.

    python -m moesim calibrate                                    # CUDA if present, else the CPU
    python -m moesim calibrate out=mine.yaml model=gpt-oss-20b scale=0.25   # + that model's experts (mxfp4)
    python -m moesim calibrate model=gpt-oss-20b scale=0.25 experts_format=q4_k     # stored as q4_k instead
    python -m moesim calibrate model=gpt-oss-20b scale=0.25 experts_format=[mxfp4,q4_k]   # both, one profile
    python -m moesim calibrate backend.device=cpu backend.copy_worker=false
    python -m moesim run backend=sim hardware=mine.yaml ...       # the sim, predicting the torch backend
    python -m moesim calibrate disk=/mnt/nvme out=nvme.yaml       # a disk, for run's disk.storage=nvme.yaml

Everything is measured through the torch backend's own code (moesim/backends/torch/: its copies, its packed
experts and their decode, `expert_ffn`, its threads), with the backend config composed as for `run`
(`backend.*` overrides apply), so that the sim predicts that backend on this machine:
  formats     experts are measured as the torch backend stores them: `model=` at `scale=` in the model's own
              format, packed (gpt-oss-20b: mxfp4), or in each format of `experts_format=` (as run's
              model.experts_format); backend.dtype=bf16|fp16|fp32 stores them unpacked in that dtype, as
              it does for a run. Without a model, `dims` in bf16 (or the first of `experts_format`).
  copies      host->device copies of expert-sized blocks of bytes (uint8, as the backend's pools), rotating
              over more memory than the caches hold:
              CUDA: on a copy stream, each timed by events, from pinned and from pageable memory; cpu: host
              memory into the device-pool block, a memcpy as the backend issues it (with the copy worker:
              from issue to the waiting thread's wake-up), pinned = pageable. Blocks in random order. The
              points go into copy_table (the sim interpolates them); a least-squares fit of
              time = latency + bytes / bandwidth (relative errors) gives copy_latency_us and h2d_*_gbps.
  expert FFN  one expert as the backend computes it from a slot: its packed bytes decoded by the backend's
              ExpertCodec into a workspace of the compute dtype (a view where the format is that dtype),
              then SwiGLU over 1, 2, 4, ... tokens (until one call takes `stop_ms`), for the model's sizes
              and `dims` in each format, on the device and on the host -> ffn_table, keyed by the packed
              bytes (spec.bytes_per_expert: the key the sim looks up). The table has no format column: two
              sizes of equal bytes (q4_0 and q4_k of one shape) would share a key; a model's size that
              collides is refused, a `dims` size is dropped (and said).
  host        host_mem_gbps: memory read bandwidth, STREAM-like: the best of 5 sums of one fp32 buffer of
              4x the last-level cache (STREAM's rule for its arrays; at most an eighth of the host's memory),
              with the thread count the replay's host work uses (`backend.threads` on cpu, torch's own on
              CUDA). host_gflops: the best of 5 square GEMMs (torch.mm) in the compute dtype, the size
              doubled from 256 until one call takes 10 ms.
  rates       a fit of the 1-token FFN times against bytes gives memory bandwidth and the fixed cost per
              expert (device_mem_gbps + kernel_overhead_us, host_overhead_us; decode included for packed
              formats); the best flop rate at the largest token count gives device_tflops. vram_gib: the
              GPU's memory (cpu: MemTotal).
  replay      device=cpu only, where the replay's host work and the compute share one thread: a short
              replay as a torch run makes it (the compiled core's decisions played on the torch backend),
              its experts in the first format measured, gives the replay's own time per layer,
              per expert and per load (layer/expert/load_overhead_us), and, from its layers' compute
              times against the loads before them, the copies' write-back cost (writeback_us_per_mib);
              `replay=false` skips.
The profile records the formats, dtype, threads and copy mode it was measured with in `source`: the sim's
predictions hold for torch runs with the same settings. It records in `conditions` what the machine was doing
meanwhile: the 1-minute load average before and after, the CPUs, other processes' CPU use (Linux /proc/stat),
and the spread (std/mean) of each repeated copy and FFN measurement, its median and worst. A busy machine
preempts some calls and not others, so the spread rises with the error of the means the profile keeps (2-core
VM: quiet 6-13%; two busy loops beside it 56-89%, means 55-179% slow). `judge_conditions`: a median spread
over 20% or other work over half the CPUs is a warning, over 40% a refusal (nothing written; `force=true`
writes it, marked forced). A torch run compares its own copy and FFN times with its profile's
(moesim/backends/torch/drift.py) and says so when they differ by over 10%. `check=TRACE` then replays that trace on both
backends (in each format of `experts_format`) and prints the sim's errors (the comparison is
moesim/fidelity.py's).
"""
from __future__ import annotations

import datetime
import math
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .backends.torch import (TORCH_DTYPES, CopyWorker, ExpertCodec, device_name, expert_ffn, fill_experts,
                             host_memory_total, memcpy, resolve_device, resolve_threads, routed_ffn, scale_spec,
                             shared_format, stored_spec, weights_dtype)
from .errors import MoesimError
from .fidelity import check_trace, compare_backends, comparison_table
from .formats import get_format
from .hardware import HardwareProfile, save_hardware
from .models import ModelSpec, model_spec, with_formats

MiB = 2**20
CPU_DIMS = (256, 512, 1024, 2048)  # hidden = ffn of the expert sizes measured by default (bf16: 0.4-25 MB)
CUDA_DIMS = (512, 1024, 2048, 4096, 8192)  # bf16: 1.6-403 MB per expert
TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
ROTATE_BYTES = {"cpu": 128 * MiB, "cuda": 512 * MiB}  # memory a measurement rotates over: past the caches
HOST_REPEATS = 5  # host read and GEMM: the best of this many calls (STREAM reports the best of its trials)


@dataclass
class Measurements:
    """What calibrate measured, before it becomes a profile (kept for printing and for tests)."""

    device: str
    device_name: str
    dtype: str  # the compute dtype the experts are decoded to (bf16 | fp16 | fp32)
    threads: int
    copies: str  # the torch backend's copy mode: stream | worker | sync
    formats: list = field(default_factory=list)  # the experts' storage formats, in order (the first: the replay's)
    copy_points: dict = field(default_factory=dict)  # "pinned"/"pageable" -> [(bytes, ms)]
    copy_fit: dict = field(default_factory=dict)  # "pinned"/"pageable" -> (latency ms, GB/s)
    ffn_points: list = field(default_factory=list)  # [{"where", "tokens", "expert_bytes", "ms"}]
    ffn_sizes: dict = field(default_factory=dict)  # expert_bytes -> (format, hidden, ffn) of each size measured
    dropped: list = field(default_factory=list)  # `dims` sizes left out: their bytes were another size's key
    skipped: list = field(default_factory=list)  # what the time limit left out
    overheads: dict = field(default_factory=dict)  # device=cpu: the replay's own time (measure_replay_overhead)
    writeback_us_per_mib: float = 0.0  # device=cpu: measure_replay_overhead
    host_mem_gbps: float = 0.0  # host memory read bandwidth (measure_host_memory)
    host_mem_bytes: int = 0  # the buffer it read
    host_gflops: float = 0.0  # host GEMM rate in the compute dtype (measure_host_gemm)
    host_gemm_n: int = 0  # the GEMM's size: n x n times n x n
    seconds: float = 0.0
    spreads: list = field(default_factory=list)  # [(label, relative spread, mean ms)] of each copy and FFN point
    conditions: dict = field(default_factory=dict)  # the profile's `conditions` (see `conditions`)


# ---------------------------------------------------------------------------------------------- fits
def fit_latency_rate(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares of ms = latency + bytes * slope over (bytes, ms) points, each residual relative to its ms
    (small and large sizes count alike); latency clamped at >= 0. Returns (latency ms, bytes per ms)."""
    x = np.array([p[0] for p in points], dtype=np.float64)
    t = np.array([p[1] for p in points], dtype=np.float64)
    if len(x) == 0 or not (t > 0).all():
        raise ValueError(f"need positive times to fit, got {points}")
    w = 1.0 / t
    if len(set(x.tolist())) >= 2:
        A = np.stack([w, w * x], axis=1)
        (a, b), *_ = np.linalg.lstsq(A, np.ones_like(t), rcond=None)
    else:
        a, b = -1.0, 0.0
    if a < 0 or b <= 0:  # no usable intercept: through the origin
        a = 0.0
        b = float(np.sum(w * w * t * x) / np.sum(w * w * x * x))
    return float(a), float(1.0 / b)


# -------------------------------------------------------------------------------------------- timing
def _mean_ms(samples: list[float]) -> float:
    """The mean, not the median: a replay's latency is a sum of many such operations, and a sum follows
    their means (on a busy machine, preemptions make a short operation's median far below its mean)."""
    return float(np.mean(samples))


def _rotation(n_bytes_each: int, device: torch.device) -> int:
    """How many blocks of `n_bytes_each` bytes cover ROTATE_BYTES: at least 2, at most 256."""
    return max(2, min(256, math.ceil(ROTATE_BYTES[device.type] / max(1, n_bytes_each))))


def _blocks(n_bytes_each: int, device: torch.device, pinned: bool) -> torch.Tensor:
    """uint8 [n, n_bytes_each] blocks to copy, as the backend's pools hold experts; n from _rotation. A constant
    fill: a copy's speed does not depend on the data, and a memset is much faster to fill."""
    n = _rotation(n_bytes_each, device)
    return torch.empty((n, n_bytes_each), dtype=torch.uint8, device=device, pin_memory=pinned).fill_(1)


def _experts(codec: ExpertCodec, device: torch.device, seed: int) -> torch.Tensor:
    """uint8 [n, codec.nbytes]: random experts valid for their format, made as the backend makes its pools
    (fill_experts, its bound: a GPU's matmul speed depends on the data); n from _rotation."""
    pool = torch.empty((_rotation(codec.nbytes, device), codec.nbytes), dtype=torch.uint8, device=device)
    fill_experts([pool], codec, seed, 1.0 / math.sqrt(max(codec.hidden, codec.ffn)))
    return pool


@dataclass(frozen=True)
class Sampling:
    """How often an operation is repeated: at least `min_n` times and `min_ms` in all, at most `max_n`."""

    min_n: int = 10
    min_ms: float = 60.0
    max_n: int = 400


def relative_spread(times) -> float:
    """The spread of one operation's repeated times: their coefficient of variation (standard deviation / mean).
    A machine shared with other work preempts some calls and not others, and the mean (what the profile keeps)
    moves with the spread (see `judge_conditions`)."""
    t = np.asarray(times, dtype=np.float64)
    return float(t.std() / t.mean()) if len(t) > 1 and t.mean() > 0 else 0.0


def _sample(run_one, sampling: Sampling, spreads: list | None = None, label: str = "") -> float:
    """Mean ms of `run_one(i)` (which returns one call's ms) after one warm-up call, under `sampling`;
    `spreads`: gets (label, relative_spread of the times, mean ms)."""
    run_one(0)
    times: list[float] = []
    total, i = 0.0, 1
    while len(times) < sampling.max_n and (len(times) < sampling.min_n or total < sampling.min_ms):
        ms = run_one(i)
        times.append(ms)
        total += ms
        i += 1
    if spreads is not None:
        spreads.append((label, relative_spread(times), _mean_ms(times)))
    return _mean_ms(times)


def _cuda_sample(issue_one, sampling: Sampling, stream=None, spreads: list | None = None, label: str = "") -> float:
    """Like _sample for CUDA work: `issue_one(i)` queues one call; each is timed by events around it, calls
    queued back to back as the backend queues them (so launch gaps count where the host is the bottleneck)."""
    issue_one(0)
    n = max(sampling.min_n, 1)
    total, times = 0.0, []
    while len(times) < sampling.max_n and (not times or total < sampling.min_ms):
        evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for i, (e0, e1) in enumerate(evs):
            e0.record(stream)
            issue_one(len(times) + i + 1)
            e1.record(stream)
        evs[-1][1].synchronize()
        batch = [e0.elapsed_time(e1) for e0, e1 in evs]
        times += batch
        total += sum(batch)
    if spreads is not None:
        spreads.append((label, relative_spread(times), _mean_ms(times)))
    return _mean_ms(times)


def measure_copies(device: torch.device, sizes: list[int], pinned: bool, mode: str,
                   sampling: Sampling = Sampling(), experts: dict | None = None,
                   spreads: list | None = None) -> list[tuple[int, float]]:
    """Mean ms of one host->device copy of each size in `sizes` (bytes), as the torch backend in `mode`
    ("stream" | "worker" | "sync") issues it, rotating source and destination blocks of bytes. cpu: between two
    timed copies, untimed, one expert of `experts` ({bytes: ExpertCodec}) of that size computed as the backend
    computes a slot (the layer a replay computes between its copies), or for other sizes a read of another
    block. A packed expert's decode leaves its temporaries dirty in the caches, and the copy after it pays
    for their write-back: 14-24% longer than after a read (mxfp4, q4_k at 220-311 KB on the 2-core VM); a
    bf16 FFN only reads, and back-to-back copies also wait for each other's write-backs (~5% slower).
    `spreads`: gets (label, relative spread, mean ms) of each size's repeated copies."""
    out = []
    worker = CopyWorker() if mode == "worker" else None
    try:
        for size in sizes:
            src = _blocks(size, torch.device("cpu"), pinned and device.type == "cuda")
            dst = _blocks(size, device, False)
            # (source, destination) views in a random order, as a replay picks experts and slots; made before
            # timing: the backend indexes its pools outside its copy spans too
            pairs = _random_pairs(src, dst, sampling.max_n + 1)
            label = f"copy {'pinned' if pinned else 'pageable'} {size:,} B"
            between = None
            if device.type == "cpu" and experts and size in experts:
                between = SlotFFN(experts[size], torch.device("cpu"), 1, sampling.max_n + 1)
            elif device.type == "cpu":
                reads = _blocks(size, torch.device("cpu"), False)

                def between(i, reads=reads):
                    reads[i % reads.shape[0]].sum()  # uint8: summed as int64, every byte read
            if mode == "stream":
                stream = torch.cuda.Stream(device)

                def issue(i):
                    s_, d_ = pairs[i % len(pairs)]
                    with torch.cuda.stream(stream):
                        d_.copy_(s_, non_blocking=True)

                ms = _cuda_sample(issue, sampling, stream, spreads, label)
            else:
                def one(i):
                    s_, d_ = pairs[i % len(pairs)]
                    between(i)
                    t0 = time.perf_counter()
                    if worker is not None:  # from issue until the waiting thread runs again
                        worker.wait(worker.submit(d_, s_))
                    else:
                        memcpy(d_, s_)
                    return (time.perf_counter() - t0) * 1e3

                ms = _sample(one, sampling, spreads, label)
            out.append((size, ms))
    finally:
        if worker is not None:
            worker.close()
    return out


def _random_pairs(src: torch.Tensor, dst: torch.Tensor, n: int, seed: int = 5) -> list:
    """n (src row, dst row) views, rows drawn at random (fixed seed)."""
    rng = np.random.default_rng(seed)
    return [(src[int(a)], dst[int(b)]) for a, b in zip(rng.integers(0, src.shape[0], n),
                                                       rng.integers(0, dst.shape[0], n))]


class SlotFFN:
    """Random experts of `codec` (the backend's ExpertCodec: format, size, compute dtype) in `device` memory,
    computed as the torch backend computes a slot (moesim/backends/torch/__init__.py _device_experts): the
    expert's bytes decoded into a workspace (a view where the format is the compute dtype), then one token's
    row (`expert_ffn`), or n rows gathered from a batch of up to 2 x `tokens`, weighted and scattered back
    (`routed_ffn`). Call i computes expert order[i], the experts in no memory order (`calls` of them)."""

    def __init__(self, codec: ExpertCodec, device: torch.device, tokens: int, calls: int):
        self.codec = codec
        self.blocks = _experts(codec, device, 13)
        self.ws = None if codec.view_only else torch.empty(codec.width, dtype=codec.dtype, device=device)
        gen = torch.Generator(device=device).manual_seed(17)
        shape = (2 * tokens, codec.hidden)  # the batch an expert's tokens are gathered from
        self.x = torch.empty(shape, dtype=codec.dtype, device=device).uniform_(-1, 1, generator=gen)
        self.out = torch.zeros(shape, dtype=codec.dtype, device=device)
        self.order = np.random.default_rng(3).integers(0, self.blocks.shape[0], calls).tolist()

    def __call__(self, i: int, rows: torch.Tensor | None = None, gates: torch.Tensor | None = None) -> None:
        """Compute expert order[i] over one token (rows None), or over `rows` of the batch with `gates`."""
        self.compute(self.order[i % len(self.order)], rows, gates)

    def compute(self, e: int, rows: torch.Tensor | None = None, gates: torch.Tensor | None = None) -> None:
        c = self.codec
        block = c.decode(self.blocks[e], self.ws)
        if rows is None:
            expert_ffn(block, self.x[:1], self.out[:1], c.hidden, c.ffn, 0.25)
        else:
            routed_ffn(block, self.x, self.out, c.hidden, c.ffn, rows, gates)

    def warm_up(self, most_ms: float) -> None:
        """Compute each expert once, in memory order, for at most `most_ms`: in a replay every slot has been
        computed before, and the first calls over fresh experts run slower (mxfp4 360 x 360 after calibrate's
        host memory read: 2-6% over the first 50 calls on the 2-core VM), which a short sample of one token
        would be all of."""
        t0 = time.perf_counter()
        for e in range(self.blocks.shape[0]):
            self.compute(e)
            if self.blocks.is_cuda:
                torch.cuda.synchronize(self.blocks.device)
            if (time.perf_counter() - t0) * 1e3 >= most_ms:
                break


def measure_ffn(device: torch.device, codec: ExpertCodec, tokens: tuple[int, ...], stop_ms: float,
                sampling: Sampling = Sampling(), deadline: float | None = None,
                spreads: list | None = None) -> list[tuple[int, float]]:
    """Mean ms of one expert over n tokens for n in `tokens`, ascending, as the torch backend computes a slot:
    `codec.decode` of the expert's packed bytes into a workspace of the compute dtype (a view where the format
    is that dtype), then `expert_ffn` / `routed_ffn` (codec: the backend's ExpertCodec of the expert's format,
    size and compute dtype); rotating over experts in `device` memory. Stops after the first n whose call
    takes `stop_ms` or more, or at `deadline` (time.perf_counter). `spreads`: gets (label, relative spread, mean
    ms) of each token count's repeated calls."""
    slot_ffn = SlotFFN(codec, device, max(tokens), sampling.max_n + 1)
    slot_ffn.warm_up(sampling.min_ms)
    points = []
    for n in sorted(tokens):
        rows = gates = None  # one token: its row
        if n > 1:  # n tokens' rows, drawn from a batch twice as large (fixed seed), and their gate weights
            rows = torch.from_numpy(np.sort(np.random.default_rng(n).permutation(2 * n)[:n])).to(device)
            gates = torch.full((n, 1), 0.25, dtype=codec.dtype, device=device)
        label = f"ffn {device.type} {codec.fmt.name} {codec.hidden}x{codec.ffn} {n} tok"
        if device.type == "cuda":
            ms = _cuda_sample(lambda i, r=rows, g=gates: slot_ffn(i, r, g), sampling, None, spreads, label)
        else:
            def one(i, r=rows, g=gates):
                t0 = time.perf_counter()  # the slot and activation views are made inside, as the backend does
                slot_ffn(i, r, g)
                return (time.perf_counter() - t0) * 1e3

            ms = _sample(one, sampling, spreads, label)
        points.append((n, ms))
        if ms >= stop_ms or (deadline is not None and time.perf_counter() > deadline):
            break
    return points


def last_level_cache_bytes(caches: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int | None:
    """Bytes of the largest CPU cache (Linux sysfs: `caches`/index*/size), None where none can be read."""
    sizes = []
    for size in caches.glob("index*/size"):
        text = size.read_text().strip()  # e.g. "491520K"
        unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text[:-1] if text[-1:] in "KMG" else text
        if digits.isdigit():
            sizes.append(int(digits) * unit)
    return max(sizes) if sizes else None


def host_read_bytes() -> int:
    """The buffer measure_host_memory reads by default: 4x the last-level cache (STREAM's rule: each array at
    least 4x the caches), 1 GiB where that is unknown; at least 64 MiB, at most an eighth of host memory."""
    llc = last_level_cache_bytes()
    want = 4 * llc if llc else 2**30
    return int(max(64 * MiB, min(want, host_memory_total() // 8)))


def measure_host_memory(nbytes: int, repeats: int = HOST_REPEATS) -> float:
    """Host memory read bandwidth in GB/s: the best of `repeats` sums of one fp32 buffer of `nbytes` bytes (each
    sum streams it once, as a host expert streams its weights), on torch's current threads (the replay's)."""
    buf = torch.empty(max(1, nbytes // 4), dtype=torch.float32).fill_(1.0)  # written: pages are real, not zero
    buf.sum()  # warm-up
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return buf.numel() * 4 / best / 1e9


def measure_host_gemm(dtype: torch.dtype, repeats: int = HOST_REPEATS, min_ms: float = 10.0,
                      largest: int = 4096) -> tuple[float, int]:
    """Host dense GEMM rate in GFLOP/s and its size n: the best of `repeats` n x n by n x n torch.mm in `dtype`
    (2 n^3 flops), n doubled from 256 until one call takes `min_ms` (at most `largest`), on torch's threads."""
    gen = torch.Generator().manual_seed(29)
    n = 256
    while True:
        a, b = (torch.empty((n, n), dtype=dtype).uniform_(-1, 1, generator=gen) for _ in range(2))
        torch.mm(a, b)  # warm-up
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
        if best * 1e3 >= min_ms or n >= largest:
            return 2.0 * n**3 / best / 1e9, n
        n *= 2


def measure_replay_overhead(options: dict, fmt: str, hidden: int, ffn: int, step_ms: float) -> dict:
    """device=cpu: the replay's own host time outside copies and FFNs (moesim/engine.py's play of the compiled
    core's decisions, as a torch run replays, and the torch backend's bookkeeping), from a short replay: per
    step, latency - compute - stall = a * layers computed + b * experts computed + c * loads, least squares
    (a coefficient that comes out negative is dropped). Synthetic batch-1 routing over 8 layers x 32 experts,
    1-4 experts per token and layer (so that layers and experts vary apart), 25% budget, experts of `hidden` x
    `ffn` stored in format `fmt` (packed: each computed expert decoded from its slot, as in a run; `options`
    are the TorchBackend's); `step_ms`: a guess of one step's time, to replay about 3 s. Also the copies'
    write-back cost: per layer, compute time = c + d * experts + e * loads (least squares); e per MiB copied
    (of the stored, packed bytes) is writeback_us_per_mib. Returns
    {"layer_overhead_us", "expert_overhead_us", "load_overhead_us", "writeback_us_per_mib"}."""
    from .api import replay_parts  # as a run replays: the compiled core decides, the torch backend executes
    from .backends.torch import TorchBackend
    from .trace import from_arrays
    from strategies.lru import LRU

    L, E, K = 8, 32, 4
    steps = int(min(120, max(30, 3000.0 / max(step_ms, 1e-3))))
    spec = stored_spec(ModelSpec("calibrate-replay", L, E, K, hidden, ffn, dtype=fmt,
                                 bits_per_weight=get_format(fmt).bits), options.get("dtype", "auto"))
    rng = np.random.default_rng(23)
    popularity = rng.dirichlet(np.full(E, 0.3), size=L)  # skewed per layer: hits and misses both occur
    experts = np.stack([np.stack([rng.choice(E, K, replace=False, p=popularity[layer]) for layer in range(L)])
                        for _ in range(steps)])  # [steps, L, K]
    experts[np.arange(K)[None, None, :] >= rng.integers(1, K + 1, (steps, L, 1))] = -1  # 1..K experts
    trace = from_arrays(spec, experts, np.where(experts >= 0, 1.0 / K, 0.0))
    profiler = replay_parts(trace, spec, L * E // 4, "per_layer", LRU, None, None, TorchBackend(**options)).profiler
    st, cp, cm = profiler.arrays()
    rows, y = [], []
    c0 = m0 = 0
    for s in range(len(st)):
        c1, m1 = int(st[s, 4]), int(st[s, 5])
        latency = st[s, 3] - st[s, 2]
        y.append(latency - float(np.sum(cm[m0:m1, 2] - cm[m0:m1, 1])) - float(np.sum(cm[m0:m1, 3])))
        step_experts = int(np.count_nonzero(experts[s] >= 0))
        rows.append((m1 - m0, step_experts, c1 - c0))
        c0, m0 = c1, m1
    us = _nonnegative_fit(np.array(rows[1:], dtype=np.float64), np.array(y[1:])) * 1e3  # step 0: warm-up
    # per layer: its compute span against its experts and the loads just before it (sync: copies end before)
    starts = np.concatenate([[-np.inf], cm[:-1, 2]])
    loads = np.searchsorted(cp[:, 4], cm[:, 1], side="right") - np.searchsorted(cp[:, 4], starts, side="right")
    n_experts = np.count_nonzero(experts >= 0, axis=2).ravel()  # [steps * L], as the compute events run
    per_layer = np.stack([np.ones(len(cm)), n_experts, loads], axis=1)[L:]
    writeback = _nonnegative_fit(per_layer, (cm[:, 2] - cm[:, 1])[L:], keep_first=True)[2] * 1e3  # us per load
    return {"layer_overhead_us": float(us[0]), "expert_overhead_us": float(us[1]), "load_overhead_us": float(us[2]),
            "writeback_us_per_mib": float(writeback / (spec.bytes_per_expert / MiB))}


def _nonnegative_fit(A: np.ndarray, y: np.ndarray, keep_first: bool = False) -> np.ndarray:
    """Least squares y ~ A @ coef with coef >= 0: the most negative coefficient is dropped (0) and the rest
    refitted, until none is negative; `keep_first`: column 0 (an intercept) may stay negative."""
    keep = list(range(A.shape[1]))
    coef = np.zeros(A.shape[1])
    while keep:
        sol, *_ = np.linalg.lstsq(A[:, keep], y, rcond=None)
        free = 1 if keep_first and keep[0] == 0 else 0  # leading entries exempt from the sign check
        if (sol[free:] >= 0).all():
            coef[keep] = sol
            break
        keep.pop(int(np.argmin(sol[free:])) + free)
    return coef


# ------------------------------------------------------------------------------------------ conditions
# Measured on the 2-core VM (docs/fidelity.md, "Stale profiles"): the median std/mean of the repeated measurements
# of model=gpt-oss-20b scale=0.125 (points of 0.2 ms or more): quiet 6.1-9.5% (mxfp4, 5 runs) and 10.9-12.7%
# (bf16, 3 runs); one busy loop beside it 7.4-24% (3 runs; FFN means +18% in the 24% one); two busy loops 56-89%
# (5 runs; means +55% to +179%, a torch run's copies and FFNs 2x faster than such a profile said). Warn above
# every quiet run, refuse below every run beside two busy loops.
SPREAD_WARN = 0.20  # median relative spread of the repeated measurements above which calibrate warns
SPREAD_REFUSE = 0.40  # ... and above which it refuses to write the profile (force=true writes it anyway)
SPREAD_MIN_MS = 0.2  # points judged: those whose call takes this long on average (quiet, calls under 0.1 ms spread
#                     16-72% whatever the load: a few us of timer, interrupts and cache misses are much of them;
#                     calls over 0.5 ms 3-13%)
LOAD_WARN = 0.5  # other work, as a fraction of the CPUs, above which calibrate warns (quiet: 0.0-0.7 of 2 CPUs
#                  busy with other work, one busy loop beside it 1.0-1.3, two 1.3: they share the CPUs with it)


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def busy_seconds() -> tuple[float, float, float] | None:
    """(wall s, CPU s all processes were busy, CPU s of this process) now, to difference later (other_cpus);
    None where /proc/stat cannot be read (not Linux). Busy: user, nice, system, irq, softirq and steal (a VM's
    host running something else) jiffies of /proc/stat's cpu line."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
        hz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    own = os.times()
    return time.time(), (user + nice + system + irq + softirq + steal) / hz, own.user + own.system


def other_cpus(before, after) -> float | None:
    """CPUs' worth of work by other processes (and a VM's host) between two busy_seconds() readings."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    return max(0.0, ((after[1] - before[1]) - (after[2] - before[2])) / (after[0] - before[0]))


def conditions(spreads: list, load_before: float, load_after: float, cpus: int | None = None,
               other: float | None = None) -> dict:
    """The profile's `conditions` of a measurement: when, the 1-minute load average before and after, the CPUs,
    other processes' CPU use meanwhile (`other`: other_cpus), and the median and largest relative spread of the
    repeated measurements (`spreads`: [(label, spread, mean ms)]) whose calls took SPREAD_MIN_MS or more."""
    c = {"measured_at": datetime.datetime.now().isoformat(timespec="seconds"), "cpus": cpus or cpu_count(),
         "load_before": round(float(load_before), 2), "load_after": round(float(load_after), 2),
         "spread_points": 0}
    if other is not None:
        c["other_cpus"] = round(float(other), 3)
    judged = [x for x in spreads if x[2] >= SPREAD_MIN_MS]
    if judged:
        values = [x[1] for x in judged]
        worst = max(judged, key=lambda x: x[1])
        c["spread_points"] = len(judged)
        c |= {"spread_median": round(float(np.median(values)), 4), "spread_worst": round(float(worst[1]), 4),
              "spread_worst_at": worst[0]}
    return c


def conditions_line(c: dict) -> str:
    """`conditions` in one line, for the terminal."""
    parts = [f"load average {c.get('load_before', 0):.2f} before, {c.get('load_after', 0):.2f} after, "
             f"{c.get('cpus', '?')} CPUs" + (f", {c['other_cpus']:.2f} of them busy with other work meanwhile"
                                             if "other_cpus" in c else "")]
    if "spread_median" in c:
        parts.append(f"spread of repeated measurements (std/mean) {c['spread_median'] * 100:.1f}% median, "
                     f"{c['spread_worst'] * 100:.1f}% worst ({c['spread_worst_at']}), over {c['spread_points']} "
                     f"points of {SPREAD_MIN_MS:g} ms or more")
    else:
        parts.append(f"spread not judged: no measured call took {SPREAD_MIN_MS:g} ms")
    return "; ".join(parts)


def judge_conditions(c: dict, threads: int = 1) -> tuple[list[str], str | None]:
    """(warnings, refusal) of `conditions` c: a warning where the median spread exceeds SPREAD_WARN or other
    work exceeds LOAD_WARN of the CPUs (other_cpus; without it, the larger of the load average before and the
    one after less calibrate's own `threads`: the 1-minute average lags a short calibrate); a refusal (None:
    none) where the median spread exceeds SPREAD_REFUSE."""
    warnings, refusal = [], None
    spread = c.get("spread_median")
    if spread is not None and spread > SPREAD_REFUSE:
        refusal = (f"calibrate: the repeated measurements spread {spread * 100:.0f}% (median std/mean; refused "
                   f"above {SPREAD_REFUSE * 100:.0f}%): the machine is busy, and the profile would predict that "
                   f"load, not this machine")
    elif spread is not None and spread > SPREAD_WARN:
        warnings.append(f"calibrate: warning: the repeated measurements spread {spread * 100:.0f}% (median "
                        f"std/mean; warned above {SPREAD_WARN * 100:.0f}%): the machine may be busy, and its "
                        f"times may be too slow")
    cpus = c.get("cpus") or cpu_count()
    if "other_cpus" in c:
        other, what = c["other_cpus"], "CPUs busy with other processes"
    else:
        other, what = max(c.get("load_before", 0.0), c.get("load_after", 0.0) - threads), "load average"
    if other > LOAD_WARN * cpus:
        warnings.append(f"calibrate: warning: other work loaded the machine while it measured ({other:.2f} {what}; "
                        f"warned above {LOAD_WARN:g} x {cpus} CPUs): its times may be too slow")
    return warnings, refusal


# ------------------------------------------------------------------------------------------- calibrate
def _formats(experts_format) -> list:
    """The formats of option `experts_format` (a name or a list of names), checked; [None] (the model's own)
    when unset."""
    if experts_format in (None, "", "null"):
        return [None]
    names = [experts_format] if isinstance(experts_format, str) else list(experts_format)
    return list(dict.fromkeys(get_format(str(n), "calibrate experts_format").name for n in names)) or [None]


def expert_sizes(model, scale: float, experts_format, dtype: str, dims) -> list[tuple[str, int, int, str, str]]:
    """The experts calibrate measures, in order, as (storage format, hidden, ffn, compute dtype, what): per
    format of `experts_format` (None: the model's own), the routed expert of `model` at `scale` as the torch
    backend stores it under backend.dtype=`dtype` (stored_spec: packed in its format, or unpacked in a forced
    dtype) and its shared expert where it has one (shared_format, decoded to the routed experts' dtype, as
    the backend does); then `dims` ((hidden, ffn) pairs) in each of those formats (without a model: in bf16,
    or each format of `experts_format`). what: "routed" | "shared" | "dims"."""
    spec = None
    if model not in (None, "", "null"):
        spec = scale_spec(model_spec(model if isinstance(model, str) else dict(model)), float(scale))
    model_sizes, formats = [], []
    for f in _formats(experts_format):
        if spec is not None:
            s = stored_spec(with_formats(spec, experts=f), dtype)
            compute = weights_dtype(s.dtype, dtype)
            model_sizes.append((s.dtype, s.hidden, s.ffn, compute, "routed"))
            if s.shared_experts:
                model_sizes.append((shared_format(s), s.hidden, s.shared_ffn or s.ffn, compute, "shared"))
            formats.append(s.dtype)
        else:
            name = f or "bf16"
            s = stored_spec(ModelSpec("calibrate", 1, 1, 1, 1, 1, dtype=name, bits_per_weight=get_format(name).bits),
                            dtype)
            formats.append(s.dtype)
    formats = list(dict.fromkeys(formats))
    return model_sizes + [(f, h, ffn, weights_dtype(f, dtype), "dims") for f in formats for h, ffn in dims]


def measure(device="auto", dtype="auto", threads=1, copy_worker: bool = False, pinned: bool = True,
            model=None, scale: float = 1.0, dims=None, tokens=TOKENS, stop_ms: float | None = None,
            max_s: float = 100.0, host: bool = True, sampling: Sampling = Sampling(), replay: bool = True,
            host_mem_bytes: int | None = None, experts_format=None, log=print) -> Measurements:
    """Measure copies and expert FFNs (see the module docstring). `model`/`scale`: that model's experts as the
    torch backend stores them, in its own format or in each of `experts_format` (a name or a list), measured
    first and always; `dims`: (hidden, ffn) pairs or ints (hidden = ffn) of further sizes for the FFN table, in
    the same formats, default by device. Each expert is keyed by its packed bytes; a model's size whose bytes
    another size already has is refused (the table has no format column), a `dims` one dropped. `max_s`:
    `dims` sizes (but the first size measured) still unmeasured then are skipped (and listed). `replay`
    (device=cpu): also measure the replay's own overheads and the copies' write-back cost, with experts in the
    first format. `host_mem_bytes`: the buffer of the host memory read, default host_read_bytes()."""
    started = time.perf_counter()
    load_before, busy_before = os.getloadavg()[0], busy_seconds()
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    if dims is None:
        dims = CUDA_DIMS if cuda else CPU_DIMS
    pairs = list(dict.fromkeys((int(d[0]), int(d[1])) if isinstance(d, (tuple, list)) else (int(d), int(d))
                               for d in dims))
    for h, f in pairs:
        if h < 1 or f < 1:
            raise MoesimError(f"calibrate: expert dims must be >= 1, got hidden={h}, ffn={f}")
    sizes = expert_sizes(model, scale, experts_format, dtype, pairs)
    if not sizes:
        raise MoesimError("calibrate: no expert size to measure: give model= (with scale=) or dims=")
    computes = sorted({c for _, _, _, c, _ in sizes})
    if len(computes) > 1:
        raise MoesimError(f"calibrate: the formats {', '.join(dict.fromkeys(s[0] for s in sizes))} compute in "
                          f"different dtypes ({', '.join(computes)}), and a profile holds one: calibrate them into "
                          f"separate profiles")
    dname = computes[0]
    tdtype = TORCH_DTYPES[dname]
    mode = "stream" if cuda else ("worker" if copy_worker else "sync")
    n_threads = resolve_threads(threads, dev, bool(copy_worker))
    threads_before = torch.get_num_threads()
    if n_threads is not None:
        torch.set_num_threads(n_threads)
    if cuda:
        torch.cuda.set_device(dev)
    if stop_ms is None:
        stop_ms = 20.0 if not cuda else 5.0
    m = Measurements(str(dev), device_name(dev), dname, torch.get_num_threads(), mode)
    m.formats = list(dict.fromkeys(fmt for fmt, _, _, _, what in sizes if what != "shared"))
    # the backend's codec of each size; the table's key is the packed bytes, one size per key
    codecs, seen = [], {}
    for fmt, h, f, _, what in sizes:
        c = ExpertCodec(fmt, h, f, tdtype)
        other = seen.get(c.nbytes)
        if other is not None:
            if (other[0].fmt.name, other[0].hidden, other[0].ffn) == (c.fmt.name, h, f):
                continue  # the same expert again
            name = f"{fmt} {h}x{f} ({what})"
            first = f"{other[0].fmt.name} {other[0].hidden}x{other[0].ffn} ({other[1]})"
            if what != "dims":
                raise MoesimError(f"calibrate: {name} and {first} both pack into {c.nbytes} bytes per expert, and the "
                                  f"profile's ffn_table is keyed by bytes alone: calibrate them into separate profiles "
                                  f"(one experts_format each)")
            m.dropped.append(f"{name}: {c.nbytes} bytes, as {first}")
            continue
        seen[c.nbytes] = (c, what)
        codecs.append((c, what))
    deadline = started + max_s
    try:
        # copies: small blocks for the fixed cost, then the experts' packed sizes
        copy_sizes = sorted({64 * 1024, 256 * 1024} | {c.nbytes for c, _ in codecs})
        copy_sizes = [s for s in copy_sizes if s <= (2048 if cuda else 256) * MiB]
        log(f"calibrate: {m.device_name}, experts {', '.join(m.formats)} computed in {dname}, {m.threads} threads, "
            f"copies: {mode}")
        for d in m.dropped:
            log(f"  dropped {d} (the ffn_table is keyed by bytes)")
        kinds = ("pinned", "pageable") if cuda else ("pinned",)
        for kind in kinds:
            pts = measure_copies(dev, copy_sizes, kind == "pinned", mode, sampling,
                                 {c.nbytes: c for c, _ in codecs}, m.spreads)
            m.copy_points[kind] = pts
            m.copy_fit[kind] = fit_latency_rate(pts)
        if not cuda:  # no pinned memory without CUDA: both are the same memcpy
            m.copy_points["pageable"], m.copy_fit["pageable"] = m.copy_points["pinned"], m.copy_fit["pinned"]
        for kind in ("pinned", "pageable"):
            lat, rate = m.copy_fit[kind]
            log(f"  copies {kind:8s}: {lat * 1e3:7.1f} us + bytes / {rate / 1e6:6.2f} GB/s   "
                + "  ".join(f"{b / MiB:.2f}MiB:{t:.3f}ms" for b, t in m.copy_points[kind]))
        # the host: memory read bandwidth and GEMM rate, with the threads set above
        m.host_mem_bytes = int(host_mem_bytes or host_read_bytes())
        m.host_mem_gbps = measure_host_memory(m.host_mem_bytes)
        m.host_gflops, m.host_gemm_n = measure_host_gemm(tdtype)
        log(f"  host memory: {m.host_mem_gbps:.2f} GB/s read ({m.host_mem_bytes / MiB:.0f} MiB, {m.threads} "
            f"threads); GEMM {m.host_gflops:.1f} GFLOP/s ({dname}, {m.host_gemm_n}^3)")
        # expert FFNs: the model's sizes (always), then the dims sizes while time is left
        wheres = [("device", dev)] + ([("host", torch.device("cpu"))] if host and cuda else [])
        for i, (c, what) in enumerate(codecs):
            always = i == 0 or what != "dims"
            name = f"{c.fmt.name} {c.hidden}x{c.ffn}"
            for where, d in wheres:
                if not always and time.perf_counter() > deadline:
                    m.skipped.append(f"{where} ffn {name}")
                    continue
                pts = measure_ffn(d, c, tuple(tokens), stop_ms, sampling, None if always else deadline, m.spreads)
                m.ffn_sizes[c.nbytes] = (c.fmt.name, c.hidden, c.ffn)
                m.ffn_points += [{"where": where, "tokens": n, "expert_bytes": c.nbytes, "ms": ms} for n, ms in pts]
                if not cuda and host:  # device=cpu: the host is the same CPU and the same code
                    m.ffn_points += [{"where": "host", "tokens": n, "expert_bytes": c.nbytes, "ms": ms}
                                     for n, ms in pts]
                log(f"  ffn {where:6s} {name} ({c.nbytes:,} B{'' if c.view_only else ', decoded to ' + dname}): "
                    + "  ".join(f"{n}:{ms:.3f}" for n, ms in pts) + "  (tokens:ms)")
        if replay and not cuda:
            c = codecs[0][0]  # the first size measured, in the first format
            h, f = _replay_dims(c.hidden, c.ffn, c.nbytes)
            small = ExpertCodec(c.fmt.name, h, f, tdtype)
            one = next(p["ms"] for p in m.ffn_points if p["where"] == "device" and p["tokens"] == 1
                       and p["expert_bytes"] == c.nbytes)
            options = {"device": str(dev), "dtype": dtype, "threads": threads, "copy_worker": bool(copy_worker),
                       "pinned": pinned}
            m.overheads = measure_replay_overhead(options, c.fmt.name, h, f, 8 * 3 * one * small.nbytes / c.nbytes)
            m.writeback_us_per_mib = m.overheads.pop("writeback_us_per_mib")
            log(f"  replay overheads ({c.fmt.name} {h}x{f}): {m.overheads['layer_overhead_us']:.1f} us per layer + "
                f"{m.overheads['expert_overhead_us']:.1f} us per expert + {m.overheads['load_overhead_us']:.1f} us "
                f"per load; copies' write-back: {m.writeback_us_per_mib:.1f} us of compute per MiB copied")
        if m.skipped:
            log(f"  time limit max_s={max_s:g} reached: skipped {', '.join(m.skipped)}")
    finally:
        torch.set_num_threads(threads_before)
    m.seconds = time.perf_counter() - started
    m.conditions = conditions(m.spreads, load_before, os.getloadavg()[0], other=other_cpus(busy_before,
                                                                                            busy_seconds()))
    log(f"  conditions: {conditions_line(m.conditions)}")
    return m


def _replay_dims(hidden: int, ffn: int, nbytes: int, most: int = 2 * MiB) -> tuple[int, int]:
    """(hidden, ffn) of an expert of `nbytes` bytes shrunk alike so that it has at most about `most` bytes: the
    replay overheads do not depend on the expert's size, and their short replay holds 8 x 32 experts."""
    f = min(1.0, math.sqrt(most / nbytes))
    return max(1, int(hidden * f)), max(1, int(ffn * f))


def _rates(points: list[dict], where: str, hidden_of: dict) -> tuple[float, float, float]:
    """(memory GB/s, fixed us per expert, GFLOP/s) of `where` from its FFN points (hidden_of: bytes -> hidden
    * ffn of the expert; a packed expert's bytes are fewer than its weights')."""
    mine = [p for p in points if p["where"] == where]
    one = [(p["expert_bytes"], p["ms"]) for p in mine if p["tokens"] == 1]
    overhead_ms, bytes_per_ms = fit_latency_rate(one)
    best = 0.0
    for nbytes in {p["expert_bytes"] for p in mine}:
        pts = [p for p in mine if p["expert_bytes"] == nbytes]
        top = max(pts, key=lambda p: p["tokens"])
        flops = 6.0 * hidden_of[nbytes] * top["tokens"]  # 2 * 3 * hidden * ffn * tokens
        best = max(best, flops / (top["ms"] * 1e6))  # GFLOP/s
    return bytes_per_ms / 1e6, overhead_ms * 1e3, best


def _ffn_rates(m: Measurements) -> dict:
    """{where: (memory GB/s, fixed us per expert, GFLOP/s)} from the FFN points (host: the device's without
    host points)."""
    hf_of = {b: h * f for b, (_, h, f) in m.ffn_sizes.items()}  # hidden * ffn
    rates = {"device": _rates(m.ffn_points, "device", hf_of)}
    have_host = any(p["where"] == "host" for p in m.ffn_points)
    rates["host"] = _rates(m.ffn_points, "host", hf_of) if have_host else rates["device"]
    return rates


def to_profile(m: Measurements, name: str | None = None) -> HardwareProfile:
    """The HardwareProfile of measurements `m` (its `source` says how it was measured). host_mem_gbps and
    host_gflops are the host's own read and GEMM measurements; host_overhead_us the host FFN fit's."""
    rates = _ffn_rates(m)
    dev_gbps, dev_us, dev_gflops = rates["device"]
    host_us = rates["host"][1]
    cuda = m.device.startswith("cuda")
    if cuda:
        vram = torch.cuda.get_device_properties(torch.device(m.device)).total_memory / 2**30
    else:
        vram = host_memory_total() / 2**30
    lat_pinned, rate_pinned = m.copy_fit["pinned"]
    _, rate_pageable = m.copy_fit["pageable"]
    label = name or ("calibrated-" + "-".join(m.device_name.lower().replace("(", "").replace(")", "").split()))
    note = "" if cuda else ("; device=cpu: the 'device' is a block of host memory, host->device is a memcpy "
                            "(pinned = pageable), host FFN rows repeat the device ones (same CPU, same code)")
    source = (f"python -m moesim calibrate on {socket.gethostname()}, {datetime.date.today().isoformat()}: "
              f"{m.device_name}, torch {torch.__version__}, experts {'/'.join(m.formats)} computed in {m.dtype} "
              f"(ffn_table keyed by their packed bytes), {m.threads} threads, "
              f"copies {m.copies}; host memory read over {m.host_mem_bytes / MiB:.0f} MiB, GEMM {m.host_gemm_n}^3"
              f"{note}" + (f"; skipped (time limit): {', '.join(m.skipped)}" if m.skipped else ""))
    return HardwareProfile(
        name=label,
        h2d_pinned_gbps=round(rate_pinned / 1e6, 4), h2d_pageable_gbps=round(rate_pageable / 1e6, 4),
        copy_latency_us=round(lat_pinned * 1e3, 3),
        device_mem_gbps=round(dev_gbps, 4), device_tflops=round(dev_gflops / 1e3, 6),
        host_mem_gbps=round(m.host_mem_gbps, 4), host_gflops=round(m.host_gflops, 4),
        vram_gib=round(vram, 3),
        kernel_overhead_us=round(dev_us, 3), host_overhead_us=round(host_us, 3),
        source=source,
        ffn_table=[dict(p, ms=round(p["ms"], 6)) for p in m.ffn_points],
        copy_table=[{"pinned": kind == "pinned", "bytes": int(b), "ms": round(ms, 6)}
                    for kind in ("pinned", "pageable") for b, ms in m.copy_points[kind]],
        **{k: round(v, 3) for k, v in m.overheads.items()},
        writeback_us_per_mib=round(m.writeback_us_per_mib, 3),
        serial_copies=m.copies == "sync",
        conditions=dict(m.conditions),
    )


def calibrate(**options) -> HardwareProfile:
    """measure(**options) as a HardwareProfile (`name` option: the profile's name)."""
    name = options.pop("name", None)
    return to_profile(measure(**options), name)


def calibrate_command(cfg) -> None:
    """`python -m moesim calibrate [out=FILE] [model=NAME scale=S] [experts_format=F] [check=TRACE] ...`:
    measure, print, write the profile (YAML, atomically); with `check=`, replay that trace's first
    `check_tokens` tokens on the torch backend and on the sim with the new profile, in each format measured,
    and print the errors."""
    from hydra.utils import instantiate

    if cfg.get("disk"):  # the disk, not the GPU: a storage profile for disk.storage=FILE (moesim/disk.py)
        from .disk import measure_storage, save_storage

        storage, points = measure_storage(str(cfg.disk), log=lambda s: print(s, file=sys.stderr))
        out = Path(cfg.out) if cfg.out else Path("reports/hardware") / "disk.yaml"
        save_storage(storage, out)
        print(f"disk {cfg.disk}: {storage.read_gbps} GB/s, {storage.latency_us} us per read "
              f"({', '.join(f'{b:,} B: {ms:.3f} ms' for b, ms in points)})")
        print(f"storage profile: {out}  (use: python -m moesim run disk.storage={out} disk.ram=... ...)")
        return
    b = cfg.backend
    dims = None if cfg.dims in (None, "auto") else list(cfg.dims)
    model, trace = cfg.model, None
    if cfg.check:
        trace = check_trace(str(cfg.check), int(cfg.check_tokens))  # read before measuring: a bad name fails fast
        if model is None:
            model = trace.spec.to_dict()
    try:
        m = measure(device=b.device, dtype=b.dtype, threads=b.threads, copy_worker=bool(b.copy_worker),
                    pinned=bool(b.pinned), model=model, scale=float(cfg.scale), dims=dims,
                    tokens=tuple(int(t) for t in cfg.tokens), stop_ms=cfg.stop_ms, max_s=float(cfg.max_s),
                    replay=bool(cfg.get("replay", True)), experts_format=cfg.get("experts_format"),
                    log=lambda s: print(s, file=sys.stderr))
    except torch.cuda.OutOfMemoryError as e:
        raise MoesimError(f"calibrate: out of device memory ({e}); use smaller dims=") from None
    warnings, refusal = judge_conditions(m.conditions, m.threads)
    if refusal and not cfg.get("force", False):
        raise MoesimError(f"{refusal}; nothing written: re-run when it is quiet, or force=true to write it anyway")
    if refusal:  # force=true: written, and the profile says so
        warnings.append(f"{refusal}; written anyway (force=true), marked forced in its conditions")
        m.conditions["forced"] = True
    for w in warnings:
        print(w, file=sys.stderr)
    if warnings:
        m.conditions["warnings"] = warnings
    profile = to_profile(m, cfg.name)
    out = Path(cfg.out) if cfg.out else Path("reports/hardware") / f"{profile.name}.yaml"
    save_hardware(profile, out)
    print(profile_table(profile, m))
    print(f"profile: {out}  (use: python -m moesim run hardware={out} ...)")
    if trace is not None:
        from omegaconf import OmegaConf

        options = {k: v for k, v in OmegaConf.to_container(b, resolve=True).items() if k != "_target_"}
        strat = cfg.strategy
        for fmt in _formats(cfg.get("experts_format")):  # each format measured, as a run stores it
            r = compare_backends(trace, profile, lambda: instantiate(strat.cache), cfg.budget, cfg.scope,
                                 float(cfg.scale), options, experts_format=fmt)
            print(f"\ncheck: {trace.describe()} at scale {cfg.scale:g}, experts {r['spec']['dtype']} "
                  f"({r['real']['info']['bytes_per_expert']:,} B), strategy {strat.name}, budget {cfg.budget} "
                  f"= {r['slots']} slots, {cfg.scope}")
            print(comparison_table(r))


def profile_table(p: HardwareProfile, m: Measurements) -> str:
    host_ffn = _ffn_rates(m)["host"]
    rows = [
        ("device", f"{m.device_name} ({m.device}), {m.threads} threads, copies {m.copies}"),
        ("experts", f"{', '.join(m.formats)}, computed in {m.dtype}"),
        ("host->device pinned", f"{p.h2d_pinned_gbps:.2f} GB/s + {p.copy_latency_us:.1f} us per copy"),
        ("host->device pageable", f"{p.h2d_pageable_gbps:.2f} GB/s"),
        ("device expert FFN", f"{p.device_mem_gbps:.2f} GB/s weights read (1 token), {p.device_tflops * 1e3:.1f} "
                              f"GFLOP/s best, {p.kernel_overhead_us:.1f} us fixed"),
        ("host memory", f"{p.host_mem_gbps:.2f} GB/s read ({m.host_mem_bytes / MiB:.0f} MiB), GEMM "
                        f"{p.host_gflops:.1f} GFLOP/s ({m.dtype}, {m.host_gemm_n}^3)"),
        ("host expert FFN", f"{host_ffn[0]:.2f} GB/s weights read (1 token), {host_ffn[2]:.1f} GFLOP/s best, "
                            f"{p.host_overhead_us:.1f} us fixed"),
        ("memory", f"{p.vram_gib:.1f} GiB"),
        ("ffn table", f"{len(p.ffn_table)} points, expert sizes "
                      + ", ".join(f"{fmt} {h}x{f} {b:,} B" for b, (fmt, h, f) in m.ffn_sizes.items())),
        ("replay overheads", f"{p.layer_overhead_us:.1f} us per layer + {p.expert_overhead_us:.1f} us per expert + "
                             f"{p.load_overhead_us:.1f} us per load; write-back {p.writeback_us_per_mib:.1f} us/MiB"),
        ("took", f"{m.seconds:.1f} s"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)
