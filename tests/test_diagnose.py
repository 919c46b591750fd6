"""Diagnose (engine): per-layer divergence of a variant from its original, ranked, with fixes.

The quantized case is a digits CNN with ONE layer made hard to quantize: ``features.7`` gets a
column of huge weights on an input channel that is always zero (its BatchNorm drives it below
the ReLU), so the float model computes exactly the same function, but per-channel int8 weights
of ``features.7`` lose everything except that column. Static int8 then collapses the accuracy;
the diagnosis must rank ``features.7`` first and keeping it in float must recover the accuracy.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tugboat.engine.errors import Cancelled, TugboatError
from tugboat.engine.measuring import diagnose as dg
from tugboat.engine.measuring.runtime import run_onnx
from tugboat.engine.progress import CancelToken, Progress, null_progress
from tugboat.engine.running.variants import Variant
from tugboat.engine.techniques import prune, quantize

CULPRIT = "features.7"


def hard_to_quantize(handle):
    """The demo CNN with features.7 made hard to quantize and the float function unchanged."""
    module = copy.deepcopy(handle.module)
    bn, conv = module.features[4], module.features[7]
    with torch.no_grad():
        bn.weight[0], bn.bias[0] = 0.0, -1.0  # channel 0 after the ReLU: always 0
        conv.weight[:, 0] = 50.0  # a weight range no int8 scale can share with the rest
    return handle.derive(module=module)


def static_int8(handle, data, **extra):
    params = {p.name: p.default for p in quantize.PARAMS if p.applies_to("static-int8")}
    # nearest rounding: GPTQ (the default) spreads the bad layer's rounding error so that int8 hardly
    # hurts, and these tests need a layer that breaks the model as a real culprit does
    params.update(method="static-int8", calibration_samples=64, rounding="nearest")
    params.update(extra)
    return quantize.apply(handle, params, data, null_progress())


def accuracy(model, data) -> float:
    xs, labels = data.split("test")
    return float(np.mean(run_onnx(model, [xs["input"]])[0].argmax(1) == labels))


@pytest.fixture(scope="module")
def broken(demo_models, demo_data):
    bad = hard_to_quantize(demo_models("digits-cnn"))
    return bad, static_int8(bad, demo_data)


def test_quantized_variant_ranks_the_bad_layer_first_and_float_recovers(broken, demo_data):
    bad, q = broken
    float_acc, int8_acc = accuracy(bad.to_onnx(), demo_data), accuracy(q.onnx_model, demo_data)
    assert int8_acc < float_acc - 0.3  # the one layer really breaks int8

    result = dg.diagnose(bad, q, demo_data, samples=96)
    assert result["kind"] == "quantize" and result["samples"] == 96 and result["split"] == "val"
    rows = result["rows"]
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    top = rows[0]
    assert top["layer"] == CULPRIT, [(r["layer"], r["score_db"]) for r in rows]
    # isolated: the culprit alone wrecks its own output and the model's; the others alone do not
    assert top["isolated"]["sqnr_db"] < 10 and top["impact"]["top1_agreement"] < 0.5
    others = rows[1:]
    assert others and all(r["isolated"]["sqnr_db"] > 20 and r["impact"]["top1_agreement"] > 0.9
                          for r in others)
    # accumulated: a layer after the culprit inherits its error, which isolation does not blame on it
    head = next(r for r in rows if r["layer"] == "classifier.3")
    assert head["accumulated"]["sqnr_db"] < 10 < head["isolated"]["sqnr_db"]
    for r in rows:
        assert -1.0 <= r["accumulated"]["cosine"] <= 1.0 and r["accumulated"]["max_abs"] >= 0

    # the three worst rows' fixes are measured: keeping the culprit in float restores the output
    assert top["if_float"]["top1_agreement"] > 0.95
    assert all(r["if_float"] is not None for r in rows[:3]) and all(r["if_float"] is None for r in rows[3:])
    # the row's fix: the variant's recipe with that node in the quantize step's exclude
    steps = [dict(q.history[-1])]
    fixed = dg.fixed_steps(steps, top["action"])
    assert fixed[0]["exclude"] == [top["node"]] and steps[0].get("exclude") == []
    params = {k: v for k, v in fixed[0].items() if k != "technique"}
    recovered = quantize.apply(bad, params, demo_data, null_progress())
    assert accuracy(recovered.onnx_model, demo_data) >= float_acc - 0.02


def test_quantize_advice_names_the_layer_diagnose_ranks_first(broken, demo_data):
    """One ranking for the app (engine/techniques/quant_error.py): the low-fidelity warning of the quantize
    step and the Diagnose view blame the same layer, the culprit, not a ReLU after it."""
    bad, q = broken
    check = q.info["quantize"]["fidelity_check"]
    ranking = check["ranking"]
    assert ranking[0]["layer"] == CULPRIT, [(r["layer"], r["impact"]["sqnr_db"]) for r in ranking]
    assert ranking[0]["name"] == CULPRIT and CULPRIT in check["suggested_exclude"]
    result = dg.diagnose(bad, q, demo_data, samples=32, verify=0)
    assert result["rows"][0]["node"] == ranking[0]["node"]
    assert [r["node"] for r in result["rows"][:3]] == [r["node"] for r in ranking[:3]]


def test_fixed_batch_variant_is_diagnosed_on_padded_batches(demo_models, demo_data, tmp_path):
    """A graph whose batch is fixed (4 here) takes exactly 4 rows per call: diagnose pads the last
    batch of its sample (10 rows) through quantize's reader and cuts the padding off again."""
    import onnx

    from tugboat.engine.io.loading import load_model

    h = demo_models("digits-cnn")
    fixed = onnx.ModelProto()
    fixed.CopyFrom(h.to_onnx())  # the session's shared handle keeps its own graph
    for value in [*fixed.graph.input, *fixed.graph.output]:
        value.type.tensor_type.shape.dim[0].ClearField("dim_param")
        value.type.tensor_type.shape.dim[0].dim_value = 4
    onnx.save(fixed, str(tmp_path / "fixed.onnx"))
    handle = load_model(str(tmp_path / "fixed.onnx"))
    q = static_int8(handle, demo_data)
    result = dg.diagnose(handle, q, demo_data, samples=10, verify=0)
    assert result["samples"] == 10 and result["rows"]
    assert all(r["isolated"] is not None for r in result["rows"])
    assert result["output"]["top1_agreement"] > 0.9


