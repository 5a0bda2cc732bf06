"""The disk tier (moesim/disk.py): storage presets, the host cache's decisions and the disk's timeline on hand-made
traces, the issue's comparison of LRU and Belady on both tiers, and the errors a user can make.

    python -m pytest tests/test_disk.py -q
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from moesim.backends.sim import SimBackend
from moesim.disk import READ_EFFICIENCY, STORAGE, DiskTier, Storage, load_storage
from moesim.engine import drive
from moesim.errors import MoesimError
from moesim.profiler import Profiler
from moesim.trace import ModelSpec, from_arrays
from strategies.belady import Belady
from strategies.lru import LRU

SPEC = ModelSpec("toy4", layers=2, experts=4, top_k=2, hidden=64, ffn=64, bits_per_weight=16)
DISK = Storage("slow", read_gbps=0.001, latency_us=100.0)  # 1 MB/s: a read is far longer than a copy


def trace_of(rows):
    """rows[t][l]: the two experts token t routes to at layer l (one token per step)."""
    e = np.asarray(rows, dtype=np.int64)
    spec = dataclasses.replace(SPEC, layers=e.shape[1])
    return from_arrays(spec, e, np.full(e.shape, 0.5), seq=np.zeros(len(rows), dtype=np.int64))


def run(rows, device_slots, host_slots, host_policy=LRU, offload=None):
    tr = trace_of(rows)
    disk = DiskTier(tr.spec, host_slots, host_policy, DISK, tr)
    backend = SimBackend("rtx-4090")
    _, profiler, counters = drive(tr, tr.spec, device_slots, "global", LRU, backend, offload=offload, disk=disk)
    return disk, backend, profiler, counters


def test_presets_are_the_stated_rates_times_the_rule():
    stated = {"sata-ssd": 560, "nvme-pcie3": 3500, "nvme-pcie4": 7450, "nvme-pcie5": 12400}  # MB/s, in disk.py
    assert set(STORAGE) == set(stated)
    for name, mbps in stated.items():
        s = STORAGE[name]
        assert s.read_gbps == pytest.approx(mbps / 1e3 * READ_EFFICIENCY, abs=0.01)
        assert s.source and "stated" in s.source
        nbytes = 13 * 2**20
        assert s.read_ms(nbytes) == pytest.approx(s.latency_us / 1e3 + nbytes / (s.read_gbps * 1e9) * 1e3)
    assert STORAGE["sata-ssd"].read_ms(2**20) > STORAGE["nvme-pcie5"].read_ms(2**20)


def test_load_storage_takes_a_preset_or_a_mapping_and_names_what_is_wrong():
    assert load_storage("nvme-pcie4") is STORAGE["nvme-pcie4"]
    s = load_storage({"read_gbps": 2, "latency_us": 80})
    assert (s.read_gbps, s.latency_us) == (2.0, 80.0)
    with pytest.raises(MoesimError, match="disk.storage='nvme9': unknown; presets: sata-ssd"):
        load_storage("nvme9")
    with pytest.raises(MoesimError, match=r"disk.storage.read_gbps=0: expected a number > 0"):
        load_storage({"read_gbps": 0, "latency_us": 1})
    with pytest.raises(MoesimError, match="unknown field.*speed"):
        load_storage({"read_gbps": 1, "latency_us": 1, "speed": 3})


def test_host_cache_decides_which_misses_read_from_disk():
    # 2 layers, top-2, device: 4 slots in one pool (LRU), host: 4 slots (LRU).
    # t0: L0 {0,1}, L1 {0,1}: 4 device misses, 4 host misses (cold) -> 4 reads; both hold 00 01 10 11
    # t1: L0 {2,3}: device misses, evicting its LRU 00, 01; host misses (it sees only device misses) -> 2 reads,
    #     evicting its LRU 00, 01; L1 {0,1} = 10, 11: device hits, the host is not asked
    # t2: L0 {0,1}: device misses; host misses (evicted at t1) -> 2 reads
    rows = [[[0, 1], [0, 1]], [[2, 3], [0, 1]], [[0, 1], [0, 1]]]
    disk, backend, profiler, counters = run(rows, device_slots=4, host_slots=4)
    assert counters.loads == 8  # 4 + 2 + 2 device misses
    assert disk.host.counters.requests == 8 and disk.host.counters.hits == 0
    assert disk.reads == backend.disk_reads == 8
    # a host large enough for every expert reads each once: the t2 misses hit in host memory
    disk, backend, _, counters = run(rows, device_slots=4, host_slots=8)
    assert counters.loads == 8 and disk.reads == 6 and disk.host.counters.hits == 2


def test_a_copy_waits_for_its_read_and_reads_queue_on_the_disk():
    rows = [[[0, 1], [2, 3]]]
    disk, backend, profiler, _ = run(rows, device_slots=4, host_slots=4)
    read = DISK.read_ms(SPEC.bytes_per_expert)
    copies = profiler.arrays()[1]  # rows: layer, expert, bytes, start, end, prefetch (moesim/profiler.py)
    starts = copies[:, 3]
    # layer 0 is issued at 0: reads end at read, 2 read; each copy starts at its read's end (the copy engine is
    # idle: a copy is far shorter than a read)
    assert starts[0] == pytest.approx(read) and starts[1] == pytest.approx(2 * read)
    # layer 1's misses are found after layer 0 computed (after 2 reads): their reads queue behind nothing
    computes = profiler.arrays()[2]
    l0_end = computes[0, 2]
    assert starts[2] == pytest.approx(l0_end + read) and starts[3] == pytest.approx(l0_end + 2 * read)
    assert backend.disk_busy_ms == pytest.approx(4 * read)


def test_queue_depth_overlaps_latencies_not_transfers():
    """Three reads issued at once, latency 1 ms, transfer 0.5 ms. Queue depth 1: one after another (1.5, 3.0,
    4.5). Queue depth 2: the second read's latency overlaps the first (it transfers once the first has: 2.0);
    the third is submitted when the first ends (1.5) and transfers after its latency (2.5 to 3.0). The disk's
    busy time is the union of its reads: 4.5 and 3.0 ms. The compiled core's clock keeps the same queue."""
    from moesim.core.clock import DISK_BUSY, DISK_FREE, new_clock
    from moesim.core.clock import disk_read
    from moesim.disk import disk_queue

    nbytes = SPEC.bytes_per_expert
    for q, ends in ((1, [1.5, 3.0, 4.5]), (2, [1.5, 2.0, 3.0])):
        storage = Storage("t", read_gbps=nbytes / 5e5, latency_us=1000.0, queue_depth=q)  # 0.5 ms + 1 ms a read
        backend = SimBackend("rtx-4090")
        backend.setup(SPEC, 4, Profiler(SPEC.layers))
        backend.setup_disk(storage)
        for key in range(3):
            backend.read(key)
        assert [backend._host_ready[k] for k in range(3)] == pytest.approx(ends)
        assert backend.disk_busy_ms == pytest.approx(ends[-1])
        ck, dq = new_clock(), disk_queue(storage, nbytes)
        assert [disk_read(ck, dq) for _ in range(3)] == pytest.approx(ends)
        assert ck[DISK_FREE] == pytest.approx(ends[-1]) and ck[DISK_BUSY] == pytest.approx(ends[-1])
    assert load_storage({"read_gbps": 1, "latency_us": 1, "queue_depth": 8}).queue_depth == 8
    with pytest.raises(MoesimError, match="disk.storage.queue_depth=0: expected a whole number"):
        load_storage({"read_gbps": 1, "latency_us": 1, "queue_depth": 0})
    assert load_storage({"read_gbps": 1, "latency_us": 1, "request_bytes": 8192}).request_bytes == 8192
    with pytest.raises(MoesimError, match="disk.storage.request_bytes=-1: expected a whole number of bytes"):
        load_storage({"read_gbps": 1, "latency_us": 1, "request_bytes": -1})


