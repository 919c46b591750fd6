"""Where Tugboat's data files are: the app icon (SVG and PNG sizes), the desktop entry.

The files live in the repository's top-level ``resources/`` folder. They are found, in this order:

1. in a PyInstaller bundle: ``<bundle>/_internal/tugboat/_resources`` (``sys._MEIPASS``; see
   packaging/tugboat.spec, which puts them there);
2. installed (wheel, or an editable install made with the current pyproject.toml): the data package
   ``tugboat._resources``, which pyproject.toml maps onto ``resources/``;
3. in a source checkout (also an editable install made before that mapping existed):
   ``<repo>/resources`` next to ``appsrc/``.

Qt-free and stdlib-only, so the engine, the CLI and the packaging tests can all use it. A typical
use, in the window::

    from tugboat import resources
    icon = QIcon()
    for png in resources.icon_pngs():
        icon.addFile(str(png))
    app.setWindowIcon(icon)
"""

from __future__ import annotations

import importlib.util
import os
import sys
from functools import cache
from pathlib import Path

PACKAGE = "tugboat._resources"
ICON_SIZES = (16, 32, 48, 64, 128, 256, 512)
_MARKER = Path("icons") / "tugboat.svg"


def _candidates() -> list[tuple[str, Path]]:
    found: list[tuple[str, Path]] = []
    override = os.environ.get("TUGBOAT_RESOURCES_DIR")
    if override:
        found.append(("TUGBOAT_RESOURCES_DIR", Path(override)))
    bundle = getattr(sys, "_MEIPASS", None)
    if getattr(sys, "frozen", False) and bundle:
        found.append(("bundle", Path(bundle) / "tugboat" / "_resources"))
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        # a regular package: its folder; (a zipped install has no real folder and is skipped)
        for location in spec.submodule_search_locations or ():
            found.append(("package", Path(location)))
    found.append(("checkout", Path(__file__).resolve().parents[2] / "resources"))
    return found


@cache
def _located() -> tuple[str, Path]:
    tried = []
    for how, folder in _candidates():
        if (folder / _MARKER).is_file():
            return how, folder
        tried.append(f"{folder} ({how})")
    raise FileNotFoundError(
        "Tugboat's resource files (icons/tugboat.svg) were not found; looked in: " + ", ".join(tried)
        + ". Reinstall Tugboat, or set TUGBOAT_RESOURCES_DIR to the folder that holds icons/."
    )


def resource_dir() -> Path:
    """The folder holding ``icons/`` and ``tugboat.desktop``."""
    return _located()[1]


def source() -> str:
    """How the folder was found: "bundle", "package", "checkout" or "TUGBOAT_RESOURCES_DIR"."""
    return _located()[0]


def path(*parts: str) -> Path:
    """A resource file by its path inside ``resources/``, e.g. ``path("tugboat.desktop")``."""
    p = resource_dir().joinpath(*parts)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such Tugboat resource")
    return p


def icon_svg() -> Path:
    """The scalable application icon."""
    return path("icons", "tugboat.svg")


def icon_png(size: int = 256) -> Path:
    """The PNG icon of the smallest shipped size at least ``size`` pixels (the largest if none is)."""
    best = next((s for s in ICON_SIZES if s >= size), ICON_SIZES[-1])
    return path("icons", f"tugboat-{best}.png")


def icon_pngs() -> list[Path]:
    """Every shipped PNG size, smallest first (add them all to one QIcon)."""
    return [path("icons", f"tugboat-{s}.png") for s in ICON_SIZES]


def desktop_entry() -> Path:
    """The freedesktop.org ``tugboat.desktop`` file."""
    return path("tugboat.desktop")


def mime_info() -> Path:
    """``tugboat-mime.xml``: shared-mime-info types for model files (``xdg-mime install`` it)."""
    return path("tugboat-mime.xml")
