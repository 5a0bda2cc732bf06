"""The caches of one partition per layer (and LRU's and visit_count's one pool) in their fastest form: each
partition a short row of slots (their keys and what the policy ranks them by), the victim found by a scan of the
row (LRU's pool: a list; visit_count: each layer's best). moesim.core.simulate and hit_counts take them where no
request is wider than a partition, no prefetcher caps the bytes in flight (only Belady's kernel takes one) and
the offload policy, if any, decides without the clocks (slot_kernel says which); they decide what
becomes of each request element, and moesim.core.loop.time_hits times it. The same decisions as the cache state
of state.py and policies.py, which stay the reference for every other run (tests/test_core.py holds both to the
plain-Python classes of strategies/).

    kernel, extra = slot_kernel(st, prm, scope, offload)   # None where there is none (learned, LFU with aging...)
    status, pos = kernel(ids, ptr, L, E, cap, resets, flags, cnt, *extra)

Each kernel: per request position pos = step * L + layer, the request ids[ptr[pos]:ptr[pos + 1]] is pinned
(pin[key] = pos + 1), its hits told to the policy in row order, then its misses decided in row order (the
offload policy's loop.offload_decision, where the kernel takes one: fetched, streamed, or computed on the host
and maybe loaded) and inserted, each into a free slot or a victim's among the unpinned residents. flags[i]: what
became of element i (loop.DECIDED_HIT, FETCHED, ON_HOST, HOST_LOADED); cnt: the loop's counters. Returns (0, 0),
or (loop.ALL_PINNED, pos) where a fetched miss found every resident pinned. On the real trace (gpt-oss-20b, 240
slots) LFU's hits took 0.36 s against 1.6 s in the cache state.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from .loop import (ALL_PINNED, EVICTIONS, FETCH, FETCHED, HITS, HOST, HOST_AND_LOAD, HOST_COMPUTES, HOST_LOADED,
                   LOADS_N, OFF_COST, OFF_FIDDLER, OFF_HOST, OFF_NONE, OFF_STATIC_SPLIT, ON_HOST, PF_LOADS, PF_UNUSED,
                   PF_USED, PF_WASTED, REQUESTS, STREAM, STREAMS, _pf_kid, offload_decision)
from .requests import NEVER
from .policies import AA_EPS, POLICY_CODES
from .requests import width
from .state import LW, SCOUNT, STATIC

BIG = 1 << 62  # a rank above every real one: a pinned slot's, in the scans
EXP_TABLE = 4096  # class_lru: its decay factors by distance in request positions, kept below this


def clockless(oi, host_cap: int) -> bool:
    """Whether an offload policy's arrays (moesim.core.parts.offload_arrays) decide without the clocks: all but a
    cap on the bytes in flight (host_cap >= 0), which reads the copy engine's queue."""
    return int(oi[0]) in (OFF_NONE, OFF_STATIC_SPLIT, OFF_FIDDLER) or (int(oi[0]) in (OFF_HOST, OFF_COST)
                                                                      and host_cap < 0)


def slot_kernel(st, prm, scope: str, offload: tuple | None = None, prefetch: tuple | None = None) -> tuple | None:
    """(kernel, extra): the kernel deciding the policy of `prm` in `scope`, with the state `st` set up
    (moesim.core.parts.cache_state), called as kernel(ids, ptr, L, E, cap, resets, flags, cnt, *extra); None where
    there is none. `offload`: (oi, odev, ohl, oshare, ofaster, oroom, opart, oload, counts, step_tokens) where an
    offload policy runs (see loop.offload_decision; `clockless`), else None: only LRU and class_lru take one.
    `prefetch`: (table, rows, flat) of a prefetcher without a cap on the bytes in flight (loop.run_sim's pf,
    pf_rows, pf_flat), else None: only Belady per layer takes one (the plan's bound); its kernel returns the keys
    it prefetched too (slots_belady)."""
    L, E, code = prm.L, prm.E, prm.code
    if code == POLICY_CODES["belady"] and scope == "per_layer" and offload is None and len(st.nxt):
        pf = prefetch if prefetch is not None else (np.zeros((0, 0, 0), np.int16), np.zeros(0, np.int64), False)
        kpos, koff = (st.kpos, st.koff) if len(st.koff) else (np.zeros(0, np.int64), np.zeros(L * E + 1, np.int64))
        return slots_belady, (st.nxt, kpos, koff, *pf)
    if prefetch is not None:
        return None
    if code == POLICY_CODES["lru"]:
        off = offload if offload is not None else no_offload(L, E)
        return (slots_lru if scope == "per_layer" else slots_lru_global), (off,)
    if code == POLICY_CODES["visit_count"] and offload is None:
        return slots_visit_count, (scope == "global",)
    if scope != "per_layer":
        return None
    if code == POLICY_CODES["class_lru"]:
        off = offload if offload is not None else no_offload(L, E)
        return slots_class_lru, (prm.classes, prm.decay_per_pos,
                                 np.array([2.0 ** -c for c in range(prm.classes)]), off)  # 1 / ClassLRU's 2.0 ** class
    if offload is not None:
        return None
    if code == POLICY_CODES["fifo"]:
        return slots_fifo, ()
    if code == POLICY_CODES["lfu"] and prm.decay_is_one:
        return slots_lfu, ()
    if code == POLICY_CODES["lfru"]:
        return slots_lfru, (prm.log_decay, prm.alpha)
    if code == POLICY_CODES["activation_aware"]:
        return slots_activation_aware, (st.seqs, st.F[LW, :L].copy())
    if code == POLICY_CODES["static"]:
        return slots_static, (st.I[STATIC, :L * E].copy(), st.I[SCOUNT, :L * E].copy())
    return None


