"""Importer for the gpt-oss-20b routing files of AmanPriyanshu/GPT-OSS-MoE-ExpertFingerprinting.

    python -m moesim import src=DIR out=traces/mine.moetrace.safetensors     # e.g. a folder of gpt-oss-fingerprint JSON

One file (`.json`, `.json.xz` or `.json.gz`) is one JSON object for one prompt: `has_repetition` (bool) and
`router_data`, a list in decode order of `{"token_<position>": {"layer_0": {...}, ..., "layer_23": {...}}}`,
each layer holding `selected_experts` (top-4 ids, best first) and `selected_probs` (their gate weights).
Only decode steps were recorded, at batch size 1, so the trace has one sequence per file and one step per
token (phase decode). Sequences follow the files' relative paths sorted as strings; steps count up across
files. A directory is searched recursively; files are read one at a time, so memory holds one file's JSON
plus the growing output arrays. Empty or unreadable (e.g. corrupt xz) files are skipped with a warning;
a readable file whose content breaks the format raises TraceError naming the file and the field.
"""
from __future__ import annotations

import gzip
import lzma
import sys
import zlib
from itertools import chain
from pathlib import Path

import numpy as np
import orjson
from tqdm import tqdm

from ..errors import TraceError
from ..models import MODEL_SPECS
from ..progress import progress
from ..trace import DECODE, Trace, validate_arrays

IMPORTER = "gpt-oss-fingerprint"
SUFFIXES = (".json", ".json.xz", ".json.gz")
DEFAULTS = {"exclude_repetition": False}  # read()'s keyword options and their defaults
SPEC = MODEL_SPECS["gpt-oss-20b"]
LAYER_NAMES = [f"layer_{i}" for i in range(SPEC.layers)]
SOURCE = {"importer": IMPORTER, "model": "openai/gpt-oss-20b",
          "origin": "AmanPriyanshu/GPT-OSS-MoE-ExpertFingerprinting", "licence": "Apache-2.0"}

XZ_MAGIC, GZIP_MAGIC = b"\xfd7zXZ\x00", b"\x1f\x8b"


def input_files(src: Path) -> list[tuple[str, Path]]:
    """(relative path, path) of every .json/.json.xz/.json.gz under `src` (or `src` itself), sorted by
    relative path as a string."""
    if src.is_file():
        return [(src.name, src)]
    found = [(p.relative_to(src).as_posix(), p) for p in src.rglob("*")
             if p.name.endswith(SUFFIXES) and p.is_file()]
    return sorted(found)


FILE_MAX = 512 << 20  # bytes one file may hold, decompressed (the real ones: about 2 MB each)


def read_bytes(path: Path) -> bytes:
    """The file's content, decompressed when it starts with the xz or gzip magic bytes, streamed and refused
    past FILE_MAX bytes (a 342 KB .json.xz had unpacked to 1.5 GB)."""
    with open_stream(path) as f:
        raw = f.read(FILE_MAX + 1)
    if len(raw) > FILE_MAX:
        raise TraceError(f"{path}: holds more than {FILE_MAX >> 20} MiB (decompressed); refused")
    return raw


def open_stream(path: Path):
    """A binary stream of the file's content, decompressing xz/gzip (chosen by magic bytes)."""
    with open(path, "rb") as f:
        head = f.read(6)
    if head.startswith(XZ_MAGIC):
        return lzma.open(path, "rb")
    if head.startswith(GZIP_MAGIC):
        return gzip.open(path, "rb")
    return open(path, "rb")


def looks_like(path: Path, limit: int = 64 << 20) -> bool:
    """True if the first readable file at `path` is a JSON object with a `router_data` key (a content
    sniff: reads decompressed chunks until the key shows up, the file ends or `limit` bytes)."""
    for _, p in input_files(path):
        try:
            with open_stream(p) as f:
                first = f.read(1 << 16)
                if not first.strip():
                    continue  # empty file: look at the next one
                if not first.lstrip().startswith(b"{"):
                    return False
                buf, seen = first, len(first)
                while True:
                    if b'"router_data"' in buf:
                        return True
                    chunk = f.read(1 << 20)
                    seen += len(chunk)
                    if not chunk or seen > limit:
                        return False
                    buf = buf[-16:] + chunk  # keep a tail so a key split across chunks is still found
        except (OSError, EOFError, lzma.LZMAError, zlib.error):
            continue
    return False


def _warn(msg: str) -> None:
    tqdm.write(f"moesim: warning: {msg}", file=sys.stderr)


