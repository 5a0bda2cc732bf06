"""Which device the torch backend runs on, its name, and the CPU threads torch computes with.

    from moesim.backends.torch import resolve_device, device_name
    device_name(resolve_device("auto"))   # "NVIDIA H200", or the CPU's model name with its core count

`backend.device` and `backend.threads` are resolved here (with errors that name the option); TORCH_DTYPES maps
the weights' dtype names to the torch dtypes the backend computes in.
"""
from __future__ import annotations

import os

import torch

from ...errors import MoesimError

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(device: str) -> torch.device:
    """`auto` (CUDA when present, else cpu), `cpu`, `cuda` or `cuda:N`; refuses CUDA where there is none."""
    text = str(device).strip().lower()
    if text == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        if not torch.cuda.is_available():
            why = "was built without CUDA" if torch.version.cuda is None else "sees no CUDA device"
            raise MoesimError(f"backend.device={device}: torch {torch.__version__} {why}; "
                              f"use backend.device=cpu (or auto, which picks cuda only where it exists)")
        try:
            dev = torch.device(text)
        except RuntimeError:
            raise MoesimError(f"backend.device={device!r}: expected auto, cpu, cuda or cuda:N") from None
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise MoesimError(f"backend.device={device}: only {torch.cuda.device_count()} CUDA device(s) here "
                              f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
        return torch.device("cuda", index)
    raise MoesimError(f"backend.device={device!r}: expected auto, cpu, cuda or cuda:N")


def device_name(device: torch.device) -> str:
    """"NVIDIA H200" for a CUDA device; the CPU's model name (from /proc/cpuinfo) for cpu."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"cpu {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"cpu ({os.cpu_count()} cores)"


def resolve_threads(threads, device: torch.device, copy_worker: bool) -> int | None:
    """Torch compute threads for device=cpu: `auto` leaves one core to the copy worker (all cores without
    one); a number is taken as is; on CUDA None (torch's own setting is left alone)."""
    if device.type != "cpu":
        return None
    if threads in (None, "auto"):
        cores = os.cpu_count() or 1
        return max(1, cores - 1) if copy_worker else cores
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise MoesimError(f"backend.threads={threads!r}: expected auto or a number of threads >= 1")
    return threads

