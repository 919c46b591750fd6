"""Packaging: the wheel ships the resources and every package; installed into a fresh venv it finds its
icon, answers --version/--help, and `tugboat --demo` opens the window (offscreen). Also: the resource
lookup in a source checkout, an editable install and a PyInstaller bundle; the icons; the desktop entry.

The fresh venvs have no pip and no packages of their own: the wheel is installed into them by this
venv's pip (`--python`), and the heavy dependencies (torch, Qt) are borrowed from this venv through a
.pth path line that is written only after the install, so pip can never see, and uninstall, this
venv's own editable install of Tugboat. (The PyInstaller build is not tested here: it takes minutes;
see packaging/README.md and packaging/smoke_test.py.)
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

import tugboat
from tugboat import resources

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
_SKIP = shutil.ignore_patterns(".venv", ".test-home", ".git", "build", "dist", "*.egg-info", "__pycache__",
                               ".ruff_cache", ".pytest_cache", ".hypothesis", "docs", "benchmarks", "tests")

pytestmark = pytest.mark.timeout(300)


def _pip(*args: str, cwd: Path | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


def _fresh_venv(where: Path) -> Path:
    """An empty venv (no pip); returns its python."""
    venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt").create(where)
    return where / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _site_packages(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def _run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=Path(cmd[0]).parent,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory) -> Path:
    """The working tree without build outputs (so building never writes build/ or egg-info into it)."""
    dst = tmp_path_factory.mktemp("src") / "tugboat"
    shutil.copytree(ROOT, dst, ignore=_SKIP)
    return dst


@pytest.fixture(scope="module")
def wheel(source_copy, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(out), str(source_copy))
    (whl,) = out.glob("tugboat_ml-*.whl")
    return whl


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed; returns its bin folder."""
    python = _fresh_venv(tmp_path_factory.mktemp("venv") / "v")
    _pip("--python", str(python), "install", "--no-deps", "--no-index", "--ignore-installed", "-q", str(wheel))
    deps = sysconfig.get_path("purelib")  # this venv's packages: torch, PySide6, ... (its .pth files not run)
    (_site_packages(python) / "_borrowed_deps.pth").write_text(deps + "\n")
    return python.parent