def no_offload(L: int, E: int) -> tuple:
    """The offload arguments of a run without an offload policy: every miss is fetched."""
    z = np.zeros(1, np.int64)
    return (np.zeros(7, np.int64), np.zeros(L * E, np.uint8), np.zeros(L, np.uint8), np.ones(1), np.zeros(1, np.uint8),
            z, np.zeros(L, np.int64), np.zeros(L, np.int64), np.ones(1, np.int32), np.ones(1, np.int64))


@njit(cache=True, nogil=True)
def _demand(cnt, n, hits, evictions):
    """A demand cache's counters: every miss loaded."""
    cnt[REQUESTS] += n
    cnt[HITS] += hits
    cnt[LOADS_N] += n - hits
    cnt[EVICTIONS] += evictions
    return 0, 0


@njit(cache=True, nogil=True)
def slots_fifo(ids, ptr, L, E, cap, resets, flags, cnt):
    """strategies/fifo.py FIFO: per layer the slots' keys and insert stamps; the victim is the oldest unpinned."""
    where = np.full(L * E, -1, np.int64)
    pin = np.zeros(L * E, np.int64)  # request position + 1 while pinned: FIFO's hits may be the oldest
    flag = len(flags) > 0  # empty: counts only (core.hit_counts)
    skey = np.zeros((L, max(cap, 1)), np.int64)
    sstamp = np.zeros((L, max(cap, 1)), np.int64)  # insert stamps
    n = np.zeros(L, np.int64)
    clock = 0
    hits = 0
    evictions = 0
    for s in range(len(resets)):
        if resets[s]:
            where[:] = -1
            n[:] = 0
        for layer in range(L):
            pos = s * L + layer
            a, b = ptr[pos], ptr[pos + 1]
            base = layer * E
            for i in range(a, b):
                kid = base + ids[i]
                pin[kid] = pos + 1
                if where[kid] >= 0:
                    hits += 1
                if flag:
                    flags[i] = where[kid] >= 0
            for i in range(a, b):
                kid = base + ids[i]
                if where[kid] >= 0:
                    continue
                if n[layer] < cap:
                    j = n[layer]
                    n[layer] += 1
                else:
                    j = -1
                    for c in range(cap):
                        if (j < 0 or sstamp[layer, c] < sstamp[layer, j]) and pin[skey[layer, c]] != pos + 1:
                            j = c
                    if j < 0:
                        return ALL_PINNED, pos
                    where[skey[layer, j]] = -1
                    evictions += 1
                clock += 1
                sstamp[layer, j] = clock
                skey[layer, j] = kid
                where[kid] = j
    return _demand(cnt, ptr[len(resets) * L] - ptr[0], hits, evictions)


@njit(cache=True, nogil=True)
def slots_lfu(ids, ptr, L, E, cap, resets, flags, cnt):
    """strategies/lfu.py LFU without aging (decay 1): the victim is the unpinned resident of least (uses since its
    load, touch), its rank kept as one number, uses << 32 | touch (a layer's touches count its uses and loads;
    a trace of 2**31 requests would be needed to reach bit 32)."""
    where = np.full(L * E, -1, np.int64)
    pin = np.zeros(L * E, np.int64)
    skey = np.zeros((L, cap), np.int64)
    srank = np.zeros((L, cap), np.int64)
    n = np.zeros(L, np.int64)
    touch = np.zeros(L, np.int64)
    hits = 0
    evictions = 0
    for s in range(len(resets)):
        if resets[s]:
            where[:] = -1
            n[:] = 0
        for layer in range(L):
            pos = s * L + layer
            a, b = ptr[pos], ptr[pos + 1]
            base = layer * E
            t = touch[layer]
            for i in range(a, b):  # pin; hits: one more use, a new touch, in row order
                kid = base + ids[i]
                pin[kid] = pos + 1
                j = where[kid]
                hit = j >= 0
                flags[i] = hit
                if hit:
                    hits += 1
                    t += 1
                    srank[layer, j] = ((srank[layer, j] >> 32) + 1) << 32 | t
            for i in range(a, b):  # misses in row order
                if flags[i]:
                    continue
                kid = base + ids[i]
                if n[layer] < cap:
                    j = n[layer]
                    n[layer] += 1
                else:
                    j = 0
                    m = BIG
                    for c in range(cap):  # branch-free: the least rank of an unpinned slot
                        v = BIG if pin[skey[layer, c]] == pos + 1 else srank[layer, c]
                        less = v < m
                        m = v if less else m
                        j = c if less else j
                    if m == BIG:
                        return ALL_PINNED, pos
                    where[skey[layer, j]] = -1
                    evictions += 1
                t += 1
                skey[layer, j] = kid
                srank[layer, j] = (1 << 32) | t
                where[kid] = j
            touch[layer] = t
    return _demand(cnt, ptr[len(resets) * L] - ptr[0], hits, evictions)


