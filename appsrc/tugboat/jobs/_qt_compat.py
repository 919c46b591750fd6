"""A guard against a PySide6 6.12.0 reference-counting bug on CPython 3.11.

In PySide6 6.12.0 every C++ method returning ``void`` hands back ``None`` without taking a
reference, and ``SignalInstance.emit()`` does the same with ``True``. Each call drops one reference
to the singleton, and after a few hundred calls CPython 3.11 aborts with "Fatal Python error:
none_dealloc" / "bool_dealloc" (3.12+ singletons are immortal; PySide6 6.11.2 does not leak: pin
``PySide6-Essentials<6.12`` for 3.11). The check below measures the leak once and, only if it is
there, gives ``None``/``True``/``False`` so many references that they cannot reach zero.
"""

from __future__ import annotations

import ctypes
import sys

_applied = False


def leaks() -> bool:
    """True if void methods or ``emit`` drop references to the singletons in this PySide6."""
    from PySide6.QtCore import QObject, Signal

    class _Probe(QObject):
        ping = Signal()

    probe = _Probe()
    none_before, true_before = sys.getrefcount(None), sys.getrefcount(True)
    for _ in range(8):
        probe.setObjectName("probe")
        probe.ping.emit()
    return (sys.getrefcount(None) < none_before - 4) or (sys.getrefcount(True) < true_before - 4)


def apply() -> bool:
    """Make the singletons effectively immortal if this PySide6 leaks them; True if applied."""
    global _applied
    if _applied:
        return True
    if sys.version_info >= (3, 12) or sys.implementation.name != "cpython":
        return False
    if not leaks():
        return False
    for obj in (None, True, False):
        ctypes.c_ssize_t.from_address(id(obj)).value += 1 << 40
    _applied = True
    return True


apply()
