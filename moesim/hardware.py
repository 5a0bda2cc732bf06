"""Hardware profiles: the numbers the `sim` backend and the offload policies ask for times.

    python -m moesim run hardware=h200 ...            # a preset below
    python -m moesim run hardware=path/to/mine.yaml   # a profile `calibrate` measured, or one you wrote

A profile holds achieved rates (not theoretical ones): host->device copy bandwidth (pinned and pageable),
the fixed cost of one copy, device memory bandwidth and bf16 tensor throughput, host memory bandwidth and
GEMM rate, VRAM, and the fixed cost of one expert FFN on each side. Two cost functions answer everything:

    copy_ms(nbytes)               = copy_latency + nbytes / h2d bandwidth
    expert_ms(n_tokens, spec)     = max(bytes / mem_bw, flops / flop_rate) + overhead     (a roofline)
        bytes = spec.bytes_per_expert          the weights, read once whatever the number of tokens
        flops = 2 * 3 * hidden * ffn * n_tokens    gate, up and down matmuls, 2 flops per multiply-add

When the profile has an `ffn_table` (expert FFN times `calibrate` measured), expert_ms interpolates it
instead of the roofline (see `_table_ms`); with a `copy_table`, copy_ms interpolates the measured copies
between their sizes. Profiles `calibrate` writes on device=cpu also carry the replay's own host time
(`replay_overhead_ms`: per layer, per expert, per load) and the copies' write-back cost (`writeback_ms`),
which the sim adds serially; they are 0 in the presets (on a GPU the host queues work ahead of the device). Activations, attention and dense layers are not modelled: the
model spec has no numbers for them.

Presets live in this file, not in moesim/conf/hardware/: a directory of YAML files there would be a
Hydra config group, and Hydra then rejects the plain override `hardware=t4` ("Could not override
'hardware'. No match in the defaults list") unless every command lists hardware in its defaults.

How the preset numbers were made (each number's source is in a comment beside it):
  - h2d_pinned_gbps: 80% of the link's theoretical rate per direction (a rule; well-behaved pinned copies
    reach 75-85%). PCIe 3.0/4.0/5.0 x16 = 8/16/32 GT/s x 16 lanes x 128/130 / 8 = 15.75/31.5/63.0 GB/s.
  - h2d_pageable_gbps: half the pinned rate (a rule: pageable copies go through a pinned staging buffer
    with an extra CPU memcpy).
  - device_mem_gbps, device_tflops: 80% of the datasheet's memory bandwidth and dense bf16 tensor rate
    (a rule; on one H200 an 8192^3 bf16 matmul through PyTorch ran at 788 TFLOP/s = 80% of 989, and a
    device-to-device copy moved 4.3 TB/s = 90% of 4.8).
  - copy_latency_us = 10: assumed fixed cost of one cudaMemcpyAsync (commonly 5-10 us).
  - kernel_overhead_us = 6: assumed; an expert FFN is ~3 kernels (gate/up, activation, down) with ~2 us of
    fixed device time each.
  - host side (host_mem_gbps, host_gflops): each preset names a documented machine that holds its GPU (its
    `source` says which; the numbers and their sources are in the comments of `Host` and the hosts below):
      h200, h100-pcie  NVIDIA DGX H200 / DGX H100: 2x Intel Xeon Platinum 8480C, 32 DDR5 DIMMs
      a100-pcie        Gigabyte G482-Z54 (NVIDIA's MLPerf A100-PCIe system): 2x AMD EPYC 7742, DDR4-3200
      t4               Supermicro 4029GP-TRT-OTO-28 (NVIDIA's MLPerf T4 system): 2x Intel Xeon Platinum 8280
      rtx-4090         a desktop: Intel Core i9-13900K, dual-channel DDR5-5600 (moesim's choice of CPU)
      rtx-3060-12gb    a desktop: Intel Core i5-12400, dual-channel DDR5-4800 (moesim's choice of CPU)
    Peak memory bandwidth = channels x MT/s x 8 bytes (a 64-bit channel), at the rate the channels run in
    that configuration; GEMM peak = cores x base clock x flop per cycle per core (bf16 weights: AMX tiles
    where the CPU has them, else fp32 FMA vectors). Then two fractions, both moesim's assumptions (no STREAM
    or GEMM measurement of these configurations was found): 70% of peak bandwidth achieved by a read
    (STREAM-like), 50% of peak flops in a GEMM.
    One socket, not both: host experts are plain torch CPU ops with no NUMA placement, and Linux's default
    policy puts an anonymous page on the node of the CPU that first touches it (docs.kernel.org
    admin-guide/mm/numa_memory_policy.html: "local allocation"; set_mempolicy(2): "for anonymous memory this
    is when the page is first touched"), so the host copies of the experts sit in the memory of the socket that
    wrote them; threads on the other socket read them over the socket link and add no memory channels. Under
    `numactl --interleave=all` both sockets' channels serve, up to twice the figure: calibrate such a run.
    host_overhead_us = 30: assumed, three torch CPU ops at ~10 us of dispatch each.
  `calibrate` measures all of these on the machine at hand and writes a YAML file this module reads.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MoesimError
from .files import atomic_write_text

WHERE = ("device", "host")

def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _positive_ms(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and math.isfinite(v)


# the keys of a measured point: (check, what it must be)
_FFN_POINT_FIELDS = {"where": (lambda v: v in WHERE, "'device' or 'host'"),
                     "tokens": (_positive_int, "a positive integer"),
                     "expert_bytes": (_positive_int, "a positive integer"),
                     "ms": (_positive_ms, "a positive number")}
_COPY_POINT_FIELDS = {"pinned": (lambda v: isinstance(v, bool), "true or false"),
                      "bytes": (_positive_int, "a positive integer"),
                      "ms": (_positive_ms, "a positive number")}


@dataclass(frozen=True)
class HardwareProfile:
    """Achieved rates of one GPU + host. Units: GB/s = 1e9 bytes/s; TFLOP/s = 1e12; GFLOP/s = 1e9."""

    name: str
    h2d_pinned_gbps: float  # host->device copy from pinned memory, achieved
    h2d_pageable_gbps: float  # host->device copy from pageable memory, achieved
    copy_latency_us: float  # fixed cost of one copy
    device_mem_gbps: float  # device memory read bandwidth
    device_tflops: float  # dense bf16 tensor throughput usable by expert GEMMs
    host_mem_gbps: float  # host memory read bandwidth
    host_gflops: float  # host dense GEMM rate
    vram_gib: float  # device memory
    kernel_overhead_us: float  # fixed device time per expert FFN
    host_overhead_us: float  # fixed host time per expert FFN
    source: str = ""  # where the numbers come from (datasheet + rules, or `calibrate` on host X)
    # measured expert FFN times: [{"where": "device"|"host", "tokens": int, "expert_bytes": int, "ms": float}]
    ffn_table: list = field(default_factory=list)
    # measured copy times: [{"pinned": bool, "bytes": int, "ms": float}]; copy_ms interpolates them
    copy_table: list = field(default_factory=list)
    # The replay's own host time, outside copies and FFNs (engine lookups, the policy, the backend's
    # bookkeeping), added serially to each layer. `calibrate` measures it on device=cpu, where the compute
    # waits for it; on a GPU the host queues work ahead of the device, so presets and CUDA profiles use 0.
    layer_overhead_us: float = 0.0  # per layer computed
    expert_overhead_us: float = 0.0  # per expert computed in it
    load_overhead_us: float = 0.0  # per expert loaded for it
    # device=cpu: the bytes a copy writes leave the caches (written back to memory) during the next layer's
    # FFNs and slow them; extra compute in us per MiB copied since the previous layer (GPUs: 0)
    writeback_us_per_mib: float = 0.0
    # device=cpu with inline copies: a copy holds the thread that computes, so copies never overlap compute
    # (prefetches included); the sim then runs them on the compute timeline
    serial_copies: bool = False
    # what the machine was doing while `calibrate` measured (CONDITION_FIELDS: load average before and after,
    # CPUs, the spread of repeated measurements); empty for presets and profiles written before it existed
    conditions: dict = field(default_factory=dict)

    def __post_init__(self):
        # per `where`: {expert_bytes: (tokens ascending, ms)}, built once; the profile is immutable
        object.__setattr__(self, "_ffn_index", _index_table(self.ffn_table))
        copies: dict[bool, dict[int, float]] = {True: {}, False: {}}  # pinned -> {bytes: ms}
        for p in self.copy_table:
            copies[bool(p["pinned"])].setdefault(int(p["bytes"]), float(p["ms"]))
        object.__setattr__(self, "_copy_index", {k: sorted(v.items()) for k, v in copies.items()})

    # ---------------------------------------------------------------------------------------- costs
    def copy_ms(self, nbytes: int, pinned: bool = True) -> float:
        """Time of one host->device copy of `nbytes` bytes: fixed latency + bytes / bandwidth; between two
        sizes of the profile's copy_table, linear between their measured times instead (a fitted line misses
        single sizes by 10-15% on a CPU, where caches and page sizes bend it)."""
        points = self._copy_index[bool(pinned)]
        for (b0, t0), (b1, t1) in zip(points, points[1:]):
            if b0 <= nbytes <= b1:
                return t0 + (t1 - t0) * (nbytes - b0) / (b1 - b0)
        if len(points) == 1 and points[0][0] == nbytes:
            return points[0][1]
        gbps = self.h2d_pinned_gbps if pinned else self.h2d_pageable_gbps
        return self.copy_latency_us * 1e-3 + nbytes / (gbps * 1e6)  # GB/s * 1e6 = bytes per ms

    def replay_overhead_ms(self, n_experts: int, n_loads: int) -> float:
        """The replay's own host time for one layer computing `n_experts` experts after `n_loads` loads."""
        return (self.layer_overhead_us + self.expert_overhead_us * n_experts + self.load_overhead_us * n_loads) * 1e-3

    def writeback_ms(self, nbytes: int) -> float:
        """Extra compute time of the layer after copies of `nbytes` bytes in all (device=cpu profiles)."""
        return self.writeback_us_per_mib * nbytes / 2**20 * 1e-3

    def expert_ms(self, n_tokens: int, spec, where: str = "device", shared: bool = False) -> float:
        """Time of one expert FFN over `n_tokens` tokens on `where` ("device" | "host"); `shared`: a shared
        expert (bytes_per_shared_expert, shared_ffn). 0 for no tokens. Roofline unless an ffn_table covers
        `where`: max(bytes / mem_bw, 2*3*hidden*ffn*n_tokens / flop_rate) + fixed overhead."""
        if n_tokens <= 0:
            return 0.0
        nbytes = spec.bytes_per_shared_expert if shared else spec.bytes_per_expert
        table = self._ffn_index.get(where)
        if table:
            return _table_ms(table, n_tokens, nbytes)
        ffn = (spec.shared_ffn or spec.ffn) if shared else spec.ffn
        flops = 6.0 * spec.hidden * ffn * n_tokens
        if where == "device":
            mem, rate, overhead_us = self.device_mem_gbps * 1e6, self.device_tflops * 1e9, self.kernel_overhead_us
        elif where == "host":
            mem, rate, overhead_us = self.host_mem_gbps * 1e6, self.host_gflops * 1e6, self.host_overhead_us
        else:
            raise ValueError(f"where: expected 'device' or 'host', got {where!r}")
        return max(nbytes / mem, flops / rate) + overhead_us * 1e-3  # bytes / (bytes/ms), flop / (flop/ms)

    def activations_ms(self, n_tokens: int, spec) -> float:
        """Round trip of a layer's activations for host experts: n_tokens x hidden bf16 values go to the host
        and the experts' summed output comes back; two copies at the pinned rate."""
        return 2 * self.copy_ms(n_tokens * spec.hidden * 2)

    # ----------------------------------------------------------------------------------------- I/O
    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @property
    def vram_bytes(self) -> int:
        return int(self.vram_gib * 2**30)


