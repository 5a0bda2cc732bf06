"""`calibrate`'s host memory read measures memory, not a cache: a ratio of two reads on one thread.

    python -m pytest tests/bench/test_bench_calibrate.py -s                     # ceiling enforced, rates printed
    python -m pytest tests/bench/test_bench_calibrate.py --benchmark-enable     # + the default read's timing

ratio = GB/s of the default read (host_read_bytes(): 4x the last-level cache the OS reports) / GB/s of a read
twice as large. Were the default buffer held by a cache, the larger read (out of it) would be slower by the
cache's advantage, and the ratio well above 1; both in memory, it is near 1. Ceiling 1.5.
Measured on the project's 2-core VM on 2026-12-07 (32 MiB L3 reported): default 128 MiB at 27.3 GB/s, 256 MiB
at 26.2, ratio 1.04. The cache-resident read (512 KiB) is printed beside them: 52.7-76.9 GB/s there, so on that
host a cache read is only 2-3x a memory read (torch's one-thread sum runs near its compute limit). The test's earlier
form, cache-resident / default >= 3, held on the VM's former host (110 vs 14.6 GB/s, 480 MiB L3) but not on
this one: a floor on that ratio measured the CPU, not whether the buffer left the cache.
"""
from __future__ import annotations

import torch

from moesim.calibrate import host_memory_total, host_read_bytes, measure_host_memory

CACHED_BYTES = 512 * 1024
CEILING = 1.5


def test_default_host_read_is_out_of_cache(benchmark):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # calibrate's default on device=cpu; one thread also keeps other jobs' noise out
    try:
        larger_bytes = min(2 * host_read_bytes(), max(host_read_bytes(), host_memory_total() // 4))

        def three():
            return (measure_host_memory(CACHED_BYTES, repeats=20), measure_host_memory(host_read_bytes()),
                    measure_host_memory(larger_bytes, repeats=5))

        if benchmark.disabled:
            cached, default, larger = benchmark(three)
        else:
            cached, default, larger = three()
            benchmark.pedantic(measure_host_memory, args=(host_read_bytes(),), rounds=1)
    finally:
        torch.set_num_threads(before)
    ratio = default / larger
    benchmark.extra_info.update(cached_gbps=cached, default_gbps=default, larger_gbps=larger, ratio=ratio,
                                ceiling=CEILING)
    print(f"\nhost read: {CACHED_BYTES // 1024} KiB {cached:.1f} GB/s, default {host_read_bytes() / 2**20:.0f} MiB "
          f"{default:.1f} GB/s, {larger_bytes / 2**20:.0f} MiB {larger:.1f} GB/s, ratio {ratio:.2f} (ceiling {CEILING})")
    assert ratio <= CEILING, (f"the default host read ({default:.1f} GB/s) is {ratio:.2f}x one twice as large "
                              f"({larger:.1f} GB/s): a cache holds its buffer")
