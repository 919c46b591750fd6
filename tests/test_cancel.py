"""Cancellation: every job type stops within 1 s of the request, at any point, and leaves no
partial artifact, temp file or workspace entry.

Each test starts real work with a Progress whose token a timer thread cancels a short delay after a
chosen phase has begun (so the cancel lands mid-work, not before or after it), then measures the
time from the cancel to the job's end. Latencies are printed (``-s``) for the README figures.
"""

from __future__ import annotations

import re
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from helpers import Wide
from sweep_support import write_recipe
from tugboat.engine import cancellable
from tugboat.engine.errors import Cancelled
from tugboat.engine.io.export import export_variant
from tugboat.engine.io.models import ModelHandle, TensorSpec
from tugboat.engine.measuring.measure import MeasureConfig
from tugboat.engine.progress import CancelToken, Progress
from tugboat.engine.running.recipe import Recipe, load_recipe
from tugboat.engine.running.runner import prepare, run, run_variant
from tugboat.engine.running.sweep import run_sweep
from tugboat.engine.running.workspace import Workspace
from tugboat.engine.techniques import steps as step_registry

BOUND_S = 1.0
QUICK = MeasureConfig(batch=32, min_runs=3, min_seconds=0.0, max_seconds=0.5, warmup=1, also_batch1=False,
                      both_runtimes=False, threads=1)
LATENCIES: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _print_latencies():
    """The worst latency per job type, printed after the module (``-s``) for the README figures."""
    yield
    print("\ncancel latencies (worst per job type):")
    for kind, s in sorted(LATENCIES.items()):
        print(f"  {kind:<28} {s * 1000:6.0f} ms")


class CancelDuring:
    """A Progress cancelled from a timer thread ``delay`` s after a message matching ``pattern``."""

    def __init__(self, pattern: str, delay: float = 0.1):
        self.pattern, self.delay = re.compile(pattern), delay
        self.token = CancelToken()
        self.progress = Progress(self._on_update, self.token)
        self.timer: threading.Timer | None = None
        self.cancelled_at: float | None = None
        self.fraction_at_cancel: float | None = None
        self.last = (0.0, "")

    def _on_update(self, fraction: float, message: str) -> None:
        self.last = (fraction, message)
        if self.timer is None and self.pattern.search(message):
            self.timer = threading.Timer(self.delay, self._cancel)
            self.timer.start()

    def _cancel(self) -> None:
        self.fraction_at_cancel = self.last[0]
        self.cancelled_at = time.monotonic()
        self.token.cancel()

    def run(self, kind: str, fn) -> float:
        """Run ``fn(progress)``; assert it was cancelled mid-work and ended within the bound."""
        with pytest.raises(Cancelled):
            fn(self.progress)
        ended = time.monotonic()
        assert self.cancelled_at is not None, f"{kind}: the work ended before the cancel (no mid-work cancel)"
        latency = ended - self.cancelled_at
        LATENCIES[kind] = max(latency, LATENCIES.get(kind, 0.0))
        print(f"\ncancel latency {kind}: {latency * 1000:.0f} ms (at {self.fraction_at_cancel:.2f}: "
              f"{self.last[1]!r})")
        assert latency < BOUND_S, f"{kind}: ended {latency:.2f} s after the cancel"
        return latency


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """Temporary files of the engine and of ONNX Runtime go to a folder the test can inspect."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    yield tmp
    assert cancellable.wait_abandoned(30), "a cancelled helper is still running after 30 s"


def _leftovers(*folders: Path) -> list[str]:
    """Everything in ``folders`` except torch's compile cache (torch makes it on first use: not ours)."""
    return sorted(str(p) for f in folders if f.exists() for p in f.rglob("*")
                  if not p.relative_to(f).parts[0].startswith("torchinductor_"))


@pytest.fixture(scope="module")
def base():
    return prepare(Recipe("demo:digits-cnn", "demo:digits", measure=QUICK))


def _recipe(**step) -> Recipe:
    technique = step.pop("technique")
    return Recipe("demo:digits-cnn", "demo:digits", measure=QUICK).with_steps(
        [step_registry.get(technique).validate(step, "steps.0")])


def test_baseline_measure(scratch):
    slow = MeasureConfig(batch=64, min_runs=100000, min_seconds=60.0, max_seconds=60.0, threads=1,
                         also_batch1=False, both_runtimes=False)
    CancelDuring("measuring latency", 0.3).run(
        "baseline measure", lambda p: prepare(Recipe("demo:digits-cnn", "demo:digits", measure=slow), p))
    assert cancellable.wait_abandoned(5)
    assert _leftovers(scratch) == []