class Cost:
    """What an OffloadPolicy's `on_miss(key, n_tokens, cost)` may ask: times under one hardware profile."""

    def __init__(self, hardware: HardwareProfile, spec, pinned: bool = True):
        self.hardware, self.spec, self.pinned = hardware, spec, pinned
        self._fetch_ms = hardware.copy_ms(spec.bytes_per_expert, pinned)
        self._memo: dict[tuple[str, int], float] = {}

    def fetch_ms(self, key) -> float:
        """Copying `key`'s weights to the device (every routed expert has the same size)."""
        return self._fetch_ms

    def device_ms(self, key, n_tokens: int) -> float:
        """Computing `key` on the device over `n_tokens` tokens, once its weights are there."""
        m = self._memo.get(("device", n_tokens))
        if m is None:
            m = self._memo[("device", n_tokens)] = self.hardware.expert_ms(n_tokens, self.spec, "device")
        return m

    def host_ms(self, key, n_tokens: int) -> float:
        """Computing `key` on the host over `n_tokens` tokens, including the activations' round trip (as if it
        were the layer's only host expert; the sim backend pays the round trip once per layer)."""
        m = self._memo.get(("host", n_tokens))
        if m is None:
            m = self._memo[("host", n_tokens)] = (self.hardware.expert_ms(n_tokens, self.spec, "host")
                                                  + self.hardware.activations_ms(n_tokens, self.spec))
        return m


