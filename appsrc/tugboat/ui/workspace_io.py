"""The window's workspace: the engine's :class:`~tugboat.engine.running.workspace.Workspace`, the one
collection of record, shown through the :class:`VariantStore` attached to it.

There is one workspace format. A folder made by ``tugboat sweep recipe.toml --out DIR`` opens in the
window with all its variants, and a folder the window saved is read by ``tugboat report DIR`` and
continued by ``tugboat sweep --resume``::

    DIR/workspace.json, DIR/report.json, DIR/baseline/, DIR/<variant>/{model.onnx,recipe.toml,metrics.json}

Folders saved by early builds of the window (``artifacts/<name>.onnx`` beside ``workspace.json``)
are read by the same engine reader; the next save writes the current layout for new variants.

:class:`WorkspaceKeeper` owns the open workspace and holds its folder lock
(:mod:`tugboat.engine.lock`) for as long as it is open, so a ``tugboat sweep`` on the same folder, or
a second window, is refused with the PID of this one instead of both writing ``workspace.json``.
Results go workspace-first: a measured baseline or single run is added to the open workspace (its
index written on the GUI thread, then the store announces it to the views), and its folder (an ONNX
export) is written in a job, after which the index is saved again with the artifact. Before a
folder is open the store holds an unsaved workspace; the first folder the keeper makes takes over
its contents (:meth:`VariantStore.adopt`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, QTimer, Signal

from ..engine.errors import TugboatError
from ..engine.lock import FolderLock
from ..engine.running.variants import Variant
from ..engine.running.workspace import ARTIFACT, BASELINE, FILE, Workspace, WorkspaceError
from ..engine.stored import atomic_write_bytes
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
    """Opens, creates and saves workspaces, attaches the store to the open one, and places the
    session's results in it.

    ``session`` is the window's :class:`~tugboat.ui.session.Session` (model/data refs, measure
    settings, ``load``); the keeper places what it measures (``baseline_measured``,
    ``variant_measured``).
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
        # index saves asked for while a result lands, made once in the event loop's next turn (see
        # _save_soon): {id(ws): (ws, with report.json)} and the names whose files that save completes
        self._pending: dict[int, tuple[Workspace, bool]] = {}
        self._pending_saved: list[str] = []
        self._save_timer = QTimer(self)
        self._save_timer.setSingleShot(True)
        self._save_timer.setInterval(0)
        self._save_timer.timeout.connect(self.flush)
        session.baseline_measured.connect(self.place_baseline)
        session.variant_measured.connect(self.place_variant)

    # --- opening and creating ---------------------------------------------------------------------
    def _set(self, ws: Workspace | None, lock: FolderLock | None = None, *, show: str = "attach") -> None:
        """Make ``ws`` the open workspace. ``show``: "attach" (the store shows ``ws``), "adopt" (``ws``
        takes over what the store shows) or "keep" (the store is left as it is: the window closes)."""
        if ws is not self.ws:
            self.flush()  # the index of the workspace shown until now is written under its lock
        if lock is not self._lock:
            old, self._lock = self._lock, lock
            if old is not None:
                old.release()
        self.ws = ws
        if show == "adopt" and ws is not None:
            self.store.adopt(ws)
        elif show == "attach":
            self.store.attach(ws)
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
        self._set(None, show="keep")

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
        self._set(ws, lock)  # the store shows its baseline and variants at once
        self.session.forget_baseline()
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

    # --- placing results --------------------------------------------------------------------------
    def place_baseline(self, new: Variant) -> None:
        """The session measured its baseline: it goes into the open workspace (a reopened one keeps
        the baseline on record), or into a fresh unsaved one when none is open (or the open one holds
        another model's results)."""
        ws = self.ws
        if ws is not None and self._restoring is ws:
            self._restoring = None
            self._restore_baseline(ws, new)
            return
        s = self.session
        other = self._other_results(ws) if ws is not None else None
        if other:
            # those results stay where they are (and off the table); new ones go to a new workspace
            self.problem.emit(f"{ws.path} holds results for {other}; new results are saved to a new "
                              "workspace (File > Save workspace as... to choose it).", "info")
            self._set(None, show="keep")
            ws = None
        if ws is None:
            self.store.start(new)
            return
        ws.model, ws.data, ws.measure = s.model_ref, s.data_ref, _measure_dict(s.measure)
        self._add(ws, new)

    def _other_results(self, ws: Workspace) -> str:
        """What makes ``ws``'s results unlike the session's ("" when they are alike or there are
        none): another model or data, or other measure settings (latencies would not compare)."""
        s = self.session
        if not (len(ws) > 0 or (ws.baseline is not None and bool(ws.baseline.metrics))):
            return ""
        if ws.model != s.model_ref or (ws.data or "") != (s.data_ref or ""):
            return ws.model or "another model"
        now = _measure_dict(s.measure)
        changed = sorted(k for k, v in ws.measure.items() if k in now and now[k] != v)
        return f"other measure settings ({', '.join(changed)})" if changed else ""

    def _restore_baseline(self, ws: Workspace, new: Variant) -> None:
        """A reopened workspace's model is loaded again: every variant on record was compared with
        the baseline on record, so its numbers stay; the window keeps the model it just loaded."""
        recorded = ws.baseline
        if recorded is None or not recorded.metrics:
            self._add(ws, new)
            return
        self.store.keep_model(BASELINE, new.handle)
        if self.session.baseline is not None:
            self.session.baseline.metrics = recorded.metrics
        self.store.update(recorded)

    def place_variant(self, variant: Variant) -> None:
        """A single run finished: into the open workspace (made in the data folder if none is open,
        so nothing measured is lost), then the views; its files are written in a job."""
        ws = self.ensure()
        if ws is not None and self.store.workspace is ws:
            self._add(ws, variant)
        else:  # autosave is off: shown from the unsaved workspace
            self.store.add(variant)

    def _add(self, ws: Workspace, variant: Variant) -> Job | None:
        """Add ``variant`` to ``ws`` through the store (index written, views told), then write its
        folder in a job."""
        try:
            if variant.name == BASELINE:
                self.store.set_baseline(variant)
            else:
                self.store.add(variant)  # the index names it before any view shows it
        except (OSError, TugboatError) as exc:
            self.problem.emit(f"Could not save the workspace: {exc}", "warning")
        return self._write(ws, variant)

    def _save_soon(self, ws: Workspace, *, report: bool, saved: str | None = None) -> None:
        """Save ``ws``'s index (and report.json) in the event loop's next turn, once for every
        request made until then. Used once a variant's files are on disk (the index then names its
        artifact; the variant itself was in the index before any view showed it): the job's end
        (the jobs view, the next queued job starting) and the save are two shorter pieces of the GUI
        thread's work instead of one, so the window keeps answering while runs land one after
        another (issue 17), and a burst of files written saves the index once. ``saved``: the
        variant whose files that save completes (``saved`` is emitted after it)."""
        prev = self._pending.get(id(ws))
        self._pending[id(ws)] = (ws, report or (prev is not None and prev[1]))
        if saved is not None:
            self._pending_saved.append(saved)
        self._save_timer.start()

    def flush(self) -> None:
        """Make the saves :meth:`_save_soon` put off now (the timer's turn, another workspace shown,
        the window closing)."""
        self._save_timer.stop()
        pending, self._pending = list(self._pending.values()), {}
        names, self._pending_saved = self._pending_saved, []
        failed = False
        for ws, report in pending:
            try:
                ws.save(report=report)
            except (OSError, TugboatError) as exc:
                failed = True
                self.problem.emit(f"Could not save the workspace: {exc}", "warning")
        if not failed:
            for name in names:
                self.saved.emit(name)

    # --- writing ----------------------------------------------------------------------------------
    def _write(self, ws: Workspace, variant: Variant, source: Workspace | None = None) -> Job:
        """Write the folder of ``variant`` (an entry of ``ws``) in a job: an ONNX export, or a copy
        of ``source``'s artifact; then save the index with it on the GUI thread."""
        name = variant.name
        ws.reserve_folder(name)
        src = source.artifact_path(name) if source is not None and variant.handle is None else None

        def work(progress):
            if source is not None and variant.handle is None:
                if src is not None and src.is_file():
                    folder = ws.folder(name)
                    folder.mkdir(parents=True, exist_ok=True)
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
            if ws.get(variant.name) is not variant:
                # deleted while its files were written: leave no folder behind for recovery
                if variant.name != BASELINE:
                    ws.add_variant(variant, write=False)
                    ws.remove_variant(variant.name)
                return
        except (OSError, TugboatError) as exc:
            self.problem.emit(f"Could not save the workspace: {exc}", "warning")
            return
        self._save_soon(ws, report=True, saved=variant.name)  # the index now names its artifact

    def ensure(self) -> Workspace | None:
        """The open workspace, or a new one in the data folder that takes over what the window shows
        (None if it cannot be made)."""
        if self.ws is None:
            try:
                ws, lock = self._create(default_workspace_dir())
            except (OSError, TugboatError) as exc:
                self.problem.emit(f"Autosave is off: {exc}", "warning")
                return None
            self._set(ws, lock, show="adopt")
            try:
                ws.save()
            except (OSError, TugboatError) as exc:
                self.problem.emit(f"Could not save the workspace: {exc}", "warning")
            for v in [ws.baseline, *ws.variants()]:
                if v is not None:
                    self._write(ws, v)
        return self.ws

    def written_by(self, job: Job) -> None:
        """``job`` (a sweep) writes the open workspace from its worker: until it ends, the GUI
        thread changes that workspace only through it (a deletion waits for the end)."""
        self._writer = job
        job.state_changed.connect(lambda _s, j=job: self._on_writer_state(j))

    def _writing(self) -> bool:
        return self._writer is not None and not self._writer.is_ended and self.ws is not None

    def _on_writer_state(self, job: Job) -> None:
        if not job.is_ended or job is not self._writer:
            return
        self._writer = None
        for name in self.store.hidden():  # deletions that waited for the sweep
            self.store.remove(name)

    def save(self) -> Path | None:
        if self.ws is None:
            return None
        if self._writing():
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
                v = ws.get(name)
                if v is None or name not in self.store:
                    continue
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
        """Move what the window shows into a new workspace folder (files written, or copied from
        the old folder, in jobs)."""
        self._check_no_writer()
        old = self.ws
        ws, lock = self._create(path)
        ws.recipe = old.recipe if old is not None else None
        ws.meta = dict(old.meta) if old is not None else {}
        shown = self.store.variants()
        self._set(ws, lock, show="adopt")
        for v in shown:
            self._write(ws, v, source=old)
        return ws

    def delete(self, name: str) -> None:
        """Remove a variant from the workspace and the views; while a sweep writes the workspace
        from its worker, it is hidden now and removed when the sweep ends."""
        if name != BASELINE:
            self.store.remove(name, later=self._writing())
