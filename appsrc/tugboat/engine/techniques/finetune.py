"""The shared fine-tuning loop: recover accuracy after pruning, quantization-aware training or
distillation.

With labels it trains with cross-entropy on the ``train`` split. Without labels it trains on soft
targets: the original model's outputs for the same rows (``teacher_outputs``, or computed from
``reference``), so the compressed model learns to agree with the original. With labels and
``teacher_weight > 0`` it does both: knowledge distillation from the original model (the same loss
as :mod:`tugboat.engine.techniques.distill`: KL on temperature-softened logits for classifiers, MSE or cosine
on other outputs) weighted ``teacher_weight``, cross-entropy on the labels for the rest. A pruned
model recovers much faster copying its unpruned self than from hard labels alone: the original's
soft outputs say which wrong classes are close. The loop itself (optimizer, schedule, cancellation,
divergence check, the per-epoch ``progress.record("epoch", ...)`` rows) is
:func:`tugboat.engine.techniques.training.train`, shared with distillation and quantization-aware training.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DataError, NumericalError, TugboatError
from ..lazy import F, nn, torch
from ..measuring.runtime import eval_mode
from ..progress import Progress
from .training import OPTIMIZERS as OPTIMIZERS  # re-exported: pruning's optimizer choices
from .training import BatchLoss, TrainSpec, TrainTask, first_output, module_device, to_device, train

if TYPE_CHECKING:  # pragma: no cover
    from ..io.data import Dataset

def outputs_for(module: nn.Module, data: Dataset, split: str, input_names: list[str],
                batch_size: int = 256) -> np.ndarray:
    """The first output of ``module`` for every row of ``split``, in split order."""
    module.eval()
    device = module_device(module)
    chunks = []
    with torch.inference_mode():
        for xs, _, _ in data.batches(split, batch_size, names=input_names):
            out = first_output(module(*to_device(xs, device)))
            chunks.append(out.detach().float().cpu().numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0,), np.float32)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), averaged over the batch."""
    t = float(temperature)
    return F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1),
                    reduction="batchmean", log_target=True) * (t * t)


def output_loss(kind: str, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    s, t = student.reshape(len(student), -1), teacher.reshape(len(teacher), -1)
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(s, t, dim=1, eps=1e-8)).mean()
    return F.mse_loss(s, t)


def soft_target_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
                     classification: bool = True) -> torch.Tensor:
    """KL divergence between softened class distributions (classification) or MSE (other tasks):
    :func:`kd_loss` / :func:`output_loss`, the one implementation (distillation uses them too)."""
    if not classification:
        return output_loss("mse", student, teacher)
    return kd_loss(student.reshape(len(student), -1), teacher.reshape(len(teacher), -1), temperature)


def recalibrate_batchnorm(module: nn.Module, data: Dataset, input_names: list[str], split: str = "train",
                          batches: int = 8, batch_size: int = 64, min_samples: int = 128) -> int:
    """Re-estimate BatchNorm running statistics on ``batches`` batches of ``split`` (structured
    pruning removes channels, so the statistics of the layers after them are stale). Returns the
    number of BatchNorm layers reset; the weights are not touched. With fewer than ``min_samples``
    rows the stale statistics are kept: a few dozen samples estimate them worse (the real OCR
    classifier's agreement fell from 0.77 to 0.62 when recalibrated on its 45 training lines)."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    if not norms or data is None or len(data.splits.get(split, ())) < min_samples:
        return 0
    saved = {m: m.momentum for m in norms}
    was_training = module.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches seen
    module.train()
    try:
        with torch.no_grad():
            for i, (xs, _, _) in enumerate(data.batches(split, batch_size, names=input_names,
                                                         shuffle=True, seed=123)):
                if i >= batches:
                    break
                if len(xs[0]) > 1:  # batch-norm cannot train on a batch of one
                    module(*xs)
    finally:
        for m, mom in saved.items():
            m.momentum = mom
        module.train(was_training)
    return len(norms)


def evaluate(module: nn.Module, data: Dataset, split: str, input_names: list[str],
             reference_outputs: np.ndarray | None = None,
             classification: bool = True) -> dict[str, float | None]:
    """Accuracy (with labels) and top-1 agreement with ``reference_outputs`` on ``split``."""
    out = outputs_for(module, data, split, input_names)
    _, labels = data.split(split)
    acc = agree = None
    if classification and out.size:
        pred = out.reshape(len(out), -1).argmax(1)
        if labels is not None:
            acc = float(np.mean(pred == labels))
        if reference_outputs is not None:
            agree = float(np.mean(pred == reference_outputs.reshape(len(out), -1).argmax(1)))
    return {"accuracy": acc, "fidelity": agree}


@dataclass
class _Targets:
    """What a fine-tuning batch learns from: labels, the original's outputs, or both."""

    use_labels: bool
    alpha: float  # share of the loss from the original model's outputs (with labels)
    augment: bool  # one-pixel shifts of image batches
    online: bool  # the reference labels each (shifted) batch itself
    teacher_outputs: np.ndarray | None  # or the original's outputs per row, computed once

    @property
    def distil(self) -> bool:
        return (self.teacher_outputs is not None or self.online) and (not self.use_labels or self.alpha > 0)


