"""Storage formats (moesim/formats.py): bytes of known tensors from each format's own definition, padding,
fp8's 2-D tiles, HQQ's packing, the refusal of unknown names, and the GGUF file types (RECIPES).

    python -m pytest -q tests/test_formats.py
"""
from __future__ import annotations

import math

import pytest

from moesim.errors import MoesimError, TraceError
from moesim.formats import FORMATS, RECIPES, get_format, known_format, recipe
from moesim.models import ModelSpec, model_spec, with_formats

# sizeof(block_*) in ggml-common.h (llama.cpp@01243c58), from each struct's static_assert:
# (weights per block, bytes per block)
GGUF_BLOCKS = {
    "q4_0": (32, 2 + 16), "q4_1": (32, 2 * 2 + 16), "q5_0": (32, 2 + 4 + 16), "q5_1": (32, 2 * 2 + 4 + 16),
    "q8_0": (32, 2 + 32), "q2_k": (256, 2 * 2 + 16 + 64), "q3_k": (256, 2 + 64 + 32 + 12),
    "q4_k": (256, 2 * 2 + 12 + 128), "q5_k": (256, 2 * 2 + 12 + 128 + 32), "q6_k": (256, 2 + 16 + 3 * 64),
    "iq1_s": (256, 2 + 32 + 16), "iq1_m": (256, 32 + 16 + 8), "iq2_xxs": (256, 2 + 32 * 2),
    "iq2_xs": (256, 2 + 32 * 2 + 8), "iq2_s": (256, 2 + 64 + 16), "iq3_xxs": (256, 2 + 3 * 32),
    "iq3_s": (256, 2 + 13 * 8 + 4), "iq4_nl": (32, 2 + 16), "iq4_xs": (256, 2 + 2 + 4 + 128),
    "mxfp4": (32, 1 + 16),
}


@pytest.mark.parametrize("name", sorted(GGUF_BLOCKS))
def test_gguf_blocks_are_ggml_s(name):
    f = get_format(name)
    assert (f.block, f.block_bytes) == GGUF_BLOCKS[name]
    assert f.torch_dtype is None and f.source


def test_gpt_oss_expert_in_mxfp4():
    """gpt-oss-20b: hidden = ffn = 2880, 90 blocks of 17 bytes per row, three matrices."""
    f = get_format("mxfp4")
    assert f.bits == 4.25
    assert f.tensor_bytes(2880, 2880) == 2880 * 90 * 17 == 4_406_400
    assert model_spec("gpt-oss-20b").bytes_per_expert == 3 * 4_406_400 == 13_219_200
    # gpt-oss's checkpoint keeps the same bytes apart: .blocks [.., 90, 16] and .scales [.., 90]
    assert 3 * 2880 * (90 * 16 + 90) == 13_219_200


def test_q4_k_is_144_bytes_per_256_and_rows_pad_to_whole_blocks():
    f = get_format("q4_k")
    assert f.tensor_bytes(1, 256) == 144 and f.bits == 4.5
    assert f.row_bytes(360) == 2 * 144  # a 360-wide row (gpt-oss at model.scale=0.125) takes 2 blocks
    assert f.tensor_bytes(360, 360) == 360 * 288
    assert get_format("mxfp4").row_bytes(360) == 12 * 17  # 360 = 11.25 blocks of 32 -> 12
    assert get_format("q8_0").row_bytes(360) == 12 * 34
    assert get_format("bf16").tensor_bytes(360, 360) == 360 * 360 * 2  # no blocks, no padding


def test_fp8_has_a_float32_scale_per_128_by_128_tile():
    f = get_format("fp8")
    assert f.tensor_bytes(2048, 7168) == 2048 * 7168 + 16 * 56 * 4  # DeepSeek-V3's gate: 16 x 56 tiles
    assert f.tensor_bytes(300, 200) == 300 * 200 + 3 * 2 * 4  # partial tiles get a whole scale
    assert f.bits == 8 + 32 / (128 * 128)
    ds = model_spec("deepseek-v3")  # the catalogue's fp8 bits are the format's: its own bytes, exactly
    assert ds.bytes_per_expert == 3 * (2048 * 7168 + 16 * 56 * 4)


