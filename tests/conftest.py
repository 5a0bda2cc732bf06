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


def fill_malloc_with_nan() -> None:
    """Leave freed malloc blocks of 16 B .. 2 KB full of NaN bytes, which malloc hands out again: compiled
    code (numba's np.empty) that reads memory before writing it then sees NaN (issue 17)."""
    import ctypes

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    sizes = [n for n in range(16, 2048, 8) for _ in range(4)]
    blocks = [libc.malloc(n) for n in sizes]
    for b, n in zip(blocks, sizes):
        ctypes.memset(b, 0xFF, n)  # every float64 a NaN, every int -1
    for b in reversed(blocks):
        libc.free(b)