def _targets(data: Dataset, split: str, input_names: list[str], teacher_outputs: np.ndarray | None,
             reference: nn.Module | None, classification: bool, teacher_weight: float,
             augment: bool) -> _Targets:
    use_labels = data.has_labels and classification
    alpha = float(teacher_weight) if use_labels else 1.0
    if not 0.0 <= alpha <= 1.0:
        raise TugboatError(f"teacher_weight must be in [0, 1], got {teacher_weight}")
    if use_labels and alpha > 0 and teacher_outputs is None and reference is None:
        alpha = 0.0  # nothing to distil from
    first = data.inputs[input_names[0]] if input_names else None
    augment = bool(augment and first is not None and first.ndim == 4 and first.dtype.kind == "f")
    online = augment and reference is not None and teacher_outputs is None \
        and (not use_labels or alpha > 0)  # the teacher runs on each (shifted) batch
    if teacher_outputs is None and reference is not None and (not use_labels or alpha > 0) and not online:
        teacher_outputs = outputs_for(reference, data, split, input_names)
    if not use_labels and teacher_outputs is None and not online:
        raise DataError("fine-tuning without labels needs the original model's outputs as targets",
                        path=data.ref)
    if teacher_outputs is not None and len(teacher_outputs) != len(data.splits[split]):
        raise TugboatError(f"teacher_outputs has {len(teacher_outputs)} rows for "
                           f"{len(data.splits[split])} rows of split '{split}'")
    return _Targets(use_labels, alpha, augment, online, teacher_outputs)


def _batch_loss(module: nn.Module, plan: _Targets, reference: nn.Module | None, temperature: float,
                classification: bool, seed: int):
    """The loss of one fine-tuning batch, as :class:`~tugboat.engine.techniques.training.TrainTask` wants it."""
    rng = np.random.default_rng(seed)
    alpha = plan.alpha

    def loss(batch) -> BatchLoss:
        xs, ys, ex = batch
        if plan.augment:
            dy, dx = (int(v) for v in rng.integers(-1, 2, size=2))
            if dy or dx:
                xs[0] = torch.roll(xs[0], shifts=(dy, dx), dims=(2, 3))
        if plan.online:
            with torch.no_grad():
                ex = [first_output(reference(*xs)).float()]
        out = first_output(module(*xs))
        if plan.use_labels and plan.distil:
            value = alpha * soft_target_loss(out, ex[0], temperature, classification) \
                + (1.0 - alpha) * F.cross_entropy(out.reshape(len(ys), -1), ys)
        elif plan.use_labels:
            value = F.cross_entropy(out.reshape(len(ys), -1), ys)
        else:
            value = soft_target_loss(out, ex[0], temperature, classification)
        return value, len(xs[0]), {}

    return loss


