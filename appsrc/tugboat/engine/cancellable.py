"""Run engine work so that a cancel request is honoured within a fraction of a second, always.

Techniques check ``progress`` between batches, but some work cannot be interrupted from Python:
one ``torch.onnx.export``, ONNX Runtime's ``quantize_static`` after calibration, one latency run
of a large model at a large batch, building torch-pruning's dependency graph. :func:`call` runs
such work on a helper thread and waits for it in short slices; when the job's token is set it
raises :class:`Cancelled` at once (within ``POLL_S``) and leaves the helper behind. The helper is
not killed (Python cannot): it stops at its own next ``progress`` check, or finishes its
uninterruptible piece and then stops; its result is dropped. This is only safe for work that
writes nothing the user sees except through the caller: techniques return new handles and keep
their scratch files in temporary folders they remove themselves, and artifacts are written by the
caller, atomically, after the work returned. :func:`wait_abandoned` joins helpers still running
(tests, shutdown).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

from .errors import Cancelled
from .progress import Progress

T = TypeVar("T")
POLL_S = 0.02

_abandoned: list[threading.Thread] = []
_lock = threading.Lock()


def call(fn: Callable[[], T], progress: Progress, *, name: str = "tugboat-work") -> T:
    """``fn()`` on a helper thread; its result or exception, or :class:`Cancelled` within
    ``POLL_S`` seconds of the cancel request (whatever ``fn`` is doing)."""
    progress.check()
    box: dict[str, object] = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # handed to the caller (or dropped if it cancelled)
            box["error"] = exc
        finally:
            done.set()

    helper = threading.Thread(target=run, name=name, daemon=True)
    helper.start()
    try:
        while not done.wait(POLL_S):
            if progress.cancelled:
                raise Cancelled()
    except BaseException:  # cancelled, or a KeyboardInterrupt while waiting: the helper runs on
        with _lock:
            _abandoned.append(helper)
        raise
    helper.join()
    err = box.pop("error", None)
    if err is not None:
        try:
            raise err
        finally:
            err = None  # break the frame <-> traceback cycle so a failed step's memory is freed
    return box.pop("result")  # type: ignore[return-value]


def abandoned() -> list[threading.Thread]:
    """Helpers of cancelled work that are still running."""
    with _lock:
        _abandoned[:] = [t for t in _abandoned if t.is_alive()]
        return list(_abandoned)


def wait_abandoned(timeout: float | None = None) -> bool:
    """Join the helpers of cancelled work; True if none is left running."""
    deadline = None if timeout is None else time.monotonic() + timeout
    for t in abandoned():
        t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
    return not abandoned()
