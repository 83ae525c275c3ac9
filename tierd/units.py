"""Byte sizes as people write them: ``"8GiB"``, ``"512 MiB"``, ``"1.5G"``, ``4096``."""

from __future__ import annotations

import re

__all__ = ["parse_size", "format_size"]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10, "kb": 1000, "kib": 1 << 10,
    "m": 1 << 20, "mb": 1000**2, "mib": 1 << 20,
    "g": 1 << 30, "gb": 1000**3, "gib": 1 << 30,
    "t": 1 << 40, "tb": 1000**4, "tib": 1 << 40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | float | str) -> int:
    """Return ``value`` in bytes.

    Raises:
        ValueError: the value is negative, not a number, or has an unknown unit.
    """
    if isinstance(value, bool):
        raise ValueError(f"a size must be a number of bytes or a string like '8GiB', got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"a size must be >= 0, got {value!r}")
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"a size must be a number of bytes or a string like '8GiB', got {type(value).__name__}")
    match = _SIZE_RE.match(value)
    if match is None:
        raise ValueError(f"a size must look like '8GiB', '512MiB' or '4096', got {value!r}")
    number, unit = match.groups()
    factor = _UNITS.get(unit.lower())
    if factor is None:
        raise ValueError(f"unknown size unit {unit!r} in {value!r}; use B, KiB, MiB, GiB or TiB")
    return int(float(number) * factor)


def format_size(n: float) -> str:
    """``format_size(3 << 30) == '3.0 GiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
