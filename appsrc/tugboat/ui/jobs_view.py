"""The jobs dock: each job's progress bar, ETA and cancel button, and a log view."""

from __future__ import annotations

import time

from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from ..engine.formatting import fmt_seconds
from ..jobs import CANCELLED, DONE, FAILED, Job, JobQueue

MAX_ROWS = 30
SAVE_ROW_AFTER_MS = 1000  # an autosave still running this long gets a row (progress, cancel)


class JobRow(QWidget):
    def __init__(self, job: Job, parent=None) -> None:
        super().__init__(parent)
        self.job = job
        self.setObjectName(f"job_{job.id}")
        lay = QHBoxLayout(self)
        lay.setContentsMargins(4, 1, 4, 1)
        self.name = QLabel(job.name)
        self.name.setMinimumWidth(90)
        self.name.setToolTip(job.name)
        self.bar = QProgressBar()
        self.bar.setRange(0, 1000)
        self.bar.setTextVisible(True)
        self.bar.setMinimumWidth(70)
        self.status = QLabel("queued")
        self.status.setMinimumWidth(100)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("Stop this job at its next checkpoint (Esc cancels all)")
        self.cancel_button.clicked.connect(job.cancel)
        lay.addWidget(self.name, 2)
        lay.addWidget(self.bar, 2)
        lay.addWidget(self.status, 3)
        lay.addWidget(self.cancel_button)
        job.progress.connect(self._on_job_progress)
        job.state_changed.connect(self._on_job_state)
        self.refresh()

    def _on_job_progress(self, _f: float, _m: str) -> None:
        self.refresh()

    def _on_job_state(self, _s: str) -> None:
        self.refresh()

    def refresh(self) -> None:
        job = self.job
        self.bar.setValue(int(job.fraction * 1000))
        self.bar.setFormat(f"{job.fraction * 100:.0f}%")
        if job.state == DONE:
            text = f"done in {fmt_seconds(job.elapsed())}"
        elif job.state == FAILED:
            text = f"failed: {job.error}"
        elif job.state == CANCELLED:
            text = "cancelled"
        elif job.state == "queued":
            text = "queued"
        else:
            eta = job.eta()
            text = (job.message or "running") + (f"  (ETA {fmt_seconds(eta)})" if eta is not None else "")
        self.status.setText(text)
        self.status.setToolTip(text)
        self.cancel_button.setEnabled(not job.is_ended)


class JobsView(QWidget):
    def __init__(self, queue: JobQueue, parent=None) -> None:
        super().__init__(parent)
        self.setObjectName("jobs_view")
        self.queue = queue
        self.rows: dict[int, JobRow] = {}
        split = QSplitter(Qt.Orientation.Horizontal)
        self.list_widget = QWidget()
        self.list_layout = QVBoxLayout(self.list_widget)
        self.list_layout.setContentsMargins(0, 0, 0, 0)
        self.list_layout.setSpacing(0)
        self.empty = QLabel("No jobs yet. Run a technique to start one.")
        self.empty.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.list_layout.addWidget(self.empty)
        self.list_layout.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(self.list_widget)
        self.scroll = scroll
        self.log_view = QPlainTextEdit()
        self.log_view.setReadOnly(True)
        self.log_view.setMaximumBlockCount(2000)
        self.log_view.setPlaceholderText("Job log")
        split.addWidget(scroll)
        split.addWidget(self.log_view)
        split.setSizes([640, 360])
        bar = QHBoxLayout()
        self.cancel_all_button = QPushButton("Cancel all")
        self.cancel_all_button.clicked.connect(queue.cancel_all)
        self.clear_button = QPushButton("Clear finished")
        self.clear_button.clicked.connect(self._on_clear)
        bar.addStretch(1)
        bar.addWidget(self.clear_button)
        bar.addWidget(self.cancel_all_button)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.addWidget(split, 1)
        lay.addLayout(bar)
        queue.job_added.connect(self._on_job_added)
        self._eta_timer = QTimer(self)
        self._eta_timer.setInterval(1000)
        self._eta_timer.timeout.connect(self._on_tick)
        self._eta_timer.start()

    def _on_job_added(self, job: Job) -> None:
        self._append_log(f"queued: {job.name}")
        job.log.connect(lambda text, j=job: self._append_log(f"[{j.name}] {text}"))
        job.state_changed.connect(lambda s, j=job: self._on_job_state(j, s))
        if job.kind == "save":
            # a routine autosave (tens of milliseconds, one per landing result) gets a row only
            # when it takes long or fails: building and removing one was a few milliseconds of the
            # GUI thread's work per landing (issue 17)
            QTimer.singleShot(SAVE_ROW_AFTER_MS, self, lambda j=job: None if j.is_ended else self._add_row(j))
            return
        self._add_row(job)

    def _add_row(self, job: Job) -> None:
        if job.id in self.rows:
            return
        self.empty.hide()
        row = JobRow(job)
        self.rows[job.id] = row
        self.list_layout.insertWidget(self.list_layout.count() - 1, row)
        if len(self.rows) > MAX_ROWS:
            self._on_clear()

    def _on_job_state(self, job: Job, state: str) -> None:
        if state == FAILED:
            self._add_row(job)
            self._append_log(f"failed: {job.name}: {job.error}")
            if job.details:
                self._append_log(job.details.rstrip())
        elif state in (DONE, CANCELLED):
            self._append_log(f"{state}: {job.name} ({job.elapsed():.1f} s)")
            if state == DONE and job.kind == "save":  # routine autosaves stay in the log only
                self._remove_row(job.id)
        elif state == "running":
            self._append_log(f"started: {job.name}")
            row = self.rows.get(job.id)
            if row is not None:  # the running job is in view, also below a long list
                QTimer.singleShot(0, lambda r=row: self._scroll_to(r))

    def _scroll_to(self, row: JobRow) -> None:
        if row.job.id in self.rows:
            self.scroll.ensureWidgetVisible(row)

    def _append_log(self, text: str) -> None:
        self.log_view.appendPlainText(f"{time.strftime('%H:%M:%S')}  {text}")

    def _on_tick(self) -> None:
        for row in self.rows.values():
            if row.job.is_running:
                row.refresh()

    def _remove_row(self, job_id) -> None:
        row = self.rows.pop(job_id, None)
        if row is not None:
            row.setParent(None)
            row.deleteLater()
        self.empty.setVisible(not self.rows)

    def _on_clear(self) -> None:
        for job_id, row in list(self.rows.items()):
            if row.job.is_ended:
                row.setParent(None)
                row.deleteLater()
                del self.rows[job_id]
        self.queue.clear_ended()
        self.empty.setVisible(not self.rows)
