"""Routing statistics of a trace: skew, entropy, token-to-token reuse, reuse distance, layer co-activation.

    python -m moesim stats trace=gpt-oss-like              # a table, one row per MoE layer
    python -m moesim stats trace=gpt-oss-20b json=true

`trace` is anything `moesim.importers.open_trace` accepts: a `.moetrace.safetensors` file, a foreign
trace (converted once and cached) or a synthetic preset name (moesim/synthetic.py).

Measures, per MoE layer l (ids of -1 never count; a "row" is one token's top-k ids at one layer):

hottest_share   tokens routed to layer l's most popular expert / tokens with a row at l. Uniform routing
                gives about K/E.
entropy_bits    Shannon entropy (bits) of expert popularity p_e = (rows naming e) / (all ids at layer l).
                The uniform maximum is log2(E).
overlap_prev    experts shared by a token's row and the previous token's row of the same sequence
                (sequence order = trace order within a sequence), averaged over all such pairs. Chance
                (two independent uniform rows) is K*K/E.
reuse_p50/p90/p99, reuse_mean
                LRU stack distance as the cache sees it. Time is the step (one forward pass): at step s
                layer l requests the set of distinct experts in the step's rows. For each requested
                expert e whose previous request was at step s' < s, the distance is the number of
                distinct other experts of layer l requested at steps s'+1 .. s-1 (0 = requested again
                right after). Roughly, a per-layer LRU cache of C slots hits e when its distance is below C
                (exactly so with top-1 and one token per step; with larger requests, ties in recency and the
                step's own insertions blur it). First requests in the trace have no distance: they count toward
                `cold_fraction` (cold requests / all requests) and are left out of the quantiles.
                Quantiles are numpy's linear interpolation over the warm distances.
coact_mi_bits, coact_nmi (between layer l and l+1; None for the last layer)
                Draw a token uniformly and one slot of its row at l and one slot of its row at l+1
                uniformly: X, Y are the two expert ids. coact_mi_bits = I(X; Y), the mutual information in
                bits, estimated from the counts of all K*K id pairs of every token that has rows at both
                layers. coact_nmi = I(X; Y) / min(H(X), H(Y)) (H(X) is layer l's popularity entropy): 0 when
                layer l+1's choice says nothing about layer l's, 1 when one determines the other (reached
                only with K = 1; with K > 1 the K-1 unrelated pairs of each slot cap it lower). Normalised,
                so traces of different skew are comparable. The plug-in estimate is biased up by about
                (E-1)^2 / (2 N ln 2) bits for N pairs; negligible at E*E << N (gpt-oss: 0.0003 bits).

`mean` holds each measure's mean over layers (over layers 0..L-2 for co-activation).
"""
from __future__ import annotations

import json
import math

import numba
import numpy as np

from .trace import PREFILL, Trace

QUANTILES = (50, 90, 99)  # percent
MEASURES = ("hottest_share", "entropy_bits", "overlap_prev", "reuse_p50", "reuse_p90", "reuse_p99",
            "reuse_mean", "cold_fraction", "coact_mi_bits", "coact_nmi")


def trace_stats(trace: Trace) -> dict:
    """The statistics described in the module docstring, as a JSON-ready dict."""
    spec = trace.spec
    T, L, K = trace.experts.shape
    E = spec.experts
    experts = np.ascontiguousarray(trace.experts, dtype=np.int16)  # [T, L, K] (a memmap is read here once)
    seq = np.asarray(trace.seq, dtype=np.int64)
    phase = np.asarray(trace.phase)

    order = np.argsort(seq, kind="stable")  # tokens grouped by sequence, in trace order within each
    counts, rows, shared, pairs, joint = count_pass(experts, seq, order, E)
    hottest = counts.max(axis=1) / np.maximum(rows, 1)
    entropy = entropy_bits(counts / np.maximum(counts.sum(axis=1, keepdims=True), 1))
    overlap = shared / pairs if pairs else np.zeros(L)
    hist = reuse_histogram(experts, trace.step_starts, E)  # [L, E+1], last column: cold
    mi, nmi = coactivation(joint)

    layers = []
    for l in range(L):
        warm = hist[l, :E]
        n_req = int(hist[l].sum())
        layers.append({
            "layer": l,
            "hottest_expert": int(counts[l].argmax()),
            "hottest_share": float(hottest[l]),
            "entropy_bits": float(entropy[l]),
            "overlap_prev": float(overlap[l]),
            **{f"reuse_p{q}": v for q, v in zip(QUANTILES, hist_quantiles(warm, QUANTILES))},
            "reuse_mean": float(warm @ np.arange(E) / warm.sum()) if warm.sum() else None,
            "cold_fraction": float(hist[l, E] / n_req) if n_req else None,
            "coact_mi_bits": float(mi[l]) if l < L - 1 else None,
            "coact_nmi": float(nmi[l]) if l < L - 1 else None,
        })
    mean = {}
    for m in MEASURES:
        vals = [r[m] for r in layers if r[m] is not None]
        mean[m] = float(np.mean(vals)) if vals else None
    return {
        "tokens": int(T),
        "steps": int(trace.n_steps),
        "sequences": int(trace.n_seqs),
        "prefill_tokens": int(np.count_nonzero(phase == PREFILL)),
        "decode_tokens": int(np.count_nonzero(phase != PREFILL)),
        "tokens_per_step": float(T / trace.n_steps) if trace.n_steps else 0.0,
        "model": spec.to_dict(),
        "uniform": {"hottest_share": K / E, "entropy_bits": math.log2(E), "overlap_prev": K * K / E},
        "layers": layers,
        "mean": mean,
    }


