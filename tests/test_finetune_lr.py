"""The fine-tuning learning rate after pruning: ``lr = "auto"`` (the default) measures it on the
model with a short probe; a rate given in the recipe wins (issue 14, deliverable 7)."""

from __future__ import annotations

import pytest
import torch

from standins import build_tinybert
from tugboat.console import format_summary
from tugboat.engine.errors import RecipeError
from tugboat.engine.progress import null_progress
from tugboat.engine.running.recipe import validate_steps
from tugboat.engine.techniques import prune
from tugboat.engine.techniques.finetune import BASE_LR, PROBE_FACTORS, evaluate, finetune


@pytest.fixture(scope="module")
def tinybert():
    with torch.random.fork_rng():
        return build_tinybert(epochs=3)


def test_auto_lr_is_the_default_and_validates():
    step = validate_steps([{"technique": "prune"}])[0]
    assert step["lr"] == "auto"
    assert validate_steps([{"technique": "prune", "lr": "AUTO"}])[0]["lr"] == "auto"
    assert validate_steps([{"technique": "prune", "lr": 1e-4}])[0]["lr"] == pytest.approx(1e-4)
    with pytest.raises(RecipeError, match=r"steps.0.lr' must be a number or \"auto\""):
        validate_steps([{"technique": "prune", "lr": "fast"}])


def test_auto_lr_picks_a_small_rate_for_a_pretrained_transformer(tinybert):
    """A trained attention/LayerNorm encoder: AdamW's usual 3e-3 undoes its weights in a few
    steps (the probe measures its held-out loss above the pruned model's); a rate 10-100x smaller
    recovers. The chosen rate is in the variant's info and its notes."""
    handle, data = tinybert
    out = prune.apply(handle, {"method": "unstructured", "ratio": 0.5}, data, null_progress())
    info = out.info["pruning"]
    assert info["lr_chosen_by"] == "probe" and info["lr"] <= 3e-4, info
    rows = {r["lr"]: r["loss"] for r in info["lr_probe"]}
    assert set(rows) <= {0.0, 3e-3, 3e-4, 3e-5} and BASE_LR["adamw"] == 3e-3 and len(PROBE_FACTORS) == 3
    assert rows[3e-3] > rows[0.0] > rows[info["lr"]]  # the usual rate made it worse, the chosen better
    assert min(rows) == 0.0 and min(r for r in rows if r) == info["lr"]  # no smaller rate tried after it
    assert any(f"fine-tuning lr {info['lr']:g} (auto)" in n for n in out.info["step_notes"])
    assert not any("fine-tuning lowered" in w for w in out.warnings), out.warnings


def test_explicit_lr_wins(tinybert):
    handle, data = tinybert
    out = prune.apply(handle, {"method": "unstructured", "ratio": 0.5, "lr": 3e-3, "finetune_epochs": 1}, data,
                      null_progress())
    info = out.info["pruning"]
    assert info["lr"] == 3e-3 and info["lr_chosen_by"] == "recipe" and info["lr_probe"] is None
    assert "step_notes" not in out.info
    assert out.info["pruning"]["finetune"]  # it fine-tuned, at the user's rate
    # sgd's usual rate is 10x adam's: the probe scales its candidates with the optimizer
    sgd = prune.apply(handle, {"method": "unstructured", "ratio": 0.5, "optimizer": "sgd", "finetune_epochs": 1}, data,
                      null_progress())
    tried = [r["lr"] for r in sgd.info["pruning"]["lr_probe"]]
    assert tried[:2] == [0.0, 0.03] and set(tried) <= {0.0, 0.03, 0.003, 0.0003}


