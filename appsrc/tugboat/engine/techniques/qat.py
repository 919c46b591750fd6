"""Quantization-aware training (the ``qat-int8`` method of :mod:`tugboat.engine.techniques.quantize`).

A copy of the torch module (batch-norm folded into the convolutions first, as the ONNX export does)
gets fake-quantized weights (per channel or per tensor, symmetric int8) and fake-quantized layer
inputs (uint8 or int8, per tensor), and is fine-tuned in the shared training loop
(:func:`tugboat.engine.techniques.training.train`): the loss distils from the float model, plus the labels
where there are any. The weights with the best simulated-int8 validation accuracy win (ties: the
lower validation loss), the weights before fine-tuning included, so a short or unlucky run never
ends worse than it started. The result is a plain float module holding the trained weights, ready
for ONNX Runtime's static int8.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..devices import resolve as resolve_device
from ..errors import TugboatError
from ..progress import Progress
from .training import BatchLoss, TrainSpec, TrainTask, first_output, train

if TYPE_CHECKING:  # pragma: no cover
    from ..io.data import Dataset
    from ..io.models import ModelHandle

_LOG = logging.getLogger(__name__)
_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def fake_quant_api():
    """FakeQuantize, the moving-average observers and ``disable_observer``: from torchao's pt2e
    package (where torch.ao.quantization moved; it is deprecated upstream), or from torch.ao when
    torchao is not installed."""
    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")  # its CUDA-only extensions
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # import-time notices of its dependencies
            import torchao.quantization.pt2e as api
    except ImportError:
        import torch.ao.quantization as api
    return api


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Fold BatchNorm into the preceding conv (as the ONNX export does) so the fake-quantized
    weights during training are the weights that will be quantized."""
    try:
        with warnings.catch_warnings():
            # importing it scripts helpers with torch.jit.script_method, deprecated in torch 2.13:
            # torch's own use, not ours, but it would fill every QAT run's log
            warnings.simplefilter("ignore", DeprecationWarning)
            from torch.fx.experimental.optimization import fuse

        return fuse(module)
    except Exception as exc:  # not fx-traceable: train with batch-norm in place
        _LOG.debug("batch-norm folding skipped: %s", exc)
        return module


class _WeightFakeQuant(nn.Module):
    """Symmetric int8 fake quantization of a weight (a parametrization of the layer's ``weight``)."""

    def __init__(self, api, per_channel: bool, axis: int = 0):
        super().__init__()
        if per_channel:
            scheme = torch.per_channel_symmetric
            obs = api.MovingAveragePerChannelMinMaxObserver.with_args(ch_axis=axis, dtype=torch.qint8,
                                                                      qscheme=scheme)
        else:
            scheme = torch.per_tensor_symmetric
            obs = api.MovingAverageMinMaxObserver.with_args(dtype=torch.qint8, qscheme=scheme)
        self.fq = api.FakeQuantize(observer=obs, quant_min=-127, quant_max=127, dtype=torch.qint8,
                                   qscheme=scheme, ch_axis=axis)

    def forward(self, w):
        return self.fq(w)


def _fake_quantize(module: nn.Module, params: dict, api, where: str) -> tuple[list[nn.Module], list, list]:
    """Fake-quantize the weights and inputs of every Conv and Linear layer of ``module`` in place;
    returns the layers, the input hooks (to undo with :func:`_unfake`) and the input quantizers
    (kept outside the module: their ranges keep following the data to the end, and the best
    epoch's weights are restored without them)."""
    layers = [m for m in module.modules() if isinstance(m, _LAYERS)]
    if not layers:
        raise TugboatError("qat-int8 found no Conv or Linear layers to quantize", path=where)
    signed = params["activation_type"] == "int8"
    hooks, inputs = [], []
    for layer in layers:
        parametrize.register_parametrization(layer, "weight",
                                             _WeightFakeQuant(api, params["per_channel"]))
        fq = api.FakeQuantize(observer=api.MovingAverageMinMaxObserver, quant_min=-128 if signed else 0,
                              quant_max=127 if signed else 255, dtype=torch.qint8 if signed else torch.quint8,
                              qscheme=torch.per_tensor_affine)
        inputs.append(fq)
        hooks.append(layer.register_forward_pre_hook(lambda _m, args, fq=fq: (fq(args[0]), *args[1:])))
    return layers, hooks, inputs


def _unfake(layers: list[nn.Module], hooks: list) -> None:
    """Back to plain float layers holding the trained (latent) weights."""
    for h in hooks:
        h.remove()
    for layer in layers:
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)