# ------------------------------------------------------------------------------------------- measures
def entropy_bits(p: np.ndarray) -> np.ndarray:
    """Entropy in bits of each row of probabilities p [..., n]."""
    safe = np.where(p > 0, p, 1.0)
    return -(p * np.log2(safe)).sum(axis=-1)


def count_pass(experts: np.ndarray, seq: np.ndarray, order: np.ndarray, n_experts: int):
    """One scan of the trace. Returns
    counts  int64 [L, E]         rows naming each expert
    rows    int64 [L]            tokens with at least one id at the layer
    shared  int64 [L]            ids shared with the previous token of the same sequence, summed over tokens
    pairs   int                  (previous, current) token pairs within a sequence
    joint   int64 [L-1, E, E]    (id at l, id at l+1) over every token's K*K slot pairs
    `order` lists tokens grouped by sequence, in trace order within each (a stable argsort of seq)."""
    return _count_pass(np.ascontiguousarray(experts, dtype=np.int16), np.asarray(seq, dtype=np.int64),
                       np.asarray(order, dtype=np.int64), n_experts)


@numba.njit(cache=True, nogil=True)
def _count_pass(experts, seq, order, n_experts):
    T, L, K = experts.shape
    counts = np.zeros((L, n_experts), np.int64)
    rows = np.zeros(L, np.int64)
    shared = np.zeros(L, np.int64)
    joint = np.zeros((max(L - 1, 0), n_experts, n_experts), np.int64)
    pairs = 0
    for i in range(T):
        t = order[i]
        u = order[i - 1] if i > 0 else -1  # the previous token of t's sequence, if seq agrees
        if u >= 0 and seq[u] != seq[t]:
            u = -1
        if u >= 0:
            pairs += 1
        for l in range(L):
            any_id = False
            for k in range(K):
                e = experts[t, l, k]
                if e < 0:
                    continue
                any_id = True
                counts[l, e] += 1
                if u >= 0:
                    for j in range(K):
                        if experts[u, l, j] == e:
                            shared[l] += 1
                if l < L - 1:
                    for j in range(K):
                        f = experts[t, l + 1, j]
                        if f >= 0:
                            joint[l, e, f] += 1
            if any_id:
                rows[l] += 1
    return counts, rows, shared, pairs, joint


def reuse_histogram(experts: np.ndarray, step_starts: np.ndarray, n_experts: int) -> np.ndarray:
    """int64 [L, E+1]: per layer, count of requests at each LRU stack distance 0..E-1; column E: cold."""
    return _reuse_histogram(np.ascontiguousarray(experts, dtype=np.int16),
                            np.asarray(step_starts, dtype=np.int64), n_experts)


@numba.njit(cache=True, nogil=True)
def _reuse_histogram(experts, step_starts, n_experts):
    T, L, K = experts.shape
    hist = np.zeros((L, n_experts + 1), np.int64)
    last = np.empty(n_experts, np.int64)  # step of each expert's latest request; -1: never
    mark = np.empty(n_experts, np.int64)  # step in which the expert was last put in `batch`
    batch = np.empty(n_experts, np.int64)  # distinct experts requested in the current step
    for l in range(L):
        last[:] = -1
        mark[:] = -1
        for s in range(len(step_starts) - 1):
            nb = 0
            for t in range(step_starts[s], step_starts[s + 1]):
                for k in range(K):
                    e = experts[t, l, k]
                    if e >= 0 and mark[e] != s:
                        mark[e] = s
                        batch[nb] = e
                        nb += 1
            # distances use the state before this step's requests (requests within a step are one set)
            for i in range(nb):
                le = last[batch[i]]
                if le < 0:
                    hist[l, n_experts] += 1
                    continue
                d = 0
                for j in range(n_experts):
                    if last[j] > le:
                        d += 1
                hist[l, d] += 1
            for i in range(nb):
                last[batch[i]] = s
    return hist


