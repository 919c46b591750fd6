"""Progress reporting and cooperative cancellation, without any GUI dependency.

A technique receives a :class:`Progress` and calls ``progress.update(fraction, message)`` between
batches and ``progress.check()`` to honour a cancel request. ``progress.sub(a, b)`` maps a sub-step
onto its share ``[a, b]`` of the parent's range (the idea of Orange's ``wrap_callback``), so nested
steps report one monotone overall fraction. ``progress.record(kind, **data)`` publishes structured
events (e.g. one per training epoch) that the GUI plots as live curves.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from .errors import Cancelled

UpdateCallback = Callable[[float, str], None]
RecordCallback = Callable[[str, dict[str, Any]], None]


# set when the whole process was asked to stop (the CLI's Ctrl+C handler): every token reads as
# cancelled, so work stops at its next check instead of a KeyboardInterrupt raised at a random
# point (inside a __del__ or a library's broad except it is swallowed and the run goes on)
_PROCESS_STOP = threading.Event()


def stop_everything() -> None:
    _PROCESS_STOP.set()


def reset_stop_everything() -> None:
    _PROCESS_STOP.clear()


class CancelToken:
    """A thread-safe flag that a job's owner sets and the job polls."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set() or _PROCESS_STOP.is_set()


class Progress:
    """Reports a fraction in [0, 1] with a message; answers "was I asked to stop?"."""

    def __init__(
        self,
        on_update: UpdateCallback | None = None,
        token: CancelToken | None = None,
        on_record: RecordCallback | None = None,
        *,
        start: float = 0.0,
        end: float = 1.0,
        prefix: str = "",
    ) -> None:
        self._on_update = on_update
        self._on_record = on_record
        self.token = token or CancelToken()
        self._start = start
        self._end = end
        self._prefix = prefix
        self.started = time.monotonic()

    @property
    def cancelled(self) -> bool:
        return self.token.cancelled

    def check(self) -> None:
        """Raise :class:`Cancelled` if the job was asked to stop."""
        if self.token.cancelled:
            raise Cancelled()

    def update(self, fraction: float, message: str = "") -> None:
        fraction = min(max(float(fraction), 0.0), 1.0)
        overall = self._start + (self._end - self._start) * fraction
        if self._on_update is not None:
            text = f"{self._prefix}{message}" if message else self._prefix.rstrip(": ")
            self._on_update(overall, text)
        self.check()

    def log(self, message: str) -> None:
        self.record("log", message=message)

    def record(self, kind: str, **data: Any) -> None:
        if self._on_record is not None:
            self._on_record(kind, data)

    def sub(self, start: float, end: float, prefix: str = "") -> Progress:
        """A child reporting into ``[start, end]`` of this progress's range."""
        span = self._end - self._start
        return Progress(
            self._on_update,
            self.token,
            self._on_record,
            start=self._start + span * start,
            end=self._start + span * end,
            prefix=self._prefix + prefix,
        )


def null_progress() -> Progress:
    return Progress()