@njit(cache=True, nogil=True)
def slots_lfru(ids, ptr, L, E, cap, resets, flags, cnt, log_decay, alpha):
    """strategies/lfru.py LFRU: each key's log f (its decayed use count, kept when it is evicted, until a reset)
    and last use; per layer its residents in order of last use (oldest first). The victim is the unpinned
    resident of lowest score (log f + age * log(decay) - alpha * log1p(age)), ties to the older: the pinned keys
    are the newest (the request's hits move to the end, its misses join there), and only a key whose log f is
    under every older one's can win (the front of moesim/core/policies.py), so the scan stops at the first pinned
    key and computes the score of those keys alone."""
    where = np.full(L * E, -1, np.int64)  # index in its layer's row `order`
    pin = np.zeros(L * E, np.int64)
    seen = np.zeros(L * E, np.uint8)
    logf = np.zeros(L * E)
    last = np.zeros(L * E)  # time (steps) of the last use
    order = np.zeros((L, cap), np.int64)
    n = np.zeros(L, np.int64)
    hits = 0
    evictions = 0
    for s in range(len(resets)):
        if resets[s]:
            where[:] = -1
            seen[:] = 0
            n[:] = 0
        for layer in range(L):
            pos = s * L + layer
            t = pos / L  # LFRU's clock, as the reference computes it
            a, b = ptr[pos], ptr[pos + 1]
            base = layer * E
            for i in range(a, b):
                pin[base + ids[i]] = pos + 1
            for k in range(2):  # hits in row order, then misses
                for i in range(a, b):
                    kid = base + ids[i]
                    m = n[layer]
                    if k == 0:
                        j = where[kid]
                        flags[i] = j >= 0
                        if j < 0:
                            continue
                        hits += 1
                        for q in range(j + 1, m):  # to the newest end
                            x = order[layer, q]
                            order[layer, q - 1] = x
                            where[x] = q - 1
                    elif flags[i]:
                        continue
                    elif m == cap:
                        v = -1
                        best = math.inf
                        least = math.inf  # the least log f older than the scanned key
                        for q in range(m):
                            x = order[layer, q]
                            if pin[x] == pos + 1:
                                break
                            if logf[x] < least:
                                least = logf[x]
                                age = t - last[x]
                                score = logf[x] + age * log_decay - alpha * math.log1p(age)  # the reference's
                                if score < best:
                                    v = q
                                    best = score
                        if v < 0:
                            return ALL_PINNED, pos
                        where[order[layer, v]] = -1
                        evictions += 1
                        for q in range(v + 1, m):
                            x = order[layer, q]
                            order[layer, q - 1] = x
                            where[x] = q - 1
                    else:
                        n[layer] = m + 1
                        m += 1
                    order[layer, m - 1] = kid
                    where[kid] = m - 1
                    if seen[kid] == 0:  # LFRU._use
                        seen[kid] = 1
                        logf[kid] = 0.0
                    else:
                        x = logf[kid] + (t - last[kid]) * log_decay
                        logf[kid] = x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x))
                    last[kid] = t
    return _demand(cnt, ptr[len(resets) * L] - ptr[0], hits, evictions)


