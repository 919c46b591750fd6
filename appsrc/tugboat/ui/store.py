"""The results store: the window's observable face of the engine's :class:`Workspace`.

The :class:`~tugboat.engine.running.workspace.Workspace` (the folder the CLI writes too) is the one
collection of record; this adapter keeps no variants of its own. It reads through to the workspace
it is attached to and emits Qt signals when that workspace gains, updates or loses a variant, so the
chart, the results table and the details view subscribe to one model and keep no copies (ndv's
``models/``, napari's ``EventedModel``). It is changed only on the GUI thread.

Before a workspace folder is open (a model just loaded) it is attached to an unsaved, in-memory
workspace (:meth:`Workspace.unsaved`), whose contents move into the first folder the window makes
(:meth:`adopt`). Results arrive workspace-first: a single run is added to the workspace (its index
written) and then announced; a sweep's worker adds its variants to the workspace itself and the
adapter announces each one as it reaches the GUI thread (:meth:`announce`).

What the window keeps in memory beside the record is each variant's model (for Diagnose, Layers,
Continue from): the workspace drops a sweep variant's model once its ONNX file is written, so the
adapter keeps the handle and puts it back on the workspace's entry when the entry is read.
"""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import QObject, Signal

from ..engine.running.report_json import pareto_front
from ..engine.running.variants import Variant
from ..engine.running.workspace import BASELINE, Workspace


class VariantStore(QObject):
    variant_added = Signal(str)  # name
    variant_changed = Signal(str)  # name (metrics, status or warnings changed)
    variant_removed = Signal(str)  # name
    selection_changed = Signal(object)  # name or None
    cleared = Signal()  # attached to another workspace (or a fresh one): read everything again

    def __init__(self, parent: QObject | None = None, workspace: Workspace | None = None) -> None:
        super().__init__(parent)
        self._ws = workspace if workspace is not None else Workspace.unsaved()
        self._models: dict[str, Any] = {}  # name -> model handle kept in memory
        self._hidden: set[str] = set()  # deleted while a sweep writes the workspace (removed after)
        self._selected: str | None = None

    # --- the workspace ----------------------------------------------------------------------
    @property
    def workspace(self) -> Workspace:
        return self._ws

    def attach(self, ws: Workspace | None) -> None:
        """Show ``ws`` (an unsaved one if None): the views read everything again."""
        self._ws = ws if ws is not None else Workspace.unsaved()
        self._models.clear()
        self._hidden.clear()
        self._selected = None
        self.cleared.emit()
        self.selection_changed.emit(None)

    def start(self, baseline: Variant) -> None:
        """A fresh unsaved workspace holding only ``baseline`` (a model loaded, no folder yet)."""
        self.attach(None)
        self.set_baseline(baseline)

    def adopt(self, ws: Workspace) -> None:
        """Move what is shown (the same objects, models kept) into ``ws`` and go on with it; the
        caller writes their files. Nothing changes on screen."""
        old = self._ws
        if old.baseline is not None:
            ws.set_baseline(old.baseline, write=False)
        for v in old.variants():
            if v.name not in self._hidden:
                ws.add_variant(v, write=False)
        self._ws = ws

    # --- reading ---------------------------------------------------------------------------
    def names(self) -> list[str]:
        first = [BASELINE] if self._ws.baseline is not None else []
        return first + [n for n in self._ws.names() if n not in self._hidden]

    def __len__(self) -> int:
        return len(self.names())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name not in self._hidden and self._ws.get(name) is not None

    def get(self, name: str) -> Variant | None:
        v = None if name in self._hidden else self._ws.get(name)
        if v is not None and v.handle is None and name in self._models:
            v.handle = self._models[name]
        return v

    def variants(self) -> list[Variant]:
        return [v for v in map(self.get, self.names()) if v is not None]

    @property
    def baseline(self) -> Variant | None:
        return self.get(BASELINE)

    @property
    def selected(self) -> str | None:
        return self._selected

    def pareto(self) -> list[str]:
        """Names of the non-dominated finished variants (size, latency, quality)."""
        return pareto_front([(v.name, v.metrics) for v in self.variants() if v.status == "ok" and v.metrics])

    def unique_name(self, base: str) -> str:
        return self._ws.unique_name(base)

    def hidden(self) -> list[str]:
        return sorted(self._hidden)

    # --- writing (GUI thread only) -----------------------------------------------------------
    def add(self, variant: Variant) -> str:
        """Add a variant to the workspace (renamed if the name is taken; its index written), then
        announce it; returns its name. An index that cannot be written raises after the announce.
        The workspace's own entry (added by a worker) is only announced."""
        if self._ws.get(variant.name) is variant:
            self.announce(variant)
            return variant.name
        try:
            return self._ws.add_variant(variant, write=False)
        finally:
            if self._ws.get(variant.name) is variant:
                self._keep(variant)
                self.variant_added.emit(variant.name)

    def announce(self, variant: Variant) -> bool:
        """A variant a worker already added to the workspace: keep its model, show it. ``variant``
        may be a copy of the entry (its model still set); one the workspace does not hold is ignored."""
        if self._ws.get(variant.name) is None or variant.name in self._hidden:
            return False
        self._keep(variant)
        self.variant_added.emit(variant.name)
        return True

    def set_baseline(self, variant: Variant) -> None:
        existed = self._ws.baseline is not None
        try:
            self._ws.set_baseline(variant, write=False)
        finally:
            self._keep(variant)
            (self.variant_changed if existed else self.variant_added).emit(BASELINE)

    def keep_model(self, name: str, handle: Any) -> None:
        if handle is not None:
            self._models[name] = handle

    def _keep(self, variant: Variant) -> None:
        self.keep_model(variant.name, variant.handle)

    def update(self, variant: Variant) -> None:
        """``variant`` (the workspace's entry) changed: tell the views."""
        self.variant_changed.emit(variant.name)

    def remove(self, name: str, *, later: bool = False) -> None:
        """Remove a variant from the workspace (its folder too) and the views. ``later``: only hide
        it now (a worker is writing the workspace); :meth:`remove` it again when the worker ends."""
        if name == BASELINE or self._ws.get(name) is None:
            return
        shown = name not in self._hidden
        if later:
            self._hidden.add(name)
        else:
            self._hidden.discard(name)
            self._models.pop(name, None)
            self._ws.remove_variant(name)
        if shown:
            if self._selected == name:
                self.select(None)
            self.variant_removed.emit(name)

    def clear(self) -> None:
        """Show nothing (a fresh unsaved workspace); the workspace shown before is left as it is."""
        self.attach(None)

    def select(self, name: str | None) -> None:
        if name is not None and name not in self:
            name = None
        if name != self._selected:
            self._selected = name
            self.selection_changed.emit(name)
