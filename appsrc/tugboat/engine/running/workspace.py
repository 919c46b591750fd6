"""The workspace: a folder that holds a session's baseline and variants and survives crashes.

Layout (``FORMAT_VERSION`` 1)::

    DIR/workspace.json          model, data, measure settings, the recipe, the baseline and every
                                variant (name, recipe, metrics, warnings, status, artifacts, folder)
    DIR/report.json             the DESIGN.md contract (rewritten with every change)
    DIR/baseline/               model.onnx, recipe.toml, metrics.json
    DIR/<variant>/              model.onnx, recipe.toml, metrics.json (one folder per variant)

Every file is written atomically (temp file, fsync, rename: :func:`stored.atomic_write_bytes`), in
the order artifact -> recipe.toml -> metrics.json -> workspace.json, so a process killed at any
moment leaves either the old or the new version of each file. ``metrics.json`` marks a finished
variant: on reopening, a variant folder with a ``metrics.json`` that ``workspace.json`` does not
list yet (killed between the two writes) is recovered, and stale temp files are removed: only
Tugboat's own (``.<name>.tugboat-<random>.tmp``, :data:`stored.TMP_GLOB`), only in the workspace
folder and its variant folders, and only while no other process holds the folder's lock
(:mod:`lock`), so neither a user's file nor a running sweep's half-written file is ever removed.

Everything read back is untrusted (:mod:`stored`): ``workspace.json`` and every ``metrics.json`` are
validated field by field, and every stored path (a variant's ``folder``, an artifact name) must
resolve inside the workspace folder, or the workspace is refused with one line naming the file.

API (used by ``tugboat sweep`` and by the GUI)::

    ws = Workspace.create(path, model="demo:digits-cnn", data="demo:digits")  # or Workspace.open(path)
    ws.set_baseline(variant)            # writes baseline/ (artifact if variant.handle is set)
    name = ws.add_variant(variant)      # unique name; writes its folder, then workspace.json
    ws.variants(); ws.get(name); name in ws; len(ws); ws.baseline
    ws.remove_variant(name)             # deletes its folder
    ws.reserve_folder(name)             # fix a variant's folder before writing it on a worker
    ws.load_handle(name)                # the variant's model, reloaded lazily from its ONNX artifact
    ws.artifact_path(name)              # Path of its .onnx (or None)
    ws.pareto(); ws.report()            # report dict per DESIGN.md, pareto filled in
    ws.export_report(path=None)         # writes report.json (default DIR/report.json)
    ws.save()                           # rewrites workspace.json + report.json (atomic)

``add_variant`` exports ONNX when the variant has a handle (tens of milliseconds for small models):
the GUI calls it from a job, or calls ``write_variant_files`` in the job and ``add_variant(...,
write=False)`` on the GUI thread. A ``Workspace`` is meant for one thread; where the window's sweep
adds variants from its worker while the GUI thread adds a single run, every walk over the variants
works on a snapshot (``list(...)`` of a dict is one step under the GIL), so neither side trips on
the other's insertion.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ..errors import TugboatError, WorkspaceError
from ..lock import FolderLock, FolderLockedError
from ..stored import (
    TMP_GLOB,
    WORKSPACE_FILE,
    Checker,
    OutputError,
    StoredFileError,
    atomic_write_bytes,
    check_variant,
    check_workspace,
    dumps,
    inside,
    read_json,
    without_trust,
)
from .recipe import recipe_to_toml
from .report_json import REPORT_VERSION, pareto_front
from .variants import Variant, jsonable, safe_name

FILE = WORKSPACE_FILE
FORMAT = "tugboat-workspace"
FORMAT_VERSION = 1
BASELINE = "baseline"
ARTIFACT = "model.onnx"
METRICS = "metrics.json"
RECIPE = "recipe.toml"


def variant_from_dict(d: dict[str, Any]) -> Variant:
    return Variant(name=str(d.get("name", "variant")), recipe=without_trust(dict(d.get("recipe") or {})),
                   metrics=dict(d.get("metrics") or {}), artifacts=dict(d.get("artifacts") or {}),
                   warnings=[str(w) for w in d.get("warnings") or []], status=str(d.get("status", "ok")),
                   error=d.get("error"), info=dict(d.get("info") or {}))


def _dumps(obj: Any) -> bytes:
    return dumps(obj)  # dumps makes plain JSON types itself (numpy scalars, tuples, non-finite floats)


class Workspace:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.model = ""
        self.data = ""
        self.measure: dict[str, Any] = {}
        self.recipe: dict[str, Any] | None = None
        self.meta: dict[str, Any] = {}  # free-form extras (sweep kind, target result, GUI state)
        self.baseline: Variant | None = None
        self._variants: dict[str, Variant] = {}
        self._folders: dict[str, str] = {}
        self.created = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.persist = True  # False: held in memory only (:meth:`unsaved`), nothing is written

    # --- opening --------------------------------------------------------------------------------
    @staticmethod
    def exists(path: str | os.PathLike) -> bool:
        return (Path(path) / FILE).is_file()

    @classmethod
    def unsaved(cls) -> Workspace:
        """A workspace held in memory only: the window's results before it has a folder (the GUI
        moves them into the first folder it makes). It writes nothing and deletes nothing."""
        ws = cls("")
        ws.persist = False
        return ws

    @classmethod
    def create(cls, path: str | os.PathLike, *, model: str = "", data: str = "",
               measure: dict[str, Any] | None = None, recipe: dict[str, Any] | None = None) -> Workspace:
        """A new workspace in ``path`` (created if needed; refused if it already holds one)."""
        ws = cls(path)
        if ws.path.exists() and not ws.path.is_dir():
            raise WorkspaceError("exists and is not a folder", path=str(path))
        if cls.exists(path):
            raise WorkspaceError("already holds a workspace; open it instead", path=str(path))
        ws.path.mkdir(parents=True, exist_ok=True)
        ws.model, ws.data = model, data
        ws.measure, ws.recipe = dict(measure or {}), recipe
        ws.save()
        return ws

    @classmethod
    def open(cls, path: str | os.PathLike, *, lock: FolderLock | None = None) -> Workspace:
        """Read a workspace back: every variant with its metrics; handles load lazily.

        Recovery (finished variants workspace.json missed, stale temp files) runs only when no other
        process is writing the folder: under ``lock`` when the caller holds the folder's lock, else
        under a lock taken for the moment. A workspace that needs recovery but cannot be written
        (read-only) is refused with a clear message."""
        try:
            return cls._open(path, lock)
        except StoredFileError as exc:  # one error type for everything wrong with a workspace
            raise WorkspaceError(exc.message, path=exc.path) from None

    @classmethod
    def _open(cls, path: str | os.PathLike, lock: FolderLock | None) -> Workspace:
        ws = cls(path)
        file = ws.path / FILE
        if not file.is_file():
            raise WorkspaceError(f"not a Tugboat workspace (no {FILE})", path=str(path))
        raw = check_workspace(read_json(file), str(file))
        version = raw.get("version", 1)
        if not isinstance(version, int) or isinstance(version, bool):
            raise WorkspaceError(f"{FILE}: 'version' must be a whole number, got {version!r}"[:200], path=str(file))
        if version > FORMAT_VERSION:
            raise WorkspaceError(f"was written by a newer Tugboat (format {version!r}, this one reads "
                                 f"up to {FORMAT_VERSION})", path=str(path))
        ws.model, ws.data = raw.get("model") or "", raw.get("data") or ""
        ws.measure = dict(raw.get("measure") or {})
        ws.recipe = without_trust(raw["recipe"]) if isinstance(raw.get("recipe"), dict) else None
        ws.meta = dict(raw.get("meta") or {})
        ws.created = raw.get("created") or ws.created
        if isinstance(raw.get("baseline"), dict):
            ws.baseline = variant_from_dict(raw["baseline"])
            ws.baseline.name = BASELINE
            ws._folders[BASELINE] = ws._checked_folder(raw["baseline"].get("folder") or BASELINE, file)
            ws._check_artifacts(ws.baseline, file)
        for d in raw.get("variants") or []:
            v = variant_from_dict(d)
            ws._variants[v.name] = v
            ws._folders[v.name] = ws._checked_folder(d.get("folder") or safe_name(v.name), file)
            ws._check_artifacts(v, file)
        ws._recover_if_free(lock)
        return ws

    def _checked_folder(self, folder: str, file: Path) -> str:
        inside(self.path, folder, what="folder", file=file, single=True)
        if folder in (FILE, "report.json") or folder.startswith("."):
            raise StoredFileError(f"folder {folder!r} is not a variant folder name", path=str(file))
        return folder

    def _check_artifacts(self, v: Variant, file: Path) -> None:
        for kind, rel in v.artifacts.items():
            inside(self.path, rel, what=f"artifact {kind} of {v.name!r}", file=file)

    def _recover_if_free(self, lock: FolderLock | None) -> None:
        own = None
        if lock is None or not lock.held:
            own = FolderLock(self.path, "tugboat (reopening a workspace)")
            try:
                own.acquire()
            except FolderLockedError:
                return  # another process is writing it: read as it is, touch nothing
            except TugboatError:
                own = None  # a read-only folder: fine unless something needs recovering
        try:
            if self._recover():
                try:
                    self.save()
                except OutputError as exc:
                    raise WorkspaceError("has finished variants that workspace.json does not list yet, "
                                         f"and cannot be updated: {exc}", path=str(self.path)) from None
        finally:
            if own is not None:
                own.release()

    def _recover(self) -> bool:
        """Pick up finished variant folders that workspace.json missed; remove stale temp files
        (only Tugboat's own, only in the workspace folder and its variant folders)."""
        changed = False
        known = set(self._folders.values())
        try:
            subs = sorted(p for p in self.path.iterdir() if p.is_dir() and not p.is_symlink())
        except OSError:
            return False
        for folder in [self.path, *subs]:
            for tmp in folder.glob(TMP_GLOB):
                with contextlib.suppress(OSError):
                    if tmp.is_file() and not tmp.is_symlink():
                        tmp.unlink()
        for sub in subs:
            record = sub / METRICS
            if sub.name.startswith(".") or sub.name in known or not record.is_file() or record.is_symlink():
                continue
            try:
                d = check_variant(Checker(str(record), METRICS), read_json(record, max_bytes=64 << 20),
                                  "variant")
                v = variant_from_dict(d)
                self._check_artifacts(v, record)
            except TugboatError:
                continue  # a damaged record is not a finished variant
            if v.name == BASELINE:
                if self.baseline is None:
                    self.baseline, self._folders[BASELINE], changed = v, sub.name, True
            elif v.name not in self._variants:
                self._variants[v.name], self._folders[v.name], changed = v, sub.name, True
        return changed

    # --- reading --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._variants)

    def __contains__(self, name: object) -> bool:
        return name in self._variants

    def names(self) -> list[str]:
        return list(self._variants)

    def variants(self) -> list[Variant]:
        return list(self._variants.values())

    def get(self, name: str) -> Variant | None:
        return self.baseline if name == BASELINE else self._variants.get(name)

    def folder(self, name: str) -> Path:
        """The variant's folder, always inside the workspace (:func:`stored.inside`)."""
        return inside(self.path, self._folders.get(name, safe_name(name)), what="folder",
                      file=self.path / FILE, single=True)

    def artifact_path(self, name: str) -> Path | None:
        v = self.get(name)
        rel = (v.artifacts or {}).get("onnx") if v else None
        return inside(self.path, rel, what=f"artifact of {name!r}", file=self.path / FILE) if rel else None

    def load_handle(self, name: str):
        """The variant's model handle, loaded from its ONNX artifact the first time it is asked for."""
        from ..io.loading import load_model

        v = self.get(name)
        if v is None:
            raise WorkspaceError(f"has no variant named {name!r}", path=str(self.path))
        if v.handle is None:
            path = self.artifact_path(name)
            if path is None or not path.is_file():
                raise WorkspaceError(f"variant {name!r} has no model file", path=str(self.path))
            v.handle = load_model(path)
        return v.handle

    def unique_name(self, name: str) -> str:
        if name not in self._variants and name != BASELINE:
            return name
        i = 2
        while f"{name} ({i})" in self._variants:
            i += 1
        return f"{name} ({i})"

    # --- writing --------------------------------------------------------------------------------
    def _new_folder(self, name: str) -> str:
        base = BASELINE if name == BASELINE else safe_name(name)
        if base == BASELINE and name != BASELINE:
            base = f"{base}_"
        used = {f for n, f in list(self._folders.items()) if n != name}
        folder, i = base, 2
        while folder in used or folder == FILE:
            folder, i = f"{base}_{i}", i + 1
        return folder

    def reserve_folder(self, name: str) -> str:
        """Choose (and remember) the folder of variant ``name`` now. The GUI calls this on its own
        thread before handing ``write_variant_files`` to a worker, so that no two threads ever
        change the folder table at once."""
        folder = self._folders.get(name) or self._new_folder(name)
        self._folders[name] = folder
        return folder

    def write_variant_files(self, variant: Variant) -> Path:
        """Write the variant's folder (artifact, recipe.toml, then metrics.json) atomically.

        Safe to call from a worker thread for a variant not yet added (after ``reserve_folder``
        when other threads may use the workspace at the same time)."""
        if not self.persist:
            raise WorkspaceError("is not saved in a folder yet", path="(unsaved workspace)")
        folder_name = self.reserve_folder(variant.name)
        folder = self.folder(variant.name)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot be created ({exc.strerror or exc})", path=str(folder)) from None
        if variant.handle is not None and variant.status == "ok":
            from ..io.export import write_onnx

            write_onnx(variant.handle, folder / ARTIFACT)
            variant.artifacts["onnx"] = f"{folder_name}/{ARTIFACT}"
        if variant.recipe:
            try:
                text = recipe_to_toml(variant.recipe)
            except Exception:  # a recipe value TOML cannot hold: keep JSON in metrics.json only
                text = ""
            if text:
                atomic_write_bytes(folder / RECIPE, text.encode("utf-8"))
        record = {**variant.to_dict(), "folder": folder_name, "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_bytes(folder / METRICS, _dumps(record))
        return folder

    def set_baseline(self, variant: Variant, *, write: bool = True) -> None:
        variant.name = BASELINE
        self._folders.setdefault(BASELINE, BASELINE)
        if write:
            self.write_variant_files(variant)
        self.baseline = variant
        self.save()

    def add_variant(self, variant: Variant, *, write: bool = True) -> str:
        """Add a finished (or failed) variant under a unique name; write its folder and the index."""
        if variant.name == BASELINE:
            self.set_baseline(variant, write=write)
            return BASELINE
        variant.name = self.unique_name(variant.name)
        if write:
            self.write_variant_files(variant)
        self._variants[variant.name] = variant
        # files written later (the window's job) save the index again with them: report.json then
        self.save(report=write)
        return variant.name

    def remove_variant(self, name: str) -> None:
        v = self._variants.pop(name, None)
        if v is None:
            return
        folder = self._folders.pop(name, None)
        if not self.persist:
            return
        self.save()  # the index first: a crash now leaves an orphan folder, not a dangling entry
        if folder:
            target = (self.path / folder).resolve()
            if target.parent == self.path.resolve() and target.is_dir():
                # rename first so a half-deleted folder is never picked up by _recover
                trash = target.with_name(f".deleted-{target.name}-{os.getpid()}")
                with contextlib.suppress(OSError):
                    target.rename(trash)
                    shutil.rmtree(trash, ignore_errors=True)

    def to_dict(self) -> dict[str, Any]:
        def entry(v: Variant) -> dict[str, Any]:
            return {**v.to_dict(), "folder": self._folders.get(v.name, safe_name(v.name))}

        return {"format": FORMAT, "version": FORMAT_VERSION, "created": self.created,
                "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), "model": self.model, "data": self.data,
                "measure": self.measure, "recipe": self.recipe, "meta": self.meta,
                "baseline": entry(self.baseline) if self.baseline else None,
                "variants": [entry(v) for v in self.variants()]}

    def save(self, *, report: bool = True) -> Path:
        """Write ``workspace.json`` and (with ``report``, once the original is measured) ``report.json``."""
        if not self.persist:
            return self.path / FILE
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot be created ({exc.strerror or exc})", path=str(self.path)) from None
        path = atomic_write_bytes(self.path / FILE, _dumps(self.to_dict()))
        if report and self.baseline is not None and self.baseline.metrics:
            self.export_report()
        return path

    # --- reports --------------------------------------------------------------------------------
    def pareto(self) -> list[str]:
        named = [(BASELINE, self.baseline.metrics)] if self.baseline and self.baseline.metrics else []
        named += [(v.name, v.metrics) for v in self.variants() if v.status == "ok" and v.metrics]
        return pareto_front(named)

    def report(self) -> dict[str, Any]:
        """``report.json`` per DESIGN.md. Failed variants (no metrics) go to ``failed``."""
        every = self.variants()
        ok = [v for v in every if v.status == "ok" and v.metrics]
        failed = [v for v in every if not (v.status == "ok" and v.metrics)]
        base = self.baseline
        report = {
            "version": REPORT_VERSION, "model": self.model, "data": self.data,
            "recipe": self.recipe or {},
            "baseline": {"metrics": base.metrics if base else {}, "artifacts": base.artifacts if base else {},
                         "warnings": base.warnings if base else []},
            "variants": [v.to_dict() for v in ok],
            "failed": [v.to_dict() for v in failed],
            "pareto": self.pareto(),
            "workspace": {"format": FORMAT, "version": FORMAT_VERSION},
        }
        for key in ("sweep", "target", "remeasured"):
            if key in self.meta:
                report[key] = self.meta[key]
        if "machine" not in self.meta:
            from ..machine import machine_info

            self.meta["machine"] = machine_info()  # first written where it was measured
        report["machine"] = self.meta["machine"]
        return jsonable(report)

    def export_report(self, path: str | os.PathLike | None = None) -> Path:
        """Write ``report.json`` (artifact paths relative to the workspace folder)."""
        return atomic_write_bytes(Path(path) if path else self.path / "report.json", _dumps(self.report()))