def test_an_expert_read_in_read_around_windows():
    """request_bytes r: an expert of 2.5 r is read as three requests (r, r, r/2), each paying the latency. Latency
    1 ms, a window transfers in 0.5 ms: queue depth 1 ends at 1.5, 3.0, 4.25; queue depth 2 overlaps the second
    latency (1.5, 2.0) and submits the third when the first ends (1.5 + 1 = 2.5, + 0.25 = 2.75). The sim backend
    and the compiled clock agree."""
    from moesim.core.clock import DISK_BUSY, new_clock
    from moesim.core.clock import disk_read
    from moesim.disk import disk_queue

    nbytes = SPEC.bytes_per_expert
    r = nbytes * 2 // 5  # nbytes = 2.5 r, within a byte (hence rel=1e-3 below)
    for q, end in ((1, 4.25), (2, 2.75)):
        storage = Storage("t", read_gbps=r / 5e5, latency_us=1000.0, queue_depth=q, request_bytes=r)
        assert storage.requests(nbytes) == pytest.approx((3, 1.5, 1.25), rel=1e-3)
        backend = SimBackend("rtx-4090")
        backend.setup(SPEC, 4, Profiler(SPEC.layers))
        backend.setup_disk(storage)
        backend.read(0)
        assert backend._host_ready[0] == pytest.approx(end, rel=1e-3)
        assert backend.disk_busy_ms == pytest.approx(end, rel=1e-3)
        ck = new_clock()
        assert disk_read(ck, disk_queue(storage, nbytes)) == backend._host_ready[0]
        assert ck[DISK_BUSY] == pytest.approx(backend.disk_busy_ms)
    assert dataclasses.replace(DISK, request_bytes=nbytes).requests(nbytes) == (1, DISK.read_ms(nbytes),
                                                                               DISK.read_ms(nbytes))


