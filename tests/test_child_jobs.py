"""The window makes its variants in a worker process (issue 17: C calls that hold the GIL never stall
the window): made in another process, progress and epoch rows streamed back live, a cancel ends
the worker at once and leaves the workspace as it was, a crash or a TugboatError in the worker is a
one-line error and the window goes on, and a worker that cannot start means an in-thread run."""

from __future__ import annotations

import os
import time

import pytest

import child_toys
from tugboat.engine.measuring.measure import MeasureConfig
from tugboat.jobs import CANCELLED, DONE, FAILED
from tugboat.ui.main_window import MainWindow
from tugboat.ui.session import IN_CHILD_ENV

pytestmark = [pytest.mark.timeout(240), pytest.mark.gui]


@pytest.fixture
def toys():
    child_toys.register()
    yield
    child_toys.unregister()


@pytest.fixture
def window(qtbot, monkeypatch):
    monkeypatch.setenv(IN_CHILD_ENV, "1")
    w = MainWindow()
    qtbot.addWidget(w)
    w.session.measure = MeasureConfig(batch=16, threads=1, warmup=1, min_runs=3, min_seconds=0.0,
                                      max_seconds=0.2, also_batch1=False, both_runtimes=False)
    w.show()
    job = w.load_demo()
    with qtbot.waitSignal(w.session.baseline_ready, timeout=120000):
        pass
    assert job.state == DONE and w.session.worker is not None
    yield w
    w.close()


def run(qtbot, w, step, timeout=120000):
    job = w.session.run_step(step)
    qtbot.waitUntil(lambda: job.is_ended, timeout=timeout)
    return job


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:  # a zombie is not running
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:  # no /proc here: it exists, so it runs
        return True


def test_a_variant_is_made_in_the_worker_and_comes_back_whole(qtbot, window, toys):
    job = run(qtbot, window, {"technique": child_toys.NAME, "method": "pid"})
    assert job.state == DONE, job.error
    qtbot.waitUntil(lambda: window.store.get(job.result.name) is not None, timeout=30000)
    variant = window.store.get(job.result.name)
    made_in = variant.info["made_by_pid"]
    assert made_in != os.getpid() and made_in == window.session.worker.pid
    assert variant.handle is not None and variant.metrics["fidelity"]["top1_agreement"] == 1.0


def test_fine_tuning_in_the_worker_streams_progress_and_epoch_rows(qtbot, window):
    step = {"technique": "prune", "method": "structured", "ratio": 0.5, "finetune_epochs": 3}
    job = window.session.run_step(step)
    seen = []
    job.record.connect(lambda kind, data: seen.append((kind, dict(data), job.is_ended)))
    job.progress.connect(lambda f, msg: seen.append(("progress", {"f": f, "msg": msg}, job.is_ended)))
    qtbot.waitUntil(lambda: job.is_ended, timeout=120000)
    assert job.state == DONE, job.error
    epochs = [d for kind, d, ended in seen if kind == "epoch" and not ended]
    assert [d["epoch"] for d in epochs] == [1, 2, 3] and all("val_accuracy" in d for d in epochs)
    fractions = [d["f"] for kind, d, _ in seen if kind == "progress"]
    assert any(0.0 < f < 0.7 for f in fractions) and any("fine-tuning" in d["msg"] for k, d, _ in seen
                                                          if k == "progress")
    assert job.result.info["made_on"] != f"process {os.getpid()}"
    assert job.result.metrics["params"] < window.store.baseline.metrics["params"]


def test_an_int8_variant_comes_back_checked_and_naming_the_original_it_keeps(qtbot, window, monkeypatch):
    import onnx

    ws = window.keeper.ensure()
    qtbot.waitUntil(lambda: not window.queue.active(), timeout=30000)
    checks = []
    monkeypatch.setattr(onnx.checker, "check_model", lambda *a, **k: checks.append(a))  # this process's
    job = run(qtbot, window, {"technique": "quantize", "method": "static-int8"})
    assert job.state == DONE, job.error
    handle = job.result.handle
    assert handle.onnx_model is not None and job.result.info["made_on"] != f"process {os.getpid()}"
    assert handle.float_module is window.session.baseline.handle.module  # this process's own copy
    qtbot.waitUntil(lambda: not window.queue.active(), timeout=30000)  # its files are written here
    assert ws.artifact_path(job.result.name).is_file()
    assert checks == []  # checked (and serialized) in the worker, not again in the window's process


def test_cancel_ends_the_worker_at_once_and_leaves_the_workspace_unchanged(qtbot, window, toys):
    ws = window.keeper.ensure()
    qtbot.waitUntil(lambda: not window.queue.active(), timeout=30000)  # the original's files are saved

    def files():
        return sorted((str(p.relative_to(ws.path)), p.stat().st_size, p.stat().st_mtime_ns)
                      for p in ws.path.rglob("*") if p.is_file())

    before_names, before_files = list(window.store.names()), files()
    job = window.session.run_step({"technique": child_toys.NAME, "method": "spin", "seconds": 120.0})
    logs = []
    job.log.connect(logs.append)
    qtbot.waitUntil(lambda: any("spinning in" in m for m in logs), timeout=60000)
    pid = window.session.worker.pid
    assert pid is not None and pid != os.getpid()
    t0 = time.monotonic()
    job.cancel()
    qtbot.waitUntil(lambda: job.is_ended and not alive(pid), timeout=2000)
    assert job.state == CANCELLED and time.monotonic() - t0 < 2.0
    qtbot.wait(300)  # anything that would still land in the workspace
    assert list(window.store.names()) == before_names
    assert files() == before_files
    again = run(qtbot, window, {"technique": child_toys.NAME, "method": "pid"})  # a fresh worker
    assert again.state == DONE and again.result.info["made_by_pid"] not in (pid, os.getpid())


