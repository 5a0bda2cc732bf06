"""The whole model around its routed experts: what its other weights take (bytes per tensor class), what its
KV cache takes, the VRAM plan of a run, and the time of its non-expert part in each step.

    from moesim.whole import weight_bytes, kv_bytes_per_token, plan_vram, dense_times
    weight_bytes(spec)              # {"experts": ..., "attention": ..., "embed": ..., ...} bytes as stored
    kv_bytes_per_token(spec)        # bytes one token's keys and values take over all layers
    python -m moesim run trace=mixtral-like hardware=rtx-3060-12gb budget=auto   # prints the plan

A spec that does not describe the whole model (spec.whole is False: an older trace) has only its experts
here; every other part is 0 and the plan says so.

What is counted, and moesim's own simplifications (no source states them):
  - weights: every linear layer in its class's format (moesim/formats.py), norms (one hidden-wide vector
    per norm, bf16) and routers (hidden x experts, bf16: small, and kept unquantized by the checkpoints we
    catalogue); biases and attention sinks are left out (under 0.01% of any catalogued model).
  - attention: gqa q [heads*head_dim, hidden] (with q_lora_rank, DeepSeek-V4's low-rank query: q_a
    [q_lora_rank, hidden] + q_b [heads*head_dim, q_lora_rank]), k and v [kv_heads*head_dim, hidden], o [hidden,
    heads*head_dim];
    mla (DeepSeek) q_a [q_lora_rank, hidden] + q_b [heads*(nope+rope), q_lora_rank] (or q directly),
    kv_a [kv_lora_rank+rope, hidden], kv_b [heads*(nope+head_dim), kv_lora_rank], o [hidden, heads*head_dim].
  - KV cache per token and layer: gqa 2 * kv_heads * head_dim values; mla kv_lora_rank + rope_head_dim values
    (the compressed latent, as DeepSeek's own inference code, vLLM and SGLang cache it), in kv_format. A
    sliding-window layer holds at most `sliding_window` tokens; sliding layers are taken to be every other
    layer from the first (gpt-oss's layer_types), which decides only which layers, not how many.
  - step time of the dense part (on the device, a roofline per block like expert_ms): each layer's attention
    reads its weights (+ the router's) and every sequence's KV cache up to its context, and computes
    2 flops per weight and token plus the attention itself (gqa 4 * heads * head_dim flops per token and
    context position; mla absorbed: 2 * heads * (2 * kv_lora_rank + rope_head_dim)); a dense FFN layer is an
    FFN of dense_ffn; the LM head reads vocab x hidden once and computes logits for each decode token and the
    last prompt token of each sequence. Context = the sequence's tokens so far in the trace: a trace that does
    not record its prompts counts no prompt. Fixed costs: 2 kernel_overhead_us per attention block and one per
    dense FFN and LM head.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .errors import MoesimError
from .formats import get_format
from .models import ModelSpec, _ffn_bytes

# --------------------------------------------------------------------------------------------- weights
CLASSES = ("experts", "shared", "dense", "router", "attention", "norms", "embed", "lm_head")


def tensors(spec: ModelSpec) -> list[tuple[str, str, int, int, int, str]]:
    """Every weight matrix of the model: (class, name, rows, cols, how many, format name). The routed experts
    are one row (count = all of them; bytes_per_expert is theirs)."""
    h = spec.hidden
    out = [("experts", "routed expert (gate, up, down)", 3 * spec.ffn, h, spec.total_experts, spec.dtype)]
    if spec.shared_experts:
        out.append(("shared", "shared expert (gate, up, down)", 3 * (spec.shared_ffn or spec.ffn), h,
                    spec.layers * spec.shared_experts, spec.dense_format if spec.whole else spec.dtype))
    if not spec.whole:
        return out
    n = spec.all_layers
    if spec.dense_layers:
        out.append(("dense", "dense FFN (gate, up, down)", 3 * spec.dense_ffn, h, spec.dense_layers, spec.dense_format))
    out.append(("router", "router", spec.experts, h, spec.layers, "bf16"))
    af = spec.attention_format
    if spec.attention == "gqa":
        q, kv = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
        if spec.q_lora_rank:
            out += [("attention", "q_a", spec.q_lora_rank, h, n, af), ("attention", "q_b", q, spec.q_lora_rank, n, af)]
        else:
            out.append(("attention", "q", q, h, n, af))
        out += [("attention", "k, v", 2 * kv, h, n, af), ("attention", "o", h, q, n, af)]
    else:  # mla
        qk = spec.heads * (spec.nope_head_dim + spec.rope_head_dim)
        if spec.q_lora_rank:
            out += [("attention", "q_a", spec.q_lora_rank, h, n, af),
                    ("attention", "q_b", qk, spec.q_lora_rank, n, af)]
        else:
            out.append(("attention", "q", qk, h, n, af))
        out += [("attention", "kv_a", spec.kv_lora_rank + spec.rope_head_dim, h, n, af),
                ("attention", "kv_b", spec.heads * (spec.nope_head_dim + spec.head_dim), spec.kv_lora_rank, n, af),
                ("attention", "o", h, spec.heads * spec.head_dim, n, af)]
    norm_width = 2 * h + spec.q_lora_rank + (spec.kv_lora_rank if spec.attention == "mla" else 0)
    out.append(("norms", "norms", 1, norm_width, n, "bf16"))
    out.append(("norms", "final norm", 1, h, 1, "bf16"))
    out.append(("embed", "token embeddings", spec.vocab, h, 1, spec.embed_format))
    if not spec.tied_embeddings:
        out.append(("lm_head", "LM head", spec.vocab, h, 1, spec.embed_format))
    return out


def weight_bytes(spec: ModelSpec) -> dict[str, int]:
    """Bytes of each tensor class as stored (CLASSES order; 0 where the model has none). FFNs (routed and
    shared experts, dense layers) are counted as ModelSpec counts them (gate and up [ffn, hidden], down
    [hidden, ffn]): the routed experts are exactly total_experts * bytes_per_expert, what the replay moves."""
    out = dict.fromkeys(CLASSES, 0)
    for cls, _name, rows, cols, count, fmt in tensors(spec):
        if cls == "experts":
            one = spec.bytes_per_expert
        elif cls == "shared":
            one = spec.bytes_per_shared_expert
        elif cls == "dense":
            one = _ffn_bytes(fmt, None, spec.hidden, spec.dense_ffn)
        else:
            one = get_format(fmt).tensor_bytes(rows, cols)
        out[cls] += count * one
    return out


def weight_params(spec: ModelSpec) -> dict[str, int]:
    """Parameters (weights) of each tensor class: to hold against a publisher's count."""
    out = dict.fromkeys(CLASSES, 0)
    for cls, _name, rows, cols, count, _fmt in tensors(spec):
        out[cls] += rows * cols * count
    return out


