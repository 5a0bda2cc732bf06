"""Cache state of the compiled core: every partition's residents, pins and policy ranks as rows of two arrays,
and the data structures the policies order them with (linked lists, indexed heaps, member lists).

    st = new_state(L, E, n_slots, scope)       # empty; moesim/core/parts.py fills policy data (static keys)
    st.I[RES, kid], st.I[SLOT, kid]            # resident? in which device slot? (kid = layer * E + expert)

The state is two 2-D arrays, I (int64) and F (float64), whose rows are the fields below: numba passes each
array argument of a call that is not inlined at a cost, so the kernels pass few arrays. In `per_layer` scope
partition p holds layer p (capacity n_slots // L); in `global` scope one partition holds every layer.
Slots are handed out lowest first (moesim/cache.py: Partition.free = reversed(slots)).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from ..errors import MoesimError
from .requests import NEVER

# Helpers on the hot path allocate nothing and are compiled without numba's reference counting: otherwise
# every call (inlined or not) increments and decrements each array argument's count atomically, which cost
# more than the cache logic itself (5-10x on LFU and Belady).
HOT = {"cache": True, "nogil": True, "_nrt": False}

# rows of I, per key (kid = layer * E + expert):
RES, PIN, SLOT, PREV, NEXT, HPOS, K2, SEEN, MIDX, STATIC, SCOUNT, PFU, CLS, EAM, FREQ = range(15)
# RES: resident (0/1); PIN: the pin mark of the request that pins it (a number used once per request);
# SLOT: device slot; PREV/NEXT: linked list, oldest first (LRU, LFRU: by last use; FIFO: by insert; static:
# its LRU area; class_lru: its class's list; -1 ends); HPOS: index in the partition's heap; K2: second rank
# (LFU, LFRU, activation_aware: touch number; Belady, visit_count: kid; class_lru: position of the last use);
# SEEN: LFRU,
# class_lru: has a history since the last reset; MIDX: index in the partition's member list (static,
# activation_aware, learned); STATIC: never a victim while the LRU area has one; SCOUNT: calibration requests of a
# static key; PFU: prefetched and not requested yet; CLS: class_lru's class; EAM, FREQ: activation_aware's
# requests in the current sequence and since the start
# rows of I, per partition p:
CAP, SIZE, BASE, NFREE, HEAD, TAIL, HSIZE, EPOCH0, NTOUCH, PSEQ = range(15, 25)
# CAP: slots; SIZE: residents; BASE: first slot; NFREE: free slots left; HEAD/TAIL: oldest/newest of the
# list; HSIZE: heap size (visit_count: per layer, its heap's); EPOCH0: LFU aging epochs folded into its counts;
# NTOUCH: touches so far; PSEQ: activation_aware's current sequence (NO_SEQ before the first request)
# rows of I, per partition p and index i < capmax, at column p * capmax + i:
FREE, HEAP, MEMBERS, STACK = range(25, 29)  # free slots (a stack: pop takes the last); min-heap of kids
#                                              (visit_count: one per layer, at columns layer * E + i); member
#                                              list; scratch of _heap_min_unpinned
PART, EROWS, FROWS = range(29, 32)  # per layer: its partition; activation_aware's row totals of EAM, FREQ
# LFRU's front (moesim/core/policies.py): FRONT, FPREV, FNEXT per key: on the front (0/1), its older and
# younger neighbours there (-1 ends); FHEAD, FTAIL per partition: its oldest and youngest member
FRONT, FPREV, FNEXT, FHEAD, FTAIL = range(32, 37)
CHEAD, CTAIL = range(37, 39)  # class_lru: per partition p and class c, at column p * classes + c
KPTR = 39  # per key: Belady's pointer into its request positions (next_after)
AB = 40  # per layer: activation_aware's least key of the layer (AB_STALE: to be found again; -1: none)
# learned (strategies/learned.py), per key: step of its last request (-1: none), the two gaps before it (-1:
# none), its requests in the current sequence; per partition: the step its current sequence started at.
# Per layer l, at columns l * E + j: the ids of its latest request, ascending (LREQ), and of the one before in the
# same sequence (LPRV); at column l: their counts (LN, LNP) and LQZ, 1 when a new sequence began since the
# latest request (the next request's one-before is then empty). The transition scores are summed from these
# when a victim is chosen, for its candidates only (each request once summed them for all E experts). LOST, per
# key: 1 + the request position its network output was computed at (0: none)
LUSE, G1, G2, SCNT, SSTART, LREQ, LPRV, LN, LNP, LQZ, LOST = range(41, 52)
N_IROWS = 52
# rows of F: per key, K1: first rank (LFU: stored count; Belady: -next use; LFRU: log f; class_lru: its
# decayed use count; visit_count: -visits since loaded), LAST: LFRU last use; per partition, UNIT: what one LFU
# use adds to a stored count, NOW: LFRU time of the latest use; per layer, LW: activation_aware's layer weight
K1, LAST, UNIT, NOW, LW, ABP = range(6)  # ABP, per layer: the priority of AB
# learned, per key: its decayed request counts (one row per half-life, at its last request)
DC = 6  # rows 6, 7, 8
LPH = 9  # learned: scratch of one key's features and its network's hidden sums (moesim/core/policies.py _lp_out)
N_FROWS = 10
LPM = N_FROWS  # learned: its model (strategies/learned.py flat_model), flat in the rows after the others. Not a
#                Params field: an array there is passed with every call of every policy (LRU's timed replay of
#                the real trace took 1.23 s instead of 0.87). After the model, from row Params.lrow: LP_ROWS
#                rows (moesim/core/policies.py: tables by age, outputs per key)
AB_STALE = -2
NO_SEQ = -(1 << 62)  # PSEQ before any request: no trace has this sequence id


class State(NamedTuple):
    """Cache state of every partition (a layer in per_layer scope, one pool in global)."""

    I: np.ndarray  # int64 [N_IROWS, W]
    F: np.ndarray  # float64 [N_FROWS, W]
    nxt: np.ndarray  # int64 [N] Belady: next request position of each request element (else empty)
    seqs: np.ndarray  # int64 [S] activation_aware: the sequence of each step (else empty)
    kpos: np.ndarray  # int64 Belady with prefetch: request positions of each key, ascending (else empty)
    koff: np.ndarray  # int64 [L * E + 1] where each key's run starts in kpos (else empty)


class Params(NamedTuple):
    """A run's policy constants (moesim/core/parts.py builds them from the policy object)."""

    code: int  # moesim.core.policies.POLICY_CODES
    L: int
    E: int
    P: int  # partitions
    cm: int  # capmax: columns per partition in the FREE, HEAP, MEMBERS rows
    decay: float  # LFU, LFRU
    log_decay: float  # LFRU
    decay_is_one: bool  # LFU: no aging
    period: int  # LFU: request positions per aging epoch
    alpha: float  # LFRU
    classes: int  # class_lru: class lists
    decay_per_pos: float  # class_lru: ln of the decayed use count's factor per request position
    ratio: int = 1  # page_cache: inactive_is_low's inactive_ratio
    hidden: int = 0  # learned: units per hidden layer of its network (its model: F's rows from LPM on)
    lrow: int = 0  # learned: F's first row after the model


