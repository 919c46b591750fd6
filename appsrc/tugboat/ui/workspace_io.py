"""The window's workspace: the engine's :class:`~tugboat.engine.workspace.Workspace`, kept in step
with the :class:`VariantStore`.

There is one workspace format. A folder made by ``tugboat sweep recipe.toml --out DIR`` opens in the
window with all its variants, and a folder the window saved is read by ``tugboat report DIR`` and
continued by ``tugboat sweep --resume``::

    DIR/workspace.json, DIR/report.json, DIR/baseline/, DIR/<variant>/{model.onnx,recipe.toml,metrics.json}

Folders saved by early builds of the window (``artifacts/<name>.onnx`` beside ``workspace.json``)
are read by the same engine reader; the next save writes the current layout for new variants.

:class:`WorkspaceKeeper` owns the open workspace and holds its folder lock
(:mod:`tugboat.engine.lock`) for as long as it is open, so a ``tugboat sweep`` on the same folder, or
a second window, is refused with the PID of this one instead of both writing ``workspace.json``.
Writing a variant's files (an ONNX export) runs in a job; the folder is reserved and the index
(``workspace.json``) is updated on the GUI thread, so the ``Workspace`` object is only changed from
one thread at a time.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, Signal

from ..engine.errors import TugboatError
from ..engine.lock import FolderLock
from ..engine.recipe import Variant
from ..engine.stored import atomic_write_bytes
from ..engine.workspace import ARTIFACT, BASELINE, FILE, Workspace, WorkspaceError
from ..jobs import Job, JobQueue
from .store import VariantStore

__all__ = ["FILE", "Workspace", "WorkspaceError", "WorkspaceKeeper", "default_workspace_dir",
           "is_workspace"]


def default_workspace_dir() -> Path:
    """Where an unsaved session autosaves (a fresh folder per session)."""
    from ..settings import data_dir

    base = data_dir() / "workspaces" / time.strftime("untitled-%Y%m%d-%H%M%S")
    path, i = base, 2
    while path.exists():
        path, i = base.with_name(f"{base.name}-{i}"), i + 1
    return path


def is_workspace(path: str | Path) -> bool:
    return Workspace.exists(path)


def _measure_dict(measure: Any) -> dict[str, Any]:
    return measure.to_dict() if hasattr(measure, "to_dict") else dict(measure or {})


class WorkspaceKeeper(QObject):
    """Opens, creates and saves workspaces and mirrors the store into the open one.

    ``session`` is the window's :class:`~tugboat.ui.session.Session` (model/data refs, measure
    settings, ``load``); its ``baseline_ready`` must be forwarded to :meth:`on_baseline_ready`.
    """

    changed = Signal(object)  # the open Workspace, or None
    problem = Signal(str, str)  # message, level ("warning" | "info" | "error")
    saved = Signal(str)  # variant name whose files are on disk

    def __init__(self, store: VariantStore, session: Any, queue: JobQueue,
                 parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.store, self.session, self.queue = store, session, queue
        self.ws: Workspace | None = None
        self._lock: FolderLock | None = None  # the open workspace's folder lock
        self._restoring: Workspace | None = None  # reopened, waiting for the baseline to be measured
        self._writer: Job | None = None  # a sweep writing the open workspace from its worker thread
        self._deferred: list[tuple[Workspace, str]] = []  # deletions waiting for that sweep to end

    # --- opening and creating ---------------------------------------------------------------------
    def _set(self, ws: Workspace | None, lock: FolderLock | None = None) -> None:
        if lock is not self._lock:
            old, self._lock = self._lock, lock
            if old is not None:
                old.release()
        self.ws = ws
        self.changed.emit(ws)

    def _locked(self, path: str | Path, make) -> tuple[Workspace, FolderLock]:
        """``make(lock)`` under the folder's lock (kept when it is already ours)."""
        path = Path(path)
        if self._lock is not None and self._lock.held and self._lock.folder.resolve() == path.resolve():
            return make(self._lock), self._lock
        lock = FolderLock(path, "the Tugboat app").acquire()
        try:
            return make(lock), lock
        except BaseException:
            lock.release()
            raise

    def close(self) -> None:
        """The window closes: let go of the workspace's folder lock."""
        self._set(None)

    def _create(self, path: str | Path) -> tuple[Workspace, FolderLock]:
        s = self.session
        if Path(path).exists() and not Path(path).is_dir():
            raise WorkspaceError("exists and is not a folder", path=str(path))
        if Workspace.exists(path):  # before taking a lock (and its file) in someone's workspace
            raise WorkspaceError("already holds a workspace; open it instead", path=str(path))
        return self._locked(path, lambda _lock: Workspace.create(
            path, model=s.model_ref, data=s.data_ref, measure=_measure_dict(s.measure)))

    def _check_no_writer(self) -> None:
        """Another workspace is not opened while a sweep writes this one (its lock would go)."""
        if self._writer is not None and not self._writer.is_ended and self.ws is not None:
            raise WorkspaceError("is still being written by a running sweep; cancel it in the Jobs "
                                 "panel or wait for it to end", path=str(self.ws.path))

    def new(self, path: str | Path) -> Workspace:
        """An empty workspace in ``path``; the current model (if any) is measured again into it."""
        self._check_no_writer()
        ws, lock = self._create(path)
        self.store.clear()
        self.session.forget_baseline()
        self._restoring = None
        self._set(ws, lock)
        if self.session.model_ref:
            self.session.load()
        return ws

    def open(self, path: str | Path) -> Workspace:
        """Show a workspace's baseline and variants at once, then load its model again so new steps
        can run (the variants come back after the baseline; their recorded metrics are kept)."""
        self._check_no_writer()
        ws, lock = self._locked(path, lambda lock: Workspace.open(path, lock=lock))
        self._set(ws, lock)
        self.store.clear()
        self.session.forget_baseline()
        if ws.baseline is not None:
            self.store.set_baseline(ws.baseline)
        for v in ws.variants():
            self.store.add(v)
        m = self.session.measure
        for key, value in ws.measure.items():
            current = getattr(m, key, None)
            if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            # only well-typed values from the file (it is untrusted): "64" or [1] for a batch is ignored
            if value is not None and current is not None and type(value) is type(current) \
                    and not (isinstance(value, (int, float)) and value < 0):
                setattr(m, key, value)
        self._restoring = None
        if ws.model:
            self._restoring = ws
            # a state_dict's architecture comes back from the baseline's recipe (trust never does:
            # building the user's code asks again)
            base_recipe = (ws.baseline.recipe or {}) if ws.baseline is not None else {}
            self.session.load(ws.model, ws.data, arch=base_recipe.get("arch"),
                              arch_kwargs=base_recipe.get("arch_kwargs"))
        return ws

    def on_baseline_ready(self, base: Any) -> None:
        """The session measured its baseline: restore a reopened workspace, or record it."""
        ws = self.ws
        if ws is None:
            return
        s = self.session
        if self._restoring is ws:
            self._restoring = None
            recorded = ws.baseline.metrics if ws.baseline is not None else None
            current = self.store.baseline
            if recorded and current is not None:
                # every variant on record was compared with this baseline: keep its numbers
                current.metrics = copy.deepcopy(recorded)
                base.metrics = current.metrics
                self.store.update(current)
            for v in ws.variants():
                if v.name not in self.store:
                    self.store.add(v)
            if not recorded:
                self._write_baseline(ws)
            return
        holds_results = len(ws) > 0 or (ws.baseline is not None and bool(ws.baseline.metrics))
        if holds_results and (ws.model != s.model_ref or (ws.data or "") != (s.data_ref or "")):
            # results of another model stay where they are; new ones go to a new workspace
            self.problem.emit(f"{ws.path} holds results for {ws.model or 'another model'}; new results "
                              "are saved to a new workspace (File > Save workspace as... to choose it).",
                              "info")
            self._set(None)
            return
        ws.model, ws.data, ws.measure = s.model_ref, s.data_ref, _measure_dict(s.measure)
        self._write_baseline(ws)

    # --- writing ----------------------------------------------------------------------------------
    def _write_baseline(self, ws: Workspace) -> Job | None:
        base = self.store.baseline
        if base is None:
            ws.save()
            return None
        return self._write(ws, base)

    def _write(self, ws: Workspace, variant: Variant, source: Workspace | None = None) -> Job:
        """Write ``variant``'s folder in a job (ONNX export, or a copy of ``source``'s artifact),
        then add it to the index on the GUI thread."""
        name = variant.name
        ws.reserve_folder(name)
        src = source.artifact_path(name) if source is not None and variant.handle is None else None

        def work(progress):
            if source is not None and variant.handle is None:
                if src is not None and src.is_file():
                    folder = ws.folder(name)
                    atomic_write_bytes(folder / ARTIFACT, src.read_bytes())
                    variant.artifacts["onnx"] = f"{folder.name}/{ARTIFACT}"
                else:  # nothing to copy: do not point at the old folder
                    variant.artifacts.pop("onnx", None)
            ws.write_variant_files(variant)
            return dict(variant.artifacts)

        job = self.queue.submit(work, name=f"save {name}", kind="save")
        job.finished.connect(lambda _a, w=ws, v=variant: self._on_written(w, v))
        job.failed.connect(lambda msg, _d, n=name: self.problem.emit(f"Could not save {n}: {msg}", "warning"))
        return job

    def _on_written(self, ws: Workspace, variant: Variant) -> None:
        try:
            if variant.name == BASELINE:
                ws.set_baseline(variant, write=False)
            elif self.store.get(variant.name) is variant or ws is not self.ws:
                ws.add_variant(variant, write=False)
            else:  # deleted while its files were written: leave no folder behind for recovery
                ws.add_variant(variant, write=False)
                ws.remove_variant(variant.name)
                return
        except (OSError, TugboatError) as exc:
            self.problem.emit(f"Could not save the workspace: {exc}", "warning")
            return
        self.saved.emit(variant.name)

    def ensure(self) -> Workspace | None:
        """The open workspace, or a new one in the data folder (None if it cannot be made)."""
        if self.ws is None:
            try:
                ws, lock = self._create(default_workspace_dir())
            except (OSError, TugboatError) as exc:
                self.problem.emit(f"Autosave is off: {exc}", "warning")
                return None
            self._set(ws, lock)
            self._write_baseline(ws)
        return self.ws

    def autosave(self, variant: Variant) -> Job | None:
        """Write a finished variant into the open workspace, creating one in the data folder if none
        is open, so nothing measured is lost."""
        ws = self.ensure()
        return self._write(ws, variant) if ws is not None else None

    def written_by(self, job: Job) -> None:
        """``job`` (a sweep) writes the open workspace from its worker: until it ends, the GUI
        thread changes that workspace only through it (a deletion waits for the end)."""
        self._writer = job
        job.state_changed.connect(lambda _s, j=job: self._on_writer_state(j))

    def _on_writer_state(self, job: Job) -> None:
        if not job.is_ended or job is not self._writer:
            return
        self._writer, deferred, self._deferred = None, self._deferred, []
        for ws, name in deferred:
            if name in ws and name not in self.store:
                ws.remove_variant(name)

    def save(self) -> Path | None:
        if self.ws is None:
            return None
        if self._writer is not None and not self._writer.is_ended:
            return self.ws.path / FILE  # the sweep writing it saves the index after every variant
        return self.ws.save()

    def record_timings(self, names: list[str]) -> None:
        """Re-measured variants: rewrite their metrics.json (their model files are unchanged) and
        the index and report.json, atomically, with the machine the timings come from."""
        ws = self.ws
        if ws is None:
            return
        from ..engine.machine import machine_info

        try:
            for name in names:
                v, shown = ws.get(name), self.store.get(name)
                if v is None or shown is None:
                    continue
                if v is not shown:  # e.g. a reopened workspace's baseline: the window measured its own
                    v.metrics, v.warnings = copy.deepcopy(shown.metrics), list(shown.warnings)
                    v.info = copy.deepcopy(shown.info)
                handle, v.handle = v.handle, None  # metrics and recipe only
                try:
                    ws.write_variant_files(v)
                finally:
                    v.handle = handle
            ws.meta["machine"] = machine_info()
            ws.meta["remeasured"] = {"variants": [n for n in names if n != BASELINE]}
            ws.save()
        except (OSError, TugboatError) as exc:
            self.problem.emit(f"Could not save the new timings: {exc}", "warning")

    def save_as(self, path: str | Path) -> Workspace:
        """Copy what the window shows into a new workspace folder (files written in jobs)."""
        self._check_no_writer()
        old = self.ws
        ws, lock = self._create(path)
        ws.recipe = old.recipe if old is not None else None
        ws.meta = dict(old.meta) if old is not None else {}
        self._set(ws, lock)
        for v in self.store.variants():
            self._write(ws, v, source=old)
        return ws

    def delete(self, name: str) -> None:
        if name == BASELINE:
            return
        self.store.remove(name)
        if self._writer is not None and not self._writer.is_ended and self.ws is not None:
            self._deferred.append((self.ws, name))  # the sweep's worker writes this workspace now
        elif self.ws is not None and name in self.ws:
            self.ws.remove_variant(name)
