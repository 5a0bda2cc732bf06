"""The built-in cache policies of strategies/, compiled: each decision function written once against the
cache state of moesim/core/state.py, called by the loops of moesim/core/loop.py.

    on_request(I, F, seqs, prm, p, pos)      # once per request of partition p, hits or not (aging, clocks)
    on_access(I, F, seqs, prm, p, pos, kid, next_use)       # a hit
    on_insert(I, F, seqs, prm, p, pos, kid, next_use, prefetched)
    evict_one(I, F, prm, p, mark, pos, prefetch) -> kid | -1   # a victim among unpinned residents; on_evict

The plain-Python classes of strategies/ are the reference (test oracles: tests/test_core.py holds every policy
to identical counters and events); the same floating-point operations run in the same order.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from .state import (AB, AB_STALE, ABP, CHEAD, CLS, CTAIL, DC, EAM, EPOCH0, EROWS, FHEAD, FNEXT, FPREV, FREQ, FRONT,
                    FROWS, FTAIL, G1, G2, HEAD, HEAP, HOT, HPOS, HSIZE, K1, K2, LAST, LN, LNP, LPH, LPM, LPRV, LQZ,
                    LOST, LREQ, LUSE, LW, MEMBERS,
                    NEXT, NOW, NTOUCH, PART, PIN, PREV, PSEQ, SCNT, SCOUNT, SEEN, SIZE, SSTART, STATIC,
                    UNIT, heap_min_unpinned, heap_push, heap_remove, less,
                    link_append, link_between, list_append, list_remove, member_add, member_remove, sift_down,
                    sift_up)

POLICY_CODES = {"lru": 0, "fifo": 1, "lfu": 2, "lfru": 3, "belady": 4, "static": 5, "class_lru": 6,
                "activation_aware": 7, "visit_count": 8, "page_cache": 9, "learned": 10}
LEARNED = POLICY_CODES["learned"]
REFUSING = 8  # the code of the one built-in policy whose victim may be none (strategies.CachePolicy.refuses)
RESCALE_AT = 1e100  # strategies/lfu.py: RESCALE_AT
AA_EPS = 1e-6  # strategies/activation_aware.py: EPS


@njit(**HOT)
def _lfu_rescale(I, F, p, off, pos, period):
    """strategies/lfu.py LFU._advance, when the factor passes RESCALE_AT: fold it into every count."""
    u = F[UNIT, p]
    n = I[HSIZE, p]
    for i in range(n):
        F[K1, I[HEAP, off + i]] /= u
    I[EPOCH0, p] = pos // period
    F[UNIT, p] = 1.0
    for i in range(n // 2 - 1, -1, -1):  # heapify: equal counts may now be ordered by touch
        sift_down(I, F, n, off, i)


@njit(**HOT)
def _lfu_advance(I, F, prm, p, pos):
    """strategies/lfu.py LFU._advance."""
    if not prm.decay_is_one:
        if I[HSIZE, p] == 0:  # nothing counted (start, or after a reset): age from now
            I[EPOCH0, p] = pos // prm.period
        u = math.pow(prm.decay, float(I[EPOCH0, p] - pos // prm.period))  # as Python's float ** int
        F[UNIT, p] = u
        if u > RESCALE_AT and u != math.inf:  # inf: the reference raises OverflowError; _request reports it
            _lfu_rescale(I, F, p, p * prm.cm, pos, prm.period)


@njit(**HOT)
def _lfru_use(I, F, prm, p, t, kid):
    """strategies/lfru.py LFRU._use."""
    if I[SEEN, kid] == 0:
        I[SEEN, kid] = 1
        F[K1, kid] = 0.0
    else:
        x = F[K1, kid] + (t - F[LAST, kid]) * prm.log_decay
        F[K1, kid] = x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x))
    F[LAST, kid] = t
    F[NOW, p] = t
    I[NTOUCH, p] += 1
    I[K2, kid] = I[NTOUCH, p]


# LFRU's front: the residents with a smaller log f than every older one, in the list's order (oldest first,
# log f falling). Any other key has an older key with no larger log f, whose score is no larger (score =
# log f + h(age), h(age) = age * log(decay) - alpha * log1p(age) falls with age) and which wins a tie, so
# the victim is on the front. The floats agree: rounding is monotone and log1p keeps the order of ages (they
# differ by 1/L steps or more), so the reference's formula on a larger log f and a smaller age never gives a
# smaller score. Scanning the front (17 of 192 keys per miss on the real trace, global pool) instead of
# walking the list tripled the timed replay's rate there (0.24 -> 0.7 M layer-steps/s).
@njit(**HOT)
def _front_append(I, F, p, kid):
    """`kid` was just appended to the list: it joins the front if its log f is under everyone's."""
    t = I[FTAIL, p]
    if t >= 0 and not F[K1, kid] < F[K1, t]:  # the youngest member holds the least log f of the list
        return
    I[FRONT, kid] = 1
    link_append(I, p, kid, FHEAD, FTAIL, FPREV, FNEXT)


