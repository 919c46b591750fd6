"""The trade-off chart and live preview, offscreen: points, Pareto line, selection sync with the
results table, axis pickers, CSV export, and the ghost point that follows a slider in the real
window (no job until the slider rests; a newer setting cancels the older job)."""

from __future__ import annotations

import csv
import io
import math

import pytest
from PySide6.QtCore import QPointF, Qt

from tugboat.engine.measuring.measure import MeasureConfig
from tugboat.engine.running.report_json import dominates, objectives
from tugboat.engine.running.variants import Variant
from tugboat.jobs import CANCELLED, DONE
from tugboat.ui.chart import TradeoffChart
from tugboat.ui.main_window import MainWindow
from tugboat.ui.results_table import ResultsTable
from tugboat.ui.store import VariantStore

pytestmark = pytest.mark.timeout(180)


def _metrics(size: int, latency: float, accuracy: float, flops: int | None = None) -> dict:
    return {"size_bytes": size, "compressed_bytes": int(size * 0.9), "params": size // 4,
            "nonzero_params": size // 4, "flops": flops if flops is not None else size * 3,
            "latency_ms": {"median": latency, "p90": latency * 1.1, "batch": 64, "runtime": "onnxruntime"},
            "accuracy": accuracy, "fidelity": {"top1_agreement": accuracy, "cosine": 0.99, "rel_error": 0.01}}


PRUNE = [{"technique": "prune", "method": "structured", "ratio": 0.5}]
QUANT = [{"technique": "quantize", "method": "static-int8"}]
# (name, steps, size, latency, accuracy): a, b, d and the baseline are non-dominated; c is
# dominated by b (bigger, slower, worse); e is dominated by a
ROWS = [
    ("a", PRUNE, 100_000, 0.5, 0.80),
    ("b", QUANT, 200_000, 0.9, 0.93),
    ("c", PRUNE, 300_000, 1.2, 0.90),
    ("d", PRUNE + QUANT, 60_000, 0.7, 0.70),
    ("e", QUANT, 150_000, 0.6, 0.79),
]


@pytest.fixture
def store():
    s = VariantStore()
    s.set_baseline(Variant("baseline", {"steps": []}, _metrics(640_000, 1.7, 0.97)))
    for name, steps, size, lat, acc in ROWS:
        s.add(Variant(name, {"steps": steps}, _metrics(size, lat, acc)))
    s.add(Variant("broken", {"steps": PRUNE}, {}, status="failed", error="numerical failure"))
    return s


@pytest.fixture
def chart(qtbot, store):
    c = TradeoffChart(store)
    qtbot.addWidget(c)
    c.resize(900, 560)
    c.show()
    qtbot.waitExposed(c)
    c.refresh()
    return c


def _scatter_points(chart) -> dict[str, tuple[float, float]]:
    x, y = chart.scatter.getData()
    names = list(chart.scatter.data["data"])
    return {n: (float(a), float(b)) for n, a, b in zip(names, x, y)}


def test_variants_appear_as_points_with_their_coordinates(qtbot, chart, store):
    chart.set_axes("size", "accuracy", log_x=False)
    pts = _scatter_points(chart)
    assert set(pts) == {name for name, *_ in ROWS}  # not the failed one, baseline drawn apart
    assert chart._xdiv == 1024  # KB on the axis
    for name, _steps, size, _lat, acc in ROWS:
        assert pts[name][0] == pytest.approx(size / 1024)
        assert pts[name][1] == pytest.approx(acc * 100)
        assert chart.point_of(name) == pytest.approx((size, acc))
    bx, by = chart.baseline_item.getData()
    assert (bx[0], by[0]) == pytest.approx((640_000 / 1024, 97.0))
    assert "KB" in chart.plot.getAxis("bottom").labelText

    # a new variant shows up after the store says so (redraws are coalesced)
    store.add(Variant("f", {"steps": QUANT}, _metrics(50_000, 0.4, 0.5)))
    qtbot.waitUntil(lambda: "f" in _scatter_points(chart), timeout=2000)
    assert _scatter_points(chart)["f"] == pytest.approx((50_000 / 1024, 50.0))
    store.remove("f")
    qtbot.waitUntil(lambda: "f" not in _scatter_points(chart), timeout=2000)


