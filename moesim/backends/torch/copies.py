"""Host-memory copies of the torch backend on the CPU: one memcpy with the GIL released, and a copy worker
thread that runs them in issue order (device=cpu with `copy_worker: true`). CUDA copies are issued on a copy
stream by the backend itself (moesim/backends/torch/__init__.py).

    from moesim.backends.torch import CopyWorker
    w = CopyWorker(); ticket = w.submit(dst, src); w.wait(ticket); w.times[ticket]   # (start, end) seconds
"""
from __future__ import annotations

import ctypes
import threading
import time
from collections import deque

import torch


def memcpy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy contiguous `src` into contiguous `dst` of the same size on the CPU: one memcpy, in the calling
    thread, with the GIL released (ctypes), whatever torch's intra-op threads are doing."""
    ctypes.memmove(dst.data_ptr(), src.data_ptr(), src.numel() * src.element_size())


class CopyWorker:
    """A thread that runs host-memory copies one at a time in issue order (device=cpu). `submit` returns a
    ticket; `wait(ticket)` returns once that copy (and every one before it) is done; `times[ticket]` holds
    its (start, end) perf_counter seconds."""

    def __init__(self):
        self._queue: deque = deque()
        self._cv = threading.Condition()
        self.issued = 0  # tickets handed out
        self.done = 0  # tickets finished (in order)
        self.times: dict[int, tuple[float, float]] = {}
        self._error: BaseException | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="moesim-copy", daemon=True)
        self._thread.start()

    def submit(self, dst: torch.Tensor, src: torch.Tensor) -> int:
        with self._cv:
            self.issued += 1
            self._queue.append((self.issued, dst, src))
            self._cv.notify_all()
            return self.issued

    def wait(self, ticket: int) -> None:
        if self.done < ticket:
            with self._cv:
                self._cv.wait_for(lambda: self.done >= ticket or self._error is not None)
        if self._error is not None:
            raise RuntimeError(f"copy worker failed: {self._error!r}") from self._error

    def _run(self) -> None:
        cv, queue = self._cv, self._queue
        while True:
            with cv:
                cv.wait_for(lambda: queue or self._stop)
                if not queue:
                    return
                ticket, dst, src = queue.popleft()
            try:
                t0 = time.perf_counter()
                memcpy(dst, src)
                t1 = time.perf_counter()
            except BaseException as e:  # reported to the waiting thread
                with cv:
                    self._error = e
                    cv.notify_all()
                return
            with cv:
                self.times[ticket] = (t0, t1)
                self.done = ticket
                cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join()

