"""The Diagnose view: where, layer by layer, the selected variant diverges from the original, and
the one-click recipe change that would fix each layer; plus the side-by-side Compare dialog.

Select a variant in the results table (or on the chart), press "Diagnose": a cancellable job runs
:func:`tugboat.engine.measuring.diagnose.diagnose` on a bounded sample and the table fills, worst layer
first, coloured by severity (red under 10 dB, amber under 20 dB, green above). Each row's fix
("Keep this layer in float" for a quantized variant, "Prune this layer less" for a pruned one) is
in the row's context menu, on the button above the table, and on a double-click: it runs the
variant's recipe with that one change through :meth:`Session.run_recipe`, the path the technique
panels use, so the new variant lands in the store, the table and the chart.

"Compare..." opens two variants side by side: the recipe keys that differ, the metrics, and the
channels each layer keeps. By default it compares the last two variants selected.
"""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import QAbstractTableModel, QModelIndex, QSortFilterProxyModel, Qt, Signal
from PySide6.QtGui import QAction, QBrush, QColor
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QMenu,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTableView,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from ..engine.errors import RecipeError, TugboatError
from ..jobs import Job, JobSlot
from .store import BASELINE

# (header, tooltip, (part, key) of a row or a special name, format)
_SPEC = [
    ("#", "rank, worst first", "rank", "int"),
    ("Layer", "the layer (torch module path, or ONNX node)", "layer", "text"),
    ("Op", "operator / layer kind", "op_type", "text"),
    ("Output dB\nif alone", "SQNR of the model's output with only this layer quantized (or pruned): "
     "what ranks the rows", ("impact", "sqnr_db"), "db"),
    ("Top-1\nif alone", "top-1 agreement of the model's output with the original, only this layer "
     "changed", ("impact", "top1_agreement"), "pct"),
    ("Top-1 if\nkept float", "top-1 agreement of the model re-quantized with this layer kept in float: "
     "its fix, measured (the worst rows of a static-int8 variant)", ("if_float", "top1_agreement"), "pct"),
    ("Output dB if\nkept float", "SQNR of the model's output re-quantized with this layer kept in float",
     ("if_float", "sqnr_db"), "db"),
    ("Layer dB\nalone", "SQNR of this layer's output with only this layer quantized (everything "
     "else float)", ("isolated", "sqnr_db"), "db"),
    ("Cos\nalone", "cosine similarity of this layer's output with only this layer quantized",
     ("isolated", "cosine"), "cos"),
    ("Accum.\ndB", "SQNR of this layer's output running the whole variant (errors of earlier layers "
     "included)", ("accumulated", "sqnr_db"), "db"),
    ("Accum.\ncos", "cosine similarity of this layer's output running the whole variant",
     ("accumulated", "cosine"), "cos"),
    ("Accum.\nmax err", "largest absolute difference of this layer's output running the whole variant",
     ("accumulated", "max_abs"), "num"),
    ("Channels", "output channels kept / before (pruned and distilled variants)", "channels", "text"),
    ("Fix", "the recipe change that would fix this layer (right-click or double-click the row)",
     "fix", "text"),
]
COLUMNS = [c[0] for c in _SPEC]
TIPS = [c[1] for c in _SPEC]
COL_RANK, COL_LAYER, COL_IMPACT, COL_IF_FLOAT, COL_ACCUM, COL_CHANNELS = 0, 1, 3, 5, 9, 12
SEVERE_DB, WARN_DB = 10.0, 20.0
SORT_ROLE = Qt.ItemDataRole.UserRole + 1


def severity_color(db: float | None) -> QColor | None:
    """Red under 10 dB, amber under 20 dB, green otherwise (translucent: readable on both themes)."""
    if db is None:
        return None
    if db < SEVERE_DB:
        return QColor(220, 50, 47, 110)
    if db < WARN_DB:
        return QColor(230, 160, 20, 100)
    return QColor(60, 170, 80, 70)


def _get(row: dict[str, Any], part: str, key: str) -> float | None:
    d = row.get(part)
    return None if not d else d.get(key)


