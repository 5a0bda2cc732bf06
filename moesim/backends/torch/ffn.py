"""The expert FFN the torch backend computes (SwiGLU over one contiguous weight block) and the random
weights it fills its pools with.

    from moesim.backends.torch import expert_ffn
    expert_ffn(block, x, out, hidden, ffn, weight=0.5)   # out += 0.5 * down(silu(gate x) * up x)

A block [3 * hidden * ffn] holds gate rows [ffn, hidden], up rows [ffn, hidden], then down [hidden, ffn].
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from .memory import GiB, MiB


def expert_ffn(block: torch.Tensor, x: torch.Tensor, out: torch.Tensor, hidden: int, ffn: int,
               weight: float) -> None:
    """out += weight * down(silu(gate x) * up x): one SwiGLU expert whose weights are the contiguous
    `block` [3 * hidden * ffn] (gate rows, up rows, down), over x [n, hidden] into out [n, hidden]."""
    out.add_(swiglu(block, x, hidden, ffn), alpha=weight)


def routed_ffn(block: torch.Tensor, x: torch.Tensor, out: torch.Tensor, hidden: int, ffn: int,
               tokens: torch.Tensor, weights: torch.Tensor) -> None:
    """out[tokens] += weights * expert(x[tokens]): one expert over the rows its tokens occupy in a batch
    (tokens [n] int64, weights [n, 1] the gate weights), gathered, computed, scattered back."""
    out.index_add_(0, tokens, swiglu(block, x.index_select(0, tokens), hidden, ffn) * weights)


def swiglu(block: torch.Tensor, x: torch.Tensor, hidden: int, ffn: int) -> torch.Tensor:
    gate_up = block[: 2 * ffn * hidden].view(2 * ffn, hidden)
    down = block[2 * ffn * hidden:].view(hidden, ffn)
    h = F.linear(x, gate_up)  # [n, 2 ffn]: gate and up in one matmul
    return F.linear(F.silu(h[:, :ffn]) * h[:, ffn:], down)  # [n, hidden]


def fill_random(t: torch.Tensor, seed: int, bound: float, desc: str | None = None,
                via: torch.device | None = None) -> None:
    """Fill `t` [rows, W] uniformly in [-bound, bound] from `seed`, about 256 MiB at a time (a progress bar on
    a terminal for large pools). `via` a CUDA device: the values are drawn there and copied into `t` (a host
    pool of tens of GiB fills in seconds instead of minutes)."""
    src = via if via is not None and via.type == "cuda" else t.device
    gen = torch.Generator(device=src).manual_seed(seed)
    rows = t.shape[0]
    chunk = max(1, (256 * MiB) // max(1, t[0].numel() * t.element_size())) if rows else 1
    bar = None
    if desc and t.numel() * t.element_size() > GiB:
        from tqdm import tqdm

        bar = tqdm(total=rows, unit="expert", desc=desc, file=sys.stderr, disable=None, mininterval=0.5)
    for lo in range(0, rows, chunk):
        part = t[lo:lo + chunk]
        if src == t.device:
            part.uniform_(-bound, bound, generator=gen)
        else:
            part.copy_(torch.empty(part.shape, dtype=t.dtype, device=src).uniform_(-bound, bound, generator=gen))
        if bar is not None:
            bar.update(part.shape[0])
    if bar is not None:
        bar.close()

