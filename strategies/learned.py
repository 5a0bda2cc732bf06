"""Learned eviction: a small network, trained offline to imitate Belady, ranks the residents by how far away their
next request is; the farthest is evicted. `strategy=learned` (the shipped model for gpt-oss-20b);
`strategy=learned strategy.cache.model=FILE` for one trained by `python -m moesim train-policy`.

moesim's own design, after the idea of LRB (Song et al., NSDI 2020: learn to predict the next request's
distance from past gaps and decayed counts; evict the farthest) and of PARROT (Liu et al., ICML 2020: imitate
Belady, training on the states the learned policy itself visits). Neither's code or features are used here.
Features of a resident key (l, e) when a victim is chosen at request position pos (step t = pos // L), all
known then (the router of step t has run for layer l; nothing later is read):

    0  log1p(steps since its last request)           (log1p(1e5) if never requested)
    1  log1p(gap between its last two requests)      (the same if none)
    2  log1p(the gap before that)
    3-5  its requests decayed with half-lives of 4, 32 and 256 steps
    6  its requests in the current sequence / steps of the sequence so far
    7  log1p(steps of the sequence so far)
    8  sum over experts a of the latest request of layer l of P[l, a, e]: the share of training steps whose
       request of layer l held e one step after holding a (the model's transition table)
    9  the share of training steps whose request of layer l held e
    10 as 8, from the request before the latest one (same sequence), with the two-step table P2
    11 1 if it was requested in the current sequence, else 0

The network: standardise, two hidden ReLU layers of `hidden` units, one output (the predicted log1p of the
steps to the next request, capped at LABEL_CAP). Ties go to the older last request, then to the lower key.
The sequence of a step is the trace's `seq` (a server knows which request a token belongs to). A prefetched
load is not a request. The model file is safetensors (tensors and a metadata header, no code: never pickle):
`save_model` / `load_model`; moesim/core/policies.py runs the same arithmetic compiled.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

import numpy as np

from moesim.errors import MoesimError, NotApplicable

from . import CachePolicy, Key

HALF_LIVES = (4.0, 32.0, 256.0)  # steps
NO_GAP = 1e5  # steps: the gap of a request that never happened
LN2 = math.log(2.0)
N_FEATURES = 12
LABEL_CAP = 2000  # steps: longer distances to the next request are learned as this one
FORMAT = "moesim-learned-policy/1"
TENSORS = ("mu", "sd", "w1", "b1", "w2", "b2", "w3", "b3", "pop", "P", "P2")
SHIPPED_DIR = Path(__file__).resolve().parent / "models"  # name -> models/<name>.policy.safetensors


def model_path(ref: str) -> Path:
    """The file a `model` option names: a path, or the name of a model shipped in strategies/models/."""
    p = Path(str(ref)).expanduser()
    if p.suffix == ".safetensors" or p.exists():
        return p
    shipped = SHIPPED_DIR / f"{ref}.policy.safetensors"
    if shipped.exists():
        return shipped
    names = sorted(f.name.split(".")[0] for f in SHIPPED_DIR.glob("*.policy.safetensors"))
    raise MoesimError(f"strategy.cache.model={ref}: no such file, and not a shipped model "
                      f"(shipped: {', '.join(names) or 'none'}); train one with `python -m moesim train-policy`")


def save_model(path, tensors: dict, meta: dict) -> Path:
    """Write a model (TENSORS as float32 arrays, `meta` as text) to `path`, atomically."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    header = {"format": FORMAT, **{k: json.dumps(v) for k, v in meta.items()}}
    save_file({k: np.ascontiguousarray(tensors[k], np.float32) for k in TENSORS}, str(tmp), metadata=header)
    tmp.replace(path)
    return path


