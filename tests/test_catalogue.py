"""Tests of moesim/hf_config.py and moesim/catalogue.py: every catalogued model has the numbers of the
config.json its data file cites (typed here from the sources, not read back from the data), the routing
numbers the catalogue had before it read configs, parameter counts near the publishers', small configs of
each model type, and clear errors.

    pytest tests/test_catalogue.py -q
"""
from __future__ import annotations

import json

import pytest

from moesim.catalogue import ENTRIES, MODEL_SPECS, model_source
from moesim.errors import MoesimError
from moesim.hf_config import MODEL_TYPES, spec_from_hf_config
from moesim.models import model_spec

# name: (MoE layers, experts, top_k, hidden, ffn, shared experts, shared_ffn, dense layers, dense_ffn)
ROUTING = {
    "mixtral-8x7b": (32, 8, 2, 4096, 14336, 0, 0, 0, 0),
    "mixtral-8x22b": (56, 8, 2, 6144, 16384, 0, 0, 0, 0),
    "deepseek-v3": (58, 256, 8, 7168, 2048, 1, 0, 3, 18432),
    "deepseek-v2-lite": (26, 64, 6, 2048, 1408, 2, 0, 1, 10944),
    "deepseek-v4-flash": (43, 256, 6, 4096, 2048, 1, 0, 0, 0),
    "qwen3-30b-a3b": (48, 128, 8, 2048, 768, 0, 0, 0, 0),
    "qwen3-235b-a22b": (94, 128, 8, 4096, 1536, 0, 0, 0, 0),
    "qwen1.5-moe-a2.7b": (24, 60, 4, 2048, 1408, 1, 5632, 0, 0),
    "olmoe-1b-7b": (16, 64, 8, 2048, 1024, 0, 0, 0, 0),
    "gpt-oss-20b": (24, 32, 4, 2880, 2880, 0, 0, 0, 0),
    "gpt-oss-120b": (36, 128, 4, 2880, 2880, 0, 0, 0, 0),
}
# name: (attention, heads, kv_heads, head_dim, vocab, sliding_window, sliding_layers)
ATTENTION = {
    "mixtral-8x7b": ("gqa", 32, 8, 128, 32000, 0, 0),
    "mixtral-8x22b": ("gqa", 48, 8, 128, 32000, 0, 0),
    "deepseek-v3": ("mla", 128, 128, 128, 129280, 0, 0),
    "deepseek-v2-lite": ("mla", 16, 16, 128, 102400, 0, 0),
    "deepseek-v4-flash": ("gqa", 64, 1, 512, 129280, 0, 0),  # its attention as moesim approximates it (hf_config)
    "qwen3-30b-a3b": ("gqa", 32, 4, 128, 151936, 0, 0),
    "qwen3-235b-a22b": ("gqa", 64, 4, 128, 151936, 0, 0),
    "qwen1.5-moe-a2.7b": ("gqa", 16, 16, 128, 151936, 0, 0),
    "olmoe-1b-7b": ("gqa", 16, 16, 128, 50304, 0, 0),
    "gpt-oss-20b": ("gqa", 64, 8, 64, 201088, 128, 12),
    "gpt-oss-120b": ("gqa", 64, 8, 64, 201088, 128, 18),
}
# MLA: name: (q_lora_rank, kv_lora_rank, rope_head_dim, nope_head_dim)
MLA = {"deepseek-v3": (1536, 512, 64, 128), "deepseek-v2-lite": (0, 512, 64, 128)}
# name: (experts, attention, dense, embed) formats as the publisher stores them
FORMATS = {"deepseek-v3": ("fp8", "fp8", "fp8", "bf16"), "gpt-oss-20b": ("mxfp4", "bf16", "bf16", "bf16"),
           "gpt-oss-120b": ("mxfp4", "bf16", "bf16", "bf16")}
# The catalogue before it read configs (routing numbers only): these must not have moved.
BEFORE = {"mixtral-8x7b": (32, 8, 2, 4096, 14336, 0, 0), "deepseek-v3": (58, 256, 8, 7168, 2048, 1, 0),
          "deepseek-v2-lite": (26, 64, 6, 2048, 1408, 2, 0), "qwen3-30b-a3b": (48, 128, 8, 2048, 768, 0, 0),
          "qwen1.5-moe-a2.7b": (24, 60, 4, 2048, 1408, 1, 5632), "olmoe-1b-7b": (16, 64, 8, 2048, 1024, 0, 0),
          "gpt-oss-20b": (24, 32, 4, 2880, 2880, 0, 0)}