def active_params(spec: ModelSpec) -> int:
    """Parameters one token uses: everything but the routed experts it does not choose (embeddings counted,
    as publishers count them: Mixtral-8x7B's 12.9B)."""
    p = weight_params(spec)
    routed = p["experts"] // max(spec.total_experts, 1) * spec.top_k * spec.layers
    return sum(p.values()) - p["experts"] + routed


def nonexpert_bytes(spec: ModelSpec) -> int:
    """Bytes of everything but the routed experts: what stays on the device whatever the budget."""
    return sum(v for k, v in weight_bytes(spec).items() if k != "experts")


# -------------------------------------------------------------------------------------------- KV cache
def kv_values_per_token(spec: ModelSpec) -> int:
    """Values one layer caches per token (0 where the spec does not describe attention)."""
    if spec.attention == "gqa":
        return 2 * spec.kv_heads * spec.head_dim
    if spec.attention == "mla":
        return spec.kv_lora_rank + spec.rope_head_dim
    return 0


def kv_bytes_per_token(spec: ModelSpec, context: int | None = None) -> int:
    """Bytes of one token's KV over all layers; with `context` (tokens), the bytes of that context per
    sequence instead (sliding layers hold at most sliding_window of them)."""
    per = get_format(spec.kv_format).tensor_bytes(1, kv_values_per_token(spec)) if spec.whole else 0
    if context is None:
        return per * spec.all_layers
    sliding = min(spec.sliding_layers, spec.all_layers)  # a cut-down model may keep the full model's count
    return per * ((spec.all_layers - sliding) * context + sliding * min(context, spec.sliding_window))