def test_accumulated_only_for_a_graph_without_qdq_pairs(demo_models, demo_data):
    h = demo_models("digits-mlp")
    params = {p.name: p.default for p in quantize.PARAMS if p.applies_to("dynamic-int8")}
    q = quantize.apply(h, {**params, "method": "dynamic-int8"}, demo_data, null_progress())
    result = dg.diagnose(h, q, demo_data, samples=32)
    assert result["rows"] and all(r["isolated"] is None for r in result["rows"])
    assert any("accumulated errors only" in n for n in result["notes"])
    assert all(r["action"]["kind"] == "keep_float" for r in result["rows"])


def test_pruned_variant_channels_kept_and_prune_less(demo_models, demo_data):
    h = demo_models("digits-cnn")
    p = prune.apply(h, {"method": "structured", "ratio": 0.5, "finetune_epochs": 0}, demo_data,
                    null_progress())
    result = dg.diagnose(h, p, demo_data, samples=32)
    assert result["kind"] == "prune"
    layers = {r["layer"]: r for r in result["rows"] if r["op_type"] == "layer"}
    assert layers["features.3"]["channels"] == {"before": 64, "after": 32}
    assert layers["classifier.3"]["channels"] == {"before": 10, "after": 10}  # the head is kept
    assert layers["classifier.3"]["accumulated"]["cosine"] < 0.99  # and it agrees only so much
    acted = [r for r in result["rows"] if r["action"]]
    assert {r["layer"] for r in acted} == {"features.0", "features.3", "features.7", "classifier.1"}
    assert all(r["impact"] is not None for r in acted)
    sqnr = [r["impact"]["sqnr_db"] for r in acted]
    assert sqnr == sorted(sqnr) and result["rows"][0] is acted[0]  # worst first
    fixed = dg.fixed_steps([dict(p.history[-1])], acted[0]["action"])
    assert fixed[0]["layer_ratios"] == [f"{acted[0]['layer']}=0.25"]
    assert prune.parse_layer_ratios(fixed[0]["layer_ratios"]) == {acted[0]["layer"]: 0.25}


def test_bounded_cancellable_and_clear_errors(demo_models, demo_data, broken, monkeypatch):
    bad, q = broken
    xs, _labels, split = dg.sample_inputs(bad, demo_data, samples=100000)
    assert split == "val" and len(xs[0]) == min(dg.MAX_SAMPLES, len(demo_data.splits["val"]))
    xs, labels, split = dg.sample_inputs(bad, None, samples=100000)  # no data: random inputs
    assert len(xs[0]) == dg.MAX_SAMPLES and labels is None and split == "random inputs"
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        dg.diagnose(bad, q, demo_data, samples=16, progress=Progress(token=token))
    # bounded in memory too: fewer samples when their layer outputs would not fit, and it says so
    monkeypatch.setattr(dg, "ACTIVATION_BUDGET", 2 * 40 * 20000)
    small = dg.diagnose(bad, q, demo_data, samples=64)
    assert 4 <= small["samples"] < 64 and any("would not fit" in n for n in small["notes"])
    h = demo_models("digits-cnn")
    with pytest.raises(TugboatError, match="no steps"):
        dg.diagnose(h, h, demo_data)


