"""TechniquePanel is built from the registry alone: a toy technique gets a full panel."""

from __future__ import annotations

import pytest
from PySide6.QtCore import QPoint, QPointF, Qt
from PySide6.QtGui import QWheelEvent
from PySide6.QtTest import QTest
from PySide6.QtWidgets import QApplication, QCheckBox, QComboBox, QLineEdit, QScrollArea, QStyle, QStyleOptionSlider

from tugboat.engine.techniques import steps
from tugboat.engine.techniques.steps import Param, Technique
from tugboat.ui.controls import NumberField, format_value, param_precision
from tugboat.ui.technique_panel import TechniquePanel, build_panels


@pytest.fixture
def toy():
    tech = Technique(
        "toy", "Toy", "A technique that only exists in this test.",
        methods={"fast": "the fast way", "slow": "the slow way"},
        params=[Param("ratio", "float", 0.5, "How much to remove.", 0.0, 0.95),
                Param("epochs", "int", 2, "Training epochs.", 0, 20, methods=("slow",)),
                Param("lr", "float", 1e-3, "Learning rate.", 1e-5, 1e-1, log_scale=True),
                Param("bias", "bool", True, "Keep biases."),
                Param("mode", "choice", "x", "A mode.", choices=("x", "y")),
                Param("skip", "list", [], "Layers to skip."),
                Param("seed", "int", 0, "Random seed.", 0, None)],
        apply=lambda handle, params, data, progress: handle)
    steps.register(tech)
    yield tech
    steps._REGISTRY.pop("toy", None)


def test_a_control_per_param_with_help_as_tooltip(qtbot, toy):
    panel = TechniquePanel(toy)
    qtbot.addWidget(panel)
    c = panel.controls
    assert isinstance(c["ratio"], NumberField) and c["ratio"].slider is not None
    assert isinstance(c["epochs"], NumberField) and c["epochs"].slider is not None
    assert isinstance(c["bias"], QCheckBox) and isinstance(c["mode"], QComboBox)
    assert isinstance(c["skip"], QLineEdit)
    assert isinstance(c["seed"], NumberField) and c["seed"].slider is None  # unbounded: a spin box
    assert all(c[p.name].toolTip() == p.help for p in toy.params)
    assert panel.step() == toy.validate({"technique": "toy", "method": "fast"}, "t")


def test_only_params_of_the_method_are_shown(qtbot, toy):
    panel = TechniquePanel(toy)
    qtbot.addWidget(panel)
    panel.show()
    assert not panel.controls["epochs"].isVisible() and "epochs" not in panel.step()
    panel.method_combo.setCurrentIndex(panel.method_combo.findData("slow"))
    assert panel.controls["epochs"].isVisible()
    assert panel.step()["epochs"] == 2 and panel.step()["method"] == "slow"


def _handle_centre(slider) -> QPoint:
    opt = QStyleOptionSlider()
    slider.initStyleOption(opt)
    rect = slider.style().subControlRect(QStyle.ComplexControl.CC_Slider, opt,
                                         QStyle.SubControl.SC_SliderHandle, slider)
    return rect.center()


def drag(qtbot, slider, dx_steps: list[int]) -> None:
    """Press the handle with the mouse, move it by each offset in pixels, keep the button down."""
    start = _handle_centre(slider)
    QTest.mousePress(slider, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, start)
    for dx in dx_steps:
        QTest.mouseMove(slider, start + QPoint(dx, 0))
        qtbot.wait(10)


def test_mouse_drag_emits_changes_and_only_the_release_commits(qtbot, toy):
    panel = TechniquePanel(toy)
    qtbot.addWidget(panel)
    panel.resize(500, 400)
    panel.show()
    qtbot.waitExposed(panel)
    changed, committed = [], []
    panel.step_changed.connect(changed.append)
    panel.step_committed.connect(committed.append)
    field = panel.controls["ratio"]
    drag(qtbot, field.slider, [15, 30, 45])
    assert field.is_held()
    values = [s["ratio"] for s in changed]
    assert len(values) >= 3 and values == sorted(values) and values[-1] > 0.5
    qtbot.wait(700)  # far longer than the keyboard debounce: still held, so no run
    assert committed == []
    QTest.mouseRelease(field.slider, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier,
                       _handle_centre(field.slider))
    qtbot.waitUntil(lambda: len(committed) == 1, timeout=1000)
    assert committed[0]["ratio"] == values[-1] == field.value()
    qtbot.wait(600)
    assert len(committed) == 1  # the release committed once, the debounce adds nothing


