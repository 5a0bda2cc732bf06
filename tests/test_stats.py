"""Tests of moesim/stats.py: hand-computed answers on tiny traces, a naive reference for the LRU stack
distance, the README's facts on the real gpt-oss-20b trace, and the `stats` command.

    pytest tests/test_stats.py -q
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from moesim.__main__ import main
from moesim.stats import format_table, hist_quantiles, trace_stats
from moesim.trace import PREFILL, ModelSpec, from_arrays, save_trace


def tiny_spec(layers: int, experts: int, top_k: int) -> ModelSpec:
    return ModelSpec("tiny", layers, experts, top_k, hidden=8, ffn=8)


def tiny_trace(rows, experts: int, step=None, seq=None, phase=None):
    """A trace from nested lists rows[t][l] = ids of token t at layer l; equal weights."""
    e = np.array(rows, dtype=np.int16)
    if e.ndim == 2:  # one layer given as [T, K]
        e = e[:, None, :]
    w = np.where(e >= 0, 1.0, 0.0) / np.maximum((e >= 0).sum(axis=2, keepdims=True), 1)
    return from_arrays(tiny_spec(e.shape[1], experts, e.shape[2]), e, w, step=step, seq=seq, phase=phase)


# ------------------------------------------------------------------------------------------ hand-made
def test_hottest_share_and_entropy_by_hand():
    tr = tiny_trace([[0, 1], [0, 2], [0, 3], [1, 2]], experts=4)
    layer = trace_stats(tr)["layers"][0]
    assert layer["hottest_expert"] == 0
    assert layer["hottest_share"] == pytest.approx(3 / 4)  # expert 0 in 3 of 4 tokens
    p = np.array([3, 2, 2, 1]) / 8  # ids per expert / all ids
    assert layer["entropy_bits"] == pytest.approx(float(-(p * np.log2(p)).sum()))
    assert layer["entropy_bits"] == pytest.approx(1.9056390622295665)


def test_uniform_reference_values():
    s = trace_stats(tiny_trace([[0, 1], [2, 3]], experts=4))
    assert s["uniform"] == {"hottest_share": 0.5, "entropy_bits": 2.0, "overlap_prev": 1.0}
    assert s["layers"][0]["entropy_bits"] == pytest.approx(2.0)  # every expert once: the maximum


def test_overlap_with_previous_token_of_the_same_sequence():
    rows = [[0, 1], [0, 2], [0, 3], [1, 2]]
    one_seq = trace_stats(tiny_trace(rows, experts=4))
    assert one_seq["layers"][0]["overlap_prev"] == pytest.approx((1 + 1 + 0) / 3)
    # two sequences decoded together, interleaved: pairs are (t0, t2) and (t1, t3), never (t0, t1)
    batched = trace_stats(tiny_trace(rows, experts=4, step=[0, 0, 1, 1], seq=[0, 1, 0, 1]))
    assert batched["layers"][0]["overlap_prev"] == pytest.approx((1 + 1) / 2)
    assert batched["sequences"] == 2 and batched["steps"] == 2 and batched["tokens_per_step"] == 2.0


def test_reuse_distance_by_hand_top1():
    # one layer, top-1, one token per step: 0 1 2 3 0 0 1 3 2
    tr = tiny_trace([[e] for e in [0, 1, 2, 3, 0, 0, 1, 3, 2]], experts=4)
    layer = trace_stats(tr)["layers"][0]
    # the second 0 saw {1,2,3} since its last request -> 3; then 0 again at once -> 0; 1 saw {2,3,0} -> 3;
    # 3 saw {0,1} -> 2; 2 saw {3,0,1} -> 3. The first requests of 0, 1, 2, 3 are cold.
    warm = [3, 0, 3, 2, 3]
    assert layer["cold_fraction"] == pytest.approx(4 / 9)
    assert layer["reuse_mean"] == pytest.approx(np.mean(warm))
    for q in (50, 90, 99):
        assert layer[f"reuse_p{q}"] == pytest.approx(np.percentile(warm, q))


def test_reuse_distance_treats_a_step_as_one_set_of_requests():
    # step 0: {0, 1}; step 1: tokens [1, 2], [2, 3] -> {1, 2, 3}; step 2: {0, 3}
    tr = tiny_trace([[0, 1], [1, 2], [2, 3], [0, 3]], experts=4, step=[0, 1, 1, 2], seq=[0, 0, 1, 0])
    layer = trace_stats(tr)["layers"][0]
    # step 1: 1 -> 0 (nothing in between), 2 and 3 cold; step 2: 0 -> 3 ({1, 2, 3} in step 1), 3 -> 0
    assert layer["cold_fraction"] == pytest.approx(4 / 7)
    assert layer["reuse_mean"] == pytest.approx(1.0)  # warm distances 0, 3, 0
    assert layer["reuse_p50"] == 0.0


def naive_reuse_distances(experts: np.ndarray, step: np.ndarray, layer: int) -> tuple[list[int], int]:
    """Reference: (warm distances, cold count) by scanning the request history directly."""
    history: list[set] = []
    last: dict[int, int] = {}
    warm, cold = [], 0
    for s in np.unique(step):
        req = {int(e) for e in experts[step == s, layer].ravel() if e >= 0}
        for e in sorted(req):
            if e not in last:
                cold += 1
            else:
                between = set().union(*history[last[e] + 1:]) - {e}
                warm.append(len(between))
        history.append(req)
        for e in req:
            last[e] = len(history) - 1
    return warm, cold


@pytest.mark.parametrize("seed", range(4))
def test_reuse_distance_matches_a_naive_reference(seed):
    rng = np.random.default_rng(seed)
    T, L, E, K = 60, 3, 9, 3
    experts = np.stack([[rng.choice(E, K, replace=False) for _ in range(L)] for _ in range(T)])
    experts[rng.random((T, L, K)) < 0.1] = -1  # some rows name fewer than K experts
    step = np.sort(rng.integers(0, 25, size=T))
    tr = from_arrays(tiny_spec(L, E, K), experts, np.full((T, L, K), 1 / K), step=step)
    stats = trace_stats(tr)
    for l in range(L):
        warm, cold = naive_reuse_distances(experts, step, l)
        row = stats["layers"][l]
        assert row["cold_fraction"] == pytest.approx(cold / (cold + len(warm)))
        assert row["reuse_mean"] == pytest.approx(np.mean(warm))
        for q in (50, 90, 99):
            assert row[f"reuse_p{q}"] == pytest.approx(np.percentile(warm, q))


@pytest.mark.parametrize("sample", [[0], [4, 4, 4], [0, 1, 2, 3, 10], [5, 0, 0, 7, 7, 7, 1]])
def test_hist_quantiles_equal_numpy_linear(sample):
    hist = np.bincount(sample, minlength=12)
    assert hist_quantiles(hist, (0, 25, 50, 90, 99, 100)) == pytest.approx(
        np.percentile(sample, [0, 25, 50, 90, 99, 100]))
    assert hist_quantiles(np.zeros(5, np.int64), (50,)) == [None]


def test_coactivation_perfectly_correlated_layers():
    # top-1; layer 1 is a fixed permutation of layer 0; layer 0 uniform over 4 experts
    perm = [2, 0, 3, 1]
    rows = [[[e], [perm[e]]] for e in [0, 1, 2, 3] * 5]
    layers = trace_stats(tiny_trace(rows, experts=4))["layers"]
    assert layers[0]["coact_mi_bits"] == pytest.approx(2.0)  # log2(4): layer 1 is known from layer 0
    assert layers[0]["coact_nmi"] == pytest.approx(1.0)
    assert layers[1]["coact_mi_bits"] is None  # the last layer has no next layer


def test_coactivation_independent_layers():
    # every (layer-0, layer-1) combination equally often: knowing one says nothing about the other
    rows = [[[a, b], [c, d]] for a, b in [(0, 1), (2, 3)] for c, d in [(0, 2), (1, 3), (0, 3)]] * 3
    layer = trace_stats(tiny_trace(rows, experts=4))["layers"][0]
    assert layer["coact_mi_bits"] == pytest.approx(0.0, abs=1e-12)
    assert layer["coact_nmi"] == pytest.approx(0.0, abs=1e-12)


def test_coactivation_partly_correlated_lies_between():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 8, size=4000)
    copy = rng.random(4000) < 0.5
    b = np.where(copy, a, rng.integers(0, 8, size=4000))
    layer = trace_stats(tiny_trace(np.stack([a, b], axis=1)[:, :, None], experts=8))["layers"][0]
    assert 0.2 < layer["coact_nmi"] < 0.8


def test_means_summarise_layers_and_phases_are_counted():
    tr = tiny_trace([[[0], [1]], [[0], [2]], [[1], [2]]], experts=4, step=[0, 0, 1], seq=[0, 0, 0],
                    phase=[PREFILL, PREFILL, 1])
    s = trace_stats(tr)
    assert s["prefill_tokens"] == 2 and s["decode_tokens"] == 1
    assert s["mean"]["hottest_share"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert s["mean"]["coact_mi_bits"] == pytest.approx(s["layers"][0]["coact_mi_bits"])  # only layer 0 has one


def test_table_has_a_row_per_layer_and_a_mean_row():
    tr = tiny_trace([[[0], [1]], [[0], [2]], [[1], [2]]], experts=4)
    lines = format_table(trace_stats(tr)).splitlines()
    rows = [ln.split() for ln in lines if ln.strip() and ln.split()[0] in {"0", "1", "mean"}]
    assert [r[0] for r in rows] == ["0", "1", "mean"]
    assert rows[0][1] == "0.667"  # layer 0: expert 0 in 2 of 3 tokens


# ---------------------------------------------------------------------------------------- real trace
def test_real_trace_agrees_with_the_readme(real_trace):
    """traces/README.md (and the source folder's): 155,103 tokens, 532 sequences; per layer the hottest expert takes 0.25-0.50
    of tokens; consecutive tokens share 0.75-2.33 experts per layer, 1.72 on average (two decimals)."""
    s = trace_stats(real_trace)
    assert s["tokens"] == 155_103 and s["sequences"] == 532 and s["steps"] == 155_103
    assert s["decode_tokens"] == 155_103
    hottest = [r["hottest_share"] for r in s["layers"]]
    overlap = [r["overlap_prev"] for r in s["layers"]]
    assert len(hottest) == 24
    assert 0.25 <= round(min(hottest), 2) and round(max(hottest), 2) <= 0.50
    assert round(min(overlap), 2) == 0.75 and round(max(overlap), 2) == 2.33
    assert round(s["mean"]["overlap_prev"], 2) == 1.72
    assert all(r["entropy_bits"] < math.log2(32) for r in s["layers"])
    # far above chance: routing of consecutive layers is strongly related
    assert s["mean"]["coact_nmi"] > 0.05


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_prints_json_of_a_preset(capsys):
    assert main(["stats", "trace=gpt-oss-like", "json=true"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"]["name"] == "gpt-oss-20b"
    assert len(out["layers"]) == 24 and out["tokens"] > 0
    assert set(out["mean"]) >= {"hottest_share", "entropy_bits", "overlap_prev", "reuse_p50", "coact_nmi"}


def test_cli_prints_a_table_of_a_trace_file(tmp_path, capsys):
    path = save_trace(tiny_trace([[[0], [1]], [[0], [2]], [[1], [2]]], experts=4), tmp_path / "t.moetrace.safetensors")
    assert main(["stats", f"trace={path}"]) == 0
    out = capsys.readouterr().out
    assert "3 tokens" in out and "\n mean" in out


def test_cli_unknown_trace_is_a_one_line_error(capsys):
    assert main(["stats", "trace=no-such-preset"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moesim: error:") and "no-such-preset" in err
