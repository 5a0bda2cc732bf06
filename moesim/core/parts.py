"""From strategy objects to the compiled core's arguments: which parts the core compiles, and what each
built-in policy's parameters become (state rows, constants, tables).

    uncovered(cache_policy, prefetcher, offload)   # None when every part is built in, else the reason
    cache_state(trace, spec, n_slots, scope, make_policy) -> (State, Params)
    prefetch_table(trace, prefetcher, n_slots, scope, nbytes) -> (table, rows, cap)
    offload_arrays(trace, offload, n_slots, scope, cost, max_tokens) -> the o* arrays of loop.run_sim

A part is compiled when its class is exactly a built-in class of strategies/ (a user's subclass may change
any decision, so it runs in the Python driver, moesim/engine.py). Each built-in class lists the parameters
its compiled form reads (PARAMS): every parameter of its constructor must be there, or the run refuses it by
name (`check_params`; tests/test_core.py checks every built-in class), so a knob added to a Python policy can
never be silently ignored by the compiled path. Learned and precomputed parts (static's static set,
prefetch tables, host's device set, static_split's host layers) are computed by the Python class's own
`setup`, so both drivers use the same data by construction.
"""
from __future__ import annotations

import inspect
import math

import numpy as np

from ..errors import MoesimError
from .loop import OFF_COST, OFF_FIDDLER, OFF_HOST, OFF_NONE, OFF_STATIC_SPLIT
from .policies import LP_ROWS, POLICY_CODES, lp_tables
from .requests import encode, key_positions, next_uses
from .state import CAP, LW, SCOUNT, STATIC, Params, State, learned_rows, new_state

# class -> (compiled name, the constructor parameters the compiled path reads, directly or through the
# class's own setup). A parameter missing here is refused by name.
CACHE = {
    "strategies.lru.LRU": ("lru", ()),
    "strategies.fifo.FIFO": ("fifo", ()),
    "strategies.lfu.LFU": ("lfu", ("decay", "decay_every")),
    "strategies.lfru.LFRU": ("lfru", ("decay", "alpha")),
    "strategies.belady.Belady": ("belady", ()),
    "strategies.belady.GivenBelady": ("belady", ("positions", "offsets")),  # its positions replace the trace's
    "strategies.static.Static": ("static", ("calibrate_tokens", "calibrate_fraction", "calibrate_trace", "lru_slots")),
    "strategies.class_lru.ClassLRU": ("class_lru", ("half_life", "classes")),
    "strategies.activation_aware.ActivationAware": ("activation_aware", ()),
    "strategies.visit_count.VisitCount": ("visit_count", ()),
    "strategies.page_cache.PageCache": ("page_cache", ()),
    "strategies.learned.Learned": ("learned", ("model",)),
}
_TABLE = ("lookahead", "per_layer", "max_inflight")  # strategies.Prefetcher's knobs (the table and the cap)
_CALIB = ("calibrate_tokens", "calibrate_fraction", "calibrate_trace")
PREFETCH = {
    "strategies.oracle.Oracle": ("oracle", _TABLE),
    "strategies.recorded.Recorded": ("recorded", _TABLE),
    "strategies.transition.Transition": ("transition", _TABLE + ("reuse_weight",) + _CALIB),
    "strategies.history.History": ("history", _TABLE + _CALIB),
    "strategies.whole_layer.WholeLayer": ("whole_layer", _TABLE),
    "strategies.activation_match.ActivationMatch": ("activation_match", ("per_layer", "max_inflight") + _CALIB),
}
_HOST = ("device_set", "share", "fill_first", "load", "max_inflight", "loads_per_layer") + _CALIB
OFFLOAD = {
    "strategies.fetch.Fetch": ("fetch", ()),
    "strategies.static_split.StaticSplit": ("static_split", ("host_layers", "min_batch")),
    "strategies.host.Host": ("host", _HOST),
    "strategies.cost.Cost": ("cost", _HOST),
    "strategies.fiddler.Fiddler": ("fiddler", ("latency_cpu", "latency_gpu") + _CALIB),
}
OFFLOAD_KIND = {"fetch": OFF_NONE, "static_split": OFF_STATIC_SPLIT, "host": OFF_HOST, "cost": OFF_COST,
                "fiddler": OFF_FIDDLER}