# ----------------------------------------------------------------------------------------- ffn table
def _index_table(points: list) -> dict:
    index: dict[str, dict[int, tuple[list, list]]] = {}
    for p in sorted(points, key=lambda p: (p["where"], p["expert_bytes"], p["tokens"])):
        tok, ms = index.setdefault(p["where"], {}).setdefault(int(p["expert_bytes"]), ([], []))
        if tok and tok[-1] == p["tokens"]:
            continue  # a repeated measurement: the first one counts
        tok.append(int(p["tokens"]))
        ms.append(float(p["ms"]))
    return index


def _tokens_ms(tok: list, ms: list, n: int) -> float:
    """Piecewise linear in tokens; below the first point: the first point's time (the weight-read floor);
    beyond the last: the last segment's slope (from the origin when there is one point)."""
    if n <= tok[0]:
        return ms[0]
    if n >= tok[-1]:
        if len(tok) == 1:
            return ms[0] * n / tok[0]
        slope = max(0.0, (ms[-1] - ms[-2]) / (tok[-1] - tok[-2]))
        return ms[-1] + slope * (n - tok[-1])
    i = next(j for j in range(1, len(tok)) if tok[j] >= n)
    f = (n - tok[i - 1]) / (tok[i] - tok[i - 1])
    return ms[i - 1] + f * (ms[i] - ms[i - 1])


def _table_ms(table: dict, n_tokens: int, nbytes: int) -> float:
    """Measured expert time at (n_tokens, nbytes): interpolate tokens within each measured expert size,
    then linearly between the two sizes around `nbytes`; outside the measured sizes, scale the nearest
    size's time by bytes (weight reads dominate small-token FFNs)."""
    sizes = sorted(table)
    if nbytes in table:
        return _tokens_ms(*table[nbytes], n_tokens)
    below = [s for s in sizes if s < nbytes]
    above = [s for s in sizes if s > nbytes]
    if below and above:
        lo, hi = below[-1], above[0]
        f = (nbytes - lo) / (hi - lo)
        return (1 - f) * _tokens_ms(*table[lo], n_tokens) + f * _tokens_ms(*table[hi], n_tokens)
    near = below[-1] if below else above[0]
    return _tokens_ms(*table[near], n_tokens) * nbytes / near


# --------------------------------------------------------------------------------------------- presets
def _pcie_gbps(gen: int) -> float:
    """Theoretical x16 rate per direction in GB/s: GT/s x 16 lanes x 128/130 encoding / 8 bits."""
    return {3: 8, 4: 16, 5: 32}[gen] * 16 * 128 / 130 / 8


LINK_EFFICIENCY = 0.8  # achieved pinned copy rate / theoretical link rate (rule, see module docstring)
DEVICE_EFFICIENCY = 0.8  # achieved / datasheet for device memory bandwidth and tensor rate (rule)
HOST_MEM_EFFICIENCY = 0.7  # achieved read bandwidth / peak (moesim's assumption, see module docstring)
HOST_GEMM_EFFICIENCY = 0.5  # achieved GEMM rate / peak (moesim's assumption)
HOST_OVERHEAD_US = 30.0  # fixed host time per expert FFN (assumed: three torch CPU ops at ~10 us each)


