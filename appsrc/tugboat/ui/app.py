"""Starting the desktop app: ``tugboat`` (the window), ``tugboat --demo`` (ready to click)."""

from __future__ import annotations

import sys

from PySide6.QtCore import Qt, QTimer
from PySide6.QtGui import QColor, QPalette
from PySide6.QtWidgets import QApplication

from ..jobs import warm_up_torch


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
    p.setColor(roles.Highlight, QColor(42, 130, 218))
    p.setColor(roles.HighlightedText, QColor(255, 255, 255))
    p.setColor(roles.PlaceholderText, QColor(150, 150, 150))
    p.setColor(QPalette.ColorGroup.Disabled, roles.Text, QColor(128, 128, 128))
    p.setColor(QPalette.ColorGroup.Disabled, roles.ButtonText, QColor(128, 128, 128))
    return p


def apply_system_palette(app: QApplication) -> None:
    """Follow the system's light or dark scheme (Fusion draws both consistently on every OS)."""
    app.setStyle("Fusion")
    scheme = app.styleHints().colorScheme()
    if scheme == Qt.ColorScheme.Dark:
        app.setPalette(dark_palette())
    else:
        app.setPalette(app.style().standardPalette())


def make_app(argv: list[str] | None = None) -> QApplication:
    app = QApplication.instance()
    if app is None:
        app = QApplication(argv if argv is not None else sys.argv[:1])
    app.setApplicationName("Tugboat")
    app.setOrganizationName("Tugboat")
    apply_system_palette(app)
    app.styleHints().colorSchemeChanged.connect(lambda _s: apply_system_palette(app))
    return app


def main(args) -> int:
    """Open the window (args from ``cli.build_parser``: demo, workspace, quit_after)."""
    app = make_app()
    warm_up_torch()  # torch._dynamo's import (first optimizer) happens now, not mid-job
    from .main_window import MainWindow

    window = MainWindow()
    window.show()
    if getattr(args, "workspace", None):
        window.open_workspace(args.workspace)
    elif getattr(args, "demo", False):
        window.load_demo()
    quit_after = getattr(args, "quit_after", None)
    if quit_after:
        QTimer.singleShot(int(quit_after * 1000), window.close)
        QTimer.singleShot(int(quit_after * 1000) + 50, app.quit)
    code = app.exec()
    window.queue.shutdown(timeout=5.0)
    return int(code)


def run() -> int:
    """The gui-script entry point."""
    from ..cli import build_parser

    return main(build_parser().parse_args(sys.argv[1:]))