# -------------------------------------------------------------------------------------------- VRAM plan
@dataclass(frozen=True)
class VramPlan:
    """Device memory of a run, in bytes: what must be there besides the expert cache, and the cache."""

    card: int  # the hardware profile's VRAM
    weights: int  # non-expert weights (attention, dense layers, shared experts, routers, norms, embeddings)
    kv_cache: int  # context tokens x sequences
    workspace: int  # activations of the largest step
    reserve: int  # the runtime's own (CUDA context, allocator slack): vram.reserve
    experts: int  # the routed expert cache (slots x bytes per expert)
    context: int  # tokens per sequence the KV cache is sized for
    batch: int  # sequences it holds
    whole: bool  # the spec describes the non-expert parts (else weights/kv/workspace cover shared experts only)
    scratch: int = 0  # the offload policy's scratch slots for streamed experts (OffloadPolicy.scratch_slots)

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.workspace + self.reserve + self.experts + self.scratch

    @property
    def fits(self) -> bool:
        return self.total <= self.card

    def to_dict(self) -> dict:
        return {"card": self.card, "weights": self.weights, "kv_cache": self.kv_cache, "workspace": self.workspace,
                "reserve": self.reserve, "experts": self.experts, "scratch": self.scratch, "total": self.total,
                "free": self.card - self.total, "context": self.context, "batch": self.batch, "whole_model": self.whole}

    def lines(self) -> list[str]:
        """The plan as a short table, one part per line (GiB)."""
        g = 2**30
        rows = [("non-expert weights", self.weights, "" if self.whole else "  (shared experts only: the model "
                 "spec does not describe attention or embeddings)"),
                ("KV cache", self.kv_cache, f"  ({self.context} tokens x {self.batch} sequences)"),
                ("activation workspace", self.workspace, ""),
                ("runtime reserve", self.reserve, ""),
                ("expert cache", self.experts, "")] + (
                [("stream scratch", self.scratch, "  (streamed experts: copied, computed, dropped)")]
                if self.scratch else []) + [
                ("total", self.total, f"  of {self.card / g:.2f} GiB on the card"
                 + ("" if self.fits else f": {(self.total - self.card) / g:.2f} GiB over"))]
        return [f"  {k:<22}{v / g:>9.2f} GiB{note}" for k, v, note in rows]


def workspace_bytes(spec: ModelSpec, step_tokens: int, logits: int) -> int:
    """Activations alive at once in the largest step, bytes (moesim's estimate, bf16 activations): the
    residual stream in and out, the larger of the attention's q/k/v/o and an FFN's gate/up outputs (top_k
    experts per token), and fp32 logits. Packed experts are taken to run through a fused dequantizing kernel
    (llama.cpp's, Marlin), as the sim's roofline assumes: no decoded copy (moesim's torch backend decodes into a
    workspace of its own, which its memory() reports)."""
    h, n = spec.hidden, step_tokens
    attn = n * (spec.heads + 2 * spec.kv_heads) * max(spec.head_dim, 1) * 2 if spec.whole else 0
    ffn = n * 2 * max(spec.top_k * spec.ffn, spec.dense_ffn, spec.shared_ffn or 0) * 2
    return 2 * n * h * 2 + max(attn, ffn) + logits * spec.vocab * 4


