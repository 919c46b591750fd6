"""TechniquePanel is built from the registry alone: a toy technique gets a full panel."""

from __future__ import annotations

import pytest
from PySide6.QtWidgets import QCheckBox, QComboBox, QLineEdit
from superqt import QLabeledDoubleSlider, QLabeledSlider

from tugboat.engine import steps
from tugboat.engine.steps import Param, Technique
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
    assert isinstance(c["ratio"], QLabeledDoubleSlider)
    assert isinstance(c["epochs"], QLabeledSlider)
    assert isinstance(c["bias"], QCheckBox) and isinstance(c["mode"], QComboBox)
    assert isinstance(c["skip"], QLineEdit) and isinstance(c["seed"], QLineEdit)
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


def test_drag_emits_changes_and_release_commits_once(qtbot, toy):
    panel = TechniquePanel(toy)
    qtbot.addWidget(panel)
    changed, committed = [], []
    panel.step_changed.connect(changed.append)
    panel.step_committed.connect(committed.append)
    slider = panel.controls["ratio"]
    slider._slider.setSliderDown(True)
    for v in (0.2, 0.3, 0.4):
        slider.setValue(v)
    assert [s["ratio"] for s in changed] == [0.2, 0.3, 0.4]
    qtbot.wait(600)
    assert committed == []  # still held: no real run while dragging
    slider._slider.setSliderDown(False)
    slider.sliderReleased.emit()
    assert [s["ratio"] for s in committed] == [0.4]


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