def hist_quantiles(hist: np.ndarray, percents) -> list:
    """numpy-linear quantiles (percent) of the integer sample whose value counts are hist[v]; None if empty."""
    n = int(hist.sum())
    if n == 0:
        return [None for _ in percents]
    cum = np.cumsum(hist)
    out = []
    for q in percents:
        pos = (n - 1) * q / 100  # position in the sorted sample (numpy's "linear" method)
        lo, frac = int(math.floor(pos)), pos - math.floor(pos)
        v_lo = int(np.searchsorted(cum, lo + 1))  # value of the sorted sample's element `lo`
        v_hi = int(np.searchsorted(cum, min(lo + 1, n - 1) + 1))
        out.append(float(v_lo + frac * (v_hi - v_lo)))
    return out


def coactivation(joint: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mutual information in bits, the same over min entropy), arrays [L-1], from pair counts [L-1, E, E]."""
    mi = np.zeros(len(joint))
    nmi = np.zeros(len(joint))
    for l in range(len(joint)):
        n = joint[l].sum()
        if n == 0:
            continue
        pj = joint[l] / n
        px, py = pj.sum(axis=1), pj.sum(axis=0)
        h = min(entropy_bits(px), entropy_bits(py))
        nz = pj > 0
        mi[l] = float((pj[nz] * np.log2(pj[nz] / np.outer(px, py)[nz])).sum())
        nmi[l] = mi[l] / h if h > 0 else 0.0
    return mi, nmi


# -------------------------------------------------------------------------------------------- output
def format_table(stats: dict) -> str:
    """A terminal table: header lines, one row per layer, a row of means."""
    m = stats["model"]
    u = stats["uniform"]
    head = [
        f"trace: {stats['tokens']:,} tokens ({stats['prefill_tokens']:,} prefill, {stats['decode_tokens']:,} decode), "
        f"{stats['steps']:,} steps ({stats['tokens_per_step']:.2f} tokens/step), {stats['sequences']:,} sequences",
        f"model: {m['name']}: {m['layers']} MoE layers x {m['experts']} experts, top-{m['top_k']}"
        + (f", {m['shared_experts']} shared" if m.get("shared_experts") else ""),
        f"uniform routing would give: hottest {u['hottest_share']:.3f}, entropy {u['entropy_bits']:.2f} bits "
        f"(the maximum), overlap {u['overlap_prev']:.2f}",
        "",
    ]
    cols = [("layer", "layer", "{}"), ("hottest", "hottest_share", "{:.3f}"), ("entropy", "entropy_bits", "{:.3f}"),
            ("overlap", "overlap_prev", "{:.3f}"), ("reuse p50", "reuse_p50", "{:.1f}"),
            ("p90", "reuse_p90", "{:.1f}"), ("p99", "reuse_p99", "{:.1f}"), ("mean", "reuse_mean", "{:.2f}"),
            ("cold", "cold_fraction", "{:.5f}"), ("coact MI", "coact_mi_bits", "{:.4f}"),
            ("coact NMI", "coact_nmi", "{:.4f}")]

    def cells(row):
        return [("-" if row.get(k) is None else f.format(row[k])) for _, k, f in cols]

    body = [cells(r) for r in stats["layers"]]
    body.append(cells({**stats["mean"], "layer": "mean"}))
    widths = [max(len(c[0]), *(len(r[i]) for r in body)) for i, c in enumerate(cols)]
    lines = ["  ".join(c[0].rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(x.rjust(w) for x, w in zip(r, widths)) for r in body[:-1]]
    lines.append("  ".join("-" * w for w in widths))
    lines.append("  ".join(x.rjust(w) for x, w in zip(body[-1], widths)))
    notes = ["",
             "hottest: share of tokens routed to the layer's most popular expert; entropy: of expert popularity",
             "(bits); overlap: experts shared with the previous token of the sequence; reuse: LRU stack distance,",
             "distinct experts requested between two requests of an expert, in steps (cold: first requests);",
             "coact: mutual information (bits; NMI: over the smaller entropy) of layers l and l+1"]
    return "\n".join(head + lines + notes)


def stats_command(cfg) -> dict:
    """`python -m moesim stats`: print the statistics of `cfg.trace` (table, or JSON with json=true)."""
    from .importers import open_trace

    trace = open_trace(str(cfg.trace))
    stats = trace_stats(trace)
    if cfg.json:
        print(json.dumps(stats, indent=1))
    else:
        print(format_table(stats))
    return stats
