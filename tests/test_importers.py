"""Tests of the importers (moesim/importers/): gpt-oss-fingerprint, jsonl, format sniffing, the conversion
cache behind `trace=`, and `python -m moesim import`.

    pytest tests/test_importers.py -q

Small gpt-oss-fingerprint files are generated here, so most tests run without ../shared/traces; the tests
on real files read a handful of them (and the whole set once, through the cached `real_trace` fixture)
and compare against the JSON read independently with the standard library.
"""
from __future__ import annotations

import gzip
import json
import lzma
import os

import numpy as np
import pytest

import moesim.importers as importers
from moesim.__main__ import main
from moesim.errors import MoesimError, TraceError
from moesim.importers import detect_format, gpt_oss, import_trace, jsonl, open_trace
from moesim.trace import DECODE, PREFILL, SUFFIX, from_arrays, load_trace, model_spec, save_trace

from conftest import require_shared_traces

L, K, E = 24, 4, 32  # gpt-oss-20b: MoE layers, top-k, experts per layer


# ------------------------------------------------------------------------------------------------ helpers
def fingerprint_doc(rng, n_tokens: int, first: int = 100, rep: bool = False) -> dict:
    """A gpt-oss-fingerprint object with random routing for positions first .. first+n_tokens-1."""
    router = []
    for pos in range(first, first + n_tokens):
        layers = {}
        for layer in range(L):
            probs = np.sort(rng.dirichlet(np.ones(K)))[::-1]
            layers[f"layer_{layer}"] = {"selected_experts": rng.choice(E, K, replace=False).tolist(),
                                        "selected_probs": probs.tolist()}
        router.append({f"token_{pos}": layers})
    return {"row_index": 7, "dataset": "test", "category": "unit", "finished_successfully": True,
            "has_repetition": rep, "original_prompt": "q", "full_text": ["q", "a"], "generated_only": ["a"],
            "router_data": router}


def write(path, data) -> None:
    """Write `data` (a dict, str or bytes) to `path`, compressed as its suffix says."""
    raw = data if isinstance(data, bytes) else (data if isinstance(data, str) else json.dumps(data)).encode()
    if path.name.endswith(".xz"):
        raw = lzma.compress(raw)
    elif path.name.endswith(".gz"):
        raw = gzip.compress(raw)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)


def expected_arrays(doc: dict) -> tuple[np.ndarray, np.ndarray]:
    """(ids [n, L, K], probs [n, L, K]) read from a fingerprint object with plain Python."""
    ids, probs = [], []
    for entry in doc["router_data"]:
        (layers,) = entry.values()
        ids.append([layers[f"layer_{l}"]["selected_experts"] for l in range(L)])
        probs.append([layers[f"layer_{l}"]["selected_probs"] for l in range(L)])
    return np.array(ids), np.array(probs)


@pytest.fixture
def fingerprint_dir(tmp_path):
    """A directory of three small fingerprint files in nested folders and three encodings, one flagged
    has_repetition; returns (dir, {relative path: object})."""
    rng = np.random.default_rng(0)
    docs = {"b/x/True_False_examples.json.gz": fingerprint_doc(rng, 5, first=40),
            "a/True_True_examples.json.xz": fingerprint_doc(rng, 3, first=7, rep=True),
            "b/False_False_examples.json": fingerprint_doc(rng, 4, first=0)}
    root = tmp_path / "fp"
    for rel, doc in docs.items():
        write(root / rel, doc)
    (root / "README.md").write_text("not a trace")
    return root, docs


# --------------------------------------------------------------------------------- gpt-oss-fingerprint
def test_fingerprint_reads_every_encoding_in_path_order(fingerprint_dir):
    root, docs = fingerprint_dir
    tr = gpt_oss.read(root)
    order = sorted(docs)  # relative paths as strings: a/..., b/False..., b/x/...
    assert tr.source["paths"] == order
    assert tr.source["has_repetition"] == [docs[p]["has_repetition"] for p in order]
    assert (tr.source["files"], tr.source["files_with_repetition"], tr.source["exclude_repetition"]) == (3, 1, False)
    assert tr.source["importer"] == "gpt-oss-fingerprint" and tr.source["licence"] == "Apache-2.0"
    assert tr.spec.name == "gpt-oss-20b"
    lengths = [len(docs[p]["router_data"]) for p in order]
    assert tr.n_tokens == sum(lengths) == 12
    np.testing.assert_array_equal(tr.seq, np.repeat(np.arange(3), lengths))
    np.testing.assert_array_equal(tr.step, np.arange(12))  # one decode token per step, counting across files
    assert (np.asarray(tr.phase) == DECODE).all()
    ids = np.concatenate([expected_arrays(docs[p])[0] for p in order])
    probs = np.concatenate([expected_arrays(docs[p])[1] for p in order])
    np.testing.assert_array_equal(tr.experts, ids)
    np.testing.assert_allclose(tr.weights.astype(np.float64), probs, rtol=1e-3, atol=1e-4)  # float16


