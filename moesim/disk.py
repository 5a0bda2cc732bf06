"""The disk tier: experts that live on storage and a host cache above it, for models larger than host memory.

    python -m moesim run trace=... disk.storage=nvme-pcie4 disk.ram=25% [disk.policy=lru] [backend=sim]

With `disk.storage` set, the run has three tiers: every expert on disk, `disk.ram` of them in host memory (a
cache with its own policy: any compiled cache policy, page_cache among them; `belady` is Belady over the host's
own requests, recorded by a first replay: host_requests) and the device cache as without it. A device miss (a
copy, a streamed copy, a background load, a prefetch or a host compute) needs the expert in host memory: a host
hit costs nothing more; a host miss reads it from disk first (the engine asks the host cache, the backend
reads; the compiled core runs the same host cache, moesim.core.simulate). The sim backend gives the disk its
own timeline: one read at a time in issue order, each taking Storage.read_ms(bytes per expert), starting when
issued or when the disk is free; the expert's copy (or its host compute) starts no earlier than its read ends.
The torch backend reads real bytes from a file (moesim/backends/torch/diskfile.py). summary.json gets a `disk`
section: host requests, hits and hit rate, disk reads, bytes and time per tier.

Storage presets: achieved sequential read = 80% of the drive's stated rate (moesim's rule, as for PCIe copies
in moesim/hardware.py; an expert of several MiB is one sequential read), plus a fixed latency per read. The
stated rates and where they were read are beside each preset. `python -m moesim calibrate disk=/mnt/nvme` measures
a disk instead (measure_storage) and writes a storage profile for disk.storage=FILE.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .errors import MoesimError

READ_EFFICIENCY = 0.8  # achieved / stated sequential read (moesim's rule, as LINK_EFFICIENCY for PCIe copies)
# one read's fixed cost: 1e6 / 19,000 us, the QD1 4 KiB random read rate Samsung states for the 970 EVO Plus
# 1 TB (digit.in's copy of its spec table, below); the other pages opened state no QD1 rate: the same assumed
QD1_LATENCY_US = round(1e6 / 19_000, 1)


@dataclass(frozen=True)
class Storage:
    """A disk as the sim sees it: achieved sequential read rate, a fixed latency per read, and how many reads the
    reader keeps in flight. An expert is stored contiguously, so each read is one sequential read of its bytes
    (a drive's 4 KiB random-read rate is what `latency_us` stands for). With `queue_depth` q a read is submitted
    once fewer than q are outstanding; its latency overlaps the reads ahead of it, its transfer waits for theirs
    (one read rate shared). q = 1: one read at a time, latency then transfer."""

    name: str
    read_gbps: float  # achieved sequential read, GB/s (1e9 bytes/s)
    latency_us: float  # fixed cost of one read
    source: str = ""
    queue_depth: int = 1  # reads in flight at most (the reader's; the torch backend reads one at a time)
    request_bytes: int = 0  # the reader's: bytes per read request (0: an expert in one request; disk.read_size)

    def read_ms(self, nbytes: int) -> float:
        """One read of `nbytes` (one expert's weights) on an idle disk, ms."""
        return self.latency_us * 1e-3 + nbytes / (self.read_gbps * 1e9) * 1e3

    def requests(self, nbytes: int) -> tuple[int, float, float]:
        """How an expert of `nbytes` is read: (requests, ms of each but the last, ms of the last), each request
        paying the latency (request_bytes: the mmap reader's read-around window; 0: one request)."""
        r = self.request_bytes
        if r <= 0 or r >= nbytes:
            return 1, self.read_ms(nbytes), self.read_ms(nbytes)
        n = -(-nbytes // r)
        return n, self.read_ms(r), self.read_ms(nbytes - (n - 1) * r)

    def to_dict(self) -> dict:
        return asdict(self)


def _drive(name: str, stated_mbps: float, source: str) -> Storage:
    return Storage(name, round(stated_mbps / 1e3 * READ_EFFICIENCY, 2), QD1_LATENCY_US,
                   f"{source}; read = {READ_EFFICIENCY:.0%} of the stated rate, latency assumed (moesim/disk.py)")


STORAGE: dict[str, Storage] = {s.name: s for s in [
    # Samsung 870 EVO (SATA 6 Gb/s): up to 560 MB/s sequential read, every capacity (Samsung's announcement as
    # tomshardware.com/uk/news/samsung-announces-870-evo tabulates it)
    _drive("sata-ssd", 560, "Samsung 870 EVO, 560 MB/s stated (tomshardware.com, samsung-announces-870-evo)"),
    # Samsung 970 EVO Plus 1 TB (PCIe 3.0 x4): 3,500 MB/s sequential read, 19k IOPS 4 KiB random read at QD1
    # (digit.in review 177943, Samsung's spec table)
    _drive("nvme-pcie3", 3500, "Samsung 970 EVO Plus 1 TB, 3,500 MB/s stated (digit.in review 177943)"),
    # Samsung 990 PRO (PCIe 4.0 x4): up to 7,450 MB/s sequential read (slashcam.com news 17407, Samsung's
    # announcement; digitec.ch lists the same for the 2 TB MZ-V9P2T0BW)
    _drive("nvme-pcie4", 7450, "Samsung 990 PRO, 7,450 MB/s stated (slashcam.com news 17407)"),
    # Crucial T700 2 TB (PCIe 5.0 x4): up to 12,400 MB/s sequential read (hothardware.com, "crucial-t700-pcie-
    # gen-5-ssd-specs", from Crucial's product page)
    _drive("nvme-pcie5", 12400, "Crucial T700 2 TB, 12,400 MB/s stated (hothardware.com, Crucial's product page)"),
]}


ALIGN = 4096  # bytes: O_DIRECT's alignment of offsets, lengths and buffers (the logical block size of most disks)
BUFFERED = "buffered, pages dropped before each read"  # how reads run where O_DIRECT is refused


def aligned(nbytes: int):
    """uint8 numpy buffer of `nbytes` starting on an ALIGN boundary (what an O_DIRECT read may fill)."""
    import numpy as np

    raw = np.empty(nbytes + ALIGN, np.uint8)
    skip = (-raw.ctypes.data) % ALIGN
    return raw[skip:skip + nbytes]


def open_for_reads(path) -> tuple[int, str]:
    """(fd, how reads run) for `path`: O_DIRECT, so that the page cache cannot hide the disk, where the file system
    takes it (some refuse it only at the first read, so one aligned block is read to find out); else buffered,
    the caller dropping a block's pages (posix_fadvise DONTNEED) before reading it."""
    import os

    fd = None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        os.preadv(fd, [aligned(ALIGN)], 0)
        return fd, "O_DIRECT"
    except OSError:
        if fd is not None:
            os.close(fd)
        return os.open(path, os.O_RDONLY), BUFFERED


def measure_storage(folder, sizes=(4 << 10, 64 << 10, 1 << 20, 16 << 20), total: int = 1 << 30,
                    repeats: int = 16, seed: int = 0, log=None) -> tuple[Storage, list[tuple[int, float]]]:
    """Measure the disk under `folder` as the disk tier reads it: a file of `total` bytes written there (then
    dropped from the page cache and deleted at the end), read back in blocks of each of `sizes` bytes at random
    aligned offsets, `repeats` reads per size, one at a time, with O_DIRECT where the file system takes it
    (else buffered, the block's pages dropped first). The median time per size, fitted to ms = latency +
    bytes / rate (relative errors, moesim.calibrate.fit_latency_rate), gives the Storage. Returns it and the
    (bytes, median ms) points."""
    import os
    import shutil
    import tempfile
    import time

    import numpy as np

    from .calibrate import fit_latency_rate

    folder = str(folder)
    if not os.path.isdir(folder):
        raise MoesimError(f"calibrate disk={folder!r}: not a folder")
    big = max(sizes)
    total = max(total, 4 * big)
    if shutil.disk_usage(folder).free < 2 * total:
        raise MoesimError(f"calibrate disk={folder!r}: needs {total / 2**30:.1f} GiB free for its test file")
    buf = aligned(big)
    fd, path = tempfile.mkstemp(prefix="moesim-disk-", suffix=".bin", dir=folder)
    try:
        rng = np.random.default_rng(seed)
        block = rng.integers(0, 256, 16 << 20, dtype=np.uint8).tobytes()  # incompressible, for drives that compress
        with os.fdopen(fd, "wb", buffering=0) as f:
            for _ in range(-(-total // len(block))):
                f.write(block)
            os.fsync(f.fileno())
        total = os.path.getsize(path)
        rfd, io = open_for_reads(path)
        os.posix_fadvise(rfd, 0, 0, os.POSIX_FADV_DONTNEED)
        points = []
        try:
            for size in sizes:
                times = []
                for off in rng.integers(0, (total - size) // ALIGN, repeats) * ALIGN:
                    if io != "O_DIRECT":
                        os.posix_fadvise(rfd, int(off), size, os.POSIX_FADV_DONTNEED)
                    t0 = time.perf_counter()
                    got = os.preadv(rfd, [buf[:size]], int(off))
                    times.append((time.perf_counter() - t0) * 1e3)
                    if got != size:
                        raise MoesimError(f"calibrate disk: read {got} of {size} bytes from {path}")
                points.append((size, float(np.median(times))))
                if log:
                    log(f"disk: {size:>10,} B reads: median {points[-1][1]:.3f} ms ({io})")
        finally:
            os.close(rfd)
    finally:
        os.unlink(path)
    latency_ms, bytes_per_ms = fit_latency_rate(points)
    return Storage(f"measured:{folder}", round(bytes_per_ms / 1e6, 3), round(latency_ms * 1e3, 1),
                   f"calibrate disk={folder} ({io}, {repeats} reads per size, medians fitted)"), points


def save_storage(storage: Storage, path) -> object:
    """Write `storage` as YAML (what disk.storage=FILE reads), atomically."""
    from pathlib import Path

    import yaml

    from .files import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, "# moesim storage profile: python -m moesim run disk.storage=" + str(path)
                             + "\n" + yaml.safe_dump(storage.to_dict(), sort_keys=False))


def load_storage(value) -> Storage:
    """A preset name of STORAGE, a YAML file `calibrate disk=` wrote (or one like it), or a mapping {name,
    read_gbps, latency_us[, queue_depth][, source][, request_bytes]} (a run's request_bytes is its
    disk.read_size's: moesim.api.disk_tier sets it)."""
    if isinstance(value, Storage):
        return value
    from pathlib import Path

    if isinstance(value, (str, Path)) and str(value) not in STORAGE and str(value).endswith((".yaml", ".yml")):
        from .files import read_yaml

        if not Path(value).is_file():
            raise MoesimError(f"disk.storage: no such file {str(value)!r}")
        try:
            data = read_yaml(Path(value))
        except ValueError as e:
            raise MoesimError(f"disk.storage: {value}: not a YAML storage profile: {e}") from None
        if not isinstance(data, dict):
            raise MoesimError(f"disk.storage: {value}: expected a mapping with read_gbps and latency_us")
        return load_storage(data)
    if hasattr(value, "items") and not isinstance(value, str):
        from .hardware import _plain

        d = _plain(value)
        unknown = set(d) - {"name", "read_gbps", "latency_us", "source", "queue_depth", "request_bytes"}
        if unknown:
            raise MoesimError(f"disk.storage: unknown field(s) {', '.join(sorted(map(str, unknown)))}; expected "
                              f"name, read_gbps, latency_us, queue_depth, source (and request_bytes, which "
                              f"disk.read_size sets)")
        q = d.get("queue_depth", 1)
        if isinstance(q, bool) or not isinstance(q, int) or not 1 <= q <= 1024:
            raise MoesimError(f"disk.storage.queue_depth={q!r}: expected a whole number of reads in flight, 1 to 1024")
        for k in ("read_gbps", "latency_us"):
            v = d.get(k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (
                    k == "read_gbps" and v == 0):
                raise MoesimError(f"disk.storage.{k}={v!r}: expected a number " + (
                    "> 0 (GB/s)" if k == "read_gbps" else ">= 0 (us)"))
        r = d.get("request_bytes", 0)
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise MoesimError(f"disk.storage.request_bytes={r!r}: expected a whole number of bytes >= 0")
        return Storage(str(d.get("name", "custom")), float(d["read_gbps"]), float(d["latency_us"]),
                       str(d.get("source", "given in the run's config")), q, r)
    text = str(value)
    if text not in STORAGE:
        raise MoesimError(f"disk.storage={text!r}: unknown; presets: {', '.join(STORAGE)}, or a mapping with "
                          f"read_gbps and latency_us")
    return STORAGE[text]


def host_requests(script, n_layers: int, n_experts: int, step_of_wave) -> tuple:
    """(positions, offsets) of each key's requests to the host cache in a replay recorded without a disk tier
    (moesim.core.Script): every copy (demand, streamed, background or prefetch) and every host compute asks it,
    once per key and position (a host compute that also loads asks once). The position of wave v is
    step_of_wave[v] * L + its layer."""
    import numpy as np

    waves, copies, served = script.waves, script.copies, script.served
    pos_of_wave = step_of_wave * n_layers + waves[:, 0]
    first_copy = np.concatenate([[0], waves[:-1, 1]]) if len(waves) else np.zeros(0, np.int64)
    n_copies = waves[:, 1] - first_copy  # copies issued before each wave computes, since the last
    copy_pos = np.repeat(pos_of_wave, n_copies)
    copy_key = copies[:len(copy_pos), 0] * n_experts + copies[:len(copy_pos), 1]
    first_row = np.concatenate([[0], waves[:-1, 2]]) if len(waves) else np.zeros(0, np.int64)
    row_pos = np.repeat(pos_of_wave, waves[:, 2] - first_row)
    host = served[:, 3] == 1
    keys = np.concatenate([copy_key, served[host, 0]])
    pos = np.concatenate([copy_pos, row_pos[host]])
    code = np.unique(keys * (int(pos.max()) + 1 if len(pos) else 1) + pos)  # by key, then position; each once
    span = int(pos.max()) + 1 if len(pos) else 1
    key = code // span
    positions = (code - key * span).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(key, minlength=n_layers * n_experts))]).astype(np.int64)
    return positions, offsets


class DiskTier:
    """The host cache above the disk, as the Python driver asks it (moesim.engine): `need(pos, key)` says
    whether `key` must be read from disk before its copy or host compute, and keeps the host cache's decisions.
    The compiled core runs the same host cache from `make_policy` and `n_slots` (moesim.core.simulate).

    n_slots: experts the host memory holds (one pool); make_policy: builds its cache policy."""

    def __init__(self, spec, n_slots: int, make_policy, storage: Storage, trace):
        from .cache import Cache

        self.n_slots, self.make_policy, self.storage = n_slots, make_policy, storage
        self.spec, self.trace = spec, trace
        self.host = Cache(spec, n_slots, "global", make_policy, trace)
        self.host_bound = False  # disk.policy=belady: the host's own Belady, set by `bind` before the replay
        self.reads = 0  # disk reads (host misses)
        self.unkept = 0  # reads the host cache could not keep (every slot pinned): read for this use only

    def bind(self, positions, offsets) -> None:
        """The host cache becomes Belady over the host's own requests (host_requests): the key whose next request
        to the host comes last. strategies.belady.Belady reads the next request in the trace, which the device may
        serve: not the host's bound. This one is, for the device's decisions."""
        from .cache import Cache

        from strategies.belady import GivenBelady

        self.make_policy = lambda: GivenBelady(positions, offsets)
        self.host = Cache(self.spec, self.n_slots, "global", self.make_policy, self.trace)
        self.host_bound = True

    def need(self, pos: int, key) -> tuple[bool, int]:
        """(whether `key` misses in host memory and is read now, the host slot it is read into: the host
        cache's, or slot n_slots, a scratch slot, where the cache cannot keep it); the host cache counts the
        request."""
        host = self.host
        if not host.lookup(pos, key[0], [key]):
            host.release()
            return False, -1
        got = host.insert(pos, key)
        if got is None:
            self.unkept += 1
        host.release()
        self.reads += 1
        return True, self.n_slots if got is None else got[0]

    def counts(self, disk_ms: float) -> dict:
        """What the Python driver's replay left: the `counts` summary() takes."""
        c = self.host.counters
        return {"requests": c.requests, "hits": c.hits, "reads": self.reads, "unkept": self.unkept,
                "busy_ms": disk_ms}

    def summary(self, spec, n_tokens: int, counts: dict, run_ms: float) -> dict:
        """The `disk` section of summary.json from a replay's `counts` (requests and hits of the host cache, disk
        reads, reads not kept, the disk's busy ms; the Python driver's `counts()` or moesim.core.SimRun.disk)."""
        nbytes = spec.bytes_per_expert
        req, hits, reads, busy = counts["requests"], counts["hits"], counts["reads"], counts["busy_ms"]
        # busy: the sim's disk timeline; None on a backend that measures (torch: its reads, in `measured`)
        n, full, last = self.storage.requests(nbytes)
        return {"storage": self.storage.to_dict(), "host_slots": self.n_slots, "host_gib": self.n_slots * nbytes / 2**30,
                "host_policy": "Belady over host requests" if self.host_bound else type(self.make_policy()).__name__,
                "host_requests": req, "host_hits": hits,
                "host_hit_rate": hits / req if req else None, "disk_reads": reads, "bytes_disk": reads * nbytes,
                "disk_mib_per_token": reads * nbytes / 2**20 / max(n_tokens, 1),
                "read_ms": (n - 1) * full + last, "requests_per_read": n, "disk_busy_ms": busy,
                "disk_busy_share": busy / run_ms if run_ms and busy is not None else None,
                "unkept_reads": counts["unkept"]}


def disk_queue(storage: Storage, nbytes: int):
    """The disk's timeline state for experts of `nbytes` (the compiled core's moesim.core.clock.disk_read):
    [ms of a request, latency ms, queue depth, requests so far, requests per expert, ms of an expert's last
    request, the ends of the last queue-depth requests...] (float64; Storage.requests)."""
    import numpy as np

    q = storage.queue_depth
    n, full, last = storage.requests(nbytes)
    return np.array([full, storage.latency_us * 1e-3, q, 0, n, last] + [0.0] * q, np.float64)


READ_AROUND = 128 << 10  # bytes: Linux's default readahead window, VM_READAHEAD_PAGES (docs/disk.md, "Reads
#                          through mmap")


def request_bytes(value, policy: str, nbytes: int) -> int:
    """`disk.read_size` as bytes per read request: auto (page_cache: READ_AROUND, the kernel's read-around of a
    faulting mapped file; any other policy: 0, an expert in one request), expert (0), or a size (4KiB multiple)."""
    from .units import parse_bytes

    if value is None or str(value) == "auto":
        return READ_AROUND if policy == "page_cache" else 0
    if str(value) == "expert":
        return 0
    try:
        b = parse_bytes(value, "disk.read_size")
    except MoesimError:
        b = None
    if b is None or b <= 0 or b % ALIGN:
        raise MoesimError(f"disk.read_size={value!r}: expected auto, expert, or a size in whole 4 KiB pages "
                          f"(e.g. 128KiB, 1MiB)")
    return int(b)
