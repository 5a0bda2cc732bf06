"""Storage formats of weights: how many bytes a tensor of `rows` x `cols` weights takes in each format, from
the format's own definition (block size and bytes per block; the source of each is beside it).

    from moesim.formats import get_format
    get_format("mxfp4").tensor_bytes(2880, 2880)    # 8,812,800: 2880 rows of 90 blocks of 17 bytes
    python -m moesim run model.experts_format=q4_k model.attention_format=q8_0 ...

A format stores each row of `cols` weights as ceil(cols / block) blocks of `block_bytes` bytes; a row whose
length is not a multiple of the block is padded to whole blocks (as a scaled model's 360-wide rows are).
`bits` is the format's bits per weight (8 * block_bytes / block), scales included.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import MoesimError


@dataclass(frozen=True)
class Format:
    """One storage format: `block` weights take `block_bytes` bytes (values, scales and mins together)."""

    name: str
    block: int  # weights per block along a row
    block_bytes: int  # bytes of one block
    source: str  # where block and block_bytes come from
    torch_dtype: str | None = None  # the torch dtype that holds it unpacked, where torch has one

    @property
    def bits(self) -> float:
        """Bits per weight, scales included."""
        return 8 * self.block_bytes / self.block

    def row_bytes(self, cols: int) -> int:
        return math.ceil(cols / self.block) * self.block_bytes

    def tensor_bytes(self, rows: int, cols: int) -> int:
        """Bytes of a rows x cols weight matrix stored row by row (rows padded to whole blocks)."""
        return rows * self.row_bytes(cols)


FORMATS: dict[str, Format] = {f.name: f for f in [
    Format("fp32", 1, 4, "IEEE 754 binary32", "fp32"),
    Format("bf16", 1, 2, "bfloat16: 1 sign, 8 exponent, 7 mantissa bits", "bf16"),
    Format("fp16", 1, 2, "IEEE 754 binary16", "fp16"),
]}

ALIASES = {"bfloat16": "bf16", "float16": "fp16", "f16": "fp16", "half": "fp16", "float32": "fp32", "f32": "fp32",
           "float": "fp32"}


def get_format(name: str, where: str = "format") -> Format:
    """The Format called `name` (case-insensitive; bfloat16 = bf16 ...); refuses an unknown name, listing the
    known ones."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in FORMATS:
        raise MoesimError(f"{where}={name!r}: unknown storage format; known: {', '.join(FORMATS)}")
    return FORMATS[key]


def known_format(name: str) -> bool:
    key = str(name).strip().lower()
    return ALIASES.get(key, key) in FORMATS
