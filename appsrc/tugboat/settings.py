"""User settings: versioned JSON in the user config folder, read tolerantly, written atomically.

Qt-free (pymmcore-gui's ``_settings.py`` is the model): the file lives in
``platformdirs.user_config_dir("tugboat")`` or ``$TUGBOAT_CONFIG_DIR``. A missing, unreadable or
corrupt file gives the defaults (a bad file never blocks start-up), unknown keys are ignored,
values of the wrong type fall back to their defaults, and writes go through a temporary file and
``os.replace`` so a crash never leaves half a file. Settings are never pickled.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SETTINGS_VERSION = 1
FILE_NAME = "settings.json"
MAX_RECENT = 10
MAX_BYTES = 1024 * 1024  # a settings file is a few KB; anything larger is not ours

_log = logging.getLogger(__name__)


def config_dir() -> Path:
    env = os.environ.get("TUGBOAT_CONFIG_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_config_dir("tugboat", appauthor=False))


def data_dir() -> Path:
    """Where autosaved workspaces go: $TUGBOAT_DATA_DIR, else beside a test's config, else the user's."""
    env = os.environ.get("TUGBOAT_DATA_DIR")
    if env:
        return Path(env)
    if os.environ.get("TUGBOAT_CONFIG_DIR"):
        return Path(os.environ["TUGBOAT_CONFIG_DIR"]) / "data"
    import platformdirs

    return Path(platformdirs.user_data_dir("tugboat", appauthor=False))


def settings_path() -> Path:
    return config_dir() / FILE_NAME


@dataclass
class Settings:
    geometry: str = ""  # base64 of QMainWindow.saveGeometry()
    window_state: str = ""  # base64 of QMainWindow.saveState()
    last_workspace: str = ""
    recent_models: list[str] = field(default_factory=list)
    recent_data: list[str] = field(default_factory=list)
    recent_workspaces: list[str] = field(default_factory=list)
    last_model: str = ""
    last_data: str = ""
    measure_batch: int = 64
    measure_threads: int = 0  # 0: the engine's default
    measure_runtime: str = "onnxruntime"
    dialog_dirs: dict[str, str] = field(default_factory=dict)  # file-dialog kind -> last folder
    version: int = SETTINGS_VERSION

    # --- reading / writing ----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: Any) -> Settings:
        """Build settings from whatever was in the file, keeping only well-typed known keys."""
        out = cls()
        if not isinstance(raw, dict):
            return out
        for f in fields(cls):
            if f.name == "version" or f.name not in raw:
                continue
            value, default = raw[f.name], getattr(out, f.name)
            if isinstance(default, dict):
                if isinstance(value, dict):
                    setattr(out, f.name, {str(k): v for k, v in value.items() if isinstance(v, str)})
            elif isinstance(default, list):
                if isinstance(value, list) and all(isinstance(v, str) for v in value):
                    setattr(out, f.name, list(value)[:MAX_RECENT])
            elif isinstance(default, bool):
                if isinstance(value, bool):
                    setattr(out, f.name, value)
            elif isinstance(default, int):
                if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                    setattr(out, f.name, value)
            elif isinstance(default, str) and isinstance(value, str):
                setattr(out, f.name, value)
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["version"] = SETTINGS_VERSION
        return d

    def add_recent(self, kind: str, ref: str) -> None:
        """Put ``ref`` first in the recent ``kind`` list (models, data or workspaces)."""
        name = f"recent_{kind}"
        items = [r for r in getattr(self, name) if r != ref]
        setattr(self, name, [ref, *items][:MAX_RECENT])


def load_settings(path: str | os.PathLike | None = None) -> Settings:
    """The saved settings, or the defaults if the file is missing, unreadable or corrupt."""
    path = Path(path) if path else settings_path()
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block start-up forever
            raise ValueError("not a regular file")
        if info.st_size > MAX_BYTES:
            raise ValueError(f"larger than {MAX_BYTES // 1024} KB")
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Settings()
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, MemoryError) as exc:
        # RecursionError: a file of deeply nested brackets; a bad file never blocks start-up
        _log.warning("ignoring unreadable settings file %s: %s", path, str(exc)[:200])
        return Settings()
    if isinstance(raw, dict) and isinstance(raw.get("version"), int) and raw["version"] > SETTINGS_VERSION:
        _log.info("settings file %s is from a newer version; reading what is known", path)
    return Settings.from_dict(raw)


def save_settings(settings: Settings, path: str | os.PathLike | None = None) -> Path | None:
    """Write atomically; returns the path, or None if the folder cannot be written (never raises)."""
    from .engine.stored import fsync_file_and_dir, sync_later

    path = Path(path) if path else settings_path()
    later = sync_later()  # the window's GUI thread: synced on another thread (jobs.disk_sync)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".settings-", suffix=".json", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(settings.to_dict(), fh, indent=2, allow_nan=False)
                fh.flush()
                if later is None:
                    os.fsync(fh.fileno())
            os.replace(tmp, path)
            if later is not None:
                later(lambda: fsync_file_and_dir(path))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except (OSError, ValueError) as exc:
        _log.warning("could not save settings to %s: %s", path, exc)
        return None
    _remove_stale_temps(path.parent)
    return path


def _remove_stale_temps(folder: Path, age_s: float = 600.0) -> None:
    """Temporary files of saves killed before their rename (another instance's live one is
    younger than a second, so only old ones go)."""
    now = time.time()
    for tmp in folder.glob(".settings-*.json"):
        try:
            if now - tmp.stat().st_mtime > age_s:
                tmp.unlink()
        except OSError:
            pass