# Total parameters the publishers state (docs/models.md cites each): moesim's count within 1.5%.
PUBLISHED_TOTAL = {"mixtral-8x7b": 46.7e9, "mixtral-8x22b": 141e9, "deepseek-v3": 671e9, "deepseek-v2-lite": 15.7e9,
                   "qwen3-30b-a3b": 30.5e9, "qwen3-235b-a22b": 235e9, "qwen1.5-moe-a2.7b": 14.3e9,
                   "gpt-oss-20b": 21e9, "gpt-oss-120b": 117e9, "olmoe-1b-7b": 6.92e9}


def test_catalogue_holds_every_model():
    assert set(MODEL_SPECS) == set(ROUTING) == set(ENTRIES)


@pytest.mark.parametrize("name", sorted(ROUTING))
def test_cited_numbers(name):
    s = MODEL_SPECS[name]
    assert (s.layers, s.experts, s.top_k, s.hidden, s.ffn, s.shared_experts, s.shared_ffn, s.dense_layers,
            s.dense_ffn) == ROUTING[name]
    assert (s.attention, s.heads, s.kv_heads, s.head_dim, s.vocab, s.sliding_window, s.sliding_layers) == \
        ATTENTION[name]
    assert not s.tied_embeddings
    if name in MLA:
        assert (s.q_lora_rank, s.kv_lora_rank, s.rope_head_dim, s.nope_head_dim) == MLA[name]
    experts, attn, dense, embed = FORMATS.get(name, ("bf16",) * 4)
    assert (s.dtype, s.attention_format, s.dense_format, s.embed_format) == (experts, attn, dense, embed)
    assert s.name == name and model_spec(name) is s


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_routing_unchanged_from_the_old_catalogue(name):
    s = MODEL_SPECS[name]
    assert (s.layers, s.experts, s.top_k, s.hidden, s.ffn, s.shared_experts, s.shared_ffn) == BEFORE[name]


def test_expert_bytes_of_the_quantised_models():
    """gpt-oss-20b's expert: 3 * 2880 * 2880 weights at 4.25 bits (MXFP4: 17 bytes per 32) = 13.2 MB;
    DeepSeek-V3's: 3 * 7168 * 2048 fp8 weights plus one fp32 scale per 128x128 block, ~44.05 MB."""
    assert MODEL_SPECS["gpt-oss-20b"].bytes_per_expert == 3 * 2880 * 2880 * 17 // 32
    assert MODEL_SPECS["gpt-oss-20b"].bits_per_weight == 4.25
    assert abs(MODEL_SPECS["deepseek-v3"].bytes_per_expert - 3 * 7168 * 2048 * (1 + 4 / 128**2)) < 3 * 7168 * 2048 / 64


def test_deepseek_v4_flash_routed_experts_in_mxfp4_match_the_published_expert_pack():
    """The SGLang blog (validation/cases/sglang-ssd-expert-pack.yaml) repacks DeepSeek-V4-Flash's MXFP4 routed experts
    into a 147.18 GB Expert Pack; moesim's bytes for 43 x 256 experts of 3 x 4096 x 2048 at 4.25 bits agree."""
    import dataclasses

    s = dataclasses.replace(MODEL_SPECS["deepseek-v4-flash"], dtype="mxfp4", bits_per_weight=4.25)
    assert abs(s.layers * s.experts * s.bytes_per_expert / 147.18e9 - 1) < 0.001


def test_deepseek_v3_gguf_file_types_near_the_published_files():
    """The disk tier's DeepSeek-V3 file types (docs/models.md, from scripts/model_table.py DEEPSEEK_GGUF): moesim's
    bytes within 7% of each published file found, which leaves out llama.cpp's per-layer type bumps (Q4_K_M: 6.5%
    under) and a quantizer's own mix (unsloth's 1.58-bit: 5.3% over)."""
    import re
    import sys
    from pathlib import Path

    from moesim.models import with_formats
    from moesim.whole import weight_bytes

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    try:
        from model_table import DEEPSEEK_GGUF
    finally:
        sys.path.pop(0)
    found = {}
    for name, formats, published, _ in DEEPSEEK_GGUF:
        gb = re.findall(r"([0-9.]+) GB", published)
        if gb:
            total = sum(weight_bytes(with_formats(MODEL_SPECS["deepseek-v3"], **formats)).values())
            found[name] = total / (float(gb[-1]) * 1e9) - 1
    assert {"Q8_0", "Q4_K_M", "Q2_K"} <= set(found)
    assert all(abs(e) < 0.07 for e in found.values()), found


