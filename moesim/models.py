"""Models: what an MoE architecture is in numbers (ModelSpec), the catalogue of named models (MODEL_SPECS,
`model_spec`), and the spec as a backend stores and scales it (weights_dtype, stored_spec, scale_spec).

    from moesim.models import model_spec, scale_spec, stored_spec
    spec = model_spec("gpt-oss-20b")                     # a preset; or a dict of fields; or a ModelSpec
    stored_spec(scale_spec(spec, 0.25)).bytes_per_expert  # bytes one load moves at model.scale=0.25, as bf16

A trace records its ModelSpec in its header (moesim/trace.py); `model=NAME` options name a preset here.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .errors import MoesimError, TraceError


@dataclass(frozen=True)
class ModelSpec:
    """The numbers of an MoE architecture that decide what moves: one `key` = one routed expert of one layer.

    `layers` counts MoE layers only (the trace's L); dense layers of the model are not in the trace.
    """

    name: str
    layers: int  # MoE layers
    experts: int  # routed experts per layer
    top_k: int  # experts chosen per token and layer
    hidden: int  # model (residual) width
    ffn: int  # one routed expert's intermediate size (gate, up: hidden x ffn; down: ffn x hidden)
    shared_experts: int = 0  # always-active experts per layer (DeepSeek, Qwen)
    shared_ffn: int = 0  # intermediate size of one shared expert; 0 means `ffn`
    dtype: str = "bf16"  # storage format of expert weights
    bits_per_weight: float = 16.0  # including block scales (MXFP4: 4 bits + an 8-bit scale per 32 = 4.25)

    @property
    def bytes_per_expert(self) -> int:
        """Bytes of one routed expert's gate, up and down projections as stored."""
        return math.ceil(3 * self.hidden * self.ffn * self.bits_per_weight / 8)

    @property
    def bytes_per_shared_expert(self) -> int:
        return math.ceil(3 * self.hidden * (self.shared_ffn or self.ffn) * self.bits_per_weight / 8)

    @property
    def total_experts(self) -> int:
        return self.layers * self.experts

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "model_spec") -> "ModelSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise TraceError(f"{where}: unknown field(s) {unknown}; expected some of {sorted(names)}")
        missing = [n for n in ("name", "layers", "experts", "top_k", "hidden", "ffn") if n not in d]
        if missing:
            raise TraceError(f"{where}: missing field(s) {missing}")
        try:
            spec = cls(**d)
        except TypeError as e:
            raise TraceError(f"{where}: {e}") from None
        for n in ("layers", "experts", "top_k", "hidden", "ffn"):
            v = getattr(spec, n)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise TraceError(f"{where}.{n}: expected a positive integer, got {v!r}")
        if spec.top_k > spec.experts:
            raise TraceError(f"{where}.top_k: {spec.top_k} is more than experts={spec.experts}")
        for n in ("shared_experts", "shared_ffn"):
            v = getattr(spec, n)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise TraceError(f"{where}.{n}: expected an integer >= 0, got {v!r}")
        for n in ("name", "dtype"):
            if not isinstance(getattr(spec, n), str):
                raise TraceError(f"{where}.{n}: expected a string, got {getattr(spec, n)!r}")
        b = spec.bits_per_weight
        if not (isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) and b > 0):
            raise TraceError(f"{where}.bits_per_weight: expected a positive number, got {b!r}")
        return spec


# Numbers from each model's config.json on the Hugging Face Hub (the repository named in the comment).
MODEL_SPECS: dict[str, ModelSpec] = {
    # mistralai/Mixtral-8x7B-v0.1: num_hidden_layers 32, num_local_experts 8, num_experts_per_tok 2,
    # hidden_size 4096, intermediate_size 14336, torch_dtype bfloat16.
    "mixtral-8x7b": ModelSpec("mixtral-8x7b", 32, 8, 2, 4096, 14336),
    # deepseek-ai/DeepSeek-V3: num_hidden_layers 61 with first_k_dense_replace 3 -> 58 MoE layers;
    # n_routed_experts 256, num_experts_per_tok 8, n_shared_experts 1, hidden_size 7168,
    # moe_intermediate_size 2048; weights FP8 e4m3 with one fp32 scale per 128x128 block (+0.002 bit).
    "deepseek-v3": ModelSpec("deepseek-v3", 58, 256, 8, 7168, 2048, shared_experts=1,
                             dtype="fp8", bits_per_weight=8 + 32 / (128 * 128)),
    # deepseek-ai/DeepSeek-V2-Lite: num_hidden_layers 27, first_k_dense_replace 1 -> 26 MoE layers;
    # n_routed_experts 64, num_experts_per_tok 6, n_shared_experts 2, hidden_size 2048,
    # moe_intermediate_size 1408, torch_dtype bfloat16.
    "deepseek-v2-lite": ModelSpec("deepseek-v2-lite", 26, 64, 6, 2048, 1408, shared_experts=2),
    # Qwen/Qwen3-30B-A3B: num_hidden_layers 48 (decoder_sparse_step 1: all MoE), num_experts 128,
    # num_experts_per_tok 8, hidden_size 2048, moe_intermediate_size 768, torch_dtype bfloat16.
    "qwen3-30b-a3b": ModelSpec("qwen3-30b-a3b", 48, 128, 8, 2048, 768),
    # Qwen/Qwen1.5-MoE-A2.7B: num_hidden_layers 24, num_experts 60, num_experts_per_tok 4,
    # hidden_size 2048, moe_intermediate_size 1408, one shared expert of shared_expert_intermediate_size 5632.
    "qwen1.5-moe-a2.7b": ModelSpec("qwen1.5-moe-a2.7b", 24, 60, 4, 2048, 1408,
                                   shared_experts=1, shared_ffn=5632),
    # allenai/OLMoE-1B-7B-0924: num_hidden_layers 16, num_experts 64, num_experts_per_tok 8,
    # hidden_size 2048, intermediate_size 1024, bf16 weights.
    "olmoe-1b-7b": ModelSpec("olmoe-1b-7b", 16, 64, 8, 2048, 1024),
    # openai/gpt-oss-20b: num_hidden_layers 24, num_local_experts 32, experts_per_token 4,
    # hidden_size 2880, intermediate_size 2880; experts stored as MXFP4 (4-bit values + one 8-bit scale
    # per 32 weights = 4.25 bits): 3*2880*2880*4.25/8 = 13.2 MB per expert (../shared/traces/README.md).
    "gpt-oss-20b": ModelSpec("gpt-oss-20b", 24, 32, 4, 2880, 2880, dtype="mxfp4", bits_per_weight=4.25),
}


