"""File > Open model...: a model file or a Hugging Face folder, and for a bare state_dict or
``.safetensors`` checkpoint the architecture that rebuilds it (a built-in name, or the user's code
as ``path/to/models.py:ClassName`` / ``package.module:factory`` with keyword arguments as JSON).

Only intent is gathered here; loading (and the trust question for the user's code) happens in the
session like any other load."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from .model_panel import MODEL_FILTER


class OpenModelDialog(QDialog):
    def __init__(self, parent: QWidget | None = None, *, path: str = "", arch: str = "",
                 arch_kwargs: dict[str, Any] | None = None, open_file: Callable[[], str] | None = None,
                 open_folder: Callable[[], str] | None = None) -> None:
        super().__init__(parent)
        # the window's pickers remember the folder last used; plain file dialogs otherwise
        self._open_file = open_file or (lambda: QFileDialog.getOpenFileName(self, "Open model", "", MODEL_FILTER)[0])
        self._open_folder = open_folder or (
            lambda: QFileDialog.getExistingDirectory(self, "Open a Hugging Face model folder"))
        self.setWindowTitle("Open model")
        self.path_edit = QLineEdit(path)
        self.path_edit.setPlaceholderText("a .onnx, .pt, .pt2, .safetensors file or a Hugging Face folder")
        browse, folder = QPushButton("File..."), QPushButton("Folder...")
        browse.setToolTip("a model file")
        folder.setToolTip("a Hugging Face model folder (config.json + weights)")
        browse.clicked.connect(self._on_browse_clicked)
        folder.clicked.connect(self._on_folder_clicked)
        row = QHBoxLayout()
        row.addWidget(self.path_edit, 1)
        row.addWidget(browse)
        row.addWidget(folder)
        self.arch_edit = QLineEdit(arch)
        self.arch_edit.setPlaceholderText("only for a state_dict / .safetensors: models.py:ClassName")
        self.arch_edit.setToolTip("The network the weights belong to: a built-in name (digits-cnn), "
                                  "path/to/models.py:ClassName, or package.module:factory. Your code runs "
                                  "when the model is built, so the app asks you to trust it first.")
        self.kwargs_edit = QLineEdit(json.dumps(arch_kwargs) if arch_kwargs else "")
        self.kwargs_edit.setPlaceholderText('keyword arguments as JSON, e.g. {"width": 32}')
        self.error_label = QLabel("")
        self.error_label.setObjectName("error")
        self.error_label.setWordWrap(True)
        form = QFormLayout()
        form.addRow("Model", row)
        form.addRow("Architecture", self.arch_edit)
        form.addRow("Arguments", self.kwargs_edit)
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Open
                                        | QDialogButtonBox.StandardButton.Cancel)
        self.buttons.accepted.connect(self._on_buttons_accepted)
        self.buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.error_label)
        layout.addWidget(self.buttons)
        self.resize(620, self.sizeHint().height())

    def _on_browse_clicked(self) -> None:
        path = self._open_file()
        if path:
            self.path_edit.setText(path)

    def _on_folder_clicked(self) -> None:
        path = self._open_folder()
        if path:
            self.path_edit.setText(path)

    def values(self) -> tuple[str, str | None, dict[str, Any]]:
        """(path, architecture or None, keyword arguments); ValueError naming what is wrong."""
        path = self.path_edit.text().strip()
        if not path:
            raise ValueError("Choose a model file or folder.")
        arch = self.arch_edit.text().strip() or None
        text = self.kwargs_edit.text().strip()
        kwargs: Any = {}
        if text:
            try:
                kwargs = json.loads(text)
            except ValueError as exc:
                raise ValueError(f"Arguments must be a JSON object like {{\"width\": 32}}: {exc}") from None
            if not isinstance(kwargs, dict):
                raise ValueError("Arguments must be a JSON object like {\"width\": 32}.")
            if not arch:
                raise ValueError("Arguments are for an architecture: name it too.")
        return path, arch, kwargs

    def _on_buttons_accepted(self) -> None:
        try:
            self.values()
        except ValueError as exc:
            self.error_label.setText(str(exc))
            return
        self.accept()