def test_pressing_the_groove_and_holding_does_not_run(qtbot, toy):
    panel = TechniquePanel(toy)
    qtbot.addWidget(panel)
    panel.resize(500, 400)
    panel.show()
    qtbot.waitExposed(panel)
    committed = []
    panel.step_committed.connect(committed.append)
    slider = panel.controls["ratio"].slider
    QTest.mousePress(slider, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier,
                     QPoint(slider.width() - 3, slider.height() // 2))
    qtbot.wait(900)
    assert committed == []
    QTest.mouseRelease(slider, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier,
                       QPoint(slider.width() - 3, slider.height() // 2))
    qtbot.waitUntil(lambda: len(committed) == 1, timeout=1000)
    assert committed[0]["ratio"] > 0.5


def test_keyboard_edits_commit_after_debounce(qtbot, toy):
    panel = TechniquePanel(toy)
    qtbot.addWidget(panel)
    committed = []
    panel.step_committed.connect(committed.append)
    panel.set_value("lr", 0.01)
    panel.set_value("bias", False)
    panel.set_value("skip", ["a", "b"])
    assert committed == []
    qtbot.waitUntil(lambda: len(committed) == 1, timeout=2000)
    step = committed[0]
    assert step["lr"] == pytest.approx(0.01) and step["bias"] is False and step["skip"] == ["a", "b"]
    with qtbot.waitSignal(panel.run_requested) as blocker:
        panel.run_button.click()
    assert blocker.args[0] == step


def test_every_registered_technique_gets_a_panel(qtbot, toy):
    panels = build_panels()
    for p in panels.values():
        qtbot.addWidget(p)
    assert "toy" in panels
    for name, panel in panels.items():
        tech = steps.techniques()[name]
        assert set(panel.controls) == {p.name for p in tech.params}
        assert tech.validate(panel.step(), name) == panel.step()


# --- exact entry ---------------------------------------------------------------------------------

def test_precision_and_step_come_from_the_schema():
    techs = steps.techniques()
    width = techs["distill"].param("width")
    assert param_precision(width) == (2, 0.01)  # 0.02..4: 0.25 is on the grid (was one decimal)
    assert param_precision(techs["prune"].param("ratio")) == (2, 0.01)
    assert param_precision(techs["distill"].param("temperature")) == (1, pytest.approx(0.1))
    assert param_precision(techs["distill"].param("epochs")) == (0, 1)
    assert format_value(0.5, 2) == "0.50" and format_value(0.333, 2) == "0.333"


def type_into(qtbot, field: NumberField, text: str) -> None:
    spin = field.spin
    spin.setFocus()
    spin.selectAll()
    QTest.keyClicks(spin, text)
    QTest.keyClick(spin, Qt.Key.Key_Return)


def test_typed_values_are_used_exactly_and_committed_at_once(qtbot):
    panel = build_panels()["distill"]
    qtbot.addWidget(panel)
    panel.show()
    qtbot.waitExposed(panel)
    committed = []
    panel.step_committed.connect(committed.append)
    width = panel.controls["width"]
    type_into(qtbot, width, "0.25")
    assert committed and committed[-1]["width"] == 0.25  # committed on Enter, no wait
    assert width.text() == "0.25" and panel.step()["width"] == 0.25
    type_into(qtbot, width, "0.255")  # finer than the step: kept, not rounded
    assert panel.step()["width"] == 0.255 and width.text() == "0.255"
    assert committed[-1]["width"] == 0.255
    # the slider follows to its nearest position; the spin box keeps the exact value
    assert width.slider.value() == round((0.255 - 0.02) / 0.01)
    # a value set from a recipe is shown with all its places
    panel.set_step({"technique": "distill", "method": "kd", "alpha": 0.125})
    assert panel.controls["alpha"].text() == "0.125" and panel.step()["alpha"] == 0.125


def test_keyboard_steps_on_slider_and_spin_box(qtbot):
    panel = build_panels()["prune"]
    qtbot.addWidget(panel)
    panel.show()
    qtbot.waitExposed(panel)
    ratio = panel.controls["ratio"]
    panel.set_value("ratio", 0.5)
    ratio.slider.setFocus()
    QTest.keyClick(ratio.slider, Qt.Key.Key_Right)
    assert ratio.value() == 0.51
    QTest.keyClick(ratio.slider, Qt.Key.Key_PageUp)
    assert ratio.value() == 0.61
    QTest.keyClick(ratio.slider, Qt.Key.Key_Left)
    assert ratio.value() == 0.6
    ratio.spin.setFocus()
    QTest.keyClick(ratio.spin, Qt.Key.Key_Down)
    assert ratio.value() == 0.59 and ratio.text() == "0.59"
    QTest.keyClick(ratio.spin, Qt.Key.Key_PageDown)
    assert ratio.value() == pytest.approx(0.49)
    # every 0.01 is reachable: 0.50 exactly
    QTest.keyClick(ratio.spin, Qt.Key.Key_Up)
    assert ratio.value() == 0.5 and panel.step()["ratio"] == 0.5


def _wheel(widget, delta: int = -120) -> None:
    pos = QPointF(widget.width() / 2, widget.height() / 2)
    event = QWheelEvent(pos, QPointF(widget.mapToGlobal(pos.toPoint())), QPoint(0, 0), QPoint(0, delta),
                        Qt.MouseButton.NoButton, Qt.KeyboardModifier.NoModifier, Qt.ScrollPhase.NoScrollPhase,
                        False)
    QApplication.sendEvent(widget, event)


def test_wheel_scrolls_the_panel_and_changes_a_control_only_with_focus(qtbot):
    panel = build_panels()["distill"]
    scroll = QScrollArea()
    scroll.setWidgetResizable(True)
    scroll.setWidget(panel)
    qtbot.addWidget(scroll)
    scroll.resize(420, 260)  # shorter than the panel: it scrolls
    scroll.show()
    qtbot.waitExposed(scroll)
    changed = []
    panel.step_changed.connect(changed.append)
    before = panel.step()
    bar = scroll.verticalScrollBar()
    assert bar.maximum() > 0
    for w in (panel.controls["width"].slider, panel.controls["width"].spin, panel.controls["loss"],
              panel.method_combo):
        _wheel(w)
    qtbot.wait(500)
    assert changed == [] and panel.step() == before
    assert bar.value() > 0  # the wheel went to the scroll area instead
    slider = panel.controls["width"].slider
    slider.setFocus()
    qtbot.waitUntil(slider.hasFocus)
    _wheel(slider, 120)
    assert changed and panel.step()["width"] != before["width"]


def test_model_panel_says_which_techniques_cannot_run_and_why(qtbot, tmp_path):
    from helpers import onnx_with_unsupported_op
    from tugboat.engine.running.info import model_info
    from tugboat.ui.model_panel import ModelPanel

    onnx_with_unsupported_op(tmp_path / "odd.onnx")
    panel = ModelPanel()
    qtbot.addWidget(panel)
    panel.show_info(model_info(str(tmp_path / "odd.onnx")))
    notes = panel.fields["Notes"].text()
    assert "cannot prune: needs a torch model; this one is ONNX-only" in notes
    assert "cannot distill" not in notes
    assert panel.fields["Task"].text().startswith("classification")


def test_the_task_can_be_chosen_in_the_window_and_remeasures(qtbot, tmp_path):
    from helpers import onnx_with_unsupported_op
    from tugboat.engine.measuring.measure import MeasureConfig
    from tugboat.ui.main_window import MainWindow

    onnx_with_unsupported_op(tmp_path / "enc.onnx")  # output [batch, 4]: inferred classification
    w = MainWindow()
    qtbot.addWidget(w)
    w.session.measure = MeasureConfig(batch=4, threads=1, warmup=1, min_runs=2, min_seconds=0.0,
                                      max_seconds=0.1, also_batch1=False, both_runtimes=False)
    try:
        with qtbot.waitSignal(w.session.baseline_ready, timeout=60000):
            w.load_model(str(tmp_path / "enc.onnx"), "")
        assert w.model_panel.fields["Task"].text() == "classification (inferred from the outputs)"
        combo = w.model_panel.task_combo
        with qtbot.waitSignal(w.session.baseline_ready, timeout=60000) as blocker:
            combo.setCurrentIndex(combo.findData("embedding"))
            combo.activated.emit(combo.currentIndex())
        base = blocker.args[0]
        assert base.handle.task == "embedding" and base.metrics["fidelity"]["top1_agreement"] is None
        qtbot.waitUntil(lambda: "embedding (chosen)" in w.model_panel.fields["Task"].text(), timeout=10000)
        assert w.session.recipe_for(None).to_dict()["task"] == "embedding"
    finally:
        w.queue.shutdown(10)


def test_learning_rate_auto_is_a_position_of_its_field(qtbot):
    """Pruning's ``lr`` defaults to "auto" (the engine probes the rate): the field shows "auto" at
    the slider's first position, takes a typed rate and gives "auto" back when typed or dragged."""
    panel = build_panels()["prune"]
    qtbot.addWidget(panel)
    panel.show()
    qtbot.waitExposed(panel)
    lr = panel.controls["lr"]
    assert lr.value() == "auto" and lr.text() == "auto" and panel.step()["lr"] == "auto"
    type_into(qtbot, lr, "0.0003")
    assert lr.value() == pytest.approx(3e-4) and panel.step()["lr"] == pytest.approx(3e-4)
    type_into(qtbot, lr, "auto")
    assert lr.value() == "auto" and panel.step()["lr"] == "auto"
    lr.setValue(3e-3)
    lr.slider.setValue(lr.slider.minimum())
    assert lr.value() == "auto"
    lr.slider.setValue(lr.slider.minimum() + 1)
    assert lr.value() == pytest.approx(lr.param.minimum, rel=0.2) and lr.value() >= lr.param.minimum
