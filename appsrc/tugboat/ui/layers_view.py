"""The Layers view: where a model's size, work and time go, layer by layer, and how much each layer
minds being pruned or quantized; per-layer overrides go from here into the next Run's recipe.

Three bar charts share one row per layer (the model's layer table: every layer with weights):

* cost: share of parameters, of FLOPs, and of measured latency (the runtime chosen in the Data
  panel: ONNX Runtime's profiler or torch forward hooks, see :mod:`tugboat.engine.measuring.layers`);
* pruning sensitivity: quality drop when only that layer is structurally pruned (mean over 25, 50
  and 75 % of its channels);
* quantization sensitivity: relative output error when only that layer is quantized to int8.

The profile is measured in a background job when the view is shown and the model or the selected
variant changed; sensitivity is measured on demand ("Measure sensitivity", cancellable). Below the
charts a table holds the numbers and two overrides per layer: a sparsity (written into the Pruning
panel's ``layer_ratios``) and "keep in float" (written into the Quantization panel's ``exclude``).
The panels stay the single source of what the next Run does: the view reads them back when they
change, so a hand-typed value shows here too.
"""

from __future__ import annotations

from typing import Any

import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QDoubleSpinBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..engine.formatting import fmt_count
from ..jobs import Job, JobQueue, JobSlot
from .controls import guard_wheel
from .store import BASELINE
from .theme import chart_colors

NO_OVERRIDE = -0.05  # the sparsity spin box's "default" value: no per-layer ratio
COLUMNS = ["Layer", "Type", "Params", "FLOPs", "Latency", "Prune sens.", "Quant sens.",
           "Sparsity", "Keep float"]
COL_SPARSITY, COL_FLOAT = 7, 8
SERIES = {  # key: (legend, colour)
    "params": ("params", (31, 119, 180)),
    "flops": ("FLOPs", (255, 127, 14)),
    "latency": ("latency", (44, 160, 44)),
    "prune": ("pruning", (214, 39, 40)),
    "quant": ("int8", (148, 103, 189)),
}


def parse_pairs(items: list[str]) -> dict[str, float]:
    """Tolerant reading of the panel's ``layer=ratio`` entries (a half-typed one is skipped), by the
    engine's one parser of them."""
    from ..engine.techniques.prune import parse_layer_ratios

    return parse_layer_ratios(items, skip_bad=True)


