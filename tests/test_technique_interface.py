"""A technique is one module with one complete interface: a toy technique registered from this test
is validated, estimated, memory-checked, named, run by `tugboat run` and given a GUI panel, with no
change anywhere else. And the built-in techniques keep each default and each bound in one place."""

from __future__ import annotations

import ast
import copy
import dataclasses
import inspect
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from sweep_support import FAST_MEASURE
from tugboat.cli import main
from tugboat.engine.errors import RecipeError
from tugboat.engine.measuring import diagnose, memory
from tugboat.engine.running.capabilities import capabilities
from tugboat.engine.running.recipe import parse_recipe
from tugboat.engine.running.variants import step_label, variant_name
from tugboat.engine.techniques import distill, estimate, prune, qat, quantize, steps
from tugboat.engine.techniques.technique import Param, Technique


def _zero_smallest(handle, params, data, progress):
    """Zero the ``ratio`` smallest weights of every Conv / Linear layer (a toy magnitude pruner)."""
    params = TOY.complete(params)
    module = copy.deepcopy(handle.torch_module())
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                w = m.weight.view(-1)
                w[w.abs().argsort()[: int(w.numel() * params["ratio"])]] = 0.0
    progress.update(1.0, "zeroed")
    return handle.derive(module=module)


def _estimate_zeroing(step, est) -> bool:
    est.sparsify(step["ratio"])
    return True


def _memory_of_zeroing(step, mem) -> None:
    if step["epochs"] > 0:
        mem.training("toy training")


TOY = Technique(
    name="toyzero", title="Toy zeroing", summary="Zeroes the smallest weights (test only).",
    methods={"magnitude": "the smallest weights of each layer"},
    params=[Param("ratio", "float", 0.3, "share of each layer's weights zeroed", 0.0, 0.9, short="z"),
            Param("epochs", "int", 0, "pretend training epochs (memory phases only)", 0, 10),
            Param("batch_size", "int", 64, "pretend training batch", 1, 65536)],
    apply=_zero_smallest, estimate=_estimate_zeroing, memory=_memory_of_zeroing,
    unavailable=lambda method, handle, data: None if data is None or len(data) >= 100 else "needs 100 samples")


@pytest.fixture
def toy():
    steps.register(TOY)
    yield TOY
    steps.unregister(TOY.name)


def test_the_toy_is_validated_like_any_technique(toy):
    recipe = parse_recipe({"model": "demo:digits-mlp", "steps": [{"technique": "toyzero", "ratio": 0.5}]})
    assert recipe.steps == [{"technique": "toyzero", "method": "magnitude", "ratio": 0.5, "epochs": 0,
                             "batch_size": 64}]
    with pytest.raises(RecipeError, match=r"'steps\.0\.ratio' = 0\.95 is out of range \[0\.0, 0\.9\]"):
        parse_recipe({"model": "demo:digits-mlp", "steps": [{"technique": "toyzero", "ratio": 0.95}]})
    with pytest.raises(RecipeError, match=r"unknown toyzero parameter 'ratoi'.*did you mean 'ratio'"):
        parse_recipe({"model": "demo:digits-mlp", "steps": [{"technique": "toyzero", "ratoi": 0.5}]})
    assert "toyzero" in steps.techniques() and list(steps.techniques())[:3] == ["distill", "prune", "quantize"]
    assert step_label(recipe.steps[0]) == "toyzero-magnitude-z0.5"
    assert variant_name([*recipe.steps, recipe.steps[0]]) == "toyzero-magnitude-z0.5+toyzero-magnitude-z0.5"


def test_the_toy_runs_headless_and_its_estimate_matches_what_ran(toy, tmp_path, demo_models, capsys):
    path = tmp_path / "toy.toml"
    path.write_text('model = "demo:digits-mlp"\ndata = "demo:digits"\n'
                    '[[steps]]\ntechnique = "toyzero"\nratio = 0.5\n' + FAST_MEASURE)
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    [variant] = report["variants"]
    assert variant["name"] == "toyzero-magnitude-z0.5" and variant["status"] == "ok"
    base, got = report["baseline"]["metrics"], variant["metrics"]
    assert got["nonzero_params"] < 0.6 * base["nonzero_params"]  # half of the weights are zeros now
    profile = estimate.build_profile(demo_models("digits-mlp"), base)
    est = estimate.estimate(profile, [variant["recipe"]["steps"][0]])
    assert est is not None and est["estimated"]
    assert abs(est["nonzero_params"] / got["nonzero_params"] - 1) < 0.05
    assert est["size_bytes"] == pytest.approx(base["size_bytes"], rel=0.05)  # zeros keep their bytes


def test_the_toy_says_when_it_cannot_run(toy, demo_models, demo_data):
    handle = demo_models("digits-mlp")
    assert capabilities(handle, demo_data)["toyzero"] == {"magnitude": None}
    few = dataclasses.replace(demo_data, inputs={k: v[:10] for k, v in demo_data.inputs.items()})
    assert capabilities(handle, few)["toyzero"] == {"magnitude": "needs 100 samples"}
    onnx_only = handle.derive(module=None, onnx_model=handle.to_onnx())
    assert capabilities(onnx_only)["toyzero"]["magnitude"].startswith("needs a torch model")


def test_the_toy_declares_its_memory_phases(toy, demo_models, demo_data):
    handle = demo_models("digits-mlp")
    step = TOY.validate({"epochs": 1, "batch_size": 4096}, "s")
    big = memory.estimate(handle, [step], demo_data, None)
    assert big.phase.name == "toy training in steps.0 (toyzero magnitude)"
    assert big.phase.knob == "steps.0.batch_size" and big.phase.batch == 4096
    idle = memory.estimate(handle, [{**step, "epochs": 0}], demo_data, None)
    assert not any("toy training" in p.name for p in idle.phases) and idle.peak < big.peak


