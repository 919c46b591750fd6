"""The main window: model and data on the left, techniques on the right, the trade-off chart and the
results table in the middle, jobs at the bottom.

The window only binds widgets to state and turns clicks into :class:`Session` calls; all engine
work happens in jobs.
"""

from __future__ import annotations

import base64
from pathlib import Path

from PySide6.QtCore import QByteArray, QSize, Qt, Signal
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (
    QComboBox,
    QDockWidget,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QMainWindow,
    QMessageBox,
    QPushButton,
    QScrollArea,
    QSplitter,
    QStackedWidget,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from ..engine.errors import TugboatError
from ..engine.running.recipe import recipe_to_toml
from ..engine.running.variants import Variant, step_label
from ..jobs import Job, JobQueue
from ..settings import Settings, load_settings, save_settings
from .chart import TradeoffChart
from .controls import ElidedLabel, guard_wheel
from .diagnose_view import DiagnoseView
from .jobs_view import JobsView
from .layers_view import LayersView
from .live_preview import LivePreview
from .model_panel import DATA_FILTER, MODEL_FILTER, DataPanel, ModelPanel
from .notify import DetailsDialog, NotificationArea
from .results_table import ResultsTable
from .session import DEMO_DATA, DEMO_MODEL, Session
from .store import VariantStore
from .technique_panel import TechniquePanel, build_panels
from .training_view import TrainingView
from .workspace_io import Workspace, WorkspaceKeeper, is_workspace

MODEL_SUFFIXES = {".onnx", ".pt", ".pth", ".pt2", ".ts", ".bin", ".ckpt", ".safetensors"}
DATA_SUFFIXES = {".npz", ".csv"}
RECIPE_SUFFIXES = {".toml"}


def default_size(screen) -> QSize:
    """1440x900, or what fits the screen's free area (a 1366x768 laptop gets all of its width)."""
    if screen is None:
        return QSize(1440, 900)
    free = screen.availableGeometry()
    return QSize(min(1440, free.width()), min(900, free.height() - 30))  # the title bar


def _scrolling(widget: QWidget) -> QScrollArea:
    """``widget`` in a vertical scroll area: on a short screen its lower rows stay reachable."""
    scroll = QScrollArea()
    scroll.setWidgetResizable(True)
    scroll.setFrameShape(QScrollArea.Shape.NoFrame)
    scroll.setWidget(widget)
    return scroll


class EmptyState(QWidget):
    open_requested = Signal()
    demo_requested = Signal()

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.setObjectName("empty_state")
        lay = QVBoxLayout(self)
        lay.addStretch(2)
        title = QLabel("<h2>Make a model smaller and faster, and see what it costs</h2>")
        title.setAlignment(Qt.AlignmentFlag.AlignCenter)
        title.setWordWrap(True)
        text = QLabel("Open a trained model (ONNX, TorchScript, torch.export or a torch file), or try the\n"
                      "built-in demo: a small digits CNN with its data set. You can also drop a file here.")
        text.setAlignment(Qt.AlignmentFlag.AlignCenter)
        text.setWordWrap(True)
        buttons = QHBoxLayout()
        self.open_button = QPushButton("Open model...")
        self.demo_button = QPushButton("Try the demo")
        self.demo_button.setDefault(True)
        for b in (self.open_button, self.demo_button):
            b.setMinimumWidth(160)
            b.setMinimumHeight(36)
        self.open_button.clicked.connect(self.open_requested)
        self.demo_button.clicked.connect(self.demo_requested)
        buttons.addStretch(1)
        buttons.addWidget(self.open_button)
        buttons.addWidget(self.demo_button)
        buttons.addStretch(1)
        lay.addWidget(title)
        lay.addWidget(text)
        lay.addSpacing(12)
        lay.addLayout(buttons)
        lay.addStretch(3)


class ChainView(QWidget):
    """The current chain of steps a Run builds on ("prune → quantize → [this panel]")."""

    def __init__(self, session: Session, store: VariantStore, parent=None) -> None:
        super().__init__(parent)
        self.setObjectName("chain_view")
        self.session, self.store = session, store
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        # one line, elided, full chain in the tooltip: a long chain never pushes Run out of view
        self.label = ElidedLabel("", Qt.TextElideMode.ElideLeft)
        buttons = QHBoxLayout()
        self.continue_button = QPushButton("Continue from selected")
        self.continue_button.setToolTip("Chain the next Run after the selected variant's steps "
                                        "(its model is reused, e.g. prune then quantize)")
        self.clear_button = QPushButton("Start from original")
        self.clear_button.setToolTip("Clear the chain: the next Run starts from the original model")
        self.continue_button.clicked.connect(self._on_continue)
        self.clear_button.clicked.connect(session.clear_chain)
        buttons.addWidget(self.continue_button)
        buttons.addWidget(self.clear_button)
        lay.addWidget(self.label)
        lay.addLayout(buttons)
        session.chain_changed.connect(self._on_chain_changed)
        store.selection_changed.connect(lambda _n: self._update_buttons())
        self._on_chain_changed([])

    def _on_continue(self) -> None:
        if self.store.selected:
            self.session.continue_from(self.store.selected)

    def _update_buttons(self) -> None:
        sel = self.store.get(self.store.selected) if self.store.selected else None
        self.continue_button.setEnabled(sel is not None and sel.status == "ok")
        self.clear_button.setEnabled(bool(self.session.chain))

    def _on_chain_changed(self, chain: list) -> None:
        parts = ["original"] + [step_label(s) for s in chain] + ["[this panel]"]
        self.label.setText("Chain: " + " → ".join(parts))
        self._update_buttons()


RAY_INSTALL = "pip install 'tugboat-ml[ray]'"


def ray_installed() -> bool:
    """Whether Ray can be imported (looked up, not imported: importing Ray takes seconds)."""
    import importlib.util

    return importlib.util.find_spec("ray") is not None


class SweepView(QWidget):
    """The picked settings, and where the sweep runs: here, or on Ray at an address (issue 20)."""

    run_requested = Signal(str, str)  # executor ("local" | "ray"), address ("" for a local Ray)

    def __init__(self, session: Session, parent=None) -> None:
        super().__init__(parent)
        self.setObjectName("sweep_view")
        self.session = session
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        self.title = QLabel()
        self.title.setWordWrap(True)
        lay.addWidget(self.title)
        self.list = QListWidget()
        self.list.setMaximumHeight(80)
        lay.addWidget(self.list)
        lay.addLayout(self._build_where())
        buttons = QHBoxLayout()
        self.run_button = QPushButton("Run sweep")
        self.save_button = QPushButton("Save as recipe...")
        self.clear_button = QPushButton("Clear")
        self.run_button.clicked.connect(self._on_run)
        self.clear_button.clicked.connect(session.clear_sweep)
        for b in (self.run_button, self.save_button, self.clear_button):
            buttons.addWidget(b)
        lay.addLayout(buttons)
        session.sweep_changed.connect(self._on_sweep_changed)
        self._on_sweep_changed([])

    def _build_where(self) -> QHBoxLayout:
        row = QHBoxLayout()
        self.where = QComboBox()
        self.where.setObjectName("sweep_where")
        self.where.addItem("Run here", "local")
        self.where.addItem("Run on Ray at", "ray")
        # sized for "Run on Ray at", not for its longest text: the address keeps the room
        self.where.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.where.setMinimumContentsLength(len("Run on Ray at"))
        self.address = QLineEdit()
        self.address.setObjectName("sweep_address")
        self.address.setPlaceholderText("auto, ray://head:10001 (empty: a local Ray)")
        self.address.setMinimumWidth(120)
        self.where.currentIndexChanged.connect(lambda _i: self._update_where())
        row.addWidget(self.where)
        row.addWidget(self.address, 1)
        self.set_ray_available(ray_installed())
        return row

    def set_ray_available(self, available: bool) -> None:
        """Without Ray, its choice is shown unavailable, with the command that installs it."""
        item = self.where.model().item(1)
        item.setEnabled(available)
        tip = ("Send each variant to a Ray cluster (or a local Ray instance); results stream back into "
               "this workspace as they finish" if available else
               f"Ray is not installed; install it with: {RAY_INSTALL}")
        item.setToolTip(tip)
        self.where.setItemText(1, "Run on Ray at" if available else f"Run on Ray (not installed: {RAY_INSTALL})")
        self.where.view().setMinimumWidth(self.where.view().sizeHintForColumn(0) + 24)  # the whole text
        if not available:
            self.where.setCurrentIndex(0)
        self._update_where()

    def _update_where(self) -> None:
        ray = self.where.currentData() == "ray"
        self.address.setEnabled(ray)
        self.address.setVisible(ray)

    def executor(self) -> tuple[str, str]:
        """Where the sweep runs: ("local", "") or ("ray", ADDRESS or "" for a local Ray instance)."""
        where = str(self.where.currentData())
        return where, self.address.text().strip() if where == "ray" else ""

    def _on_run(self) -> None:
        self.run_requested.emit(*self.executor())

    def _on_sweep_changed(self, sweep: list) -> None:
        self.list.clear()
        for steps in sweep:
            self.list.addItem(" → ".join(step_label(s) for s in steps))
        # empty, it is one line: the panels above get the height
        self.title.setText(f"<b>Sweep</b>: {len(sweep)} setting{'s' if len(sweep) != 1 else ''}" if sweep
                           else "<b>Sweep</b>: empty (\"Add to sweep\" collects settings)")
        for w in (self.list, self.run_button, self.save_button, self.clear_button, self.where):
            w.setVisible(bool(sweep))
            w.setEnabled(bool(sweep))
        self._update_where()
        self.address.setVisible(bool(sweep) and self.where.currentData() == "ray")


def _then(path: str | None, action) -> None:
    """``action(path)`` when a dialog gave a path (not cancelled)."""
    if path:
        action(path)


class MainWindow(QMainWindow):
    def __init__(self, store: VariantStore | None = None, queue: JobQueue | None = None,
                 settings: Settings | None = None) -> None:
        super().__init__()
        self.setWindowTitle("Tugboat")
        self.setObjectName("main_window")
        self.setAcceptDrops(True)
        self.store = store or VariantStore(self)
        self.queue = queue or JobQueue(self)
        self.settings = settings or load_settings()
        self.session = Session(self.store, self.queue, self)
        self.session.measure.batch = self.settings.measure_batch
        if self.settings.measure_threads:
            self.session.measure.threads = self.settings.measure_threads
        self.session.measure.runtime = self.settings.measure_runtime
        self.keeper = WorkspaceKeeper(self.store, self.session, self.queue, self)
        self.keeper.changed.connect(self._on_workspace_changed)
        self.keeper.problem.connect(lambda msg, level: self.notify(msg, "", level, 10000))
        self.confirm_trust = self._ask_trust  # tests replace it
        self.ask_save_path = self._ask_save_path  # tests replace it
        self._dialogs: list[QWidget] = []
        self._last_model_before: str | None = None  # last_model before a load that is still running

        self.panels: dict[str, TechniquePanel] = build_panels()  # before the views that follow them
        self.setCentralWidget(self._build_centre())
        self.model_dock = self._dock("Model and data", self._build_left(), Qt.DockWidgetArea.LeftDockWidgetArea)
        self.technique_dock = self._dock("Techniques", self._build_right(), Qt.DockWidgetArea.RightDockWidgetArea)
        self.jobs_view = JobsView(self.queue)
        self.jobs_dock = self._dock("Jobs", self.jobs_view, Qt.DockWidgetArea.BottomDockWidgetArea)
        # the side docks run the full height; the jobs dock sits under the centre only
        self.setCorner(Qt.Corner.BottomLeftCorner, Qt.DockWidgetArea.LeftDockWidgetArea)
        self.setCorner(Qt.Corner.BottomRightCorner, Qt.DockWidgetArea.RightDockWidgetArea)

        self._build_menus()
        self._connect()
        self._show_machine()
        guard_wheel(self)  # the wheel scrolls panels; it changes a control only when that has focus
        self.resize(default_size(self.screen()))
        self.resizeDocks([self.model_dock, self.technique_dock], [300, 340], Qt.Orientation.Horizontal)
        self.resizeDocks([self.jobs_dock], [170], Qt.Orientation.Vertical)
        self._restore_settings()
        self._set_ready(False)
        self.live_preview = LivePreview(self.session, self.store, self.queue, self.chart,
                                        list(self.panels.values()), self)

    # --- building ---------------------------------------------------------------------------------
    def _build_centre(self) -> QWidget:
        """Notifications, then the empty state or the views (chart, layers, training, diagnose) over
        the results table. Each view gets the objects it uses, not the window."""
        self.notifications = NotificationArea()
        self.empty_state = EmptyState()
        self.chart = TradeoffChart(self.store)
        self.layers_view = LayersView(self.session, self.store, self.queue, self.panels)
        self.training_view = TrainingView(self.queue)
        self.diagnose_view = DiagnoseView(self.session, self.store, self.queue, self.notify)
        self.view_tabs = QTabWidget()
        self.view_tabs.setObjectName("view_tabs")
        for view, title in ((self.chart, "Trade-off"), (self.layers_view, "Layers"),
                            (self.training_view, "Training"), (self.diagnose_view, "Diagnose")):
            self.view_tabs.addTab(view, title)
        self.results_table = ResultsTable(self.store)
        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(self.view_tabs)
        split.addWidget(self.results_table)
        split.setSizes([430, 230])
        self.stack = QStackedWidget()
        self.stack.addWidget(self.empty_state)
        self.stack.addWidget(split)
        centre = QWidget()
        clay = QVBoxLayout(centre)
        clay.setContentsMargins(4, 4, 4, 4)
        clay.addWidget(self.notifications)
        clay.addWidget(self.stack, 1)
        return centre

    def _build_left(self) -> QWidget:
        """Model and data."""
        self.model_panel = ModelPanel()
        self.data_panel = DataPanel()
        self.data_panel.set_measure(self.session.measure.batch, self.settings.measure_threads,
                                    self.session.measure.runtime)
        self.left_tabs = QTabWidget()
        self.left_tabs.addTab(_scrolling(self.model_panel), "Model")
        self.left_tabs.addTab(_scrolling(self.data_panel), "Data")
        self.left_tabs.setMinimumWidth(260)  # squeezed further, the docks collapse (View menu)
        return self.left_tabs

    def _build_right(self) -> QWidget:
        """The chain, the technique panels (Run and Add to sweep always in view), the sweep."""
        self.technique_tabs = QTabWidget()
        self.technique_tabs.setObjectName("technique_tabs")
        self._tab_panels: list[TechniquePanel] = []
        for panel in self.panels.values():
            scroll = QScrollArea()  # a long panel scrolls instead of squeezing its rows together
            scroll.setWidgetResizable(True)
            scroll.setFrameShape(QScrollArea.Shape.NoFrame)
            scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
            scroll.setWidget(panel)
            page = QWidget()  # Run and Add to sweep stay below the scrolling form, always in view
            play = QVBoxLayout(page)
            play.setContentsMargins(0, 0, 0, 0)
            play.setSpacing(0)
            play.addWidget(scroll, 1)
            play.addWidget(panel.button_bar)
            self.technique_tabs.addTab(page, panel.technique.title)
            self._tab_panels.append(panel)
            panel.run_requested.connect(self._on_panel_run)
            panel.add_to_sweep_requested.connect(self.session.add_to_sweep)
        self.chain_view = ChainView(self.session, self.store)
        self.sweep_view = SweepView(self.session)
        self.sweep_view.save_button.clicked.connect(self._on_save_sweep)
        self.sweep_view.run_requested.connect(self.run_sweep)
        right = QWidget()
        rlay = QVBoxLayout(right)
        rlay.setContentsMargins(4, 4, 4, 4)
        rlay.addWidget(self.chain_view)
        rlay.addWidget(self.technique_tabs, 1)
        rlay.addWidget(self.sweep_view)
        return right

    def _dock(self, title: str, widget: QWidget, area) -> QDockWidget:
        dock = QDockWidget(title, self)
        dock.setObjectName(f"dock_{title.lower().replace(' ', '_')}")
        dock.setWidget(widget)
        dock.setFeatures(QDockWidget.DockWidgetFeature.DockWidgetMovable
                         | QDockWidget.DockWidgetFeature.DockWidgetFloatable
                         | QDockWidget.DockWidgetFeature.DockWidgetClosable)
        self.addDockWidget(area, dock)
        return dock

    def _action(self, menu, text: str, slot, shortcut=None, tip: str = "") -> QAction:
        act = QAction(text, self)
        if shortcut is not None:
            act.setShortcut(QKeySequence(shortcut))
        if tip:
            act.setStatusTip(tip)
        act.triggered.connect(lambda _=False: slot())
        menu.addAction(act)
        return act

    def _build_menus(self) -> None:
        bar = self.menuBar()
        file = bar.addMenu("&File")
        self.open_action = self._action(file, "&Open model...", self.open_model_dialog,
                                        QKeySequence.StandardKey.Open)
        self._action(file, "Open &data...", self.open_data_dialog)
        self.recent_menu = file.addMenu("Recent models")
        self._action(file, "Try the &demo", self.load_demo)
        file.addSeparator()
        self._action(file, "&New workspace...", self.new_workspace_dialog, QKeySequence.StandardKey.New)
        self._action(file, "Open &workspace...", self.open_workspace_dialog, "Ctrl+Shift+O")
        self.recent_ws_menu = file.addMenu("Recent workspaces")
        self._action(file, "&Save workspace", self.save_workspace, QKeySequence.StandardKey.Save)
        self._action(file, "Save workspace &as...", self.save_workspace_as_dialog, "Ctrl+Shift+S")
        file.addSeparator()
        self.export_action = self._action(file, "&Export selected as ONNX...",
                                          lambda: self.export_dialog(self.store.selected, "onnx"), "Ctrl+E")
        file.addSeparator()
        self._action(file, "&Quit", self.close, QKeySequence.StandardKey.Quit)
        run = bar.addMenu("&Run")
        self.run_action = self._action(run, "&Run current technique", self.run_current, "Ctrl+R")
        self.cancel_action = self._action(run, "&Cancel all jobs", self.queue.cancel_all, "Esc")
        run.addSeparator()
        self.diagnose_action = self._action(run, "&Diagnose selected variant", self.diagnose_selected,
                                            "Ctrl+D", "Where the selected variant diverges from "
                                            "the original, layer by layer")
        self._action(run, "Com&pare two variants...", self.diagnose_view.open_compare)
        view = bar.addMenu("&View")
        for dock in (self.model_dock, self.technique_dock, self.jobs_dock):
            view.addAction(dock.toggleViewAction())
        self._refresh_recent_menus()

    def _connect(self) -> None:
        s = self.session
        s.loading.connect(self._on_session_loading)
        s.load_ended.connect(self._on_session_load_ended)
        s.model_info_ready.connect(self.model_panel.show_info)
        s.data_ready.connect(self.data_panel.show_summary)
        s.baseline_ready.connect(self._on_baseline_ready)
        s.trust_needed.connect(self._on_trust_needed)
        s.error.connect(lambda msg, det: self.notify(msg, det))
        s.message.connect(lambda msg: self.notify(msg, "", "info", 10000))
        s.variant_finished.connect(self._on_variant_finished)
        s.sweep_variant.connect(self._on_sweep_variant)
        s.sweep_ended.connect(self._on_sweep_ended)
        self.queue.job_added.connect(self._on_job_added)
        self.empty_state.open_requested.connect(self.open_model_dialog)
        self.empty_state.demo_requested.connect(self.load_demo)
        self.model_panel.open_requested.connect(self.open_model_dialog)
        self.model_panel.demo_requested.connect(lambda ref: self.load_model(ref, self._data_for(ref)))
        self.model_panel.task_chosen.connect(self._on_model_panel_task_chosen)
        self.data_panel.open_file_requested.connect(self.open_data_dialog)
        self.data_panel.open_folder_requested.connect(self.open_data_folder_dialog)
        self.data_panel.demo_requested.connect(self.load_data)
        self.data_panel.measure_changed.connect(self._on_measure_changed)
        t = self.results_table
        t.export_requested.connect(self.export_dialog)
        t.rerun_requested.connect(self.session.rerun)
        t.remeasure_in_requested.connect(self.session.remeasure_in)
        t.delete_requested.connect(self.delete_variant)
        t.show_recipe_requested.connect(self.show_recipe)
        t.continue_requested.connect(self.session.continue_from)
        t.remeasure_requested.connect(self.remeasure)
        s.remeasured.connect(self._on_session_remeasured)

    def _show_machine(self) -> None:
        """The hardware every timing here comes from, always in view (status bar, right)."""
        from ..engine.machine import describe, machine_info

        info = machine_info()
        self.machine_label = QLabel(describe(info))
        self.machine_label.setObjectName("machine_label")
        runtimes = ", ".join(f"{k} {v}" for k, v in (info.get("runtimes") or {}).items() if v)
        self.machine_label.setToolTip(f"Timings are measured on this machine\n{info.get('cpu')}\n"
                                      f"int8 features: {', '.join(info.get('flags') or []) or 'none'}\n"
                                      f"{runtimes}")
        self.statusBar().addPermanentWidget(self.machine_label)

    def remeasure(self, names: list[str]) -> Job | None:
        """Time the original and ``names`` again, back to back (results table > Re-measure)."""
        artifact_dir = str(self.workspace.path) if self.workspace else None
        return self.session.remeasure(list(names), artifact_dir)

    def _on_session_remeasured(self, names: list[str]) -> None:
        self.keeper.record_timings(names)
        self.statusBar().showMessage(f"Re-measured {len([n for n in names if n != 'baseline'])} variant(s) "
                                     "beside the original", 6000)

    def _set_ready(self, ready: bool) -> None:
        self.stack.setCurrentIndex(1 if ready or len(self.store) else 0)
        for panel in self.panels.values():
            panel.run_button.setEnabled(ready)
            panel.sweep_button.setEnabled(ready)
        self.run_action.setEnabled(ready)

    def diagnose_selected(self) -> Job | None:
        """Show the Diagnose tab and diagnose the selected variant."""
        self.view_tabs.setCurrentWidget(self.diagnose_view)
        return self.diagnose_view.run_diagnose()

    # --- notifications ----------------------------------------------------------------------------
    def notify(self, message: str, details: str = "", level: str = "error", timeout_ms: int = 0):
        self.statusBar().showMessage(message, 8000)
        return self.notifications.notify(message, details, level, timeout_ms)

    def _on_job_added(self, job: Job) -> None:
        job.failed.connect(lambda msg, det, j=job: self.notify(f"{j.name} failed: {msg}", det))

    # --- loading ----------------------------------------------------------------------------------
    @staticmethod
    def _data_for(model_ref: str) -> str:
        return DEMO_DATA if model_ref.startswith("demo:digits") else ""

    def load_demo(self) -> Job | None:
        return self.load_model(DEMO_MODEL, DEMO_DATA)

    def load_model(self, ref: str, data: str | None = None, *, trust: bool = False, arch: str | None = None,
                   arch_kwargs: dict | None = None) -> Job | None:
        """Load a model (``arch`` / ``arch_kwargs``: the architecture of a bare state_dict)."""
        # Recent models get the file when the load succeeds (_on_baseline_ready); last_model names
        # it while it loads (a quit mid-load keeps it) and goes back if the load fails
        job = self.session.load(ref, data if data is not None else self.session.data_ref, trust=trust,
                                arch=arch, arch_kwargs=arch_kwargs)
        if job is not None:
            if self._last_model_before is None:
                self._last_model_before = self.settings.last_model
            self.settings.last_model = ref
        return job

    def _remember_loaded(self) -> None:
        """A load succeeded: its model (and data) go into Recent and become the last ones."""
        model, data = self.session.model_ref, self.session.data_ref
        if model and not model.startswith("demo:"):
            self.settings.add_recent("models", model)
        if data and not data.startswith("demo:"):
            self.settings.add_recent("data", data)
        self.settings.last_model, self.settings.last_data = model, data
        self._last_model_before = None
        self._refresh_recent_menus()

    def _on_model_panel_task_chosen(self, task: str) -> None:
        """Measure the model as another task (re-measures the baseline; results so far are cleared)."""
        if (task or None) == self.session.task:
            return
        self.session.task = task or None
        if self.session.model_ref:
            self.session.load(self.session.model_ref, self.session.data_ref, trust=self.session.trust)

    def load_data(self, ref: str) -> Job | None:
        if not self.session.model_ref:
            self.session.data_ref = ref
            self.data_panel.show_loading(ref)
            return None
        return self.session.load(self.session.model_ref, ref, trust=self.session.trust)

    # --- file dialogs: each kind starts in the folder last used for it (kept in the settings) -----
    def _dialog_dir(self, kind: str) -> str:
        folder = self.settings.dialog_dirs.get(kind, "") if isinstance(self.settings.dialog_dirs, dict) else ""
        return folder if folder and Path(folder).is_dir() else ""

    def _remember_dir(self, kind: str, path: str, is_folder: bool = False) -> None:
        folder = str(Path(path) if is_folder else Path(path).parent)
        self.settings.dialog_dirs = {**self.settings.dialog_dirs, kind: folder}
        save_settings(self.settings)

    def _open_file(self, kind: str, title: str, file_filter: str) -> str:
        path, _ = QFileDialog.getOpenFileName(self, title, self._dialog_dir(kind), file_filter)
        if path:
            self._remember_dir(kind, path)
        return path

    def _open_folder(self, kind: str, title: str) -> str:
        path = QFileDialog.getExistingDirectory(self, title, self._dialog_dir(kind))
        if path:
            self._remember_dir(kind, path, is_folder=True)
        return path

    def open_model_dialog(self) -> None:
        dialog = self.make_open_dialog()
        if dialog.exec():
            path, arch, kwargs = dialog.values()
            self.load_model(path, arch=arch, arch_kwargs=kwargs)

    def make_open_dialog(self):
        """The open dialog (a file or a Hugging Face folder, and an architecture for a state_dict);
        tests drive it directly."""
        from .open_model_dialog import OpenModelDialog

        return OpenModelDialog(
            self, arch=self.session.arch or "", arch_kwargs=self.session.arch_kwargs,
            open_file=lambda: self._open_file("models", "Open model", MODEL_FILTER),
            open_folder=lambda: self._open_folder("models", "Open a Hugging Face model folder"))

    def open_data_dialog(self) -> None:
        _then(self._open_file("data", "Open data", DATA_FILTER), self.load_data)

    def open_data_folder_dialog(self) -> None:
        _then(self._open_folder("data", "Open image folder (one sub-folder per class)"), self.load_data)

    def _ask_trust(self, path: str) -> bool:
        what = (f"needs the architecture code {self.session.arch} to be run. That code"
                if self.session.arch and ":" in self.session.arch else
                "holds a pickled Python object. Loading it runs code from the file, which")
        answer = QMessageBox.warning(
            self, "Trust this file?",
            f"{path}\n\n{what} can do anything your user account can. Load it only if you made it or "
            "trust its source.\n\nLoad it?",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No, QMessageBox.StandardButton.No)
        return answer == QMessageBox.StandardButton.Yes

    def _on_trust_needed(self, path: str, message: str) -> None:
        if self.confirm_trust(path):
            self.session.load(self.session.model_ref, self.session.data_ref, trust=True)
        else:
            self.notify(f"Not loaded: {path} was not trusted (nothing was unpickled).", message, "info")
            self.session.abandon_load("not trusted")

    def _on_session_load_ended(self, still_loaded: str, reason: str) -> None:
        """A load failed or was cancelled: the panels show what is loaded, not "loading..."."""
        if reason != "cancelled" and self._last_model_before is not None:  # a failed open is not "last"
            self.settings.last_model = self._last_model_before
            self._last_model_before = None
            save_settings(self.settings)
        info, data = self.session.info, self.session.baseline
        if still_loaded and info is not None:
            self.model_panel.show_info(info)
            self.data_panel.show_summary(data.data.summary() if data is not None and data.data is not None
                                         else None)
        else:
            self.model_panel.show_not_loaded(reason)
            self.data_panel.show_summary(None)

    def _on_session_loading(self, model: str, data: str) -> None:
        self.model_panel.show_loading(model)
        self.data_panel.show_loading(data)
        self.setWindowTitle(f"Tugboat - {Path(model).name if not model.startswith('demo:') else model}")
        self.stack.setCurrentIndex(1)

    def _on_baseline_ready(self, base) -> None:
        self._remember_loaded()
        self._set_ready(True)
        save_settings(self.settings)

    def _on_measure_changed(self, batch: int, threads: int, runtime: str) -> None:
        self.settings.measure_batch, self.settings.measure_threads = batch, threads
        self.settings.measure_runtime = runtime
        m = self.session.measure
        m.batch, m.runtime = batch, runtime
        if threads:
            m.threads = threads
        if self.session.model_ref:
            self.session.load()

    # --- running ----------------------------------------------------------------------------------
    def current_panel(self) -> TechniquePanel | None:
        i = self.technique_tabs.currentIndex()
        return self._tab_panels[i] if 0 <= i < len(self._tab_panels) else None

    def show_panel(self, name: str) -> TechniquePanel:
        panel = self.panels[name]
        self.technique_tabs.setCurrentIndex(self._tab_panels.index(panel))
        return panel

    def run_current(self) -> Job | None:
        panel = self.current_panel()
        return self.session.run_step(panel.step()) if panel else None

    def _on_panel_run(self, step: dict) -> None:
        self.session.run_step(dict(step))

    def _on_variant_finished(self, variant: Variant) -> None:
        # the keeper has placed it in the workspace (the table shows it; its files are being written)
        self._on_sweep_variant(variant)

    def _on_sweep_variant(self, variant: Variant) -> None:
        if variant.status != "ok":
            self.notify(f"{variant.name}: {variant.error}", "", "warning")

    def _on_sweep_ended(self, result) -> None:
        if result is not None:
            failed = [n for n in result.tried if (v := result.workspace.get(n)) is not None and v.status != "ok"]
            self.statusBar().showMessage(
                f"Sweep: {len(result.tried)} variant(s) made, {len(result.skipped)} kept from before"
                + (f", {len(failed)} failed" if failed else "") + f"; workspace {result.workspace.path}", 10000)

    def run_sweep(self, executor: str = "local", address: str = "") -> Job | None:
        """The picked settings as one sweep job (``engine.sweep``) into the open workspace, made in
        the data folder if none is open; ``executor`` "ray" sends the variants to Ray at ``address``."""
        ws = self.keeper.ensure()
        if ws is None:
            return None
        job = self.session.run_sweep(ws, executor, address or None)
        if job is not None:
            self.keeper.written_by(job)
        return job

    # --- workspace --------------------------------------------------------------------------------
    # The engine's Workspace format, shared with `tugboat sweep` and `tugboat report` (workspace_io).
    @property
    def workspace(self) -> Workspace | None:
        return self.keeper.ws

    def _on_workspace_changed(self, ws: Workspace | None) -> None:
        if ws is not None:
            self.settings.last_workspace = str(ws.path)
            self.settings.add_recent("workspaces", str(ws.path))
            self._refresh_recent_menus()
            save_settings(self.settings)
            self.statusBar().showMessage(f"Workspace: {ws.path}", 5000)

    def _workspace_call(self, fn, path: str) -> Workspace | None:
        try:
            return fn(path)
        except (OSError, TugboatError) as exc:
            self.notify(str(exc))
            return None

    def new_workspace(self, path: str) -> Workspace | None:
        return self._workspace_call(self.keeper.new, path)

    def save_workspace_as(self, path: str) -> Workspace | None:
        """Copy what is in the window into a new workspace folder (files written in jobs)."""
        return self._workspace_call(self.keeper.save_as, path)

    def save_workspace(self) -> None:
        if self.workspace is None:
            self.save_workspace_as_dialog()
            return
        try:
            self.keeper.save()
            self.statusBar().showMessage(f"Saved {self.workspace.path}", 4000)
        except (OSError, TugboatError) as exc:
            self.notify(f"Could not save the workspace: {exc}")

    def open_workspace(self, path: str) -> Workspace | None:
        """Open a workspace folder, also one made by `tugboat sweep` or `tugboat run`."""
        ws = self._workspace_call(self.keeper.open, path)
        if ws is not None:
            self.stack.setCurrentIndex(1)
        return ws

    def restore_last_workspace(self) -> Workspace | None:
        """On start: reopen the workspace of the last session if it is still there."""
        last = self.settings.last_workspace
        if last and is_workspace(last):
            return self.open_workspace(last)
        return None

    def new_workspace_dialog(self) -> None:
        _then(self._open_folder("workspaces", "New workspace: choose an empty folder"), self.new_workspace)

    def open_workspace_dialog(self) -> None:
        _then(self._open_folder("workspaces", "Open workspace folder"), self.open_workspace)

    def save_workspace_as_dialog(self) -> None:
        _then(self._open_folder("workspaces", "Save workspace as: choose a folder"), self.save_workspace_as)

    # --- variants ---------------------------------------------------------------------------------
    def delete_variant(self, name: str) -> None:
        """Remove a variant from the window and its folder from the workspace."""
        self.keeper.delete(name)

    def show_recipe(self, name: str) -> None:
        v = self.store.get(name)
        if v is None:
            return
        text = recipe_to_toml(v.recipe) if v.recipe else "(no recipe)"
        dialog = DetailsDialog(f"Recipe of {name}", "Reproduce it headless with: tugboat run "
                               "recipe.toml --out DIR", text, self)
        self._dialogs.append(dialog)
        dialog.show()

    def export_dialog(self, name: str | None, kind: str) -> None:
        if not name:
            self.notify("Select a variant in the results table to export it.", "", "info", 6000)
            return
        suffix = {"onnx": ".onnx", "torch": ".pt2", "recipe": ".toml", "ort": ".ort", "pte": ".pte",
                  "openvino": ".xml"}[kind]
        default = f"{name.replace(' ', '_')}{suffix}"
        path = self.ask_save_path(f"Export {name}", default, f"*{suffix}")
        if path:
            self.export_variant(name, kind, path)

    def export_variant(self, name: str, kind: str, path: str) -> Job | None:
        artifact_dir = str(self.workspace.path) if self.workspace else None
        job = self.session.export(name, kind, path, artifact_dir)
        if job is not None:
            job.finished.connect(lambda p: self.notify(f"Exported {name} to {p}", "", "info", 8000))
        return job

    def _ask_save_path(self, title: str, default: str, file_filter: str) -> str:
        folder = self._dialog_dir("exports")
        path, _ = QFileDialog.getSaveFileName(self, title, str(Path(folder) / default) if folder else default,
                                              file_filter)
        if path:
            self._remember_dir("exports", path)
        return path

    def _on_save_sweep(self) -> None:
        path = self.ask_save_path("Save sweep recipe", "sweep.toml", "*.toml")
        if path:
            from ..engine.stored import atomic_write_bytes

            atomic_write_bytes(path, recipe_to_toml(self.session.sweep_recipe()).encode("utf-8"))

    # --- settings, drag and drop, closing ---------------------------------------------------------
    def _refresh_recent_menus(self) -> None:
        self.recent_menu.clear()
        for ref in self.settings.recent_models:
            act = self.recent_menu.addAction(ref)
            act.triggered.connect(lambda _=False, r=ref: self.load_model(r))
        self.recent_menu.setEnabled(bool(self.settings.recent_models))
        self.recent_ws_menu.clear()
        for ref in self.settings.recent_workspaces:
            act = self.recent_ws_menu.addAction(ref)
            act.triggered.connect(lambda _=False, r=ref: self.open_workspace(r))
        self.recent_ws_menu.setEnabled(bool(self.settings.recent_workspaces))

    def _restore_settings(self) -> None:
        try:
            if self.settings.geometry:
                self.restoreGeometry(QByteArray(base64.b64decode(self.settings.geometry)))
            if self.settings.window_state:
                self.restoreState(QByteArray(base64.b64decode(self.settings.window_state)))
        except (ValueError, TypeError):  # a damaged value: keep the default layout
            pass

    def save_window_settings(self) -> None:
        self.settings.geometry = base64.b64encode(bytes(self.saveGeometry().data())).decode("ascii")
        self.settings.window_state = base64.b64encode(bytes(self.saveState().data())).decode("ascii")
        save_settings(self.settings)

    @staticmethod
    def _dropped_paths(mime) -> list[str]:
        return [u.toLocalFile() for u in mime.urls() if u.isLocalFile()] if mime.hasUrls() else []

    def dragEnterEvent(self, event) -> None:  # noqa: N802
        if self._dropped_paths(event.mimeData()):
            event.acceptProposedAction()
        else:
            event.ignore()

    def dragMoveEvent(self, event) -> None:  # noqa: N802
        self.dragEnterEvent(event)

    def dropEvent(self, event) -> None:  # noqa: N802
        paths = self._dropped_paths(event.mimeData())
        if not paths:
            event.ignore()
            return
        event.acceptProposedAction()
        # a model and its data can be dropped together: the model first, so the data pairs with it
        paths.sort(key=lambda p: 0 if Path(p).suffix.lower() in MODEL_SUFFIXES else 1)
        for path in paths:
            self.open_path(path)

    def open_path(self, path: str) -> None:
        """Open a path (dropped, or from ``tugboat FILE``) as what it looks like: model, data,
        recipe or workspace."""
        p = Path(path)
        if not p.exists():
            self.notify(f"{path}: no such file or folder", "", "warning")
            return
        if p.is_dir():
            if is_workspace(p):
                self.open_workspace(path)
            elif (p / "config.json").is_file():  # a Hugging Face model folder
                self.load_model(path)
            else:
                self.load_data(path)
        elif p.suffix.lower() in DATA_SUFFIXES:
            self.load_data(path)
        elif p.suffix.lower() in MODEL_SUFFIXES:
            self.load_model(path)
        elif p.suffix.lower() in RECIPE_SUFFIXES:
            self.open_recipe(path)
        else:
            self.notify(f"{path}: not a model (.onnx .pt .pth .pt2 .safetensors), data (.npz .csv, image "
                        "folder), recipe (.toml) or workspace folder", "", "warning")

    def open_recipe(self, path: str) -> Job | None:
        """Load a recipe's model and data; once measured, its steps are the chain and its last step
        is shown in its panel, ready to Run (``tugboat run`` reproduces it headless)."""
        from ..engine.running.recipe import load_recipe

        try:
            recipe = load_recipe(path)
        except TugboatError as exc:
            self.notify(str(exc))
            return None
        model, data = recipe.model, recipe.data or ""
        here = Path(path).resolve().parent
        # a path relative to the recipe's folder, as written beside it
        if model and not model.startswith("demo:") and not Path(model).is_absolute() and (here / model).exists():
            model = str(here / model)
        if data and not data.startswith("demo:") and not Path(data).is_absolute() and (here / data).exists():
            data = str(here / data)
        steps = [dict(s) for s in recipe.steps]
        job = self.load_model(model, data, trust=False)
        if job is None:
            return None

        def show_steps(_base, steps=steps, job=job) -> None:
            self.session.baseline_ready.disconnect(show_steps)
            if self.session.load_job is not job or not steps:
                return
            self.session.set_chain(steps[:-1])
            last = steps[-1]
            if last.get("technique") in self.panels:
                self.show_panel(last["technique"]).set_step(last)
            self.notify(f"Recipe {Path(path).name}: its steps are set up; press Run to make the variant.",
                        "", "info", 8000)

        self.session.baseline_ready.connect(show_steps)
        return job

    def start_demo_session(self) -> Job | None:
        """``tugboat --demo``: the demo in a new session; say what became of the last workspace."""
        last = self.settings.last_workspace
        job = self.load_demo()
        if last and is_workspace(last):
            self.notify(f"Demo started in a new session. Your last workspace is kept as it was: {last} "
                        "(File > Recent workspaces).", "", "info", 15000)
        elif last:
            self.notify(f"Demo started in a new session (the last workspace, {last}, is no longer there).",
                        "", "info", 15000)
        return job

    def closeEvent(self, event) -> None:  # noqa: N802
        self.save_window_settings()
        self.queue.shutdown(timeout=5.0)
        self.session.close()  # its worker process ends (after its runs were cancelled)
        self.keeper.close()  # the workspace's folder lock: after the last save job
        super().closeEvent(event)

