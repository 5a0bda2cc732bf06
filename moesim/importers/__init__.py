"""Foreign trace formats -> Trace, and what a `trace=` option accepts.

    python -m moesim import src=DIR out=traces/mine.moetrace.safetensors     # e.g. a folder of gpt-oss-fingerprint JSON
    python -m moesim import src=routing.jsonl format=jsonl jsonl.model=mixtral-8x7b

One module per format (gpt_oss.py, jsonl.py), each with `IMPORTER` (its name), `DEFAULTS` (options of read()),
`input_files(path)`,
`looks_like(path)` and `read(path, **options) -> Trace`. `open_trace(value)` resolves a `trace=` value:
a `.moetrace.safetensors` file; a foreign file or directory (format sniffed from its content), converted once
and cached under traces/cache/; or the name of a synthetic preset (moesim.synthetic). `open_trace_cached`
is the reader policies get through strategies.Context for their `calibrate_trace`: one read per file.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

from ..errors import MoesimError, TraceError
from ..trace import FORMAT_VERSION, SUFFIX, Trace, load_trace, save_trace
from . import gpt_oss, jsonl

FORMATS = {gpt_oss.IMPORTER: gpt_oss, jsonl.IMPORTER: jsonl}
CACHE_ENV = "MOESIM_TRACE_CACHE"
CACHE_VERSION = "1"  # bump when an importer's output changes, so stale cached conversions are not reused
SHIPPED_DIR = Path(__file__).resolve().parents[2] / "traces"  # the repository's traces/ (a clone has it)
# real traces shipped in the repository, by `trace=` name: (file under traces/, sha256 of the unpacked trace);
# traces/README.md says where each comes from, scripts/ship_trace.py makes them
SHIPPED = {"gpt-oss-20b": ("gpt-oss-20b" + SUFFIX + ".xz",
                           "7b5c4f96e18d16ed2c981cdffa7e922b209a80253a585ecd6994f92d31d60274")}
UNPACK_MAX = 4 * 2**30  # bytes a compressed trace may unpack to: more is refused, not written


def detect_format(path: str | Path, **options) -> str:
    """The name of the format of the file or directory `path`, read from its content."""
    path = Path(path)
    if not path.exists():
        raise MoesimError(f"{path}: no such file or directory")
    fields = {k: v for k, v in options.items() if k in ("layer", "experts")}
    if jsonl.looks_like(path, **fields):
        return jsonl.IMPORTER
    if gpt_oss.looks_like(path):
        return gpt_oss.IMPORTER
    raise MoesimError(f"{path}: format not recognised; supported: {_formats_help()}")


def _formats_help() -> str:
    return ("gpt-oss-fingerprint (a .json/.json.xz/.json.gz file, or a directory of them, holding 'router_data'), "
            "jsonl (one JSON object per token and layer with 'layer' and 'experts' fields)")


def _module(fmt: str):
    if fmt not in FORMATS:
        raise MoesimError(f"format={fmt!r}: unknown; expected auto or one of {', '.join(FORMATS)}")
    return FORMATS[fmt]


def _options(fmt: str, options: dict) -> dict:
    """`options` checked against what the format's read() takes, with its defaults filled in (for the cache key)."""
    defaults = _module(fmt).DEFAULTS
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise MoesimError(f"option(s) {unknown} do not apply to format {fmt}; it takes {', '.join(defaults)}")
    return {**defaults, **options}


def import_trace(src: str | Path, fmt: str = "auto", **options) -> Trace:
    """Read the foreign trace at `src` (format `fmt`, or sniffed when "auto") into a Trace in memory."""
    src = Path(src)
    if not src.exists():
        raise MoesimError(f"{src}: no such file or directory")
    if fmt == "auto":
        fmt = detect_format(src, **options)
    return _module(fmt).read(src, **_options(fmt, options))