def _fmt(value: Any, kind: str) -> str:
    if value is None or value == "":
        return "–" if kind != "text" else ""
    if kind == "db":
        return f"{value:.1f}"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "cos":
        return f"{value:.4f}"
    if kind == "num":
        return f"{value:.3g}"
    return str(value)


class DiagnoseModel(QAbstractTableModel):
    """The rows of one diagnosis (engine dicts), read-only."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.rows: list[dict[str, Any]] = []

    def set_rows(self, rows: list[dict[str, Any]]) -> None:
        self.beginResetModel()
        self.rows = list(rows)
        self.endResetModel()

    def rowCount(self, parent=QModelIndex()) -> int:  # noqa: B008, N802
        return 0 if parent.isValid() else len(self.rows)

    def columnCount(self, parent=QModelIndex()) -> int:  # noqa: B008, N802
        return 0 if parent.isValid() else len(COLUMNS)

    def headerData(self, section, orientation, role=Qt.ItemDataRole.DisplayRole):  # noqa: N802
        if orientation == Qt.Orientation.Horizontal:
            if role == Qt.ItemDataRole.DisplayRole:
                return COLUMNS[section]
            if role == Qt.ItemDataRole.ToolTipRole:
                return TIPS[section]
        return None

    @staticmethod
    def value(r: dict[str, Any], col: int) -> Any:
        what = _SPEC[col][2]
        if isinstance(what, tuple):
            return _get(r, *what)
        if what == "channels":
            ch = r.get("channels")
            return f"{'–' if ch['after'] is None else ch['after']}/{ch['before']}" if ch else ""
        if what == "fix":
            action = r.get("action")
            if not action:
                return ""
            if action["kind"] == "keep_float":
                return "keep in float"
            return f"prune less ({r.get('ratio', 0):g} → {action['ratio']:g})"
        return r.get(what)

    def data(self, index, role=Qt.ItemDataRole.DisplayRole):
        if not index.isValid():
            return None
        r = self.rows[index.row()]
        col = index.column()
        kind = _SPEC[col][3]
        if role == Qt.ItemDataRole.DisplayRole:
            return _fmt(self.value(r, col), kind)
        if role == SORT_ROLE:
            if col == COL_CHANNELS and r.get("channels"):
                return (r["channels"]["after"] or 0) / max(1, r["channels"]["before"])
            value = self.value(r, col)
            if kind == "text":
                return str(value or "")
            return float("inf") if value is None else value
        if role == Qt.ItemDataRole.BackgroundRole:
            if kind == "db":
                db = self.value(r, col)
            elif col <= 2:
                db = r.get("score_db")
            else:
                return None
            color = severity_color(db)
            return QBrush(color) if color is not None else None
        if role == Qt.ItemDataRole.TextAlignmentRole and kind != "text":
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        if role == Qt.ItemDataRole.ToolTipRole:
            out = r.get("output") or r.get("layer")
            text = f"{r.get('node')}\noutput tensor: {out}\nshape: {r.get('shape')}"
            if r.get("variant_shape") and r.get("variant_shape") != r.get("shape"):
                text += f" → {r['variant_shape']}"
            if r.get("input_qdq_sqnr_db") is not None:
                text += f"\ninput quantization alone: {r['input_qdq_sqnr_db']:.1f} dB"
            return text
        return None


class DiagnoseView(QWidget):
    """The view of the session's diagnoses; ``notify(message, details, level)`` shows a problem."""

    fix_started = Signal(object)  # the Job running the fixed recipe

    def __init__(self, session, store, queue, notify) -> None:
        super().__init__()
        self.setObjectName("diagnose_view")
        self.session, self.store, self.queue, self.notify = session, store, queue, notify
        self.subject: str | None = None  # the variant whose diagnosis is shown
        self.result: dict[str, Any] | None = None
        self.slot = JobSlot(queue, self)  # one diagnosis: a newer one (or another model) drops the older
        self._recent: list[str] = []  # last selected variants, for Compare

        self.title = QLabel("Select a variant in the results table, then Diagnose.")
        self.title.setWordWrap(True)
        top = self._build_top()
        self._build_table()
        self.summary = QLabel()
        self.summary.setWordWrap(True)
        self.summary.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        lay.addWidget(self.title)
        lay.addLayout(top)
        lay.addWidget(self.table, 1)
        lay.addWidget(self.summary)

        self.diagnose_button.clicked.connect(self.run_diagnose)
        self.cancel_button.clicked.connect(self.cancel)
        self.fix_button.clicked.connect(lambda: self.apply_fix(self.selected_row()))
        self.compare_button.clicked.connect(lambda: self.open_compare())
        self.store.selection_changed.connect(self._on_selection_changed)
        self.store.cleared.connect(self._on_store_cleared)
        self.store.variant_removed.connect(self._on_variant_removed)
        self._update_buttons()

    def _build_top(self) -> QHBoxLayout:
        """Diagnose, samples, Cancel, progress; Fix and Compare on the right."""
        self.samples = QSpinBox()
        self.samples.setRange(16, 256)
        self.samples.setSingleStep(16)
        self.samples.setValue(128)
        self.samples.setSuffix(" samples")
        self.samples.setToolTip("inputs of the val split compared (more: steadier numbers, slower)")
        self.diagnose_button = QPushButton("Diagnose")
        self.diagnose_button.setToolTip("Compare the selected variant with the original, layer by layer")
        self.cancel_button = QPushButton("Cancel")
        self.fix_button = QPushButton("Fix selected layer")
        self.fix_button.setToolTip("Run the variant's recipe again with the selected row's fix")
        widest = max(self.fix_button.fontMetrics().horizontalAdvance(t) for t in
                     ("Keep this layer in float", "Prune this layer less"))
        self.fix_button.setMinimumWidth(widest + 28)
        self.compare_button = QPushButton("Compare...")
        self.compare_button.setToolTip("Two variants side by side: recipes, metrics, channels per layer")
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setTextVisible(True)
        self.progress.setMaximumWidth(220)
        self.progress.hide()
        top = QHBoxLayout()
        top.addWidget(self.diagnose_button)
        top.addWidget(self.samples)
        top.addWidget(self.cancel_button)
        top.addWidget(self.progress)
        top.addStretch(1)
        top.addWidget(self.fix_button)
        top.addWidget(self.compare_button)
        return top

    def _build_table(self) -> None:
        self.model = DiagnoseModel(self)
        self.proxy = QSortFilterProxyModel(self)
        self.proxy.setSourceModel(self.model)
        self.proxy.setSortRole(SORT_ROLE)
        self.table = QTableView()
        self.table.setObjectName("diagnose_table")
        self.table.setModel(self.proxy)
        self.table.setSortingEnabled(True)
        self.table.sortByColumn(0, Qt.SortOrder.AscendingOrder)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.setWordWrap(False)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        header.setStretchLastSection(True)
        self.table.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.table.customContextMenuRequested.connect(self._on_table_context_menu)
        self.table.doubleClicked.connect(lambda index: self.apply_fix(self._row_at(index.row())))
        self.table.selectionModel().selectionChanged.connect(lambda *_a: self._update_buttons())

    # --- state --------------------------------------------------------------------------------
    def _selected_variant(self):
        name = self.store.selected
        v = self.store.get(name) if name else None
        ok = v is not None and name != BASELINE and v.status == "ok" and v.handle is not None
        return v if ok else None

    @property
    def job(self) -> Job | None:
        """The diagnosis running now (None when none runs)."""
        return self.slot.job

    def _running(self) -> bool:
        return self.slot.job is not None

    def _update_buttons(self) -> None:
        running = self._running()
        self.diagnose_button.setEnabled(not running and self._selected_variant() is not None
                                        and self.session.baseline is not None)
        self.cancel_button.setEnabled(running)
        row = self.selected_row()
        action = (row or {}).get("action")
        self.fix_button.setEnabled(action is not None and self.session.baseline is not None)
        self.fix_button.setText(action["label"] if action else "Fix selected layer")
        self.compare_button.setEnabled(len(self.store) >= 2)

    def _on_selection_changed(self, name) -> None:
        if isinstance(name, str):
            self._recent = [*[n for n in self._recent if n != name][-1:], name]
        v = self._selected_variant()
        if v is not None and v.name != self.subject and not self._running():
            self.title.setText(f"<b>{v.name}</b> against the original: press Diagnose.")
        elif name == BASELINE:
            self.title.setText("The original is the reference: select a variant to diagnose.")
        elif isinstance(name, str) and not self._running():
            v = self.store.get(name)
            if v is not None and name != self.subject:
                why = (f"it {v.status}" if v.status != "ok" else
                       "its model is not in memory (reopened from a workspace): re-run it first")
                self.title.setText(f"<b>{name}</b> cannot be diagnosed: {why}.")
        self._update_buttons()

    def _on_store_cleared(self) -> None:
        self.slot.cancel()
        self.progress.hide()
        self.subject, self.result, self._recent = None, None, []
        self.model.set_rows([])
        self.summary.clear()
        self.title.setText("Select a variant in the results table, then Diagnose.")
        self._update_buttons()

    def _on_variant_removed(self, name: str) -> None:
        self._recent = [n for n in self._recent if n != name]
        self._update_buttons()

    # --- diagnosing ------------------------------------------------------------------------------
    def _reference_handle(self, steps: list[dict[str, Any]]):
        """The float model the quantize step started from, when steps came before it."""
        q = [i for i, s in enumerate(steps) if s.get("technique") == "quantize"]
        if not q or q[-1] == 0:
            return None
        prefix = steps[:q[-1]]
        for v in self.store.variants():
            if v.status == "ok" and v.handle is not None and (v.recipe or {}).get("steps") == prefix:
                return v.handle
        return None

    def run_diagnose(self) -> Job | None:
        v = self._selected_variant()
        base = self.session.baseline
        if v is None or base is None:
            return None
        name, samples = v.name, self.samples.value()
        original, handle, data = base.handle, v.handle, base.data
        reference = self._reference_handle(list((v.recipe or {}).get("steps", [])))

        def work(progress):
            from ..engine.measuring.diagnose import diagnose

            return diagnose(original, handle, data, reference=reference, samples=samples,
                            progress=progress)

        self.subject = name
        self.title.setText(f"Diagnosing <b>{name}</b> against the original...")
        job = self.slot.submit(work, name=f"diagnose {name}", kind="diagnose",
                               finished=lambda result, n=name: self._on_finished(n, result),
                               failed=lambda msg, _det, n=name: self._on_failed(n, msg),
                               cancelled=lambda n=name: self._on_failed(n, "cancelled"),
                               progress=self._on_progress, state_changed=lambda _s: self._update_buttons())
        self.progress.setValue(0)
        self.progress.show()
        self._update_buttons()
        return job

    def cancel(self) -> None:
        """The user's Cancel: the job ends and says so (its handlers stay connected)."""
        if self.slot.job is not None:
            self.slot.job.cancel()

    def _on_progress(self, fraction: float, message: str) -> None:
        self.progress.setValue(int(fraction * 1000))
        self.progress.setFormat(message[:40] or "%p%")

    def _on_failed(self, name: str, message: str) -> None:
        self.progress.hide()
        self.title.setText(f"Diagnosis of <b>{name}</b>: {message}")
        self._update_buttons()

    def _on_finished(self, name: str, result: dict[str, Any]) -> None:
        self.progress.hide()
        self.result = result
        self.model.set_rows(result["rows"])
        self.table.sortByColumn(0, Qt.SortOrder.AscendingOrder)
        for col in range(len(COLUMNS)):  # e.g. no channels for a quantized variant
            empty = all(DiagnoseModel.value(r, col) in (None, "") for r in result["rows"])
            self.table.setColumnHidden(col, empty)
        self.table.resizeColumnsToContents()  # headers and numbers readable, none cut off
        self.table.setFocus()
        out = result.get("output") or {}
        what = {"quantize": "quantized", "prune": "pruned", "distill": "distilled"}.get(
            result["kind"], result["kind"])
        top = result["rows"][0] if result["rows"] else None
        worst = f" Worst: <b>{top['layer']}</b>." if top else ""
        verified = [r for r in result["rows"] if r.get("if_float")]
        if verified:
            best = max(verified, key=lambda r: r["if_float"]["top1_agreement"] or 0.0)
            worst += (f" Best fix measured: keep <b>{best['layer']}</b> in float (top-1 agreement "
                      f"{_fmt(best['if_float']['top1_agreement'], 'pct')}).")
        self.title.setText(
            f"<b>{name}</b> ({what}, {result.get('method')}) against the original on "
            f"{result['samples']} samples ({result['split']}): output SQNR "
            f"{_fmt(out.get('sqnr_db'), 'db')} dB, top-1 agreement {_fmt(out.get('top1_agreement'), 'pct')}."
            f"{worst}")
        self.summary.setText(" ".join(result.get("notes") or []))
        if self.model.rowCount():
            self.table.selectRow(0)
        self._update_buttons()

    # --- rows and fixes --------------------------------------------------------------------------
    def _row_at(self, view_row: int) -> dict[str, Any] | None:
        if view_row < 0:
            return None
        src = self.proxy.mapToSource(self.proxy.index(view_row, 0)).row()
        return self.model.rows[src] if 0 <= src < len(self.model.rows) else None

    def selected_row(self) -> dict[str, Any] | None:
        rows = self.table.selectionModel().selectedRows()
        return self._row_at(rows[0].row()) if rows else None

    def select_layer(self, layer: str) -> bool:
        for view_row in range(self.proxy.rowCount()):
            r = self._row_at(view_row)
            if r is not None and r.get("layer") == layer:
                self.table.selectRow(view_row)
                return True
        return False

    def build_menu(self, row: dict[str, Any]) -> QMenu:
        menu = QMenu(self)
        action = row.get("action")
        act = QAction(action["label"] if action else "No fix for this row", menu)
        act.setEnabled(action is not None)
        act.triggered.connect(lambda _=False, r=row: self.apply_fix(r))
        menu.addAction(act)
        return menu

    def _on_table_context_menu(self, pos) -> None:
        index = self.table.indexAt(pos)
        row = self._row_at(index.row()) if index.isValid() else None
        if row is not None:
            self.build_menu(row).popup(self.table.viewport().mapToGlobal(pos))

    def apply_fix(self, row: dict[str, Any] | None) -> Job | None:
        """Run the diagnosed variant's recipe with the row's fix as a new variant."""
        if row is None or not row.get("action") or self.result is None or self.subject is None:
            return None
        v = self.store.get(self.subject)
        if v is None or self.session.baseline is None:
            self.notify(f"Variant {self.subject!r} is gone; diagnose another one.", "", "warning")
            return None
        from ..engine.measuring.diagnose import fixed_steps
        from ..engine.running.recipe import validate_steps

        try:
            steps = validate_steps(fixed_steps(list(v.recipe.get("steps", [])), row["action"]),
                                   "diagnose fix")
        except (RecipeError, TugboatError) as exc:
            self.notify(str(exc), "")
            return None
        job = self.session.run_recipe(self.session.base_recipe().with_steps(steps),
                                      name=f"{v.name}: {row['action']['label'].lower()} {row['layer']}")
        if job is not None:
            self.fix_started.emit(job)
        return job

    # --- compare ---------------------------------------------------------------------------------
    def compare_pair(self) -> tuple[str | None, str | None]:
        """The last two variants selected (the original and the selection when only one was)."""
        names = [n for n in self._recent if n in self.store]
        if len(names) >= 2:
            return names[-2], names[-1]
        b = names[-1] if names else self.store.selected
        a = BASELINE if BASELINE in self.store and b != BASELINE else None
        return a, b

    def open_compare(self, a: str | None = None, b: str | None = None) -> CompareDialog:
        da, db = self.compare_pair()
        dialog = CompareDialog(self.store, a or da, b or db, self)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.show()
        return dialog


