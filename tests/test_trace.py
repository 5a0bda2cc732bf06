"""Tests of the trace format (moesim/trace.py): round trips, every validation error, step iteration, fuzzing.

    pytest tests/test_trace.py -q
"""
from __future__ import annotations

import copy
import json
import math
import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from moesim import trace as trace_mod
from moesim.errors import TraceError
from moesim.trace import (DECODE, PREFILL, SUFFIX, ModelSpec, Trace, from_arrays, layer_request, load_trace,
                          save_trace)

TAG_DTYPE = {"I16": np.int16, "F16": np.float16, "I32": np.int32, "U8": np.uint8, "F32": np.float32,
             "I64": np.int64}


# ------------------------------------------------------------------------------------------- raw files
def read_raw(path: Path) -> tuple[dict, dict]:
    """(tensors: name -> [tag, shape, bytes], metadata) of a safetensors file, parsed by hand."""
    b = path.read_bytes()
    n = int.from_bytes(b[:8], "little")
    header = json.loads(b[8:8 + n])
    data = b[8 + n:]
    meta = header.pop("__metadata__", None)
    tensors = {name: [info["dtype"], info["shape"], data[info["data_offsets"][0]:info["data_offsets"][1]]]
               for name, info in header.items()}
    return tensors, meta


def write_raw(path: Path, tensors: dict, meta: dict | None, header_edit=None) -> Path:
    """Write tensors ({name: [tag, shape, bytes]}) packed in order, with `meta` as __metadata__ (any JSON:
    safetensors' own writer only accepts str values). `header_edit(header)` may change the header last."""
    header, data, off = {}, [], 0
    if meta is not None:
        header["__metadata__"] = meta
    for name, (tag, shape, raw) in tensors.items():
        header[name] = {"dtype": tag, "shape": shape, "data_offsets": [off, off + len(raw)]}
        data.append(raw)
        off += len(raw)
    if header_edit is not None:
        header_edit(header)
    h = json.dumps(header).encode()
    path.write_bytes(len(h).to_bytes(8, "little") + h + b"".join(data))
    return path


def tensor(a: np.ndarray, tag: str) -> list:
    a = np.ascontiguousarray(a, dtype=TAG_DTYPE[tag])
    return [tag, list(a.shape), a.tobytes()]


# ------------------------------------------------------------------------------------------ valid traces
def make_trace(rng: np.random.Generator, L=3, E=8, K=2, step_sizes=(3, 1, 2, 4), n_seqs=3, predicted_p=0,
               fewer=True, name="tiny") -> Trace:
    """A valid trace: steps of the given sizes (step ids with gaps), tokens of a step spread over seqs,
    one phase per step, rows of K distinct experts (sometimes ending in -1s)."""
    T = int(sum(step_sizes))
    experts = np.empty((T, L, K), np.int16)
    for t in range(T):
        for layer in range(L):
            row = rng.permutation(E)[:K]
            if fewer and K > 1 and rng.random() < 0.2:
                row[rng.integers(1, K):] = -1
            experts[t, layer] = row
    weights = rng.random((T, L, K)).astype(np.float16)
    step_ids = np.cumsum(rng.integers(1, 4, len(step_sizes))) - 1
    step = np.repeat(step_ids, step_sizes).astype(np.int32)
    seq = rng.integers(0, n_seqs, T).astype(np.int32)
    phase = np.repeat(rng.integers(0, 2, len(step_sizes)), step_sizes).astype(np.uint8)
    predicted = rng.integers(-1, E, (T, L, predicted_p)).astype(np.int16) if predicted_p else None
    spec = ModelSpec(name, L, E, K, hidden=64, ffn=32)
    return from_arrays(spec, experts, weights, step, seq, phase, predicted,
                       source={"recorder": "tests", "prompts": ["a", "b"]})


@st.composite
def valid_traces(draw) -> Trace:
    L = draw(st.integers(1, 4))
    K = draw(st.integers(1, 4))
    E = draw(st.integers(K, 16))
    step_sizes = draw(st.lists(st.integers(1, 6), min_size=0, max_size=12))
    while sum(step_sizes) > 50:
        step_sizes.pop()
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return make_trace(rng, L, E, K, step_sizes, n_seqs=draw(st.integers(1, 5)),
                      predicted_p=draw(st.sampled_from([0, 0, 1, 3])), name=draw(st.text(max_size=8)))


def assert_same(a: Trace, b: Trace) -> None:
    assert a.spec == b.spec
    assert a.source == b.source
    for name in ("experts", "step", "seq", "phase"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), name
    # weights bit for bit (np.array_equal would also accept -0.0 for 0.0)
    assert a.weights.shape == b.weights.shape
    assert np.array_equal(a.weights.view(np.uint16), b.weights.view(np.uint16))
    assert (a.predicted is None) == (b.predicted is None)
    if a.predicted is not None:
        assert a.predicted.shape == b.predicted.shape and np.array_equal(a.predicted, b.predicted)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tr=valid_traces())