def test_fingerprint_exclude_repetition(fingerprint_dir):
    root, docs = fingerprint_dir
    full = gpt_oss.read(root)
    kept = gpt_oss.read(root, exclude_repetition=True)
    assert kept.source["paths"] == [p for p in sorted(docs) if not docs[p]["has_repetition"]]
    assert (kept.source["files"], kept.source["files_with_repetition"]) == (3, 1)
    assert kept.source["exclude_repetition"] is True
    keep_tokens = np.isin(full.seq, [1, 2])  # seq 0 is a/True_True (flagged)
    np.testing.assert_array_equal(kept.experts, np.asarray(full.experts)[keep_tokens])
    np.testing.assert_array_equal(kept.seq, np.repeat([0, 1], [4, 5]))


def test_fingerprint_single_file(fingerprint_dir):
    root, docs = fingerprint_dir
    tr = gpt_oss.read(root / "a/True_True_examples.json.xz")
    assert tr.source["paths"] == ["True_True_examples.json.xz"]
    np.testing.assert_array_equal(tr.experts, expected_arrays(docs["a/True_True_examples.json.xz"])[0])


def test_fingerprint_skips_empty_and_unreadable_files_with_a_warning(fingerprint_dir, capsys):
    root, _ = fingerprint_dir
    write(root / "science/True_True_examples.json.xz", b"")  # what ../shared/traces/.../science holds
    (root / "c/broken.json.xz").parent.mkdir()
    (root / "c/broken.json.xz").write_bytes(lzma.compress(b'{"router_data": []}')[:20])  # truncated xz
    tr = gpt_oss.read(root)
    err = capsys.readouterr().err
    assert f"{root / 'science/True_True_examples.json.xz'}: empty file, skipped" in err
    assert f"{root / 'c/broken.json.xz'}: unreadable" in err
    assert tr.n_seqs == 3 and tr.source["skipped"] == ["c/broken.json.xz", "science/True_True_examples.json.xz"]


def break_doc(doc: dict, how: str) -> dict | str:
    entry = doc["router_data"][1]
    (layers,) = entry.values()
    if how == "json":
        return json.dumps(doc)[:-5]
    if how == "router_data":
        del doc["router_data"]
    elif how == "has_repetition":
        doc["has_repetition"] = "no"
    elif how == "layers":
        del layers["layer_23"]
    elif how == "k":
        layers["layer_5"]["selected_experts"] = [1, 2, 3]
    elif how == "id":
        layers["layer_5"]["selected_experts"][2] = 32
    elif how == "float_id":
        layers["layer_5"]["selected_experts"][2] = 3.5
    elif how == "duplicate":
        layers["layer_5"]["selected_experts"] = [9, 4, 9, 1]
    elif how == "probs":
        del layers["layer_5"]["selected_probs"]
    elif how == "negative_prob":
        layers["layer_5"]["selected_probs"][0] = -0.5
    elif how == "positions":
        doc["router_data"][2] = {"token_999": doc["router_data"][2].popitem()[1]}
    elif how == "token_key":
        doc["router_data"][1] = {"tok_1": layers}
    return doc


@pytest.mark.parametrize("how, words", [
    ("json", ["not valid JSON"]),
    ("router_data", ["'router_data' missing"]),
    ("has_repetition", ["has_repetition", "'no'"]),
    ("layers", ["router_data[1]", "23 layers", "layer_0..layer_23"]),
    ("k", ["router_data[1]", "layer_5.selected_experts", "list of 4 integers"]),
    ("id", ["router_data[1]", "layer_5.selected_experts[2]", "32", "0..31"]),
    ("float_id", ["layer_5.selected_experts", "integers"]),
    ("duplicate", ["layer_5.selected_experts", "repeats"]),
    ("probs", ["layer_5", "'selected_probs' missing"]),
    ("negative_prob", ["layer_5.selected_probs[0]", "-0.5"]),
    ("positions", ["router_data[2]", "token_999", "consecutive"]),
    ("token_key", ["router_data[1]", "'tok_1'"]),
])
def test_fingerprint_malformed_content_names_file_and_field(tmp_path, how, words):
    path = tmp_path / "d" / "bad.json.xz"
    write(path, break_doc(fingerprint_doc(np.random.default_rng(1), 4), how))
    with pytest.raises(TraceError) as e:
        gpt_oss.read(tmp_path / "d")
    msg = str(e.value)
    assert str(path) in msg
    for w in words:
        assert w in msg