@njit(cache=True, nogil=True)
def slots_class_lru(ids, ptr, L, E, cap, resets, flags, cnt, C, decay_per_pos, scale, off):
    """strategies/class_lru.py ClassLRU: each key's decayed use count and last use (kept when it is evicted, until
    a reset), its class taken at its last use; the victim is the unpinned resident of largest age / 2**class,
    ties to the lower class, then to the earlier placement (the order of its class's list). A miss computed on
    the host is not a use."""
    oi, odev, ohl, oshare, ofaster, oroom, opart, oload, counts, step_tokens = off
    owed = np.zeros(8)  # loop.offload_decision's host share owed (clock.OWED)
    where = np.full(L * E, -1, np.int64)
    pin = np.zeros(L * E, np.int64)
    seen = np.zeros(L * E, np.uint8)
    crf = np.zeros(L * E)  # decayed uses at the last use
    last = np.zeros(L * E, np.int64)  # request position of the last use
    cls = np.zeros(L * E, np.int64)
    placed = np.zeros(L * E, np.int64)  # order of the last placement (the class lists' order)
    skey = np.zeros((L, cap), np.int64)
    n = np.zeros(L, np.int64)
    order = 0
    decay = np.empty(EXP_TABLE)  # the decay over d positions, as _crf_now computes it: most uses come soon
    for d in range(EXP_TABLE):
        decay[d] = math.exp(d * decay_per_pos)
    for s in range(len(resets)):
        if resets[s]:
            where[:] = -1
            seen[:] = 0
            n[:] = 0
        if oi[0] != OFF_NONE:
            oload[:] = 0  # Host.begin_step
        for layer in range(L):
            pos = s * L + layer
            a, b = ptr[pos], ptr[pos + 1]
            base = layer * E
            cnt[REQUESTS] += b - a
            for i in range(a, b):
                pin[base + ids[i]] = pos + 1
            for k in range(2):  # hits in row order, then misses
                for i in range(a, b):
                    kid = base + ids[i]
                    if k == 0:
                        hit = where[kid] >= 0
                        flags[i] = hit
                        if not hit:
                            continue
                        cnt[HITS] += 1
                    elif flags[i]:
                        continue
                    else:
                        d = FETCH if oi[0] == OFF_NONE else offload_decision(
                            owed, oi, odev, ohl, oshare, ofaster, oroom, opart, oload, kid, layer, counts[i],
                            step_tokens[s])
                        j = _miss(cnt, flags, i, d)
                        if j < 0:
                            continue
                        if n[layer] < cap:
                            j = n[layer]
                            n[layer] += 1
                        else:
                            j = -1
                            best = -1.0
                            for q in range(cap):
                                x = skey[layer, q]
                                if pin[x] == pos + 1:
                                    continue
                                age = (pos - last[x]) * scale[cls[x]]  # exact: / 2.0 ** class
                                if j < 0 or age > best or (age == best and (
                                        cls[x] < cls[skey[layer, j]] or (cls[x] == cls[skey[layer, j]]
                                                                         and placed[x] < placed[skey[layer, j]]))):
                                    j = q
                                    best = age
                            if j < 0:
                                if d == HOST_AND_LOAD:  # nothing to evict: computed on the host alone
                                    flags[i] = ON_HOST
                                    continue
                                return ALL_PINNED, pos
                            where[skey[layer, j]] = -1
                            cnt[EVICTIONS] += 1
                        cnt[LOADS_N] += 1
                        skey[layer, j] = kid
                        where[kid] = j
                    # ClassLRU._crf_now + _place: one more use
                    gap = pos - last[kid]
                    c = 0.0 if seen[kid] == 0 else crf[kid] * (
                        decay[gap] if gap < EXP_TABLE else math.exp(gap * decay_per_pos))
                    f = c + 1.0
                    seen[kid] = 1
                    crf[kid] = f
                    last[kid] = pos
                    cls[kid] = min(C - 1, int(math.floor(math.log2(f)))) if f >= 1 else 0
                    order += 1
                    placed[kid] = order
    return 0, 0


@njit(cache=True, nogil=True)
def _miss(cnt, flags, i, d):
    """Element i missed and the offload policy decided `d`: its flag and counters. Returns 0 where it is to be
    inserted (fetched, or loaded behind its host compute), -1 where not (streamed, or on the host alone)."""
    if d == STREAM:
        flags[i] = FETCHED
        cnt[STREAMS] += 1
        return -1
    if d == HOST or d == HOST_AND_LOAD:
        cnt[HOST_COMPUTES] += 1
        flags[i] = ON_HOST if d == HOST else HOST_LOADED
        return -1 if d == HOST else 0
    flags[i] = FETCHED
    return 0


