"""Errors the user can act on.

Every error the engine raises for bad input is a :class:`TugboatError`: it names the file (or
reference) and the problem in one sentence, so the CLI can print it and exit with code 2 and the
GUI can show it without a traceback.
"""

from __future__ import annotations

TRUST_OPTION = ("to trust the model and student files of one run, pass --trust to tugboat run or "
                "tugboat sweep")  # the hint of an UntrustedFileError: trust is per run, never in a file


class TugboatError(Exception):
    """A problem with the user's input (file, data, recipe), stated plainly."""

    def __init__(self, message: str, *, path: str | None = None, hint: str | None = None):
        self.message = message
        self.path = str(path) if path is not None else None
        self.hint = hint
        super().__init__(self.__str__())

    def __str__(self) -> str:
        text = f"{self.path}: {self.message}" if self.path else self.message
        if self.hint:
            text += f" ({self.hint})"
        return text


class ModelLoadError(TugboatError):
    """A model file could not be loaded."""


class UntrustedFileError(ModelLoadError):
    """The file holds pickled Python objects and the user has not said they trust it."""


class DataError(TugboatError):
    """A dataset is missing, malformed, or does not match the model's inputs."""


class RecipeError(TugboatError):
    """A recipe is invalid: unknown technique, method or parameter, or a value out of range."""


class StoredFileError(TugboatError):
    """A file Tugboat reads back (workspace, report, metrics) is unreadable, malformed, or names a
    path outside its folder."""


class WorkspaceError(StoredFileError):
    """A workspace folder cannot be read or written."""


class OutputError(TugboatError):
    """An output file or folder cannot be written (read-only, full disk, not a folder)."""


class FolderLockedError(TugboatError):
    """Another process is writing this folder."""


class ResourceError(TugboatError):
    """A job would exceed the machine's resources (memory) and was refused."""


class NumericalError(TugboatError):
    """A model produced NaN or Inf outputs."""


class RuntimeUnsupportedError(TugboatError):
    """A runtime cannot run (or export) this variant; the message says why, in one line."""


class ExportCheckError(TugboatError):
    """An exported file does not load in its runtime or does not reproduce the variant's outputs."""


class DeviceError(TugboatError):
    """A ``device`` setting names a device this machine does not have (or is not a device)."""


class Cancelled(Exception):  # noqa: N818 - reads better at call sites than CancelledError
    """Raised inside a job when the user asked it to stop."""


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception as one line of at most ``limit`` characters (a Tugboat error by its message)."""
    text = exc.message if isinstance(exc, TugboatError) else f"{type(exc).__name__}: {exc}"
    return " ".join(str(text).split())[:limit]
