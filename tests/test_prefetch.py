"""Prefetchers (strategies/oracle.py, recorded.py, transition.py, history.py) and the engine's prefetch path:
hand-worked timelines on the sim backend, the metrics' definitions, and what learned predictors may learn from.

    python -m pytest tests/test_prefetch.py -q

Toy numbers (as tests/test_sim.py): one expert = 3e6 bytes; a copy takes 1 ms (3 GB/s, no latency), or 5 ms
with SLOW; a device expert takes 2 ms for one token. The toy trace has one token per step, top-1, and expert
(t + l) % 4 at layer l of token t, so a small per-layer cache misses every request without prefetch.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from moesim.__main__ import compose
from moesim.backends.sim import SimBackend
from moesim.cache import Cache, Counters, PrefetchCounters
from moesim.engine import replay
from moesim.api import request_metrics, run
from moesim.errors import MoesimError
from moesim.hardware import Cost, HardwareProfile
from moesim.profiler import Profiler
from moesim.trace import ModelSpec, from_arrays, save_trace
from strategies import Context, Prefetcher
from strategies.activation_match import ActivationMatch
from strategies.history import History
from strategies.lru import LRU
from strategies.oracle import Oracle
from strategies.recorded import Recorded
from strategies.transition import Transition

SPEC = ModelSpec("toy", layers=3, experts=4, top_k=1, hidden=1000, ffn=1000, bits_per_weight=8)
HW = HardwareProfile("toy", h2d_pinned_gbps=3, h2d_pageable_gbps=1.5, copy_latency_us=0, device_mem_gbps=1.5,
                     device_tflops=0.006, host_mem_gbps=1, host_gflops=2, vram_gib=1, kernel_overhead_us=0,
                     host_overhead_us=0)
SLOW = dataclasses.replace(HW, name="slow-link", h2d_pinned_gbps=0.6)  # a copy takes 5 ms


def cycle_trace(T: int = 4, spec: ModelSpec = SPEC, predicted=None):
    e = np.array([[[(t + l) % spec.experts] for l in range(spec.layers)] for t in range(T)])
    return from_arrays(spec, e, np.ones(e.shape), predicted=predicted)


def sim(trace, slots: int, prefetcher=None, hw=HW, scope="per_layer", policy=LRU, offload=None):
    cache = Cache(trace.spec, slots, scope, policy, trace)
    backend, profiler = SimBackend(hw), Profiler(trace.spec.layers)
    backend.setup(trace.spec, slots, profiler)
    counters = replay(trace, cache, backend, prefetcher, offload, Cost(backend.hardware, trace.spec))
    m = request_metrics(counters, cache.prefetch, backend.request_stats(), trace.spec.bytes_per_expert)
    return counters, m, profiler


class Fixed(Prefetcher):
    """Predicts, for the next layer, `choose(step, target layer)`'s experts (a test double)."""

    def __init__(self, choose, **knobs):
        super().__init__(**knobs)
        self.choose = choose

    def setup(self, ctx):
        self.L, self.S = ctx.trace.n_layers, ctx.trace.n_steps

    def predict(self, pos, layer):
        step, m = divmod(pos + 1, self.L)
        return [(m, e) for e in self.choose(step, m)] if step < self.S else []


# --------------------------------------------------------------------------------------------- timelines
def test_oracle_prefetch_removes_every_stall_the_bandwidth_allows():
    tr = cycle_trace()
    c0, m0, p0 = sim(tr, 2 * 3)
    assert c0.hits == 0 and m0["stall_free_rate"] == 0.0
    assert p0.steps_table().latency_ms.sum() == pytest.approx(12 * 3.0)  # each layer: copy 1 ms, compute 2 ms
    c, m, p = sim(tr, 2 * 3, Oracle(lookahead=1))
    # the copy for layer l+1 (1 ms) is issued when layer l starts computing (2 ms): only layer 0 of step 0 waits
    assert p.metrics()["stall_ms"] == pytest.approx(1.0)
    assert p.steps_table().latency_ms.sum() == pytest.approx(1.0 + 12 * 2.0)
    assert c.prefetch_loads == 11 and m["prefetch_used"] == 11 and m["late_prefetches"] == 0
    assert m["stall_free_rate"] == pytest.approx(11 / 12)
    assert m["prefetch_precision"] == 1.0 and m["prefetch_recall"] == pytest.approx(11 / 12)
    assert m["wasted_prefetches"] == 0 and m["wasted_prefetch_bytes"] == 0
    assert Oracle.bound is True


