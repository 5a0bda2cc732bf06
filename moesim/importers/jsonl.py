"""Importer for routing traces written as JSON Lines, one object per (token, layer).

    python -m moesim import src=routing.jsonl format=jsonl jsonl.model=mixtral-8x7b

A line looks like `{"seq": 0, "token": 17, "layer": 3, "experts": [5, 1], "weights": [0.62, 0.38]}`.
Field names are options (`jsonl.seq=request_id` ...; defaults in conf/import.yaml). Per line:

    seq      required  the sequence (request): an integer or a string; numbered 0, 1, ... in order of first appearance
    token    required  an integer; (seq, token) names one token, whose layers may be on lines anywhere in the file
    layer    required  MoE layer index 0..L-1 (dense layers are not in a trace)
    experts  required  routed expert ids, best first; fewer than top-k leaves -1 in the trace
    weights  optional  gate weights, one per expert; absent: 1/k each for the k experts of that line
    step     optional  the forward pass (integer >= 0); absent on every line: one step per token, in order of
                       first appearance; present: tokens are ordered by step (stably), the values kept as given
    phase    optional  "prefill" / "decode" or 0 / 1; absent: decode

Every token must have exactly one line for each layer 0..L-1, and all lines of a token must agree on step
and phase. Files may be xz- or gzip-compressed (detected from their first bytes).

The model spec decides how many bytes each expert moves, which no routing file records, so it is never
guessed: `jsonl.model` names a preset (moesim.models.MODEL_SPECS) or gives the fields as a dict, and the
data are checked against it (layer < layers, len(experts) <= top_k, ids < experts). Without it the import
stops and says which presets fit the data's layers, top-k and largest id, so the fix is one option.
Any line that breaks these rules raises TraceError naming file:line and the field.
"""
from __future__ import annotations

import gzip
import lzma
import math
import zlib
from pathlib import Path

import numpy as np
import orjson

from ..errors import TraceError
from ..models import MODEL_SPECS, ModelSpec, model_spec
from ..progress import progress
from ..trace import DECODE, PREFILL, Trace, validate_arrays
from .gpt_oss import open_stream

IMPORTER = "jsonl"
FIELDS = ("seq", "token", "layer", "experts", "weights", "step", "phase")
DEFAULTS = {"model": None, **{f: f for f in FIELDS}}  # read()'s keyword options: the model, each field's name
PHASES = {"prefill": PREFILL, "decode": DECODE, PREFILL: PREFILL, DECODE: DECODE}


def input_files(src: Path) -> list[tuple[str, Path]]:
    """The one file read (a JSON Lines trace is a single file)."""
    return [(src.name, src)]


def looks_like(path: Path, layer: str = "layer", experts: str = "experts", **_) -> bool:
    """True if `path` is a file whose first non-blank line is a JSON object with the layer and experts fields."""
    if not path.is_file():
        return False
    try:
        with open_stream(path) as f:
            for _ in range(1000):  # the first non-blank line, read at most LINE_MAX bytes at a time
                line = f.readline(LINE_MAX + 1)
                if not line or len(line) > LINE_MAX:
                    return False
                if line.strip():
                    obj = orjson.loads(line)
                    return isinstance(obj, dict) and layer in obj and experts in obj
    except (OSError, EOFError, ValueError, lzma.LZMAError, zlib.error):  # orjson's errors are ValueErrors
        return False
    return False


LINE_MAX = 1 << 20  # bytes of one line: one token's layer is a few hundred
BYTES_MAX = 16 << 30  # bytes of a whole file, decompressed


