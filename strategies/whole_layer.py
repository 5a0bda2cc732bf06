"""Whole-layer prefetch: once a layer is routed, load every expert of the next `lookahead` layers, whatever the
routing. `prefetch=whole_layer`; the prefetcher of `strategy=layer_offload`.

The loading of offloading runtimes that know nothing of routing: accelerate's CPU offload hooks move a module's
weights to the device before its forward, and DeepSpeed ZeRO-Inference (ZeRO-3 with parameters in host memory)
gathers every parameter of the layer it computes, so an MoE layer brings all its experts each time it runs
(arXiv:2312.17238 describes its "naive offloading" baseline so: it loads the entire MoE layer). With a cache
too small to keep them (strategy=layer_offload: two layers' worth), every step moves the whole MoE part.
Not a bound: it reads no routing at all. Experts are loaded in id order.
"""
from __future__ import annotations

import numpy as np

from .prefetch_table import TablePrefetcher, shift_table


class WholeLayer(TablePrefetcher):
    def build(self, ctx):
        S, L, E = ctx.trace.n_steps, ctx.trace.n_layers, ctx.spec.experts
        every = np.broadcast_to(np.arange(E, dtype=np.int16), (S, L, E))
        return shift_table(np.ascontiguousarray(every), self.lookahead)
