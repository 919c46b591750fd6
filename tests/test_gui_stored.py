"""The window and the files it reads back (issue 15): it holds the open workspace's folder lock, so a
`tugboat sweep` on that folder is refused, and it opens a locked or malformed workspace with one
notification instead of an exception; a corrupt settings file and a bad --workspace never stop it
from starting."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tugboat.engine.lock import LOCK_FILE, FolderLock, FolderLockedError
from tugboat.engine.running.recipe import parse_recipe
from tugboat.engine.running.sweep import run_sweep
from tugboat.engine.running.variants import Variant
from tugboat.engine.running.workspace import Workspace
from tugboat.ui.main_window import MainWindow

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def window(qtbot):
    w = MainWindow()
    qtbot.addWidget(w)
    w.messages = []
    w.notify = lambda message, *a, **k: w.messages.append(message)
    yield w
    w.queue.shutdown(10)


def saved_workspace(path):
    ws = Workspace.create(path, model="demo:digits-cnn", data="demo:digits", measure={"batch": 8})
    ws.set_baseline(Variant("baseline", {}, {"size_bytes": 10}))
    return ws


def test_the_open_workspace_is_locked_against_a_sweep_until_the_window_closes(window, tmp_path):
    path = tmp_path / "ws"
    assert window.new_workspace(str(path)) is not None
    with pytest.raises(FolderLockedError, match=f"in use by PID {os.getpid()}.*the Tugboat app"):
        FolderLock(path).acquire()
    recipe = parse_recipe({"model": "demo:digits-cnn", "steps": [{"technique": "prune", "ratio": 0.5}],
                           "sweep": {"steps.0.ratio": [0.25]}})
    with pytest.raises(FolderLockedError):
        run_sweep(recipe, path, resume=True)
    window.close()
    assert not (path / LOCK_FILE).exists()
    FolderLock(path).acquire().release()


def test_opening_a_workspace_another_process_writes_is_one_notification(window, tmp_path):
    saved_workspace(tmp_path / "ws")
    with FolderLock(tmp_path / "ws", "tugboat sweep"):
        assert window.open_workspace(str(tmp_path / "ws")) is None
    assert len(window.messages) == 1 and "in use by PID" in window.messages[0]
    assert window.open_workspace(str(tmp_path / "ws")) is not None  # free again: opens


@pytest.mark.parametrize("change", [
    lambda raw: raw["measure"].update(batch="64"),
    lambda raw: raw["baseline"].update(folder="../../outside"),
    lambda raw: raw.update(variants="many"),
    lambda raw: raw.update(meta=[1]),
])
def test_a_malformed_workspace_is_one_notification(window, tmp_path, change):
    saved_workspace(tmp_path / "ws")
    raw = json.loads((tmp_path / "ws" / "workspace.json").read_text())
    change(raw)
    (tmp_path / "ws" / "workspace.json").write_text(json.dumps(raw))
    assert window.open_workspace(str(tmp_path / "ws")) is None
    assert len(window.messages) == 1 and "workspace.json" in window.messages[0]
    assert window.workspace is None and not (tmp_path / "ws" / LOCK_FILE).exists()


@pytest.mark.slow
def test_app_starts_with_a_corrupt_settings_file_and_a_bad_workspace(python, tmp_path):
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "settings.json").write_text("[" * 100000 + "]" * 100000)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "workspace.json").write_text('{"measure": {"batch": [64]}, "variants": ' + "[" * 50000 + "]" * 50000 + "}")
    env = {**os.environ, "TUGBOAT_CONFIG_DIR": str(cfg), "QT_QPA_PLATFORM": "offscreen"}
    proc = subprocess.run([python, "-m", "tugboat", "--workspace", str(bad), "--quit-after", "1"], env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