def test_log_axis_plots_log10_and_axis_picker_changes_coordinates(chart):
    chart.set_axes("size", "latency")
    assert chart.log_x.isChecked() and chart.log_y.isChecked()
    pts = _scatter_points(chart)
    assert pts["a"] == pytest.approx((math.log10(100_000 / 1024), math.log10(0.5)))
    chart.y_combo.setCurrentIndex(chart.y_combo.findData("flops"))  # as the user would
    pts = _scatter_points(chart)
    assert chart.y_key == "flops" and not chart.log_y.isChecked()
    assert chart._ydiv == 1e6 and pts["b"][1] == pytest.approx(200_000 * 3 / 1e6)  # M FLOPs (baseline 1.9 M)
    assert "FLOPs" in chart.plot.getAxis("left").labelText
    chart.x_combo.setCurrentIndex(chart.x_combo.findData("accuracy"))
    assert not chart.log_x.isEnabled()
    assert _scatter_points(chart)["c"][0] == pytest.approx(90.0)


def test_pareto_line_connects_exactly_the_non_dominated_variants(chart, store):
    chart.set_axes("size", "accuracy", log_x=False)
    finished = [(v.name, objectives(v.metrics)) for v in store.variants() if v.status == "ok"]
    expected = {n for n, p in finished if not any(dominates(q, p) for m, q in finished if m != n)}
    assert expected == {"baseline", "a", "b", "d"}
    assert set(chart.pareto_names()) == expected
    lx, ly = chart.pareto_line.getData()
    order = sorted(expected, key=lambda n: store.get(n).metrics["size_bytes"])
    assert list(lx) == pytest.approx([store.get(n).metrics["size_bytes"] / 1024 for n in order])
    assert list(ly) == pytest.approx([store.get(n).metrics["accuracy"] * 100 for n in order])
    assert "on the Pareto front" in chart.tooltip_for("b")
    assert "on the Pareto front" not in chart.tooltip_for("c")
    tip = chart.tooltip_for("d")
    assert "prune-structured-r0.5 → quantize-static-int8" in tip and "Accuracy: 70.00%" in tip


def test_click_selects_the_table_row_and_a_row_selects_the_point(qtbot, chart, store):
    table = ResultsTable(store)
    qtbot.addWidget(table)
    table.show()
    chart.set_axes("size", "accuracy", log_x=False)
    qtbot.wait(50)
    px, py = _scatter_points(chart)["c"]
    scene_pos = chart.plot.getViewBox().mapViewToScene(QPointF(px, py))
    pos = chart.view.mapFromScene(scene_pos)
    qtbot.mouseClick(chart.view.viewport(), Qt.MouseButton.LeftButton, pos=pos)
    qtbot.waitUntil(lambda: store.selected == "c", timeout=2000)
    rows = table.selectionModel().selectedRows()
    assert len(rows) == 1 and table.name_at_row(rows[0].row()) == "c"
    sx, sy = chart.selection_item.getData()
    assert (sx[0], sy[0]) == pytest.approx((px, py))

    # and back: a row selected in the table rings its point
    row = next(r for r in range(table.model().rowCount()) if table.name_at_row(r) == "a")
    table.selectRow(row)
    assert store.selected == "a"
    sx, sy = chart.selection_item.getData()
    assert (sx[0], sy[0]) == pytest.approx(_scatter_points(chart)["a"])
    store.select(None)
    assert len(chart.selection_item.getData()[0]) == 0


def test_ghost_point_shows_and_hides(chart):
    chart.set_axes("size", "accuracy", log_x=False)
    chart.set_ghost(_metrics(120_000, 0.5, 0.85))
    assert chart.ghost_point() == pytest.approx((120_000, 0.85))
    gx, gy = chart.ghost_item.getData()
    assert (gx[0], gy[0]) == pytest.approx((120_000 / 1024, 85.0))
    assert chart.ghost_item.opts["brush"] is None or chart.ghost_item.opts["brush"].style() == Qt.BrushStyle.NoBrush
    chart.set_ghost(None)
    assert chart.ghost_point() is None and len(chart.ghost_item.getData()[0]) == 0


def test_exports_csv_png_svg(chart, store, tmp_path):
    chart.export(str(tmp_path / "chart.csv"))
    rows = list(csv.DictReader(io.StringIO((tmp_path / "chart.csv").read_text())))
    by_name = {r["name"]: r for r in rows}
    assert set(by_name) == {"baseline", "a", "b", "c", "d", "e", "broken"}
    assert int(by_name["b"]["size_bytes"]) == 200_000
    assert float(by_name["c"]["latency_median_ms"]) == pytest.approx(1.2)
    assert by_name["b"]["pareto"] == "True" and by_name["c"]["pareto"] == "False"
    assert by_name["broken"]["status"] == "failed"
    png, svg = tmp_path / "chart.png", tmp_path / "chart.svg"
    chart.export(str(png))
    chart.export(str(svg))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    text = svg.read_text()
    assert "<svg" in text and text.count("<path") + text.count("<polyline") > len(ROWS)