@njit(cache=True, nogil=True)
def slots_lru(ids, ptr, L, E, cap, resets, flags, cnt, off):
    """strategies/lru.py LRU per layer: the slots' keys and last-use stamps in two short rows, the victim found by a
    scan of `cap` stamps. Hits are stamped in row order, then inserted misses, so the oldest stamp is the list
    head, and the pinned keys hold the newest stamps: the oldest is pinned only when all are. Without an offload
    policy, flags may be empty (core.hit_counts: counts only)."""
    oi, odev, ohl, oshare, ofaster, oroom, opart, oload, counts, step_tokens = off
    owed = np.zeros(8)
    # branch-free where the outcome is data (hit or miss, the oldest stamp): mispredicted branches were the cost
    where = np.full(L * E, -1, np.int64)  # slot of a resident key within its layer, -1 if not resident
    skey = np.zeros((L, cap + 1), np.int64)  # [L, cap] key in each slot (column cap: scratch)
    sstamp = np.zeros((L, cap + 1), np.int64)  # [L, cap] last use of each slot's key (column cap: scratch)
    n = np.zeros(L, np.int64)  # slots in use per layer
    miss = np.empty(width(ptr), np.int64)  # the running request's misses (element positions), in row order
    decide = oi[0] != OFF_NONE  # then flags are given
    flag = len(flags) > 0
    clock = 0
    hits = 0
    loads = 0
    evictions = 0
    for s in range(len(resets)):
        if resets[s]:
            where[:] = -1
            n[:] = 0
        if decide:
            oload[:] = 0  # Host.begin_step
        for layer in range(L):
            pos = s * L + layer
            a, b = ptr[pos], ptr[pos + 1]
            base = layer * E
            first = clock + 1  # stamps of this request are >= first
            n_miss = 0
            for i in range(a, b):  # hits: stamped in row order; misses: listed
                kid = base + ids[i]
                j = where[kid]
                hit = j >= 0
                clock += hit
                sstamp[layer, j if hit else cap] = clock
                if flag:
                    flags[i] = hit
                miss[n_miss] = i
                n_miss += 1 - hit
            hits += b - a - n_miss
            for q in range(n_miss):
                i = miss[q]
                kid = base + ids[i]
                if decide and _miss(cnt, flags, i, offload_decision(
                        owed, oi, odev, ohl, oshare, ofaster, oroom, opart, oload, kid, layer, counts[i],
                        step_tokens[s])) < 0:
                    continue
                if n[layer] < cap:
                    j = n[layer]
                    n[layer] += 1
                else:
                    j = 0
                    m = sstamp[layer, 0]
                    for c in range(1, cap):
                        v = sstamp[layer, c]
                        older = v < m
                        m = v if older else m
                        j = c if older else j
                    if m >= first:
                        if decide and flags[i] == HOST_LOADED:  # nothing to evict: computed on the host alone
                            flags[i] = ON_HOST
                            continue
                        return ALL_PINNED, pos
                    where[skey[layer, j]] = -1
                    evictions += 1
                loads += 1
                clock += 1
                sstamp[layer, j] = clock
                skey[layer, j] = kid
                where[kid] = j
    cnt[REQUESTS] += ptr[len(resets) * L] - ptr[0]
    cnt[HITS] += hits
    cnt[LOADS_N] += loads
    cnt[EVICTIONS] += evictions
    return 0, 0


@njit(cache=True, nogil=True)
def slots_lru_global(ids, ptr, L, E, cap, resets, flags, cnt, off):
    """strategies/lru.py LRU in one pool of `cap` slots: its residents in a list, oldest first (prev and next per
    key); a hit moves to the newest end, the victim is the oldest unpinned."""
    oi, odev, ohl, oshare, ofaster, oroom, opart, oload, counts, step_tokens = off
    owed = np.zeros(8)
    res = np.zeros(L * E, np.uint8)
    pin = np.zeros(L * E, np.int64)
    prev = np.full(L * E, -1, np.int64)
    nxt = np.full(L * E, -1, np.int64)
    head = -1
    tail = -1
    size = 0
    decide = oi[0] != OFF_NONE
    for s in range(len(resets)):
        if resets[s]:
            res[:] = 0
            head = tail = -1
            size = 0
        if oi[0] != OFF_NONE:
            oload[:] = 0  # Host.begin_step
        for layer in range(L):
            pos = s * L + layer
            a, b = ptr[pos], ptr[pos + 1]
            base = layer * E
            cnt[REQUESTS] += b - a
            for i in range(a, b):
                pin[base + ids[i]] = pos + 1
            for i in range(a, b):  # hits, in row order, to the newest end
                kid = base + ids[i]
                hit = res[kid] == 1
                flags[i] = hit
                if not hit:
                    continue
                cnt[HITS] += 1
                if kid != tail:
                    p, q = prev[kid], nxt[kid]
                    if p >= 0:
                        nxt[p] = q
                    else:
                        head = q
                    prev[q] = p
                    prev[kid] = tail
                    nxt[kid] = -1
                    nxt[tail] = kid
                    tail = kid
            for i in range(a, b):  # misses in row order
                if flags[i]:
                    continue
                kid = base + ids[i]
                if decide and _miss(cnt, flags, i, offload_decision(
                        owed, oi, odev, ohl, oshare, ofaster, oroom, opart, oload, kid, layer, counts[i],
                        step_tokens[s])) < 0:
                    continue
                if size < cap:
                    size += 1
                else:
                    v = head
                    while v >= 0 and pin[v] == pos + 1:
                        v = nxt[v]
                    if v < 0:
                        if flags[i] == HOST_LOADED:  # nothing to evict: computed on the host alone
                            flags[i] = ON_HOST
                            continue
                        return ALL_PINNED, pos
                    p, q = prev[v], nxt[v]
                    if p >= 0:
                        nxt[p] = q
                    else:
                        head = q
                    if q >= 0:
                        prev[q] = p
                    else:
                        tail = p
                    res[v] = 0
                    cnt[EVICTIONS] += 1
                cnt[LOADS_N] += 1
                res[kid] = 1
                prev[kid] = tail
                nxt[kid] = -1
                if tail >= 0:
                    nxt[tail] = kid
                else:
                    head = kid
                tail = kid
    return 0, 0


