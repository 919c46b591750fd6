"""The Training view: live loss, validation accuracy and fidelity curves of the job that trains.

Distillation, quantization-aware training and fine-tuning (after pruning) publish one
``progress.record("epoch", ...)`` event per epoch; the jobs layer forwards it as ``Job.record`` on
the GUI thread. This view listens to every job the queue starts and follows the latest one that
reports epochs: its name and state in the header, one point per epoch on three plots (train and
val loss; val accuracy; fidelity = top-1 agreement with the original model). A job whose steps
train twice (e.g. prune + fine-tune, then QAT) restarts its epoch count: the curves continue and a
dashed line marks where the second phase began. When the job ends its curves stay, until another
job reports an epoch; the last few runs can be picked again from the "Run" list.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QComboBox, QHBoxLayout, QLabel, QVBoxLayout, QWidget

from ..jobs import Job
from .theme import chart_colors

KEEP_RUNS = 8
CURVES = {  # key in the epoch event: (plot, legend, colour)
    "train_loss": ("loss", "train", (31, 119, 180)),
    "val_loss": ("loss", "val", (255, 127, 14)),
    "val_accuracy": ("accuracy", "val accuracy", (44, 160, 44)),
    "fidelity": ("fidelity", "agreement with original", (148, 103, 189)),
}


@dataclass
class TrainingRun:
    job_id: int
    name: str
    state: str = "running"
    rows: list[dict[str, Any]] = field(default_factory=list)
    phase_starts: list[int] = field(default_factory=list)  # x of each new phase's first epoch

    def add(self, row: dict[str, Any]) -> None:
        epoch = row.get("epoch")
        last = self.rows[-1].get("epoch") if self.rows else None
        if self.rows and isinstance(epoch, (int, float)) and isinstance(last, (int, float)) and epoch <= last:
            self.phase_starts.append(len(self.rows) + 1)
        self.rows.append(dict(row))

    def series(self, key: str) -> tuple[list[float], list[float]]:
        xs, ys = [], []
        for i, row in enumerate(self.rows, start=1):
            v = row.get(key)
            xs.append(float(i))
            ys.append(float(v) if isinstance(v, (int, float)) and math.isfinite(v) else math.nan)
        return xs, ys


class TrainingView(QWidget):
    epoch_drawn = Signal(int)  # points now drawn for the shown run

    def __init__(self, queue) -> None:
        super().__init__()
        self.setObjectName("training_view")
        self.queue = queue
        self.runs: list[TrainingRun] = []
        self.shown: TrainingRun | None = None
        self._follow = True  # show the newest run as it arrives (off once the user picks an older one)

        lay = QVBoxLayout(self)
        lay.setContentsMargins(2, 2, 2, 2)
        top = QHBoxLayout()
        self.title = QLabel("No training yet: distillation, quantization-aware training and "
                            "fine-tuning after pruning draw their curves here, epoch by epoch.")
        self.title.setObjectName("training_title")
        self.title.setWordWrap(True)
        self.run_combo = QComboBox()
        self.run_combo.setObjectName("training_runs")
        self.run_combo.setMinimumWidth(220)
        self.run_combo.setToolTip("Recent training runs (the newest is followed while it runs)")
        self.run_combo.activated.connect(self._on_run_picked)
        top.addWidget(self.title, 1)
        top.addWidget(QLabel("Run:"))
        top.addWidget(self.run_combo)
        lay.addLayout(top)

        self.plots = pg.GraphicsLayoutWidget()
        self.plots.setObjectName("training_plots")
        self.plot = {
            "loss": self.plots.addPlot(row=0, col=0, title="Loss"),
            "accuracy": self.plots.addPlot(row=0, col=1, title="Validation accuracy (%)"),
            "fidelity": self.plots.addPlot(row=0, col=2, title="Fidelity (%)"),
        }
        self.curves: dict[str, pg.PlotDataItem] = {}
        self._phase_lines: list[tuple[Any, pg.InfiniteLine]] = []
        for key, (plot_key, label, rgb) in CURVES.items():
            plot = self.plot[plot_key]
            if plot_key == "loss" and plot.legend is None:
                plot.addLegend(offset=(-4, 4), labelTextSize="8pt",
                               labelTextColor=chart_colors()["foreground"])
            self.curves[key] = plot.plot([], [], name=label, pen=pg.mkPen(rgb, width=2),
                                         symbol="o", symbolSize=6, symbolBrush=pg.mkBrush(*rgb),
                                         symbolPen=pg.mkPen(None), connect="finite")
        for plot in self.plot.values():
            plot.setLabel("bottom", "epoch")
            plot.showGrid(x=True, y=True, alpha=0.25)
            plot.setMouseEnabled(x=False, y=False)
            plot.hideButtons()
        lay.addWidget(self.plots, 1)
        self.summary = QLabel("")
        self.summary.setObjectName("training_summary")
        self.summary.setWordWrap(True)
        lay.addWidget(self.summary)
        self._apply_colors()

        self.queue.job_added.connect(self._on_job_added)
        for job in self.queue.jobs():
            self._on_job_added(job)

    # --- jobs -------------------------------------------------------------------------------------
    def _on_job_added(self, job: Job) -> None:
        job.record.connect(lambda kind, data, j=job: self._on_job_record(j, kind, data))
        job.state_changed.connect(lambda state, j=job: self._on_job_state(j, state))

    def _run_for(self, job: Job) -> TrainingRun | None:
        return next((r for r in self.runs if r.job_id == job.id), None)

    def _on_job_record(self, job: Job, kind: str, data: dict) -> None:
        if kind != "epoch":
            return
        run = self._run_for(job)
        if run is None:
            run = TrainingRun(job.id, job.name, job.state)
            self.runs.append(run)
            del self.runs[:-KEEP_RUNS]
            self._fill_combo()
            if self._follow or self.shown is None:
                self._follow = True
                self.show_run(run)
        run.add(data)
        if run is self.shown:
            self._draw()

    def _on_job_state(self, job: Job, state: str) -> None:
        run = self._run_for(job)
        if run is None:
            return
        run.state = state
        self._fill_combo()
        if run is self.shown:
            self._update_text()

    # --- showing ----------------------------------------------------------------------------------
    def show_run(self, run: TrainingRun) -> None:
        self.shown = run
        self._draw()
        self._fill_combo()

    def _on_run_picked(self, index: int) -> None:
        job_id = self.run_combo.itemData(index)
        run = next((r for r in self.runs if r.job_id == job_id), None)
        if run is not None:
            self._follow = run is self.runs[-1]
            self.show_run(run)

    def _fill_combo(self) -> None:
        self.run_combo.blockSignals(True)
        self.run_combo.clear()
        for run in reversed(self.runs):
            self.run_combo.addItem(f"{run.name} ({run.state})", run.job_id)
        if self.shown is not None:
            self.run_combo.setCurrentIndex(max(0, self.run_combo.findData(self.shown.job_id)))
        self.run_combo.blockSignals(False)

    def points(self, key: str = "train_loss") -> int:
        """Finite points drawn for ``key`` in the shown run."""
        _, ys = self.curves[key].getData()
        return 0 if ys is None else int(sum(1 for y in ys if math.isfinite(y)))

    def _draw(self) -> None:
        run = self.shown
        for key, curve in self.curves.items():
            if run is None:
                curve.setData([], [])
                continue
            xs, ys = run.series(key)
            if key in ("val_accuracy", "fidelity"):
                ys = [100.0 * y if math.isfinite(y) else y for y in ys]
            if not any(math.isfinite(y) for y in ys):
                xs, ys = [], []
            curve.setData(xs, ys, connect="finite")
        for plot, line in self._phase_lines:
            plot.removeItem(line)
        self._phase_lines = []
        if run is not None:
            fg = chart_colors()["foreground"]
            for x in run.phase_starts:
                for plot in self.plot.values():
                    line = pg.InfiniteLine(pos=x - 0.5, angle=90,
                                           pen=pg.mkPen(fg, style=Qt.PenStyle.DashLine))
                    plot.addItem(line)
                    self._phase_lines.append((plot, line))
            n = len(run.rows)
            for plot in self.plot.values():
                plot.setXRange(0.5, max(n, 2) + 0.5, padding=0)
                axis = plot.getAxis("bottom")
                if n <= 12:  # whole epochs only; longer runs get pyqtgraph's automatic ticks
                    axis.setTickSpacing(major=1, minor=1)
                else:
                    axis.setTickSpacing()
        self._update_text()
        self.epoch_drawn.emit(len(run.rows) if run is not None else 0)

    def _update_text(self) -> None:
        run = self.shown
        if run is None:
            return
        state = {"running": "running", "done": "finished", "failed": "failed",
                 "cancelled": "cancelled"}.get(run.state, run.state)
        last = run.rows[-1] if run.rows else {}
        of = f" of {last['epochs']}" if last.get("epochs") else ""
        self.title.setText(f"<b>{run.name}</b>: {state}, {len(run.rows)} epoch(s){of} reported"
                           + (f" in {len(run.phase_starts) + 1} phases" if run.phase_starts else ""))
        parts = []
        for key, label in (("train_loss", "train loss"), ("val_loss", "val loss"),
                           ("val_accuracy", "val accuracy"), ("fidelity", "fidelity")):
            v = last.get(key)
            if isinstance(v, (int, float)):
                parts.append(f"{label} {100 * v:.1f} %" if key in ("val_accuracy", "fidelity")
                             else f"{label} {v:.4g}")
        self.summary.setText((("Last epoch: " + ", ".join(parts) + ". ") if parts else "")
                             + "Fidelity: share of validation samples whose top-1 class agrees with "
                             "the original model's (the teacher's, for distillation).")

    def _apply_colors(self) -> None:
        c = chart_colors()
        self.plots.setBackground(c["background"])
        for plot in self.plot.values():
            for axis in ("left", "bottom"):
                plot.getAxis(axis).setPen(pg.mkPen(c["foreground"]))
                plot.getAxis(axis).setTextPen(pg.mkPen(c["foreground"]))
            plot.setTitle(plot.titleLabel.text, color=c["foreground"].name(), size="9pt")
            if plot.legend is not None:
                plot.legend.setLabelTextColor(c["foreground"])