def plan_vram(spec: ModelSpec, card_bytes: int, expert_bytes: int, context: int, batch: int, step_tokens: int,
              logits: int, reserve: int, scratch_bytes: int = 0) -> VramPlan:
    """The VRAM plan of `spec` (the real model, formats applied) on a card of `card_bytes` with an expert cache
    of `expert_bytes`, a KV cache for `batch` sequences of `context` tokens, the largest step of `step_tokens`
    tokens with `logits` rows of logits, `reserve` bytes for the runtime and `scratch_bytes` for streamed experts."""
    w = weight_bytes(spec)
    return VramPlan(card=int(card_bytes), weights=sum(v for k, v in w.items() if k != "experts"),
                    kv_cache=kv_bytes_per_token(spec, context) * batch,
                    workspace=workspace_bytes(spec, step_tokens, logits), reserve=int(reserve),
                    experts=int(expert_bytes), context=int(context), batch=int(batch), whole=spec.whole,
                    scratch=int(scratch_bytes))


# ------------------------------------------------------------------------------------ trace's contexts
@dataclass(frozen=True)
class Contexts:
    """Per step of a trace: what the dense part's time depends on (arrays of length n_steps)."""

    tokens: np.ndarray  # int64: tokens in the step
    kv_reads: np.ndarray  # int64: sum over the step's sequences of their context at the step's end
    attended: np.ndarray  # int64: sum over the step's tokens of the positions each attends to
    logits: np.ndarray  # int64: rows of logits (decode tokens + each prompt's last token)
    kv_reads_win: np.ndarray  # the same two, each context capped at the sliding window
    attended_win: np.ndarray
    prefill: np.ndarray  # bool: the step holds prompt tokens
    max_context: int  # longest sequence (tokens)
    max_batch: int  # most sequences in one step
    max_tokens: int  # most tokens in one step
    max_logits: int


def contexts(trace, window: int = 0) -> Contexts:
    """The per-step contexts of `trace` (its seq, step and phase arrays); `window`: the sliding window."""
    seq = np.asarray(trace.seq, dtype=np.int64)
    phase = np.asarray(trace.phase)
    T = len(seq)
    order = np.argsort(seq, kind="stable")
    s_sorted = seq[order]
    first = np.ones(T, bool)
    first[1:] = s_sorted[1:] != s_sorted[:-1]
    idx = np.arange(T)
    run_start = np.maximum.accumulate(np.where(first, idx, 0))
    pos = np.empty(T, np.int64)
    pos[order] = idx - run_start + 1  # tokens of its sequence up to and including it
    starts = np.asarray(trace.step_starts, dtype=np.int64)
    S = len(starts) - 1
    step_of = np.repeat(np.arange(S), np.diff(starts))
    # the last token of each (step, sequence): its position is the sequence's context at the step's end
    key = step_of * (int(seq.max(initial=0)) + 1) + seq
    o2 = np.argsort(key, kind="stable")
    last = np.ones(T, bool)
    last[:-1] = key[o2][1:] != key[o2][:-1]
    last_tok = o2[last]
    win = window if window > 0 else np.iinfo(np.int64).max
    kv = np.bincount(step_of[last_tok], weights=pos[last_tok], minlength=S)
    kv_w = np.bincount(step_of[last_tok], weights=np.minimum(pos[last_tok], win), minlength=S)
    att = np.add.reduceat(pos, starts[:-1]) if T else np.zeros(0)
    att_w = np.add.reduceat(np.minimum(pos, win), starts[:-1]) if T else np.zeros(0)
    decode = phase != 0
    logits = np.bincount(step_of, weights=decode, minlength=S)
    pf_last = last_tok[~decode[last_tok]]  # a prompt's last token in the step
    logits += np.bincount(step_of[pf_last], minlength=S)
    prefill = np.bincount(step_of, weights=~decode, minlength=S) > 0
    batch = np.bincount(step_of[last_tok], minlength=S)
    tokens = np.diff(starts)
    return Contexts(tokens=tokens.astype(np.int64), kv_reads=kv.astype(np.int64), attended=att.astype(np.int64),
                    logits=logits.astype(np.int64), kv_reads_win=kv_w.astype(np.int64),
                    attended_win=att_w.astype(np.int64), prefill=prefill,
                    max_context=int(pos.max(initial=0)), max_batch=int(batch.max(initial=0)),
                    max_tokens=int(tokens.max(initial=0)), max_logits=int(logits.max(initial=0)))


