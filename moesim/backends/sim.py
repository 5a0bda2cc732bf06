"""The `sim` backend: a cost-model clock for `python -m moesim run backend=sim hardware=h200 ...`.

Three timelines (four with a disk tier), as a GPU server has them (times in ms from the start of the replay):
  - copy engine: one host->device copy at a time, in issue order; a copy starts at
    max(issue time, copy engine free) and takes hardware.copy_ms(bytes_per_expert) (latency + bytes/bw).
  - compute (device): layers one after another. A layer starts at max(previous layer's end, ready time of
    every device expert it needs); the wait beyond the previous layer's end is its stall. It takes the
    sum of expert_ms for each device expert (with that expert's token count) plus the layer's shared
    experts (spec.shared_experts, over all the step's tokens).
  - host compute (CPU): a layer's host experts start when the layer's input exists (the previous layer's
    end) or when the CPU is free, whichever is later, in parallel with the device experts. They take the
    activations' round trip (hardware.activations_ms for min(step tokens, tokens routed to host experts):
    down to the host and the summed output back up, small copies assumed not to queue behind expert
    copies on the copy engine) plus expert_ms(where="host") of each host expert. The layer ends at the
    later of its device and host parts. With `host_after_device` (an offload policy whose system runs them in
    sequence: Fiddler) the host experts start when the device experts end.
  - disk (with the disk tier, moesim/disk.py): an expert's read is storage.requests(bytes per expert) requests
    (one, or the mmap reader's read-around windows), in issue order, each taking storage.read_ms(its bytes) on
    an idle disk: with queue_depth 1 one at a time; with q, a request is submitted once fewer than q are
    outstanding, its latency overlapping theirs, its transfer after theirs. A read is issued when the engine
    finds the host cache missing an expert it needs, and that expert's copy (or host compute) starts no earlier
    than its last request's end.
Issue time: a copy is issued at the compute timeline's current time: a demand miss is found when its layer
is about to run (the previous layer's end); a prefetch the engine issues once layer l is routed is issued at
that same time, queued behind l's own misses, so its copy overlaps l's compute.
Requests: a device expert whose copy is complete when its layer could start (the previous layer's end) is
served stall-free; a prefetched copy that completes after that time is a late prefetch (counted at the
key's first use). `request_stats()` returns both counts; `inflight_bytes()` the copies still queued.
A profile with `serial_copies` (calibrate sets it for device=cpu with inline copies, where a copy holds
the thread that computes) runs copies on the compute timeline instead: a copy, prefetch or not, delays
everything after it; a layer's stall is the copies since the previous layer, and its host experts run after
its device experts.
The replay's own host time (profile fields layer/expert/load_overhead_us, measured by `calibrate` on
device=cpu, 0 for GPUs) is added serially after each layer's compute (per layer, per expert computed, per
load issued since the previous layer), never overlapping a copy: on a CPU the replay, the copies and the
compute share one thread. On device=cpu profiles, copies
also slow the next layer's FFNs by writeback_us_per_mib of the bytes copied since the previous layer.
A step's latency is its last layer's end minus its start (the previous step's end). The rest of the model
(`dense`, moesim/whole.py, where the spec describes it): embeddings and dense layers run at the step's start,
each MoE layer's attention and router before its experts are looked up (so its misses are issued after it),
the LM head at the end; all on the compute timeline. The sim makes no decisions: the engine
(moesim/engine.py) tells it what to load and where to compute.
"""
from __future__ import annotations

import math

from . import Backend
from ..hardware import HardwareProfile, load_hardware