@njit(cache=True, nogil=True)
def slots_visit_count(ids, ptr, L, E, cap, resets, flags, cnt, pool):
    """strategies/visit_count.py VisitCount, in one pool of `cap` slots (`pool`) or `cap` per layer: each resident's
    visits since its load (1 at the load); the victim is the most visited resident of the layers before the
    running one, ties to the lower key (the request's pinned keys are all of the running layer: never
    candidates); none: the miss streams (refuses). Each layer's best resident is kept (a hit can only raise its
    own key; an eviction scans the layer's E keys again), so a victim is the best of the earlier layers' bests."""
    res = np.zeros(L * E, np.uint8)
    visits = np.zeros(L * E, np.int64)
    best = np.full(L, -1, np.int64)  # each layer's most visited resident (ties: the lower key), -1: none
    n = np.zeros(L, np.int64)  # residents per layer (per-layer pools)
    size = 0  # residents in the pool
    hits = 0
    for s in range(len(resets)):
        if resets[s]:
            res[:] = 0
            best[:] = -1
            n[:] = 0
            size = 0
        for layer in range(L):
            pos = s * L + layer
            a, b = ptr[pos], ptr[pos + 1]
            base = layer * E
            for i in range(a, b):  # hits: one more visit
                kid = base + ids[i]
                hit = res[kid] == 1
                flags[i] = hit
                if hit:
                    hits += 1
                    visits[kid] += 1
                    x = best[layer]
                    if visits[kid] > visits[x] or (visits[kid] == visits[x] and kid < x):
                        best[layer] = kid
            for i in range(a, b):  # misses in row order
                if flags[i]:
                    continue
                kid = base + ids[i]
                if (size if pool else n[layer]) >= cap:
                    v = -1
                    if pool:
                        for m in range(layer):
                            x = best[m]
                            if x >= 0 and (v < 0 or visits[x] > visits[v] or (visits[x] == visits[v] and x < v)):
                                v = x
                    if v < 0:  # nothing may be evicted: streamed
                        cnt[STREAMS] += 1
                        continue
                    res[v] = 0
                    cnt[EVICTIONS] += 1
                    m = v // E
                    best[m] = -1
                    for x in range(m * E, m * E + E):
                        if res[x] == 1 and (best[m] < 0 or visits[x] > visits[best[m]]):
                            best[m] = x  # ascending keys: a tie keeps the lower
                    size -= 1
                    n[m] -= 1
                cnt[LOADS_N] += 1
                res[kid] = 1
                visits[kid] = 1
                size += 1
                n[layer] += 1
                x = best[layer]
                if x < 0 or visits[kid] > visits[x] or (visits[kid] == visits[x] and kid < x):
                    best[layer] = kid
    cnt[REQUESTS] += ptr[len(resets) * L] - ptr[0]
    cnt[HITS] += hits
    return 0, 0


