"""Compiled replay (numba): the decisions of the plain-Python engine and strategies, about 50-250x faster.

    python -m pytest tests/test_fast.py                # equal to moesim.engine + strategies, every policy
    python -m pytest tests/bench --benchmark-enable    # rates against the Python loop and libCacheSim

    from moesim import fast
    fast.hit_counts(trace, "lru", {}, n_slots=192, scope="per_layer")       # Counters.to_dict()
    run = fast.replay_sim(trace, "lfu", {"decay": 0.5}, 192, "global", "h200")
    run.counters, run.profiler.metrics(), run.profiler.steps_table(), run.device_bytes

The plain-Python policies in strategies/ are the reference: this module re-implements the built-in ones
(lru, fifo, lfu, lfru, belady, static), the mechanism of moesim/cache.py (partitions, pinning, free slots
handed out lowest first, hits before misses) and the clocks of moesim/backends/sim.py (no prefetcher, no
offload policy), with the same floating-point operations in the same order; tests/test_fast.py holds it to
identical counters and identical profiler events. `params` builds the reference class, so both paths
validate parameters alike (and static's reference policy picks its static experts).

Encoding (`encode`, cached on the trace): per request position pos = step * L + layer, the distinct expert
ids of that (step, layer) in order of first appearance (row order, best first; what the engine's
`step_requests` yields) are ids[ptr[pos]:ptr[pos + 1]]. A key is kid = layer * E + expert. The cache state
is rows of two arrays indexed by kid or partition (see "cache state"): per partition a doubly linked list
(LRU, FIFO, static's LRU area, LFRU in order of use, with its "front") or an indexed binary heap (LFU,
Belady). LRU and FIFO in per_layer scope, the common case, have their own kernels on a few stamps per
layer. A layer that needs more experts than its partition's slots runs in waves, hits first, as the engine
serves it.

Wiring (moesim/engine.py): a run whose strategy has no prefetcher and no offload policy, whose cache block
names a built-in class (`compiled_policy(strat.cache)`) and whose backend is sim can call `replay_sim` and
use its counters, profiler, device_bytes and request_stats in place of the loop's.
"""
from __future__ import annotations

import math
import sys
import threading
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
from numba import njit

from .errors import MoesimError
from .profiler import Profiler

POLICY_CODES = {"lru": 0, "fifo": 1, "lfu": 2, "lfru": 3, "belady": 4, "static": 5}
NEVER = 1 << 62  # next use of a key not requested again (strategies/belady.py: NEVER)
RESCALE_AT = 1e100  # strategies/lfu.py: RESCALE_AT
ALL_PINNED = -1  # kernel status: a miss found every resident of its partition pinned
LFU_OVERFLOW = -3  # kernel status: LFU's aging factor overflowed (the reference raises OverflowError there)
# Helpers on the hot path allocate nothing and are compiled without numba's reference counting: otherwise
# every call (inlined or not) increments and decrements each array argument's count atomically, which cost
# more than the cache logic itself (5-10x on LFU and Belady).
HOT = {"cache": True, "nogil": True, "_nrt": False}


def compiled_policy(block) -> tuple[str, dict] | None:
    """(policy, params) for a strategy's `cache` config block (a mapping with `_target_`) naming a built-in
    policy class, e.g. {"_target_": "strategies.lfu.LFU", "decay": 0.5} -> ("lfu", {"decay": 0.5}); None for
    any other class (which only the Python loop can run)."""
    target = str(block.get("_target_", "")) if hasattr(block, "get") else ""
    module, _, name = target.rpartition(".")
    policy = module.removeprefix("strategies.")
    if policy not in POLICY_CODES or module != f"strategies.{policy}" or reference_class(policy).__name__ != name:
        return None
    return policy, {str(k): (v if not hasattr(v, "items") else dict(v)) for k, v in block.items() if k != "_target_"}


def reference_class(policy: str):
    """The plain-Python policy class of `policy` (strategies/<policy>.py)."""
    import importlib

    if policy not in POLICY_CODES:
        raise MoesimError(f"fast path: unknown policy {policy!r}; compiled ones: {', '.join(POLICY_CODES)}")
    names = {"lru": "LRU", "fifo": "FIFO", "lfu": "LFU", "lfru": "LFRU", "belady": "Belady", "static": "Static"}
    return getattr(importlib.import_module(f"strategies.{policy}"), names[policy])


# ------------------------------------------------------------------------------------------------ encoding
class Requests(NamedTuple):
    """A trace's requests as flat arrays (see the module docstring)."""

    ids: np.ndarray  # int16 [N] expert ids, per (step, layer) distinct, first appearance first
    counts: np.ndarray | None  # int32 [N] tokens that chose each id in its step; None: all 1 (batch-1 steps)
    ptr: np.ndarray  # int64 [S * L + 1] start of each (step, layer) in `ids`
    step_tokens: np.ndarray  # int64 [S] tokens per step
    n_layers: int
    n_experts: int
    width: int  # the most ids of one request

    @property
    def n_steps(self) -> int:
        return len(self.step_tokens)

    def token_counts(self) -> np.ndarray:
        """int32 [N]: `counts`, or ones."""
        return self.counts if self.counts is not None else np.ones(len(self.ids), np.int32)


