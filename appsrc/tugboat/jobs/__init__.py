"""The bridge: runs engine calls on worker threads and turns their callbacks into Qt signals.

A job is ``fn(progress) -> result`` where ``progress`` is an engine :class:`Progress` wired to the
job's cancel token. The worker thread never touches widgets: it only emits signals on a private
relay object with queued connections, and the :class:`Job` (living on the GUI thread) re-emits them
as its public signals, so every slot connected to a job runs on the GUI thread. The API follows
superqt's ``thread_worker`` (yielded/returned/errored/aborted become progress/finished/failed/
cancelled) and Orange's ``ConcurrentWidgetMixin`` (cooperative cancellation through a token).

Cancellation is cooperative: ``job.cancel()`` sets the token; the engine raises ``Cancelled`` at
its next ``progress.update``/``check``. A cancelled job never emits ``finished``, even if its
function returns after the request (superqt's ``test_abort_does_not_return``).
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from PySide6.QtCore import QMetaObject, QObject, Qt, QTimer, Signal

from ..engine.errors import Cancelled, TugboatError
from ..engine.measuring.memory import is_out_of_memory, oom_message
from ..engine.progress import CancelToken, Progress
from . import _qt_compat  # noqa: F401  (guards a PySide6 6.12.0 emit bug; first, before any emit)

__all__ = [
    "CANCELLED",
    "DONE",
    "FAILED",
    "QUEUED",
    "RUNNING",
    "Job",
    "JobQueue",
    "JobSlot",
    "freeze_start_up",
    "warm_up_torch",
    "worker_threads",
]

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
ENDED = (DONE, FAILED, CANCELLED)

# progress updates are coalesced to at most one per interval (the GUI repaints far slower than a
# training loop reports), so a chatty job cannot flood the event loop
PROGRESS_INTERVAL_S = 0.05
# while a job runs, a thread that wants the GIL asks the one holding it to let go after this long
# (Python's default is 5 ms): the GUI thread gets it back in ~1 ms from a worker busy in Python code
JOB_SWITCH_INTERVAL_S = 0.001


def worker_threads() -> int:
    """Torch intra-op threads for a job: every core but one, which stays for the interface."""
    return max(1, (os.cpu_count() or 1) - 1)


_jobs_started = False  # set when the first job starts: from then on nothing is frozen


def freeze_start_up() -> bool:
    """Move what start-up made (modules, classes, torch's and Qt's wrappers: ~350,000 objects,
    alive as long as the app) out of the cyclic collector's sight: a full collection on the GUI
    thread then takes milliseconds instead of ~0.8 s. Only before the first job starts: a frozen
    object is never collected, and a job's model (an fx graph is full of cycles) must be."""
    if _jobs_started:
        return False
    gc.freeze()
    return True


_warm_lock = threading.Lock()
_warm_done = threading.Event()
_warm_thread: threading.Thread | None = None


def warm_up_torch(wait: bool = False) -> threading.Event:
    """Import what the first optimizer imports (torch._dynamo, ~1 s holding the GIL) off the critical
    path: started once, in the background, at application start (see ENVIRONMENT.md pitfalls)."""
    global _warm_thread

    def _warm() -> None:
        try:
            import torch

            torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
        except Exception:
            pass
        finally:
            freeze_start_up()
            _warm_done.set()

    with _warm_lock:
        if _warm_thread is None:
            _warm_thread = threading.Thread(target=_warm, name="tugboat-warm-up", daemon=True)
            _warm_thread.start()
    if wait:
        _warm_done.wait()
    return _warm_done


class _Relay(QObject):
    """Emitted from the worker thread; connected to the job with queued connections."""

    progress = Signal(float, str)
    record = Signal(str, object)
    started = Signal()
    ended = Signal(str, object, str, str)  # state, result, message, details


