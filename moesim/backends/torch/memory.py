"""Memory of the torch backend: what a run will allocate (MemoryPlan, plan_memory), the refusal before any
allocation when it does not fit (check_memory), and what was used (host memory, peak RSS, NVML's peak VRAM).

    from moesim.backends.torch import plan_memory
    plan_memory(spec, n_slots=64, dtype="bf16", tokens=512, on_cpu=False).device_total   # bytes
    pinned_chunks(768, 49_766_400)   # experts per pinned chunk: gpt-oss-20b's bf16 pool pinned in 36 GiB, not 64

The parts (host pool, device pool, shared experts, workspace) are described in moesim/backends/torch/__init__.py.
"""
from __future__ import annotations

import math
import os
import resource
import threading
from dataclasses import dataclass

import torch

from ...errors import MoesimError
from ...formats import get_format
from ...hardware import host_memory_available  # tests patch it here
from ...models import DTYPE_BITS, ModelSpec
from .device import device_name

HOST_SHARE = 0.9  # of MemAvailable a run may take: the rest stays for Python, the trace and the system
DEVICE_SHARE = 0.95  # of free VRAM a run may take: the CUDA context and cuBLAS need some
GiB, MiB = 2**30, 2**20


def host_memory_total() -> int:
    """Bytes of physical host memory (page size x physical pages)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (getrusage; Linux counts KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def pow2ceil(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): what torch's pinned allocator reserves for n bytes."""
    return 1 << max(0, n - 1).bit_length()


def pinned_chunks(n_experts: int, nbytes: int) -> list[int]:
    """How many experts each pinned chunk of the host pool holds, so that the pinned bytes stay close to
    the pool's own. torch's CUDA host allocator rounds every pinned allocation up to a power of two
    (ATen/core/CachingHostAllocator.h in torch 2.13, allocate: PowerOf2Ceil(size) unless the size exceeds
    pinned_max_round_threshold, by default never): one pinned block of gpt-oss-20b's 35.6 GiB of bf16
    experts reserves 64 GiB. A chunk of k experts reserves pow2ceil(k * nbytes); every chunk but the last
    holds C // nbytes experts for a power of two C, and C is the one with the fewest pinned bytes in all
    (fewest chunks on a tie) among those whose total is at most the pool's bytes + C. An expert is never
    split between chunks (one expert, one copy)."""
    if n_experts <= 0:
        return []
    need = n_experts * nbytes
    best = None
    c = pow2ceil(nbytes)
    while True:
        k = c // nbytes  # experts per full chunk
        full, rest = divmod(n_experts, k)
        counts = [k] * full + ([rest] if rest else [])
        total = pinned_bytes(counts, nbytes)
        if total <= need + c and (best is None or (total, len(counts)) < best[0]):
            best = ((total, len(counts)), counts)
        if k >= n_experts:  # one chunk holds the whole pool: larger chunks change nothing
            break
        c *= 2
    return best[1]


def pinned_bytes(counts: list[int], nbytes: int) -> int:
    """Bytes torch's pinned allocator reserves for chunks of `counts` experts of `nbytes` each."""
    return sum(pow2ceil(k * nbytes) for k in counts)


