"""Crash-safe state: a process saving a workspace and the settings in a loop is SIGKILLed at random
moments, many times; after every kill both reopen cleanly with the old or the new content.

The GUI keeps its results in the same engine :class:`Workspace` folder format (ui/workspace_io.py
wraps it), so this covers the window's saves too. A SIGKILLed sweep that resumes is in
test_workspace.py. The writer is a forked child of the test process (no second import of torch,
so each round costs milliseconds, not seconds).
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest

from tugboat.engine.running.variants import Variant
from tugboat.engine.running.workspace import Workspace
from tugboat.settings import Settings, load_settings, save_settings

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and SIGKILL (POSIX)")

ROUNDS = 20


def _variant(n: int) -> Variant:
    # a few kB per variant, so workspace.json grows to hundreds of kB and a save takes a while
    return Variant(f"v{n}", {"model": "demo:x", "steps": [{"technique": "prune", "ratio": n / 1000}]},
                   metrics={"size_bytes": n, "params": n, "accuracy": 0.5,
                            "latency_ms": {"median": float(n), "p90": float(n), "batch": 1, "threads": 1,
                                           "runtime": "onnxruntime"}},
                   info={"curve": [{"epoch": i, "loss": 1.0 / (i + n)} for i in range(160)]})


def _writer(ws_path: Path, settings_path: Path, out_fd: int) -> None:
    """Child: add a variant + save, change the settings + save, report the count; forever."""
    ws = Workspace.open(ws_path)
    settings = load_settings(settings_path)
    n = int(ws.meta.get("counter", 0))
    while True:
        n += 1
        ws.meta["counter"] = n
        ws.add_variant(_variant(n))
        settings.measure_batch = n
        settings.recent_models = [f"model-{n}-{i}" for i in range(10)]
        settings.geometry = "x" * (1000 + n)
        assert save_settings(settings, settings_path) is not None
        os.write(out_fd, f"{n}\n".encode())


def _run_and_kill(ws_path: Path, settings_path: Path, seconds: float) -> tuple[int, int]:
    """Fork a writer, SIGKILL it after ``seconds``; return (saves it confirmed, its start count)."""
    start = int(Workspace.open(ws_path).meta.get("counter", 0))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns into pytest
        code = 1
        try:
            os.close(r)
            _writer(ws_path, settings_path, w)
        except BaseException:
            code = 3
        finally:
            os._exit(code)
    os.close(w)
    time.sleep(seconds)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, "the writer died on its own"
    with os.fdopen(r) as fh:
        confirmed = [int(line) for line in fh.read().split()]
    return (confirmed[-1] if confirmed else start), start


def test_kill_during_save_never_corrupts_the_workspace_or_the_settings(tmp_path):
    ws_path, settings_path = tmp_path / "ws", tmp_path / "config" / "settings.json"
    ws = Workspace.create(ws_path, model="demo:x", data="demo:y")
    ws.set_baseline(Variant("baseline", {"model": "demo:x", "steps": []}, {"size_bytes": 1}))
    save_settings(Settings(), settings_path)
    rng = random.Random(9)
    mid_save = 0  # rounds whose kill left a temporary file behind: killed in the middle of a write
    total_saves = 0
    settings_before = Settings().measure_batch
    rounds = 0
    # at least ROUNDS kills; more (up to 8x) until one lands inside a write, which is a matter of
    # timing: a loaded machine can spend whole rounds outside the writes
    while rounds < ROUNDS or (mid_save == 0 and rounds < 8 * ROUNDS):
        rounds += 1
        confirmed, start = _run_and_kill(ws_path, settings_path, rng.uniform(0.05, 0.45))
        total_saves += confirmed - start
        temps = [p for p in ws_path.rglob(".*.tmp")] + list(settings_path.parent.glob(".settings-*"))
        mid_save += bool(temps)

        # every file parses strictly (no tolerant reader hides a half-written file)
        raw = json.loads((ws_path / "workspace.json").read_text(encoding="utf-8"))
        json.loads((ws_path / "report.json").read_text(encoding="utf-8"))
        raw_settings = json.loads(settings_path.read_text(encoding="utf-8"))

        # the old or the new content: the last confirmed save, or the one in progress
        counter = raw["meta"].get("counter", 0)  # 0: killed before its first save (a loaded machine)
        assert counter in (confirmed, confirmed + 1)
        assert [v["name"] for v in raw["variants"]] == [f"v{i}" for i in range(1, counter + 1)]
        # the settings are saved after the workspace: the last value read, or one this writer saved
        assert raw_settings["measure_batch"] in {settings_before, *range(start + 1, confirmed + 2)}
        settings_before = raw_settings["measure_batch"]
        assert raw_settings["recent_models"][0] == f"model-{raw_settings['measure_batch']}-0"
        assert len(raw_settings["geometry"]) == 1000 + raw_settings["measure_batch"]

        reopened = Workspace.open(ws_path)  # recovers a variant folder written just before the kill
        assert reopened.names()[:counter] == [f"v{i}" for i in range(1, counter + 1)]
        assert len(reopened) in (counter, counter + 1)
        assert all(reopened.get(f"v{i}").metrics["size_bytes"] == i for i in range(1, len(reopened) + 1))
        assert reopened.baseline is not None and reopened.baseline.metrics == {"size_bytes": 1}
        assert not list(ws_path.rglob(".*.tmp"))  # stale temporary files removed on reopening
        assert load_settings(settings_path).measure_batch == raw_settings["measure_batch"]
        if len(reopened) > counter:  # the recovered variant is now in the index
            assert json.loads((ws_path / "workspace.json").read_text())["variants"][-1]["name"] == \
                f"v{counter + 1}"
            reopened.meta["counter"] = counter + 1
            reopened.save()

    print(f"\n{rounds} SIGKILLs during saves survived ({total_saves} saves confirmed, {mid_save} kills "
          f"left a temporary file, i.e. landed inside a write)")
    assert total_saves >= ROUNDS // 2, "the writers hardly saved anything before the kills"
    assert mid_save >= 1, "no kill landed inside a write; the test did not test anything"


def test_saving_settings_removes_temporary_files_of_killed_saves(tmp_path):
    path = tmp_path / "settings.json"
    old, fresh = tmp_path / ".settings-killed.json", tmp_path / ".settings-live.json"
    old.write_text("{")
    fresh.write_text("{")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    assert save_settings(Settings(measure_batch=7), path) == path
    assert not old.exists() and fresh.exists()  # a live save of another instance is left alone
    assert load_settings(path).measure_batch == 7
