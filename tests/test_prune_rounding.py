"""Structured pruning rounds channel counts to what this CPU runs fast (issue 17, item 5).

``round_to = "auto"`` (the default) measures the channel multiple ONNX Runtime's convolutions run
fast at here (8 or 16) and keeps every pruned layer at the nearest multiple; the estimate shows the
same counts the pruned model has. The network below has widths that are no multiple of 16 (40, 24,
50), so an unrounded prune leaves odd counts the rounding must fix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tugboat.engine.errors import RecipeError
from tugboat.engine.io.data import Dataset, default_splits
from tugboat.engine.io.models import ModelHandle, TensorSpec
from tugboat.engine.progress import null_progress
from tugboat.engine.running.recipe import validate_steps
from tugboat.engine.techniques import prune
from tugboat.engine.techniques.channels import ratio_for_keep, resolve_round_to, rounded_keep
from tugboat.engine.techniques.estimate import build_profile, estimate


def _odd_cnn() -> ModelHandle:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 40, 3, padding=1), nn.BatchNorm2d(40), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(40, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(24 * 4 * 4, 50), nn.ReLU(), nn.Linear(50, 10)).eval()
    return ModelHandle(model, [TensorSpec("input", ("batch", 1, 16, 16))], [TensorSpec("logits", ("batch", 10))],
                       source="test:odd-cnn", format="torch", arch="odd-cnn")


def _prune(handle, data=None, **params):
    full = prune.TECHNIQUE.defaults("structured") | {"method": "structured", "finetune_epochs": 0} | params
    return prune.apply(handle, full, data, null_progress())


def _pruned_widths(out) -> dict[str, tuple[int, int]]:
    return {n: (c["before"], c["after"]) for n, c in out.info["pruning"]["kept_channels"].items()
            if c["after"] != c["before"]}


def test_rounded_keep_goes_to_the_nearest_multiple_and_never_to_zero():
    assert rounded_keep(40, 28, 16) == 32 and rounded_keep(40, 20, 16) == 16  # nearest, not down
    assert rounded_keep(24, 4, 16) == 16  # at least one multiple
    assert rounded_keep(12, 6, 16) == 12  # no wider than the multiple: kept whole
    assert rounded_keep(50, 35, 8) == 32 and rounded_keep(50, 50, 8) == 50
    assert rounded_keep(50, 35, 0) == 35  # 0: no rounding
    for c, k in [(40, 32), (24, 16), (50, 32), (7, 3)]:
        assert int(c * (1 - ratio_for_keep(c, k))) == k  # torch-pruning keeps exactly k at this ratio


def test_structured_pruning_rounds_to_the_measured_multiple_by_default():
    handle = _odd_cnn()
    assert prune.TECHNIQUE.defaults("structured")["round_to"] == "auto"
    multiple = resolve_round_to("auto")
    assert multiple in (8, 16)
    out = _prune(handle, ratio=0.3)
    info = out.info["pruning"]
    assert info["round_to"] == "auto" and info["channel_multiple"] == multiple
    widths = _pruned_widths(out)
    assert set(widths) == {"0", "4", "9"}, widths  # every prunable layer lost channels; the head none
    assert all(after % multiple == 0 for _, after in widths.values()), widths
    # without rounding the same prune leaves counts that are no multiple (40 -> 28, 50 -> 35)
    plain = _pruned_widths(_prune(handle, ratio=0.3, round_to=0))
    assert any(after % multiple for _, after in plain.values()), plain
    with torch.no_grad():  # still a working model with the original's output shape
        assert out.module(torch.zeros(2, 1, 16, 16)).shape == (2, 10)


def test_global_and_sensitivity_allocation_are_rounded_too():
    handle = _odd_cnn()
    multiple = resolve_round_to("auto")
    for params in ({"scope": "global", "ratio": 0.4}, {"allocation": "sensitivity", "ratio": 0.4}):
        widths = _pruned_widths(_prune(handle, **params))
        assert widths, params
        assert all(after % multiple == 0 for _, after in widths.values()), (params, widths)


def test_estimate_shows_the_channel_counts_the_pruned_model_has():
    handle = _odd_cnn()
    profile = build_profile(handle, {"flops": 10**6, "size_bytes": 100_000})
    for params in ({"ratio": 0.3}, {"ratio": 0.5, "round_to": 8}, {"ratio": 0.5, "round_to": 0}):
        step = {"technique": "prune", "method": "structured", **params}
        est = estimate(profile, validate_steps([step]))
        out = _prune(handle, **params)
        actual = {n: c["after"] for n, c in out.info["pruning"]["kept_channels"].items()}
        assert est["channels"] == actual, (params, est["channels"], actual)
        assert est["channel_multiple"] == out.info["pruning"]["channel_multiple"]


def test_round_to_takes_auto_or_a_number_in_recipes():
    (step,) = validate_steps([{"technique": "prune", "method": "structured", "ratio": 0.5}])
    assert step["round_to"] == "auto"
    (step,) = validate_steps([{"technique": "prune", "method": "structured", "round_to": 16}])
    assert step["round_to"] == 16
    with pytest.raises(RecipeError, match=r"round_to' must be a whole number or \"auto\", got 'fast'"):
        validate_steps([{"technique": "prune", "method": "structured", "round_to": "fast"}])


def test_adam_at_the_sgd_rate_warns_on_the_variant_only():
    handle = _odd_cnn()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((160, 1, 16, 16)).astype(np.float32)
    data = Dataset("test:noise", {"input": x}, rng.integers(0, 10, 160), default_splits(160))
    out = _prune(handle, data, ratio=0.3, finetune_epochs=1, optimizer="adamw", lr=0.03)
    assert any("adamw at lr 0.03" in w and "3e-3" in w for w in out.warnings), out.warnings
    assert not any("adamw" in w for w in handle.warnings)
    quiet = _prune(handle, data, ratio=0.3, finetune_epochs=1)  # the defaults: a probed rate, no rate warning
    # (on this noise a fine-tuning may still be undone, with its own warning naming the rate it used)
    assert not any("adamw at lr" in w for w in quiet.warnings), quiet.warnings


def test_the_round_to_field_reads_and_sets_auto(qtbot):
    from tugboat.ui.controls import NumberField

    field = NumberField(prune.TECHNIQUE.param("round_to"))
    qtbot.addWidget(field)
    assert field.value() == "auto" and field.text() == "auto"
    field.setValue(16)
    assert field.value() == 16
    field.setValue(0)
    assert field.value() == 0  # 0 (no rounding) stays a number, distinct from auto
    field.setValue("auto")
    assert field.value() == "auto"


def test_gradient_clipping_bounds_each_fine_tuning_step():
    import copy

    from tugboat.engine.techniques.finetune import finetune

    rng = np.random.default_rng(1)
    x = rng.standard_normal((100, 1, 16, 16)).astype(np.float32)
    data = Dataset("test:noise", {"input": x}, rng.integers(0, 10, 100), default_splits(100))
    steps = -(-len(data.splits["train"]) // 32)

    def moved(max_grad_norm):
        model = copy.deepcopy(_odd_cnn().module)
        start = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        finetune(model, data, input_names=["input"], epochs=1, lr=0.5, optimizer="sgd", batch_size=32,
                 max_grad_norm=max_grad_norm)
        return float((torch.cat([p.detach().flatten() for p in model.parameters()]) - start).norm())

    # SGD with Nesterov momentum 0.9 moves at most lr * (1 + 0.9 + 0.81 ...) * norm per step
    clipped = moved(0.01)
    assert clipped <= steps * 0.5 * 10 * 0.01 + 1e-4, clipped
    assert moved(0.0) > 5 * clipped


def test_the_measured_multiple_is_kept_in_the_cache(tmp_path, monkeypatch):
    from tugboat.engine import machine
    from tugboat.engine.techniques import channels

    monkeypatch.setenv("TUGBOAT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TUGBOAT_CHANNEL_MULTIPLE")  # the suite's fixed value (conftest) aside
    monkeypatch.setattr(machine, "channel_multiple", lambda threads=1: 8)
    assert channels.resolve_round_to("auto") == 8
    stored = (tmp_path / channels.CACHE_FILE).read_text()
    assert "|1 threads" in stored and ": 8" in stored
    # a later process on a busier machine might measure 16: the stored value wins (same counts)
    monkeypatch.setattr(machine, "channel_multiple", lambda threads=1: 16)
    assert channels.resolve_round_to("auto") == 8 and channels.resolve_round_to(16) == 16
    (tmp_path / channels.CACHE_FILE).write_text("{not json")  # a broken file is measured again
    assert channels.resolve_round_to("auto") == 16
    monkeypatch.setenv("TUGBOAT_CHANNEL_MULTIPLE", "8")  # a fixed multiple wins over the cache
    assert channels.resolve_round_to("auto") == 8
