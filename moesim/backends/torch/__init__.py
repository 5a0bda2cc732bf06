"""The `torch` backend: real expert weights in host memory, copied into device slots; real expert FFNs.

    python -m moesim run backend=torch model.scale=0.25                    # CUDA when present, else cpu
    python -m moesim run backend=torch backend.device=cpu model.scale=0.125 strategy=lru budget=25%

This file holds TorchBackend (pools, timelines, events); its parts live beside it: device.py (which device,
its name, CPU threads), memory.py (the memory plan, the pinned chunks, the refusal when it does not fit, peak
usage), copies.py (host-memory copies and the copy worker thread), packed.py (experts as the bytes of their
format, their decode, random experts), ffn.py (the expert FFN). Their names are importable from here
(moesim.backends.torch).

Memory, estimated first (refused with the numbers when it does not fit), then allocated once in `setup`:
  host pool    [L*E, B]   uint8: every routed expert as one contiguous block of B = spec.bytes_per_expert
                          bytes, its gate [ffn, hidden], up [ffn, hidden] and down [hidden, ffn] in the
                          expert's storage format (mxfp4, q4_k, fp8, bf16 ...: packed.py), so a load is one
                          copy of exactly the bytes the sim counts; on CUDA pinned, in chunks whose sizes
                          keep torch's power-of-two rounding of pinned blocks small (memory.py pinned_chunks)
  device pool  [slots, B] uint8, exactly the budget's slots; with device=cpu a separate block of host memory
  shared       [L*S, Bs]  the model's shared experts in their format (dense_format), resident on the device
  decoded      [3*hidden*ffn] the compute dtype: a packed expert is decoded into it before its FFN (one on the
               device, one on the host for host experts on CUDA); none where the format is the compute dtype
  activations  [tokens, hidden] random inputs (fixed seed) and the layer output; allocated for
               `workspace_tokens` and grown only when a step has more tokens than any before
Weights are random (fixed seed), valid for their format: timings do not depend on their values. Compute
dtype: the format's where torch has it (bf16, fp16, fp32), else bf16; backend.dtype=bf16|fp16|fp32 stores
every routed expert unpacked in that dtype instead. `info()` says which.

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
           activations' round trip (to the host, result back); on CUDA in parallel with the device part
           (after it where the offload policy says `host_after_device`).
Measured: per copy start/end (CUDA events, else perf_counter), per layer start/end and the stall waiting
for weights (with inline copies: the copies run since the previous layer, prefetches included, since they
held the compute thread), per step latency; peak memory in `memory()`; `request_stats()` and
`inflight_bytes()` as the sim reports them. `finish` waits and reports; the pools live as long as the
backend object (memory() and tests read them).
"""
from __future__ import annotations

import math
import time
from collections import deque

import numpy as np
import torch

from .. import Backend
from ...errors import MoesimError
from ...hardware import load_hardware
# the parts' names are imported here for TorchBackend and re-exported for callers (calibrate, tests, scripts)
from ...models import DTYPE_BITS, ModelSpec, scale_spec, stored_spec, weights_dtype  # noqa: F401
from .copies import CopyWorker, memcpy
from .device import TORCH_DTYPES, device_name, resolve_device, resolve_threads
from .drift import DriftCheck
from .ffn import expert_ffn, routed_ffn
from .memory import (DEVICE_SHARE, HOST_SHARE, ChunkedPool, GiB, MemoryPlan, MiB, NvmlSampler,  # noqa: F401
                     check_memory, host_memory_available, host_memory_total, peak_rss_bytes, pinned_bytes,
                     pinned_chunks, plan_memory, shared_format)
from .packed import ExpertCodec, fill_experts  # noqa: F401

WAIT_EPS_MS = 0.002  # CUDA: a stream wait shorter than this (event resolution ~0.5 us) did not wait
FLUSH_STEPS = 8  # CUDA: steps whose events may wait unresolved before the host waits for the device


