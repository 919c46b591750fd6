"""The model and data panels: what is loaded, in numbers, and the per-layer table."""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QComboBox,
    QFormLayout,
    QGridLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..engine.formatting import fmt_bytes, fmt_count
from ..engine.io.tasks import TASKS
from ..engine.running.capabilities import summary as capability_summary
from .controls import ElidedLabel

MODEL_FILTER = "Models (*.onnx *.pt *.pth *.pt2 *.ts *.bin *.ckpt *.safetensors);;All files (*)"
DATA_FILTER = "Data (*.npz *.csv);;All files (*)"
DEMO_MODELS = ("demo:digits-cnn", "demo:digits-mlp", "demo:digits-resnet", "demo:digits-vit")
DEMO_DATA = ("demo:digits",)


def provenance_text(made_by: dict[str, str]) -> str:
    """One line on where an exported file came from (its ``tugboat.*`` metadata)."""
    import json

    text = f"Exported by Tugboat {made_by.get('tugboat.version', '?')}"
    try:
        recipe = json.loads(made_by.get("tugboat.recipe", "{}"))
    except ValueError:
        recipe = {}
    steps = recipe.get("steps") or []
    if recipe.get("model"):
        text += f" from {recipe['model']}"
    if steps:
        from ..engine.running.variants import step_label

        text += ": " + " → ".join(step_label(s) for s in steps if isinstance(s, dict) and "technique" in s
                                  and "method" in s)
    return text


def _shape(spec: dict[str, Any]) -> str:
    return "x".join(str(d) if d is not None else "N" for d in spec.get("shape", []))


class _NumberItem(QTableWidgetItem):
    """Sorts by the number, shows it formatted."""

    def __init__(self, value: int, text: str) -> None:
        super().__init__(text)
        self.value = value
        self.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)

    def __lt__(self, other) -> bool:
        if isinstance(other, _NumberItem):
            return self.value < other.value
        return super().__lt__(other)