def test_fingerprint_errors_for_empty_directory_and_missing_path(tmp_path):
    with pytest.raises(TraceError, match="no .json"):
        gpt_oss.read(tmp_path)
    with pytest.raises(TraceError, match="no such file"):
        gpt_oss.read(tmp_path / "absent")


# ------------------------------------------------------------------------------------------ real files
REAL_SAMPLE = ["data/mmlu_test/high_school_chemistry/True_False_examples.json.xz",
               "data/mmlu_test/prehistory/False_True_examples.json.xz",
               "data/mmlu_test/professional_psychology/False_False_examples.json.xz",
               "data/mmlu_validation/marketing/True_True_examples.json.xz"]


def read_real(path) -> dict:
    """One real file, read with the standard library only (independent of the importer)."""
    with lzma.open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def real_sample(tmp_path_factory):
    """A folder of links to REAL_SAMPLE (and one of the empty science/ files), keeping relative paths."""
    root = require_shared_traces()
    sample = tmp_path_factory.mktemp("real") / "gpt-oss-20b"
    for rel in REAL_SAMPLE + ["science/True_True_examples.json.xz"]:
        (sample / rel).parent.mkdir(parents=True, exist_ok=True)
        (sample / rel).symlink_to(root / rel)
    return sample, {rel: read_real(root / rel) for rel in REAL_SAMPLE}


def test_real_files_equal_their_json(real_sample, capsys):
    sample, docs = real_sample
    tr = gpt_oss.read(sample)
    assert "science/True_True_examples.json.xz: empty file, skipped" in capsys.readouterr().err
    assert tr.source["paths"] == sorted(REAL_SAMPLE)
    assert tr.source["has_repetition"] == [docs[p]["has_repetition"] for p in sorted(REAL_SAMPLE)]
    assert tr.source["has_repetition"] == [p.endswith("_True_examples.json.xz") for p in sorted(REAL_SAMPLE)]
    counts = np.bincount(np.asarray(tr.seq))
    assert counts.tolist() == [len(docs[p]["router_data"]) for p in sorted(REAL_SAMPLE)]
    starts = np.concatenate([[0], np.cumsum(counts)])
    for s, rel in enumerate(sorted(REAL_SAMPLE)):
        ids, probs = expected_arrays(docs[rel])
        got = slice(starts[s], starts[s + 1])
        np.testing.assert_array_equal(tr.experts[got], ids)
        np.testing.assert_allclose(tr.weights[got].astype(np.float64), probs, rtol=1e-3, atol=1e-4)


def test_real_exclude_repetition_drops_exactly_the_flagged_files(real_sample):
    sample, docs = real_sample
    full = gpt_oss.read(sample)
    kept = gpt_oss.read(sample, exclude_repetition=True)
    unflagged = [p for p in sorted(REAL_SAMPLE) if not docs[p]["has_repetition"]]
    assert kept.source["paths"] == unflagged and len(unflagged) == 2
    keep_seqs = [full.source["paths"].index(p) for p in unflagged]
    np.testing.assert_array_equal(kept.experts, np.asarray(full.experts)[np.isin(full.seq, keep_seqs)])
    assert kept.n_tokens == sum(len(docs[p]["router_data"]) for p in unflagged)