def test_auto_lr_keeps_the_usual_rate_for_a_small_cnn_and_the_same_run(demo_models, demo_data):
    """A small CNN trained from scratch (what the defaults were tuned on): the probe keeps 3e-3, and
    the fine-tuning is then exactly the one an explicit 3e-3 gives (the probe leaves the weights,
    the seeds and the augmentation draws as they were)."""
    handle = demo_models("digits-cnn")
    params = {"method": "structured", "ratio": 0.5, "finetune_epochs": 1}
    auto = prune.apply(handle, params, demo_data, null_progress())
    given = prune.apply(handle, {**params, "lr": 3e-3}, demo_data, null_progress())
    assert auto.info["pruning"]["lr"] == 3e-3 and auto.info["pruning"]["lr_chosen_by"] == "probe"
    assert len(auto.info["pruning"]["lr_probe"]) == 2  # the start and the usual rate, which helped: no more
    for a, b in zip(auto.module.state_dict().values(), given.module.state_dict().values()):
        assert torch.equal(a, b)
    assert evaluate(auto.module, demo_data, "test", ["input"])["accuracy"] > 0.9


def test_finetune_reports_the_rate_and_the_cli_summary_shows_it(demo_models, demo_data):
    handle = demo_models("digits-mlp")
    module = prune.prune_structured_module(handle.module, tuple(handle.example_inputs(2)), 0.5)
    report: dict = {}
    history = finetune(module, demo_data, input_names=["input"], epochs=1, lr="auto",
                       reference=handle.module, report=report)
    assert len(history) == 1 and report["lr"] in [r["lr"] for r in report["lr_probe"]]
    note = prune.lr_note(report["lr"], report["lr_probe"])
    summary = format_summary({"baseline": {"metrics": {}}, "variants": [
        {"name": "prune", "metrics": {"size_bytes": 1}, "info": {"step_notes": [note]}}]})
    assert f"i fine-tuning lr {report['lr']:g} (auto)" in summary


def test_distill_auto_lr_probes_only_a_pretrained_student(demo_models, demo_data):
    """Distillation into a fresh student trains from scratch: auto is 3e-3 there, no probe. A pruned
    copy of the teacher is already trained: the probe decides, and restores the student (and the
    feature projections) after each rate."""
    from tugboat.engine.techniques import distill

    teacher = demo_models("digits-mlp")
    fresh = distill.apply(teacher, {"student": "family", "epochs": 1}, demo_data, null_progress())
    info = fresh.info["distill"]
    assert info["lr"] == 3e-3 and info["lr_chosen_by"] == "fresh student" and info["lr_probe"] is None
    pruned = distill.apply(teacher, {"student": "pruned", "width": 0.5, "epochs": 1}, demo_data,
                           null_progress())
    info = pruned.info["distill"]
    assert info["lr_chosen_by"] == "probe" and info["lr"] in {3e-3, 3e-4, 3e-5}
    assert 2 <= len(info["lr_probe"]) <= 4 and any("(auto)" in n for n in pruned.info["step_notes"])
    given = distill.apply(teacher, {"student": "pruned", "width": 0.5, "epochs": 1, "lr": info["lr"]},
                          demo_data, null_progress())
    assert given.info["distill"]["lr_chosen_by"] == "recipe"
    for a, b in zip(pruned.module.state_dict().values(), given.module.state_dict().values()):
        assert torch.equal(a, b)  # the probe left the run as the explicit rate's


def test_the_undo_check_breaks_a_tie_of_agreement_by_the_cosine(demo_models, demo_data):
    """Top-1 agreement on a small val split is coarse (EfficientNet-Lite0's 10 rows: 0.0 before and
    after while the logits' cosine fell 0.27 -> 0.16): the cosine to the original decides a tie."""
    import copy

    from tugboat.engine.io.data import Dataset

    handle = demo_models("digits-mlp")
    unlabeled = Dataset("unlabeled", demo_data.inputs, None, demo_data.splits)
    score, kind = prune._guard_score(handle, unlabeled, handle.module)
    shifted = copy.deepcopy(handle.module)
    with torch.no_grad():  # the same constant on every logit: the same top-1, a lower cosine
        [m for m in shifted.modules() if isinstance(m, torch.nn.Linear)][-1].bias += 20.0
    same, worse = score(handle.module), score(shifted)
    assert kind == "fidelity" and same[0] == worse[0] == 1.0 and worse[1] < same[1] - 0.01 and worse < same
