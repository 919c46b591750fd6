"""One formatting module for the CLI, the HTML report, engine messages and the widgets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tugboat.engine.formatting import did_you_mean, fmt_bytes, fmt_count, fmt_ms, fmt_seconds

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("n, text", [(None, "-"), (0, "0 B"), (1023, "1023 B"), (1536, "1.5 KB"),
                                     (5 * 1024**2, "5.0 MB"), (3 * 1024**3, "3.0 GB"), (2048 * 1024**3, "2048.0 GB")])
def test_bytes(n, text):
    assert fmt_bytes(n) == text


@pytest.mark.parametrize("n, significant, text", [
    (None, None, "-"), (950, None, "950"), (12_345, None, "12.3k"), (1_250_000, None, "1.25M"),
    (3_000_000_000, None, "3.00G"), (1_234_567, 3, "1.23M"), (-4_500, 3, "-4.5k"), (12, 3, "12")])
def test_counts(n, significant, text):
    assert fmt_count(n, significant) == text


def test_seconds_and_ms():
    assert [fmt_seconds(s) for s in (0.4, 59.6, 61, 3725)] == ["0s", "1m00s", "1m01s", "62m05s"]
    assert fmt_ms(None) == "-" and fmt_ms(1.23456) == "1.235"


def test_did_you_mean():
    assert did_you_mean("quantise", ["prune", "quantize", "distill"]) == " (did you mean 'quantize'?)"
    assert did_you_mean("zzz", ["prune", "quantize"]) == ""
    assert did_you_mean("conv", ["", "conv1"]) == " (did you mean 'conv1'?)"  # the root module's "" skipped


def test_engine_messages_use_the_shared_hint():
    from tugboat.engine.errors import RecipeError
    from tugboat.engine.techniques import steps

    with pytest.raises(RecipeError, match=r"unknown technique 'prnue'.*did you mean 'prune'"):
        steps.get("prnue")


def test_a_technique_that_fails_to_import_is_an_error_not_a_missing_technique():
    # a technique module whose dependency is missing must fail loudly (it used to vanish from the
    # registry with a log line, and the recipe tests skipped)
    code = ("import sys\n"
            "class Broken:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'tugboat.engine.techniques.training':\n"
            "            raise ModuleNotFoundError('students_extra is broken', name='students_extra')\n"
            "sys.meta_path.insert(0, Broken())\n"
            "from tugboat.engine.techniques import steps\n"
            "try:\n"
            "    steps.techniques()\n"
            "except ImportError as exc:\n"
            "    print('raised', exc); sys.exit(0)\n"
            "print('no error', sorted(steps.techniques())); sys.exit(1)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "appsrc")})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "students_extra is broken" in res.stdout