# ------------------------------------------------------------------------------------ dense step time
@dataclass(frozen=True)
class DenseTimes:
    """The non-expert part of each step on the device, in ms: the sim adds `head` before a step's first MoE
    layer (embeddings and the dense layers), `attention[s, cls[l]]` before MoE layer l's experts are looked
    up (its attention and router: the experts it routes to are known only after it), and `tail` after the last
    (final norm and LM head)."""

    attention: np.ndarray  # float64 [S, 2]: a full-attention layer, a sliding-window layer
    cls: np.ndarray  # int64 [L]: 1 where MoE layer l slides
    head: np.ndarray  # float64 [S]
    tail: np.ndarray  # float64 [S]

    @property
    def total_ms(self) -> np.ndarray:
        """Per step: the whole dense part."""
        per_layer = self.attention[:, self.cls].sum(axis=1) if len(self.cls) else 0.0
        return self.head + per_layer + self.tail

    @staticmethod
    def none(n_steps: int, n_layers: int) -> "DenseTimes":
        """No dense part (an experts-only spec, or whole_model=false)."""
        return DenseTimes(np.zeros((n_steps, 2)), np.zeros(n_layers, np.int64), np.zeros(n_steps), np.zeros(n_steps))


def sliding_blocks(spec: ModelSpec) -> np.ndarray:
    """bool [all_layers]: which transformer blocks attend through the sliding window (every other one from
    the first, as many as spec.sliding_layers)."""
    out = np.zeros(spec.all_layers, bool)
    k = 0
    for i in range(0, spec.all_layers, 2):
        if k == spec.sliding_layers:
            break
        out[i], k = True, k + 1
    for i in range(1, spec.all_layers, 2):  # more than half slide: the rest of them
        if k == spec.sliding_layers:
            break
        out[i], k = True, k + 1
    return out


