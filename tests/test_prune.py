"""Pruning on the demo zoo: models really get smaller and faster, stay consistent, export to ONNX,
and keep their accuracy after a short fine-tune. Every number is measured here, in this run."""

from __future__ import annotations

import copy

import onnx
import pytest
import torch

from tugboat.engine.errors import Cancelled, RecipeError
from tugboat.engine.io.data import Dataset
from tugboat.engine.io.export import check_onnx, parity, write_onnx
from tugboat.engine.io.loading import load_model
from tugboat.engine.progress import CancelToken, Progress, null_progress
from tugboat.engine.running.recipe import parse_recipe, validate_steps
from tugboat.engine.running.runner import prepare, run_variant
from tugboat.engine.techniques import prune
from tugboat.engine.techniques.finetune import evaluate, finetune

# latency is asserted only for the structured CNN; enough runs for a stable median there
LATENCY = dict(batch=64, threads=1, warmup=5, min_runs=30, min_seconds=0.4, max_seconds=3.0,
               also_batch1=False, both_runtimes=False)
FAST = dict(batch=64, threads=1, warmup=1, min_runs=3, min_seconds=0.0, max_seconds=0.3,
            also_batch1=False, both_runtimes=False)


def _recipe(steps, measure):
    return parse_recipe({"model": "demo:digits-cnn", "data": "demo:digits", "measure": measure,
                         "steps": steps})


@pytest.fixture(scope="module")
def cnn_latency_base():
    return prepare(_recipe([], LATENCY))


@pytest.fixture(scope="module")
def cnn_fast_base():
    return prepare(_recipe([], FAST))


