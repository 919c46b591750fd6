"""Render resources/icons/tugboat.svg to the PNG sizes desktops want (and an .ico for Windows).

    python packaging/make_icons.py          # writes resources/icons/tugboat-<N>.png and tugboat.ico
    python packaging/make_icons.py --check  # exits 1 if a PNG is missing or has the wrong size

Uses Qt's SVG renderer (PySide6-Essentials ships QtSvg) offscreen; Pillow writes the .ico.
Re-run it after editing the SVG and commit the PNGs (the wheel and the bundle ship the files,
they never render at run time).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

SIZES = (16, 32, 48, 64, 128, 256, 512)
ICONS = Path(__file__).resolve().parent.parent / "resources" / "icons"
SVG = ICONS / "tugboat.svg"


def png_path(size: int) -> Path:
    return ICONS / f"tugboat-{size}.png"


def render() -> list[Path]:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import Qt
    from PySide6.QtGui import QGuiApplication, QImage, QPainter
    from PySide6.QtSvg import QSvgRenderer

    app = QGuiApplication.instance() or QGuiApplication(sys.argv[:1])  # noqa: F841 (keeps Qt alive)
    renderer = QSvgRenderer(str(SVG))
    if not renderer.isValid():
        raise SystemExit(f"{SVG}: Qt could not parse the SVG")
    written = []
    for size in SIZES:
        image = QImage(size, size, QImage.Format.Format_ARGB32_Premultiplied)
        image.fill(Qt.GlobalColor.transparent)
        painter = QPainter(image)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        painter.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform)
        renderer.render(painter)
        painter.end()
        path = png_path(size)
        if not image.save(str(path), "PNG"):
            raise SystemExit(f"{path}: could not write the PNG")
        written.append(path)
    from PIL import Image

    ico = ICONS / "tugboat.ico"
    Image.open(png_path(256)).save(ico, sizes=[(s, s) for s in (16, 32, 48, 64, 128, 256)])
    written.append(ico)
    return written


def problems() -> list[str]:
    """PNGs that are missing or not the size their name says (modification times mean nothing after a clone)."""
    from PIL import Image

    found = []
    for size in SIZES:
        path = png_path(size)
        if not path.exists():
            found.append(f"{path}: missing")
            continue
        with Image.open(path) as im:
            if im.size != (size, size) or im.mode != "RGBA":
                found.append(f"{path}: {im.size[0]}x{im.size[1]} {im.mode}, expected {size}x{size} RGBA")
    return found


def main(argv: list[str]) -> int:
    if "--check" in argv:
        found = problems()
        for line in found:
            print(line, file=sys.stderr)
        return 1 if found else 0
    for path in render():
        print(f"wrote {path.relative_to(ICONS.parent.parent)} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
