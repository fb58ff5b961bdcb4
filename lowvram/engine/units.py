"""Byte sizes as we print them. Sizes are parsed by pydantic's `ByteSize` in the settings."""

from __future__ import annotations

GiB = 1024**3
MiB = 1024**2


def gib(n_bytes: float) -> str:
    """Format bytes as GiB with two decimals, the unit nvidia-smi and vLLM logs use."""
    return f"{n_bytes / GiB:.2f} GiB"
