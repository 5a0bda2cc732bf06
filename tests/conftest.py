"""Fixtures shared by the tests: the real gpt-oss-20b trace shipped in traces/, and the original files it was
made from where they are present.

    pytest -q

`real_trace` is the shipped trace (traces/gpt-oss-20b.moetrace.safetensors.xz, unpacked once into
traces/cache/): every clone has it, so the tests that use it never skip. `shared_traces` is the folder of the
original JSON files (../shared/traces/gpt-oss-20b, beside the repository where the developers keep it); the
few tests that read those files (the importer's, against the shipped copy) skip with a stated reason where
it is absent, and `.ci/run` fails instead where it exists (MOESIM_REQUIRE_SHARED_TRACES).
"""
from __future__ import annotations

from pathlib import Path

import os

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_TRACES = REPO.parent / "shared" / "traces" / "gpt-oss-20b"
TRACE_CACHE = REPO / "traces" / "cache"


def require_shared_traces() -> Path:
    """SHARED_TRACES, or skip the calling test where it is not present."""
    if not SHARED_TRACES.is_dir():
        if os.environ.get("MOESIM_REQUIRE_SHARED_TRACES"):
            pytest.fail(f"MOESIM_REQUIRE_SHARED_TRACES is set but {SHARED_TRACES} is absent")
        pytest.skip("../shared/traces/gpt-oss-20b not present")
    return SHARED_TRACES


@pytest.fixture(scope="session")
def shared_traces() -> Path:
    return require_shared_traces()


@pytest.fixture(scope="session")
def real_trace():
    """The shipped Trace of 532 gpt-oss-20b files (decode only, one sequence per file), memory-mapped."""
    from moesim.importers import open_trace

    return open_trace("gpt-oss-20b", cache_dir=TRACE_CACHE)