def test_prune_with_fine_tuning(base, scratch):
    recipe = _recipe(technique="prune", method="structured", ratio=0.5, finetune_epochs=200)
    CancelDuring("fine-tuning epoch", 0.3).run("prune + fine-tuning", lambda p: run_variant(base, recipe, p))
    assert cancellable.wait_abandoned(5)
    assert _leftovers(scratch) == []
    assert base.handle.history == []  # the original model untouched


def test_quantize_static_calibration(base, scratch):
    recipe = _recipe(technique="quantize", method="static-int8", calibration_samples=4096,
                     calibration="entropy")
    CancelDuring("calibrating: batch", 0.0).run("static-int8 calibration", lambda p: run_variant(base, recipe, p))
    assert cancellable.wait_abandoned(10)
    assert _leftovers(scratch) == []  # ONNX Runtime's and our temporary folders are gone


def test_quantize_aware_training(base, scratch):
    recipe = _recipe(technique="quantize", method="qat-int8", epochs=100)
    CancelDuring(r"QAT", 0.3).run("QAT int8", lambda p: run_variant(base, recipe, p))
    assert cancellable.wait_abandoned(5)
    assert _leftovers(scratch) == []


def test_distill(base, scratch):
    recipe = _recipe(technique="distill", epochs=200, patience=200, width=0.25)
    CancelDuring(r"epoch \d+/", 0.3).run("distill", lambda p: run_variant(base, recipe, p))
    assert cancellable.wait_abandoned(5)
    assert _leftovers(scratch) == []


def test_work_that_cannot_be_interrupted_is_still_left_within_the_bound(base, scratch, monkeypatch):
    """A step stuck in one long call that never checks the token (as one ONNX Runtime
    quantize_static call or torch-pruning's graph building is) still ends the job at once; the
    helper finishes in the background and its result is dropped."""
    from tugboat.engine.techniques.steps import Technique

    finished = threading.Event()

    def stall(handle, params, data, progress):
        progress.update(0.1, "stalling")
        time.sleep(2.0)  # no progress check in here
        finished.set()
        return handle.derive(module=handle.module)

    step_registry.techniques()
    monkeypatch.setitem(step_registry._REGISTRY, "stall", Technique(
        name="stall", title="Stall (test only)", summary="sleeps", methods={"sleep": "sleep"}, params=[],
        apply=stall))
    recipe = Recipe("demo:digits-cnn", "demo:digits", measure=QUICK).with_steps(
        [{"technique": "stall", "method": "sleep"}])
    CancelDuring("stalling", 0.3).run("uninterruptible step", lambda p: run_variant(base, recipe, p))
    assert not finished.is_set()  # the job ended while the call was still running
    assert cancellable.wait_abandoned(10) and finished.is_set()


def test_tugboat_run_writes_nothing_when_cancelled(tmp_path, scratch):
    recipe = load_recipe(write_recipe(tmp_path, """
[[steps]]
technique = "prune"
method = "structured"
finetune_epochs = 200
"""))
    out = tmp_path / "out"
    CancelDuring("fine-tuning epoch", 0.2).run("run (recipe)", lambda p: run(recipe, out, p))
    assert _leftovers(out) == []


def test_sweep_keeps_finished_variants_and_adds_no_partial_entry(tmp_path, scratch):
    recipe = load_recipe(write_recipe(tmp_path, """
[[steps]]
technique = "prune"
method = "structured"
[sweep]
"steps.0.finetune_epochs" = [1, 200]
"""))
    ws_path = tmp_path / "ws"
    CancelDuring(r"\[2/2\].*fine-tuning epoch", 0.2).run("sweep", lambda p: run_sweep(recipe, ws_path, progress=p))
    ws = Workspace.open(ws_path)
    assert len(ws) == 1 and "finetune_epochs=1" in ws.names()[0], ws.names()
    folders = sorted(p.name for p in ws_path.iterdir() if p.is_dir())
    assert folders == sorted(["baseline", ws.folder(ws.names()[0]).name])  # none for the cancelled one
    assert not list(ws_path.rglob("*.tmp")) and not list(ws_path.rglob(".*"))
    assert cancellable.wait_abandoned(5)
    assert _leftovers(scratch) == []


def _wide_handle() -> ModelHandle:
    torch.manual_seed(0)
    return ModelHandle(Wide(1024, 6).eval(), [TensorSpec("input", (None, 64))], [TensorSpec("logits", (None, 10))],
                       "wide-test", "torch")


