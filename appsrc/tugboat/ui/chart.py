"""The trade-off chart: every variant in the store on a size / latency / quality scatter.

Bound to the :class:`VariantStore` (no copies kept): the chart redraws from the store on every
change. Built once and updated with ``setData`` (pyqtgraph's ``PlotSpeedTest``): one
:class:`ScatterPlotItem` holds every variant, each point carrying its variant name in ``data``, so
500 variants redraw in a few milliseconds (``benchmarks/chart.py``). The baseline, the selection
ring, the Pareto line and the estimate "ghost" are small items of their own.

* x and y: any of size, deflated size, latency, params, FLOPs, accuracy, top-1 agreement
  (combo boxes); log scale per axis for the size-like metrics;
* colour: a third metric with a colour bar (or none);
* marker shape: the technique chain (original, prune, quantize, prune → quantize, ...), with a
  legend below the plot so it never covers a point;
* the Pareto front of the two metrics shown (:func:`pareto_2d`) as a line through exactly the
  variants no other beats on both, sorted by x; the tooltip says "on the Pareto front" for exactly
  those (the CSV and ``store.pareto()`` keep the size/latency/quality front of the reports);
* hover: name, steps and metrics; click: selects the variant in the store (and so the table row);
  the store's selection is ringed;
* ``set_ghost(metrics)``: a hollow point where an estimate says a variant will land;
* export: PNG and SVG (pyqtgraph exporters) and CSV (the columns of ``tugboat report --csv``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtGui import QAction
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QMenu,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from ..engine.running.report_json import quality_of
from ..engine.running.variants import step_label
from .store import BASELINE, VariantStore


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    kind: str  # "bytes" | "count" | "ms" | "fraction" | "ratio"
    get: Callable[[dict[str, Any]], float | None]
    loggable: bool = True
    short: str = ""  # for combo boxes and axis titles (the label is the tooltip)

    @property
    def title(self) -> str:
        return self.short or self.label

    @property
    def higher_is_better(self) -> bool:
        return self.kind in ("fraction", "ratio")  # accuracy, agreement, speed-up


def pareto_2d(points: dict[str, tuple[float, float]], mx: Metric, my: Metric) -> list[str]:
    """The names not beaten on both shown metrics by any other point, in x order: the front of the
    picture on screen (a line through it never zigzags, unlike the size/latency/quality front
    drawn over two of its three axes)."""
    sx = -1.0 if mx.higher_is_better else 1.0  # minimise sx * x and sy * y
    sy = -1.0 if my.higher_is_better else 1.0
    ranked = sorted(points.items(), key=lambda kv: (sx * kv[1][0], sy * kv[1][1]))
    front, best_y = [], math.inf
    for name, (_x, y) in ranked:
        if sy * y < best_y:
            front.append(name)
            best_y = sy * y
    return sorted(front, key=lambda n: points[n][0])


def _num(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _latency(m: dict[str, Any]) -> float | None:
    return _num((m.get("latency_ms") or {}).get("median"))


def _speedup(m: dict[str, Any]) -> float | None:
    """The paired speed-up over the original (median of block ratios); None when not paired."""
    return _num(((m.get("latency_ms") or {}).get("speedup") or {}).get("median"))


def _value_of(metric: Metric, variant) -> float | None:
    if metric.key == "speedup" and variant.name == BASELINE:
        return 1.0  # the original, by definition
    return metric.get(variant.metrics)


def _agreement(m: dict[str, Any]) -> float | None:
    return _num((m.get("fidelity") or {}).get("top1_agreement"))


METRICS: dict[str, Metric] = {m.key: m for m in (
    Metric("size", "Size on disk", "bytes", lambda m: _num(m.get("size_bytes")), short="Size"),
    Metric("compressed", "Deflated size", "bytes", lambda m: _num(m.get("compressed_bytes")),
           short="Deflated size"),
    Metric("latency", "Latency (median)", "ms", _latency, short="Latency"),
    Metric("speedup", "Speed-up over the original, timed side by side with it (1x: the original)", "ratio",
           _speedup, short="Speed-up"),
    Metric("params", "Parameters (as `tugboat run` and `report` count them)", "count",
           lambda m: _num(m.get("params")), short="Params"),
    Metric("nonzero", "Non-zero parameters (what unstructured pruning lowers)", "count",
           lambda m: _num(m.get("nonzero_params", m.get("params"))), short="Non-zero params"),
    Metric("flops", "FLOPs per sample", "count", lambda m: _num(m.get("flops")), short="FLOPs"),
    Metric("quality", "Quality (accuracy, else agreement)", "fraction", quality_of, loggable=False,
           short="Quality"),
    Metric("accuracy", "Accuracy", "fraction", lambda m: _num(m.get("accuracy")), loggable=False),
    Metric("agreement", "Top-1 agreement with the original", "fraction", _agreement, loggable=False,
           short="Agreement"),
)}
LOG_BY_DEFAULT = {"size", "compressed", "latency"}

# marker shape per technique chain; the baseline is a star
SYMBOLS = ["o", "s", "t", "d", "h", "p", "t1", "t2", "t3", "+", "x"]
BASELINE_SYMBOL = "star"
CHART_BG = "w"
REFRESH_DELAY_MS = 30  # store changes coalesced into one redraw this long after the first
NO_COLOUR_BRUSH = (70, 110, 170, 220)
PARETO_PEN = pg.mkPen((217, 130, 43), width=2, style=Qt.PenStyle.DashLine)
SELECTION_PEN = pg.mkPen((200, 30, 30), width=2.5)
GHOST_PEN = pg.mkPen((60, 60, 60), width=2, style=Qt.PenStyle.DashLine)
POINT_PEN = pg.mkPen((30, 30, 30), width=0.8)
COLOUR_LEVELS = 64  # brushes are quantised so pyqtgraph's symbol atlas reuses them


def chain_of(variant) -> str:
    """The technique chain of a variant: "original", "prune", "prune → quantize", ..."""
    steps = (variant.recipe or {}).get("steps") or []
    return " → ".join(str(s.get("technique")) for s in steps) if steps else "original"


def scale_for(kind: str, values: list[float]) -> tuple[float, str]:
    """(divisor, unit) that makes ``values`` readable on an axis."""
    top = max((abs(v) for v in values), default=0.0)
    if kind == "bytes":
        for div, unit in ((1024 ** 3, "GB"), (1024 ** 2, "MB"), (1024, "KB")):
            if top >= div:
                return float(div), unit
        return 1.0, "B"
    if kind == "count":
        for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if top >= div:
                return div, unit
        return 1.0, ""
    if kind == "fraction":
        return 0.01, "%"
    if kind == "ratio":
        return 1.0, "x"
    return 1.0, "ms"


def format_metric(kind: str, v: float | None) -> str:
    if v is None:
        return "-"
    div, unit = scale_for(kind, [v])
    if kind == "fraction":
        return f"{v * 100:.2f}%"
    return f"{v / div:.4g} {unit}".strip()


def tick_strings(values, spacing: float, log: bool = False) -> list[str]:
    """Tick labels with as many places as the tick spacing needs: 99.6, 99.8 (not 99.7214484679666);
    on a log axis plain numbers (200, 300, 1000) rather than 2·10²."""
    if log:
        # label 1, 2 and 5 of each decade only: "7 8 910" and "600700" ran together
        labelled = [v for v in values if round(10 ** (float(v) - math.floor(float(v) + 1e-9)), 3) in (1, 2, 5)]
        out = []
        for v in values:
            x = 10 ** float(v)
            text = f"{x:.3g}"
            text = f"{x:.0f}" if "e+" in text and x < 1e6 else text  # 1000, not 1e+03
            out.append(text if v in labelled or len(labelled) < 2 else "")
        return out
    if not spacing or not math.isfinite(spacing) or spacing <= 0:
        return [f"{v:g}" for v in values]
    places = max(0, -math.floor(math.log10(spacing) + 1e-9))
    while places < 8 and abs(round(spacing, places) - spacing) > spacing * 1e-6:  # 0.25 needs 2
        places += 1
    out = []
    for v in values:
        text = f"{v:.{places}f}"
        out.append("0" if float(text) == 0 else text)
    return out


def safe_tick_strings(values, scale, spacing, log: bool = False) -> list[str]:
    """:func:`tick_strings` that never raises: it runs inside Qt's paint, where an exception crashes
    PySide (pyqtgraph passes spacing None for log-scale minor ticks)."""
    try:
        return tick_strings([v * scale for v in values], (spacing or 0) * scale, log)
    except Exception:
        return [str(v) for v in values]


class _Axis(pg.AxisItem):
    """Ticks formatted by :func:`tick_strings`; the units are in the axis title (no "x0.001")."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.enableAutoSIPrefix(False)

    def tickStrings(self, values, scale, spacing):  # noqa: N802 - pyqtgraph's name
        return safe_tick_strings(values, scale, spacing, self.logMode)


