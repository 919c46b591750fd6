"""A technique panel built from the engine's registry: one control per recipe parameter.

Nothing here knows about pruning, quantization or distillation. A :class:`TechniquePanel` reads a
:class:`~tugboat.engine.techniques.steps.Technique` (methods and :class:`Param` schemas) and makes a method
combo, a slider bound to an exact spin box for every numeric parameter (precision and step from the
schema, see :func:`~tugboat.ui.controls.param_precision`), a combo for choices, a checkbox for
booleans and a line edit for strings and lists, each with the parameter's help as tooltip. Only the
parameters that apply to the chosen method are shown. A new technique needs no change here.

Signals carry a recipe step (``{"technique", "method", **params}``): ``step_changed`` on every
edit including while a slider is dragged (for live estimates), ``step_committed`` once a setting is
final: the slider released or a typed value entered at once, keyboard steps 600 ms after the last
one (the app's one debounce: the live preview runs what the panel commits); never while the mouse
button is still down on a slider (the "real run" cue). The wheel changes a control only when it has
focus, so scrolling the panel changes nothing.
"""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from ..engine.errors import RecipeError
from ..engine.techniques.steps import Param, Technique
from .controls import NumberField, guard_wheel

COMMIT_DELAY_MS = 600


class TechniquePanel(QWidget):
    step_changed = Signal(dict)
    step_committed = Signal(dict)
    run_requested = Signal(dict)
    add_to_sweep_requested = Signal(dict)

    def __init__(self, technique: Technique, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.technique = technique
        self.setObjectName(f"panel_{technique.name}")
        self.controls: dict[str, QWidget] = {}
        self.rows: dict[str, tuple[QLabel, QWidget]] = {}
        self._loading = False
        self._last_committed: dict[str, Any] | None = None
        self._commit_timer = QTimer(self)
        self._commit_timer.setSingleShot(True)
        self._commit_timer.setInterval(COMMIT_DELAY_MS)
        self._commit_timer.timeout.connect(self._commit)

        outer = QVBoxLayout(self)
        title = QLabel(f"<b>{technique.title}</b>")
        summary = QLabel(technique.summary)
        summary.setWordWrap(True)
        summary.setObjectName("summary")
        outer.addWidget(title)
        outer.addWidget(summary)

        self.form = QFormLayout()
        self.form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        self.form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.DontWrapRows)
        self.method_combo = QComboBox()
        for method, help_text in technique.methods.items():
            self.method_combo.addItem(method, method)
            self.method_combo.setItemData(self.method_combo.count() - 1, help_text,
                                          Qt.ItemDataRole.ToolTipRole)
        default = technique.default_method or next(iter(technique.methods))
        self.method_combo.setCurrentIndex(max(0, self.method_combo.findData(default)))
        self.method_help = QLabel()
        self.method_help.setWordWrap(True)
        self.method_help.setObjectName("method_help")
        self.form.addRow("Method", self.method_combo)
        self.form.addRow("", self.method_help)
        for p in technique.params:
            self._add_param(p)
        outer.addLayout(self.form)
        outer.addWidget(self._build_buttons())
        outer.addStretch(1)

        self.method_combo.currentIndexChanged.connect(self._on_method_changed)
        self.run_button.clicked.connect(lambda: self.run_requested.emit(self.step()))
        self.sweep_button.clicked.connect(lambda: self.add_to_sweep_requested.emit(self.step()))
        self._loading = True
        self._on_method_changed()
        self._loading = False
        self._last_committed = self.step()
        guard_wheel(self)

    def _build_buttons(self) -> QWidget:
        """Run and Add to sweep in their own bar: the window keeps it below the scrolling form."""
        self.button_bar = QWidget()
        self.button_bar.setObjectName("panel_buttons")
        buttons = QHBoxLayout(self.button_bar)
        buttons.setContentsMargins(0, 2, 0, 2)
        self.run_button = QPushButton("Run")
        self.run_button.setToolTip("Make one variant with these settings (after the chained steps)")
        self.sweep_button = QPushButton("Add to sweep")
        self.sweep_button.setToolTip("Add these settings (after the chained steps) to the sweep: one variant each")
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.sweep_button)
        buttons.addStretch(1)
        return self.button_bar

    # --- building ---------------------------------------------------------------------------------
    def _add_param(self, p: Param) -> None:
        w: QWidget
        if p.kind in ("float", "int"):  # a slider and an exact spin box (a spin box alone if unbounded)
            w = NumberField(p)
            w.valueChanged.connect(self._on_control_changed)
            w.committed.connect(self._on_field_committed)
        elif p.kind == "bool":
            w = QCheckBox()
            w.setChecked(bool(p.default))
            w.toggled.connect(self._on_control_changed)
        elif p.kind == "choice":
            w = QComboBox()
            w.addItems([str(c) for c in p.choices])
            w.setCurrentText(str(p.default))
            w.currentIndexChanged.connect(self._on_control_changed)
        else:  # str / list
            text = ", ".join(p.default) if p.kind == "list" and p.default else str(p.default or "")
            w = QLineEdit(text)
            if p.kind == "list":
                w.setPlaceholderText("comma-separated")
            w.textEdited.connect(self._on_control_changed)
        w.setObjectName(f"param_{p.name}")
        w.setToolTip(p.help)
        w.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        label = QLabel(p.name.replace("_", " ").capitalize())
        label.setWordWrap(True)  # "Teacher temperature" takes two lines, not the dock's width
        label.setToolTip(p.help)
        label.setBuddy(w)
        self.form.addRow(label, w)
        self.controls[p.name] = w
        self.rows[p.name] = (label, w)

    # --- state ------------------------------------------------------------------------------------
    @property
    def method(self) -> str:
        return str(self.method_combo.currentData())

    def visible_params(self) -> list[str]:
        return [p.name for p in self.technique.params_for(self.method)]

    def value(self, name: str) -> Any:
        p = self.technique.param(name)
        w = self.controls[name]
        if isinstance(w, QCheckBox):
            return w.isChecked()
        if isinstance(w, QComboBox):
            return w.currentText()
        if isinstance(w, QLineEdit):
            text = w.text().strip()
            if p.kind == "list":
                return [t.strip() for t in text.split(",") if t.strip()]
            return text
        return w.value()  # NumberField: exactly what the spin box holds

    def set_value(self, name: str, value: Any) -> None:
        """Set one control as the user would (emits step_changed, schedules a commit)."""
        w = self.controls[name]
        if isinstance(w, QCheckBox):
            w.setChecked(bool(value))
        elif isinstance(w, QComboBox):
            w.setCurrentText(str(value))
        elif isinstance(w, QLineEdit):
            w.setText(", ".join(value) if isinstance(value, (list, tuple)) else str(value))
            self._on_control_changed()
        else:
            w.setValue(value)

    def step(self) -> dict[str, Any]:
        """The current settings as a validated recipe step (defaults filled in)."""
        raw: dict[str, Any] = {"technique": self.technique.name, "method": self.method}
        for name in self.visible_params():
            raw[name] = self.value(name)
        try:
            return self.technique.validate(raw, f"{self.technique.name} panel")
        except RecipeError:
            # a half-typed text field: fall back to defaults for what does not validate
            method = self.method
            good = {"technique": self.technique.name, "method": method}
            for name in self.visible_params():
                p = self.technique.param(name)
                try:
                    good[name] = p.coerce(raw[name], "panel")
                except RecipeError:
                    good[name] = p.default
            return self.technique.validate(good, f"{self.technique.name} panel")

    def set_step(self, step: dict[str, Any]) -> None:
        """Show a recipe step (e.g. from a variant's recipe) without emitting commits."""
        self._loading = True
        try:
            if "method" in step:
                idx = self.method_combo.findData(step["method"])
                if idx >= 0:
                    self.method_combo.setCurrentIndex(idx)
            for name, value in step.items():
                if name in self.controls:
                    self.set_value(name, value)
        finally:
            self._loading = False
        self._commit_timer.stop()
        self._last_committed = self.step()

    # --- events -----------------------------------------------------------------------------------
    def _on_method_changed(self, *_a) -> None:
        method = self.method
        self.method_help.setText(self.technique.methods.get(method, ""))
        self.method_combo.setToolTip(self.technique.methods.get(method, ""))
        for p in self.technique.params:
            label, w = self.rows[p.name]
            show = p.applies_to(method)
            label.setVisible(show)
            w.setVisible(show)
        self._on_control_changed()

    def _on_control_changed(self, *_a) -> None:
        if self._loading:
            return
        self.step_changed.emit(self.step())
        if self._slider_down():
            self._commit_timer.stop()  # the release commits
        else:
            self._commit_timer.start()

    def _slider_down(self) -> bool:
        return any(isinstance(w, NumberField) and w.is_held() for w in self.controls.values())

    def _on_field_committed(self) -> None:
        """A slider released or a typed value entered: the setting is final, run it now."""
        if self._loading or self._slider_down():
            return
        self._commit_timer.stop()
        self._commit()

    def _commit(self) -> None:
        step = self.step()
        if step != self._last_committed:
            self._last_committed = step
            self.step_committed.emit(step)


def build_panels(parent: QWidget | None = None) -> dict[str, TechniquePanel]:
    """One panel per registered technique, in registry order."""
    from ..engine.techniques.steps import techniques

    return {name: TechniquePanel(tech, parent) for name, tech in techniques().items()}
