"""Packed expert weights of the torch backend: one expert is its gate, up and down matrices in their storage
format (moesim/formats.py), byte for byte as many as ModelSpec.bytes_per_expert counts; these bytes are what
a load copies, and compute decodes them into a weight of the compute dtype.

    from moesim.backends.torch.packed import ExpertCodec, fill_experts
    codec = ExpertCodec("mxfp4", hidden=360, ffn=360, dtype=torch.bfloat16)
    codec.nbytes                                     # 3 * 360 * 12 * 17 = 220,320 bytes per expert
    fill_experts([pool], codec, seed=0, bound=0.05)  # pool: uint8 [experts, nbytes], valid random experts
    w = codec.decode(pool[0], workspace)             # [3 * hidden * ffn]: gate rows, up rows, down (compute dtype)

Decodes, per tensor of `rows` x `cols` (each tensor's bytes as Format.tensor_bytes counts them):
  bf16/fp16/fp32  a view of the bytes (no copy where it is the compute dtype).
  q4_0 q4_1 q5_0 q5_1 q8_0 mxfp4
                  ggml's blocks, read as ggml-quants.c dequantize_row_* reads them (llama.cpp@01243c58): the
                  fp16 d (and m), qh, then nibbles (low nibbles are the block's first half) or int8; mxfp4's
                  E8M0 byte scales FP4 E2M1 values by 2^(e - 127) (OCP MX v1.0; gpt-oss's FP4_VALUES).
  fp8             the rows x cols float8 e4m3 bytes, then float32 scales [ceil(rows/128), ceil(cols/128)]
                  (DeepSeek-V3's weight_dequant: weight * scale of its 128 x 128 tile).
  hqq*            hqq's codes as its BitPack packs them, then the groups' fp16 scales, then zeros (the `_mo`
                  formats: 8-bit scales and zeros with their fp16 meta-scales); w = (q - zero) * scale, groups
                  over the flattened tensor as hqq's axis=1 makes them (the `_mo` formats: hqq@37502bea's
                  axis=0, codes [group * bits / 8, G]). Where hqq's reshape gives every (G/128)-th 8-bit scale
                  one meta-scale, moesim gives it to runs of 128 consecutive ones: the same bytes, moesim's
                  own arrangement of them.
  k-quants, iq*   moesim's own layout, NOT bit-compatible with GGUF: each block's first 2 bytes are an fp16
                  scale d, then codes of k bits (k the largest power of two the block's remaining bytes
                  allow: q4_k 4, q3_k and q2_k and iq2/iq3 2, iq1 1), then one uint8 sub-scale per run of
                  weights with whatever bytes are left: w = d * (1 + s / 256) * (code - (2^k - 1) / 2). Every
                  byte of the block is read; the bytes moved and the decode's work per byte are those of the
                  format, the values are not (the weights are random anyway).
Random experts (`fill_experts`) are made valid for their format: codes at random, scales chosen so that a
decoded weight lies within about [-bound, bound] (finite: no NaN fp8 codes, no E8M0 overflow).
"""
from __future__ import annotations

import math

import torch

from ...errors import MoesimError
from ...formats import Format, get_format
from .device import TORCH_DTYPES

MiB, GiB = 2**20, 2**30
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)  # FP4 codes 0..15
LEGACY = {  # ggml block layout: (offset of d, offset of m or None, offset of qh or None, offset of qs, bits)
    "q4_0": (0, None, None, 2, 4), "q4_1": (0, 2, None, 4, 4), "q5_0": (0, None, 2, 6, 5),
    "q5_1": (0, 2, 4, 8, 5), "q8_0": (0, None, None, 2, 8)}


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The bytes `t` (uint8, last dim contiguous) as `dtype`: a view where aligned, else a copy's view."""
    if t.is_contiguous() and t.storage_offset() % dtype.itemsize == 0:
        return t.view(dtype)
    return t.clone(memory_format=torch.contiguous_format).view(dtype)


_LUTS: dict = {}


