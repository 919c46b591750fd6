"""The real window opens the formats people bring (TorchScript, safetensors + the user's
architecture through the open dialog's field, a Hugging Face folder) and runs a step on each."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QDialogButtonBox

from helpers import run_prune
from test_formats import ARCH_CODE, MobileLike
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


def _open_with_dialog(window, path, arch="", kwargs=""):
    """File > Open model... with the dialog's fields filled in as a user would."""
    make = window.make_open_dialog

    def filled():
        dialog = make()

        def fill():
            dialog.path_edit.setText(str(path))
            dialog.arch_edit.setText(arch)
            dialog.kwargs_edit.setText(kwargs)
            dialog.buttons.button(QDialogButtonBox.StandardButton.Open).click()

        QTimer.singleShot(0, fill)
        return dialog

    window.make_open_dialog = filled
    window.open_model_dialog()


def _images(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "images.npz"
    np.savez(path, input=rng.random((96, 1, 8, 8)).astype(np.float32), labels=rng.integers(0, 10, 96))
    return path


def test_window_opens_torchscript_and_prunes_it(qtbot, window, tmp_path):
    torch.manual_seed(0)
    model = MobileLike().eval()
    torch.jit.trace(model, torch.rand(2, 1, 8, 8)).save(str(tmp_path / "traced.pt"))
    window.load_data(str(_images(tmp_path)))  # no model yet: remembered for the next load
    with qtbot.waitSignal(window.session.baseline_ready, timeout=120000):
        _open_with_dialog(window, tmp_path / "traced.pt")
    assert window.session.baseline.handle.format == "torchscript"
    v = run_prune(qtbot, window, 0.25)
    assert v.status == "ok", v.error
    assert v.metrics["params"] < window.store.get("baseline").metrics["params"]


def test_window_opens_safetensors_with_user_architecture_after_trust(qtbot, window, tmp_path):
    from safetensors.torch import save_file

    code = tmp_path / "my_models.py"
    code.write_text(ARCH_CODE)
    ns: dict = {}
    exec(compile(ARCH_CODE, str(code), "exec"), ns)
    save_file(ns["ResNetish"](width=12).state_dict(), str(tmp_path / "weights.safetensors"))
    window.load_data(str(_images(tmp_path)))
    asked = []
    window.confirm_trust = lambda p: asked.append(p) or True
    with qtbot.waitSignal(window.session.baseline_ready, timeout=120000):
        _open_with_dialog(window, tmp_path / "weights.safetensors", f"{code}:ResNetish", '{"width": 12}')
    assert asked and "weights.safetensors" in asked[0]  # the confirmation names the file
    handle = window.session.baseline.handle
    assert handle.format == "state_dict" and handle.arch == f"{code}:ResNetish"
    recipe = window.session.base_recipe().to_dict()
    assert recipe["arch_kwargs"] == {"width": 12} and "trust" not in recipe  # trust is never saved
    v = run_prune(qtbot, window, 0.25)
    assert v.status == "ok", v.error
    assert "trust" not in v.recipe


def test_open_dialog_refuses_bad_arguments_in_place(qtbot, window):
    dialog = window.make_open_dialog()
    qtbot.addWidget(dialog)
    dialog.path_edit.setText("weights.pt")
    dialog.arch_edit.setText("models.py:Net")
    dialog.kwargs_edit.setText("[1, 2]")
    dialog.buttons.button(QDialogButtonBox.StandardButton.Open).click()
    assert dialog.result() == 0 and "JSON object" in dialog.error_label.text()