class ModelPanel(QWidget):
    open_requested = Signal()
    demo_requested = Signal(str)
    task_chosen = Signal(str)  # a task name, or "" to go back to the one inferred from the outputs

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.setObjectName("model_panel")
        lay = QVBoxLayout(self)
        buttons = QHBoxLayout()
        self.open_button = QPushButton("Open model...")
        self.open_button.setToolTip("Open an ONNX, TorchScript, torch.export, torch or safetensors file, "
                                    "or a Hugging Face folder (Ctrl+O)")
        self.open_button.clicked.connect(self.open_requested)
        self.demo_combo = QComboBox()
        self.demo_combo.addItem("Demo models...")
        self.demo_combo.addItems(DEMO_MODELS)
        self.demo_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.demo_combo.setMinimumContentsLength(10)
        self.demo_combo.setToolTip("Load a model from the built-in demo zoo (trained on 8x8 digits)")
        self.demo_combo.activated.connect(self._on_demo_activated)
        buttons.addWidget(self.open_button)
        buttons.addWidget(self.demo_combo, 1)
        lay.addLayout(buttons)
        self.form = QFormLayout()
        self.fields: dict[str, QLabel] = {}
        for key in ("Model", "Format", "Task", "Inputs", "Outputs", "Params", "Size", "FLOPs", "Notes"):
            label = ElidedLabel("-") if key == "Model" else QLabel("-")  # a long path never widens it
            label.setWordWrap(key != "Model")
            label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            self.fields[key] = label
            self.form.addRow(key, label)
        lay.addLayout(self.form)
        task_row = QHBoxLayout()
        self.task_combo = QComboBox()
        self.task_combo.setObjectName("task_combo")
        self.task_combo.addItem("inferred from the outputs", "")
        for task in TASKS:
            self.task_combo.addItem(task, task)
        self.task_combo.setToolTip("How quality is measured: classification by top-1, every other task by "
                                   "fidelity (cosine, relative error). Changing it re-measures the model.")
        self.task_combo.activated.connect(self._on_task_combo_activated)
        task_row.addWidget(QLabel("Measure as"))
        task_row.addWidget(self.task_combo, 1)
        lay.addLayout(task_row)
        self.layers = QTableWidget(0, 4)
        self.layers.setObjectName("layer_table")
        self.layers.setHorizontalHeaderLabels(["Layer", "Type", "Params", "FLOPs"])
        self.layers.verticalHeader().setVisible(False)
        self.layers.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.layers.setSelectionBehavior(QTableWidget.SelectionBehavior.SelectRows)
        self.layers.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        for col in (1, 2, 3):
            self.layers.horizontalHeader().setSectionResizeMode(col, QHeaderView.ResizeMode.ResizeToContents)
        self.layers.setSortingEnabled(True)
        lay.addWidget(QLabel("Layers (click a header to sort)"))
        lay.addWidget(self.layers, 1)

    def _on_demo_activated(self, index: int) -> None:
        if index > 0:
            self.demo_requested.emit(self.demo_combo.itemText(index))
            self.demo_combo.setCurrentIndex(0)

    def _on_task_combo_activated(self, index: int) -> None:
        self.task_chosen.emit(self.task_combo.itemData(index) or "")

    def show_loading(self, ref: str) -> None:
        self.fields["Model"].setText(f"{ref} (loading...)")

    def show_not_loaded(self, reason: str) -> None:
        why = {"cancelled": "the last load was cancelled", "not trusted": "the file was not trusted"}
        self.fields["Model"].setText(f"none ({why.get(reason, 'the last load failed: see the message')})")

    def show_info(self, info: dict[str, Any]) -> None:
        f = self.fields
        f["Model"].setText(str(info.get("source", "-")))
        f["Format"].setText(str(info.get("format", "-")))
        source = {"user": "chosen", "inferred": "inferred from the outputs", "file": "recorded in the file"}
        f["Task"].setText(str(info.get("task", "-")) + (f" ({info['arch']})" if info.get("arch") else "")
                          + (f" ({source[info['task_source']]})" if info.get("task_source") in source else ""))
        chosen = info.get("task") if info.get("task_source") == "user" else ""
        self.task_combo.setCurrentIndex(max(0, self.task_combo.findData(chosen)))
        for kind in ("inputs", "outputs"):
            f[kind.capitalize()].setText(", ".join(f"{s['name']} [{_shape(s)}] {s.get('dtype', '')}"
                                                   for s in info.get(kind, [])) or "-")
        params, nonzero = info.get("params") or 0, info.get("nonzero_params") or 0
        f["Params"].setText(f"{fmt_count(params)} ({params:,}; non-zero {nonzero:,})")
        f["Size"].setText(f"{fmt_bytes(info.get('size_bytes'))} as ONNX "
                          f"({fmt_bytes(info.get('compressed_bytes'))} deflated)")
        f["FLOPs"].setText(f"{fmt_count(info.get('flops'))} per sample")
        notes = list(info.get("warnings") or [])
        made_by = info.get("provenance") or {}
        if made_by:
            notes.insert(0, provenance_text(made_by))
        cannot = capability_summary(info.get("capabilities") or {})
        if cannot:  # the techniques (or methods) that cannot run on this model, and why
            notes.extend(f"cannot {line}" for line in cannot)
        elif not info.get("torch_available", True):
            notes.append("ONNX-only: techniques that train need a torch model"
                         + (f" ({info['conversion_error']})" if info.get("conversion_error") else ""))
        f["Notes"].setText("\n".join(notes) or "-")
        rows = info.get("layers") or []
        self.layers.setSortingEnabled(False)
        self.layers.setRowCount(len(rows))
        for i, r in enumerate(rows):
            self.layers.setItem(i, 0, QTableWidgetItem(str(r["name"])))
            self.layers.setItem(i, 1, QTableWidgetItem(str(r["type"])))
            self.layers.setItem(i, 2, _NumberItem(int(r["params"]), f"{int(r['params']):,}"))
            self.layers.setItem(i, 3, _NumberItem(int(r["flops"]), fmt_count(int(r["flops"]))))
        self.layers.setSortingEnabled(True)