def load_model(ref) -> tuple[dict, dict]:
    """(tensors as float64 arrays, metadata) of the model file `ref` names, checked for shape."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    from safetensors import safe_open

    path = model_path(ref)
    if not path.is_file():
        raise MoesimError(f"strategy.cache.model={ref}: {path} does not exist")
    try:
        with safe_open(str(path), "np") as f:
            header = f.metadata() or {}
        t = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise MoesimError(f"{path}: not a safetensors file ({e})") from None
    if header.get("format") != FORMAT:
        raise MoesimError(f"{path}: not a moesim learned policy (metadata format={header.get('format')!r}, "
                          f"expected {FORMAT!r})")
    missing = [k for k in TENSORS if k not in t]
    if missing:
        raise MoesimError(f"{path}: tensors {', '.join(missing)} missing")
    t = {k: np.asarray(t[k], np.float64) for k in TENSORS}
    L, E = t["pop"].shape if t["pop"].ndim == 2 else (0, 0)
    H = t["b1"].shape[0]
    want = {"mu": (N_FEATURES,), "sd": (N_FEATURES,), "w1": (H, N_FEATURES), "b1": (H,), "w2": (H, H), "b2": (H,),
            "w3": (1, H), "b3": (1,), "pop": (L, E), "P": (L, E, E), "P2": (L, E, E)}
    for k, shape in want.items():
        if t[k].shape != shape or not np.all(np.isfinite(t[k])):
            raise MoesimError(f"{path}: tensor {k} has shape {t[k].shape}, expected {shape} of finite numbers")
    if np.any(t["sd"] <= 0):
        raise MoesimError(f"{path}: tensor sd must be positive")
    meta = {k: json.loads(v) for k, v in header.items() if k != "format"}
    return t, meta


def flat_model(t: dict) -> np.ndarray:
    """The model as one float64 array for the compiled core: mu, sd, w1, b1, w2, b2, w3, b3, pop, P, P2, with w1
    and w2 transposed (input-major: the core adds one input to every unit at a time, each unit's sum in `mlp`'s
    order)."""
    return np.concatenate([(t[k].T if k in ("w1", "w2") else t[k]).ravel() for k in TENSORS]).astype(np.float64)


def network(t: dict) -> tuple:
    """The network's tensors as Python lists, for `mlp`."""
    return tuple(t[k].tolist() for k in TENSORS[:8])


def mlp(net: tuple, x: list[float]) -> float:
    """The output of `network(t)` for features `x`, with the compiled core's operations in its order."""
    mu, sd, w1, b1, w2, b2, w3, b3 = net
    xn = [(x[j] - mu[j]) / sd[j] for j in range(N_FEATURES)]
    h1 = []
    for i in range(len(b1)):
        s = b1[i]
        for j in range(N_FEATURES):
            s += w1[i][j] * xn[j]
        h1.append(s if s > 0 else 0.0)
    h2 = []
    for i in range(len(b2)):
        s = b2[i]
        for j in range(len(h1)):
            s += w2[i][j] * h1[j]
        h2.append(s if s > 0 else 0.0)
    s = b3[0]
    for j in range(len(h2)):
        s += w3[0][j] * h2[j]
    return s


