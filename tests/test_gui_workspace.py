"""The window and the CLI share one workspace format: a `tugboat sweep` folder opens in the window
with all its variants, results made in the window land in it, and `tugboat report` reads what the
window saved."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import onnxruntime as ort
import pytest

from helpers import run_prune
from sweep_support import report_schema
from tugboat import cli
from tugboat.engine.measuring.measure import MeasureConfig
from tugboat.engine.running.recipe import parse_recipe
from tugboat.engine.running.sweep import run_sweep
from tugboat.engine.running.workspace import Workspace
from tugboat.ui.main_window import MainWindow

pytestmark = pytest.mark.timeout(240)

QUICK = {"batch": 16, "threads": 1, "warmup": 1, "min_runs": 3, "min_seconds": 0.0, "max_seconds": 0.2,
         "also_batch1": False, "both_runtimes": False}


def make_window(qtbot) -> MainWindow:
    w = MainWindow()
    qtbot.addWidget(w)
    w.session.measure = MeasureConfig(**QUICK)
    w.show()
    return w


def wait_idle(qtbot, window) -> None:
    qtbot.waitUntil(lambda: not window.queue.active(), timeout=120000)


def cli_report(capsys, path) -> str:
    capsys.readouterr()
    assert cli.main(["report", str(path)]) == 0
    return capsys.readouterr().out


def onnx_outputs(path, n: int = 4) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = [n if not isinstance(d, int) else d for d in inp.shape]
    return sess.run(None, {inp.name: np.random.default_rng(0).normal(size=shape).astype(np.float32)})[0]


def test_cli_sweep_workspace_opens_in_window_and_window_results_go_into_it(qtbot, tmp_path, capsys):
    out = tmp_path / "sweep"
    recipe = parse_recipe({"model": "demo:digits-cnn", "data": "demo:digits",
                           "steps": [{"technique": "prune", "method": "structured", "ratio": 0.3,
                                      "finetune_epochs": 0}],
                           "sweep": {"steps.0.ratio": [0.3, 0.6]}, "measure": QUICK})
    run_sweep(recipe, out)  # what `tugboat sweep recipe.toml --out DIR` runs
    made = Workspace.open(out)
    assert len(made) == 2 and made.baseline is not None

    window = make_window(qtbot)
    window.open_workspace(str(out))
    # the variants are in the table at once, before the model is loaded again
    assert set(window.store.names()) == {"baseline", *made.names()}
    assert window.results_table.model().rowCount() == 3
    with qtbot.waitSignal(window.session.baseline_ready, timeout=120000):
        pass
    assert set(window.store.names()) == {"baseline", *made.names()}
    for name in made.names():
        assert window.store.get(name).metrics == made.get(name).metrics
    # the baseline on record is kept: every variant there was compared with it
    assert window.store.baseline.metrics == made.baseline.metrics
    assert window.session.measure.batch == QUICK["batch"]

    v = run_prune(qtbot, window, 0.45)
    wait_idle(qtbot, window)
    again = Workspace.open(out)
    assert again.names() == [*made.names(), v.name]
    folder = again.folder(v.name)
    assert {"model.onnx", "recipe.toml", "metrics.json"} <= {p.name for p in folder.iterdir()}
    assert onnx_outputs(again.artifact_path(v.name)).shape == (4, 10)
    text = cli_report(capsys, out)
    for name in again.names():
        assert name in text
    jsonschema.validate(json.loads((out / "report.json").read_text()), report_schema())
    window.queue.shutdown(10)


def test_save_as_from_window_reopens_and_cli_reports_it(qtbot, tmp_path, capsys):
    window = make_window(qtbot)
    window.load_demo()
    with qtbot.waitSignal(window.session.baseline_ready, timeout=120000):
        pass
    v = run_prune(qtbot, window, 0.5)
    wait_idle(qtbot, window)
    autosaved = window.workspace
    assert autosaved is not None and v.name in Workspace.open(autosaved.path)  # autosave on finish

    saved = tmp_path / "saved"
    window.save_workspace_as(str(saved))
    wait_idle(qtbot, window)
    assert window.workspace.path == saved
    ws = Workspace.open(saved)
    assert ws.names() == [v.name] and ws.model == "demo:digits-cnn" and ws.data == "demo:digits"
    assert ws.baseline.metrics["size_bytes"] == window.store.baseline.metrics["size_bytes"]
    assert ws.get(v.name).metrics["params"] == v.metrics["params"]
    for name in ("baseline", v.name):
        assert onnx_outputs(ws.artifact_path(name)).shape == (4, 10)
    text = cli_report(capsys, saved)
    assert v.name in text and "baseline" in text
    jsonschema.validate(json.loads((saved / "report.json").read_text()), report_schema())
    window.close()

    # reopen in a new window; then save it again: variants without a model in memory are copied
    reopened = make_window(qtbot)
    assert reopened.settings.last_workspace == str(saved)
    reopened.restore_last_workspace()  # what `tugboat` with no argument does on start
    assert reopened.workspace.path == saved
    with qtbot.waitSignal(reopened.session.baseline_ready, timeout=120000):
        pass
    assert reopened.store.get(v.name).metrics == ws.get(v.name).metrics
    assert reopened.store.get(v.name).handle is None
    copy_path = tmp_path / "copy"
    reopened.save_workspace_as(str(copy_path))
    wait_idle(qtbot, reopened)
    copied = Workspace.open(copy_path)
    assert copied.names() == [v.name]
    assert copied.artifact_path(v.name).read_bytes() == ws.artifact_path(v.name).read_bytes()
    # a workspace that already holds results is not overwritten by "new"
    assert reopened.new_workspace(str(saved)) is None
    assert any("already holds a workspace" in n.label.text() for n in reopened.notifications.shown())
    reopened.queue.shutdown(10)


def test_folder_saved_by_early_window_builds_still_opens(qtbot, tmp_path):
    """The first window builds wrote artifacts/<name>.onnx beside workspace.json (never released)."""
    from tugboat.engine.io.export import write_onnx
    from tugboat.engine.io.loading import load_model

    old = tmp_path / "old"
    (old / "artifacts").mkdir(parents=True)
    write_onnx(load_model("demo:digits-mlp"), old / "artifacts" / "v1.onnx")
    metrics = {"size_bytes": 123, "compressed_bytes": 100, "params": 10, "nonzero_params": 10, "flops": 1,
               "latency_ms": {"median": 1.0, "p90": 1.0, "batch": 1, "threads": 1, "runtime": "onnxruntime"},
               "accuracy": 0.9, "fidelity": {"top1_agreement": 1.0, "cosine": 1.0, "rel_error": 0.0}}
    (old / "workspace.json").write_text(json.dumps({
        "version": 1, "model": "", "data": "", "measure": {}, "baseline": None,
        "variants": [{"name": "v1", "recipe": {"steps": []}, "metrics": metrics,
                      "artifacts": {"onnx": "artifacts/v1.onnx"}, "warnings": ["old"], "status": "ok"}]}))
    window = make_window(qtbot)
    assert window.open_workspace(str(old)) is not None
    assert window.store.get("v1").metrics["size_bytes"] == 123
    out = tmp_path / "v1.onnx"
    job = window.export_variant("v1", "onnx", str(out))
    with qtbot.waitSignal(job.finished, timeout=30000):
        pass
    assert onnx_outputs(out).shape == (4, 10)
    window.queue.shutdown(10)