class _Buffer:
    """Output arrays grown by doubling, so files are appended without holding a list of them."""

    def __init__(self, capacity: int = 1 << 14):
        L, K = SPEC.layers, SPEC.top_k
        self.n = 0
        self.experts = np.empty((capacity, L, K), np.int16)  # [T, L, K]
        self.weights = np.empty((capacity, L, K), np.float16)  # [T, L, K]
        self.seq = np.empty(capacity, np.int32)  # [T]

    def append(self, experts: np.ndarray, weights: np.ndarray, seq: int) -> None:
        n = len(experts)
        if self.n + n > len(self.seq):
            cap = max(2 * len(self.seq), self.n + n)
            for name in ("experts", "weights", "seq"):
                old = getattr(self, name)
                new = np.empty((cap,) + old.shape[1:], old.dtype)
                new[: self.n] = old[: self.n]
                setattr(self, name, new)
        self.experts[self.n: self.n + n] = experts
        self.weights[self.n: self.n + n] = weights
        self.seq[self.n: self.n + n] = seq
        self.n += n


def parse_file(doc, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """(positions int64 [n], experts int16 [n, L, K], weights float16 [n, L, K], has_repetition) of one
    parsed file. Raises TraceError naming `where` and the field for anything off-format."""
    if not isinstance(doc, dict):
        raise TraceError(f"{where}: expected a JSON object with 'router_data', got {type(doc).__name__}")
    if "router_data" not in doc:
        raise TraceError(f"{where}: field 'router_data' missing")
    rd = doc["router_data"]
    if not isinstance(rd, list):
        raise TraceError(f"{where}: field 'router_data' is {type(rd).__name__}, expected a list")
    rep = doc.get("has_repetition")
    if not isinstance(rep, bool):
        raise TraceError(f"{where}: field 'has_repetition' is {rep!r}, expected true or false")
    L, K, E = SPEC.layers, SPEC.top_k, SPEC.experts
    n = len(rd)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros((0, L, K), np.int16), np.zeros((0, L, K), np.float16), rep
    # Fast path: walk assuming the format holds, let numpy build the arrays, check shapes and kinds;
    # anything unexpected goes to _diagnose, which walks slowly to name the exact field.
    names, ids, probs = [], [], []
    add_id, add_prob = ids.append, probs.append
    try:
        for entry in rd:
            (name, layers), = entry.items()
            names.append(name)
            if len(layers) != L:
                raise ValueError
            for layer in LAYER_NAMES:
                sel = layers[layer]
                add_id(sel["selected_experts"])
                add_prob(sel["selected_probs"])
        if set(map(len, ids)) != {K} or set(map(len, probs)) != {K}:
            raise ValueError
        positions = np.array([int(s[6:]) if s.startswith("token_") else -1 for s in names], np.int64)
        # numpy builds an array from one flat list several times faster than from a list of rows;
        # the dtype it infers is checked below (ints for ids, numbers for weights)
        e = np.array(list(chain.from_iterable(ids)))
        w = np.array(list(chain.from_iterable(probs)))
        if e.dtype.kind != "i" or w.dtype.kind not in "if" or (positions < 0).any():
            raise ValueError
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError):
        _diagnose(rd, where)
        raise TraceError(f"{where}: field 'router_data' is not in the expected format") from None
    e = e.reshape(n, L, K)
    w = w.reshape(n, L, K)
    bad = (e < 0) | (e >= E)
    if bad.any():
        t, l, k = np.argwhere(bad)[0]
        raise TraceError(f"{where}: router_data[{t}] (token_{positions[t]}).layer_{l}.selected_experts[{k}] is "
                         f"{e[t, l, k]}, expected an expert id in 0..{E - 1}")
    srt = np.sort(e, axis=2)
    dup = srt[:, :, 1:] == srt[:, :, :-1]
    if dup.any():
        t, l, _ = np.argwhere(dup)[0]
        raise TraceError(f"{where}: router_data[{t}] (token_{positions[t]}).layer_{l}.selected_experts "
                         f"{e[t, l].tolist()} repeats an expert id")
    bad = ~np.isfinite(w) | (w < 0) | (w > 65504)  # 65504: the largest float16
    if bad.any():
        t, l, k = np.argwhere(bad)[0]
        raise TraceError(f"{where}: router_data[{t}] (token_{positions[t]}).layer_{l}.selected_probs[{k}] is "
                         f"{w[t, l, k]}, expected a finite weight >= 0")
    gap = np.flatnonzero(np.diff(positions) != 1)
    if len(gap):
        i = int(gap[0])
        raise TraceError(f"{where}: router_data[{i + 1}] is token_{positions[i + 1]} after token_{positions[i]}; "
                         f"token positions must be consecutive")
    return positions, e.astype(np.int16), w.astype(np.float16), rep


