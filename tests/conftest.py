"""Fixtures shared by the tests: where the real traces are, and the whole gpt-oss-20b trace converted once.

    pytest -q

The real traces live beside the repository (../shared/traces, see its README.md); tests that need them
skip with a stated reason where they are absent. `real_trace` converts all 532 files the first time
(~20 s on one core) and caches the result under traces/cache/, so later runs open it at once.
"""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_TRACES = REPO.parent / "shared" / "traces" / "gpt-oss-20b"
TRACE_CACHE = REPO / "traces" / "cache"


def require_shared_traces() -> Path:
    """SHARED_TRACES, or skip the calling test where it is not present."""
    if not SHARED_TRACES.is_dir():
        pytest.skip("../shared/traces/gpt-oss-20b not present")
    return SHARED_TRACES


@pytest.fixture(scope="session")
def shared_traces() -> Path:
    return require_shared_traces()


@pytest.fixture(scope="session")
def real_trace(shared_traces):
    """The Trace of all 532 gpt-oss-20b files (decode only, one sequence per file), memory-mapped."""
    from moesim.importers import open_trace

    return open_trace(shared_traces, cache_dir=TRACE_CACHE)
