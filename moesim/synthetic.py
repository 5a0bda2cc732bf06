"""Synthetic routing traces with controlled skew, token-to-token reuse and layer-to-layer correlation.

    python -m moesim stats trace=gpt-oss-like         # a preset, generated on the fly (deterministic by seed)
    python -m moesim stats trace=uniform

    from moesim.synthetic import SyntheticConfig, generate, preset_trace
    tr = generate(SyntheticConfig(seed=1, skew=1.2, reuse=0.5, batch=8), model_spec("mixtral-8x7b"))

The generator imitates a router: at token t and MoE layer l it scores every expert and takes the top k.
The score of expert e is

    x[t, l, e] = skew[l] * q[l, e]              popularity: q = evenly spaced N(0, 1) quantiles, dealt
                                                to the experts of each layer in a random order
               + topic[l] * g[seq, l, e]        the sequence's own tilt (subject of the prompt), g ~ N(0, 1)
               + W[l, :, e] . h[seq, t, l]      a shared low-rank state (`rank` dims; columns of W unit)
               + noise * p[seq, t, l, e]        private per-expert noise

h and p have unit variance and follow, along a sequence, an AR(1) process with coefficient reuse[l]:
`reuse` 0 routes consecutive tokens independently, near 1 a token routes like the one before it. The
innovations of h are correlated from layer l-1 to layer l with coefficient layer_corr[l], and so are the
sequence tilts g, through a fixed random pairing of the experts of consecutive layers (expert e at l
"succeeds" one expert at l-1): `layer_corr` near 1 makes a token's experts at l+1 predictable from its
experts at l. Experts with similar columns of W are chosen together, as in real routers. Gate weights
are the softmax of the k chosen scores divided by `gate_temperature`, so ids are distinct and sorted by
weight, best first. With `rank=0, noise=1` and all else 0 every row is k experts drawn uniformly at
random: the `uniform` preset.

Why a latent router rather than "keep each previous expert with probability p, draw an expert from a
successor distribution of the previous layer's with probability q": on gpt-oss-20b the experts of
consecutive layers share 0.50 bits (`coact_mi_bits` of `moesim stats`). That mechanism reached 0.10 bits
at q = 1 (tried while fitting), because rows of independently drawn experts carry little for a successor
to follow. Real rows do (two experts of one row share 0.60 bits), and a shared low-rank state gives both.

The preset `gpt-oss-like` is fitted to the real gpt-oss-20b traces (GPT_OSS_FIT says how). Its
statistics agree with the real trace's within 10% as means over layers for every measure of `moesim
stats` (hottest share, entropy, overlap with the previous token, reuse-distance p50/p90/p99 and mean,
co-activation MI and NMI), and layer by layer for hottest share, entropy and overlap (within 7%); layer
by layer, reuse-distance quantiles differ by up to 24% (they are integers: 4 against 5 is 20%) and
co-activation by up to 34% (layer_corr reaches 1 at layers 10-13 and 22-23 and still falls short there).
tests/test_synthetic.py checks the 10%.

Scheduling: sequences are served by continuous batching with `batch` slots. A sequence that takes a free
slot first runs its prompt as one prefill step (phase 0; none when its prompt length is 0; with
`prefill_chunk` N, as steps of at most N tokens: chunked prefill, llama.cpp's ubatch), then one
token per decode step (phase 1) shared with the other active sequences, until its decode tokens are done;
the next sequence then takes its slot. Prompt and decode lengths are drawn per sequence, uniformly in the
given inclusive ranges. Routing is a property of the sequence, not of the schedule: prefill tokens are
routed like decode tokens, continuing the same AR(1) chain. The same seed gives the same trace.

Knobs that take a float also take one value per MoE layer (a tuple of length `layers`); `skew_jitter` j
multiplies every layer's skew by a factor drawn uniformly from [1 - j, 1 + j].
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from statistics import NormalDist

import numba
import numpy as np

from .errors import MoesimError
from .models import ModelSpec, model_spec
from .trace import DECODE, PREFILL, Trace, from_arrays

PerLayer = float | tuple[float, ...]
CHUNK_TOKENS = 4096  # tokens whose noise is drawn at a time (bounded memory: chunk x L x E floats)


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of the generator (see the module docstring for what each one does)."""

    seed: int = 0
    sequences: int = 100  # requests in the trace
    decode_tokens: tuple[int, int] = (64, 512)  # decode tokens per sequence: uniform in [lo, hi]
    prompt_tokens: tuple[int, int] = (0, 0)  # prefill tokens per sequence: uniform in [lo, hi]; 0: none
    batch: int = 1  # sequences decoded together (continuous batching slots)
    prefill_chunk: int = 0  # tokens per prefill step at most (0: a prompt is one step)
    skew: PerLayer = 0.5  # std of the experts' fixed popularity scores; 0 = no favourites
    skew_jitter: float = 0.0
    topic: PerLayer = 0.0  # std of each sequence's own tilt of the scores; 0 = all sequences alike
    reuse: PerLayer = 0.0  # token-to-token correlation of the router state, in [0, 1)
    layer_corr: PerLayer = 0.0  # layer-to-layer correlation of state and tilt, in [0, 1]
    rank: int = 3  # dims of the shared state; 0 = experts scored independently
    noise: float = 0.1  # std of the private per-expert noise
    gate_temperature: float = 1.0  # gate weights: softmax(chosen scores / gate_temperature)


