"""The real window, offscreen: demo start, a pruning run, cancel, failures, workspaces, trust."""

from __future__ import annotations

import json
import os
import subprocess
import threading

import pytest

from helpers import run_prune
from tugboat.engine.measuring.measure import MeasureConfig
from tugboat.jobs import CANCELLED
from tugboat.ui.main_window import MainWindow

pytestmark = pytest.mark.timeout(240)


def quick_measure() -> MeasureConfig:
    return MeasureConfig(batch=16, threads=1, warmup=1, min_runs=3, min_seconds=0.0, max_seconds=0.2,
                         also_batch1=False, both_runtimes=False)


@pytest.fixture
def window(qtbot):
    w = MainWindow()
    qtbot.addWidget(w)
    w.session.measure = quick_measure()
    w.show()
    yield w
    w.queue.shutdown(10)


def load_demo(qtbot, window):
    job = window.load_demo()
    with qtbot.waitSignal(window.session.baseline_ready, timeout=120000):
        pass
    assert job.state == "done"
    return job


def test_tugboat_demo_starts_and_quits_cleanly(python, tmp_path):
    """The real entry point in its own process (app.quit() would end this test's event loop)."""
    # faulthandler: a crash at quit (a -11 was seen once in CI) would name its thread and frames
    env = {**os.environ, "TUGBOAT_CONFIG_DIR": str(tmp_path / "cfg"), "QT_QPA_PLATFORM": "offscreen",
           "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.run([python, "-m", "tugboat", "--demo", "--quit-after", "6"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = json.loads((tmp_path / "cfg" / "settings.json").read_text())
    assert saved["last_model"] == "demo:digits-cnn" and saved["geometry"]


def test_quitting_while_the_demo_still_loads_exits_cleanly(python, tmp_path):
    """Closing the window mid-job (load and measure still running) cancels it and exits 0."""
    # faulthandler: a crash at quit (a -11 was seen once in CI) would name its thread and frames
    env = {**os.environ, "TUGBOAT_CONFIG_DIR": str(tmp_path / "cfg"), "QT_QPA_PLATFORM": "offscreen",
           "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.run([python, "-m", "tugboat", "--demo", "--quit-after", "0.5"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Abort" not in proc.stderr


def test_empty_state_then_demo_then_prune_variant_in_table(qtbot, window):
    assert window.stack.currentWidget() is window.empty_state
    assert window.empty_state.demo_button.text() == "Try the demo"
    load_demo(qtbot, window)
    assert window.stack.currentIndex() == 1
    assert window.model_panel.layers.rowCount() > 0
    assert window.model_panel.fields["Format"].text() != "-"
    assert "labels" not in window.data_panel.fields["Quality"].text().lower() or \
        window.data_panel.fields["Labels"].text() == "yes"
    base = window.store.baseline.metrics
    v = run_prune(qtbot, window, 0.5)
    assert v.status == "ok" and v.recipe["steps"][0]["ratio"] == 0.5
    assert v.metrics["params"] < base["params"] and v.metrics["size_bytes"] < base["size_bytes"]
    assert v.metrics["accuracy"] is not None
    table = window.results_table
    assert table.model().rowCount() == 2
    names = [table.name_at_row(r) for r in range(2)]
    assert v.name in names
    row = names.index(v.name)
    size_text = table.model().index(row, 2).data()
    assert size_text.endswith("KB") and size_text != "-"
    # selecting the row selects the variant everywhere, and back
    table.selectRow(row)
    assert window.store.selected == v.name
    window.store.select("baseline")
    assert table.selected_name() == "baseline"


def test_chain_prune_then_reuse(qtbot, window):
    load_demo(qtbot, window)
    v = run_prune(qtbot, window, 0.3)
    window.store.select(v.name)
    window.chain_view.continue_button.click()
    assert window.session.chain == v.recipe["steps"]
    assert "prune-structured-r0.3" in window.chain_view.label.text()
    v2 = run_prune(qtbot, window, 0.3)
    assert [s["technique"] for s in v2.recipe["steps"]] == ["prune", "prune"]
    assert v2.metrics["params"] < v.metrics["params"]


def test_cancel_running_job_writes_nothing(qtbot, window, tmp_path):
    load_demo(qtbot, window)
    window.new_workspace(str(tmp_path / "ws"))
    with qtbot.waitSignal(window.session.baseline_ready, timeout=120000):
        pass
    n = len(window.store)
    gate = threading.Event()
    original = window.session.baseline.handle

    # a step that runs until cancelled: fine-tuning for many epochs
    panel = window.show_panel("prune")
    panel.set_value("finetune_epochs", 200)
    panel.set_value("ratio", 0.5)
    job = window.run_current()
    qtbot.waitUntil(lambda: job.is_running, timeout=30000)
    qtbot.wait(300)
    with qtbot.waitSignal(job.cancelled, timeout=60000):
        job.cancel()
    gate.set()
    qtbot.wait(200)
    assert job.state == CANCELLED
    assert len(window.store) == n
    qtbot.waitUntil(lambda: not window.queue.active(), timeout=30000)
    # only the baseline's folder: no variant folder, no stray temp file
    assert [p.name for p in (tmp_path / "ws").iterdir() if p.is_dir()] == ["baseline"]
    assert not list((tmp_path / "ws").glob("**/*.tmp"))
    saved = json.loads((tmp_path / "ws" / "workspace.json").read_text())
    assert saved["variants"] == [] and saved["baseline"]["metrics"]["size_bytes"] > 0
    assert window.session.baseline.handle is original


def test_failing_job_shows_message_and_next_job_runs(qtbot, window):
    load_demo(qtbot, window)

    def broken(progress):
        raise RuntimeError("the engine tripped over something")

    job = window.queue.submit(broken, name="broken step")
    with qtbot.waitSignal(job.failed, timeout=10000):
        pass
    shown = [n.label.text() for n in window.notifications.shown()]
    assert any("the engine tripped over something" in t for t in shown)
    note = window.notifications.shown()[-1]
    assert note.details_button.isVisibleTo(note) and "Traceback" in note.details
    v = run_prune(qtbot, window, 0.4)
    assert v.status == "ok"


def test_workspace_autosave_and_reopen(qtbot, window, tmp_path):
    load_demo(qtbot, window)
    ws_path = tmp_path / "ws"
    window.new_workspace(str(ws_path))
    with qtbot.waitSignal(window.session.baseline_ready, timeout=120000):
        pass
    v = run_prune(qtbot, window, 0.5)
    qtbot.waitUntil(lambda: not window.queue.active(), timeout=60000)
    saved = json.loads((ws_path / "workspace.json").read_text())
    assert [s["name"] for s in saved["variants"]] == [v.name]
    onnx = ws_path / saved["variants"][0]["artifacts"]["onnx"]
    assert onnx.exists() and onnx.stat().st_size > 1000
    assert onnx.parent.name == saved["variants"][0]["folder"]  # the engine's layout, one folder each
    assert (onnx.parent / "recipe.toml").is_file() and (onnx.parent / "metrics.json").is_file()
    window.close()

    again = MainWindow()
    qtbot.addWidget(again)
    again.session.measure = quick_measure()
    assert again.settings.last_workspace == str(ws_path)
    again.open_workspace(again.settings.last_workspace)
    assert v.name in again.store and "baseline" in again.store
    assert again.store.get(v.name).metrics["size_bytes"] == v.metrics["size_bytes"]
    with qtbot.waitSignal(again.session.baseline_ready, timeout=120000):
        pass
    assert v.name in again.store  # restored after the baseline was measured again
    again.queue.shutdown(10)


def test_pickled_module_asks_for_trust_naming_the_file(qtbot, window, tmp_path):
    import torch

    path = tmp_path / "whole_module.pt"
    torch.save(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)), path)
    asked = []
    window.confirm_trust = lambda p: asked.append(p) or False
    job = window.load_model(str(path))
    with qtbot.waitSignal(job.finished, timeout=60000):
        pass
    qtbot.waitUntil(lambda: bool(asked), timeout=5000)
    assert str(path) in asked[0]
    assert window.session.baseline is None
    assert any("not trusted" in n.label.text() for n in window.notifications.shown())


def test_a_bare_step_gets_its_defaults_and_the_chain_prefix_is_kept(window):
    window.session.chain = window.session.recipe_for({"technique": "prune", "ratio": 0.3}).steps
    steps = window.session.recipe_for({"technique": "quantize"}).steps
    assert steps[0] == window.session.chain[0]
    assert steps[1]["method"] and steps[1]["calibration_samples"] > 0


def test_a_failed_load_keeps_the_loaded_model_for_the_next_run(qtbot, window, tmp_path):
    load_demo(qtbot, window)
    bad = tmp_path / "broken.onnx"
    bad.write_text("not a model")
    job = window.load_model(str(bad))
    with qtbot.waitSignal(job.failed, timeout=60000):
        pass
    qtbot.waitUntil(lambda: "loading" not in window.model_panel.fields["Model"].text(), timeout=5000)
    assert window.model_panel.fields["Model"].text() == "demo:digits-cnn"
    assert window.session.model_ref == "demo:digits-cnn"
    assert window.session.recipe_for(None).model == "demo:digits-cnn"
