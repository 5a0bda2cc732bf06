"""Recording overhead: greedy generate() with the recorder's hooks against the same generate() without,
on one tiny model in the same run. Goal: at most 10% slower.

    pytest tests/bench/test_bench_record.py --benchmark-enable

Without --benchmark-enable (the plain test suite) it only checks that recording runs. The plain and
recorded runs alternate, ROUNDS times, and the best of each is compared, so load from
other processes on the machine hits both alike. A tiny model is the worst case: its forward pass is as
cheap as Python allows, so per-step hook costs weigh most.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import time

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from moesim.record import ADAPTERS, RouterHooks, record_batch  # noqa: E402

ROUNDS = 7
PROMPT = [list(range(1, 33))]  # one prompt of 32 tokens
NEW_TOKENS = 48
LIMIT = 1.10  # recorded / plain


def tiny_mixtral():
    config = transformers.AutoConfig.for_model(
        "mixtral", vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, intermediate_size=64, num_local_experts=8,
        num_experts_per_tok=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = None  # always NEW_TOKENS forward passes
    return model


@pytest.mark.parametrize("predict", [True, False], ids=["predict", "no-predict"])
def test_recording_overhead(benchmark, predict):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = tiny_mixtral()
        ids = torch.tensor(PROMPT)

        def plain():
            with torch.no_grad():
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                               do_sample=False, pad_token_id=0)

        def recorded():  # hooks installed, generate, routing converted to numpy, hooks removed
            with RouterHooks(model, ADAPTERS["mixtral"], predict) as hooks:
                part = record_batch(model, hooks, PROMPT, NEW_TOKENS, pad_token_id=0)
            assert len(part["experts"]) == len(PROMPT[0]) + NEW_TOKENS - 1
            return part

        if benchmark.disabled:  # the plain test suite: only check that recording runs
            benchmark(recorded)
            pytest.skip("the overhead is timed with --benchmark-enable (tox -e bench)")
        plain(), recorded()  # warm-up
        best_plain = best_recorded = float("inf")
        for _ in range(ROUNDS):
            t = time.perf_counter()
            plain()
            best_plain = min(best_plain, time.perf_counter() - t)
            t = time.perf_counter()
            recorded()
            best_recorded = min(best_recorded, time.perf_counter() - t)
        ratio = best_recorded / best_plain
        benchmark.extra_info.update(plain_s=best_plain, recorded_s=best_recorded, ratio=ratio)
        benchmark.pedantic(recorded, rounds=3, iterations=1)
        print(f"\nrecord overhead (predict={predict}): plain {best_plain * 1e3:.1f} ms, "
              f"recorded {best_recorded * 1e3:.1f} ms, ratio {ratio:.3f}")
        assert ratio <= LIMIT, (
            f"recording made generate() {100 * (ratio - 1):.1f}% slower (plain {best_plain * 1e3:.1f} ms, "
            f"recorded {best_recorded * 1e3:.1f} ms for {NEW_TOKENS} tokens, predict={predict}); "
            f"the goal is at most {100 * (LIMIT - 1):.0f}%")
    finally:
        torch.set_num_threads(threads)