# ------------------------------------------------------------------------------------------------ presets
# gpt-oss-20b routing, fitted to the 532 real files of trace=gpt-oss-20b (traces/README.md; 155,103 decode tokens)
# as `moesim stats` measures them, by a search run once (not kept). Stage 1 fitted one value per knob by
# Nelder-Mead on the layer means (rank 3; rank 2 fitted as well, ranks 4, 6 and 8 worse); stage 2 fitted skew, topic, reuse and layer_corr per layer by damped
# fixed-point updates on the per-layer hottest share, within-sequence-shuffled overlap (the sequence-level
# part of the overlap), overlap with the previous token and co-activation MI; gate_temperature by bisection
# on the mean top-1 gate weight. Targets (real, mean over layers): hottest share 0.341, entropy 4.579 bits,
# overlap with the previous token 1.721, reuse distance p50/p90/p99 3.75/14.9/23.9 and mean 5.68,
# co-activation MI 0.495 bits (normalised 0.109), shuffled overlap 1.240, top-1 gate weight 0.351.
# Per layer the real hottest share runs 0.25..0.50 and the overlap 0.75..2.33.
GPT_OSS_FIT = dict(
    skew=(0.181, 0.259, 0.342, 0.482, 0.502, 0.263, 0.223, 0.211, 0.264, 0.287, 0.633, 0.537,
          0.552, 0.584, 0.406, 0.245, 0.288, 0.322, 0.396, 0.38, 0.226, 0.508, 0.634, 0.738),
    topic=(0.224, 0.344, 0.438, 0.581, 0.682, 0.558, 0.457, 0.355, 0.522, 0.692, 0.786, 0.869,
           0.87, 0.849, 0.432, 0.395, 0.493, 0.581, 0.366, 0.493, 0.425, 0.662, 0.48, 0.779),
    reuse=(0.007, 0.137, 0.341, 0.316, 0.417, 0.367, 0.364, 0.317, 0.376, 0.432, 0.509, 0.495,
           0.53, 0.542, 0.41, 0.383, 0.495, 0.435, 0.305, 0.37, 0.282, 0.317, 0.306, 0.43),
    layer_corr=(0.988, 0.776, 0.85, 0.881, 0.952, 0.923, 0.814, 0.878, 0.962, 0.991, 0.999, 1.0,
                1.0, 1.0, 0.996, 0.986, 0.976, 0.993, 0.989, 0.996, 0.987, 0.997, 1.0, 1.0),
    # stage 1 drove the private noise to 0.012; at 0 every statistic above moves by < 0.5% and generating
    # takes half the time (no per-expert noise to draw)
    rank=3, noise=0.0, gate_temperature=1.19,
)



def _resampled(fit: dict, layers: int) -> dict:
    """`fit` with its per-layer knobs stretched to `layers` layers by relative depth (linear interpolation)."""
    out = dict(fit)
    for k, v in fit.items():
        if isinstance(v, tuple):
            x = np.linspace(0, 1, len(v))
            out[k] = tuple(float(round(y, 3)) for y in np.interp(np.linspace(0, 1, layers), x, v))
    return out


