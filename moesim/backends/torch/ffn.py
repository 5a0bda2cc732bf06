"""The expert FFN the torch backend computes: SwiGLU over one contiguous block of weights in the compute
dtype (a packed expert is decoded into such a block first: moesim/backends/torch/packed.py).

    from moesim.backends.torch import expert_ffn
    expert_ffn(block, x, out, hidden, ffn, weight=0.5)   # out += 0.5 * down(silu(gate x) * up x)

A block [3 * hidden * ffn] holds gate rows [ffn, hidden], up rows [ffn, hidden], then down [hidden, ffn].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
