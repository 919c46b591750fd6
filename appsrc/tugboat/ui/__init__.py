"""The desktop app: Qt widgets that show state and emit user intent (no torch math here)."""

from ..jobs import _qt_compat  # noqa: F401  (guards a PySide6 6.12.0 emit bug before any emit)
