"""Saving and reopening the window's results as a workspace folder.

Uses :mod:`tugboat.engine.workspace` when that module is present; until then (and as the format
the GUI reads back) a workspace is a folder with ``workspace.json`` (model, data, measure settings,
the baseline and every variant's recipe, metrics and warnings) and one ONNX artifact per variant,
all written atomically, so a crash mid-save never corrupts what was there.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from ..engine.errors import TugboatError
from ..engine.export import atomic_write_bytes
from ..engine.recipe import Variant, _safe_name

FILE = "workspace.json"
VERSION = 1


class WorkspaceError(TugboatError):
    """A workspace folder cannot be read or written."""


def default_workspace_dir() -> Path:
    """Where an unsaved session autosaves (a fresh folder per session)."""
    from ..settings import data_dir

    return data_dir() / "workspaces" / time.strftime("untitled-%Y%m%d-%H%M%S")


def _variant_from(d: dict[str, Any]) -> Variant:
    return Variant(name=str(d.get("name", "variant")), recipe=dict(d.get("recipe") or {}),
                   metrics=dict(d.get("metrics") or {}), artifacts=dict(d.get("artifacts") or {}),
                   warnings=list(d.get("warnings") or []), status=str(d.get("status", "ok")),
                   error=d.get("error"), info=dict(d.get("info") or {}))


class WorkspaceFile:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.model = ""
        self.data = ""
        self.measure: dict[str, Any] = {}
        self.baseline: Variant | None = None
        self.entries: dict[str, Variant] = {}

    # --- files ----------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, model: str = "", data: str = "") -> WorkspaceFile:
        ws = cls(path)
        if ws.path.exists() and not ws.path.is_dir():
            raise WorkspaceError("exists and is not a folder", path=str(path))
        ws.path.mkdir(parents=True, exist_ok=True)
        ws.model, ws.data = model, data
        ws.save()
        return ws

    @classmethod
    def open(cls, path: str | os.PathLike) -> WorkspaceFile:
        ws = cls(path)
        file = ws.path / FILE
        if not file.exists():
            raise WorkspaceError(f"not a Tugboat workspace (no {FILE})", path=str(path))
        try:
            raw = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise WorkspaceError(f"{FILE} cannot be read ({exc})", path=str(path)) from None
        if not isinstance(raw, dict):
            raise WorkspaceError(f"{FILE} is not a JSON object", path=str(path))
        ws.model, ws.data = str(raw.get("model") or ""), str(raw.get("data") or "")
        ws.measure = dict(raw.get("measure") or {})
        if isinstance(raw.get("baseline"), dict):
            ws.baseline = _variant_from(raw["baseline"])
        for d in raw.get("variants") or []:
            if isinstance(d, dict):
                v = _variant_from(d)
                ws.entries[v.name] = v
        return ws

    def to_dict(self) -> dict[str, Any]:
        return {"version": VERSION, "model": self.model, "data": self.data, "measure": self.measure,
                "baseline": self.baseline.to_dict() if self.baseline else None,
                "variants": [v.to_dict() for v in self.entries.values()]}

    def save(self) -> Path:
        text = json.dumps(self.to_dict(), indent=2, default=str)
        return atomic_write_bytes(self.path / FILE, text.encode("utf-8"))

    # --- variants -------------------------------------------------------------------------------
    def variants(self) -> list[Variant]:
        return list(self.entries.values())

    def write_artifact(self, variant: Variant) -> dict[str, str]:
        """Write the variant's ONNX file into the folder (slow: call from a job)."""
        from ..engine.export import write_onnx

        if variant.handle is None or variant.status != "ok":
            return dict(variant.artifacts)
        rel = f"artifacts/{_safe_name(variant.name)}.onnx"
        write_onnx(variant.handle, self.path / rel)
        return {**variant.artifacts, "onnx": rel}

    def add_variant(self, variant: Variant, artifacts: dict[str, str] | None = None) -> None:
        if artifacts is not None:
            variant.artifacts = dict(artifacts)
        if variant.name == "baseline":
            self.baseline = variant
        else:
            self.entries[variant.name] = variant
        self.save()

    def remove_variant(self, name: str) -> None:
        v = self.entries.pop(name, None)
        if v is not None:
            for rel in v.artifacts.values():
                with contextlib.suppress(OSError):
                    (self.path / rel).unlink(missing_ok=True)
            self.save()