def test_redraw_of_500_variants_is_fast(chart, store):
    import random
    import time

    rng = random.Random(0)
    for i in range(500):
        size = rng.uniform(30_000, 640_000)
        store.add(Variant(f"v{i}", {"steps": [PRUNE, QUANT][i % 2]},
                          _metrics(int(size), 0.2 + size / 400_000, 0.97 - rng.uniform(0, 0.3))))
    chart.refresh()
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        chart.refresh()
        times.append(time.perf_counter() - t0)
    assert len(_scatter_points(chart)) == 505
    # the target is 50 ms (benchmarks/chart.py measures it); a loaded 2-core CI box gets slack
    assert sorted(times)[3] < 0.15, times


# --- live preview in the real window -------------------------------------------------------------

def _quick() -> MeasureConfig:
    return MeasureConfig(batch=16, threads=1, warmup=1, min_runs=3, min_seconds=0.0, max_seconds=0.2,
                         also_batch1=False, both_runtimes=False)


@pytest.fixture
def window(qtbot):
    w = MainWindow()
    qtbot.addWidget(w)
    w.session.measure = _quick()
    w.show()
    yield w
    w.queue.shutdown(10)


def _variant_jobs(window):
    return [j for j in window.queue.jobs() if j.kind == "variant"]


def _handle(slider):
    from PySide6.QtWidgets import QStyle, QStyleOptionSlider

    opt = QStyleOptionSlider()
    slider.initStyleOption(opt)
    return slider.style().subControlRect(QStyle.ComplexControl.CC_Slider, opt,
                                         QStyle.SubControl.SC_SliderHandle, slider).center()


@pytest.fixture
def gate(monkeypatch):
    """The first live run waits (cancellably) until the test opens the gate, so it is always still
    running when a newer setting arrives however fast the machine (it made the test flaky); a run
    at ratio 0.3 waits until it is cancelled."""
    import threading
    import time

    from tugboat.engine.running import runner as recipe_mod

    real, opened, calls = recipe_mod.run_variant, threading.Event(), []

    def held_first(base, recipe, progress, **kw):
        calls.append(recipe)
        if len(calls) == 1 or recipe.steps[-1].get("ratio") == 0.3:
            while not opened.is_set() or recipe.steps[-1].get("ratio") == 0.3:
                progress.check()  # raises when cancelled
                time.sleep(0.01)
        return real(base, recipe, progress, **kw)

    monkeypatch.setattr(recipe_mod, "run_variant", held_first)
    yield opened
    opened.set()