class TradeoffChart(QWidget):
    """The scatter of every variant, bound to ``store``."""

    point_clicked = Signal(str)

    def __init__(self, store: VariantStore, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("tradeoff_chart")
        self.store = store
        self._names: list[str] = []  # variant name per point of ``scatter``, in order
        self._xy: dict[str, tuple[float, float]] = {}  # data coordinates (before log) per name
        self._ghost: dict[str, Any] | None = None
        self._chains: dict[str, str] = {}  # chain -> symbol, stable while the store lives
        self._updating = False
        self._pareto: list[str] = []
        self._ghost_xy: tuple[float, float] | None = None
        self._xdiv = self._ydiv = 1.0
        self._labels: dict[str, Any] = {}
        # a burst of store changes (a sweep finishing, a workspace opening) redraws once, a few
        # milliseconds after the landing's own work, not in the same turn of the event loop: the
        # redraw (5-10 ms, pyqtgraph's axes) and a landing's work back to back were the window's
        # longest stalls while runs landed one after another (issue 17)
        self._refresh_timer = QTimer(self)
        self._refresh_timer.setSingleShot(True)
        self._refresh_timer.setInterval(REFRESH_DELAY_MS)
        self._refresh_timer.timeout.connect(self.refresh)
        bar = self._build_toolbar()
        self._build_plot()
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(0)
        lay.addLayout(bar)
        lay.addWidget(self.view, 1)
        self.set_axes("size", "quality", colour="latency")
        self._connect(store)
        self.refresh()

    # --- building -----------------------------------------------------------------------------------
    def _build_toolbar(self) -> QHBoxLayout:
        """Axis and colour choices, log scales, the live-preview toggle, export."""
        bar = QHBoxLayout()
        bar.setContentsMargins(4, 2, 4, 2)
        self.x_combo, self.y_combo, self.colour_combo = QComboBox(), QComboBox(), QComboBox()
        for combo in (self.x_combo, self.y_combo):
            for m in METRICS.values():
                combo.addItem(m.title, m.key)
        self.colour_combo.addItem("none", "")
        for m in METRICS.values():
            self.colour_combo.addItem(m.title, m.key)
        for combo in (self.x_combo, self.y_combo, self.colour_combo):
            # short titles that fit whole ("Siz" / "Qu" were clipped); the full label as tooltip
            combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToContents)
            # they ask for their longest title but can be squeezed to the usual ones (Size, Quality)
            combo.setMinimumWidth(combo.fontMetrics().horizontalAdvance("Latency") + 40)
            for i in range(combo.count()):
                key = combo.itemData(i)
                if key:
                    combo.setItemData(i, METRICS[key].label, Qt.ItemDataRole.ToolTipRole)
            combo.currentIndexChanged.connect(
                lambda _i, c=combo: c.setToolTip(METRICS[c.currentData()].label if c.currentData() else ""))
        self._build_toggles()
        for label, widget in (("x:", self.x_combo), ("", self.log_x), ("y:", self.y_combo),
                              ("", self.log_y), ("colour:", self.colour_combo)):
            if label:
                bar.addWidget(QLabel(label))
            bar.addWidget(widget)
        bar.addStretch(1)
        bar.addWidget(self.live_toggle)
        bar.addWidget(self.export_button)
        return bar

    def _build_toggles(self) -> None:
        self.x_combo.setObjectName("chart_x")
        self.y_combo.setObjectName("chart_y")
        self.colour_combo.setObjectName("chart_colour")
        self.log_x = QCheckBox("log")
        self.log_y = QCheckBox("log")
        self.log_x.setToolTip("logarithmic x axis (size, latency, params, FLOPs)")
        self.log_y.setToolTip("logarithmic y axis (size, latency, params, FLOPs)")
        self.live_toggle = QToolButton()
        self.live_toggle.setText("Live preview")
        self.live_toggle.setCheckable(True)
        self.live_toggle.setChecked(True)
        self.live_toggle.setObjectName("live_preview_toggle")
        self.live_toggle.setToolTip("While a slider moves, show a hollow point where the estimate "
                                    "says the variant will land; when it rests, measure it for real "
                                    "(a newer setting cancels the older run)")
        self.export_button = QToolButton()
        self.export_button.setText("Export")
        self.export_button.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        menu = QMenu(self.export_button)
        for text, slot in (("Chart as PNG...", lambda: self._export_dialog("png")),
                           ("Chart as SVG...", lambda: self._export_dialog("svg")),
                           ("Data as CSV...", lambda: self._export_dialog("csv"))):
            act = QAction(text, menu)
            act.triggered.connect(lambda _=False, s=slot: s())
            menu.addAction(act)
        self.export_button.setMenu(menu)

    def _build_plot(self) -> None:
        """The plot: scatter, colour bar on the right, legend below; items built once (setData)."""
        self.view = pg.GraphicsLayoutWidget()
        self.view.setBackground(CHART_BG)
        self.view.setObjectName("chart_view")
        self.plot = self.view.addPlot(row=0, col=0, axisItems={"bottom": _Axis("bottom"),
                                                               "left": _Axis("left")})
        self.plot.showGrid(x=True, y=True, alpha=0.25)
        self.plot.setMenuEnabled(False)
        self.plot.hideButtons()
        self.cmap = pg.colormap.get("viridis")
        self.colour_bar = pg.ColorBarItem(values=(0, 1), colorMap=self.cmap, interactive=False,
                                          width=14)
        bar_axis = self.colour_bar.axis
        bar_axis.enableAutoSIPrefix(False)
        bar_axis.tickStrings = lambda values, scale, spacing: tick_strings(  # same format as the plot
            [v * scale for v in values], spacing * scale)
        # room for ticks like "324.5" beside the title (at pyqtgraph's fixed 45 px they overlapped);
        # a fixed width, as pyqtgraph's automatic one re-lays out while painting
        bar_axis.setWidth(80)
        self.view.addItem(self.colour_bar, row=0, col=1)
        self.legend = pg.LegendItem(colCount=6, labelTextColor=(40, 40, 40), labelTextSize="9pt")
        self.legend_row = self.view.addLayout(row=1, col=0, colspan=2)
        self.legend_row.addItem(self.legend)
        self.legend_row.setMaximumHeight(48)
        self._build_items()

    def _build_items(self) -> None:
        self.pareto_line = pg.PlotDataItem(pen=PARETO_PEN)
        self.pareto_line.setZValue(1)
        self.scatter = pg.ScatterPlotItem(size=11, pxMode=True, hoverable=True, tip=self._hover_tip,
                                          hoverPen=pg.mkPen((20, 20, 20), width=2))
        self.scatter.setZValue(2)
        self.baseline_item = pg.ScatterPlotItem(size=20, symbol=BASELINE_SYMBOL, hoverable=True,
                                                tip=self._hover_tip, pen=pg.mkPen((20, 20, 20), width=1.5),
                                                brush=pg.mkBrush(255, 200, 40))
        self.baseline_item.setZValue(3)
        self.selection_item = pg.ScatterPlotItem(size=24, symbol="o", pen=SELECTION_PEN, brush=None)
        self.selection_item.setZValue(4)
        self.ghost_item = pg.ScatterPlotItem(size=16, symbol="o", pen=GHOST_PEN, brush=None)
        self.ghost_item.setZValue(5)
        self.ghost_label = pg.TextItem("estimate", color=(60, 60, 60), anchor=(0, 1.2))
        self.ghost_label.setZValue(5)
        for item in (self.pareto_line, self.scatter, self.baseline_item, self.selection_item,
                     self.ghost_item, self.ghost_label):
            self.plot.addItem(item)
        self.ghost_label.hide()
        self.empty_label = pg.TextItem("Variants appear here as they are measured", color=(120, 120, 120),
                                       anchor=(0.5, 0.5))
        self.plot.addItem(self.empty_label)

    def _connect(self, store: VariantStore) -> None:
        self.x_combo.currentIndexChanged.connect(self._on_axes_changed)
        self.y_combo.currentIndexChanged.connect(self._on_axes_changed)
        self.colour_combo.currentIndexChanged.connect(self._on_axes_changed)
        self.log_x.toggled.connect(lambda _on: self.refresh())
        self.log_y.toggled.connect(lambda _on: self.refresh())
        self.scatter.sigClicked.connect(self._on_scatter_clicked)
        self.baseline_item.sigClicked.connect(self._on_scatter_clicked)
        store.variant_added.connect(lambda _n: self._refresh_timer.start())
        store.variant_changed.connect(lambda _n: self._refresh_timer.start())
        store.variant_removed.connect(lambda _n: self._refresh_timer.start())
        store.cleared.connect(self._on_store_cleared)
        store.selection_changed.connect(lambda _n: self._update_selection())

    # --- axes -------------------------------------------------------------------------------------
    @property
    def x_key(self) -> str:
        return str(self.x_combo.currentData())

    @property
    def y_key(self) -> str:
        return str(self.y_combo.currentData())

    @property
    def colour_key(self) -> str:
        return str(self.colour_combo.currentData() or "")

    def set_axes(self, x: str, y: str, colour: str | None = None, *, log_x: bool | None = None,
                 log_y: bool | None = None) -> None:
        """Choose the metrics on x, y (and colour); log scale defaults on for size and latency."""
        self._updating = True
        try:
            self.x_combo.setCurrentIndex(self.x_combo.findData(x))
            self.y_combo.setCurrentIndex(self.y_combo.findData(y))
            if colour is not None:
                self.colour_combo.setCurrentIndex(max(0, self.colour_combo.findData(colour)))
            self.log_x.setChecked(x in LOG_BY_DEFAULT if log_x is None else log_x)
            self.log_y.setChecked(y in LOG_BY_DEFAULT if log_y is None else log_y)
        finally:
            self._updating = False
        self.refresh()

    def _on_axes_changed(self, *_a) -> None:
        if self._updating:
            return
        self._updating = True
        self.log_x.setChecked(self.x_key in LOG_BY_DEFAULT)
        self.log_y.setChecked(self.y_key in LOG_BY_DEFAULT)
        self._updating = False
        self.refresh()

    def _log(self, axis: str) -> bool:
        key, box = (self.x_key, self.log_x) if axis == "x" else (self.y_key, self.log_y)
        return box.isChecked() and METRICS[key].loggable

    # --- data -------------------------------------------------------------------------------------
    def value(self, metrics: dict[str, Any], key: str) -> float | None:
        return METRICS[key].get(metrics or {}) if key else None

    def point_of(self, name: str) -> tuple[float, float] | None:
        """The plotted point of a variant in metric units (bytes, ms, fractions), or None."""
        return self._xy.get(name)

    def plotted_names(self) -> list[str]:
        return [n for n in self._xy]

    def pareto_names(self) -> list[str]:
        """The names the Pareto line connects, in x order."""
        return list(self._pareto)

    def _to_plot(self, value: float, axis: str, div: float) -> float:
        return float(self._to_plot_array(np.array([value], float), axis, div)[0])

    def _to_plot_array(self, values: np.ndarray, axis: str, div: float) -> np.ndarray:
        v = values / div
        if self._log(axis):
            with np.errstate(divide="ignore", invalid="ignore"):
                return np.where(v > 0, np.log10(np.where(v > 0, v, 1.0)), np.nan)
        return v

    def refresh(self) -> None:
        """Redraw every point from the store (one setData per item)."""
        self._refresh_timer.stop()
        xk, yk, ck = self.x_key, self.y_key, self.colour_key
        mx, my = METRICS[xk], METRICS[yk]
        log_x, log_y = self._log("x"), self._log("y")
        rows = []
        for v in self.store.variants():
            if v.status != "ok" or not v.metrics:
                continue
            x, y = _value_of(mx, v), _value_of(my, v)
            if x is None or y is None or (log_x and x <= 0) or (log_y and y <= 0):
                continue
            rows.append((v, x, y))
        ghost_xy = None
        if self._ghost:
            gx, gy = mx.get(self._ghost), my.get(self._ghost)
            if gx is not None and gy is not None:
                ghost_xy = (gx, gy)
        xs = np.array([r[1] for r in rows], float)
        ys = np.array([r[2] for r in rows], float)
        gxs = [ghost_xy[0]] if ghost_xy else []
        gys = [ghost_xy[1]] if ghost_xy else []
        self._xdiv, xunit = scale_for(mx.kind, [float(np.abs(xs).max()), *gxs] if len(xs) else gxs)
        self._ydiv, yunit = scale_for(my.kind, [float(np.abs(ys).max()), *gys] if len(ys) else gys)
        names = [r[0].name for r in rows]
        self._xy = {n: (float(x), float(y)) for n, x, y in zip(names, xs, ys)}
        px_all = self._to_plot_array(xs, "x", self._xdiv)
        py_all = self._to_plot_array(ys, "y", self._ydiv)
        is_base = np.array([n == BASELINE for n in names], bool)
        others = [r[0] for r, b in zip(rows, is_base) if not b]
        self._names = [v.name for v in others]
        symbols = [self._symbol_for(chain_of(v)) for v in others]
        brushes = self._brushes(others, ck)
        self.scatter.setData(x=px_all[~is_base], y=py_all[~is_base], symbol=symbols, brush=brushes,
                             data=self._names, pen=POINT_PEN)
        if is_base.any():
            self.baseline_item.setData(x=px_all[is_base][:1], y=py_all[is_base][:1], data=[BASELINE])
        else:
            self.baseline_item.setData(x=[], y=[])
        # Pareto line: the variants no other beats on both axes shown, by x (the tooltip says the same)
        front = pareto_2d(self._xy, mx, my)
        self._pareto = front
        index = {n: i for i, n in enumerate(names)}
        sel = np.array([index[f] for f in front], int)
        self.pareto_line.setData(x=px_all[sel] if len(sel) else [], y=py_all[sel] if len(sel) else [])
        self._draw_ghost(ghost_xy)
        self._update_selection()
        self._update_axes(mx, my, xunit, yunit)
        self._update_legend(rows)
        self.empty_label.setVisible(not rows)
        if not rows:
            self.empty_label.setPos(0.5, 0.5)

    def _symbol_for(self, chain: str) -> str:
        if chain not in self._chains:
            used = len(self._chains)
            self._chains[chain] = SYMBOLS[used % len(SYMBOLS)]
        return self._chains[chain]

    def _brushes(self, variants: list, key: str) -> list:
        if not key:
            self.colour_bar.hide()
            brush = pg.mkBrush(*NO_COLOUR_BRUSH)
            return [brush] * len(variants)
        metric = METRICS[key]
        values = [metric.get(v.metrics) for v in variants]
        baseline = self.store.baseline
        ref = [x for x in values if x is not None]
        if baseline is not None and metric.get(baseline.metrics) is not None:
            ref.append(metric.get(baseline.metrics))
        lo, hi = (min(ref), max(ref)) if ref else (0.0, 1.0)
        if hi <= lo:
            hi = lo + (abs(lo) * 0.01 or 1.0)
        div, unit = scale_for(metric.kind, ref or [1.0])
        self.colour_bar.show()
        self.colour_bar.setLevels((lo / div, hi / div))
        text = f"{metric.title} ({unit})" if unit else metric.title
        if self._labels.get("colour") != text:
            self._labels["colour"] = text
            self.colour_bar.axis.setLabel(text)
        lut = getattr(self, "_lut", None)
        if lut is None:
            colours = self.cmap.getLookupTable(0.0, 1.0, COLOUR_LEVELS, alpha=False)
            self._lut = lut = [pg.mkBrush(int(r), int(g), int(b), 230) for r, g, b in colours]
        grey = pg.mkBrush(200, 200, 200, 200)
        out = []
        for x in values:
            if x is None:
                out.append(grey)
            else:
                i = int((x - lo) / (hi - lo) * (COLOUR_LEVELS - 1) + 0.5)
                out.append(lut[min(max(i, 0), COLOUR_LEVELS - 1)])
        return out

    def _update_axes(self, mx: Metric, my: Metric, xunit: str, yunit: str) -> None:
        for axis, metric, unit, log in (("bottom", mx, xunit, self._log("x")),
                                        ("left", my, yunit, self._log("y"))):
            label = metric.title
            if metric.key == "latency":
                base = self.store.baseline
                lat = (base.metrics.get("latency_ms") or {}) if base is not None else {}
                if lat.get("batch"):
                    label = f"Latency, median at batch {lat['batch']}"
            text = f"{label} ({unit}{', log scale' if log else ''})" if unit else label
            if self._labels.get(axis) != (text, log):
                self._labels[axis] = (text, log)
                self.plot.setLabel(axis, text)
                self.plot.getAxis(axis).setLogMode(log)
        self.log_x.setEnabled(mx.loggable)
        self.log_y.setEnabled(my.loggable)

    def _update_legend(self, rows: list) -> None:
        chains = list(dict.fromkeys(chain_of(r[0]) for r in rows))
        shown = getattr(self, "_legend_chains", None)
        if shown == chains:
            return
        self._legend_chains = chains
        self.legend.clear()
        for c in chains:
            if c == "original":
                sample = pg.ScatterPlotItem(symbol=BASELINE_SYMBOL, size=14, brush=pg.mkBrush(255, 200, 40),
                                            pen=pg.mkPen((20, 20, 20)))
                self.legend.addItem(sample, "original (baseline)")
            else:
                sample = pg.ScatterPlotItem(symbol=self._symbol_for(c), size=11,
                                            brush=pg.mkBrush(*NO_COLOUR_BRUSH), pen=pg.mkPen((30, 30, 30)))
                self.legend.addItem(sample, c)
        if self._pareto or len(chains) > 1:
            self.legend.addItem(pg.PlotDataItem(pen=PARETO_PEN), "Pareto front")

    # --- selection --------------------------------------------------------------------------------
    def _update_selection(self) -> None:
        name = self.store.selected
        xy = self._xy.get(name) if name else None
        if xy is None:
            self.selection_item.setData(x=[], y=[])
            return
        self.selection_item.setData(x=[self._to_plot(xy[0], "x", self._xdiv)],
                                    y=[self._to_plot(xy[1], "y", self._ydiv)], data=[name])

    def _on_scatter_clicked(self, _item, points, _ev=None) -> None:
        if len(points):
            name = points[0].data()
            if name:
                self.point_clicked.emit(str(name))
                self.store.select(str(name))

    def _on_store_cleared(self) -> None:
        self._chains.clear()
        self._ghost = None
        self.refresh()

    # --- hover ------------------------------------------------------------------------------------
    def tooltip_for(self, name: str) -> str:
        v = self.store.get(name)
        if v is None:
            return ""
        steps = (v.recipe or {}).get("steps") or []
        lines = [v.name, "steps: " + (" → ".join(step_label(s) for s in steps) if steps else "original")]
        m = v.metrics or {}
        for key in ("size", "compressed", "latency", "params", "nonzero", "flops", "accuracy", "agreement"):
            metric = METRICS[key]
            val = metric.get(m)
            if val is not None:
                lines.append(f"{metric.label}: {format_metric(metric.kind, val)}")
        sp = (m.get("latency_ms") or {}).get("speedup")
        if sp:
            with contextlib.suppress(TypeError, ValueError, KeyError):  # incomplete, read back from a file
                lines.append(f"speed-up: {sp['median']:.2f}x (95% interval {sp['low']:.2f}-{sp['high']:.2f})"
                             + (", noisy" if sp.get("noisy") else ""))
        if name in self._pareto:
            lines.append(f"on the Pareto front of {METRICS[self.x_key].title.lower()} and "
                         f"{METRICS[self.y_key].title.lower()} (the dashed line)")
        if v.warnings:
            lines.append(f"⚠ {v.warnings[0]}")
        return "\n".join(lines)

    def _hover_tip(self, x=None, y=None, data=None) -> str:
        return self.tooltip_for(str(data)) if data else ""

    # --- ghost ------------------------------------------------------------------------------------
    def set_ghost(self, metrics: dict[str, Any] | None) -> None:
        """Show a hollow point at estimated ``metrics`` (the store's metric keys), or hide it."""
        self._ghost = dict(metrics) if metrics else None
        mx, my = METRICS[self.x_key], METRICS[self.y_key]
        xy = None
        if self._ghost:
            gx, gy = mx.get(self._ghost), my.get(self._ghost)
            if gx is not None and gy is not None:
                xy = (gx, gy)
        if xy is not None and self._xy:
            # cheap path while a slider moves: only the ghost moves unless the units change
            div_x, _ = scale_for(mx.kind, [p[0] for p in self._xy.values()] + [xy[0]])
            div_y, _ = scale_for(my.kind, [p[1] for p in self._xy.values()] + [xy[1]])
            if div_x == self._xdiv and div_y == self._ydiv:
                self._draw_ghost(xy)
                return
        self.refresh()

    def ghost_point(self) -> tuple[float, float] | None:
        """The ghost's position in metric units, or None when hidden."""
        return self._ghost_xy

    def _draw_ghost(self, xy: tuple[float, float] | None) -> None:
        self._ghost_xy = xy
        if xy is None:
            self.ghost_item.setData(x=[], y=[])
            self.ghost_label.hide()
            return
        px, py = self._to_plot(xy[0], "x", self._xdiv), self._to_plot(xy[1], "y", self._ydiv)
        self.ghost_item.setData(x=[px], y=[py])
        quality_known = bool(self._ghost.get("quality_estimated")) if self._ghost else False
        needs_quality = not METRICS[self.x_key].loggable or not METRICS[self.y_key].loggable
        self.ghost_label.setText("estimate" if quality_known or not needs_quality
                                 else "estimate (quality not yet known)")
        self.ghost_label.setPos(px, py)
        self.ghost_label.show()

    # --- export -----------------------------------------------------------------------------------
    def export_png(self, path: str, width: int = 1400) -> str:
        from pyqtgraph.exporters import ImageExporter

        exporter = ImageExporter(self.view.scene())
        exporter.parameters()["width"] = width
        exporter.export(str(path))
        return str(path)

    def export_svg(self, path: str) -> str:
        """SVG through pyqtgraph's exporter; where it cannot parse this Qt's SVG paths (pyqtgraph
        0.14 with Qt 6.10+ fails in ``correctCoordinates``), the scene is painted into Qt's own
        QSvgGenerator instead: the same picture, with less tidy grouping."""
        from pyqtgraph.exporters import SVGExporter

        try:
            SVGExporter(self.view.scene()).export(str(path))
            return str(path)
        except ValueError:
            pass
        from PySide6.QtCore import QRectF, QSize
        from PySide6.QtGui import QPainter
        from PySide6.QtSvg import QSvgGenerator

        rect = self.view.scene().sceneRect()
        gen = QSvgGenerator()
        gen.setFileName(str(path))
        gen.setSize(QSize(int(rect.width()), int(rect.height())))
        gen.setViewBox(QRectF(0, 0, rect.width(), rect.height()))
        gen.setTitle("Tugboat trade-off chart")
        # export mode makes the scatter draw vector symbols instead of its cached pixmaps
        items = [i for i in self.view.scene().items() if hasattr(i, "setExportMode")]
        for item in items:
            item.setExportMode(True, {"antialias": True, "background": pg.mkColor(CHART_BG)})
        painter = QPainter(gen)
        try:
            painter.setRenderHint(QPainter.RenderHint.Antialiasing)
            self.view.scene().render(painter, QRectF(0, 0, rect.width(), rect.height()), rect)
        finally:
            painter.end()
            for item in items:
                item.setExportMode(False)
        return str(path)

    def report_dict(self) -> dict[str, Any]:
        """The store as a report.json-like dictionary (for CSV export)."""
        base = self.store.baseline
        return {
            "baseline": {"metrics": dict(base.metrics) if base is not None else {},
                         "warnings": list(base.warnings) if base is not None else []},
            "variants": [v.to_dict() for v in self.store.variants() if v.name != BASELINE],
            "pareto": self.store.pareto(),
        }

    def to_csv(self) -> str:
        from ..engine.running.report_html import to_csv

        return to_csv(self.report_dict())

    def export_csv(self, path: str) -> str:
        from ..engine.stored import atomic_write_bytes

        atomic_write_bytes(path, self.to_csv().encode("utf-8"))
        return str(path)

    def export(self, path: str) -> str:
        """Export by the file's suffix: .png, .svg or .csv."""
        suffix = str(path).lower().rsplit(".", 1)[-1]
        return {"png": self.export_png, "svg": self.export_svg, "csv": self.export_csv}[suffix](path)

    def _export_dialog(self, kind: str) -> None:
        filters = {"png": "PNG image (*.png)", "svg": "SVG image (*.svg)", "csv": "CSV table (*.csv)"}
        path, _ = QFileDialog.getSaveFileName(self, "Export the trade-off chart", f"tradeoff.{kind}",
                                              filters[kind])
        if path:
            if not path.lower().endswith("." + kind):
                path += "." + kind
            self.export(path)
