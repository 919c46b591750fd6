"""ruff stays clean (part of the test command, so CI checks it)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    exe = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    res = subprocess.run([exe, "check", "appsrc", "tests", "benchmarks", "tools", "packaging"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-1000:]