@njit(cache=True, nogil=True)
def slots_belady(ids, ptr, L, E, cap, resets, flags, cnt, nxt, kpos, koff, pf, pf_rows, flat):
    """strategies/belady.py Belady per layer: each resident's next request position; the victim is the unpinned
    resident requested last (ties: the lower key). A prefetcher's table (pf, pf_rows, flat: loop.run_sim's), if
    any, is read as run_sim reads it with no cap on the bytes in flight: after a request's misses, where a key it
    names is missing, all it names are pinned and the missing ones loaded in its order (next use: the key's next
    request, loop.next_after), a key whose partition is all pinned skipped. Returns (status, pos, the prefetched
    keys in order, int64 [S * L]: how many were prefetched up to each request position)."""
    where = np.full(L * E, -1, np.int64)  # slot of a resident key within its layer
    pin = np.zeros(L * E, np.int64)  # the mark of the request (and its prefetch) that pinned it
    pfu = np.zeros(L * E, np.uint8)  # prefetched, not requested yet
    kptr = koff[:L * E].copy()  # next_after's pointers
    skey = np.zeros((L, cap), np.int64)
    snext = np.zeros((L, cap), np.int64)  # each slot's key's next request position
    n = np.zeros(L, np.int64)
    D = pf.shape[1]
    pkeys = np.empty(1024, np.int64)
    n_pf = 0
    pend = np.zeros(len(resets) * L if D > 0 else 0, np.int64)
    mark = 0
    gone = 0  # loads less evictions at the last reset
    for s in range(len(resets)):
        if resets[s]:
            cnt[PF_WASTED] += cnt[PF_UNUSED]  # reset away before their first request
            cnt[PF_UNUSED] = 0
            where[:] = -1
            pfu[:] = 0
            n[:] = 0
            gone = cnt[LOADS_N] - cnt[EVICTIONS]
        for layer in range(L):
            pos = s * L + layer
            a, b = ptr[pos], ptr[pos + 1]
            base = layer * E
            mark += 1
            cnt[REQUESTS] += b - a
            for i in range(a, b):  # pin; hits: their next use
                kid = base + ids[i]
                pin[kid] = mark
                j = where[kid]
                flags[i] = j >= 0
                if j >= 0:
                    cnt[HITS] += 1
                    snext[layer, j] = nxt[i]
                    if pfu[kid]:  # a prefetched key's first request: the prefetch was used
                        pfu[kid] = 0
                        cnt[PF_USED] += 1
                        cnt[PF_UNUSED] -= 1
            for i in range(a, b):  # misses in row order
                if not flags[i] and _belady_insert(cnt, where, pin, pfu, skey, snext, n, cap, E, mark,
                                                   base + ids[i], nxt[i], False) < 0:
                    return ALL_PINNED, pos, pkeys[:0], pend
            if D == 0:
                continue
            row = pf_rows[pos]
            if row >= 0 and cnt[LOADS_N] - cnt[EVICTIONS] - gone < L * E:
                missing = False
                for d in range(D):  # a ranking ends at its first -1
                    for q in range(pf.shape[2]):
                        kid = _pf_kid(pf, row, d, q, layer, L, E, flat)
                        if kid < 0:
                            break
                        if where[kid] < 0:
                            missing = True
                            break
                    if missing:
                        break
                if missing:
                    for d in range(D):  # pinned meanwhile: one prefetch never evicts another
                        for q in range(pf.shape[2]):
                            kid = _pf_kid(pf, row, d, q, layer, L, E, flat)
                            if kid < 0:
                                break
                            pin[kid] = mark
                    for d in range(D):
                        for q in range(pf.shape[2]):
                            kid = _pf_kid(pf, row, d, q, layer, L, E, flat)
                            if kid < 0:
                                break
                            if where[kid] >= 0:
                                continue
                            t, end = kptr[kid], koff[kid + 1]  # next_after
                            while t < end and kpos[t] <= pos:
                                t += 1
                            kptr[kid] = t
                            if _belady_insert(cnt, where, pin, pfu, skey, snext, n, cap, E, mark, kid,
                                              kpos[t] if t < end else NEVER, True) < 0:
                                continue  # its partition is all pinned: skipped
                            if n_pf == len(pkeys):
                                more = np.empty(2 * len(pkeys), np.int64)
                                more[:n_pf] = pkeys
                                pkeys = more
                            pkeys[n_pf] = kid
                            n_pf += 1
            pend[pos] = n_pf
    return 0, 0, pkeys[:n_pf].copy(), pend


@njit(cache=True, nogil=True)
def _belady_insert(cnt, where, pin, pfu, skey, snext, n, cap, E, mark, kid, next_use, prefetched):
    """Insert `kid` into its layer's slots (a free one, else the victim's: the unpinned resident of the farthest
    next use, ties to the lower key). Returns its slot, or -1 where every resident is pinned."""
    p = kid // E
    if n[p] < cap:
        j = n[p]
        n[p] += 1
    else:
        j = -1
        for c in range(cap):
            x = skey[p, c]
            if pin[x] != mark and (j < 0 or snext[p, c] > snext[p, j] or (snext[p, c] == snext[p, j]
                                                                           and x < skey[p, j])):
                j = c
        if j < 0:
            return -1
        v = skey[p, j]
        where[v] = -1
        cnt[EVICTIONS] += 1
        if pfu[v]:  # prefetched, never requested: its copy was wasted
            pfu[v] = 0
            cnt[PF_WASTED] += 1
            cnt[PF_UNUSED] -= 1
    skey[p, j] = kid
    snext[p, j] = next_use
    where[kid] = j
    cnt[LOADS_N] += 1
    if prefetched:
        cnt[PF_LOADS] += 1
        pfu[kid] = 1
        cnt[PF_UNUSED] += 1
    return j


