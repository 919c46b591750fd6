"""Light or dark: the app follows the system's colour scheme, and views that draw their own colours
(the pyqtgraph chart, notifications) ask here.

    from tugboat.ui import theme
    theme.is_dark()                          # the palette in use now is dark
    theme.chart_colors()                     # {"background": QColor, "foreground": QColor, ...}
    theme.watcher().changed.connect(f)       # f(dark: bool) when the palette flips

``apply_system_palette(app)`` follows ``QStyleHints.colorScheme()`` (Qt 6.5+) and is re-run when the
system scheme changes; ``apply_palette(app, dark=True)`` forces one (tests, screenshots). Every
palette change, however it happens, reaches ``watcher().changed`` once per flip.
"""

from __future__ import annotations

from PySide6.QtCore import QObject, Qt, Signal
from PySide6.QtGui import QColor, QGuiApplication, QPalette
from PySide6.QtWidgets import QApplication


def dark_palette() -> QPalette:
    p = QPalette()
    base, window, text = QColor(37, 37, 38), QColor(45, 45, 48), QColor(230, 230, 230)
    roles = QPalette.ColorRole
    p.setColor(roles.Window, window)
    p.setColor(roles.WindowText, text)
    p.setColor(roles.Base, base)
    p.setColor(roles.AlternateBase, QColor(52, 52, 56))
    p.setColor(roles.ToolTipBase, window)
    p.setColor(roles.ToolTipText, text)
    p.setColor(roles.Text, text)
    p.setColor(roles.Button, window)
    p.setColor(roles.ButtonText, text)
    p.setColor(roles.BrightText, QColor(255, 120, 120))
    p.setColor(roles.Link, QColor(110, 170, 240))
    p.setColor(roles.Highlight, QColor(42, 130, 218))
    p.setColor(roles.HighlightedText, QColor(255, 255, 255))
    p.setColor(roles.PlaceholderText, QColor(150, 150, 150))
    p.setColor(roles.Light, QColor(70, 70, 74))
    p.setColor(roles.Midlight, QColor(60, 60, 64))
    p.setColor(roles.Mid, QColor(40, 40, 42))
    p.setColor(roles.Dark, QColor(25, 25, 26))
    p.setColor(roles.Shadow, QColor(0, 0, 0))
    for role in (roles.Text, roles.ButtonText, roles.WindowText):
        p.setColor(QPalette.ColorGroup.Disabled, role, QColor(128, 128, 128))
    return p


def system_prefers_dark() -> bool:
    app = QGuiApplication.instance()
    return app is not None and app.styleHints().colorScheme() == Qt.ColorScheme.Dark


def apply_palette(app: QApplication, dark: bool) -> None:
    """Use Fusion (it draws both schemes the same on every OS) with a light or dark palette."""
    if app.style().name().lower() != "fusion":
        app.setStyle("Fusion")
    app.setPalette(dark_palette() if dark else app.style().standardPalette())
    watcher()._check()


def apply_system_palette(app: QApplication) -> None:
    """Follow the system's light or dark scheme."""
    apply_palette(app, system_prefers_dark())


def follow_system(app: QApplication) -> None:
    """Apply the system scheme now and again whenever the system changes it."""
    apply_system_palette(app)
    if not getattr(app, "_tugboat_follows_system", False):
        app.styleHints().colorSchemeChanged.connect(lambda _s: apply_system_palette(app))
        app._tugboat_follows_system = True


def is_dark(palette: QPalette | None = None) -> bool:
    """Whether the palette in use (the application's, unless given) has a dark window colour."""
    if palette is None:
        app = QGuiApplication.instance()
        if app is None:
            return False
        palette = app.palette()
    return palette.color(QPalette.ColorRole.Window).lightness() < 128


def chart_colors(palette: QPalette | None = None) -> dict[str, QColor]:
    """Colours for a pyqtgraph plot that match the palette (``setBackground(c["background"])``,
    axis pens and labels in ``c["foreground"]``, grid in ``c["grid"]``)."""
    if palette is None:
        app = QGuiApplication.instance()
        palette = app.palette() if app is not None else QPalette()
    dark = is_dark(palette)
    return {
        "background": palette.color(QPalette.ColorRole.Base),
        "foreground": palette.color(QPalette.ColorRole.Text),
        "grid": QColor(90, 90, 96) if dark else QColor(210, 210, 214),
        "accent": QColor(110, 170, 240) if dark else QColor(31, 119, 180),
    }


def warning_color(failed: bool) -> QColor:
    """Text colour for a warning (amber) or a failure (red) that reads on the current palette."""
    if is_dark():
        return QColor("#ff7b6b") if failed else QColor("#f0b040")
    return QColor("#c0392b") if failed else QColor("#b9770e")


class ThemeWatcher(QObject):
    """Emits ``changed(dark)`` when the application palette flips between light and dark."""

    changed = Signal(bool)

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._dark = is_dark()

    @property
    def dark(self) -> bool:
        return self._dark

    def _check(self, *_args) -> None:
        dark = is_dark()
        if dark != self._dark:
            self._dark = dark
            self.changed.emit(dark)


_watcher: ThemeWatcher | None = None


def watcher() -> ThemeWatcher:
    """The one watcher of this application (created on first use, after the QApplication)."""
    global _watcher
    app = QGuiApplication.instance()
    if _watcher is None or (app is not None and _watcher.parent() is not app):
        _watcher = ThemeWatcher(app)
        if app is not None and hasattr(app, "paletteChanged"):
            # not a global event filter: that would route every event of the app through Python
            app.paletteChanged.connect(_watcher._check)
    return _watcher