@dataclass(frozen=True)
class Host:
    """The CPU side of a preset: the sockets of a named machine whose memory serves host experts (one, unless
    the system places experts on every socket; see the module docstring), from which the profile's host_*
    fields are derived."""

    name: str  # the machine and its CPUs, as its source names them
    cores: tuple  # ((count, base GHz, flop per cycle per core), ...) per core type of one socket
    channels: int  # memory channels of one socket
    mts: int  # MT/s the channels run at in this configuration
    sockets: int = 1  # sockets whose memory and cores serve the host experts
    pcie_gen: int | None = None  # the platform's PCIe generation: a GPU of a later one links at this one

    @property
    def peak_mem_gbps(self) -> float:
        return self.sockets * self.channels * self.mts * 8 / 1e3  # 8 bytes per transfer on a 64-bit channel

    @property
    def peak_gflops(self) -> float:
        return self.sockets * sum(n * ghz * flop for n, ghz, flop in self.cores)

    def profile_fields(self) -> dict:
        return dict(host_mem_gbps=round(self.peak_mem_gbps * HOST_MEM_EFFICIENCY, 1),
                    host_gflops=round(self.peak_gflops * HOST_GEMM_EFFICIENCY, 1),
                    host_overhead_us=HOST_OVERHEAD_US)


# Sources, opened and read: MLPerf Inference system descriptions (github.com/mlcommons/inference_results_v*);
# Intel ark and AMD's processor specifications as scraped into felixsteinke/cpu-spec-dataset@4c08d88
# (dataset/intel-cpus.csv, whose SourceUrl column gives each ark page, ark below = ark.intel.com/content/www/us/
# en/ark/products/<id>; dataset/amd-cpus.csv).
#
# DGX H100 / DGX H200: "Intel(R) Xeon(R) Platinum 8480C", 2 per node, 56 cores each, host memory "32x 64GB
# MTC40F2046S1RC48BA1" (mlcommons/inference_results_v4.1@a2f5d66:closed/NVIDIA/systems/
# DGX-H100_H100-SXM-80GBx8_TRT.json and H200-SXM-141GBx8_TRT.json). The 8480C is not on ark; its listed sibling,
# Xeon Platinum 8480+ (ark 231746): 56 cores, 2.00 GHz base, 8 memory channels, "Up to DDR5 4800 MT/s 1DPC Up to
# DDR5 4400 MT/s 2DPC", 2 AVX-512 FMA units, Intel AMX. 32 DIMMs on 2 x 8 channels = 2 per channel: 4400 MT/s.
# AMX: 1024 bf16 operations per cycle per core (Wikipedia, Advanced Matrix Extensions, read at
# artikel.siakadpt.com/en/Advanced_Matrix_Extensions, citing Intel). torch runs bf16 matmuls on it: on this
# project's 2-core Xeon VM (amx_bf16 in its cpu flags) a 1024^3 bf16 torch.mm ran at 1.2 TFLOP/s on one core,
# fp32 at 0.08. h100-pcie gets this host too: the preset's link is PCIe Gen5, and NVIDIA's own MLPerf H100-PCIe
# system (Gigabyte G482-Z54, 2x EPYC 7742: mlcommons/inference_results_v3.0@dad59af:closed/NVIDIA/systems/
# H100-PCIe-80GBx1_TRT.json) is a PCIe 4.0 platform, which would contradict it.
DGX_H100_HOST = Host("NVIDIA DGX H100/H200: 2x Intel Xeon Platinum 8480C, 32x 64 GB DDR5 (2 per channel, "
                     "4400 MT/s); one socket", cores=((56, 2.0, 1024),), channels=8, mts=4400)
# NVIDIA's MLPerf A100-PCIe-80GB system: "Gigabyte G482-Z54", 2x "AMD EPYC 7742 64-Core Processor", 1 TB, memory
# configuration not listed (mlcommons/inference_results_v2.1@c43f76f:closed/NVIDIA/systems/
# A100-PCIe-80GBx1_TRT.json). EPYC 7742 (AMD): 64 cores, 2.25 GHz base, PCIe 4.0, 8 channels of DDR4 "Up to
# 3200MHz", "Per Socket Mem BW 204.80 GB/s" (= 8 x 3200 x 8). Zen 2 has no AMX or AVX-512; two 256-bit FMA pipes
# = 32 fp32 flop per cycle is moesim's assumption (no opened source states it).
G482_EPYC_7742_HOST = Host("Gigabyte G482-Z54: 2x AMD EPYC 7742, DDR4-3200; one socket",
                           cores=((64, 2.25, 32),), channels=8, mts=3200)
# NVIDIA's MLPerf T4 system: "Supermicro 4029GP-TRT-OTO-28", 2x "Intel(R) Xeon(R) Platinum 8280 CPU @ 2.70GHz",
# 768 GB, memory configuration not listed (mlcommons/inference_results_v0.7@1321d13:closed/NVIDIA/systems/
# T4x1_TRT.json). Xeon Platinum 8280 (ark 192478): 28 cores, 2.70 GHz base, PCIe 3.0, 6 channels of DDR4-2933,
# 2 AVX-512 FMA units = 2 x 16 fp32 lanes x 2 flop = 64 flop per cycle; no AMX.
SUPERMICRO_XEON_8280_HOST = Host("Supermicro 4029GP-TRT-OTO-28: 2x Intel Xeon Platinum 8280, DDR4-2933; "
                                 "one socket", cores=((28, 2.7, 64),), channels=6, mts=2933)
