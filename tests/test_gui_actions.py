"""The window's actions, driven as a user would: the results table's context menu, dropping files,
the recent-files menu, keyboard shortcuts, the icon, and the dark palette."""

from __future__ import annotations

import tomllib

import numpy as np
import onnxruntime as ort
import pytest
from PySide6.QtCore import QMimeData, QPoint, QPointF, Qt, QUrl
from PySide6.QtGui import QDragEnterEvent, QDropEvent, QKeySequence
from PySide6.QtWidgets import QApplication, QPlainTextEdit

from helpers import run_prune
from tugboat.engine.measuring.measure import MeasureConfig
from tugboat.engine.running.recipe import load_recipe
from tugboat.engine.running.variants import Variant
from tugboat.engine.running.workspace import Workspace
from tugboat.ui import theme
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


def wait_baseline(qtbot, window) -> None:
    with qtbot.waitSignal(window.session.baseline_ready, timeout=120000):
        pass


def menu_action(window, name: str, text: str):
    menu = window.results_table.build_menu(name)
    return next(a for a in menu.actions() if a.text() == text)


def ended_job(qtbot, window, before: int):
    qtbot.waitUntil(lambda: len(window.queue.jobs()) > before and window.queue.jobs()[-1].is_ended, timeout=60000)
    job = window.queue.jobs()[-1]
    assert job.state == "done", job.state
    return job


def onnx_run(path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_context_menu_export_rerun_show_recipe_delete(qtbot, window, tmp_path, demo_data):
    import torch

    from tugboat.engine.io.loading import load_model

    window.load_demo()
    wait_baseline(qtbot, window)
    window.new_workspace(str(tmp_path / "ws"))
    wait_baseline(qtbot, window)
    v = run_prune(qtbot, window, 0.5)
    qtbot.waitUntil(lambda: not window.queue.active(), timeout=60000)
    name = v.name
    asked: list[str] = []

    def save_path(title, default, file_filter):
        asked.append(default)
        return str(tmp_path / default)

    window.ask_save_path = save_path
    x = demo_data.split("test", limit=8)[0]["input"]
    expected = v.handle.torch_module()(torch.from_numpy(x)).detach().numpy()

    # export ONNX: a valid file that ONNX Runtime loads and that computes the variant's outputs
    n = len(window.queue.jobs())
    menu_action(window, name, "Export ONNX...").trigger()
    ended_job(qtbot, window, n)
    onnx_path = tmp_path / asked[-1]
    assert onnx_path.suffix == ".onnx"
    np.testing.assert_allclose(onnx_run(onnx_path, x), expected, atol=1e-4)

    # export the torch file: loads back as a model with the same outputs
    n = len(window.queue.jobs())
    menu_action(window, name, "Export torch file...").trigger()
    ended_job(qtbot, window, n)
    torch_path = tmp_path / asked[-1]
    assert torch_path.suffix == ".pt2" and torch_path.stat().st_size > 1000
    back = load_model(str(torch_path))
    np.testing.assert_allclose(back.torch_module()(torch.from_numpy(x)).detach().numpy(), expected, atol=1e-4)

    # export the recipe: parses back into the same steps
    n = len(window.queue.jobs())
    menu_action(window, name, "Export recipe...").trigger()
    ended_job(qtbot, window, n)
    recipe_path = tmp_path / asked[-1]
    assert tomllib.loads(recipe_path.read_text())["steps"][0]["ratio"] == 0.5
    assert load_recipe(recipe_path).steps == v.recipe["steps"]

    # show recipe: a non-modal dialog with the TOML
    menu_action(window, name, "Show recipe").trigger()
    dialog = window._dialogs[-1]
    assert dialog.isVisible() and name in dialog.windowTitle()
    assert "ratio = 0.5" in dialog.findChildren(QPlainTextEdit)[0].toPlainText()

    # re-run: a new variant with the same recipe, autosaved
    before = len(window.store)
    menu_action(window, name, "Re-run").trigger()
    qtbot.waitUntil(lambda: len(window.store) == before + 1, timeout=120000)
    rerun = window.store.variants()[-1]
    assert rerun.name != name and rerun.recipe["steps"] == v.recipe["steps"]
    assert rerun.status == "ok" and rerun.metrics["params"] == v.metrics["params"]
    qtbot.waitUntil(lambda: not window.queue.active(), timeout=60000)
    assert rerun.name in Workspace.open(tmp_path / "ws")

    # delete: gone from the store, the table and the workspace folder
    folder = window.workspace.folder(name)
    assert folder.is_dir()
    menu_action(window, name, "Delete").trigger()
    assert name not in window.store
    assert name not in [window.results_table.name_at_row(r) for r in range(window.results_table.model().rowCount())]
    assert not folder.exists()
    assert Workspace.open(tmp_path / "ws").names() == [rerun.name]

    # the baseline cannot be deleted or re-run
    assert not menu_action(window, "baseline", "Delete").isEnabled()
    assert not menu_action(window, "baseline", "Re-run").isEnabled()


def _drop(window, paths) -> QDropEvent:
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(p)) for p in paths])
    enter = QDragEnterEvent(QPoint(50, 50), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
                            Qt.KeyboardModifier.NoModifier)
    window.dragEnterEvent(enter)
    assert enter.isAccepted()
    drop = QDropEvent(QPointF(50, 50), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
                      Qt.KeyboardModifier.NoModifier)
    window.dropEvent(drop)
    return drop