def test_a_crash_or_an_error_in_the_worker_is_one_clear_line_and_the_window_goes_on(qtbot, window, toys):
    crashed = run(qtbot, window, {"technique": child_toys.NAME, "method": "crash"})
    assert crashed.state == FAILED
    assert "worker process making variant" in crashed.error and "exit code 3" in crashed.error
    assert "\n" not in crashed.error
    failed = run(qtbot, window, {"technique": child_toys.NAME, "method": "fail"})
    assert failed.state == FAILED and failed.error == "toy.onnx: the toy refuses this model"
    assert failed.details == ""  # a TugboatError: no traceback, as in-thread
    ok = run(qtbot, window, {"technique": child_toys.NAME, "method": "pid"})
    assert ok.state == DONE and ok.result.info["made_by_pid"] != os.getpid()


def test_a_worker_that_cannot_start_means_an_in_thread_run_with_a_log_line(qtbot, window, toys, monkeypatch):
    from tugboat.engine.running.executors import child

    window.session.worker.stop()

    def cannot(self):
        raise child.WorkerUnavailableError("the worker process could not start (OSError: no)")

    monkeypatch.setattr(child.ChildWorker, "_ensure", cannot)
    job = window.session.run_step({"technique": child_toys.NAME, "method": "pid"})
    qtbot.waitUntil(lambda: job.is_ended, timeout=120000)
    assert job.state == DONE and job.result.info["made_by_pid"] == os.getpid()
    assert any("in the window's process" in line and "could not start" in line for line in job.logs)


def test_the_window_sweep_makes_and_measures_in_the_worker_and_survives_its_crash(qtbot, window, toys):
    session = window.session
    session.add_to_sweep({"technique": child_toys.NAME, "method": "pid", "seconds": 1.0})
    session.add_to_sweep({"technique": child_toys.NAME, "method": "crash"})
    job = window.run_sweep()
    with qtbot.waitSignal(session.sweep_ended, timeout=120000) as ended:
        pass
    assert ended.args[0] is not None, job.error
    ws = window.workspace
    made, crashed = (ws.get(n) for n in ws.names())
    assert made.status == "ok" and made.info["made_by_pid"] != os.getpid()
    assert made.info["made_on"] == f"process {made.info['made_by_pid']}"
    assert made.metrics["fidelity"]["top1_agreement"] == 1.0 and ws.artifact_path(made.name).is_file()
    assert window.store.get(made.name).handle is not None
    assert crashed.status == "failed" and "worker process making variant" in crashed.error
    assert "exit code 3" in crashed.error and "tried 3 times" in crashed.error
    assert ws.meta["sweep"]["executor"]["name"] == "worker process"


def test_the_original_is_loaded_and_measured_in_the_worker(qtbot, monkeypatch):
    from tugboat.engine.running import runner

    def not_here(*_a, **_k):
        raise AssertionError("the original was loaded in the window's process")

    monkeypatch.setattr(runner, "prepare", not_here)  # this process's only: the worker has its own
    monkeypatch.setenv(IN_CHILD_ENV, "1")
    w = MainWindow()
    qtbot.addWidget(w)
    try:
        job = w.load_demo()
        qtbot.waitUntil(lambda: job.is_ended, timeout=120000)
        assert job.state == DONE, job.error
        assert w.store.baseline is not None and w.store.baseline.metrics["accuracy"] > 0.9
        assert w.session.baseline.handle.module is not None and w.model_panel.layers.rowCount() > 0
    finally:
        w.close()


def test_a_model_the_worker_cannot_read_keeps_its_runs_in_this_process(tmp_path):
    import sys
    import types

    from tugboat.engine.progress import Progress
    from tugboat.engine.running.executors.child import ChildWorker, WorkerUnavailableError, load_original

    # a class the worker cannot import (as a model class from a user's architecture file)
    module = types.ModuleType("tugboat_test_only_here")
    module.OnlyHere = type("OnlyHere", (), {"__module__": "tugboat_test_only_here"})
    sys.modules[module.__name__] = module
    worker = ChildWorker(1)
    try:
        context = worker.write_context(module.OnlyHere())
        for _ in range(2):  # the second time without asking the worker
            with pytest.raises(WorkerUnavailableError, match=r"cannot be read in a worker.*tugboat_test_only_here"):
                worker.call(load_original, (None, ""), Progress(), context=context, what="loading x")
        assert context in worker._unreadable and worker.pid is not None  # the worker itself is fine
    finally:
        worker.close()
        del sys.modules[module.__name__]


def test_a_worker_that_could_not_start_is_not_waited_for_again():
    from tugboat.engine.progress import Progress
    from tugboat.engine.running.executors.child import ChildWorker, WorkerUnavailableError, load_original

    class Broken:
        tries = 0

        def Pipe(self, duplex=True):  # noqa: N802 (multiprocessing's name)
            Broken.tries += 1
            raise OSError("no pipes here")

    worker = ChildWorker(1)
    worker._mp = Broken()
    try:
        for _ in range(3):
            with pytest.raises(WorkerUnavailableError, match=r"could not start .*no pipes here"):
                worker.call(load_original, (None, ""), Progress(), context=None, what="loading x")
        assert Broken.tries == 1
    finally:
        worker.close()
