"""The results table: one row per variant, bound to the :class:`VariantStore` (no copies kept).

Sorting goes through a proxy on numeric sort keys; selecting a row calls ``store.select`` and the
store's ``selection_changed`` selects the row back (guarded against feedback loops), so a click in
the chart and a click in the table are the same event.
"""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import (
    QAbstractTableModel,
    QItemSelectionModel,
    QModelIndex,
    QSortFilterProxyModel,
    Qt,
    QTimer,
    Signal,
)
from PySide6.QtGui import QAction
from PySide6.QtWidgets import QAbstractItemView, QApplication, QHeaderView, QMenu, QStyle, QTableView

from ..engine.formatting import fmt_bytes, fmt_count
from ..engine.running.variants import step_label
from . import theme
from .store import BASELINE, VariantStore

COLUMNS = ("Variant", "Steps", "Size", "Deflated", "Params", "Latency", "Speed-up", "Accuracy", "Agreement",
           "Warnings")
SORT_ROLE = Qt.ItemDataRole.UserRole + 1


def params_text(m: dict[str, Any]) -> str:
    """Both counts in full: parameters of the model, and how many of them are not zero."""
    params, nonzero = m.get("params"), m.get("nonzero_params")
    text = f"{params:,} parameters"
    if nonzero is not None:
        text += f"; {nonzero:,} non-zero ({nonzero / max(1, params):.1%})"
    return text


def _latency(m: dict[str, Any]) -> float | None:
    lat = m.get("latency_ms") or {}
    return lat.get("median")


def _speedup(m: dict[str, Any]) -> dict[str, Any]:
    """The paired timing's speed-up entry, or {} (none, or one read back incomplete)."""
    sp = (m.get("latency_ms") or {}).get("speedup") or {}
    ok = all(isinstance(sp.get(k), (int, float)) and not isinstance(sp.get(k), bool)
             for k in ("median", "low", "high"))
    return sp if ok else {}


def speedup_text(m: dict[str, Any]) -> str:
    """``1.84x (1.79-1.90)``: the paired speed-up and its 95% interval; ``?`` marks a noisy timing."""
    sp = _speedup(m)
    if not sp:
        return "-"
    return f"{sp['median']:.2f}x ({sp['low']:.2f}-{sp['high']:.2f})" + (" ?" if sp.get("noisy") else "")


def speedup_tooltip(m: dict[str, Any]) -> str:
    sp, lat = _speedup(m), m.get("latency_ms") or {}
    if not sp:
        return "not timed beside the original (the original itself, or an older result)"
    lines = [f"speed-up {sp['median']:.3f}x, 95% interval {sp['low']:.3f}-{sp['high']:.3f}x",
             f"{lat.get('median')} ms vs the original's {sp.get('baseline_median')} ms, "
             f"timed in alternating blocks ({sp.get('blocks')} blocks) in {lat.get('runtime')} on "
             f"{lat.get('device') or 'cpu'} at batch "
             f"{lat.get('batch')}, {lat.get('threads')} thread(s)",
             f"spread (p90/median) {lat.get('spread')}; machine load {lat.get('load')}"]
    if sp.get("noisy"):
        lines.append("noisy: the machine was busy; right-click > Re-measure")
    return "\n".join(lines)


