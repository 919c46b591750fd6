"""Live preview: a ghost point that follows the sliders, then the real measurement.

While a technique slider moves, every change is estimated at once (:mod:`tugboat.engine.estimate`,
arithmetic on the baseline's layer shapes, no job) and the chart's hollow "ghost" point jumps there.
When the setting is final (the panel's ``step_committed``: the slider released, a typed value
entered, or ``rest_ms`` after the last keyboard step; never while the mouse button is held) it is
run for real through the window's normal run path (``Session.run_step``, one job in the queue);
a newer setting cancels the older job first, so dragging across a big model never piles up stale
runs (Orange's "one task per owner, a new one cancels the old"). The measured point replaces the
ghost, and the estimate's error against the measurement is logged (``logging`` and
:attr:`LivePreview.errors`) so the estimator can be checked and improved.

Only quick techniques run by themselves (``auto_run``: pruning and quantization); distillation
trains for minutes, so its ghost moves but it runs when the user presses Run. The chart's "Live
preview" toggle turns all of it off.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from PySide6.QtCore import QObject, Signal

from ..engine.estimate import build_profile, estimate, estimate_errors, estimate_quality
from ..jobs import Job

log = logging.getLogger(__name__)

REST_MS = 600


class LivePreview(QObject):
    ghost_moved = Signal(object)  # estimated metrics, or None when hidden
    job_started = Signal(object)  # the Job measuring a rested setting
    measured = Signal(object, dict)  # Variant, relative errors of the estimate

    def __init__(self, window, rest_ms: int = REST_MS) -> None:
        super().__init__(window)
        self.window = window
        self.session = window.session
        self.store = window.store
        self.chart = window.chart
        self.auto_run = {"prune", "quantize"}
        self.profile = None
        self.job: Job | None = None  # the live job measuring the latest rested setting
        self.pending: dict[str, Any] | None = None  # the estimated step waiting for its commit
        self.ghost: dict[str, Any] | None = None
        self.errors: list[dict[str, Any]] = []  # one entry per measured estimate
        self._estimates: dict[int, tuple[list[dict[str, Any]], dict[str, Any]]] = {}
        self.panels = list(getattr(window, "panels", {}).values())
        for panel in self.panels:
            panel.step_changed.connect(self._on_step_changed)
            panel.step_committed.connect(self._on_step_committed)
        self.set_rest_ms(rest_ms)
        self.session.baseline_ready.connect(self._on_baseline_ready)
        self._starting = False
        window.queue.job_added.connect(self._on_job_added)
        self.session.chain_changed.connect(lambda _c: self.clear_ghost())
        self.chart.live_toggle.toggled.connect(self._on_toggled)

    # --- state ------------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self.chart.live_toggle.isChecked()

    def set_enabled(self, on: bool) -> None:
        self.chart.live_toggle.setChecked(on)

    def set_rest_ms(self, ms: int) -> None:
        """How long keyboard steps rest before they run (a release or an entered value runs at once)."""
        for panel in self.panels:
            panel.set_commit_delay(ms)

    def _on_toggled(self, on: bool) -> None:
        if not on:
            self.pending = None
            self._cancel_live_job()
            self.clear_ghost()

    def _on_baseline_ready(self, base) -> None:
        self.pending = None
        self.job = None
        info = self.session.info or {}
        try:
            self.profile = build_profile(base.handle, base.metrics, info.get("layers"))
        except Exception:  # an unusual model: no estimates, the real runs still work
            log.exception("no estimates for this model")
            self.profile = None
        self.clear_ghost()

    # --- estimates --------------------------------------------------------------------------------
    def estimate_for(self, step: dict[str, Any]) -> dict[str, Any] | None:
        """Estimated metrics of the session's chain + ``step`` (None if it cannot be estimated)."""
        if self.profile is None:
            return None
        steps = [*self.session.chain, dict(step)]
        est = estimate(self.profile, steps)
        if est is None:
            return None
        measured = [(list((v.recipe or {}).get("steps") or []), v.metrics)
                    for v in self.store.variants() if v.status == "ok" and v.metrics]
        return estimate_quality(steps, measured, est)

    def _on_step_changed(self, step: dict[str, Any]) -> None:
        if not self.enabled or self.session.baseline is None:
            return
        est = self.estimate_for(step)
        self.ghost = est
        self.chart.set_ghost(est)
        self.ghost_moved.emit(est)
        self.pending = dict(step)  # the run waits for the panel's commit (release, Enter, rest)

    def clear_ghost(self) -> None:
        self.ghost = None
        self.chart.set_ghost(None)
        self.ghost_moved.emit(None)

    # --- real runs --------------------------------------------------------------------------------
    def _on_step_committed(self, step: dict[str, Any]) -> None:
        if self.pending is None:  # nothing estimated since (e.g. Run was pressed meanwhile)
            return
        self.pending = None
        if not self.enabled or self.session.baseline is None:
            return
        if step.get("technique") not in self.auto_run:
            return  # the ghost stays; the user runs it with Run
        steps = [*self.session.chain, step]
        same = next((v for v in self.store.variants()
                     if v.status == "ok" and list((v.recipe or {}).get("steps") or []) == steps), None)
        if same is not None:  # measured already: show it instead of running again
            self._cancel_live_job()
            self.clear_ghost()
            self.store.select(same.name)
            return
        self._cancel_live_job()
        est = self.ghost
        self._starting = True
        try:
            job = self.session.run_step(dict(step))
        finally:
            self._starting = False
        if job is None:
            return
        self.job = job
        self._estimates[job.id] = (steps, est or {})
        started = time.monotonic()
        job.finished.connect(lambda variant, j=job, t=started: self._on_job_finished(j, variant, t))
        job.cancelled.connect(lambda j=job: self._on_job_ended(j))
        job.failed.connect(lambda _m, _d, j=job: self._on_job_ended(j))
        self.job_started.emit(job)

    def _on_job_ended(self, job: Job) -> None:
        """A run ended without a measured point (cancelled, failed): its ghost goes too, unless a
        newer setting is already estimated or running."""
        self._estimates.pop(job.id, None)
        if self.job is job:
            self.job = None
        self._clear_stale_ghost()

    def _clear_stale_ghost(self) -> None:
        if self.ghost is not None and self.pending is None and (self.job is None or self.job.is_ended):
            self.clear_ghost()

    def _on_job_added(self, job: Job) -> None:
        # the user pressed Run (or ran a sweep) after moving a slider: that run is the real one
        if self._starting or job.kind != "variant":
            return
        if self.pending is not None:
            self.pending = None
        if self.ghost is not None:  # the ghost showed this run's setting: it goes when the run ends
            job.finished.connect(lambda _v: self._clear_stale_ghost())
            job.cancelled.connect(self._clear_stale_ghost)
            job.failed.connect(lambda _m, _d: self._clear_stale_ghost())

    def _cancel_live_job(self) -> None:
        if self.job is not None and not self.job.is_ended:
            log.debug("live preview: cancelling %s (a newer setting arrived)", self.job.name)
            self.job.cancel()
        self.job = None

    def _on_job_finished(self, job: Job, variant, started: float) -> None:
        steps, est = self._estimates.pop(job.id, ([], {}))
        if self.job is job:
            self.job = None
        if variant is None or getattr(variant, "status", "") != "ok":
            return
        errors = estimate_errors(est, variant.metrics) if est else {}
        entry = {"name": variant.name, "steps": steps, "errors": errors,
                 "estimate": {k: est.get(k) for k in ("size_bytes", "compressed_bytes", "params", "flops")}
                 if est else {},
                 "seconds": round(time.monotonic() - started, 3)}
        self.errors.append(entry)
        if errors:
            log.info("estimate vs measurement for %s: %s", variant.name,
                     ", ".join(f"{k} {v:+.1%}" for k, v in errors.items()))
        # the measured point replaces the ghost, unless a newer setting is already estimated
        self._clear_stale_ghost()
        if variant.name in self.store:
            self.store.select(variant.name)
        self.measured.emit(variant, errors)
