"""Small widgets the panels share: exact number entry bound to a slider, a wheel guard, an eliding label.

* :class:`NumberField`: a slider and a spin box bound to one value of a recipe parameter. The
  precision and step come from the parameter's schema (:func:`param_precision`), the spin box takes
  any typed value the parameter allows (nothing is rounded to the slider's grid), arrow keys and
  Page Up/Down step it, and ``is_held()`` says whether the mouse button is still down on the slider,
  so a run starts on release, never while the user is still dragging.
* :func:`guard_wheel`: sliders, spin boxes and combo boxes change on the mouse wheel only when they
  have keyboard focus; otherwise the wheel scrolls whatever is around them (the panel's scroll area).
* :class:`ElidedLabel`: one line, elided in the middle to the width it gets, full text as tooltip.
"""

from __future__ import annotations

import math
from typing import Any

from PySide6.QtCore import QEvent, QLocale, QObject, QPointF, Qt, QTimer, Signal
from PySide6.QtGui import QFontMetrics, QValidator, QWheelEvent
from PySide6.QtWidgets import (
    QAbstractSlider,
    QAbstractSpinBox,
    QApplication,
    QComboBox,
    QDoubleSpinBox,
    QHBoxLayout,
    QLabel,
    QSizePolicy,
    QSlider,
    QSpinBox,
    QWidget,
)

from ..engine.techniques.steps import Param

MAX_DECIMALS = 6  # what a typed value may carry; the display uses the parameter's own precision
INT_MAX = 2 ** 31 - 1
LOG_STEPS_PER_DECADE = 20


def _places(x: float | str | None) -> int:
    """Decimal places written in ``x`` (0.02 -> 2, 4.0 -> 0; "auto" -> 0)."""
    if x is None or isinstance(x, str) or not math.isfinite(float(x)):
        return 0
    text = f"{float(x):.{MAX_DECIMALS}f}".rstrip("0")
    return len(text.split(".")[1]) if "." in text else 0


def param_precision(p: Param) -> tuple[int, float]:
    """(decimals shown, step) for a numeric parameter, from its type and bounds.

    About a hundred steps span the range (ratio 0..0.99 -> 0.01, temperature 1..20 -> 0.1), and a
    bound or default written with more places makes the step finer (width 0.02..4 -> 0.01), so every
    value the schema itself mentions is on the grid."""
    if p.kind == "int":
        return 0, 1
    if p.minimum is None or p.maximum is None:
        d = max(1, _places(p.default), _places(p.minimum), _places(p.maximum))
        d = min(d, MAX_DECIMALS)
        return d, 10.0 ** -d
    span = float(p.maximum) - float(p.minimum)
    d = 2 - round(math.log10(span)) if span > 0 else 2
    d = max(1, d, _places(p.minimum), _places(p.maximum), _places(p.default))
    d = min(d, MAX_DECIMALS)
    return d, 10.0 ** -d


def format_value(value: float, decimals: int) -> str:
    """``value`` with ``decimals`` places, or more when it has more (a value is never shown rounded)."""
    text = f"{value:.{decimals}f}"
    if abs(float(text) - value) > 1e-12 * max(1.0, abs(value)):
        text = f"{value:.{MAX_DECIMALS}f}".rstrip("0")
        if text.endswith("."):
            text += "0"
    return text


