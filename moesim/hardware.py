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
  - host side: not part of a GPU's datasheet, so a typical CPU is assumed and said:
      SERVER (h200, h100-pcie, a100-pcie, t4): one socket, 32 cores at 2.5 GHz with two AVX-512 FMA units
        (64 fp32 flop/cycle) = 5120 GFLOP/s peak, 50% usable in GEMM -> 2560; 8 channels DDR5-4800
        = 307.2 GB/s theoretical, 70% achieved (STREAM-like) -> 215.
      DESKTOP (rtx-4090, rtx-3060-12gb): 8 cores at 4.5 GHz with two AVX2 FMA units (32 fp32 flop/cycle)
        = 1152 GFLOP/s peak, 50% -> 576; dual-channel DDR5-5600 = 89.6 GB/s, 70% -> 62.7.
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
SERVER_HOST = dict(host_mem_gbps=round(8 * 38.4 * 0.7, 1),  # 8 x DDR5-4800 (38.4 GB/s each), 70%
                   host_gflops=32 * 2.5 * 64 * 0.5,  # 32 cores x 2.5 GHz x 64 flop/cycle, 50%
                   host_overhead_us=30.0)
DESKTOP_HOST = dict(host_mem_gbps=round(2 * 44.8 * 0.7, 1),  # 2 x DDR5-5600 (44.8 GB/s each), 70%
                    host_gflops=8 * 4.5 * 32 * 0.5,  # 8 cores x 4.5 GHz x 32 flop/cycle, 50%
                    host_overhead_us=30.0)


def _preset(name: str, pcie_gen: int, mem_gbps: float, bf16_tflops: float, vram_gib: float, host: dict,
            note: str) -> HardwareProfile:
    pinned = round(_pcie_gbps(pcie_gen) * LINK_EFFICIENCY, 1)
    return HardwareProfile(
        name=name, h2d_pinned_gbps=pinned, h2d_pageable_gbps=round(pinned / 2, 1), copy_latency_us=10.0,
        device_mem_gbps=round(mem_gbps * DEVICE_EFFICIENCY, 1),
        device_tflops=round(bf16_tflops * DEVICE_EFFICIENCY, 1), vram_gib=float(vram_gib),
        kernel_overhead_us=6.0, source=f"preset: {note}; rules in moesim/hardware.py", **host)


PRESETS: dict[str, HardwareProfile] = {p.name: p for p in [
    # NVIDIA H200 datasheet (SXM): 141 GB HBM3e, 4.8 TB/s, BF16 tensor 1,979 TFLOPS with sparsity = 989.5
    # dense; host link PCIe Gen5 x16 (128 GB/s both directions).
    _preset("h200", 5, 4800, 989.5, 141, SERVER_HOST, "NVIDIA H200 SXM datasheet, PCIe Gen5 x16"),
    # NVIDIA H100 datasheet (PCIe): 80 GB HBM2e, 2.0 TB/s, BF16 tensor 1,513 TFLOPS with sparsity = 756.5
    # dense; PCIe Gen5 x16.
    _preset("h100-pcie", 5, 2000, 756.5, 80, SERVER_HOST, "NVIDIA H100 PCIe datasheet, PCIe Gen5 x16"),
    # NVIDIA A100 80GB PCIe datasheet: 80 GB HBM2e, 1,935 GB/s, BF16 tensor 312 TFLOPS dense; PCIe Gen4 x16.
    _preset("a100-pcie", 4, 1935, 312, 80, SERVER_HOST, "NVIDIA A100 80GB PCIe datasheet, PCIe Gen4 x16"),
    # NVIDIA Ada GPU architecture whitepaper, RTX 4090: 24 GB GDDR6X, 1,008 GB/s, peak BF16 tensor with FP32
    # accumulate 165.2 TFLOPS dense; PCIe Gen4 x16.
    _preset("rtx-4090", 4, 1008, 165.2, 24, DESKTOP_HOST, "NVIDIA Ada whitepaper (RTX 4090), PCIe Gen4 x16"),
    # RTX 3060 12GB: 360 GB/s GDDR6 (192-bit, 15 Gbps; NVIDIA spec page). BF16 with FP32 accumulate derived:
    # 112 tensor cores x 1.777 GHz boost x 128 flop/clock (the GA10x GeForce rate with FP32 accumulate that
    # gives the GA102 whitepaper's 71 TFLOPS for the RTX 3090) = 25.5 TFLOPS dense; PCIe Gen4 x16.
    _preset("rtx-3060-12gb", 4, 360, 25.5, 12, DESKTOP_HOST,
            "NVIDIA RTX 3060 spec + GA102 whitepaper rate, PCIe Gen4 x16"),
    # NVIDIA T4 datasheet: 16 GB GDDR6, 320 GB/s, FP16 tensor (mixed precision) 65 TFLOPS; Turing has no
    # bf16, so this is the fp16 rate the experts would run at; PCIe Gen3 x16.
    _preset("t4", 3, 320, 65, 16, SERVER_HOST, "NVIDIA T4 datasheet (fp16: no bf16 on Turing), PCIe Gen3 x16"),
]}


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
                           serial_copies=serial, **values)


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


def load_hardware(value) -> HardwareProfile:
    """A preset name (h200, h100-pcie, ...), a path to a YAML profile, a mapping of fields, or a profile."""
    if isinstance(value, HardwareProfile):
        return value
    if isinstance(value, dict) or (hasattr(value, "items") and not isinstance(value, (str, os.PathLike))):
        return profile_from_dict(_plain(value), "hardware")
    text = str(value)
    if text in PRESETS:
        return PRESETS[text]
    path = Path(text)
    if not path.is_file():
        if path.suffix in (".yaml", ".yml") or os.sep in text:
            raise MoesimError(f"hardware: no such file {text!r}")
        raise MoesimError(f"hardware: unknown preset {text!r}; presets: {', '.join(PRESETS)}; "
                          f"or give the path of a YAML profile")
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise MoesimError(f"{path}: not a YAML file ({' '.join(str(e).split())})") from None
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