def cache_dir_default() -> Path:
    """Where converted foreign traces are kept: $MOESIM_TRACE_CACHE, else traces/cache under the working dir."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.cwd() / "traces" / "cache"


def cache_path(src: Path, fmt: str, options: dict, cache_dir: Path) -> Path:
    """The cached conversion's file: named after `src`, keyed by a hash of every input file's relative path,
    size and mtime_ns plus the importer, its options and the format versions."""
    h = hashlib.sha256()
    h.update(json.dumps([fmt, CACHE_VERSION, FORMAT_VERSION, options], sort_keys=True, default=str).encode())
    for rel, path in _module(fmt).input_files(src):
        st = path.stat()
        h.update(f"\0{rel}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return cache_dir / f"{stem(src)}-{fmt}-{h.hexdigest()[:16]}{SUFFIX}"


def stem(src: Path) -> str:
    """`src`'s name without compression and JSON suffixes: data.jsonl.gz -> data."""
    name = src.resolve().name
    for suffix in (".xz", ".gz", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return name or "trace"


def open_trace(value: str | os.PathLike, cache_dir: Path | None = None, fmt: str = "auto", **options) -> Trace:
    """The trace a `trace=` value names: a .moetrace.safetensors file; a file or directory in a foreign format
    (converted once, then read from the cache: `cache_dir`, else $MOESIM_TRACE_CACHE, else ./traces/cache);
    or a synthetic preset's name. `fmt` and `options` go to the importer of a foreign trace."""
    text = str(value)
    if text.endswith(SUFFIX):
        return load_trace(text)
    cache = Path(cache_dir) if cache_dir is not None else cache_dir_default()
    if text.endswith(SUFFIX + ".xz"):  # moesim's format, compressed: unpacked once into the cache
        path = Path(text)
        try:
            st = path.stat()
        except OSError as e:
            raise MoesimError(f"trace={text}: {e.strerror}") from None
        key = hashlib.sha256(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
        return _unpacked(path, cache / f"{path.name[:-len(SUFFIX) - 3]}-{key}{SUFFIX}")
    path = Path(text)
    if not path.exists() and text in SHIPPED:
        name, digest = SHIPPED[text]
        src = SHIPPED_DIR / name
        if not src.is_file():
            raise MoesimError(f"trace={text}: the shipped trace {src} is missing; it comes with a clone of the moesim "
                              f"repository (git clone, not a package install); or give trace=PATH")
        return _unpacked(src, cache / f"{text}-{digest[:16]}{SUFFIX}", digest)
    if path.exists():
        if fmt == "auto":
            fmt = detect_format(path, **options)
        opts = _options(fmt, options)
        cached = cache_path(path, fmt, opts, Path(cache_dir) if cache_dir is not None else cache_dir_default())
        if cached.is_file():
            try:
                return load_trace(cached)
            except TraceError as e:
                print(f"moesim: warning: cached conversion unusable ({e}); converting again", file=sys.stderr)
        print(f"moesim: converting {path} ({fmt}) once; cached as {cached}", file=sys.stderr)
        save_trace(_module(fmt).read(path, **opts), cached)
        return load_trace(cached)
    presets = _synthetic_presets()
    if presets is not None and text in presets:
        from ..synthetic import preset_trace

        return preset_trace(text)
    raise _not_found(text, presets)


def _not_found(text: str, presets) -> MoesimError:
    known = ", ".join(presets) if presets else "none (moesim.synthetic is not available)"
    return MoesimError(f"trace={text!r}: not found. trace= takes a {SUFFIX} file, a file or directory in a "
                       f"foreign format ({_formats_help()}), a shipped trace ({', '.join(SHIPPED)}), or a "
                       f"synthetic preset; presets: {known}")


def check_trace_name(value) -> None:
    """Refuse, as open_trace would, a `trace=` value that names nothing (without reading anything)."""
    text = str(value)
    presets = _synthetic_presets()
    if not (Path(text).exists() or text in SHIPPED or (presets is not None and text in presets)):
        raise _not_found(text, presets)


def _unpacked(src: Path, dst: Path, digest: str | None = None) -> Trace:
    """The .moetrace.safetensors.xz `src` unpacked to `dst` (once: a later call opens `dst`), streamed in
    bounded memory, at most UNPACK_MAX bytes, checked against `digest` (sha256) where given, written atomically."""
    import lzma

    if not dst.is_file():
        print(f"moesim: unpacking {src} once; cached as {dst}", file=sys.stderr)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".tmp-{os.getpid()}-{dst.name}")
        h, n = hashlib.sha256(), 0
        try:
            with open(src, "rb") as f, open(tmp, "wb") as out:
                d = lzma.LZMADecompressor(lzma.FORMAT_XZ)
                while not d.eof:
                    chunk = d.decompress(b"", 2**22) if not d.needs_input else d.decompress(f.read(2**20), 2**22)
                    if not chunk and d.needs_input and f.peek(1) == b"":
                        raise EOFError("the compressed data ends early")
                    n += len(chunk)
                    if n > UNPACK_MAX:
                        raise MoesimError(f"{src}: unpacks to more than {UNPACK_MAX / 2**30:.0f} GiB; refused")
                    h.update(chunk)
                    out.write(chunk)
            if digest is not None and h.hexdigest() != digest:
                raise MoesimError(f"{src}: unpacked, its sha256 is {h.hexdigest()}, not the shipped {digest}: the "
                                  f"file is damaged or changed (git checkout -- {src.name} restores it)")
            os.replace(tmp, dst)
        except (lzma.LZMAError, EOFError) as e:
            raise MoesimError(f"{src}: not a complete xz file ({e})") from None
        except OSError as e:
            raise MoesimError(f"{src}: cannot unpack to {dst} ({e.strerror})") from None
        finally:
            tmp.unlink(missing_ok=True)
    return load_trace(dst)


OPENED_MAX = 8  # traces open_trace_cached keeps (memory-mapped: little resident memory each)
_opened: dict[tuple, Trace] = {}  # (path or name, mtime_ns, size) -> Trace, oldest first


def open_trace_cached(value: str | os.PathLike) -> Trace:
    """`open_trace(value)`, read once per process while the file is unchanged: a calibration trace named by
    several policies of one run (a cache policy, a prefetcher, an offload policy; each partition) is read and
    validated once. Keyed by the absolute path with its mtime and size (or the preset name); keeps the
    `OPENED_MAX` most recently used."""
    text = str(value)
    path = Path(text)
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    except OSError:  # not a file: a synthetic preset name, or an error open_trace reports
        key = (text, None, None)
    trace = _opened.pop(key, None)
    if trace is None:
        trace = open_trace(text)
    _opened[key] = trace  # most recent last
    while len(_opened) > OPENED_MAX:
        del _opened[next(iter(_opened))]
    return trace


def _synthetic_presets():
    """The synthetic preset names, or None where moesim.synthetic does not exist (yet)."""
    if importlib.util.find_spec("moesim.synthetic") is None:
        return None
    from ..synthetic import PRESETS

    return PRESETS


def import_command(cfg) -> None:
    """`python -m moesim import src=PATH [out=FILE] [format=auto] [exclude_repetition=true] [jsonl.model=...]`:
    convert, write atomically (overwriting), print the path and a summary."""
    from omegaconf import OmegaConf

    src = Path(str(cfg.src))
    if not src.exists():
        raise MoesimError(f"src={src}: no such file or directory")
    fmt = str(cfg.format)
    jsonl_options = {k: v for k, v in OmegaConf.to_container(cfg.jsonl, resolve=True).items() if v is not None}
    if fmt == "auto":
        fmt = detect_format(src, **jsonl_options)
    if fmt == gpt_oss.IMPORTER:
        options = {"exclude_repetition": bool(cfg.exclude_repetition)}
    elif fmt == jsonl.IMPORTER:
        if cfg.exclude_repetition:
            raise MoesimError("exclude_repetition=true applies to format gpt-oss-fingerprint only")
        options = jsonl_options
    else:
        _module(fmt)  # raises: unknown format
    out = Path(str(cfg.out)) if cfg.get("out") else Path("traces") / f"{stem(src)}{SUFFIX}"
    if not out.name.endswith(SUFFIX):
        raise MoesimError(f"out={out}: expected a file name ending in {SUFFIX}")
    trace = import_trace(src, fmt, **options)
    save_trace(trace, out)
    print(f"{out}: {trace.describe()}")