def encode(trace) -> Requests:
    """The trace's requests as flat arrays; computed once per Trace object and kept on it."""
    got = getattr(trace, "_fast_requests", None)
    if got is not None:
        return got
    starts = np.asarray(trace.step_starts, dtype=np.int64)
    experts = np.ascontiguousarray(trace.experts, dtype=np.int16)  # [T, L, K]; reads a memmap once
    T, L, K = experts.shape
    if len(starts) == T + 1 and (experts >= 0).all():  # one token per step, K ids per row: the rows themselves
        ids = experts.reshape(-1).copy()  # ids of a row are distinct (validated)
        counts = None  # every id chosen by one token (token_counts() makes the ones when a kernel needs them)
        ptr = np.arange(T * L + 1, dtype=np.int64) * K
        width = K if T else 0
    else:
        ids, counts, ptr = _encode(experts, starts, trace.spec.experts)
        width = int(np.diff(ptr).max()) if len(ptr) > 1 else 0
    req = Requests(ids, counts, ptr, np.diff(starts), trace.n_layers, trace.spec.experts, width)
    trace._fast_requests = req
    return req


@njit(cache=True, nogil=True)
def _encode(experts, starts, E):
    T, L, K = experts.shape
    S = len(starts) - 1
    ids = np.empty(T * L * K, np.int16)
    counts = np.empty(T * L * K, np.int32)
    ptr = np.empty(S * L + 1, np.int64)
    where = np.full(E, -1, np.int64)  # index in `ids` of an expert within the current (step, layer)
    stamp = np.full(E, -1, np.int64)  # request position that `where` belongs to
    n = 0
    for s in range(S):
        lo, hi = starts[s], starts[s + 1]
        for l in range(L):
            pos = s * L + l
            ptr[pos] = n
            for t in range(lo, hi):
                for k in range(K):
                    e = experts[t, l, k]
                    if e < 0:
                        continue
                    if stamp[e] == pos:
                        counts[where[e]] += 1
                    else:
                        stamp[e] = pos
                        where[e] = n
                        ids[n] = e
                        counts[n] = 1
                        n += 1
    ptr[S * L] = n
    return ids[:n].copy(), counts[:n].copy(), ptr


@njit(cache=True, nogil=True)
def _next_use(ids, ptr, L, E):
    """int64 [N]: for each request element, the next request position of the same key (NEVER if none)."""
    n_pos = len(ptr) - 1
    nxt = np.empty(len(ids), np.int64)
    upcoming = np.full(L * E, NEVER, np.int64)
    for pos in range(n_pos - 1, -1, -1):
        base = (pos % L) * E
        for i in range(ptr[pos], ptr[pos + 1]):
            kid = base + ids[i]
            nxt[i] = upcoming[kid]
            upcoming[kid] = pos
    return nxt


def reset_steps(trace, reset_per_seq: bool) -> np.ndarray:
    """uint8 [S]: 1 where the engine empties the cache before the step (a step holding a sequence not seen
    before, except the first such step), as moesim.engine.replay does with reset_per_seq."""
    S = trace.n_steps
    out = np.zeros(S, np.uint8)
    if not reset_per_seq or S == 0:
        return out
    seq = np.asarray(trace.seq)
    _, first = np.unique(seq, return_index=True)  # first token of each sequence
    step_of_token = np.repeat(np.arange(S), np.diff(trace.step_starts))
    out[step_of_token[first]] = 1
    out[0] = 0  # the first step starts empty anyway: no reset
    return out


# ----------------------------------------------------------------------------------------- cache state
# The state is two 2-D arrays, I (int64) and F (float64), whose rows are the fields below: numba passes each
# array argument of a call that is not inlined at a cost, so the kernels pass few arrays.
# rows of I, per key (kid = layer * E + expert):
RES, PIN, SLOT, PREV, NEXT, HPOS, K2, SEEN, MIDX, STATIC, SCOUNT = range(11)
# RES: resident (0/1); PIN: request position + 1 while the running layer pins it; SLOT: device slot;
# PREV/NEXT: linked list, oldest first (LRU and LFRU: by last use; FIFO: by insert; static: its LRU area;
# -1 ends); HPOS: index in the partition's heap; K2: second rank (LFU, LFRU: touch number; Belady: kid);
# SEEN: LFRU history since the last reset; MIDX: index in the partition's member list (static);
# STATIC: never a victim while the LRU area has one; SCOUNT: calibration requests of a static key
# rows of I, per partition p:
CAP, SIZE, BASE, NFREE, HEAD, TAIL, HSIZE, EPOCH0, NTOUCH = range(11, 20)
# CAP: slots; SIZE: residents; BASE: first slot; NFREE: free slots left; HEAD/TAIL: oldest/newest of the
# list; HSIZE: heap size; EPOCH0: LFU aging epochs folded into its counts; NTOUCH: touches so far
# rows of I, per partition p and index i < capmax, at column p * capmax + i:
FREE, HEAP, MEMBERS = range(20, 23)  # free slots (a stack: pop takes the last); min-heap of kids; static's residents
STACK = 23  # row of I, per partition p and index i < capmax: scratch of _heap_min_unpinned
PART = 24  # row of I, per layer: its partition
# LFRU's front (see _lfru_victim): FRONT, FPREV, FNEXT per key: on the front (0/1), its older and younger
# neighbours there (-1 ends); FHEAD, FTAIL per partition: its oldest and youngest member
FRONT, FPREV, FNEXT, FHEAD, FTAIL = range(25, 30)
N_IROWS = 30
# rows of F: per key, K1: first rank (LFU: stored count; Belady: -next use; LFRU: log f), LAST: LFRU last use;
# per partition, UNIT: what one LFU use adds to a stored count, NOW: LFRU time of the latest use
K1, LAST, UNIT, NOW = range(4)


class State(NamedTuple):
    """Cache state of every partition (a layer in per_layer scope, one pool in global)."""

    I: np.ndarray  # int64 [N_IROWS, W]
    F: np.ndarray  # float64 [4, W]
    nxt: np.ndarray  # int64 [N] Belady: next request position of each request element (else empty)