@njit(cache=True, nogil=True)
def slots_activation_aware(ids, ptr, L, E, cap, resets, flags, cnt, seqs, weights):
    """strategies/activation_aware.py ActivationAware per layer: each key's uses in this sequence (EAM) and since
    the start (FREQ), the layer's totals; the victim is the unpinned resident of lowest (priority, touch)."""
    where = np.full(L * E, -1, np.int64)
    pin = np.zeros(L * E, np.int64)
    eam = np.zeros(L * E, np.int64)
    freq = np.zeros(L * E, np.int64)
    touched = np.zeros(L * E, np.int64)
    erows = np.zeros(L, np.int64)
    frows = np.zeros(L, np.int64)
    ntouch = np.zeros(L, np.int64)
    seq = np.full(L, -(1 << 62), np.int64)  # state.NO_SEQ
    skey = np.zeros((L, cap), np.int64)
    n = np.zeros(L, np.int64)
    hits = 0
    evictions = 0
    for s in range(len(resets)):
        if resets[s]:
            where[:] = -1
            eam[:] = 0
            freq[:] = 0
            erows[:] = 0
            frows[:] = 0
            ntouch[:] = 0
            seq[:] = -(1 << 62)
            n[:] = 0
        for layer in range(L):
            pos = s * L + layer
            a, b = ptr[pos], ptr[pos + 1]
            base = layer * E
            if seqs[s] != seq[layer]:  # ActivationAware._at: a new sequence empties the layer's current matrix
                seq[layer] = seqs[s]
                erows[layer] = 0
                eam[base:base + E] = 0
            for i in range(a, b):
                pin[base + ids[i]] = pos + 1
            w = weights[layer]
            for k in range(2):  # hits in row order, then misses
                for i in range(a, b):
                    kid = base + ids[i]
                    if k == 0:
                        hit = where[kid] >= 0
                        flags[i] = hit
                        if not hit:
                            continue
                        hits += 1
                    elif flags[i]:
                        continue
                    else:
                        if n[layer] < cap:
                            j = n[layer]
                            n[layer] += 1
                        else:
                            j = -1
                            best = 0.0
                            er, fr = erows[layer], frows[layer]
                            for q in range(cap):
                                x = skey[layer, q]
                                if pin[x] == pos + 1:
                                    continue
                                share = eam[x] / er if er else 0.0  # ActivationAware.priority's operations
                                f = freq[x] / fr if fr else 0.0
                                prio = (share + AA_EPS) * (f + AA_EPS) * w
                                if j < 0 or prio < best or (prio == best and touched[x] < touched[skey[layer, j]]):
                                    j = q
                                    best = prio
                            if j < 0:
                                return ALL_PINNED, pos
                            where[skey[layer, j]] = -1
                            evictions += 1
                        skey[layer, j] = kid
                        where[kid] = j
                    eam[kid] += 1  # one more use
                    erows[layer] += 1
                    freq[kid] += 1
                    frows[layer] += 1
                    ntouch[layer] += 1
                    touched[kid] = ntouch[layer]
    return _demand(cnt, ptr[len(resets) * L] - ptr[0], hits, evictions)


@njit(cache=True, nogil=True)
def slots_static(ids, ptr, L, E, cap, resets, flags, cnt, static, counts):
    """strategies/static.py Static: its static keys (static[key] = 1, chosen at its setup) stay once loaded; the
    rest are LRU's, the victim the least recently used of them (stamps, as _small_lru's); where all of those are
    pinned, the unpinned static key of fewest counted requests (counts), ties to the lower key."""
    where = np.full(L * E, -1, np.int64)
    pin = np.zeros(L * E, np.int64)
    skey = np.zeros((L, cap), np.int64)
    sstamp = np.zeros((L, cap), np.int64)  # last use of an LRU key; BIG for a static one
    n = np.zeros(L, np.int64)
    clock = 0
    hits = 0
    evictions = 0
    for s in range(len(resets)):
        if resets[s]:
            where[:] = -1
            n[:] = 0
        for layer in range(L):
            pos = s * L + layer
            a, b = ptr[pos], ptr[pos + 1]
            base = layer * E
            first = clock + 1  # stamps of this request are >= first: its keys, pinned
            for i in range(a, b):
                kid = base + ids[i]
                pin[kid] = pos + 1
                j = where[kid]
                hit = j >= 0
                flags[i] = hit
                if hit:
                    hits += 1
                    if not static[kid]:
                        clock += 1
                        sstamp[layer, j] = clock
            for i in range(a, b):  # misses in row order
                if flags[i]:
                    continue
                kid = base + ids[i]
                if n[layer] < cap:
                    j = n[layer]
                    n[layer] += 1
                else:
                    j = 0
                    m = sstamp[layer, 0]
                    for c in range(1, cap):  # branch-free: the oldest stamp
                        v = sstamp[layer, c]
                        older = v < m
                        m = v if older else m
                        j = c if older else j
                    if m >= first:  # every LRU key is pinned (or none is resident): the static fallback
                        j = -1
                        for c in range(cap):
                            x = skey[layer, c]
                            if pin[x] != pos + 1 and static[x] and (j < 0 or counts[x] < counts[skey[layer, j]] or (
                                    counts[x] == counts[skey[layer, j]] and x < skey[layer, j])):
                                j = c
                        if j < 0:
                            return ALL_PINNED, pos
                    where[skey[layer, j]] = -1
                    evictions += 1
                clock += 1
                sstamp[layer, j] = BIG if static[kid] else clock
                skey[layer, j] = kid
                where[kid] = j
    return _demand(cnt, ptr[len(resets) * L] - ptr[0], hits, evictions)