@njit(**HOT)
def _front_remove(I, F, p, kid):
    """`kid` leaves the list (call before _list_remove). If it was on the front, the keys it alone kept off,
    those up to its younger neighbour there, are scanned for new members."""
    if I[FRONT, kid] == 0:
        return
    I[FRONT, kid] = 0
    a, b = I[FPREV, kid], I[FNEXT, kid]
    least = F[K1, a] if a >= 0 else math.inf  # the least log f older than the scanned key
    x = I[NEXT, kid]
    while x != b:  # b: -1 (the list's end) or a list entry younger than kid
        if F[K1, x] < least:
            least = F[K1, x]
            I[FRONT, x] = 1
            I[FPREV, x] = a
            if a >= 0:
                I[FNEXT, a] = x
            else:
                I[FHEAD, p] = x
            a = x
        x = I[NEXT, x]
    link_between(I, p, a, b, FHEAD, FTAIL, FPREV, FNEXT)


@njit(**HOT)
def _lfru_victim(I, F, prm, p, mark, everyone):
    """strategies/lfru.py LFRU.victim: the lowest (log score at `now`, touch) among unpinned residents, all
    on the front (see above). Members are visited oldest first, so a tie keeps the older touch. Pinned keys
    are the newest of the list (hits are used, then misses inserted): the first pinned member ends the scan.
    A prefetch also pins the predicted keys, which may be old: then (`everyone`) the whole list is scanned."""
    t = F[NOW, p]
    best = -1
    best_score = math.inf
    x = I[HEAD, p] if everyone else I[FHEAD, p]
    while x >= 0:
        if I[PIN, x] == mark:
            if not everyone:
                break
        else:
            age = t - F[LAST, x]
            score = F[K1, x] + age * prm.log_decay - prm.alpha * math.log1p(age)  # the reference's operations
            if score < best_score:
                best = x
                best_score = score
        x = I[NEXT, x] if everyone else I[FNEXT, x]
    return best


@njit(**HOT)
def _static_fallback(I, off, size, mark):
    """strategies/static.py Static.victim when the LRU area is all pinned: the least used static key
    (ties: the lower key)."""
    best = -1
    for i in range(size):
        x = I[MEMBERS, off + i]
        if I[PIN, x] != mark and I[STATIC, x] == 1 and (
                best < 0 or I[SCOUNT, x] < I[SCOUNT, best] or (I[SCOUNT, x] == I[SCOUNT, best] and x < best)):
            best = x
    return best


# class_lru: one list per (partition, class) in CHEAD/CTAIL at column p * classes + class ---------------------
@njit(**HOT)
def _class_place(I, F, prm, p, pos, kid, add, listed):
    """strategies/class_lru.py ClassLRU._crf_now + _place: the decayed count at `pos` plus `add`, then to the
    newest end of its class's list (`listed`: it is on a list now and leaves it first)."""
    c = 0.0 if I[SEEN, kid] == 0 else F[K1, kid] * math.exp((pos - I[K2, kid]) * prm.decay_per_pos)
    crf = c + add
    I[SEEN, kid] = 1
    F[K1, kid] = crf
    I[K2, kid] = pos  # the position of the last use (and of the count's last update)
    cls = min(prm.classes - 1, int(math.floor(math.log2(crf)))) if crf >= 1 else 0
    C = prm.classes
    if listed:
        link_between(I, p * C + I[CLS, kid], I[PREV, kid], I[NEXT, kid], CHEAD, CTAIL, PREV, NEXT)
    I[CLS, kid] = cls
    link_append(I, p * C + cls, kid, CHEAD, CTAIL, PREV, NEXT)


