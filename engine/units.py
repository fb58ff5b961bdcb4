"""Byte sizes as people write them ("6GiB", "24 GB", "512M") and as we print them."""

from __future__ import annotations

import re

GiB = 1024**3
MiB = 1024**2

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": MiB,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": GiB,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int | float) -> int:
    """Parse "6GiB", "6 GB", "6g", "6442450944" into bytes.

    A bare "G" or "M" is taken as decimal (as vLLM's own flags do); write "GiB" for binary.
    """
    if isinstance(text, (int, float)):
        return int(text)
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"not a size: {text!r} (write for example 6GiB, 8GB or 512MiB)")
    return int(float(match.group(1)) * _UNITS[unit])


def gib(n_bytes: float) -> str:
    """Format bytes as GiB with two decimals, the unit nvidia-smi and vLLM logs use."""
    return f"{n_bytes / GiB:.2f} GiB"
