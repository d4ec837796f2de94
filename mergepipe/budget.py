"""Budgets: a share of the expert bytes (`20%`) or a size (`3GiB`, `500MB`), in bytes."""

from __future__ import annotations

import re

from .errors import MergepipeError

UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_budget(spec: str, total: int) -> int:
    """'20%' of `total` expert bytes, or an absolute size such as '3GiB' or '500MB'."""
    s = str(spec).strip().lower()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(%|[kmgt]?i?b?)", s)
    if not m:
        raise MergepipeError(f"budget {spec!r} is not a percentage (e.g. 20%) or a size (e.g. 3GiB, 500MB)")
    value, unit = float(m.group(1)), m.group(2)
    if unit == "":  # a bare number is a classic slip for a percentage: never read it as bytes
        raise MergepipeError(f"budget {spec!r} has no unit: give a percentage of the expert bytes ({spec}%) or a "
                             f"size ({spec}GiB, {spec}MB, {spec}B)")
    if unit == "%":
        if value > 100:
            raise MergepipeError(f"budget {spec!r} is over 100% of the expert bytes")
        return int(total * value / 100)
    if unit not in UNITS:
        raise MergepipeError(f"budget {spec!r}: unknown unit {unit!r} (use B, KB, MB, GB, KiB, MiB, GiB)")
    return int(value * UNITS[unit])