def model_spec(name_or_spec: str | dict | ModelSpec) -> ModelSpec:
    """A ModelSpec from a preset name, a dict of fields, or a ModelSpec."""
    if isinstance(name_or_spec, ModelSpec):
        return name_or_spec
    if isinstance(name_or_spec, dict):
        return ModelSpec.from_dict(dict(name_or_spec))
    if name_or_spec not in MODEL_SPECS:
        raise TraceError(f"model: unknown preset {name_or_spec!r}; known: {', '.join(MODEL_SPECS)}")
    return MODEL_SPECS[name_or_spec]


# Dtypes a backend can store expert weights in (torch has them); quantised formats are stored as bf16.
DTYPE_BITS = {"bf16": 16, "fp16": 16, "fp32": 32}
_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "f16": "fp16", "half": "fp16", "float32": "fp32",
                  "f32": "fp32", "float": "fp32"}


def weights_dtype(spec_dtype: str, requested: str = "auto") -> str:
    """The torch dtype name (bf16 | fp16 | fp32) expert weights are stored in: `requested`, or with "auto"
    the spec's own where torch has it, else bf16 (mxfp4, fp8 and other quantised formats)."""
    if requested != "auto":
        name = _DTYPE_ALIASES.get(str(requested).lower(), str(requested).lower())
        if name not in DTYPE_BITS:
            raise MoesimError(f"backend.dtype={requested!r}: expected auto, bf16, fp16 or fp32")
        return name
    name = _DTYPE_ALIASES.get(spec_dtype.lower(), spec_dtype.lower())
    return name if name in DTYPE_BITS else "bf16"


def stored_spec(spec: ModelSpec, dtype: str = "auto") -> ModelSpec:
    """`spec` as this backend stores it: dtype and bits per weight of the torch dtype (bf16 for mxfp4/fp8),
    so bytes_per_expert is the bytes each load really moves. Run the sim on it to compare with torch."""
    name = weights_dtype(spec.dtype, dtype)
    bits = float(DTYPE_BITS[name])
    if spec.dtype == name and spec.bits_per_weight == bits:
        return spec
    return dataclasses.replace(spec, dtype=name, bits_per_weight=bits)


def scale_spec(spec: ModelSpec, scale: float) -> ModelSpec:
    """`spec` with hidden, ffn and shared_ffn multiplied by `scale` (rounded), routing unchanged (layers,
    experts, top-k): `model.scale=0.25` makes every expert 16x smaller. Refuses a scale that leaves a
    dimension at zero."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise MoesimError(f"model.scale={scale!r}: expected a number > 0 (0.25 shrinks hidden and ffn sizes 4x)")
    if scale == 1:
        return spec
    dims = {"hidden": spec.hidden, "ffn": spec.ffn}
    if spec.shared_ffn:
        dims["shared_ffn"] = spec.shared_ffn
    scaled = {k: int(round(v * scale)) for k, v in dims.items()}
    for k, v in scaled.items():
        if v < 1:
            smallest = 0.5 / min(dims.values())
            raise MoesimError(f"model.scale={scale:g} leaves {k} = {dims[k]} x {scale:g} = 0 for {spec.name}; "
                              f"the smallest usable scale is {smallest:.2g} (try model.scale={max(smallest, 0.01):.2g} "
                              f"or larger)")
    return dataclasses.replace(spec, name=f"{spec.name}@{scale:g}", **scaled)
