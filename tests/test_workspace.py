"""The workspace folder: API round trip, crash recovery, and a real sweep killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest

from sweep_support import report_schema, write_recipe
from tugboat.engine.measuring.runtime import run_onnx
from tugboat.engine.running.variants import Variant
from tugboat.engine.running.workspace import Workspace, WorkspaceError

ROOT = Path(__file__).resolve().parents[1]


def _metrics(size: int, latency: float, accuracy: float) -> dict:
    return {"size_bytes": size, "compressed_bytes": size, "params": 10, "nonzero_params": 10, "flops": 1,
            "latency_ms": {"median": latency, "p90": latency, "batch": 1, "threads": 1, "runtime": "onnxruntime"},
            "accuracy": accuracy, "fidelity": {"top1_agreement": 1.0, "cosine": 1.0, "rel_error": 0.0}}


def test_api_round_trip_with_artifacts(tmp_path, demo_models, demo_data):
    handle = demo_models("digits-mlp")
    ws = Workspace.create(tmp_path / "ws", model="demo:digits-mlp", data="demo:digits")
    ws.set_baseline(Variant("baseline", {"model": "demo:digits-mlp", "steps": []}, _metrics(100, 1.0, 0.99),
                            handle=handle))
    a = ws.add_variant(Variant("a", {"model": "demo:digits-mlp", "steps": []}, _metrics(50, 0.5, 0.9),
                               handle=handle, warnings=["careful"]))
    b = ws.add_variant(Variant("a", {"model": "demo:digits-mlp", "steps": []}, _metrics(60, 0.6, 0.8)))
    failed = ws.add_variant(Variant("broken", {"steps": []}, status="failed", error="numerical failure: NaN"))
    assert (a, b, failed) == ("a", "a (2)", "broken")
    assert ws.pareto() == ["baseline", "a"]  # "a (2)" is dominated by "a"

    again = Workspace.open(tmp_path / "ws")
    assert again.names() == ["a", "a (2)", "broken"]
    assert again.get("a").warnings == ["careful"] and again.get("broken").error == "numerical failure: NaN"
    assert again.get("a").metrics == ws.get("a").metrics
    assert again.baseline.metrics["size_bytes"] == 100
    # handles come back lazily from the ONNX artifact and compute the same outputs
    reloaded = again.load_handle("a")
    x = demo_data.split("test", limit=8)[0]["input"]
    np.testing.assert_allclose(run_onnx(reloaded.to_onnx(), [x])[0], run_onnx(handle.to_onnx(), [x])[0], atol=1e-5)
    with pytest.raises(WorkspaceError):
        again.load_handle("a (2)")  # no artifact was written for it

    report = json.loads((tmp_path / "ws" / "report.json").read_text())
    jsonschema.validate(report, report_schema())
    assert [v["name"] for v in report["failed"]] == ["broken"]
    assert report["pareto"] == ["baseline", "a"]

    again.remove_variant("a")
    assert not (tmp_path / "ws" / "a").exists()
    assert Workspace.open(tmp_path / "ws").names() == ["a (2)", "broken"]


def test_reopen_recovers_a_variant_written_just_before_a_crash(tmp_path):
    ws = Workspace.create(tmp_path / "ws", model="m")
    ws.add_variant(Variant("one", {"steps": []}, _metrics(5, 1.0, 0.5)))
    # a process killed after the variant's folder but before workspace.json was rewritten
    saved = (tmp_path / "ws" / "workspace.json").read_bytes()
    ws.add_variant(Variant("two", {"steps": []}, _metrics(4, 1.0, 0.5)))
    (tmp_path / "ws" / "workspace.json").write_bytes(saved)
    (tmp_path / "ws" / "two" / ".metrics.json.tugboat-abc.tmp").write_text('{"half')  # a torn temp file
    again = Workspace.open(tmp_path / "ws")
    assert again.names() == ["one", "two"]
    assert not list((tmp_path / "ws").glob("**/*.tmp"))
    assert json.loads((tmp_path / "ws" / "workspace.json").read_text())["variants"][1]["name"] == "two"


def test_open_refuses_what_is_not_a_workspace(tmp_path):
    with pytest.raises(WorkspaceError, match="not a Tugboat workspace"):
        Workspace.open(tmp_path)
    (tmp_path / "workspace.json").write_text("{not json")
    with pytest.raises(WorkspaceError, match="cannot be read"):
        Workspace.open(tmp_path)
    (tmp_path / "workspace.json").write_text('{"version": 99}')
    with pytest.raises(WorkspaceError, match="newer Tugboat"):
        Workspace.open(tmp_path)


KILL_RECIPE = """
[[steps]]
technique = "prune"
method = "structured"
finetune_epochs = 0
[sweep]
"steps.0.ratio" = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
"""


def _sweep(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "tugboat", "sweep", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_sigkilled_sweep_resumes_without_recomputing_and_leaves_no_corrupt_file(tmp_path):
    recipe = write_recipe(tmp_path, KILL_RECIPE)
    out = tmp_path / "ws"
    proc = _sweep([str(recipe), "--out", str(out)])
    deadline = time.monotonic() + 180
    done: list[Path] = []
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            done = [p for p in out.glob("prune-*/metrics.json")]
            if len(done) >= 2:
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, "the sweep finished before it could be killed"
    assert 2 <= len(done) < 6

    # nothing torn: every JSON parses, every ONNX file loads and checks
    for path in out.rglob("*.json"):
        json.loads(path.read_text())
    for path in out.rglob("*.onnx"):
        onnx.checker.check_model(onnx.load(str(path)))
    finished = {p.parent.name: (p.stat().st_mtime_ns, (p.parent / "model.onnx").stat().st_mtime_ns)
                for p in out.glob("prune-*/metrics.json")}

    resumed = _sweep([str(recipe), "--out", str(out), "--resume"])
    log, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, log
    assert f"resuming: {len(finished)} finished variant(s) kept" in log
    ran = [line.split()[1].rstrip(":") for line in log.splitlines() if line.startswith("done ")]
    assert not set(ran) & set(finished) and len(ran) + len(finished) == 6
    for name, stamps in finished.items():  # finished variants untouched
        folder = out / name
        assert ((folder / "metrics.json").stat().st_mtime_ns, (folder / "model.onnx").stat().st_mtime_ns) == stamps

    ws = Workspace.open(out)
    assert len(ws) == 6 and all(v.status == "ok" for v in ws.variants())
    for path in out.rglob("*.json"):
        json.loads(path.read_text())
    assert not list(out.rglob("*.tmp"))
    report = json.loads((out / "report.json").read_text())
    jsonschema.validate(report, report_schema())
    assert len(report["variants"]) == 6 and report["pareto"]
