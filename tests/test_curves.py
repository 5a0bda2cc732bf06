"""Hit-ratio curves (moesim/curves.py): one pass equals a replay at every budget.

    python -m pytest tests/test_curves.py -q
"""
from __future__ import annotations

import numpy as np
import pytest
from test_core import random_trace, reference_counters

from moesim import core, curves
from moesim.errors import MoesimError
from moesim.trace import ModelSpec, from_arrays


def per_budget_hits(trace, policy, scope, budgets, reset=False):
    L = trace.n_layers
    return [core.hit_counts(trace, policy, {}, int(b) * (L if scope == "per_layer" else 1), scope, reset)["hits"]
            for b in budgets]


def distinct_keys(trace) -> int:
    req = core.encode(trace)
    layer = np.repeat(np.arange(len(req.ptr) - 1) % trace.n_layers, np.diff(req.ptr))
    return len(np.unique(layer * trace.spec.experts + req.ids))


def test_lru_with_set_requests_is_not_a_stack_algorithm():
    """Why LRU needs more than stack distances: with hits-first order inside a request, expert 2 is resident
    with 4 slots but not with 5 when the last request comes, so it hits at 4 and misses at 5."""
    rows = [[4, 2, 0], [1, 3, 4], [2, 4, 3], [0, 5, 1], [5, 2, 1]]
    spec = ModelSpec("one-layer", 1, 6, 3, 8, 8)
    experts = np.array(rows, np.int16)[:, None, :]
    trace = from_arrays(spec, experts, np.ones_like(experts, np.float16))
    head = trace.slice_tokens(0, 4)

    def last_step_hits(slots):
        return (reference_counters(trace, "lru", {}, slots, "per_layer", False)["hits"]
                - reference_counters(head, "lru", {}, slots, "per_layer", False)["hits"])

    assert last_step_hits(4) == 3 and last_step_hits(5) == 2  # {5, 2, 1} at 4 slots; {5, 1} at 5 slots
    # the one-pass curve still gets every budget right
    df = curves.hit_ratio_curve(trace, "lru")
    assert df.hits.tolist() == per_budget_hits(trace, "lru", "per_layer", df.slots_per_layer)


@pytest.mark.parametrize("policy", ["lru", "belady"])
@pytest.mark.parametrize("scope", ["per_layer", "global"])
def test_one_pass_equals_every_budget_on_random_traces(policy, scope):
    for seed in range(6):
        trace = random_trace(20 + seed, T=250, L=3, E=10, K=3 if seed % 2 else 4, max_batch=1 + seed % 3,
                             skew=0.6 + 0.2 * seed)
        for reset in (False, True):
            df = curves.hit_ratio_curve(trace, policy, scope, reset_per_seq=reset)
            budgets = df.slots_per_layer if scope == "per_layer" else df.slots
            assert df.hits.tolist() == per_budget_hits(trace, policy, scope, budgets, reset), (seed, reset)
            assert df.slots.iloc[-1] == trace.n_layers * trace.spec.experts  # up to every expert
            if not reset:  # with every expert resident, only first requests miss
                assert df.hits.iloc[-1] == df.requests.iloc[0] - distinct_keys(trace)


def test_curve_equals_the_reference_engine():
    trace = random_trace(7, T=200, L=2, E=8, K=2, max_batch=3)
    for policy in ("lru", "belady", "fifo", "lfu"):
        df = curves.hit_ratio_curve(trace, policy, "per_layer")
        for row in df.itertuples():
            assert row.hits == reference_counters(trace, policy, {}, row.slots, "per_layer", False)["hits"]


def test_belady_curve_is_monotone_and_above_lru():
    trace = random_trace(3, T=400, L=2, E=12, K=4, max_batch=2)
    b = curves.hit_ratio_curve(trace, "belady").hits.to_numpy()
    lru = curves.hit_ratio_curve(trace, "lru").hits.to_numpy()
    assert (np.diff(b) >= 0).all() and (b >= lru).all()


def test_budgets_below_the_largest_request_are_replayed_in_waves():
    trace = random_trace(2, max_batch=4, p_missing=0.0)
    assert core.encode(trace).width > trace.top_k + 2
    for policy in ("lru", "belady"):
        df = curves.hit_ratio_curve(trace, policy)
        assert df.slots_per_layer.iloc[0] == trace.top_k
        assert df.hits.tolist() == per_budget_hits(trace, policy, "per_layer", df.slots_per_layer)
    with pytest.raises(MoesimError, match="less than top-k"):
        curves.hit_ratio_curve(trace, "lru", budgets=[trace.top_k - 1])


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["lru", "belady"])
def test_real_trace_every_budget(real_trace, policy):
    """All 532 gpt-oss-20b files: the one-pass curve against a compiled replay at every budget per layer
    (4..32 slots), and in global scope at every budget (4..768 slots) of the first 1000 tokens."""
    df = curves.hit_ratio_curve(real_trace, policy, "per_layer")
    assert df.slots_per_layer.tolist() == list(range(4, 33))
    assert df.hits.tolist() == per_budget_hits(real_trace, policy, "per_layer", df.slots_per_layer)
    head = real_trace.slice_tokens(0, 1000)
    df = curves.hit_ratio_curve(head, policy, "global")
    assert df.slots.tolist() == list(range(4, 769))
    assert df.hits.tolist() == per_budget_hits(head, policy, "global", df.slots)