def test_late_prefetch_is_counted_when_the_copy_lands_after_the_layer_could_start():
    tr = cycle_trace()
    _, _, p0 = sim(tr, 6, hw=SLOW)
    assert p0.steps_table().latency_ms.sum() == pytest.approx(12 * 7.0)  # copy 5 ms, then compute 2 ms
    c, m, p = sim(tr, 6, Oracle(lookahead=1), hw=SLOW)
    # copies run back to back (5 ms each) and every layer waits for its own: all 11 prefetches are late,
    # but each started earlier than a demand copy would have: 12 copies + the last compute
    assert m["late_prefetches"] == 11 == m["prefetch_used"]
    assert m["stall_free_rate"] == 0.0
    assert p.steps_table().latency_ms.sum() == pytest.approx(12 * 5.0 + 2.0)
    assert c.hits == 11  # a late prefetch is still a hit for the cache


def test_wasted_bytes_count_prefetched_keys_evicted_unused():
    tr = cycle_trace()
    wrong = Fixed(lambda step, m: [(step + m + 2) % 4])  # never the expert that position asks for
    c, m, _ = sim(tr, 1 * 3, wrong)  # one slot per layer: the next demand miss evicts the guess
    assert c.prefetch_loads == 11 and m["prefetch_used"] == 0
    assert m["wasted_prefetches"] == 11 and m["wasted_prefetch_bytes"] == 11 * SPEC.bytes_per_expert
    assert m["prefetch_precision"] == 0.0 and m["prefetch_recall"] == 0.0
    assert c.misses == 12


def test_prefetched_and_never_requested_is_unused_at_end_not_wasted():
    tr = cycle_trace(T=1)
    # layer 2's guess at step 0's layer 1 is expert 0, which step 0 does not need (it needs expert 2)
    c, m, _ = sim(tr, 4 * 3, Fixed(lambda step, m: [0] if m == 2 else []))
    assert c.prefetch_loads == 1 and m["prefetch_unused_at_end"] == 1 and m["wasted_prefetches"] == 0


def test_precision_and_recall_definitions():
    counters = Counters(requests=100, hits=70, misses=30, loads=50, prefetch_loads=20)
    m = request_metrics(counters, PrefetchCounters(used=15, wasted=4), {"stall_free_requests": 60,
                                                                          "late_prefetches": 5}, 10)
    assert m["prefetch_precision"] == 15 / 20  # of the prefetched loads, the ones requested while resident
    assert m["prefetch_recall"] == 15 / (15 + 30)  # of requests not resident by earlier use, the prefetched share
    assert m["stall_free_rate"] == 0.6 and m["late_prefetches"] == 5 and m["wasted_prefetch_bytes"] == 40
    none = request_metrics(Counters(requests=10, hits=10), PrefetchCounters(), None, 10)
    assert none["prefetch_precision"] is None and none["stall_free_rate"] is None and none["late_prefetches"] is None


def test_every_prefetch_is_used_wasted_or_still_unused():
    rng = np.random.default_rng(3)
    spec = ModelSpec("toy8", layers=4, experts=8, top_k=2, hidden=1000, ffn=1000, bits_per_weight=8)
    e = np.stack([[rng.choice(8, 2, replace=False) for _ in range(4)] for _ in range(300)])
    tr = from_arrays(spec, e, np.ones(e.shape), seq=np.repeat([0, 1, 2], 100))
    calib = tr.slice_tokens(0, 100)
    for pf in (Transition(lookahead=2, calibrate_trace=calib), History(calibrate_trace=calib), Oracle(lookahead=3)):
        c, m, _ = sim(tr, 3 * 4, pf)
        assert c.prefetch_loads > 0
        assert m["prefetch_used"] + m["wasted_prefetches"] + m["prefetch_unused_at_end"] == c.prefetch_loads
        assert 0 <= m["late_prefetches"] <= m["prefetch_used"]
        assert c.hits + c.misses == c.requests


