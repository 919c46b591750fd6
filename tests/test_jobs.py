"""The jobs bridge: results, progress, records, cancellation, failures, threads."""

from __future__ import annotations

import threading
import time

import pytest

from tugboat.engine.errors import DataError
from tugboat.jobs import CANCELLED, DONE, FAILED, JobQueue, JobSlot, worker_threads

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def queue(qtbot):
    q = JobQueue()
    yield q
    q.shutdown(5)


def test_result_progress_record_log_on_gui_thread(qtbot, queue):
    seen: list = []
    gui = threading.get_ident()

    def fn(progress):
        for i in range(3):
            progress.update(i / 3, f"step {i}")
            progress.record("epoch", epoch=i, loss=1.0 / (i + 1))
            progress.log(f"line {i}")
            time.sleep(0.06)  # slower than the progress coalescing interval
        return {"answer": 42}

    job = queue.submit(fn, name="ok", kind="test")
    job.progress.connect(lambda f, m: seen.append(("progress", f, m, threading.get_ident() == gui)))
    job.record.connect(lambda k, d: seen.append(("record", k, dict(d))))
    job.log.connect(lambda t: seen.append(("log", t)))
    with qtbot.waitSignal(job.finished, timeout=10000) as blocker:
        pass
    assert blocker.args == [{"answer": 42}]
    assert job.state == DONE and job.fraction == 1.0
    progress = [s for s in seen if s[0] == "progress"]
    assert [p[2] for p in progress] == ["step 0", "step 1", "step 2"]
    assert all(p[3] for p in progress)  # delivered on the GUI thread
    epochs = [s[2]["epoch"] for s in seen if s[0] == "record" and s[1] == "epoch"]
    assert epochs == [0, 1, 2]
    assert [s[1] for s in seen if s[0] == "log"] == ["line 0", "line 1", "line 2"]


def test_cancel_stops_at_next_check_and_never_finishes(qtbot, queue):
    started = threading.Event()
    loops = []

    def fn(progress):
        started.set()
        for i in range(1000):
            loops.append(i)
            progress.update(i / 1000)
            time.sleep(0.01)
        return "should not arrive"

    job = queue.submit(fn, name="long")
    finished = []
    job.finished.connect(finished.append)
    assert started.wait(10)
    with qtbot.waitSignal(job.cancelled, timeout=10000):
        job.cancel()
    assert job.state == CANCELLED and not finished
    assert len(loops) < 1000


def test_abort_does_not_return(qtbot, queue):
    """A function that ignores the token and returns anyway: its result is dropped."""
    started, release = threading.Event(), threading.Event()

    def fn(progress):
        started.set()
        release.wait(10)
        return "late result"

    job = queue.submit(fn, name="stubborn")
    finished = []
    job.finished.connect(finished.append)
    assert started.wait(10)
    job.cancel()
    with qtbot.waitSignal(job.cancelled, timeout=10000):
        release.set()
    qtbot.wait(50)
    assert finished == [] and job.result is None and job.state == CANCELLED


def test_failures_become_messages_and_the_next_job_runs(qtbot, queue):
    def user_error(progress):
        raise DataError("has no 'labels' array", path="data.npz")

    def bug(progress):
        raise ValueError("boom")

    def oom(progress):
        raise MemoryError()

    failures = []
    jobs = [queue.submit(f, name=f.__name__) for f in (user_error, bug, oom)]
    for j in jobs:
        j.failed.connect(lambda m, d, j=j: failures.append((j.name, m, d)))
    nxt = queue.submit(lambda progress: "still alive", name="next")
    with qtbot.waitSignal(nxt.finished, timeout=10000) as blocker:
        pass
    assert blocker.args == ["still alive"]
    assert [j.state for j in jobs] == [FAILED] * 3
    byname = {n: (m, d) for n, m, d in failures}
    assert byname["user_error"] == ("data.npz: has no 'labels' array", "")
    assert byname["bug"][0] == "ValueError: boom" and "Traceback" in byname["bug"][1]
    assert byname["oom"][0].startswith("out of memory")


