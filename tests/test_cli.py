"""The CLI: `tugboat info` and a baseline `tugboat run` print and write what DESIGN.md describes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from tugboat.cli import main

ROOT = Path(__file__).resolve().parents[1]


def report_schema() -> dict:
    for candidate in (ROOT.parent / "shared" / "report.schema.json", ROOT / "tests" / "data" / "report.schema.json"):
        if candidate.exists():
            return json.loads(candidate.read_text())
    pytest.fail("report.schema.json not found")


def test_info_json(capsys):
    assert main(["info", "demo:digits-cnn", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "demo"
    assert info["inputs"] == [{"name": "input", "shape": ["batch", 1, 8, 8], "dtype": "float32"}]
    assert info["outputs"][0]["shape"] == ["batch", 10]
    assert info["params"] == sum(layer["params"] for layer in info["layers"])
    assert info["flops"] > 0 and info["size_bytes"] > info["params"] * 4 * 0.99
    assert {layer["type"] for layer in info["layers"]} >= {"Conv2d", "Linear"}


def test_info_table(capsys):
    assert main(["info", "demo:digits-mlp"]) == 0
    out = capsys.readouterr().out
    assert "Params" in out and "FLOPs" in out and "net.1" in out


def test_baseline_run_writes_a_valid_report(tmp_path, capsys):
    recipe = tmp_path / "base.toml"
    recipe.write_text('model = "demo:digits-cnn"\ndata = "demo:digits"\n'
                      "[measure]\nbatch = 32\nthreads = 1\nmin_runs = 5\nmin_seconds = 0.05\n")
    out = tmp_path / "out"
    assert main(["run", str(recipe), "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    jsonschema.validate(report, report_schema())
    m = report["baseline"]["metrics"]
    assert m["accuracy"] > 0.97 and m["latency_ms"]["batch"] == 32 and m["latency_ms"]["threads"] == 1
    artifact = out / report["baseline"]["artifacts"]["onnx"]
    assert artifact.stat().st_size == m["size_bytes"]
    assert report["variants"] == [] and report["pareto"] == ["baseline"]
    assert "baseline" in capsys.readouterr().out


@pytest.mark.parametrize(
    "text, fragment",
    [
        ('model = "demo:digits-cnn"\n[[steps]]\ntechnique = "shrink"\n', "unknown technique 'shrink'"),
        ('model = "demo:digits-cnn"\nmodle = 1\n', "did you mean 'model'"),
        ('model = "missing.onnx"\n', "not found"),
        ('model = "demo:digits-cnn"\n[measure]\nbatch = 0\n', "out of range"),
        ("model = [", "not valid TOML"),
    ],
)
def test_bad_recipes_exit_2_with_one_line(tmp_path, capsys, text, fragment):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(text)
    assert main(["run", str(recipe), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1


def test_info_on_a_broken_file_exits_2(tmp_path, capsys):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    assert main(["info", str(bad)]) == 2
    assert "broken.onnx" in capsys.readouterr().err


def test_version_and_help_from_python_m():
    out = subprocess.run([sys.executable, "-m", "tugboat", "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("tugboat ")
    for cmd in (["--help"], ["info", "--help"], ["run", "--help"], ["sweep", "--help"], ["report", "--help"]):
        res = subprocess.run([sys.executable, "-m", "tugboat", *cmd], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and "usage: tugboat" in res.stdout
