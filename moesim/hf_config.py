"""A ModelSpec from a Hugging Face config.json: the whole model (MoE layers, attention, dense layers,
embeddings, storage formats) read from the config's own keys, for the model types moesim knows.

    from moesim.hf_config import spec_from_hf_config
    spec = spec_from_hf_config("path/to/config.json")      # or a dict; name= overrides the model's name
    python -m moesim run model.config=path/to/config.json ...

The catalogue (moesim/catalogue.py) builds every named model through this function from the configs
stored in moesim/data/models/, so a user's config.json and the catalogue share one code path.

How keys map (each model type's transformers configuration class names them):
  - MoE layers: deepseek_v2/v3 layer i is MoE when i >= first_k_dense_replace and i % moe_layer_freq == 0;
    deepseek_v4 has MoE in every layer (its first hash-routed layers hold routed experts too);
    qwen2_moe/qwen3_moe when i is not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0; mixtral,
    gpt_oss and olmoe have MoE in every layer. The other layers are dense FFNs of intermediate_size.
  - Sliding window: layer_types (count of "sliding_attention") where the config has it; else qwen's
    use_sliding_window with max_window_layers (layers from max_window_layers on slide); else mixtral's
    sliding_window (every layer). A null sliding_window means none.
  - Formats: torch_dtype (or dtype) for every class; quantization_config fp8 puts every linear layer (experts,
    attention, dense FFNs and shared experts) in fp8 and leaves embeddings and LM head in torch_dtype (as
    DeepSeek-V3's inference code loads them); mxfp4 puts the routed experts in mxfp4 and every class named
    in modules_to_not_convert (self_attn, router/gate, embed_tokens, lm_head) in torch_dtype. The KV cache
    is taken to be torch_dtype.
  - deepseek_v4's attention (transformers' DeepseekV4Config: shared-KV MQA with a low-rank query, a grouped
    low-rank output projection, compressed-KV branches, a lightning indexer, hyper-connections) is read as gqa
    with num_key_value_heads, head_dim and q_lora_rank: the query is exact; o is counted as one full
    [hidden, heads*head_dim] projection (the grouped one has about half its weights), k and v as two
    projections (V4 shares one), and the compressors, indexer and hyper-connections are not counted; the KV cache
    is counted uncompressed. Its routed experts are moe_intermediate_size wide, and so is its shared expert.
Keys with a documented default in transformers (tie_word_embeddings false, head_dim = hidden / heads,
num_key_value_heads = heads for olmoe) are filled with it when absent; any other missing key is an error
naming the file and the key.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .errors import MoesimError
from .formats import ALIASES, get_format, known_format
from .models import ModelSpec

MODEL_TYPES = ("mixtral", "deepseek_v2", "deepseek_v3", "deepseek_v4", "qwen2_moe", "qwen3_moe", "gpt_oss", "olmoe")

# Bits per weight of the quantised formats, used only until moesim/formats.py defines them (then its own
# definition counts): MXFP4 = 32 4-bit values + one 8-bit scale per block (OCP MX spec) = 4.25;
# FP8 e4m3 with one fp32 scale per 128 x 128 block (DeepSeek-V3 README_WEIGHTS.md) = 8 + 32 / 16384.
_BITS = {"mxfp4": 4.25, "fp8": 8 + 32 / (128 * 128)}
_FORMAT_FIELDS = ("attention_format", "dense_format", "embed_format", "kv_format")
# tensor class -> module names that put it in quantization_config.modules_to_not_convert
_MODULES = {"attention": ("self_attn",), "dense": ("router", "mlp.gate", "shared_expert"),
            "embed": ("embed_tokens", "lm_head")}


def spec_from_hf_config(config: dict | str | Path, name: str | None = None) -> ModelSpec:
    """The ModelSpec of the model a Hugging Face config.json describes (a path, or its dict). `name`
    defaults to the config's folder name (a path) or its model_type (a dict)."""
    if isinstance(config, dict):
        cfg, where = config, "config"
        default_name = str(config.get("model_type", "model"))
    else:
        path = Path(config)
        where = str(path)
        try:
            cfg = json.loads(path.read_text())
        except FileNotFoundError:
            raise MoesimError(f"{where}: no such file (expected a Hugging Face config.json)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise MoesimError(f"{where}: not a readable JSON file ({type(e).__name__}: {e})") from None
        if not isinstance(cfg, dict):
            raise MoesimError(f"{where}: expected a JSON object (a Hugging Face config.json), got {type(cfg).__name__}")
        default_name = path.parent.name or path.stem
    if not isinstance(cfg, dict):
        raise MoesimError(f"model.config: expected a path or a dict, got {type(cfg).__name__}")
    return _Reader(cfg, where).spec(name or default_name)


class _Reader:
    """Reads one config dict; every error names `where` (the file) and the key."""

    def __init__(self, cfg: dict, where: str):
        self.cfg, self.where = cfg, where
        mt = cfg.get("model_type")
        if mt not in MODEL_TYPES:
            raise MoesimError(f"{where}: model_type {mt!r} is not one moesim reads; known: {', '.join(MODEL_TYPES)}")
        self.mt = mt

    def int(self, key: str, default: int | None = None, minimum: int = 1) -> int:
        """cfg[key] as an integer >= minimum (a missing key takes `default`, else is an error)."""
        if key not in self.cfg or (self.cfg[key] is None and default is not None):
            if default is None:
                raise MoesimError(f"{self.where}: missing key {key!r} (needed for model_type {self.mt!r})")
            return default
        v = self.cfg[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise MoesimError(f"{self.where}: key {key!r} = {v!r}; expected an integer >= {minimum}")
        return v

    def first(self, *keys: str) -> int:
        """The first of `keys` the config has (aliases of one number across model types)."""
        for k in keys:
            if self.cfg.get(k) is not None:
                return self.int(k)
        raise MoesimError(f"{self.where}: missing key {' or '.join(map(repr, keys))} (needed for model_type "
                          f"{self.mt!r})")

    def spec(self, name: str) -> ModelSpec:
        c, mt = self.cfg, self.mt
        n = self.int("num_hidden_layers")
        hidden = self.int("hidden_size")
        heads = self.int("num_attention_heads")
        f = {"name": name, "hidden": hidden, "heads": heads, "vocab": self.int("vocab_size")}
        tied = c.get("tie_word_embeddings", False)
        if not isinstance(tied, bool):
            raise MoesimError(f"{self.where}: key 'tie_word_embeddings' = {tied!r}; expected true or false")
        f["tied_embeddings"] = tied
        if mt in ("deepseek_v2", "deepseek_v3"):
            f["experts"] = self.int("n_routed_experts")
            f["ffn"] = self.int("moe_intermediate_size")
            f["shared_experts"] = self.int("n_shared_experts", default=0, minimum=0)
            first, freq = self.int("first_k_dense_replace", default=0, minimum=0), self.int("moe_layer_freq", 1)
            moe = [i >= first and i % freq == 0 for i in range(n)]
            f.update(attention="mla", head_dim=self.int("v_head_dim"), kv_lora_rank=self.int("kv_lora_rank"),
                     rope_head_dim=self.int("qk_rope_head_dim"), nope_head_dim=self.int("qk_nope_head_dim"),
                     kv_heads=self.int("num_key_value_heads", default=heads))
            if "q_lora_rank" not in c:
                raise MoesimError(f"{self.where}: missing key 'q_lora_rank' (null where the query is projected "
                                  f"directly, as in DeepSeek-V2-Lite)")
            f["q_lora_rank"] = 0 if c["q_lora_rank"] is None else self.int("q_lora_rank")
        elif mt == "deepseek_v4":
            f["experts"] = self.int("n_routed_experts")
            f["ffn"] = self.int("moe_intermediate_size")
            f["shared_experts"] = self.int("n_shared_experts", default=0, minimum=0)
            moe = [True] * n
            f.update(attention="gqa", kv_heads=self.int("num_key_value_heads"), head_dim=self.int("head_dim"),
                     q_lora_rank=self.int("q_lora_rank"))
        else:
            f["experts"] = self.first("num_local_experts", "num_experts")
            ffn_key = "moe_intermediate_size" if mt in ("qwen2_moe", "qwen3_moe") else "intermediate_size"
            f["ffn"] = self.int(ffn_key)
            f.update(attention="gqa", kv_heads=self.int("num_key_value_heads", default=heads),
                     head_dim=self.int("head_dim", default=hidden // heads))
            moe = [True] * n
            if mt in ("qwen2_moe", "qwen3_moe"):
                step = self.int("decoder_sparse_step", default=1)
                only = c.get("mlp_only_layers") or []
                if not isinstance(only, list) or not all(isinstance(i, int) for i in only):
                    raise MoesimError(f"{self.where}: key 'mlp_only_layers' = {only!r}; expected a list of layer "
                                      f"indices")
                moe = [i not in only and (i + 1) % step == 0 for i in range(n)]
            if mt == "qwen2_moe":
                f["shared_experts"], f["shared_ffn"] = 1, self.int("shared_expert_intermediate_size")
        f["top_k"] = self.first("num_experts_per_tok", "experts_per_token")
        f["layers"] = sum(moe)
        f["dense_layers"] = n - f["layers"]
        if f["dense_layers"]:
            f["dense_ffn"] = self.int("intermediate_size")
        if f["layers"] == 0:
            raise MoesimError(f"{self.where}: no MoE layer among its {n} layers (check first_k_dense_replace, "
                              f"moe_layer_freq, decoder_sparse_step, mlp_only_layers)")
        f["sliding_window"], f["sliding_layers"] = self.sliding(n)
        f.update(self.formats())
        if f.get("shared_ffn") == f["ffn"]:
            f["shared_ffn"] = 0  # ModelSpec's "same as ffn"
        # ModelSpec.from_dict checks every field; the quantised format names are checked here instead, so a
        # catalogue entry in a format moesim/formats.py does not define yet (fp8, mxfp4) still loads
        fmts = {k: f[k] for k in _FORMAT_FIELDS}
        spec = ModelSpec.from_dict({**f, **{k: "bf16" for k in _FORMAT_FIELDS}}, where=self.where)
        return dataclasses.replace(spec, **fmts)

    def sliding(self, n: int) -> tuple[int, int]:
        """(sliding_window, how many layers use it)."""
        c = self.cfg
        window = self.int("sliding_window") if c.get("sliding_window") else 0  # null or 0: none (transformers
        # writes 0 where use_sliding_window is false)
        if "layer_types" in c:
            kinds = c["layer_types"]
            if not isinstance(kinds, list) or len(kinds) != n:
                raise MoesimError(f"{self.where}: key 'layer_types' should list num_hidden_layers = {n} kinds, "
                                  f"got {kinds!r:.80}")
            count = sum(k == "sliding_attention" for k in kinds)
            if count and not window:
                raise MoesimError(f"{self.where}: layer_types has sliding_attention layers but sliding_window is "
                                  f"{c.get('sliding_window')!r}")
            return (window, count) if count else (0, 0)
        if self.mt in ("qwen2_moe", "qwen3_moe"):
            if not c.get("use_sliding_window", False) or not window:
                return 0, 0
            return window, n - min(n, self.int("max_window_layers", default=0, minimum=0))
        if self.mt == "mixtral" and window:
            return window, n
        return 0, 0

    def formats(self) -> dict:
        """The storage format of each tensor class (ModelSpec fields), and the experts' bits per weight."""
        c = self.cfg
        raw = c.get("torch_dtype") or c.get("dtype") or "bfloat16"  # gpt-oss's config names none (or null, as
        # transformers writes a config built in code): bf16, as the checkpoints load
        base = ALIASES.get(str(raw).lower(), str(raw).lower())
        if base not in ("bf16", "fp16", "fp32"):
            raise MoesimError(f"{self.where}: key 'torch_dtype' = {raw!r}; expected bfloat16, float16 or float32")
        out = {"dtype": base, "attention_format": base, "dense_format": base, "embed_format": base,
               "kv_format": base}
        q = c.get("quantization_config")
        if q is None:
            out["bits_per_weight"] = get_format(base).bits
            return out
        if not isinstance(q, dict):
            raise MoesimError(f"{self.where}: key 'quantization_config' = {q!r:.60}; expected an object")
        method = q.get("quant_method")
        if method not in ("fp8", "mxfp4"):
            raise MoesimError(f"{self.where}: quantization_config.quant_method = {method!r} is not read; moesim "
                              f"reads fp8 (DeepSeek's 128x128 blocks) and mxfp4 (gpt-oss); pass the unquantised "
                              f"model's config.json and set the formats with model.experts_format=...")
        keep = q.get("modules_to_not_convert") or []
        if not isinstance(keep, list):
            raise MoesimError(f"{self.where}: quantization_config.modules_to_not_convert = {keep!r:.60}; "
                              f"expected a list of module names")
        kept = {cls for cls, names in _MODULES.items() if any(m in str(k) for k in keep for m in names)}
        out["dtype"] = method
        out["bits_per_weight"] = get_format(method).bits if known_format(method) else _BITS[method]
        if method == "fp8":
            classes = ("attention", "dense")  # linear layers; embeddings and LM head stay in torch_dtype
        else:
            classes = ("attention", "dense", "embed")
        for cls in classes:
            if cls not in kept:
                out[f"{cls}_format"] = method
        return out