def class_path(obj_or_cls) -> str:
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    return f"{cls.__module__}.{cls.__qualname__}"


def builtin(obj, table: dict) -> str | None:
    """The compiled name of `obj`'s class when it is exactly a built-in class of `table`, else None."""
    got = table.get(class_path(obj)) if obj is not None else None
    return got[0] if got else None


def check_params(cls, table: dict, where: str) -> None:
    """Refuse, by name, a constructor parameter of built-in `cls` that the compiled path does not read."""
    _, reads = table[class_path(cls)]
    params = [n for n, x in inspect.signature(cls.__init__).parameters.items()
              if n != "self" and x.kind not in (x.VAR_POSITIONAL, x.VAR_KEYWORD)]  # object.__init__'s *args
    unread = [n for n in params if n not in reads]
    if unread:
        raise MoesimError(f"{where}: {class_path(cls)} has parameter(s) {', '.join(unread)} that the compiled core "
                          f"(moesim/core/parts.py) does not read; add them there, or run with fast=false")


def uncovered(cache_policy, prefetcher, offload) -> str | None:
    """None when the compiled loop runs every part (each exactly a built-in class), else why not."""
    for obj, table, where in ((cache_policy, CACHE, "strategy.cache"), (prefetcher, PREFETCH, "prefetch"),
                              (offload, OFFLOAD, "offload")):
        if obj is None and where != "strategy.cache":
            continue
        if builtin(obj, table) is None:
            return f"{where} is {class_path(obj)}, not a built-in part of strategies/"
    return None


def _context(trace, spec, layers, capacity, scope):
    from strategies import Context

    return Context(trace, spec, layers, capacity, scope)