def test_slider_moves_ghost_at_once_and_a_newer_setting_cancels_the_older_job(qtbot, window, gate):
    lp = window.live_preview
    assert lp is not None and isinstance(window.chart, TradeoffChart)
    window.load_demo()
    with qtbot.waitSignal(window.session.baseline_ready, timeout=120000):
        pass
    window.resize(1366, 768)
    chart = window.chart
    chart.set_axes("size", "accuracy", log_x=False)
    panel = window.show_panel("prune")
    panel.set_value("finetune_epochs", 0)
    qtbot.wait(500)  # the debounce of that keyboard-like edit passes: nothing was estimated, no run
    assert _variant_jobs(window) == []
    field = panel.controls["ratio"]
    base_size = window.store.baseline.metrics["size_bytes"]

    # a real mouse drag: the ghost follows every value at once, and no job starts while it is held,
    # even when the mouse rests longer than any pause timer
    xs = []
    field_values = []
    from PySide6.QtCore import QPoint
    from PySide6.QtTest import QTest

    slider = field.slider
    pos = _handle(slider)
    QTest.mousePress(slider, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, pos)
    for _ in range(4):
        pos = pos + QPoint(max(2, slider.width() // 60), 0)
        QTest.mouseMove(slider, pos)
        qtbot.wait(20)
        field_values.append(field.value())
        xs.append(chart.ghost_point()[0])
    assert field_values == sorted(field_values) and field_values[-1] > 0.5
    assert xs == sorted(xs, reverse=True) and xs[-1] < base_size
    qtbot.wait(900)  # resting with the button held
    assert _variant_jobs(window) == []
    held_value = field.value()

    # released: one real job at once, for exactly the value shown
    with qtbot.waitSignal(lp.job_started, timeout=5000) as first:
        QTest.mouseRelease(slider, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, pos)
    job1 = first.args[0]
    assert f"r{held_value:g}" in job1.name and len(_variant_jobs(window)) == 1

    # a newer setting typed in: the ghost moves, and the older job is cancelled
    field.spin.setFocus()
    field.spin.selectAll()
    with qtbot.waitSignal(lp.job_started, timeout=5000) as second:
        QTest.keyClicks(field.spin, "0.85")  # above any value the drag reached
        QTest.keyClick(field.spin, Qt.Key.Key_Return)
    assert chart.ghost_point()[0] < xs[-1]
    job2 = second.args[0]
    assert job2 is not job1 and "r0.85" in job2.name
    qtbot.waitUntil(lambda: job1.is_ended, timeout=20000)
    assert job1.state == CANCELLED
    gate.set()
    qtbot.waitUntil(lambda: job2.is_ended, timeout=120000)
    assert job2.state == DONE, job2.error

    # the measured point replaces the ghost; the estimate's error is logged
    qtbot.waitUntil(lambda: len(lp.errors) == 1, timeout=5000)
    v = window.store.get(lp.errors[0]["name"])
    assert v.recipe["steps"][0]["ratio"] == 0.85
    assert [x.recipe["steps"][0]["ratio"] for x in window.store.variants() if x.name != "baseline"] == [0.85]
    assert window.store.selected == v.name and chart.point_of(v.name) is not None
    assert chart.ghost_point() is None
    assert abs(lp.errors[0]["errors"]["size_bytes"]) < 0.10, lp.errors

    # a run cancelled by the user takes its ghost with it
    with qtbot.waitSignal(lp.job_started, timeout=5000) as third:
        panel.set_value("ratio", 0.3)
    assert chart.ghost_point() is not None
    third.args[0].cancel()
    qtbot.waitUntil(lambda: third.args[0].is_ended, timeout=20000)
    qtbot.waitUntil(lambda: chart.ghost_point() is None, timeout=2000)

    # switched off: a slider moves nothing
    lp.set_enabled(False)
    jobs = len(_variant_jobs(window))
    panel.set_value("ratio", 0.35)
    qtbot.wait(600)
    assert chart.ghost_point() is None and len(_variant_jobs(window)) == jobs


def test_tick_labels_have_the_places_their_spacing_needs():
    from tugboat.ui.chart import safe_tick_strings, tick_strings

    assert tick_strings([99.6, 99.7214484679666, 99.8], 0.1) == ["99.6", "99.7", "99.8"]
    assert tick_strings([0.0, 0.25, 0.5], 0.25) == ["0", "0.25", "0.50"]
    assert tick_strings([0.32, 0.3225], 0.0025) == ["0.3200", "0.3225"]
    assert tick_strings([200.0, 400.0], 200) == ["200", "400"]
    assert tick_strings([2.0, 3.0, 2.477], 1.0, log=True) == ["100", "1000", ""]
    assert tick_strings([2.477, 2.602], 1.0, log=True) == ["300", "400"]  # too few 1-2-5: all
    # a crowded log axis labels 1, 2 and 5 of each decade only
    import math as m

    decade = [m.log10(x) for x in (70, 80, 90, 100, 200, 300, 500)]
    assert tick_strings(decade, None, log=True) == ["", "", "", "100", "200", "", "500"]
    # pyqtgraph passes spacing=None for log minor ticks; an exception in paint would crash PySide
    assert safe_tick_strings([2.0], 1.0, None, True) == ["100"]
    assert safe_tick_strings([0.5], 1.0, None) == ["0.5"]


def test_pareto_line_follows_the_axes_shown_and_the_tooltip_agrees(chart, store):
    chart.set_axes("size", "latency")
    # on size and latency alone, d (smallest) and a (fastest, next smallest) beat every other;
    # b is on the size/latency/quality front but beaten here by a (smaller and faster)
    assert chart.pareto_names() == ["d", "a"]
    assert "b" in store.pareto()
    for name in chart.plotted_names():
        assert ("on the Pareto front" in chart.tooltip_for(name)) == (name in chart.pareto_names()), name
    lx, ly = chart.pareto_line.getData()
    assert list(lx) == sorted(lx) and list(ly) == sorted(ly, reverse=True)  # no zigzag
    chart.set_axes("latency", "accuracy", log_x=False)
    front = chart.pareto_names()
    xs = [chart.point_of(n)[0] for n in front]
    ys = [chart.point_of(n)[1] for n in front]
    assert xs == sorted(xs) and ys == sorted(ys)  # slower only where more accurate
    assert front == ["a", "b", "baseline"]  # e, d: slower than a and less accurate; c: beaten by b