class Learned(CachePolicy):
    def __init__(self, model: str = "gpt-oss-20b"):
        if not isinstance(model, (str, Path)):
            raise MoesimError(f"strategy.cache.model: expected a model file or a shipped model's name, got {model!r}")
        self.model = str(model)

    def setup(self, ctx) -> None:
        self.t, self.meta = load_model(self.model)
        L, E = ctx.spec.layers, ctx.spec.experts
        if self.t["pop"].shape != (L, E):  # a sweep or plan over other models lists it as not applicable
            raise NotApplicable(f"strategy.cache.model={self.model}: trained for {self.t['pop'].shape[0]} layers x "
                              f"{self.t['pop'].shape[1]} experts ({self.meta.get('model', '?')}); the trace's model "
                              f"{ctx.spec.name} has {L} x {E}; train one for it with `python -m moesim train-policy "
                              f"trace=...`")
        self.L, self.E = L, E
        self.trace = ctx.trace
        self.starts = ctx.trace.step_starts.tolist()
        self.step_seq = ctx.trace.step_seq().tolist()
        self.P, self.P2, self.pop = self.t["P"].tolist(), self.t["P2"].tolist(), self.t["pop"].tolist()
        self.net = network(self.t)
        self.last: dict[Key, int] = {}  # step of its last request
        self.g1: dict[Key, int] = {}
        self.g2: dict[Key, int] = {}
        self.dc: dict[Key, list[float]] = {}  # decayed requests at its last request
        self.scnt: dict[Key, int] = {}  # requests in the current sequence
        self.ts: dict[Key, float] = {}  # transition scores (features 8 and 10) and the next TS2 (q)
        self.ts2: dict[Key, float] = {}
        self.q: dict[Key, float] = {}
        self.resident: set[Key] = set()
        self.seq = None
        self.sstart = 0
        self.now = -1  # the position of the latest request read (victims are ranked there)

    def _request(self, pos: int) -> None:
        """The request at `pos`, read from the trace (the router has run): every key's history moves on."""
        L, E = self.L, self.E
        t, layer = pos // L, pos % L
        seq = self.step_seq[t]
        if seq != self.seq:  # a new sequence: its counts and the previous request's scores start empty
            self.seq, self.sstart = seq, t
            self.scnt = dict.fromkeys(self.scnt, 0)  # (an instance sees only its partition's layers)
            self.q = dict.fromkeys(self.q, 0.0)
        rows = self.trace.experts[self.starts[t]:self.starts[t + 1], layer]
        ids = sorted({int(e) for e in np.asarray(rows).ravel() if e >= 0})
        P, P2 = self.P[layer], self.P2[layer]
        for e in range(E):
            key = (layer, e)
            self.ts2[key] = self.q.get(key, 0.0)
            s = s2 = 0.0
            for a in ids:
                s += P[a][e]
                s2 += P2[a][e]
            self.ts[key], self.q[key] = s, s2
        for e in ids:
            key = (layer, e)
            last = self.last.get(key, -1)
            if last >= 0:
                self.g2[key] = self.g1.get(key, -1)
                self.g1[key] = t - last
                self.dc[key] = [self.dc[key][h] * math.exp(-(t - last) * LN2 / HALF_LIVES[h]) + 1.0 for h in range(3)]
            else:
                self.dc[key] = [1.0, 1.0, 1.0]
            self.last[key] = t
            self.scnt[key] = self.scnt.get(key, 0) + 1

    def _at(self, pos: int) -> None:
        if pos != self.now:
            self.now = pos
            self._request(pos)

    def on_access(self, pos: int, keys: Iterable[Key]) -> None:
        self._at(pos)

    def on_insert(self, pos: int, key: Key, prefetched: bool) -> None:
        self.resident.add(key)

    def on_evict(self, key: Key) -> None:
        self.resident.discard(key)

    def features(self, key: Key, pos: int) -> list[float]:
        t = pos // self.L
        last = self.last.get(key, -1)
        g1, g2 = self.g1.get(key, -1), self.g2.get(key, -1)
        x = [math.log1p(t - last) if last >= 0 else math.log1p(NO_GAP),
             math.log1p(g1) if g1 >= 0 else math.log1p(NO_GAP),
             math.log1p(g2) if g2 >= 0 else math.log1p(NO_GAP)]
        for h in range(3):
            x.append(self.dc[key][h] * math.exp(-(t - last) * LN2 / HALF_LIVES[h]) if last >= 0 else 0.0)
        n = t - self.sstart + 1
        c = self.scnt.get(key, 0)
        x += [c / n, math.log1p(n), self.ts.get(key, 0.0), self.pop[key[0]][key[1]], self.ts2.get(key, 0.0),
              1.0 if c > 0 else 0.0]
        return x

    def victim(self, candidates) -> Key:
        pos = getattr(candidates, "pos", self.now)
        best, best_rank = None, None
        for key in self.resident:
            if key in candidates:
                rank = (-mlp(self.net, self.features(key, pos)), self.last.get(key, -1), key)
                if best_rank is None or rank < best_rank:
                    best, best_rank = key, rank
        if best is None:
            raise ValueError(f"Learned.victim: none of the candidates {sorted(candidates)} is resident")
        return best
