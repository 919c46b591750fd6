"""One writer per output folder: ``DIR/.tugboat.lock``.

Two sweeps (or a sweep and the app) writing one workspace would interleave their ``workspace.json``
rewrites and lose variants. Whoever writes a folder holds its lock for as long as it writes:
``tugboat run`` and ``tugboat sweep`` for the whole command, the app for as long as the workspace is
open. A second writer is refused at once with::

    DIR: is in use by PID 4242 (host build-7, started 2026-11-29T14:02:11, tugboat sweep); ...

On POSIX the lock is an ``flock`` on the lock file, which the kernel drops when its process dies,
however it dies: a lock left by a killed process is stale and taken over without asking (the file
still names the dead PID until the next holder rewrites it). Elsewhere the file is created
exclusively and a lock whose PID no longer runs on this host is taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import FolderLockedError, TugboatError
from .stored import fsync_file_and_dir, sync_later

LOCK_FILE = ".tugboat.lock"

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def _holder_text(info: dict[str, Any]) -> str:
    pid = info.get("pid", "?")
    host = info.get("host", "?")
    started = info.get("started", "?")
    what = info.get("what")
    return f"PID {pid} ({host}, started {started}{', ' + str(what) if what else ''})"


def read_holder(folder: str | os.PathLike) -> dict[str, Any]:
    """What the lock file says (empty if missing or unreadable: never trusted for more than text)."""
    try:  # at most 4 KB, never through a link: the file may have been planted
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        fd = os.open(Path(folder) / LOCK_FILE, flags)
        try:
            text = os.read(fd, 4096).decode("utf-8", "replace") if stat.S_ISREG(os.fstat(fd).st_mode) else ""
        finally:
            os.close(fd)
        raw = json.loads(text)
    except (OSError, ValueError, RecursionError):
        return {}
    return {k: raw[k] for k in ("pid", "host", "started", "what") if isinstance(raw, dict) and k in raw
            and isinstance(raw[k], (str, int)) and not isinstance(raw[k], bool)}


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


class FolderLock:
    """``with FolderLock(folder, "tugboat sweep"):`` holds the folder's lock (see the module doc)."""

    def __init__(self, folder: str | os.PathLike, what: str = "tugboat") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.what = what
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _info(self) -> bytes:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "what": self.what}).encode()

    def _refuse(self) -> FolderLockedError:
        info = read_holder(self.folder)
        holder = _holder_text(info) if info else "another process"
        return FolderLockedError(f"is in use by {holder}; wait for it to finish or choose another folder "
                                 f"(if that process is gone, delete {LOCK_FILE})", path=str(self.folder))

    def acquire(self) -> FolderLock:
        if self._fd is not None:
            return self
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            if fcntl is not None:
                self._acquire_flock()
            else:  # pragma: no cover - Windows
                self._acquire_exclusive()
        except OSError as exc:
            raise TugboatError(f"the lock file cannot be written ({exc.strerror or exc})",
                               path=str(self.path)) from None
        return self

    def _acquire_flock(self) -> None:
        for _ in range(20):
            if self.path.is_symlink():  # never truncate a file elsewhere through a planted link
                raise TugboatError("is a symbolic link; Tugboat does not write through it (delete it)",
                                   path=str(self.path))
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise TugboatError("is not a regular file; delete it", path=str(self.path))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise self._refuse() from None
            try:  # the holder before us may have removed the file between our open and flock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, self._info())
            later = sync_later()  # the window's GUI thread does not wait on the disk
            if later is None:
                os.fsync(fd)
            else:
                later(lambda: fsync_file_and_dir(self.path))
            self._fd = fd
            return
        raise self._refuse()

    def _acquire_exclusive(self) -> None:  # pragma: no cover - Windows
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                info = read_holder(self.folder)
                pid = info.get("pid")
                stale = (isinstance(pid, int) and info.get("host") == socket.gethostname()
                         and not pid_alive(pid))
                if not stale:
                    raise self._refuse() from None
                with contextlib.suppress(OSError):
                    self.path.unlink()
                continue
            os.write(fd, self._info())
            self._fd = fd
            return
        raise self._refuse()

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                self.path.unlink()  # before unlocking: the next holder always makes a fresh file
        with contextlib.suppress(OSError):
            os.close(fd)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:  # a forgotten lock is dropped with its object (the kernel would anyway)
        with contextlib.suppress(Exception):
            self.release()


@contextlib.contextmanager
def locked_output(folder: str | os.PathLike, what: str) -> Iterator[FolderLock]:
    """An output folder checked (:func:`stored.check_writable_folder`: not a file, writable) and
    locked for the work inside the ``with``; a folder made here and still empty when the work fails
    is removed again, so a refused or failed command leaves nothing behind."""
    from .stored import check_writable_folder

    folder = Path(folder)
    created = not folder.exists()
    try:
        check_writable_folder(folder, "--out folder")
        with FolderLock(folder, what) as lock:
            yield lock
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty: whatever was written stays
        raise