def test_wheel_ships_resources_and_every_package(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    data = "tugboat/_resources/"
    expected = {data + "tugboat.desktop", data + "icons/tugboat.svg", data + "icons/tugboat.ico"}
    expected |= {f"{data}icons/tugboat-{s}.png" for s in resources.ICON_SIZES}
    assert expected <= names, sorted(expected - names)
    assert "tugboat/resources.py" in names
    # pyproject lists packages explicitly (for the resources mapping): a forgotten subpackage fails here
    packages = {p.parent.relative_to(ROOT / "appsrc").as_posix() for p in (ROOT / "appsrc").rglob("__init__.py")}
    missing = sorted(p for p in packages if f"{p}/__init__.py" not in names)
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml"
    # every module of the checkout is in the wheel
    modules = {p.relative_to(ROOT / "appsrc").as_posix() for p in (ROOT / "appsrc/tugboat").rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    # the wheel's icon bytes are the checkout's
    with zipfile.ZipFile(wheel) as z:
        assert z.read(data + "icons/tugboat-256.png") == (ROOT / "resources/icons/tugboat-256.png").read_bytes()
    meta = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    entry_points = zipfile.ZipFile(wheel).read(meta).decode()
    assert "tugboat = tugboat.cli:main" in entry_points


def test_installed_wheel_finds_its_resources_and_answers_version_and_help(installed):
    python = installed / "python"
    probe = ("import json, tugboat, tugboat.resources as r; "
             "print(json.dumps({'pkg': tugboat.__file__, 'how': r.source(), 'dir': str(r.resource_dir()), "
             "'icon': str(r.icon_png(48)), 'svg': r.icon_svg().read_text()}))")
    out = _run([str(python), "-c", probe])
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    venv_root = installed.parent
    assert Path(info["pkg"]).is_relative_to(venv_root)  # the wheel's copy, not the checkout
    assert info["how"] == "package" and Path(info["dir"]).is_relative_to(venv_root)
    assert Path(info["icon"]).name == "tugboat-48.png" and Path(info["icon"]).is_file()
    assert "<svg" in info["svg"]

    version = f"tugboat {tugboat.__version__}"
    for cmd in ([str(installed / "tugboat"), "--version"], [str(python), "-m", "tugboat", "--version"]):
        out = _run(cmd)
        assert out.returncode == 0 and out.stdout.strip() == version, (cmd, out.stdout, out.stderr)
    helps = [_run([str(installed / "tugboat"), "--help"]), _run([str(python), "-m", "tugboat", "--help"])]
    assert all(h.returncode == 0 for h in helps)
    assert helps[0].stdout == helps[1].stdout and "usage: tugboat" in helps[0].stdout and "--demo" in helps[0].stdout


@pytest.mark.gui
def test_installed_wheel_opens_the_demo_window_and_quits(installed, tmp_path):
    # faulthandler: if the process ever crashes at quit again, stderr names the threads and frames
    env = {"QT_QPA_PLATFORM": "offscreen", "TUGBOAT_CONFIG_DIR": str(tmp_path / "cfg"), "PYTHONFAULTHANDLER": "1"}
    proc = _run([str(installed / "tugboat"), "--demo", "--quit-after", "3"], env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((tmp_path / "cfg" / "settings.json").read_text())
    assert saved["last_model"] == "demo:digits-cnn"  # the window opened and loaded the demo


def test_editable_install_maps_the_resources_folder(source_copy, tmp_path):
    # --target never touches this venv's own install (pip treats it as --ignore-installed)
    target = tmp_path / "site"
    _pip("install", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-e", str(source_copy),
         "--target", str(target))
    python = _fresh_venv(tmp_path / "v")  # stays empty: resources.py needs only the standard library
    probe = (f"import site; site.addsitedir({str(target)!r}); "  # runs the editable install's .pth finder
             "import tugboat.resources as r; print(r.source(), r.resource_dir())")
    out = _run([str(python), "-c", probe])
    assert out.returncode == 0, out.stderr
    how, folder = out.stdout.split(maxsplit=1)
    assert how == "package" and Path(folder.strip()) == source_copy / "resources"


@pytest.fixture
def fresh_lookup():
    resources._located.cache_clear()
    yield
    resources._located.cache_clear()


def test_lookup_in_a_checkout_and_in_a_pyinstaller_bundle(fresh_lookup, monkeypatch, tmp_path):
    assert resources.resource_dir().samefile(ROOT / "resources")  # package (editable) or checkout: same folder
    bundle = tmp_path / "_internal"
    shutil.copytree(ROOT / "resources", bundle / "tugboat" / "_resources")
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "_MEIPASS", str(bundle), raising=False)
    resources._located.cache_clear()
    assert resources.source() == "bundle"
    assert resources.icon_png(1000) == bundle / "tugboat" / "_resources" / "icons" / "tugboat-512.png"
    assert resources.icon_png(17).name == "tugboat-32.png"


def test_missing_resources_name_every_place_looked(fresh_lookup, monkeypatch, tmp_path):
    monkeypatch.setenv("TUGBOAT_RESOURCES_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setattr(resources, "_candidates", lambda: [("TUGBOAT_RESOURCES_DIR", tmp_path / "nowhere")])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        resources.icon_svg()


def test_icons_are_the_sizes_their_names_say():
    sys.path.insert(0, str(ROOT / "packaging"))
    try:
        import make_icons
    finally:
        sys.path.remove(str(ROOT / "packaging"))
    assert make_icons.problems() == []
    assert set(make_icons.SIZES) == set(resources.ICON_SIZES)


@pytest.mark.gui
def test_svg_icon_renders_in_qt(qapp):
    from PySide6.QtGui import QIcon
    from PySide6.QtSvg import QSvgRenderer

    renderer = QSvgRenderer(str(resources.icon_svg()))
    assert renderer.isValid() and renderer.defaultSize().width() == 256
    icon = QIcon()
    for png in resources.icon_pngs():
        icon.addFile(str(png))
    assert {s.width() for s in icon.availableSizes()} == set(resources.ICON_SIZES)


def test_desktop_entry_is_valid():
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # keys are case-sensitive
    parser.read(resources.desktop_entry(), encoding="utf-8")
    entry = parser["Desktop Entry"]
    for key in ("Type", "Name", "Exec", "Icon", "Categories"):
        assert entry.get(key), key
    assert entry["Type"] == "Application" and entry["Terminal"] == "false"
    assert entry["Exec"].split()[0] in PYPROJECT["project"]["scripts"]  # a command the install creates
    assert entry["Icon"] == resources.icon_svg().stem  # icon themes look it up by this name
    assert entry["Categories"].endswith(";") and entry["Keywords"].endswith(";")
