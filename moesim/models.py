"""Models: what an MoE architecture is in numbers (ModelSpec), the catalogue of named models (MODEL_SPECS,
`model_spec`), and the spec as a backend stores and scales it (weights_dtype, stored_spec, scale_spec).

    from moesim.models import model_spec, scale_spec, stored_spec
    spec = model_spec("gpt-oss-20b")                     # a preset; or a dict of fields; or a ModelSpec
    stored_spec(scale_spec(spec, 0.25)).bytes_per_expert  # bytes one load moves at model.scale=0.25 (packed)

A trace records its ModelSpec in its header (moesim/trace.py); `model=NAME` options name a preset here.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .errors import MoesimError, TraceError
from .formats import FORMATS, get_format, known_format


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
    dtype: str = "bf16"  # storage format of routed expert weights (moesim/formats.py names it)
    bits_per_weight: float = 16.0  # including block scales (MXFP4: 4 bits + an 8-bit scale per 32 = 4.25)
    # The rest of the model (moesim/whole.py turns these into bytes and times). attention "" means the spec
    # does not say (an older trace): then only the routed and shared experts are modelled.
    attention: str = ""  # "gqa" (MHA is gqa with kv_heads == heads) | "mla" (DeepSeek's latent attention)
    heads: int = 0  # query heads
    kv_heads: int = 0  # gqa: key/value heads
    head_dim: int = 0  # gqa: q, k and v head width; mla: the v head width (v_head_dim)
    q_lora_rank: int = 0  # mla, gqa: the query's down-projection rank (0: one direct query projection)
    kv_lora_rank: int = 0  # mla: the compressed key/value width (cached per token)
    rope_head_dim: int = 0  # mla: the rotary part of a query/key head (its key part is cached, one per token)
    nope_head_dim: int = 0  # mla: the non-rotary part of a query/key head
    dense_layers: int = 0  # layers with a dense FFN instead of experts (DeepSeek's first_k_dense_replace)
    dense_ffn: int = 0  # their intermediate size
    vocab: int = 0  # embedding rows (vocab_size)
    tied_embeddings: bool = False  # the LM head is the embedding matrix
    sliding_window: int = 0  # tokens a sliding-window layer attends to (0: no such layers)
    sliding_layers: int = 0  # how many of all layers (MoE and dense) attend through that window
    # storage formats of the other tensor classes (moesim/formats.py): attention projections; dense FFN
    # layers, shared experts and routers; embeddings and LM head; the KV cache
    attention_format: str = "bf16"
    dense_format: str = "bf16"
    embed_format: str = "bf16"
    kv_format: str = "bf16"

    @property
    def bytes_per_expert(self) -> int:
        """Bytes of one routed expert's gate, up and down projections as stored: in a format moesim/formats.py
        knows (at its bits), whole blocks per row; otherwise ceil(3 * hidden * ffn * bits_per_weight / 8)."""
        return _ffn_bytes(self.dtype, self.bits_per_weight, self.hidden, self.ffn)

    @property
    def bytes_per_shared_expert(self) -> int:
        """Bytes of one shared expert: in dense_format where the spec describes the whole model, else in the
        routed experts' format (older specs)."""
        ffn = self.shared_ffn or self.ffn
        if self.attention:
            return _ffn_bytes(self.dense_format, None, self.hidden, ffn)
        return _ffn_bytes(self.dtype, self.bits_per_weight, self.hidden, ffn)

    @property
    def whole(self) -> bool:
        """The spec describes the whole model (attention, embeddings...), not only its experts."""
        return bool(self.attention)

    @property
    def all_layers(self) -> int:
        """Transformer blocks: MoE layers + dense layers."""
        return self.layers + self.dense_layers

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
        for n in _COUNTS:
            v = getattr(spec, n)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise TraceError(f"{where}.{n}: expected an integer >= 0, got {v!r}")
        for n in ("name", "dtype", "attention"):
            v = getattr(spec, n)
            if not isinstance(v, str):
                raise TraceError(f"{where}.{n}: expected a string, got {v!r}")
            try:
                v.encode("utf-8")  # a lone surrogate passes JSON but breaks every file and page written later
            except UnicodeEncodeError:
                raise TraceError(f"{where}.{n}: {v!r} is not valid Unicode text (a lone surrogate)") from None
        if not isinstance(spec.tied_embeddings, bool):
            raise TraceError(f"{where}.tied_embeddings: expected true or false, got {spec.tied_embeddings!r}")
        for n in ("attention_format", "dense_format", "embed_format", "kv_format"):
            v = getattr(spec, n)
            if not isinstance(v, str) or not known_format(v):
                raise TraceError(f"{where}.{n}: expected a storage format ({', '.join(FORMATS)}), got {v!r}")
        _check_limits(spec, where, [n for n in LIMITS if n != "bits_per_weight"])  # before anything is sized
        _check_whole(spec, where)
        b = spec.bits_per_weight
        if not (isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) and b > 0):
            raise TraceError(f"{where}.bits_per_weight: expected a positive number, got {b!r}")
        _check_limits(spec, where, ("bits_per_weight",))
        return spec


