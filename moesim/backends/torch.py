"""The `torch` backend: real expert weights in host memory, copied into device slots; real expert FFNs.

    python -m moesim run backend=torch model.scale=0.25                    # CUDA when present, else cpu
    python -m moesim run backend=torch backend.device=cpu model.scale=0.125 strategy=lru budget=25%

Memory, estimated first (refused with the numbers when it does not fit), then allocated once in `setup`:
  host pool    [L*E, W]   every routed expert as one contiguous block of W = 3*hidden*ffn values
                          (gate rows [ffn, hidden], up rows [ffn, hidden], down [hidden, ffn]), so a load
                          is one copy; pinned on CUDA
  device pool  [slots, W] exactly the budget's slots; with device=cpu a separate block of host memory
  shared       [L*S, Ws]  the model's shared experts, resident on the device
  activations  [tokens, hidden] random inputs (fixed seed) and the layer output; allocated for
               `workspace_tokens` and grown only when a step has more tokens than any before
Weights are random (fixed seed): timings do not depend on their values. Dtype: the spec's where torch has
it (bf16, fp16, fp32), bf16 for quantised formats (mxfp4, fp8); `info()` says which.

Timelines, the same as moesim/backends/sim.py's so that the two compare number for number:
  copies   one at a time, in issue order. CUDA: on a copy stream; each copy first waits for the end of
           the last layer issued before it (the routing that asks for an expert exists only once the
           layer before has run; this also keeps a copy from overwriting a slot a layer still reads),
           then signals its slot's event. cpu: a memcpy in the calling thread (`copy_worker: false`, the
           default: faster on the 2-core machine this was measured on, see docs/fidelity.md), or on a copy
           worker thread with the GIL released (`copy_worker: true`), overlapping compute.
  compute  a layer waits for the loads of the slots it reads (their events on CUDA, the worker's
           progress on cpu), never for other copies in flight (prefetches), then runs its shared experts
           over the step's tokens and each device expert over its token count, SwiGLU
           down(silu(gate x) * up x) over the rows of its tokens, scaled by their gate weights from
           the trace (`route`) and added into the layer's output.
  host     experts the offload policy keeps on the host run on the CPU from the host pool, after the
           activations' round trip (to the host, result back); on CUDA in parallel with the device part.
Measured: per copy start/end (CUDA events, else perf_counter), per layer start/end and the stall waiting
for weights (with inline copies: the copies run since the previous layer, prefetches included, since they
held the compute thread), per step latency; peak memory in `memory()`; `request_stats()` and
`inflight_bytes()` as the sim reports them. `finish` waits and reports; the pools live as long as the
backend object (memory() and tests read them).
"""
from __future__ import annotations

import ctypes
import math
import os
import resource
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import Backend
from ..errors import MoesimError
from ..trace import DTYPE_BITS, ModelSpec, scale_spec, stored_spec, weights_dtype  # noqa: F401 (re-exported)

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HOST_SHARE = 0.9  # of MemAvailable a run may take: the rest stays for Python, the trace and the system
DEVICE_SHARE = 0.95  # of free VRAM a run may take: the CUDA context and cuBLAS need some
WAIT_EPS_MS = 0.002  # CUDA: a stream wait shorter than this (event resolution ~0.5 us) did not wait
FLUSH_STEPS = 8  # CUDA: steps whose events may wait unresolved before the host waits for the device
GiB, MiB = 2**30, 2**20


