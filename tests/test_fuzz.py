"""Hostile input: mutated trace files and importer inputs are either read or refused with moesim's own error,
never a traceback, within a memory cap (issue 17). The cases run in a subprocess under RLIMIT_AS
(tests/fuzz_worker.py).

    python -m pytest tests/test_fuzz.py -q            # 1,000 trace cases and 300 importer cases
    python -m pytest tests/test_fuzz.py -q -m slow    # 10,000 and 1,000
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("fuzz_worker.py")


def fuzz(kind: str, n: int, seed: int, tmp_path) -> dict:
    r = subprocess.run([sys.executable, str(WORKER), kind, str(n), str(seed), str(tmp_path)], capture_output=True,
                       text=True, timeout=3000)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["n_failures"] == 0, json.dumps(out["failures"], indent=1)
    assert out["cases"] == n and out["refused"] > n // 10  # the mutations do bite
    return out


@pytest.mark.parametrize("kind, n", [("traces", 1000), ("importers", 300)])
def test_fuzz_subset(kind, n, tmp_path):
    fuzz(kind, n, 17, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("kind, n", [("traces", 10_000), ("importers", 1000)])
def test_fuzz_full(kind, n, tmp_path):
    fuzz(kind, n, 2026, tmp_path)