_COUNTS = ("shared_experts", "shared_ffn", "heads", "kv_heads", "head_dim", "q_lora_rank", "kv_lora_rank",
           "rope_head_dim", "nope_head_dim", "dense_layers", "dense_ffn", "vocab", "sliding_window", "sliding_layers")
# Upper bounds of what a file may claim, checked before anything is sized from them (a 4 KB trace claiming
# experts=2**31 had grown a run to 3 GB): far above every model of moesim's own catalogue (MODEL_SPECS, whose
# largest are 94 layers, 256 experts, top-8, hidden 7168, expert FFN 16384, dense FFN 18432, vocabulary 201088);
# the values are moesim's choice, not from a source.
LIMITS = {"layers": 1024, "experts": 16384, "top_k": 1024, "hidden": 131072, "ffn": 1048576,
          "shared_experts": 256, "shared_ffn": 1048576, "heads": 4096, "kv_heads": 4096, "head_dim": 4096,
          "q_lora_rank": 131072, "kv_lora_rank": 131072, "rope_head_dim": 4096, "nope_head_dim": 4096,
          "dense_layers": 1024, "dense_ffn": 1048576, "vocab": 16777216, "sliding_window": 2**31 - 1,
          "sliding_layers": 1024, "bits_per_weight": 64, "layers x experts": 2**20}


def _check_limits(spec: ModelSpec, where: str, names) -> None:
    for n in names:
        v = spec.layers * spec.experts if n == "layers x experts" else getattr(spec, n)
        if v > LIMITS[n]:
            raise TraceError(f"{where}.{n}: {v:,} is more than moesim accepts ({LIMITS[n]:,}, far above every "
                             f"model of its catalogue): a damaged or hostile file?")


def _check_whole(spec: ModelSpec, where: str) -> None:
    """The whole-model fields agree with each other (or are all unset)."""
    if spec.attention not in ("", "gqa", "mla"):
        raise TraceError(f"{where}.attention: expected 'gqa', 'mla' or '' (not described), got {spec.attention!r}")
    if not spec.attention:
        return
    need = {"gqa": ("heads", "kv_heads", "head_dim", "vocab"),
            "mla": ("heads", "head_dim", "kv_lora_rank", "rope_head_dim", "nope_head_dim", "vocab")}[spec.attention]
    zero = [n for n in need if getattr(spec, n) == 0]
    if zero:
        raise TraceError(f"{where}: attention={spec.attention!r} needs {', '.join(zero)} > 0")
    if spec.attention == "gqa" and spec.heads % spec.kv_heads:
        raise TraceError(f"{where}.kv_heads: {spec.kv_heads} does not divide heads={spec.heads}")
    if spec.dense_layers and not spec.dense_ffn:
        raise TraceError(f"{where}.dense_ffn: dense_layers={spec.dense_layers} needs their intermediate size > 0")
    if spec.sliding_layers and not spec.sliding_window:  # more than all layers counts as all (a cut-down model)
        raise TraceError(f"{where}.sliding_layers: {spec.sliding_layers} needs sliding_window > 0")


def _ffn_bytes(fmt: str, bits: float | None, hidden: int, ffn: int) -> int:
    """Bytes of an FFN's gate and up ([ffn, hidden] each) and down ([hidden, ffn]) in format `fmt`; `bits`
    other than the format's own (or an unknown format) falls back to ceil(3 * hidden * ffn * bits / 8)."""
    if known_format(fmt):
        f = get_format(fmt)
        if bits is None or bits == f.bits:
            return 2 * f.tensor_bytes(ffn, hidden) + f.tensor_bytes(hidden, ffn)
    return math.ceil(3 * hidden * ffn * bits / 8)


def model_spec(name_or_spec: str | dict | ModelSpec) -> ModelSpec:
    """A ModelSpec from a preset name, a dict of fields, or a ModelSpec."""
    if isinstance(name_or_spec, ModelSpec):
        return name_or_spec
    if isinstance(name_or_spec, dict):
        return ModelSpec.from_dict(dict(name_or_spec))
    if name_or_spec not in MODEL_SPECS:
        raise TraceError(f"model: unknown preset {name_or_spec!r}; known: {', '.join(MODEL_SPECS)}")
    return MODEL_SPECS[name_or_spec]


