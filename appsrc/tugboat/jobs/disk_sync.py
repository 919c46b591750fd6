"""The GUI thread never waits on the disk: its atomic writes are fsynced on a background thread.

The window writes ``workspace.json`` and ``report.json`` on the GUI thread (results go
workspace-first: the index names a variant before the views show it). Each atomic write used to
fsync the file and its folder there: 20-50 ms per save on a quiet machine, two saves per variant,
measured as event-loop stalls (issue 17). With :func:`start` the writes still happen at once (a
temporary file renamed into place: whole and current for every reader, nothing half-written if
the process is killed); only the fsyncs that make them survive a power loss run, in order, on one
daemon thread. :func:`finish` waits for them (the window calls it when it closes).

Qt-free: plain threads, so it is usable (and tested) without a window.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ..engine.stored import sync_later_on_this_thread

__all__ = ["BackgroundSync", "finish", "pending", "start"]


class BackgroundSync:
    """Runs submitted fsyncs one by one, in order, on one daemon thread (started on first use)."""

    def __init__(self) -> None:
        self._todo: list[Callable[[], None]] = []
        self._cond = threading.Condition()
        self._busy = False
        self._thread: threading.Thread | None = None

    def submit(self, sync: Callable[[], None]) -> None:
        with self._cond:
            self._todo.append(sync)
            if self._thread is None or not self._thread.is_alive():
                # not named "tugboat-...": the app's exit does not wait for it (finish() does)
                self._thread = threading.Thread(target=self._loop, name="fsync-later", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def pending(self) -> int:
        with self._cond:
            return len(self._todo) + int(self._busy)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every submitted sync ran; False if ``timeout`` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._todo and not self._busy, timeout)

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._todo))
                sync, self._busy = self._todo.pop(0), True
            try:
                sync()
            except Exception:  # a sync that fails loses durability only; the file itself is whole
                pass
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()


_SYNC = BackgroundSync()


def start() -> None:
    """From now on, atomic writes made on the calling thread (the GUI thread) are synced by
    :data:`_SYNC` instead of in place."""
    sync_later_on_this_thread(_SYNC.submit)


def finish(timeout: float | None = 10.0) -> bool:
    """Writes on the calling thread are synced in place again; wait for the syncs still queued."""
    sync_later_on_this_thread(None)
    return _SYNC.flush(timeout)


def pending() -> int:
    return _SYNC.pending()
