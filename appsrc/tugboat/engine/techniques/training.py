"""The one training loop: fine-tuning after pruning, distillation and quantization-aware training
all run through :func:`train`.

The loop owns what every kind of training needs: the optimizer and its cosine learning-rate
schedule, the seed, the device, one ``progress.update`` and a cancellation check per batch, the
divergence check (a NaN or Inf loss stops the job with :class:`NumericalError` naming the learning
rate), one ``progress.record("epoch", ...)`` row per epoch (the GUI's live training curves), and,
given a score, keeping the best epoch's weights and stopping early after ``patience`` epochs
without a better one. What differs between the techniques is passed in as a :class:`TrainTask`:
the batches of an epoch, the loss of a batch, the validation metrics of an epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..errors import NumericalError, TugboatError
from ..lazy import nn, torch
from ..measuring.runtime import eval_mode
from ..progress import Progress, null_progress

OPTIMIZERS = ("adamw", "adam", "sgd")

# (loss, rows in the batch, extra per-batch values to average over the epoch, e.g. a feature loss)
BatchLoss = tuple["torch.Tensor", int, dict[str, float]]


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)
    raise TugboatError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")


@dataclass
class TrainSpec:
    """How to train: the numbers every technique's recipe parameters map onto."""

    epochs: int
    lr: float
    steps_per_epoch: int  # batches per epoch (the length of the cosine schedule is epochs x this)
    optimizer: str = "adamw"
    seed: int | None = 0  # torch's seed before the optimizer is made (None: leave it)
    patience: int = 0  # with a score: stop after this many epochs without a better one (0: never)
    name: str = "training"  # the job in messages ("fine-tuning diverged ...")
    message: str = "epoch {epoch}/{epochs}"  # progress text per batch ({batch}, {batches} too)
    device: str = "cpu"  # a resolved device (devices.resolve): the module trains there
    max_grad_norm: float = 0.0  # > 0: clip the gradients' total norm to this before each step


@dataclass
class TrainTask:
    """What one kind of training supplies to the loop."""

    batches: Callable[[int], Iterable[tuple]]  # epoch (1-based) -> (inputs, labels, extra) batches
    loss: Callable[[tuple], BatchLoss]  # one batch (already on the device) -> its loss
    evaluate: Callable[[int], dict[str, Any]] | None = None  # epoch -> validation metrics (eval mode)
    score: Callable[[dict[str, Any]], tuple] | None = None  # higher is better: keep the best epoch
    score_start: bool = False  # the weights before training compete too (epoch 0)
    start_epoch: Callable[[int], None] | None = None  # called before each epoch (e.g. freeze observers)


@dataclass
class TrainResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_row: dict[str, Any] | None = None
    stopped_early: bool = False


def to_device(value, device: str):
    """Tensors (also inside lists and tuples) on ``device``; anything else unchanged."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value


def module_device(module: nn.Module) -> torch.device:
    """Where ``module``'s weights are (the CPU for a module without any)."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def first_output(out):
    """The first output of a model that may return a tuple or list."""
    return out[0] if isinstance(out, (tuple, list)) else out


class _Best:
    """The best epoch so far by the task's score, its weights, and the epochs since."""

    def __init__(self, module: nn.Module, score: Callable | None, patience: int):
        self.module, self.score, self.patience = module, score, patience
        self.value: tuple | None = None
        self.state: dict[str, torch.Tensor] | None = None
        self.epoch, self.row, self.stale = 0, None, 0

    def offer(self, epoch: int, row: dict[str, Any]) -> bool:
        """Record ``row``; True when training should stop (patience used up)."""
        if self.score is None:
            self.epoch, self.row = epoch, row
            return False
        value = self.score(row)
        if self.value is None or value > self.value:
            self.value, self.epoch, self.row, self.stale = value, epoch, row, 0
            self.state = {k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()}
            return False
        self.stale += 1
        return bool(self.patience) and self.stale >= self.patience

    def restore(self) -> None:
        if self.state is not None:
            self.module.load_state_dict(self.state)


def train(module: nn.Module, params: list[nn.Parameter], spec: TrainSpec, task: TrainTask,
          progress: Progress | None = None) -> TrainResult:
    """Train ``params`` (of ``module`` and whatever else the loss uses) for ``spec.epochs`` epochs;
    ``module`` ends in eval mode on the CPU with the best epoch's weights when the task has a score
    (else the last). The task's batches come as CPU tensors; the loop moves them to the device."""
    progress = progress or null_progress()
    if spec.seed is not None:
        torch.manual_seed(spec.seed)
    _move(module, spec.device)
    opt = make_optimizer(spec.optimizer, params, spec.lr)
    total = max(1, spec.epochs * spec.steps_per_epoch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    best, result = _Best(module, task.score, spec.patience), TrainResult()
    try:
        if task.score_start and task.evaluate is not None:
            best.offer(0, _evaluate(module, task, 0))
        step = 0
        for epoch in range(1, spec.epochs + 1):
            if task.start_epoch is not None:
                task.start_epoch(epoch)
            eval_mode(module, True)
            means, step = _epoch(module, opt, sched, spec, task, epoch, step, progress)
            row = {"epoch": epoch, "epochs": spec.epochs, **means, **_evaluate(module, task, epoch),
                   "lr": float(sched.get_last_lr()[0])}
            result.history.append(row)
            progress.record("epoch", **row)
            if best.offer(epoch, row):
                result.stopped_early = True
                progress.log(f"early stop after epoch {epoch}: no better validation score for "
                             f"{spec.patience} epochs (best: epoch {best.epoch})")
                break
            progress.check()
        best.restore()
    finally:
        _move(module, "cpu")
        eval_mode(module)
    result.best_epoch, result.best_row = best.epoch, best.row
    return result


def _move(module: nn.Module, device: str) -> None:
    """``module.to(device)``, skipped when it is already there (the usual case on a CPU machine)."""
    if module_device(module) != torch.device(device):
        module.to(device)


def _evaluate(module: nn.Module, task: TrainTask, epoch: int) -> dict[str, Any]:
    if task.evaluate is None:
        return {}
    eval_mode(module)
    return dict(task.evaluate(epoch))


def _epoch(module: nn.Module, opt, sched, spec: TrainSpec, task: TrainTask, epoch: int, step: int,
           progress: Progress) -> tuple[dict[str, float | None], int]:
    """One pass over the task's batches; the row-weighted mean loss (and extras) and the step count."""
    sums: dict[str, float] = {}
    rows = 0
    total = max(1, spec.epochs * spec.steps_per_epoch)
    for b, batch in enumerate(task.batches(epoch)):
        loss, n, extra = task.loss(to_device(batch, spec.device))
        if not torch.isfinite(loss.detach()):
            _move(module, "cpu")
            eval_mode(module)
            raise NumericalError(f"{spec.name} diverged (loss {float(loss.detach())} at epoch {epoch}); "
                                 f"try a lower learning rate than {spec.lr:g}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if spec.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]],
                                           spec.max_grad_norm)
        opt.step()
        sched.step()
        for key, value in {"train_loss": float(loss.detach()), **extra}.items():
            sums[key] = sums.get(key, 0.0) + float(value) * n
        rows += n
        step += 1
        progress.update(min(1.0, step / total), spec.message.format(
            epoch=epoch, epochs=spec.epochs, batch=b + 1, batches=spec.steps_per_epoch))
    means = {k: v / rows for k, v in sums.items()} if rows else {"train_loss": None}
    return means, step
