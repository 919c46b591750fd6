"""Knowledge distillation on the demo zoo: small students reach the teacher's accuracy, with or
without labels, from torch or ONNX teachers, for class logits and for embeddings; cancelling stops
promptly and writes nothing."""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np
import pytest
import torch
from torch import nn

from helpers import FAST, TokenClassifier, token_data
from tugboat.engine.errors import Cancelled, RecipeError, TugboatError
from tugboat.engine.io import zoo
from tugboat.engine.io.data import Dataset, default_splits
from tugboat.engine.io.export import parity, write_onnx
from tugboat.engine.io.loading import load_demo_spec, load_model, save_torchscript
from tugboat.engine.io.models import ModelHandle, TensorSpec
from tugboat.engine.measuring.measure import measure, quality
from tugboat.engine.progress import Progress
from tugboat.engine.running.runner import apply_steps
from tugboat.engine.techniques import distill, steps
from tugboat.engine.techniques.students import build_student


@pytest.fixture(scope="module")
def teacher():
    return load_model("demo:digits-cnn")


@pytest.fixture(scope="module")
def teacher_test(teacher, demo_data):
    """The teacher's test accuracy and test outputs (the reference for agreement)."""
    q, outputs = quality(teacher, demo_data, None, "torch", 1)
    return q["accuracy"], outputs


def _recorder():
    events: list[dict] = []
    return events, Progress(on_record=lambda kind, row: events.append(row) if kind == "epoch" else None)


def _digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for t in module.state_dict().values():
        h.update(t.detach().numpy().tobytes())
    return h.hexdigest()


def test_family_student_quarter_size_keeps_98pct_accuracy_within_a_minute(teacher, teacher_test, demo_data,
                                                                          tmp_path):
    teacher_acc, reference = teacher_test
    events, progress = _recorder()
    before = _digest(teacher.module)
    cpu0 = time.process_time()
    student = distill.apply(teacher, {"student": "family", "width": 0.5, "depth": 3, "epochs": 15,
                                      "temperature": 4.0, "alpha": 0.7}, demo_data, progress)
    cpu = time.process_time() - cpu0
    assert cpu < 60.0, f"distillation took {cpu:.1f} s of CPU time"
    assert student.param_count()[0] <= 0.25 * teacher.param_count()[0]
    q, _ = quality(student, demo_data, reference, "torch", 1)
    assert q["accuracy"] >= 0.98 * teacher_acc, (q, teacher_acc)
    # the live curves: one event per epoch with the plotted keys, also kept in the variant's info
    assert events and [e["epoch"] for e in events] == list(range(1, len(events) + 1))
    assert all({"train_loss", "val_accuracy", "fidelity"} <= set(e) for e in events)
    assert events[-1]["train_loss"] < events[0]["train_loss"]
    assert student.info["training"] == events
    assert student.arch is None and student.module is not teacher.module
    assert _digest(teacher.module) == before  # the teacher is never trained
    # a normal variant: measured by the engine and exported to ONNX with parity
    metrics, _ = measure(student, demo_data, FAST, reference=reference)
    assert metrics["params"] == student.param_count()[0]
    assert metrics["fidelity"]["top1_agreement"] >= 0.95
    path = write_onnx(student, tmp_path / "student.onnx")
    assert parity(load_model(path)) < 1e-4