class _ExactSpinBox(QDoubleSpinBox):
    """Keeps up to MAX_DECIMALS typed places but shows the parameter's precision (0.50, 0.25, 4.0)."""

    def __init__(self, shown_decimals: int, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._shown = shown_decimals
        self.setLocale(QLocale.c())  # "0.25" on every system; the text is also what a recipe holds
        self.setDecimals(MAX_DECIMALS)

    def textFromValue(self, value: float) -> str:  # noqa: N802 - Qt's name
        return format_value(value, self._shown)


class _LogSpinBox(QDoubleSpinBox):
    """A spin box for log-scale values (learning rates): shows 0.003 / 1e-05, steps by ~26%."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setLocale(QLocale.c())
        self.setDecimals(12)

    def textFromValue(self, value: float) -> str:  # noqa: N802
        return f"{value:.4g}"

    def valueFromText(self, text: str) -> float:  # noqa: N802
        if self.specialValueText() and text.strip().lower() == self.specialValueText():
            return self.minimum()  # "auto": the value one step below the parameter's range
        try:
            return float(text.strip())
        except ValueError:
            return self.value()

    def validate(self, text: str, pos: int):
        t = text.strip()
        special = self.specialValueText()
        if special and t.lower() == special:
            return QValidator.State.Acceptable, text, pos
        if special and special.startswith(t.lower()):
            return QValidator.State.Intermediate, text, pos
        try:
            v = float(t)
        except ValueError:
            ok = t == "" or all(c in "0123456789.eE+-" for c in t)
            return (QValidator.State.Intermediate if ok else QValidator.State.Invalid), text, pos
        if self.minimum() <= v <= self.maximum():
            return QValidator.State.Acceptable, text, pos
        return QValidator.State.Intermediate, text, pos

    def stepBy(self, steps: int) -> None:  # noqa: N802
        v = self.value() * 10 ** (steps / LOG_STEPS_PER_DECADE * 2)
        self.setValue(min(max(float(f"{v:.2g}"), self.minimum()), self.maximum()))
        self.editingFinished.emit()


class NumberField(QWidget):
    """A slider and a spin box bound to one numeric parameter.

    ``valueChanged(value)`` on every change (dragging included), ``committed()`` when a change is
    final: the slider released, or a typed value entered (Enter or leaving the box)."""

    valueChanged = Signal(object)  # noqa: N815 - reads like the Qt widgets it replaces
    committed = Signal()

    def __init__(self, p: Param, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.param = p
        self._held = False
        self._syncing = False
        self.decimals, self.step = param_precision(p)
        bounded = p.minimum is not None and p.maximum is not None
        self.log = p.kind == "float" and p.log_scale and bounded and float(p.minimum) > 0
        lo = float(p.minimum) if p.minimum is not None else (0.0 if p.kind == "int" else -1e12)
        hi = float(p.maximum) if p.maximum is not None else (INT_MAX if p.kind == "int" else 1e12)
        self.auto = p.auto and p.kind in ("int", "float")  # one step below the minimum reads "auto"
        if self.auto:
            lo = lo - (1 if p.kind == "int" else self.step) if not self.log \
                else lo / 10 ** (1 / LOG_STEPS_PER_DECADE)
        self.lo, self.hi = lo, hi

        self.spin = self._make_spin(p, lo, hi)
        self.slider: QSlider | None = self._make_slider(p, lo, hi) if bounded else None

        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        if self.slider is not None:
            lay.addWidget(self.slider, 1)
        lay.addWidget(self.spin, 0 if self.slider is not None else 1)
        self.spin.setMinimumWidth(self.spin.fontMetrics().horizontalAdvance("0" * 6) + 24)
        for w in (self.spin, self.slider):
            if w is not None:
                w.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
        self.spin.valueChanged.connect(self._on_spin_value)
        self.spin.editingFinished.connect(self.committed)
        self.setValue(p.default)

    def _make_spin(self, p: Param, lo: float, hi: float) -> QAbstractSpinBox:
        spin: QAbstractSpinBox
        if p.kind == "int":
            spin = QSpinBox()
            spin.setRange(int(lo), int(min(hi, INT_MAX)))
            if self.auto:
                spin.setSpecialValueText("auto")
        elif self.log:
            spin = _LogSpinBox()
            spin.setRange(lo, hi)
        else:
            spin = _ExactSpinBox(self.decimals)
            spin.setRange(lo, hi)
            spin.setSingleStep(self.step)
        if self.auto and p.kind == "float":
            spin.setSpecialValueText("auto")
        spin.setKeyboardTracking(False)  # valueChanged when a typed value is entered, not per key
        spin.setAccelerated(True)
        spin.setObjectName("spin")
        spin.setToolTip(p.help)
        return spin

    def _make_slider(self, p: Param, lo: float, hi: float) -> QSlider:
        slider = QSlider(Qt.Orientation.Horizontal)
        slider.setObjectName("slider")
        if self.log:
            slider.setRange(round(math.log10(lo) * LOG_STEPS_PER_DECADE),
                            round(math.log10(hi) * LOG_STEPS_PER_DECADE))
        else:
            slider.setRange(0, max(1, round((hi - lo) / self.step)))
        positions = slider.maximum() - slider.minimum()
        slider.setSingleStep(1)
        slider.setPageStep(max(1, round(positions / 10)))
        slider.setToolTip(p.help)
        slider.installEventFilter(self)
        slider.valueChanged.connect(self._on_slider_value)
        slider.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        slider.setMinimumWidth(40)
        return slider

    # --- value ------------------------------------------------------------------------------------
    def value(self) -> Any:
        v = self.spin.value()
        if self.auto and (v == self.lo or (self.param.minimum is not None and v < float(self.param.minimum))):
            return "auto"
        return int(v) if self.param.kind == "int" else float(v)

    def setValue(self, value: Any) -> None:  # noqa: N802 - like the widgets it replaces
        """Set exactly ``value`` (clamped to the range), moving the slider to its nearest position."""
        v = self.lo if self.auto and value == "auto" else min(max(float(value), self.lo), self.hi)
        if self.param.kind == "int":
            self.spin.setValue(round(v))
        else:
            self.spin.setValue(v)

    def text(self) -> str:
        return self.spin.text()

    def is_held(self) -> bool:
        """The mouse button is down on the slider (a drag or a press on the groove)."""
        return self._held or (self.slider is not None and self.slider.isSliderDown())

    isSliderDown = is_held  # noqa: N815 - what the panel asked of the slider widgets before

    # --- binding ----------------------------------------------------------------------------------
    def _position_of(self, v: float) -> int:
        if self.log:
            return round(math.log10(max(v, 1e-300)) * LOG_STEPS_PER_DECADE)
        return round((v - self.lo) / self.step)

    def _value_at(self, pos: int) -> float:
        if self.log:
            return float(f"{10 ** (pos / LOG_STEPS_PER_DECADE):.2g}")
        if self.param.kind == "int":
            return int(self.lo + pos)
        return round(self.lo + pos * self.step, self.decimals)

    def _on_slider_value(self, pos: int) -> None:
        if self._syncing:
            return
        v = min(max(self._value_at(pos), self.lo), self.hi)
        if self.auto and self.param.minimum is not None and v < float(self.param.minimum):
            v = self.lo  # the slider's first position: "auto"
        self._syncing = True
        try:
            self.spin.setValue(v)
        finally:
            self._syncing = False
        self.valueChanged.emit(self.value())

    def _on_spin_value(self, _v) -> None:
        if self.slider is not None and not self._syncing:
            self._syncing = True
            try:
                self.slider.setValue(self._position_of(float(self.spin.value())))
            finally:
                self._syncing = False
        if not self._syncing:
            self.valueChanged.emit(self.value())

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802
        if obj is self.slider:
            t = event.type()
            if t == QEvent.Type.MouseButtonPress:
                self._held = True
            elif t == QEvent.Type.MouseButtonRelease and self._held:
                self._held = False
                # after the slider has handled the release (its last value change)
                QTimer.singleShot(0, self.committed.emit)
        return super().eventFilter(obj, event)


# --- the wheel ------------------------------------------------------------------------------------
class WheelGuard(QObject):
    """Event filter: a control without keyboard focus passes the wheel to its parents (the
    scroll area around it scrolls) instead of changing its value."""

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802
        if event.type() == QEvent.Type.Wheel and isinstance(obj, QWidget) and not obj.hasFocus():
            # hand it up the parents (as Qt does with an ignored wheel) until one takes it
            parent = obj.parentWidget()
            while parent is not None and isinstance(event, QWheelEvent):
                pos = obj.mapTo(parent, event.position().toPoint())
                forwarded = QWheelEvent(QPointF(pos), event.globalPosition(), event.pixelDelta(),
                                        event.angleDelta(), event.buttons(), event.modifiers(),
                                        event.phase(), event.inverted())
                forwarded.setAccepted(False)
                QApplication.sendEvent(parent, forwarded)
                if forwarded.isAccepted() or parent.isWindow():
                    break
                parent = parent.parentWidget()
            event.ignore()
            return True
        return False


_GUARD: WheelGuard | None = None


def guard_wheel(root: QWidget) -> None:
    """Every slider, spin box and combo box under ``root`` (and ``root`` itself) takes the wheel
    only when it has focus, and takes focus only from a click or Tab (never from the wheel)."""
    global _GUARD
    if _GUARD is None:
        _GUARD = WheelGuard(QApplication.instance())
    kinds = (QAbstractSlider, QAbstractSpinBox, QComboBox)
    widgets = [root] if isinstance(root, kinds) else []
    widgets += [w for w in root.findChildren(QWidget) if isinstance(w, kinds)]
    for w in widgets:
        w.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
        w.removeEventFilter(_GUARD)
        w.installEventFilter(_GUARD)


# --- labels ---------------------------------------------------------------------------------------
class ElidedLabel(QLabel):
    """One line of plain text, elided to fit (middle for paths, right otherwise), full text as tooltip.
    It asks for no width of its own, so a long path never widens its panel."""

    def __init__(self, text: str = "", mode: Qt.TextElideMode = Qt.TextElideMode.ElideMiddle,
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._full = ""
        self._mode = mode
        self.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.setMinimumWidth(40)
        self.setText(text)

    def setText(self, text: str) -> None:  # noqa: N802
        self._full = str(text)
        self.setToolTip(self._full if self._full not in ("", "-") else "")
        self._elide()

    def text(self) -> str:  # the full text for callers; Qt paints the elided one
        return self._full

    def full_text(self) -> str:
        return self._full

    def _elide(self) -> None:
        width = max(self.width(), 20)
        super().setText(QFontMetrics(self.font()).elidedText(self._full, self._mode, width))

    def resizeEvent(self, event) -> None:  # noqa: N802
        super().resizeEvent(event)
        self._elide()

    def minimumSizeHint(self):  # noqa: N802
        hint = super().minimumSizeHint()
        hint.setWidth(40)
        return hint

    def sizeHint(self):  # noqa: N802
        hint = super().sizeHint()
        hint.setWidth(min(hint.width(), QFontMetrics(self.font()).horizontalAdvance(self._full) + 4))
        return hint
