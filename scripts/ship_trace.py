"""Make the real trace moesim ships, traces/gpt-oss-20b.moetrace.safetensors.xz, from the original files.

    python scripts/ship_trace.py SRC_DIR [OUT]

SRC_DIR holds the gpt-oss-20b routing files of AmanPriyanshu/GPT-OSS-MoE-ExpertFingerprinting at commit
72b368f6 (`data/<dataset>/<subject>/<A>_<B>_examples.json`, plain or .xz; Apache-2.0), as traces/README.md
describes. The trace is moesim's own format (moesim/trace.py) compressed with xz; its source metadata names the
origin instead of the local folder. Prints the sha256 of the unpacked trace, which moesim.importers.SHIPPED
checks on every unpack. Takes about a minute on one core.
"""
from __future__ import annotations

import dataclasses
import hashlib
import lzma
import sys
import tempfile
from pathlib import Path

from moesim.importers import open_trace
from moesim.trace import SUFFIX, save_trace

ORIGIN = "AmanPriyanshu/GPT-OSS-MoE-ExpertFingerprinting@72b368f6"


def main(src: str, out: str = "traces/gpt-oss-20b" + SUFFIX + ".xz") -> None:
    with tempfile.TemporaryDirectory() as tmp:
        trace = open_trace(src, cache_dir=Path(tmp))
        source = dict(trace.source, root=f"{ORIGIN} (files under data/)")
        path = save_trace(dataclasses.replace(trace, source=source), Path(tmp) / ("shipped" + SUFFIX))
        raw = path.read_bytes()
    Path(out).write_bytes(lzma.compress(raw, preset=6))
    print(f"{out}: {Path(out).stat().st_size:,} bytes; unpacked {len(raw):,} bytes, "
          f"sha256 {hashlib.sha256(raw).hexdigest()}; {trace.n_tokens:,} tokens in {trace.n_seqs} sequences")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    main(*sys.argv[1:])