def test_queued_job_cancelled_before_start_never_runs(qtbot, queue):
    gate = threading.Event()
    first = queue.submit(lambda p: gate.wait(10), name="first")
    ran = []
    second = queue.submit(lambda p: ran.append(1), name="second")
    assert second.state == "queued"
    second.cancel()
    assert second.state == CANCELLED
    with qtbot.waitSignal(first.finished, timeout=10000):
        gate.set()
    qtbot.wait(100)
    assert ran == []


def test_worker_leaves_a_core_for_the_interface(qtbot, queue):
    import torch

    job = queue.submit(lambda p: torch.get_num_threads(), name="threads")
    with qtbot.waitSignal(job.finished, timeout=10000) as blocker:
        pass
    assert blocker.args == [worker_threads()]
    import os

    assert worker_threads() == max(1, (os.cpu_count() or 1) - 1)


def test_garbage_is_collected_on_the_gui_thread_while_jobs_run(qtbot, queue):
    """A worker that triggers the cyclic collector would destroy Qt objects in cycles off the GUI
    thread (a deadlock seen in the suite); while a job runs, only the GUI thread collects."""
    import gc

    class Cycle:
        def __init__(self):
            self.me = self

    collected_in: list[str] = []
    seen = threading.Event()

    class Marker:
        def __init__(self):
            self.me = self

        def __del__(self):
            collected_in.append(threading.current_thread().name)
            seen.set()

    assert gc.isenabled()

    def work(progress):
        assert not gc.isenabled()  # no automatic collection while a job runs
        Marker()  # garbage in a cycle, made on the worker
        for _ in range(50_000):  # allocations that would have triggered a collection here
            Cycle()
        return "done"

    job = queue.submit(work, name="allocates")
    qtbot.waitUntil(lambda: job.is_ended, timeout=20000)
    assert job.state == DONE, job.error
    qtbot.waitUntil(seen.is_set, timeout=5000)  # the GUI thread's timer collected it
    assert collected_in == [threading.main_thread().name]
    assert gc.isenabled()  # back to normal once no job runs


def test_job_slot_a_new_job_cancels_and_disconnects_the_old_one(qtbot, queue):
    """Orange's ConcurrentWidgetMixin: the owner hears only from its latest job, so it needs no
    "is this result still current?" check of its own."""
    queue.max_running = 2
    slot = JobSlot(queue)
    heard: list = []
    release = threading.Event()

    def slow(progress):
        while not release.is_set():
            time.sleep(0.01)  # returns even when cancelled: a stale result the slot must drop
        return "old"

    old = slot.submit(slow, name="old", finished=heard.append, cancelled=lambda: heard.append("cancelled"))
    new = slot.submit(lambda p: "new", name="new", finished=heard.append)
    assert slot.job is new and old.token.cancelled
    with qtbot.waitSignal(new.finished, timeout=5000):
        pass
    release.set()
    qtbot.waitUntil(lambda: old.is_ended, timeout=5000)
    assert old.state == CANCELLED and heard == ["new"]  # neither the old result nor its cancel
    assert slot.job is None

    # keep=True: runs for one model go on side by side until cancel() drops them all
    a = slot.submit(lambda p: "a", name="a", keep=True, finished=heard.append)
    with qtbot.waitSignal(a.finished, timeout=5000):
        pass
    release.clear()
    b = slot.submit(slow, name="b", keep=True, finished=heard.append)
    c = slot.submit(slow, name="c", keep=True, finished=heard.append)
    assert slot.jobs() == [b, c]
    slot.cancel()
    release.set()
    qtbot.waitUntil(lambda: b.is_ended and c.is_ended, timeout=5000)
    assert heard == ["new", "a"] and slot.job is None