# --------------------------------------------------------------------------------------------- backend
class TorchBackend(Backend):
    """Real weights and real FFNs on `device` (see the module docstring). Events go to the profiler."""

    name = "torch"

    def __init__(self, hardware=None, device: str = "auto", dtype: str = "auto", pinned: bool = True,
                 copy_worker: bool = False, threads=1, seed: int = 0, workspace_tokens: int = 512,
                 disk_dir: str | None = None):
        # options are checked in `setup` (as `resolve`), so that a refusal reaches the user as a MoesimError
        # and not wrapped in Hydra's instantiation error
        self.hardware = hardware  # not used for timing (this backend measures): its times are compared (drift.py)
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
        self.disk_dir = disk_dir  # the disk tier's experts file goes here (None: the system's temporary directory)
        self._disk = None  # (storage, host slots) of the disk tier (setup_disk), None: every expert in host memory
        self._file = None  # the experts' file (diskfile.ExpertFile) with a disk tier

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
        self.spec = spec = stored_spec(spec, self.requested_dtype)  # the spec's own format, packed, or forced
        dtype = weights_dtype(spec.dtype, self.requested_dtype)  # what its weights decode to
        self.dtype_name, self.dtype = dtype, TORCH_DTYPES[dtype]
        self.n_slots, self.profiler = n_slots, profiler
        dev, on_cpu = self.device, self.device.type == "cpu"
        host_rows = None if self._disk is None else self._disk[1] + 1  # the host cache's slots and a scratch one
        self.plan = plan = plan_memory(spec, n_slots, dtype, self.workspace_tokens, on_cpu, self.pinned, host_rows)
        check_memory(plan, spec, n_slots, dtype, dev)  # before any allocation
        if self.threads is not None:
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(self.threads)
        H, Fd, L, E = spec.hidden, spec.ffn, spec.layers, spec.experts
        Fs = spec.shared_ffn or spec.ffn
        self._codec = ExpertCodec(spec.dtype, H, Fd, self.dtype)
        self._shared_codec = ExpertCodec(shared_format(spec), H, Fs, self.dtype)
        self._nbytes = self._codec.nbytes  # bytes per load
        if self._nbytes != spec.bytes_per_expert:
            raise MoesimError(f"internal: {spec.dtype} experts of {H} x {Fd} pack into {self._nbytes} bytes, "
                              f"but the spec counts {spec.bytes_per_expert}")
        self._E = E
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
            self._nvml = NvmlSampler(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        # never pin without CUDA: pin_memory needs a CUDA driver
        if self._disk is not None:  # the disk tier: experts in a file, read into the host cache's slots
            from .diskfile import ExpertFile, aligned_rows

            gen = torch.Generator().manual_seed(self.seed)
            bound = 1.0 / math.sqrt(max(H, Fd))
            self._file = ExpertFile.create(L * E, self._nbytes, lambda k: self._codec.random(k, gen, bound, "cpu"),
                                           self.disk_dir, self._disk[0].request_bytes)
            self._host_rows = aligned_rows(host_rows, self._file.stride, dev.type == "cuda" and self.pinned)
            self.host_pool = self._host_rows[:, :self._nbytes]
            self._host_slot: dict = {}  # key -> the host slot it was last read into
            self._host_done: dict = {}  # host slot -> the last asynchronous copy out of it (event or ticket)
        elif dev.type == "cuda" and self.pinned:  # chunks: one pinned block would round up to a power of two
            self.host_pool = ChunkedPool(pinned_chunks(L * E, self._nbytes), self._nbytes)
            pools = self.host_pool.chunks
        else:
            self.host_pool = torch.empty((L * E, self._nbytes), dtype=torch.uint8)
            pools = [self.host_pool]
        if self._disk is None:
            fill_experts(pools, self._codec, self.seed, 1.0 / math.sqrt(max(H, Fd)), desc="host pool", via=dev)
        self.device_pool = torch.empty((n_slots, self._nbytes), dtype=torch.uint8, device=dev)
        if on_cpu:
            self.device_pool.zero_()  # touch every page now, not during the first copies
        self.shared_pool = torch.empty((L * spec.shared_experts, self._shared_codec.nbytes), dtype=torch.uint8,
                                       device=dev)
        fill_experts([self.shared_pool], self._shared_codec, self.seed + 1, 1.0 / math.sqrt(max(H, Fs)))
        # the decoded expert a packed one is decoded into (on the device; on CUDA another for host experts)
        width = max(0 if self._codec.view_only else 3 * H * Fd,
                    0 if self._shared_codec.view_only or not spec.shared_experts else 3 * H * Fs)
        self._ws = torch.empty(width, dtype=self.dtype, device=dev) if width else None
        self._host_ws = self._ws if on_cpu or self._codec.view_only else torch.empty(3 * H * Fd, dtype=self.dtype)
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
        # the profile's times for this run's work, beside the observed ones (drift.py); needs a profile (Hydra's
        # instantiate hands the run's profile over as a config node: read back as a profile)
        hw = None if self.hardware is None else load_hardware(self.hardware)
        self._drift = None if hw is None else DriftCheck(hw, spec, self._nbytes, dev.type == "cuda" and self.pinned)

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
        if self._drift is not None:
            self._drift.load()
        src = self._host_src(key)
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
            if self._file is not None:  # the host slot is read again only after this copy (read())
                self._host_done[self._host_slot[key]] = e1
        elif mode == "worker":
            ticket = self._worker.submit(dst, src)
            self._slot_ticket[slot] = ticket
            self._events.append(("copy", key, prefetch, ticket, None))
            if self._file is not None:
                self._host_done[self._host_slot[key]] = ticket
        else:
            t0 = time.perf_counter()
            memcpy(dst, src)
            t1 = time.perf_counter()
            self._pending_copies.append(t1 - t0)
            self._fresh.add(slot)
            self._events.append(("copy", key, prefetch, (t0 - self._t0) * 1e3, (t1 - self._t0) * 1e3))

    def setup_disk(self, storage, host_slots: int) -> None:
        """The disk tier (moesim/disk.py), before `setup`: every expert goes to a file in `disk_dir`, host memory
        holds `host_slots` of them (and a scratch slot), and the engine calls read(key, slot) on a host miss."""
        self._disk = (storage, int(host_slots))

    def read(self, key, slot: int) -> None:
        """Read `key`'s bytes from the experts' file into host slot `slot` (a real read: O_DIRECT where it runs,
        diskfile.py), on the calling thread; its copy or host compute then reads that slot."""
        done = self._host_done.pop(slot, None)  # a copy still reading this host slot finishes first
        if done is not None and self.mode == "stream":
            done.synchronize()
        elif done is not None:
            self._worker.wait(done)
        self._file.read(key[0] * self._E + key[1], self._host_rows[slot])
        self._host_slot[key] = slot

    def disk_stats(self) -> dict | None:
        """The disk tier's measured reads (diskfile.ExpertFile.stats), None without one."""
        return None if self._file is None else self._file.stats()

    def _host_src(self, key):
        """The host bytes of expert `key`: its row of the host pool, or with a disk tier its host slot's."""
        if self._file is not None:
            return self.host_pool[self._host_slot[key]]
        return self.host_pool[key[0] * self._E + key[1]]

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
        if self._drift is not None:
            self._drift.layer(device, self._n_tokens)
        if self.device.type == "cuda":
            self._compute_cuda(layer, device, host)
        else:
            self._compute_cpu(layer, device, host)

    def _device_experts(self, layer: int, device) -> None:
        spec, H, Fd, w = self.spec, self.spec.hidden, self.spec.ffn, self._weight
        n_all = self._n_tokens
        x, out, pool, ws, decode = self._x, self._out, self.device_pool, self._ws, self._codec.decode
        for s in range(spec.shared_experts):  # shared experts: every token of the step, weight 1
            block = self._shared_codec.decode(self.shared_pool[layer * spec.shared_experts + s], ws)
            expert_ffn(block, x[:n_all], out[:n_all], H, self._shared_ffn, 1.0)
        routes = self._routes
        for key, slot, n in device:
            r = routes.get(key)
            block = decode(pool[slot], ws)  # the slot's bytes as weights (a view, or decoded into ws)
            if r is None:  # no routing given (driven without `route`): the first n rows, weight 1/top_k
                expert_ffn(block, x[:n], out[:n], H, Fd, w)
            elif len(r) == 2:  # one token: its row, its gate weight (the plain FFN on that row, no gather)
                t = r[0]
                expert_ffn(block, x[t:t + 1], out[t:t + 1], H, Fd, r[1])
            else:
                routed_ffn(block, x, out, H, Fd, r[0], r[1])

    def _host_rows(self, host):
        """What the host experts read: the step's token rows they route (int64 [m], sorted, CPU) and per expert
        (key, the positions of its tokens among those rows, its gate weights: a float or [n, 1]). Without
        routing (driven without `route`), an expert of n tokens reads the first n rows, weight 1/top_k."""
        routes, parts, plan = self._routes, [], []
        for key, n in host:
            r = routes.get(key)
            if r is None:
                rows, gate = torch.arange(n), self._weight
            elif len(r) == 2:  # one token: its row
                rows, gate = torch.tensor([r[0]]), r[1]
            else:
                rows, gate = r[2], r[3]  # the host copies of its rows and gates
            parts.append(rows)
            plan.append((key, rows, gate))
        rows = torch.unique(torch.cat(parts))  # sorted, each row once: the activations that make the trip
        return rows, [(key, torch.searchsorted(rows, r), gate) for key, r, gate in plan]

    def _host_experts(self, plan, m: int) -> None:
        """Host experts from the host pool over the m compacted activation rows in _host_x, summed into
        _host_y[:m] (each over its own rows, `plan` from _host_rows)."""
        H, Fd = self.spec.hidden, self.spec.ffn
        xs, ys = self._host_x[:m], self._host_y[:m]
        ys.zero_()
        for key, idx, gate in plan:
            block = self._codec.decode(self._host_src(key), self._host_ws)
            routed_ffn(block, xs, ys, H, Fd, idx, gate)

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
            h0 = self._now()
            rows, plan = self._host_rows(host)
            m = len(rows)
            self._host_x[:m].copy_(self._x.index_select(0, rows))  # the round trip: the host tokens' rows down...
            self._host_experts(plan, m)
            self._out.index_add_(0, rows, self._host_y[:m])  # ...and their results back to those rows
            h1 = self._now()
            self._events.append(("compute", layer, h0, h1, 0.0, "host"))

    def _compute_cuda(self, layer: int, device, host) -> None:
        cs = self._compute_stream
        input_ready = self._layer_done  # recorded after the previous layer: this layer's input exists then
        if host:  # start the activations' trip down before this layer's device work is queued behind it
            rows, plan = self._host_rows(host)
            m = len(rows)
            ds = self._d2h_stream
            ds.wait_event(input_ready)
            with torch.cuda.stream(ds):  # the host tokens' rows, gathered on the device, then down
                rows_dev = rows.to(self.device)
                self._host_x[:m].copy_(self._x.index_select(0, rows_dev), non_blocking=True)
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
            if self.host_after_device:  # the policy's order: the host experts after the device experts
                e_end.synchronize()
            h0 = self._now()
            self._host_experts(plan, m)
            with torch.cuda.stream(cs):  # after the device experts, in stream order; rows_dev was made on ds,
                rows_dev.record_stream(cs)  # which finished above: cs may use it, and holds it until done
                self._up[:m].copy_(self._host_y[:m], non_blocking=True)
                self._out.index_add_(0, rows_dev, self._up[:m])
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
            if self._file is not None:  # the experts' file is deleted; its stats stay
                self._file.close()

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
        prof, drift = self.profiler, self._drift
        if mode == "stream":
            base, ms = self._base, None
            ms = base.elapsed_time
            for ev in done:
                kind = ev[0]
                if kind == "copy":
                    _, key, prefetch, e0, e1 = ev
                    a, b = ms(e0), ms(e1)
                    prof.copy(key, self._nbytes, a, b, prefetch)
                    if drift is not None:
                        drift.observed_copy(b - a)
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
                        if drift is not None:
                            drift.observed_layer(t_end - t_start)
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
                    if drift is not None:
                        drift.observed_copy(b - a)
                elif kind == "compute":
                    _, layer, start, end, stall, where = ev
                    prof.compute(layer, start, end, stall, where)
                    if drift is not None and where == "device":
                        drift.observed_layer(end - start)
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

    def profile_check(self) -> dict | None:
        """This run's copy and expert FFN times against its hardware profile's for the same work (drift.py), once
        `finish` has run; None without a profile. Its "notes": lines to show where they differ by over 10%."""
        if getattr(self, "_drift", None) is None:
            return None
        return self._drift.result(device_name(self.device))

    def request_stats(self) -> dict:
        """Counts of served requests, as the sim counts them: `stall_free_requests` (device experts whose
        weights were there when their layer could start) and `late_prefetches` (prefetched copies not complete
        at their first use). On CUDA complete once `finish` has run."""
        return {"stall_free_requests": self._stall_free, "late_prefetches": self._late}

    def expert_weights(self, index: int, shared: bool = False) -> torch.Tensor:
        """Routed expert `index` (layer * experts + expert) of the host pool, or with `shared` shared expert
        `index` (layer * shared_experts + s), as compute weights on the host: a new tensor [3 * hidden * ffn]
        (gate rows, up rows, down), decoded from its bytes as compute decodes a slot."""
        if self._file is not None and not shared:
            raise MoesimError("expert_weights: with a disk tier the host pool holds the host cache's slots, not "
                              "every expert")
        codec, pool = (self._shared_codec, self.shared_pool) if shared else (self._codec, self.host_pool)
        return codec.decode(pool[index].cpu(), torch.empty(codec.width, dtype=self.dtype)).clone()

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
            # bytes torch's pinned allocator reserved for the host pool's chunks (CUDA, pinned); None unpinned
            "host_pool_pinned_bytes": self.plan.host_pool_reserved if self.plan.pinned else None,
            # x, out, host x/y, up; the decoded expert(s)
            "workspace_bytes": int(self._x.numel() * self._x.element_size() * 5)
            + sum(int(t.numel() * t.element_size()) for t in {id(t): t for t in (self._ws, self._host_ws)
                                                               if t is not None}.values()),
            "peak_device_allocated_bytes": int(torch.cuda.max_memory_allocated(self.device)) if cuda else None,
            "peak_nvml_used_bytes": self._nvml.peak if cuda and self._nvml is not None else None,
            "nvml_used_before_bytes": self._nvml.before if cuda and self._nvml is not None else None,
            "peak_rss_bytes": peak_rss_bytes(),
        }

    def info(self) -> dict:
        """What ran: device, the experts' storage format and the dtype they compute in, bytes per load, how
        copies ran, threads."""
        return {"device": str(self.device), "device_name": device_name(self.device),
                "weights_format": self.spec.dtype if self.spec is not None else None,
                "weights_dtype": self.dtype_name if self.spec is not None else None,
                "bytes_per_expert": self._nbytes if self.spec is not None else None,
                "copies": self.mode, "pinned": self.device.type == "cuda" and self.pinned,
                "threads": torch.get_num_threads() if self.threads is None else self.threads,
                "torch": torch.__version__}
