"""Strategies: the decisions of an expert cache. One policy per file, one config per policy in moesim/conf/strategy/.

A strategy is a cache policy (what to evict) + a prefetcher (what to load ahead) + an offload policy (on a
miss: fetch, or compute on the host). The compiled core (moesim/core/) and the Python driver (moesim/engine.py
with moesim/cache.py) own the mechanism: capacity, scope, pinning, counters, clocks, tensors. A policy only
orders and chooses. The classes here are the reference: the built-in ones also exist compiled in
moesim/core/ (held equal by tests/test_core.py); a user's own class runs in the Python driver.

Time is a request position `pos = step_index * L + layer`: it increases by one per (step, layer), so policies
that need recency or future distance (Belady) share one clock across layers and scopes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Literal, Protocol

if TYPE_CHECKING:
    from moesim.trace import ModelSpec, Trace

Key = tuple[int, int]  # (layer, expert)


def default_open_trace(ref: str) -> "Trace":
    """Context's default `open_trace`: the mechanism's reader, moesim.importers.open_trace_cached (any format
    moesim reads; each file read once per process). Imported on first use so that loading the policy interface
    does not load the importers; this is the only place in strategies/ that names moesim.importers
    (tests/test_policies.py checks it)."""
    from moesim.importers import open_trace_cached

    return open_trace_cached(ref)


@dataclass(frozen=True)
class Context:
    """What a policy may know when it is set up: one cache partition and the run around it. Policies never open
    files: a policy's calibration trace comes from `calibration_trace` (whoever builds the Context may pass
    its own `open_trace`, e.g. one that serves traces already in memory)."""

    trace: "Trace"  # the whole trace: oracles (Belady) read the future from it; others must not (precomputed
    #                 predictions read it causally: strategies/prefetch_table.py)
    spec: "ModelSpec"
    layers: tuple[int, ...]  # layers whose experts live in this partition (one in per_layer scope)
    capacity: int  # slots of this partition
    scope: str  # "per_layer" | "global"
    open_trace: Callable[[str], "Trace"] = default_open_trace  # a calibrate_trace reference (path or preset) -> Trace

    def calibration_trace(self, ref, where: str) -> "Trace":
        """The Trace `ref` names (a Trace is taken as is; else a path or preset name, read by `open_trace`),
        checked to have the replayed model's layers x experts. `where` names the option in errors, e.g.
        `strategy.cache.calibrate_trace`."""
        from moesim.errors import MoesimError
        from moesim.trace import Trace

        calib = ref if isinstance(ref, Trace) else self.open_trace(str(ref))
        if (calib.spec.layers, calib.spec.experts) != (self.spec.layers, self.spec.experts):
            name = f"<Trace of {calib.spec.name}>" if isinstance(ref, Trace) else ref
            raise MoesimError(f"{where}={name}: model has {calib.spec.layers} layers x {calib.spec.experts} "
                              f"experts, the replayed trace {self.spec.layers} x {self.spec.experts}")
        return calib


class Candidates(Protocol):
    """Keys a policy may evict now: resident in its partition and not pinned by the running layer.
    `pos` is the request position the eviction happens at (a policy that ages keys needs it: on a request
    with no hits, `on_access` is not called before `victim`)."""

    pos: int

    def __contains__(self, key: Key) -> bool: ...
    def __iter__(self) -> Iterator[Key]: ...
    def __len__(self) -> int: ...


class CachePolicy:
    """What to evict. One instance per cache partition; the cache calls, in this order per (step, layer):
    `on_access` with the hits (row order, best first), then per miss `victim` (if full), `on_evict`, `on_insert`."""

    bound = False  # True for oracles that read the future: reported as a bound, never as deployable
    refuses = False  # True: `victim` may return None (nothing may be evicted now): the engine then streams a
    #                  demand miss (copies it into a scratch slot, computes it, drops it) and skips a prefetch

    def setup(self, ctx: Context) -> None:
        """Called once before the replay (and again after a reset); default: nothing to learn."""

    def on_access(self, pos: int, keys: Iterable[Key]) -> None:
        """`keys` were requested at `pos` and are resident (hits)."""

    def on_insert(self, pos: int, key: Key, prefetched: bool) -> None:
        """`key` became resident at `pos` (a demand load, or a prefetch when `prefetched`)."""

    def on_evict(self, key: Key) -> None:
        """`key` left the cache."""

    def victim(self, candidates: Candidates) -> Key | None:
        """The key to evict; must be one of `candidates` (never empty when called), or None where `refuses`."""
        raise NotImplementedError


class Prefetcher:
    """What to load before it is asked for. `predict` returns keys, most wanted first; the engine loads
    those not resident through the same cache mechanism (the cache policy picks victims; pinned keys are
    never victims), stopping once `max_inflight` of copies are queued on the copy engine.

    Knobs (set by `__init__`; the class defaults hold for subclasses that do not call it):
    `lookahead` layers ahead a prediction reaches (l+1 .. l+lookahead, running on into the next step),
    `per_layer` keys per predicted layer (None: as many as the prefetcher ranks), `max_inflight` (None: no
    cap; bytes, `256MiB`, or `4 experts`; the engine resolves it, see moesim.units.parse_inflight)."""

    bound = False
    lookahead = 1  # layers
    per_layer: int | None = None  # keys per predicted layer
    max_inflight = None  # cap on queued copies (bytes, "256MiB", "4 experts"); None: no cap

    def __init__(self, lookahead: int = 1, per_layer: int | None = None, max_inflight=None):
        from moesim.units import parse_inflight
        from moesim.errors import MoesimError

        if not isinstance(lookahead, int) or isinstance(lookahead, bool) or lookahead < 1:
            raise MoesimError(f"prefetch.lookahead: expected a whole number of layers >= 1, got {lookahead!r}")
        if per_layer is not None and (not isinstance(per_layer, int) or isinstance(per_layer, bool)
                                      or per_layer < 1):
            raise MoesimError(f"prefetch.per_layer: expected a whole number >= 1 or null, got {per_layer!r}")
        parse_inflight(max_inflight, 1, "prefetch.max_inflight")  # checks the form
        self.lookahead, self.per_layer, self.max_inflight = lookahead, per_layer, max_inflight

    def setup(self, ctx: Context) -> None:
        """Called once before the replay, with the whole-trace context (layers = all layers)."""

    def observe(self, pos: int, layer: int, experts: Iterable[int]) -> None:
        """Layer `layer` of the current step was routed to `experts` (its router has run; its experts have
        not computed yet)."""

    def predict(self, pos: int, layer: int) -> list[Key]:
        """Once layer `layer` is routed at `pos`: keys to fetch ahead (their copies overlap this layer's
        compute), most wanted first; default none."""
        return []


class OffloadPolicy:
    """On a miss: load the expert and wait for it (`"fetch"`), compute it on the host from its host copy
    (`"host"`), or both: compute it on the host now and copy it into the cache in the background for later
    requests (`"host_and_load"`, issued only while less than `max_inflight` of copies are queued), or copy it
    into a scratch slot on the device, compute it there and keep nothing (`"stream"`: Fiddler's placeholder
    expert, llama.cpp's upload of the experts a big batch uses; the cache and its policy never see it; needs
    `scratch_slots` > 0).

    `host_after_device`: True when a layer's host experts start only once its device experts have ended (the
    code of the system modelled runs them in sequence); False: beside them."""

    bound = False
    max_inflight = None  # cap on queued copies for "host_and_load" (as Prefetcher.max_inflight); None: no cap
    host_after_device = False

    def setup(self, ctx: Context) -> None:
        """Called once before the replay."""

    def scratch_slots(self, spec: "ModelSpec") -> int:
        """Device slots, besides the cache's, that this policy's "stream" decisions copy into: the most a layer
        (or wave) streams at once; the layer's streamed experts take them in turn. 0: it never streams."""
        return 0

    def begin_step(self, n_tokens: int) -> None:
        """A step (forward pass) over `n_tokens` tokens starts: for rules on the batch size."""

    def on_miss(self, key: Key, n_tokens: int, cost) -> Literal["fetch", "host", "host_and_load", "stream"]:
        """`cost` answers `cost.fetch_ms(key)`, `cost.device_ms(key, n_tokens)` and `cost.host_ms(key,
        n_tokens)` under the hardware profile."""
        return "fetch"
