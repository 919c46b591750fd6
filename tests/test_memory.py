"""Memory: a job that cannot fit is refused before it starts; a job that runs out of memory anyway
(a real failed allocation) ends as a failed job with a message, and the next job still runs."""

from __future__ import annotations

import copy
import json
import os
import re

import pytest

from sweep_support import count_calls, write_recipe
from tugboat.cli import main
from tugboat.engine.errors import ResourceError
from tugboat.engine.io.loading import load_model
from tugboat.engine.measuring import memory
from tugboat.engine.running.recipe import load_recipe
from tugboat.engine.running.runner import prepare, run_variant
from tugboat.engine.running.sweep import run_sweep
from tugboat.engine.techniques import steps as step_registry
from tugboat.engine.techniques.steps import Param, Technique

HUGE = 1 << 60  # bytes: more than any address space, so the allocation fails even with overcommit

BIG_FINETUNE = """
[[steps]]
technique = "prune"
method = "structured"
ratio = 0.5
finetune_epochs = 1
batch_size = 4096
"""


def _hog(handle, params, data, progress):
    """Test-only step that really tries to allocate more memory than exists."""
    progress.update(0.5, "allocating")
    if params["method"] == "torch":
        import torch

        torch.empty(HUGE, dtype=torch.uint8)  # RuntimeError: DefaultCPUAllocator: can't allocate memory
    elif params["method"] == "numpy":
        import numpy as np

        np.empty(HUGE, dtype=np.uint8)  # MemoryError
    return handle.derive(module=copy.deepcopy(handle.torch_module()))


@pytest.fixture
def hog(monkeypatch):
    step_registry.techniques()
    tech = Technique(name="hog", title="Hog (test only)", summary="allocates too much",
                     methods={"torch": "torch.empty", "numpy": "np.empty", "none": "nothing"},
                     params=[Param("level", "float", 1.0, "for sweeps", minimum=0.0, maximum=10.0)],
                     apply=_hog, default_method="torch")
    monkeypatch.setitem(step_registry._REGISTRY, "hog", tech)
    return tech


@pytest.fixture
def low_memory(monkeypatch):
    monkeypatch.delenv("TUGBOAT_SKIP_MEMORY_CHECK", raising=False)
    monkeypatch.setattr(memory, "available_memory", lambda: 200 * 1024**2)


def test_available_memory_is_known_here():
    avail = memory.available_memory()
    assert avail is not None and 10 * 1024**2 < avail < 1 << 50


def test_estimate_grows_with_the_batch_and_the_suggestion_fits(demo_models, demo_data):
    handle = demo_models("digits-cnn")
    step = step_registry.get("prune").validate({"method": "structured", "finetune_epochs": 1}, "s")
    small = memory.estimate(handle, [{**step, "batch_size": 64}], demo_data, None)
    big = memory.estimate(handle, [{**step, "batch_size": 4096}], demo_data, None)
    stats = memory.model_stats(handle)
    tensors = [*handle.module.parameters(), *handle.module.buffers()]
    assert stats.param_bytes == sum(t.numel() * t.element_size() for t in tensors)
    assert big.peak > 10 * small.peak
    assert big.phase.knob == "steps.0.batch_size"
    budget = 200 * 1024**2
    fit = big.fits_batch(budget)
    assert fit is not None and fit < 4096
    again = memory.estimate(handle, [{**step, "batch_size": fit}], demo_data, None)
    assert again.peak <= budget


def _high_water_mark() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        return None


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to measure peaks")
def test_the_estimate_is_above_the_measured_peak_of_a_fine_tune(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, BIG_FINETUNE.replace("4096", "1024")))
    base = prepare(recipe.with_steps([]))
    est = memory.estimate(base.handle, recipe.steps, base.data, base.cfg)
    with open("/proc/self/status", encoding="ascii") as fh:
        before = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS"))
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")  # reset the high-water mark to the current size
    v = run_variant(base, recipe)
    peak = _high_water_mark() - before
    print(f"\nfine-tune at batch 1024: estimated {est.peak / 2**20:.0f} MB, measured peak +{peak / 2**20:.0f} MB")
    assert v.status == "ok"
    assert peak <= est.peak


