"""The window on a laptop screen: it fits 1366x768 (minimum size at most 1280x720) with every panel,
button and chart control reachable and unclipped; screenshots at 1366x768 and 1920x1080."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PySide6.QtCore import QRect
from PySide6.QtWidgets import QComboBox, QWidget

from tugboat.engine.measuring.measure import MeasureConfig
from tugboat.ui.main_window import MainWindow

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def window(qtbot):
    w = MainWindow()
    qtbot.addWidget(w)
    w.session.measure = MeasureConfig(batch=16, threads=1, warmup=1, min_runs=3, min_seconds=0.0,
                                      max_seconds=0.2, also_batch1=False, both_runtimes=False)
    w.show()
    yield w
    w.queue.shutdown(10)


def _in_window(window, w: QWidget) -> bool:
    """``w`` is shown and lies wholly inside the window (nothing cut off at its edges)."""
    if not w.isVisible():
        return False
    top_left = w.mapTo(window, w.rect().topLeft())
    return window.rect().contains(QRect(top_left, w.size()))


def _shots_dir(tmp_path) -> Path:
    out = Path(os.environ.get("TUGBOAT_SHOTS_DIR", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    return out


def test_minimum_size_fits_a_laptop(window):
    hint = window.minimumSizeHint()
    assert hint.width() <= 1280 and hint.height() <= 720, hint


@pytest.mark.parametrize("size", [(1366, 768), (1920, 1080)])
def test_every_panel_reachable_and_unclipped(qtbot, window, tmp_path, size):
    window.load_demo()
    with qtbot.waitSignal(window.session.baseline_ready, timeout=120000):
        pass
    window.resize(*size)
    qtbot.waitUntil(lambda: window.width() == size[0], timeout=3000)
    qtbot.wait(100)
    assert window.size().width() == size[0] and window.size().height() == size[1]
    for dock in (window.model_dock, window.technique_dock, window.jobs_dock):
        assert _in_window(window, dock), dock.windowTitle()
        assert dock.width() >= dock.minimumSizeHint().width()
    assert _in_window(window, window.jobs_view.cancel_all_button)
    # every technique tab: its Run button is in view without scrolling
    for name in window.panels:
        panel = window.show_panel(name)
        qtbot.wait(20)
        assert _in_window(window, panel.run_button), name
        assert _in_window(window, panel.method_combo) or panel.method_combo.visibleRegion().isEmpty()
        # no control runs past the right edge of the scrolling page (the form is not cut off)
        viewport = panel.parentWidget()
        for pname, control in panel.controls.items():
            if not control.isVisible():  # a row of another method
                continue
            right = control.mapTo(viewport, control.rect().topRight()).x()
            assert right < viewport.width(), (name, pname, right, viewport.width())
    # chart controls are as wide as they ask to be (no "Siz" / "Qu")
    chart = window.chart
    for combo in chart.findChildren(QComboBox):
        text_width = combo.fontMetrics().horizontalAdvance(combo.currentText())
        assert combo.width() >= text_width + 24, (combo.objectName(), combo.currentText())
        assert _in_window(window, combo)
    assert _in_window(window, chart.export_button)
    # the legend row and the plot stay inside the chart view
    view = chart.view
    assert view.width() > 300 and view.height() > 150
    shot = _shots_dir(tmp_path) / f"window-{size[0]}x{size[1]}.png"
    assert window.grab().save(str(shot))
    assert shot.stat().st_size > 10_000
