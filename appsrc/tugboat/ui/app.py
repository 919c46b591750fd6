"""Starting the desktop app: ``tugboat`` (the window), ``tugboat --demo`` (ready to click)."""

from __future__ import annotations

import sys

from PySide6.QtCore import QTimer
from PySide6.QtGui import QIcon
from PySide6.QtWidgets import QApplication

from ..jobs import freeze_start_up, warm_up_torch
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
    from ..jobs import disk_sync
    from .main_window import MainWindow

    disk_sync.start()  # the workspace's index and report are fsynced off the GUI thread

    window = MainWindow()
    window.show()
    # torch._dynamo's import (the first optimizer's, ~1 s) in the background once the window is up:
    # before any job can be clicked, but not competing with the window's own imports for the GIL
    QTimer.singleShot(0, warm_up_torch)
    freeze_start_up()  # the imports and the window (the warm-up freezes its own imports too)
    start(window, args)
    quit_after = getattr(args, "quit_after", None)
    if quit_after:
        QTimer.singleShot(int(quit_after * 1000), window.close)
        QTimer.singleShot(int(quit_after * 1000) + 50, app.quit)
    code = app.exec()
    window.queue.shutdown(timeout=5.0)
    disk_sync.finish(timeout=5.0)
    _tear_down(window)
    del window
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


def _tear_down(window) -> None:
    """Destroy the window's objects now, on the GUI thread, in a known order, while the
    QApplication and the interpreter are whole. Left to interpreter finalisation, Qt frees the
    events a worker posted just before it ended (its result and tensors travel in them) and the
    widgets in whatever order the collector picks, possibly after parts of Python are gone: the
    segfault (-11) seen at exit on a loaded machine, when quitting coincides with a job ending."""
    import gc

    from PySide6.QtCore import QCoreApplication, QEvent

    window.queue.close()  # a signal delivered below must not start another job
    QCoreApplication.sendPostedEvents()  # the workers' last queued signals, delivered now
    window.deleteLater()
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    gc.collect()
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)


def _exit_cleanly(code: int) -> int:
    """End the process with ``code`` without finalising the interpreter.

    After :func:`_tear_down` nothing of the app needs a destructor: settings and workspaces are
    written atomically when they change. What could still go wrong at finalisation (a cancelled
    job's uninterruptible part, an ONNX export or ONNX Runtime's quantizer, still in native code on
    a daemon thread; PySide objects freed after the QApplication) can only crash a clean quit, so
    the exit handlers run, the streams are flushed, and the process ends with ``os._exit``
    (pyqtgraph's ``exit()`` does the same). Threads of Tugboat's own work get a moment to end first."""
    import atexit
    import contextlib
    import os
    import threading
    import time

    from ..engine import cancellable

    deadline = time.monotonic() + 3.0
    busy = [t for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive()
            and t.name != "tugboat-warm-up"  # only imports torch._dynamo: not worth a wait at quit
            and (t.name.startswith("tugboat-") or t in cancellable.abandoned())]
    while busy and time.monotonic() < deadline:
        busy[0].join(timeout=0.1)
        busy = [t for t in busy if t.is_alive()]
    if not busy:
        with contextlib.suppress(Exception):
            atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed stream must not stop the exit
            stream.flush()
    os._exit(code)

