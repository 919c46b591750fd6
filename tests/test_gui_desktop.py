"""Tugboat as a desktop app: `tugboat FILE` (model, workspace, recipe), the desktop entry and its
MIME types, Recent holding only what opened, `--demo` saying what became of the last workspace,
and file dialogs that start where the last one of their kind ended."""

from __future__ import annotations

import configparser
import os
import subprocess
import xml.etree.ElementTree as ET

import pytest

from tugboat import resources
from tugboat.cli import parse_args
from tugboat.engine.measuring.measure import MeasureConfig
from tugboat.settings import load_settings
from tugboat.ui.app import start
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


@pytest.fixture
def model_file(tmp_path, demo_models):
    from tugboat.engine.io.export import write_onnx

    path = tmp_path / "models" / "mlp.onnx"
    path.parent.mkdir()
    write_onnx(demo_models("digits-mlp"), path)
    return path


def test_a_file_on_the_command_line_opens_in_the_window():
    assert parse_args(["model.onnx"]).open_path == "model.onnx"
    args = parse_args(["--quit-after", "3", "ws/folder"])
    assert args.open_path == "ws/folder" and args.quit_after == 3 and args.command is None
    args = parse_args(["info", "model.onnx"])
    assert args.command == "info" and args.model == "model.onnx" and args.open_path is None
    args = parse_args(["--workspace", "W"])
    assert args.workspace == "W" and args.open_path is None
    assert parse_args([]).open_path is None


@pytest.mark.slow
def test_tugboat_file_starts_the_app_process(python, tmp_path, model_file):
    """The real entry point takes a file (argparse refused it as an unknown command before)."""
    env = {**os.environ, "TUGBOAT_CONFIG_DIR": str(tmp_path / "cfg"), "QT_QPA_PLATFORM": "offscreen"}
    proc = subprocess.run([python, "-m", "tugboat", str(model_file), "--quit-after", "1"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "invalid choice" not in proc.stderr and "Traceback" not in proc.stderr


def test_open_model_then_a_broken_one_recent_holds_only_what_opened(qtbot, window, model_file, tmp_path):
    window.load_data("demo:digits")
    start(window, parse_args([str(model_file)]))
    with qtbot.waitSignal(window.session.baseline_ready, timeout=120000):
        pass
    assert window.settings.recent_models[0] == str(model_file)
    assert window.settings.last_model == str(model_file)
    assert load_settings().last_model == str(model_file)  # saved

    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx file at all")
    job = window.load_model(str(broken))
    qtbot.waitUntil(lambda: job.is_ended, timeout=60000)
    qtbot.wait(50)
    assert job.state == "failed"
    assert str(broken) not in window.settings.recent_models
    assert str(broken) not in [a.text() for a in window.recent_menu.actions()]
    assert window.settings.last_model == str(model_file)
    assert load_settings().last_model == str(model_file)

    # a path that is not there: one clear line, nothing loads
    window.open_path(str(tmp_path / "nowhere.onnx"))
    assert any("no such file" in n.label.text() for n in window.notifications.shown())


def test_a_recipe_opens_its_model_and_sets_up_its_steps(qtbot, window, tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('model = "demo:digits-cnn"\ndata = "demo:digits"\n'
                      '[[steps]]\ntechnique = "prune"\nmethod = "structured"\nratio = 0.3\n'
                      'finetune_epochs = 0\n'
                      '[[steps]]\ntechnique = "quantize"\nmethod = "static-int8"\ncalibration_samples = 64\n')
    start(window, parse_args([str(recipe)]))
    with qtbot.waitSignal(window.session.baseline_ready, timeout=120000):
        pass
    qtbot.waitUntil(lambda: len(window.session.chain) == 1, timeout=2000)
    assert window.session.model_ref == "demo:digits-cnn" and window.session.data_ref == "demo:digits"
    assert window.session.chain[0]["ratio"] == 0.3
    panel = window.current_panel()
    assert panel is window.panels["quantize"]
    assert panel.step()["method"] == "static-int8" and panel.step()["calibration_samples"] == 64


def test_demo_says_the_last_workspace_was_kept(qtbot, window, tmp_path):
    from tugboat.engine.running.workspace import Workspace

    Workspace.create(tmp_path / "ws")
    window.settings.last_workspace = str(tmp_path / "ws")
    start(window, parse_args(["--demo"]))
    texts = [n.label.text() for n in window.notifications.shown()]
    assert any("kept" in t and str(tmp_path / "ws") in t for t in texts), texts
    with qtbot.waitSignal(window.session.baseline_ready, timeout=120000):
        pass


def test_file_dialogs_start_in_the_folder_last_used(qtbot, window, model_file, tmp_path, monkeypatch):
    from PySide6.QtWidgets import QFileDialog

    asked = []

    def fake_open(parent, title, folder, file_filter):
        asked.append(folder)
        return str(model_file), file_filter

    monkeypatch.setattr(QFileDialog, "getOpenFileName", staticmethod(fake_open))
    for _ in range(2):  # File > Open model... and its "File..." button, as the user clicks them
        dialog = window.make_open_dialog()
        dialog._on_browse_clicked()
        assert dialog.values()[0] == str(model_file)
        dialog.deleteLater()
    assert asked[0] == "" and asked[1] == str(model_file.parent)
    # kept in the settings: a new window starts there too
    assert load_settings().dialog_dirs["models"] == str(model_file.parent)
    saves = []
    (tmp_path / "out").mkdir()
    monkeypatch.setattr(QFileDialog, "getSaveFileName",
                        staticmethod(lambda parent, title, default, f: (saves.append(default) or
                                                                        str(tmp_path / "out" / "x.onnx"), f)))
    window._ask_save_path("Export", "x.onnx", "*.onnx")
    window._ask_save_path("Export", "y.onnx", "*.onnx")
    assert saves == ["x.onnx", str(tmp_path / "out" / "y.onnx")]
    window.queue.cancel_all()


def test_desktop_entry_opens_files_of_the_declared_types():
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str
    parser.read(resources.desktop_entry(), encoding="utf-8")
    entry = parser["Desktop Entry"]
    assert entry["Exec"].split()[-1] in ("%f", "%F")
    declared = [t for t in entry["MimeType"].split(";") if t]
    assert entry["MimeType"].endswith(";") and "application/toml" in declared
    ns = {"m": "http://www.freedesktop.org/standards/shared-mime-info"}
    root = ET.parse(resources.mime_info()).getroot()
    globs = {t.get("type"): {g.get("pattern") for g in t.findall("m:glob", ns)}
             for t in root.findall("m:mime-type", ns)}
    for t in declared:
        assert t == "application/toml" or t in globs, f"{t} is declared but has no MIME definition"
    patterns = set().union(*globs.values())
    assert {"*.onnx", "*.pt", "*.pth", "*.pt2", "*.safetensors"} <= patterns
    assert set(globs) <= set(declared)