# name -> (knobs, model preset). Only the routing of the gpt-oss presets is fitted to data.
PRESETS: dict[str, tuple[SyntheticConfig, str]] = {
    # The default trace of `python -m moesim run` and `stats`: batch-1 decode like the real files;
    # 100 sequences of 32..512 decode tokens (29,664 tokens with seed 0; the real files average 292).
    "gpt-oss-like": (SyntheticConfig(seed=0, sequences=100, decode_tokens=(32, 512), **GPT_OSS_FIT), "gpt-oss-20b"),
    # The same routing served 8 at a time with prompts. Not fitted: the real files hold no prefill routing,
    # so prompt tokens are routed like decode tokens.
    "gpt-oss-like-batch8": (SyntheticConfig(seed=0, sequences=64, decode_tokens=(32, 512), prompt_tokens=(16, 256),
                                            batch=8, **GPT_OSS_FIT), "gpt-oss-20b"),
    # gpt-oss-120b (36 layers of 128 experts, top-4) routed like gpt-oss-20b: the 20b fit, its per-layer values
    # stretched to 36 layers by relative depth. Not fitted to gpt-oss-120b routing (no trace of it is at hand).
    "gpt-oss-120b-like": (SyntheticConfig(seed=0, sequences=100, decode_tokens=(32, 512), **_resampled(GPT_OSS_FIT, 36)),
                          "gpt-oss-120b"),
    # Not fitted to any trace: a guess. The Mixtral paper (arXiv 2401.04088, section 5) found no clear
    # specialisation of experts by subject and repeated assignment of consecutive tokens above chance,
    # more at later layers: so little skew and topic, reuse growing with depth.
    "mixtral-like": (SyntheticConfig(seed=0, sequences=48, decode_tokens=(32, 256), prompt_tokens=(16, 128), batch=4,
                                     skew=0.3, topic=0.1, reuse=tuple(np.round(np.linspace(0.2, 0.6, 32), 3)),
                                     layer_corr=0.6, rank=3, noise=0.3), "mixtral-8x7b"),
    # Not fitted to any trace: a guess. DeepSeek-V3 balances expert load without an auxiliary loss
    # (little global skew) while its experts specialise by domain (a strong per-sequence topic).
    "deepseek-v3-like": (SyntheticConfig(seed=0, sequences=24, decode_tokens=(16, 64), prompt_tokens=(32, 128),
                                         batch=8, skew=0.2, topic=0.6, reuse=0.3, layer_corr=0.6, rank=6,
                                         noise=0.0), "deepseek-v3"),
    # A baseline with no structure: every row is top-k drawn uniformly at random, independently.
    "uniform": (SyntheticConfig(seed=0, sequences=100, decode_tokens=(32, 512), skew=0.0, topic=0.0, reuse=0.0,
                                layer_corr=0.0, rank=0, noise=1.0), "gpt-oss-20b"),
}


def resampled(cfg: SyntheticConfig, layers: int) -> SyntheticConfig:
    """`cfg` for a model of `layers` layers: its per-layer knobs stretched by relative depth (scalars kept)."""
    import dataclasses

    knobs = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    return dataclasses.replace(cfg, **{k: v for k, v in _resampled(knobs, layers).items() if isinstance(v, tuple)
                                       and k in ("skew", "topic", "reuse", "layer_corr")})


def preset_trace(name: str) -> Trace:
    """The trace of preset `name` (see PRESETS)."""
    if name not in PRESETS:
        raise MoesimError(f"synthetic preset {name!r} unknown; known: {', '.join(PRESETS)}")
    cfg, model = PRESETS[name]
    tr = generate(cfg, model_spec(model))
    tr.source["preset"] = name
    return tr


