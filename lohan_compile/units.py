"""Byte counts: parsing what users write (``"6GiB"``, ``"512MB"``) and writing them back. Graph-free."""

from __future__ import annotations

import math
import re
from typing import Any

KiB = 2**10
MiB = 2**20
GiB = 2**30

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")
_SIZE_HELP = (
    "a number of bytes (int) or a string such as '6GiB', '512MB', '1.5 GB' or '4096' "
    "(units: B, KB, MB, GB, TB in powers of 1000; KiB, MiB, GiB, TiB in powers of 1024)"
)


def parse_bytes(value: Any, *, name: str = "size") -> int:
    """Parse a byte count: an int, or a string with a decimal or binary unit."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{name}={value!r}: expected {_SIZE_HELP}")
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE_RE.match(value)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            hint = ""
            if m is not None and unit in ("k", "m", "g", "t"):
                hint = f" ('{m.group(2)}' is ambiguous: write '{m.group(2)}iB' or '{m.group(2)}B')"
            raise ValueError(f"{name}={value!r}: expected {_SIZE_HELP}{hint}")
        n = math.floor(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ValueError(f"{name}={value!r}: must be a positive number of bytes")
    return n


def format_bytes(n: int | float | None) -> str:
    """Human-readable binary size, for messages and tables."""
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