# A desktop for the RTX 4090 (moesim's choice: a CPU of the same season, late 2022). Core i9-13900K (ark 230496):
# 8 P-cores at 3.00 GHz base + 16 E-cores at 2.20 GHz base, 2 channels "Up to DDR5 5600 MT/s", max memory
# bandwidth 89.6 GB/s, AVX2 (no AVX-512, no AMX). P-cores: two 8-wide fp32 FMA per cycle = 32 flop
# (stackoverflow.com/questions/15655835, answer: Intel AVX2+FMA3 cores "32 SP FLOPs/cycle"); E-cores: 16 flop
# per cycle (two 128-bit FMA) is moesim's assumption.
DESKTOP_I9_13900K_HOST = Host("desktop: Intel Core i9-13900K, 2x DDR5-5600",
                              cores=((8, 3.0, 32), (16, 2.2, 16)), channels=2, mts=5600)
# A desktop for the RTX 3060 12GB (moesim's choice: a mid-range CPU of its time). Core i5-12400 (ark 134586):
# 6 P-cores (no E-cores) at 2.50 GHz base, 2 channels "Up to DDR5 4800 MT/s", max memory bandwidth 76.8 GB/s,
# AVX2: 32 fp32 flop per cycle as above.
DESKTOP_I5_12400_HOST = Host("desktop: Intel Core i5-12400, 2x DDR5-4800", cores=((6, 2.5, 32),), channels=2,
                             mts=4800)
# KTransformers' machine (kvcache-ai/ktransformers@62b7b28 doc/en/DeepseekR1_V3_tutorial.md: "Intel (R) Xeon (R) Gold
# 6454S, 32 cores per socket, 2 sockets", "standard DDR5-4800 server DRAM (1 TB), each socket with 8xDDR5-4800").
# Xeon Gold 6454S (ark 231733 via cpu-spec-dataset@4c08d88 intel-cpus.csv): 32 cores, 2.20 GHz base, 8 channels,
# "Up to DDR5 4800 MT/s 1DPC", 2 AVX-512 FMA units, AMX, PCIe 5.0. 8 DIMMs on 8 channels: 1 per channel, 4800 MT/s.
# Its GEMM rate here is AVX-512's, 2 x 16 fp32 lanes x 2 = 64 flop per cycle, not AMX's: the systems measured on it
# (KTransformers V0.2 and llama.cpp) compute experts with llamafile/ggml kernels, and the doc names AMX kernels as
# V0.3's. -2s: both sockets serve, as KTransformers' NUMA build (USE_NUMA=1) copies the experts onto both nodes.
XEON_6454S_HOST = Host("Intel Xeon Gold 6454S, 8x DDR5-4800 (1 per channel); one socket, AVX-512 kernels",
                       cores=((32, 2.2, 64),), channels=8, mts=4800, pcie_gen=5)
XEON_6454S_2S_HOST = dataclasses.replace(XEON_6454S_HOST, sockets=2, name="2x Intel Xeon Gold 6454S, 16x DDR5-4800 "
                                         "(1 per channel); both sockets (experts copied to both NUMA nodes), AVX-512 kernels")
# The RTX 3090 machine of hardware-corner.net/gpt-oss-offloading-moe-layers/ ("an AMD EPYC 7343 CPU, and 64 GB of DDR4
# 3200 MT/s"). EPYC 7343 (cpu-spec-dataset@4c08d88 amd-cpus.csv): 16 cores, 3.2 GHz base, 8 channels of DDR4 "Up to
# 3200MHz", PCIe 4.0, no AVX-512 or AMX; 32 fp32 flop per cycle as for the EPYC 7742 (moesim's assumption). The DIMM
# count is not stated: 4 x 16 GB on 4 channels is moesim's assumption.
EPYC_7343_HOST = Host("AMD EPYC 7343, 64 GB DDR4-3200 (4 channels assumed)", cores=((16, 3.2, 32),), channels=4,
                      mts=3200, pcie_gen=4)


_GPUS: dict[str, tuple] = {}  # preset name -> its _preset arguments after the name (for `gpu+host`)


def _preset(name: str, pcie_gen: int, mem_gbps: float, bf16_tflops: float, vram_gib: float, host: Host,
            note: str) -> HardwareProfile:
    if "+" not in name:  # a GPU preset, not a `gpu+host` combination of one
        _GPUS.setdefault(name, (pcie_gen, mem_gbps, bf16_tflops, vram_gib, host, note))
    if host.pcie_gen and host.pcie_gen < pcie_gen:
        pcie_gen, note = host.pcie_gen, f"{note}; linked at the host's PCIe Gen{host.pcie_gen}"
    pinned = round(_pcie_gbps(pcie_gen) * LINK_EFFICIENCY, 1)
    return HardwareProfile(
        name=name, h2d_pinned_gbps=pinned, h2d_pageable_gbps=round(pinned / 2, 1), copy_latency_us=10.0,
        device_mem_gbps=round(mem_gbps * DEVICE_EFFICIENCY, 1),
        device_tflops=round(bf16_tflops * DEVICE_EFFICIENCY, 1), vram_gib=float(vram_gib),
        kernel_overhead_us=6.0, source=f"preset: {note}; host: {host.name}; rules in moesim/hardware.py",
        **host.profile_fields())


