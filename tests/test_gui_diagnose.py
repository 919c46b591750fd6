"""The Diagnose view in the real window: a static-int8 variant of a CNN with one layer that int8
cannot represent, diagnosed from the results table; "keep in float" on the worst row makes a new
variant that recovers the accuracy; Compare puts the two side by side.

Set ``TUGBOAT_SHOTS_DIR`` to also write the 1366x768 screenshots there (docs/screenshots)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PySide6.QtCore import Qt

from test_diagnose import CULPRIT, hard_to_quantize
from tugboat.engine.io.models import export_onnx_model
from tugboat.engine.measuring.measure import MeasureConfig
from tugboat.ui.diagnose_view import (
    COL_ACCUM,
    COL_CHANNELS,
    COL_IF_FLOAT,
    COL_IMPACT,
    CompareDialog,
    DiagnoseView,
)
from tugboat.ui.main_window import MainWindow

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


@pytest.fixture
def window(qtbot):
    w = MainWindow()
    qtbot.addWidget(w)
    w.session.measure = MeasureConfig(batch=16, threads=1, warmup=1, min_runs=3, min_seconds=0.0,
                                      max_seconds=0.2, also_batch1=False, both_runtimes=False)
    w.resize(1366, 768)
    w.show()
    yield w
    w.queue.shutdown(10)


def click_row(qtbot, table, view_row: int) -> None:
    rect = table.visualRect(table.model().index(view_row, 0))
    qtbot.mouseClick(table.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())


def row_of(window, name: str) -> int:
    t = window.results_table
    return next(r for r in range(t.model().rowCount()) if t.name_at_row(r) == name)


def shot(widget, name: str, tmp_path: Path) -> Path:
    folder = Path(os.environ.get("TUGBOAT_SHOTS_DIR") or tmp_path)
    path = folder / f"{name}.png"
    assert widget.grab().save(str(path))
    return path


def test_diagnose_ranks_the_bad_layer_and_keep_in_float_recovers(qtbot, window, tmp_path, demo_models):
    import onnx

    model = tmp_path / "bad-layer-cnn.onnx"
    onnx.save(export_onnx_model(hard_to_quantize(demo_models("digits-cnn"))), str(model))
    with qtbot.waitSignal(window.session.baseline_ready, timeout=120000):
        window.load_model(str(model), "demo:digits")
    base_acc = window.store.baseline.metrics["accuracy"]

    panel = window.show_panel("quantize")
    panel.method_combo.setCurrentIndex(panel.method_combo.findData("static-int8"))  # the default is auto
    assert panel.method == "static-int8"
    panel.set_value("calibration_samples", 64)
    # GPTQ rounding (the default) spreads the bad layer's weight rounding error so well that int8
    # hardly hurts; the layer's int8 weights rounded to nearest break the model, as a real culprit does
    panel.set_value("rounding", "nearest")
    panel.run_button.click()
    qtbot.waitUntil(lambda: len(window.store) == 2, timeout=120000)
    broken = window.store.variants()[-1]
    assert broken.status == "ok" and broken.metrics["accuracy"] < base_acc - 0.3

    view = window.diagnose_view
    assert isinstance(view, DiagnoseView)
    window.view_tabs.setCurrentWidget(view)
    assert not view.diagnose_button.isEnabled()  # nothing selected yet
    click_row(qtbot, window.results_table, row_of(window, broken.name))
    assert window.store.selected == broken.name and view.diagnose_button.isEnabled()
    qtbot.mouseClick(view.diagnose_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: view.result is not None, timeout=120000)

    table = view.table
    assert table.model().rowCount() >= 4
    top = table.model().index(0, 1).data()
    assert top == CULPRIT and view.selected_row()["layer"] == CULPRIT
    assert "Keep this layer in float" in view.fix_button.text() and view.fix_button.isEnabled()
    assert f"Best fix measured: keep <b>{CULPRIT}</b> in float" in view.title.text()
    assert float(table.model().index(0, COL_IF_FLOAT).data().rstrip("%")) > 95
    # colour-coded: the culprit's row is red, a harmless layer's is green
    last = table.model().rowCount() - 1
    red = table.model().index(0, COL_IMPACT).data(Qt.ItemDataRole.BackgroundRole).color()
    green = table.model().index(last, COL_IMPACT).data(Qt.ItemDataRole.BackgroundRole).color()
    assert red.red() > red.green() and green.green() > green.red()
    # sortable: by the accumulated SQNR, then back by rank
    table.sortByColumn(COL_ACCUM, Qt.SortOrder.AscendingOrder)
    accumulated = [float(table.model().index(r, COL_ACCUM).data()) for r in range(table.model().rowCount())]
    assert accumulated == sorted(accumulated)
    table.sortByColumn(0, Qt.SortOrder.AscendingOrder)
    assert view.select_layer(CULPRIT)
    menu = view.build_menu(view.selected_row())
    assert [a.text() for a in menu.actions()] == ["Keep this layer in float"]
    shot(window, "diagnose", tmp_path)

    qtbot.mouseClick(view.fix_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: len(window.store) == 3, timeout=120000)
    fixed = window.store.variants()[-1]
    step = fixed.recipe["steps"][0]
    assert step["technique"] == "quantize" and step["exclude"] == [view.result["rows"][0]["node"]]
    assert fixed.status == "ok" and fixed.metrics["accuracy"] >= base_acc - 0.02
    # it lands on the chart like any run (the chart redraws a moment after the store changes)
    qtbot.waitUntil(lambda: fixed.name in window.chart.plotted_names(), timeout=2000)

    # Compare: the last two selected variants side by side
    click_row(qtbot, window.results_table, row_of(window, broken.name))
    click_row(qtbot, window.results_table, row_of(window, fixed.name))
    qtbot.mouseClick(view.compare_button, Qt.MouseButton.LeftButton)
    dialog = window.findChild(CompareDialog)
    assert dialog is not None and dialog.isVisible()
    assert (dialog.a_combo.currentText(), dialog.b_combo.currentText()) == (broken.name, fixed.name)
    keys = [dialog.recipe_table.item(r, 0).text() for r in range(dialog.recipe_table.rowCount())]
    assert keys == ["steps.0.exclude"]
    metrics = {dialog.metrics_table.item(r, 0).text(): dialog.metrics_table.item(r, 2).text()
               for r in range(dialog.metrics_table.rowCount())}
    assert "accuracy" in metrics and "size_bytes" in metrics
    layers = {dialog.layers_table.item(r, 0).text() for r in range(dialog.layers_table.rowCount())}
    assert CULPRIT in layers
    dialog.resize(720, 420)
    shot(dialog, "compare", tmp_path)
    dialog.close()


def test_diagnose_pruned_variant_prune_less(qtbot, window, tmp_path):
    from helpers import run_prune

    with qtbot.waitSignal(window.session.baseline_ready, timeout=120000):
        window.load_demo()
    pruned = run_prune(qtbot, window, 0.5)
    window.store.select(pruned.name)
    qtbot.waitUntil(lambda: not window.queue.active(), timeout=60000)
    view = window.diagnose_view
    first = view.run_diagnose()
    qtbot.mouseClick(view.cancel_button, Qt.MouseButton.LeftButton)  # cancelled at its first update
    qtbot.waitUntil(lambda: first.is_ended, timeout=60000)
    assert first.state == "cancelled" and "cancelled" in view.title.text() and view.result is None
    assert view.diagnose_button.isEnabled() and not view.cancel_button.isEnabled()
    job = window.diagnose_selected()  # Run > Diagnose selected variant
    assert job is not None and window.view_tabs.currentWidget() is window.diagnose_view
    qtbot.waitUntil(lambda: view.result is not None, timeout=120000)
    row = view.selected_row()
    assert row["action"]["kind"] == "prune_less" and view.fix_button.text() == "Prune this layer less"
    channels = view.table.model().index(0, COL_CHANNELS).data()
    assert channels == f"{row['channels']['after']}/{row['channels']['before']}"
    shot(view, "diagnose-pruned", tmp_path)
    before = len(window.store)
    view.apply_fix(row)
    qtbot.waitUntil(lambda: len(window.store) == before + 1, timeout=120000)
    new = window.store.variants()[-1]
    assert new.recipe["steps"][0]["layer_ratios"] == [f"{row['layer']}={row['action']['ratio']:g}"]
    kept = new.info["pruning"]["kept_channels"][row["layer"]]
    assert kept["after"] > row["channels"]["after"]  # that layer really kept more channels