class CompareDialog(QDialog):
    """Two variants side by side: recipe keys that differ, metrics, channels kept per layer."""

    def __init__(self, store, a: str | None, b: str | None, parent=None) -> None:
        super().__init__(parent)
        self.setObjectName("compare_dialog")
        self.setWindowTitle("Compare variants")
        self.store = store
        self.a_combo, self.b_combo = QComboBox(), QComboBox()
        for combo, name in ((self.a_combo, a), (self.b_combo, b)):
            combo.addItems(store.names())
            combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToContents)
            if name in store:
                combo.setCurrentText(name)
            combo.currentTextChanged.connect(lambda _t: self.refresh())
        pick = QHBoxLayout()
        pick.addWidget(QLabel("A:"))
        pick.addWidget(self.a_combo, 1)
        pick.addWidget(QLabel("B:"))
        pick.addWidget(self.b_combo, 1)
        self.tabs = QTabWidget()
        self.recipe_table = self._table(["Recipe key", "A", "B"])
        self.metrics_table = self._table(["Metric", "A", "B", "B against A"])
        self.layers_table = self._table(["Layer", "A channels", "B channels", "B / A"])
        self.tabs.addTab(self.metrics_table, "Metrics")
        self.tabs.addTab(self.recipe_table, "Recipe differences")
        self.tabs.addTab(self.layers_table, "Channels per layer")
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addLayout(pick)
        lay.addWidget(self.tabs, 1)
        lay.addWidget(buttons)
        self.resize(720, 460)
        self.result: dict[str, Any] | None = None
        self.refresh()

    @staticmethod
    def _table(headers: list[str]) -> QTableWidget:
        t = QTableWidget(0, len(headers))
        t.setHorizontalHeaderLabels(headers)
        t.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        t.verticalHeader().setVisible(False)
        t.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        t.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        t.setAlternatingRowColors(True)
        return t

    @staticmethod
    def _text(value: Any) -> str:
        if value is None:
            return "–"
        if isinstance(value, float):
            return f"{value:.4g}"
        if isinstance(value, list):
            return ", ".join(map(str, value)) or "[]"
        return str(value)

    @staticmethod
    def _metric_text(key: str, value: Any) -> str:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return CompareDialog._text(value)
        if key.endswith("_bytes"):
            return f"{value / 1024:.1f} KB"
        if key.startswith("latency_ms"):
            return f"{value:.3g} ms"
        if key == "accuracy" or key.endswith("top1_agreement"):
            return f"{100 * value:.2f}%"
        if key == "seconds":
            return f"{value:.1f} s"
        if isinstance(value, int):
            return f"{value:,}"
        return f"{value:.4g}"

    @staticmethod
    def _change(key: str, a: Any, b: Any) -> str:
        """B against A: a ratio for costs, a difference for quality figures."""
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b)):
            return ""
        if key == "accuracy" or key.endswith("top1_agreement"):
            return f"{100 * (b - a):+.2f} pts"
        if key.startswith("fidelity."):
            return f"{b - a:+.4g}"
        return f"{b / a:.3g}×" if a else ""

    def _fill(self, table: QTableWidget, rows: list[tuple], ratio: bool, metrics: bool = False) -> None:
        table.setRowCount(len(rows))
        for i, (key, a, b) in enumerate(rows):
            text = (lambda v, k=key: self._metric_text(k, v)) if metrics else self._text
            cells = [key, text(a), text(b)]
            if ratio:
                cells.append(self._change(key, a, b))
            for j, text in enumerate(cells):
                item = QTableWidgetItem(text)
                if j and a != b:
                    font = item.font()
                    font.setBold(True)
                    item.setFont(font)
                table.setItem(i, j, item)

    def refresh(self) -> None:
        from ..engine.measuring.diagnose import compare

        va, vb = self.store.get(self.a_combo.currentText()), self.store.get(self.b_combo.currentText())
        if va is None or vb is None:
            return
        self.result = compare(va, vb)
        self._fill(self.metrics_table, self.result["metrics"], True, metrics=True)
        self._fill(self.recipe_table, self.result["recipe"], False)
        self._fill(self.layers_table, self.result["layers"], True)
        same = "" if self.result["recipe"] else " (same recipe)"
        self.tabs.setTabText(1, f"Recipe differences ({len(self.result['recipe'])}){same}")