def test_teacher_runs_once_per_job_not_per_epoch(teacher, demo_data):
    calls = {"n": 0}
    hook = teacher.module.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    try:
        n_train, n_val = len(demo_data.splits["train"]), len(demo_data.splits["val"])
        once = -(-n_train // 256) + -(-n_val // 256)
        distill.apply(teacher, {"width": 0.25, "epochs": 3, "patience": 0}, demo_data, Progress())
        assert calls["n"] == once
        calls["n"] = 0
        # with augmentation the cache holds at most one copy per pixel shift, whatever the epochs
        out = distill.apply(teacher, {"width": 0.25, "epochs": 4, "patience": 0, "augment": True},
                            demo_data, Progress())
        assert out.info["distill"]["augment"] is True
        assert once < calls["n"] <= len(distill.SHIFTS) * -(-n_train // 256) + -(-n_val // 256)
    finally:
        hook.remove()


def test_unlabelled_data_reaches_95pct_agreement(teacher, teacher_test, demo_data):
    _, reference = teacher_test
    unlabelled = Dataset("unlabelled", dict(demo_data.inputs), None, dict(demo_data.splits))
    student = distill.apply(teacher, {"width": 0.5, "epochs": 15, "alpha": 0.5}, unlabelled, Progress())
    info = student.info["distill"]
    assert info["alpha"] == 1.0 and info["labels_used"] is False
    assert any("alpha forced to 1" in w for w in student.warnings)
    assert all(e["val_accuracy"] is None for e in student.info["training"])
    q, _ = quality(student, unlabelled, reference, "torch", 1)
    assert q["accuracy"] is None
    assert q["fidelity"]["top1_agreement"] >= 0.95


def test_pruned_student_end_to_end(teacher, teacher_test, demo_data, tmp_path):
    teacher_acc, reference = teacher_test
    student = distill.apply(teacher, {"student": "pruned", "width": 0.5, "epochs": 5}, demo_data, Progress())
    assert student.param_count()[0] < 0.5 * teacher.param_count()[0]
    assert type(student.module) is type(teacher.module)  # a smaller copy of the same network
    q, _ = quality(student, demo_data, reference, "torch", 1)
    assert q["accuracy"] >= 0.95 * teacher_acc
    assert parity(load_model(write_onnx(student, tmp_path / "pruned.onnx"))) < 1e-4


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit save/load
def test_file_student_end_to_end(teacher, teacher_test, demo_data, tmp_path):
    _, reference = teacher_test
    torch.manual_seed(0)
    fresh = load_demo_spec(zoo.DigitsMLP(hidden=64), "digits-mlp", "fresh", "test")
    path = save_torchscript(fresh, tmp_path / "student.pt")
    student = distill.apply(teacher, {"student": "file", "student_file": str(path), "epochs": 8},
                            demo_data, Progress())
    assert student.info["distill"]["student_format"] == "torchscript"
    assert student.param_count()[0] == sum(p.numel() for p in fresh.module.parameters())
    q, _ = quality(student, demo_data, reference, "torch", 1)
    assert q["fidelity"]["top1_agreement"] >= 0.9
    with pytest.raises(TugboatError, match="student_file"):
        distill.apply(teacher, {"student": "file", "epochs": 1}, demo_data, Progress())


def test_onnx_only_teacher(teacher, teacher_test, demo_data, tmp_path):
    _, reference = teacher_test
    onnx_teacher = load_model(write_onnx(teacher, tmp_path / "teacher.onnx"))
    onnx_teacher.module = None  # as if onnx2torch could not convert it: ONNX Runtime only
    onnx_teacher.conversion_error = "simulated: not convertible"
    variant = apply_steps(onnx_teacher, [steps.get("distill").validate(
        {"technique": "distill", "width": 0.5, "epochs": 12}, "steps.0")], demo_data, Progress())
    assert variant.module is not None and variant.onnx_model is None  # the student's own graph
    q, _ = quality(variant, demo_data, reference, "torch", 1)
    assert q["fidelity"]["top1_agreement"] >= 0.95
    with pytest.raises(TugboatError, match="torch module"):
        distill.apply(onnx_teacher, {"student": "pruned", "epochs": 1}, demo_data, Progress())


class _Embedder(nn.Module):
    """The demo CNN up to its penultimate layer, before the ReLU: a 128-d embedding."""

    def __init__(self, cnn: nn.Module):
        super().__init__()
        self.features = cnn.features
        self.embed = cnn.classifier[:2]

    def forward(self, x):
        return self.embed(self.features(x))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def test_embedding_teacher_distils_with_cosine_and_mse(teacher, demo_data):
    embedder = ModelHandle(_Embedder(teacher.module).eval(), [TensorSpec("input", ("batch", 1, 8, 8))],
                           [TensorSpec("embedding", ("batch", 128))], source="test:embedder",
                           format="test", task="embedding")
    xs, _ = demo_data.split("test")
    with torch.inference_mode():
        target = embedder.module(torch.from_numpy(xs["input"])).numpy()
        torch.manual_seed(0)
        untrained = build_student("image", [(1, 8, 8)], (128,), width=0.5, depth=3).eval()
        base_cos = _cosine(untrained(torch.from_numpy(xs["input"])).numpy(), target)
    cos_student = distill.apply(embedder, {"width": 0.5, "epochs": 10}, demo_data, Progress())
    assert cos_student.info["distill"]["loss"] == "cosine"  # chosen from the task
    with torch.inference_mode():
        got = cos_student.module(torch.from_numpy(xs["input"])).numpy()
    assert got.shape == target.shape
    assert _cosine(got, target) >= 0.9 > base_cos + 0.2
    mse_student = distill.apply(embedder, {"width": 0.5, "epochs": 10, "loss": "mse"}, demo_data, Progress())
    with torch.inference_mode():
        got = mse_student.module(torch.from_numpy(xs["input"])).numpy()
    rel = np.linalg.norm(got - target) / np.linalg.norm(target)
    assert rel < 0.5 and _cosine(got, target) >= 0.85
    with pytest.raises(TugboatError, match="class logits"):
        distill.apply(embedder, {"epochs": 1, "loss": "kd"}, demo_data, Progress())


def test_cancel_mid_epoch_returns_within_a_second_and_writes_nothing(teacher, demo_data, tmp_path,
                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    seen: dict[str, float] = {}

    def on_update(fraction: float, message: str) -> None:
        seen["n"] = seen.get("n", 0) + 1
        seen["fraction"] = fraction
        if seen["n"] == 30 and "epoch 2" in message:  # teacher caching, then 20 batches per epoch
            seen["cancelled_at"] = time.perf_counter()
            progress.token.cancel()

    progress = Progress(on_update)
    before = _digest(teacher.module)
    with pytest.raises(Cancelled):
        distill.apply(teacher, {"width": 0.5, "epochs": 10}, demo_data, progress)
    assert "cancelled_at" in seen, "the cancel point was not reached mid-epoch"
    assert time.perf_counter() - seen["cancelled_at"] < 1.0
    assert seen["fraction"] < 0.5
    assert os.listdir(tmp_path) == []
    assert _digest(teacher.module) == before


def test_cancel_from_another_thread_while_training(teacher, demo_data):
    import threading

    progress = Progress()
    timer = threading.Timer(0.3, progress.token.cancel)
    timer.start()
    with pytest.raises(Cancelled):
        distill.apply(teacher, {"width": 0.5, "epochs": 200, "patience": 0}, demo_data, progress)
    stopped = time.perf_counter()
    timer.join()
    # cancel fired 0.3 s in; 200 epochs would take minutes
    assert stopped - progress.started < 1.3


def test_feature_matching_pairs_layers_through_a_projection(teacher, demo_data):
    events, progress = _recorder()
    student = distill.apply(teacher, {"width": 0.5, "epochs": 4, "patience": 0,
                                      "feature_pairs": ["features.10:features.10"]}, demo_data, progress)
    assert student.info["distill"]["feature_pairs"] == ["features.10:features.10"]
    assert events[-1]["feature_loss"] < events[0]["feature_loss"]
    assert not any("proj" in name for name in student.module.state_dict())  # projection dropped
    with pytest.raises(TugboatError, match="no layer 'nope'"):
        distill.apply(teacher, {"epochs": 1, "feature_pairs": ["nope:features.0"]}, demo_data, Progress())
    with pytest.raises(TugboatError, match="teacher_layer:student_layer"):
        distill.apply(teacher, {"epochs": 1, "feature_pairs": ["features.0"]}, demo_data, Progress())


def test_recipe_validation_and_chaining_into_another_step(teacher, demo_data):
    tech = steps.get("distill")
    with pytest.raises(RecipeError, match="temperature"):
        tech.validate({"technique": "distill", "temperature": 25}, "steps.0")
    with pytest.raises(RecipeError, match="student"):
        tech.validate({"technique": "distill", "student": "teacher"}, "steps.0")
    recipe_steps = [tech.validate({"technique": "distill", "width": 0.5, "epochs": 3}, "steps.0")]
    recipe_steps.append(steps.get("prune").validate(
        {"technique": "prune", "method": "unstructured", "ratio": 0.3, "finetune_epochs": 0}, "steps.1"))
    out = apply_steps(teacher, recipe_steps, demo_data, Progress())
    assert [h["technique"] for h in out.history] == [s["technique"] for s in recipe_steps]
    assert out.history[-1]["technique"] == recipe_steps[-1]["technique"]
    assert out.param_count()[0] < 0.25 * teacher.param_count()[0]


@pytest.mark.parametrize("kind", ["vector", "tokens"])
def test_family_students_for_vectors_and_tokens(kind):
    if kind == "vector":
        torch.manual_seed(0)
        rng = np.random.default_rng(0)
        x = rng.normal(size=(300, 12)).astype(np.float32)
        t = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 4)).eval()
        handle = ModelHandle(t, [TensorSpec("input", ("batch", 12))], [TensorSpec("logits", ("batch", 4))],
                             source="test:vec", format="test")
        data = Dataset("vec", {"input": x}, None, default_splits(len(x)))
    else:
        ids, mask, _ = token_data(n=300)
        torch.manual_seed(0)
        handle = ModelHandle(TokenClassifier().eval(),
                             [TensorSpec("ids", ("batch", 12), "int64"), TensorSpec("mask", ("batch", 12), "int64")],
                             [TensorSpec("logits", ("batch", 10))], source="test:tokens", format="test")
        handle.info["vocab_size"] = {"ids": 17}
        data = Dataset("tok", {"ids": ids, "mask": mask}, None, default_splits(len(ids)))
    student = distill.apply(handle, {"width": 0.25, "depth": 2, "epochs": 15, "lr": 5e-3}, data, Progress())
    assert student.info["distill"]["family"] == kind
    first = student.info["training"][0]["fidelity"]
    assert student.info["training"][-1]["fidelity"] >= max(first, 0.6)
    assert parity(student) < 1e-4  # exports to ONNX and agrees with torch
