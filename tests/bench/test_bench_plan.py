"""The planner's speed: `python -m moesim plan model=gpt-oss-20b hardware=rtx-4090` over every deployable strategy
and 8 expert-cache sizes on the whole real gpt-oss-20b trace (issue 16's goal: under 60 s on the project's 2-core
machine), with the command's default of two replays at once (jobs=2). A minute-long benchmark, run with
--benchmark-enable:

    python -m pytest tests/bench/test_bench_plan.py --benchmark-enable -s
"""
from __future__ import annotations

import time

import pytest

GOAL_S = 60.0


@pytest.mark.parametrize("case", ["synthetic", "real"])
def test_bench_plan_every_strategy_eight_sizes(benchmark, case):
    if benchmark.disabled:
        pytest.skip("a minutes-long benchmark: run with --benchmark-enable")
    import moesim

    trace = moesim.load_trace("gpt-oss-20b" if case == "real" else "gpt-oss-like")  # real: plan's default
    t0 = time.perf_counter()
    p = benchmark.pedantic(lambda: moesim.plan(model="gpt-oss-20b", hardware="rtx-4090", trace=trace, sizes=8, jobs=2),
                           rounds=1, iterations=1)
    seconds = time.perf_counter() - t0
    replays = len(p.rows)
    benchmark.extra_info.update(seconds=seconds, replays=replays, sizes=len(p.sizes), goal_s=GOAL_S,
                                meets_goal=seconds <= GOAL_S, recommendation=p.recommendation["strategy"])
    print(f"\nplan ({case}): {replays} replays over {len(p.sizes)} sizes in {seconds:.1f} s "
          f"(goal {GOAL_S:.0f} s: {'met' if seconds <= GOAL_S else 'not met'}); "
          f"recommends {p.recommendation['strategy']}")
    assert len(p.sizes) >= 8 and p.recommendation is not None
