"""Routing traces: the `.moetrace.safetensors` format, ModelSpec presets, loading, saving, validation.

    from moesim.trace import load_trace
    tr = load_trace("traces/cache/gpt-oss-20b-....moetrace.safetensors")
    for step in tr.steps():              # one forward pass at a time
        for layer, (ids, counts) in enumerate(step.requests()):
            ...                          # the experts layer `layer` needs, with their token counts

A trace file is a safetensors file (see ../shared/DESIGN.md, "Trace file"):

    experts    int16   [T, L, K]  routed expert ids, best first; -1 where fewer than K were chosen
    weights    float16 [T, L, K]  gate weights as the model applied them
    step       int32   [T]        tokens with equal step run together; non-decreasing
    seq        int32   [T]        the sequence (request) of each token
    phase      uint8   [T]        0 prefill, 1 decode
    predicted  int16   [T, L, P]  optional: experts guessed for layer l before it ran

Metadata (strings): `format` = "moesim-trace", `format_version`, `model_spec` (JSON), `source` (JSON).
Loading parses the header ourselves and memory-maps the tensors (np.memmap), so opening a large trace
reads only the header; validation then scans the data in bounded chunks. Nothing is ever unpickled.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import MoesimError, TraceError
from .files import atomic_write

FORMAT = "moesim-trace"
FORMAT_VERSION = "1"
SUFFIX = ".moetrace.safetensors"

# tensor name -> (numpy dtype, safetensors dtype tag, rank)
TENSORS = {
    "experts": (np.int16, "I16", 3),
    "weights": (np.float16, "F16", 3),
    "step": (np.int32, "I32", 1),
    "seq": (np.int32, "I32", 1),
    "phase": (np.uint8, "U8", 1),
    "predicted": (np.int16, "I16", 3),
}
OPTIONAL = {"predicted"}
PREFILL, DECODE = 0, 1


# --------------------------------------------------------------------------------------------- model spec
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


# ------------------------------------------------------------------------------------------------- trace
@dataclass
class Step:
    """One forward pass: tokens [start, stop) of the trace, all of one sequence's phase at this step."""

    index: int
    start: int  # first token
    stop: int  # one past the last token
    experts: np.ndarray  # [n, L, K] view into the trace
    weights: np.ndarray  # [n, L, K] view

    @property
    def n_tokens(self) -> int:
        return self.stop - self.start

    def requests(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per layer: (expert ids, token counts), in the order first seen scanning tokens' rows best first."""
        out = []
        for layer in range(self.experts.shape[1]):
            out.append(layer_request(self.experts[:, layer, :]))
        return out


def layer_request(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unique ids in order of first appearance, token count of each) for rows [n, K]; -1 ignored."""
    if rows.shape[0] == 1:  # batch-1 decode: the row itself, already unique (validated)
        r = rows[0]
        ids = r[r >= 0].astype(np.int64)
        return ids, np.ones(len(ids), dtype=np.int64)
    flat = rows.reshape(-1)
    flat = flat[flat >= 0].astype(np.int64)
    uniq, first, counts = np.unique(flat, return_index=True, return_counts=True)
    order = np.argsort(first, kind="stable")
    return uniq[order], counts[order]


@dataclass
class Trace:
    """A routing trace in memory or memory-mapped from a file. Arrays are views; nothing is copied."""

    spec: ModelSpec
    experts: np.ndarray  # int16 [T, L, K]
    weights: np.ndarray  # float16 [T, L, K]
    step: np.ndarray  # int32 [T]
    seq: np.ndarray  # int32 [T]
    phase: np.ndarray  # uint8 [T]
    predicted: np.ndarray | None = None  # int16 [T, L, P]
    source: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.experts.shape[0])

    @property
    def n_layers(self) -> int:
        return int(self.experts.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.experts.shape[2])

    @property
    def step_starts(self) -> np.ndarray:
        """int64 [S+1]: token index where each step starts, and T at the end."""
        if not hasattr(self, "_step_starts"):
            s = np.asarray(self.step)
            if len(s) == 0:  # no tokens, no steps
                self._step_starts = np.zeros(1, np.int64)
            else:
                change = np.flatnonzero(s[1:] != s[:-1]) + 1
                self._step_starts = np.concatenate([[0], change, [len(s)]]).astype(np.int64)
        return self._step_starts

    @property
    def n_steps(self) -> int:
        return len(self.step_starts) - 1

    @property
    def n_seqs(self) -> int:
        if self.n_tokens == 0:
            return 0
        s = np.asarray(self.seq)
        return int(1 + np.count_nonzero(s[1:] != s[:-1])) if _seq_contiguous(s) else len(np.unique(s))

    def steps(self) -> Iterator[Step]:
        """The steps in trace order."""
        b = self.step_starts
        for i in range(len(b) - 1):
            lo, hi = int(b[i]), int(b[i + 1])
            yield Step(i, lo, hi, self.experts[lo:hi], self.weights[lo:hi])

    def step_seq(self) -> np.ndarray:
        """int32 [S]: the sequence of each step's first token."""
        return np.asarray(self.seq)[self.step_starts[:-1]]

    def describe(self) -> str:
        return (f"{self.n_tokens} tokens, {self.n_steps} steps, {self.n_seqs} sequences, "
                f"model {self.spec.name} ({self.n_layers} layers x {self.spec.experts} experts, top-{self.top_k})")

    def slice_tokens(self, lo: int, hi: int) -> "Trace":
        """Tokens [lo, hi) as a new Trace of views (for calibration prefixes and held-out parts)."""
        p = self.predicted[lo:hi] if self.predicted is not None else None
        return Trace(self.spec, self.experts[lo:hi], self.weights[lo:hi], self.step[lo:hi], self.seq[lo:hi],
                     self.phase[lo:hi], p, dict(self.source), self.path)


def _seq_contiguous(s: np.ndarray) -> bool:
    change = np.count_nonzero(s[1:] != s[:-1])
    return change + 1 == len(np.unique(s))


# -------------------------------------------------------------------------------------------- save / load
def save_trace(trace: Trace, path: str | os.PathLike) -> Path:
    """Write `trace` atomically (temp file in the same folder, then rename). Validates first."""
    from safetensors.numpy import save_file

    path = Path(path)
    validate_arrays(trace, str(path))
    tensors = {name: np.ascontiguousarray(getattr(trace, name), dtype=TENSORS[name][0])
               for name in TENSORS if getattr(trace, name) is not None}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
            "model_spec": json.dumps(trace.spec.to_dict()), "source": json.dumps(trace.source)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


_DTYPE_TAGS = {"BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
               "F64", "I64", "U64"}


def _read_header(path: Path) -> tuple[dict, int]:
    """(header dict, byte offset of the data section). Raises TraceError for anything not safetensors."""
    size = path.stat().st_size
    if size < 8:
        raise TraceError(f"{path}: not a safetensors file ({size} bytes; a header length of 8 bytes is missing)")
    try:
        f = open(path, "rb")
    except OSError as e:
        raise TraceError(f"{path}: cannot be read ({e.strerror})") from None
    with f:
        n = int.from_bytes(f.read(8), "little")
        if n < 2 or n > 100 * 2**20:
            raise TraceError(f"{path}: not a safetensors file (header length {n} is not plausible)")
        if 8 + n > size:
            raise TraceError(f"{path}: truncated file: header says {n} bytes but the file has {size - 8} after the length")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: deep nesting
        raise TraceError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise TraceError(f"{path}: not a safetensors file (header is not a JSON object)")
    return header, 8 + n


def load_trace(path: str | os.PathLike, validate: bool = True) -> Trace:
    """Open a `.moetrace.safetensors` file memory-mapped; check header, shapes and (if `validate`) data."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path}: no such trace file")
    header, data_start = _read_header(path)
    size = path.stat().st_size
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict):
        raise TraceError(f"{path}: metadata missing (expected __metadata__ with format={FORMAT!r})")
    if meta.get("format") != FORMAT:
        raise TraceError(f"{path}: metadata field 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise TraceError(f"{path}: metadata field 'format_version' is {meta.get('format_version')!r}, "
                         f"this moesim reads version {FORMAT_VERSION!r}")
    for key in ("model_spec", "source"):
        if key not in meta:
            raise TraceError(f"{path}: metadata field {key!r} missing")
    try:
        spec_d, source = json.loads(meta["model_spec"]), json.loads(meta["source"])
    except (TypeError, json.JSONDecodeError) as e:
        raise TraceError(f"{path}: metadata field 'model_spec' or 'source' is not JSON ({e})") from None
    if not isinstance(spec_d, dict) or not isinstance(source, dict):
        raise TraceError(f"{path}: metadata fields 'model_spec' and 'source' must be JSON objects")
    spec = ModelSpec.from_dict(spec_d, where=f"{path}: metadata model_spec")

    arrays: dict[str, np.ndarray] = {}
    for name, (np_dtype, tag, rank) in TENSORS.items():
        info = header.get(name)
        if info is None:
            if name in OPTIONAL:
                continue
            raise TraceError(f"{path}: tensor {name!r} missing")
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise TraceError(f"{path}: tensor {name!r}: header entry needs dtype, shape and data_offsets")
        if info["dtype"] != tag:
            raise TraceError(f"{path}: tensor {name!r} has dtype {info['dtype']}, expected {tag}")
        shape, offs = info["shape"], info["data_offsets"]
        if (not isinstance(shape, list) or len(shape) != rank
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise TraceError(f"{path}: tensor {name!r} has shape {shape}, expected rank {rank} of integers >= 0")
        # numpy's limit: the size ignoring zero dimensions must fit in an int64 (else np.zeros/np.memmap fail)
        if math.prod(max(d, 1) for d in shape) * np.dtype(np_dtype).itemsize >= 2**63:
            raise TraceError(f"{path}: tensor {name!r} has shape {shape}, too large to be a trace")
        if not (isinstance(offs, list) and len(offs) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) for o in offs) and 0 <= offs[0] <= offs[1]):
            raise TraceError(f"{path}: tensor {name!r} has bad data_offsets {offs}")
        nbytes = math.prod(shape) * np.dtype(np_dtype).itemsize  # exact: np.prod wraps around in int64
        if offs[1] - offs[0] != nbytes:
            raise TraceError(f"{path}: tensor {name!r}: data_offsets span {offs[1] - offs[0]} bytes, "
                             f"shape {shape} of {tag} needs {nbytes}")
        if data_start + offs[1] > size:
            raise TraceError(f"{path}: truncated file: tensor {name!r} ends at byte {data_start + offs[1]}, "
                             f"file has {size}")
        if nbytes == 0:
            arrays[name] = np.zeros(shape, dtype=np_dtype)
        else:
            arrays[name] = np.memmap(path, dtype=np_dtype, mode="r", offset=data_start + offs[0], shape=tuple(shape))
    extra = sorted(set(header) - set(TENSORS))
    if extra:
        raise TraceError(f"{path}: unexpected tensor(s) {extra}; a trace holds {sorted(TENSORS)}")
    trace = Trace(spec, arrays["experts"], arrays["weights"], arrays["step"], arrays["seq"], arrays["phase"],
                  arrays.get("predicted"), source, path)
    validate_shapes(trace, str(path))
    if validate:
        validate_arrays(trace, str(path))
    return trace


# ------------------------------------------------------------------------------------------------ checks
def validate_shapes(tr: Trace, where: str) -> None:
    """Check that T, L and K agree between tensors and with the model spec."""
    e, w = tr.experts, tr.weights
    if e.ndim != 3:
        raise TraceError(f"{where}: tensor 'experts' has rank {e.ndim}, expected 3 [T, L, K]")
    T, L, K = e.shape
    if w.shape != e.shape:
        raise TraceError(f"{where}: tensor 'weights' has shape {list(w.shape)}, expected {[T, L, K]} like 'experts'")
    for name in ("step", "seq", "phase"):
        a = getattr(tr, name)
        if a.shape != (T,):
            raise TraceError(f"{where}: tensor {name!r} has shape {list(a.shape)}, expected [{T}] (T of 'experts')")
    if L != tr.spec.layers:
        raise TraceError(f"{where}: tensor 'experts' has L={L} layers, model_spec.layers is {tr.spec.layers}")
    if K != tr.spec.top_k:
        raise TraceError(f"{where}: tensor 'experts' has K={K}, model_spec.top_k is {tr.spec.top_k}")
    p = tr.predicted
    if p is not None and (p.ndim != 3 or p.shape[:2] != (T, L)):
        raise TraceError(f"{where}: tensor 'predicted' has shape {list(p.shape)}, expected [{T}, {L}, P]")


CHUNK_ELEMENTS = 1 << 22  # ids checked at a time (T*L*K elements): bounded memory whatever the trace's shape


def validate_arrays(tr: Trace, where: str) -> None:
    """Check every value: ids in range and unique per row, weights finite and >= 0, step non-decreasing,
    phase 0/1. Scans in chunks of CHUNK_ELEMENTS ids so a memory-mapped trace is never loaded whole."""
    validate_shapes(tr, where)
    for name, (np_dtype, _, _) in TENSORS.items():
        a = getattr(tr, name)
        if a is not None and a.dtype != np_dtype:
            raise TraceError(f"{where}: tensor {name!r} has dtype {a.dtype}, expected {np.dtype(np_dtype)}")
    E = tr.spec.experts
    T = tr.n_tokens
    prev_step = None
    chunk = max(1, CHUNK_ELEMENTS // max(1, tr.n_layers * tr.top_k))  # tokens
    for lo in range(0, T, chunk):
        hi = min(T, lo + chunk)
        e = np.asarray(tr.experts[lo:hi])
        _check_ids(e, E, "experts", lo, where)
        w = np.asarray(tr.weights[lo:hi])
        bad = ~np.isfinite(w) | (w < 0)
        if bad.any():
            t, l, k = np.argwhere(bad)[0]
            raise TraceError(f"{where}: tensor 'weights' at [token {lo + t}, layer {l}, {k}] is {w[t, l, k]}, "
                             f"expected a finite number >= 0")
        s = np.asarray(tr.step[lo:hi])
        if prev_step is not None and len(s) and s[0] < prev_step:
            raise TraceError(f"{where}: tensor 'step' decreases at token {lo} ({prev_step} -> {s[0]})")
        dec = np.flatnonzero(s[1:] < s[:-1])
        if len(dec):
            t = dec[0]
            raise TraceError(f"{where}: tensor 'step' decreases at token {lo + t + 1} ({s[t]} -> {s[t + 1]})")
        if len(s):
            prev_step = s[-1]
        ph = np.asarray(tr.phase[lo:hi])
        if (ph > 1).any():
            t = int(np.flatnonzero(ph > 1)[0])
            raise TraceError(f"{where}: tensor 'phase' at token {lo + t} is {ph[t]}, expected 0 (prefill) or 1 (decode)")
        if tr.predicted is not None:
            _check_ids(np.asarray(tr.predicted[lo:hi]), E, "predicted", lo, where, unique=False)
    # a step is one forward pass: all its tokens belong to one phase
    if T:
        starts = tr.step_starts
        ph = np.asarray(tr.phase)
        same = ph[1:] == ph[:-1]
        inside = np.ones(T - 1, bool)
        inside[starts[1:-1] - 1] = False
        mixed = np.flatnonzero(inside & ~same)
        if len(mixed):
            raise TraceError(f"{where}: tensor 'phase' changes inside step {tr.step[mixed[0]]} "
                             f"(token {mixed[0] + 1}); a step is one forward pass of one phase")


def _check_ids(e: np.ndarray, E: int, name: str, lo: int, where: str, unique: bool = True) -> None:
    bad = (e < -1) | (e >= E)
    if bad.any():
        t, l, k = np.argwhere(bad)[0]
        raise TraceError(f"{where}: tensor {name!r} at [token {lo + t}, layer {l}, {k}] is {e[t, l, k]}, "
                         f"expected an expert id in 0..{E - 1} or -1")
    if unique and e.shape[2] > 1:
        dup = np.zeros(e.shape[:2], bool)
        for i in range(e.shape[2] - 1):  # K(K-1)/2 column comparisons: several times faster than sorting rows
            col = e[:, :, i]
            for j in range(i + 1, e.shape[2]):
                dup |= (col == e[:, :, j]) & (col >= 0)
        if dup.any():
            t, l = np.argwhere(dup)[0]
            raise TraceError(f"{where}: tensor {name!r} row [token {lo + t}, layer {l}] = {e[t, l].tolist()} "
                             f"repeats an expert id; each (token, layer) row must name distinct experts")


def from_arrays(spec: ModelSpec, experts, weights, step=None, seq=None, phase=None, predicted=None,
                source: dict | None = None) -> Trace:
    """Build a Trace from arrays, casting to the format's dtypes; defaults: one token per step, one
    sequence, decode. Validates."""
    experts = np.asarray(experts, dtype=np.int16)
    T = experts.shape[0]
    tr = Trace(spec, experts, np.asarray(weights, dtype=np.float16),
               np.arange(T, dtype=np.int32) if step is None else np.asarray(step, dtype=np.int32),
               np.zeros(T, np.int32) if seq is None else np.asarray(seq, dtype=np.int32),
               np.full(T, DECODE, np.uint8) if phase is None else np.asarray(phase, dtype=np.uint8),
               None if predicted is None else np.asarray(predicted, dtype=np.int16), source or {})
    validate_arrays(tr, "trace")
    return tr