def test_real_trace_matches_the_readme_facts_and_sampled_files(real_trace, shared_traces):
    src = real_trace.source
    assert real_trace.n_tokens == 155_103 and real_trace.n_seqs == 532
    assert src["files"] == 532 and src["files_with_repetition"] == 186 == sum(src["has_repetition"])
    assert src["paths"] == sorted(src["paths"]) and len(src["paths"]) == 532
    assert real_trace.spec == model_spec("gpt-oss-20b")
    counts = np.bincount(np.asarray(real_trace.seq), minlength=532)
    starts = np.concatenate([[0], np.cumsum(counts)])
    rng = np.random.default_rng(532)
    for s in rng.choice(532, 3, replace=False):
        doc = read_real(shared_traces / src["paths"][s])
        assert counts[s] == len(doc["router_data"])
        assert doc["has_repetition"] == src["has_repetition"][s]
        ids, probs = expected_arrays(doc)
        for t in rng.choice(counts[s], 5, replace=False):  # sampled tokens of that file
            np.testing.assert_array_equal(real_trace.experts[starts[s] + t], ids[t])
            np.testing.assert_allclose(real_trace.weights[starts[s] + t].astype(np.float64), probs[t],
                                       rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------------------------- jsonl
TINY = {"name": "tiny", "layers": 3, "experts": 8, "top_k": 2, "hidden": 16, "ffn": 32}
FIELDS = {"seq": "req", "token": "pos", "layer": "moe_layer", "experts": "ids", "weights": "gates"}


def tiny_lines(rng, n_tokens: int = 6) -> tuple[list[dict], np.ndarray, np.ndarray, np.ndarray]:
    """JSON Lines records (custom field names, each token's layers interleaved with the next token's) for
    two sequences; returns (records, expected experts, weights, seq) in order of first appearance."""
    toks = [("alpha", t) for t in range(n_tokens // 2)] + [(11, t) for t in range(n_tokens - n_tokens // 2)]
    ids = np.stack([[rng.choice(8, 2, replace=False) for _ in range(3)] for _ in toks])  # [T, 3, 2]
    w = np.round(rng.random((len(toks), 3, 2)), 3)
    records = []
    for i, (s, t) in enumerate(toks):
        for layer in (2, 0, 1):
            records.append((i, {"req": s, "pos": t, "moe_layer": layer, "ids": ids[i, layer].tolist(),
                                "gates": w[i, layer].tolist()}))
    # move each token's last layer after the next token's first line: records of a token are not contiguous
    for j in range(0, len(records) - 3, 3):
        records[j + 2], records[j + 3] = records[j + 3], records[j + 2]
    assert [i for i, _ in records] != sorted(i for i, _ in records)
    return [r for _, r in records], ids, w, np.repeat([0, 1], [n_tokens // 2, n_tokens - n_tokens // 2])


def write_jsonl(path, records) -> None:
    write(path, "".join(json.dumps(r) + "\n" for r in records) + "\n")


@pytest.mark.parametrize("name", ["r.jsonl", "r.jsonl.gz", "r.jsonl.xz"])
def test_jsonl_round_trip_with_custom_field_names(tmp_path, name):
    records, ids, w, seq = tiny_lines(np.random.default_rng(2))
    write_jsonl(tmp_path / name, records)
    tr = jsonl.read(tmp_path / name, model=TINY, **FIELDS)
    assert tr.spec.name == "tiny" and tr.n_tokens == len(ids)
    np.testing.assert_array_equal(tr.experts, ids)
    np.testing.assert_allclose(tr.weights.astype(np.float64), w, rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(tr.seq, seq)
    np.testing.assert_array_equal(tr.step, np.arange(len(ids)))
    assert (np.asarray(tr.phase) == DECODE).all()
    assert tr.source["seq_names"] == ["alpha", 11] and tr.source["fields"]["seq"] == "req"


def test_jsonl_steps_phases_defaults_and_padding(tmp_path):
    """step and phase fields; missing weights (1/k each); fewer ids than top_k (-1 padded)."""
    spec = dict(TINY, layers=1, top_k=3)
    lines = [  # a prefill chunk of seq 0 (step 0), then both seqs decode together (steps 1, 2)
        {"seq": 0, "token": 0, "layer": 0, "experts": [1, 2, 3], "step": 0, "phase": "prefill"},
        {"seq": 1, "token": 0, "layer": 0, "experts": [7], "weights": [1.0], "step": 2, "phase": 1},
        {"seq": 0, "token": 1, "layer": 0, "experts": [4, 5], "step": 0, "phase": 0},
        {"seq": 0, "token": 2, "layer": 0, "experts": [6, 0, 1], "weights": [0.5, 0.3, 0.2], "step": 1},
        {"seq": 1, "token": 1, "layer": 0, "experts": [2, 3], "weights": [0.9, 0.1], "step": 1, "phase": "decode"},
    ]
    write_jsonl(tmp_path / "s.jsonl", lines)
    tr = jsonl.read(tmp_path / "s.jsonl", model=spec)
    np.testing.assert_array_equal(tr.step, [0, 0, 1, 1, 2])  # sorted by step, stable, values kept
    np.testing.assert_array_equal(tr.seq, [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(tr.phase, [PREFILL, PREFILL, DECODE, DECODE, DECODE])
    np.testing.assert_array_equal(tr.experts[:, 0], [[1, 2, 3], [4, 5, -1], [6, 0, 1], [2, 3, -1], [7, -1, -1]])
    np.testing.assert_allclose(tr.weights[:, 0].astype(np.float64),
                               [[1 / 3] * 3, [0.5, 0.5, 0], [0.5, 0.3, 0.2], [0.9, 0.1, 0], [1, 0, 0]], atol=1e-3)
    assert tr.n_steps == 3


def test_jsonl_with_a_preset_model(tmp_path):
    rng = np.random.default_rng(3)
    ids = np.stack([[rng.choice(8, 2, replace=False) for _ in range(32)] for _ in range(3)])  # [3, 32, 2]
    write_jsonl(tmp_path / "m.jsonl", [{"seq": 0, "token": t, "layer": layer, "experts": ids[t, layer].tolist()}
                                       for t in range(3) for layer in range(32)])
    tr = jsonl.read(tmp_path / "m.jsonl", model="mixtral-8x7b")
    assert tr.spec == model_spec("mixtral-8x7b") and tr.source["model"] == "mixtral-8x7b"
    np.testing.assert_array_equal(tr.experts, ids)
    assert (np.asarray(tr.weights) == np.float16(0.5)).all()  # no weights field: 1/k each


def test_importer_defaults_match_their_read_signatures():
    import inspect

    for mod in (gpt_oss, jsonl):
        params = inspect.signature(mod.read).parameters
        assert mod.DEFAULTS == {n: p.default for n, p in params.items() if n != "src"}


@pytest.mark.parametrize("line, words", [
    ('{"seq": 0, "token": 3, "layer": 0}', ["'experts' missing"]),
    ('{"seq": 0, "token": 3, "layer": 0, "experts": [1, 2]', ["not valid JSON"]),
    ('[1, 2]', ["expected a JSON object"]),
    ('{"seq": 0, "token": "3", "layer": 0, "experts": [1]}', ["'token'", "'3'", "integer"]),
    ('{"seq": 0, "token": 3, "layer": -1, "experts": [1]}', ["'layer'", "-1"]),
    ('{"seq": 0, "token": 3, "layer": 0, "experts": [1, 1.5]}', ["'experts'", "expert ids"]),
    ('{"seq": 0, "token": 3, "layer": 0, "experts": [1, 1]}', ["'experts'", "repeats"]),
    ('{"seq": 0, "token": 3, "layer": 0, "experts": [1, 2], "weights": [1]}', ["'weights'", "2 finite"]),
    ('{"seq": 0, "token": 3, "layer": 0, "experts": [1], "step": 4}', ["'step' present", "line 1"]),
    ('{"seq": 0, "token": 3, "layer": 0, "experts": [1], "phase": "train"}', ["'phase'", "'train'"]),
    ('{"seq": 0, "token": 3, "layer": 3, "experts": [1]}', ["'layer'", "model tiny has layers 0..2"]),
    ('{"seq": 0, "token": 3, "layer": 0, "experts": [1, 2, 3]}', ["3 ids", "top-2"]),
    ('{"seq": 0, "token": 3, "layer": 0, "experts": [8]}', ["[8]", "experts 0..7"]),
    ('{"seq": [0], "token": 3, "layer": 0, "experts": [1]}', ["'seq'", "integer or a string"]),
])
def test_jsonl_bad_line_names_file_line_and_field(tmp_path, line, words):
    path = tmp_path / "bad.jsonl"
    good = '{"seq": 0, "token": 1, "layer": 0, "experts": [1, 2]}'
    write(path, f"{good}\n\n{line}\n")
    with pytest.raises(TraceError) as e:
        jsonl.read(path, model=TINY)
    assert f"{path}:3:" in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_jsonl_token_level_errors(tmp_path):
    path = tmp_path / "t.jsonl"
    write_jsonl(path, [{"seq": 0, "token": 0, "layer": layer, "experts": [1]} for layer in (0, 1, 0)])
    with pytest.raises(TraceError, match=r"t.jsonl:3: layer 0 of this token was already given on line 1"):
        jsonl.read(path, model=TINY)
    write_jsonl(path, [{"seq": 0, "token": 0, "layer": layer, "experts": [1]} for layer in (0, 2)])
    with pytest.raises(TraceError, match=r"t.jsonl:1: .* no line for layer 1"):
        jsonl.read(path, model=TINY)
    write_jsonl(path, [{"seq": 0, "token": 0, "layer": 0, "experts": [1], "step": s} for s in (0, 1)])
    with pytest.raises(TraceError, match=r"t.jsonl:2: field 'step' is 1, but line 1 gave step 0"):
        jsonl.read(path, model=dict(TINY, layers=1))


def test_jsonl_without_a_model_names_the_presets_that_fit(tmp_path):
    path = tmp_path / "m.jsonl"
    write_jsonl(path, [{"seq": 0, "token": 0, "layer": layer, "experts": [layer % 7, 7]} for layer in range(32)])
    with pytest.raises(TraceError) as e:
        jsonl.read(path)
    assert "jsonl.model=mixtral-8x7b" in str(e.value) and "32 layers" in str(e.value)
    write_jsonl(path, [{"seq": 0, "token": 0, "layer": 0, "experts": [1]}])
    with pytest.raises(TraceError, match=r"no preset fits.*jsonl.model=\{name:"):
        jsonl.read(path)


# ------------------------------------------------------------------------------- sniffing and the cache
def test_detect_format_from_content(fingerprint_dir, tmp_path):
    root, _ = fingerprint_dir
    assert detect_format(root) == "gpt-oss-fingerprint"
    assert detect_format(root / "a/True_True_examples.json.xz") == "gpt-oss-fingerprint"
    write_jsonl(tmp_path / "data.txt", [{"seq": 0, "token": 0, "layer": 0, "experts": [1]}])  # no telling suffix
    assert detect_format(tmp_path / "data.txt") == "jsonl"
    write(tmp_path / "other.json", {"tokens": [1, 2]})
    with pytest.raises(MoesimError, match="format not recognised; supported: gpt-oss-fingerprint"):
        detect_format(tmp_path / "other.json")
    with pytest.raises(MoesimError, match="no such file"):
        detect_format(tmp_path / "absent")


def test_open_trace_converts_once_then_reads_the_cache(fingerprint_dir, tmp_path, capsys, monkeypatch):
    root, _ = fingerprint_dir
    cache = tmp_path / "cache"
    first = open_trace(root, cache_dir=cache)
    err = capsys.readouterr().err
    assert f"converting {root} (gpt-oss-fingerprint) once; cached as {cache}" in err
    (cached,) = cache.iterdir()
    assert cached.name.startswith("fp-gpt-oss-fingerprint-") and cached.name.endswith(SUFFIX)

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again although the cache is valid")

    monkeypatch.setattr(gpt_oss, "read", no_conversion)
    again = open_trace(str(root), cache_dir=cache)
    assert capsys.readouterr().err == ""
    assert again.path == cached
    np.testing.assert_array_equal(again.experts, first.experts)
    assert again.source == first.source
    monkeypatch.undo()

    # other options, or a changed input file, are another conversion
    assert open_trace(root, cache_dir=cache, exclude_repetition=True).n_seqs == 2
    p = root / "b/False_False_examples.json"
    os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))
    open_trace(root, cache_dir=cache)
    assert len(list(cache.iterdir())) == 3


def test_open_trace_cache_location_and_a_corrupt_cache(fingerprint_dir, tmp_path, capsys, monkeypatch):
    root, _ = fingerprint_dir
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(importers.CACHE_ENV, raising=False)
    open_trace(root)
    (cached,) = (tmp_path / "traces" / "cache").iterdir()  # default: ./traces/cache
    monkeypatch.setenv(importers.CACHE_ENV, str(tmp_path / "env"))
    open_trace(root)
    assert len(list((tmp_path / "env").iterdir())) == 1
    monkeypatch.delenv(importers.CACHE_ENV)
    cached.write_bytes(b"garbage")
    capsys.readouterr()
    tr = open_trace(root)
    err = capsys.readouterr().err
    assert "cached conversion unusable" in err and "converting" in err
    assert tr.n_tokens == 12 and load_trace(cached).n_tokens == 12


def test_open_trace_jsonl_with_options(tmp_path):
    records, ids, _, _ = tiny_lines(np.random.default_rng(4))
    write_jsonl(tmp_path / "r.jsonl", records)
    tr = open_trace(tmp_path / "r.jsonl", cache_dir=tmp_path / "c", model=TINY, **FIELDS)
    np.testing.assert_array_equal(tr.experts, ids)
    with pytest.raises(MoesimError, match=r"option\(s\) \['model'\] do not apply to format gpt-oss-fingerprint"):
        import_trace(tmp_path / "r.jsonl", "gpt-oss-fingerprint", model="x")


def test_open_trace_of_a_trace_file_and_of_a_preset(tmp_path):
    tr = from_arrays(model_spec(TINY), np.array([[[1, 2]] * 3]), np.full((1, 3, 2), 0.5, np.float16))
    path = save_trace(tr, tmp_path / f"t{SUFFIX}")
    assert open_trace(str(path)).path == path
    synthetic = pytest.importorskip("moesim.synthetic")
    name = "uniform" if "uniform" in synthetic.PRESETS else next(iter(synthetic.PRESETS))
    got = open_trace(name)
    assert got.n_tokens > 0 and got.source.get("preset") == name


def test_open_trace_of_nothing_known_lists_what_it_accepts(tmp_path):
    with pytest.raises(MoesimError) as e:
        open_trace("no-such-trace-or-preset")
    msg = str(e.value)
    assert "trace='no-such-trace-or-preset'" in msg and SUFFIX in msg
    assert "gpt-oss-fingerprint" in msg and "jsonl" in msg and "presets:" in msg
    try:
        from moesim.synthetic import PRESETS
    except ImportError:
        return
    assert all(name in msg for name in PRESETS)


# ------------------------------------------------------------------------------------------------- CLI
def test_import_command_writes_a_loadable_trace(fingerprint_dir, tmp_path, capsys):
    root, _ = fingerprint_dir
    out = tmp_path / "o" / f"fp{SUFFIX}"
    assert main(["import", f"src={root}", f"out={out}"]) == 0
    stdout = capsys.readouterr().out
    assert str(out) in stdout and "12 tokens" in stdout
    tr = load_trace(out)
    np.testing.assert_array_equal(tr.experts, gpt_oss.read(root).experts)
    assert main(["import", f"src={root}", f"out={out}", "exclude_repetition=true"]) == 0  # overwrites
    assert load_trace(out).n_seqs == 2


def test_import_command_default_out_and_jsonl_options(tmp_path, capsys, monkeypatch):
    records, ids, _, _ = tiny_lines(np.random.default_rng(5))
    write_jsonl(tmp_path / "route.jsonl.gz", records)
    monkeypatch.chdir(tmp_path)
    model = "jsonl.model={" + ",".join(f"{k}:{v}" for k, v in TINY.items()) + "}"  # a model given as fields
    args = ["import", "src=route.jsonl.gz", model] + [f"jsonl.{k}={v}" for k, v in FIELDS.items()]
    assert main(args + ["format=jsonl"]) == 0
    tr = load_trace(tmp_path / "traces" / f"route{SUFFIX}")
    assert tr.spec == model_spec(TINY)
    np.testing.assert_array_equal(tr.experts, ids)
    assert main(args) == 0  # format sniffed, with the custom field names
    assert "route.moetrace.safetensors: 6 tokens" in capsys.readouterr().out


@pytest.mark.parametrize("args, words", [
    (["src={tmp}/absent"], ["src=", "absent", "no such file or directory"]),
    (["src={tmp}/x.jsonl", "format=jsonl", "exclude_repetition=true"], ["exclude_repetition", "gpt-oss"]),
    (["src={tmp}/x.jsonl", "out={tmp}/x.safetensors"], ["out=", "x.safetensors", SUFFIX]),
    (["src={tmp}/x.jsonl", "format=csv"], ["format='csv'", "unknown"]),
    (["src={tmp}/x.jsonl"], ["x.jsonl", "no model given"]),
])
def test_import_command_errors_are_one_line(tmp_path, capsys, args, words):
    write_jsonl(tmp_path / "x.jsonl", [{"seq": 0, "token": 0, "layer": 0, "experts": [1]}])
    assert main(["import"] + [a.format(tmp=tmp_path) for a in args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("moesim: error: ") and err.count("\n") == 1
    for w in words:
        assert w in err


# ------------------------------------------------------------------------------------ the shipped trace
def test_shipped_trace_names_its_origin_not_a_local_folder(real_trace):
    """trace=gpt-oss-20b: the trace in traces/, unpacked once; its metadata cites the source repository."""
    from moesim.importers import SHIPPED

    assert real_trace.path.name.startswith("gpt-oss-20b-" + SHIPPED["gpt-oss-20b"][1][:16])
    assert real_trace.source["root"].startswith("AmanPriyanshu/GPT-OSS-MoE-ExpertFingerprinting@72b368f6")
    assert "shared" not in json.dumps(real_trace.source) and "/work" not in json.dumps(real_trace.source)
    assert real_trace.n_tokens == 155_103 and real_trace.n_seqs == 532


def test_compressed_traces_unpack_once_and_damage_is_one_clear_error(tmp_path, monkeypatch):
    """A .moetrace.safetensors.xz is unpacked into the cache once; a truncated one, one that unpacks past the
    cap, or a shipped one whose sha256 differs is refused with the file named, and nothing is left behind."""
    import hashlib

    from moesim.synthetic import preset_trace

    tr = preset_trace("gpt-oss-like").slice_tokens(0, 50)
    raw = save_trace(tr, tmp_path / "t.moetrace.safetensors").read_bytes()
    packed = tmp_path / "t.moetrace.safetensors.xz"
    packed.write_bytes(lzma.compress(raw))
    cache = tmp_path / "cache"
    got = open_trace(packed, cache_dir=cache)
    np.testing.assert_array_equal(got.experts, tr.experts)
    assert [p.name for p in cache.iterdir()] == [got.path.name]
    assert open_trace(packed, cache_dir=cache).path == got.path  # opened, not unpacked again

    cut = tmp_path / "cut.moetrace.safetensors.xz"
    cut.write_bytes(packed.read_bytes()[: packed.stat().st_size // 2])
    with pytest.raises(MoesimError, match=r"cut\.moetrace\.safetensors\.xz: not a complete xz file"):
        open_trace(cut, cache_dir=tmp_path / "c2")
    monkeypatch.setattr(importers, "UNPACK_MAX", len(raw) // 2)
    with pytest.raises(MoesimError, match="unpacks to more than"):
        open_trace(packed, cache_dir=tmp_path / "c3")
    monkeypatch.setattr(importers, "UNPACK_MAX", 2**30)
    monkeypatch.setattr(importers, "SHIPPED_DIR", tmp_path)
    monkeypatch.setattr(importers, "SHIPPED", {"tiny": (packed.name, "0" * 64)})
    with pytest.raises(MoesimError, match="sha256 is .* not the shipped 0000"):
        open_trace("tiny", cache_dir=tmp_path / "c4")
    monkeypatch.setattr(importers, "SHIPPED", {"tiny": (packed.name, hashlib.sha256(raw).hexdigest())})
    assert open_trace("tiny", cache_dir=tmp_path / "c5").n_tokens == 50
    for folder in ("c2", "c3", "c4"):
        assert not (tmp_path / folder).exists() or not any((tmp_path / folder).iterdir())


@pytest.mark.parametrize("suffix", [".jsonl.xz", ".jsonl.gz"])
def test_a_cut_short_compressed_jsonl_is_one_error(tmp_path, suffix):
    """issue 17: EOFError / LZMAError / BadGzipFile tracebacks; now one TraceError naming the file."""
    lines = "".join(json.dumps({"seq": 0, "token": t, "layer": 0, "experts": [1, 2]}) + "\n" for t in range(3000))
    pack = lzma.compress if suffix.endswith("xz") else gzip.compress
    whole = pack(lines.encode())
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(TraceError, match=rf"cut{suffix.replace('.', chr(92) + '.')}: the compressed data is damaged"):
        jsonl.read(cut, model=TINY)


def test_one_endless_line_or_an_xz_bomb_is_refused_in_bounded_memory(tmp_path, monkeypatch):
    """A .json.xz of a few hundred KB unpacking to GBs (issue 17: 1.5 GB in 6 s), one endless JSONL line:
    refused at the caps, read in pieces of at most the cap."""
    monkeypatch.setattr(gpt_oss, "FILE_MAX", 1 << 20)
    monkeypatch.setattr(jsonl, "LINE_MAX", 1 << 16)
    bomb = tmp_path / "bomb.json.xz"
    bomb.write_bytes(lzma.compress(b'{"router_data": [' + b" " * (4 << 20) + b"]}"))
    with pytest.raises(TraceError, match="holds more than 1 MiB"):
        gpt_oss.read_bytes(bomb)
    endless = tmp_path / "endless.jsonl.xz"
    endless.write_bytes(lzma.compress(b'{"layer": 0, "experts": [1], "x": "' + b"a" * (1 << 20) + b'"}\n'))
    assert not jsonl.looks_like(endless)
    with pytest.raises(TraceError, match="a line longer than"):
        jsonl.read(endless, model=TINY)


def test_a_name_that_is_not_text_or_metadata_nested_too_deep_is_one_error():
    from moesim.models import ModelSpec

    with pytest.raises(TraceError, match="not valid Unicode text"):
        ModelSpec.from_dict({"name": "bad\udc80", "layers": 1, "experts": 4, "top_k": 1, "hidden": 8, "ffn": 8})