def test_read_size_defaults_to_the_kernels_read_around_under_page_cache():
    """disk.read_size=auto: 128 KiB requests for disk.policy=page_cache (a mapped file read by faults), one request
    per expert otherwise; a size must be whole 4 KiB pages. The run's summary says how an expert was read."""
    from moesim.api import simulate
    from moesim.disk import READ_AROUND, request_bytes

    assert READ_AROUND == 128 * 1024
    assert request_bytes("auto", "page_cache", 10 << 20) == READ_AROUND and request_bytes("auto", "lru", 1) == 0
    assert request_bytes("expert", "page_cache", 1) == 0 and request_bytes("1MiB", "lru", 1) == 1 << 20
    for bad in ("1000", "0", "fast", -4096):
        with pytest.raises(MoesimError, match="disk.read_size=.*expected auto, expert, or a size in whole 4 KiB"):
            request_bytes(bad, "lru", 1)
    runs = {policy: simulate("gpt-oss-like", "lru", tokens=400, disk={"storage": "nvme-pcie4", "ram": "25%",
                                                                      "policy": policy}).summary["disk"]
            for policy in ("lru", "page_cache")}
    from moesim.api import load_trace

    nbytes = load_trace("gpt-oss-like").spec.bytes_per_expert
    assert runs["lru"]["requests_per_read"] == 1 and runs["lru"]["storage"]["request_bytes"] == 0
    assert runs["page_cache"]["requests_per_read"] == -(-nbytes // READ_AROUND)
    # the same drive read in windows: each pays the latency, so an expert takes longer
    assert runs["page_cache"]["read_ms"] > runs["lru"]["read_ms"]


def test_a_storage_profile_given_inline_to_the_library():
    """disk={"storage": {...}} (run.yaml's storage is null): the mapping is the profile, not keys under it."""
    from moesim.api import simulate

    s = simulate("gpt-oss-like", "lru", tokens=600, disk={"storage": {"read_gbps": 2.0, "latency_us": 50.0,
                                                                     "queue_depth": 2}, "ram": "25%"}).summary
    assert s["disk"]["storage"]["queue_depth"] == 2 and s["disk"]["storage"]["read_gbps"] == 2.0


def test_host_compute_waits_for_its_read():
    from strategies.host import Host

    rows = [[[0, 1], [2, 3]]]
    offload = Host(share=1.0)  # every miss computed on the host
    disk, backend, profiler, counters = run(rows, device_slots=4, host_slots=4, offload=offload)
    assert counters.host_computes == 4 and counters.loads == 0 and disk.reads == 4
    read = DISK.read_ms(SPEC.bytes_per_expert)
    computes = profiler.arrays()[2]
    host0 = computes[computes[:, 4] == 1][0]  # layer 0's host part starts when its second read ends
    assert host0[1] == pytest.approx(2 * read)


def test_belady_on_both_tiers_beats_lru_on_a_model_four_times_the_host(tmp_path):
    """The issue's comparison on the sim: the host holds a quarter of the experts; LRU and Belady on both tiers.
    Belady on both reads less from disk and runs faster."""
    from moesim.api import compose_run, load_trace, replay_config

    tr = load_trace("gpt-oss-like")
    out = {}
    for policy in ("lru", "belady"):
        cfg = compose_run("gpt-oss-like", policy, "15%", "rtx-4090",
                          overrides=["disk.storage=nvme-pcie4", "disk.ram=25%", f"disk.policy={policy}",
                                     "tokens=3000"])
        s = replay_config(cfg, tr).summary
        d = s["disk"]
        assert d["host_slots"] == round(tr.spec.total_experts * 0.25)
        assert d["host_requests"] == s["loads"]  # every device miss asks the host cache once
        assert d["bytes_disk"] == d["disk_reads"] * tr.spec.bytes_per_expert
        out[policy] = (d["host_hit_rate"], d["disk_mib_per_token"], s["tokens_per_s"])
    (lru_hit, lru_mib, lru_tps), (b_hit, b_mib, b_tps) = out["lru"], out["belady"]
    assert b_hit > lru_hit and b_mib < lru_mib and b_tps > lru_tps
    print(json.dumps(out))


@pytest.mark.parametrize("override, words", [
    ("disk.storage=nvme9", "disk.storage='nvme9': unknown; presets: sata-ssd"),
    ("disk.ram=1", "disk.ram: budget='1' gives 1 slots, but one layer needs top-k = 4"),
    ("disk.policy=lruu", "disk.policy='lruu': expected one of"),
    ("backend=torch backend.disk_dir=/nonexistent/dir", "backend.disk_dir='/nonexistent/dir': cannot write the "
                                                         "experts' file there"),
])
def test_mistakes_are_one_clear_line(capsys, tmp_path, override, words):
    from moesim.__main__ import main

    args = ["run", "trace=gpt-oss-like", "tokens=200", "disk.storage=nvme-pcie4", *override.split(),
            f"out={tmp_path / 'r'}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # nothing written


def test_run_prints_and_reports_the_disk_tier(capsys, tmp_path):
    from moesim.__main__ import main

    out = tmp_path / "r"
    assert main(["run", "trace=gpt-oss-like", "tokens=300", "budget=15%", "disk.storage=sata-ssd", "disk.ram=30%",
                 f"out={out}"]) == 0
    text = capsys.readouterr().out
    assert "host hit rate" in text and "bytes disk->host" in text and "sata-ssd" in text
    s = json.loads((out / "summary.json").read_text())
    assert s["disk"]["storage"]["name"] == "sata-ssd" and s["disk"]["disk_reads"] > 0
    html = (out / "report.html").read_text()
    assert "host hit rate" in html and "bytes disk-&gt;host" in html


@pytest.mark.parametrize("worker,read_size", [("false", "expert"), ("true", "8KiB")])
def test_torch_reads_from_disk_the_bytes_the_sim_counts(tmp_path, worker, read_size):
    """The torch backend writes the experts to a file and reads each host miss from it (O_DIRECT where the file
    system takes it): for the same decisions its reads and bytes equal the sim's, and the file is gone after.
    With the copy worker a read into a host slot first waits for the copy still reading it. With disk.read_size
    each expert is read in requests of that size, as many as the sim counts."""
    pytest.importorskip("torch")
    from moesim.api import compose_run, load_trace, replay_config

    tr = load_trace("gpt-oss-like")
    got = {}
    for backend in ("sim", "torch"):
        cfg = compose_run("gpt-oss-like", "lru", "15%", "rtx-4090", backend=backend, overrides=[
            "tokens=12", "model.scale=0.05", "disk.storage=nvme-pcie4", "disk.ram=20%", "disk.policy=lru",
            f"disk.read_size={read_size}",
            *([f"backend.disk_dir={tmp_path}", "backend.device=cpu", f"backend.copy_worker={worker}"]
              if backend == "torch" else [])])
        got[backend] = replay_config(cfg, tr).summary["disk"]
    sim, real = got["sim"], got["torch"]
    for k in ("host_requests", "host_hits", "disk_reads", "bytes_disk", "unkept_reads"):
        assert sim[k] == real[k], k
    m = real["measured"]
    assert m["reads"] == real["disk_reads"] > 0 and m["bytes"] == real["bytes_disk"] and m["gbps"] > 0
    assert m["io"] == "O_DIRECT" or m["io"].startswith("buffered")
    assert m["requests"] == m["reads"] * real["requests_per_read"] and sim["requests_per_read"] == real["requests_per_read"]
    assert (real["requests_per_read"] > 1) == (read_size != "expert")
    assert list(tmp_path.iterdir()) == []  # the experts' file was deleted


def test_calibrate_measures_a_disk_into_a_profile_runs_read(tmp_path, capsys):
    """`calibrate disk=FOLDER` reads a test file there as the disk tier reads (O_DIRECT where it runs), fits
    latency + bytes / rate, and writes a storage profile that disk.storage=FILE takes; the test file is gone."""
    from moesim.__main__ import main
    from moesim.disk import measure_storage, save_storage

    s, points = measure_storage(tmp_path, sizes=(4096, 1 << 20), total=32 << 20, repeats=4)
    assert s.read_gbps > 0 and s.latency_us >= 0 and [b for b, _ in points] == [4096, 1 << 20]
    assert all(ms > 0 for _, ms in points) and list(tmp_path.iterdir()) == []
    path = save_storage(s, tmp_path / "mine.yaml")
    assert load_storage(str(path)) == s
    out = tmp_path / "r"
    assert main(["run", "trace=gpt-oss-like", "tokens=100", "budget=15%", f"disk.storage={path}",
                 f"out={out}"]) == 0
    assert json.loads((out / "summary.json").read_text())["disk"]["storage"]["read_gbps"] == s.read_gbps
    capsys.readouterr()
    assert main(["run", "trace=gpt-oss-like", "tokens=100", f"disk.storage={tmp_path / 'none.yaml'}"]) == 2
    assert "disk.storage: no such file" in capsys.readouterr().err
    with pytest.raises(MoesimError, match="not a folder"):
        measure_storage(tmp_path / "nope")


def test_page_cache_follows_the_kernels_two_lists():
    """strategies/page_cache.py by hand (ratio 1): faults enter the inactive list, a second access promotes,
    reclaim takes the oldest inactive after demoting while inactive * ratio < active, and a refault within the
    active list's size is activated at once."""
    from types import SimpleNamespace

    from strategies.page_cache import PageCache, inactive_ratio

    assert inactive_ratio(8, 2**29) == 6 and inactive_ratio(1, 2**29) == 1  # 4 GiB: int_sqrt(40); under 1 GiB
    assert inactive_ratio(100, 2**30) == 31  # mm/vmscan.c's table: 100GB -> 31
    a, b, c, d, e = ((0, i) for i in range(5))
    pc = PageCache()
    pc.setup(SimpleNamespace(capacity=4, spec=SPEC))
    for k in (a, b, c, d):
        pc.on_insert(0, k, False)
    pc.on_access(1, [a, b])  # second accesses: promoted, each an activation
    assert list(pc.inactive) == [c, d] and list(pc.active) == [a, b] and pc.age == 2
    everyone = {a, b, c, d, e}
    assert pc.victim(everyone) == c  # 2 * 1 < 2 is false: no demotion
    pc.on_evict(c)
    assert pc.shadow[c] == 2 and pc.age == 3
    pc.on_insert(2, e, False)
    assert pc.victim(everyone) == d
    pc.on_evict(d)
    pc.on_insert(3, c, False)  # refault distance 4 - 2 = 2 <= 2 active: activated
    assert list(pc.active) == [a, b, c] and list(pc.inactive) == [e] and pc.age == 5
    assert pc.victim(everyone) == e and list(pc.inactive) == [e, a]  # 1 * 1 < 3: a demoted first
    pc.on_evict(e)
    assert pc.victim({b, c}) == b and list(pc.inactive) == [a, b]  # 1 < 2: b demoted; a is pinned


def test_page_cache_compiled_equals_the_reference_with_a_large_ratio():
    """At 8 slots of 384 MiB experts (3 GiB: ratio int_sqrt(30) = 5) the compiled page_cache makes the reference's
    decisions, as the host cache of the disk tier and as a device cache."""
    from moesim import core
    from moesim.engine import hit_counts

    rng = np.random.default_rng(7)
    spec = dataclasses.replace(SPEC, experts=16, hidden=8192, ffn=8192)
    rows = np.stack([np.stack([rng.choice(16, 2, replace=False, p=np.r_[np.full(4, 0.15), np.full(12, 0.4 / 12)])
                               for _ in range(2)]) for _ in range(400)])
    tr = from_arrays(spec, rows, np.full(rows.shape, 0.5), seq=np.zeros(len(rows), dtype=np.int64))
    from strategies.page_cache import PageCache, inactive_ratio

    assert inactive_ratio(8, spec.bytes_per_expert) == 5
    want = hit_counts(tr, PageCache, 8, "global").to_dict()
    assert core.hit_counts(tr, "page_cache", None, 8, "global") == want
    assert 0 < want["hits"] < want["requests"] and want["evictions"] > 0


def test_the_hosts_belady_is_a_bound_over_the_hosts_own_requests():
    """disk.policy=belady ranks keys by their next request *to the host* (the device's misses, recorded by a first
    replay: moesim.disk.host_requests), not by their next request in the trace, which the device may serve. Then no
    host policy keeps more in host memory, for the same device decisions; the Python driver makes the same
    decisions as the compiled core."""
    from moesim.api import compose_run, load_trace, replay_config

    tr = load_trace("gpt-oss-like")
    hits = {}
    for policy in ("lru", "lfu", "page_cache", "belady"):
        for fast in ("auto", "false") if policy == "belady" else ("auto",):
            cfg = compose_run("gpt-oss-like", "lfru", "15%", "rtx-4090", overrides=[
                "tokens=1500", "scope=global", "disk.storage=nvme-pcie4", "disk.ram=20%", f"disk.policy={policy}",
                f"fast={fast}"])
            s = replay_config(cfg, tr).summary
            hits[policy, fast] = (s["disk"]["host_hits"], s["disk"]["host_requests"], s["tokens_per_s"])
    assert hits["belady", "auto"] == hits["belady", "false"]  # both drivers, the same host decisions and times
    bound, requests, _ = hits["belady", "auto"]
    for policy in ("lru", "lfu", "page_cache"):
        assert hits[policy, "auto"][1] == requests  # the same device decisions: the same requests to the host
        assert bound > hits[policy, "auto"][0], policy
    summary = replay_config(compose_run("gpt-oss-like", "lfru", "15%", "rtx-4090", overrides=[
        "tokens=300", "disk.storage=nvme-pcie4", "disk.ram=20%", "disk.policy=belady"]), tr).summary
    assert summary["disk"]["host_policy"] == "Belady over host requests"
