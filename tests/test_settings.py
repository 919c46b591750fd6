"""Settings: versioned JSON, tolerant reader, atomic writes; never the user's real file."""

from __future__ import annotations

import json
import os

from tugboat.settings import SETTINGS_VERSION, Settings, load_settings, save_settings, settings_path


def test_settings_live_in_the_test_config_dir(tmp_path):
    assert settings_path().parent == tmp_path / "config"


def test_round_trip_and_version():
    s = Settings(last_workspace="/w", measure_batch=32)
    s.add_recent("models", "a.onnx")
    s.add_recent("models", "b.onnx")
    s.add_recent("models", "a.onnx")
    path = save_settings(s)
    raw = json.loads(path.read_text())
    assert raw["version"] == SETTINGS_VERSION
    back = load_settings()
    assert back.last_workspace == "/w" and back.measure_batch == 32
    assert back.recent_models == ["a.onnx", "b.onnx"]
    assert [p.name for p in path.parent.iterdir()] == ["settings.json"]  # no temp file left


def test_missing_or_corrupt_file_gives_defaults():
    assert load_settings() == Settings()
    settings_path().parent.mkdir(parents=True, exist_ok=True)
    settings_path().write_bytes(b"{not json")
    assert load_settings() == Settings()
    settings_path().write_bytes(b"\xff\xfe garbage")
    assert load_settings() == Settings()
    settings_path().write_text("[1, 2]")
    assert load_settings() == Settings()


def test_unknown_keys_ignored_and_bad_types_fall_back():
    settings_path().parent.mkdir(parents=True, exist_ok=True)
    settings_path().write_text(json.dumps({
        "version": 99, "future_key": {"x": 1}, "measure_batch": "many", "recent_models": ["ok.onnx", 3],
        "last_workspace": "/ws", "measure_threads": -2}))
    s = load_settings()
    assert s.last_workspace == "/ws"
    assert s.measure_batch == Settings().measure_batch
    assert s.recent_models == [] and s.measure_threads == 0


def test_unwritable_folder_does_not_raise(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("TUGBOAT_CONFIG_DIR", str(blocker / "sub"))
    assert save_settings(Settings()) is None
    assert os.path.exists(blocker)
