"""The results store: the one source of truth for variants in the GUI.

A plain evented model (ndv's ``models/``, napari's ``EventedModel``): the chart, the results table
and the details view subscribe to its signals and keep no copies. It is changed only on the GUI
thread (jobs hand results over through signals). Entries are engine :class:`Variant` objects; the
baseline is the variant named ``"baseline"``.

What is on record is the engine's :class:`~tugboat.engine.workspace.Workspace` (the folder the CLI
writes too); the store is its evented face in the window. A sweep writes the workspace first and its
variants reach the store as each one finishes; a single run reaches the store first and is then
written to the workspace (``workspace_io.WorkspaceKeeper.autosave``).
"""

from __future__ import annotations

from PySide6.QtCore import QObject, Signal

from ..engine.recipe import Variant
from ..engine.report_json import pareto_front

BASELINE = "baseline"


class VariantStore(QObject):
    variant_added = Signal(str)  # name
    variant_changed = Signal(str)  # name (metrics, status or warnings changed)
    variant_removed = Signal(str)  # name
    selection_changed = Signal(object)  # name or None
    cleared = Signal()

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._variants: dict[str, Variant] = {}
        self._selected: str | None = None

    # --- reading ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._variants)

    def __contains__(self, name: object) -> bool:
        return name in self._variants

    def names(self) -> list[str]:
        return list(self._variants)

    def get(self, name: str) -> Variant | None:
        return self._variants.get(name)

    def variants(self) -> list[Variant]:
        return list(self._variants.values())

    @property
    def baseline(self) -> Variant | None:
        return self._variants.get(BASELINE)

    @property
    def selected(self) -> str | None:
        return self._selected

    def pareto(self) -> list[str]:
        """Names of the non-dominated finished variants (size, latency, quality)."""
        return pareto_front([(v.name, v.metrics) for v in self._variants.values()
                             if v.status == "ok" and v.metrics])

    def unique_name(self, base: str) -> str:
        if base not in self._variants:
            return base
        i = 2
        while f"{base} ({i})" in self._variants:
            i += 1
        return f"{base} ({i})"

    # --- writing (GUI thread only) -----------------------------------------------------------
    def add(self, variant: Variant) -> str:
        """Add a variant (renamed if the name is taken); returns its name."""
        variant.name = self.unique_name(variant.name)
        self._variants[variant.name] = variant
        self.variant_added.emit(variant.name)
        return variant.name

    def set_baseline(self, variant: Variant) -> None:
        variant.name = BASELINE
        existed = BASELINE in self._variants
        self._variants[BASELINE] = variant
        (self.variant_changed if existed else self.variant_added).emit(BASELINE)

    def update(self, variant: Variant) -> None:
        self._variants[variant.name] = variant
        self.variant_changed.emit(variant.name)

    def remove(self, name: str) -> None:
        if self._variants.pop(name, None) is not None:
            if self._selected == name:
                self.select(None)
            self.variant_removed.emit(name)

    def clear(self) -> None:
        self._variants.clear()
        self._selected = None
        self.cleared.emit()
        self.selection_changed.emit(None)

    def select(self, name: str | None) -> None:
        if name is not None and name not in self._variants:
            name = None
        if name != self._selected:
            self._selected = name
            self.selection_changed.emit(name)