def dense_times(spec: ModelSpec, hardware, ctx: Contexts) -> DenseTimes:
    """The dense part of every step of a trace whose contexts are `ctx`, on `hardware`'s device."""
    S, L = len(ctx.tokens), spec.layers
    if not spec.whole:
        return DenseTimes.none(S, L)
    mem = hardware.device_mem_gbps * 1e6  # bytes per ms
    rate = hardware.device_tflops * 1e9  # flop per ms
    k_ms = hardware.kernel_overhead_us * 1e-3
    n = ctx.tokens.astype(np.float64)
    w = weight_bytes(spec)
    p = weight_params(spec)
    layers = spec.all_layers
    attn_bytes = w["attention"] / layers
    attn_params = p["attention"] / layers
    router_bytes, router_params = w["router"] / max(L, 1), p["router"] / max(L, 1)
    kv_tok = kv_bytes_per_token(spec) / layers  # bytes per token and layer
    if spec.attention == "gqa":
        core = 4.0 * spec.heads * spec.head_dim  # flops per token and attended position
    else:
        core = 2.0 * spec.heads * (2 * spec.kv_lora_rank + spec.rope_head_dim)

    def attention(kv_reads, attended, router: bool):
        b = attn_bytes + (router_bytes if router else 0.0) + (kv_reads + n) * kv_tok
        f = 2.0 * (attn_params + (router_params if router else 0.0)) * n + core * attended
        return np.maximum(b / mem, f / rate) + 2 * k_ms

    full = attention(ctx.kv_reads, ctx.attended, True)
    slide = attention(ctx.kv_reads_win, ctx.attended_win, True)
    blocks = sliding_blocks(spec)
    cls = blocks[spec.dense_layers:].astype(np.int64)
    head = (n * spec.hidden * get_format(spec.embed_format).bits / 8) / mem  # embedding rows read
    if spec.dense_layers:
        ffn_b, ffn_p = w["dense"] / spec.dense_layers, p["dense"] / spec.dense_layers
        ffn = np.maximum(ffn_b / mem, 2.0 * ffn_p * n / rate) + k_ms
        dense_full = attention(ctx.kv_reads, ctx.attended, False) + ffn  # a dense block has no router
        dense_slide = attention(ctx.kv_reads_win, ctx.attended_win, False) + ffn
        sliding = int(blocks[:spec.dense_layers].sum())
        head = head + (spec.dense_layers - sliding) * dense_full + sliding * dense_slide
    lm_bytes = (w["lm_head"] or w["embed"])
    lm = np.maximum(lm_bytes / mem, 2.0 * spec.vocab * spec.hidden * ctx.logits / rate) + k_ms
    return DenseTimes(np.stack([full, slide], axis=1), cls, np.asarray(head, np.float64) + np.zeros(S),
                      np.asarray(lm, np.float64))


def check_plan(plan: VramPlan, force: bool) -> str | None:
    """Refuses a plan over the card (MoesimError with its lines), or with `force` returns the warning."""
    if plan.fits:
        return None
    text = ("the VRAM plan needs more than the card holds:\n" + "\n".join(plan.lines())
            + "\nlower the budget (budget=auto takes what is left), shorten the context (vram.context=...) or the "
              "batch (vram.batch=...), pick a smaller format (model.experts_format=q4_k), or pass vram.force=true "
              "to run it anyway")
    if not force:
        raise MoesimError(text)
    return "warning: " + text.replace("\nlower the budget", "\n(vram.force=true: running it anyway) lower the budget")


# ------------------------------------------------------------------------------------ a run's spec
WHOLE_FIELDS = ("attention", "heads", "kv_heads", "head_dim", "q_lora_rank", "kv_lora_rank", "rope_head_dim",
                "nope_head_dim", "dense_layers", "dense_ffn", "vocab", "tied_embeddings", "sliding_window",
                "sliding_layers", "attention_format", "dense_format", "embed_format", "kv_format")
ROUTING = ("layers", "experts", "top_k", "hidden", "ffn", "shared_experts", "shared_ffn")


def completed(spec: ModelSpec, config=None) -> ModelSpec:
    """`spec` (a trace's) with the rest of the model: from a Hugging Face config.json (`config`, a path or a
    dict; its MoE numbers must match the trace's), else from the catalogue entry of the same name and the same
    MoE numbers where the spec itself does not describe it (traces recorded before whole-model specs)."""
    if config is not None:
        from .hf_config import spec_from_hf_config

        other = spec_from_hf_config(config)
        where = f"model.config={config}" if not isinstance(config, dict) else "model.config"
    elif spec.whole:
        return spec
    else:
        from .catalogue import MODEL_SPECS

        other = MODEL_SPECS.get(spec.name.split("@")[0])
        if other is None or not other.whole:
            return spec
        where = None
    def value(s, k):  # shared_ffn 0 means "as ffn"
        return (s.shared_ffn or s.ffn) if k == "shared_ffn" and s.shared_experts else getattr(s, k)

    differ = [f"{k} {value(spec, k)} vs {value(other, k)}" for k in ROUTING if value(spec, k) != value(other, k)]
    if differ:
        if where is None:
            return spec  # a model of the same name but other numbers: leave it as the trace says
        raise MoesimError(f"{where}: its MoE layers differ from the trace's model {spec.name!r}: "
                          f"{'; '.join(differ)} (trace vs config)")
    return dataclasses.replace(spec, **{k: getattr(other, k) for k in WHOLE_FIELDS})