def test_a_prefetch_never_evicts_a_key_of_the_same_prediction():
    spec = ModelSpec("toy2", layers=2, experts=8, top_k=2, hidden=1000, ffn=1000, bits_per_weight=8)
    e = np.array([[[2 * t % 8, (2 * t + 1) % 8], [(2 * t + 4) % 8, (2 * t + 5) % 8]] for t in range(6)])
    tr = from_arrays(spec, e, np.ones(e.shape))
    c, m, _ = sim(tr, 2 * 2, Oracle(lookahead=1))  # two slots per layer, two predicted keys per layer
    assert m["wasted_prefetches"] == 0 and m["prefetch_used"] == c.prefetch_loads == 11 * 2  # all used


def test_max_inflight_caps_the_copy_queue():
    b, p = SimBackend(SLOW), Profiler(3)
    b.setup(SPEC, 3, p)
    b.begin_step(0, 1)
    assert b.inflight_bytes() == 0
    b.load((0, 0), 0, False)
    b.load((1, 0), 1, True)
    assert b.inflight_bytes() == 2 * SPEC.bytes_per_expert  # issued at 0, ending at 5 and 10
    b.compute(0, [((0, 0), 0, 1)], [])  # waits until 5, ends at 7: the second copy (5..10) is in flight
    assert b.inflight_bytes() == SPEC.bytes_per_expert
    tr = cycle_trace(T=6)
    free, _, _ = sim(tr, 4 * 3, Oracle(lookahead=3), hw=SLOW)
    capped, _, _ = sim(tr, 4 * 3, Oracle(lookahead=3, max_inflight="1 experts"), hw=SLOW)
    assert capped.prefetch_loads < free.prefetch_loads
    # with a cap of one copy, a prefetch is issued only onto an empty copy engine: never two per layer
    assert capped.prefetch_loads <= tr.n_tokens * SPEC.layers


def test_a_prefetcher_that_predicts_nothing_leaves_the_replay_unchanged():
    tr = cycle_trace(T=5)
    _, _, p0 = sim(tr, 2 * 3)
    _, m, p1 = sim(tr, 2 * 3, Fixed(lambda step, m: []))
    for a, b in zip(p0.arrays(), p1.arrays()):
        np.testing.assert_array_equal(a, b)
    assert m["prefetch_precision"] is None


@pytest.mark.parametrize("knobs, word", [({"lookahead": 0}, "lookahead"), ({"per_layer": 0}, "per_layer"),
                                         ({"max_inflight": "lots"}, "max_inflight")])
def test_bad_knobs_are_refused(knobs, word):
    with pytest.raises(MoesimError, match=word):
        Oracle(**knobs)


# ---------------------------------------------------------------------------------------------- recorded
def test_recorded_prefetches_the_traces_guesses_for_the_next_layer():
    tr0 = cycle_trace(T=3)
    guesses = (np.asarray(tr0.experts) + 1) % 4  # [T, L, 1], deliberately wrong
    guesses[1, 2, 0] = tr0.experts[1, 2, 0]  # one right guess: token 1, layer 2
    tr = cycle_trace(T=3, predicted=guesses)
    pf = Recorded()
    pf.setup(Context(tr, SPEC, (0, 1, 2), 9, "per_layer"))
    assert pf.predict(0, 0) == [(1, int(guesses[0, 1, 0]))]
    assert pf.predict(2, 2) == [(0, int(guesses[1, 0, 0]))]  # after the last layer: the next step's layer 0
    assert pf.predict(8, 2) == []  # nothing after the last step
    c, m, _ = sim(tr, 3, Recorded())
    assert m["prefetch_used"] == 1


def test_recorded_refuses_a_trace_without_guesses_and_lookahead_beyond_one():
    with pytest.raises(MoesimError, match="no 'predicted' tensor"):
        sim(cycle_trace(), 6, Recorded())
    tr = cycle_trace(predicted=np.zeros((4, 3, 1)))
    with pytest.raises(MoesimError, match="lookahead=2"):
        sim(tr, 6, Recorded(lookahead=2))