class DataPanel(QWidget):
    open_file_requested = Signal()
    open_folder_requested = Signal()
    demo_requested = Signal(str)
    measure_changed = Signal(int, int, str)  # batch, threads, runtime

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.setObjectName("data_panel")
        lay = QVBoxLayout(self)
        buttons = QGridLayout()  # two columns: the panel stays narrow on a laptop screen
        self.file_button = QPushButton("Open .npz / .csv...")
        self.file_button.setToolTip("Arrays named after the model inputs (+ optional 'labels'), or a CSV "
                                    "with a label column")
        self.file_button.clicked.connect(self.open_file_requested)
        self.folder_button = QPushButton("Image folder...")
        self.folder_button.setToolTip("A folder with one sub-folder of images per class")
        self.folder_button.clicked.connect(self.open_folder_requested)
        self.demo_button = QPushButton("demo:digits")
        self.demo_button.setToolTip("The built-in 8x8 digits data set (with labels)")
        self.demo_button.clicked.connect(lambda: self.demo_requested.emit("demo:digits"))
        buttons.addWidget(self.file_button, 0, 0)
        buttons.addWidget(self.folder_button, 0, 1)
        buttons.addWidget(self.demo_button, 1, 0)
        lay.addLayout(buttons)
        form = QFormLayout()
        self.fields: dict[str, QLabel] = {}
        for key in ("Data", "Samples", "Splits", "Labels", "Inputs", "Quality"):
            label = ElidedLabel("-") if key == "Data" else QLabel("-")
            label.setWordWrap(key != "Data")
            self.fields[key] = label
            form.addRow(key, label)
        lay.addLayout(form)
        lay.addWidget(QLabel("<b>Measure latency as deployed</b>"))
        mform = QFormLayout()
        self.batch = QSpinBox()
        self.batch.setRange(1, 65536)
        self.batch.setValue(64)
        self.batch.setToolTip("Batch size used to time every variant (your deployment batch)")
        self.threads = QSpinBox()
        self.threads.setRange(0, 256)
        self.threads.setSpecialValueText("default")
        self.threads.setToolTip("Runtime threads while timing (0: the default, up to 2)")
        self.runtime = QComboBox()
        self.runtime.setToolTip("Runtime the latency is measured in (tugboat info --runtimes lists them)")
        self._fill_runtimes()
        mform.addRow("Batch", self.batch)
        mform.addRow("Threads", self.threads)
        mform.addRow("Runtime", self.runtime)
        lay.addLayout(mform)
        self.apply_button = QPushButton("Re-measure baseline")
        self.apply_button.setToolTip("Measure the original model again with these settings "
                                     "(clears the variants measured with the old ones)")
        self.apply_button.clicked.connect(lambda: self.measure_changed.emit(
            self.batch.value(), self.threads.value(), self.runtime.currentData() or "onnxruntime"))
        lay.addWidget(self.apply_button)
        lay.addStretch(1)

    def _fill_runtimes(self) -> None:
        """Every runtime; one whose extra is not installed is shown disabled with the install command."""
        from ..engine.measuring.runtimes import list_runtimes

        for i, r in enumerate(list_runtimes(load=False)):  # looked up, not imported (OpenVINO: ~1 s)
            self.runtime.addItem(r["name"] if r["available"] else f"{r['name']} (not installed)", r["name"])
            item = self.runtime.model().item(i)
            item.setToolTip(r.get("version") or r.get("reason", ""))
            if not r["available"]:
                item.setEnabled(False)

    def set_measure(self, batch: int, threads: int, runtime: str) -> None:
        self.batch.setValue(batch)
        self.threads.setValue(threads)
        index = self.runtime.findData(runtime)
        if index >= 0:
            self.runtime.setCurrentIndex(index)

    def show_loading(self, ref: str) -> None:
        self.fields["Data"].setText(f"{ref} (loading...)" if ref else "none")

    def show_summary(self, summary: dict[str, Any] | None) -> None:
        f = self.fields
        if summary is None:
            for key in f:
                f[key].setText("-")
            f["Data"].setText("none: latency and size only")
            f["Quality"].setText("no data: quality is not measured (pick data to see accuracy)")
            return
        f["Data"].setText(str(summary.get("ref")))
        f["Samples"].setText(f"{summary.get('samples', 0):,}"
                             + (f" in {summary['classes']} classes" if summary.get("classes") else ""))
        f["Splits"].setText(", ".join(f"{k} {v:,}" for k, v in (summary.get("splits") or {}).items()))
        labels = bool(summary.get("labels"))
        f["Labels"].setText("yes" if labels else "no")
        f["Inputs"].setText(", ".join(f"{k} [{'x'.join(map(str, v['shape']))}] {v['dtype']}"
                                      for k, v in (summary.get("inputs") or {}).items()))
        f["Quality"].setText("accuracy on the test split, plus fidelity to the original" if labels else
                             "no labels: quality is fidelity (agreement with the original model's "
                             "outputs), not accuracy")