def test_structured_cnn_is_smaller_faster_and_keeps_accuracy(cnn_latency_base):
    base = cnn_latency_base
    events = []
    recipe = _recipe([{"technique": "prune", "method": "structured", "ratio": 0.5,
                       "finetune_epochs": 3, "lr": 1e-3}], LATENCY)
    variant = run_variant(base, recipe, Progress(on_record=lambda kind, data: events.append((kind, data))))
    assert variant.status == "ok", variant.error
    m, b = variant.metrics, base.metrics
    assert m["params"] <= 0.35 * b["params"]
    assert m["size_bytes"] < 0.4 * b["size_bytes"]
    assert m["flops"] < 0.4 * b["flops"]
    # measured in this run, ONNX Runtime, batch 64, same thread count
    assert m["latency_ms"]["runtime"] == b["latency_ms"]["runtime"] == "onnxruntime"
    assert m["latency_ms"]["batch"] == 64
    speedup = b["latency_ms"]["median"] / m["latency_ms"]["median"]
    assert speedup >= 1.5, f"only {speedup:.2f}x faster"
    assert m["accuracy"] >= b["accuracy"] - 0.01
    assert not any("slower than the original" in w for w in variant.warnings)
    epochs = [d for kind, d in events if kind == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    assert all(e["train_loss"] is not None and e["val_accuracy"] is not None for e in epochs)
    info = variant.info["pruning"]
    assert info["achieved_param_ratio"] <= 0.35
    assert info["kept_channels"]["features.0"] == {"before": 32, "after": 16}
    assert info["kept_channels"]["classifier.3"]["after"] == 10  # the head is never pruned
    check_onnx(variant.handle.to_onnx())


@pytest.mark.parametrize("name", ["digits-resnet", "digits-vit"])
def test_structured_keeps_skips_and_attention_consistent(name, demo_data):
    handle = load_model(f"demo:{name}")
    pruned = prune.apply(handle, {"method": "structured", "ratio": 0.5, "finetune_epochs": 0},
                         demo_data, null_progress())
    module = pruned.module
    x = handle.example_inputs(5)[0]
    with torch.no_grad():
        assert module(x).shape == handle.module(x).shape == (5, 10)
    assert pruned.info["pruning"]["achieved_param_ratio"] < 0.5
    if name == "digits-resnet":
        for block in [*module.layer1, *module.layer2]:
            short = block.shortcut[0].out_channels if len(list(block.shortcut.children())) else None
            cin = block.conv1.in_channels
            # the residual addition needs the same width on both branches
            assert block.conv2.out_channels == (short if short is not None else cin)
        assert module.stem[0].out_channels < 32
    else:
        for blk in module.blocks:
            attn = blk.attn
            assert attn.num_heads * attn.head_dim * 3 == attn.qkv.out_features
            assert attn.proj.in_features == attn.num_heads * attn.head_dim
            assert attn.qkv.in_features == module.pos.shape[-1] == blk.mlp[2].out_features
        assert module.pos.shape[-1] < 64
    model = pruned.to_onnx()
    onnx.checker.check_model(model)
    assert parity(pruned, atol=1e-4) <= 1e-4
    assert pruned.module is not handle.module  # the original stays untouched
    assert sum(p.numel() for p in handle.module.parameters()) > sum(p.numel() for p in module.parameters())


def test_unstructured_zeroes_weights_compresses_and_keeps_accuracy(cnn_fast_base):
    base = cnn_fast_base
    recipe = _recipe([{"technique": "prune", "method": "unstructured", "ratio": 0.8, "scope": "global",
                       "finetune_epochs": 3, "lr": 1e-3}], FAST)
    variant = run_variant(base, recipe)
    assert variant.status == "ok", variant.error
    m, b = variant.metrics, base.metrics
    assert m["nonzero_params"] <= 0.21 * b["nonzero_params"]
    assert m["params"] == b["params"]  # same shapes: only zeros
    assert m["compressed_bytes"] <= 0.5 * b["compressed_bytes"]
    assert m["accuracy"] >= b["accuracy"] - 0.015
    assert any("dense runtime" in w and "no faster" in w for w in variant.warnings)
    # masks folded in: no weight_orig / weight_mask left behind
    names = [n for n, _ in variant.handle.module.named_parameters()] + \
            [n for n, _ in variant.handle.module.named_buffers()]
    assert not any(n.endswith(("_orig", "_mask")) for n in names)
    assert variant.info["pruning"]["achieved_weight_sparsity"] == pytest.approx(0.8, abs=0.01)
    # the zeros survived fine-tuning
    w = variant.handle.module.classifier[1].weight
    assert float((w == 0).float().mean()) > 0.5


def test_unstructured_layer_scope_prunes_every_layer_equally(demo_models):
    module = prune.prune_unstructured_module(demo_models("digits-mlp").module, 0.5, scope="layer")
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            assert float((m.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)


def test_model_loaded_from_onnx_is_pruned_and_exported_back(tmp_path, demo_models, demo_data):
    path = write_onnx(demo_models("digits-cnn"), tmp_path / "cnn.onnx")
    loaded = load_model(path)
    assert loaded.module is not None and loaded.onnx_model is not None
    pruned = prune.apply(loaded, {"method": "structured", "ratio": 0.5, "finetune_epochs": 1},
                         demo_data, null_progress())
    assert pruned.onnx_model is None  # the artifact is re-exported from the pruned module
    out = write_onnx(pruned, tmp_path / "pruned.onnx")
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    assert parity(pruned, atol=1e-4) <= 1e-4
    base_params = loaded.param_count()[0]
    assert pruned.param_count()[0] <= 0.35 * base_params
    acc = evaluate(pruned.module, demo_data, "test", pruned.input_names)["accuracy"]
    assert acc > 0.9


def test_sensitivity_rows_and_allocation_against_uniform(demo_models, demo_data):
    handle = demo_models("digits-cnn")
    rows = prune.layer_sensitivity(handle, demo_data, ratios=(0.25, 0.5, 0.75))
    assert [r["name"] for r in rows] == ["features.0", "features.3", "features.7", "classifier.1"]
    for r in rows:
        assert set(r["quality"]) == {"0.25", "0.5", "0.75"}
        assert r["params"] > 0 and 0 < r["params_share"] < 1
        assert r["flops"] > 0 and r["latency_ms"] > 0
        assert r["metric"] == "accuracy"
    assert sum(r["flops_share"] for r in rows) <= 1.0 + 1e-9
    # pruning a layer harder never helps much: quality at 0.75 is below quality at 0.25
    assert all(r["quality"]["0.75"] <= r["quality"]["0.25"] + 0.02 for r in rows)

    module, example = handle.module, tuple(handle.example_inputs(2))
    per_layer = prune.sensitivity_allocation(module, example, 0.5, rows)
    uniform = prune.prune_structured_module(module, example, 0.5)
    sensitive = prune.prune_structured_module(module, example, 0.0, per_layer=per_layer)
    n_uniform, n_sensitive = prune._param_count(uniform), prune._param_count(sensitive)
    assert n_sensitive <= n_uniform * 1.01  # the same overall budget
    # the least sensitive layers are pruned hardest
    most = max(rows, key=lambda r: r["sensitivity"])["name"]
    least = min(rows, key=lambda r: r["sensitivity"])["name"]
    assert per_layer[least] > per_layer[most]
    acc_u = evaluate(uniform, demo_data, "test", ["input"])["accuracy"]
    acc_s = evaluate(sensitive, demo_data, "test", ["input"])["accuracy"]
    # Before fine-tuning sensitivity allocation wins clearly (measured about 0.82 vs 0.22).
    # After fine-tuning this 160k-parameter model recovers either way, so the two land within a
    # point or so of each other: on small models the allocation matters most when no fine-tuning
    # (or very little) is possible. The check below only asserts the pre-fine-tuning win.
    assert acc_s > acc_u + 0.1, (acc_s, acc_u)


def test_sensitivity_allocation_through_the_technique(demo_models, demo_data):
    handle = demo_models("digits-cnn")
    out = prune.apply(handle, {"method": "structured", "ratio": 0.5, "allocation": "sensitivity",
                               "finetune_epochs": 0}, demo_data, null_progress())
    assert len(out.info["sensitivity"]) == 4
    assert out.info["pruning"]["per_layer_ratio"] and out.info["pruning"]["allocation"] == "sensitivity"
    assert out.info["pruning"]["achieved_param_ratio"] <= 0.27


def test_structured_options_round_to_taylor_iterative(demo_models, demo_data):
    handle = demo_models("digits-cnn")
    out = prune.apply(handle, {"method": "structured", "ratio": 0.4, "round_to": 8, "importance": "taylor",
                               "iterative_steps": 2, "finetune_epochs": 0}, demo_data, null_progress())
    kept = out.info["pruning"]["kept_channels"]
    for name in ("features.0", "features.3", "features.7", "classifier.1"):
        assert kept[name]["after"] % 8 == 0 and kept[name]["after"] < kept[name]["before"]
    acc = evaluate(out.module, demo_data, "test", ["input"])["accuracy"]
    rnd = prune.prune_structured_module(handle.module, tuple(handle.example_inputs(2)), 0.4, importance="random")
    # ranking by gradient x weight beats the random control
    assert acc > evaluate(rnd, demo_data, "test", ["input"])["accuracy"]
    ign = prune.apply(handle, {"method": "structured", "ratio": 0.5, "ignored": ["features.0"],
                               "finetune_epochs": 0}, demo_data, null_progress())
    assert ign.info["pruning"]["kept_channels"]["features.0"]["after"] == 32


def test_finetune_without_labels_uses_soft_targets_and_cancels(demo_models, demo_data):
    handle = demo_models("digits-cnn")
    unlabeled = Dataset("unlabeled", demo_data.inputs, None, demo_data.splits)
    module = prune.prune_structured_module(handle.module, tuple(handle.example_inputs(2)), 0.5)
    before = evaluate(module, demo_data, "test", ["input"])["accuracy"]
    history = finetune(module, unlabeled, input_names=["input"], epochs=2, lr=1e-3,
                       reference=handle.module)
    assert len(history) == 2 and history[-1]["val_accuracy"] is None
    assert history[-1]["fidelity"] > 0.9
    assert evaluate(module, demo_data, "test", ["input"])["accuracy"] > before

    token = CancelToken()
    calls = []

    def on_update(fraction, message):
        calls.append(fraction)
        if len(calls) == 2:
            token.cancel()

    work = copy.deepcopy(module)
    with pytest.raises(Cancelled):
        finetune(work, demo_data, input_names=["input"], epochs=3, lr=1e-3,
                 progress=Progress(on_update, token))
    assert len(calls) == 2  # stopped between batches, not at the end of an epoch


def test_recipe_validation_names_bad_values():
    with pytest.raises(RecipeError, match="importance"):
        validate_steps([{"technique": "prune", "method": "structured", "importance": "l3"}])
    with pytest.raises(RecipeError, match="does not apply"):
        validate_steps([{"technique": "prune", "method": "unstructured", "importance": "l1"}])
    with pytest.raises(RecipeError, match="out of range"):
        validate_steps([{"technique": "prune", "method": "structured", "ratio": 1.5}])
    steps = validate_steps([{"technique": "prune"}])
    assert steps[0]["method"] == "structured" and steps[0]["finetune_epochs"] == 2


def test_unknown_ignored_layer_is_a_clear_error(demo_models):
    handle = demo_models("digits-cnn")
    with pytest.raises(Exception, match=r"no layer named 'features\.O' \(did you mean"):
        prune.prune_structured_module(handle.module, tuple(handle.example_inputs(2)), 0.5,
                                      ignored=["features.O"])