def test_hqq_bytes_follow_its_packing():
    """Mixtral's expert matrices (14336 x 4096): the codes as hqq's BitPack packs them, 2 + 2 bytes of scale
    and zero per group; mixtral-offloading's config with 8-bit scales and zeros and their meta-scales."""
    n = 14336 * 4096
    G64, G16 = n // 64, n // 16
    assert get_format("hqq4_g64").tensor_bytes(14336, 4096) == n // 2 + 4 * G64
    assert get_format("hqq2_g16").tensor_bytes(14336, 4096) == n // 4 + 4 * G16
    # 3-bit: 10 groups' rows per int32 row of group_size words, the group count padded to a multiple of 10
    assert get_format("hqq3_g64").tensor_bytes(14336, 4096) == math.ceil(G64 / 10) * 64 * 4 + 4 * G64
    # codes 4 bytes per group, scale_q and zero_q a byte each, an fp16 scale and zero per 128 scales, and
    # one fp16 scale and zero for the whole tensor's zeros
    assert get_format("hqq2_g16_mo").tensor_bytes(14336, 4096) == 4 * G16 + 2 * G16 + 4 * (G16 // 128) + 4
    assert get_format("hqq4_g64").bits == 4.5 and get_format("hqq2_g16").bits == 4.0
    assert get_format("hqq2_g16_mo").bits == 8 * (6 / 16 + 4 / (16 * 128))
    with pytest.raises(MoesimError, match="whole tensor"):
        get_format("hqq4_g64").row_bytes(64)


def test_bits_are_the_bytes_of_whole_blocks():
    """Where a tensor is whole blocks (and tiles), its bytes are bits / 8 per weight, plus what a flat format
    stores once per tensor."""
    for f in FORMATS.values():
        rows, cols = 256, 128 * f.block  # whole blocks, whole 128 x 128 tiles, whole flat units
        once = sum(size for unit, size in f.flat if unit == 0)
        assert f.tensor_bytes(rows, cols) == f.bits * rows * cols / 8 + once, f.name


def test_unknown_names_are_refused_with_the_list():
    with pytest.raises(MoesimError) as e:
        get_format("q4_km", "model.experts_format")
    msg = str(e.value)
    assert "model.experts_format='q4_km'" in msg and "q4_k" in msg and "mxfp4" in msg and "hqq4_g64" in msg
    assert known_format("BFloat16") and known_format("Q4_K") and not known_format("q4_km")
    with pytest.raises(TraceError, match="attention_format"):
        ModelSpec.from_dict({**model_spec("gpt-oss-20b").to_dict(), "attention_format": "int3"})
    assert ModelSpec.from_dict({**model_spec("gpt-oss-20b").to_dict(), "attention_format": "q8_0"})


def test_recipes():
    assert recipe("Q4_K_M") == {"experts": "q4_k", "attention": "q4_k", "dense": "q4_k", "embed": "q6_k"}
    assert recipe("q8_0")["embed"] == "q8_0" and recipe("q2_k")["experts"] == "q2_k"
    assert recipe("mxfp4_moe") == {"experts": "mxfp4", "attention": "q8_0", "dense": "q8_0", "embed": "q8_0"}
    for name, classes in RECIPES.items():
        assert set(classes) == {"experts", "attention", "dense", "embed"}, name
        assert all(known_format(f) for f in classes.values()), name
    r = recipe("q4_k_s")
    r["experts"] = "q8_0"  # a copy: the table itself does not change
    assert RECIPES["q4_k_s"]["experts"] == "q4_k"
    with pytest.raises(MoesimError) as e:
        recipe("q4_k_x")
    assert "model.recipe='q4_k_x'" in str(e.value) and "q4_k_m" in str(e.value)


def test_a_recipe_applies_to_a_spec():
    gpt = model_spec("gpt-oss-20b")
    q = with_formats(gpt, **recipe("q4_k_m"))
    assert (q.dtype, q.attention_format, q.dense_format, q.embed_format) == ("q4_k", "q4_k", "q4_k", "q6_k")
    assert q.bits_per_weight == 4.5
    assert q.bytes_per_expert == 3 * 2880 * 12 * 144  # 2880 = 11.25 blocks of 256 -> 12 per row
