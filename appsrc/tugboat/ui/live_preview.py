"""Live preview: a ghost point that follows the sliders, then the real measurement.

While a technique slider moves, every change is estimated at once (:mod:`tugboat.engine.techniques.estimate`,
arithmetic on the baseline's layer shapes, no job) and the chart's hollow "ghost" point jumps there.
When the setting is final (the panel's ``step_committed``: the slider released, a typed value
entered, or the panel's one debounce after the last keyboard step; never while the mouse button is
held) it is run for real through the window's normal run path (``Session.run_step``, one job in
the queue); a newer setting cancels and disconnects the older job first (a
:class:`~tugboat.jobs.JobSlot`), so dragging across a big model never piles up stale runs (Orange's
"one task per owner"). The measured point replaces the ghost, and the estimate's error against the
measurement is logged (``logging`` and :attr:`LivePreview.errors`) so the estimator can be checked
and improved.

Only quick techniques run by themselves (``auto_run``: pruning and quantization); distillation
trains for minutes, so its ghost moves but it runs when the user presses Run. The chart's "Live
preview" toggle turns all of it off.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from PySide6.QtCore import QObject, Signal

from ..engine.techniques.estimate import build_profile, estimate, estimate_errors, estimate_quality
from ..jobs import Job, JobQueue, JobSlot

log = logging.getLogger(__name__)


class LivePreview(QObject):
    ghost_moved = Signal(object)  # estimated metrics, or None when hidden
    job_started = Signal(object)  # the Job measuring a rested setting
    measured = Signal(object, dict)  # Variant, relative errors of the estimate

    def __init__(self, session, store, queue: JobQueue, chart, panels: list, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.session, self.store, self.chart = session, store, chart
        self.auto_run = {"prune", "quantize"}
        self.profile = None
        self.slot = JobSlot(queue, self)  # the live job measuring the latest rested setting
        self.pending: dict[str, Any] | None = None  # the estimated step waiting for its commit
        self.ghost: dict[str, Any] | None = None
        self.errors: list[dict[str, Any]] = []  # one entry per measured estimate
        self.panels = list(panels)
        for panel in self.panels:
            panel.step_changed.connect(self._on_step_changed)
            panel.step_committed.connect(self._on_step_committed)
        self.session.baseline_ready.connect(self._on_baseline_ready)
        self._starting = False
        queue.job_added.connect(self._on_job_added)
        self.session.chain_changed.connect(lambda _c: self.clear_ghost())
        self.chart.live_toggle.toggled.connect(self._on_toggled)

    # --- state ------------------------------------------------------------------------------------
    @property
    def job(self) -> Job | None:
        """The live job measuring the latest rested setting (None when none runs)."""
        return self.slot.job

    @property
    def enabled(self) -> bool:
        return self.chart.live_toggle.isChecked()

    def set_enabled(self, on: bool) -> None:
        self.chart.live_toggle.setChecked(on)

    def _on_toggled(self, on: bool) -> None:
        if not on:
            self.pending = None
            self.slot.cancel()
            self.clear_ghost()

    def _on_baseline_ready(self, base) -> None:
        self.pending = None
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
            self.slot.cancel()
            self.clear_ghost()
            self.store.select(same.name)
            return
        self.slot.cancel()
        est = self.ghost
        self._starting = True
        try:
            job = self.session.run_step(dict(step))
        finally:
            self._starting = False
        if job is None:
            return
        started = time.monotonic()
        self.slot.adopt(job, finished=lambda variant, t=started, e=est or {}: self._on_job_finished(
                            variant, t, steps, e),
                        cancelled=self._clear_stale_ghost, failed=lambda _m, _d: self._clear_stale_ghost())
        self.job_started.emit(job)

    def _clear_stale_ghost(self) -> None:
        """A run ended (measured, cancelled, failed): its ghost goes too, unless a newer setting is
        already estimated or running."""
        if self.ghost is not None and self.pending is None and self.slot.job is None:
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

    def _on_job_finished(self, variant, started: float, steps: list[dict[str, Any]], est: dict[str, Any]) -> None:
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
