"""``report.json``: the contract of DESIGN.md (``shared/report.schema.json``), and the Pareto front."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..stored import atomic_write_bytes, check_report, dumps, read_json

REPORT_VERSION = 1


def quality_of(metrics: dict[str, Any]) -> float | None:
    """The quality number used for trade-offs: accuracy with labels, else top-1 agreement, else
    cosine similarity to the original."""
    if metrics.get("accuracy") is not None:
        return float(metrics["accuracy"])
    fid = metrics.get("fidelity") or {}
    for key in ("top1_agreement", "cosine"):
        if fid.get(key) is not None:
            return float(fid[key])
    return None


def objectives(metrics: dict[str, Any]) -> tuple[float, float, float] | None:
    """(size, latency, -quality): all minimised."""
    q = quality_of(metrics)
    lat = (metrics.get("latency_ms") or {}).get("median")
    size = metrics.get("size_bytes")
    if q is None or lat is None or size is None:
        return None
    return float(size), float(lat), -q


def dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_front(named: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Names of the non-dominated entries over size, latency and quality (3-objective)."""
    points = [(name, objectives(m)) for name, m in named]
    points = [(n, p) for n, p in points if p is not None]
    if not points:
        return []
    import numpy as np

    # vectorised ``dominates`` (the chart recomputes the front on every change: 500 points in ms)
    obj = np.array([p for _, p in points], dtype=float)
    le = np.ones((len(obj), len(obj)), dtype=bool)  # le[j, i]: j is no worse than i everywhere
    lt = np.zeros_like(le)  # lt[j, i]: j is better than i somewhere
    for k in range(obj.shape[1]):
        col = obj[:, k]
        le &= col[:, None] <= col[None, :]
        lt |= col[:, None] < col[None, :]
    dominated = (le & lt).any(axis=0)
    return [n for (n, _), d in zip(points, dominated) if not d]


def build_report(recipe, baseline_metrics: dict[str, Any], variants: list, *,
                 baseline_artifacts: dict[str, str] | None = None, extra: dict | None = None) -> dict[str, Any]:
    from ..machine import machine_info

    ok = [v for v in variants if v.status == "ok" and v.metrics]
    named = [("baseline", baseline_metrics)] + [(v.name, v.metrics) for v in ok]
    report = {
        "version": REPORT_VERSION,
        "model": recipe.model,
        "data": recipe.data or "",
        "recipe": recipe.to_dict(),
        "baseline": {"metrics": baseline_metrics, "artifacts": baseline_artifacts or {}},
        "variants": [v.to_dict() for v in variants],
        "pareto": pareto_front(named),
        "machine": machine_info(),  # where the latencies were measured (CPU, int8 features, versions)
    }
    if extra:
        report.update(extra)
    return report


def write_report(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Strict JSON (no bare NaN), written atomically."""
    return atomic_write_bytes(path, dumps(report, where=str(path)))


def read_report(path: str | os.PathLike) -> dict[str, Any]:
    """A report.json read back as untrusted input: validated, or one :class:`StoredFileError`."""
    return check_report(read_json(path), str(path))


def pareto_labels(report: dict[str, Any]) -> dict[str, str]:
    """Short chart labels for the Pareto variants ("1", "2", ... in report order; the baseline is
    "baseline"), shared by the report chart and the HTML table so long names never overlap."""
    labels: dict[str, str] = {}
    number = 0
    for name in report.get("pareto") or []:
        if name == "baseline":
            labels[name] = name
        else:
            number += 1
            labels[name] = str(number)
    return labels
