"""Units of a run's sizes, parsed once for every caller: budgets (`192`, `25%`, `4GiB`) and caps on queued
copies (`256MiB`, `4 experts`). The engine, the compiled core and the policies all import from here.

    parse_budget("25%", spec, "per_layer").slots      # 192 for gpt-oss-20b (8 of 32 per layer)
    parse_inflight("4 experts", bytes_per_expert, "prefetch.max_inflight")
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import MoesimError
from .trace import ModelSpec

SCOPES = ("per_layer", "global")
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass(frozen=True)
class Budget:
    """Device memory for routed experts, resolved to slots."""

    slots: int  # slots actually usable (per_layer: layers * per_layer_slots)
    requested: str  # what the user asked for, as written
    bytes: int  # slots * bytes per expert
    per_layer_slots: int | None  # per_layer scope: each layer's share

    def to_dict(self) -> dict:
        return {"slots": self.slots, "bytes": self.bytes, "requested": self.requested,
                "per_layer_slots": self.per_layer_slots}


def budget_value(value) -> tuple[float, str]:
    """(number, lower-case unit: "", "%" or a byte unit) of a budget as written, or a MoesimError naming what is
    wrong with it: what can be checked before the trace (and so the model) is known."""
    text = str(value).strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-zA-Z%]*)", text)
    if not m:
        raise MoesimError(f"budget={text!r}: expected a number of slots (192), a share (25%) or bytes (4GiB, 500MiB)")
    num, unit = float(m.group(1)), m.group(2).lower()
    if unit == "" and num != int(num):
        raise MoesimError(f"budget={text!r}: a number of slots must be whole")
    if unit == "%" and not 0 < num <= 100:
        raise MoesimError(f"budget={text!r}: a share must be in (0%, 100%]")
    if unit not in ("", "%") and unit not in _UNITS:
        raise MoesimError(f"budget={text!r}: unknown unit {m.group(2)!r}; use %, B, KiB, MiB, GiB, TiB, KB, MB, GB, TB")
    return num, unit


def parse_budget(value, spec: ModelSpec, scope: str) -> Budget:
    """`192` slots, `25%` of all routed experts, or bytes (`4GiB`, `500MiB`, `1.5GB`) -> Budget.

    Refuses, with the numbers, a budget that cannot hold one layer's top-k (per layer or in the pool)."""
    if scope not in SCOPES:
        raise MoesimError(f"scope={scope!r}: expected one of {', '.join(SCOPES)}")
    text = str(value).strip()
    total = spec.total_experts
    num, unit = budget_value(text)
    if unit == "":
        slots = int(num)
    elif unit == "%":
        slots = round(total * num / 100)
    else:
        slots = int(num * _UNITS[unit] // spec.bytes_per_expert)
    slots = min(slots, total)  # more slots than experts holds everything; the extra would stay empty
    per_layer = None
    if scope == "per_layer":
        per_layer = slots // spec.layers
        if per_layer < spec.top_k:
            raise MoesimError(
                f"budget={text!r} gives {slots} slots = {per_layer} per layer over {spec.layers} layers, "
                f"but each layer needs at least top-k = {spec.top_k} ({spec.top_k * spec.layers} slots, "
                f"{spec.top_k * spec.layers * spec.bytes_per_expert / 2**30:.2f} GiB for {spec.name})")
        slots = per_layer * spec.layers
    elif slots < spec.top_k:
        raise MoesimError(f"budget={text!r} gives {slots} slots, but one layer needs top-k = {spec.top_k} "
                          f"({spec.top_k * spec.bytes_per_expert / 2**20:.0f} MiB for {spec.name})")
    return Budget(slots, text, slots * spec.bytes_per_expert, per_layer)


def parse_inflight(value, bytes_per_expert: int, where: str) -> int | None:
    """A cap on bytes of queued copies: None (no cap), bytes (1000000), a size with a unit (`256MiB`,
    `1.5GB`) or a number of expert copies (`4 experts`)."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise MoesimError(f"{where}={value}: expected bytes >= 0")
        return value
    number, unit = _number_unit(value)
    if unit in ("expert", "experts"):
        return int(number * bytes_per_expert)
    if unit is None or unit not in _UNITS | {"": 1}:
        raise MoesimError(f"{where}={value!r}: expected null, bytes (1000000), a size with a unit (256MiB, "
                          f"1.5GB; units B, KiB, MiB, GiB, TiB, KB, MB, GB, TB) or expert copies (4 experts)")
    return int(number * _UNITS.get(unit, 1))


def _number_unit(value) -> tuple[float, str | None]:
    """(number, lower-case unit) of `512MiB`, `4 experts`, `1000000`; unit None where it is not that shape."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-zA-Z]*)", str(value).strip())
    return (float(m.group(1)), m.group(2).lower()) if m else (0.0, None)


def parse_bytes(value, where: str) -> int:
    """A size: bytes (1000000) or a number with a unit (512MiB, 1.5GB)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    number, unit = _number_unit(value)
    if unit is None or unit not in _UNITS | {"": 1}:
        raise MoesimError(f"{where}={value!r}: expected bytes (1000000) or a size with a unit (512MiB, 1.5GB; units "
                          f"B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)")
    return int(number * _UNITS.get(unit, 1))
