"""The instant estimator against real measurements on the demo zoo (engine only, no Qt).

The ghost point the chart shows while a slider moves must land near where the real variant lands:
size within 10% for quantization and structured pruning on demo:digits-cnn, measured here.
"""

from __future__ import annotations

import pytest

from helpers import FAST
from tugboat.engine.measuring.measure import layer_table
from tugboat.engine.running.recipe import Recipe, validate_steps
from tugboat.engine.running.runner import prepare, run_variant
from tugboat.engine.techniques.estimate import build_profile, estimate, estimate_errors, estimate_quality

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def cnn():
    recipe = Recipe(model="demo:digits-cnn", data="demo:digits", measure=FAST)
    base = prepare(recipe)
    profile = build_profile(base.handle, base.metrics, layer_table(base.handle))
    return recipe, base, profile


def _measure(recipe, base, steps):
    v = run_variant(base, recipe.with_steps(validate_steps(steps)))
    assert v.status == "ok", v.error
    return v.metrics


def test_estimate_of_no_steps_is_the_baseline(cnn):
    _, base, profile = cnn
    est = estimate(profile, [])
    assert est["estimated"] is True
    for key, err in estimate_errors(est, base.metrics).items():
        assert abs(err) < 1e-6, (key, err)


@pytest.mark.parametrize("steps", [
    [{"technique": "quantize", "method": "static-int8"}],
    [{"technique": "quantize", "method": "fp16"}],
    [{"technique": "quantize", "method": "weight-only-int4"}],
    [{"technique": "prune", "method": "structured", "ratio": 0.3, "finetune_epochs": 0}],
    [{"technique": "prune", "method": "structured", "ratio": 0.6, "finetune_epochs": 0}],
    [{"technique": "prune", "method": "structured", "ratio": 0.5, "finetune_epochs": 0},
     {"technique": "quantize", "method": "static-int8"}],
], ids=lambda s: "+".join(f"{x['technique']}-{x['method']}-{x.get('ratio', '')}" for x in s))
def test_size_estimate_within_ten_percent_of_measurement(cnn, steps):
    recipe, base, profile = cnn
    steps = validate_steps(steps)
    est = estimate(profile, steps)
    measured = _measure(recipe, base, steps)
    errors = estimate_errors(est, measured)
    assert abs(errors["size_bytes"]) <= 0.10, errors
    assert abs(errors["compressed_bytes"]) <= 0.20, errors
    assert abs(errors["params"]) <= 0.10, errors
    if all(s["technique"] == "quantize" for s in steps):  # one count: the float model's, exactly
        assert est["params"] == measured["params"] == base.metrics["params"]
    # the estimate must track the change, not just sit at the baseline
    assert measured["size_bytes"] < 0.8 * base.metrics["size_bytes"]
    if steps[0]["technique"] == "prune":
        assert abs(errors["flops"]) <= 0.10, errors


def test_unstructured_estimate_keeps_size_and_shrinks_compressed(cnn):
    recipe, base, profile = cnn
    steps = validate_steps([{"technique": "prune", "method": "unstructured", "ratio": 0.6,
                             "finetune_epochs": 0}])
    est = estimate(profile, steps)
    measured = _measure(recipe, base, steps)
    errors = estimate_errors(est, measured)
    assert abs(errors["size_bytes"]) <= 0.05 and abs(errors["compressed_bytes"]) <= 0.15, errors
    assert est["nonzero_params"] < 0.5 * est["params"]


def test_estimate_is_monotonic_in_the_pruning_ratio(cnn):
    _, _, profile = cnn
    sizes = [estimate(profile, [{"technique": "prune", "method": "structured", "ratio": r}])["size_bytes"]
             for r in (0.1, 0.3, 0.5, 0.7, 0.9)]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < sizes[0] / 10


def test_onnx_only_model_cannot_be_estimated_for_pruning(cnn):
    _, _, profile = cnn
    from dataclasses import replace

    onnx_only = replace(profile, torch=False)
    assert estimate(onnx_only, [{"technique": "prune", "method": "structured", "ratio": 0.5}]) is None
    assert estimate(onnx_only, [{"technique": "quantize", "method": "fp16"}]) is not None
    # nothing follows a quantize step
    assert estimate(profile, [{"technique": "quantize", "method": "fp16"},
                              {"technique": "prune", "method": "structured", "ratio": 0.5}]) is None


def test_quality_is_interpolated_between_measured_neighbours():
    def step(r):
        return [{"technique": "prune", "method": "structured", "ratio": r}]

    measured = [(step(0.2), {"accuracy": 0.9, "fidelity": {"top1_agreement": 0.95}}),
                (step(0.6), {"accuracy": 0.5, "fidelity": {"top1_agreement": 0.55}}),
                ([{"technique": "quantize", "method": "fp16"}], {"accuracy": 0.1})]
    est = estimate_quality(step(0.5), measured, {"accuracy": 0.99, "quality_estimated": False})
    assert est["quality_estimated"] is True
    assert est["accuracy"] == pytest.approx(0.6)
    assert est["fidelity"]["top1_agreement"] == pytest.approx(0.65)
    outside = estimate_quality(step(0.9), measured, {"accuracy": 0.99})
    assert outside["accuracy"] == pytest.approx(0.5)
    none = estimate_quality([{"technique": "distill", "method": "kd"}], measured, {"accuracy": 0.99})
    assert none["accuracy"] == 0.99 and not none.get("quality_estimated")