class LayersView(QWidget):
    profile_ready = Signal(str)  # subject name
    sensitivity_ready = Signal(str)  # subject name

    def __init__(self, session, store, queue: JobQueue, panels: dict[str, Any]) -> None:
        super().__init__()
        self.setObjectName("layers_view")
        self.session, self.store, self.queue, self.panels = session, store, queue, panels
        # one job per purpose: a newer request cancels and disconnects the older (no stale results)
        self.profile_slot, self.sensitivity_slot = JobSlot(queue, self), JobSlot(queue, self)
        self.subject: str | None = None  # variant whose layers are shown
        self.rows: list[dict[str, Any]] = []
        self.latency_info: dict[str, Any] = {}
        self.sensitivity: dict[str, dict[str, Any]] = {}  # subject -> engine.layers.layer_sensitivity
        self.profile_job: Job | None = None  # the latest of each (kept after it ends, for the title)
        self.sensitivity_job: Job | None = None
        self._profiles: dict[tuple[str, int], dict[str, Any]] = {}  # (subject, id(handle)) -> profile
        self._stale = False
        self._syncing = False

        lay = QVBoxLayout(self)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.addLayout(self._build_top())
        self._build_plots()
        self._build_table()
        split = QSplitter(Qt.Orientation.Vertical)
        top_box = QWidget()
        tlay = QVBoxLayout(top_box)
        tlay.setContentsMargins(0, 0, 0, 0)
        tlay.addWidget(self.plots, 1)
        tlay.addWidget(self.note)
        split.addWidget(top_box)
        split.addWidget(self.table)
        split.setSizes([300, 220])
        lay.addWidget(split, 1)
        self._connect(panels)
        self._apply_colors()
        self._update_buttons()

    def _build_top(self) -> QHBoxLayout:
        top = QHBoxLayout()
        self.title = QLabel("Load a model to see its layers.")
        self.title.setObjectName("layers_title")
        self.title.setWordWrap(True)
        self.sensitivity_button = QPushButton("Measure sensitivity")
        self.sensitivity_button.setToolTip(
            "Prune each layer alone (25/50/75 % of its channels) and quantize each layer alone "
            "(static int8), and measure the quality lost: runs as a background job")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.clear_button = QPushButton("Clear overrides")
        self.clear_button.setToolTip("Remove every per-layer sparsity and keep-in-float setting from "
                                     "the Pruning and Quantization panels")
        top.addWidget(self.title, 1)
        for b in (self.sensitivity_button, self.cancel_button, self.clear_button):
            top.addWidget(b)
        return top

    def _connect(self, panels: dict[str, Any]) -> None:
        self.sensitivity_button.clicked.connect(self.measure_sensitivity)
        self.cancel_button.clicked.connect(self.cancel_sensitivity)
        self.clear_button.clicked.connect(self.clear_overrides)
        self.session.baseline_ready.connect(self._on_baseline_ready)
        self.session.model_info_ready.connect(self._on_model_info)
        self.store.selection_changed.connect(self._on_selection_changed)
        self.store.cleared.connect(self._on_store_cleared)
        for name in ("prune", "quantize"):  # follow the panels' edits
            if name in panels:
                panels[name].step_changed.connect(lambda _s: self._sync_overrides_from_panels())

    def _build_plots(self) -> None:
        """The three bar charts (cost, prune and int8 sensitivity) sharing one row per layer."""
        self.plots = pg.GraphicsLayoutWidget()
        self.plots.setObjectName("layers_plots")
        self.cost_plot = self.plots.addPlot(row=0, col=0, title="Share of the model (%)")
        self.prune_plot = self.plots.addPlot(row=0, col=1, title="Prune: quality drop (points)")
        self.quant_plot = self.plots.addPlot(row=0, col=2, title="int8: output error (%)")
        self.plots.ci.layout.setColumnStretchFactor(0, 5)
        self.plots.ci.layout.setColumnStretchFactor(1, 3)
        self.plots.ci.layout.setColumnStretchFactor(2, 3)
        self.bars: dict[str, pg.BarGraphItem] = {}
        for key in ("params", "flops", "latency"):
            self.bars[key] = self._bar_item(key, self.cost_plot)
        self.bars["prune"] = self._bar_item("prune", self.prune_plot)
        self.bars["quant"] = self._bar_item("quant", self.quant_plot)
        for p in (self.cost_plot, self.prune_plot, self.quant_plot):
            p.invertY(True)
            p.setMouseEnabled(x=False, y=False)
            p.hideButtons()
            p.showGrid(x=True, y=False, alpha=0.25)
        for p in (self.prune_plot, self.quant_plot):
            p.setYLink(self.cost_plot)
            p.getAxis("left").setStyle(showValues=False)
            p.getAxis("left").setWidth(4)
        self.note = QLabel("")
        self.note.setObjectName("layers_note")
        self.note.setWordWrap(True)

    def _build_table(self) -> None:
        """The numbers of every layer and its two overrides (sparsity, keep in float)."""
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setObjectName("layers_table")
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        tips = {2: "parameters of the layer", 3: "multiply-accumulates x 2 per sample",
                4: "share of the forward pass's measured time spent in this layer",
                5: "quality lost when only this layer is pruned (mean of 25/50/75 %)",
                6: "relative output error when only this layer is int8 (accuracy drop in the tooltip)",
                7: "per-layer share of channels (structured) or weights (unstructured) the next "
                   "prune Run removes; 'default' uses the panel's ratio",
                8: "keep this layer in float when the next quantize Run quantizes the rest"}
        for col, tip in tips.items():
            self.table.horizontalHeaderItem(col).setToolTip(tip)

    # --- helpers ------------------------------------------------------------------------------------
    def _bar_item(self, key: str, plot) -> pg.BarGraphItem:
        name, rgb = SERIES[key]
        item = pg.BarGraphItem(x0=[], y=[], height=[], width=[], brush=pg.mkBrush(*rgb, 220),
                               pen=pg.mkPen(None), name=name)
        plot.addItem(item)  # a plot with a legend lists named items by itself
        return item

    def _apply_colors(self) -> None:
        c = chart_colors()
        self.plots.setBackground(c["background"])
        for p in (self.cost_plot, self.prune_plot, self.quant_plot):
            for axis in ("left", "bottom"):
                p.getAxis(axis).setPen(pg.mkPen(c["foreground"]))
                p.getAxis(axis).setTextPen(pg.mkPen(c["foreground"]))
            p.setTitle(p.titleLabel.text, color=c["foreground"].name(), size="9pt")
        # the legend lives in the title: inside the plot it would cover the bars
        keys = "".join(f" <span style='color:rgb{SERIES[k][1]}'>&#9632; {SERIES[k][0]}</span>"
                       for k in ("params", "flops", "latency"))
        self.cost_plot.setTitle(f"Share (%):{keys}", color=c["foreground"].name(), size="9pt")

    def _panel(self, name: str):
        return self.panels.get(name)

    def _subject_variant(self):
        return self.store.get(self.subject) if self.subject else None

    # --- what is shown --------------------------------------------------------------------------------
    def _on_model_info(self, info: dict) -> None:
        """The baseline's layer table arrives with the model info: params and FLOPs show at once."""
        if self.subject in (None, BASELINE):
            self.subject = BASELINE
            from ..engine.measuring.layers import QUANTIZABLE_TYPES, layer_key

            self.rows = [dict(r, layer=layer_key(r["name"]), latency_share=None, prunable=None,
                              quantizable=r["type"] in QUANTIZABLE_TYPES)
                         for r in (info or {}).get("layers", [])]
            total_p = max(1, sum(r["params"] for r in self.rows))
            total_f = max(1, sum(r["flops"] for r in self.rows))
            for r in self.rows:
                r["params_share"], r["flops_share"] = r["params"] / total_p, r["flops"] / total_f
            self.latency_info = {}
            self._refresh()

    def _on_baseline_ready(self, _base) -> None:
        self._profiles.clear()
        self.sensitivity.clear()
        self._set_subject(BASELINE)

    def _on_store_cleared(self) -> None:
        self.profile_slot.cancel()
        self.sensitivity_slot.cancel()

    def _on_selection_changed(self, name) -> None:
        v = self.store.get(name) if name else None
        if v is None or v.handle is None or v.status != "ok":
            name = BASELINE
        self._set_subject(name)

    def _set_subject(self, name: str) -> None:
        if name == self.subject and not self._needs_profile():
            return
        self.subject = name
        v = self._subject_variant()
        cached = self._profiles.get((name, id(v.handle))) if v is not None and v.handle else None
        if cached is not None:
            self._show_profile(cached)
            return
        self._stale = True
        if self.isVisible():
            self.refresh_profile()
        else:
            self._refresh()

    def _needs_profile(self) -> bool:
        v = self._subject_variant()
        return v is not None and v.handle is not None and (self.subject, id(v.handle)) not in self._profiles

    def showEvent(self, event) -> None:  # noqa: N802 - Qt
        super().showEvent(event)
        if self._stale:
            self.refresh_profile()

    def refresh_profile(self) -> Job | None:
        """Measure the subject's per-layer profile in a job (a newer request cancels the older)."""
        v = self._subject_variant()
        if v is None or v.handle is None:
            return None
        self._stale = False
        handle, name = v.handle, v.name
        cfg = self.session.measure
        batch, threads, runtime = int(cfg.batch), int(cfg.threads), str(cfg.runtime)

        def work(progress):
            from ..engine.measuring.layers import layer_profile

            return layer_profile(handle, batch=batch, threads=threads, runtime=runtime, progress=progress)

        self.profile_job = self.profile_slot.submit(
            work, name=f"layers of {name}", kind="layers",
            finished=lambda result, n=name, h=handle: self._on_profile_finished(n, h, result))
        self._refresh()
        return self.profile_job

    def _on_profile_finished(self, name: str, handle, profile: dict) -> None:
        self._profiles[(name, id(handle))] = profile
        self._show_profile(profile)  # the slot's latest job: its subject is the one shown
        self.profile_ready.emit(name)

    def _show_profile(self, profile: dict) -> None:
        self.rows = [dict(r) for r in profile["rows"]]
        self.latency_info = dict(profile.get("latency") or {})
        self._refresh()

    # --- sensitivity ------------------------------------------------------------------------------
    def measure_sensitivity(self) -> Job | None:
        """Measure pruning and int8 sensitivity of the shown model in a cancellable job."""
        v = self._subject_variant()
        if v is None or v.handle is None:
            return None
        handle, name = v.handle, v.name
        base = self.session.baseline
        data = base.data if base is not None else None

        def work(progress):
            from ..engine.measuring.layers import layer_sensitivity

            return layer_sensitivity(handle, data, progress=progress)

        self.sensitivity_job = self.sensitivity_slot.submit(
            work, name=f"sensitivity of {name}", kind="sensitivity",
            finished=lambda result, n=name: self._on_sensitivity_finished(n, result),
            state_changed=lambda _s: self._update_buttons())
        self._update_buttons()
        return self.sensitivity_job

    def cancel_sensitivity(self) -> None:
        self.sensitivity_slot.cancel()
        self._update_buttons()

    def _on_sensitivity_finished(self, name: str, result: dict) -> None:
        self.sensitivity[name] = result
        if name == self.subject:
            self._refresh()
        self.sensitivity_ready.emit(name)

    def _update_buttons(self) -> None:
        running = self.sensitivity_slot.job is not None
        v = self._subject_variant()
        self.sensitivity_button.setEnabled(not running and v is not None and v.handle is not None)
        self.cancel_button.setEnabled(running)

    # --- overrides ----------------------------------------------------------------------------------
    def overrides(self) -> tuple[dict[str, float], list[str]]:
        """(per-layer sparsity, layers kept in float) as the panels hold them now."""
        prune, quant = self._panel("prune"), self._panel("quantize")
        ratios = parse_pairs(prune.value("layer_ratios")) if prune is not None and \
            "layer_ratios" in prune.controls else {}
        keep = list(quant.value("exclude")) if quant is not None and "exclude" in quant.controls else []
        return ratios, keep

    def set_sparsity(self, layer: str, ratio: float | None) -> None:
        """Override one layer's pruning ratio in the Pruning panel (None: back to the panel's)."""
        prune = self._panel("prune")
        if prune is None or "layer_ratios" not in prune.controls:
            return
        ratios, _ = self.overrides()
        if ratio is None or ratio < 0:
            ratios.pop(layer, None)
        else:
            ratios[layer] = round(float(ratio), 3)
        prune.set_value("layer_ratios", [f"{n}={r:g}" for n, r in ratios.items()])

    def set_keep_float(self, layer: str, keep: bool) -> None:
        """Keep one layer in float in the Quantization panel's ``exclude`` list (or stop)."""
        quant = self._panel("quantize")
        if quant is None or "exclude" not in quant.controls:
            return
        _, kept = self.overrides()
        kept = [k for k in kept if k != layer] + ([layer] if keep else [])
        quant.set_value("exclude", kept)

    def clear_overrides(self) -> None:
        prune, quant = self._panel("prune"), self._panel("quantize")
        if prune is not None and "layer_ratios" in prune.controls:
            prune.set_value("layer_ratios", [])
        if quant is not None and "exclude" in quant.controls:
            quant.set_value("exclude", [])

    def _sync_overrides_from_panels(self) -> None:
        if self._syncing:
            return
        ratios, kept = self.overrides()
        self._syncing = True
        try:
            for i, r in enumerate(self.rows):
                spin = self.table.cellWidget(i, COL_SPARSITY)
                if isinstance(spin, QDoubleSpinBox):
                    spin.blockSignals(True)
                    spin.setValue(ratios.get(r["layer"], NO_OVERRIDE))
                    spin.blockSignals(False)
                box = self._checkbox(i)
                if box is not None:
                    box.blockSignals(True)
                    box.setChecked(r["layer"] in kept)
                    box.blockSignals(False)
        finally:
            self._syncing = False

    def _checkbox(self, row: int) -> QCheckBox | None:
        holder = self.table.cellWidget(row, COL_FLOAT)
        return holder.findChild(QCheckBox) if holder is not None else None

    def _on_spin_changed(self, layer: str, value: float) -> None:
        if not self._syncing:
            self._syncing = True
            try:
                self.set_sparsity(layer, None if value <= NO_OVERRIDE + 1e-9 else value)
            finally:
                self._syncing = False

    def _on_float_toggled(self, layer: str, checked: bool) -> None:
        if not self._syncing:
            self._syncing = True
            try:
                self.set_keep_float(layer, checked)
            finally:
                self._syncing = False

    # --- drawing ------------------------------------------------------------------------------------
    def _sens_for(self, layer: str) -> dict[str, Any]:
        sens = self.sensitivity.get(self.subject or "", {})
        return (sens.get("layers") or {}).get(layer, {})

    def _refresh(self) -> None:
        self._update_title()
        self._draw_bars()
        self._fill_table()
        self._update_buttons()

    def _update_title(self) -> None:
        if not self.subject or not self.rows:
            busy = self.profile_slot.job is not None
            self.title.setText("Measuring layers..." if busy else "Load a model to see its layers.")
            self.note.setText("")
            return
        model = self.session.model_ref or "model"
        what = "the original model" if self.subject == BASELINE else f"variant <b>{self.subject}</b>"
        self.title.setText(f"<b>{len(self.rows)} layers</b> of {what} ({model}). Select a variant "
                           "in the table to see its layers.")
        notes = []
        lat = self.latency_info
        if lat:
            notes.append(f"Latency: {lat['runtime']}, batch {lat['batch']}, {lat['threads']} thread(s), "
                         f"median of {lat['repeats']} runs, {lat['total_ms']:.2f} ms per batch under the "
                         "profiler; "
                         f"{100 * lat['other_share']:.0f} % of it in layers without weights "
                         "(activations, pooling) and overhead.")
        else:
            notes.append("Latency per layer: measuring..." if self.profile_slot.job is not None else
                         "Latency per layer is measured when this view is shown.")
        sens = self.sensitivity.get(self.subject)
        if sens:
            metric = sens.get("prune_metric") or "quality"
            notes.append(f"Pruning sensitivity: {metric} drop on the val split. "
                         + " ".join(sens.get("notes") or []))
        else:
            notes.append("Sensitivity: press \"Measure sensitivity\".")
        self.note.setText(" ".join(notes))

    def _draw_bars(self) -> None:
        n = len(self.rows)
        ticks = [(i, r["name"]) for i, r in enumerate(self.rows)]
        self.cost_plot.getAxis("left").setTicks([ticks, []])
        h = 0.26
        for k, key in enumerate(("params", "flops", "latency")):
            ys, ws = [], []
            for i, r in enumerate(self.rows):
                share = r.get(f"{key}_share")
                ys.append(i + (k - 1) * h)
                ws.append(100.0 * share if share is not None else 0.0)
            self.bars[key].setOpts(x0=[0.0] * n, y=ys, height=[h * 0.95] * n, width=ws)
        prune_w, quant_w = [], []
        for r in self.rows:
            s = self._sens_for(r["layer"])
            prune_w.append(100.0 * max(0.0, s["prune"]) if "prune" in s else 0.0)
            quant_w.append(100.0 * s["quant_rel_error"] if "quant_rel_error" in s else 0.0)
        self.bars["prune"].setOpts(x0=[0.0] * n, y=list(range(n)), height=[0.6] * n, width=prune_w)
        self.bars["quant"].setOpts(x0=[0.0] * n, y=list(range(n)), height=[0.6] * n, width=quant_w)
        cost_w = [w for key in ("params", "flops", "latency") for w in self.bars[key].opts["width"]]
        for plot, widths, floor in ((self.cost_plot, cost_w, 1.0), (self.prune_plot, prune_w, 1.0),
                                    (self.quant_plot, quant_w, 0.1)):
            plot.setXRange(0, max(max(widths or [0.0]) * 1.08, floor), padding=0)
        if n:
            self.cost_plot.setYRange(-0.5, n - 0.5, padding=0.02)

    def _row_controls(self, row: int, layer: str) -> tuple[QDoubleSpinBox, QCheckBox]:
        """The sparsity spin box and keep-float check box of a row, made once per layer (made anew
        when the row shows another layer; the old ones are hidden at once, deleted later)."""
        spin = self.table.cellWidget(row, COL_SPARSITY)
        holder = self.table.cellWidget(row, COL_FLOAT)
        if isinstance(spin, QDoubleSpinBox) and holder is not None and spin.property("layer") == layer:
            return spin, holder.findChild(QCheckBox)
        for old in (spin, holder):
            if old is not None:
                old.hide()
        from ..engine.techniques.prune import MAX_RATIO

        spin = QDoubleSpinBox()
        spin.setProperty("layer", layer)
        spin.setRange(NO_OVERRIDE, MAX_RATIO)
        spin.setSingleStep(0.05)
        spin.setDecimals(2)
        spin.setSpecialValueText("default")
        spin.valueChanged.connect(lambda v, name=layer: self._on_spin_changed(name, v))
        guard_wheel(spin)  # scrolling the table never changes a layer's sparsity
        self.table.setCellWidget(row, COL_SPARSITY, spin)
        holder = QWidget()
        hl = QHBoxLayout(holder)
        hl.setContentsMargins(0, 0, 0, 0)
        hl.setAlignment(Qt.AlignmentFlag.AlignCenter)
        box = QCheckBox()
        box.toggled.connect(lambda c, name=layer: self._on_float_toggled(name, c))
        hl.addWidget(box)
        self.table.setCellWidget(row, COL_FLOAT, holder)
        return spin, box

    def _fill_table(self) -> None:
        ratios, kept = self.overrides()
        self._syncing = True
        try:
            self.table.setRowCount(len(self.rows))
            for i, r in enumerate(self.rows):
                s = self._sens_for(r["layer"])
                lat = r.get("latency_share")
                cells = [r["name"], r["type"], fmt_count(r["params"], 3), fmt_count(r["flops"], 3),
                         f"{100 * lat:.1f} %" if lat is not None else "...",
                         f"{100 * s['prune']:.1f}" if "prune" in s else "",
                         f"{100 * s['quant_rel_error']:.2f} %" if "quant_rel_error" in s else ""]
                for col, text in enumerate(cells):
                    item = QTableWidgetItem(text)
                    if col >= 2:
                        item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                    if col == 4 and lat is not None:
                        item.setToolTip(f"{r.get('latency_ms', 0.0):.3f} ms per batch")
                    if col == 5 and "prune_drop" in s:
                        item.setToolTip(", ".join(f"{float(k):.0%}: -{100 * v:.1f}"
                                                  for k, v in s["prune_drop"].items()))
                    if col == 6 and "quant_accuracy_drop" in s:
                        item.setToolTip(f"accuracy drop {100 * s['quant_accuracy_drop']:.1f} points")
                    self.table.setItem(i, col, item)
                spin, box = self._row_controls(i, r["layer"])
                spin.setValue(ratios.get(r["layer"], NO_OVERRIDE))
                spin.setEnabled(bool(r.get("prunable")))
                spin.setToolTip("share of this layer's channels the next prune Run removes" if r.get("prunable")
                                else "not prunable on its own (no weights to remove, or the output layer)")
                box.setChecked(r["layer"] in kept)
                box.setEnabled(bool(r.get("quantizable")))
                box.setToolTip("keep this layer in float when the next quantize Run quantizes the rest"
                               if r.get("quantizable") else "not quantized (no Conv/Linear weights)")
        finally:
            self._syncing = False