class SimBackend(Backend):
    name = "sim"

    def __init__(self, hardware: HardwareProfile | str = "h200", pinned: bool = True):
        self.hardware = load_hardware(hardware)
        self.pinned = pinned
        self.spec = None
        self.dense = None  # moesim.whole.DenseTimes: the model's non-expert part per step (None: not modelled)
        self._storage = None  # the disk tier's storage (setup_disk), None: every expert in host memory

    def setup(self, spec, n_slots: int, profiler) -> None:
        self.spec, self.n_slots, self.profiler = spec, n_slots, profiler
        self._nbytes = spec.bytes_per_expert  # bytes per copy
        self._copy_ms = self.hardware.copy_ms(spec.bytes_per_expert, self.pinned)
        self._slot_ready = [0.0] * n_slots  # ms: when the last copy into each slot completes
        self._now = 0.0  # ms: end of the last computed layer = issue time of the next copies
        self._copy_free = 0.0  # ms: when the copy engine finishes its queue
        self._host_free = 0.0  # ms: when the CPU finishes its queue
        self._device_ms: dict[int, float] = {}  # n_tokens -> one routed expert's device time
        self._host_ms: dict[int, float] = {}  # n_tokens -> one routed expert's host time
        self._shared_ms: dict[int, float] = {}  # n_tokens -> all shared experts of a layer
        self._add_copy, self._add_compute = profiler.copy, profiler.compute
        self._step, self._n_tokens, self._step_start, self._step_shared_ms = 0, 0, 0.0, 0.0
        self._prefetched: set[int] = set()  # slots whose prefetched copy has not been used yet
        self._stall_free = 0  # device experts whose weights were ready when their layer could start
        self._late = 0  # prefetched copies that completed after their first use could start
        hw = self.hardware
        self._serial = hw.serial_copies
        self._phase = None  # serial: when the copies since the last layer began (None: no copy since)
        self._layer_ms = hw.replay_overhead_ms(0, 0)  # ms, once per layer
        self._expert_ms = hw.expert_overhead_us * 1e-3  # ms per expert computed
        self._load_ms = hw.load_overhead_us * 1e-3  # ms per load
        self._writeback_ms = hw.writeback_ms(spec.bytes_per_expert)  # ms of compute per copy before a layer
        self._loads = 0  # loads since the last computed layer
        self._host_ready: dict = {}  # key -> ms when its last read from disk completes (setup_disk)
        self._disk_free = 0.0  # ms: when the disk finishes its queue
        self._disk_ends: list[float] = []  # ms: the ends of the last queue_depth reads, oldest first
        self.disk_busy_ms = 0.0  # ms the disk spent reading
        self.disk_reads = 0
        if self._storage is not None:
            self._requests = self._storage.requests(spec.bytes_per_expert)

    def setup_disk(self, storage, host_slots: int | None = None) -> None:
        """Experts live on `storage` (moesim.disk.Storage), before or after `setup`: the engine calls read(key,
        slot) before a copy or host compute of an expert the host cache does not hold (the sim needs no slots)."""
        self._storage = storage
        if self.spec is not None:
            self._requests = storage.requests(self.spec.bytes_per_expert)

    def read(self, key, slot: int | None = None) -> None:
        """Read `key`'s weights from disk into host memory: the disk's timeline (see the module docstring), its
        requests issued now; its copy or host compute waits for the last."""
        n, full, last = self._requests
        for r in range(n):
            end = self._request(full if r < n - 1 else last)
        self._host_ready[key] = end
        self.disk_reads += 1

    def _request(self, read_ms: float) -> float:
        q = self._storage.queue_depth
        free = self._disk_free
        if q == 1:
            start = self._now if self._now > free else free
            end = start + read_ms
            busy = read_ms
        else:  # submitted once the request q places ahead has ended; the transfer after the one just ahead
            ends = self._disk_ends
            oldest = ends[0] if len(ends) == q else 0.0
            submit = self._now if self._now > oldest else oldest
            lat = self._storage.latency_us * 1e-3
            xfer = submit + lat if submit + lat > free else free
            end = xfer + (read_ms - lat)
            busy = end - (submit if submit > free else free)  # what the request adds to the disk's busy time
            if len(ends) == q:
                ends.pop(0)
            ends.append(end)
        self._disk_free = end
        self.disk_busy_ms += busy
        return end

    def begin_step(self, step: int, n_tokens: int) -> None:
        self._step, self._n_tokens, self._step_start = step, n_tokens, self._now
        if self.dense is not None:
            self._now += float(self.dense.head[step])  # embeddings and dense layers, before the first MoE layer
        s = self._shared_ms.get(n_tokens)
        if s is None:
            s = self._shared_ms[n_tokens] = self.spec.shared_experts * self.hardware.expert_ms(
                n_tokens, self.spec, "device", shared=True)
        self._step_shared_ms = s

    def begin_layer(self, layer: int) -> None:
        """Layer `layer`'s attention and router run before its experts are known (and looked up)."""
        if self.dense is not None:
            self._now += float(self.dense.attention[self._step, self.dense.cls[layer]])

    def load(self, key, slot: int, prefetch: bool) -> None:
        self._loads += 1
        start = self._now if self._now > self._copy_free else self._copy_free
        if self._storage is not None:  # the expert's read from disk, where it had one, comes first
            r = self._host_ready.get(key, 0.0)
            if r > start:
                start = r
        end = start + self._copy_ms
        self._copy_free = end
        if self._serial:  # the copy holds the thread that computes: nothing else runs meanwhile
            if self._phase is None:
                self._phase = start
            self._now = end
        self._slot_ready[slot] = end
        if prefetch:
            self._prefetched.add(slot)
        elif self._prefetched:
            self._prefetched.discard(slot)  # the slot's earlier prefetched copy was evicted unused
        self._add_copy(key, self._nbytes, start, end, prefetch)

    def inflight_bytes(self) -> int:
        """Bytes of copies issued and not complete at the current issue time (the copy engine's queue,
        which is contiguous: every copy takes the same time)."""
        ahead = self._copy_free - self._now
        if ahead <= 0:
            return 0
        return math.ceil(ahead / self._copy_ms - 1e-9) * self._nbytes

    def request_stats(self) -> dict:
        """Counts of served requests: `stall_free_requests` (device experts ready when their layer could
        start) and `late_prefetches` (prefetched copies that completed after that time, at first use)."""
        return {"stall_free_requests": self._stall_free, "late_prefetches": self._late}

    def compute(self, layer: int, device, host) -> None:
        start = self._now
        free = start if self._phase is None else self._phase  # serial copies: the layer could start before them
        self._phase = None
        ready, device_ms, prefetched = self._slot_ready, self._device_ms, self._prefetched
        duration = self._step_shared_ms + self._writeback_ms * self._loads
        waited = 0
        for _key, slot, n in device:
            r = ready[slot]
            if r > free:
                waited += 1
                if r > start:
                    start = r
            if prefetched and slot in prefetched:  # first use of a prefetched copy
                prefetched.discard(slot)
                if r > free:
                    self._late += 1
            d = device_ms.get(n)
            if d is None:
                d = device_ms[n] = self.hardware.expert_ms(n, self.spec, "device")
            duration += d
        end = start + duration
        self._stall_free += len(device) - waited
        self._add_compute(layer, start, end, start - free, "device")
        if host:  # serial (or the policy's order): after the device part
            end = max(end, self._compute_host(layer, end if self._serial or self.host_after_device else free, host))
        # the replay's own work for this layer, serial and after it, so that it never overlaps a copy (on a
        # CPU the replay, the copies and the compute share one thread); the layer's first copy is issued later
        self._now = end + self._layer_ms + self._expert_ms * (len(device) + len(host)) + self._load_ms * self._loads
        self._loads = 0

    def _compute_host(self, layer: int, input_ready: float, host) -> float:
        """Run `host` [(key, n_tokens)] on the CPU timeline; returns when their output is back on the device."""
        host_ms, hw = self._host_ms, self.hardware
        tokens = min(self._n_tokens, sum(n for _, n in host))
        duration = hw.activations_ms(tokens, self.spec)
        for _key, n in host:
            d = host_ms.get(n)
            if d is None:
                d = host_ms[n] = hw.expert_ms(n, self.spec, "host")
            duration += d
        start = input_ready if input_ready > self._host_free else self._host_free
        if self._storage is not None:  # every host expert read from disk first where it had to be
            for key, _n in host:
                r = self._host_ready.get(key, 0.0)
                if r > start:
                    start = r
        end = self._host_free = start + duration
        self._add_compute(layer, start, end, 0.0, "host")
        return end

    def end_step(self) -> None:
        if self.dense is not None:
            self._now += float(self.dense.tail[self._step])  # final norm and LM head
        self.profiler.step(self._step, self._n_tokens, self._step_start, self._now)

    def finish(self) -> None:
        """Nothing to wait for or release: copies still queued after the last step (unused prefetches) are
        already in the profiler and do not change any step's latency."""

    def device_bytes(self) -> int:
        """Device memory the run holds: the expert slots plus every layer's shared experts (bytes)."""
        s = self.spec
        return self.n_slots * s.bytes_per_expert + s.layers * s.shared_experts * s.bytes_per_shared_expert
