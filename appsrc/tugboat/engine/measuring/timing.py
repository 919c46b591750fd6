"""Timing a callable and comparing outputs: the pieces :mod:`.measure` and every runtime adapter
(:mod:`.runtimes`) share. Below both; imports nothing of the engine but errors and progress."""

from __future__ import annotations

import os
import statistics
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import NumericalError

if TYPE_CHECKING:
    from ..io.models import ModelHandle
    from ..progress import Progress
    from .measure import MeasureConfig


def machine_load() -> float | None:
    """The 1-minute load average (runnable processes), or None where the OS has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None



def time_loop(fn, cfg: MeasureConfig, progress: Progress | None = None,
              counts: dict[str, int] | None = None) -> tuple[list[float], bool]:
    """Times of ``fn`` after warm-up (itself capped by time); a noisy series (p90 over 1.5x the
    median) is extended up to ``cfg.noisy_seconds``. Returns (times in ms, extended); ``counts``
    gets ``"warmup"``, the runs before the timed ones (reports say how much work a timing was)."""
    # a cancel is checked before every run (a token read costs nanoseconds; one run of a large
    # model at batch 64 can take a second)
    warm_until = time.perf_counter() + max(cfg.max_seconds / 2, 0.05)
    warm = 0
    for _ in range(cfg.warmup):
        if progress is not None:
            progress.check()
        fn()
        warm += 1
        if time.perf_counter() > warm_until:
            break
    if counts is not None:
        counts["warmup"] = warm
    times: list[float] = []
    extended = False
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
        elapsed = time.perf_counter() - start
        if (len(times) >= cfg.min_runs and elapsed >= cfg.min_seconds) or elapsed >= cfg.max_seconds:
            if elapsed >= cfg.noisy_seconds or spread(times) <= NOISY_SPREAD or len(times) < 3:
                break
            extended = True
        if progress is not None:
            progress.check()
    return times, extended



NOISY_SPREAD = 1.5  # p90 / median of one series above this: the machine was busy



def p90(times: list[float]) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]



def spread(times: list[float]) -> float:
    med = statistics.median(times)
    return p90(times) / med if med > 0 else 1.0



def summary(times: list[float], batch: int, threads: int, runtime: str) -> dict[str, Any]:
    med = statistics.median(times)
    return {"median": round(med, 4), "p90": round(p90(times), 4), "batch": batch,
            "threads": threads, "runtime": runtime, "device": "cpu", "runs": len(times),
            "spread": round(spread(times), 3)}



def batch_inputs(handle: ModelHandle, batch: int, samples: dict[str, np.ndarray] | None) -> list[np.ndarray]:
    """A batch of real samples when there are any (repeated to fill), random ones otherwise."""
    if samples:
        out = []
        for name in handle.input_names:
            arr = samples[name]
            reps = int(np.ceil(batch / len(arr)))
            out.append(np.ascontiguousarray(np.concatenate([arr] * reps)[:batch]))
        return out
    return handle.example_arrays(batch)



def model_inputs(handle: ModelHandle, batch: int, samples: dict[str, np.ndarray] | None) -> list[np.ndarray]:
    """:func:`batch_inputs` in the model's own layout (a recurrent state's batch axis, a scalar)."""
    return [spec.to_model(a) for spec, a in zip(handle.inputs, batch_inputs(handle, batch, samples))]



def check_finite(outputs: list[np.ndarray], where: str, context: str = "") -> None:
    for i, o in enumerate(outputs):
        if o.dtype.kind == "f" and not np.all(np.isfinite(o)):
            bad = int(np.count_nonzero(~np.isfinite(o)))
            nan = int(np.count_nonzero(np.isnan(o)))
            kinds = "NaN" if nan == bad else "Inf" if nan == 0 else f"{nan} NaN, {bad - nan} Inf"
            raise NumericalError(f"output {i} has {bad} NaN/Inf values out of {o.size} ({kinds})"
                                 + (f" {context}" if context else ""), path=where)



def fidelity(outputs: list[np.ndarray], reference: list[np.ndarray] | None,
             classification: bool = True) -> dict[str, float | None]:
    if reference is None:
        return {"top1_agreement": 1.0 if classification else None, "cosine": 1.0, "rel_error": 0.0}
    y = outputs[0].astype(np.float64).reshape(len(outputs[0]), -1)
    y0 = reference[0].astype(np.float64).reshape(len(reference[0]), -1)
    cy, cy0 = (y.T, y0.T) if y.shape[1] == 1 else (y, y0)  # one value a sample: the cosine over the batch
    norms = np.linalg.norm(cy, axis=1) * np.linalg.norm(cy0, axis=1)
    cos = np.sum(cy * cy0, axis=1) / np.maximum(norms, 1e-12)
    rel = float(np.linalg.norm(y - y0) / max(np.linalg.norm(y0), 1e-12))
    top1 = float(np.mean(y.argmax(1) == y0.argmax(1))) if classification else None
    return {"top1_agreement": top1, "cosine": float(np.clip(cos.mean(), -1, 1)), "rel_error": rel}
