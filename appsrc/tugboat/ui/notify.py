"""Non-modal notifications: a bar that states the problem, with the details one click away."""

from __future__ import annotations

from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QFrame,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from . import theme

MAX_SHOWN = 3


class DetailsDialog(QDialog):
    def __init__(self, title: str, message: str, details: str, parent=None) -> None:
        super().__init__(parent)
        self.setWindowTitle(title)
        self.setModal(False)
        self.resize(720, 420)
        lay = QVBoxLayout(self)
        label = QLabel(message)
        label.setWordWrap(True)
        label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        text = QPlainTextEdit(details)
        text.setReadOnly(True)
        text.setLineWrapMode(QPlainTextEdit.LineWrapMode.NoWrap)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.close)
        lay.addWidget(label)
        lay.addWidget(text, 1)
        lay.addWidget(buttons)


class Notification(QFrame):
    def __init__(self, message: str, details: str, level: str, parent=None) -> None:
        super().__init__(parent)
        self.setObjectName("notification")
        self.message, self.details, self.level = message, details, level
        if theme.is_dark():  # background, text, border that read on a dark window
            colors = {"error": ("#4a2220", "#ffd9d4", "#8a3a33"), "info": ("#1f3147", "#d6e6fb", "#3d5f8a"),
                      "warning": ("#463a1c", "#fbe9bd", "#8a7136")}
        else:
            colors = {"error": ("#fdecea", "#8a1c12", "#e6a19a"), "info": ("#eaf2fd", "#123a6b", "#9fbde6"),
                      "warning": ("#fff6e0", "#6b4a00", "#e6cc8a")}
        bg, fg, border = colors.get(level, colors["info"])
        self.setStyleSheet(f"QFrame#notification {{ background: {bg}; border: 1px solid {border}; "
                           f"border-radius: 4px; }} QFrame#notification QLabel {{ color: {fg}; }}")
        lay = QHBoxLayout(self)
        lay.setContentsMargins(8, 4, 4, 4)
        self.label = QLabel(message)
        self.label.setWordWrap(True)
        self.label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        lay.addWidget(self.label, 1)
        self.details_button = QPushButton("Details...")
        self.details_button.setVisible(bool(details))
        self.details_button.clicked.connect(self._on_details)
        lay.addWidget(self.details_button)
        close = QPushButton("Dismiss")
        close.clicked.connect(self.dismiss)
        lay.addWidget(close)
        self._dialog: DetailsDialog | None = None

    def _on_details(self) -> None:
        self._dialog = DetailsDialog("Details", self.message, self.details, self.window())
        self._dialog.show()

    def dismiss(self) -> None:
        self.hide()
        self.setParent(None)
        self.deleteLater()


class NotificationArea(QWidget):
    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.setObjectName("notifications")
        self.lay = QVBoxLayout(self)
        self.lay.setContentsMargins(0, 0, 0, 0)
        self.lay.setSpacing(2)
        self.history: list[tuple[str, str, str]] = []

    def notify(self, message: str, details: str = "", level: str = "error",
               timeout_ms: int = 0) -> Notification:
        self.history.append((level, message, details))
        note = Notification(message, details, level, self)
        self.lay.addWidget(note)
        note.show()  # a child added to a visible parent stays hidden until shown
        shown = self.shown()
        for old in shown[:-MAX_SHOWN]:
            old.dismiss()
        if timeout_ms:
            QTimer.singleShot(timeout_ms, note, note.dismiss)
        return note

    def shown(self) -> list[Notification]:
        return [w for w in self.findChildren(Notification) if w.parent() is self and not w.isHidden()]