def cache_state(trace, spec, n_slots: int, scope: str, make_policy, with_prefetch: bool = False,
                copies: list | None = None) -> tuple[State, Params]:
    """The empty cache state and constants of the built-in policy `make_policy()` builds, set up as
    moesim.cache.Cache sets up one instance per partition (static: each partition's static set).
    `with_prefetch`: a prefetcher will insert keys outside the requests (Belady then needs every key's
    request positions). `copies`: the learned policy's per_layer caches at several budgets side by side (slots
    per layer of each; see new_state), for loop.run_hits_budgets."""
    obj = make_policy()
    name = builtin(obj, CACHE)
    if name is None:
        raise MoesimError(f"strategy.cache: {class_path(obj)} is not compiled; run it with moesim.engine.replay")
    check_params(type(obj), CACHE, "strategy.cache")
    if copies is not None and (name != "learned" or scope != "per_layer"):
        raise MoesimError(f"cache_state: copies of budgets are built for the learned policy per layer, not {name} "
                          f"in {scope} scope")
    L, E = trace.n_layers, trace.spec.experts
    everything = tuple(range(L))
    if name in ("lfu", "lfru", "class_lru", "activation_aware", "page_cache", "learned"):  # derived in setup
        obj.setup(_context(trace, spec, everything if scope == "global" else (0,),
                           n_slots if scope == "global" else n_slots // L, scope))
    kpos = koff = None
    if name == "belady" and hasattr(obj, "given"):  # GivenBelady: every next use from its own positions
        kpos, koff = obj.given
    elif name == "belady" and with_prefetch:  # next uses of prefetched keys (demand ones come with the requests)
        kpos, koff = _key_positions(trace)
    classes = int(getattr(obj, "classes", 1)) if name == "class_lru" else 2 if name == "page_cache" else 1
    learned = ()
    if name == "learned":  # its network's width and the model, flat
        from strategies.learned import N_FEATURES, flat_model

        learned = (len(obj.t["b1"]), flat_model(obj.t))
    st, cm = new_state(L, E, n_slots, scope, classes, next_uses(trace) if name == "belady" and not hasattr(obj, "given") else None,
                       trace.step_seq().astype(np.int64) if name in ("activation_aware", "learned") else None, kpos,
                       koff, N_FEATURES + 2 * learned[0] if learned else 0, learned[1] if learned else None,
                       LP_ROWS if learned else 0, copies)
    if learned:  # its tables by age follow the model; Params gets (hidden units, their first row)
        tables = lp_tables(st.F.shape[1])
        lrow = learned_rows(len(learned[1]), st.F.shape[1])
        st.F[lrow:lrow + len(tables)] = tables
        learned = (learned[0], lrow)
    P = L * (len(copies) if copies is not None else 1) if scope == "per_layer" else 1
    if name == "static":  # the reference policy picks the static keys of each partition
        for p in range(P):
            layers = everything if scope == "global" else (p,)
            part = obj if p == 0 else make_policy()
            part.setup(_context(trace, spec, layers, int(st.I[CAP, p]), scope))
            for (layer, e), c in part.static.items():
                st.I[STATIC, layer * E + e] = 1
                st.I[SCOUNT, layer * E + e] = c
    if name == "activation_aware":
        st.F[LW, :L] = obj.layer_weight
    decay = float(getattr(obj, "decay", 1.0))
    prm = Params(POLICY_CODES[name], L, E, P, cm, decay, math.log(decay), decay == 1.0,
                 int(getattr(obj, "period", 1)), float(getattr(obj, "alpha", 0.0)), classes,
                 float(getattr(obj, "decay_per_pos", 0.0)), int(getattr(obj, "ratio", 1)),
                 *learned)
    return st, prm


def _key_positions(trace) -> tuple[np.ndarray, np.ndarray]:
    """(positions, offsets [L * E + 1]): each key's request positions, ascending (Belady's next uses after a
    prefetch; strategies/belady.py request_positions). Kept on the trace, as its encoding is (the same for
    every budget: a plan's Belady bound at 8 sizes had built it 8 times, 2.7 s each on the real trace)."""
    got = getattr(trace, "_core_key_positions", None)
    if got is not None:
        return got
    req = encode(trace)
    got = key_positions(req.ids, req.ptr, req.n_layers, req.n_experts)
    for a in got:
        a.flags.writeable = False
    trace._core_key_positions = got
    return got


def prefetch_table(trace, prefetcher, n_slots: int, scope: str, nbytes: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(table int16 [R, lookahead, width], rows int64 [S * L]: the table row of each request position, -1 for
    none; cap in bytes or -1) of a built-in prefetcher, set up as moesim.engine.replay sets it up; no
    prefetcher: an empty table and no rows (the loop reads rows only where the table has a lookahead)."""
    S_L = trace.n_steps * trace.n_layers
    if prefetcher is None:
        return np.zeros((0, 0, 0), np.int16), np.zeros(0, np.int64), -1
    from ..units import parse_inflight

    check_params(type(prefetcher), PREFETCH, "prefetch")
    key, held = _table_key(trace, prefetcher)
    table, rows = _TABLES[key][1:] if key in _TABLES else (None, None)
    if table is None:  # a learned table takes seconds; runs that differ in budget or hardware share it
        prefetcher.setup(_context(trace, trace.spec, tuple(range(trace.n_layers)), n_slots, scope))
        table = np.ascontiguousarray(prefetcher.table, dtype=np.int16)
        table.flags.writeable = False
        own = getattr(prefetcher, "rows", None)
        rows = np.arange(len(table), dtype=np.int64) if own is None else np.asarray(own, np.int64)
        _TABLES.clear()  # one at a time: a table of the whole real trace is ~30 MB
        _TABLES[key] = (held, table, rows)  # `held` keeps the objects named by id alive, so no id is reused
    if len(rows) < S_L:  # predict() is [] past the table's end
        rows = np.concatenate([rows, np.full(S_L - len(rows), -1, np.int64)])
    cap = parse_inflight(prefetcher.max_inflight, nbytes, "prefetch.max_inflight")
    return table, rows[:S_L], -1 if cap is None else cap


_TABLES: dict = {}  # the last prefetch table built: _table_key -> (objects it names by id, table)


def _table_key(trace, prefetcher) -> tuple[tuple, list]:
    """(key, objects named by id in it): what a built-in prefetcher's table depends on: its class and
    parameters (a calibration trace file by its identity, a Trace by the object), and the replayed trace (by
    the object: a Trace is read-only)."""
    import os

    values, held = [], [trace]
    for name in PREFETCH[class_path(prefetcher)][1]:
        v = getattr(prefetcher, name, None)
        if isinstance(v, str) and os.path.exists(v):
            st = os.stat(v)
            v = (os.path.realpath(v), st.st_mtime_ns, st.st_size)
        elif v is not None and not isinstance(v, (str, int, float, bool)):
            held.append(v)
            v = ("object", id(v))
        values.append((name, v))
    return (class_path(prefetcher), tuple(values), id(trace), trace.n_tokens, trace.spec.top_k), held


def offload_arrays(trace, offload, n_slots: int, scope: str, cost, max_tokens: int, nbytes: int) -> tuple:
    """(oi, odev, ohl, oshare, ofaster, oroom, opart, oload, host_cap): a built-in offload policy, set up as
    moesim.engine.replay sets it up, as the arrays of moesim.core.loop.offload_decision."""
    L, E = trace.n_layers, trace.spec.experts
    oi = np.zeros(7, np.int64)  # kind, fill_first, load, min_batch, host_after_device, scratch slots, loads/layer
    oi[6] = -1
    odev = np.zeros(L * E, np.uint8)
    ohl = np.zeros(L, np.uint8)
    oshare = np.ones(max_tokens + 1)
    ofaster = np.zeros(max_tokens + 1, np.uint8)
    oroom = np.zeros(L, np.int64)
    opart = np.zeros(L, np.int64)
    oload = np.zeros(L, np.int64)
    host_cap = -1
    if offload is None:
        return oi, odev, ohl, oshare, ofaster, oroom, opart, oload, host_cap
    from ..units import parse_inflight

    name = builtin(offload, OFFLOAD)
    check_params(type(offload), OFFLOAD, "offload")
    offload.setup(_context(trace, trace.spec, tuple(range(L)), n_slots, scope))
    oi[0] = OFFLOAD_KIND[name]
    oi[4] = int(bool(offload.host_after_device))  # oi[5], the scratch slots: moesim.core.simulate sets it
    if name == "static_split":
        ohl[sorted(offload.host)] = 1
        oi[3] = offload.min_batch or 0
    elif name == "fiddler":
        for layer, e in offload.device:
            odev[layer * E + e] = 1
        for n in range(max_tokens + 1):
            ofaster[n] = offload.streams(n)
    elif name in ("host", "cost"):
        oi[1], oi[2] = int(offload.fill_first), int(offload.load)
        oi[6] = -1 if offload.loads_per_layer is None else offload.loads_per_layer
        for layer, e in offload.device:
            odev[layer * E + e] = 1
        for n in range(max_tokens + 1):  # every routed expert costs the same: the key does not matter
            oshare[n] = offload.share_at((0, 0), n, cost)
            if name == "cost":
                ofaster[n] = offload.fetch_is_faster((0, 0), n, cost)
        oroom[:len(offload.room)] = offload.room
        opart[:] = offload.partition_of
        cap = parse_inflight(offload.max_inflight, nbytes, "offload.max_inflight")
        host_cap = -1 if cap is None else cap
    return oi, odev, ohl, oshare, ofaster, oroom, opart, oload, host_cap