def finetune(module: nn.Module, data: Dataset, *, input_names: list[str], epochs: int, lr: float | str,
             optimizer: str = "adamw", batch_size: int = 64,
             teacher_outputs: np.ndarray | None = None, progress: Progress | None = None,
             split: str = "train", seed: int = 0, reference: nn.Module | None = None,
             classification: bool = True, temperature: float = 1.0,
             trainable: list[nn.Parameter] | None = None,
             teacher_weight: float = 0.0, augment: bool = False, device: str = "cpu",
             max_grad_norm: float = 0.0, report: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Train ``module`` in place for ``epochs`` epochs; returns one history row per epoch.

    ``lr = "auto"`` chooses the learning rate by a short probe (:func:`probe_lr`); the rate used
    (and the probe's rows) go into ``report`` when given, as ``lr`` and ``lr_probe``.

    ``teacher_outputs`` are the original model's outputs for the rows of ``split`` (in split
    order); with them and no labels the loss is a soft-target loss. ``reference`` (the original
    module) fills them in when missing and gives the per-epoch fidelity on the ``val`` split.
    With labels, ``teacher_weight`` (0..1) is the share of the loss that distils from the
    original (needs ``reference`` or ``teacher_outputs``); the rest is cross-entropy.
    ``augment`` shifts image inputs (4-D float) by up to one pixel per batch; the ``reference``
    module then labels the shifted images itself, so the teacher covers more than the rows seen.
    ``device`` is a resolved device (:func:`tugboat.engine.devices.resolve`); the module ends on the CPU.
    ``max_grad_norm`` > 0 clips the gradients' total norm before each step (a pruned network without
    BatchNorm, as ONNX exports are, can take gradients large enough to undo its weights).
    """
    if epochs <= 0:
        return []
    if data is None:
        raise DataError("fine-tuning needs data (a dataset with a training split)")
    plan = _targets(data, split, input_names, teacher_outputs, reference, classification, teacher_weight,
                    augment)
    val_reference = outputs_for(reference, data, "val", input_names) if reference is not None else None
    params = trainable if trainable is not None else [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise TugboatError("fine-tuning has nothing to train: the model has no trainable parameters "
                           "(set finetune_epochs = 0)")
    n_rows = len(data.splits[split])
    if n_rows < 2:
        raise DataError(f"fine-tuning needs at least 2 samples in the '{split}' split, it has {n_rows}",
                        path=data.ref)
    if plan.online and device != "cpu":
        reference = copy.deepcopy(reference).to(device)  # the caller's module stays where it is
    extra = [plan.teacher_outputs] if plan.distil and not plan.online else None
    task = TrainTask(
        batches=lambda epoch: data.batches(split, batch_size, names=input_names, shuffle=True,
                                           seed=seed + epoch, extra=extra, training=True),
        loss=_batch_loss(module, plan, reference, temperature, classification, seed),
        evaluate=lambda _epoch: _renamed(evaluate(module, data, "val", input_names, val_reference,
                                                  classification)))
    spec = TrainSpec(epochs=epochs, lr=lr, steps_per_epoch=max(1, -(-n_rows // max(2, batch_size))),
                     optimizer=optimizer, seed=seed, name="fine-tuning",
                     message="fine-tuning epoch {epoch}/{epochs}", device=device,
                     max_grad_norm=max_grad_norm)
    probe = None
    if lr == "auto":
        held = _held_out(module, data, input_names, plan, reference, classification, temperature,
                         batch_size, split)
        # its own loss (own augmentation draws): a probe that picks the rate a user would give
        # leaves the same fine-tuning as that user's
        probe_task = TrainTask(batches=task.batches, loss=_batch_loss(module, plan, reference, temperature,
                                                                      classification, seed + 1))
        spec.lr, probe = probe_lr(module, params, spec, probe_task, held, progress)
    if report is not None:
        report.update(lr=float(spec.lr), lr_probe=probe)
    return train(module, params, spec, task, progress).history


# The rates ``lr = "auto"`` tries, as multiples of the optimizer's usual rate (3e-3 for adam/adamw,
# 0.03 for sgd): the usual rate suits small CNNs trained from scratch (docs/techniques/pruning.md);
# a pretrained transformer wants 1/10 to 1/30 of it (MiniLM measured best at 1e-4 to 3e-4, 3e-3 undid it).
# When every rate leaves the held-out loss above the start, the least bad one still trains: pruning's
# undo check (prune._finetune_after) then keeps the weights from before the fine-tuning.
PROBE_FACTORS = (1.0, 0.1, 0.01)
PROBE_STEPS = 8  # training steps per candidate rate (at most half the fine-tuning's own, 2 at least)
BASE_LR = {"adamw": 3e-3, "adam": 3e-3, "sgd": 3e-2}


def probe_lr(module: nn.Module, params: list[nn.Parameter], spec: TrainSpec, task: TrainTask,
             held: Callable[[], float], progress: Progress | None = None
             ) -> tuple[float, list[dict[str, float | None]]]:
    """The learning rate for ``spec`` measured on the model itself: from the same start, a few
    steps of the fine-tuning at each candidate rate (a short cosine, as the real run), then the
    fine-tuning loss on held-out rows (``held``). The candidates go from the usual rate down, and the
    first that lowers the held-out loss below the start's is taken (a small CNN trained from scratch:
    the usual rate, one trial); when none does, the one with the lowest loss (a diverging one never).
    Returns the rate and one row per candidate tried; the module's weights end as they were."""
    base = BASE_LR.get(spec.optimizer, 3e-3)
    total = max(1, spec.epochs * spec.steps_per_epoch)
    steps = min(total, PROBE_STEPS, max(2, total // 2))  # on a small data set: half the fine-tuning's
    start = {k: v.detach().clone() for k, v in module.state_dict().items()}
    rows: list[dict[str, float | None]] = [{"lr": 0.0, "loss": held()}]
    try:
        for i, factor in enumerate(PROBE_FACTORS):
            if progress is not None:
                progress.update(0.0, f"choosing the learning rate ({i + 1}/{len(PROBE_FACTORS)})")
                progress.check()
            rate = float(f"{base * factor:.3g}")
            probe = TrainTask(batches=lambda _e: _first(task.batches, steps), loss=task.loss)
            try:
                train(module, params, replace(spec, epochs=1, lr=rate, steps_per_epoch=steps), probe)
                loss = held()
            except NumericalError:
                loss = None
            rows.append({"lr": rate, "loss": loss if loss is not None and math.isfinite(loss) else None})
            module.load_state_dict(start)
            if rows[-1]["loss"] is not None and rows[0]["loss"] is not None and rows[-1]["loss"] < rows[0]["loss"]:
                break  # the largest rate that helps: the smaller ones are not tried (a third of the cost)
    finally:
        module.load_state_dict(start)
    tried = [r for r in rows[1:] if r["loss"] is not None]
    best = min(tried, key=lambda r: r["loss"])["lr"] if tried else base * PROBE_FACTORS[-1]
    return best, rows


def lr_note(lr: float, probe: list[dict[str, float | None]]) -> str:
    """One line for the result: the rate chosen and what the probe measured."""
    def loss(r):
        return "diverged" if r["loss"] is None else f"{r['loss']:.3g}"
    tried = ", ".join(f"{r['lr']:g}: {loss(r)}" for r in probe if r["lr"])
    before = next((loss(r) for r in probe if not r["lr"]), "-")
    return f"fine-tuning lr {lr:g} (auto): held-out loss after a few steps at {tried}; before: {before}"


def _first(make: Callable[[int], Iterable[tuple]], n: int) -> Iterator[tuple]:
    """The first ``n`` training batches, going on into the next epochs when one has fewer."""
    given, epoch = 0, 1
    while given < n:
        before = given
        for batch in make(epoch):
            yield batch
            given += 1
            if given >= n:
                return
        if given == before:
            return
        epoch += 1


def _held_out(module: nn.Module, data: Dataset, input_names: list[str], plan: _Targets,
              reference: nn.Module | None, classification: bool, temperature: float,
              batch_size: int, split: str, max_batches: int = 4) -> Callable[[], float]:
    """The fine-tuning loss (without augmentation) on the first rows of the ``val`` split (the
    ``split`` trained on when there is no val), as a function of the module's current weights."""
    held = "val" if len(data.splits.get("val", ())) else split
    rows = max(32, batch_size)
    teacher = None
    if plan.distil or not plan.use_labels:
        teacher = outputs_for(reference, data, held, input_names) if reference is not None \
            else (plan.teacher_outputs if held == split else None)
    use_labels = plan.use_labels and data.has_labels
    if teacher is None and not use_labels:
        teacher, held = plan.teacher_outputs, split
    target = _Targets(use_labels, plan.alpha if teacher is not None else 0.0, False, False, teacher)
    loss = _batch_loss(module, target, None, temperature, classification, 0)
    extra = [teacher] if teacher is not None else None

    def value() -> float:
        eval_mode(module)
        total, n = 0.0, 0
        with torch.no_grad():
            for b, batch in enumerate(data.batches(held, rows, names=input_names, extra=extra)):
                if b >= max_batches:
                    break
                v, k, _ = loss(batch)
                total, n = total + float(v) * k, n + k
        return total / max(1, n)

    return value


def _renamed(ev: dict[str, float | None]) -> dict[str, float | None]:
    return {"val_accuracy": ev["accuracy"], "fidelity": ev["fidelity"]}


def frozen_copy(module: nn.Module) -> nn.Module:
    """An eval-mode deep copy whose parameters need no gradients (a fixed teacher)."""
    ref = copy.deepcopy(module).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref
