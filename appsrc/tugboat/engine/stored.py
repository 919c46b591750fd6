"""The files Tugboat writes and later reads back (``workspace.json``, ``report.json``,
``metrics.json``): written atomically and strictly, read back as untrusted input.

A file Tugboat wrote may have been edited, truncated, replaced or crafted by someone else before it
is read again, so everything here treats it like any other user file:

* :func:`read_json` reads with a size cap, rejects nesting deeper than :data:`MAX_DEPTH` (a file of
  100,000 ``[`` would otherwise end in a ``RecursionError``) and turns every failure into one
  :class:`StoredFileError` naming the file.
* :func:`check_report`, :func:`check_workspace` and :func:`check_variant` are the one validation of
  each file kind (plain code, the contract of ``shared/report.schema.json`` plus what the workspace
  adds): wrong types anywhere end in one line naming the file and the JSON path of the bad value.
* :func:`inside` is the one place a path stored in a file (a variant's ``folder``, an artifact name)
  becomes a real path: it must stay inside its folder (no absolute path, no ``..``, no symlink that
  leads out), so a crafted file can never make Tugboat write or read outside the chosen folder.
* :func:`dumps` writes strict JSON (``allow_nan=False``: NaN and Infinity become ``null``, never the
  bare ``NaN`` strict parsers reject), and :func:`atomic_write_bytes` writes through a temporary file
  named with :data:`TMP_MARK`, so recovery removes only temporary files Tugboat itself made.

Qt-free and torch-free (the CLI's ``report`` and the settings use it without loading torch).
"""

from __future__ import annotations

import json
import math
import os
import stat
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from .errors import OutputError, StoredFileError

__all__ = ["OutputError", "StoredFileError", "atomic_write_bytes", "check_report", "check_workspace", "dumps",
           "inside", "read_json"]

MAX_DEPTH = 64  # Tugboat's own files nest about 8 deep
MAX_JSON_BYTES = 256 * 1024 * 1024
WORKSPACE_FILE = "workspace.json"  # a sweep workspace's index (engine.workspace)
TMP_MARK = ".tugboat-"  # temporary files: ".<name>.tugboat-<random>.tmp"
TMP_GLOB = f".*{TMP_MARK}*.tmp"


# --- recipes as stored: never with a trust flag ------------------------------------------------

TRUST_KEYS = ("trust", "student_trust")


def without_trust(recipe: Any) -> Any:
    """A recipe dictionary (from a file an older version wrote) without any trust flag, at the top
    level or in a step: trust is never stored, so it is dropped wherever a recipe is read or written."""
    if not isinstance(recipe, dict):
        return recipe
    out = {k: v for k, v in recipe.items() if k not in TRUST_KEYS}
    if isinstance(out.get("steps"), list):
        out["steps"] = [{k: v for k, v in s.items() if k not in TRUST_KEYS} if isinstance(s, dict) else s
                        for s in out["steps"]]
    return out


