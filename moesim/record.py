"""Record routing traces from a Hugging Face MoE model: `python -m moesim record`.

    python -m moesim record model=openai/gpt-oss-20b prompts=prompts.jsonl out=traces/gpt-oss.moetrace.safetensors
    python -m moesim record model=./olmoe prompts=prompts.txt max_new_tokens=64 batch_size=4 device=cuda

Greedy generation over the prompts, `batch_size` at a time with left padding. Every forward pass is one
trace step (the prefill of a batch, then one step per generated token), each prompt one `seq`, and the
tokens of a batch lie together in one step. A forward hook on each MoE layer's router takes the ids and
gate weights exactly as the model applied them: in transformers >= 5 every supported router returns
`(router_logits, weights, ids)` and the experts multiply their outputs by those weights. Padded positions
and the tokens of a sequence after it produced EOS are dropped. Rows are stored best first (DeepSeek's
router picks its top-k unsorted; the recorder sorts each row by weight, pairs kept together).

`predicted` (predict=true): for MoE layer l >= 1, the top-k ids that layer l's router chooses from the
hidden state entering the decoder layer of MoE layer l-1 (normalised with layer l's post-attention norm):
the speculative guess of mixtral-offloading, available one layer ahead. MoE layer 0 has no earlier MoE
layer: its row is -1.

Hooks keep the routers' outputs on the device as lists of tensors and convert once per prompt batch. Each
finished batch is written to `<out>.partial/` (safetensors, atomic); a rerun with the same arguments
resumes from there; the trace is written atomically at the end and the partial folder is removed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import MoesimError
from .files import atomic_write
from .trace import DECODE, PREFILL, SUFFIX, ModelSpec, Trace, from_arrays, save_trace


# ------------------------------------------------------------------------------------------- adapters
@dataclass(frozen=True)
class Adapter:
    """Where one architecture keeps its router and routed experts, relative to a decoder layer."""

    router: str  # attribute path of the router module; it returns (router_logits, weights, ids)
    experts: str  # attribute path of the routed experts (parameters with a leading [E] dimension)
    ffn: str  # config field: intermediate size of one routed expert
    rule: str  # how the router turns logits into ids and weights (as the installed transformers does it)
    shared: Callable = lambda config: (0, 0)  # (shared experts per layer, intermediate size of one)
    norm: str = "post_attention_layernorm"  # the norm in front of the MoE block (used by predict)


ADAPTERS: dict[str, Adapter] = {  # config.model_type -> adapter
    "mixtral": Adapter("mlp.gate", "mlp.experts", "intermediate_size",
                       "softmax over experts, top-k, renormalised to sum 1"),
    "qwen2_moe": Adapter("mlp.gate", "mlp.experts", "moe_intermediate_size",
                         "softmax, top-k, renormalised if norm_topk_prob",
                         shared=lambda c: (1, c.shared_expert_intermediate_size)),
    "qwen3_moe": Adapter("mlp.gate", "mlp.experts", "moe_intermediate_size",
                         "softmax, top-k, renormalised if norm_topk_prob"),
    "olmoe": Adapter("mlp.gate", "mlp.experts", "intermediate_size",
                     "softmax, top-k, renormalised if norm_topk_prob"),
    "deepseek_v2": Adapter("mlp.gate", "mlp.experts", "moe_intermediate_size",
                           "softmax; top-k greedy or within the topk_group best groups (by max); "
                           "times routed_scaling_factor",
                           shared=lambda c: (c.n_shared_experts, c.moe_intermediate_size)),
    "deepseek_v3": Adapter("mlp.gate", "mlp.experts", "moe_intermediate_size",
                           "sigmoid; top-k of score + e_score_correction_bias within the topk_group best groups "
                           "(by sum of top-2); weights are the unbiased scores, normalised if norm_topk_prob, "
                           "times routed_scaling_factor",
                           shared=lambda c: (c.n_shared_experts, c.moe_intermediate_size)),
    "gpt_oss": Adapter("mlp.router", "mlp.experts", "intermediate_size",
                       "top-k of the logits (with bias), softmax over those k"),
}

HOW_TO_ADD = ("to add one, give its config.model_type an Adapter in ADAPTERS (moesim/record.py): the router "
              "module's path in a decoder layer (it must return (logits, weights, ids)), the experts' path and "
              "the config field of the expert FFN size")


def adapter_for(model_type: str, where: str) -> Adapter:
    if model_type not in ADAPTERS:
        raise MoesimError(f"{where}: architecture {model_type!r} is not supported; supported: "
                          f"{', '.join(ADAPTERS)}; {HOW_TO_ADD}")
    return ADAPTERS[model_type]


def _get(module, path: str):
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def decoder_layers(model):
    """The decoder layers of a causal LM (`model.model.layers` in every supported architecture)."""
    layers = _get(model, "model.layers")
    if layers is None:
        raise MoesimError(f"{type(model).__name__}: no decoder layers at model.layers; {HOW_TO_ADD}")
    return layers


def moe_layers(model, adapter: Adapter) -> list[int]:
    """Indices of the decoder layers that have a router (dense layers, e.g. DeepSeek's first, do not)."""
    found = [d for d, layer in enumerate(decoder_layers(model)) if _get(layer, adapter.router) is not None]
    if not found:
        raise MoesimError(f"{type(model).__name__}: no router at {adapter.router} in any decoder layer")
    return found


_DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float8_e4m3fn": "fp8"}


def spec_of(model, adapter: Adapter, name: str) -> ModelSpec:
    """The model spec, read from the model: MoE layers, the routers' shape and top-k, the expert FFN size
    from the config, and bytes per expert from the experts' parameters as loaded (dtype, biases, scales):
    `bits_per_weight` is set so that `bytes_per_expert` is exactly that."""
    config = model.config
    layers = decoder_layers(model)
    moe = moe_layers(model, adapter)
    router = _get(layers[moe[0]], adapter.router)
    n_experts, hidden = (int(d) for d in router.weight.shape)  # [E, hidden]
    experts = _get(layers[moe[0]], adapter.experts)
    tensors = [t for t in (*experts.parameters(), *experts.buffers()) if t.dim() and t.shape[0] == n_experts]
    if not tensors:
        raise MoesimError(f"{name}: the experts at {adapter.experts} have no [E={n_experts}, ...] parameters")
    nbytes = sum(t.numel() * t.element_size() for t in tensors) // n_experts  # bytes per expert
    ffn = int(getattr(config, adapter.ffn))
    bits = _bits_for(nbytes, hidden, ffn)
    dtype = str(tensors[0].dtype).removeprefix("torch.")
    if not tensors[0].is_floating_point():  # packed quantized blocks (e.g. uint8): name the method
        quant = getattr(config, "quantization_config", None)
        quant = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
        dtype = str(quant or dtype)
    n_shared, shared_ffn = adapter.shared(config)
    spec = ModelSpec(name=name, layers=len(moe), experts=n_experts, top_k=int(router.top_k), hidden=hidden,
                     ffn=ffn, shared_experts=int(n_shared), shared_ffn=int(shared_ffn),
                     dtype=_DTYPE_NAMES.get(dtype, dtype), bits_per_weight=bits)
    return whole_spec(spec, config)


def whole_spec(spec: ModelSpec, config) -> ModelSpec:
    """`spec` with the rest of the architecture from the model's config (moesim/hf_config.py), so the trace
    describes the whole model; unchanged where moesim cannot read that config (it says so on stderr)."""
    from .errors import TraceError
    from .whole import completed

    try:
        whole = completed(spec, config.to_dict())
    except (MoesimError, TraceError) as e:
        print(f"record: the trace describes the experts only: {e}", file=sys.stderr)
        return spec
    if spec.dtype in ("bf16", "fp16", "fp32"):  # the model as loaded: its other weights are in that dtype too
        whole = dataclasses.replace(whole, attention_format=spec.dtype, dense_format=spec.dtype,
                                    embed_format=spec.dtype, kv_format=spec.dtype)
    return whole


def _bits_for(nbytes: int, hidden: int, ffn: int) -> float:
    """bits_per_weight such that ModelSpec.bytes_per_expert (ceil(3*hidden*ffn*bits/8)) is exactly `nbytes`."""
    weights = 3 * hidden * ffn
    bits = 8 * nbytes / weights
    while math.ceil(weights * bits / 8) > nbytes:  # float rounding: step down to the exact value
        bits = math.nextafter(bits, 0)
    return bits


# ---------------------------------------------------------------------------------------------- hooks
class RouterHooks:
    """Forward hooks on every router (and, for predict, pre-hooks on decoder layers). Per MoE layer, one
    tensor per forward pass is kept on the device: ids and weights [rows, K], predicted ids [rows, K]."""

    def __init__(self, model, adapter: Adapter, predict: bool):
        layers = decoder_layers(model)
        self.moe = moe_layers(model, adapter)
        self.predict = predict
        L = len(self.moe)
        self.ids: list[list] = [[] for _ in range(L)]
        self.weights: list[list] = [[] for _ in range(L)]
        self.pred_ids: list[list] = [[] for _ in range(L)]
        self.pred_weights: list[list] = [[] for _ in range(L)]
        self.guesses: list[_Guess] = []
        self.handles = []
        for l, d in enumerate(self.moe):
            router = _get(layers[d], adapter.router)
            if not type(router).__name__.lower().endswith("router"):
                import transformers

                raise MoesimError(f"{type(model).__name__}: layer {d}'s {adapter.router} is a "
                                  f"{type(router).__name__}, not a top-k router module; moesim record needs "
                                  f"transformers >= 5 (installed: {transformers.__version__})")
            self.handles.append(router.register_forward_hook(_Route(self.ids[l].append, self.weights[l].append)))
            if predict and l > 0:
                # layer l's router, on the hidden state entering the decoder layer of MoE layer l-1
                guess = _Guess(_get(layers[d], adapter.norm), router, self.pred_ids[l], self.pred_weights[l])
                self.guesses.append(guess)
                self.handles.append(layers[self.moe[l - 1]].register_forward_pre_hook(guess, with_kwargs=True))

    def flush(self) -> None:
        for guess in self.guesses:
            guess.flush()

    def clear(self) -> None:
        for lists in (self.ids, self.weights, self.pred_ids, self.pred_weights):
            for x in lists:
                x.clear()
        for guess in self.guesses:
            guess.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


class _Route:
    """Forward hook on a router: keeps its ids and weights [rows, K] (references, on the device)."""

    __slots__ = ("add_ids", "add_weights")

    def __init__(self, add_ids, add_weights):
        self.add_ids, self.add_weights = add_ids, add_weights

    def __call__(self, module, args, output):
        _, weights, ids = output
        self.add_ids(ids)
        self.add_weights(weights)


GUESS_ROWS = 1024  # tokens whose hidden states a guess holds before it runs: bounds the device memory it takes


class _Guess:
    """Pre-hook on a decoder layer: keeps the hidden states entering it and, once they hold GUESS_ROWS
    tokens, runs the next MoE layer's norm and router on them all (one call for many decode steps: cheaper)."""

    def __init__(self, norm, router, ids: list, weights: list):
        self.norm, self.router, self.ids, self.weights = norm, router, ids, weights
        self.hidden = router.weight.shape[1]
        self.pending: list = []  # [B, S, hidden] per forward pass, on the device
        self.rows = 0  # tokens in `pending`

    def __call__(self, module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        self.pending.append(h)
        self.rows += h.numel() // self.hidden
        if self.rows >= GUESS_ROWS:
            self.flush()

    def flush(self) -> None:
        import torch

        if self.pending:
            h = torch.cat([x.reshape(-1, self.hidden) for x in self.pending])  # [rows, hidden]
            _, weights, ids = self.router.forward(self.norm(h))  # .forward: not through the recording hook
            self.ids.append(ids)
            self.weights.append(weights)
            self.clear()

    def clear(self) -> None:
        self.pending.clear()
        self.rows = 0



def _best_first(ids_steps: list, weights_steps: list):
    """Per-layer lists of [rows, K] tensors -> numpy (ids int16, weights float16) [R, L, K], each row sorted
    by weight, best first (stable: an already sorted row is unchanged)."""
    import torch

    ids = torch.stack([torch.cat(x) for x in ids_steps], dim=1).detach()  # [R, L, K]
    weights = torch.stack([torch.cat(x).float() for x in weights_steps], dim=1).detach()
    weights, order = weights.sort(dim=-1, descending=True, stable=True)
    ids = ids.gather(-1, order)
    return ids.to(torch.int16).cpu().numpy(), weights.to(torch.float16).cpu().numpy()


# ----------------------------------------------------------------------------------------------- record
def eos_ids(model) -> list[int]:
    """The end-of-sequence ids generate() stops at: those of the model's generation config."""
    e = model.generation_config.eos_token_id
    return [] if e is None else [int(e)] if isinstance(e, int) else [int(x) for x in e]


def record_batch(model, hooks: RouterHooks, prompts: list[list[int]], max_new_tokens: int,
                 pad_token_id: int) -> dict[str, np.ndarray]:
    """Generate greedily for one batch of tokenised prompts; the batch's routing as arrays
    (seq is the position of the prompt in the batch, step counts from 0 at the prefill)."""
    import torch

    B, S = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((B, S), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, S), dtype=torch.long)
    for b, p in enumerate(prompts):  # left padding: the last prompt token of every row is at S-1
        input_ids[b, S - len(p):] = torch.tensor(p, dtype=torch.long)
        attention_mask[b, S - len(p):] = 1
    hooks.clear()
    with torch.no_grad():
        out = model.generate(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id)
        hooks.flush()
    generated = out[:, S:].cpu().numpy()  # [B, n]: the token each forward pass produced
    n = generated.shape[1]
    L = len(hooks.moe)
    calls = [len(x) for x in hooks.ids]
    if calls != [n] * L:
        raise RuntimeError(f"router calls per MoE layer {calls}, expected {n} (one per forward pass)")
    # sequence b runs in decode step i (1..n-1) while none of its tokens 0..i-1 was EOS
    eos = np.isin(generated, np.asarray(eos_ids(model), dtype=generated.dtype))
    alive = np.cumsum(eos, axis=1)[:, :-1] == 0  # [B, n-1]
    keep = np.concatenate([attention_mask.numpy().astype(bool).reshape(-1), alive.T.reshape(-1)])  # rows
    seq = np.concatenate([np.repeat(np.arange(B), S), np.tile(np.arange(B), n - 1)])
    step = np.concatenate([np.zeros(B * S, np.int64), np.repeat(np.arange(1, n), B)])
    experts, weights = _best_first(hooks.ids, hooks.weights)
    if len(experts) != len(keep):
        raise RuntimeError(f"routers returned {len(experts)} rows, the batch had {len(keep)} positions")
    part = {"experts": experts[keep], "weights": weights[keep], "seq": seq[keep].astype(np.int32),
            "step": step[keep].astype(np.int32), "phase": np.where(step[keep] == 0, PREFILL, DECODE).astype(np.uint8)}
    if hooks.predict:
        like = hooks.ids[0][0]
        none = [torch.full((len(keep), experts.shape[2]), -1, dtype=like.dtype, device=like.device)]
        ids = [none] + hooks.pred_ids[1:]  # MoE layer 0: no earlier MoE layer, -1
        weights = [[torch.ones_like(none[0], dtype=torch.float32)]] + hooks.pred_weights[1:]
        part["predicted"] = _best_first(ids, weights)[0][keep]
    hooks.clear()
    return part


def record(model, prompts: list[list[int]], out: str | os.PathLike, *, name: str | None = None,
           max_new_tokens: int = 256, batch_size: int = 1, predict: bool = True, pad_token_id: int | None = None,
           source: dict | None = None, fingerprint: dict | None = None, progress: bool = True) -> Trace:
    """Record the routing of `model` generating from tokenised `prompts`; write the trace to `out`.

    Generation stops at `model.generation_config.eos_token_id`. Finished batches go to `<out>.partial/`;
    a rerun with the same model, prompts, arguments and `fingerprint` resumes after them."""
    import transformers
    from .progress import progress as show

    if max_new_tokens < 1:
        raise MoesimError(f"max_new_tokens={max_new_tokens}: expected an integer >= 1")
    if batch_size < 1:
        raise MoesimError(f"batch_size={batch_size}: expected an integer >= 1")
    if not prompts:
        raise MoesimError("no prompts to record")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise MoesimError(f"prompt {i} has no tokens")
    out = Path(out)
    model_type = model.config.model_type
    adapter = adapter_for(model_type, name or type(model).__name__)
    name = name or str(getattr(model.config, "_name_or_path", "") or model_type)
    spec = spec_of(model, adapter, name)
    eos_token_ids = eos_ids(model)
    if pad_token_id is None:  # padded positions are masked: any id will do
        pad_token_id = model.generation_config.pad_token_id
    if pad_token_id is None:
        pad_token_id = eos_token_ids[0] if eos_token_ids else 0

    args = {"model": name, "model_type": model_type, "config_sha256": _sha(model.config.to_json_string()),
            "prompts_sha256": _sha(json.dumps(prompts)), "max_new_tokens": max_new_tokens,
            "batch_size": batch_size, "predict": predict, "eos_token_ids": eos_token_ids,
            "pad_token_id": pad_token_id, "transformers": transformers.__version__, **(fingerprint or {})}
    partial_dir = out.parent / (out.name + ".partial")
    done = _open_partial(partial_dir, args)

    batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    parts: list[dict] = []
    bar = show(total=len(prompts), unit="prompt", desc="record", enabled=progress)
    with bar, RouterHooks(model, adapter, predict) as hooks:
        for index, batch in enumerate(batches):
            path = partial_dir / f"batch-{index:06d}.safetensors"
            if index in done:
                part = _load_part(path, spec, predict, len(batch))
            else:
                part = record_batch(model, hooks, batch, max_new_tokens, pad_token_id)
                _save_part(path, part)
            parts.append(part)
            bar.update(len(batch))

    step_offset, seq_offset = 0, 0
    for index, part in enumerate(parts):  # local step and seq -> global
        part["step"] = part["step"] + step_offset
        part["seq"] = part["seq"] + seq_offset
        step_offset = int(part["step"][-1]) + 1
        seq_offset += len(batches[index])
    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    src = {"recorder": "moesim.record", "model": name, "model_type": model_type,
           "transformers": transformers.__version__, "decoding": "greedy", "max_new_tokens": max_new_tokens,
           "batch_size": batch_size, "n_prompts": len(prompts), "routing": adapter.rule,
           "predicted": ("layer l's router on the hidden state entering the decoder layer of MoE layer l-1, "
                         "after layer l's post-attention norm; MoE layer 0: -1") if predict else None,
           **(source or {})}
    trace = from_arrays(spec, cat["experts"], cat["weights"], cat["step"], cat["seq"], cat["phase"],
                        cat.get("predicted"), source={k: v for k, v in src.items() if v is not None})
    save_trace(trace, out)
    shutil.rmtree(partial_dir, ignore_errors=True)  # after the trace is safely in place
    return trace


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _open_partial(partial_dir: Path, args: dict) -> set[int]:
    """Batches already recorded in `partial_dir` with the same `args`; creates the folder otherwise."""
    args_file = partial_dir / "args.json"
    if args_file.is_file():
        try:
            old = json.loads(args_file.read_text())
        except (OSError, ValueError) as e:
            raise MoesimError(f"{args_file}: unreadable ({e}); delete {partial_dir} to start over") from None
        if old != args:
            differ = sorted(k for k in set(old) | set(args) if old.get(k) != args.get(k))
            raise MoesimError(f"{partial_dir}: a partial recording made with other arguments (differ: "
                              f"{', '.join(differ)}); rerun with those to resume, or delete it to start over")
        return {int(p.name[6:12]) for p in partial_dir.glob("batch-*.safetensors")}
    partial_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(args_file, lambda tmp: Path(tmp).write_text(json.dumps(args, indent=1)))
    return set()


def _save_part(path: Path, part: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    atomic_write(path, lambda tmp: save_file({k: np.ascontiguousarray(v) for k, v in part.items()}, tmp))


def _load_part(path: Path, spec: ModelSpec, predict: bool, n_seqs: int) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        part = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types; nothing is unpickled
        raise MoesimError(f"{path}: unreadable partial batch ({e}); delete it to record that batch again") from None
    want = {"experts", "weights", "seq", "step", "phase"} | ({"predicted"} if predict else set())
    e = part.get("experts")
    if (set(part) != want or e is None or e.ndim != 3 or e.shape[1:] != (spec.layers, spec.top_k)
            or not len(e) or int(part["seq"].max()) >= n_seqs):
        raise MoesimError(f"{path}: not a partial batch of this recording (tensors {sorted(part)}); "
                          f"delete it to record that batch again")
    return part


# ---------------------------------------------------------------------------------------------- prompts
def read_prompts(path: str | os.PathLike) -> list:
    """Prompts from a text file (one a line, blank lines skipped) or JSONL (`.jsonl`: per line an object
    with a `prompt` string or a chat `messages` list). Text prompts are str, chats are lists of dicts."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MoesimError(f"prompts={path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    prompts: list = []
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if not jsonl:
            prompts.append(line)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise MoesimError(f"{path}:{lineno}: not JSON ({e.msg})") from None
        if isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
            prompts.append(obj["prompt"])
        elif isinstance(obj, dict) and isinstance(obj.get("messages"), list) and obj["messages"] and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in obj["messages"]):
            prompts.append(obj["messages"])
        else:
            raise MoesimError(f"{path}:{lineno}: expected an object with a 'prompt' string or a 'messages' "
                              f"list of {{'role': str, 'content': str}}")
    if not prompts:
        raise MoesimError(f"prompts={path}: no prompts in the file")
    return prompts


def tokenize(tokenizer, prompts: list, where: str) -> list[list[int]]:
    """Token ids of each prompt; chats through the tokenizer's chat template (with the generation prompt)."""
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            ids = tokenizer(p)["input_ids"]
        else:
            if not getattr(tokenizer, "chat_template", None):
                raise MoesimError(f"{where}: prompt {i} is a chat ('messages') but the tokenizer has no chat template")
            ids = tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if not isinstance(ids, list) else ids
        ids = [int(x) for x in ids]
        if not ids:
            raise MoesimError(f"{where}: prompt {i} has no tokens")
        out.append(ids)
    return out


# ---------------------------------------------------------------------------------------------- command
DTYPES = ("auto", "float32", "bfloat16", "float16")


def load_model(model_id: str, device: str, dtype: str):
    """(model, tokenizer, resolved device) from a Hub id (cache only when HF_HUB_OFFLINE=1) or a directory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise MoesimError(f"dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    path = Path(model_id).expanduser()
    if not path.exists() and (path.is_absolute() or model_id.startswith((".", "~"))):
        raise MoesimError(f"model={model_id}: no such directory (a Hub id is written owner/name)")
    try:
        config = AutoConfig.from_pretrained(model_id)
    except (OSError, ValueError) as e:
        raise MoesimError(f"model={model_id}: cannot load its config ({_first_line(e)})") from None
    adapter_for(config.model_type, f"model={model_id}")
    # with accelerate, weights load straight onto the device (and quantized experts stay quantized there)
    placed = importlib.util.find_spec("accelerate") is not None
    where = {"device_map": device} if placed else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id)
        model = AutoModelForCausalLM.from_pretrained(
            model_id, dtype=dtype if dtype == "auto" else getattr(torch, dtype), **where)
        if not placed:
            model = model.to(device)
    except (OSError, ValueError, RuntimeError) as e:
        raise MoesimError(f"model={model_id}: cannot load ({_first_line(e)})") from None
    return model.eval(), tokenizer, device


def _first_line(e: Exception) -> str:
    lines = [x for x in str(e).splitlines() if x.strip()]
    return lines[0] if lines else type(e).__name__


def _required(cfg, key: str, what: str) -> str:
    from omegaconf.errors import MissingMandatoryValue

    try:
        value = cfg[key]
    except MissingMandatoryValue:
        value = None
    if value in (None, ""):
        raise MoesimError(f"record: {key}= is required ({what})")
    return str(value)


def record_command(cfg) -> None:
    """`python -m moesim record model=ID_OR_DIR prompts=FILE out=FILE [max_new_tokens=256] [batch_size=1]
    [device=auto] [dtype=auto] [predict=true]`: record, write atomically, print the path and a summary."""
    model_id = _required(cfg, "model", "a Hugging Face model id or a local model directory")
    prompts_path = Path(_required(cfg, "prompts", "a text file, one prompt a line, or a .jsonl file"))
    out = Path(_required(cfg, "out", f"the trace file to write, ending in {SUFFIX}"))
    if not out.name.endswith(SUFFIX):
        raise MoesimError(f"out={out}: expected a file name ending in {SUFFIX}")
    for key in ("max_new_tokens", "batch_size"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1:
            raise MoesimError(f"{key}={cfg[key]!r}: expected an integer >= 1")
    prompts = read_prompts(prompts_path)  # before loading the model: a bad file fails at once
    model, tokenizer, device = load_model(model_id, str(cfg.device), str(cfg.dtype))
    token_prompts = tokenize(tokenizer, prompts, str(prompts_path))
    pad = tokenizer.pad_token_id
    trace = record(model, token_prompts, out, name=model_id, max_new_tokens=int(cfg.max_new_tokens),
                   batch_size=int(cfg.batch_size), predict=bool(cfg.predict), pad_token_id=pad,
                   source={"prompts": str(prompts_path), "device": device, "dtype": str(cfg.dtype)},
                   fingerprint={"device": device, "dtype": str(cfg.dtype)}, progress=bool(cfg.progress))
    print(f"{out}: {trace.describe()}")