# Dtypes torch computes expert weights in. A packed format (mxfp4, fp8, q4_k, hqq4_g64 ...: moesim/formats.py)
# is stored as its own bytes and decoded to bf16 for compute (moesim/backends/torch/packed.py).
DTYPE_BITS = {"bf16": 16, "fp16": 16, "fp32": 32}
_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "f16": "fp16", "half": "fp16", "float32": "fp32",
                  "f32": "fp32", "float": "fp32"}


def weights_dtype(spec_dtype: str, requested: str = "auto") -> str:
    """The torch dtype name (bf16 | fp16 | fp32) expert weights are computed in: `requested`, or with "auto"
    the spec's own where torch has it, else bf16 (a packed format such as mxfp4 or fp8 is decoded to bf16)."""
    if requested != "auto":
        name = _DTYPE_ALIASES.get(str(requested).lower(), str(requested).lower())
        if name not in DTYPE_BITS:
            raise MoesimError(f"backend.dtype={requested!r}: expected auto, bf16, fp16 or fp32")
        return name
    name = _DTYPE_ALIASES.get(spec_dtype.lower(), spec_dtype.lower())
    return name if name in DTYPE_BITS else "bf16"


def stored_spec(spec: ModelSpec, dtype: str = "auto") -> ModelSpec:
    """`spec` as the torch backend stores it, so that bytes_per_expert is the bytes each load really moves.
    "auto": the spec's own format, packed (mxfp4, fp8, q4_k ...), where moesim/formats.py knows it at the
    spec's bits_per_weight; otherwise (an unknown format or other bits) bf16. bf16 | fp16 | fp32: every
    routed expert unpacked in that dtype. Run the sim on it to compare with torch."""
    if dtype == "auto" and known_format(spec.dtype) and spec.bits_per_weight == get_format(spec.dtype).bits:
        return spec
    name = weights_dtype(spec.dtype, dtype)
    bits = float(DTYPE_BITS[name])
    if spec.dtype == name and spec.bits_per_weight == bits:
        return spec
    return dataclasses.replace(spec, dtype=name, bits_per_weight=bits)


_SCALED = ("shared_ffn", "dense_ffn", "head_dim", "q_lora_rank", "kv_lora_rank", "rope_head_dim", "nope_head_dim",
           "vocab")
FORMAT_FIELDS = {"experts": "dtype", "attention": "attention_format", "dense": "dense_format",
                 "embed": "embed_format", "kv": "kv_format"}  # tensor class -> ModelSpec field


def with_formats(spec: ModelSpec, **formats) -> ModelSpec:
    """`spec` with tensor classes stored in other formats: with_formats(spec, experts="q4_k", attention="q8_0");
    classes: experts, attention, dense (dense FFN layers, shared experts, routers), embed (embeddings, LM head),
    kv (the KV cache). None leaves a class as it is. `python -m moesim run model.experts_format=q4_k`."""
    changes = {}
    for cls, name in formats.items():
        if cls not in FORMAT_FIELDS:
            raise MoesimError(f"model.{cls}_format: unknown tensor class; known: {', '.join(FORMAT_FIELDS)}")
        if name is None:
            continue
        f = get_format(str(name), f"model.{cls}_format")
        changes[FORMAT_FIELDS[cls]] = f.name
        if cls == "experts":
            changes["bits_per_weight"] = f.bits
    return dataclasses.replace(spec, **changes) if changes else spec


def scale_spec(spec: ModelSpec, scale: float) -> ModelSpec:
    """`spec` with hidden, ffn and shared_ffn (and the whole model's widths: head_dim, the MLA ranks, dense_ffn,
    vocab) multiplied by `scale` (rounded), routing and head counts unchanged (layers, experts, top-k, heads):
    `model.scale=0.25` makes every expert 16x smaller. Refuses a scale that leaves a
    dimension at zero."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise MoesimError(f"model.scale={scale!r}: expected a number > 0 (0.25 shrinks hidden and ffn sizes 4x)")
    if scale == 1:
        return spec
    dims = {"hidden": spec.hidden, "ffn": spec.ffn}
    for k in _SCALED:  # the rest of the model shrinks with it where the spec describes it
        if getattr(spec, k):
            dims[k] = getattr(spec, k)
    scaled = {k: int(round(v * scale)) for k, v in dims.items()}
    for k, v in scaled.items():
        if v < 1:
            smallest = 0.5 / min(dims.values())
            raise MoesimError(f"model.scale={scale:g} leaves {k} = {dims[k]} x {scale:g} = 0 for {spec.name}; "
                              f"the smallest usable scale is {smallest:.2g} (try model.scale={max(smallest, 0.01):.2g} "
                              f"or larger)")
    return dataclasses.replace(spec, name=f"{spec.name}@{scale:g}", **scaled)


from .catalogue import MODEL_SPECS  # noqa: E402  (the catalogue builds ModelSpecs: imported once they exist)