def ttft_ms(trace, step_start: np.ndarray, step_end: np.ndarray) -> np.ndarray:
    """Time to first token of every sequence with prompt tokens in the trace (ms): from the start of the step
    holding its first prompt token to the end of the step holding its last (which yields the first token)."""
    starts = np.asarray(trace.step_starts, dtype=np.int64)
    step_of = np.repeat(np.arange(len(starts) - 1), np.diff(starts))
    prompt = np.asarray(trace.phase) == 0
    if not prompt.any():
        return np.zeros(0)
    seq, st = np.asarray(trace.seq)[prompt], step_of[prompt]
    order = np.lexsort((st, seq))
    seq, st = seq[order], st[order]
    firsts = np.r_[True, seq[1:] != seq[:-1]]
    lasts = np.r_[seq[1:] != seq[:-1], True]
    return np.asarray(step_end)[st[lasts]] - np.asarray(step_start)[st[firsts]]


def step_split(profiler_arrays, dense: "DenseTimes | None", totals: dict | None = None) -> dict:
    """A step's time, split (mean ms per step): `dense` (attention, dense layers, LM head), `expert_compute`
    (routed and shared experts on the device), `stall` (waiting for expert copies), `other` (the rest of the
    latency: host experts not hidden under the device's, the replay's own time); the four sum to the mean
    step latency. Besides: `host_compute` (the host's busy time) and `copies` (the copy engine's busy time),
    which overlap the others. `totals`: a replay's sums in place of its copies and computes (an ArrayProfiler's,
    moesim.core.simulate(events=False))."""
    st, cp, cm = profiler_arrays
    S = max(len(st), 1)
    lat = float((st[:, 3] - st[:, 2]).sum())
    dense_ms = float(dense.total_ms.sum()) if dense is not None else 0.0
    if totals is not None:  # copies queue one after another: their union is loads x one copy
        expert, stall, host = totals["device_compute_ms"], totals["stall_ms"], totals["host_compute_ms"]
        copies = totals["loads"] * totals["copy_ms"]
    else:
        from .profiler import covered_ms

        dev = cm[:, 4] == 0
        expert = float((cm[dev, 2] - cm[dev, 1]).sum())
        stall = float(cm[dev, 3].sum())
        host = float((cm[~dev, 2] - cm[~dev, 1]).sum())
        copies = covered_ms([(cp[:, 3], cp[:, 4])])
    return {"dense": dense_ms / S, "expert_compute": expert / S, "stall": stall / S,
            "other": max(0.0, lat - dense_ms - expert - stall) / S, "host_compute": host / S, "copies": copies / S}


def decode_rate(trace, steps: np.ndarray) -> float | None:
    """Decode tokens per second: the decode tokens of steps without prompt tokens over those steps' time
    (steps: the profiler's step rows; None without such steps)."""
    starts = np.asarray(trace.step_starts, dtype=np.int64)
    if len(steps) != len(starts) - 1:
        return None
    prompt = np.add.reduceat((np.asarray(trace.phase) == 0).astype(np.int64), starts[:-1]) if len(steps) else []
    decode = np.asarray(prompt) == 0
    ms = float((steps[decode, 3] - steps[decode, 2]).sum())
    return float(steps[decode, 1].sum()) / (ms / 1e3) if ms > 0 else None


def percentiles(values) -> dict:
    """p50, p90, p99 and mean of `values` (ms)."""
    v = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = (float(x) for x in np.percentile(v, [50, 90, 99]))
    return {"p50": p50, "p90": p90, "p99": p99, "mean": float(v.mean())}
