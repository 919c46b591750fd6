"""Re-measure: time the baseline and chosen variants again, back to back, and update their metrics.

Used by ``tugboat remeasure WORKSPACE [VARIANT...]`` and the window's "Re-measure" action. Only
latency changes (sizes and accuracies are exact and stay); the baseline is timed alone first, then
every variant paired with it (:func:`measure.latency_paired`) on the same inputs, and each
variant's timing verdict is judged again.
"""

from __future__ import annotations

import os
import time
from dataclasses import fields
from typing import Any

from ..errors import TugboatError
from ..io.models import ModelHandle
from ..machine import machine_info
from ..progress import Progress, null_progress
from ..running.runner import judge_timing
from ..running.variants import Variant
from .measure import (
    MeasureConfig,
    TimingReference,
    chosen_latency,
    is_timing_warning,
    latency_all,
    own_timing_warnings,
)


def measure_config(saved: dict[str, Any] | None) -> MeasureConfig:
    """A :class:`MeasureConfig` from a workspace's ``measure`` record (unknown keys ignored)."""
    known = {f.name for f in fields(MeasureConfig)}
    kwargs = {k: v for k, v in (saved or {}).items() if k in known}
    for derived in ("block_seconds", "noisy_seconds"):  # re-derived from max_seconds unless set
        kwargs.pop(derived, None)
    try:
        return MeasureConfig(**kwargs)
    except TypeError:
        return MeasureConfig()


def remeasure(base_handle: ModelHandle, baseline: Variant, variants: list[tuple[Variant, ModelHandle]],
              cfg: MeasureConfig, *, samples: dict | None = None, timing: TimingReference | None = None,
              progress: Progress | None = None) -> dict[str, dict[str, Any]]:
    """Re-time ``baseline`` (alone) and each ``(variant, handle)`` paired with it; update their
    ``latency_ms`` / ``latency`` metrics and timing verdicts in place. Returns the new
    ``latency_ms`` per name (``"baseline"`` included)."""
    progress = progress or null_progress()
    timing = timing or TimingReference(base_handle, samples)
    n = len(variants) + 1
    progress.update(0.0, "timing the original model")
    base_lat = latency_all(base_handle, cfg, timing.samples, progress.sub(0.0, 1 / n))
    baseline.metrics["latency"] = base_lat
    baseline.metrics["latency_ms"] = chosen_latency(base_lat, cfg, base_handle)
    baseline.warnings = [w for w in baseline.warnings if not is_timing_warning(w)]
    baseline.warnings += own_timing_warnings(baseline.metrics)
    out = {"baseline": baseline.metrics["latency_ms"]}
    for i, (variant, handle) in enumerate(variants, start=1):
        progress.update(i / n, f"timing {variant.name}")
        lat = latency_all(handle, cfg, timing.samples, progress.sub(i / n, (i + 1) / n), reference=timing)
        variant.metrics["latency"] = lat
        variant.metrics["latency_ms"] = chosen_latency(lat, cfg, handle)
        judge_timing(variant, baseline.metrics)
        out[variant.name] = variant.metrics["latency_ms"]
    progress.update(1.0, "re-measured")
    return out


def remeasure_workspace(path: str | os.PathLike, names: list[str] | None = None, *,
                        progress: Progress | None = None) -> dict[str, dict[str, Any]]:
    """``tugboat remeasure``: re-time a workspace's baseline and variants (all of them, or
    ``names``) and save the workspace (atomic writes: workspace.json, each metrics.json, report.json)."""
    from ..lock import FolderLock
    from ..running.workspace import Workspace

    progress = progress or null_progress()
    if not Workspace.exists(path):  # a plain error, before any lock file is made in a wrong folder
        Workspace.open(path)
    # the folder's lock for the whole command: a sweep or the app writing it meanwhile is refused
    with FolderLock(path, "tugboat remeasure") as lock:
        ws = Workspace.open(path, lock=lock)
        return _remeasure_open(ws, path, names, progress)


def _remeasure_open(ws, path, names: list[str] | None, progress: Progress) -> dict[str, dict[str, Any]]:
    from ..io.data import load_data
    from ..io.loading import load_model

    if ws.baseline is None or not ws.baseline.metrics:
        raise TugboatError("has no measured baseline to compare with", path=str(path))
    unknown = [n for n in names or [] if n not in ws]
    if unknown:
        raise TugboatError(f"has no variant named {unknown[0]!r} (variants: "
                           f"{', '.join(ws.names()) or 'none'})", path=str(path))
    chosen = [ws.get(n) for n in (names or ws.names())]
    chosen = [v for v in chosen if v is not None and v.status == "ok" and v.metrics]
    base_file = ws.artifact_path("baseline")
    if base_file is None or not base_file.is_file():
        raise TugboatError("the baseline has no model file (baseline/model.onnx) to time", path=str(path))
    progress.update(0.0, "loading the models")
    base_handle = load_model(base_file)
    pairs = [(v, ws.load_handle(v.name)) for v in chosen]
    samples = None
    if ws.data:
        cfg0 = measure_config(ws.measure)
        try:  # the real samples the variants were timed on; random inputs if the data moved
            samples = load_data(ws.data, base_handle).split("test", limit=cfg0.batch)[0]
        except TugboatError:
            samples = None
    cfg = measure_config(ws.measure)
    t0 = time.perf_counter()
    result = remeasure(base_handle, ws.baseline, pairs, cfg, samples=samples, progress=progress.sub(0.05, 0.95))
    ws.meta["machine"] = machine_info()
    ws.meta["remeasured"] = {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "variants": [v.name for v, _ in pairs],
                             "seconds": round(time.perf_counter() - t0, 3)}
    for v in [ws.baseline, *[p[0] for p in pairs]]:
        handle, v.handle = v.handle, None  # metrics and recipe only: the model file is unchanged
        try:
            ws.write_variant_files(v)
        finally:
            v.handle = handle
    ws.save()
    progress.update(1.0, "saved")
    return result
