"""Issue 19 in the window: the runtime picker, "Re-measure in" and "Export for runtime"."""

from __future__ import annotations

import sys

import numpy as np
import onnxruntime as ort
import pytest

from helpers import run_prune
from tugboat.engine.measuring import runtimes
from tugboat.engine.measuring.measure import MeasureConfig
from tugboat.ui.main_window import MainWindow
from tugboat.ui.model_panel import DataPanel

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


def _action(menu, *path: str):
    for text in path[:-1]:
        menu = next(a.menu() for a in menu.actions() if a.text() == text)
    return next(a for a in menu.actions() if a.text() == path[-1])


def test_runtime_picker_offers_missing_extras_disabled_with_the_install_command(qtbot, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    panel = DataPanel()
    qtbot.addWidget(panel)
    names = [panel.runtime.itemData(i) for i in range(panel.runtime.count())]
    assert names == list(runtimes.RUNTIME_NAMES)
    i = names.index("openvino")
    item = panel.runtime.model().item(i)
    assert not item.isEnabled() and panel.runtime.itemText(i) == "openvino (not installed)"
    assert "pip install tugboat-ml[openvino]" in item.toolTip()
    panel.set_measure(32, 1, "torch")
    with qtbot.waitSignal(panel.measure_changed) as sig:
        panel.apply_button.click()
    assert sig.args == [32, 1, "torch"]


def test_remeasure_in_and_export_for_runtime_from_the_results_table(qtbot, window, tmp_path, demo_data):
    window.load_demo()
    with qtbot.waitSignal(window.session.baseline_ready, timeout=120000):
        pass
    v = run_prune(qtbot, window, 0.5)
    qtbot.waitUntil(lambda: not window.queue.active(), timeout=60000)
    menu = window.results_table.build_menu(v.name)
    target = "openvino" if runtimes.availability("openvino")["available"] else "torch"
    n = len(window.queue.jobs())
    with qtbot.waitSignal(window.store.variant_changed, timeout=60000):
        _action(menu, "Re-measure in", target).trigger()
    entry = window.store.get(v.name).metrics["runtimes"][target]
    assert entry["ok"] and entry["latency_ms"]["runtime"] == target and entry["version"]
    # the runtime computes the same variant: its agreement with the original is the variant's own
    # (measured in ONNX Runtime on the whole test split; here on its first 256 samples)
    assert abs(entry["fidelity"]["top1_agreement"] - v.metrics["fidelity"]["top1_agreement"]) < 0.1
    assert len(window.queue.jobs()) == n + 1

    window.ask_save_path = lambda title, default, file_filter: str(tmp_path / default)
    n = len(window.queue.jobs())
    _action(window.results_table.build_menu(v.name), "Export for runtime", "ONNX Runtime Mobile (.ort)...").trigger()
    qtbot.waitUntil(lambda: len(window.queue.jobs()) > n and window.queue.jobs()[-1].is_ended, timeout=60000)
    job = window.queue.jobs()[-1]
    assert job.state == "done", job.state
    assert any("reloaded in onnxruntime" in line and "top-1 agreement 100.0%" in line for line in job.logs)
    made = [p for p in tmp_path.iterdir() if p.suffix == ".ort"]
    assert len(made) == 1 and (tmp_path / (made[0].stem + ".required_operators.config")).is_file()
    x = demo_data.split("test", limit=8)[0]["input"]
    out = ort.InferenceSession(str(made[0]), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert np.isfinite(out).all() and out.shape[0] == 8
