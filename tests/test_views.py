"""The Layers and Training views in the real window (offscreen) on the demo model and data.

One window is loaded once for the module (loading and measuring the demo takes seconds); the
tests run real jobs through its queue: the per-layer profile, the sensitivity measurement, a
pruning run with a per-layer override, a quantization run with a layer kept in float, and a
fine-tuning run whose epochs the Training view draws.
"""

from __future__ import annotations

import pytest
from PySide6.QtWidgets import QCheckBox

from tugboat.engine.errors import RecipeError
from tugboat.engine.measuring.measure import MeasureConfig
from tugboat.engine.techniques.prune import parse_layer_ratios
from tugboat.jobs import CANCELLED, DONE
from tugboat.ui.layers_view import COL_FLOAT, COL_SPARSITY
from tugboat.ui.main_window import MainWindow

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def window(qapp, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUGBOAT_CONFIG_DIR", str(tmp_path_factory.mktemp("config")))
        w = MainWindow()
        w.session.measure = MeasureConfig(batch=16, threads=1, warmup=1, min_runs=3, min_seconds=0.0,
                                          max_seconds=0.2, also_batch1=False, both_runtimes=False)
        w.show()
        job = w.load_demo()
        assert job.wait(120)
        for _ in range(200):  # deliver the job's queued signals
            qapp.processEvents()
            if w.store.baseline is not None:
                break
        assert w.store.baseline is not None and w.layers_view is not None and w.training_view is not None
        yield w
        w.queue.shutdown(10)
        w.close()


def show_layers(qtbot, window):
    view = window.layers_view
    if view.profile_job is None or view.subject != "baseline":
        with qtbot.waitSignal(view.profile_ready, timeout=60000):
            window.view_tabs.setCurrentWidget(view)
    qtbot.waitUntil(lambda: view.profile_job is not None and view.profile_job.is_ended, timeout=60000)
    return view


def run_panel(qtbot, window, name: str, method: str | None = None, **values):
    panel = window.show_panel(name)
    if method is not None:
        panel.method_combo.setCurrentIndex(panel.method_combo.findData(method))
    for key, value in values.items():
        panel.set_value(key, value)
    job = window.run_current()
    qtbot.waitUntil(lambda: job.is_ended, timeout=120000)
    assert job.state == DONE, job.error
    # this run's variant (the live preview may measure a setting an earlier test committed, too)
    qtbot.waitUntil(lambda: job.result is not None and window.store.get(job.result.name) is job.result,
                    timeout=10000)
    return job, job.result


def test_layers_view_has_one_bar_per_layer_matching_the_layer_table(qtbot, window):
    view = show_layers(qtbot, window)
    table = window.session.info["layers"]
    assert len(view.rows) == len(table) and view.table.rowCount() == len(table)
    total = sum(r["params"] for r in table)
    widths = list(view.bars["params"].opts["width"])
    assert len(widths) == len(table)
    for row, width, shown in zip(table, widths, view.rows):
        assert shown["name"] == row["name"] and shown["params"] == row["params"]
        assert width == pytest.approx(100.0 * row["params"] / total)
    assert view.table.item(0, 0).text() == table[0]["name"]
    # the latency share is measured (ONNX Runtime profiler): the convolutions hold most of it,
    # BatchNorm fused into them holds none, and the shares add up to at most the whole run
    shares = {r["name"]: r["latency_share"] for r in view.rows}
    assert 0.0 < sum(shares.values()) <= 1.0 + 1e-9
    convs = [r["name"] for r in view.rows if r["type"] == "Conv2d"]
    assert sum(shares[n] for n in convs) > 0.5
    assert all(shares[r["name"]] == 0.0 for r in view.rows if r["type"] == "BatchNorm2d")
    assert len(view.bars["latency"].opts["width"]) == len(table)
    assert view.latency_info["runtime"] == "onnxruntime" and view.latency_info["total_ms"] > 0


def test_sensitivity_runs_as_a_cancellable_job_and_fills_the_bars(qtbot, window):
    view = show_layers(qtbot, window)
    job = view.measure_sensitivity()
    assert job in window.queue.jobs() and job.kind == "sensitivity"
    assert not view.sensitivity_button.isEnabled() and view.cancel_button.isEnabled()
    view.cancel_button.click()
    qtbot.waitUntil(lambda: job.is_ended, timeout=30000)
    assert job.state == CANCELLED and "baseline" not in view.sensitivity
    assert not any(view.bars["prune"].opts["width"])

    with qtbot.waitSignal(view.sensitivity_ready, timeout=90000):
        view.sensitivity_button.click()
    prune_w = dict(zip([r["name"] for r in view.rows], view.bars["prune"].opts["width"]))
    quant_w = dict(zip([r["name"] for r in view.rows], view.bars["quant"].opts["width"]))
    # pruning the first convolution alone costs accuracy on the demo (it has only 32 channels)
    assert prune_w["features.0"] > 1.0
    assert all(quant_w[r["name"]] > 0 for r in view.rows if r["type"] in ("Conv2d", "Linear"))
    assert all(prune_w[r["name"]] == 0 and quant_w[r["name"]] == 0
               for r in view.rows if r["type"] == "BatchNorm2d")
    assert view.table.item(0, 5).text() != ""


def test_per_layer_overrides_land_in_the_recipe_of_the_next_run(qtbot, window):
    view = show_layers(qtbot, window)
    names = [r["name"] for r in view.rows]
    spin = view.table.cellWidget(names.index("features.3"), COL_SPARSITY)
    assert spin.isEnabled()
    assert not view.table.cellWidget(names.index("features.1"), COL_SPARSITY).isEnabled()
    spin.setValue(0.25)  # as the user would
    assert window.panels["prune"].value("layer_ratios") == ["features.3=0.25"]

    _job, variant = run_panel(qtbot, window, "prune", finetune_epochs=0, ratio=0.5)
    step = variant.recipe["steps"][-1]
    assert step["technique"] == "prune" and step["layer_ratios"] == ["features.3=0.25"]
    kept = variant.handle.info["pruning"]["kept_channels"]
    assert kept["features.3"] == {"before": 64, "after": 48}  # its own 25 %
    assert kept["features.7"]["after"] == 64  # the panel's 50 % elsewhere

    box = view.table.cellWidget(names.index("features.0"), COL_FLOAT).findChild(QCheckBox)
    box.setChecked(True)
    assert window.panels["quantize"].value("exclude") == ["features.0"]
    window.session.clear_chain()
    _job, q = run_panel(qtbot, window, "quantize", method="static-int8")
    assert q.recipe["steps"][-1]["exclude"] == ["features.0"]
    graph = q.handle.to_onnx().graph
    producers = {o: n.op_type for n in graph.node for o in n.output}
    convs = {n.name: n for n in graph.node if n.op_type == "Conv"}
    first = next(n for name, n in convs.items() if "features.0" in name)
    other = next(n for name, n in convs.items() if "features.3" in name)
    assert producers.get(first.input[1]) != "DequantizeLinear"  # float weights
    assert producers.get(other.input[1]) == "DequantizeLinear"  # int8 weights

    # a value typed into the panel shows in the view; clearing removes both kinds of override
    window.panels["prune"].set_value("layer_ratios", ["features.7=0.4"])
    assert view.table.cellWidget(names.index("features.7"), COL_SPARSITY).value() == pytest.approx(0.4)
    view.clear_button.click()
    assert window.panels["prune"].value("layer_ratios") == []
    assert window.panels["quantize"].value("exclude") == []
    assert not box.isChecked()


def test_training_view_draws_one_point_per_epoch_of_a_real_finetune_job(qtbot, window):
    view = window.training_view
    window.view_tabs.setCurrentWidget(view)
    window.session.clear_chain()
    window.layers_view.clear_overrides()
    job, _variant = run_panel(qtbot, window, "prune", finetune_epochs=2, ratio=0.3)
    assert view.shown is not None and view.shown.job_id == job.id
    assert job.name in view.title.text() and "finished" in view.title.text()
    for key in ("train_loss", "val_accuracy", "fidelity"):
        assert view.points(key) == 2, key
    xs, ys = view.curves["val_accuracy"].getData()
    assert list(xs) == [1.0, 2.0] and all(50.0 < y <= 100.0 for y in ys)
    # a job that does not train leaves the finished run's curves in place
    run_panel(qtbot, window, "quantize", method="dynamic-int8")
    assert view.shown.job_id == job.id and view.points() == 2
    # quantization-aware training reports its epochs too, fidelity included; the new run is shown
    # and the older one stays listed
    qat, _ = run_panel(qtbot, window, "quantize", method="qat-int8", epochs=1)
    assert view.shown.job_id == qat.id and view.run_combo.count() == 2
    assert view.points("train_loss") == 1 and view.points("fidelity") == 1


def test_layer_ratios_are_validated_and_parsed():
    assert parse_layer_ratios(["features.3=0.25", " classifier.1 = 0 "]) == {
        "features.3": 0.25, "classifier.1": 0.0}
    for bad in (["features.3"], ["features.3=x"], ["=0.2"], ["features.3=0.99"]):
        with pytest.raises(RecipeError):
            parse_layer_ratios(bad)


def test_one_parameter_count_in_the_model_panel_results_table_and_chart(qtbot, window):
    from PySide6.QtCore import Qt

    from tugboat.ui.chart import METRICS, format_metric
    from tugboat.ui.results_table import COLUMNS

    window.session.clear_chain()
    window.layers_view.clear_overrides()
    base = window.store.baseline
    expected = base.handle.param_count()[0]  # the deployed artifact's count (BatchNorm folded)
    assert base.metrics["params"] == expected < sum(p.numel() for p in base.handle.module.parameters())
    assert f"({expected:,};" in window.model_panel.fields["Params"].text()
    _job, q = run_panel(qtbot, window, "quantize", method="dynamic-int8")
    assert q.metrics["params"] == expected  # no weight scale counted
    model, col = window.results_table.results_model, COLUMNS.index("Params")
    shown = set()
    for name in (base.name, q.name):
        index = model.index(model.row_of(name), col)
        assert model.data(index, Qt.ItemDataRole.ToolTipRole).startswith(f"{expected:,} parameters")
        shown.add(model.data(index, Qt.ItemDataRole.DisplayRole))
        label = f"{METRICS['params'].label}: {format_metric('count', expected)}"
        assert label in window.chart.tooltip_for(name).splitlines()
    assert len(shown) == 1