class ResultsModel(QAbstractTableModel):
    def __init__(self, store: VariantStore, parent=None) -> None:
        super().__init__(parent)
        self.store = store
        self._names: list[str] = store.names()
        store.variant_added.connect(self._on_store_added)
        store.variant_changed.connect(self._on_store_changed)
        store.variant_removed.connect(self._on_store_removed)
        store.cleared.connect(self._on_store_cleared)

    # --- store events ---------------------------------------------------------------------------
    def _on_store_added(self, name: str) -> None:
        if name in self._names:
            self._on_store_changed(name)
            return
        row = len(self._names)
        self.beginInsertRows(QModelIndex(), row, row)
        self._names.append(name)
        self.endInsertRows()

    def _on_store_changed(self, name: str) -> None:
        if name not in self._names:
            self._on_store_added(name)
            return
        row = self._names.index(name)
        self.dataChanged.emit(self.index(row, 0), self.index(row, len(COLUMNS) - 1))

    def _on_store_removed(self, name: str) -> None:
        if name in self._names:
            row = self._names.index(name)
            self.beginRemoveRows(QModelIndex(), row, row)
            self._names.pop(row)
            self.endRemoveRows()

    def _on_store_cleared(self) -> None:
        self.beginResetModel()
        self._names = self.store.names()
        self.endResetModel()

    # --- Qt model -------------------------------------------------------------------------------
    def rowCount(self, parent=QModelIndex()) -> int:  # noqa: B008, N802
        return 0 if parent.isValid() else len(self._names)

    def columnCount(self, parent=QModelIndex()) -> int:  # noqa: B008, N802
        return 0 if parent.isValid() else len(COLUMNS)

    def headerData(self, section, orientation, role=Qt.ItemDataRole.DisplayRole):  # noqa: N802
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.DisplayRole:
            return COLUMNS[section]
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.ToolTipRole:
            return {
                "Size": "ONNX artifact size on disk",
                "Deflated": "size after deflate compression (what sparsity saves in a zip)",
                "Latency": "median latency per batch in the measuring runtime",
                "Speed-up": "how many times as fast as the original, timed side by side with it in "
                            "alternating blocks; in brackets the 95% interval (? = noisy: re-measure)",
                "Accuracy": "top-1 accuracy on the test split (needs labels)",
                "Agreement": "top-1 agreement with the original model (fidelity)",
            }.get(COLUMNS[section])
        return None

    def name_at(self, row: int) -> str:
        return self._names[row]

    def row_of(self, name: str) -> int:
        return self._names.index(name) if name in self._names else -1

    def data(self, index, role=Qt.ItemDataRole.DisplayRole):
        if not index.isValid():
            return None
        name = self._names[index.row()]
        v = self.store.get(name)
        if v is None:
            return None
        col = COLUMNS[index.column()]
        m = v.metrics or {}
        if role == Qt.ItemDataRole.DisplayRole:
            return self._display(v, col, m)
        if role == SORT_ROLE:
            return self._sort_key(v, col, m)
        if role == Qt.ItemDataRole.ToolTipRole:
            if col == "Speed-up":
                return speedup_tooltip(m)
            if col == "Params" and m.get("params") is not None:
                return params_text(m)
            return self.warnings_text(v) or None
        if role == Qt.ItemDataRole.DecorationRole and col == "Variant" and (v.warnings or v.error):
            # visible without scrolling to the Warnings column; the tooltip has the text
            style = QApplication.style()
            icon = (QStyle.StandardPixmap.SP_MessageBoxCritical if v.status != "ok"
                    else QStyle.StandardPixmap.SP_MessageBoxWarning)
            return style.standardIcon(icon)
        if role == Qt.ItemDataRole.ForegroundRole and col == "Warnings" and (v.warnings or v.error):
            return theme.warning_color(failed=v.status != "ok")
        if role == Qt.ItemDataRole.TextAlignmentRole and col not in ("Variant", "Steps", "Warnings"):
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        return None

    @staticmethod
    def warnings_text(v) -> str:
        """Every warning (and the error) in full, one per line: the cell's tooltip."""
        notes = ([f"{v.status}: {v.error}"] if v.error else []) + [f"⚠ {w}" for w in v.warnings]
        extra = (v.info or {}).get("notes")
        notes += [f"ⓘ {n}" for n in extra] if isinstance(extra, list) else []
        return "\n".join(notes)

    @staticmethod
    def _display(v, col: str, m: dict[str, Any]) -> str:
        if col == "Variant":
            return v.name
        if col == "Steps":
            steps = (v.recipe or {}).get("steps") or []
            return " → ".join(step_label(s) for s in steps) if steps else "original"
        if col == "Warnings":
            if v.status != "ok":
                return f"{v.status}: {v.error or ''}".strip()
            # all of them on one line; the column grows to fit and the table scrolls sideways
            return "   ".join(f"⚠ {w}" for w in v.warnings)
        if not m:
            return "-"
        if col == "Size":
            return fmt_bytes(m.get("size_bytes"))
        if col == "Deflated":
            return fmt_bytes(m.get("compressed_bytes"))
        if col == "Params":  # the count `tugboat run` and `report` print; non-zeros in the tooltip
            params, nonzero = m.get("params"), m.get("nonzero_params")
            text = fmt_count(params)
            if params and nonzero is not None and nonzero < 0.9 * params:  # sparse (unstructured pruning)
                text += f" ({fmt_count(nonzero)} nz)"
            return text
        if col == "Latency":
            lat = _latency(m)
            return f"{lat:.3f} ms" if lat is not None else "-"
        if col == "Speed-up":
            return speedup_text(m) if v.name != BASELINE else "1x"
        if col == "Accuracy":
            acc = m.get("accuracy")
            return f"{acc * 100:.2f}%" if acc is not None else "-"
        if col == "Agreement":
            agree = (m.get("fidelity") or {}).get("top1_agreement")
            return f"{agree * 100:.1f}%" if agree is not None else "-"
        return ""

    def _sort_key(self, v, col: str, m: dict[str, Any]):
        if col in ("Variant", "Steps", "Warnings"):
            return self._display(v, col, m).lower()
        value = {"Size": m.get("size_bytes"), "Deflated": m.get("compressed_bytes"),
                 "Params": m.get("params"), "Latency": _latency(m),
                 "Speed-up": -(_speedup(m).get("median") or (1.0 if v.name == BASELINE else 0.0)),
                 "Accuracy": m.get("accuracy"),
                 "Agreement": (m.get("fidelity") or {}).get("top1_agreement")}.get(col)
        return float(value) if value is not None else float("inf")