PRESETS: dict[str, HardwareProfile] = {p.name: p for p in [
    # NVIDIA H200 datasheet (SXM): 141 GB HBM3e, 4.8 TB/s, BF16 tensor 1,979 TFLOPS with sparsity = 989.5
    # dense; host link PCIe Gen5 x16 (128 GB/s both directions).
    _preset("h200", 5, 4800, 989.5, 141, DGX_H100_HOST, "NVIDIA H200 SXM datasheet, PCIe Gen5 x16"),
    # NVIDIA H100 datasheet (PCIe): 80 GB HBM2e, 2.0 TB/s, BF16 tensor 1,513 TFLOPS with sparsity = 756.5
    # dense; PCIe Gen5 x16.
    _preset("h100-pcie", 5, 2000, 756.5, 80, DGX_H100_HOST, "NVIDIA H100 PCIe datasheet, PCIe Gen5 x16"),
    # NVIDIA A100 80GB PCIe datasheet: 80 GB HBM2e, 1,935 GB/s, BF16 tensor 312 TFLOPS dense; PCIe Gen4 x16.
    _preset("a100-pcie", 4, 1935, 312, 80, G482_EPYC_7742_HOST, "NVIDIA A100 80GB PCIe datasheet, PCIe Gen4 x16"),
    # NVIDIA Ada GPU architecture whitepaper, RTX 4090: 24 GB GDDR6X, 1,008 GB/s, peak BF16 tensor with FP32
    # accumulate 165.2 TFLOPS dense; PCIe Gen4 x16.
    _preset("rtx-4090", 4, 1008, 165.2, 24, DESKTOP_I9_13900K_HOST, "NVIDIA Ada whitepaper (RTX 4090), PCIe Gen4 x16"),
    # RTX 5090 (spheron.network/blog/nvidia-rtx-5090-specs, its datasheet table): 32 GB GDDR7, 1,792 GB/s, "FP16
    # Tensor Performance (sparse) 838.4 TFLOPS", PCIe Gen 5 x16; Tom's Hardware's review (as reprinted in Linux
    # Format, May 2025) gives the same 1,792 GB/s and 838 FP16. Dense = 419.2. With FP32 accumulate, half that,
    # 209.6: moesim's assumption that GeForce cards run FP32 accumulation at half the FP16 rate (no page opened
    # states it for the RTX 5090). Host: the 4090's desktop (moesim's choice).
    _preset("rtx-5090", 5, 1792, 209.6, 32, DESKTOP_I9_13900K_HOST,
            "RTX 5090 spec (spheron.network datasheet), FP32-accumulate rate assumed half of FP16, PCIe Gen5 x16"),
    # RTX 3060 12GB: 360 GB/s GDDR6 (192-bit, 15 Gbps; NVIDIA spec page). BF16 with FP32 accumulate derived:
    # 112 tensor cores x 1.777 GHz boost x 128 flop/clock (the GA10x GeForce rate with FP32 accumulate that
    # gives the GA102 whitepaper's 71 TFLOPS for the RTX 3090) = 25.5 TFLOPS dense; PCIe Gen4 x16.
    _preset("rtx-3060-12gb", 4, 360, 25.5, 12, DESKTOP_I5_12400_HOST,
            "NVIDIA RTX 3060 spec + GA102 whitepaper rate, PCIe Gen4 x16"),
    # NVIDIA T4 datasheet: 16 GB GDDR6, 320 GB/s, FP16 tensor (mixed precision) 65 TFLOPS; Turing has no
    # bf16, so this is the fp16 rate the experts would run at; PCIe Gen3 x16.
    _preset("t4", 3, 320, 65, 16, SUPERMICRO_XEON_8280_HOST, "NVIDIA T4 datasheet (fp16: no bf16 on Turing), PCIe Gen3 x16"),
    # RTX 4090 D (hmc-tech.com/gpu/nvidia-geforce-rtx-4090-d): 24 GB GDDR6X, 1008 GB/s, BF16 tensor 147.09 TFLOPS
    # dense (= the 4090's 165.2 x 14592/16384 shaders). PCIe generation not found in the pages opened: Gen4 x16 as
    # the RTX 4090 (moesim's assumption). Host: the 4090's desktop (moesim's choice).
    _preset("rtx-4090d", 4, 1008, 147.09, 24, DESKTOP_I9_13900K_HOST, "RTX 4090 D spec (hmc-tech.com), PCIe Gen4 x16 assumed"),
    # RTX 3090: 24 GB GDDR6X, 936 GB/s (Tom's Hardware's table as copied at holynerdvana.blogspot.com/2022/10/);
    # BF16 with FP32 accumulate 71 TFLOPS dense (the GA102 whitepaper figure above); PCIe Gen4 x16 (Ampere
    # generation; the page opened for it is of low quality). Host: the 4090's desktop (moesim's choice).
    _preset("rtx-3090", 4, 936, 71, 24, DESKTOP_I9_13900K_HOST, "RTX 3090 spec + GA102 whitepaper rate, PCIe Gen4 x16"),
    # GPUs of the published measurements in validation/cases/ whose sources name no CPU: each gets a host of its
    # kind (moesim's choice, said in the case files); their rows compute no expert on the host.
    # A100 80GB SXM4: 80 GB HBM2e, 2,039 GB/s (thundercompute.com/blog/nvidia-a100-specs-full-guide), BF16 312
    # TFLOPS dense (glennklockwood.com/garden/processors/A100, citing NVIDIA's A100 datasheet), PCIe Gen4 x16.
    # Host: the EPYC 7742 of DGX A100-class systems (the G482-Z54 above has the same CPUs).
    _preset("a100-sxm-80gb", 4, 2039, 312, 80, G482_EPYC_7742_HOST, "A100 80GB SXM4 specs, PCIe Gen4 x16"),
    # RTX 3080 Mobile 16GB (laptop): GA104, 48 SMs, 16 GB GDDR6 on 256 bits at 14 Gbps = 448 GB/s (wccftech.com,
    # "nvidia-unveils-geforce-rtx-30-mobility-gpus..."; another page says 384: the bus x rate product is taken),
    # PCIe 4.0 x16, boost up to 1710 MHz. BF16 derived as for the RTX 3060: 192 tensor cores (4 per SM) x 1.71 GHz
    # x 128 flop/clock = 42.0 TFLOPS dense (moesim's derivation; the laptop's clock depends on its power limit).
    # Host: the i5-12400 desktop (moesim's choice: a laptop CPU is not stated).
    _preset("rtx-3080-mobile", 4, 448, 42.0, 16, DESKTOP_I5_12400_HOST,
            "RTX 3080 Mobile 16GB specs (wccftech), BF16 derived, PCIe Gen4 x16"),
    # The RTX 3060 desktop of arXiv 2312.17238 ("RTX 3060 (12GB, PCIe Gen.3)"): rtx-3060-12gb on a Gen3 link.
    _preset("rtx-3060-12gb-pcie3", 3, 360, 25.5, 12, DESKTOP_I5_12400_HOST,
            "NVIDIA RTX 3060 spec + GA102 whitepaper rate, PCIe Gen3 x16 (as arXiv 2312.17238 states)"),
    # RTX 6000 Ada: 48 GB GDDR6, 960 GB/s, 142 SMs, boost 2505 MHz, PCIe 4.0 x16 (grafikkarten.com's table of
    # NVIDIA's figures; cputronic.com). Dense BF16 not found: derived from the RTX 4090's 165.2 (128 SMs at
    # 2520 MHz) x 142/128 x 2505/2520 = 182.2 TFLOPS (GeForce's FP32-accumulate rate; the workstation card may
    # double it). Host: the DGX H100's Xeon (moesim's choice).
    _preset("rtx-6000-ada", 4, 960, 182.2, 48, DGX_H100_HOST, "RTX 6000 Ada specs, BF16 derived, PCIe Gen4 x16"),
    # L4: 24 GB GDDR6, 300 GB/s, PCIe 4.0 x16 (store.sourcecode.com), FP16 tensor 242 TFLOPS with sparsity = 121
    # dense (grokipedia.com/page/NVIDIA_L4_vs_L40S). Host: Xeon Platinum 8280 (Fiddler's README: "32-core Intel
    # Cascade Lake"; the 8280 is a 28-core Cascade Lake: moesim's choice).
    _preset("l4", 4, 300, 121, 24, SUPERMICRO_XEON_8280_HOST, "L4 specs, PCIe Gen4 x16"),
    # RTX A6000: 48 GB GDDR6, 768 GB/s, PCI Express 4.0 x16 (servethehome.com spec table), FP16/BF16 tensor 154.8
    # TFLOPS dense (llmperf.net, citing Microway). Host: the DGX H100's Xeon (moesim's choice).
    _preset("rtx-a6000", 4, 768, 154.8, 48, DGX_H100_HOST, "RTX A6000 specs, PCIe Gen4 x16"),
]}


