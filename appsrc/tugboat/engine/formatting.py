"""Numbers as short text for people (bytes, counts, seconds, milliseconds) and "did you mean" hints.

The one place these are written: the CLI tables, the HTML report, the engine's messages and the
widgets all use it, so "1.5 MB" or "2.30M" reads the same everywhere. Pure Python (no torch, no Qt).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["did_you_mean", "fmt_bytes", "fmt_count", "fmt_ms", "fmt_seconds"]


def fmt_seconds(s: float) -> str:
    """A duration: ``42s``, ``3m05s``."""
    s = round(s)
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def fmt_bytes(n: float | None) -> str:
    """A size in binary units: ``512 B``, ``1.5 KB``, ``3.2 MB``, ``1.0 GB`` (``-`` when unknown)."""
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover - the loop returns at GB


def fmt_ms(x: float | None) -> str:
    """Milliseconds with three places (``-`` when unknown)."""
    return "-" if x is None else f"{x:.3f}"


def fmt_count(n: float | None, significant: int | None = None) -> str:
    """A count with a k/M/G suffix: ``950``, ``12.3k``, ``1.25M`` (``-`` when unknown).

    ``significant`` gives that many significant digits instead (``1.23M``, ``-4.5k``), for
    narrow table cells."""
    if n is None:
        return "-"
    if significant is not None:
        for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
            if abs(n) >= div:
                return f"{n / div:.{significant}g}{unit}"
        return f"{n:.{significant}g}"
    if n >= 1e9:
        return f"{n / 1e9:.2f}G"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k"
    return str(n)


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``options``, or ``""`` when none is close."""
    close = difflib.get_close_matches(str(word), [o for o in options if o], n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""