def test_drop_model_file_and_recent_models_menu(qtbot, window, tmp_path, demo_models):
    from tugboat.engine.io.export import write_onnx

    a, b = tmp_path / "first.onnx", tmp_path / "second.onnx"
    write_onnx(demo_models("digits-mlp"), a)
    write_onnx(demo_models("digits-cnn"), b)
    window.load_data("demo:digits")

    drop = _drop(window, [a])
    assert drop.isAccepted()
    assert window.session.model_ref == str(a)
    wait_baseline(qtbot, window)
    assert window.store.baseline.metrics["accuracy"] is not None  # the dropped model met the data
    window.load_model(str(b))
    wait_baseline(qtbot, window)
    assert window.store.baseline.metrics["params"] != 0

    # a text drop (no file) is refused
    mime = QMimeData()
    mime.setText("hello")
    enter = QDragEnterEvent(QPoint(5, 5), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
                            Qt.KeyboardModifier.NoModifier)
    window.dragEnterEvent(enter)
    assert not enter.isAccepted()

    recent = [act.text() for act in window.recent_menu.actions()]
    assert recent[:2] == [str(b), str(a)]
    window.recent_menu.actions()[1].trigger()  # reopen the first file from the menu
    assert window.session.model_ref == str(a)
    wait_baseline(qtbot, window)
    assert window.model_panel.fields["Model"].text() != "-"
    assert [act.text() for act in window.recent_menu.actions()][:2] == [str(a), str(b)]