# ------------------------------------------------------------------------------------------- transition
def test_transition_learns_the_layer_to_layer_rule_and_predicts_it():
    # calibration: expert e at layer 0 is always followed by expert (e + 1) % 4 at layer 1, and so on
    calib = cycle_trace(T=40)
    pf = Transition(lookahead=1, reuse_weight=0.0, calibrate_trace=calib)
    evaluation = cycle_trace(T=8)
    pf.setup(Context(evaluation, SPEC, (0, 1, 2), 9, "per_layer"))
    for e in range(4):
        assert pf.P[0, 0, e, (e + 1) % 4] == pytest.approx(1.0)
    # token-to-token: expert e at layer m is followed by (e + 1) % 4 at layer m of the next token
    assert pf.R[1, 2, 3] == pytest.approx(1.0)
    for pos in range(evaluation.n_tokens * 3 - 1):
        step, layer = divmod(pos, 3)
        nstep, m = divmod(pos + 1, 3)
        assert pf.predict(pos, layer) == [(m, (nstep + m) % 4)]


def _mutated_after(trace, token: int, seed: int = 0):
    e = np.array(trace.experts)
    rng = np.random.default_rng(seed)
    for t in range(token, len(e)):
        for l in range(e.shape[1]):
            e[t, l] = rng.choice(trace.spec.experts, e.shape[2], replace=False)
    return from_arrays(trace.spec, e, np.asarray(trace.weights), step=np.asarray(trace.step),
                       seq=np.asarray(trace.seq))