class Job(QObject):
    progress = Signal(float, str)  # overall fraction in [0, 1], message
    record = Signal(str, dict)  # structured events from progress.record (e.g. "epoch")
    log = Signal(str)
    finished = Signal(object)  # the function's result
    failed = Signal(str, str)  # short message, details (traceback for unexpected errors)
    cancelled = Signal()
    state_changed = Signal(str)

    _ids = 0

    def __init__(self, fn: Callable[[Progress], Any], *, name: str, kind: str = "job",
                 threads: int | None = None, parent: QObject | None = None) -> None:
        super().__init__(parent)
        Job._ids += 1
        self.id = Job._ids
        self.fn = fn
        self.name = name
        self.kind = kind
        self.threads = threads or worker_threads()
        self.token = CancelToken()
        self.state = QUEUED
        self.fraction = 0.0
        self.message = ""
        self.result: Any = None
        self.error: str | None = None
        self.details: str = ""
        self.logs: list[str] = []
        self.submitted = time.monotonic()
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._relay = _Relay()
        q = Qt.ConnectionType.QueuedConnection
        self._relay.progress.connect(self._on_relay_progress, q)
        self._relay.record.connect(self._on_relay_record, q)
        self._relay.started.connect(self._on_relay_started, q)
        self._relay.ended.connect(self._on_relay_ended, q)

    # --- public ----------------------------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        return self.state == RUNNING

    @property
    def is_ended(self) -> bool:
        return self.state in ENDED

    def elapsed(self) -> float:
        if self.started_at is None:
            return 0.0
        return (self.ended_at or time.monotonic()) - self.started_at

    def eta(self) -> float | None:
        """Seconds left, extrapolated from the fraction done (None until there is a trend)."""
        if self.state != RUNNING or self.fraction < 0.02:
            return None
        return self.elapsed() * (1.0 - self.fraction) / self.fraction

    def cancel(self) -> None:
        """Ask the job to stop at its next progress check; a queued job is cancelled at once."""
        self.token.cancel()
        if self.state == QUEUED:
            self._end(CANCELLED, None, "cancelled by the user", "")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the worker has returned (signals may still be queued); True if it did."""
        return self._done.wait(timeout)

    # --- worker side -----------------------------------------------------------------------------
    def _start(self) -> None:
        global _jobs_started
        _jobs_started = True
        _release_finished_jobs()
        _in_flight.append(self)
        self._thread = threading.Thread(target=self._run, name=f"tugboat-job-{self.id}", daemon=True)
        self.state = RUNNING
        self.started_at = time.monotonic()
        self.state_changed.emit(RUNNING)
        self._thread.start()

    def _run(self) -> None:  # worker thread: emits on the relay only
        relay = self._relay
        last = [0.0]

        def on_update(fraction: float, message: str) -> None:
            now = time.monotonic()
            if now - last[0] >= PROGRESS_INTERVAL_S or fraction >= 1.0:
                last[0] = now
                relay.progress.emit(fraction, message)

        def on_record(kind: str, data: dict[str, Any]) -> None:
            relay.record.emit(kind, dict(data))

        progress = Progress(on_update, self.token, on_record)
        state, result, message, details = DONE, None, "", ""
        try:
            import torch

            torch.set_num_threads(self.threads)
        except Exception:
            pass
        try:
            result = self.fn(progress)
            if self.token.cancelled:  # asked to stop, but the function returned anyway: drop it
                state, result, message = CANCELLED, None, "cancelled by the user"
        except Cancelled:
            state, message = CANCELLED, "cancelled by the user"
        except TugboatError as exc:
            state, message, details = FAILED, str(exc), ""
        except Exception as exc:  # MemoryError included: a job that runs out ends, the app does not
            state, details = FAILED, traceback.format_exc()
            if is_out_of_memory(exc):  # MemoryError, torch OutOfMemoryError, CPU allocator errors
                message = oom_message(f"in {self.name}")
            else:
                message = f"{type(exc).__name__}: {exc}".strip()
        if state == FAILED and "out of memory" in message:
            gc.collect()  # the failed job's tensors went with its frames: give the memory back now
        self._done_result = (state, result, message, details)
        relay.ended.emit(state, result, message, details)
        self._done.set()

    # --- GUI side --------------------------------------------------------------------------------
    def _on_relay_started(self) -> None:  # pragma: no cover - kept for symmetry
        pass

    def _on_relay_progress(self, fraction: float, message: str) -> None:
        if self.state != RUNNING:
            return
        self.fraction, self.message = fraction, message
        self.progress.emit(fraction, message)

    def _on_relay_record(self, kind: str, data: object) -> None:
        if self.state != RUNNING:
            return
        if kind == "log":
            text = str((data or {}).get("message", ""))
            self.logs.append(text)
            self.log.emit(text)
        self.record.emit(kind, data if isinstance(data, dict) else {})

    def _on_relay_ended(self, state: str, result: object, message: str, details: str) -> None:
        if self.state in ENDED:
            return
        self._end(state, result, message, details)

    def _end(self, state: str, result: Any, message: str, details: str) -> None:
        self.state = state
        self.ended_at = time.monotonic()
        if self._thread is None:  # never started
            self._done.set()
        if state == DONE:
            self.fraction = 1.0
            self.result = result
            self.finished.emit(result)
        elif state == FAILED:
            self.error, self.details = message, details
            self.logs.append(f"failed: {message}")
            self.failed.emit(message, details)
        else:
            self.error = message
            self.cancelled.emit()
        self.state_changed.emit(state)


# Jobs whose worker (or an abandoned helper of a cancelled step) may still hold a reference. A Qt
# object must never be destroyed on a worker thread: if a worker dropped the last reference, the
# Job (and through its connections the queue and its other jobs) would be destroyed there while the
# GUI thread holds the GIL and waits for Qt's lock: a deadlock. So the GUI thread keeps them here
# and lets go only once every such thread has ended.
_in_flight: list[Job] = []


def _release_finished_jobs() -> None:
    """GUI thread only: forget jobs whose threads are all gone (the last reference dies here)."""
    from ..engine import cancellable

    if cancellable.abandoned():
        return
    _in_flight[:] = [j for j in _in_flight if j._thread is not None and j._thread.is_alive()]


class _GuiThreadCollector:
    """Python's cyclic garbage collector runs in whichever thread allocates past its threshold. A
    worker thread that collects a cycle holding Qt objects destroys them off the GUI thread, and that
    can deadlock with the GUI thread (seen: a pruning job's deepcopy collected a QMenu while the GUI
    thread was deleting another, each waiting for the other's lock). While any job runs, automatic
    collection is off and the GUI thread collects on a timer instead (pyqtgraph's GarbageCollector
    does the same for a whole application). While any job runs the GIL's switch interval is also
    lowered (:data:`JOB_SWITCH_INTERVAL_S`), so the GUI thread waits less for a busy worker."""

    def __init__(self) -> None:
        self.users = 0
        self.was_enabled = True
        self.switch_interval = sys.getswitchinterval()
        self.timer: QTimer | None = None

    def acquire(self) -> None:
        if self.users == 0:
            if self.timer is None:
                self.timer = QTimer()
                self.timer.setInterval(500)
                self.timer.timeout.connect(self.collect)
            self.was_enabled = gc.isenabled()
            gc.disable()
            self.timer.start()
            self.switch_interval = sys.getswitchinterval()
            sys.setswitchinterval(min(self.switch_interval, JOB_SWITCH_INTERVAL_S))
        self.users += 1

    def release(self) -> None:
        self.users = max(0, self.users - 1)
        if self.users == 0 and self.timer is not None:
            self.timer.stop()
            sys.setswitchinterval(self.switch_interval)
            if self.was_enabled:
                gc.enable()

    @staticmethod
    def collect() -> None:
        """What automatic collection would have done by now, generation by generation."""
        counts, threshold = gc.get_count(), gc.get_threshold()
        for generation in range(3):
            if counts[generation] <= threshold[generation]:
                return
            gc.collect(generation)


_collector = _GuiThreadCollector()


class JobQueue(QObject):
    """One queue for the app. Jobs run in submission order, ``max_running`` at a time, each on its
    own worker thread (with the default of one, compute-heavy jobs do not fight over two cores)."""

    jobs_changed = Signal()
    job_added = Signal(object)
    job_ended = Signal(object)

    def __init__(self, parent: QObject | None = None, *, max_running: int = 1,
                 threads: int | None = None) -> None:
        super().__init__(parent)
        self.max_running = max_running
        self.threads = threads
        self._jobs: list[Job] = []
        self._closed = False

    def submit(self, fn: Callable[[Progress], Any], *, name: str, kind: str = "job") -> Job:
        job = Job(fn, name=name, kind=kind, threads=self.threads, parent=self)
        job.state_changed.connect(lambda _s, j=job: self._on_job_state(j))
        self._jobs.append(job)
        self.job_added.emit(job)
        self.jobs_changed.emit()
        self._schedule()
        return job

    def jobs(self) -> list[Job]:
        return list(self._jobs)

    def active(self) -> list[Job]:
        return [j for j in self._jobs if not j.is_ended]

    def running(self) -> list[Job]:
        return [j for j in self._jobs if j.state == RUNNING]

    def cancel_all(self) -> None:
        for job in self.active():
            job.cancel()

    def clear_ended(self) -> None:
        _release_finished_jobs()
        ended = [j for j in self._jobs if j.is_ended]
        if ended:
            self._jobs = [j for j in self._jobs if not j.is_ended]
            for j in ended:
                j.deleteLater()
            self.jobs_changed.emit()

    def wait_all(self, timeout: float | None = None) -> bool:
        """Block until every started worker returned (used at shutdown; signals may be pending)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for job in list(self._jobs):
            if job._thread is None:
                continue
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not job.wait(left):
                return False
        return True

    def shutdown(self, timeout: float = 5.0) -> bool:
        self.cancel_all()
        return self.wait_all(timeout)

    def close(self) -> None:
        """Start no more jobs (the app is quitting); what is submitted now is cancelled."""
        self._closed = True
        self.cancel_all()

    def _on_job_state(self, job: Job) -> None:
        _release_finished_jobs()
        if job.is_ended and getattr(job, "_gc_held", False):
            job._gc_held = False
            _collector.release()
        if job.is_ended:
            self.job_ended.emit(job)
            self._schedule()
        self.jobs_changed.emit()

    def _schedule(self) -> None:
        if self._closed:
            for job in [j for j in self._jobs if j.state == QUEUED]:
                job.cancel()
            return
        while len(self.running()) < self.max_running:
            nxt = next((j for j in self._jobs if j.state == QUEUED), None)
            if nxt is None:
                return
            _collector.acquire()  # released when the job ends (_on_job_state)
            nxt._gc_held = True
            nxt._start()


class JobSlot(QObject):
    """Jobs that one owner started for one purpose (Orange's ``ConcurrentWidgetMixin``).

    ``submit`` cancels the slot's earlier job and *disconnects* it first, so a stale result (an older
    slider setting, the previous model, another selection) never reaches the owner: no owner needs
    its own "is this still the current job?" check. With ``keep=True`` earlier jobs go on running
    (a queue of runs for one model) until :meth:`cancel` drops them all, e.g. when the model changes.
    Handlers are the job's own signals by name: ``finished``, ``failed``, ``cancelled``, ``record``,
    ``progress``, ``state_changed``."""

    def __init__(self, queue: JobQueue, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.queue = queue
        # only connection handles: the slot holds no handler, so no reference cycle through it keeps
        # the owner's Qt objects for Python's collector to destroy on some worker thread later
        self._links: dict[Job, list[QMetaObject.Connection]] = {}

    @property
    def job(self) -> Job | None:
        """The latest job still running or queued (None when the slot is idle)."""
        live = [j for j in self._links if not j.is_ended]
        return live[-1] if live else None

    def jobs(self) -> list[Job]:
        return [j for j in self._links if not j.is_ended]

    def submit(self, fn: Callable[[Progress], Any], *, name: str, kind: str = "job", keep: bool = False,
               **handlers: Callable[..., Any]) -> Job:
        if not keep:
            self.cancel()
        return self.adopt(self.queue.submit(fn, name=name, kind=kind), keep=True, **handlers)

    def adopt(self, job: Job, *, keep: bool = False, **handlers: Callable[..., Any]) -> Job:
        """Hold a job someone else submitted (e.g. a run the session started for a live preview)."""
        if not keep:
            self.cancel()
        links = self._links.setdefault(job, [])
        for signal_name, handler in handlers.items():
            links.append(getattr(job, signal_name).connect(handler))
        job.state_changed.connect(lambda _s, j=job: self._forget_if_ended(j))
        if job.is_ended:  # cancelled at once (the queue is closing)
            self._forget_if_ended(job)
        return job

    def cancel(self) -> None:
        """Disconnect every job of the slot (nothing of theirs reaches the owner), then cancel them."""
        jobs, self._links = self._links, {}
        for job, links in jobs.items():
            for link in links:
                with contextlib.suppress(RuntimeError, TypeError):  # already gone with its job
                    QObject.disconnect(link)
            job.cancel()

    def _forget_if_ended(self, job: Job) -> None:
        if job.is_ended:
            self._links.pop(job, None)