def _diagnose(rd: list, where: str) -> None:
    """Walk router_data slowly and raise TraceError at the first entry that breaks the format."""
    L, K = SPEC.layers, SPEC.top_k
    for i, entry in enumerate(rd):
        at = f"{where}: router_data[{i}]"
        if not isinstance(entry, dict) or len(entry) != 1:
            raise TraceError(f"{at}: expected an object with one key 'token_<position>', got {str(entry)[:80]}")
        (name, layers), = entry.items()
        if not (name.startswith("token_") and name[6:].isdigit()):
            raise TraceError(f"{at}: key {name!r} is not 'token_<position>'")
        at = f"{at} ({name})"
        if not isinstance(layers, dict):
            raise TraceError(f"{at}: expected an object of layers, got {type(layers).__name__}")
        if len(layers) != L or set(layers) != set(LAYER_NAMES):
            raise TraceError(f"{at}: has {len(layers)} layers {sorted(layers)[:4]}..., expected {L}: "
                             f"layer_0..layer_{L - 1}")
        for layer in LAYER_NAMES:
            sel = layers[layer]
            if not isinstance(sel, dict):
                raise TraceError(f"{at}.{layer}: expected an object, got {type(sel).__name__}")
            for field, kinds in (("selected_experts", (int,)), ("selected_probs", (int, float))):
                v = sel.get(field)
                if v is None:
                    raise TraceError(f"{at}.{layer}: field {field!r} missing")
                if (not isinstance(v, list) or len(v) != K
                        or not all(isinstance(x, kinds) and not isinstance(x, bool) for x in v)):
                    raise TraceError(f"{at}.{layer}.{field} is {str(v)[:80]}, expected a list of {K} "
                                     f"{'integers' if kinds == (int,) else 'numbers'}")
                if field == "selected_experts" and not all(-2**15 <= x < 2**15 for x in v):
                    raise TraceError(f"{at}.{layer}.{field} is {v}, expected expert ids in 0..{SPEC.experts - 1}")


def read(src: str | Path, exclude_repetition: bool = False) -> Trace:
    """The trace of every gpt-oss-fingerprint file at `src` (a directory, searched recursively, or one file)."""
    src = Path(src)
    if not src.exists():
        raise TraceError(f"{src}: no such file or directory")
    files = input_files(src)
    if not files:
        raise TraceError(f"{src}: no {', '.join(SUFFIXES)} files found")
    out = _Buffer()
    paths, reps, skipped = [], [], []
    n_read = n_rep = 0
    for rel, path in progress(files, desc=IMPORTER, unit="file"):
        try:
            raw = read_bytes(path)
        except (OSError, EOFError, lzma.LZMAError, zlib.error, TraceError) as e:
            _warn(f"{path}: unreadable ({e}), skipped")
            skipped.append(rel)
            continue
        if not raw.strip():
            _warn(f"{path}: empty file, skipped")
            skipped.append(rel)
            continue
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise TraceError(f"{path}: not valid JSON ({e})") from None
        del raw
        positions, experts, weights, rep = parse_file(doc, str(path))
        del doc
        n_read += 1
        n_rep += rep
        if rep and exclude_repetition:
            continue
        if len(positions) == 0:
            _warn(f"{path}: router_data is empty (no decode tokens), skipped")
            skipped.append(rel)
            continue
        out.append(experts, weights, len(paths))
        paths.append(rel)
        reps.append(rep)
    if out.n == 0:
        raise TraceError(f"{src}: no decode tokens in {len(files)} file(s)"
                         + (" after excluding has_repetition files" if exclude_repetition else ""))
    T = out.n
    # files: files read (empty/unreadable ones are in skipped); paths, has_repetition: one per sequence (seq id)
    source = dict(SOURCE, files=n_read, files_with_repetition=n_rep, exclude_repetition=bool(exclude_repetition),
                  root=str(src.resolve()), skipped=skipped, paths=paths, has_repetition=reps)
    trace = Trace(SPEC, out.experts[:T], out.weights[:T], np.arange(T, dtype=np.int32), out.seq[:T],
                  np.full(T, DECODE, np.uint8), None, source)
    validate_arrays(trace, str(src))
    return trace