def _lut(kind, device) -> torch.Tensor:
    """[256, m] float32: the m values one byte holds. kind "e2m1": its low and high nibble as FP4 E2M1;
    (k, "low"): its k-bit codes from the lowest bits up (ggml's order); (k, "high"): from the highest (hqq's)."""
    key = (kind, str(device))
    if key not in _LUTS:
        b = torch.arange(256)
        if kind == "e2m1":
            t = torch.tensor(E2M1)[torch.stack([b & 15, b >> 4], 1)]
        else:
            k, first = kind
            shifts = range(0, 8, k) if first == "low" else range(8 - k, -1, -k)
            t = torch.stack([(b >> s) & ((1 << k) - 1) for s in shifts], 1).float()
        _LUTS[key] = t.to(device)
    return _LUTS[key]


def _unpack(b: torch.Tensor, kind) -> torch.Tensor:
    """[..., n] bytes -> [..., m, n] float32: value i of every byte (one table lookup per byte)."""
    lut = _lut(kind, b.device)
    return torch.index_select(lut, 0, b.reshape(-1).int()).view(*b.shape, lut.shape[1]).transpose(-1, -2)


def _flat(v: torch.Tensor) -> torch.Tensor:
    """[..., m, n] -> [..., m * n]: a block's values in ggml's order (all bytes' first values, then second)."""
    return v.reshape(*v.shape[:-2], -1)


