"""The compiled drivers: every step of a trace through the cache state, the compiled policies and (timed) the
sim clocks. `run_sim` is the timed replay of moesim.engine.replay + moesim.backends.sim.SimBackend with every
built-in cache policy, prefetcher and offload policy; `run_hits` is the cache-only replay (hit counts, curves);
`run_hits_budgets` is the learned policy's at several budgets in one pass (moesim.core.budgets_ahead);
`time_hits` times hits decided already (a demand cache's, keeping sums).

Per step and layer (request position pos = step * L + layer), as moesim/engine.py serves it: look up the
layer's experts (pinned with a mark used once), decide each miss (fetch, or compute on the host), prefetch
the keys the prefetcher's table names, compute, move on (which unpins). A layer wider than its partition
runs in waves, hits first. Front ends (moesim/core/__init__.py) build the arguments; moesim/core/parts.py
turns policy objects into them.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from .clock import (COPY_FREE, HOST_FREE, LOADS, NOW, OWED, PHASE, copy, device_part, disk_read, host_part,
                    inflight_bytes)
from .policies import LEARNED, REFUSING, learned_request, evict_one, on_access, on_insert, on_request
from .requests import width
from .state import (CAP, FREE, HOT, NFREE, PART, PFU, PIN, RES, SIZE, SLOT, UNIT, next_after, reset)

ALL_PINNED = -1  # kernel status: a miss found every resident of its partition pinned
LFU_OVERFLOW = -3  # kernel status: LFU's aging factor overflowed (the reference raises OverflowError there)
# rows of the counters array cnt (int64): moesim.cache.Counters and PrefetchCounters
REQUESTS, HITS, LOADS_N, PF_LOADS, EVICTIONS, HOST_COMPUTES, PF_USED, PF_WASTED, PF_UNUSED, STREAMS = range(10)
N_CNT = 10
# offload kinds (moesim/core/parts.py): none or fetch; static_split (host by layer); host; cost; fiddler
OFF_NONE, OFF_STATIC_SPLIT, OFF_HOST, OFF_COST, OFF_FIDDLER = range(5)
# rows of run_sim's `agg` (sums kept instead of events), then AGG + layer: that layer's device stall (ms)
AGG_STALL, AGG_DEVICE, AGG_HOST = range(3)
AGG = 3
# offload decisions (strategies.OffloadPolicy.on_miss): fetch, host, host_and_load, stream
FETCH, HOST, HOST_AND_LOAD, STREAM = range(4)


@njit(**HOT)
def lookup(I, F, seqs, nxt, prm, cnt, pos, mark, layer, ids, a, b, out):
    """Cache.lookup: pin the request ids[a:b] at `pos`, tell the policy the hits in row order, count.
    out[0, i - a]: -2 for a hit, else -1; out[1, i - a]: a hit's slot; out[2, i - a] = 0.
    Returns the hits, or LFU_OVERFLOW."""
    p = I[PART, layer]
    base = layer * prm.E
    hits = 0
    for i in range(a, b):  # pin all; hits in row order
        kid = base + ids[i]
        I[PIN, kid] = mark
        out[2, i - a] = 0
        if I[RES, kid] == 1:
            out[0, i - a] = -2
            out[1, i - a] = I[SLOT, kid]
            hits += 1
            if I[PFU, kid]:  # a prefetched key's first request: the prefetch was used
                I[PFU, kid] = 0
                cnt[PF_USED] += 1
                cnt[PF_UNUSED] -= 1
        else:
            out[0, i - a] = -1
    on_request(I, F, seqs, prm, p, pos)  # at every request: LFU ages, LFRU's clock moves
    if prm.code == 2 and F[UNIT, p] == math.inf:
        return LFU_OVERFLOW
    if hits > 0 and prm.code != 1:
        for i in range(a, b):
            if out[0, i - a] == -2:
                on_access(I, F, prm, p, pos, base + ids[i], nxt[i] if prm.code == 4 else 0)
    cnt[REQUESTS] += b - a
    cnt[HITS] += hits
    return hits


@njit(**HOT)
def insert(I, F, seqs, prm, cnt, pos, mark, kid, next_use, prefetched):
    """Cache.insert: make `kid` resident (a free slot, else the policy's victim among unpinned residents).
    Returns its slot, or -1 if every resident of its partition is pinned. cnt[EVICTIONS] counts victims; the
    caller reads who was evicted from nothing (the sim needs only slots)."""
    p = I[PART, kid // prm.E]
    if I[NFREE, p] > 0:
        I[NFREE, p] -= 1
        slot = I[FREE, p * prm.cm + I[NFREE, p]]
    else:
        v = evict_one(I, F, prm, p, mark, pos, prefetched)
        if v < 0:
            return -1
        slot = I[SLOT, v]
        I[RES, v] = 0
        I[SIZE, p] -= 1
        cnt[EVICTIONS] += 1
        if I[PFU, v]:  # prefetched, never requested: its copy was wasted
            I[PFU, v] = 0
            cnt[PF_WASTED] += 1
            cnt[PF_UNUSED] -= 1
    on_insert(I, F, seqs, prm, p, pos, kid, next_use, prefetched)
    I[RES, kid] = 1
    I[SLOT, kid] = slot
    I[SIZE, p] += 1
    cnt[LOADS_N] += 1
    if prefetched:
        cnt[PF_LOADS] += 1
        I[PFU, kid] = 1
        cnt[PF_UNUSED] += 1
    return slot


@njit(**HOT)
def hits_first(I, prm, layer, ids, nxt, counts, a, b, tids, tnxt, tcnt, torder):
    """A request wider than its partition is served in waves of at most `cap` experts, hits first (the
    engine's `order`): copy ids[a:b] (and their next uses and token counts, where given) into the t-arrays,
    the resident ones first, each group in row order; torder[j] = the element copied to j."""
    base = layer * prm.E
    n = 0
    for resident in (1, 0):
        for i in range(a, b):
            if (I[RES, base + ids[i]] == 1) == (resident == 1):
                tids[n] = ids[i]
                if len(nxt):
                    tnxt[n] = nxt[i]
                if len(counts):
                    tcnt[n] = counts[i]
                torder[n] = i
                n += 1


@njit(**HOT)
def order_wide(I, prm, layer, ids, nxt, counts, a, b, tids, tnxt, tcnt, torder):
    """A request wider than its partition, ids[a:b] (with its next uses and token counts, where given), put in
    place in the order its waves serve it, hits first (hits_first, through the t-arrays); torder[j] = the
    element now at a + j. The callers keep their own copy of the arrays where a request may be wide, and read
    every request from it, narrow or wide: an array variable reassigned per layer (the copies or not) costs two
    atomic reference counts per layer and keeps the compiler from holding the array's pointers, and copying
    every request into scratch arrays had cost a fifth of a timed replay."""
    hits_first(I, prm, layer, ids, nxt, counts, a, b, tids, tnxt, tcnt, torder)
    for j in range(b - a):
        ids[a + j] = tids[j]
        if len(nxt):
            nxt[a + j] = tnxt[j]
        if len(counts):
            counts[a + j] = tcnt[j]


@njit(cache=True, nogil=True)
def request_arrays(ids, nxt, counts, I, prm, w):
    """(ids, nxt, counts): copies where some request (w ids at most) is wider than the smallest partition, which
    order_wide reorders in place; else the arrays themselves."""
    least = w
    for p in range(prm.P):
        least = min(least, I[CAP, p])
    if w <= least:
        return ids, nxt, counts
    return ids.copy(), nxt.copy(), counts.copy()


@njit(cache=True, nogil=True)
def run_hits(I, F, nxt, seqs, prm, ids, ptr, resets, flags, cnt):
    """Cache-only replay into `cnt`: (status, position of a failure). With len(flags) == len(ids), flags[i] = 1
    where request element i was a hit."""
    L = prm.L
    w = width(ptr)
    out = np.zeros((3, w), np.int64)
    tids = np.empty(w, ids.dtype)  # a wide request, hits first (see order_wide)
    tnxt = np.empty(w if len(nxt) else 0, np.int64)
    torder = np.empty(w, np.int64)
    no_counts = np.empty(0, np.int32)
    src, src_nxt, _ = request_arrays(ids, nxt, no_counts, I, prm, w)  # every request is read from these
    mark = 0  # pin mark of the running request (or wave)
    for s in range(len(resets)):
        if resets[s]:
            cnt[PF_WASTED] += cnt[PF_UNUSED]
            cnt[PF_UNUSED] = 0
            reset(I, F, prm)
        for layer in range(L):
            pos = s * L + layer
            a, b = ptr[pos], ptr[pos + 1]
            cap = I[CAP, I[PART, layer]]
            wide = b - a > cap
            if wide:
                order_wide(I, prm, layer, src, src_nxt, no_counts, a, b, tids, tnxt, no_counts, torder)
            if prm.code == LEARNED:  # the whole request (all its waves) moves every key's history on
                learned_request(I, F, seqs, prm, I[PART, layer], pos, layer, ids, a, b)
            lo, hi = a, b  # element positions: out[:, i - wa] is element i's
            for wa in range(lo, max(hi, lo + 1), cap):  # waves (one, mostly; an empty request is one too)
                wb = min(wa + cap, hi)
                mark += 1
                h = lookup(I, F, seqs, src_nxt, prm, cnt, pos, mark, layer, src, wa, wb, out)
                if h < 0:
                    return h, pos
                if h < wb - wa:
                    base = layer * prm.E
                    for i in range(wa, wb):  # misses in row order
                        if out[0, i - wa] == -2:
                            continue
                        slot = insert(I, F, seqs, prm, cnt, pos, mark, base + src[i],
                                      src_nxt[i] if prm.code == 4 else 0, False)
                        if slot < 0:
                            if prm.code != REFUSING:
                                return ALL_PINNED, pos
                            cnt[STREAMS] += 1  # nothing may be evicted: streamed (VisitCount.refuses)
                    if prm.code == 2 and F[UNIT, I[PART, layer]] == math.inf:
                        return LFU_OVERFLOW, pos
                if len(flags):
                    for i in range(wa, wb):
                        flags[torder[i - a] if wide else i] = out[0, i - wa] == -2
    return 0, 0


@njit(cache=True, nogil=True)
def run_hits_budgets(I, F, seqs, prm, ids, ptr, resets, flags, cnt):
    """run_hits of the learned policy at K budgets at once, per layer (state: parts.cache_state(copies=...)): the
    partition of budget k and layer l is k * L + l. The policy's history, and its network's outputs at each
    request position, are the trace's whatever a cache holds: they move once per request for every budget
    (a victim of budget k's partition reads them at its trace key). flags uint8 [K, N]: 1 where element i hit at
    budget k; cnt int64 [K, N_CNT]. Every request fits every partition (no waves: the caller checks).
    Returns (status, position, budget)."""
    L = prm.L
    K = len(flags)
    out = np.zeros((3, width(ptr)), np.int64)
    none = np.empty(0, np.int64)
    mark = 0
    for s in range(len(resets)):
        if resets[s]:
            reset(I, F, prm)
        for layer in range(L):
            pos = s * L + layer
            a, b = ptr[pos], ptr[pos + 1]
            learned_request(I, F, seqs, prm, layer, pos, layer, ids, a, b)
            for k in range(K):
                v = k * L + layer  # this budget's copy of the layer
                c = cnt[k]
                mark += 1
                h = lookup(I, F, seqs, none, prm, c, pos, mark, v, ids, a, b, out)
                if h < b - a:
                    base = v * prm.E
                    for i in range(a, b):
                        if out[0, i - a] != -2 and insert(I, F, seqs, prm, c, pos, mark, base + ids[i], 0, False) < 0:
                            return ALL_PINNED, pos, k
                for i in range(a, b):
                    flags[k, i] = out[0, i - a] == -2
    return 0, 0, 0


# what became of a request element in a replay decided before it is timed (time_hits): as uint8 flags, 1 is a hit
FETCHED, DECIDED_HIT, ON_HOST, HOST_LOADED = 0, 1, 2, 3  # FETCHED: copied and waited for (a load, or streamed)


@njit(cache=True, nogil=True)
def time_hits(dec, ids, ptr, E, counts, step_tokens, shared_ms, device_ms, host_ms, act_ms, copy_ms, own, serial,
              host_after, dattn, dcls, dhead, dtail, served, ck, agg, pkeys, pend):
    """The timed replay of a cache whose decisions are known already (dec: uint8 [N], what became of element i:
    FETCHED, DECIDED_HIT, ON_HOST, or HOST_LOADED: computed on the host, its key loaded behind it; from
    moesim.core.simulate: slots.py, run_hits, budgets_ahead), no disk tier, no request wider than its partition,
    keeping sums (`agg`): run_sim's steps, sums, served requests and clocks bit for bit (the operations of
    clock.copy, device_part and host_part in their order), with the clocks in local variables, not in `ck`'s
    slots. host_after: the offload policy's host part waits for the device part (oi[4]). Prefetches, if any
    (len(pend) = S * L): the keys pkeys[pend[pos - 1]:pend[pos]] are copied after request position pos's misses.
    Each key's last copy ends at ready[key] (run_sim's slot of a resident key is its own), and whether it was a
    prefetch not used yet is pf[key]. The cache counters are the deciding kernel's. Returns steps [S, 6] (see
    run_sim)."""
    S, L = len(step_tokens), len(dcls)
    ready = np.zeros(L * E)  # ms: the end of each key's last copy
    pf = np.zeros(L * E, np.uint8)  # its last copy was a prefetch not used yet
    prefetching = len(pend) > 0
    p_done = 0  # prefetches issued so far
    late = served[1]
    steps = np.empty((S, 6))
    n_cp = 0
    n_cm = 0
    now, cfree, phase, hfree = ck[NOW], ck[COPY_FREE], ck[PHASE], ck[HOST_FREE]
    stall, busy, hbusy = agg[AGG_STALL], agg[AGG_DEVICE], agg[AGG_HOST]
    free_runs = served[0]
    o_layer, o_expert, o_load, o_wb = own[0], own[1], own[2], own[3]
    for s in range(S):
        step_start = now
        now += dhead[s]
        shared = shared_ms[s]
        n_tokens = step_tokens[s]
        for layer in range(L):
            now += dattn[s, dcls[layer]]
            pos = s * L + layer
            a, b = ptr[pos], ptr[pos + 1]
            base = layer * E
            loads = 0.0
            n_host = 0
            for i in range(a, b):  # clock.copy of each copied miss, in row order
                d = dec[i]
                n_host += d >= ON_HOST
                if d == FETCHED or d == HOST_LOADED:
                    loads += 1.0
                    now, cfree, phase = _copy_now(now, cfree, phase, copy_ms, serial)
                    ready[base + ids[i]] = cfree
                    if prefetching:
                        pf[base + ids[i]] = 0  # a demand copy replaces an unused prefetched one
            if prefetching:  # then the prefetches, in their order
                while p_done < pend[pos]:
                    kid = pkeys[p_done]
                    p_done += 1
                    loads += 1.0
                    now, cfree, phase = _copy_now(now, cfree, phase, copy_ms, serial)
                    ready[kid] = cfree
                    pf[kid] = 1
            n_cp += int(loads)
            start = now  # clock.device_part
            free = start if phase < 0.0 else phase
            phase = -1.0
            duration = shared + o_wb * loads
            waited = 0
            for i in range(a, b):
                if dec[i] >= ON_HOST:
                    continue
                kid = base + ids[i]
                r = ready[kid]
                if r > free:
                    waited += 1
                    if r > start:
                        start = r
                if prefetching and pf[kid]:  # first use of a prefetched copy
                    pf[kid] = 0
                    if r > free:
                        late += 1
                duration += device_ms[counts[i]]
            free_runs += b - a - n_host - waited
            end = start + duration
            stall += start - free  # _computed's sums
            busy += end - start
            agg[AGG + layer] += start - free
            n_cm += 1
            if n_host:  # clock.host_part: after the device part (serial, or the policy's order) or beside it
                tokens = 0
                for i in range(a, b):
                    if dec[i] >= ON_HOST:
                        tokens += counts[i]
                hdur = act_ms[min(n_tokens, tokens)]
                for i in range(a, b):
                    if dec[i] >= ON_HOST:
                        hdur += host_ms[counts[i]]
                inp = end if serial or host_after else free
                hs = inp if inp > hfree else hfree
                he = hs + hdur
                hfree = he
                hbusy += he - hs
                n_cm += 1
                end = max(end, he)
            now = end + o_layer + o_expert * (b - a) + o_load * loads
        now += dtail[s]
        steps[s, 0] = s
        steps[s, 1] = n_tokens
        steps[s, 2] = step_start
        steps[s, 3] = now
        steps[s, 4] = n_cp
        steps[s, 5] = n_cm
    ck[NOW], ck[COPY_FREE], ck[PHASE], ck[LOADS], ck[HOST_FREE] = now, cfree, phase, 0.0, hfree
    agg[AGG_STALL], agg[AGG_DEVICE], agg[AGG_HOST] = stall, busy, hbusy
    served[0] = free_runs
    served[1] = late
    return steps


@njit(**HOT)
def _copy_now(now, cfree, phase, copy_ms, serial):
    """clock.copy on clocks held in local variables (time_hits), no disk tier: (now, when the copy engine is free
    again = the copy's end, phase)."""
    start = now if now > cfree else cfree
    if 0.0 > start:  # `after`: no disk tier
        start = 0.0
    end = start + copy_ms
    if serial:  # the copy holds the thread that computes
        if phase < 0.0:
            phase = start
        now = end
    return now, end, phase


@njit(**HOT)
def host_read(dI, dF, dseqs, dkpos, dkoff, dprm, dcnt, pos, dmark, kid, one, onxt, dout, ck, hready, dq):
    """moesim.disk.DiskTier.need, then SimBackend.read: `kid` looked up in the disk tier's host cache (state dI,
    dF; one pool; its counters dcnt) pinned with `dmark`, and where it misses, inserted and read from disk:
    hready[kid] = the read's end. Returns 0 or a kernel status."""
    E = dprm.E
    layer = kid // E
    one[0] = kid - layer * E
    nu = next_after(dI, dkpos, dkoff, kid, pos) if dprm.code == 4 else 0  # Belady: the key's next request
    onxt[0] = nu
    h = lookup(dI, dF, dseqs, onxt, dprm, dcnt, pos, dmark, layer, one, 0, 1, dout)
    if h != 0:
        return h if h < 0 else 0
    if insert(dI, dF, dseqs, dprm, dcnt, pos, dmark, kid, nu, False) < 0:
        dcnt[STREAMS] += 1  # every host slot pinned, or the policy refuses: read for this use only
    if dprm.code == 2 and dF[UNIT, dI[PART, layer]] == math.inf:
        return LFU_OVERFLOW
    hready[kid] = disk_read(ck, dq)
    return 0


@njit(**HOT)
def offload_decision(ck, oi, odev, ohl, oshare, ofaster, oroom, opart, oload, kid, layer, n, step_tokens):
    """strategies/{static_split,host,cost,fiddler}.py on_miss, from the arrays moesim/core/parts.py made of the
    policy after its setup: FETCH, HOST, HOST_AND_LOAD (in the background) or STREAM.
    oi: [kind, fill_first, load, min_batch (static_split; 0: never streams), host_after_device, scratch slots,
    loads_per_layer (-1: no cap)]; oload [L]: background loads per layer in the current step;
    odev [L * E]: the device set (always fetched); ohl [L]: host layers (static_split); oshare, ofaster [max
    tokens + 1]: the host share and cost's `fetch is faster` (fiddler's `streams`), per token count; oroom
    [partitions] and opart [L]: fill_first's room left and each layer's partition. `step_tokens`: the step's."""
    kind = oi[0]
    if kind == OFF_STATIC_SPLIT:
        if not ohl[layer]:
            return FETCH
        return STREAM if oi[3] > 0 and step_tokens >= oi[3] else HOST
    if odev[kid]:
        return FETCH
    if kind == OFF_FIDDLER:
        return STREAM if ofaster[n] else HOST
    if kind == OFF_COST and ofaster[n]:
        return 0
    if oi[1]:  # fill_first (Host.other_miss)
        q = opart[layer]
        if oroom[q] > 0:
            oroom[q] -= 1
            return FETCH
    share = oshare[n]
    if share < 1.0:
        ck[OWED] += share  # error diffusion: over n misses, round(n * share) go to the host, evenly spread
        if ck[OWED] < 1.0 - 1e-12:
            return FETCH
        ck[OWED] -= 1.0
    if not oi[2]:
        return HOST
    if oi[6] >= 0:  # loads_per_layer (Host._host)
        if oload[layer] >= oi[6]:
            return HOST
        oload[layer] += 1
    return HOST_AND_LOAD


@njit(cache=True, nogil=True)
def run_sim(I, F, nxt, seqs, kpos, koff, prm, ids, counts, ptr, resets, step_tokens, shared_ms, device_ms, host_ms,
            act_ms, copy_ms, own, serial, nbytes, n_slots, pf, pf_rows, pf_cap, pf_flat, oi, odev, ohl, oshare, ofaster,
            oroom, opart, oload, host_cap, cnt, served, ck, record, dattn, dcls, dhead, dtail, agg, dI, dF, dseqs,
            dkpos, dkoff, dprm, dcnt, hready, dq):
    """The timed replay (moesim.engine.replay through moesim.backends.sim.SimBackend) into `cnt` (counters),
    `served` (stall-free requests, late prefetches) and `ck` (clocks).
    counts: tokens per request element; shared_ms [S]: a step's shared experts per layer; device_ms, host_ms
    [max tokens + 1]: one routed expert's time by its tokens; act_ms [max step tokens + 1]: the activations'
    round trip by tokens; own: the profile's replay costs in ms [per layer, per expert, per load, write-back per
    load]; serial: the profile's serial_copies; pf: int16 [S * L, lookahead, width] the prefetcher's table
    (table[pf_rows[pos], d - 1] ranks layer (layer + d) % L's experts, -1 past the ranking; pf_rows[pos] -1: no
    prediction; pf_flat: one ranking over the layers ahead, strategies/prefetch_table.py);
    pf_cap, host_cap: bytes queued on the copy engine above which no prefetch / background load is issued
    (-1: no cap); the o* arrays: see offload_decision. dattn [S, 2], dcls [L], dhead [S], dtail [S]: the dense
    part's times (moesim.whole.DenseTimes: each layer's attention before its lookups, the head before the first
    layer, the tail after the last).
    record: also return the decisions as another backend executes them (`script` below; else empty arrays).
    agg: float64 [AGG + L] to keep sums instead of events (copies and computes come back empty; steps still
    count them): the devices' stall, device and host compute ms (AGG_* rows), then each layer's stall; empty:
    keep every event.
    The disk tier (moesim/disk.py), where dq[0] >= 0: its host cache's state dI, dF, dseqs, dkpos, dkoff and
    constants dprm (as the cache's; one pool), its counters dcnt; hready float64 [L * E]: when each key's last
    read from disk ends; dq: the disk's queue (moesim.disk.disk_queue; read and updated by
    clock.disk_read). Every miss (and prefetch) asks the host cache first (host_read).
    Returns (status, position, steps [S, 6], copies [C, 7], computes [M, 5], waves [V, 3], served [R, 4],
    step_waves [S]): steps, copies[:, :6] and computes are the rows the Profiler would hold (moesim/profiler.py:
    _STEP_COLUMNS, COPY_COLUMNS, COMPUTE_COLUMNS), copies[:, 6] each copy's slot. The script: per computed
    layer (or wave) in order, waves = (layer, copies issued before it, end of its rows in `served`); served =
    (key, slot, tokens, 1 if computed on the host) per expert of it in row order; step_waves: waves so far at
    each step's end."""
    L, E = prm.L, prm.E
    S = len(resets)
    w = width(ptr)
    out = np.zeros((3, w), np.int64)
    tids = np.empty(w, ids.dtype)  # a wide request, hits first (see order_wide)
    tnxt = np.empty(w if len(nxt) else 0, np.int64)
    tcnt = np.empty(w, counts.dtype)
    torder = np.empty(w, np.int64)
    src, src_nxt, src_cnt = request_arrays(ids, nxt, counts, I, prm, w)  # every request is read from these
    disk = dq[0] >= 0.0
    one, onxt, dout = np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros((3, 1), np.int64)  # host_read's
    dmark = 0  # pin mark of the host cache's running request
    steps = np.empty((S, 6))
    keep = len(agg) == 0
    computes = np.empty((S * L if keep else 1, 5))  # one per layer, more in waves or with host experts
    n_cm = 0
    copies = np.empty((max(1024, len(ids) // 4) if keep else 1, 7))
    n_cp = 0
    waves = np.empty((S * L if record else 0, 3), np.int64)
    n_wv = 0
    rows = np.empty((len(ids) if record else 0, 4), np.int64)
    n_rows = 0
    step_waves = np.zeros(S if record else 0, np.int64)
    n_scratch = oi[5]  # scratch slots after the cache's n_slots (streamed experts)
    n_ready = max(n_slots + n_scratch, 1)
    ready = np.zeros(n_ready)  # ms: when the last copy into each slot completes
    pf_slot = np.zeros(n_ready, np.uint8)  # the slot's last copy was a prefetch not used yet
    D = pf.shape[1]
    mark = 0  # pin mark of the running request (or wave)
    gone = 0  # loads less evictions at the last reset: the residents are cnt[LOADS_N] - cnt[EVICTIONS] - gone
    for s in range(S):
        if resets[s]:
            cnt[PF_WASTED] += cnt[PF_UNUSED]  # reset away before their first request
            cnt[PF_UNUSED] = 0
            reset(I, F, prm)
            gone = cnt[LOADS_N] - cnt[EVICTIONS]
        step_start = ck[NOW]
        ck[NOW] += dhead[s]
        oload[:] = 0  # Host.begin_step
        shared = shared_ms[s]
        n_tokens = step_tokens[s]
        for layer in range(L):
            ck[NOW] += dattn[s, dcls[layer]]  # the layer's attention and router: its experts are known after it
            pos = s * L + layer
            a, b = ptr[pos], ptr[pos + 1]
            cap = I[CAP, I[PART, layer]]
            wide = b - a > cap  # waves of at most `cap` experts, hits first
            if wide:
                order_wide(I, prm, layer, src, src_nxt, src_cnt, a, b, tids, tnxt, tcnt, torder)
            if prm.code == LEARNED:  # the whole request (all its waves) moves every key's history on
                learned_request(I, F, seqs, prm, I[PART, layer], pos, layer, ids, a, b)
            lo, hi = a, b  # element positions: out[:, i - wa] is element i's
            base = layer * E
            for wa in range(lo, max(hi, lo + 1), cap):  # an empty request still computes (shared experts)
                wb = min(wa + cap, hi)
                mark += 1
                h = lookup(I, F, seqs, src_nxt, prm, cnt, pos, mark, layer, src, wa, wb, out)
                if h < 0:
                    return h, pos, steps[:0], copies[:0], computes[:0], waves[:0], rows[:0], step_waves[:0]
                n_host = 0
                n_stream = 0
                for i in range(wa, wb):  # misses in row order: fetch, compute on the host, or stream
                    if out[0, i - wa] == -2:
                        continue
                    kid = base + src[i]
                    nu = src_nxt[i] if prm.code == 4 else 0
                    if disk:  # its copy, or its host compute, reads it from host memory
                        dmark += 1
                        h = host_read(dI, dF, dseqs, dkpos, dkoff, dprm, dcnt, pos, dmark, kid, one, onxt, dout, ck,
                                      hready, dq)
                        if h < 0:
                            return h, pos, steps[:0], copies[:0], computes[:0], waves[:0], rows[:0], step_waves[:0]
                    after = hready[kid] if disk else 0.0
                    decision = FETCH if oi[0] == OFF_NONE else offload_decision(
                        ck, oi, odev, ohl, oshare, ofaster, oroom, opart, oload, kid, layer, src_cnt[i], n_tokens)
                    if decision != FETCH and decision != STREAM:
                        out[2, i - wa] = 1
                        n_host += 1
                        cnt[HOST_COMPUTES] += 1
                        if decision == HOST_AND_LOAD and (host_cap < 0 or inflight_bytes(ck, copy_ms, nbytes) + nbytes <= host_cap):
                            slot = insert(I, F, seqs, prm, cnt, pos, mark, kid, nu, False)  # nobody waits for it
                            if slot >= 0:
                                if keep:
                                    copies, n_cp = _issue(copies, n_cp, ck, ready, pf_slot, slot, False, copy_ms,
                                                          serial, layer, src[i], nbytes, after)
                                else:
                                    copy(ck, ready, pf_slot, slot, False, copy_ms, serial, after)
                                    n_cp += 1
                        continue
                    slot = -1 if decision == STREAM else insert(I, F, seqs, prm, cnt, pos, mark, kid, nu, False)
                    if slot < 0:  # streamed (the decision, or a policy that refuses to evict): the cache never sees it
                        if decision != STREAM and prm.code != REFUSING:
                            return (ALL_PINNED, pos, steps[:0], copies[:0], computes[:0], waves[:0], rows[:0],
                                    step_waves[:0])
                        slot = n_slots + n_stream % n_scratch  # a scratch slot in turn
                        n_stream += 1
                        cnt[STREAMS] += 1
                    out[1, i - wa] = slot
                    if keep:
                        copies, n_cp = _issue(copies, n_cp, ck, ready, pf_slot, slot, False, copy_ms, serial, layer,
                                              src[i], nbytes, after)
                    else:  # sums only: no row, and none of _issue's reference counting per copy
                        copy(ck, ready, pf_slot, slot, False, copy_ms, serial, after)
                        n_cp += 1
                if prm.code == 2 and F[UNIT, I[PART, layer]] == math.inf:
                    return (LFU_OVERFLOW, pos, steps[:0], copies[:0], computes[:0], waves[:0], rows[:0],
                            step_waves[:0])
                row = pf_rows[pos] if D > 0 else -1
                # prefetch what the table ranks, before the layer computes; not where the copy queue is full (the
                # first missing key would stop it: nothing is issued) or every key is resident (nothing is missing)
                if (row >= 0 and wa == lo and cnt[LOADS_N] - cnt[EVICTIONS] - gone < L * E
                        and not (pf_cap >= 0 and inflight_bytes(ck, copy_ms, nbytes) + nbytes > pf_cap)):
                    missing = False
                    for d in range(D):  # a ranking ends at its first -1 (strategies/prefetch_table.py)
                        for j in range(pf.shape[2]):
                            kid = _pf_kid(pf, row, d, j, layer, L, E, pf_flat)
                            if kid < 0:
                                break
                            if I[RES, kid] == 0:
                                missing = True
                                break
                        if missing:
                            break
                    if missing:
                        for d in range(D):  # pinned meanwhile: one prefetch never evicts another
                            for j in range(pf.shape[2]):
                                kid = _pf_kid(pf, row, d, j, layer, L, E, pf_flat)
                                if kid < 0:
                                    break
                                I[PIN, kid] = mark
                        full = False
                        for d in range(D):
                            for j in range(pf.shape[2]):
                                kid = _pf_kid(pf, row, d, j, layer, L, E, pf_flat)
                                if kid < 0:
                                    break
                                if I[RES, kid] == 1:
                                    continue
                                m, e = kid // E, kid % E
                                if pf_cap >= 0 and inflight_bytes(ck, copy_ms, nbytes) + nbytes > pf_cap:
                                    full = True
                                    break
                                nu = next_after(I, kpos, koff, kid, pos) if prm.code == 4 else 0
                                slot = insert(I, F, seqs, prm, cnt, pos, mark, kid, nu, True)
                                if slot < 0:  # its partition is all pinned: skipped
                                    continue
                                if disk:
                                    dmark += 1
                                    h = host_read(dI, dF, dseqs, dkpos, dkoff, dprm, dcnt, pos, dmark, kid, one, onxt,
                                                  dout, ck, hready, dq)
                                    if h < 0:
                                        return (h, pos, steps[:0], copies[:0], computes[:0], waves[:0], rows[:0],
                                                step_waves[:0])
                                after = hready[kid] if disk else 0.0
                                if keep:
                                    copies, n_cp = _issue(copies, n_cp, ck, ready, pf_slot, slot, True, copy_ms, serial, m,
                                                          e, nbytes, after)
                                else:
                                    copy(ck, ready, pf_slot, slot, True, copy_ms, serial, after)
                                    n_cp += 1
                            if full:
                                break
                        if prm.code == 2 and F[UNIT, I[PART, layer]] == math.inf:
                            return (LFU_OVERFLOW, pos, steps[:0], copies[:0], computes[:0], waves[:0], rows[:0],
                                    step_waves[:0])
                if record:  # what the layer computes, as a backend is told (engine._serve: device, host)
                    if n_wv == len(waves):
                        waves = _grow_int(waves, n_wv)
                    while n_rows + wb - wa > len(rows):
                        rows = _grow_int(rows, n_rows)
                    for i in range(wa, wb):
                        rows[n_rows, 0] = base + src[i]
                        rows[n_rows, 1] = out[1, i - wa]
                        rows[n_rows, 2] = src_cnt[i]
                        rows[n_rows, 3] = out[2, i - wa]
                        n_rows += 1
                    waves[n_wv, 0] = layer
                    waves[n_wv, 1] = n_cp
                    waves[n_wv, 2] = n_rows
                    n_wv += 1
                # SimBackend.compute: the device part waits for its copies; host experts run beside it
                loads = ck[LOADS]
                start, end, free, n_dev = device_part(ck, ready, pf_slot, served, out, src_cnt, wa, wb, device_ms,
                                                      shared, own[3])
                if keep and n_cm + 2 > len(computes):
                    computes = _grow(computes, n_cm)
                n_cm = _computed(computes, n_cm, layer, start, end, start - free, 0.0, agg)
                if n_host:  # serial (or the policy's order, oi[4]): after the device part
                    hs, he = host_part(ck, out, src_cnt, wa, wb, n_tokens, host_ms, act_ms,
                                       end if serial or oi[4] else free, hready, src, base)
                    n_cm = _computed(computes, n_cm, layer, hs, he, 0.0, 1.0, agg)
                    end = max(end, he)
                # the replay's own work for this layer, serial and after it (never overlapping a copy)
                ck[NOW] = end + own[0] + own[1] * (n_dev + n_host) + own[2] * loads
                ck[LOADS] = 0.0
        ck[NOW] += dtail[s]
        steps[s, 0] = s
        steps[s, 1] = n_tokens
        steps[s, 2] = step_start
        steps[s, 3] = ck[NOW]
        steps[s, 4] = n_cp
        steps[s, 5] = n_cm
        if record:
            step_waves[s] = n_wv
    if not keep:
        n_cp = n_cm = 0
    return 0, 0, steps, copies[:n_cp].copy(), computes[:n_cm].copy(), waves[:n_wv].copy(), rows[:n_rows].copy(), \
        step_waves


@njit(**HOT)
def _pf_kid(pf, row, d, j, layer, L, E, flat):
    """The key the prefetch table names at pf[row, d, j] (strategies/prefetch_table.py: its layout), -1 for none."""
    x = pf[row, d, j]
    if x < 0:
        return -1
    # flat: x = (distance - 1) * E + expert, so the key is (layer + 1) * E + x, wrapped past the last layer (no
    # division: this runs for every entry of a ranking over all the layers ahead)
    k = (layer + 1) * E + x if flat else (layer + d + 1) * E + x
    while k >= L * E:  # a lookahead may run past the next step's last layer too
        k -= L * E
    return k


@njit(cache=True, nogil=True)
def _grow(rows, n):
    bigger = np.empty((2 * len(rows), rows.shape[1]))
    bigger[:n] = rows[:n]
    return bigger


@njit(cache=True, nogil=True)
def _grow_int(rows, n):
    bigger = np.empty((2 * max(len(rows), 1), rows.shape[1]), np.int64)
    bigger[:n] = rows[:n]
    return bigger


@njit(cache=True, nogil=True)
def _issue(copies, n, ck, ready, pf_slot, slot, prefetch, copy_ms, serial, layer, expert, nbytes, after):
    """SimBackend.load with its profiler row: queue the copy of (layer, expert) into `slot`, after `after` (ms).
    Returns the rows (grown when full) and their count."""
    start = copy(ck, ready, pf_slot, slot, prefetch, copy_ms, serial, after)
    if n == len(copies):
        copies = _grow(copies, n)
    copies[n, 3] = start
    copies[n, 0] = layer
    copies[n, 1] = expert
    copies[n, 2] = nbytes
    copies[n, 4] = ready[slot]
    copies[n, 5] = 1.0 if prefetch else 0.0
    copies[n, 6] = slot
    return copies, n + 1


@njit(**HOT)
def _computed(computes, n, layer, start, end, stall, host, agg):
    """The profiler's row of a computed layer part (room made by the caller), or with `agg` its sums (see
    run_sim). Returns the parts so far."""
    if len(agg):
        if host:
            agg[AGG_HOST] += end - start
        else:
            agg[AGG_STALL] += stall
            agg[AGG_DEVICE] += end - start
            agg[AGG + layer] += stall
        return n + 1
    computes[n, 0] = layer
    computes[n, 1] = start
    computes[n, 2] = end
    computes[n, 3] = stall
    computes[n, 4] = host
    return n + 1