def test_keyboard_shortcuts_open_run_cancel_export(qtbot, window, monkeypatch):
    keys = {window.open_action: QKeySequence(QKeySequence.StandardKey.Open),
            window.run_action: QKeySequence("Ctrl+R"), window.cancel_action: QKeySequence("Esc"),
            window.export_action: QKeySequence("Ctrl+E")}
    for action, seq in keys.items():
        assert action.shortcut() == seq and not seq.isEmpty(), action.text()

    opened: list[bool] = []
    class NoChoice:  # the open dialog (file + architecture fields), cancelled
        def exec(self):
            opened.append(True)
            return 0

    monkeypatch.setattr(window, "make_open_dialog", NoChoice)
    window.activateWindow()
    qtbot.waitUntil(window.isActiveWindow, timeout=5000)
    qtbot.keyClick(window, Qt.Key.Key_O, Qt.KeyboardModifier.ControlModifier)
    assert opened == [True]

    window.load_demo()
    wait_baseline(qtbot, window)
    panel = window.show_panel("prune")
    panel.set_value("finetune_epochs", 200)  # long enough to cancel
    n = len(window.queue.jobs())
    qtbot.keyClick(window, Qt.Key.Key_R, Qt.KeyboardModifier.ControlModifier)
    assert len(window.queue.jobs()) == n + 1
    job = window.queue.jobs()[-1]
    qtbot.waitUntil(lambda: job.is_running, timeout=30000)
    with qtbot.waitSignal(job.cancelled, timeout=60000):
        qtbot.keyClick(window, Qt.Key.Key_Escape)
    assert len(window.store) == 1

    asked: list[str] = []
    window.ask_save_path = lambda title, default, f: asked.append(default) or ""
    window.store.select("baseline")
    qtbot.keyClick(window, Qt.Key.Key_E, Qt.KeyboardModifier.ControlModifier)
    assert asked == ["baseline.onnx"]


def test_window_icon_and_desktop_name(qtbot):
    from tugboat.ui.app import make_app

    app = make_app()
    assert app is QApplication.instance()
    icon = app.windowIcon()
    assert not icon.isNull()
    sizes = {s.width() for s in icon.availableSizes()}
    assert {16, 32, 256} <= sizes
    assert app.desktopFileName() == "tugboat"
    w = MainWindow()
    qtbot.addWidget(w)
    assert not w.windowIcon().isNull()


@pytest.fixture
def light_after():
    yield
    theme.apply_palette(QApplication.instance(), dark=False)


def test_dark_palette_renders_dark_and_notifies(qtbot, window, light_after):
    app = QApplication.instance()
    theme.apply_palette(app, dark=False)
    flips: list[bool] = []
    theme.watcher().changed.connect(flips.append)
    qtbot.wait(50)  # palette change events are delivered through the event loop
    light = window.grab().toImage()
    theme.apply_palette(app, dark=True)
    qtbot.waitUntil(lambda: flips == [True], timeout=2000)
    assert theme.is_dark() and theme.chart_colors()["background"].lightness() < 80
    qtbot.wait(50)
    dark = window.grab().toImage()
    # the empty state's background, away from any text
    for img, want_dark in ((light, False), (dark, True)):
        px = img.pixelColor(img.width() // 2, img.height() - 60)
        assert (px.lightness() < 90) == want_dark, px.name()
    assert window.results_table.palette().color(window.results_table.palette().ColorRole.Base).lightness() < 80
    note = window.notify("dark note", "", "warning")
    assert "#463a1c" in note.styleSheet()  # the dark variant of the warning colours
    theme.apply_palette(app, dark=False)
    qtbot.waitUntil(lambda: flips == [True, False], timeout=2000)


def test_warnings_column_shows_full_text(qtbot, window):
    long = [f"warning number {i}: " + "a fairly long explanation of what went wrong " * 2 for i in range(3)]
    window.store.set_baseline(Variant("baseline", {"steps": []}, {"size_bytes": 1000}))
    window.store.add(Variant("noisy", {"steps": []}, {"size_bytes": 500}, warnings=long))
    window.stack.setCurrentIndex(1)
    table = window.results_table
    table.resize(700, 200)
    qtbot.wait(50)
    row = [table.name_at_row(r) for r in range(2)].index("noisy")
    col = table.WARNINGS
    index = table.model().index(row, col)
    text = index.data()
    assert all(w in text for w in long)
    assert table.fontMetrics().horizontalAdvance(text) <= table.columnWidth(col)  # not cut off
    assert table.horizontalScrollBar().maximum() > 0  # reachable by scrolling sideways
    tip = index.data(Qt.ItemDataRole.ToolTipRole)
    assert all(w in tip for w in long)
    # and a warning icon beside the name, visible without scrolling
    assert not table.model().index(row, 0).data(Qt.ItemDataRole.DecorationRole).isNull()
