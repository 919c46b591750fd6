"""NaN / overflow guards: a step whose model outputs NaN or Inf makes a failed variant naming the
step, in the API, in a sweep (which goes on) and in ``tugboat run`` (non-zero exit, clear message)."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from sweep_support import write_recipe
from tugboat.cli import main
from tugboat.engine.errors import NumericalError
from tugboat.engine.measuring.guards import non_finite
from tugboat.engine.progress import null_progress
from tugboat.engine.running.recipe import Recipe, load_recipe
from tugboat.engine.running.runner import apply_steps, prepare, run_variant
from tugboat.engine.running.sweep import run_sweep
from tugboat.engine.techniques import quantize
from tugboat.engine.techniques import steps as step_registry
from tugboat.engine.techniques.steps import Param, Technique


def _corrupt(handle, params, data, progress):
    """Test-only step: sets one weight tensor of a copy of the model to NaN (or Inf)."""
    module = copy.deepcopy(handle.torch_module())
    value = {"nan": float("nan"), "inf": float("inf"), "none": None}[params["method"]]
    if value is not None:
        with torch.no_grad():
            next(module.parameters()).fill_(value)
    progress.update(1.0, "corrupted")
    return handle.derive(module=module)


@pytest.fixture
def corrupt(monkeypatch):
    step_registry.techniques()
    tech = Technique(name="corrupt", title="Corrupt (test only)", summary="NaN weights",
                     methods={"nan": "NaN weights", "inf": "Inf weights", "none": "unchanged"},
                     params=[Param("level", "float", 1.0, "for sweeps", minimum=0.0, maximum=10.0)],
                     apply=_corrupt, default_method="nan")
    monkeypatch.setitem(step_registry._REGISTRY, "corrupt", tech)
    return tech


STEPS = """
[[steps]]
technique = "prune"
method = "unstructured"
ratio = 0.3
finetune_epochs = 0
[[steps]]
technique = "corrupt"
method = "nan"
"""


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("guards")
    return prepare(load_recipe(write_recipe(folder, "")))


def test_nan_weights_make_a_failed_variant_naming_the_step(corrupt, base, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, STEPS))
    v = run_variant(base, recipe)
    assert v.status == "failed"
    assert "outputs are NaN after step 2 (corrupt nan)" in v.error
    assert v.metrics == {}  # no garbage numbers

    inf = run_variant(base, recipe.with_steps([recipe.steps[0], {**recipe.steps[1], "method": "inf"}]))
    assert inf.status == "failed" and "after step 2 (corrupt inf)" in inf.error
    assert ("Inf" in inf.error) or ("NaN" in inf.error)  # Inf weights can also make Inf - Inf = NaN

    ok = run_variant(base, recipe.with_steps([recipe.steps[0], {**recipe.steps[1], "method": "none"}]))
    assert ok.status == "ok" and ok.metrics["accuracy"] > 0.5


def test_a_real_step_that_breaks_the_onnx_graph_is_caught(base, monkeypatch):
    """static-int8 returning a graph with NaN weights (ONNX-only model: probed in ONNX Runtime)."""
    original = quantize.static_int8

    def broken(model, *args, **kwargs):
        q = original(model, *args, **kwargs)
        for init in q.graph.initializer:  # every float tensor (the scales of the QDQ graph)
            arr = numpy_helper.to_array(init)
            if arr.dtype == np.float32:
                init.CopyFrom(numpy_helper.from_array(np.full_like(arr, np.nan), init.name))
        onnx.checker.check_model(q)
        return q

    monkeypatch.setattr(quantize, "static_int8", broken)
    recipe = Recipe("demo:digits-cnn", "demo:digits", measure=base.cfg).with_steps(
        [step_registry.get("quantize").validate({"method": "static-int8", "calibration_samples": 64}, "s")])
    v = run_variant(base, recipe)
    assert v.status == "failed", v.metrics
    assert "outputs are NaN after step 1 (quantize static-int8)" in v.error


def test_apply_steps_numbers_steps_across_a_reused_prefix(corrupt, base):
    assert non_finite([np.asarray([1.0, np.inf])]) == "Inf"
    assert non_finite([np.asarray([np.nan, np.inf])]) == "NaN and Inf"
    assert non_finite([np.asarray([1, 2])]) is None
    step = step_registry.get("corrupt").validate({"method": "nan"}, "s")
    with pytest.raises(NumericalError, match=r"outputs are NaN after step 3 \(corrupt nan\)"):
        apply_steps(base.handle, [step], base.data, null_progress(), first_index=2)


def test_sweep_records_the_failure_and_goes_on(corrupt, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, """
[[steps]]
technique = "corrupt"
method = "none"
[sweep]
"steps.0.method" = ["none", "nan", "none"]
"steps.0.level" = [1.0, 2.0]
"""))
    result = run_sweep(recipe, tmp_path / "ws")
    by = {v.name: v for v in result.variants}
    failed = [v for v in by.values() if v.status == "failed"]
    ok = [v for v in by.values() if v.status == "ok"]
    assert len(failed) == 2 and len(ok) == 2, {n: (v.status, v.error) for n, v in by.items()}
    assert all("outputs are NaN after step 1 (corrupt nan)" in v.error for v in failed)
    assert all(v.metrics.get("accuracy") for v in ok)
    report = json.loads((tmp_path / "ws" / "report.json").read_text())
    assert {v["name"] for v in report["failed"]} == {v.name for v in failed}
    assert all("NaN" in v["error"] for v in report["failed"])


def test_tugboat_run_exits_non_zero_with_the_reason(corrupt, tmp_path, capsys):
    recipe = write_recipe(tmp_path, STEPS)
    code = main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quiet"])
    out = capsys.readouterr()
    assert code != 0
    assert "outputs are NaN after step 2 (corrupt nan)" in out.out + out.err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["variants"][0]["status"] == "failed"
    assert not list((tmp_path / "out").glob("prune*.onnx"))  # no artifact for the broken variant


def test_a_model_with_nan_outputs_is_refused_at_load(tmp_path, demo_models, capsys):
    handle = demo_models("digits-mlp")
    module = copy.deepcopy(handle.module)
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(float("nan"))
    path = tmp_path / "broken.pth"
    torch.save(module.state_dict(), path)
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'model = "{path}"\narch = "digits-mlp"\ndata = "demo:digits"\n')
    code = main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "broken.pth" in err and "NaN" in err, err