def test_after_a_final_step_only_a_fresh_student_is_estimated(demo_models, demo_data):
    handle = demo_models("digits-cnn")
    profile = estimate.build_profile(handle, {"size_bytes": 400_000, "flops": 1_000_000})
    quant = steps.get("quantize").validate({"method": "static-int8"}, "s")
    family = steps.get("distill").validate({"width": 0.25}, "s")
    prune_step = steps.get("prune").validate({"ratio": 0.5}, "s")
    assert estimate.estimate(profile, [quant, prune_step]) is None  # nothing edits an int8 graph
    after = estimate.estimate(profile, [quant, family])
    assert after is not None and after == estimate.estimate(profile, [family])


def test_a_technique_without_hooks_is_not_estimated_and_only_holds_its_model(toy, demo_models):
    bare = Technique(name="bare", title="Bare", summary="no hooks", methods={"only": "the one"},
                     params=[], apply=lambda handle, params, data, progress: handle)
    steps.register(bare)
    try:
        profile = estimate.build_profile(demo_models("digits-mlp"), {"size_bytes": 1000})
        assert estimate.estimate(profile, [{"technique": "bare", "method": "only"}]) is None
        stats = memory.model_stats(demo_models("digits-mlp"))
        [phase] = memory.step_phases(0, {"technique": "bare", "method": "only"}, stats, None)
        assert phase.name == "steps.0 (bare only): the new model"
        assert step_label({"technique": "bare", "method": "only"}) == "bare-only"
    finally:
        steps.unregister("bare")


def test_the_toy_gets_a_panel_in_the_window_list(qtbot, toy):
    from tugboat.ui.technique_panel import build_panels

    panels = build_panels()
    for panel in panels.values():
        qtbot.addWidget(panel)
    assert list(panels)[:3] == ["distill", "prune", "quantize"] and "toyzero" in panels
    assert set(panels["toyzero"].controls) == {"ratio", "epochs", "batch_size"}
    assert panels["toyzero"].step() == TOY.validate({"technique": "toyzero"}, "t")


# --- the built-in techniques: one default, one bound, one parser -----------------------------------

def test_no_default_is_restated_outside_its_param():
    """``params.get("ratio", 0.5)`` beside ``Param("ratio", ..., 0.5)`` is how defaults drifted apart
    (prune's scope was "uniform" in the schema and "global" in apply): none is left in the techniques
    and the modules that read their steps."""
    names = {p.name for tech in steps.techniques().values() for p in tech.params}
    offenders = []
    for module in (prune, quantize, qat, distill, estimate, memory, diagnose):
        tree = ast.parse(inspect.getsource(module))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                    and ast.unparse(node.func.value).split(".")[-1] in ("params", "step", "quant_params")
                    and len(node.args) == 2 and isinstance(node.args[0], ast.Constant)
                    and node.args[0].value in names):
                offenders.append(f"{Path(module.__file__).name}:{node.lineno} {ast.unparse(node)}")
    assert not offenders, "defaults restated outside the schema:\n" + "\n".join(offenders)


def test_prune_has_one_ratio_bound_and_one_layer_ratio_parser():
    tech = steps.get("prune")
    assert tech.param("ratio").maximum == prune.MAX_RATIO
    assert prune.parse_layer_ratios([f"a={prune.MAX_RATIO}"]) == {"a": prune.MAX_RATIO}
    with pytest.raises(RecipeError, match=r"'steps\.0\.layer_ratios': 'features\.3=0\.99'"):
        parse_recipe({"model": "demo:digits-cnn",
                      "steps": [{"technique": "prune", "layer_ratios": ["features.3=0.99"]}]})
    with pytest.raises(RecipeError, match=r"'steps\.0\.ratio' = 0\.97 is out of range \[0\.0, 0\.95\]"):
        parse_recipe({"model": "demo:digits-cnn", "steps": [{"technique": "prune", "ratio": 0.97}]})
    # the Layers view reads the same entries, skipping a half-typed one instead of raising
    assert prune.parse_layer_ratios(["a=0.2", "b=", "c=0.99"], skip_bad=True) == {"a": 0.2}


def test_prune_scope_defaults_to_the_schema_for_direct_callers(demo_models):
    handle = demo_models("digits-mlp")
    out = prune.apply(handle, {"method": "unstructured", "ratio": 0.5, "finetune_epochs": 0}, None, _null())
    assert out.info["pruning"]["scope"] == steps.get("prune").param("scope").default == "uniform"
    assert inspect.signature(prune.prune_unstructured_module).parameters["scope"].default == "uniform"


def test_quantize_resolves_the_kept_layers_once(demo_models, monkeypatch):
    calls = []
    real = quantize._resolve_names
    monkeypatch.setattr(quantize, "_resolve_names", lambda *a: calls.append(a[1]) or real(*a))
    handle = demo_models("digits-mlp")
    layer = next(n for n, m in handle.module.named_modules() if isinstance(m, nn.Linear))
    out = quantize.apply(handle, {"method": "dynamic-int8", "exclude": [layer]}, None, _null())
    assert calls == [[layer]]
    assert out.info["quantize"]["method"] == "dynamic-int8"
    # auto picks dynamic int8 for a Linear-only model and runs it with that method's own defaults
    auto = quantize.apply(handle, {"exclude": [layer]}, None, _null())
    assert auto.info["quantize"]["auto"]["method"] == "dynamic-int8" and calls == [[layer], [layer]]
    assert sum(n.op_type == "MatMulInteger" for n in auto.onnx_model.graph.node) >= 1


def _null():
    from tugboat.engine.progress import null_progress

    return null_progress()