class TensorCodec:
    """One rows x cols weight matrix in format `fmt`: its bytes (`nbytes`), decode and random fill."""

    def __init__(self, fmt: Format, rows: int, cols: int):
        self.fmt, self.rows, self.cols = fmt, rows, cols
        self.nbytes = fmt.tensor_bytes(rows, cols)
        name = fmt.name
        if fmt.torch_dtype is not None:
            self.kind = "plain"
        elif name in LEGACY or name in ("mxfp4", "fp8"):
            self.kind = name
        elif fmt.flat:
            self.kind = "hqq"
            self._hqq_setup()
        else:  # k-quants and iq: moesim's generic block (module docstring)
            self.kind = "generic"
            rest = fmt.block_bytes - 2
            self.k = min(8, 1 << int(math.log2(8 * rest / fmt.block)))  # bits per code
            self.code_bytes = fmt.block * self.k // 8
            self.subs = rest - self.code_bytes  # sub-scales per block
            # weight i of a block uses sub-scale i * subs // block: subs runs of (nearly) equal length
            self._sub_index = {"cpu": torch.arange(fmt.block) * self.subs // fmt.block} if self.subs else None

    # ------------------------------------------------------------------------------------------ hqq
    def _hqq_setup(self) -> None:
        """hqq's sizes: bits, group, groups G, and the byte offset of each part (Format.flat's order)."""
        name, f = self.fmt.name, self.fmt
        self.nbits = int(name[3])  # hqq4_g64 -> 4
        self.group = int(name.split("_g")[1].split("_")[0])
        self.mo = name.endswith("_mo")
        n = self.rows * self.cols
        self.G = math.ceil(n / self.group)
        offs, at = [], 0
        for unit, size in f.flat:
            offs.append(at)
            at += math.ceil(n / unit) * size if unit else size
        self.offs = offs
        self.meta_group = f.flat[2][0] // self.group if self.mo else 0  # scales per fp16 meta-scale

    def _hqq_codes(self, src: torch.Tensor) -> torch.Tensor:
        """The [G, group] codes (axis=1) or [group, G] (the `_mo` formats' axis=0), as hqq's BitPack unpacks."""
        code = src[:self.offs[1]]
        g, G, b = self.group, self.G, self.nbits
        if b == 3 and self.mo:  # axis=0: [g, G] padded to 10 * ceil(g / 10) rows, 10 rows per int32 row
            words = _as(code, torch.int32).view(-1, G)
            return torch.cat([(words >> s) & 7 for s in range(27, -1, -3)], 0)[:g].float()
        if b == 3:  # int32 rows of 10 codes, 3 bits each, the first in bits 27..29
            words = _as(code, torch.int32).view(-1, g)
            return torch.cat([(words >> s) & 7 for s in range(27, -1, -3)], 0)[:G].float()
        # uint8 rows, each holding 8 / b rows of codes, the first in the top bits: stacked back
        rows = code.view(g * b // 8, G) if self.mo else code.view(-1, g)  # mo: hqq@37502bea axis=0
        v = _unpack(rows, (b, "high"))  # [rows, 8 / b, width]
        v = v.transpose(0, 1).reshape(-1, v.shape[-1])
        return v if self.mo else v[:G]

    def _hqq_meta(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each group's scale and zero, float32 [G]."""
        G, o = self.G, self.offs
        if not self.mo:
            meta = _as(src[o[1]:o[1] + 4 * G], torch.float16).float()
            return meta[:G], meta[G:]
        m = self.meta_group
        mg = math.ceil(G / m)
        ms = _as(src[o[2]:o[2] + 4 * mg], torch.float16).float()  # meta-scales' scale, then zero
        sq = src[o[1]:o[1] + G].float()
        scale = (sq - ms[mg:].repeat_interleave(m)[:G]) * ms[:mg].repeat_interleave(m)[:G]
        z = _as(src[o[4]:o[4] + 4], torch.float16).float()  # the zeros' scale and zero, one per tensor
        zero = (src[o[3]:o[3] + G].float() - z[1]) * z[0]
        return scale, zero

    # --------------------------------------------------------------------------------------- decode
    def decode(self, src: torch.Tensor, out: torch.Tensor) -> None:
        """Decode this tensor's bytes `src` (uint8 [nbytes]) into `out` [rows, cols] (any float dtype)."""
        r, c, f, kind = self.rows, self.cols, self.fmt, self.kind
        if kind == "plain":
            out.copy_(_as(src, TORCH_DTYPES[f.torch_dtype]).view(r, c))
            return
        if kind == "fp8":
            v = src[:r * c].view(torch.float8_e4m3fn).view(r, c).float()
            s = _as(src[r * c:], torch.float32).view(math.ceil(r / f.tile), math.ceil(c / f.tile))
            s = s.repeat_interleave(f.tile, 0)[:r].repeat_interleave(f.tile, 1)[:, :c]
            out.copy_(v * s)
            return
        if kind == "hqq":
            q = self._hqq_codes(src)
            scale, zero = self._hqq_meta(src)
            if self.mo:  # [group, G]: group j is column j
                w = (q - zero[None, :]) * scale[None, :]
            else:
                w = (q - zero[:, None]) * scale[:, None]
            out.copy_(w.reshape(-1)[:r * c].view(r, c))
            return
        nb = math.ceil(c / f.block)
        blocks = src.view(r, nb, f.block_bytes)
        if kind == "mxfp4":  # E2M1 values times 2^(e - 127)
            w = _flat(_unpack(blocks[..., 1:17], "e2m1")) * torch.exp2(blocks[..., :1].float() - 127)
        elif kind == "generic":
            d = _as(blocks[..., :2], torch.float16).float()  # [r, nb, 1]
            q = blocks[..., 2:2 + self.code_bytes]
            q = (q.float() if self.k == 8 else _flat(_unpack(q, (self.k, "low")))) - ((1 << self.k) - 1) / 2
            if self.subs:
                at = str(src.device)  # the index on this device, made once (host and device experts both decode)
                if at not in self._sub_index:
                    self._sub_index[at] = self._sub_index["cpu"].to(src.device)
                s = blocks[..., 2 + self.code_bytes:][..., self._sub_index[at]].float()
                w = d * (1 + s / 256) * q
            else:
                w = d * q
        else:  # legacy ggml blocks
            od, om, oh, oq, bits = LEGACY[kind]
            d = _as(blocks[..., od:od + 2], torch.float16).float()
            if bits == 8:
                q = blocks[..., oq:oq + 32].view(torch.int8).float()
            else:
                q = _flat(_unpack(blocks[..., oq:oq + 16], (4, "low")))  # low nibbles, then high
                if bits == 5:  # qh: bit i (byte i // 8, bit i % 8) is the 5th bit of weight i
                    hi = _unpack(blocks[..., oh:oh + 4], (1, "low"))  # [.., bit, byte]
                    q = q + 16 * hi.transpose(-1, -2).reshape(q.shape)
            if om is not None:
                w = q * d + _as(blocks[..., om:om + 2], torch.float16).float()
            else:
                w = (q - (1 << (bits - 1))) * d if bits < 8 else q * d
        out.copy_(w.reshape(r, nb * f.block)[:, :c])

    # ------------------------------------------------------------------------------------- random
    def random(self, n: int, gen: torch.Generator, bound: float, device) -> torch.Tensor:
        """n tensors of valid random bytes, uint8 [n, nbytes], decoding to weights within about +-bound."""
        f, kind = self.fmt, self.kind
        if kind == "plain":
            vals = torch.empty((n, self.rows * self.cols), dtype=TORCH_DTYPES[f.torch_dtype], device=device)
            return vals.uniform_(-bound, bound, generator=gen).view(torch.uint8)
        b = torch.randint(0, 256, (n, self.nbytes), dtype=torch.uint8, device=device, generator=gen)
        if kind == "fp8":
            v = b[:, :self.rows * self.cols]
            v[(v & 0x7F) == 0x7F] -= 1  # S.1111.111 is e4m3's NaN: the largest finite (448) instead
            scales = b[:, self.rows * self.cols:].view(n, -1, 4)
            scales.copy_(torch.tensor([bound / 448], dtype=torch.float32).view(torch.uint8).to(device))
            return b
        if kind == "hqq":
            self._hqq_random(b, bound, device)
            return b
        blocks = b.view(n, -1, f.block_bytes)
        if kind == "mxfp4":  # the largest E2M1 value is 6: 6 * 2^(e - 127) <= bound
            blocks[..., 0] = 127 + math.floor(math.log2(bound / 6))
            return b
        if kind == "generic":
            # |code - mid| <= (2^k - 1) / 2, times a sub-scale factor below 2 where there are sub-scales
            _fp16(blocks[..., :2], bound / ((1 << self.k) - 1) * (1 if self.subs else 2), device)
            return b
        od, om, _oh, _oq, bits = LEGACY[kind]
        top = (1 << bits) - 1
        if om is None:  # (q - 2^(bits-1)) * d, or int8 * d
            _fp16(blocks[..., od:od + 2], bound / (1 << (bits - 1)) if bits < 8 else bound / 127, device)
        else:  # q * d + m over [-bound, bound]
            _fp16(blocks[..., od:od + 2], 2 * bound / top, device)
            _fp16(blocks[..., om:om + 2], -bound, device)
        return b

    def _hqq_random(self, b: torch.Tensor, bound: float, device) -> None:
        """Scales and zeros (or their 8-bit codes and meta-scales) for weights within about +-bound."""
        o, G, top = self.offs, self.G, (1 << self.nbits) - 1
        if not self.mo:
            _fp16(b[:, o[1]:o[1] + 2 * G], 2 * bound / top, device)  # scale, fp16 [G]
            _fp16(b[:, o[1] + 2 * G:o[1] + 4 * G], top / 2, device)  # zero: the middle code
            return
        mg = math.ceil(G / self.meta_group)
        # scale = (code - (-255)) * ms: codes 0..255 give 0.5..1 times the scale that spans [-bound, bound]
        _fp16(b[:, o[2]:o[2] + 2 * mg], 2 * bound / top / 510, device)
        _fp16(b[:, o[2] + 2 * mg:o[2] + 4 * mg], -255.0, device)
        # zero = (code + 127.5) * top / 510: top / 4 .. 3 top / 4, so |q - zero| <= 3 top / 4
        _fp16(b[:, o[4]:o[4] + 2], top / 510, device)
        _fp16(b[:, o[4] + 2:o[4] + 4], -127.5, device)


def _fp16(dst: torch.Tensor, value: float, device) -> None:
    """Write fp16 `value` into every 2-byte field of uint8 `dst` [..., 2k]."""
    two = torch.tensor([value], dtype=torch.float16).view(torch.uint8).to(device)  # 2 bytes, little-endian
    dst.copy_(two.repeat(dst.shape[-1] // 2).expand(dst.shape))


class ExpertCodec:
    """One expert (gate [ffn, hidden], up [ffn, hidden], down [hidden, ffn]) in format `fmt`: `nbytes` packed
    bytes (gate's, up's, then down's), decoded into `dtype` weights laid out as ffn.py's expert_ffn reads."""

    def __init__(self, fmt: str, hidden: int, ffn: int, dtype: torch.dtype):
        self.fmt = get_format(fmt)
        self.hidden, self.ffn, self.dtype = hidden, ffn, dtype
        self.parts = [TensorCodec(self.fmt, ffn, hidden), TensorCodec(self.fmt, ffn, hidden),
                      TensorCodec(self.fmt, hidden, ffn)]
        self.offsets = [0, self.parts[0].nbytes, 2 * self.parts[0].nbytes]
        self.nbytes = sum(p.nbytes for p in self.parts)
        self.width = 3 * hidden * ffn  # decoded values
        # the stored bytes are the compute weights themselves: decode is a view
        self.view_only = self.fmt.torch_dtype is not None and TORCH_DTYPES[self.fmt.torch_dtype] == dtype

    def decode(self, block: torch.Tensor, workspace: torch.Tensor | None) -> torch.Tensor:
        """The expert's weights [width] in `dtype` from its bytes `block` (uint8 [nbytes]): a view of `block`
        where the format is the compute dtype, else decoded into `workspace` ([>= width], returned sliced)."""
        if self.view_only:
            return _as(block, self.dtype)
        w, hf = workspace[:self.width], self.hidden * self.ffn
        for i, (part, at) in enumerate(zip(self.parts, self.offsets)):
            part.decode(block[at:at + part.nbytes], w[i * hf:(i + 1) * hf].view(part.rows, part.cols))
        return w

    def random(self, n: int, gen: torch.Generator, bound: float, device) -> torch.Tensor:
        """n random experts, uint8 [n, nbytes] (each tensor's bytes valid for the format)."""
        return torch.cat([p.random(n, gen, bound, device) for p in self.parts], dim=1)


def fill_experts(pools: list, codec: ExpertCodec, seed: int, bound: float, desc: str | None = None,
                 via: torch.device | None = None) -> None:
    """Fill every uint8 [rows, nbytes] tensor of `pools` with random experts (fixed `seed`), about 256 MiB at a
    time (a progress bar on a terminal for more than 1 GiB). `via` a CUDA device: drawn there and copied in
    (a host pool of tens of GiB fills in seconds, not minutes)."""
    src = via if via is not None and via.type == "cuda" else torch.device("cpu")
    if pools and pools[0].device.type != "cpu":
        src = pools[0].device
    gen = torch.Generator(device=src).manual_seed(seed)
    total = sum(p.shape[0] for p in pools)
    chunk = max(1, (256 * MiB) // max(1, codec.nbytes))
    bar = None
    if desc and total * codec.nbytes > GiB:
        from ...progress import progress

        bar = progress(total=total, unit="expert", desc=desc)
    for pool in pools:
        if pool.shape[1] != codec.nbytes:
            raise MoesimError(f"internal: a pool of {pool.shape[1]}-byte rows for {codec.nbytes}-byte experts")
        for lo in range(0, pool.shape[0], chunk):
            part = pool[lo:lo + chunk]
            part.copy_(codec.random(part.shape[0], gen, bound, src))
            if bar is not None:
                bar.update(part.shape[0])
    if bar is not None:
        bar.close()