class ChunkedPool:
    """The host pool in pinned chunks (pinned_chunks): `pool[i]` is expert i's bytes (uint8 [nbytes]), a view
    into its chunk; `chunks` are the uint8 [k, nbytes] blocks as allocated. Indexes like a [n, nbytes] tensor."""

    def __init__(self, counts: list[int], nbytes: int):
        self.chunks = [torch.empty((k, nbytes), dtype=torch.uint8, pin_memory=True) for k in counts]
        self._rows = [row for chunk in self.chunks for row in chunk]  # views, made once
        self.shape = (len(self._rows), nbytes)
        self.dtype = torch.uint8

    def __getitem__(self, i: int) -> torch.Tensor:
        return self._rows[i]

    def __len__(self) -> int:
        return len(self._rows)

    def is_pinned(self) -> bool:
        return all(c.is_pinned() for c in self.chunks)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes a run will allocate, by part (see the module docstring)."""

    host_pool: int
    device_pool: int
    shared: int
    workspace: int  # activations, per-expert temporaries and the decoded expert for `workspace_tokens` tokens
    on_cpu: bool  # device=cpu: the device pool, shared experts and workspace are host memory too
    pinned: bool = False  # the host pool is pinned, in chunks (pinned_chunks)
    host_pool_pinned: int = 0  # bytes torch's pinned allocator reserves for those chunks
    host_decode: int = 0  # CUDA: the host's decoded expert (host experts of a packed format)

    @property
    def host_pool_reserved(self) -> int:
        """Host bytes the host pool takes (pinned: what the allocator reserves for its chunks)."""
        return self.host_pool_pinned if self.pinned else self.host_pool

    @property
    def device_total(self) -> int:
        return self.device_pool + self.shared + self.workspace

    @property
    def host_total(self) -> int:
        return self.host_pool_reserved + (self.device_total if self.on_cpu else self.workspace + self.host_decode)


def plan_memory(spec: ModelSpec, n_slots: int, dtype: str, tokens: int, on_cpu: bool,
                pinned: bool = False, host_rows: int | None = None) -> MemoryPlan:
    """What `setup` allocates for `spec` (as stored: see stored_spec; experts packed in their format,
    spec.bytes_per_expert each) with `n_slots` slots, computing in `dtype`; `pinned`: a pinned host pool
    (CUDA); `host_rows`: with a disk tier, the host pool's slots (each padded to diskfile.ALIGN), not every
    expert."""
    item = DTYPE_BITS[dtype] // 8
    per_expert = spec.bytes_per_expert
    shared_ffn = spec.shared_ffn or spec.ffn
    per_shared = spec.bytes_per_shared_expert
    widest = max(spec.ffn, shared_ffn if spec.shared_experts else 0)
    # x and out [T, hidden]; per expert h [T, 2 ffn], a [T, ffn], y [T, hidden]; host round trip 2 x [T, hidden]
    workspace = tokens * (5 * spec.hidden + 3 * widest) * item
    routed_decoded = not _view_only(spec.dtype, dtype)
    shared_decoded = spec.shared_experts and not _view_only(shared_format(spec), dtype)
    # the decoded expert [3 hidden ffn] a packed format is decoded into before its FFN
    decode = 3 * spec.hidden * max(spec.ffn if routed_decoded else 0, shared_ffn if shared_decoded else 0) * item
    n = spec.layers * spec.experts
    pin = pinned and not on_cpu
    if host_rows is not None:  # the disk tier's host cache: one pinned block of aligned rows
        from .diskfile import stride_of

        host = host_rows * stride_of(per_expert)
        return MemoryPlan(host_pool=host, device_pool=n_slots * per_expert,
                          shared=spec.layers * spec.shared_experts * per_shared, workspace=workspace + decode,
                          on_cpu=on_cpu, pinned=pin, host_pool_pinned=host if pin else 0,
                          host_decode=3 * spec.hidden * spec.ffn * item if routed_decoded and not on_cpu else 0)
    return MemoryPlan(host_pool=n * per_expert, device_pool=n_slots * per_expert,
                      shared=spec.layers * spec.shared_experts * per_shared, workspace=workspace + decode,
                      on_cpu=on_cpu, pinned=pin,
                      host_pool_pinned=pinned_bytes(pinned_chunks(n, per_expert), per_expert) if pin else 0,
                      host_decode=3 * spec.hidden * spec.ffn * item if routed_decoded and not on_cpu else 0)


def shared_format(spec: ModelSpec) -> str:
    """The format the shared experts are stored in: dense_format where the spec describes the whole model
    (ModelSpec.bytes_per_shared_expert), else the routed experts' format."""
    return spec.dense_format if spec.whole else spec.dtype


def _view_only(fmt: str, dtype: str) -> bool:
    """Weights stored in `fmt` are already compute weights of `dtype` (no decode)."""
    return get_format(fmt).torch_dtype == dtype


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def _fitting_scale(need_weights: int, fixed: int, room: int) -> float:
    """The largest scale (two significant digits, rounded down) at which weights that scale with its
    square, plus `fixed` bytes, fit in `room` bytes."""
    if room <= fixed or need_weights <= 0:
        return 0.0
    s = math.sqrt((room - fixed) / need_weights)
    if s >= 1:
        return 1.0
    digits = 10 ** (math.floor(math.log10(s)) - 1)
    return math.floor(s / digits) * digits


