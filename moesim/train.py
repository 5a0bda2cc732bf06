"""Train a learned cache policy (strategies/learned.py) on part of a trace and test it on the rest.

    python -m moesim train-policy trace=gpt-oss-20b out=my.policy.safetensors [train=0.5] [slots=8]
    moesim.train.train_policy(trace, out, ...) -> dict   # the same, from Python

The first `train` share of the trace's sequences is the training part. Its tables (transition P, two-step P2,
popularity) are counted from its requests; then a replay of it with `slots` experts per layer, compiled, stops
at a random `sample` share of its evictions and writes every candidate's features and the log1p of its steps
to its next request (the label; the model is to rank candidates as Belady would). Round 0 replays with a model
that ranks every candidate alike (LRU: ties go to the older last request); each later round replays with the
model trained so far and adds its states to the data (as PARROT and DAgger do: the policy learns the states it
visits itself). The network (torch, CPU) regresses the label. With `eval=true` the held-out part is then
replayed with the new model, LRU and Belady at the same slots, and the hit rates printed.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
from numba import njit

from .core.loop import HITS, N_CNT, REQUESTS, insert, lookup, order_wide, request_arrays
from .core.policies import learned_features, learned_request
from .core.requests import width
from .core.state import CAP, KPTR, LPH, MEMBERS, NFREE, PART, PIN, SIZE, next_after, reset
from .errors import MoesimError


@njit(cache=True, nogil=True)
def _collect(I, F, seqs, prm, ids, ptr, kpos, koff, sample, seed, label_cap, rows, labels):
    """Replay `ptr`'s steps (per_layer scope, no prefetch) with the learned policy of `prm` as
    moesim.core.loop.run_hits does (waves of at most a partition's slots, hits first), writing the features and
    label of every candidate at a `sample` share of evictions into rows/labels, up to their length. Returns
    (rows written, hits, requests)."""
    np.random.seed(seed)
    L, E = prm.L, prm.E
    w = width(ptr)
    cnt = np.zeros(N_CNT, np.int64)
    out = np.zeros((3, w), np.int64)
    tids = np.empty(w, ids.dtype)
    torder = np.empty(w, np.int64)
    none = np.empty(0, np.int64)
    none32 = np.empty(0, np.int32)
    src, _, _ = request_arrays(ids, none, none32, I, prm, w)  # requests are read from here (order_wide)
    reset(I, F, prm)
    nr = 0
    mark = 0
    n_steps = (len(ptr) - 1) // L
    for s in range(n_steps):
        for layer in range(L):
            pos = s * L + layer
            a, b = ptr[pos], ptr[pos + 1]
            p = I[PART, layer]
            cap = I[CAP, p]
            if b - a > cap:
                order_wide(I, prm, layer, src, none, none32, a, b, tids, none, none32, torder)
            learned_request(I, F, seqs, prm, p, pos, layer, ids, a, b)
            for wa in range(a, b, cap):
                wb = min(wa + cap, b)
                mark += 1
                lookup(I, F, seqs, none, prm, cnt, pos, mark, layer, src, wa, wb, out)
                for i in range(wa, wb):
                    if out[0, i - wa] == -2:
                        continue
                    if I[NFREE, p] == 0 and np.random.random() < sample and nr + I[SIZE, p] <= len(labels):
                        off = p * prm.cm
                        for j in range(I[SIZE, p]):
                            x = I[MEMBERS, off + j]
                            if I[PIN, x] == mark:
                                continue
                            learned_features(I, F, prm, pos, x)
                            for f in range(rows.shape[1]):
                                rows[nr, f] = F[LPH, f]
                            nu = next_after(I, kpos, koff, x, pos)
                            d = nu // L - s if nu < n_steps * L else label_cap
                            labels[nr] = math.log1p(min(d, label_cap))
                            nr += 1
                    insert(I, F, seqs, prm, cnt, pos, mark, layer * E + src[i], 0, False)
    return nr, cnt[HITS], cnt[REQUESTS]


def _tables(trace, L: int, E: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(P [L, E, E], P2 [L, E, E], pop [L, E]) of a trace's steps: P[l, a, e] = share of the steps whose
    request of layer l held a that held e one step later (same sequence); P2 two steps later; pop[l, e] = share
    of steps whose request of layer l held e."""
    S = trace.n_steps
    M = np.zeros((S, L, E), np.float32)
    step_of = np.repeat(np.arange(S), np.diff(trace.step_starts))
    x = np.asarray(trace.experts).astype(np.int64)
    for k in range(x.shape[2]):
        ok = x[:, :, k] >= 0
        t, l = np.nonzero(ok)
        M[step_of[t], l, x[t, l, k]] = 1.0
    seq = trace.step_seq()
    out = []
    for lag in (1, 2):
        same = (seq[lag:] == seq[:-lag]).astype(np.float32)[:, None, None]
        a = M[:-lag] * same
        out.append(np.einsum("tla,tlb->lab", a, M[lag:]) / np.maximum(a.sum(0), 1.0)[:, :, None])
    return out[0], out[1], M.mean(0)


def _fit(rows: np.ndarray, labels: np.ndarray, hidden: int, epochs: int, seed: int) -> dict:
    """The network, trained by torch (Adam, mean squared error), as the model file's tensors."""
    from .errors import install_hint

    try:
        import torch
    except ModuleNotFoundError as e:
        raise MoesimError(f"train-policy fits its network with torch: {install_hint(e)}") from None
    from strategies.learned import N_FEATURES

    torch.manual_seed(seed)
    mu = rows.mean(0).astype(np.float64)
    sd = rows.std(0).astype(np.float64) + 1e-6
    x = torch.tensor((rows - mu) / sd, dtype=torch.float32)
    y = torch.tensor(labels, dtype=torch.float32)
    net = torch.nn.Sequential(torch.nn.Linear(N_FEATURES, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
                              torch.nn.ReLU(), torch.nn.Linear(hidden, 1))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 8192):
            idx = perm[i:i + 8192]
            loss = ((net(x[idx]).squeeze(1) - y[idx]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    w = [p.detach().double().numpy() for p in net.parameters()]
    return dict(zip(("w1", "b1", "w2", "b2", "w3", "b3"), w)) | {"mu": mu, "sd": sd}


def split_by_sequence(trace, share: float) -> tuple[int, int]:
    """(token index where the held-out part starts, sequences in the training part): the first `share` of the
    trace's sequences (in the order they start) train; the cut is the first step that holds a token of a later
    one. In a batched trace a training sequence may still run past the cut: its later tokens are held out."""
    seq = np.asarray(trace.seq)
    _, first = np.unique(seq, return_index=True)
    order = np.sort(first)  # token index where each sequence starts, in order
    n = int(round(len(order) * share))
    if not 1 <= n < len(order):
        raise MoesimError(f"train={share}: leaves {n} of the trace's {len(order)} sequences for training; "
                          f"expected at least 1 and at most {len(order) - 1}")
    starts = trace.step_starts
    step = int(np.searchsorted(starts, order[n], side="right")) - 1  # the step holding that first token
    return int(starts[step]), n


def train_policy(trace, out, train: float = 0.5, slots: int = 8, hidden: int = 16, rounds: int = 2,
                 sample: float = 0.15, epochs: int = 6, seed: int = 0, max_rows: int = 3_000_000,
                 log=print) -> dict:
    """Train a model on the first `train` share of `trace`'s sequences and write it to `out`. Returns the
    metadata written (with the training replays' hit rates)."""
    from strategies.learned import LABEL_CAP, N_FEATURES, Learned, save_model

    from .core.parts import _key_positions, cache_state
    from .core.requests import encode

    if not (isinstance(slots, int) and 1 <= slots):
        raise MoesimError(f"slots={slots!r}: expected a whole number of expert slots per layer >= 1")
    if not (isinstance(rounds, int) and rounds >= 1) or not 0 < sample <= 1 or not (
            isinstance(hidden, int) and hidden >= 1):
        raise MoesimError(f"rounds={rounds!r}, sample={sample!r}, hidden={hidden!r}: expected rounds >= 1, "
                          f"0 < sample <= 1, hidden >= 1")
    L, E = trace.n_layers, trace.spec.experts
    if slots < trace.top_k:
        raise MoesimError(f"slots={slots}: fewer than the model's top-{trace.top_k} experts per layer")
    cut, n_seqs = split_by_sequence(trace, train)
    part = trace.slice_tokens(0, cut)
    t0 = time.perf_counter()
    P, P2, pop = _tables(part, L, E)
    log(f"train-policy: training part {n_seqs} sequences, {cut} tokens, {part.n_steps} steps; tables in "
        f"{time.perf_counter() - t0:.1f} s")
    zero = {"mu": np.zeros(N_FEATURES), "sd": np.ones(N_FEATURES), "w1": np.zeros((hidden, N_FEATURES)),
            "b1": np.zeros(hidden), "w2": np.zeros((hidden, hidden)), "b2": np.zeros(hidden),
            "w3": np.zeros((1, hidden)), "b3": np.zeros(1), "pop": pop, "P": P, "P2": P2}
    req = encode(part)
    kpos, koff = _key_positions(part)
    rows = np.zeros((max_rows, N_FEATURES), np.float32)
    labels = np.zeros(max_rows, np.float32)
    data_x, data_y, rates = [], [], []
    model = zero
    tmp = Path(out).with_name(Path(out).name + ".round")
    try:
        for r in range(rounds):
            save_model(tmp, model, {})
            st, prm = cache_state(part, part.spec, slots * L, "per_layer", lambda: Learned(str(tmp)))
            I = st.I
            I[KPTR, :L * E] = koff[:-1]  # each key's pointer into its request positions
            t1 = time.perf_counter()
            n, h, q = _collect(I, st.F, st.seqs, prm, req.ids, req.ptr, kpos, koff, sample, seed + r, LABEL_CAP,
                               rows, labels)
            if n == 0:
                raise MoesimError(f"slots={slots}: the training replay evicted nothing (the cache holds what the "
                                  f"training part asks of it); give fewer slots per layer")
            data_x.append(rows[:n].copy())
            data_y.append(labels[:n].copy())
            rates.append(h / max(q, 1))
            x, y = np.concatenate(data_x), np.concatenate(data_y)
            t2 = time.perf_counter()
            model = zero | _fit(x, y, hidden, epochs, seed)
            log(f"train-policy: round {r}: replay hit rate {h / max(q, 1):.4f} ({'LRU' if r == 0 else 'model'}), "
                f"{n} rows in {t2 - t1:.1f} s; fitted on {len(y)} rows in {time.perf_counter() - t2:.1f} s")
    finally:
        tmp.unlink(missing_ok=True)
    meta = {"model": trace.spec.name, "layers": L, "experts": E, "hidden": hidden, "slots_per_layer": slots,
            "train_sequences": n_seqs, "train_tokens": cut, "trace": trace.describe(),
            "source": (trace.source.get("origin", trace.source.get("importer", ""))
                       if isinstance(trace.source, dict) else ""),
            "rounds": rounds, "sample": sample, "epochs": epochs, "seed": seed, "label_cap": LABEL_CAP,
            "train_hit_rates": rates}
    save_model(out, model, meta)
    return meta


def hit_rates(trace, policies: dict, slots: int, scope: str = "per_layer") -> dict:
    """{name: hit rate} of a cache-only compiled replay of `trace`, `slots` per layer, for each
    {name: (compiled policy, params)}."""
    from .core import hit_counts

    out = {}
    for name, (policy, params) in policies.items():
        c = hit_counts(trace, policy, params, slots * trace.n_layers, scope)
        out[name] = c["hits"] / max(c["requests"], 1)
    return out


def train_policy_command(cfg) -> dict:
    """`python -m moesim train-policy`: train, write the model, and (eval=true) test it on the held-out part."""
    from .importers import open_trace

    trace = open_trace(str(cfg.trace))
    out = Path(str(cfg.out)) if cfg.out else Path("reports/policies") / f"{trace.spec.name}.policy.safetensors"
    if out.suffix != ".safetensors":
        raise MoesimError(f"out={out}: expected a .safetensors file name")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    meta = train_policy(trace, out, float(cfg.train), int(cfg.slots), int(cfg.hidden), int(cfg.rounds),
                        float(cfg.sample), int(cfg.epochs), int(cfg.seed), log=log)
    print(f"wrote {out}: replay it with strategy=learned strategy.cache.model={out}")
    if cfg.eval:
        cut = meta["train_tokens"]
        held = trace.slice_tokens(cut, trace.n_tokens)
        rates = hit_rates(held, {"learned": ("learned", {"model": str(out)}), "lru": ("lru", None),
                                 "belady": ("belady", None)}, int(cfg.slots))
        closed = (rates["learned"] - rates["lru"]) / max(rates["belady"] - rates["lru"], 1e-12)
        print(f"held-out part ({held.n_seqs} sequences, {held.n_tokens} tokens), {cfg.slots} slots per layer: "
              f"hit rate learned {rates['learned']:.4f}, LRU {rates['lru']:.4f}, Belady {rates['belady']:.4f} "
              f"({closed:.0%} of the gap from LRU to Belady closed)")
        meta["held_out"] = rates
    return meta