@njit(**HOT)
def _class_victim(I, prm, p, mark, pos):
    """ClassLRU.victim: of each class list's oldest unpinned key, the one with the largest age / 2**class (ties:
    the lower class)."""
    C = prm.classes
    best = -1
    best_age = -1.0
    for c in range(C):
        x = I[CHEAD, p * C + c]
        while x >= 0 and I[PIN, x] == mark:
            x = I[NEXT, x]
        if x >= 0:
            age = (pos - I[K2, x]) / 2.0 ** c
            if age > best_age:
                best = x
                best_age = age
    return best


# activation_aware: per key EAM (this sequence), FREQ (since the start); per layer their totals, its residents
# in a list (CHEAD/CTAIL at column `layer`, PREV/NEXT), and the least of them (AB, ABP) until a use in the
# layer, a new sequence or a change of residents makes it stale. A victim is the least of the layers' least
# keys: a scan of one layer's residents per miss instead of the whole pool's (in a global pool of 192 slots on the
# real trace 0.50 -> 1.22 M layer-steps/s, tests/bench/test_bench_replay.py).
@njit(**HOT)
def _aa_at(I, prm, seqs, p, pos):
    """ActivationAware._at: a new sequence empties the current matrix of the partition's layers."""
    seq = seqs[pos // prm.L]
    if seq != I[PSEQ, p]:
        I[PSEQ, p] = seq
        E = prm.E
        for layer in range(prm.L):
            if I[PART, layer] == p:
                I[EROWS, layer] = 0
                I[AB, layer] = AB_STALE
                for e in range(E):
                    I[EAM, layer * E + e] = 0


@njit(**HOT)
def _aa_use(I, prm, p, kid):
    layer = kid // prm.E
    I[EAM, kid] += 1
    I[EROWS, layer] += 1
    I[FREQ, kid] += 1
    I[FROWS, layer] += 1
    I[NTOUCH, p] += 1
    I[K2, kid] = I[NTOUCH, p]
    I[AB, layer] = AB_STALE


@njit(**HOT)
def _aa_priority(I, F, layer, x):
    """ActivationAware.priority (the reference's operations)."""
    er, fr = I[EROWS, layer], I[FROWS, layer]
    share = I[EAM, x] / er if er else 0.0
    freq = I[FREQ, x] / fr if fr else 0.0
    return (share + AA_EPS) * (freq + AA_EPS) * F[LW, layer]


@njit(**HOT)
def _aa_least(I, F, layer, mark):
    """(key, priority) of the layer's lowest (priority, touch) resident not pinned with `mark` (mark -1: any),
    or (-1, 0.0)."""
    best = -1
    best_prio = 0.0
    x = I[CHEAD, layer]
    while x >= 0:
        if I[PIN, x] != mark:
            prio = _aa_priority(I, F, layer, x)
            if best < 0 or prio < best_prio or (prio == best_prio and I[K2, x] < I[K2, best]):
                best = x
                best_prio = prio
        x = I[NEXT, x]
    return best, best_prio


@njit(**HOT)
def _aa_victim(I, F, prm, p, mark):
    """ActivationAware.victim: the lowest (priority, touch) among the partition's unpinned residents."""
    best = -1
    best_prio = 0.0
    for layer in range(prm.L):
        if I[PART, layer] != p:
            continue
        if I[AB, layer] == AB_STALE:
            I[AB, layer], F[ABP, layer] = _aa_least(I, F, layer, -1)
        x, prio = I[AB, layer], F[ABP, layer]
        if x >= 0 and I[PIN, x] == mark:  # the layer's least is in use: the least of the others
            x, prio = _aa_least(I, F, layer, mark)
        if x >= 0 and (best < 0 or prio < best_prio or (prio == best_prio and I[K2, x] < I[K2, best])):
            best = x
            best_prio = prio
    return best


@njit(**HOT)
def _aa_join(I, prm, kid):
    layer = kid // prm.E
    link_append(I, layer, kid, CHEAD, CTAIL, PREV, NEXT)
    I[AB, layer] = AB_STALE


@njit(**HOT)
def _aa_leave(I, prm, kid):
    layer = kid // prm.E
    link_between(I, layer, I[PREV, kid], I[NEXT, kid], CHEAD, CTAIL, PREV, NEXT)
    I[AB, layer] = AB_STALE


# visit_count: a min-heap per layer of its residents ranked by (-visits in F[K1], key in I[K2]) in the HEAP row at
# columns layer * E (sizes in HSIZE at column layer), so a victim is the best of the earlier layers' heaps' roots
# (a scan of every resident had taken a plan of the real trace 13 s); a hit ranks its key up
@njit(**HOT)
def _visit_victim(I, F, prm, p, mark, pos):
    """strategies/visit_count.py VisitCount.victim: among unpinned residents of partition p in layers before the
    running one, the most visited, ties to the lower key; -1 if none."""
    best = -1
    for layer in range(pos % prm.L):
        if I[HSIZE, layer] == 0 or I[PART, layer] != p:
            continue
        off = layer * prm.E
        x = I[HEAP, off]
        if I[PIN, x] == mark:
            x = heap_min_unpinned(I, F, layer, off, mark)
            if x < 0:
                continue
        if best < 0 or less(I, F, x, best):
            best = x
    return best


# page_cache: the inactive (0) and active (1) lists as class lists (CHEAD/CTAIL at p * 2 + list, PREV/NEXT), each
# key's list in CLS; per partition HSIZE: active keys, NTOUCH: the nonresident age; per key K2: the age at its
# last eviction (its shadow entry) where SEEN --------------------------------------------------------------
@njit(**HOT)
def _pc_move(I, p, kid, to):
    """Move resident `kid` from its list to the young end of list `to`."""
    link_between(I, p * 2 + I[CLS, kid], I[PREV, kid], I[NEXT, kid], CHEAD, CTAIL, PREV, NEXT)
    I[CLS, kid] = to
    link_append(I, p * 2 + to, kid, CHEAD, CTAIL, PREV, NEXT)


@njit(**HOT)
def _pc_oldest_unpinned(I, p, mark):
    """The inactive list's oldest key not pinned with `mark`, else the active list's; -1 if none."""
    for lst in range(2):
        x = I[CHEAD, p * 2 + lst]
        while x >= 0 and I[PIN, x] == mark:
            x = I[NEXT, x]
        if x >= 0:
            return x
    return -1


@njit(**HOT)
def _pc_victim(I, prm, p, mark):
    """PageCache.victim: demote the active list's oldest while inactive * ratio < active, then the oldest
    unpinned key of the inactive list, else of the active list; removed from its list, its shadow left. Where
    every resident is pinned, -1 and nothing demoted (moesim.cache.Cache.insert then asks no victim)."""
    if _pc_oldest_unpinned(I, p, mark) < 0:
        return -1
    while I[HSIZE, p] > 0 and (I[SIZE, p] - I[HSIZE, p]) * prm.ratio < I[HSIZE, p]:
        _pc_move(I, p, I[CHEAD, p * 2 + 1], 0)
        I[HSIZE, p] -= 1
    v = _pc_oldest_unpinned(I, p, mark)
    link_between(I, p * 2 + I[CLS, v], I[PREV, v], I[NEXT, v], CHEAD, CTAIL, PREV, NEXT)
    if I[CLS, v] == 1:
        I[HSIZE, p] -= 1
    I[K2, v] = I[NTOUCH, p]  # workingset_eviction: the shadow holds the age, then the age grows
    I[SEEN, v] = 1
    I[NTOUCH, p] += 1
    return v


# learned (strategies/learned.py): the request updates the history of its keys (learned_request, called by the
# replay loops run_hits and run_sim before a request's waves); a victim is the unpinned member with the largest
# output of the network (_lp_victim), ties to the older last request, then the lower key. The model
# (strategies/learned.py flat_model) is F's rows from LPM on, read flat: m = F.reshape(-1) from LPM * W; hidden
# prm.hidden. From row prm.lrow: LP_ROWS rows (below).
LP_NF = 12  # strategies/learned.py N_FEATURES
LP_NO_GAP = 1e5  # NO_GAP
LP_LN2 = math.log(2.0)
LP_HL = (4.0, 32.0, 256.0)  # HALF_LIVES
# rows from prm.lrow: log1p(age) and exp(-age ln2 / half-life) for ages 0..W-1 (filled by CPython's math, the
# reference's: the same numbers bit for bit; older ages are computed), then per key the network's output at the
# request position I[LOST, key] - 1 (its features change only when a request is read: the evictions of one
# request reuse it)
LP_LOG, LP_EXP, LP_OUT = 0, 1, 4
LP_ROWS = 5


def lp_tables(W: int) -> np.ndarray:
    """float64 [4, W]: learned's tables by age in steps (its rows from prm.lrow)."""
    t = np.empty((4, W))
    t[LP_LOG] = [math.log1p(a) for a in range(W)]
    for h in range(3):
        t[LP_EXP + h] = [math.exp(-a * LP_LN2 / LP_HL[h]) for a in range(W)]
    return t


@njit(**HOT)
def _lp_tables(F, prm):
    """(offset of the model in F.reshape(-1), and those of pop, P and P2 from it)."""
    H, nf = prm.hidden, LP_NF
    pop = 2 * nf + H * nf + H + H * H + H + H + 1
    P = pop + prm.L * prm.E
    return LPM * F.shape[1], pop, P, P + prm.L * prm.E * prm.E


@njit(**HOT)
def _lp_log1p(F, prm, a):
    """math.log1p(a) for a whole number of steps a >= 0."""
    return F[prm.lrow + LP_LOG, a] if a < F.shape[1] else math.log1p(a)


@njit(**HOT)
def _lp_decay(F, prm, a, h):
    """math.exp(-a * ln2 / LP_HL[h]) for a whole number of steps a >= 0."""
    return F[prm.lrow + LP_EXP + h, a] if a < F.shape[1] else math.exp(-a * LP_LN2 / LP_HL[h])


@njit(**HOT)
def learned_request(I, F, seqs, prm, p, pos, layer, ids, a, b):
    """Learned._request: the request of `layer` at `pos` is the expert ids ids[a:b] (all its waves)."""
    E = prm.E
    t = pos // prm.L
    seq = seqs[t]
    if seq != I[PSEQ, p]:  # a new sequence: its counts and the previous request's scores start empty
        I[PSEQ, p] = seq
        I[SSTART, p] = t
        for lay in range(prm.L):
            if I[PART, lay] == p:
                I[LQZ, lay] = 1
                for e in range(E):
                    I[SCNT, lay * E + e] = 0
    base = layer * E
    if I[LQZ, layer] == 1:  # the request before this one, for TS2
        I[LQZ, layer] = 0
        I[LNP, layer] = 0
    else:
        for j in range(I[LN, layer]):
            I[LPRV, base + j] = I[LREQ, base + j]
        I[LNP, layer] = I[LN, layer]
    n = 0
    for i in range(a, b):  # this request's ids, ascending and distinct (insertion: a request holds few)
        x = ids[i]
        j = n
        while j > 0 and I[LREQ, base + j - 1] > x:
            j -= 1
        if j > 0 and I[LREQ, base + j - 1] == x:
            continue
        for k in range(n, j, -1):
            I[LREQ, base + k] = I[LREQ, base + k - 1]
        I[LREQ, base + j] = x
        n += 1
    I[LN, layer] = n
    for j in range(n):
        kid = base + I[LREQ, base + j]
        last = I[LUSE, kid]
        if last >= 0:
            I[G2, kid] = I[G1, kid]
            I[G1, kid] = t - last
            for h in range(3):
                F[DC + h, kid] = F[DC + h, kid] * _lp_decay(F, prm, t - last, h) + 1.0
        else:
            for h in range(3):
                F[DC + h, kid] = 1.0
        I[LUSE, kid] = t
        I[SCNT, kid] += 1


@njit(**HOT)
def learned_features(I, F, prm, pos, kid):
    """Learned.features of `kid` (a key of the trace: < L * E) at `pos`, into the scratch row F[LPH, 0:12]."""
    t = pos // prm.L
    E = prm.E
    layer, e = kid // E, kid % E
    last = I[LUSE, kid]
    g1, g2 = I[G1, kid], I[G2, kid]
    n = t - I[SSTART, I[PART, layer]] + 1
    cnt = I[SCNT, kid]
    o, oPop, oP, oP2 = _lp_tables(F, prm)
    m = F.reshape(-1)
    no_gap = math.log1p(LP_NO_GAP)
    F[LPH, 0] = _lp_log1p(F, prm, t - last) if last >= 0 else no_gap
    F[LPH, 1] = _lp_log1p(F, prm, g1) if g1 >= 0 else no_gap
    F[LPH, 2] = _lp_log1p(F, prm, g2) if g2 >= 0 else no_gap
    for h in range(3):
        F[LPH, 3 + h] = F[DC + h, kid] * _lp_decay(F, prm, t - last, h) if last >= 0 else 0.0
    F[LPH, 6] = cnt / n
    F[LPH, 7] = _lp_log1p(F, prm, n)
    base = layer * E
    s = 0.0
    rowP = o + oP + layer * E * E + e
    for j in range(I[LN, layer]):  # sum over the latest request of P[layer, a, e], in expert order
        s += m[rowP + I[LREQ, base + j] * E]
    F[LPH, 8] = s
    F[LPH, 9] = m[o + oPop + kid]
    s = 0.0
    rowP2 = o + oP2 + layer * E * E + e
    for j in range(I[LNP, layer]):  # the request before it, with P2
        s += m[rowP2 + I[LPRV, base + j] * E]
    F[LPH, 10] = s
    F[LPH, 11] = 1.0 if cnt > 0 else 0.0


@njit(**HOT)
def _lp_out(I, F, prm, pos, kid):
    """The network's output for `kid` at `pos` (strategies/learned.py mlp of Learned.features), computed once
    per request position. `kid` is a key of the trace (< L * E): the history and the outputs are the trace's,
    whatever the cache holds (run_hits_budgets keeps several budgets' caches beside one history)."""
    at = prm.lrow + LP_OUT
    if I[LOST, kid] == pos + 1:
        return F[at, kid]
    H, nf = prm.hidden, LP_NF
    m = F.reshape(-1)[LPM * F.shape[1]:]  # the model (a view)
    ow1 = 2 * nf
    ob1 = ow1 + H * nf
    ow2 = ob1 + H
    ob2 = ow2 + H * H
    ow3 = ob2 + H
    ob3 = ow3 + H
    learned_features(I, F, prm, pos, kid)
    for j in range(nf):  # standardised in place
        F[LPH, j] = (F[LPH, j] - m[j]) / m[nf + j]
    # each layer adds one input to every unit at a time (w1, w2 input-major): the units' sums are independent, so
    # they run side by side in vector registers, and each is summed in the reference's order (the same bits);
    # a sum per unit in turn waited on each add (the latency of H * (nf + H) adds in a row)
    h1, h2 = nf, nf + H  # columns of the hidden layers' sums in the scratch row
    for i in range(H):
        F[LPH, h1 + i] = m[ob1 + i]
    for j in range(nf):
        x = F[LPH, j]
        for i in range(H):
            F[LPH, h1 + i] += m[ow1 + j * H + i] * x
    for i in range(H):
        v = F[LPH, h1 + i]
        F[LPH, h1 + i] = v if v > 0 else 0.0
        F[LPH, h2 + i] = m[ob2 + i]
    for j in range(H):
        x = F[LPH, h1 + j]
        for i in range(H):
            F[LPH, h2 + i] += m[ow2 + j * H + i] * x
    out = m[ob3]
    for i in range(H):
        s = F[LPH, h2 + i]
        out += m[ow3 + i] * (s if s > 0 else 0.0)
    F[at, kid] = out
    I[LOST, kid] = pos + 1
    return out


@njit(**HOT)
def _lp_victim(I, F, prm, p, off, mark, pos):
    """Learned.victim: the unpinned member with the largest output; ties to the older last request, then
    the lower key; -1 if none. A member may be a budget's copy of a trace key (run_hits_budgets: key + k * L * E),
    whose history and output are the trace key's."""
    best = -1
    bo = 0.0
    hb = 0  # the best's trace key
    LE = prm.L * prm.E
    for i in range(I[SIZE, p]):
        x = I[MEMBERS, off + i]
        if I[PIN, x] == mark:
            continue
        h = x
        while h >= LE:  # no division: this runs for every candidate
            h -= LE
        o = _lp_out(I, F, prm, pos, h)
        if best < 0 or o > bo or (o == bo and (I[LUSE, h] < I[LUSE, hb] or (I[LUSE, h] == I[LUSE, hb] and x < best))):
            best = x
            bo = o
            hb = h
    return best


# dispatch ---------------------------------------------------------------------------------------------------
@njit(**HOT)
def on_request(I, F, seqs, prm, p, pos):
    """What a policy does at every request of its partition, with hits or not (Cache.lookup calls on_access
    at every position): LFU ages, LFRU's clock moves, activation_aware notices a new sequence."""
    code = prm.code
    if code == 2:
        _lfu_advance(I, F, prm, p, pos)
    elif code == 3:
        F[NOW, p] = pos / prm.L
    elif code == 7:
        _aa_at(I, prm, seqs, p, pos)


@njit(**HOT)
def on_access(I, F, prm, p, pos, kid, next_use):
    """The policy's on_access for one hit (after on_request)."""
    code = prm.code
    if code == 0 or (code == 5 and I[STATIC, kid] == 0):  # lru, static's LRU area: to the newest end
        list_remove(I, p, kid)
        list_append(I, p, kid)
    elif code == 2:  # lfu: count + unit, a new touch; its rank only grows
        I[NTOUCH, p] += 1
        F[K1, kid] = F[K1, kid] + F[UNIT, p]
        I[K2, kid] = I[NTOUCH, p]
        sift_down(I, F, I[HSIZE, p], p * prm.cm, I[HPOS, kid])
    elif code == 3:  # lfru: its list is in order of last use
        _front_remove(I, F, p, kid)
        list_remove(I, p, kid)
        _lfru_use(I, F, prm, p, pos / prm.L, kid)
        list_append(I, p, kid)
        _front_append(I, F, p, kid)
    elif code == 4:  # belady: the next use after pos; -next use only falls
        F[K1, kid] = -float(next_use)
        sift_up(I, F, p * prm.cm, I[HPOS, kid])
    elif code == 6:
        _class_place(I, F, prm, p, pos, kid, 1.0, True)
    elif code == 7:
        _aa_use(I, prm, p, kid)
    elif code == 8:  # one more visit: up its layer's heap
        F[K1, kid] -= 1.0
        sift_up(I, F, (kid // prm.E) * prm.E, I[HPOS, kid])
    elif code == 9 and I[CLS, kid] == 0:  # page_cache: inactive -> active (ages the node); an active key stays
        I[HSIZE, p] += 1
        I[NTOUCH, p] += 1
        _pc_move(I, p, kid, 1)


@njit(**HOT)
def on_insert(I, F, seqs, prm, p, pos, kid, next_use, prefetched):
    """The policy's on_insert: `kid` becomes resident at `pos` (call before SIZE grows)."""
    code = prm.code
    if code <= 1:
        list_append(I, p, kid)
    elif code == 2:
        _lfu_advance(I, F, prm, p, pos)
        I[NTOUCH, p] += 1
        F[K1, kid] = 0.0 + F[UNIT, p]
        I[K2, kid] = I[NTOUCH, p]
        heap_push(I, F, p, p * prm.cm, kid)
    elif code == 3:
        _lfru_use(I, F, prm, p, pos / prm.L, kid)
        list_append(I, p, kid)
        _front_append(I, F, p, kid)
    elif code == 4:
        F[K1, kid] = -float(next_use)
        I[K2, kid] = kid
        heap_push(I, F, p, p * prm.cm, kid)
    elif code == 5:
        member_add(I, p, p * prm.cm, kid)
        if I[STATIC, kid] == 0:
            list_append(I, p, kid)
    elif code == 6:  # a prefetched load enters its class's list without counting as a use
        _class_place(I, F, prm, p, pos, kid, 0.0 if prefetched else 1.0, False)
    elif code == 8:  # one visit at the load
        F[K1, kid] = -1.0
        I[K2, kid] = kid
        heap_push(I, F, kid // prm.E, (kid // prm.E) * prm.E, kid)
    elif code == LEARNED:
        member_add(I, p, p * prm.cm, kid)
    elif code == 9:  # a refault within the active list's size is activated at once
        to = 1 if I[SEEN, kid] == 1 and I[NTOUCH, p] - I[K2, kid] <= I[HSIZE, p] else 0
        I[SEEN, kid] = 0
        if to == 1:
            I[HSIZE, p] += 1
            I[NTOUCH, p] += 1
        I[CLS, kid] = to
        link_append(I, p * 2 + to, kid, CHEAD, CTAIL, PREV, NEXT)
    else:
        _aa_at(I, prm, seqs, p, pos)
        if prefetched:  # not a request: it ranks as unused so far
            I[NTOUCH, p] += 1
            I[K2, kid] = I[NTOUCH, p]
        else:
            _aa_use(I, prm, p, kid)
        _aa_join(I, prm, kid)


@njit(**HOT)
def evict_one(I, F, prm, p, mark, pos, prefetch):
    """Choose the policy's victim among the unpinned residents of partition p at `pos` (for a prefetch:
    `prefetch`) and remove it from the policy's structures (on_evict). Returns it, or -1 if every resident is
    pinned."""
    code = prm.code
    off = p * prm.cm
    if code <= 1 or code == 5:  # the oldest list entry not pinned
        v = I[HEAD, p]
        while v >= 0 and I[PIN, v] == mark:
            v = I[NEXT, v]
        if v >= 0:
            list_remove(I, p, v)
            if code == 5:
                member_remove(I, p, off, v)
        elif code == 5:
            v = _static_fallback(I, off, I[SIZE, p], mark)
            if v >= 0:
                member_remove(I, p, off, v)
        return v
    if code == 3:
        v = _lfru_victim(I, F, prm, p, mark, prefetch)
        if v >= 0:
            _front_remove(I, F, p, v)
            list_remove(I, p, v)
        return v
    if code == 6:
        v = _class_victim(I, prm, p, mark, pos)
        if v >= 0:
            link_between(I, p * prm.classes + I[CLS, v], I[PREV, v], I[NEXT, v], CHEAD, CTAIL, PREV, NEXT)
        return v
    if code == 7:
        v = _aa_victim(I, F, prm, p, mark)
        if v >= 0:
            _aa_leave(I, prm, v)
        return v
    if code == 9:
        return _pc_victim(I, prm, p, mark)
    if code == 8:
        v = _visit_victim(I, F, prm, p, mark, pos)
        if v >= 0:
            heap_remove(I, F, v // prm.E, (v // prm.E) * prm.E, v)
        return v
    if code == LEARNED:
        v = _lp_victim(I, F, prm, p, off, mark, pos)
        if v >= 0:
            member_remove(I, p, off, v)
        return v
    v = I[HEAP, off] if I[HSIZE, p] > 0 else -1  # lfu, belady: the heap's root unless it is pinned
    if v >= 0 and I[PIN, v] == mark:
        v = heap_min_unpinned(I, F, p, off, mark)
    if v >= 0:
        heap_remove(I, F, p, off, v)
    return v
