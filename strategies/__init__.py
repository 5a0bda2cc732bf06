"""Strategies: the decisions of an expert cache. One policy per file, one config per policy in moesim/conf/strategy/.

A strategy is a cache policy (what to evict) + a prefetcher (what to load ahead) + an offload policy (on a
miss: fetch, or compute on the host). The engine (moesim/engine.py) and the cache (moesim/cache.py) own the
mechanism: capacity, scope, pinning, counters, clocks, tensors. A policy only orders and chooses.

Time is a request position `pos = step_index * L + layer`: it increases by one per (step, layer), so policies
that need recency or future distance (Belady) share one clock across layers and scopes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator, Literal, Protocol

if TYPE_CHECKING:
    from moesim.trace import ModelSpec, Trace

Key = tuple[int, int]  # (layer, expert)


@dataclass(frozen=True)
class Context:
    """What a policy may know when it is set up: one cache partition and the run around it."""

    trace: "Trace"  # the whole trace: oracles (Belady) read the future from it; others must not
    spec: "ModelSpec"
    layers: tuple[int, ...]  # layers whose experts live in this partition (one in per_layer scope)
    capacity: int  # slots of this partition
    scope: str  # "per_layer" | "global"


class Candidates(Protocol):
    """Keys a policy may evict now: resident in its partition and not pinned by the running layer."""

    def __contains__(self, key: Key) -> bool: ...
    def __iter__(self) -> Iterator[Key]: ...
    def __len__(self) -> int: ...


class CachePolicy:
    """What to evict. One instance per cache partition; the cache calls, in this order per (step, layer):
    `on_access` with the hits (row order, best first), then per miss `victim` (if full), `on_evict`, `on_insert`."""

    bound = False  # True for oracles that read the future: reported as a bound, never as deployable

    def setup(self, ctx: Context) -> None:
        """Called once before the replay (and again after a reset); default: nothing to learn."""

    def on_access(self, pos: int, keys: Iterable[Key]) -> None:
        """`keys` were requested at `pos` and are resident (hits)."""

    def on_insert(self, pos: int, key: Key, prefetched: bool) -> None:
        """`key` became resident at `pos` (a demand load, or a prefetch when `prefetched`)."""

    def on_evict(self, key: Key) -> None:
        """`key` left the cache."""

    def victim(self, candidates: Candidates) -> Key:
        """The key to evict; must be one of `candidates` (never empty when called)."""
        raise NotImplementedError


class Prefetcher:
    """What to load before it is asked for. `predict` returns keys, most wanted first; the engine loads
    those not resident, within the prefetch knobs, through the same cache mechanism."""

    bound = False

    def setup(self, ctx: Context) -> None:
        """Called once before the replay, with the whole-trace context (layers = all layers)."""

    def observe(self, pos: int, layer: int, experts: Iterable[int]) -> None:
        """Layer `layer` of the current step needed `experts` (it has just been computed)."""

    def predict(self, pos: int, layer: int) -> list[Key]:
        """After layer `layer` computed at `pos`: keys to fetch ahead; default none."""
        return []


class OffloadPolicy:
    """On a miss: load the expert (`"fetch"`) or compute it on the host from its host copy (`"host"`)."""

    bound = False

    def setup(self, ctx: Context) -> None:
        """Called once before the replay."""

    def on_miss(self, key: Key, n_tokens: int, cost) -> Literal["fetch", "host"]:
        """`cost` answers `cost.fetch_ms(key)` and `cost.host_ms(key, n_tokens)` under the hardware profile."""
        return "fetch"