def _toml_safe(obj):
    if isinstance(obj, dict):
        return {k: _toml_safe(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [_toml_safe(v) for v in obj]
    return obj


def recipe_dict_to_toml(recipe: dict[str, Any]) -> str:
    """A recipe dictionary as TOML text, without trust flags or empty values."""
    import tomli_w

    return tomli_w.dumps(_toml_safe(without_trust(recipe)))


# --- writing -------------------------------------------------------------------------------------

def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write to a temp file in the same folder, fsync, then rename: never a half-written file (on
    the window's GUI thread the fsyncs run on another thread: :func:`sync_later_on_this_thread`).

    Any failure (a full disk, a read-only folder, a folder where the file should be) raises
    :class:`OutputError` naming the file; the previous version of the file is left as it was."""
    path = Path(path)
    tmp = None
    try:
        if path.is_dir():
            raise OutputError("is a folder, not a file", path=str(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        later = _SYNC_LATER.get(threading.get_ident())
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TMP_MARK}", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if later is None:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        keep = "; the previous version is kept" if path.is_file() else ""
        raise OutputError(f"could not be written ({exc.strerror or exc}){keep}", path=str(path)) from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    if later is not None:
        later(lambda: fsync_file_and_dir(path))
    else:
        fsync_dir(path.parent)
    return path


# Threads whose atomic writes are synced later, elsewhere: thread id -> a function that runs a
# sync on another thread (see :func:`sync_later_on_this_thread`).
_SYNC_LATER: dict[int, Callable[[Callable[[], None]], None]] = {}


def sync_later_on_this_thread(run: Callable[[Callable[[], None]], None] | None) -> None:
    """Atomic writes made on the calling thread (the window's GUI thread) still write a temporary
    file and rename it into place at once, so the file is whole and current for every reader and a
    killed process never leaves half of it; only the fsyncs that make it survive a power loss
    (about 10 ms each, two per file, longer on a busy disk) are handed to ``run``, which runs them on
    another thread, so an event loop never waits on the disk. ``None`` restores synced writes."""
    if run is None:
        _SYNC_LATER.pop(threading.get_ident(), None)
    else:
        _SYNC_LATER[threading.get_ident()] = run


def sync_later() -> Callable[[Callable[[], None]], None] | None:
    """The calling thread's hand-off for syncs (None: sync in place), for writers of their own."""
    return _SYNC_LATER.get(threading.get_ident())


def fsync_file_and_dir(path: str | os.PathLike) -> None:
    """fsync a written file and its folder (after its rename into place)."""
    path = Path(path)
    if _fsync_path(path):  # else replaced or removed since: its successor is synced by its own write
        fsync_dir(path.parent)


def temp_file_beside(path: Path) -> Path:
    """A new empty temporary file in ``path``'s folder, for a writer that cannot take bytes (an
    exporter that wants a file name): ``.<stem>.tugboat-<random>.tmp<suffix>`` (the suffix stays
    last: ``torch.export.save`` wants a name ending in ``.pt2``). Finish with :func:`replace_with`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}{TMP_MARK}", suffix=f".tmp{path.suffix}")
    os.close(fd)
    return Path(tmp)


def replace_with(tmp: Path, path: Path) -> Path:
    """Put a finished temporary file in place of ``path`` in one rename (the permissions a new file
    gets, the folder synced), as :func:`atomic_write_bytes` does with bytes."""
    os.chmod(tmp, 0o666 & ~current_umask())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def fsync_dir(folder: Path) -> None:
    """Make a rename durable across a power loss (POSIX; a no-op where folders cannot be opened)."""
    if os.name == "posix":
        _fsync_path(folder)


def _fsync_path(path: Path) -> bool:
    """fsync a file or folder by its path; False when it cannot be opened (an fsync error is ignored)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
    return True


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable_folder(folder: str | os.PathLike, what: str = "output folder") -> Path:
    """Create ``folder`` if needed and prove it can be written (a probe file), before any work:
    an existing file, a read-only place or a full disk is found in the first second, not after an
    hour of work."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"the {what} is an existing file, not a folder", path=str(folder))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".probe{TMP_MARK}", suffix=".tmp")
        try:
            os.write(fd, b"tugboat")
            os.fsync(fd)
        finally:
            os.close(fd)
            Path(probe).unlink(missing_ok=True)
    except OSError as exc:
        raise OutputError(f"the {what} cannot be written ({exc.strerror or exc})", path=str(folder)) from None
    return folder


def check_writable_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """``path`` can be written as a file: not a folder, and its folder is writable."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"the {what} is a folder; give a file name", path=str(path))
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise OutputError(f"the {what}'s folder is a file", path=str(path))
    try:
        check_writable_folder(parent, f"folder of the {what}")
    except OutputError as exc:
        raise OutputError(exc.message, path=str(path)) from None
    return path


def finite(obj: Any) -> Any:
    """``obj`` as plain JSON types, with NaN and Infinity replaced by ``None`` (null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    try:
        import numpy as np

        if isinstance(obj, (np.floating, np.integer, np.bool_)):
            return finite(obj.item())
    except ImportError:  # pragma: no cover
        pass
    return str(obj)


_ONE_LINE = json.JSONEncoder(allow_nan=False, separators=(", ", ": "))  # no indent: json's C encoder


def dumps(obj: Any, *, where: str | None = None) -> bytes:
    """Strict JSON for Tugboat's own files: NaN/Infinity become null, never bare ``NaN``.

    A top-level object has one key per line, and a list of objects in it one object per line
    (a workspace's variants, a report's): readable and diffable, and every line is encoded by json's
    C encoder. The indented form goes through json's pure-Python encoder, 3-5x slower: it was half
    of a workspace save on the window's GUI thread (issue 17)."""
    try:
        return _lines(finite(obj)).encode("utf-8")
    except (ValueError, RecursionError) as exc:  # pragma: no cover - finite() leaves nothing to refuse
        raise OutputError(f"cannot be written as JSON ({exc})", path=where) from None


def _lines(obj: Any) -> str:
    encode = _ONE_LINE.encode
    if not isinstance(obj, dict) or not obj:
        return encode(obj)
    parts = []
    for key, value in obj.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            rows = ",\n    ".join(encode(v) for v in value)
            parts.append(f"  {encode(key)}: [\n    {rows}\n  ]")
        else:
            parts.append(f"  {encode(key)}: {encode(value)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


# --- reading -------------------------------------------------------------------------------------

def _constant_as_null(name: str) -> None:
    return None  # NaN / Infinity written by older versions read as null


def read_json(path: str | os.PathLike, *, what: str | None = None, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse a JSON file Tugboat wrote earlier, as untrusted input."""
    path = Path(path)
    label = what or path.name
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):  # a FIFO or a device would block or never end
            raise StoredFileError(f"{label} is not a regular file; not read", path=str(path))
        if info.st_size > max_bytes:
            raise StoredFileError(f"{label} is larger than {max_bytes // (1024 * 1024)} MB; not read",
                                  path=str(path))
        text = path.read_text(encoding="utf-8")
    except StoredFileError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise StoredFileError(f"{label} cannot be read ({why})", path=str(path)) from None
    return parse_json(text, str(path), label)


def parse_json(text: str, where: str, label: str = "the file") -> Any:
    try:
        obj = json.loads(text, parse_constant=_constant_as_null)
    except RecursionError:
        obj = None
        deep = True
    except ValueError as exc:
        raise StoredFileError(f"{label} cannot be read: not valid JSON ({_short(exc)})", path=where) from None
    else:
        deep = _too_deep(obj)
    if deep:  # every later step (validation, re-saving) would recurse as deep
        raise StoredFileError(f"{label} is nested deeper than {MAX_DEPTH} levels; not a Tugboat file",
                              path=where)
    return obj


def _too_deep(obj: Any) -> bool:
    """Nesting deeper than MAX_DEPTH (iterative: no recursion on hostile input)."""
    stack = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > MAX_DEPTH:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:160]


# --- containment ---------------------------------------------------------------------------------

def inside(base: str | os.PathLike, rel: Any, *, what: str, file: str | os.PathLike | None = None,
           single: bool = False) -> Path:
    """``base / rel`` for a path read from a file, refused unless it stays inside ``base``.

    Refused: a non-string, an empty name, an absolute path (POSIX or Windows), any ``..`` part, a
    NUL byte, a symlink (anywhere on the way) that resolves outside ``base``; with ``single``, any
    separator (a variant's folder is one name). ``what`` says what the path is, for the message."""
    where = str(file) if file is not None else str(base)
    if not isinstance(rel, str) or not rel.strip() or "\x00" in rel:
        raise StoredFileError(f"{what} {rel!r} is not a valid relative path", path=where)
    posix, windows = PurePosixPath(rel), PureWindowsPath(rel)
    if (posix.is_absolute() or windows.is_absolute() or windows.drive or rel.startswith(("/", "\\"))
            or ".." in posix.parts or ".." in windows.parts):
        raise StoredFileError(f"{what} {rel!r} points outside {base} (only names inside it are allowed)",
                              path=where)
    if single and (len(posix.parts) != 1 or len(windows.parts) != 1 or rel in (".", "..")):
        raise StoredFileError(f"{what} {rel!r} must be a single folder name inside {base}", path=where)
    base = Path(base)
    full = base / rel
    try:
        root = base.resolve()
        resolved = full.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise StoredFileError(f"{what} {rel!r} cannot be resolved ({exc})", path=where) from None
    if resolved != root and not resolved.is_relative_to(root):
        raise StoredFileError(f"{what} {rel!r} leads outside {base} through a symlink; refused", path=where)
    return full


# --- validation ----------------------------------------------------------------------------------

class Checker:
    """Type checks that name the file and the JSON path of the first bad value."""

    def __init__(self, where: str, label: str) -> None:
        self.where, self.label = where, label

    def fail(self, key: str, problem: str) -> None:
        raise StoredFileError(f"{self.label}: '{key}' {problem}", path=self.where)

    def obj(self, value: Any, key: str, *, optional: bool = False) -> dict[str, Any]:
        if value is None and optional:
            return {}
        if not isinstance(value, dict):
            self.fail(key, f"must be an object, got {_kind(value)}")
        return value

    def lst(self, value: Any, key: str, *, optional: bool = False) -> list[Any]:
        if value is None and optional:
            return []
        if not isinstance(value, list):
            self.fail(key, f"must be a list, got {_kind(value)}")
        return value

    def text(self, value: Any, key: str, *, optional: bool = False) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str):
            self.fail(key, f"must be a string, got {_kind(value)}")
        return value

    def number(self, value: Any, key: str, *, integer: bool = False) -> None:
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and isinstance(value, float)
                                                                                 and not value.is_integer()):
            self.fail(key, f"must be a {'whole number' if integer else 'number'} or null, got {_kind(value)}")

    def strings(self, value: Any, key: str) -> None:
        for i, v in enumerate(self.lst(value, key, optional=True)):
            self.text(v, f"{key}[{i}]")


def _kind(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


INT_METRICS = ("size_bytes", "compressed_bytes", "params", "nonzero_params", "flops")
NUMBER_METRICS = ("accuracy", "seconds")


def check_metrics(c: Checker, value: Any, key: str) -> dict[str, Any]:
    m = c.obj(value, key, optional=True)
    for name in INT_METRICS:
        c.number(m.get(name), f"{key}.{name}", integer=True)
    for name in NUMBER_METRICS:
        c.number(m.get(name), f"{key}.{name}")
    lat = c.obj(m.get("latency_ms"), f"{key}.latency_ms", optional=True)
    for name in ("median", "p90", "mean", "min"):
        c.number(lat.get(name), f"{key}.latency_ms.{name}")
    for name in ("batch", "threads"):
        c.number(lat.get(name), f"{key}.latency_ms.{name}", integer=True)
    c.text(lat.get("runtime"), f"{key}.latency_ms.runtime", optional=True)
    for name in ("spread", "load"):
        c.number(lat.get(name), f"{key}.latency_ms.{name}")
    sp = c.obj(lat.get("speedup"), f"{key}.latency_ms.speedup", optional=True)  # paired timing
    for name in ("median", "low", "high", "baseline_median", "width"):
        c.number(sp.get(name), f"{key}.latency_ms.speedup.{name}")
    c.number(sp.get("blocks"), f"{key}.latency_ms.speedup.blocks", integer=True)
    fid = c.obj(m.get("fidelity"), f"{key}.fidelity", optional=True)
    for name, v in fid.items():
        c.number(v, f"{key}.fidelity.{name}")
    # per-runtime measurements (engine/runtimes): read by the CLI summary and the window
    for runtime, entry in c.obj(m.get("runtimes"), f"{key}.runtimes", optional=True).items():
        where = f"{key}.runtimes.{runtime}"
        e = c.obj(entry, where)
        for name in ("version", "reason", "install"):
            c.text(e.get(name), f"{where}.{name}", optional=True)
        lat = c.obj(e.get("latency_ms"), f"{where}.latency_ms", optional=True)
        for name in ("median", "p90", "batch", "threads"):
            c.number(lat.get(name), f"{where}.latency_ms.{name}")
        for name, v in c.obj(e.get("fidelity"), f"{where}.fidelity", optional=True).items():
            c.number(v, f"{where}.fidelity.{name}")
    return m


def check_variant(c: Checker, value: Any, key: str, *, named: bool = True) -> dict[str, Any]:
    v = c.obj(value, key)
    if named:
        c.text(v.get("name"), f"{key}.name")
        if not v["name"].strip():
            c.fail(f"{key}.name", "is empty")
    c.obj(v.get("recipe"), f"{key}.recipe", optional=True)
    check_metrics(c, v.get("metrics"), f"{key}.metrics")
    arts = c.obj(v.get("artifacts"), f"{key}.artifacts", optional=True)
    for name, rel in arts.items():
        c.text(rel, f"{key}.artifacts.{name}")
    c.strings(v.get("warnings"), f"{key}.warnings")
    status = v.get("status", "ok")
    if status not in ("ok", "failed", "cancelled"):
        c.fail(f"{key}.status", f"must be ok, failed or cancelled, got {_kind(status)}")
    c.text(v.get("error"), f"{key}.error", optional=True)
    c.obj(v.get("info"), f"{key}.info", optional=True)
    c.text(v.get("folder"), f"{key}.folder", optional=True)
    for name, empty in (("metrics", dict), ("artifacts", dict), ("warnings", list), ("recipe", dict)):
        if v.get(name) is None:  # null where the writer would have put an empty one
            v[name] = empty()
    return v


def check_report(raw: Any, where: str, label: str = "report.json") -> dict[str, Any]:
    """A ``report.json`` (from ``tugboat run``/``sweep`` or the GUI) that the CLI can show."""
    c = Checker(where, label)
    if not isinstance(raw, dict):
        raise StoredFileError(f"{label} is not a Tugboat report (a JSON object), got {_kind(raw)}", path=where)
    if "baseline" not in raw:
        raise StoredFileError(f"{label} is not a Tugboat report (no 'baseline')", path=where)
    c.text(raw.get("model", ""), "model")
    c.text(raw.get("data", ""), "data", optional=True)
    base = c.obj(raw["baseline"], "baseline")
    if "metrics" not in base:
        c.fail("baseline.metrics", "is missing")
    check_variant(c, base, "baseline", named=False)
    for key in ("variants", "failed"):
        for i, v in enumerate(c.lst(raw.get(key), key, optional=True)):
            check_variant(c, v, f"{key}[{i}]")
    c.strings(raw.get("pareto"), "pareto")
    c.obj(raw.get("recipe"), "recipe", optional=True)
    for name in ("variants", "failed", "pareto"):
        if raw.get(name) is None:
            raw[name] = []
    for name in ("model", "data"):
        if raw.get(name) is None:
            raw[name] = ""
    return raw


def check_workspace(raw: Any, where: str, label: str = "workspace.json") -> dict[str, Any]:
    """A ``workspace.json``: every field the workspace reads, with its type."""
    c = Checker(where, label)
    if not isinstance(raw, dict):
        raise StoredFileError(f"{label} is not a JSON object, got {_kind(raw)}", path=where)
    for key in ("model", "data", "created"):
        c.text(raw.get(key), key, optional=True)
    for key in ("measure", "recipe", "meta"):
        c.obj(raw.get(key), key, optional=True)
    measure = raw.get("measure") or {}
    for key in ("batch", "threads", "warmup", "min_runs"):
        c.number(measure.get(key), f"measure.{key}", integer=True)
    c.text(measure.get("runtime"), "measure.runtime", optional=True)
    if raw.get("baseline") is not None:
        check_variant(c, raw["baseline"], "baseline", named=False)
    for i, v in enumerate(c.lst(raw.get("variants"), "variants", optional=True)):
        check_variant(c, v, f"variants[{i}]")
    return raw
