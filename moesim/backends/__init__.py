"""Backends: where the engine's decisions happen. `sim` keeps two clocks from a hardware profile; `torch`
moves real expert weights. Both get the same calls from the one replay loop (moesim/engine.py), make no
policy decisions, and report what happened to a moesim.profiler.Profiler.

Call order, per run:   setup  (begin_step  route  (begin_layer  load* compute+)*L  end_step)*  finish
"""
from __future__ import annotations

from strategies import Key


class Backend:
    """The interface the engine drives. Units: slots are indices into the device pool [0, n_slots) (the cache's
    slots, then any scratch slots an offload policy streams into). `host_after_device`: set by the engine from
    the offload policy before the replay: a layer's host experts start once its device experts end."""

    name = "base"
    host_after_device = False

    def setup(self, spec, n_slots: int, profiler) -> None:
        """Allocate what the run needs before the replay: `n_slots` device slots for routed experts, the
        model's shared experts resident on the device; events go to `profiler`."""
        raise NotImplementedError

    def begin_step(self, step: int, n_tokens: int) -> None:
        """A forward pass over `n_tokens` tokens starts."""

    def route(self, experts, weights) -> None:
        """The step's routing, as the trace has it: experts [n_tokens, L, K] (ids, -1 = none) and their gate
        weights [n_tokens, L, K]; a backend that computes real outputs weights each expert's by them."""

    def begin_layer(self, layer: int) -> None:
        """Layer `layer` starts: its attention runs before its experts are known (compute calls follow, one
        per wave where the layer runs in waves)."""

    def load(self, key: Key, slot: int, prefetch: bool) -> None:
        """Copy `key`'s weights from host memory into device slot `slot` (asynchronously where the device
        allows: a later `compute` that needs `key` waits for it). `prefetch`: issued ahead of need."""
        raise NotImplementedError

    def compute(self, layer: int, device: list[tuple[Key, int, int]], host: list[tuple[Key, int]]) -> None:
        """Run layer `layer`: `device` lists (key, slot, n_tokens) of experts computed from device slots
        (waiting for their loads), `host` lists (key, n_tokens) computed on the host from host copies."""
        raise NotImplementedError

    def end_step(self) -> None:
        """The forward pass ends (its latency is recorded)."""

    def finish(self) -> None:
        """The replay is over: wait for outstanding work, release device memory."""

    def device_bytes(self) -> int:
        """Peak device memory the run held for expert weights (routed slots + shared experts), bytes."""
        raise NotImplementedError