def partitions(n_layers: int, n_slots: int, scope: str) -> tuple[np.ndarray, np.ndarray]:
    """(part_of_layer int64 [L], capacity int64 [P]) as moesim/cache.py splits `n_slots`."""
    if scope == "per_layer":
        return np.arange(n_layers, dtype=np.int64), np.full(n_layers, n_slots // n_layers, np.int64)
    if scope == "global":
        return np.zeros(n_layers, np.int64), np.array([n_slots], np.int64)
    raise MoesimError(f"scope={scope!r}: expected one of per_layer, global")


def new_state(L: int, E: int, n_slots: int, scope: str, classes: int = 1, nxt: np.ndarray | None = None,
              seqs: np.ndarray | None = None, kpos: np.ndarray | None = None,
              koff: np.ndarray | None = None, width: int = 0, model: np.ndarray | None = None,
              rows_after: int = 0, copies: np.ndarray | None = None) -> tuple[State, int]:
    """(empty cache state for `n_slots` slots in `scope`, capmax). Policy data (static keys, layer weights) is
    the caller's to fill in before the first `reset`. `width`: at least this many columns (learned's scratch);
    `model`: learned's flat model, stored from row LPM on (F.reshape(-1)[LPM * W:]), and `rows_after` more rows
    after it (learned_rows(...) gives the first). `copies`: per_layer partitions of several budgets side by side
    (moesim/core/loop.py run_hits_budgets): copies[k] slots per layer for budget k, whose partition of layer l is
    k * L + l, with keys key + k * L * E (n_slots is then not read)."""
    if copies is not None:
        K = len(copies)
        part_of_layer, cap = np.arange(K * L, dtype=np.int64), np.repeat(np.asarray(copies, np.int64), L)
        L *= K  # the copies' layers
    else:
        if n_slots < 1:
            raise MoesimError(f"n_slots={n_slots}: expected at least one slot")
        part_of_layer, cap = partitions(L, n_slots, scope)
    P, nk = len(cap), L * E
    cm = max(int(cap.max()), 1)
    I = np.zeros((N_IROWS, max(nk, P * cm, L, P * classes, width)), np.int64)
    I[CAP, :P] = cap
    I[BASE, :P] = np.concatenate([[0], np.cumsum(cap)[:-1]])
    I[PART, :L] = part_of_layer
    W = I.shape[1]
    extra = 0 if model is None else learned_rows(len(model), W) - N_FROWS + rows_after
    F = np.zeros((N_FROWS + extra, W))
    if model is not None:
        F.reshape(-1)[LPM * W:LPM * W + len(model)] = model
    F[LW, :L] = 1.0
    empty = np.zeros(0, np.int64)
    if koff is not None:
        I[KPTR, :L * E] = koff[:-1]
    return State(I, F, *(x if x is not None else empty for x in (nxt, seqs, kpos, koff))), cm


def learned_rows(model_len: int, W: int) -> int:
    """F's first row after a learned model of `model_len` numbers in rows of `W`."""
    return LPM + -(-model_len // W)


@njit(cache=True, nogil=True)
def reset(I, F, prm):
    """Cache.reset(): every partition empty, every policy set up again (counters are not state here)."""
    I[RES] = 0
    I[PIN] = 0
    I[SEEN] = 0
    I[FRONT] = 0
    I[PFU] = 0
    I[EAM] = 0
    I[FREQ] = 0
    I[EROWS] = 0
    I[FROWS] = 0
    I[SLOT] = -1
    I[CHEAD] = -1
    I[CTAIL] = -1
    I[AB] = AB_STALE
    I[LUSE] = -1
    I[G1] = -1
    I[G2] = -1
    I[SCNT] = 0
    I[LN] = 0
    I[LNP] = 0
    I[LQZ] = 0
    I[LOST] = 0
    F[DC:DC + 3] = 0.0
    I[HSIZE] = 0  # visit_count keeps a heap per layer: sizes at every layer's column
    cm = prm.cm
    for p in range(prm.P):
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
        I[PSEQ, p] = NO_SEQ
        I[SSTART, p] = 0
        F[UNIT, p] = 1.0
        F[NOW, p] = 0.0


# linked list ---------------------------------------------------------------------------------------
# A list of partition p is held in rows (head, tail) of I[:, p] and (prev, next) of I[:, kid]: the order-of-use
# list in HEAD, TAIL, PREV, NEXT; LFRU's front in FHEAD, FTAIL, FPREV, FNEXT.
@njit(**HOT)
def link_append(I, p, kid, head, tail, prev, next_):
    t = I[tail, p]
    I[prev, kid] = t
    I[next_, kid] = -1
    if t >= 0:
        I[next_, t] = kid
    else:
        I[head, p] = kid
    I[tail, p] = kid


@njit(**HOT)
def link_between(I, p, a, b, head, tail, prev, next_):
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
def list_append(I, p, kid):
    link_append(I, p, kid, HEAD, TAIL, PREV, NEXT)


@njit(**HOT)
def list_remove(I, p, kid):
    link_between(I, p, I[PREV, kid], I[NEXT, kid], HEAD, TAIL, PREV, NEXT)


# indexed binary min-heap of kids on (K1, K2); partition p's heap is I[HEAP, off:off + I[HSIZE, p]] -----------
@njit(**HOT)
def less(I, F, a, b):
    return F[K1, a] < F[K1, b] or (F[K1, a] == F[K1, b] and I[K2, a] < I[K2, b])


@njit(**HOT)
def sift_up(I, F, off, i):
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
def sift_down(I, F, n, off, i):
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
def heap_push(I, F, p, off, kid):
    n = I[HSIZE, p]
    I[HEAP, off + n] = kid
    I[HSIZE, p] = n + 1
    sift_up(I, F, off, n)


@njit(**HOT)
def heap_remove(I, F, p, off, kid):
    i = I[HPOS, kid]
    n = I[HSIZE, p] - 1
    I[HSIZE, p] = n
    if i < n:
        last = I[HEAP, off + n]
        I[HEAP, off + i] = last
        sift_down(I, F, n, off, i)
        sift_up(I, F, off, I[HPOS, last])


@njit(**HOT)
def heap_min_unpinned(I, F, p, off, mark):
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
            if best < 0 or less(I, F, x, best):
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


# member list of partition p: I[MEMBERS, p * capmax : p * capmax + SIZE], each key's index in MIDX --------
@njit(**HOT)
def member_add(I, p, off, kid):
    n = I[SIZE, p]  # called before SIZE grows
    I[MEMBERS, off + n] = kid
    I[MIDX, kid] = n


@njit(**HOT)
def member_remove(I, p, off, kid):
    i = I[MIDX, kid]
    last = I[MEMBERS, off + I[SIZE, p] - 1]  # called before SIZE shrinks
    I[MEMBERS, off + i] = last
    I[MIDX, last] = i


@njit(**HOT)
def next_after(I, kpos, koff, kid, pos):
    """The first request position of `kid` after `pos` (NEVER if none): strategies/belady.py `_next_after`.
    Positions only grow, so each key's pointer only moves forward."""
    q, end = I[KPTR, kid], koff[kid + 1]
    while q < end and kpos[q] <= pos:
        q += 1
    I[KPTR, kid] = q
    return kpos[q] if q < end else NEVER
