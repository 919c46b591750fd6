"""Starting the desktop app: ``tugboat`` (the window), ``tugboat --demo`` (ready to click)."""

from __future__ import annotations

import sys

from PySide6.QtCore import QTimer
from PySide6.QtGui import QIcon
from PySide6.QtWidgets import QApplication

from ..jobs import warm_up_torch
from .theme import apply_system_palette, dark_palette, follow_system

__all__ = ["app_icon", "apply_system_palette", "dark_palette", "main", "make_app"]


def app_icon() -> QIcon:
    """The Tugboat icon in every shipped size (an empty icon if the resource files are missing)."""
    from .. import resources

    icon = QIcon()
    try:
        for png in resources.icon_pngs():
            icon.addFile(str(png))
    except FileNotFoundError:  # a broken install: run without an icon rather than not at all
        pass
    return icon


def make_app(argv: list[str] | None = None) -> QApplication:
    app = QApplication.instance()
    if app is None:
        app = QApplication(argv if argv is not None else sys.argv[:1])
    app.setApplicationName("Tugboat")
    app.setOrganizationName("Tugboat")
    app.setDesktopFileName("tugboat")  # Wayland/X11 match the window to tugboat.desktop (and its icon)
    app.setWindowIcon(app_icon())
    follow_system(app)
    return app


def main(args) -> int:
    """Open the window (args from ``cli.build_parser``: demo, workspace, quit_after)."""
    app = make_app()
    warm_up_torch()  # torch._dynamo's import (first optimizer) happens now, not mid-job
    from .main_window import MainWindow

    window = MainWindow()
    window.show()
    start(window, args)
    quit_after = getattr(args, "quit_after", None)
    if quit_after:
        QTimer.singleShot(int(quit_after * 1000), window.close)
        QTimer.singleShot(int(quit_after * 1000) + 50, app.quit)
    code = app.exec()
    window.queue.shutdown(timeout=5.0)
    return _exit_cleanly(int(code))


def start(window, args) -> None:
    """What the window opens on: a file or folder (``tugboat FILE``), a workspace, the demo, or the
    last session's workspace."""
    if getattr(args, "open_path", None):
        window.open_path(args.open_path)
    elif getattr(args, "workspace", None):
        window.open_workspace(args.workspace)
    elif getattr(args, "demo", False):
        window.start_demo_session()
    else:
        window.restore_last_workspace()


def _exit_cleanly(code: int) -> int:
    """Return ``code``, or end the process at once when work is still running on a thread.

    A cancelled job's uninterruptible part (an ONNX export, ONNX Runtime's quantizer) may still run
    on a daemon thread; letting the interpreter finalise under native code that is still executing
    can abort the process. Settings and workspaces are already written atomically by now, so the
    safe way out is ``os._exit`` after flushing the standard streams."""
    import contextlib
    import os
    import threading
    import time

    from ..engine import cancellable

    deadline = time.monotonic() + 3.0
    busy = [t for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive()
            and (t.name.startswith("tugboat-") or t in cancellable.abandoned())]
    while busy and time.monotonic() < deadline:
        busy[0].join(timeout=0.1)
        busy = [t for t in busy if t.is_alive()]
    if busy:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # a closed stream must not stop the exit
                stream.flush()
        os._exit(code)
    return code

