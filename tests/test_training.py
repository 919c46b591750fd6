"""The one training loop (engine/techniques/training.py) and the device setting (engine/devices.py).

The loop: epoch rows for the GUI, early stop with the best epoch's weights, the divergence check,
cancellation between batches; fine-tuning, distillation and QAT all run through it. Devices: auto
is the CPU here, a GPU setting on a machine without one is one clear line naming the setting,
and every latency entry names the device it was measured on.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from helpers import FAST
from tugboat.cli import main as cli_main
from tugboat.engine import devices
from tugboat.engine.errors import Cancelled, DeviceError, NumericalError, RecipeError
from tugboat.engine.io.data import _make_dataset
from tugboat.engine.io.models import ModelHandle, TensorSpec
from tugboat.engine.measuring import measure
from tugboat.engine.progress import CancelToken, Progress
from tugboat.engine.running.recipe import load_recipe
from tugboat.engine.techniques import distill, finetune, qat, quantize, training

NO_GPU = devices.gpu_count() == 0


def _data(n: int = 400, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    return _make_dataset("toy.npz", {"input": x}, (x[:, 0] > 0).astype(np.int64))


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)).eval()


def _task(module: nn.Module, data, evaluate=None, score=None, loss_scale: float = 1.0):
    def loss(batch):
        xs, ys, _ = batch
        return nn.functional.cross_entropy(module(*xs), ys) * loss_scale, len(ys), {}

    return training.TrainTask(
        batches=lambda epoch: data.batches("train", 16, names=["input"], shuffle=True, seed=epoch, training=True),
        loss=loss, evaluate=evaluate, score=score)


def _spec(epochs: int, **kw) -> training.TrainSpec:
    return training.TrainSpec(epochs=epochs, lr=kw.pop("lr", 1e-2), steps_per_epoch=5, **kw)


# --- the loop ------------------------------------------------------------------------------------

def test_loop_trains_and_publishes_one_row_per_epoch():
    data, module = _data(), _mlp()
    rows: list[dict] = []
    progress = Progress(on_record=lambda kind, row: rows.append(row) if kind == "epoch" else None)
    acc = finetune.evaluate(module, data, "val", ["input"])["accuracy"]
    result = training.train(module, list(module.parameters()), _spec(4, lr=3e-2),
                            _task(module, data, evaluate=lambda e: {"val_accuracy": finetune.evaluate(
                                module, data, "val", ["input"])["accuracy"]}), progress)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and rows == result.history
    assert all(r["epochs"] == 4 and np.isfinite(r["train_loss"]) and "lr" in r for r in rows)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["val_accuracy"] >= max(acc + 0.2, 0.85)  # it learned the (easy) rule
    assert not module.training


def test_early_stop_keeps_the_best_epochs_weights():
    data, module = _data(), _mlp()
    seen: dict[int, dict] = {}

    def evaluate(epoch):
        seen[epoch] = {k: v.clone() for k, v in module.state_dict().items()}
        return {"val_score": [0.0, 0.5, 0.9, 0.4, 0.3, 0.2, 0.1][epoch]}

    logs: list[str] = []
    progress = Progress(on_record=lambda kind, row: logs.append(row["message"]) if kind == "log" else None)
    result = training.train(module, list(module.parameters()), _spec(6, patience=2),
                            _task(module, data, evaluate, score=lambda r: (r["val_score"],)), progress)
    assert result.stopped_early and result.best_epoch == 2 and len(result.history) == 4
    assert all(torch.equal(module.state_dict()[k], v) for k, v in seen[2].items())
    assert not torch.equal(module.state_dict()["0.weight"], seen[4]["0.weight"])
    assert any("early stop after epoch 4" in m for m in logs)


def test_a_diverging_loss_stops_with_the_learning_rate_named():
    data, module = _data(), _mlp()
    with pytest.raises(NumericalError, match=r"fine-tuning diverged .* epoch 1.*lower learning rate than 0\.5"):
        training.train(module, list(module.parameters()), _spec(2, lr=0.5, name="fine-tuning"),
                       _task(module, data, loss_scale=float("nan")))
    assert not module.training


def test_cancel_between_batches():
    data, module = _data(), _mlp()
    token = CancelToken()
    calls = []

    def on_update(fraction, message):
        calls.append(message)
        if len(calls) == 3:
            token.cancel()

    with pytest.raises(Cancelled):
        training.train(module, list(module.parameters()), _spec(5), _task(module, data), Progress(on_update, token))
    assert len(calls) == 3 and calls[0] == "epoch 1/5"


def test_finetune_distill_and_qat_all_train_in_the_one_loop(monkeypatch):
    """Each training technique hands its loop to training.train (and nothing else trains)."""
    used = []
    real = training.train

    def spy(module, params, spec, task, progress=None):
        used.append(spec.name)
        return real(module, params, spec, task, progress)

    for mod in (finetune, distill, qat):
        monkeypatch.setattr(mod, "train", spy)
    data = _data()
    finetune.finetune(_mlp(), data, input_names=["input"], epochs=1, lr=1e-3)
    handle = ModelHandle(_mlp(), [TensorSpec("input", ("batch", 8))], [TensorSpec("logits", ("batch", 2))],
                         "toy.pt", "pickle")
    handle.task = "classification"
    student = distill.apply(handle, {"student": "family", "width": 0.25, "depth": 1, "epochs": 1}, data)
    params = {**quantize.TECHNIQUE.defaults("qat-int8"), "method": "qat-int8", "epochs": 1}
    _, summary = quantize._qat_train(handle, data, params, Progress())
    assert used == ["fine-tuning", "distillation", "quantization-aware training"]
    assert student.info["distill"]["device"] == "cpu" and summary["device"] == "cpu"


# --- devices -------------------------------------------------------------------------------------

def test_auto_is_the_cpu_without_a_gpu_and_the_first_gpu_with_one(monkeypatch):
    monkeypatch.setattr(devices, "gpu_count", lambda: 0)
    assert devices.resolve("auto") == "cpu" and devices.resolve(" CPU ") == "cpu"
    monkeypatch.setattr(devices, "gpu_count", lambda: 2)
    monkeypatch.setattr(devices, "_current_gpu", lambda count: 0)
    assert devices.resolve("auto") == "cuda:0" and devices.resolve("cuda:1") == "cuda:1"
    assert devices.resolve("cuda") == "cuda:0"
    with pytest.raises(DeviceError, match=r"'distill.device' = 'cuda:2': this machine has 2 GPU\(s\)"):
        devices.resolve("cuda:2", "distill.device")


@pytest.mark.parametrize("setting", ["cuda", "cuda:0"])
def test_a_gpu_setting_without_a_gpu_is_one_line_naming_the_setting(monkeypatch, setting):
    monkeypatch.setattr(devices, "gpu_count", lambda: 0)
    with pytest.raises(DeviceError) as err:
        devices.resolve(setting, "measure.device")
    text = str(err.value)
    assert "\n" not in text and f"'measure.device' = '{setting}' asks for a GPU" in text and "use cpu or auto" in text


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "", 3, None, "cuda:-1"])
def test_a_setting_that_is_no_device_is_refused(bad):
    with pytest.raises(DeviceError, match="'device' must be one of auto, cpu, cuda, cuda:N"):
        devices.check(bad)


def test_training_steps_take_the_device_and_refuse_a_missing_gpu(monkeypatch):
    monkeypatch.setattr(devices, "gpu_count", lambda: 0)
    handle = ModelHandle(_mlp(), [TensorSpec("input", ("batch", 8))], [TensorSpec("logits", ("batch", 2))],
                         "toy.pt", "pickle")
    with pytest.raises(DeviceError, match=r"'distill\.device' = 'cuda'"):
        distill.apply(handle, {"student": "family", "width": 0.25, "depth": 1, "epochs": 1, "device": "cuda"},
                      _data())
    for technique, method in (("distill", "kd"), ("quantize", "qat-int8"), ("prune", "structured")):
        tech = {"distill": distill.TECHNIQUE, "quantize": quantize.TECHNIQUE}.get(technique)
        if tech is None:
            from tugboat.engine.techniques import prune

            tech = prune.TECHNIQUE
        step = tech.validate({"method": method, "device": "cuda:1"}, "steps.0")
        assert step["device"] == "cuda:1"
        with pytest.raises(RecipeError, match=r"'steps\.0\.device' must be one of"):
            tech.validate({"method": method, "device": "gpu"}, "steps.0")


def test_every_latency_entry_names_its_device(demo_models, demo_data):
    metrics, _ = measure.measure(demo_models("digits-mlp"), demo_data, replace(FAST, both_runtimes=True))
    assert metrics["latency_ms"]["device"] == "cpu"
    entries = [e for per_batch in metrics["latency"].values() for e in per_batch.values()]
    assert len(entries) >= 2 and all(e["device"] == "cpu" and e["runtime"] for e in entries)


def test_onnx_runtime_without_its_cuda_provider_says_it_timed_on_the_cpu():
    class CpuSession:
        def get_providers(self):
            return ["CPUExecutionProvider"]

    cfg = measure.MeasureConfig(device="cuda:0")
    result = {"onnxruntime": {"b8": {"median": 1.0}}, "torch": {"b8": {"median": 2.0}}}
    measure._mark_devices(result, cfg, CpuSession())
    assert result["onnxruntime"]["b8"]["device"] == "cpu"
    assert "onnxruntime-gpu" in result["onnxruntime"]["b8"]["device_note"]
    assert result["torch"]["b8"]["device"] == "cuda:0" and "device_note" not in result["torch"]["b8"]
    import onnxruntime as ort

    from tugboat.engine.measuring.runtime import ort_providers
    gpu = "CUDAExecutionProvider" in ort.get_available_providers()
    assert ort_providers("cpu") == ["CPUExecutionProvider"]
    assert ort_providers("cuda:0")[0] == ("CUDAExecutionProvider" if gpu else "CPUExecutionProvider")


def _recipe(tmp_path, measure_device: str | None = None):
    path = tmp_path / "r.toml"
    extra = f'\ndevice = "{measure_device}"' if measure_device else ""
    path.write_text('model = "demo:digits-mlp"\ndata = "demo:digits"\n[[steps]]\ntechnique = "distill"\n'
                    'epochs = 1\nwidth = 0.25\n[measure]\nbatch = 8' + extra + "\n", encoding="utf-8")
    return path


def test_recipe_measure_device_is_checked_and_saved(tmp_path):
    assert load_recipe(_recipe(tmp_path)).measure.device == "cpu"
    recipe = load_recipe(_recipe(tmp_path, "auto"))
    assert recipe.measure.device == "auto" and recipe.to_dict()["measure"]["device"] == "auto"
    with pytest.raises(RecipeError) as err:
        load_recipe(_recipe(tmp_path, "tpu"))
    assert str(err.value).startswith(str(tmp_path / "r.toml")) and "'measure.device' must be one of" in str(err.value)


def test_cli_device_sets_every_training_step_and_the_measurement(tmp_path, monkeypatch):
    recipe = load_recipe(_recipe(tmp_path))
    monkeypatch.setattr(devices, "gpu_count", lambda: 1)
    assert devices.set_run_device(recipe, "cuda:0") == "cuda:0"
    assert recipe.measure.device == "cuda:0" and recipe.steps[0]["device"] == "cuda:0"


def test_a_recipe_naming_a_gpu_makes_ray_tasks_declare_one(tmp_path):
    recipe = load_recipe(_recipe(tmp_path))
    assert recipe.steps[0]["device"] == "auto" and not devices.wants_gpu(recipe)
    recipe.sweep = {"steps.0.device": ["cpu", "cuda:0"]}
    assert devices.wants_gpu(recipe)
    recipe.sweep, recipe.steps[0]["device"] = {}, "cuda"
    assert devices.wants_gpu(recipe)


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
def test_cli_device_cuda_without_a_gpu_exits_2_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli_main(["run", str(_recipe(tmp_path)), "--out", str(out), "--device", "cuda", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'--device' = 'cuda' asks for a GPU" in err
    assert not out.exists()


def test_table_html_and_csv_say_which_device_latency_ran_on(demo_models, demo_data):
    from tugboat.console import format_summary
    from tugboat.engine.running.report_html import render_html, rows, to_csv

    metrics, _ = measure.measure(demo_models("digits-mlp"), demo_data, FAST)
    report = {"model": "demo:digits-mlp", "data": "demo:digits", "baseline": {"metrics": metrics},
              "variants": [{"name": "v", "recipe": {}, "metrics": metrics, "artifacts": {}}], "pareto": ["v"]}
    assert "onnxruntime on cpu" in format_summary(report)
    assert "onnxruntime on cpu" in render_html(report)
    assert rows(report)[0]["latency_device"] == "cpu" and "latency_device" in to_csv(report).splitlines()[0]