# --------------------------------------------------------------------------------------------- generator
def generate(cfg: SyntheticConfig, spec: ModelSpec) -> Trace:
    """A trace for `spec` drawn with the knobs of `cfg`; deterministic in cfg.seed."""
    _check(cfg)
    L, E, K = spec.layers, spec.experts, spec.top_k
    rng = np.random.default_rng(cfg.seed)
    skew = _per_layer(cfg.skew, L, "skew") * rng.uniform(1 - cfg.skew_jitter, 1 + cfg.skew_jitter, size=L)
    topic = _per_layer(cfg.topic, L, "topic")
    reuse = _per_layer(cfg.reuse, L, "reuse")
    corr = _per_layer(cfg.layer_corr, L, "layer_corr")
    if (reuse >= 1).any() or (corr > 1).any():
        raise MoesimError(f"synthetic: reuse must be < 1 and layer_corr <= 1, got {cfg.reuse} and {cfg.layer_corr}")

    n = cfg.sequences
    prompt = rng.integers(cfg.prompt_tokens[0], cfg.prompt_tokens[1] + 1, size=n)
    decode = rng.integers(cfg.decode_tokens[0], cfg.decode_tokens[1] + 1, size=n)
    seq_tokens = prompt + decode
    T = int(seq_tokens.sum())

    ranks = np.argsort(rng.random((L, E)), axis=1)  # [L, E] popularity rank of each expert, 0 = hottest
    normal_scores = np.array([NormalDist().inv_cdf(1 - (r + 0.5) / E) for r in range(E)])  # [E] descending
    # each sequence's tilt [n, L, E], passed on from layer to layer through a fixed random pairing of experts
    tilt = rng.standard_normal((n, L, E))
    pairing = np.argsort(rng.random((L, E)), axis=1)  # expert e of layer l follows pairing[l, e] of layer l-1
    for l in range(1, L):
        tilt[:, l] = corr[l] * tilt[:, l - 1, pairing[l]] + math.sqrt(1 - corr[l] ** 2) * tilt[:, l]
    bias = (skew[:, None] * normal_scores[ranks])[None] + topic[None, :, None] * tilt
    W = rng.standard_normal((L, cfg.rank, E))
    W /= np.maximum(np.linalg.norm(W, axis=1, keepdims=True), 1e-12)  # unit columns: W[:, e] . h ~ N(0, 1)

    seq = np.repeat(np.arange(n, dtype=np.int32), seq_tokens)  # sequence-major token order
    first = np.zeros(T, np.bool_)
    first[np.cumsum(seq_tokens) - seq_tokens] = True
    experts = np.empty((T, L, K), np.int16)
    weights = np.empty((T, L, K), np.float32)
    h = np.zeros((L, cfg.rank))  # each layer's shared state, carried along the sequence
    p = np.zeros((L, E), np.float32)  # each layer's private noise, carried along the sequence
    for lo in range(0, T, CHUNK_TOKENS):
        hi = min(T, lo + CHUNK_TOKENS)
        state_noise = rng.standard_normal((hi - lo, L, cfg.rank), dtype=np.float32)
        # drawn only where used: it is most of the generator's time
        private_noise = (rng.standard_normal((hi - lo, L, E), dtype=np.float32) if cfg.noise > 0
                         else np.zeros((1, L, E), np.float32))
        _route(lo, first, seq, bias, W, reuse, corr, state_noise, private_noise, float(cfg.noise),
               float(cfg.gate_temperature), h, p, experts, weights)

    order, step, phase = _schedule(prompt, decode, cfg.batch, cfg.prefill_chunk)  # trace order (sequence-major idx)
    source = {"generator": "moesim.synthetic", "model": spec.name,
              "config": {k: (list(x) if isinstance(x, tuple) else x) for k, x in dataclasses.asdict(cfg).items()}}
    return from_arrays(spec, experts[order], weights[order], step, seq[order], phase, source=source)


def _check(cfg: SyntheticConfig) -> None:
    if cfg.sequences < 1:
        raise MoesimError(f"synthetic: sequences must be >= 1, got {cfg.sequences}")
    if cfg.batch < 1:
        raise MoesimError(f"synthetic: batch must be >= 1, got {cfg.batch}")
    if cfg.prefill_chunk < 0:
        raise MoesimError(f"synthetic: prefill_chunk must be >= 0 (0: a prompt is one step), got {cfg.prefill_chunk}")
    for name in ("decode_tokens", "prompt_tokens"):
        lo, hi = getattr(cfg, name)
        if not (0 <= lo <= hi):
            raise MoesimError(f"synthetic: {name} must be a range (lo, hi) with 0 <= lo <= hi, got {(lo, hi)}")
    if cfg.decode_tokens[0] + cfg.prompt_tokens[0] < 1:
        raise MoesimError("synthetic: every sequence needs a token: decode_tokens or prompt_tokens must start at >= 1")
    if cfg.rank < 0 or cfg.noise < 0 or (cfg.rank == 0 and cfg.noise == 0):
        raise MoesimError(f"synthetic: rank and noise must be >= 0 and not both 0, got {cfg.rank}, {cfg.noise}")
    if not cfg.gate_temperature > 0:
        raise MoesimError(f"synthetic: gate_temperature must be > 0, got {cfg.gate_temperature}")
    if not 0 <= cfg.skew_jitter < 1:
        raise MoesimError(f"synthetic: skew_jitter must be in [0, 1), got {cfg.skew_jitter}")


def _per_layer(value: PerLayer, layers: int, name: str) -> np.ndarray:
    """float [L]: one value per layer."""
    v = np.asarray(value, dtype=np.float64)
    if v.ndim == 0:
        v = np.full(layers, float(v))
    elif v.shape != (layers,):
        raise MoesimError(f"synthetic: {name} has {v.size} values, expected one or one per layer ({layers})")
    if (v < 0).any() or not np.isfinite(v).all():
        raise MoesimError(f"synthetic: {name} must be finite and >= 0, got {value}")
    return v