# The hosts by name, for `hardware=<gpu>+<host>`: a GPU preset's device side with another machine's CPU side.
HOSTS: dict[str, Host] = {
    "dgx-h100": DGX_H100_HOST, "g482-epyc-7742": G482_EPYC_7742_HOST, "4029gp-xeon-8280": SUPERMICRO_XEON_8280_HOST,
    "i9-13900k": DESKTOP_I9_13900K_HOST, "i5-12400": DESKTOP_I5_12400_HOST,
    "xeon-6454s": XEON_6454S_HOST, "xeon-6454s-2s": XEON_6454S_2S_HOST, "epyc-7343": EPYC_7343_HOST,
}


def combined(name: str) -> HardwareProfile:
    """The profile `gpu+host` names: GPU preset `gpu` on host `host` of HOSTS (the link at the older of the two
    PCIe generations)."""
    gpu, _, host = name.partition("+")
    if gpu not in _GPUS:
        raise MoesimError(f"hardware={name!r}: unknown GPU preset {gpu!r}; presets: {', '.join(_GPUS)}")
    if host not in HOSTS:
        raise MoesimError(f"hardware={name!r}: unknown host {host!r}; hosts: {', '.join(HOSTS)}")
    gen, mem, tflops, vram, _, note = _GPUS[gpu]
    return _preset(name, gen, mem, tflops, vram, HOSTS[host], note)


# ----------------------------------------------------------------------------------------- load / save
_NUMBER_FIELDS = [f.name for f in dataclasses.fields(HardwareProfile) if f.type == "float"]
_OPTIONAL_FIELDS = [f.name for f in dataclasses.fields(HardwareProfile)  # >= 0; absent = 0 (older profiles)
                    if f.type == "float" and f.default is not dataclasses.MISSING]