class Params(NamedTuple):
    code: int  # POLICY_CODES
    L: int
    E: int
    cm: int  # capmax: columns per partition in the FREE, HEAP, MEMBERS rows
    decay: float  # LFU, LFRU
    log_decay: float  # LFRU
    decay_is_one: bool  # LFU: no aging
    period: int  # LFU: request positions per aging epoch
    alpha: float  # LFRU


def partitions(n_layers: int, n_slots: int, scope: str) -> tuple[np.ndarray, np.ndarray]:
    """(part_of_layer int64 [L], capacity int64 [P]) as moesim/cache.py splits `n_slots`."""
    if scope == "per_layer":
        return np.arange(n_layers, dtype=np.int64), np.full(n_layers, n_slots // n_layers, np.int64)
    if scope == "global":
        return np.zeros(n_layers, np.int64), np.array([n_slots], np.int64)
    raise MoesimError(f"scope={scope!r}: expected one of per_layer, global")


def new_state(trace, policy: str, policy_obj, n_slots: int, scope: str,
              nxt: np.ndarray | None = None) -> tuple[State, int]:
    """(empty cache state for `n_slots` slots in `scope`, capmax)."""
    L, E = trace.n_layers, trace.spec.experts
    part_of_layer, cap = partitions(L, n_slots, scope)
    P, nk = len(cap), L * E
    cm = max(int(cap.max()), 1)
    I = np.zeros((N_IROWS, max(nk, P * cm, L)), np.int64)
    I[CAP, :P] = cap
    I[BASE, :P] = np.concatenate([[0], np.cumsum(cap)[:-1]])
    I[PART, :L] = part_of_layer
    if policy == "static":  # the reference policy picks the static keys of each partition
        from strategies import Context

        for p in range(P):
            layers = tuple(range(L)) if scope == "global" else (p,)
            policy_obj.setup(Context(trace, trace.spec, layers, int(cap[p]), scope))
            for (layer, e), c in policy_obj.static.items():
                I[STATIC, layer * E + e] = 1
                I[SCOUNT, layer * E + e] = c
    st = State(I, np.zeros((4, I.shape[1])), nxt if nxt is not None else np.zeros(0, np.int64))
    _reset(st.I, st.F, P, cm)
    return st, cm


def make_params(trace, policy: str, policy_obj, cm: int) -> Params:
    decay = float(getattr(policy_obj, "decay", 1.0))
    period = int(getattr(policy_obj, "decay_every", None) or trace.spec.layers)
    return Params(POLICY_CODES[policy], trace.n_layers, trace.spec.experts, cm, decay, math.log(decay),
                  decay == 1.0, period, float(getattr(policy_obj, "alpha", 0.0)))


# ------------------------------------------------------------------------------------------ kernels
@njit(cache=True, nogil=True)
def _reset(I, F, P, cm):
    """Cache.reset(): every partition empty, every policy set up again (counters are not state here)."""
    I[RES] = 0
    I[PIN] = 0
    I[SEEN] = 0
    I[FRONT] = 0
    I[SLOT] = -1
    for p in range(P):
        c = I[CAP, p]
        for i in range(c):  # Partition.free = reversed(slots): pop() hands out the lowest slot first
            I[FREE, p * cm + i] = I[BASE, p] + c - 1 - i
        I[NFREE, p] = c
        I[SIZE, p] = 0
        I[HEAD, p] = -1
        I[TAIL, p] = -1
        I[FHEAD, p] = -1
        I[FTAIL, p] = -1
        I[HSIZE, p] = 0
        I[EPOCH0, p] = 0
        I[NTOUCH, p] = 0
        F[UNIT, p] = 1.0
        F[NOW, p] = 0.0


# linked list ---------------------------------------------------------------------------------------
# A list of partition p is held in rows (head, tail) of I[:, p] and (prev, next) of I[:, kid]: the order-of-use
# list in HEAD, TAIL, PREV, NEXT; LFRU's front in FHEAD, FTAIL, FPREV, FNEXT.
@njit(**HOT)
def _link_append(I, p, kid, head, tail, prev, next_):
    t = I[tail, p]
    I[prev, kid] = t
    I[next_, kid] = -1
    if t >= 0:
        I[next_, t] = kid
    else:
        I[head, p] = kid
    I[tail, p] = kid


@njit(**HOT)
def _link_between(I, p, a, b, head, tail, prev, next_):
    """Make a and b neighbours (-1: the list's end), dropping whatever was between them."""
    if a >= 0:
        I[next_, a] = b
    else:
        I[head, p] = b
    if b >= 0:
        I[prev, b] = a
    else:
        I[tail, p] = a


@njit(**HOT)
def _list_append(I, p, kid):
    _link_append(I, p, kid, HEAD, TAIL, PREV, NEXT)


@njit(**HOT)
def _list_remove(I, p, kid):
    _link_between(I, p, I[PREV, kid], I[NEXT, kid], HEAD, TAIL, PREV, NEXT)


# indexed binary min-heap of kids on (K1, K2); partition p's heap is I[HEAP, off:off + I[HSIZE, p]] -----------
@njit(**HOT)
def _less(I, F, a, b):
    return F[K1, a] < F[K1, b] or (F[K1, a] == F[K1, b] and I[K2, a] < I[K2, b])


@njit(**HOT)
def _sift_up(I, F, off, i):
    # comparisons written out: a call in the loop would cost two reference counts per array per iteration
    x = I[HEAP, off + i]
    x1, x2 = F[K1, x], I[K2, x]
    while i > 0:
        par = (i - 1) >> 1
        y = I[HEAP, off + par]
        y1 = F[K1, y]
        if not (x1 < y1 or (x1 == y1 and x2 < I[K2, y])):
            break
        I[HEAP, off + i] = y
        I[HPOS, y] = i
        i = par
    I[HEAP, off + i] = x
    I[HPOS, x] = i


@njit(**HOT)
def _sift_down(I, F, n, off, i):
    x = I[HEAP, off + i]
    x1, x2 = F[K1, x], I[K2, x]
    while True:
        c = 2 * i + 1
        if c >= n:
            break
        y = I[HEAP, off + c]
        y1, y2 = F[K1, y], I[K2, y]
        if c + 1 < n:
            z = I[HEAP, off + c + 1]
            z1, z2 = F[K1, z], I[K2, z]
            if z1 < y1 or (z1 == y1 and z2 < y2):
                c, y, y1, y2 = c + 1, z, z1, z2
        if not (y1 < x1 or (y1 == x1 and y2 < x2)):
            break
        I[HEAP, off + i] = y
        I[HPOS, y] = i
        i = c
    I[HEAP, off + i] = x
    I[HPOS, x] = i


@njit(**HOT)
def _heap_push(I, F, p, off, kid):
    n = I[HSIZE, p]
    I[HEAP, off + n] = kid
    I[HSIZE, p] = n + 1
    _sift_up(I, F, off, n)


@njit(**HOT)
def _heap_remove(I, F, p, off, kid):
    i = I[HPOS, kid]
    n = I[HSIZE, p] - 1
    I[HSIZE, p] = n
    if i < n:
        last = I[HEAP, off + n]
        I[HEAP, off + i] = last
        _sift_down(I, F, n, off, i)
        _sift_up(I, F, off, I[HPOS, last])


@njit(**HOT)
def _heap_min_unpinned(I, F, p, off, mark):
    """The smallest-ranked kid of the heap not pinned (PIN != mark), or -1, when the root is pinned. Every
    unpinned node has an unpinned ancestor-or-self whose own ancestors are all pinned; only those compete."""
    n = I[HSIZE, p]
    I[STACK, off] = 0  # heap indices still to look at
    nt = 1
    best = -1
    while nt > 0:
        nt -= 1
        i = I[STACK, off + nt]
        x = I[HEAP, off + i]
        if I[PIN, x] != mark:
            if best < 0 or _less(I, F, x, best):
                best = x
            continue
        c = 2 * i + 1
        if c < n:
            I[STACK, off + nt] = c
            nt += 1
        if c + 1 < n:
            I[STACK, off + nt] = c + 1
            nt += 1
    return best


# policies: the hot paths stay small (numba calls that are not inlined are slow); rare work is apart ------
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
        _sift_down(I, F, n, off, i)


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
    _link_append(I, p, kid, FHEAD, FTAIL, FPREV, FNEXT)


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
    _link_between(I, p, a, b, FHEAD, FTAIL, FPREV, FNEXT)


@njit(**HOT)
def _lfru_victim(I, F, prm, p, mark):
    """strategies/lfru.py LFRU.victim: the lowest (log score at `now`, touch) among unpinned residents, all
    on the front (see above). Members are visited oldest first, so a tie keeps the older touch. Pinned keys
    are the newest of the list (hits are used, then misses inserted): the first pinned member ends the scan."""
    t = F[NOW, p]
    best = -1
    best_score = math.inf
    x = I[FHEAD, p]
    while x >= 0 and I[PIN, x] != mark:
        age = t - F[LAST, x]
        score = F[K1, x] + age * prm.log_decay - prm.alpha * math.log1p(age)  # the reference's operations
        if score < best_score:
            best = x
            best_score = score
        x = I[FNEXT, x]
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


@njit(**HOT)
def _member_add(I, p, off, kid):
    n = I[SIZE, p]  # called before SIZE grows
    I[MEMBERS, off + n] = kid
    I[MIDX, kid] = n


@njit(**HOT)
def _member_remove(I, p, off, kid):
    i = I[MIDX, kid]
    last = I[MEMBERS, off + I[SIZE, p] - 1]  # called before SIZE shrinks
    I[MEMBERS, off + i] = last
    I[MIDX, last] = i


@njit(**HOT)
def _on_access(I, F, prm, p, pos, kid, next_use):
    """The policy's on_access for one hit (after LFU's _advance / LFRU's `now`, done once per request)."""
    code = prm.code
    if code == 0 or (code == 5 and I[STATIC, kid] == 0):  # lru, static's LRU area: to the newest end
        _list_remove(I, p, kid)
        _list_append(I, p, kid)
    elif code == 2:  # lfu: count + unit, a new touch; its rank only grows
        I[NTOUCH, p] += 1
        F[K1, kid] = F[K1, kid] + F[UNIT, p]
        I[K2, kid] = I[NTOUCH, p]
        _sift_down(I, F, I[HSIZE, p], p * prm.cm, I[HPOS, kid])
    elif code == 3:  # lfru: its list is in order of last use
        _front_remove(I, F, p, kid)
        _list_remove(I, p, kid)
        _lfru_use(I, F, prm, p, pos / prm.L, kid)
        _list_append(I, p, kid)
        _front_append(I, F, p, kid)
    elif code == 4:  # belady: the next use after pos; -next use only falls
        F[K1, kid] = -float(next_use)
        _sift_up(I, F, p * prm.cm, I[HPOS, kid])


@njit(**HOT)
def _on_insert(I, F, prm, p, pos, kid, next_use):
    code = prm.code
    if code <= 1:
        _list_append(I, p, kid)
    elif code == 2:
        _lfu_advance(I, F, prm, p, pos)
        I[NTOUCH, p] += 1
        F[K1, kid] = 0.0 + F[UNIT, p]
        I[K2, kid] = I[NTOUCH, p]
        _heap_push(I, F, p, p * prm.cm, kid)
    elif code == 3:
        _lfru_use(I, F, prm, p, pos / prm.L, kid)
        _list_append(I, p, kid)
        _front_append(I, F, p, kid)
    elif code == 4:
        F[K1, kid] = -float(next_use)
        I[K2, kid] = kid
        _heap_push(I, F, p, p * prm.cm, kid)
    else:
        _member_add(I, p, p * prm.cm, kid)
        if I[STATIC, kid] == 0:
            _list_append(I, p, kid)


@njit(**HOT)
def _evict_one(I, F, prm, p, mark):
    """Choose the policy's victim among the unpinned residents of partition p and remove it from the
    policy's structures (on_evict). Returns it, or -1 if every resident is pinned."""
    code = prm.code
    off = p * prm.cm
    if code <= 1 or code == 5:  # the oldest list entry not pinned
        v = I[HEAD, p]
        while v >= 0 and I[PIN, v] == mark:
            v = I[NEXT, v]
        if v >= 0:
            _list_remove(I, p, v)
            if code == 5:
                _member_remove(I, p, off, v)
        elif code == 5:
            v = _static_fallback(I, off, I[SIZE, p], mark)
            if v >= 0:
                _member_remove(I, p, off, v)
        return v
    if code == 3:
        v = _lfru_victim(I, F, prm, p, mark)
        if v >= 0:
            _front_remove(I, F, p, v)
            _list_remove(I, p, v)
        return v
    v = I[HEAP, off] if I[HSIZE, p] > 0 else -1  # lfu, belady: the heap's root unless it is pinned
    if v >= 0 and I[PIN, v] == mark:
        v = _heap_min_unpinned(I, F, p, off, mark)
    if v >= 0:
        _heap_remove(I, F, p, off, v)
    return v


@njit(**HOT)
def _request(I, F, nxt, prm, pos, mark, layer, ids, a, b, out):
    """Cache.lookup, then Cache.insert for each miss: the (step, layer) request ids[a:b] at `pos`, pinned
    with `mark` (a number used once: Cache.release() then unpins by moving on).
    out[0, i - a]: -2 for a hit, else the key evicted for it or -1; out[1, i - a]: the key's slot.
    Returns (hits, evictions), or (ALL_PINNED, index) if a miss found every resident pinned, or
    (LFU_OVERFLOW, 0)."""
    p = I[PART, layer]
    base = layer * prm.E
    code = prm.code
    hits = 0
    for i in range(a, b):  # pin all; hits in row order
        kid = base + ids[i]
        I[PIN, kid] = mark
        if I[RES, kid] == 1:
            out[0, i - a] = -2
            out[1, i - a] = I[SLOT, kid]
            hits += 1
        else:
            out[0, i - a] = -1
    if code == 2:  # Cache.lookup calls on_access at every request, hits or not: LFU ages, LFRU's clock moves
        _lfu_advance(I, F, prm, p, pos)
        if F[UNIT, p] == math.inf:
            return LFU_OVERFLOW, 0
    elif code == 3:
        F[NOW, p] = pos / prm.L
    if hits > 0 and code != 1:
        for i in range(a, b):
            if out[0, i - a] == -2:
                _on_access(I, F, prm, p, pos, base + ids[i], nxt[i] if code == 4 else 0)
    evictions = 0
    if hits == b - a:
        return hits, 0
    for i in range(a, b):  # misses in row order
        if out[0, i - a] == -2:
            continue
        kid = base + ids[i]
        if I[NFREE, p] > 0:
            I[NFREE, p] -= 1
            slot = I[FREE, p * prm.cm + I[NFREE, p]]
        else:
            v = _evict_one(I, F, prm, p, mark)
            if v < 0:
                return ALL_PINNED, i - a
            slot = I[SLOT, v]
            I[RES, v] = 0
            I[SIZE, p] -= 1
            out[0, i - a] = v
            evictions += 1
        _on_insert(I, F, prm, p, pos, kid, nxt[i] if code == 4 else 0)
        I[RES, kid] = 1
        I[SLOT, kid] = slot
        I[SIZE, p] += 1
        out[1, i - a] = slot
    if code == 2 and F[UNIT, p] == math.inf:
        return LFU_OVERFLOW, 0
    return hits, evictions


@njit(cache=True, nogil=True)
def _width(ptr):
    """The most ids of one request."""
    w = 1
    for pos in range(len(ptr) - 1):
        w = max(w, ptr[pos + 1] - ptr[pos])
    return w


@njit(**HOT)
def _hits_first(I, prm, layer, ids, nxt, counts, a, b, tids, tnxt, tcnt, torder):
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


@njit(cache=True, nogil=True)
def _hit_kernel(I, F, nxt, prm, n_parts, ids, ptr, reset, flags):
    """Cache-only replay: (requests, hits, evictions, status, position of a failure). With len(flags) ==
    len(ids), flags[i] = 1 where request element i was a hit."""
    L = prm.L
    width = _width(ptr)
    out = np.empty((2, width), np.int64)
    tids = np.empty(width, ids.dtype)  # a wide request, hits first (see _hits_first)
    tnxt = np.empty(width if len(nxt) else 0, np.int64)
    torder = np.empty(width, np.int64)
    no_counts = np.empty(0, np.int32)
    mark = 0  # pin mark of the running request (or wave)
    hits = 0
    evictions = 0
    for s in range(len(reset)):
        if reset[s]:
            _reset(I, F, n_parts, prm.cm)
        for layer in range(L):
            pos = s * L + layer
            a, b = ptr[pos], ptr[pos + 1]
            cap = I[CAP, I[PART, layer]]
            if b - a <= cap:
                mark += 1
                h, ev = _request(I, F, nxt, prm, pos, mark, layer, ids, a, b, out)
                if h < 0:
                    return ptr[-1], hits, evictions, h, pos
                if len(flags):
                    for i in range(a, b):
                        flags[i] = out[0, i - a] == -2
                hits += h
                evictions += ev
                continue
            _hits_first(I, prm, layer, ids, nxt, no_counts, a, b, tids, tnxt, no_counts, torder)
            for w in range(0, b - a, cap):  # waves
                mark += 1
                h, ev = _request(I, F, tnxt, prm, pos, mark, layer, tids, w, min(w + cap, b - a), out)
                if h < 0:
                    return ptr[-1], hits, evictions, h, pos
                if len(flags):
                    for j in range(w, min(w + cap, b - a)):
                        flags[torder[j]] = out[0, j - w] == -2
                hits += h
                evictions += ev
    return ptr[-1], hits, evictions, 0, 0


@njit(cache=True, nogil=True)
def _small_kernel(ids, ptr, L, E, cap, reset, fifo):
    """LRU (or FIFO) with one partition of `cap` slots per layer, the default case, in its fastest form: per
    layer, the slots' keys and last-use stamps (FIFO: insert stamps) in two short rows, the victim found by a
    scan of `cap` stamps. The same decisions as the list-based kernel: hits are stamped in row order, then
    misses, so the oldest stamp is the list head; for LRU the pinned keys hold the newest stamps, so the
    oldest is pinned only when all are. Returns (hits, evictions, status, position)."""
    if fifo:
        return _small_fifo(ids, ptr, L, E, cap, reset)
    return _small_lru(ids, ptr, L, E, cap, reset)


@njit(cache=True, nogil=True)
def _small_lru(ids, ptr, L, E, cap, reset):
    # branch-free where the outcome is data (hit or miss, the oldest stamp): mispredicted branches were the cost
    where = np.full(L * E, -1, np.int64)  # slot of a resident key within its layer, -1 if not resident
    skey = np.zeros((L, cap + 1), np.int64)  # [L, cap] key in each slot (column cap: scratch)
    sstamp = np.zeros((L, cap + 1), np.int64)  # [L, cap] last use of each slot's key (column cap: scratch)
    n = np.zeros(L, np.int64)  # slots in use per layer (they fill in slot order, as Partition.free hands out)
    miss = np.empty(_width(ptr), np.int64)  # the running request's misses, in row order
    clock = 0
    hits = 0
    evictions = 0
    for s in range(len(reset)):
        if reset[s]:
            where[:] = -1
            n[:] = 0
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
                miss[n_miss] = kid
                n_miss += 1 - hit
            hits += b - a - n_miss
            for q in range(n_miss):
                kid = miss[q]
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
                        return hits, evictions, ALL_PINNED, pos
                    where[skey[layer, j]] = -1
                    evictions += 1
                clock += 1
                sstamp[layer, j] = clock
                skey[layer, j] = kid
                where[kid] = j
    return hits, evictions, 0, 0


@njit(cache=True, nogil=True)
def _small_fifo(ids, ptr, L, E, cap, reset):
    where = np.full(L * E, -1, np.int64)
    pin = np.zeros(L * E, np.int64)  # request position + 1 while pinned: FIFO's hits may be the oldest
    skey = np.zeros((L, max(cap, 1)), np.int64)
    sstamp = np.zeros((L, max(cap, 1)), np.int64)  # insert stamps
    n = np.zeros(L, np.int64)
    clock = 0
    hits = 0
    evictions = 0
    for s in range(len(reset)):
        if reset[s]:
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
                        return hits, evictions, ALL_PINNED, pos
                    where[skey[layer, j]] = -1
                    evictions += 1
                clock += 1
                sstamp[layer, j] = clock
                skey[layer, j] = kid
                where[kid] = j
    return hits, evictions, 0, 0


@njit(cache=True, nogil=True)
def _sim_kernel(I, F, nxt, prm, n_parts, ids, counts, ptr, reset, step_tokens, device_ms, shared_ms, copy_ms,
                nbytes, n_slots, own, serial):
    """The timed replay with the sim backend's clocks (moesim/backends/sim.py, no prefetch, no host experts).
    own: the profile's replay costs in ms, as SimBackend.setup computes them: [per layer, per expert, per
    load, write-back per load]; serial: the profile's serial_copies.
    Returns (hits, evictions, stall-free requests, status, position, steps [S, 6], copies [C, 6],
    computes [M, 5]): the rows the Profiler would hold (moesim/profiler.py: _STEP_COLUMNS, COPY_COLUMNS,
    COMPUTE_COLUMNS)."""
    L = prm.L
    S = len(reset)
    width = _width(ptr)
    out = np.empty((2, width), np.int64)
    tids = np.empty(width, ids.dtype)  # a wide request, hits first (see _hits_first)
    tnxt = np.empty(width if len(nxt) else 0, np.int64)
    tcnt = np.empty(width, counts.dtype)
    torder = np.empty(width, np.int64)
    steps = np.empty((S, 6))
    computes = np.empty((S * L, 5))  # one per layer, more where a layer runs in waves
    n_cm = 0
    copies = np.empty((max(1024, len(ids) // 4), 6))
    n_cp = 0
    slot_ready = np.zeros(max(n_slots, 1))  # ms: when the last copy into each slot completes
    now = 0.0  # ms: end of the last computed layer
    copy_free = 0.0  # ms: when the copy engine is free
    hits = 0
    evictions = 0
    stall_free = 0  # device experts whose weights were ready when their layer could start
    mark = 0  # pin mark of the running request (or wave)
    loads = 0  # since the last computed layer (SimBackend._loads)
    phase = -1.0  # serial copies: when the copies since the last layer began (SimBackend._phase; -1: none)
    for s in range(S):
        if reset[s]:
            _reset(I, F, n_parts, prm.cm)
        step_start = now
        shared = shared_ms[s]
        for layer in range(L):
            pos = s * L + layer
            a, b = ptr[pos], ptr[pos + 1]
            cap = I[CAP, I[PART, layer]]
            src_ids, src_nxt, src_cnt, lo, hi = ids, nxt, counts, a, b
            if b - a > cap:  # waves of at most `cap` experts, hits first
                _hits_first(I, prm, layer, ids, nxt, counts, a, b, tids, tnxt, tcnt, torder)
                src_ids, src_nxt, src_cnt, lo, hi = tids, tnxt, tcnt, 0, b - a
            w = lo
            while True:
                wa, wb = w, min(w + cap, hi)
                mark += 1
                h, ev = _request(I, F, src_nxt, prm, pos, mark, layer, src_ids, wa, wb, out)
                if h < 0:
                    return hits, evictions, stall_free, h, pos, steps[:0], copies[:0], computes[:0]
                hits += h
                evictions += ev
                if h < wb - wa:
                    for i in range(wa, wb):  # SimBackend.load, per miss in row order
                        if out[0, i - wa] == -2:
                            continue
                        loads += 1
                        start = max(now, copy_free)
                        end = start + copy_ms
                        copy_free = end
                        if serial:  # SimBackend with serial_copies: the copy holds the compute thread
                            if phase < 0.0:
                                phase = start
                            now = end
                        slot_ready[out[1, i - wa]] = end
                        if n_cp == len(copies):
                            bigger = np.empty((2 * len(copies), 6))
                            bigger[:n_cp] = copies[:n_cp]
                            copies = bigger
                        copies[n_cp, 0] = layer
                        copies[n_cp, 1] = src_ids[i]
                        copies[n_cp, 2] = nbytes
                        copies[n_cp, 3] = start
                        copies[n_cp, 4] = end
                        copies[n_cp, 5] = 0.0
                        n_cp += 1
                start = now  # SimBackend.compute: wait for every slot, sum the experts' times in row order
                free = now if phase < 0.0 else phase
                phase = -1.0
                duration = shared + own[3] * loads
                waited = 0
                for i in range(wa, wb):
                    r = slot_ready[out[1, i - wa]]
                    if r > free:
                        waited += 1
                        start = max(start, r)
                    duration += device_ms[src_cnt[i]]
                end = start + duration
                stall_free += wb - wa - waited
                if n_cm == len(computes):
                    bigger = np.empty((2 * len(computes), 5))
                    bigger[:n_cm] = computes[:n_cm]
                    computes = bigger
                computes[n_cm, 0] = layer
                computes[n_cm, 1] = start
                computes[n_cm, 2] = end
                computes[n_cm, 3] = start - free
                computes[n_cm, 4] = 0.0
                n_cm += 1
                now = end + own[0] + own[1] * (wb - wa) + own[2] * loads  # the replay's own time, serial
                loads = 0
                w = wb
                if w >= hi:
                    break
        steps[s, 0] = s
        steps[s, 1] = step_tokens[s]
        steps[s, 2] = step_start
        steps[s, 3] = now
        steps[s, 4] = n_cp
        steps[s, 5] = n_cm
    return hits, evictions, stall_free, 0, 0, steps, copies[:n_cp].copy(), computes[:n_cm].copy()


# ------------------------------------------------------------------------------------------- front ends
def prepare(trace, policy: str, params: dict | None, n_slots: int, scope: str):
    """(Requests, State, Params) for a compiled replay; builds the reference policy to validate `params`."""
    cls = reference_class(policy)
    policy_obj = cls(**(params or {}))
    req = encode(trace)
    nxt = None
    if policy == "belady":
        nxt = getattr(trace, "_fast_next_use", None)
        if nxt is None:
            nxt = trace._fast_next_use = _next_use(req.ids, req.ptr, req.n_layers, req.n_experts)
    if n_slots < 1:
        raise MoesimError(f"fast path: n_slots={n_slots}: expected at least one slot")
    st, cm = new_state(trace, policy, policy_obj, n_slots, scope, nxt)
    return req, st, make_params(trace, policy, policy_obj, cm)


def n_parts(st: State, trace) -> int:
    return int(st.I[PART, :trace.n_layers].max()) + 1


def kernel_error(status: int, req: Requests, slots_per_partition: int, pos: int) -> MoesimError:
    """The error of a kernel that stopped with `status` at request position `pos`."""
    s, layer = divmod(int(pos), req.n_layers)
    n = int(req.ptr[pos + 1] - req.ptr[pos])
    if status == LFU_OVERFLOW:
        return MoesimError(f"lfu: the aging factor decay**-(epochs) overflows a float at step {s}, layer {layer} "
                           f"(strategies/lfu.py raises OverflowError here too: after a reset, epoch0 restarts "
                           f"at 0); use a decay closer to 1, a longer decay_every, or reset_per_seq=false")
    return MoesimError(f"step {s}, layer {layer} requests {n} distinct experts but its cache partition holds "
                       f"{slots_per_partition} slots: a layer's experts are pinned while it computes, so every "
                       f"request must fit; raise the budget")


def counters(requests: int, hits: int, evictions: int) -> dict:
    """moesim.cache.Counters.to_dict() of a replay without prefetch or host experts."""
    misses = int(requests - hits)
    return {"requests": int(requests), "hits": int(hits), "misses": misses, "loads": misses, "prefetch_loads": 0,
            "evictions": int(evictions), "host_computes": 0}


@contextmanager
def compile_notice(kernel, after_s: float = 1.5):
    """Around the first call of `kernel` in this process: if it has not returned after `after_s` seconds (numba
    is compiling it: ~20 s on a 2-core machine, once per install; later runs load it from __pycache__), say so
    on stderr, so that a first run does not look hung."""
    if kernel.signatures:  # compiled or loaded already in this process
        yield
        return
    timer = threading.Timer(after_s, lambda: print(
        "moesim: compiling the replay loop (numba, once; later runs load it from the cache) ...",
        file=sys.stderr, flush=True))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def hit_counts(trace, policy: str, params: dict | None, n_slots: int, scope: str = "per_layer",
               reset_per_seq: bool = False) -> dict:
    """Cache-only replay, compiled: the counters moesim.engine.hit_counts gives for the reference policy
    `policy` built from `params`, with `n_slots` slots in `scope` (as Counters.to_dict())."""
    reset = reset_steps(trace, reset_per_seq)
    req = encode(trace)
    L = req.n_layers
    cap = n_slots // L
    if policy in ("lru", "fifo") and scope == "per_layer" and req.width <= cap:  # no waves
        reference_class(policy)(**(params or {}))  # validates params like the reference
        hits, evictions, status, where = _small_kernel(req.ids, req.ptr, L, req.n_experts, cap, reset,
                                                       policy == "fifo")
        if status < 0:
            raise kernel_error(status, req, cap, where)
        return counters(req.ptr[-1], hits, evictions)
    req, st, prm = prepare(trace, policy, params, n_slots, scope)
    n_req, hits, evictions, status, where = _hit_kernel(*st, prm, n_parts(st, trace), req.ids, req.ptr, reset,
                                                        np.zeros(0, np.uint8))
    if status < 0:
        raise kernel_error(status, req, int(st.I[CAP, st.I[PART, where % req.n_layers]]), where)
    return counters(n_req, hits, evictions)


def hit_flags(trace, policy: str, params: dict | None, n_slots: int, scope: str = "per_layer",
              reset_per_seq: bool = False) -> np.ndarray:
    """uint8 [N]: 1 where element i of `encode(trace).ids` was a hit in the compiled replay (the order of a
    request's hits and misses, e.g. to feed another simulator hits first)."""
    req, st, prm = prepare(trace, policy, params, n_slots, scope)
    flags = np.zeros(len(req.ids), np.uint8)
    status, where = _hit_kernel(*st, prm, n_parts(st, trace), req.ids, req.ptr,
                                reset_steps(trace, reset_per_seq), flags)[3:]
    if status < 0:
        raise kernel_error(status, req, int(st.I[CAP, st.I[PART, where % req.n_layers]]), where)
    return flags


class ArrayProfiler(Profiler):
    """A moesim.profiler.Profiler whose events come as finished arrays (rows as `Profiler.arrays()` returns
    them), so its metrics, tables and timeline are computed by the Profiler's own code."""

    def __init__(self, n_layers: int, steps: np.ndarray, copies: np.ndarray, computes: np.ndarray):
        super().__init__(n_layers)
        self._event_arrays = (steps, copies, computes)

    def arrays(self):
        return self._event_arrays

    @property
    def n_steps(self) -> int:
        return len(self._event_arrays[0])


class SimRun(NamedTuple):
    """What `replay_sim` returns: what moesim.api.run reads from the cache, backend and profiler."""

    counters: dict  # Counters.to_dict()
    profiler: ArrayProfiler  # metrics(), steps_table(), layers_table(), timeline() as the Profiler gives them
    device_bytes: int  # SimBackend.device_bytes()
    request_stats: dict  # SimBackend.request_stats()


def replay_sim(trace, policy: str, params: dict | None, n_slots: int, scope: str = "per_layer", hardware="h200",
               reset_per_seq: bool = False, pinned: bool = True, spec=None) -> SimRun:
    """The timed replay, compiled: moesim.engine.replay of the reference policy through
    moesim.backends.sim.SimBackend(hardware, pinned) set up with `spec` (default the trace's; a scaled or
    re-typed spec changes times and bytes, not decisions), with no prefetcher and no offload policy. The
    same counters and the same events (hence per-step latencies, stalls, metrics, tables) as that run."""
    from .backends.sim import SimBackend

    backend = SimBackend(hardware, pinned=pinned)
    hw, spec = backend.hardware, spec or trace.spec
    req, st, prm = prepare(trace, policy, params, n_slots, scope)
    counts = req.token_counts()
    max_count = int(counts.max()) if len(counts) else 1
    device_ms = np.array([hw.expert_ms(n, spec, "device") for n in range(max_count + 1)])  # per token count
    tokens, inverse = np.unique(req.step_tokens, return_inverse=True)
    shared_ms = np.array([spec.shared_experts * hw.expert_ms(int(n), spec, "device", shared=True)
                          for n in tokens])[inverse.reshape(-1)]  # per step
    copy_ms = hw.copy_ms(spec.bytes_per_expert, pinned)
    own = np.array([hw.replay_overhead_ms(0, 0), hw.expert_overhead_us * 1e-3, hw.load_overhead_us * 1e-3,
                    hw.writeback_ms(spec.bytes_per_expert)])  # as SimBackend.setup
    with compile_notice(_sim_kernel):
        out = _sim_kernel(*st, prm, n_parts(st, trace), req.ids, counts, req.ptr, reset_steps(trace, reset_per_seq),
                          req.step_tokens, device_ms, shared_ms, copy_ms, float(spec.bytes_per_expert), n_slots, own,
                          bool(hw.serial_copies))
    hits, evictions, stall_free, status, where, steps, copies, computes = out
    if status < 0:
        raise kernel_error(status, req, int(st.I[CAP, st.I[PART, where % req.n_layers]]), where)
    profiler = ArrayProfiler(trace.n_layers, steps, copies, computes)
    backend.setup(spec, n_slots, profiler)  # only for device_bytes(): the events are already there
    return SimRun(counters(req.ptr[-1], hits, evictions), profiler, backend.device_bytes(),
                  {"stall_free_requests": int(stall_free), "late_prefetches": 0})