@numba.njit(cache=True, nogil=True)
def _route(lo, first, seq, bias, W, reuse, corr, state_noise, private_noise, noise, temperature, h, p,
           experts, weights):
    """Route tokens lo .. lo + len(state_noise) - 1 (sequence-major), writing experts and weights [T, L, K].
    h [L, rank] and p [L, E] carry the AR(1) states from one chunk to the next."""
    L, D, E = W.shape
    K = experts.shape[2]
    innovation = np.zeros(D)  # zeros, not empty: layer 0 multiplies it by 0.0, and 0.0 * NaN garbage is NaN
    x = np.empty(E)
    top = np.empty(K)
    ids = np.empty(K, np.int64)
    for i in range(state_noise.shape[0]):
        t = lo + i
        s = seq[t]
        for l in range(L):
            a = 0.0 if first[t] else reuse[l]
            b = math.sqrt(1.0 - a * a)
            c = corr[l] if l > 0 else 0.0
            d = math.sqrt(1.0 - c * c)
            for j in range(D):
                # this token's innovation, correlated with the one of layer l-1; then AR(1) along the sequence
                innovation[j] = c * innovation[j] + d * state_noise[i, l, j]
                h[l, j] = a * h[l, j] + b * innovation[j]
            for e in range(E):  # scores, in loops over contiguous e (vectorised by the compiler)
                x[e] = bias[s, l, e]
            for j in range(D):
                hj = h[l, j]
                for e in range(E):
                    x[e] += W[l, j, e] * hj
            if noise > 0:
                for e in range(E):
                    p[l, e] = a * p[l, e] + b * private_noise[i, l, e]
                    x[e] += noise * p[l, e]
            m = 0  # the best scores so far, descending, in top[:m] with their experts in ids[:m]
            for e in range(E):
                score = x[e]
                if m == K and score <= top[K - 1]:
                    continue
                j = m if m < K else K - 1  # insert: one pass over E, not K
                while j > 0 and top[j - 1] < score:
                    top[j] = top[j - 1]
                    ids[j] = ids[j - 1]
                    j -= 1
                top[j] = score
                ids[j] = e
                m = min(m + 1, K)
            for k in range(K):
                experts[t, l, k] = ids[k]
            total = 0.0
            best_score = top[0]
            for k in range(K):
                top[k] = math.exp((top[k] - best_score) / temperature)
                total += top[k]
            for k in range(K):
                weights[t, l, k] = top[k] / total


def _schedule(prompt: np.ndarray, decode: np.ndarray, batch: int, chunk: int = 0
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, step, phase): trace order as indices into the sequence-major token array, and each trace
    token's step (int32) and phase (uint8), for continuous batching with `batch` slots; prompts in steps of at
    most `chunk` tokens (0: one step each)."""
    n = len(prompt)
    join = np.empty(n, np.int64)  # round at which each sequence takes a slot
    free = np.zeros(batch, np.int64)  # round at which each slot is free again
    for s in range(n):  # the earliest free slot; n is small (requests), so a plain loop
        slot = int(np.argmin(free))
        join[s] = free[slot]
        free[slot] = join[s] + max(int(decode[s]), 1)
    seq_tokens = prompt + decode
    seq = np.repeat(np.arange(n), seq_tokens)
    pos = np.arange(int(seq_tokens.sum())) - np.repeat(np.cumsum(seq_tokens) - seq_tokens, seq_tokens)
    is_decode = pos >= prompt[seq]
    # a round: the prefill steps of the sequences joining in it (by sequence), then one decode step
    round_ = join[seq] + np.where(is_decode, pos - prompt[seq], 0)
    kind = is_decode.astype(np.int64)  # 0 prefill before 1 decode within a round
    piece = pos // chunk if chunk else np.zeros_like(pos)  # which prefill step of its prompt a token is in
    pieces = int(piece.max()) + 1 if len(piece) else 1
    group = np.where(is_decode, 0, seq * pieces + piece)  # prefill steps per sequence; one decode step per round
    order = np.lexsort((pos, seq, group, kind, round_))
    key = np.stack([round_[order], kind[order], group[order]])
    new_step = np.concatenate([[True], (key[:, 1:] != key[:, :-1]).any(axis=0)])
    step = (np.cumsum(new_step) - 1).astype(np.int32)
    phase = np.where(is_decode[order], DECODE, PREFILL).astype(np.uint8)
    return order, step, phase
