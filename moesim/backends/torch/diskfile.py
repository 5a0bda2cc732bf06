"""The torch backend's disk tier (moesim/disk.py): every expert in a file on disk, read on demand into a host
cache of slots, so that a run measures real reads.

    f = ExpertFile.create(n_experts, nbytes, fill, directory)  # writes the file once (each expert padded)
    seconds = f.read(index, host_row)                           # one expert into an aligned host row
    ExpertFile.create(..., request_bytes=128 << 10)             # each expert in requests of that many bytes
    f.close()                                                   # closes and deletes the file

Each expert sits at index * stride, stride = nbytes rounded up to ALIGN, so that a read is one aligned
request (or, with `request_bytes`, aligned requests of that size one after another, as a reader of a mapped
file gets them from the kernel's read-around; moesim/disk.py request_bytes). Reads use O_DIRECT where the file
system takes it: the OS page cache then cannot hide the disk. Where it does not (tmpfs; O_DIRECT missing), reads are buffered, and the expert's pages are dropped from the page cache
before each read (posix_fadvise DONTNEED). `io` says which of the two ran.
"""
from __future__ import annotations

import os
import tempfile
import time

import torch

from ...disk import ALIGN, aligned, open_for_reads
from ...errors import MoesimError



def stride_of(nbytes: int) -> int:
    """One expert's place in the file and in the host cache: nbytes rounded up to ALIGN."""
    return -(-nbytes // ALIGN) * ALIGN


def aligned_rows(rows: int, stride: int, pinned: bool) -> torch.Tensor:
    """uint8 [rows, stride] host memory whose rows start on ALIGN boundaries (pinned: CUDA host memory, which is
    page-aligned)."""
    if pinned:
        t = torch.empty((rows, stride), dtype=torch.uint8, pin_memory=True)
        if t.data_ptr() % ALIGN == 0:
            return t
    return torch.from_numpy(aligned(rows * stride).reshape(rows, stride))


class ExpertFile:
    """A file of `n` experts of `nbytes` each (at index * stride), open for reads."""

    def __init__(self, path: str, n: int, nbytes: int, request_bytes: int = 0):
        self.path, self.n, self.nbytes, self.stride = path, n, nbytes, stride_of(nbytes)
        self.request = request_bytes if 0 < request_bytes < self.stride else self.stride  # bytes per request
        self.fd, self.io = open_for_reads(path)
        self.reads = 0
        self.requests = 0
        self.bytes = 0  # expert bytes read (the padding not counted)
        self.seconds = 0.0

    @classmethod
    def create(cls, n: int, nbytes: int, fill, directory: str | None = None, request_bytes: int = 0) -> "ExpertFile":
        """Write `n` experts, `fill(rows)` giving uint8 [k, nbytes] for the next k of them, into a new file in
        `directory` (default: the system's temporary directory), then open it for reads."""
        import shutil

        stride = stride_of(nbytes)
        where = directory or tempfile.gettempdir()
        try:
            free = shutil.disk_usage(where).free
        except OSError as e:
            raise MoesimError(f"backend.disk_dir={where!r}: cannot write the experts' file there: {e}") from None
        if n * stride > free:
            raise MoesimError(f"backend.disk_dir={where!r}: the experts' file takes {n * stride / 2**30:.2f} GiB "
                              f"({n} experts of {nbytes:,} bytes), more than the {free / 2**30:.2f} GiB free there; "
                              f"name another folder (backend.disk_dir=...) or a smaller model (model.scale=...)")
        try:
            fd, path = tempfile.mkstemp(prefix="moesim-experts-", suffix=".bin", dir=where)
        except OSError as e:
            raise MoesimError(f"backend.disk_dir={where!r}: cannot write the experts' file there: {e}") from None
        bar = None
        try:
            chunk = max(1, (256 << 20) // stride)  # about 256 MiB at a time
            buf = aligned_rows(chunk, stride, False)
            buf.zero_()  # the padding
            if n * stride > 1 << 30:
                from ...progress import progress

                bar = progress(total=n, unit="expert", desc=f"experts' file {path}")
            with os.fdopen(fd, "wb", buffering=0) as f:
                for lo in range(0, n, chunk):
                    k = min(chunk, n - lo)
                    buf[:k, :nbytes].copy_(fill(k))
                    f.write(buf[:k].numpy().tobytes())
                    if bar is not None:
                        bar.update(k)
                os.fsync(f.fileno())
            _drop_cache(path)
            return cls(path, n, nbytes, request_bytes)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            if bar is not None:
                bar.close()

    def read(self, index: int, row: torch.Tensor) -> float:
        """Read expert `index` into `row` (uint8 [stride], aligned host memory); returns the seconds it took."""
        off = index * self.stride
        if self.io != "O_DIRECT":
            os.posix_fadvise(self.fd, off, self.stride, os.POSIX_FADV_DONTNEED)
        buf = row.numpy()
        got = 0
        t0 = time.perf_counter()
        for a in range(0, self.stride, self.request):  # one request, or the read-around windows in turn
            got += os.preadv(self.fd, [buf[a:a + self.request]], off + a)
            self.requests += 1
        dt = time.perf_counter() - t0
        if got != self.stride:
            raise MoesimError(f"{self.path}: read {got} of {self.stride} bytes of expert {index}")
        self.reads += 1
        self.bytes += self.nbytes
        self.seconds += dt
        return dt

    def stats(self) -> dict:
        """What the reads measured: count, bytes, seconds, GB/s, and how they ran."""
        return {"reads": self.reads, "requests": self.requests, "request_bytes": self.request,
                "bytes": self.bytes, "seconds": self.seconds,
                "gbps": self.bytes / self.seconds / 1e9 if self.seconds else None, "io": self.io,
                "file_bytes": self.n * self.stride}

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            os.unlink(self.path)


def _drop_cache(path: str) -> None:
    """Evict the file's pages from the page cache (they were just written), where the OS can."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