def profile_from_dict(d, where: str) -> HardwareProfile:
    """A HardwareProfile from a mapping, every field checked; errors name `where` and the field."""
    if not isinstance(d, dict):
        raise MoesimError(f"{where}: expected a mapping of hardware profile fields, got {type(d).__name__}")
    names = [f.name for f in dataclasses.fields(HardwareProfile)]
    unknown = sorted(set(map(str, d)) - set(names))
    if unknown:
        raise MoesimError(f"{where}: unknown field(s) {unknown}; a hardware profile has {names}")
    missing = [n for n in ["name", *_NUMBER_FIELDS] if n not in d and n not in _OPTIONAL_FIELDS]
    if missing:
        raise MoesimError(f"{where}: missing field(s) {missing}")
    if not isinstance(d["name"], str) or not d["name"]:
        raise MoesimError(f"{where}: field 'name' must be a non-empty string, got {d['name']!r}")
    if not isinstance(d.get("source", ""), str):
        raise MoesimError(f"{where}: field 'source' must be a string, got {d['source']!r}")
    values = {}
    for n in _NUMBER_FIELDS:
        v = d.get(n, 0.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise MoesimError(f"{where}: field {n!r} must be a number, got {v!r}")
        overhead = n.endswith("_us") or n in _OPTIONAL_FIELDS
        if v < 0 or (v == 0 and not overhead):
            raise MoesimError(f"{where}: field {n!r} must be {'>= 0' if overhead else '> 0'}, got {v!r}")
        values[n] = float(v)
    points = _points(d, "ffn_table", _FFN_POINT_FIELDS, where)
    copy_points = _points(d, "copy_table", _COPY_POINT_FIELDS, where)
    serial = d.get("serial_copies", False)
    if not isinstance(serial, bool):
        raise MoesimError(f"{where}: field 'serial_copies' must be true or false, got {serial!r}")
    return HardwareProfile(name=d["name"], source=d.get("source", ""), ffn_table=points, copy_table=copy_points,
                           serial_copies=serial, conditions=_conditions(d, where), **values)


def _nonnegative(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 and math.isfinite(v)


# the keys of a profile's `conditions` (each optional): (check, what it must be); calibrate.py writes them
CONDITION_FIELDS = {
    "measured_at": (lambda v: isinstance(v, str), "a string (ISO date and time)"),
    "cpus": (_positive_int, "a positive integer"),  # CPUs this process could run on
    "load_before": (_nonnegative, "a number >= 0"),  # 1-minute load average when measuring began
    "load_after": (_nonnegative, "a number >= 0"),  # ... and when it ended
    "other_cpus": (_nonnegative, "a number >= 0"),  # CPUs' worth of other processes' work meanwhile (Linux)
    "spread_median": (_nonnegative, "a number >= 0"),  # median over the repeated measurements of their spread
    "spread_worst": (_nonnegative, "a number >= 0"),  # the largest spread
    "spread_worst_at": (lambda v: isinstance(v, str), "a string"),  # which measurement had it
    "spread_points": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
    "warnings": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
    "forced": (lambda v: isinstance(v, bool), "true or false"),  # refused conditions, written with force=true
}


def _conditions(d: dict, where: str) -> dict:
    """The profile's `conditions` mapping (absent or null: {}), each key known and checked."""
    c = d.get("conditions") or {}
    if not isinstance(c, dict):
        raise MoesimError(f"{where}: field 'conditions' must be a mapping of {sorted(CONDITION_FIELDS)}, "
                          f"got {c!r}")
    unknown = sorted(set(map(str, c)) - set(CONDITION_FIELDS))
    if unknown:
        raise MoesimError(f"{where}: unknown key(s) {unknown} in field 'conditions'; it may have "
                          f"{sorted(CONDITION_FIELDS)}")
    for k, v in c.items():
        ok, expected = CONDITION_FIELDS[k]
        if not ok(v):
            raise MoesimError(f"{where}: field 'conditions.{k}' must be {expected}, got {v!r}")
    return {k: float(v) if k in ("load_before", "load_after", "other_cpus", "spread_median", "spread_worst") else v
            for k, v in c.items()}


def _points(d: dict, name: str, fields: dict, where: str) -> list[dict]:
    """The measured points of table `name` in `d` (absent or null: none), each a mapping with exactly the
    keys of `fields` (key -> (check, what it must be)); times become floats."""
    table = d.get(name, []) or []
    if not isinstance(table, list):
        raise MoesimError(f"{where}: field {name!r} must be a list of points, got {type(table).__name__}")
    points = []
    for i, p in enumerate(table):
        at = f"{where}: field '{name}[{i}]"
        if not isinstance(p, dict) or set(p) != set(fields):
            raise MoesimError(f"{at}' must be a mapping with exactly {sorted(fields)}, got {p!r}")
        for k, (ok, expected) in fields.items():
            if not ok(p[k]):
                raise MoesimError(f"{at}.{k}' must be {expected}, got {p[k]!r}")
        points.append({k: float(p[k]) if k == "ms" else p[k] for k in fields})
    return points


def host_memory_available() -> int | None:
    """Bytes of host memory available to a new allocation (MemAvailable of /proc/meminfo), None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts kB (KiB)
    except (OSError, ValueError, IndexError):
        pass
    return None


def load_hardware(value) -> HardwareProfile:
    """A preset name (h200, h100-pcie, ...), `gpu+host` (a preset's GPU on a host of HOSTS), a path to a YAML
    profile, a mapping of fields, or a profile."""
    if isinstance(value, HardwareProfile):
        return value
    if isinstance(value, dict) or (hasattr(value, "items") and not isinstance(value, (str, os.PathLike))):
        return profile_from_dict(_plain(value), "hardware")
    text = str(value)
    if text in PRESETS:
        return PRESETS[text]
    path = Path(text)
    if "+" in text and not path.is_file():
        return combined(text)
    if not path.is_file():
        if path.suffix in (".yaml", ".yml") or os.sep in text:
            raise MoesimError(f"hardware: no such file {text!r}")
        raise MoesimError(f"hardware: unknown preset {text!r}; presets: {', '.join(PRESETS)}; "
                          f"or give the path of a YAML profile")
    from .files import read_yaml

    try:
        data = read_yaml(path)
    except ValueError as e:
        raise MoesimError(f"{path}: not a YAML hardware profile: {e}") from None
    return profile_from_dict(data, str(path))


def _plain(value):
    """An OmegaConf node (or any mapping) as plain dicts and lists."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return dict(value)


def save_hardware(profile: HardwareProfile, path) -> Path:
    """Write `profile` as YAML (what load_hardware reads), atomically."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = ("# moesim hardware profile: python -m moesim run hardware=" + str(path) + "\n"
            "# units: GB/s = 1e9 bytes/s, TFLOP/s = 1e12, GFLOP/s = 1e9, us = microseconds\n"
            + yaml.safe_dump(profile.to_dict(), sort_keys=False))
    return atomic_write_text(path, text)
