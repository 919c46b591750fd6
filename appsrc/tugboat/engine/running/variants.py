"""The results model: a :class:`Variant` (a recipe's outcome: metrics, artifacts, warnings) and the
:class:`Baseline` it is measured against, and how variants are named (:func:`step_label`,
:func:`variant_name`, :func:`settings_difference`). Read by the workspace, reports, the runner and the
window; runs nothing and imports nothing of the engine at run time but the technique registry
(each technique labels its own steps)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..techniques import steps as step_registry

if TYPE_CHECKING:
    from ..io.data import Dataset
    from ..io.models import ModelHandle
    from ..measuring.measure import MeasureConfig, TimingReference


def step_label(step: dict[str, Any]) -> str:
    """A short, readable name for a step: ``prune-structured-r0.5`` (its technique's label hook;
    a technique this build lacks, named in a stored report, gets technique and method)."""
    tech = step_registry.find(step.get("technique"))
    if tech is None:
        return "-".join(str(p) for p in (step.get("technique"), step.get("method")) if p)
    return tech.step_label(step)


def variant_name(steps: list[dict[str, Any]]) -> str:
    return "+".join(step_label(s) for s in steps) if steps else "baseline"


def settings_difference(steps: list[dict[str, Any]], other: list[dict[str, Any]]) -> str:
    """What ``steps`` set differently from ``other`` (same chain), as ``key=value`` pairs, e.g.
    ``finetune_epochs=0,lr=0.01``: told apart in a name where :func:`step_label` shows neither."""
    parts = []
    for i, step in enumerate(steps):
        before = other[i] if i < len(other) else {}
        for key, value in step.items():
            if key in ("technique", "method") or before.get(key) == value:
                continue
            if isinstance(value, float):
                text = f"{value:g}"
            elif isinstance(value, (list, tuple)):
                text = ",".join(map(str, value)) or "none"
            else:
                text = str(value).lower() if isinstance(value, bool) else str(value)
            parts.append(f"{key}={text}" if len(steps) == 1 else f"{i + 1}.{key}={text}")
    return ",".join(parts)


@dataclass
class Variant:
    name: str
    recipe: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    status: str = "ok"  # ok | failed | cancelled
    error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)  # per-technique extras (kept layers, curves)
    handle: ModelHandle | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "recipe": self.recipe, "metrics": self.metrics,
             "artifacts": self.artifacts, "warnings": self.warnings, "status": self.status,
             "error": self.error}
        if self.info:
            d["info"] = jsonable(self.info)
        return d


def jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


@dataclass
class Baseline:
    """The loaded original model, its data, metrics and test outputs (the reference)."""

    handle: ModelHandle
    data: Dataset | None
    metrics: dict[str, Any]
    outputs: list[np.ndarray] | None
    cfg: MeasureConfig
    # the baseline kept ready for paired timing (sessions alive across variants); see measure.py
    timing: TimingReference | None = None


def safe_name(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_.+" else "_" for c in name)
    return keep[:120] or "variant"