def test_round_trip(tr, tmp_path):
    path = save_trace(tr, tmp_path / f"t{SUFFIX}")
    back = load_trace(path)
    assert_same(tr, back)
    assert back.path == path
    if tr.n_tokens:  # memory-mapped, not read into memory
        for name in ("experts", "weights", "step", "seq", "phase"):
            assert isinstance(getattr(back, name), np.memmap), name
        if tr.predicted is not None and tr.predicted.size:
            assert isinstance(back.predicted, np.memmap)
    assert back.n_steps == tr.n_steps and back.n_seqs == tr.n_seqs
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the atomic write left no temp file


@settings(max_examples=60, deadline=None)
@given(tr=valid_traces())
def test_steps_and_requests_match_brute_force(tr):
    seen = 0
    steps = list(tr.steps())
    assert len(steps) == tr.n_steps
    for i, s in enumerate(steps):
        assert s.index == i and s.start == seen and s.stop > s.start
        assert len(set(tr.step[s.start:s.stop].tolist())) == 1  # one step id per step
        assert len(set(tr.phase[s.start:s.stop].tolist())) == 1
        seen = s.stop
        reqs = s.requests()
        assert len(reqs) == tr.n_layers
        for layer, (ids, counts) in enumerate(reqs):
            order, count = [], {}
            for t in range(s.start, s.stop):
                for e in tr.experts[t, layer].tolist():
                    if e >= 0:
                        if e not in count:
                            order.append(e)
                        count[e] = count.get(e, 0) + 1
            assert ids.tolist() == order
            assert counts.tolist() == [count[e] for e in order]
    assert seen == tr.n_tokens
    assert tr.n_seqs == len(set(tr.seq.tolist()))