class _Proxy(QSortFilterProxyModel):
    def lessThan(self, left, right) -> bool:  # noqa: N802
        a, b = left.data(SORT_ROLE), right.data(SORT_ROLE)
        try:
            return a < b
        except TypeError:
            return str(a) < str(b)


TARGET_ACTIONS = (("ort", "ONNX Runtime Mobile (.ort)...", "onnxruntime"),
                  ("pte", "ExecuTorch, XNNPACK (.pte)...", "executorch"),
                  ("openvino", "OpenVINO IR (.xml)...", "openvino"))


def runtime_choices() -> dict[str, tuple[bool, str]]:
    """Runtime -> (installed, tooltip: its version, or why not and the install command)."""
    from ..engine.measuring.runtimes import list_runtimes

    return {r["name"]: (r["available"], r.get("version") or r.get("reason", "")) for r in list_runtimes()}


class ResultsTable(QTableView):
    """Signals carry a variant name: the window runs the action (jobs, dialogs)."""

    export_requested = Signal(str, str)  # name, kind: onnx | torch | recipe
    rerun_requested = Signal(str)
    remeasure_in_requested = Signal(str, str)  # name, runtime (engine/runtimes)
    remeasure_requested = Signal(list)  # names: time again beside the original
    delete_requested = Signal(str)
    show_recipe_requested = Signal(str)
    continue_requested = Signal(str)

    def __init__(self, store: VariantStore, parent=None) -> None:
        super().__init__(parent)
        self.setObjectName("results_table")
        self.store = store
        self.results_model = ResultsModel(store, self)
        self.proxy = _Proxy(self)
        self.proxy.setSourceModel(self.results_model)
        self.setModel(self.proxy)
        self.setSortingEnabled(True)
        self.sortByColumn(-1, Qt.SortOrder.AscendingOrder)
        self.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        # several rows can be selected for Re-measure; the store follows the current one
        self.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.setAlternatingRowColors(True)
        self.setWordWrap(False)
        self.setHorizontalScrollMode(QAbstractItemView.ScrollMode.ScrollPerPixel)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAsNeeded)
        self.verticalHeader().setVisible(False)
        header = self.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        # the Warnings column is as wide as its longest text (at least the space left), so nothing
        # is cut off: the table scrolls sideways instead; the tooltip holds the same text
        header.setStretchLastSection(False)
        header.setTextElideMode(Qt.TextElideMode.ElideNone)
        for col, width in enumerate((170, 150, 66, 68, 104, 76, 150, 70, 76)):
            self.setColumnWidth(col, width)
        m = self.results_model
        for sig in (m.rowsInserted, m.rowsRemoved, m.modelReset, m.dataChanged):
            sig.connect(self.fit_warnings_column)
        header.sectionResized.connect(self._on_section_resized)
        self.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.customContextMenuRequested.connect(self._on_context_menu)
        self._syncing = False
        self.selectionModel().selectionChanged.connect(self._on_selection_changed)
        store.selection_changed.connect(self._on_store_selection)
        store.variant_added.connect(self._on_store_added)

    def _on_store_added(self, name: str) -> None:
        """A new row is scrolled into view (after the model has inserted it)."""
        QTimer.singleShot(0, lambda n=name: self.scroll_to(n))

    def scroll_to(self, name: str) -> None:
        row = self.results_model.row_of(name)
        if row >= 0:
            self.scrollTo(self.proxy.mapFromSource(self.results_model.index(row, 0)))

    WARNINGS = COLUMNS.index("Warnings")

    def fit_warnings_column(self, *_args) -> None:
        col = self.WARNINGS
        others = sum(self.columnWidth(c) for c in range(len(COLUMNS)) if c != col)
        room = self.viewport().width() - others
        self._fitting = True
        try:
            self.setColumnWidth(col, max(room, self.sizeHintForColumn(col),
                                         self.horizontalHeader().sectionSizeHint(col), 80))
        finally:
            self._fitting = False

    def _on_section_resized(self, index: int, _old: int, _new: int) -> None:
        if index != self.WARNINGS and not getattr(self, "_fitting", False):
            self.fit_warnings_column()

    def resizeEvent(self, event) -> None:  # noqa: N802
        super().resizeEvent(event)
        self.fit_warnings_column()

    def name_at_row(self, view_row: int) -> str:
        return self.results_model.name_at(self.proxy.mapToSource(self.proxy.index(view_row, 0)).row())

    def selected_name(self) -> str | None:
        current = self.currentIndex()
        rows = self.selectionModel().selectedRows()
        if current.isValid() and any(r.row() == current.row() for r in rows):
            return self.results_model.name_at(self.proxy.mapToSource(current).row())
        if not rows:
            return None
        return self.results_model.name_at(self.proxy.mapToSource(rows[0]).row())

    def selected_names(self) -> list[str]:
        rows = sorted(r.row() for r in self.selectionModel().selectedRows())
        return [self.name_at_row(r) for r in rows]

    def _on_selection_changed(self, *_a) -> None:
        if self._syncing:
            return
        self._syncing = True
        try:
            self.store.select(self.selected_name())
        finally:
            self._syncing = False

    def _on_store_selection(self, name: object) -> None:
        if self._syncing:
            return
        self._syncing = True
        try:
            row = self.results_model.row_of(name) if isinstance(name, str) else -1
            if row < 0:
                self.clearSelection()
                return
            index = self.proxy.mapFromSource(self.results_model.index(row, 0))
            self.selectionModel().select(index, QItemSelectionModel.SelectionFlag.ClearAndSelect
                                         | QItemSelectionModel.SelectionFlag.Rows)
            self.scrollTo(index)
        finally:
            self._syncing = False

    def build_menu(self, name: str) -> QMenu:
        menu = QMenu(self)
        v = self.store.get(name)
        has_model = v is not None and v.status == "ok"
        for kind, text in (("onnx", "Export ONNX..."), ("torch", "Export torch file..."),
                           ("recipe", "Export recipe...")):
            act = QAction(text, menu)
            act.setEnabled(has_model or kind == "recipe")
            act.triggered.connect(lambda _=False, k=kind: self.export_requested.emit(name, k))
            menu.addAction(act)
        runtimes = runtime_choices()
        targets = menu.addMenu("Export for runtime")
        for kind, text, runtime in TARGET_ACTIONS:
            act = QAction(text, targets)
            ok, why = runtimes[runtime]
            act.setEnabled(has_model and ok)
            act.setToolTip(why)
            act.triggered.connect(lambda _=False, k=kind: self.export_requested.emit(name, k))
            targets.addAction(act)
        targets.setToolTipsVisible(True)
        again = menu.addMenu("Re-measure in")
        for runtime, (ok, why) in runtimes.items():
            act = QAction(runtime if ok else f"{runtime} (not installed)", again)
            act.setEnabled(has_model and ok)
            act.setToolTip(why)
            act.triggered.connect(lambda _=False, r=runtime: self.remeasure_in_requested.emit(name, r))
            again.addAction(act)
        again.setToolTipsVisible(True)
        menu.addSeparator()
        chosen = [n for n in self.selected_names() if n != BASELINE] if name in self.selected_names() else []
        chosen = chosen or ([name] if name != BASELINE else [])
        timed = [n for n in chosen if (self.store.get(n) is not None and self.store.get(n).status == "ok")]
        label = "Re-measure" if len(timed) <= 1 else f"Re-measure {len(timed)} variants"
        act = QAction(label, menu)
        act.setObjectName("remeasure_action")
        act.setToolTip("time the original and these variants again, back to back")
        act.setEnabled(bool(timed))
        act.triggered.connect(lambda _=False, names=timed: self.remeasure_requested.emit(list(names)))
        menu.addAction(act)
        for text, signal, enabled in (
            ("Continue chain from here", self.continue_requested, has_model),
            ("Re-run", self.rerun_requested, name != BASELINE),
            ("Show recipe", self.show_recipe_requested, True),
            ("Delete", self.delete_requested, name != BASELINE),
        ):
            act = QAction(text, menu)
            act.setEnabled(enabled)
            act.triggered.connect(lambda _=False, s=signal: s.emit(name))
            menu.addAction(act)
        return menu

    def _on_context_menu(self, pos) -> None:
        index = self.indexAt(pos)
        if not index.isValid():
            return
        name = self.results_model.name_at(self.proxy.mapToSource(index).row())
        if name not in self.selected_names():
            self.store.select(name)
        self.build_menu(name).popup(self.viewport().mapToGlobal(pos))