def _lines(f, path: Path):
    """The lines of the stream `f`, each read at most LINE_MAX bytes at a time (a file of one endless line
    must not be read whole), the file at most BYTES_MAX bytes; a damaged compressed file as a TraceError."""
    total = 0
    try:
        while True:
            line = f.readline(LINE_MAX + 1)
            if not line:
                return
            total += len(line)
            if len(line) > LINE_MAX or total > BYTES_MAX:
                raise TraceError(f"{path}: a line longer than {LINE_MAX >> 20} MiB or more than {BYTES_MAX >> 30} "
                                 f"GiB in all (decompressed): not routing records; refused")
            yield line
    except (EOFError, lzma.LZMAError, zlib.error, gzip.BadGzipFile) as e:
        raise TraceError(f"{path}: the compressed data is damaged or cut short ({e})") from None


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read(src: str | Path, model: str | dict | ModelSpec | None = None, seq: str = "seq", token: str = "token",
         layer: str = "layer", experts: str = "experts", weights: str = "weights", step: str = "step",
         phase: str = "phase") -> Trace:
    """The trace in the JSON Lines file `src`; the keyword arguments other than `model` are field names."""
    path = Path(src)
    if not path.is_file():
        raise TraceError(f"{path}: no such file")
    spec = model_spec(model) if model is not None else None
    rows: dict[tuple, int] = {}  # (seq, token) -> row, in order of first appearance
    row_seq, row_step, row_phase, row_line = [], [], [], []  # per row
    records = []  # (row, layer, ids, weights or None, line number)
    seq_ids: dict = {}  # seq value -> 0, 1, ...
    has_step = None  # decided by the first line
    max_layer, max_k, max_id = -1, 0, -1
    with open_stream(path) as f:
        for lineno, line in enumerate(progress(_lines(f, path), desc=IMPORTER, unit=" lines"), 1):
            if not line.strip():
                continue
            at = f"{path}:{lineno}"
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as e:
                raise TraceError(f"{at}: not valid JSON ({e})") from None
            if not isinstance(obj, dict):
                raise TraceError(f"{at}: expected a JSON object, got {type(obj).__name__}")
            for name in (seq, token, layer, experts):
                if name not in obj:
                    raise TraceError(f"{at}: field {name!r} missing")
            s, t, lay, ids = obj[seq], obj[token], obj[layer], obj[experts]
            if not (_int(s) or isinstance(s, str)):
                raise TraceError(f"{at}: field {seq!r} is {s!r}, expected an integer or a string")
            if not _int(t):
                raise TraceError(f"{at}: field {token!r} is {t!r}, expected an integer")
            if not _int(lay) or lay < 0:
                raise TraceError(f"{at}: field {layer!r} is {lay!r}, expected an integer >= 0")
            if spec is not None and lay >= spec.layers:
                raise TraceError(f"{at}: field {layer!r} is {lay}, "
                                 f"model {spec.name} has layers 0..{spec.layers - 1}")
            if not isinstance(ids, list) or not all(_int(x) and 0 <= x < 2**15 for x in ids):
                raise TraceError(f"{at}: field {experts!r} is {str(ids)[:80]}, "
                             f"expected a list of expert ids >= 0")
            if len(set(ids)) != len(ids):
                raise TraceError(f"{at}: field {experts!r} is {ids}: it repeats an expert id")
            if spec is not None:
                if len(ids) > spec.top_k:
                    raise TraceError(f"{at}: field {experts!r} has {len(ids)} ids, "
                                     f"model {spec.name} routes top-{spec.top_k}")
                if ids and max(ids) >= spec.experts:
                    raise TraceError(f"{at}: field {experts!r} is {ids}, "
                                     f"model {spec.name} has experts 0..{spec.experts - 1}")
            w = obj.get(weights)
            if w is not None:
                if (not isinstance(w, list) or len(w) != len(ids)
                        or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                   and math.isfinite(x) and 0 <= x <= 65504 for x in w)):  # 65504: largest float16
                    raise TraceError(f"{at}: field {weights!r} is {str(w)[:80]}, expected {len(ids)} finite "
                                     f"weights >= 0 (one per expert)")
            if has_step is None:
                has_step = step in obj
            elif has_step != (step in obj):
                raise TraceError(f"{at}: field {step!r} {'missing' if has_step else 'present'}, unlike line 1 "
                                 f"(give it on every line or on none)")
            st = obj.get(step, 0)
            if not _int(st) or not 0 <= st < 2**31:
                raise TraceError(f"{at}: field {step!r} is {st!r}, expected an integer >= 0")
            ph = obj.get(phase, "decode")
            if not isinstance(ph, (str, int)) or isinstance(ph, bool) or ph not in PHASES:
                raise TraceError(f"{at}: field {phase!r} is {ph!r}, expected \"prefill\", \"decode\", 0 or 1")
            ph = PHASES[ph]
            key = (s, t)
            row = rows.get(key)
            if row is None:
                row = rows[key] = len(row_seq)
                row_seq.append(seq_ids.setdefault(s, len(seq_ids)))
                row_step.append(st)
                row_phase.append(ph)
                row_line.append(lineno)
            else:
                if row_step[row] != st:
                    raise TraceError(f"{at}: field {step!r} is {st}, but line {row_line[row]} gave step "
                                     f"{row_step[row]} for the same token ({seq}={s!r}, {token}={t!r})")
                if row_phase[row] != ph:
                    raise TraceError(f"{at}: field {phase!r} differs from line {row_line[row]} for the same token "
                                     f"({seq}={s!r}, {token}={t!r})")
            records.append((row, lay, ids, w, lineno))
            max_layer = max(max_layer, lay)
            max_k = max(max_k, len(ids))
            if ids:
                max_id = max(max_id, max(ids))
    if not records:
        raise TraceError(f"{path}: no lines with routing data")
    if spec is None:
        raise TraceError(_model_hint(path, max_layer + 1, max_k, max_id))
    T, L, K = len(row_seq), spec.layers, spec.top_k
    out_e = np.full((T, L, K), -1, np.int16)  # [T, L, K]
    out_w = np.zeros((T, L, K), np.float16)  # [T, L, K]
    line_of = np.zeros((T, L), np.int64)  # line that gave (token, layer); 0: none yet
    for row, lay, ids, w, lineno in records:
        if line_of[row, lay]:
            raise TraceError(f"{path}:{lineno}: layer {lay} of this token was already given "
                             f"on line {line_of[row, lay]}")
        line_of[row, lay] = lineno
        k = len(ids)
        if k:
            out_e[row, lay, :k] = ids
            out_w[row, lay, :k] = w if w is not None else [1.0 / k] * k
    missing = np.argwhere(line_of == 0)
    if len(missing):
        row, lay = missing[0]
        raise TraceError(f"{path}:{row_line[row]}: the token first seen on this line has no line for layer {lay} "
                         f"(every token needs layers 0..{L - 1} of model {spec.name})")
    order = np.argsort(np.asarray(row_step, np.int64), kind="stable") if has_step else np.arange(T)
    seq_arr = np.asarray(row_seq, np.int32)[order]
    step_arr = np.asarray(row_step, np.int32)[order] if has_step else np.arange(T, dtype=np.int32)
    source = {"importer": IMPORTER, "file": str(path.resolve()), "model": spec.name,
              "fields": {"seq": seq, "token": token, "layer": layer, "experts": experts, "weights": weights,
                         "step": step, "phase": phase},
              "seq_names": list(seq_ids)}
    trace = Trace(spec, out_e[order], out_w[order], step_arr, seq_arr, np.asarray(row_phase, np.uint8)[order],
                  None, source)
    validate_arrays(trace, str(path))
    return trace


def _model_hint(path: Path, layers: int, top_k: int, max_id: int) -> str:
    fits = [name for name, s in MODEL_SPECS.items()
            if s.layers == layers and s.top_k >= top_k and s.experts > max_id]
    shape = f"{layers} layers, up to {top_k} experts per line, ids up to {max_id}"
    if fits:
        choice = f"presets that fit: {', '.join(fits)}; e.g. jsonl.model={fits[0]}"
    else:
        choice = (f"no preset fits (known: {', '.join(MODEL_SPECS)}); give the numbers as "
                  f"jsonl.model={{name:...,layers:{layers},experts:...,top_k:...,hidden:...,ffn:...}}")
    return (f"{path}: no model given (jsonl.model); bytes per expert cannot be read from routing data, so it "
            f"is not guessed. The data have {shape}; {choice}")