def test_save_replaces_existing_file(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / f"t{SUFFIX}"
    save_trace(make_trace(rng), path)
    second = make_trace(rng, L=2, E=5, K=3)
    save_trace(second, path)
    assert_same(second, load_trace(path))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_save_refuses_invalid_trace_and_leaves_nothing(tmp_path):
    tr = make_trace(np.random.default_rng(1))
    tr.experts = tr.experts.copy()
    tr.experts[0, 0, 0] = 99
    with pytest.raises(TraceError, match="experts"):
        save_trace(tr, tmp_path / f"t{SUFFIX}")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ step iteration
@pytest.fixture
def batch_trace() -> Trace:
    """9 tokens: step 0 = prefill of seq 7 (3 tokens), step 1 = decode of seqs 7 and 4, step 3 = decode of
    seqs 7, 4, 9, 4. One layer would do; a second layer checks per-layer requests."""
    ex0 = [[2, 5], [5, 1], [2, -1],  # step 0
           [3, 0], [0, 3],  # step 1
           [6, 7], [7, -1], [1, 6], [7, 6]]  # step 3
    ex1 = [[0, 1]] * 9
    experts = np.stack([np.array(ex0), np.array(ex1)], axis=1)  # [9, 2, 2]
    spec = ModelSpec("toy", 2, 8, 2, 16, 8)
    return from_arrays(spec, experts, np.full((9, 2, 2), 0.5),
                       step=[0, 0, 0, 1, 1, 3, 3, 3, 3], seq=[7, 7, 7, 7, 4, 7, 4, 9, 4],
                       phase=[0, 0, 0, 1, 1, 1, 1, 1, 1])


def test_steps_token_ranges(batch_trace):
    steps = list(batch_trace.steps())
    assert [(s.index, s.start, s.stop, s.n_tokens) for s in steps] == [(0, 0, 3, 3), (1, 3, 5, 2), (2, 5, 9, 4)]
    assert batch_trace.step_starts.tolist() == [0, 3, 5, 9]
    assert batch_trace.n_steps == 3 and batch_trace.n_tokens == 9
    assert batch_trace.n_seqs == 3  # 7, 4, 9 (not contiguous)
    assert batch_trace.step_seq().tolist() == [7, 7, 7]
    assert np.array_equal(steps[2].experts, batch_trace.experts[5:9])


def test_requests_batch(batch_trace):
    s0, s1, s2 = batch_trace.steps()
    ids, counts = s0.requests()[0]
    assert ids.tolist() == [2, 5, 1] and counts.tolist() == [2, 2, 1]
    ids, counts = s1.requests()[0]
    assert ids.tolist() == [3, 0] and counts.tolist() == [2, 2]
    ids, counts = s2.requests()[0]
    assert ids.tolist() == [6, 7, 1] and counts.tolist() == [3, 3, 1]
    ids, counts = s2.requests()[1]
    assert ids.tolist() == [0, 1] and counts.tolist() == [4, 4]


def test_layer_request_single_row_skips_padding():
    ids, counts = layer_request(np.array([[4, -1, -1]], np.int16))
    assert ids.tolist() == [4] and counts.tolist() == [1]
    ids, counts = layer_request(np.array([[-1, -1]], np.int16))
    assert ids.tolist() == [] and counts.tolist() == []


def test_slice_tokens(batch_trace):
    part = batch_trace.slice_tokens(3, 9)
    assert part.n_tokens == 6 and part.n_steps == 2 and part.n_seqs == 3
    assert [(s.start, s.stop) for s in part.steps()] == [(0, 2), (2, 6)]
    assert np.shares_memory(part.experts, batch_trace.experts)  # views, not copies
    assert part.spec == batch_trace.spec and part.source == batch_trace.source
    head = batch_trace.slice_tokens(0, 4)
    assert head.n_steps == 2 and head.n_seqs == 1
    assert [(s.start, s.stop) for s in head.steps()] == [(0, 3), (3, 4)]
    assert batch_trace.slice_tokens(2, 2).n_steps == 0


def test_empty_trace(tmp_path):
    spec = ModelSpec("toy", 2, 4, 2, 16, 8)
    tr = from_arrays(spec, np.zeros((0, 2, 2)), np.zeros((0, 2, 2)))
    assert tr.n_tokens == 0 and tr.n_steps == 0 and tr.n_seqs == 0
    assert list(tr.steps()) == []
    back = load_trace(save_trace(tr, tmp_path / f"e{SUFFIX}"))
    assert back.n_tokens == 0 and list(back.steps()) == [] and back.experts.shape == (0, 2, 2)


def test_from_arrays_defaults():
    spec = ModelSpec("toy", 1, 4, 1, 16, 8)
    tr = from_arrays(spec, [[[1]], [[2]], [[1]]], [[[1.0]], [[1.0]], [[1.0]]])
    assert tr.step.tolist() == [0, 1, 2] and tr.seq.tolist() == [0, 0, 0]
    assert tr.phase.tolist() == [DECODE] * 3 and tr.n_steps == 3 and tr.n_seqs == 1


# -------------------------------------------------------------------------------------- large trace
def write_large(path: Path, T: int, L: int, K: int, E: int, chunk: int = 1 << 14) -> int:
    """Stream a valid trace of T tokens to `path` without holding it in memory; returns the file size."""
    spec = ModelSpec("large", L, E, K, 64, 32)
    sizes = {"experts": ("I16", [T, L, K], 2), "weights": ("F16", [T, L, K], 2), "step": ("I32", [T], 4),
             "seq": ("I32", [T], 4), "phase": ("U8", [T], 1)}
    header, off = {"__metadata__": {"format": trace_mod.FORMAT, "format_version": trace_mod.FORMAT_VERSION,
                                    "model_spec": json.dumps(spec.to_dict()), "source": "{}"}}, 0
    for name, (tag, shape, item) in sizes.items():
        n = math.prod(shape) * item
        header[name] = {"dtype": tag, "shape": shape, "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(header).encode()
    layer = np.arange(L)[None, :, None]
    k = np.arange(K)[None, None, :]
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h)
        for lo in range(0, T, chunk):  # ids (7t + 13l + k) mod E: distinct in a row when K <= E
            t = np.arange(lo, min(T, lo + chunk))[:, None, None]
            f.write(((7 * t + 13 * layer + k) % E).astype(np.int16).tobytes())
        for lo in range(0, T, chunk):
            n = min(T, lo + chunk) - lo
            f.write(np.broadcast_to(np.float16(1 / K), (n, L, K)).tobytes())
        f.write((np.arange(T) // 4).astype(np.int32).tobytes())  # batches of 4 decode tokens
        f.write((np.arange(T) % 4).astype(np.int32).tobytes())
        f.write(np.full(T, DECODE, np.uint8).tobytes())
    return path.stat().st_size


def _io_chars() -> int | None:
    """Bytes this process has read through read() calls so far (Linux), None elsewhere."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


@pytest.fixture(scope="module")
def large_trace(tmp_path_factory) -> tuple[Path, int]:
    path = tmp_path_factory.mktemp("large") / f"large{SUFFIX}"
    size = write_large(path, T=200_000, L=58, K=8, E=256)  # ~356 MiB, DeepSeek-V3-shaped
    yield path, size
    path.unlink()


def test_large_open_reads_only_the_header(large_trace):
    path, size = large_trace
    rchar0 = _io_chars()
    tracemalloc.start()
    try:
        tr = load_trace(path, validate=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rchar1 = _io_chars()
    assert tr.n_tokens == 200_000 and isinstance(tr.experts, np.memmap) and isinstance(tr.weights, np.memmap)
    # nothing copied into memory and nothing read but the header (timings belong in tests/bench/)
    assert peak < size / 4 and peak < 4 * 2**20  # bytes
    if rchar0 is not None:
        assert rchar1 - rchar0 < 2**20  # bytes read by read(): the header, not the 356 MB
    last = (7 * 199_999 + 13 * np.arange(58)[:, None] + np.arange(8)) % 256  # write_large's pattern
    assert np.array_equal(tr.experts[-1], last) and float(tr.weights[-1, -1, -1]) == 0.125


def test_large_validation_memory_is_bounded(large_trace, monkeypatch):
    path, size = large_trace
    monkeypatch.setattr(trace_mod, "CHUNK_ELEMENTS", 8192 * 58 * 8)  # 8192 tokens: a small part of the file
    tracemalloc.start()
    try:
        tr = load_trace(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert tr.n_steps == 50_000 and tr.n_seqs == 4
    assert peak < size / 4, (peak, size)


# ---------------------------------------------------------------------------------- crafted errors
@pytest.fixture
def good(tmp_path) -> tuple[Path, dict, dict]:
    """A valid trace file with `predicted`, and its parsed tensors and metadata, to be edited."""
    tr = make_trace(np.random.default_rng(3), L=3, E=8, K=2, step_sizes=(3, 1, 2, 4), predicted_p=2)
    path = save_trace(tr, tmp_path / f"good{SUFFIX}")
    tensors, meta = read_raw(path)
    return path, tensors, meta


def load_error(path: Path, *fields: str) -> str:
    """The TraceError message of loading `path`; it must name the file and each of `fields`."""
    with pytest.raises(TraceError) as info:
        load_trace(path)
    msg = str(info.value)
    assert str(path) in msg, msg
    for f in fields:
        assert f in msg, (f, msg)
    assert "\n" not in msg  # one line for the CLI
    return msg


def arr(tensors: dict, name: str) -> np.ndarray:
    tag, shape, raw = tensors[name]
    return np.frombuffer(raw, TAG_DTYPE[tag]).reshape(shape).copy()


def edited(tmp_path, tensors, meta, name: str, a: np.ndarray, tag: str | None = None) -> Path:
    """The good file with tensor `name` replaced by `a` (stored as `tag`, default its own)."""
    t = dict(tensors)
    t[name] = tensor(a, tag or tensors[name][0])
    return write_raw(tmp_path / f"bad{SUFFIX}", t, meta)


def test_good_fixture_loads(good):
    path, tensors, meta = good
    # write_raw reproduces a file that loads (so every failure below is caused by its one edit)
    assert_same(load_trace(path), load_trace(write_raw(path.with_name(f"copy{SUFFIX}"), tensors, meta)))


@pytest.mark.parametrize("content, why", [
    (b"", "8 bytes"), (b"\x01\x02\x03", "8 bytes"), (b"hello, this is a text file\n" * 4, "header length"),
    ((2).to_bytes(8, "little") + b"\xff\xfe", "not JSON"), ((2).to_bytes(8, "little") + b"[]", "JSON object"),
    ((4).to_bytes(8, "little") + b"nope", "not JSON"), ((1).to_bytes(8, "little") + b"{", "header length"),
])
def test_not_safetensors(tmp_path, content, why):
    path = tmp_path / f"x{SUFFIX}"
    path.write_bytes(content)
    msg = load_error(path, why)
    assert "not a safetensors file" in msg


def test_random_bytes_not_safetensors(tmp_path):
    rng = np.random.default_rng(5)
    for i in range(20):
        path = tmp_path / f"r{i}{SUFFIX}"
        path.write_bytes(rng.integers(0, 256, int(rng.integers(0, 4000)), dtype=np.uint8).tobytes())
        load_error(path)


def test_deeply_nested_header(tmp_path):
    h = b"[" * 100_000 + b"]" * 100_000
    path = tmp_path / f"x{SUFFIX}"
    path.write_bytes(len(h).to_bytes(8, "little") + h)
    load_error(path, "not a safetensors file")


def test_missing_file_and_directory(tmp_path):
    load_error(tmp_path / f"nothere{SUFFIX}", "no such trace file")
    load_error(tmp_path, "no such trace file")


def test_truncated(good, tmp_path):
    path, _, _ = good
    b = path.read_bytes()
    n = int.from_bytes(b[:8], "little")
    cuts = {3: "8 bytes", 8: "truncated", 8 + n // 2: "truncated", 8 + n: "truncated",
            8 + n + 5: "truncated", len(b) - 1: "truncated"}
    for cut, why in cuts.items():
        bad = tmp_path / f"cut{cut}{SUFFIX}"
        bad.write_bytes(b[:cut])
        load_error(bad, why)


@pytest.mark.parametrize("name", ["experts", "weights", "step", "seq", "phase"])
def test_missing_tensor(good, tmp_path, name):
    _, tensors, meta = good
    t = {k: v for k, v in tensors.items() if k != name}
    load_error(write_raw(tmp_path / f"bad{SUFFIX}", t, meta), repr(name), "missing")


def test_predicted_is_optional(good, tmp_path):
    _, tensors, meta = good
    t = {k: v for k, v in tensors.items() if k != "predicted"}
    assert load_trace(write_raw(tmp_path / f"ok{SUFFIX}", t, meta)).predicted is None


@pytest.mark.parametrize("name, tag", [("experts", "I32"), ("weights", "F32"), ("step", "I64"), ("seq", "I16"),
                                       ("phase", "I32"), ("predicted", "I32")])
def test_wrong_dtype(good, tmp_path, name, tag):
    _, tensors, meta = good
    load_error(edited(tmp_path, tensors, meta, name, arr(tensors, name), tag), repr(name), "dtype", tag)


@pytest.mark.parametrize("name, shape", [("experts", (10, 6)), ("weights", (60,)), ("step", (10, 1)),
                                         ("phase", (2, 5)), ("predicted", (10, 6))])
def test_wrong_rank(good, tmp_path, name, shape):
    _, tensors, meta = good
    load_error(edited(tmp_path, tensors, meta, name, arr(tensors, name).reshape(shape)), repr(name), "rank")


def test_unexpected_tensor(good, tmp_path):
    _, tensors, meta = good
    t = dict(tensors, extra=tensor(np.zeros(3), "I32"))
    load_error(write_raw(tmp_path / f"bad{SUFFIX}", t, meta), "unexpected", "extra")


@pytest.mark.parametrize("edit, fields", [
    (lambda t: {**t, "weights": tensor(arr(t, "weights")[:, :2], "F16")}, ("'weights'", "shape")),
    (lambda t: {**t, "weights": tensor(arr(t, "weights")[:9], "F16")}, ("'weights'", "shape")),
    (lambda t: {**t, "step": tensor(np.arange(11), "I32")}, ("'step'", "[10]")),
    (lambda t: {**t, "seq": tensor(np.zeros(9), "I32")}, ("'seq'", "[10]")),
    (lambda t: {**t, "phase": tensor(np.zeros(12), "U8")}, ("'phase'", "[10]")),
    (lambda t: {**t, "predicted": tensor(arr(t, "predicted")[:, :2], "I16")}, ("'predicted'", "shape")),
    (lambda t: {**t, "predicted": tensor(arr(t, "predicted")[:9], "I16")}, ("'predicted'", "shape")),
])
def test_mismatched_shapes(good, tmp_path, edit, fields):
    _, tensors, meta = good
    load_error(write_raw(tmp_path / f"bad{SUFFIX}", edit(tensors), meta), *fields)


@pytest.mark.parametrize("field, value, words", [("layers", 4, ("L=3", "layers")), ("top_k", 1, ("K=2", "top_k"))])
def test_spec_disagrees_with_tensors(good, tmp_path, field, value, words):
    _, tensors, meta = good
    spec = json.loads(meta["model_spec"])
    spec[field] = value
    load_error(write_raw(tmp_path / f"bad{SUFFIX}", tensors, {**meta, "model_spec": json.dumps(spec)}), *words)


@pytest.mark.parametrize("name", ["experts", "predicted"])
@pytest.mark.parametrize("value", [8, -2, 32767, -32768])
def test_expert_id_out_of_range(good, tmp_path, name, value):
    _, tensors, meta = good
    a = arr(tensors, name)
    a[4, 1, 1] = value
    msg = load_error(edited(tmp_path, tensors, meta, name, a), repr(name), "token 4", "layer 1", str(value))
    assert "0..7" in msg


def test_repeated_expert_in_row(good, tmp_path):
    _, tensors, meta = good
    a = arr(tensors, "experts")
    a[6, 2] = [5, 5]
    load_error(edited(tmp_path, tensors, meta, "experts", a), "'experts'", "token 6", "layer 2", "repeats")


def test_repeated_padding_is_fine(good, tmp_path):
    _, tensors, meta = good
    a = arr(tensors, "experts")
    a[6, 2] = [-1, -1]
    assert load_trace(edited(tmp_path, tensors, meta, "experts", a)).experts[6, 2].tolist() == [-1, -1]


def test_predicted_may_repeat(good, tmp_path):
    _, tensors, meta = good
    a = arr(tensors, "predicted")
    a[6, 2] = [3, 3]
    load_trace(edited(tmp_path, tensors, meta, "predicted", a))


def test_decreasing_step(good, tmp_path):
    _, tensors, meta = good
    a = arr(tensors, "step")
    a[7:] = a[6] - 1
    load_error(edited(tmp_path, tensors, meta, "step", a), "'step'", "decreases", "token 7")


def test_decreasing_step_across_chunks(good, tmp_path, monkeypatch):
    monkeypatch.setattr(trace_mod, "CHUNK_ELEMENTS", 4 * 3 * 2)  # 4 tokens of L=3, K=2: a chunk boundary
    _, tensors, meta = good
    a = arr(tensors, "step")
    a[4:] = a[3] - 1
    load_error(edited(tmp_path, tensors, meta, "step", a), "'step'", "decreases", "token 4")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, -0.5])
def test_bad_weight(good, tmp_path, value):
    _, tensors, meta = good
    a = arr(tensors, "weights")
    a[2, 0, 1] = value
    load_error(edited(tmp_path, tensors, meta, "weights", a), "'weights'", "token 2", "layer 0", ">= 0")


def test_phase_value(good, tmp_path):
    _, tensors, meta = good
    a = arr(tensors, "phase")
    a[5] = 2
    load_error(edited(tmp_path, tensors, meta, "phase", a), "'phase'", "token 5", "is 2")


def test_phase_changes_inside_step(good, tmp_path):
    _, tensors, meta = good
    step, phase = arr(tensors, "step"), arr(tensors, "phase")
    assert step[:3].tolist() == [step[0]] * 3  # first step: 3 tokens
    phase[:3] = [PREFILL, PREFILL, DECODE]
    msg = load_error(edited(tmp_path, tensors, meta, "phase", phase), "'phase'", "inside step", "token 2")
    assert f"step {step[0]}" in msg


def test_phase_may_change_between_steps(good, tmp_path):
    _, tensors, meta = good
    phase = arr(tensors, "phase")
    phase[:3], phase[3:] = PREFILL, DECODE
    assert load_trace(edited(tmp_path, tensors, meta, "phase", phase)).phase.tolist() == [0] * 3 + [1] * 7


@pytest.mark.parametrize("meta_edit, words", [
    (lambda m: None, ("metadata missing",)),
    (lambda m: "text", ("metadata missing",)),
    (lambda m: {k: v for k, v in m.items() if k != "format"}, ("'format'",)),
    (lambda m: {**m, "format": "safetensors"}, ("'format'", "safetensors", "moesim-trace")),
    (lambda m: {**m, "format_version": "2"}, ("'format_version'", "'2'")),
    (lambda m: {**m, "format_version": 1}, ("'format_version'",)),
    (lambda m: {k: v for k, v in m.items() if k != "format_version"}, ("'format_version'",)),
    (lambda m: {k: v for k, v in m.items() if k != "model_spec"}, ("'model_spec'", "missing")),
    (lambda m: {k: v for k, v in m.items() if k != "source"}, ("'source'", "missing")),
    (lambda m: {**m, "model_spec": "{layers: 3"}, ("model_spec", "not JSON")),
    (lambda m: {**m, "model_spec": 3}, ("model_spec", "not JSON")),
    (lambda m: {**m, "model_spec": "[1, 2]"}, ("model_spec", "JSON object")),
    (lambda m: {**m, "source": "not json"}, ("source", "not JSON")),
])
def test_bad_metadata(good, tmp_path, meta_edit, words):
    _, tensors, meta = good
    load_error(write_raw(tmp_path / f"bad{SUFFIX}", tensors, meta_edit(meta)), *words)


@pytest.mark.parametrize("spec_edit, words", [
    (lambda s: s.pop("experts"), ("model_spec", "missing", "experts")),
    (lambda s: s.pop("name"), ("model_spec", "missing", "name")),
    (lambda s: s.update(colour="red"), ("model_spec", "unknown", "colour")),
    (lambda s: s.update(experts=0), ("model_spec.experts", "positive integer")),
    (lambda s: s.update(hidden="64"), ("model_spec.hidden", "positive integer")),
    (lambda s: s.update(ffn=2.5), ("model_spec.ffn", "positive integer")),
    (lambda s: s.update(layers=True), ("model_spec.layers", "positive integer")),
    (lambda s: s.update(top_k=9), ("model_spec.top_k", "more than experts")),
    (lambda s: s.update(bits_per_weight=0), ("model_spec.bits_per_weight", "positive")),
    (lambda s: s.update(bits_per_weight=float("inf")), ("model_spec.bits_per_weight", "positive")),
    (lambda s: s.update(bits_per_weight=float("nan")), ("model_spec.bits_per_weight", "positive")),
    (lambda s: s.update(bits_per_weight="16"), ("model_spec.bits_per_weight", "positive")),
    (lambda s: s.update(shared_experts=-1), ("model_spec.shared_experts", "integer")),
    (lambda s: s.update(shared_ffn="big"), ("model_spec.shared_ffn", "integer")),
    (lambda s: s.update(dtype=16), ("model_spec.dtype", "string")),
    (lambda s: s.update(name=None), ("model_spec.name", "string")),
])
def test_bad_model_spec(good, tmp_path, spec_edit, words):
    _, tensors, meta = good
    spec = json.loads(meta["model_spec"])
    spec_edit(spec)
    load_error(write_raw(tmp_path / f"bad{SUFFIX}", tensors, {**meta, "model_spec": json.dumps(spec)}), *words)


@pytest.mark.parametrize("edit, words", [
    (lambda h: h["experts"].pop("dtype"), ("'experts'", "dtype, shape and data_offsets")),
    (lambda h: h.__setitem__("seq", [1, 2]), ("'seq'", "dtype, shape and data_offsets")),
    (lambda h: h["step"].update(shape=[10.0]), ("'step'", "shape")),
    (lambda h: h["step"].update(shape=[-10]), ("'step'", "shape")),
    (lambda h: h["step"].update(shape=["10"]), ("'step'", "shape")),
    (lambda h: h["step"].update(shape=[True]), ("'step'", "shape")),
    (lambda h: h["step"].update(data_offsets=[4, 0]), ("'step'", "data_offsets")),
    (lambda h: h["step"].update(data_offsets=[-40, 0]), ("'step'", "data_offsets")),
    (lambda h: h["step"].update(data_offsets=[0]), ("'step'", "data_offsets")),
    (lambda h: h["step"].update(data_offsets="0-40"), ("'step'", "data_offsets")),
    (lambda h: h["phase"].update(shape=[11]), ("'phase'", "needs 11")),
    (lambda h: h["phase"].update(data_offsets=[10**6, 10**6 + 10]), ("'phase'", "truncated")),
    (lambda h: h["experts"].update(shape=[2**62, 3, 2], data_offsets=[0, 0]), ("'experts'", "shape")),
    (lambda h: h["experts"].update(shape=[0, 2**62, 2], data_offsets=[0, 0]), ("'experts'", "shape")),
    (lambda h: h["experts"].update(shape=[2**64, 3, 2], data_offsets=[0, 2**66 * 3]), ("'experts'",)),
    (lambda h: h["experts"].update(shape=[2**40, 2**40, 2**40]), ("'experts'",)),
])
def test_bad_header_entries(good, tmp_path, edit, words):
    _, tensors, meta = good
    load_error(write_raw(tmp_path / f"bad{SUFFIX}", tensors, meta, header_edit=edit), *words)


# -------------------------------------------------------------------------------------------- fuzzing
def _fuzz_bases(tmp_path: Path) -> list[bytes]:
    rng = np.random.default_rng(11)
    out = []
    for i, kw in enumerate([dict(), dict(predicted_p=2), dict(L=1, E=3, K=1, step_sizes=(1, 1, 1)),
                            dict(step_sizes=())]):
        out.append(save_trace(make_trace(rng, **kw), tmp_path / f"base{i}{SUFFIX}").read_bytes())
    return out


def _check(path: Path, what: str) -> None:
    """Loading may fail only with TraceError; a file that loads must be usable."""
    try:
        tr = load_trace(path)
    except TraceError as e:
        assert str(path) in str(e), (what, str(e))
        return
    except Exception as e:  # noqa: BLE001 - the point of the test
        raise AssertionError(f"{what}: {type(e).__name__}: {e}") from e
    tr.describe()
    _ = tr.spec.bytes_per_expert, tr.spec.bytes_per_shared_expert, tr.spec.total_experts
    for s in tr.steps():
        for ids, counts in s.requests():
            assert (ids >= 0).all() and (ids < tr.spec.experts).all() and (counts > 0).all(), what


JUNK = [None, True, -1, 0, 1, 3, 2**31, 2**62, 2**64, -2**63, 1.5, float("nan"), float("inf"), "", "I16", "F16", "U8", "x",
        [], [0], [0, 0], [3, 2], [-1, 5], [10, 3, 2], [2**62, 2, 2], {}, {"a": 1}]


def _junk(rng: random.Random):
    return copy.deepcopy(rng.choice(JUNK))


def _edit_header(header: dict, rng: random.Random) -> str:
    """One random change to a parsed header; returns what it did."""
    name = rng.choice(list(header))
    entry = header[name]
    kind = rng.randrange(6)
    if kind == 0:
        del header[name]
        return f"delete {name}"
    if not isinstance(entry, dict):
        header[name] = _junk(rng)
        return f"{name} -> {header[name]!r}"
    if name == "__metadata__":
        key = rng.choice(list(entry) + ["other"])
        if kind == 1 and key in entry:
            del entry[key]
            return f"delete __metadata__.{key}"
        spec = entry.get("model_spec")
        spec = json.loads(spec) if key == "model_spec" and kind in (2, 3) and isinstance(spec, str) else None
        if isinstance(spec, dict) and spec:
            field = rng.choice(list(spec))
            if kind == 2:
                del spec[field]
            else:
                spec[field] = _junk(rng)
            entry[key] = json.dumps(spec)
            return f"model_spec.{field} -> {spec.get(field, '<deleted>')!r}"
        entry[key] = rng.choice([_junk(rng), json.dumps(_junk(rng))])
        return f"__metadata__.{key} -> {entry[key]!r}"
    field = rng.choice(["dtype", "shape", "data_offsets"])
    value = entry.get(field)
    if kind == 1:
        entry.pop(field, None)
        return f"delete {name}.{field}"
    if kind == 2 and field == "shape" and isinstance(value, list) and value and isinstance(value[0], int):
        i = rng.randrange(len(value))
        value[i] = rng.choice([0, 1, value[i] + rng.choice([-1, 1]), 2**62, 2**63, 2**64])
        return f"{name}.shape -> {value}"
    if kind == 3 and field == "data_offsets" and isinstance(value, list) and value and isinstance(value[0], int):
        i = rng.randrange(len(value))
        value[i] += rng.choice([-8, -2, -1, 1, 2, 8, 2**40, 2**64])
        return f"{name}.data_offsets -> {value}"
    if kind == 4:
        entry["dtype"] = rng.choice(sorted(trace_mod._DTYPE_TAGS) + ["Q4", 16])
        return f"{name}.dtype -> {entry['dtype']!r}"
    entry[field] = _junk(rng)
    return f"{name}.{field} -> {entry[field]!r}"


def test_fuzz_truncate_and_flip(tmp_path):
    rng = random.Random(1234)
    bases = _fuzz_bases(tmp_path)
    path = tmp_path / f"fuzz{SUFFIX}"
    for case in range(300):
        b = bytearray(rng.choice(bases))
        n = int.from_bytes(b[:8], "little")
        if case % 3 == 0:
            cut = rng.randrange(len(b))
            what = f"case {case}: truncated at {cut} of {len(b)}"
            b = b[:cut]
        else:
            region = (0, 8) if case % 9 == 1 else (8, 8 + n) if case % 3 == 1 else (8 + n, len(b))
            flips = []
            for _ in range(rng.randint(1, 4)):
                if region[1] > region[0]:
                    i = rng.randrange(*region)
                    b[i] ^= 1 << rng.randrange(8) if rng.random() < 0.5 else rng.randrange(1, 256)
                    flips.append(i)
            what = f"case {case}: bytes flipped at {flips}"
        path.write_bytes(bytes(b))
        _check(path, what)


def test_fuzz_header_edits(tmp_path):
    rng = random.Random(4321)
    bases = _fuzz_bases(tmp_path)
    path = tmp_path / f"fuzz{SUFFIX}"
    for case in range(400):
        b = rng.choice(bases)
        n = int.from_bytes(b[:8], "little")
        header = json.loads(b[8:8 + n])
        edits = [_edit_header(header, rng) for _ in range(rng.randint(1, 3)) if header]
        h = json.dumps(header).encode()
        path.write_bytes(len(h).to_bytes(8, "little") + h + b[8 + n:])
        _check(path, f"case {case}: {edits}")


def test_a_file_claiming_huge_sizes_is_refused_before_anything_is_sized(tmp_path):
    """issue 17: experts=2**31 in a 4 KB trace grew a run to 3 GB; shared_experts=10**9 printed 91,552 GiB of
    peak memory. Every size a model_spec may claim has an upper bound, checked as the file is opened."""
    import json as _json
    import struct

    from moesim.models import LIMITS

    from moesim.models import model_spec

    tr = from_arrays(model_spec("gpt-oss-20b"), np.zeros((2, 24, 4), np.int16) + np.arange(4), np.ones((2, 24, 4)))
    path = save_trace(tr, tmp_path / "ok.moetrace.safetensors")
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = _json.loads(raw[8:8 + n])
    original = header["__metadata__"]["model_spec"]
    for field, value in (("experts", 2**31), ("shared_experts", 10**9), ("hidden", 10**12), ("layers", 5000),
                         ("bits_per_weight", 1e300)):
        spec = _json.loads(original)
        spec[field] = value
        header["__metadata__"]["model_spec"] = _json.dumps(spec)
        body = _json.dumps(header).encode()
        bad = tmp_path / f"{field}.moetrace.safetensors"
        bad.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])
        with pytest.raises(TraceError, match=rf"model_spec\.{field}: .* is more than moesim accepts"):
            load_trace(bad)
    assert set(LIMITS) >= {"experts", "hidden", "ffn", "shared_experts", "shared_ffn", "bits_per_weight"}


def test_metadata_nested_too_deep_is_one_error(tmp_path):
    import json as _json
    import struct

    from moesim.models import model_spec

    tr = from_arrays(model_spec("gpt-oss-20b"), np.zeros((1, 24, 4), np.int16) + np.arange(4), np.ones((1, 24, 4)))
    raw = save_trace(tr, tmp_path / "ok.moetrace.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = _json.loads(raw[8:8 + n])
    header["__metadata__"]["source"] = "[" * 100_000 + "]" * 100_000
    body = _json.dumps(header).encode()
    bad = tmp_path / "deep.moetrace.safetensors"
    bad.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])
    with pytest.raises(TraceError, match="nested too deeply"):
        load_trace(bad)