@pytest.mark.parametrize("kind", ["onnx", "torch"])
def test_export(tmp_path, scratch, kind):
    handle = _wide_handle()
    target = tmp_path / "out" / f"model.{'onnx' if kind == 'onnx' else 'pt2'}"
    export_variant(tmp_path / "ref" / target.name, kind, Progress(), handle=handle)  # warm-up
    t0 = time.monotonic()
    export_variant(tmp_path / "ref" / target.name, kind, Progress(), handle=handle)  # what a warm export takes
    full = time.monotonic() - t0  # (timed with the warm-up, a sixth of it could outlast the whole export)
    target.parent.mkdir()
    target.write_bytes(b"the previous export")
    c = CancelDuring("exporting", min(0.1, full / 6))
    c.run(f"export {kind}", lambda p: export_variant(target, kind, p, handle=handle))
    assert cancellable.wait_abandoned(30)
    assert target.read_bytes() == b"the previous export"  # the old file, untouched
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no temp file left
    assert _leftovers(scratch) == []


def test_prune_job_in_the_gui_queue(qtbot, base, scratch):
    from tugboat.jobs import CANCELLED, JobQueue

    queue = JobQueue()
    try:
        recipe = _recipe(technique="prune", method="structured", ratio=0.5, finetune_epochs=200)
        job = queue.submit(lambda p: run_variant(base, recipe, p), name="prune", kind="variant")
        finished = []
        job.finished.connect(finished.append)
        qtbot.waitUntil(lambda: "fine-tuning epoch" in job.message, timeout=60000)
        qtbot.wait(200)
        t0 = time.monotonic()
        with qtbot.waitSignal(job.cancelled, timeout=5000):
            job.cancel()
        latency = time.monotonic() - t0
        LATENCIES["prune job in the GUI queue"] = latency
        print(f"\ncancel latency GUI JobQueue prune: {latency * 1000:.0f} ms")
        assert job.state == CANCELLED and latency < BOUND_S and finished == []

        # an export job in the same queue, cancelled while it writes
        handle = _wide_handle()
        target = scratch.parent / "gui-export.onnx"
        export = queue.submit(lambda p: export_variant(target, "onnx", p, handle=handle), name="export")
        qtbot.waitUntil(lambda: export.is_running, timeout=5000)
        qtbot.wait(50)
        t0 = time.monotonic()
        with qtbot.waitSignal(export.cancelled, timeout=5000):
            export.cancel()
        latency = time.monotonic() - t0
        LATENCIES["export job in the GUI queue"] = latency
        print(f"\ncancel latency GUI JobQueue export: {latency * 1000:.0f} ms")
        assert latency < BOUND_S
        assert cancellable.wait_abandoned(30)
        assert not target.exists() and not list(scratch.parent.glob(".gui-export*"))
    finally:
        queue.shutdown(10)


def test_export_kinds_write_complete_files_only(tmp_path):
    """The other export kinds go through the same temp-file-and-rename path."""
    handle = _wide_handle()
    onnx_file = export_variant(tmp_path / "a.onnx", "onnx", Progress(), handle=handle)
    copy = export_variant(tmp_path / "b.onnx", "copy", Progress(), source=onnx_file)
    assert copy.read_bytes() == onnx_file.read_bytes()
    toml = export_variant(tmp_path / "r.toml", "recipe", Progress(), recipe={"model": "demo:x", "steps": []})
    assert 'model = "demo:x"' in toml.read_text()
    with pytest.raises(Exception, match="missing"):
        export_variant(tmp_path / "c.onnx", "copy", Progress(), source=tmp_path / "nope.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b.onnx", "r.toml"]


def test_onnx_runtime_calibration_itself_stops_at_the_next_batch(base, scratch):
    """Without the helper thread: ONNX Runtime's calibration loop calls our data reader per batch
    of 32 samples, and the reader's progress check raises through quantize_static, which removes
    its temporary folder on the way out."""
    import numpy as np

    from tugboat.engine.techniques.quantize import static_int8

    calib = [np.random.default_rng(0).random((3200, 1, 8, 8), dtype=np.float32)]
    c = CancelDuring(r"calibrating: batch 3/", 0.0)
    t0 = time.monotonic()
    c.run("ORT calibration (no helper)", lambda p: static_int8(base.handle.to_onnx(), base.handle.input_names,
                                                               calib, {"calibration": "minmax"}, p))
    assert c.last[1].startswith("calibrating: batch") and int(c.last[1].split()[2].split("/")[0]) <= 5
    assert time.monotonic() - t0 < 5
    assert _leftovers(scratch) == []