@pytest.mark.parametrize("name", sorted(PUBLISHED_TOTAL))
def test_parameter_count_near_the_publishers(name):
    weight_params = pytest.importorskip("moesim.whole").weight_params
    total = sum(weight_params(MODEL_SPECS[name]).values())
    assert abs(total / PUBLISHED_TOTAL[name] - 1) < 0.015, f"{name}: {total / 1e9:.2f}B"


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_data_files_cite_their_source(name):
    src = model_source(name)
    assert src["source"] and src["read_on"] in ("2026-12-06", "2026-12-07") and "/" in src["hf_repo"]
    assert ENTRIES[name]["config"]["model_type"] in MODEL_TYPES


# --------------------------------------------------------------------------------- small configs
BASE = {"num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 100, "torch_dtype": "bfloat16"}


def small(model_type, **keys):
    return {**BASE, "model_type": model_type, **keys}


def test_mixtral_small():
    s = spec_from_hf_config(small("mixtral", num_local_experts=4, num_experts_per_tok=2, intermediate_size=96,
                                  sliding_window=16))
    assert (s.layers, s.experts, s.top_k, s.ffn, s.head_dim, s.kv_heads) == (4, 4, 2, 96, 16, 2)
    assert (s.sliding_window, s.sliding_layers) == (16, 4)  # mixtral's window applies to every layer
    assert s.name == "mixtral" and s.attention == "gqa" and s.dtype == "bf16"


@pytest.mark.parametrize("model_type", ["deepseek_v2", "deepseek_v3"])
def test_deepseek_small(model_type):
    cfg = small(model_type, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32,
                intermediate_size=128, first_k_dense_replace=1, moe_layer_freq=2, q_lora_rank=None, kv_lora_rank=16,
                qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16)
    s = spec_from_hf_config(cfg, name="tiny")
    # layers 0..3: 0 is dense (first_k_dense_replace); of 1, 2, 3 only 2 has i % moe_layer_freq == 0
    assert (s.layers, s.dense_layers, s.dense_ffn) == (1, 3, 128)
    assert (s.attention, s.q_lora_rank, s.kv_lora_rank, s.rope_head_dim, s.nope_head_dim, s.head_dim) == \
        ("mla", 0, 16, 8, 16, 16)
    assert (s.shared_experts, s.shared_ffn, s.name) == (1, 0, "tiny")
    q = spec_from_hf_config({**cfg, "q_lora_rank": 24, "quantization_config": {
        "quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}})
    assert q.q_lora_rank == 24
    assert (q.dtype, q.attention_format, q.dense_format, q.embed_format, q.kv_format) == \
        ("fp8", "fp8", "fp8", "bf16", "bf16")


@pytest.mark.parametrize("model_type", ["qwen2_moe", "qwen3_moe"])
def test_qwen_small(model_type):
    cfg = small(model_type, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24, intermediate_size=80,
                decoder_sparse_step=2, mlp_only_layers=[3], head_dim=32, shared_expert_intermediate_size=48,
                sliding_window=32, use_sliding_window=True, max_window_layers=1)
    s = spec_from_hf_config(cfg)
    # MoE where (i + 1) % 2 == 0 and i not in [3]: only layer 1
    assert (s.layers, s.dense_layers, s.dense_ffn, s.ffn, s.head_dim) == (1, 3, 80, 24, 32)
    assert (s.sliding_window, s.sliding_layers) == (32, 3)  # layers from max_window_layers on slide
    assert (s.shared_experts, s.shared_ffn) == ((1, 48) if model_type == "qwen2_moe" else (0, 0))
    off = spec_from_hf_config({**cfg, "use_sliding_window": False})
    assert (off.sliding_window, off.sliding_layers) == (0, 0)


def test_gpt_oss_small():
    cfg = small("gpt_oss", num_local_experts=8, experts_per_token=2, intermediate_size=64, head_dim=16,
                sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2,
                quantization_config={"quant_method": "mxfp4", "modules_to_not_convert": [
                    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]})
    del cfg["torch_dtype"]  # gpt-oss's config names none
    s = spec_from_hf_config(cfg)
    assert (s.layers, s.experts, s.top_k, s.head_dim, s.sliding_window, s.sliding_layers) == (4, 8, 2, 16, 8, 2)
    assert (s.dtype, s.bits_per_weight, s.attention_format, s.dense_format, s.embed_format) == \
        ("mxfp4", 4.25, "bf16", "bf16", "bf16")
    # what modules_to_not_convert does not name is quantised too
    s2 = spec_from_hf_config({**cfg, "quantization_config": {"quant_method": "mxfp4",
                                                              "modules_to_not_convert": ["lm_head"]}})
    assert (s2.attention_format, s2.dense_format, s2.embed_format) == ("mxfp4", "mxfp4", "bf16")


def test_olmoe_small_and_defaults():
    cfg = small("olmoe", num_experts=16, num_experts_per_tok=4, intermediate_size=32, torch_dtype="float32")
    del cfg["num_key_value_heads"]
    s = spec_from_hf_config(cfg)
    assert (s.experts, s.top_k, s.ffn, s.kv_heads, s.head_dim) == (16, 4, 32, 4, 16)  # kv_heads = heads
    assert (s.dtype, s.bits_per_weight, s.attention_format, s.kv_format) == ("fp32", 32.0, "fp32", "fp32")


def test_reads_a_file_and_names_the_model_by_its_folder(tmp_path):
    d = tmp_path / "OLMoE-1B-7B-0924"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(ENTRIES["olmoe-1b-7b"]["config"]))
    s = spec_from_hf_config(d / "config.json")
    assert s.name == "OLMoE-1B-7B-0924"
    assert spec_from_hf_config(str(d / "config.json"), name="olmoe-1b-7b") == MODEL_SPECS["olmoe-1b-7b"]


# --------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("change, words", [
    (dict(model_type="llama"), ["model_type 'llama'", "mixtral"]),
    (dict(model_type=None), ["model_type None"]),
    (dict(num_local_experts=None), ["missing key 'num_local_experts' or 'num_experts'"]),
    (dict(hidden_size="64"), ["'hidden_size' = '64'", "integer"]),
    (dict(num_hidden_layers=0), ["'num_hidden_layers' = 0"]),
    (dict(tie_word_embeddings="no"), ["tie_word_embeddings"]),
    (dict(torch_dtype="int8"), ["torch_dtype", "bfloat16"]),
    (dict(quantization_config={"quant_method": "gptq", "bits": 4}), ["quant_method = 'gptq'", "fp8", "mxfp4"]),
    (dict(quantization_config={"quant_method": "mxfp4", "modules_to_not_convert": "lm_head"}),
     ["modules_to_not_convert"]),
    (dict(layer_types=["full_attention"]), ["layer_types", "4"]),
    (dict(layer_types=["sliding_attention"] * 4), ["sliding_window"]),
    (dict(num_experts_per_tok=9), ["top_k", "more than experts"]),
])
def test_bad_configs_name_the_key(tmp_path, change, words):
    cfg = small("mixtral", num_local_experts=8, num_experts_per_tok=2, intermediate_size=96)
    cfg.update(change)
    cfg = {k: v for k, v in cfg.items() if v is not None or k == "model_type"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(MoesimError) as e:
        spec_from_hf_config(path)
    assert str(path) in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_deepseek_needs_q_lora_rank_and_a_moe_layer():
    cfg = small("deepseek_v2", n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                intermediate_size=128, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16)
    with pytest.raises(MoesimError, match="missing key 'q_lora_rank'"):
        spec_from_hf_config(cfg)
    with pytest.raises(MoesimError, match="no MoE layer"):
        spec_from_hf_config({**cfg, "q_lora_rank": None, "first_k_dense_replace": 4})


def test_unreadable_files(tmp_path):
    with pytest.raises(MoesimError, match="no such file"):
        spec_from_hf_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{model_type: mixtral")
    with pytest.raises(MoesimError, match="not a readable JSON file"):
        spec_from_hf_config(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(MoesimError, match="expected a JSON object"):
        spec_from_hf_config(bad)
    with pytest.raises(MoesimError, match="unknown preset 'nope'"):
        model_source("nope")
