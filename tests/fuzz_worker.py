"""Run fuzz cases in this process under a memory cap; called by tests/test_fuzz.py as a subprocess.

    python tests/fuzz_worker.py traces|importers N SEED DIR

Each case mutates a valid input (a .moetrace.safetensors file; a gpt-oss-fingerprint JSON file or a JSON Lines
file, plain or compressed), opens it as `trace=` would and, where that succeeds, replays it: the only exception
allowed is moesim's own error type (MoesimError, the one-line `moesim: error:` of the command line). Prints one
JSON line: {"cases", "opened", "refused", "failures": [{case, mutation, error}]}.
"""
from __future__ import annotations

import gzip
import json
import lzma
import random
import resource
import struct
import sys
import traceback
from pathlib import Path

MEMORY_CAP = 3 << 30  # bytes of address space: a hostile file must not get near it (numba and torch need ~1.5 GB)
ODD = [-1, 0, 1, 3, 2**15, 2**31, 2**63, -2**63, 1e308, float("nan"), "x", "", None, [], {}, [[[[]]]], True,
       "\udc80", "I16", "F64", [2**40], [1, 2, 3, 4, 5]]


def mutate_bytes(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    how = rng.choice(["flip", "truncate", "append", "zero"])
    b = bytearray(raw)
    if how == "flip":
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif how == "truncate":
        del b[rng.randrange(len(b)):]
    elif how == "append":
        b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    else:
        i = rng.randrange(len(b))
        b[i:i + rng.randint(1, 64)] = bytes(min(64, len(b) - i))
    return bytes(b), how


def _paths(x, prefix=()):
    yield prefix
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(x, list):
        for i, v in enumerate(x[:4]):
            yield from _paths(v, prefix + (i,))


def mutate_json(doc, rng: random.Random):
    """A random field of `doc` set to an odd value (in place); returns a description."""
    path = rng.choice([p for p in _paths(doc) if p])
    node = doc
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = rng.choice(ODD)
    return f"{'.'.join(map(str, path))}={node[path[-1]]!r}"[:120]


def trace_case(base: bytes, rng: random.Random, out: Path) -> str:
    if rng.random() < 0.5:
        data, how = mutate_bytes(base, rng)
    else:  # the header: a tensor entry or the metadata (model_spec / source JSON inside)
        n = struct.unpack("<Q", base[:8])[0]
        header = json.loads(base[8:8 + n])
        meta = header["__metadata__"]
        if rng.random() < 0.5:
            spec = json.loads(meta["model_spec"])
            how = "model_spec." + mutate_json({"s": spec}, rng)
            meta["model_spec"] = json.dumps(spec)
        else:
            how = mutate_json(header, rng)
        body = json.dumps(header).encode("utf-8", "surrogatepass")
        data = struct.pack("<Q", len(body)) + body + base[8 + n:]
    out.write_bytes(data)
    return how


def importer_case(doc: dict, lines: list[dict], rng: random.Random, out_dir: Path, i: int) -> tuple[Path, str]:
    kind = rng.choice(["json", "jsonl"])
    if kind == "json":
        d = json.loads(json.dumps(doc))
        how = mutate_json(d, rng) if rng.random() < 0.7 else "as is"
        raw = json.dumps(d).encode("utf-8", "surrogatepass")
        name = f"c{i}_examples.json"
    else:
        recs = json.loads(json.dumps(lines))
        how = mutate_json({"r": recs}, rng) if rng.random() < 0.7 else "as is"
        raw = "".join(json.dumps(r) + "\n" for r in recs).encode("utf-8", "surrogatepass")
        name = f"c{i}.jsonl"
    pack = rng.choice(["", ".xz", ".gz"])
    raw = lzma.compress(raw) if pack == ".xz" else gzip.compress(raw) if pack == ".gz" else raw
    if rng.random() < 0.4:
        raw, cut = mutate_bytes(raw, rng)
        how += f"; bytes {cut}"
    path = out_dir / (name + pack)
    path.write_bytes(raw)
    return path, f"{kind}{pack}: {how}"


def main(kind: str, n: int, seed: int, work: str) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
    import numpy as np

    import moesim
    from moesim.errors import MoesimError
    from moesim.importers import open_trace
    from moesim.synthetic import preset_trace
    from moesim.trace import save_trace

    work_dir = Path(work)
    rng = random.Random(seed)
    base = save_trace(preset_trace("gpt-oss-like").slice_tokens(0, 40), work_dir / "base.moetrace.safetensors")
    base_raw = base.read_bytes()
    nrng = np.random.default_rng(seed)
    doc = {"has_repetition": False, "router_data": [
        {f"token_{p}": {f"layer_{l}": {"selected_experts": nrng.choice(32, 4, replace=False).tolist(),
                                       "selected_probs": [0.4, 0.3, 0.2, 0.1]} for l in range(24)}}
        for p in range(3)]}
    lines = [{"seq": 0, "token": t, "layer": l, "experts": [1, 2], "weights": [0.5, 0.5]}
             for t in range(3) for l in range(2)]
    opened = refused = 0
    failures = []
    for i in range(n):
        case_dir = work_dir / f"case{i % 50}"
        case_dir.mkdir(exist_ok=True)
        for old in case_dir.iterdir():
            if old.is_file():
                old.unlink()
        try:
            if kind == "traces":
                path = case_dir / "t.moetrace.safetensors"
                how = trace_case(base_raw, rng, path)
                tr = open_trace(str(path))
            else:
                path, how = importer_case(doc, lines, rng, case_dir, i)
                opts = {"model": {"name": "fz", "layers": 2, "experts": 8, "top_k": 2, "hidden": 16, "ffn": 16}} \
                    if ".jsonl" in path.name else {}
                tr = open_trace(str(path), cache_dir=case_dir / "cache", **opts)
            opened += 1
            moesim.simulate(tr, strategy="lru", budget="50%", fast=True)  # what a run does with it
        except MoesimError:
            refused += 1
        except BaseException as e:  # noqa: BLE001  the point: anything else is a finding
            failures.append({"case": i, "mutation": how,
                             "error": "".join(traceback.format_exception_only(type(e), e)).strip()[:300]})
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
    print(json.dumps({"cases": n, "opened": opened, "refused": refused, "failures": failures[:20],
                      "n_failures": len(failures)}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
