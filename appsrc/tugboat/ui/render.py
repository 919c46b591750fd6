"""Offscreen chart rendering for reports: the trade-off chart as PNG bytes, drawn with pyqtgraph.

Two panels share the quality axis: quality against latency, and quality against size. The
baseline is a square, Pareto-front variants are filled and labelled, the rest are hollow. Works
without a display (``QT_QPA_PLATFORM=offscreen`` is set when no display is available).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from ..engine.running.report_json import pareto_labels, quality_of

PARETO_COLOR = (217, 130, 43)
OTHER_COLOR = (70, 110, 170)
BASELINE_COLOR = (40, 40, 40)


def _app():
    if not os.environ.get("QT_QPA_PLATFORM") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")) \
            and sys.platform.startswith("linux"):
        os.environ["QT_QPA_PLATFORM"] = "offscreen"
    from PySide6.QtWidgets import QApplication

    return QApplication.instance() or QApplication([])


def _points(report: dict[str, Any]) -> list[dict[str, Any]]:
    pareto = set(report.get("pareto") or [])
    labels = pareto_labels(report)
    entries = [{"name": "baseline", **(report.get("baseline") or {})}, *list(report.get("variants") or [])]
    pts = []
    for e in entries:
        m = e.get("metrics") or {}
        q = quality_of(m)
        lat = (m.get("latency_ms") or {}).get("median")
        if q is None or lat is None or m.get("size_bytes") is None:
            continue
        pts.append({"name": e.get("name", ""), "quality": q * 100, "latency": float(lat),
                    "size": m["size_bytes"] / 1024, "pareto": e.get("name") in pareto,
                    "label": labels.get(e.get("name", ""), "baseline" if e.get("name") == "baseline" else ""),
                    "baseline": e.get("name") == "baseline"})
    return pts


def tradeoff_png(report: dict[str, Any], width: int = 1100, height: int = 460) -> bytes:
    """The report's trade-off chart as PNG bytes."""
    import pyqtgraph as pg
    from PySide6.QtCore import QBuffer, QByteArray, QIODevice, Qt

    pts = _points(report)
    labelled = "accuracy (%)" if any(
        (e.get("metrics") or {}).get("accuracy") is not None for e in [report.get("baseline") or {}]
    ) else "top-1 agreement (%)"
    app = _app()
    layout = pg.GraphicsLayoutWidget()
    layout.setBackground("w")
    layout.setAttribute(Qt.WidgetAttribute.WA_DontShowOnScreen, True)
    layout.resize(width, height)
    for col, (key, axis) in enumerate((("latency", "latency, median (ms)"), ("size", "size on disk (KB)"))):
        plot = layout.addPlot(row=0, col=col)
        plot.setLabel("bottom", axis)
        plot.setLabel("left", labelled)
        plot.showGrid(x=True, y=True, alpha=0.25)
        plot.setTitle(f"quality vs {key}", color="#333")
        for p in sorted(pts, key=lambda p: (p["pareto"], p["baseline"])):  # highlighted points on top
            color = BASELINE_COLOR if p["baseline"] else (PARETO_COLOR if p["pareto"] else OTHER_COLOR)
            brush = pg.mkBrush(*color) if (p["pareto"] or p["baseline"]) else pg.mkBrush(255, 255, 255)
            plot.addItem(pg.ScatterPlotItem([p[key]], [p["quality"]], size=11 if p["pareto"] else 9,
                                            symbol="s" if p["baseline"] else "o", brush=brush,
                                            pen=pg.mkPen(*color, width=1.5)))
            if p["pareto"] or p["baseline"]:
                # numbers, not names: long names overlap; the report's table has the key
                text = pg.TextItem(p["label"], color=color, anchor=(0, 1))
                text.setPos(p[key], p["quality"])
                plot.addItem(text)
        if pts:
            xs = [p[key] for p in pts]
            span = (max(xs) - min(xs)) or max(xs) or 1.0
            plot.setXRange(min(xs) - 0.05 * span, max(xs) + 0.15 * span, padding=0)
    layout.show()
    app.processEvents()
    image = layout.grab().toImage()
    layout.close()
    data = QByteArray()
    buf = QBuffer(data)
    buf.open(QIODevice.OpenModeFlag.WriteOnly)
    image.save(buf, "PNG")
    buf.close()
    layout.deleteLater()
    app.processEvents()
    return bytes(data.data())