def _random_trace(T=240, seed=1):
    rng = np.random.default_rng(seed)
    spec = ModelSpec("toy8", layers=4, experts=8, top_k=2, hidden=1000, ffn=1000, bits_per_weight=8)
    e = np.stack([[rng.choice(8, 2, replace=False, p=np.arange(1, 9) / 36) for _ in range(4)] for _ in range(T)])
    return from_arrays(spec, e, np.ones(e.shape), seq=np.repeat(np.arange(T // 40), 40))


@pytest.mark.parametrize("make", [lambda c: Transition(lookahead=3, calibrate_trace=c),
                                  lambda c: History(lookahead=2, calibrate_trace=c)])
def test_learned_tables_come_from_calibration_only(make):
    tr = _random_trace()
    calib = tr.slice_tokens(0, 120)
    a, b = make(calib), make(calib)
    a.setup(Context(tr.slice_tokens(120, 240), tr.spec, (0, 1, 2, 3), 16, "per_layer"))
    b.setup(Context(_mutated_after(tr, 120).slice_tokens(120, 240), tr.spec, (0, 1, 2, 3), 16, "per_layer"))
    tables = ("P", "R", "popularity") if isinstance(a, Transition) else ("matrices", "unit", "popular")
    for name in tables:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.table, b.table)  # the predictions do follow the evaluation routing


@pytest.mark.parametrize("make", [lambda: Transition(lookahead=3, calibrate_tokens=80),
                                  lambda: History(lookahead=2, calibrate_tokens=80)])
def test_a_prefix_calibration_learns_from_the_prefix_only(make):
    tr = _random_trace()
    a, b = make(), make()
    a.setup(Context(tr, tr.spec, (0, 1, 2, 3), 16, "per_layer"))
    b.setup(Context(_mutated_after(tr, 80), tr.spec, (0, 1, 2, 3), 16, "per_layer"))
    assert a.calibration_tokens == 80
    tables = ("P", "R") if isinstance(a, Transition) else ("matrices",)
    for name in tables:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


@pytest.mark.parametrize("make", [lambda c: Transition(lookahead=3, calibrate_trace=c),
                                  lambda c: History(lookahead=2, calibrate_trace=c),
                                  lambda c: ActivationMatch(calibrate_trace=c),
                                  lambda c: Oracle(lookahead=1)])
def test_predictions_never_depend_on_routing_after_them(make):
    """Causality of the precomputed tables: changing tokens from step k on leaves every prediction made
    before step k as it was (the oracle is the control: it reads the future, so its predictions change)."""
    tr = _random_trace()
    calib = tr.slice_tokens(0, 120)
    ev = tr.slice_tokens(120, 240)
    k = 50
    a, b = make(calib), make(calib)
    a.setup(Context(ev, tr.spec, (0, 1, 2, 3), 16, "per_layer"))
    b.setup(Context(_mutated_after(ev, k, seed=5), tr.spec, (0, 1, 2, 3), 16, "per_layer"))
    before = slice(0, k * tr.n_layers)  # predictions made before step k (the last one is for its layer 0)
    ta, tb = a.per_position(), b.per_position()
    if isinstance(a, Oracle):
        assert not np.array_equal(ta[before], tb[before])
    else:
        np.testing.assert_array_equal(ta[before], tb[before])
        assert not np.array_equal(ta, tb)


# ---------------------------------------------------------------------------------------------- history
def test_history_prefetches_what_the_closest_past_sequence_used():
    spec = ModelSpec("toy8", layers=2, experts=8, top_k=1, hidden=1000, ffn=1000, bits_per_weight=8)
    # calibration: sequence 0 uses experts 0/1 (layer 0/1) then 2/3; sequence 1 uses 4/5 then 6/7
    rows = [[0, 1]] * 6 + [[2, 3]] * 4 + [[4, 5]] * 6 + [[6, 7]] * 4
    calib = from_arrays(spec, np.array(rows)[:, :, None], np.ones((20, 2, 1)), seq=np.repeat([0, 1], 10))
    pf = History(lookahead=1, per_layer=2, calibrate_trace=calib)
    ev = from_arrays(spec, np.array([[4, 5], [4, 5], [0, 1]])[:, :, None], np.ones((3, 2, 1)), seq=[7, 7, 7])
    pf.setup(Context(ev, spec, (0, 1), 4, "per_layer"))
    # step 0: nothing seen yet -> calibration popularity (layer 1: experts 1 and 5, 6 tokens each; tie -> lower id)
    assert pf.predict(0, 0) == [(1, 1), (1, 5)]
    # step 1: the sequence so far used 4/5 -> closest is calibration sequence 1 -> its layer-1 experts 5, then 7
    assert pf.predict(2, 0) == [(1, 5), (1, 7)]
    assert pf.predict(3, 1) == [(0, 4), (0, 6)]  # its layer 0 for the next step's layer 0


# ---------------------------------------------------------------------------------------------- summary
def test_prefetch_metrics_are_in_summary_json(tmp_path):
    path = save_trace(cycle_trace(T=20), tmp_path / "cycle.moetrace.safetensors")
    cfg = compose("run", [f"trace={path}", f"out={tmp_path / 'run'}", "progress=false", "budget=6",
                          "prefetch=oracle", "hardware=h200"])
    out = run(cfg)
    s = json.loads((out.out_dir / "summary.json").read_text())
    for key in ("prefetch_precision", "prefetch_recall", "late_prefetches", "wasted_prefetches",
                "wasted_prefetch_bytes", "stall_free_rate", "stall_free_requests", "prefetch_used"):
        assert key in s, key
    assert s["strategy"] == "lru+oracle" and s["bound"] is True
    assert s["prefetch_precision"] == 1.0 and s["prefetch_loads"] == 20 * 3 - 1


def test_activation_match_ranks_every_later_expert_by_the_matched_counts_nearer_layers_first():
    """MoE-Infinity@5e096b4 expert_predictor.py: scores (count + 1e-8) x (1 - (m - l) / (L + 1)) over every expert of
    every later layer, best first, as one flat ranking; matched on the layers after l only. By hand (L = 3, 4
    experts, one past sequence: layer 1 {2: 3}, layer 2 {1: 3}): at layer 0, (1,2) scores 3 x 0.75 = 2.25, (2,1)
    3 x 0.5 = 1.5, then the zero-count experts by nearer layer (0.75e-8 before 0.5e-8) and lower id; at layer 1
    only layer 2, (2,1) first; at the last layer nothing. Position pos = step x L + layer."""
    spec = ModelSpec("toy4", layers=3, experts=4, top_k=1, hidden=8, ffn=8)
    calib = from_arrays(spec, np.array([[[0], [2], [1]], [[3], [2], [1]], [[0], [2], [1]]]), np.ones((3, 3, 1)))
    tr = from_arrays(spec, np.array([[[1], [0], [0]]]), np.ones((1, 3, 1)))
    p = ActivationMatch(calibrate_trace=calib)
    p.setup(Context(tr, spec, (0, 1, 2), 12, "global"))
    assert p.flat and p.predict(0, 0)[:2] == [(1, 2), (2, 1)]
    assert p.predict(0, 0)[2:] == [(1, 0), (1, 1), (1, 3), (2, 0), (2, 2), (2, 3)]  # count 0: nearer layer, lower id
    assert p.predict(1, 1) == [(2, 1), (2, 0), (2, 2), (2, 3)]
    assert p.predict(2, 2) == []
    assert p.table.shape[0] == 3  # one ranking per (past sequence, layer), not per position


def test_a_one_token_step_is_its_own_ranking():
    """ranked_rows (the oracle's table, and others'): where every step is one token naming distinct experts, the
    ranking of each step and layer is the row itself (the fast path) and equals the counted ranking, at every
    width; a step of several tokens, or a row naming an expert twice, takes the counted ranking."""
    from moesim.synthetic import PRESETS, generate
    from moesim.models import model_spec
    from strategies.prefetch_table import _ranked_chunks, _single_token_rows, ranked_rows

    cfg, model = PRESETS["gpt-oss-like"]
    decode = generate(dataclasses.replace(cfg, sequences=3, decode_tokens=(20, 30)), model_spec(model))
    for width in (None, 2, 4, 40):
        fast = _single_token_rows(decode, decode.experts, width)
        assert fast is not None
        assert np.array_equal(fast, _ranked_chunks(decode, decode.experts, width)), width
        assert np.array_equal(ranked_rows(decode, decode.experts, width), fast)
    twice = np.array(decode.experts)
    twice[5, 2, 1] = twice[5, 2, 0]  # token 5 names an expert of layer 2 twice: it ranks first, counted twice
    assert _single_token_rows(decode, twice, None) is None
    assert np.array_equal(ranked_rows(decode, twice, None), _ranked_chunks(decode, twice, None))
    bcfg, _ = PRESETS["gpt-oss-like-batch8"]
    batch = generate(dataclasses.replace(bcfg, sequences=8, decode_tokens=(8, 16), prompt_tokens=(4, 8)),
                     model_spec(model))
    assert _single_token_rows(batch, batch.experts, None) is None


def test_every_table_ends_each_ranking_at_its_first_minus_one():
    """The compiled loop stops reading a ranking at its first -1 (moesim/core/loop.py run_sim): every built-in
    table prefetcher's rankings are -1 only past their end, on a decode trace and on a batched one with
    prefill, with and without a per_layer cut."""
    from moesim.synthetic import PRESETS, generate
    from moesim.models import model_spec
    from strategies.whole_layer import WholeLayer

    spec = model_spec("gpt-oss-20b")
    decode = generate(dataclasses.replace(PRESETS["gpt-oss-like"][0], sequences=4, decode_tokens=(20, 40)), spec)
    batch = generate(dataclasses.replace(PRESETS["gpt-oss-like-batch8"][0], sequences=8, decode_tokens=(8, 16),
                                         prompt_tokens=(4, 8)), spec)
    for tr in (decode, batch):
        calib = tr.slice_tokens(0, tr.n_tokens // 3)
        for per_layer in (None, 3):
            for pf in (Oracle(lookahead=3, per_layer=per_layer), WholeLayer(lookahead=2, per_layer=per_layer),
                       Transition(lookahead=2, per_layer=per_layer, calibrate_trace=calib),
                       History(lookahead=2, per_layer=per_layer, calibrate_trace=calib),
                       ActivationMatch(per_layer=per_layer, calibrate_trace=calib)):
                pf.setup(Context(tr, spec, tuple(range(tr.n_layers)), 8 * tr.n_layers, "per_layer"))
                t = pf.table
                assert (t >= 0).any() and not ((t[..., 1:] >= 0) & (t[..., :-1] < 0)).any(), type(pf).__name__