def check_memory(plan: MemoryPlan, spec: ModelSpec, n_slots: int, dtype: str, device: torch.device) -> None:
    """Refuse, before any allocation, a run that does not fit host memory or free VRAM, with the numbers
    and the knob that helps (model.scale=, a smaller budget)."""
    per_expert = plan.host_pool // max(1, spec.layers * spec.experts)
    parts = [f"host pool {spec.layers * spec.experts} experts x {per_expert / MiB:.1f} MiB ({spec.dtype}) = "
             f"{_gib(plan.host_pool)}" + (f", pinned in {_gib(plan.host_pool_reserved)}" if plan.pinned else "")]
    if plan.on_cpu:
        parts.append(f"device pool {n_slots} slots = {_gib(plan.device_pool)}")
        if plan.shared:
            parts.append(f"shared experts {_gib(plan.shared)}")
    parts.append(f"workspace {_gib(plan.workspace)}")
    avail = host_memory_available()
    if avail is not None and plan.host_total > HOST_SHARE * avail:
        room = int(HOST_SHARE * avail)
        weights = plan.host_pool_reserved + (plan.device_pool + plan.shared if plan.on_cpu else 0)
        scale = _fitting_scale(weights, plan.workspace, room)
        hint = f"try model.scale={scale:g} (a scale multiplies the weights' bytes by its square)" if scale else \
            "even the smallest scale does not fit"
        if plan.on_cpu:
            hint += "; a smaller budget shrinks the device pool"
        raise MoesimError(f"host memory: the torch backend needs {_gib(plan.host_total)} "
                          f"({' + '.join(parts)}) for {spec.name}, but {_gib(avail)} is available "
                          f"(MemAvailable in /proc/meminfo, {HOST_SHARE:.0%} usable = {_gib(room)}); {hint}")
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        room = int(DEVICE_SHARE * free)
        if plan.device_total > room:
            fit_slots = max(0, (room - plan.shared - plan.workspace) // max(1, per_expert))
            raise MoesimError(
                f"device memory: {n_slots} slots x {per_expert / MiB:.1f} MiB = {_gib(plan.device_pool)} + "
                f"shared experts {_gib(plan.shared)} + workspace {_gib(plan.workspace)} = {_gib(plan.device_total)}, "
                f"but {device_name(device)} has {_gib(free)} free of {_gib(total)} ({DEVICE_SHARE:.0%} usable); "
                f"use a smaller budget (budget={fit_slots} slots fit) or model.scale=")


class NvmlSampler:
    """Peak NVML 'used' memory of one GPU, sampled every `period_s` on a thread (None where NVML is absent)."""

    def __init__(self, device: torch.device, period_s: float = 0.01):
        self.peak: int | None = None
        self.before: int | None = None
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            props = torch.cuda.get_device_properties(device)
            try:  # the same GPU as torch's, whatever CUDA_VISIBLE_DEVICES says
                bus = f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
                self._handle = pynvml.nvmlDeviceGetHandleByPciBusId(bus)
            except Exception:  # noqa: BLE001 - older torch without pci ids, or NVML refusing the id
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            self._read = lambda: int(pynvml.nvmlDeviceGetMemoryInfo(self._handle).used)
            self.before = self.peak = self._read()
        except Exception:  # noqa: BLE001 - pynvml missing or NVML unusable: the field stays None
            self._read = None
            return
        self._period = period_s
        self._thread = threading.Thread(target=self._run, name="moesim-nvml", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            self.sample()

    def sample(self) -> None:
        if self._read is not None:
            try:
                used = self._read()
            except Exception:  # noqa: BLE001 - a failed read ends sampling, the peak so far stands
                self._read = None
                return
            if self.peak is None or used > self.peak:
                self.peak = used

    def close(self) -> None:
        if self._read is not None:
            self.sample()
            self._stop.set()
            self._thread.join()

