"""Routing traces: the `.moetrace.safetensors` format, loading, saving, validation (the model catalogue and
ModelSpec are moesim/models.py's).

    from moesim.trace import load_trace
    tr = load_trace("traces/cache/gpt-oss-20b-....moetrace.safetensors")
    for step in tr.steps():              # one forward pass at a time
        for layer, (ids, counts) in enumerate(step.requests()):
            ...                          # the experts layer `layer` needs, with their token counts

A trace file is a safetensors file:

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

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import TraceError
from .files import atomic_write
from .models import ModelSpec
# re-exported for callers written when these lived here; new code imports them from moesim.models
from .models import DTYPE_BITS, MODEL_SPECS, model_spec, scale_spec, stored_spec, weights_dtype  # noqa: F401

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
    except RecursionError:
        raise TraceError(f"{path}: metadata field 'model_spec' or 'source' is nested too deeply") from None
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