def test_compare_recipes_metrics_and_channels(demo_models, demo_data):
    h = demo_models("digits-cnn")
    p = prune.apply(h, {"method": "structured", "ratio": 0.25, "finetune_epochs": 0}, demo_data,
                    null_progress())
    a = Variant("baseline", {"steps": []}, {"params": 160074, "latency_ms": {"median": 2.0}}, handle=h)
    b = Variant("prune", {"steps": [dict(p.history[-1])]}, {"params": 90000, "latency_ms": {"median": 1.0}},
                handle=p)
    c = dg.compare(a, b)
    assert ("steps.0.ratio", None, 0.25) in c["recipe"]
    assert ("params", 160074, 90000) in c["metrics"] and ("latency_ms.median", 2.0, 1.0) in c["metrics"]
    assert ("features.3", 64, 48) in c["layers"]
    # an ONNX-only (quantized) variant: channels read from its weights
    q = static_int8(h, demo_data)
    cq = dg.compare(a, Variant("q", {"steps": [dict(q.history[-1])]}, {}, handle=q))
    assert ("features.3", 64, 64) in cq["layers"] and ("classifier.3", 10, 10) in cq["layers"]


def test_chained_prune_then_quantize_compares_with_the_pruned_float_model(demo_models, demo_data):
    h = demo_models("digits-cnn")
    p = prune.apply(h, {"method": "structured", "ratio": 0.5, "finetune_epochs": 0}, demo_data,
                    null_progress())
    q = static_int8(p, demo_data)
    given = dg.diagnose(h, q, demo_data, reference=p, samples=32)
    rebuilt = dg.diagnose(h, q, demo_data, samples=32)  # the pruned float model rebuilt
    assert any("rebuilt" in n for n in rebuilt["notes"])
    for result in (given, rebuilt):
        rows = {r["layer"]: r for r in result["rows"]}
        assert set(rows) == {"features.0", "features.3", "features.7", "classifier.1", "classifier.3"}
        # an ordinary CNN quantizes well against the model it was quantized from
        assert all(r["isolated"]["sqnr_db"] > 20 for r in rows.values())
        assert rows["features.3"]["shape"][0] == 32  # the pruned layer's 32 channels, not 64
    assert given["rows"][0]["layer"] == rebuilt["rows"][0]["layer"]


def test_distilled_student_blocks_and_channels(demo_models, demo_data):
    from tugboat.engine.io.zoo import DigitsCNN

    h = demo_models("digits-cnn")
    torch.manual_seed(0)
    student = h.derive(module=DigitsCNN(width=8).eval(), step={"technique": "distill", "method": "kd"})
    result = dg.diagnose(h, student, demo_data, samples=32)
    assert result["kind"] == "distill" and "distilled student" in result["notes"][0]
    rows = {r["layer"]: r for r in result["rows"]}
    assert rows["features.0"]["channels"] == {"before": 32, "after": 8}
    assert rows["classifier.3"]["channels"] == {"before": 10, "after": 10}
    assert rows["classifier.3"]["accumulated"]["cosine"] < 0.9  # an untrained student disagrees
    assert all(r["action"] is None for r in result["rows"])  # nothing to prune less
    assert 0.0 <= result["output"]["top1_agreement"] <= 1.0


@pytest.mark.slow
def test_activation_outliers_a_fix_that_would_not_help_is_measured_as_such(demo_models, demo_data):
    """One channel between features.3 and features.7 scaled up 300x (and back down in features.7's
    weights: the float function is unchanged): per-tensor int8 activations lose the other channels.
    Isolation blames the layers on both sides of that tensor; keeping only one of them in float
    does not help (ONNX Runtime still quantizes the shared tensor), and the measured fix says so
    rather than promising a recovery."""
    h = demo_models("digits-cnn")
    module = copy.deepcopy(h.module)
    with torch.no_grad():
        module.features[4].weight[0] *= 300.0
        module.features[4].bias[0] *= 300.0
        module.features[7].weight[:, 0] /= 300.0
    bad = h.derive(module=module)
    q = static_int8(bad, demo_data)
    result = dg.diagnose(bad, q, demo_data, samples=64)
    rows = result["rows"]
    assert {rows[0]["layer"], rows[1]["layer"]} == {"features.3", "features.7"}
    assert all(r["impact"]["sqnr_db"] < 10 for r in rows[:2])
    assert all(r["impact"]["sqnr_db"] > 30 for r in rows[2:])
    for r in rows[:2]:  # measured, not promised: neither single-layer fix restores the output
        assert r["if_float"]["top1_agreement"] < 0.95