def _loss_fn(teacher: nn.Module, classification: bool, w_teacher: float):
    """Distillation from the float model; labels (when there are any) take ``1 - w_teacher``."""

    def loss(out: torch.Tensor, xs, ys) -> torch.Tensor:
        with torch.no_grad():
            target = first_output(teacher(*xs))
        if classification:
            value = F.kl_div(F.log_softmax(out, 1), F.softmax(target, 1), reduction="batchmean")
        else:
            value = F.mse_loss(out, target)
        if w_teacher < 1.0:
            value = w_teacher * value + (1 - w_teacher) * F.cross_entropy(out, ys)
        return value

    return loss


def _validation(module: nn.Module, teacher: nn.Module, data: Dataset, split: str, names: list[str],
                classification: bool, qat_loss, device: str):
    """``evaluate(epoch)`` for the loop: simulated-int8 accuracy, loss and agreement on ``split``."""
    val_x, val_y = data.split(split)
    val_in = [torch.from_numpy(val_x[n]).to(device) for n in names]
    with torch.no_grad():
        val_ref = first_output(teacher(*val_in))
    val_t = torch.from_numpy(val_y).to(device) if val_y is not None else val_ref.argmax(1)

    def evaluate(_epoch: int) -> dict[str, Any]:
        with torch.no_grad():
            out = first_output(module(*val_in))
            acc = float((out.argmax(1) == val_t).float().mean()) if classification else 0.0
            agree = float((out.argmax(1) == val_ref.argmax(1)).float().mean()) if classification else None
            return {"val_accuracy": acc, "val_loss": float(qat_loss(out, val_in, val_t)), "fidelity": agree}

    return evaluate


def train_qat(handle: ModelHandle, data: Dataset, params: dict, progress: Progress,
              split: str) -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune a fake-quantized copy of the handle's torch module; return it as a plain float
    module (eval mode, on the CPU) and a summary (best epoch, its validation accuracy and loss)."""
    api = fake_quant_api()
    device = resolve_device(params["device"], "quantize.device")
    teacher = handle.torch_module().eval()
    module = fold_batchnorm(copy.deepcopy(teacher).eval())
    if isinstance(module, torch.fx.GraphModule) and not any(isinstance(m, _LAYERS) for m in module.modules()):
        from ..io.converted_graphs import normalise_for_pruning

        # a converted graph whose weights are MatMuls by constants (a BERT export): Linear layers then
        normalise_for_pruning(module, tuple(handle.example_inputs(2)))
    layers, hooks, input_fqs = _fake_quantize(module, params, api, handle.source)
    try:
        with torch.no_grad():  # warm the observers so early steps see sane ranges
            for xs, _, _ in data.batches("calib", 64, names=handle.input_names):
                module(*xs)
        module.to(device)
        for fq in input_fqs:
            fq.to(device)
        teacher = copy.deepcopy(teacher).to(device) if device != "cpu" else teacher
        classification = handle.task == "classification"
        w_teacher = params["teacher_weight"] if data.labels is not None and classification else 1.0
        qat_loss = _loss_fn(teacher, classification, w_teacher)
        task = _task(module, teacher, data, params, handle.input_names, qat_loss, api)
        task.evaluate = _validation(module, teacher, data, split, handle.input_names, classification,
                                    qat_loss, device)
        epochs, batch = int(params["epochs"]), int(params["batch_size"])
        spec = TrainSpec(epochs=epochs, lr=float(params["lr"]), optimizer="adam",
                         steps_per_epoch=max(1, -(-len(data.splits["train"]) // batch)),
                         seed=int(params["seed"]), name="quantization-aware training",
                         message="epoch {epoch}/{epochs}, batch {batch}/{batches}", device=device)
        result = train(module, [p for p in module.parameters() if p.requires_grad], spec, task, progress)
    finally:
        module.to("cpu")
        _unfake(layers, hooks)
    best = result.best_row or {}
    return module.eval(), {"best_epoch": result.best_epoch, "val_accuracy": best.get("val_accuracy"),
                           "val_loss": best.get("val_loss"), "split": split, "device": device}


def _task(module: nn.Module, teacher: nn.Module, data: Dataset, params: dict, names: list[str], qat_loss,
          api) -> TrainTask:
    epochs, batch, seed = int(params["epochs"]), int(params["batch_size"]), int(params["seed"])

    def start_epoch(epoch: int) -> None:
        if epoch == epochs and epochs > 1:
            module.apply(api.disable_observer)  # settle the ranges for the last epoch

    def loss(b) -> BatchLoss:
        xs, ys, _ = b
        return qat_loss(first_output(module(*xs)), xs, ys), len(xs[0]), {}

    return TrainTask(
        batches=lambda epoch: data.batches("train", batch, names=names, shuffle=True, seed=epoch - 1 + seed,
                                           training=True),
        loss=loss, score=lambda row: (row["val_accuracy"], -row["val_loss"]), score_start=True,
        start_epoch=start_epoch)
