"""Storage formats of weights: how many bytes a tensor of `rows` x `cols` weights takes in each format, from
the format's own definition (block size and bytes per block; the source of each is beside it), and the
GGUF file types (`RECIPES`) as mixes of formats per tensor class.

    from moesim.formats import get_format, recipe
    get_format("mxfp4").tensor_bytes(2880, 2880)    # 8,812,800: 2880 rows of 90 blocks of 17 bytes
    recipe("q4_k_m")                                 # {"experts": "q4_k", "attention": "q4_k", ...}
    python -m moesim run model.experts_format=q4_k model.attention_format=q8_0 ...

Three layouts:
  rows   (most formats) each row of `cols` weights is ceil(cols / block) blocks of `block_bytes` bytes; a
         row whose length is not a multiple of the block is padded to whole blocks (as a scaled model's
         360-wide rows are; llama.cpp instead falls back to another type, llama-quant.cpp
         tensor_type_fallback, and HQQ refuses).
  tiles  fp8: one byte per weight plus one fp32 scale per `tile` x `tile` square (DeepSeek-V3's 128 x 128).
  flat   HQQ: groups run over the whole flattened tensor; `flat` lists its parts as (weights per unit, bytes
         per unit), each rounded up to whole units; a unit of 0 weights is a part stored once per tensor.
`bits` is the format's bits per weight, scales included (for flat formats, without the per-tensor part).

Sources (each opened and read):
  GGUF  ggml-org/llama.cpp@01243c587feceaa5d6a6c2305535ef2f549c48b8 ggml/src/ggml-common.h (block structs and
        their static_asserts: QK4_0 = QK4_1 = QK5_0 = QK5_1 = QK8_0 = QK4_NL = QK_MXFP4 = 32, QK_K = 256,
        K_SCALE_SIZE = 12, IQ3S_N_SCALE = QK_K/64), decoded as in ggml/src/ggml-quants.c (same commit).
  mxfp4 OCP Microscaling (MX) Formats v1.0: 32 FP4 E2M1 elements share one E8M0 scale. As stored by ggml
        (block_mxfp4: the scale byte, then 16 bytes of nibbles) and by gpt-oss's checkpoint
        (openai/gpt-oss@7b583341fe16729127f6d5b94a7b09ccae97e1a1 gpt_oss/torch/weights.py: `.blocks` [.., G, 16]
        and `.scales` [.., G] uint8 with bias 127): 17 bytes per 32 weights either way.
  fp8   deepseek-ai/DeepSeek-V3@9b4e9788e4a3a731f7567338ed15d3ec549ce03b inference/model.py (block_size = 128;
        a float8_e4m3fn weight carries a float32 scale [ceil(out/128), ceil(in/128)]) and inference/kernel.py
        weight_dequant (y = x * s per 128 x 128 tile).
  hqq   mobiusml/hqq@e0b1d00e095653359da9de1d7dbb35a994aa6b96 hqq/core/quantize.py (BaseQuantizeConfig defaults
        nbits=4, group_size=64, axis=1, scale and zero unquantised: one of each per group, in the compute
        dtype, 2 bytes) and hqq/core/bitpack.py (4-bit: 2 groups' rows per uint8 row; 2-bit: 4; 3-bit: 10 rows
        per int32 row, the group count padded up to a multiple of 10). The `_mo` formats are mixtral-offloading's
        (dvmazur/mixtral-offloading@ce545188b804238f0b23a59fc45e6a8f8b390c40 src/build_model.py, notebooks/demo.ipynb)
        on the hqq it pins (37502bea31f2969c6680c0c4a88ca74b3bb234a5: axis=0; quant_scale: the scales in 8 bits,
        an fp16 scale and zero per 128 of them, or 256 for its attention config; quant_zero: the zeros in 8 bits
        with one fp16 scale and zero per tensor).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import MoesimError


@dataclass(frozen=True)
class Format:
    """One storage format: `block` weights take `block_bytes` bytes (values, scales and mins together), plus
    the 2-D scales of `tile` formats; `flat` formats (HQQ) count their parts over the flattened tensor."""

    name: str
    block: int  # weights per block along a row (flat: weights of the smallest unit that holds whole parts)
    block_bytes: int  # bytes of one block
    source: str  # where block and block_bytes come from
    torch_dtype: str | None = None  # the torch dtype that holds it unpacked, where torch has one
    tile: int = 0  # 2-D scales: one per tile x tile square of weights (fp8: 128); 0: none
    tile_bytes: int = 0  # bytes of one tile's scale (fp8: a float32, 4)
    flat: tuple = ()  # HQQ: ((weights per unit, bytes per unit), ...) over the flattened tensor; 0 weights: once
    note: str = ""  # what the layout leaves out or approximates

    @property
    def bits(self) -> float:
        """Bits per weight, scales included (flat formats: without the bytes stored once per tensor)."""
        tile = 8 * self.tile_bytes / (self.tile * self.tile) if self.tile else 0.0
        return 8 * self.block_bytes / self.block + tile

    def row_bytes(self, cols: int) -> int:
        """Bytes of one row of `cols` weights in a rows format (fp8: its values, without the tile scales)."""
        if self.flat:
            raise MoesimError(f"format {self.name}: groups run over the whole tensor, not row by row; "
                              f"use tensor_bytes(rows, cols)")
        return math.ceil(cols / self.block) * self.block_bytes

    def tensor_bytes(self, rows: int, cols: int) -> int:
        """Bytes of a rows x cols weight matrix as stored (rows padded to whole blocks; tile scales; flat
        parts rounded up to whole units)."""
        if self.flat:
            n = rows * cols
            return sum(math.ceil(n / unit) * size if unit else size for unit, size in self.flat)
        scales = math.ceil(rows / self.tile) * math.ceil(cols / self.tile) * self.tile_bytes if self.tile else 0
        return rows * self.row_bytes(cols) + scales


_GGUF = "ggml-org/llama.cpp@01243c58 ggml/src/ggml-common.h"


def _gguf(name: str, block: int, block_bytes: int, struct: str) -> Format:
    return Format(name, block, block_bytes, f"{_GGUF} {struct}")


def _hqq(name: str, parts: tuple, source: str, note: str = "") -> Format:
    """An HQQ format from its parts; block and block_bytes are the smallest unit holding whole parts."""
    block = math.lcm(*(u for u, _ in parts if u))
    return Format(name, block, sum(block // u * b for u, b in parts if u), source, flat=parts, note=note)


_HQQ = "mobiusml/hqq@e0b1d00e hqq/core/quantize.py + bitpack.py, axis=1, fp16 scale and zero per group"
_HQQ_MO = "dvmazur/mixtral-offloading@ce545188 src/build_model.py on mobiusml/hqq@37502bea, axis=0"
_HQQ_PAD = ("hqq packs 2 (4-bit) or 4 (2-bit) groups per row and needs the group count divisible by it; "
            "moesim rounds up")

FORMATS: dict[str, Format] = {f.name: f for f in [
    Format("fp32", 1, 4, "IEEE 754 binary32", "fp32"),
    Format("bf16", 1, 2, "bfloat16: 1 sign, 8 exponent, 7 mantissa bits", "bf16"),
    Format("fp16", 1, 2, "IEEE 754 binary16", "fp16"),
    # GGUF tensor types: weights per block, sizeof(block_*) from its static_assert
    _gguf("q4_0", 32, 18, "block_q4_0: fp16 d + 16 nibble bytes"),
    _gguf("q4_1", 32, 20, "block_q4_1: fp16 d, m + 16 nibble bytes"),
    _gguf("q5_0", 32, 22, "block_q5_0: fp16 d + qh[4] + 16 nibble bytes"),
    _gguf("q5_1", 32, 24, "block_q5_1: fp16 d, m + qh[4] + 16 nibble bytes"),
    _gguf("q8_0", 32, 34, "block_q8_0: fp16 d + 32 int8"),
    _gguf("q2_k", 256, 84, "block_q2_K: scales[16] + qs[64] + fp16 d, dmin"),
    _gguf("q3_k", 256, 110, "block_q3_K: hmask[32] + qs[64] + scales[12] + fp16 d"),
    _gguf("q4_k", 256, 144, "block_q4_K: fp16 d, dmin + scales[12] + qs[128]"),
    _gguf("q5_k", 256, 176, "block_q5_K: fp16 d, dmin + scales[12] + qh[32] + qs[128]"),
    _gguf("q6_k", 256, 210, "block_q6_K: ql[128] + qh[64] + scales[16] + fp16 d"),
    _gguf("iq1_s", 256, 50, "block_iq1_s: fp16 d + qs[32] + uint16 qh[8]"),
    _gguf("iq1_m", 256, 56, "block_iq1_m: qs[32] + qh[16] + scales[8]"),
    _gguf("iq2_xxs", 256, 66, "block_iq2_xxs: fp16 d + uint16 qs[32]"),
    _gguf("iq2_xs", 256, 74, "block_iq2_xs: fp16 d + uint16 qs[32] + scales[8]"),
    _gguf("iq2_s", 256, 82, "block_iq2_s: fp16 d + qs[64] + qh[8] + scales[8]"),
    _gguf("iq3_xxs", 256, 98, "block_iq3_xxs: fp16 d + qs[96]"),
    _gguf("iq3_s", 256, 110, "block_iq3_s: fp16 d + qs[64] + qh[8] + signs[32] + scales[4]"),
    _gguf("iq4_nl", 32, 18, "block_iq4_nl: fp16 d + qs[16]"),
    _gguf("iq4_xs", 256, 136, "block_iq4_xs: fp16 d + uint16 scales_h + scales_l[4] + qs[128]"),
    Format("mxfp4", 32, 17, "OCP MX v1.0 MXFP4 (32 x FP4 E2M1 + one E8M0 scale); "
           f"{_GGUF} block_mxfp4: uint8 e + qs[16]; gpt-oss checkpoint .blocks/.scales"),
    Format("fp8", 1, 1, "float8 e4m3 + a float32 scale per 128 x 128 tile: deepseek-ai/DeepSeek-V3@9b4e9788 "
           "inference/model.py (block_size = 128), inference/kernel.py weight_dequant", tile=128, tile_bytes=4),
    # HQQ: codes per packing unit, then the groups' fp16 scale and zero (2 + 2 bytes per group)
    _hqq("hqq4_g64", ((128, 64), (64, 4)), _HQQ, _HQQ_PAD),  # the README's and BaseQuantizeConfig's default
    _hqq("hqq4_g128", ((256, 128), (128, 4)), _HQQ, _HQQ_PAD),
    _hqq("hqq3_g32", ((320, 128), (32, 4)), _HQQ),  # the README's 3-bit example; 10 groups per int32 row
    _hqq("hqq3_g64", ((640, 256), (64, 4)), _HQQ),
    _hqq("hqq2_g16", ((64, 16), (16, 4)), _HQQ, _HQQ_PAD),
    _hqq("hqq2_g64", ((256, 64), (64, 4)), _HQQ, _HQQ_PAD),
    # mixtral-offloading's experts: 2 bits in groups of 16 (4 bytes), 8-bit scale and zero per group, an fp16
    # scale and zero per 128 scales, one fp16 scale and zero for all the zeros of the tensor
    _hqq("hqq2_g16_mo", ((16, 4), (16, 1), (16 * 128, 4), (16, 1), (0, 4)), _HQQ_MO),
    # ... and its attention: 4 bits in groups of 64, the scales' meta-groups of 256 (its notebook sets 256)
    _hqq("hqq4_g64_mo", ((64, 32), (64, 1), (64 * 256, 4), (64, 1), (0, 4)), _HQQ_MO),
    # the paper's 3-bit scheme (arXiv:2312.17238 Section 4.2: "HQQ 3-bit with group size 64, scale group size
    # 128"; the released code has no 3-bit config) with the same quantised scales and zeros as the two above. With
    # axis=0 a tensor is [64, G] and hqq@37502bea's pack_3bit_32 pads its 64 rows to 70 and packs 10 per int32:
    # 7 int32 = 28 bytes per group of 64 (3.5 bits; dequantize drops the 6 padding rows)
    _hqq("hqq3_g64_mo", ((64, 28), (64, 1), (64 * 128, 4), (64, 1), (0, 4)), _HQQ_MO),
]}

ALIASES = {"bfloat16": "bf16", "float16": "fp16", "f16": "fp16", "half": "fp16", "float32": "fp32", "f32": "fp32",
           "float": "fp32", "float8": "fp8", "fp8_e4m3": "fp8"}


def _key(name) -> str:
    key = str(name).strip().lower()
    return ALIASES.get(key, key)


def get_format(name: str, where: str = "format") -> Format:
    """The Format called `name` (case-insensitive; bfloat16 = bf16 ...); refuses an unknown name, listing the
    known ones."""
    key = _key(name)
    if key not in FORMATS:
        raise MoesimError(f"{where}={name!r}: unknown storage format; known: {', '.join(FORMATS)}")
    return FORMATS[key]


def known_format(name: str) -> bool:
    return _key(name) in FORMATS


# GGUF file types as llama.cpp's quantizer makes them (ggml-org/llama.cpp@007dbbf3fd17eefe9b47fee45f48f7ba5e62b714
# src/llama-quant.cpp: llama_ftype_get_default_type gives each ftype's type; llama_tensor_get_type_impl moves
# some tensors to others). Read for a model that is not Falcon and has n_expert != 8 (Mixtral's 8 experts
# move attn_k and attn_v to q8_0 and attn_output to q5_k in every recipe). One format per tensor class:
#   experts    ffn_{gate,up,down}_exps: the default type; ffn_down follows the FFN_DOWN rules, which this
#              drops: q4_k_m / q5_k_m put ffn_down at q6_k in use_more_bits layers (the first and last eighth
#              of the layers and every third between: 12 of gpt-oss-20b's 24), +7.6% / +3.2% of the experts'
#              bytes; q4_k_s puts it at q5_k in the first eighth of the layers (+0.9%); q3_k_m at q4_k in
#              every layer and q5_k in the first sixteenth (+10.3%, +0.6%); q2_k at q3_k in every layer (+10.3%).
#   attention  attn_{q,k,v,output} (MLA's attn_kv_b counts as attn_v): the default type; dropped: attn_v at
#              q6_k in use_more_bits layers (q4_k_m, q5_k_m: about +1% with gpt-oss-20b's shapes, q 4096 x
#              2880, k and v 512 x 2880, output 2880 x 4096), at q5_k for the first 4 (q4_k_s), at q5_k for
#              the first 2 and q4_k after (q3_k_m); q3_k_m also puts attn_output at q4_k (with attn_v: +15%
#              with those shapes); q2_k puts attn_v at q4_k (n_gqa >= 4) and attn_output at q3_k (+18%).
#   dense      dense FFN layers and shared experts (ffn_*, ffn_*_shexp): as the experts, same dropped rules.
#              The router (ffn_gate_inp) is never quantised (tensor_allows_quantization) and stays in the
#              source dtype: its hidden x experts weights are counted at the dense format here.
#   embed      output.weight is q6_k in every recipe but q8_0 (which keeps q8_0); token_embd, when not tied to
#              it, keeps the default type: counted at q6_k here, which overstates an untied token_embd by
#              (210 - 144) / 144 = 46% at q4_k_m (and it is read a row per token, not whole).
RECIPES: dict[str, dict[str, str]] = {
    "q2_k": {"experts": "q2_k", "attention": "q2_k", "dense": "q2_k", "embed": "q6_k"},
    "q3_k_m": {"experts": "q3_k", "attention": "q3_k", "dense": "q3_k", "embed": "q6_k"},
    "q4_k_s": {"experts": "q4_k", "attention": "q4_k", "dense": "q4_k", "embed": "q6_k"},
    "q4_k_m": {"experts": "q4_k", "attention": "q4_k", "dense": "q4_k", "embed": "q6_k"},
    "q5_k_m": {"experts": "q5_k", "attention": "q5_k", "dense": "q5_k", "embed": "q6_k"},
    "q6_k": {"experts": "q6_k", "attention": "q6_k", "dense": "q6_k", "embed": "q6_k"},
    "q8_0": {"experts": "q8_0", "attention": "q8_0", "dense": "q8_0", "embed": "q8_0"},
    # LLAMA_FTYPE_MOSTLY_MXFP4_MOE: 3-D expert tensors in mxfp4, every other quantised tensor (output too) q8_0
    "mxfp4_moe": {"experts": "mxfp4", "attention": "q8_0", "dense": "q8_0", "embed": "q8_0"},
}


def recipe(name: str) -> dict[str, str]:
    """The formats of a GGUF file type (q4_k_m, q8_0 ...) per tensor class: experts, attention, dense,
    embed; for moesim.models.with_formats(spec, **recipe("q4_k_m")). Refuses an unknown name, listing them."""
    key = str(name).strip().lower().replace("-", "_")
    if key not in RECIPES:
        raise MoesimError(f"model.recipe={name!r}: unknown GGUF file type; known: {', '.join(RECIPES)}")
    return dict(RECIPES[key])
