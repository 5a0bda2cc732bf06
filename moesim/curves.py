"""Hit-ratio curves: hits at every budget of a cache policy, in one pass over the trace where the policy allows.

    from moesim.curves import hit_ratio_curve
    df = hit_ratio_curve(trace, "lru")                    # per_layer: every budget from top-k to E per layer
    df = hit_ratio_curve(trace, "belady", scope="global")  # every total budget from top-k to L*E slots
    python -m pytest tests/test_curves.py                  # equal to per-budget replays at every budget

Each row is what `moesim.engine.hit_counts` (or `moesim.core.hit_counts`) gives at that budget: requests are
sets (a layer's experts are pinned together) and within a request the cache sees hits first, then misses.

Belady (set semantics, ties to the smaller key) is a stack algorithm: a key's rank (its next use) does not
depend on the cache size, so the cache of C slots is always the top C of one priority stack. One pass keeps
that stack; a request of r keys moves them to the top and pushes the others down through a small pool
(Mattson's update for priority algorithms, generalised to r keys at once): O(depth * r) per request.

LRU with set requests is NOT a stack algorithm: within a request the hits go before the misses, and which
keys hit depends on the size, so two sizes can order the same keys differently and a key can be resident at
C slots but not at C + 1 (tests/test_curves.py holds a 5-request counterexample). The curve is still exact
in one pass: at C slots the cache holds the C most recent keys, ranked by their last request and, inside
one request, by (hit at C first, then row order). A key x last requested with group G (the keys of that
request not requested since) and D keys requested after it is resident at C iff D + 1 + (members of G ranked
after x at C) <= C. That settles every C outside (D, D + |G|); inside, it needs G's hit-or-miss at C back
then, which each request element keeps as (lo, hi, bit mask): miss at C <= lo, hit at C >= hi, the mask
in between (|G| - 1 bits). D comes from a Fenwick tree over request times.

Other policies (fifo, lfu, lfru, static), and budgets smaller than the largest request (a batched layer then
runs in waves), are replayed once per budget with the compiled kernels.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from . import core
from .core.requests import next_uses
from .core.state import partitions
from .errors import MoesimError

ONE_PASS = ("lru", "belady")
MAX_LRU_GROUP = 64  # the LRU pass keeps |G| - 1 bits per key in an int64; wider requests replay per budget
NONE = 1 << 40  # a budget larger than any: "never" in (lo, hi)


def default_budgets(trace, scope: str) -> np.ndarray:
    """Every budget a cache can run with: from top-k to every expert, per layer in `per_layer` scope, in total
    in `global` scope."""
    largest = trace.spec.experts if scope == "per_layer" else trace.n_layers * trace.spec.experts
    return np.arange(trace.top_k, largest + 1)


def hit_ratio_curve(trace, policy: str = "lru", scope: str = "per_layer", budgets=None, params: dict | None = None,
                    reset_per_seq: bool = False):
    """pandas DataFrame, one row per budget: `slots_per_layer` (per_layer scope; else None), `slots` (the
    cache's n_slots), `requests`, `hits`, `hit_rate`. `budgets`: slots per layer (per_layer) or total slots
    (global); default: every budget from top-k to all experts. LRU and Belady with default parameters take
    one pass for the budgets that hold the largest request (smaller ones serve it in waves, and are
    replayed one by one, as are the other policies)."""
    import pandas as pd

    if scope not in ("per_layer", "global"):
        raise MoesimError(f"scope={scope!r}: expected one of per_layer, global")
    L = trace.n_layers
    budgets = default_budgets(trace, scope) if budgets is None else np.asarray(sorted({int(b) for b in budgets}))
    if len(budgets) and budgets[0] < trace.top_k:
        raise MoesimError(f"budget {budgets[0]} {'per layer' if scope == 'per_layer' else 'slots'} is less than "
                          f"top-k = {trace.top_k}: one token's experts would not fit")
    req = core.encode(trace)
    n_req = int(req.ptr[-1])
    slots = budgets * L if scope == "per_layer" else budgets
    one_pass = np.zeros(len(budgets), bool)
    if policy in ONE_PASS and not params and (policy != "lru" or req.width <= MAX_LRU_GROUP):
        one_pass = budgets >= req.width  # no waves
    hits = np.zeros(len(budgets), np.int64)
    if one_pass.any():
        hits[one_pass] = one_pass_hits(trace, policy, scope, int(budgets[-1]), reset_per_seq)[budgets[one_pass]]
    for i in np.flatnonzero(~one_pass):
        hits[i] = core.hit_counts(trace, policy, params, int(slots[i]), scope, reset_per_seq)["hits"]
    return pd.DataFrame({
        "slots_per_layer": budgets if scope == "per_layer" else None,
        "slots": slots,
        "requests": np.full(len(budgets), n_req, np.int64),
        "hits": hits,
        "hit_rate": hits / n_req if n_req else np.full(len(budgets), np.nan),
    })


def one_pass_hits(trace, policy: str, scope: str, max_budget: int, reset_per_seq: bool = False) -> np.ndarray:
    """int64 [max_budget + 1]: total hits at each budget (per layer in per_layer scope), by one pass; right
    for the budgets that hold the largest request (no waves)."""
    req = core.encode(trace)
    L, E = req.n_layers, req.n_experts
    part_of_layer, _ = partitions(L, L if scope == "per_layer" else 1, scope)
    reset = core.reset_steps(trace, reset_per_seq)
    if policy == "lru":
        return _lru_curve(req.ids, req.ptr, part_of_layer, L, E, reset, max_budget)
    if policy == "belady":
        nxt = next_uses(trace)
        return _belady_curve(req.ids, req.ptr, nxt, part_of_layer, L, E, reset, max_budget)
    raise MoesimError(f"one_pass_hits: policy {policy!r} has no one-pass curve; one of {', '.join(ONE_PASS)}")


# ------------------------------------------------------------------------------------------------ LRU
@njit(cache=True, nogil=True)
def _fenwick_add(tree, off, n, i, v):
    i += 1
    while i <= n:
        tree[off + i - 1] += v
        i += i & -i


@njit(cache=True, nogil=True)
def _fenwick_sum(tree, off, i):
    """Sum of entries 0..i-1."""
    s = 0
    while i > 0:
        s += tree[off + i - 1]
        i -= i & -i
    return s


@njit(cache=True, nogil=True)
def _status_hit(lo, hi, mask, c):
    """Was a request element a hit at budget c: miss at c <= lo, hit at c >= hi, else bit c - lo - 1."""
    if c <= lo:
        return False
    if c >= hi:
        return True
    return (mask >> (c - lo - 1)) & 1 == 1


@njit(cache=True, nogil=True)
def _lru_curve(ids, ptr, part_of_layer, L, E, reset, max_c):
    n_pos = len(ptr) - 1
    P = part_of_layer.max() + 1
    ticks = np.zeros(P, np.int64)  # requests seen per partition (the partition's clock)
    n_ticks = np.zeros(P, np.int64)  # requests per partition
    width = 1
    for pos in range(n_pos):
        n_ticks[part_of_layer[pos % L]] += 1
        width = max(width, ptr[pos + 1] - ptr[pos])
    t_off = np.zeros(P + 1, np.int64)
    for p in range(P):
        t_off[p + 1] = t_off[p] + n_ticks[p]
    tree = np.zeros(max(t_off[P], 1), np.int64)  # per partition: how many keys have their last request at tick t
    last_tick = np.full(L * E, -1, np.int64)  # tick of a key's last request (-1: none since the last reset)
    last_pos = np.full(L * E, -1, np.int64)  # request position of that request
    klo = np.empty(L * E, np.int64)  # per key: hit-or-miss of its last request at every budget (_status_hit)
    khi = np.empty(L * E, np.int64)
    kmask = np.zeros(L * E, np.int64)
    rlo = np.empty(width, np.int64)  # the same for the elements of the running request
    rhi = np.empty(width, np.int64)
    rmask = np.zeros(width, np.int64)
    from_c = np.zeros(max_c + 2, np.int64)  # elements that hit at every budget >= c
    at_c = np.zeros(max_c + 2, np.int64)  # elements that hit at exactly budget c (inside their window)
    for s in range(len(reset)):
        if reset[s]:
            for kid in range(L * E):
                if last_tick[kid] >= 0:
                    p = part_of_layer[kid // E]
                    _fenwick_add(tree, t_off[p], n_ticks[p], last_tick[kid], -1)
                    last_tick[kid] = -1
        for layer in range(L):
            pos = s * L + layer
            p = part_of_layer[layer]
            now = ticks[p]
            base = layer * E
            a = ptr[pos]
            for i in range(a, ptr[pos + 1]):  # statuses from the state before this request
                kid = base + ids[i]
                tau = last_tick[kid]
                rmask[i - a] = 0
                if tau < 0:
                    rlo[i - a] = NONE
                    rhi[i - a] = NONE
                    continue
                d = _fenwick_sum(tree, t_off[p], now) - _fenwick_sum(tree, t_off[p], tau + 1)  # keys used since
                gpos = last_pos[kid]
                gbase = (gpos % L) * E
                g = 0  # the group: keys of that request not requested since
                for j in range(ptr[gpos], ptr[gpos + 1]):
                    if last_tick[gbase + ids[j]] == tau:
                        g += 1
                rlo[i - a] = d
                rhi[i - a] = d + g
                m = 0
                for c in range(d + 1, d + g):  # the window: the rank within the group at c decides
                    self_hit = _status_hit(klo[kid], khi[kid], kmask[kid], c)
                    after = 0  # group members more recent than kid at budget c: hits in row order, then misses
                    passed = False
                    for j in range(ptr[gpos], ptr[gpos + 1]):
                        other = gbase + ids[j]
                        if last_tick[other] != tau:
                            continue
                        if other == kid:
                            passed = True
                            continue
                        h = _status_hit(klo[other], khi[other], kmask[other], c)
                        if (self_hit and (passed or not h)) or (not self_hit and passed and not h):
                            after += 1
                    if d + 1 + after <= c:
                        m |= 1 << (c - d - 1)
                        if c <= max_c:
                            at_c[c] += 1
                rmask[i - a] = m
                from_c[min(d + g, max_c + 1)] += 1
            for i in range(a, ptr[pos + 1]):  # then the request becomes the most recent
                kid = base + ids[i]
                if last_tick[kid] >= 0:
                    _fenwick_add(tree, t_off[p], n_ticks[p], last_tick[kid], -1)
                _fenwick_add(tree, t_off[p], n_ticks[p], now, 1)
                last_tick[kid] = now
                last_pos[kid] = pos
                klo[kid] = rlo[i - a]
                khi[kid] = rhi[i - a]
                kmask[kid] = rmask[i - a]
            ticks[p] = now + 1
    return np.cumsum(from_c)[: max_c + 1] + at_c[: max_c + 1]


# --------------------------------------------------------------------------------------------- Belady
@njit(cache=True, nogil=True)
def _better(nu, a, b):
    """Belady keeps a over b: earlier next use; ties: the larger key (the reference evicts the smaller)."""
    return nu[a] < nu[b] or (nu[a] == nu[b] and a > b)


@njit(cache=True, nogil=True)
def _belady_curve(ids, ptr, nxt, part_of_layer, L, E, reset, max_c):
    P = part_of_layer.max() + 1
    depth = E if P == L else L * E
    stack = np.empty((P, depth), np.int64)  # per partition: keys, the one kept longest first
    n = np.zeros(P, np.int64)
    spos = np.zeros(L * E, np.int64)  # 1-based stack position of a key, 0 if not in the stack
    nu = np.zeros(L * E, np.int64)  # next use of each key after its last request
    mark = np.full(L * E, -1, np.int64)  # request position a key was last requested at
    pool = np.empty(depth + 1, np.int64)
    hist = np.zeros(max_c + 2, np.int64)  # elements that hit at every budget >= c
    for s in range(len(reset)):
        if reset[s]:
            spos[:] = 0
            n[:] = 0
        for layer in range(L):
            pos = s * L + layer
            p = part_of_layer[layer]
            a, b = ptr[pos], ptr[pos + 1]
            r = b - a
            if r == 0:
                continue
            base = layer * E
            deepest = 0
            for i in range(a, b):
                kid = base + ids[i]
                mark[kid] = pos
                q = spos[kid]
                if q > 0:
                    hist[min(q, max_c + 1)] += 1
                    deepest = max(deepest, q)
            st = stack[p]
            old_n = n[p]
            n_pool = 0
            for j in range(min(r, old_n)):  # old top r, less the requested keys: the pool
                k = st[j]
                if mark[k] != pos:
                    pool[n_pool] = k
                    n_pool += 1
            for i in range(a, b):  # the request on top (row order; all fit any budget that can run)
                kid = base + ids[i]
                st[i - a] = kid
                spos[kid] = i - a + 1
                nu[kid] = nxt[i]
            j = r
            while True:
                if j < old_n:
                    k = st[j]
                    if mark[k] != pos:
                        pool[n_pool] = k
                        n_pool += 1
                elif n_pool == 0:
                    break
                best = 0  # the pool's best goes to position j + 1
                for t in range(1, n_pool):
                    if _better(nu, pool[t], pool[best]):
                        best = t
                k = pool[best]
                n_pool -= 1
                pool[best] = pool[n_pool]
                st[j] = k
                spos[k] = j + 1
                j += 1
                if n_pool == 0 and j >= deepest and j >= r:  # below: unchanged
                    break
            n[p] = max(old_n, j)
    return np.cumsum(hist)[: max_c + 1]
