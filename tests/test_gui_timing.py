"""The window shows trustworthy timings: the paired speed-up and its interval in the table and on
the chart, the machine in the status bar, and Re-measure on selected variants (issue 17)."""

from __future__ import annotations

import json

import pytest
from PySide6.QtCore import Qt

from helpers import run_prune
from tugboat.engine.measuring.measure import MeasureConfig
from tugboat.ui.main_window import MainWindow
from tugboat.ui.results_table import COLUMNS

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


def test_speedup_interval_machine_and_remeasure_in_the_window(qtbot, window, tmp_path):
    assert "cores" in window.machine_label.text() and window.machine_label.isVisible()
    with qtbot.waitSignal(window.session.baseline_ready, timeout=120000):
        window.load_demo()
    window.new_workspace(str(tmp_path / "ws"))
    qtbot.waitUntil(lambda: window.session.baseline is not None and window.store.baseline is not None,
                    timeout=120000)
    v = run_prune(qtbot, window, 0.5)
    qtbot.waitUntil(lambda: not window.queue.active(), timeout=60000)
    sp = v.metrics["latency_ms"]["speedup"]
    assert sp["low"] <= sp["median"] <= sp["high"]

    table = window.results_table
    model = table.model()
    col = COLUMNS.index("Speed-up")
    row = next(r for r in range(model.rowCount()) if table.name_at_row(r) == v.name)
    text = model.index(row, col).data()
    assert text.startswith(f"{sp['median']:.2f}x (") and f"{sp['low']:.2f}-{sp['high']:.2f}" in text
    assert "95% interval" in model.index(row, col).data(Qt.ItemDataRole.ToolTipRole)

    # the chart's speed-up axis: the original at 1x, the variant at its paired speed-up
    window.chart.set_axes("speedup", "quality")
    assert window.chart.point_of("baseline")[0] == 1.0
    assert window.chart.point_of(v.name)[0] == pytest.approx(sp["median"])

    # Re-measure from the context menu, on the selected variant
    window.store.select(v.name)
    menu = table.build_menu(v.name)
    action = next(a for a in menu.actions() if a.objectName() == "remeasure_action")
    assert action.isEnabled()
    old_blocks = dict(sp)
    with qtbot.waitSignal(window.session.remeasured, timeout=60000) as blocker:
        action.trigger()
    assert set(blocker.args[0]) == {"baseline", v.name}
    new = window.store.get(v.name).metrics["latency_ms"]["speedup"]
    assert new != old_blocks  # timed again (a new block count, time or interval)
    assert window.session.baseline.metrics is window.store.baseline.metrics
    # saved: the variant's metrics.json and report.json hold the new timing and the machine
    ws = window.workspace
    record = json.loads((ws.path / ws._folders[v.name] / "metrics.json").read_text())
    assert record["metrics"]["latency_ms"]["speedup"] == new
    report = json.loads((ws.path / "report.json").read_text())
    assert report["machine"]["cpu"] and report["remeasured"]["variants"] == [v.name]
