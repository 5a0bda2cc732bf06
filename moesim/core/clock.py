"""The sim backend's clocks, compiled: a copy engine, the device's compute and the host's compute, as
moesim/backends/sim.py keeps them (its module docstring is the model; the same floating-point operations run
in the same order, and tests/test_core.py holds the two to identical events).

    ck = new_clock()                          # float64 [N_CK]: the timelines' state
    start = copy(ck, ready, pf_slot, slot, prefetch, copy_ms, serial, after)
    start, end, free, n_device = device_part(...); end = host_part(...)
    end = disk_read(ck, dq)                   # the disk tier: one read from disk, issued now

Times are ms from the start of the replay. `ready` (float64 [slots]) holds when the last copy into each slot
completes, `pf_slot` (uint8 [slots]) whether that copy was a prefetch not used yet.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from .state import HOT

# rows of the clock state ck (float64): NOW: end of the last computed layer = issue time of the next copies;
# COPY_FREE: when the copy engine finishes its queue; HOST_FREE: when the CPU finishes its queue; PHASE: with
# serial copies, when the copies since the last layer began (-1: none); LOADS: copies since the last layer;
# OWED: the offload policy's host share owed (strategies/host.py Host.owed); with a disk tier (moesim/disk.py):
# DISK_FREE, when the disk finishes its queue; DISK_BUSY, the ms it spent reading
NOW, COPY_FREE, HOST_FREE, PHASE, LOADS, OWED, DISK_FREE, DISK_BUSY = range(8)
N_CK = 8
# rows of the request counters cnt (int64), besides moesim.cache.Counters' fields (see moesim/core/loop.py)
STALL_FREE, LATE = 0, 1


def new_clock() -> np.ndarray:
    ck = np.zeros(N_CK)
    ck[PHASE] = -1.0
    return ck


@njit(**HOT)
def copy(ck, ready, pf_slot, slot, prefetch, copy_ms, serial, after):
    """SimBackend.load: queue one expert copy into `slot`, starting no earlier than `after` (ms: its read from
    disk ends, 0 without one); returns its start (its end is ready[slot])."""
    ck[LOADS] += 1.0
    now, free = ck[NOW], ck[COPY_FREE]
    start = now if now > free else free
    if after > start:
        start = after
    end = start + copy_ms
    ck[COPY_FREE] = end
    if serial:  # the copy holds the thread that computes: nothing else runs meanwhile
        if ck[PHASE] < 0.0:
            ck[PHASE] = start
        ck[NOW] = end
    ready[slot] = end
    pf_slot[slot] = 1 if prefetch else 0  # a demand copy replaces an unused prefetched one
    return start


@njit(**HOT)
def inflight_bytes(ck, copy_ms, nbytes):
    """SimBackend.inflight_bytes: bytes of copies issued and not complete at the current issue time."""
    ahead = ck[COPY_FREE] - ck[NOW]
    if ahead <= 0:
        return 0
    return math.ceil(ahead / copy_ms - 1e-9) * nbytes


@njit(**HOT)
def device_part(ck, ready, pf_slot, served, out, counts, wa, wb, device_ms, shared_ms, writeback_ms):
    """SimBackend.compute's device part for the wave ids[wa:wb] (out[1]: slots, out[2]: 1 where computed on the
    host): waits for every device expert's copy, sums their times in row order. Returns (start, end, the time
    the layer could have started, device experts); counts stall-free requests and late prefetches in `served`."""
    start = ck[NOW]
    free = start if ck[PHASE] < 0.0 else ck[PHASE]  # serial copies: the layer could start before them
    ck[PHASE] = -1.0
    duration = shared_ms + writeback_ms * ck[LOADS]
    waited = 0
    n = 0
    for i in range(wa, wb):
        if out[2, i - wa]:
            continue
        slot = out[1, i - wa]
        r = ready[slot]
        if r > free:
            waited += 1
            if r > start:
                start = r
        if pf_slot[slot]:  # first use of a prefetched copy
            pf_slot[slot] = 0
            if r > free:
                served[LATE] += 1
        duration += device_ms[counts[i]]
        n += 1
    served[STALL_FREE] += n - waited
    return start, start + duration, free, n


@njit(**HOT)
def disk_read(ck, dq):
    """SimBackend.read: one expert read from disk, its requests issued now; returns when the last ends. dq:
    moesim.disk.disk_queue's state [ms of a request, latency ms, queue depth q, requests so far, requests per
    expert n, ms of the last request, the ends of the last q requests (a ring)]."""
    n = int(dq[4])
    end = 0.0
    for r in range(n):
        end = _disk_request(ck, dq, dq[0] if r < n - 1 else dq[5])
    return end


@njit(**HOT)
def _disk_request(ck, dq, read_ms):
    """One request of `read_ms` on an idle disk, issued now; returns when it ends."""
    now, free = ck[NOW], ck[DISK_FREE]
    q = int(dq[2])
    if q == 1:
        end = (now if now > free else free) + read_ms
        busy = read_ms
    else:  # submitted once the request q places ahead has ended; the transfer after the one just ahead
        i = int(dq[3])
        oldest = dq[6 + i % q]  # 0.0 until q requests were issued
        submit = now if now > oldest else oldest
        lat = dq[1]
        xfer = submit + lat if submit + lat > free else free
        end = xfer + (read_ms - lat)
        busy = end - (submit if submit > free else free)
        dq[6 + i % q] = end
        dq[3] = i + 1
    ck[DISK_FREE] = end
    ck[DISK_BUSY] += busy
    return end


@njit(**HOT)
def host_part(ck, out, counts, wa, wb, n_tokens, host_ms, act_ms, input_ready, hready, ids, base):
    """SimBackend._compute_host for the wave's host experts (out[2] == 1): the activations' round trip, then
    each expert on the CPU timeline, starting no earlier than each one's read from disk ends (hready[key], where
    the run has a disk tier: len(hready) > 0; the wave's keys are base + ids[i]). Returns (start, end)."""
    tokens = 0
    for i in range(wa, wb):
        if out[2, i - wa]:
            tokens += counts[i]
    duration = act_ms[min(n_tokens, tokens)]
    for i in range(wa, wb):
        if out[2, i - wa]:
            duration += host_ms[counts[i]]
    hf = ck[HOST_FREE]
    start = input_ready if input_ready > hf else hf
    if len(hready):
        for i in range(wa, wb):
            if out[2, i - wa]:
                r = hready[base + ids[i]]
                if r > start:
                    start = r
    end = start + duration
    ck[HOST_FREE] = end
    return start, end