def test_too_large_a_job_is_refused_before_it_starts(low_memory, tmp_path, monkeypatch, capsys):
    calls = count_calls(monkeypatch, "prune")
    recipe = write_recipe(tmp_path, BIG_FINETUNE)
    code = main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "needs about" in err and "available" in err
    suggested = int(re.search(r"lower steps\.0\.batch_size to (\d+) \(it is 4096\)", err).group(1))
    # the suggestion fits the (pretend) 200 MB, twice that would not
    step = load_recipe(recipe).steps[0]
    handle = load_model("demo:digits-cnn")
    cfg = load_recipe(recipe).measure
    budget = 0.9 * 200 * 1024**2
    assert memory.estimate(handle, [{**step, "batch_size": suggested}], None, cfg).peak <= budget
    assert memory.estimate(handle, [{**step, "batch_size": 2 * suggested}], None, cfg).peak > budget
    assert calls == []  # nothing ran
    assert not (tmp_path / "out" / "report.json").exists()

    # the same recipe as a sweep: refused before the workspace is created
    with pytest.raises(ResourceError, match=r"steps\.0\.batch_size"):
        run_sweep(load_recipe(recipe), tmp_path / "ws")
    assert not (tmp_path / "ws" / "workspace.json").exists()
    assert calls == []


def test_a_small_job_still_runs_with_little_memory(low_memory, tmp_path):
    recipe = write_recipe(tmp_path, BIG_FINETUNE.replace("4096", "64").replace("finetune_epochs = 1",
                                                                                "finetune_epochs = 0"))
    v = run_variant(prepare(load_recipe(recipe)), load_recipe(recipe))
    assert v.status == "ok"


@pytest.mark.parametrize("method", ["torch", "numpy"])
def test_out_of_memory_in_a_step_is_a_clear_error(hog, tmp_path, method, capsys):
    recipe = write_recipe(tmp_path, f'[[steps]]\ntechnique = "hog"\nmethod = "{method}"\n')
    code = main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"out of memory in step 1 (hog {method})" in err and "lower the batch size" in err
    assert "Traceback" not in err


def test_a_sweep_records_an_out_of_memory_variant_and_goes_on(hog, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, """
[[steps]]
technique = "hog"
method = "none"
[sweep]
"steps.0.method" = ["none", "torch"]
"steps.0.level" = [1.0, 2.0]
"""))
    result = run_sweep(recipe, tmp_path / "ws")
    status = sorted((v.status, (v.error or "")[:30]) for v in result.variants)
    assert [s for s, _ in status] == ["failed", "failed", "ok", "ok"]
    assert all(e.startswith("out of memory in step 1") for s, e in status if s == "failed")
    report = json.loads((tmp_path / "ws" / "report.json").read_text())
    assert len(report["failed"]) == 2 and len(report["variants"]) == 2


def test_out_of_memory_job_fails_in_the_queue_and_the_next_job_runs(qtbot, hog, tmp_path):
    from tugboat.jobs import DONE, FAILED, JobQueue

    recipe = load_recipe(write_recipe(tmp_path, '[[steps]]\ntechnique = "hog"\nmethod = "numpy"\n'))
    base = prepare(recipe.with_steps([]))
    queue = JobQueue()
    try:
        bad = queue.submit(lambda p: run_variant(base, recipe, p), name="hog variant")
        raw = queue.submit(lambda p: bytearray(HUGE), name="raw allocation")  # MemoryError outside the engine
        good = queue.submit(lambda p: run_variant(base, recipe.with_steps(
            [{"technique": "hog", "method": "none", "level": 1.0}]), p), name="next")
        with qtbot.waitSignal(good.finished, timeout=60000):
            pass
        assert bad.state == FAILED and raw.state == FAILED
        assert "out of memory in step 1 (hog numpy)" in bad.error
        assert raw.error.startswith("out of memory in raw allocation") and "batch size" in raw.error
        assert good.state == DONE and good.result.status == "ok"
    finally:
        queue.shutdown(10)
