"""Shared fixtures. Qt runs offscreen; caches and settings live in a per-session temp folder so
tests never touch the user's real files; torch uses one thread so the suite is repeatable."""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

ROOT = Path(__file__).resolve().parents[1]
_SESSION_HOME = Path(os.environ.get("TUGBOAT_TEST_HOME", ROOT / ".test-home"))
# the demo zoo cache is shared across test runs (training is deterministic); settings are not
os.environ.setdefault("TUGBOAT_CACHE_DIR", str(_SESSION_HOME / "cache"))
# round_to = "auto" prunes to the channel multiple this CPU measures (8 or 16, a timing): the suite
# uses one value so pruned counts are the same on every machine (the probe has its own tests)
os.environ.setdefault("TUGBOAT_CHANNEL_MULTIPLE", "16")
# the window makes its variants in a worker process (ui/session.py); the GUI tests drive the window's
# behaviour in-thread (one process, spies and toys work), tests/test_child_jobs.py the worker itself.
# TUGBOAT_JOBS_IN_CHILD=1 runs the whole GUI suite through the worker.
os.environ.setdefault("TUGBOAT_JOBS_IN_CHILD", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

# PySide6 6.12.0 drops a reference to None/True on every void call and emit (aborts CPython 3.11)
with contextlib.suppress(ImportError):  # no Qt installed: engine tests still run
    import tugboat.jobs._qt_compat  # noqa: F401


@pytest.fixture(autouse=True)
def _isolated_config(tmp_path, monkeypatch):
    monkeypatch.setenv("TUGBOAT_CONFIG_DIR", str(tmp_path / "config"))
    yield


_QT_FIXTURES = {"qtbot", "qapp", "window"}


@pytest.fixture(autouse=True)
def _qt_garbage_on_the_gui_thread(request):
    """A Qt test's garbage is collected on the main (GUI) thread as the test ends. Left to automatic
    collection it may be freed later on whatever thread allocates next (an export or calibration
    helper thread of a later test), and a Qt object destroyed off the GUI thread can deadlock with
    it (docs/reliability.md). The app itself collects on the GUI thread while jobs run
    (jobs._GuiThreadCollector); this covers the plain threads tests start."""
    yield
    if _QT_FIXTURES & set(request.fixturenames):
        gc.collect()


@pytest.fixture(scope="session")
def demo_data():
    from tugboat.engine.io.data import load_data

    return load_data("demo:digits")


@pytest.fixture(scope="session")
def demo_models():
    """Loaded demo models by name, each loaded once per session."""
    from tugboat.engine.io.loading import load_model

    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = load_model(f"demo:{name}")
        return cache[name]

    return get


@pytest.fixture
def python():
    return sys.executable