# ------------------------------------------------------------------------------------------- devices
def resolve_device(device: str) -> torch.device:
    """`auto` (CUDA when present, else cpu), `cpu`, `cuda` or `cuda:N`; refuses CUDA where there is none."""
    text = str(device).strip().lower()
    if text == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        if not torch.cuda.is_available():
            why = "was built without CUDA" if torch.version.cuda is None else "sees no CUDA device"
            raise MoesimError(f"backend.device={device}: torch {torch.__version__} {why}; "
                              f"use backend.device=cpu (or auto, which picks cuda only where it exists)")
        try:
            dev = torch.device(text)
        except RuntimeError:
            raise MoesimError(f"backend.device={device!r}: expected auto, cpu, cuda or cuda:N") from None
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise MoesimError(f"backend.device={device}: only {torch.cuda.device_count()} CUDA device(s) here "
                              f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
        return torch.device("cuda", index)
    raise MoesimError(f"backend.device={device!r}: expected auto, cpu, cuda or cuda:N")


def device_name(device: torch.device) -> str:
    """"NVIDIA H200" for a CUDA device; the CPU's model name (from /proc/cpuinfo) for cpu."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"cpu {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"cpu ({os.cpu_count()} cores)"


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


def host_memory_total() -> int:
    """Bytes of physical host memory (page size x physical pages)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (getrusage; Linux counts KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def resolve_threads(threads, device: torch.device, copy_worker: bool) -> int | None:
    """Torch compute threads for device=cpu: `auto` leaves one core to the copy worker (all cores without
    one); a number is taken as is; on CUDA None (torch's own setting is left alone)."""
    if device.type != "cpu":
        return None
    if threads in (None, "auto"):
        cores = os.cpu_count() or 1
        return max(1, cores - 1) if copy_worker else cores
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise MoesimError(f"backend.threads={threads!r}: expected auto or a number of threads >= 1")
    return threads


# -------------------------------------------------------------------------------------------- memory
@dataclass(frozen=True)
class MemoryPlan:
    """Bytes a run will allocate, by part (see the module docstring)."""

    host_pool: int
    device_pool: int
    shared: int
    workspace: int  # activations and per-expert temporaries for `workspace_tokens` tokens
    on_cpu: bool  # device=cpu: the device pool, shared experts and workspace are host memory too
    pinned: bool = False  # the host pool is pinned: torch's pinned allocator rounds it up to a power of two

    @property
    def host_pool_reserved(self) -> int:
        """Host bytes the host pool takes (pinned: the next power of two, as torch's host allocator rounds)."""
        return 1 << max(0, self.host_pool - 1).bit_length() if self.pinned else self.host_pool

    @property
    def device_total(self) -> int:
        return self.device_pool + self.shared + self.workspace

    @property
    def host_total(self) -> int:
        return self.host_pool_reserved + (self.device_total if self.on_cpu else self.workspace)


def plan_memory(spec: ModelSpec, n_slots: int, dtype: str, tokens: int, on_cpu: bool,
                pinned: bool = False) -> MemoryPlan:
    """What `setup` allocates for `spec` (as stored: see stored_spec) with `n_slots` slots; `pinned`: a
    pinned host pool (CUDA)."""
    item = DTYPE_BITS[dtype] // 8
    per_expert = 3 * spec.hidden * spec.ffn * item
    shared_ffn = spec.shared_ffn or spec.ffn
    per_shared = 3 * spec.hidden * shared_ffn * item
    widest = max(spec.ffn, shared_ffn if spec.shared_experts else 0)
    # x and out [T, hidden]; per expert h [T, 2 ffn], a [T, ffn], y [T, hidden]; host round trip 2 x [T, hidden]
    workspace = tokens * (5 * spec.hidden + 3 * widest) * item
    return MemoryPlan(host_pool=spec.layers * spec.experts * per_expert, device_pool=n_slots * per_expert,
                      shared=spec.layers * spec.shared_experts * per_shared, workspace=workspace, on_cpu=on_cpu,
                      pinned=pinned and not on_cpu)


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
    parts = [f"host pool {spec.layers * spec.experts} experts x {per_expert / MiB:.1f} MiB ({dtype}) = "
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


# --------------------------------------------------------------------------------------------- compute
def expert_ffn(block: torch.Tensor, x: torch.Tensor, out: torch.Tensor, hidden: int, ffn: int,
               weight: float) -> None:
    """out += weight * down(silu(gate x) * up x): one SwiGLU expert whose weights are the contiguous
    `block` [3 * hidden * ffn] (gate rows, up rows, down), over x [n, hidden] into out [n, hidden]."""
    out.add_(_swiglu(block, x, hidden, ffn), alpha=weight)


def routed_ffn(block: torch.Tensor, x: torch.Tensor, out: torch.Tensor, hidden: int, ffn: int,
               tokens: torch.Tensor, weights: torch.Tensor) -> None:
    """out[tokens] += weights * expert(x[tokens]): one expert over the rows its tokens occupy in a batch
    (tokens [n] int64, weights [n, 1] the gate weights), gathered, computed, scattered back."""
    out.index_add_(0, tokens, _swiglu(block, x.index_select(0, tokens), hidden, ffn) * weights)


def _swiglu(block: torch.Tensor, x: torch.Tensor, hidden: int, ffn: int) -> torch.Tensor:
    gate_up = block[: 2 * ffn * hidden].view(2 * ffn, hidden)
    down = block[2 * ffn * hidden:].view(hidden, ffn)
    h = F.linear(x, gate_up)  # [n, 2 ffn]: gate and up in one matmul
    return F.linear(F.silu(h[:, :ffn]) * h[:, ffn:], down)  # [n, hidden]


def fill_random(t: torch.Tensor, seed: int, bound: float, desc: str | None = None,
                via: torch.device | None = None) -> None:
    """Fill `t` [rows, W] uniformly in [-bound, bound] from `seed`, about 256 MiB at a time (a progress bar on
    a terminal for large pools). `via` a CUDA device: the values are drawn there and copied into `t` (a host
    pool of tens of GiB fills in seconds instead of minutes)."""
    src = via if via is not None and via.type == "cuda" else t.device
    gen = torch.Generator(device=src).manual_seed(seed)
    rows = t.shape[0]
    chunk = max(1, (256 * MiB) // max(1, t[0].numel() * t.element_size())) if rows else 1
    bar = None
    if desc and t.numel() * t.element_size() > GiB:
        from tqdm import tqdm

        bar = tqdm(total=rows, unit="expert", desc=desc, file=sys.stderr, disable=None, mininterval=0.5)
    for lo in range(0, rows, chunk):
        part = t[lo:lo + chunk]
        if src == t.device:
            part.uniform_(-bound, bound, generator=gen)
        else:
            part.copy_(torch.empty(part.shape, dtype=t.dtype, device=src).uniform_(-bound, bound, generator=gen))
        if bar is not None:
            bar.update(part.shape[0])
    if bar is not None:
        bar.close()


def memcpy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy contiguous `src` into contiguous `dst` of the same size on the CPU: one memcpy, in the calling
    thread, with the GIL released (ctypes), whatever torch's intra-op threads are doing."""
    ctypes.memmove(dst.data_ptr(), src.data_ptr(), src.numel() * src.element_size())


class CopyWorker:
    """A thread that runs host-memory copies one at a time in issue order (device=cpu). `submit` returns a
    ticket; `wait(ticket)` returns once that copy (and every one before it) is done; `times[ticket]` holds
    its (start, end) perf_counter seconds."""

    def __init__(self):
        self._queue: deque = deque()
        self._cv = threading.Condition()
        self.issued = 0  # tickets handed out
        self.done = 0  # tickets finished (in order)
        self.times: dict[int, tuple[float, float]] = {}
        self._error: BaseException | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="moesim-copy", daemon=True)
        self._thread.start()

    def submit(self, dst: torch.Tensor, src: torch.Tensor) -> int:
        with self._cv:
            self.issued += 1
            self._queue.append((self.issued, dst, src))
            self._cv.notify_all()
            return self.issued

    def wait(self, ticket: int) -> None:
        if self.done < ticket:
            with self._cv:
                self._cv.wait_for(lambda: self.done >= ticket or self._error is not None)
        if self._error is not None:
            raise RuntimeError(f"copy worker failed: {self._error!r}") from self._error

    def _run(self) -> None:
        cv, queue = self._cv, self._queue
        while True:
            with cv:
                cv.wait_for(lambda: queue or self._stop)
                if not queue:
                    return
                ticket, dst, src = queue.popleft()
            try:
                t0 = time.perf_counter()
                memcpy(dst, src)
                t1 = time.perf_counter()
            except BaseException as e:  # reported to the waiting thread
                with cv:
                    self._error = e
                    cv.notify_all()
                return
            with cv:
                self.times[ticket] = (t0, t1)
                self.done = ticket
                cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join()


class _NvmlSampler:
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


# --------------------------------------------------------------------------------------------- backend
class TorchBackend(Backend):
    """Real weights and real FFNs on `device` (see the module docstring). Events go to the profiler."""

    name = "torch"

    def __init__(self, hardware=None, device: str = "auto", dtype: str = "auto", pinned: bool = True,
                 copy_worker: bool = False, threads=1, seed: int = 0, workspace_tokens: int = 512):
        # options are checked in `setup` (as `resolve`), so that a refusal reaches the user as a MoesimError
        # and not wrapped in Hydra's instantiation error
        self.hardware = hardware  # not used for timing: this backend measures
        self.options = {"device": device, "threads": threads, "workspace_tokens": workspace_tokens}
        self.requested_dtype = dtype
        self.pinned = bool(pinned)
        self.copy_worker = bool(copy_worker)
        self.seed = int(seed)
        self.device = None
        self.spec = None
        self.plan = None
        self._worker = None
        self._nvml = None
        self._threads_before = None

    # -------------------------------------------------------------------------------------- setup
    def resolve(self) -> None:
        """Check the options and pick the device (refusing CUDA where there is none); `setup` calls it."""
        self.device = resolve_device(self.options["device"])
        self.threads = resolve_threads(self.options["threads"], self.device, self.copy_worker)
        tokens = self.options["workspace_tokens"]
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise MoesimError(f"backend.workspace_tokens={tokens!r}: expected a number of tokens >= 1")
        self.workspace_tokens = tokens

    @property
    def mode(self) -> str:
        """How copies run: "stream" (CUDA copy stream), "worker" (cpu thread) or "sync" (cpu, inline)."""
        if self.device.type == "cuda":
            return "stream"
        return "worker" if self.copy_worker else "sync"

    def setup(self, spec: ModelSpec, n_slots: int, profiler) -> None:
        self.resolve()
        dtype = weights_dtype(spec.dtype, self.requested_dtype)
        self.spec = spec = stored_spec(spec, dtype)
        self.dtype_name, self.dtype = dtype, TORCH_DTYPES[dtype]
        self.n_slots, self.profiler = n_slots, profiler
        dev, on_cpu = self.device, self.device.type == "cpu"
        self.plan = plan = plan_memory(spec, n_slots, dtype, self.workspace_tokens, on_cpu, self.pinned)
        check_memory(plan, spec, n_slots, dtype, dev)  # before any allocation
        if self.threads is not None:
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(self.threads)
        H, Fd, L, E = spec.hidden, spec.ffn, spec.layers, spec.experts
        Fs = spec.shared_ffn or spec.ffn
        self._width = 3 * H * Fd  # values per routed expert block
        self._nbytes = self._width * torch.finfo(self.dtype).bits // 8  # bytes per load
        self._E = E
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
            self._nvml = _NvmlSampler(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        pin = dev.type == "cuda" and self.pinned  # never pin without CUDA: pin_memory needs a CUDA driver
        self.host_pool = torch.empty((L * E, self._width), dtype=self.dtype, pin_memory=pin)
        fill_random(self.host_pool, self.seed, 1.0 / math.sqrt(max(H, Fd)), desc="host pool", via=dev)
        self.device_pool = torch.empty((n_slots, self._width), dtype=self.dtype, device=dev)
        if on_cpu:
            self.device_pool.zero_()  # touch every page now, not during the first copies
        self.shared_pool = torch.empty((L * spec.shared_experts, 3 * H * Fs), dtype=self.dtype, device=dev)
        fill_random(self.shared_pool, self.seed + 1, 1.0 / math.sqrt(max(H, Fs)))
        self._shared_ffn = Fs
        self._weight = 1.0 / spec.top_k  # the gate weight when no routing was given (`route` not called)
        self._routes: dict = {}  # (layer, expert) -> its tokens' rows and gate weights in this step (`route`)
        self._alloc_activations(self.workspace_tokens)
        # bookkeeping of the replay
        self._slot_ticket = [0] * n_slots  # cpu: the copy ticket that last filled each slot
        self._pending_copies: list = []  # sync mode: copy durations (s) since the last layer
        self._fresh: set[int] = set()  # sync mode: slots loaded since the last layer (their copy was waited for)
        self._prefetched: set[int] = set()  # slots whose prefetched copy has not been used yet
        self._stall_free = 0  # device experts whose weights were there when their layer could start
        self._late = 0  # prefetched copies not complete when their first use could start
        self._inflight: deque = deque()  # CUDA: end events of copies not known to be complete
        self._events: list = []  # events of steps not yet reported, in issue order
        self._step_index, self._n_tokens = 0, 0
        if dev.type == "cuda":
            self._copy_stream = torch.cuda.Stream(dev)
            self._compute_stream = torch.cuda.Stream(dev)
            self._d2h_stream = torch.cuda.Stream(dev)
            self._slot_ready = [torch.cuda.Event() for _ in range(n_slots)]  # recorded after each slot's load
            self._layer_done = torch.cuda.Event()  # recorded after each layer
            self._free_events: list = []  # timing events to reuse
            torch.cuda.synchronize(dev)
            self._base = torch.cuda.Event(enable_timing=True)
            self._base.record(self._compute_stream)
            self._layer_done.record(self._compute_stream)
            self._base.synchronize()
            self._t0 = time.perf_counter()  # host time of the base event: aligns host timings (host experts)
        else:
            self._t0 = time.perf_counter()
            if self.copy_worker:
                self._worker = CopyWorker()
        self._steps_pending = 0

    def _alloc_activations(self, tokens: int) -> None:
        """Activations for up to `tokens` tokens: x (random, fixed seed), the layer output, host round trip."""
        dev, spec = self.device, self.spec
        gen = torch.Generator(device=dev).manual_seed(self.seed + 2)
        self._x = torch.empty((tokens, spec.hidden), dtype=self.dtype, device=dev).uniform_(-1, 1, generator=gen)
        self._out = torch.zeros((tokens, spec.hidden), dtype=self.dtype, device=dev)
        pin = dev.type == "cuda" and self.pinned
        self._host_x = torch.empty((tokens, spec.hidden), dtype=self.dtype, pin_memory=pin)
        self._host_y = torch.empty((tokens, spec.hidden), dtype=self.dtype, pin_memory=pin)
        self._up = torch.empty((tokens, spec.hidden), dtype=self.dtype, device=dev)  # host result, back
        self._tokens_cap = tokens

    # ------------------------------------------------------------------------------------- clocks
    def _now(self) -> float:
        """Host time in ms since setup (on CUDA aligned with the base event)."""
        return (time.perf_counter() - self._t0) * 1e3

    def _event(self):
        """A CUDA timing event, reused once its time has been reported."""
        return self._free_events.pop() if self._free_events else torch.cuda.Event(enable_timing=True)

    # --------------------------------------------------------------------------------------- steps
    def begin_step(self, step: int, n_tokens: int) -> None:
        if n_tokens > self._tokens_cap:  # a larger step than any before: grow once (not per step)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._alloc_activations(max(n_tokens, 2 * self._tokens_cap))
        self._step_index, self._n_tokens = step, n_tokens
        if self.device.type == "cuda":
            e = self._event()
            e.record(self._compute_stream)
            self._step_start = e
        else:
            self._step_start = self._now()

    def route(self, experts, weights) -> None:
        """Index the step's routing [n, L, K] by (layer, expert): an expert with one token, (its row, its gate
        weight) as numbers; with more, the rows of its tokens and their weights as tensors on the device (one
        upload per step) and on the host."""
        e = np.asarray(experts)
        w = np.asarray(weights, dtype=np.float32)
        n, L, K = e.shape
        if n == 1:
            self._routes = {(layer, int(x)): (0, float(g)) for layer in range(L)
                            for x, g in zip(e[0, layer].tolist(), w[0, layer].tolist()) if x >= 0}
            return
        flat = (np.arange(L)[None, :, None] * self._E + e.astype(np.int64)).ravel()  # [n*L*K] layer*E + expert
        keep = e.ravel() >= 0
        order = np.argsort(np.where(keep, flat, -1), kind="stable")[np.count_nonzero(~keep):]  # grouped by key
        rows = np.repeat(np.arange(n), L * K)[order]  # token row of each routed pair, grouped
        keys, first = np.unique(flat[order], return_index=True)
        bounds = np.append(first, len(order))
        dev = self.device
        gates = w.ravel()[order]  # [pairs], grouped as rows
        host_tok = torch.from_numpy(rows)
        host_gate = torch.from_numpy(gates).to(self.dtype).unsqueeze(1)
        if dev.type == "cuda":  # uploaded in the compute stream's order, before the layers that read them
            with torch.cuda.stream(self._compute_stream):
                tok, gate = host_tok.to(dev), host_gate.to(dev)
        else:
            tok, gate = host_tok, host_gate
        row_list, gate_list = rows.tolist(), gates.tolist()
        self._routes = {divmod(int(k), self._E): (row_list[a], gate_list[a]) if b - a == 1 else
                        (tok[a:b], gate[a:b], host_tok[a:b], host_gate[a:b])
                        for k, a, b in zip(keys.tolist(), bounds[:-1].tolist(), bounds[1:].tolist())}

    def load(self, key, slot: int, prefetch: bool) -> None:
        src = self.host_pool[key[0] * self._E + key[1]]
        dst = self.device_pool[slot]
        mode = self.mode
        if prefetch:
            self._prefetched.add(slot)
        else:
            self._prefetched.discard(slot)  # an earlier prefetch into this slot was evicted unused
        if mode == "stream":
            cs = self._copy_stream
            cs.wait_event(self._layer_done)  # the routing asking for it exists once the last layer has run
            e0, e1 = self._event(), self._event()
            e0.record(cs)
            with torch.cuda.stream(cs):
                dst.copy_(src, non_blocking=True)
            e1.record(cs)
            self._slot_ready[slot].record(cs)
            self._inflight.append(e1)
            self._events.append(("copy", key, prefetch, e0, e1))
        elif mode == "worker":
            ticket = self._worker.submit(dst, src)
            self._slot_ticket[slot] = ticket
            self._events.append(("copy", key, prefetch, ticket, None))
        else:
            t0 = time.perf_counter()
            memcpy(dst, src)
            t1 = time.perf_counter()
            self._pending_copies.append(t1 - t0)
            self._fresh.add(slot)
            self._events.append(("copy", key, prefetch, (t0 - self._t0) * 1e3, (t1 - self._t0) * 1e3))

    def _first_use(self, slot: int) -> bool:
        """Whether this use of `slot` is the first of a prefetched copy (then it is no longer unused)."""
        if slot in self._prefetched:
            self._prefetched.discard(slot)
            return True
        return False

    def _served(self, waited: bool, first_prefetch_use: bool) -> None:
        """Count one device expert: stall-free or not, and a late prefetch if it waited at first use."""
        if not waited:
            self._stall_free += 1
        elif first_prefetch_use:
            self._late += 1

    def compute(self, layer: int, device, host) -> None:
        if self.device.type == "cuda":
            self._compute_cuda(layer, device, host)
        else:
            self._compute_cpu(layer, device, host)

    def _device_experts(self, layer: int, device) -> None:
        spec, H, Fd, w = self.spec, self.spec.hidden, self.spec.ffn, self._weight
        n_all = self._n_tokens
        x, out, pool = self._x, self._out, self.device_pool
        for s in range(spec.shared_experts):  # shared experts: every token of the step, weight 1
            expert_ffn(self.shared_pool[layer * spec.shared_experts + s], x[:n_all], out[:n_all], H,
                       self._shared_ffn, 1.0)
        routes = self._routes
        for key, slot, n in device:
            r = routes.get(key)
            if r is None:  # no routing given (driven without `route`): the first n rows, weight 1/top_k
                expert_ffn(pool[slot], x[:n], out[:n], H, Fd, w)
            elif len(r) == 2:  # one token: its row, its gate weight (the plain FFN on that row, no gather)
                t = r[0]
                expert_ffn(pool[slot], x[t:t + 1], out[t:t + 1], H, Fd, r[1])
            else:
                routed_ffn(pool[slot], x, out, H, Fd, r[0], r[1])

    def _host_experts(self, host) -> None:
        """Host experts from the host pool over the activations already in _host_x, summed into _host_y. The
        activations of the layer's host tokens travel compacted: an expert reads the buffer's first n rows."""
        H, Fd, w, E = self.spec.hidden, self.spec.ffn, self._weight, self._E
        tokens = min(self._n_tokens, sum(n for _, n in host))
        xs, ys = self._host_x[:tokens], self._host_y[:tokens]
        ys.zero_()
        routes = self._routes
        for key, n in host:
            r = routes.get(key)
            block = self.host_pool[key[0] * E + key[1]]
            if r is None or len(r) == 2:
                expert_ffn(block, xs[:n], ys[:n], H, Fd, w if r is None else r[1])
            else:
                ys[:n].add_(_swiglu(block, xs[:n], H, Fd) * r[3][:n])

    def _compute_cpu(self, layer: int, device, host) -> None:
        t_wait = self._now()
        if self.mode == "worker":
            tickets = [self._slot_ticket[slot] for _, slot, _ in device]
            done = self._worker.done  # copies complete when the layer could start
            for (_, slot, _), t in zip(device, tickets):
                self._served(t > done, self._first_use(slot))
            need = max(tickets, default=0)
            if need > done:
                self._worker.wait(need)
            start = self._now()
            stall = start - t_wait
        else:  # sync: the loads ran inline just before; that time is this layer's wait for weights
            for _, slot, _ in device:
                self._served(slot in self._fresh, self._first_use(slot))
            self._fresh.clear()
            stall = sum(self._pending_copies) * 1e3
            self._pending_copies.clear()
            start = t_wait
        self._device_experts(layer, device)
        self._events.append(("compute", layer, start, self._now(), stall, "device"))
        if host:  # on the same CPU: after the device part
            tokens = min(self._n_tokens, sum(n for _, n in host))
            h0 = self._now()
            self._host_x[:tokens].copy_(self._x[:tokens])  # the round trip: activations down...
            self._host_experts(host)
            self._out[:tokens].add_(self._host_y[:tokens])  # ...and the result back
            h1 = self._now()
            self._events.append(("compute", layer, h0, h1, 0.0, "host"))

    def _compute_cuda(self, layer: int, device, host) -> None:
        cs = self._compute_stream
        input_ready = self._layer_done  # recorded after the previous layer: this layer's input exists then
        if host:  # start the activations' trip down before this layer's device work is queued behind it
            tokens = min(self._n_tokens, sum(n for _, n in host))
            ds = self._d2h_stream
            ds.wait_event(input_ready)
            with torch.cuda.stream(ds):
                self._host_x[:tokens].copy_(self._x[:tokens], non_blocking=True)
        e_wait, e_start, e_end = self._event(), self._event(), self._event()
        e_wait.record(cs)
        marks = []  # (slot, event after waiting for it): the expert waited if time passed since the last mark
        for _key, slot, _n in device:
            cs.wait_event(self._slot_ready[slot])
            mark = self._event()
            mark.record(cs)
            marks.append((self._first_use(slot), mark))
        e_start.record(cs)
        with torch.cuda.stream(cs):
            self._device_experts(layer, device)
        e_end.record(cs)
        self._events.append(("compute", layer, e_wait, e_start, e_end, "device", marks))
        if host:
            self._d2h_stream.synchronize()  # activations are on the host
            h0 = self._now()
            self._host_experts(host)
            with torch.cuda.stream(cs):  # after the device experts, in stream order
                self._up[:tokens].copy_(self._host_y[:tokens], non_blocking=True)
                self._out[:tokens].add_(self._up[:tokens])
            h1 = self._now()
            self._events.append(("compute", layer, h0, h1, 0.0, "host"))
        self._layer_done.record(cs)

    def end_step(self) -> None:
        if self.device.type == "cuda":
            e = self._event()
            e.record(self._compute_stream)
            self._events.append(("step", self._step_index, self._n_tokens, self._step_start, e))
        else:
            self._events.append(("step", self._step_index, self._n_tokens, self._step_start, self._now()))
        self._steps_pending += 1
        self._flush(wait=self._steps_pending >= FLUSH_STEPS)

    def finish(self) -> None:
        """Wait for every copy and layer, report the events still held, stop the helpers, restore threads."""
        try:
            self._flush(wait=True)
        finally:
            if self._worker is not None:
                self._worker.close()
            if self._nvml is not None:
                self._nvml.close()
            if self._threads_before is not None:
                torch.set_num_threads(self._threads_before)
                self._threads_before = None

    # ------------------------------------------------------------------------------------- report
    def _flush(self, wait: bool) -> None:
        """Report held events to the profiler, in issue order, up to the last step whose copies are done
        (a prefetch issued in step s may still be copying; its step is reported once it is done)."""
        if not self._events:
            return
        mode = self.mode
        if wait:
            if mode == "stream":
                torch.cuda.synchronize(self.device)
            elif mode == "worker":
                self._worker.wait(self._worker.issued)
        # the last held step all of whose copies (and, on CUDA, layers) are done
        cut = 0
        for i, ev in enumerate(self._events):
            if ev[0] == "copy" and not self._copy_done(ev):
                break
            if ev[0] == "step":
                if mode == "stream" and not ev[4].query():
                    break
                cut = i + 1
        if not cut:
            return
        done, self._events = self._events[:cut], self._events[cut:]
        prof = self.profiler
        if mode == "stream":
            base, ms = self._base, None
            ms = base.elapsed_time
            for ev in done:
                kind = ev[0]
                if kind == "copy":
                    _, key, prefetch, e0, e1 = ev
                    prof.copy(key, self._nbytes, ms(e0), ms(e1), prefetch)
                    self._free_events += (e0, e1)
                    if self._inflight and self._inflight[0] is e1:  # complete: no longer in flight
                        self._inflight.popleft()
                elif kind == "compute":
                    layer, a, b, c, where = ev[1:6]
                    if where == "host":
                        prof.compute(layer, a, b, 0.0, "host")
                    else:
                        t_wait, t_start, t_end = ms(a), ms(b), ms(c)
                        prof.compute(layer, t_start, t_end, max(0.0, t_start - t_wait), "device")
                        last = t_wait
                        for first_prefetch_use, mark in ev[6]:
                            t = ms(mark)
                            self._served(t - last > WAIT_EPS_MS, first_prefetch_use)
                            last = t
                            self._free_events.append(mark)
                        self._free_events += (a, b, c)
                else:
                    _, index, n, e0, e1 = ev
                    prof.step(index, n, ms(e0), ms(e1))
                    self._free_events += (e0, e1)
        else:
            times, t0 = (self._worker.times if self._worker is not None else None), self._t0
            for ev in done:
                kind = ev[0]
                if kind == "copy":
                    _, key, prefetch, a, b = ev
                    if mode == "worker":
                        s, e = times.pop(a)
                        a, b = (s - t0) * 1e3, (e - t0) * 1e3
                    prof.copy(key, self._nbytes, a, b, prefetch)
                elif kind == "compute":
                    _, layer, start, end, stall, where = ev
                    prof.compute(layer, start, end, stall, where)
                else:
                    _, index, n, start, end = ev
                    prof.step(index, n, start, end)
        self._steps_pending = sum(1 for ev in self._events if ev[0] == "step")

    def _copy_done(self, ev) -> bool:
        mode = self.mode
        if mode == "stream":
            return ev[4].query()
        if mode == "worker":
            return self._worker.done >= ev[3]
        return True

    def inflight_bytes(self) -> int:
        """Bytes of copies issued and not yet complete now (what a prefetch cap on queued copies reads)."""
        mode = self.mode
        if mode == "sync":
            return 0
        if mode == "worker":
            return (self._worker.issued - self._worker.done) * self._nbytes
        q = self._inflight
        while q and q[0].query():  # one copy stream: copies complete in issue order
            q.popleft()
        return len(q) * self._nbytes

    def request_stats(self) -> dict:
        """Counts of served requests, as the sim counts them: `stall_free_requests` (device experts whose
        weights were there when their layer could start) and `late_prefetches` (prefetched copies not complete
        at their first use). On CUDA complete once `finish` has run."""
        return {"stall_free_requests": self._stall_free, "late_prefetches": self._late}

    # ------------------------------------------------------------------------------------- memory
    def device_bytes(self) -> int:
        """Device memory held for expert weights: the slots plus every layer's shared experts (bytes)."""
        return self.plan.device_pool + self.plan.shared

    def memory(self) -> dict:
        """Memory the run held, bytes; None where a number does not apply to this device."""
        cuda = self.device.type == "cuda"
        return {
            "device_pool_bytes": self.plan.device_pool,
            "shared_bytes": self.plan.shared,
            "host_pool_bytes": self.plan.host_pool,
            "workspace_bytes": int(self._x.numel() * self._x.element_size() * 5),  # x, out, host x/y, up
            "peak_device_allocated_bytes": int(torch.cuda.max_memory_allocated(self.device)) if cuda else None,
            "peak_nvml_used_bytes": self._nvml.peak if cuda and self._nvml is not None else None,
            "nvml_used_before_bytes": self._nvml.before if cuda and self._nvml is not None else None,
            "peak_rss_bytes": peak_rss_bytes(),
        }

    def info(self) -> dict:
        """What ran: device, weights dtype and bytes per load, how copies ran, threads."""
        return {"device": str(self.device), "device_name": device_name(self.device),
                "weights_dtype": self.dtype_name if self.spec is not None else None,
                "bytes_per_expert": self._nbytes if self.spec is not None else None,
                "copies": self.mode, "pinned": self.device.type == "cuda" and self.pinned,
                "threads": torch.get_num_threads() if self.threads is None else self.threads,
                "torch": torch.__version__}
