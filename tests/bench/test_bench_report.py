"""Building a 30-cell sweep's comparison report: goal under 10 s on the project's machines.

    pytest tests/bench/test_bench_report.py --benchmark-enable

The 30 cells are real runs (6 strategies x 5 budgets) of a tiny synthetic trace, swept once per session;
the benchmark times `python -m moesim report ROOT`'s work: reading the 30 results directories, the table,
three figures, the HTML. The figure is recorded, not asserted (a timed assert fails on a busy machine for
reasons that are not the code's); without --benchmark-enable the build runs once and its result is checked.
"""
import dataclasses
import re

import numpy as np
import pytest

from moesim.report import build_report
from moesim.sweep import sweep
from moesim.trace import MODEL_SPECS, from_arrays, save_trace

STRATEGIES = "lru,lfu,fifo,lfru,static,belady"
BUDGETS = "12.5%,25%,37.5%,50%,75%"


@pytest.fixture(scope="module")
def sweep_root(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench-report")
    spec = dataclasses.replace(MODEL_SPECS["gpt-oss-20b"], name="tiny-moe", layers=4, experts=16, top_k=2)
    rng = np.random.default_rng(5)
    p = 1.0 / np.arange(1, 17)
    p /= p.sum()
    e = np.array([[rng.choice(16, 2, replace=False, p=p) for _ in range(4)] for _ in range(200)])
    trace = save_trace(from_arrays(spec, e, np.full(e.shape, 0.5), seq=np.repeat([0, 1], 100)),
                       tmp / "tiny.moetrace.safetensors")
    done = sweep([f"trace={trace}", f"out={tmp / 'sweep'}", "progress=false", "report=false",
                  f"strategy={STRATEGIES}", f"budget={BUDGETS}"])
    assert len(done["cells"]) == 30
    return done["root"]


def test_bench_comparison_report_of_30_cells(benchmark, sweep_root):
    benchmark.extra_info["cells"] = 30
    path = benchmark.pedantic(build_report, args=([sweep_root],), rounds=3, iterations=1)
    html = path.read_text()
    assert path == sweep_root / "report.html"
    assert len(re.findall(r"<tr class=\"", html)) == 30 and html.count("<img ") == 3
    assert html.count("belady (bound)") >= 5  # named per budget in the lead sentence
