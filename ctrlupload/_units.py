"""Sizes and rates as people read them: 1024-based units, labelled KiB, MiB and GiB."""

from __future__ import annotations

__all__ = ["format_rate", "format_size"]

_UNITS = (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024))


def format_size(size: int | float) -> str:
    """``512 bytes``, ``12.3 KiB``, ``200.0 MiB``, ``5.0 GiB``: never ``0.0 MiB``."""
    for unit, scale in _UNITS:
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    count = int(size)
    return f"{count} byte" if count == 1 else f"{count} bytes"


def format_rate(size: int, seconds: float) -> str:
    """``45.3 MiB/s``; sizes sent in no measurable time give ``-``."""
    if seconds <= 0:
        return "-"
    return f"{size / seconds / 1024**2:.1f} MiB/s"
