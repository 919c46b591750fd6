"""Knowledge distillation: a small student learns to imitate the loaded model (the teacher).

Hinton et al., "Distilling the Knowledge in a Neural Network": for classifiers the loss is

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, labels)

with ``alpha`` forced to 1 when the data has no labels. For other outputs (embeddings, regression)
the loss is MSE or cosine distance between the outputs, chosen from the task and overridable.
Optionally, intermediate features are matched too: each ``"teacher_layer:student_layer"`` pair adds
the MSE between the teacher's feature map and a learned projection of the student's.

The teacher only has to produce outputs, so it may be an ONNX-only model (run in ONNX Runtime).
Its outputs on the training and validation splits are computed once per job and cached (with
image augmentation: once per pixel shift used), never per epoch. The student is a built-in family
member (:mod:`tugboat.engine.techniques.students`), a structured-pruned copy of the teacher, or a model file.
Training runs in the shared loop (:func:`tugboat.engine.techniques.training.train`: cancellation every batch,
divergence check, one ``progress.record("epoch", ...)`` per epoch, best epoch kept, early stop), on
the step's ``device``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..devices import DEFAULT_TRAINING, DEVICE_CHOICES
from ..devices import HELP as DEVICE_HELP
from ..devices import resolve as resolve_device
from ..errors import DataError, RecipeError, TugboatError
from ..lazy import F, nn, torch
from ..measuring.runtime import eval_mode
from ..progress import Progress, null_progress
from .finetune import BASE_LR, kd_loss, lr_note, output_loss, probe_lr
from .technique import Param, Technique
from .training import BatchLoss, TrainResult, TrainSpec, TrainTask, module_device, to_device, train

if TYPE_CHECKING:  # pragma: no cover
    from ..io.data import Dataset
    from ..io.models import ModelHandle

STUDENTS = ("family", "pruned", "file")
LOSSES = ("auto", "kd", "mse", "cosine")
SHIFTS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]


# --- the teacher, run once ---------------------------------------------------------------------

class TeacherCache:
    """Teacher outputs (and paired features) per split and pixel shift, computed on first use."""

    def __init__(self, handle: ModelHandle, data: Dataset, feature_layers: list[str],
                 batch_size: int = 256):
        self.handle = handle
        self.data = data
        self.layers = feature_layers
        self.batch_size = batch_size
        self._store: dict[tuple[str, tuple[int, int]], tuple[np.ndarray, list[np.ndarray]]] = {}
        self.seconds = 0.0
        if feature_layers:
            module = handle.module
            if module is None:
                why = handle.conversion_error or "the teacher is ONNX-only"
                raise TugboatError(f"feature matching needs the teacher's torch layers, but {why}",
                                   path=handle.source, hint="leave feature_pairs empty")
            names = dict(module.named_modules())
            missing = [n for n in feature_layers if n not in names]
            if missing:
                raise TugboatError(f"feature_pairs: the teacher has no layer {missing[0]!r}",
                                   path=handle.source, hint=_layer_hint(module))

    def get(self, split: str, shift: tuple[int, int] = (0, 0),
            progress: Progress | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        key = (split, shift)
        if key not in self._store:
            t0 = time.perf_counter()
            xs, _ = self.data.split(split)
            inputs = {n: xs[n] for n in self.handle.input_names}
            if shift != (0, 0):
                first = self.handle.input_names[0]
                inputs[first] = np.roll(inputs[first], shift, axis=(2, 3))
            if self.layers:
                self._store[key] = self._torch_with_features(inputs, progress)
            else:
                from ..measuring.runtime import predict

                use_torch = self.handle.module is not None and self.handle.onnx_model is None
                outs = predict(self.handle, inputs, runtime="torch" if use_torch else "onnxruntime",
                               batch=self.batch_size, threads=torch.get_num_threads(),
                               progress=progress)
                self._store[key] = (np.asarray(outs[0], dtype=np.float32), [])
            self.seconds += time.perf_counter() - t0
        return self._store[key]

    def _torch_with_features(self, inputs: dict[str, np.ndarray], progress: Progress | None):
        module = self.handle.module
        eval_mode(module)
        named = dict(module.named_modules())
        captured: dict[str, torch.Tensor] = {}
        hooks = [named[n].register_forward_hook(_capture(captured, n)) for n in self.layers]
        arrays = [inputs[n] for n in self.handle.input_names]
        n_rows = len(arrays[0])
        outs: list[np.ndarray] = []
        feats: list[list[np.ndarray]] = [[] for _ in self.layers]
        try:
            with torch.inference_mode():
                for i in range(0, n_rows, self.batch_size):
                    xs = [torch.from_numpy(np.ascontiguousarray(a[i : i + self.batch_size])) for a in arrays]
                    outs.append(_first(module(*xs)).float().numpy())
                    for k, name in enumerate(self.layers):
                        feats[k].append(captured[name].float().numpy())
                    if progress is not None:
                        progress.update(min(1.0, (i + self.batch_size) / n_rows), "teacher outputs")
        finally:
            for h in hooks:
                h.remove()
        return np.concatenate(outs), [np.concatenate(f) for f in feats]


def _capture(store: dict[str, torch.Tensor], name: str):
    def hook(_module, _inputs, output):
        store[name] = _first(output)
    return hook


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _layer_hint(module: nn.Module) -> str:
    names = [n for n, m in module.named_modules() if n and not list(m.children())]
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    return f"layers: {shown}"


# --- students ------------------------------------------------------------------------------------

def make_student(handle: ModelHandle, params: dict[str, Any], data: Dataset, out_shape: tuple[int, ...],
                 progress: Progress) -> tuple[nn.Module, str | None, dict[str, Any]]:
    """(student module, its built-in arch name or None, notes for the report)."""
    from .students import build_student, input_kind  # torch modules: imported when a student is made

    kind = params["student"]
    width = float(params["width"])
    names = handle.input_names
    if kind == "family":
        shapes = [tuple(data.inputs[n].shape[1:]) for n in names]
        dtypes = [str(data.inputs[n].dtype) for n in names]
        ikind = input_kind(shapes, dtypes)
        vocab = 2
        if ikind == "tokens":
            vocab = int(handle.info.get("vocab_size", {}).get(names[0], 0)) or int(data.inputs[names[0]].max()) + 1
        torch.manual_seed(int(params["seed"]))
        student = build_student(ikind, shapes, out_shape, width=width, depth=int(params["depth"]), vocab=vocab)
        return student, None, {"family": ikind, "width": width, "depth": int(params["depth"])}
    if kind == "pruned":
        if handle.module is None:
            why = handle.conversion_error or "the teacher is ONNX-only"
            raise TugboatError(f"student = \"pruned\" needs the teacher's torch module, but {why}",
                               path=handle.source, hint="use student = \"family\" or \"file\"")
        if not 0.0 < width <= 1.0:
            raise TugboatError(f"student = \"pruned\" needs width in (0, 1] (the share of channels "
                               f"kept), got {width}")
        from .prune import prune_structured_module  # lazy: pruning pulls in torch-pruning

        student = prune_structured_module(handle.module, tuple(handle.example_inputs(2)), 1.0 - width,
                                          progress=progress)
        return student, None, {"pruned_width": width}
    if kind == "file":
        ref = params["student_file"]
        if not ref:
            raise TugboatError("student = \"file\" needs student_file (the student model's path)")
        from ..errors import TRUST_OPTION, UntrustedFileError
        from ..io.loading import load_model

        try:  # trust is this run's decision (tugboat run/sweep --trust), never a recipe value
            loaded = load_model(ref, trust=bool(params.get("trust", False)))
        except UntrustedFileError as exc:
            raise UntrustedFileError(f"student_file {exc.message}", path=exc.path,
                                     hint=f"if you trust where it came from: {TRUST_OPTION}") from None
        if loaded.input_names and len(loaded.inputs) != len(handle.inputs):
            raise TugboatError(f"the student takes {len(loaded.inputs)} inputs, the teacher "
                               f"{len(handle.inputs)}", path=ref)
        if loaded.pending is not None:  # TorchScript etc.: the student takes the teacher's input shapes
            from ..io.formats import make_editable
            from ..io.models import TensorSpec

            loaded.inputs = [TensorSpec(s.name, t.shape, t.dtype) for s, t in zip(loaded.inputs, handle.inputs)]
            vocab = handle.info.get("vocab_size", {})
            loaded.info["vocab_size"] = {s.name: vocab[t.name] for s, t in zip(loaded.inputs, handle.inputs)
                                         if t.name in vocab}
            make_editable(loaded)
        student = loaded.torch_module()
        return student, None, {"student_file": str(ref), "student_format": loaded.format}
    raise TugboatError(f"unknown student {kind!r}; valid: {', '.join(STUDENTS)}")


# --- losses ------------------------------------------------------------------------------------

def parse_pairs(pairs: list[str], where: str = "feature_pairs") -> list[tuple[str, str]]:
    """``["features.3:features.1"]`` -> ``[("features.3", "features.1")]``; also the parameter's check
    when a step is validated (a RecipeError naming ``where``)."""
    out = []
    for p in pairs:
        if p.count(":") != 1 or not all(part.strip() for part in p.split(":")):
            raise RecipeError(f"'{where}': {p!r} is not \"teacher_layer:student_layer\"")
        a, b = p.split(":")
        out.append((a.strip(), b.strip()))
    return out


# --- evaluation --------------------------------------------------------------------------------

def _outputs(module: nn.Module, data: Dataset, split: str, names: list[str], batch: int = 256) -> torch.Tensor:
    eval_mode(module)
    device = module_device(module)
    chunks = []
    with torch.inference_mode():
        for xs, _, _ in data.batches(split, batch, names=names):
            chunks.append(_first(module(*to_device(xs, device))).float().cpu())
    return torch.cat(chunks)


def _val_metrics(student_out: torch.Tensor, teacher_out: torch.Tensor, labels: np.ndarray | None,
                 classification: bool, loss_kind: str, temperature: float,
                 alpha: float = 1.0) -> dict[str, float | None]:
    """Validation accuracy, fidelity to the teacher, and the training objective on ``val``."""
    if classification:
        pred = student_out.argmax(-1).numpy()
        acc = float(np.mean(pred == labels)) if labels is not None else None
        agree = float(np.mean(pred == teacher_out.argmax(-1).numpy()))
        loss = alpha * float(kd_loss(student_out, teacher_out, temperature)) if alpha > 0 else 0.0
        if labels is not None and alpha < 1.0:
            loss += (1.0 - alpha) * float(F.cross_entropy(student_out, torch.from_numpy(labels)))
        return {"val_accuracy": acc, "fidelity": agree, "val_loss": loss}
    cos = F.cosine_similarity(student_out.reshape(len(student_out), -1),
                              teacher_out.reshape(len(teacher_out), -1), dim=1, eps=1e-8)
    loss = float(output_loss(loss_kind, student_out, teacher_out))
    return {"val_accuracy": None, "fidelity": float(cos.mean()), "val_loss": loss}


def _is_classification(handle: ModelHandle, teacher_out: np.ndarray) -> bool:
    return handle.task == "classification" and teacher_out.ndim == 2 and teacher_out.shape[1] > 1


# --- the technique -------------------------------------------------------------------------------

@dataclass
class _Plan:
    """What the student learns from and how: decided once, before the student is built."""

    cache: TeacherCache
    pairs: list[tuple[str, str]]
    t_train: np.ndarray  # the teacher's outputs on the train split (no shift)
    t_val: np.ndarray
    t_train_feats: list[np.ndarray]
    classification: bool
    loss_kind: str
    alpha: float
    temperature: float
    augment: bool
    notes: list[str]

    @property
    def use_labels(self) -> bool:
        return self.loss_kind == "kd" and self.alpha < 1.0


def _plan(handle: ModelHandle, params: dict[str, Any], data: Dataset, progress: Progress) -> _Plan:
    pairs = parse_pairs(params["feature_pairs"])
    cache = TeacherCache(handle, data, [a for a, _ in pairs])
    t_train, t_train_feats = cache.get("train", progress=progress.sub(0.0, 0.07, "teacher: "))
    t_val, _ = cache.get("val", progress=progress.sub(0.07, 0.1, "teacher: "))
    classification = _is_classification(handle, t_train)
    loss_kind = params["loss"]
    if loss_kind == "auto":
        loss_kind = "kd" if classification else ("cosine" if handle.task == "embedding" else "mse")
    if loss_kind == "kd" and not classification:
        raise TugboatError(f"loss \"kd\" needs class logits, but the teacher's output has shape "
                           f"{t_train.shape[1:]} (task {handle.task!r})", hint="use loss = \"mse\" or \"cosine\"")
    alpha = float(params["alpha"])
    notes: list[str] = []
    if loss_kind == "kd" and alpha < 1.0 and not data.has_labels:
        notes.append("the data has no labels: alpha forced to 1 (teacher's soft targets only)")
        alpha = 1.0
    augment = bool(params["augment"])
    first = data.inputs[handle.input_names[0]]
    if augment and not (first.ndim == 4 and first.dtype.kind == "f"):
        notes.append("augment ignored: pixel shifts apply to image inputs only")
        augment = False
    return _Plan(cache, pairs, t_train, t_val, t_train_feats, classification, loss_kind, alpha,
                 float(params["temperature"]), augment, notes)


@dataclass
class _Student:
    """The student in training: the module, its feature hooks and the learned projections."""

    module: nn.Module
    arch: str | None
    info: dict[str, Any]
    captured: dict[str, torch.Tensor]
    hooks: list
    projections: nn.ModuleList
    feat_scale: list[float]

    def remove_hooks(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []


def _student(handle: ModelHandle, params: dict[str, Any], data: Dataset, plan: _Plan,
             progress: Progress) -> _Student:
    student, arch, info = make_student(handle, params, data, tuple(plan.t_train.shape[1:]), progress)
    eval_mode(student, True)
    for p in student.parameters():
        p.requires_grad_(True)
    s_named = dict(student.named_modules())
    s_missing = [b for _, b in plan.pairs if b not in s_named]
    if s_missing:
        raise TugboatError(f"feature_pairs: the student has no layer {s_missing[0]!r}", hint=_layer_hint(student))
    captured: dict[str, torch.Tensor] = {}
    hooks = [s_named[b].register_forward_hook(_capture(captured, b)) for _, b in plan.pairs]
    s = _Student(student, arch, info, captured, hooks, nn.ModuleList(), [])
    try:
        probe_out = _probe(student, data, handle.input_names)
        if tuple(probe_out.shape[1:]) != tuple(plan.t_train.shape[1:]):
            raise TugboatError(f"the student's output has shape {tuple(probe_out.shape[1:])} but the "
                               f"teacher's has {tuple(plan.t_train.shape[1:])}")
    except BaseException:
        s.remove_hooks()
        raise
    from .students import FeatureProjection

    s.projections = nn.ModuleList([FeatureProjection(tuple(captured[b].shape[1:]), tuple(f.shape[1:]))
                                   for (_, b), f in zip(plan.pairs, plan.t_train_feats)])
    s.feat_scale = [float(np.mean(np.square(f))) + 1e-8 for f in plan.t_train_feats]
    return s


def _probe(student: nn.Module, data: Dataset, names: list[str]) -> torch.Tensor:
    """The student's output on two training rows (it must run on the data at all)."""
    probe = [torch.from_numpy(np.ascontiguousarray(data.inputs[n][data.splits["train"][:2]])) for n in names]
    try:
        with torch.no_grad():
            eval_mode(student)
            return _first(student(*probe))
    except Exception as exc:
        raise TugboatError(f"the student fails on the data: {' '.join(str(exc).split())[:200]}") from None
    finally:
        eval_mode(student, True)


def _batch_loss(student: _Student, plan: _Plan, feature_weight: float, seed: int, device: str):
    """The distillation loss of one batch (``extra`` carries the batch's row numbers)."""
    rng = np.random.default_rng(seed)

    def loss(batch) -> BatchLoss:
        xs, ys, ex = batch
        local = ex[0].cpu().numpy()
        shift = SHIFTS[int(rng.integers(len(SHIFTS)))] if plan.augment else (0, 0)
        if shift != (0, 0):
            xs[0] = torch.roll(xs[0], shifts=shift, dims=(2, 3))
        t_out, t_feats = plan.cache.get("train", shift)
        target = torch.from_numpy(t_out[local]).to(device)
        out = _first(student.module(*xs))
        if plan.loss_kind == "kd":
            value = plan.alpha * kd_loss(out, target, plan.temperature) if plan.alpha > 0 else out.new_zeros(())
            if plan.use_labels:
                value = value + (1.0 - plan.alpha) * F.cross_entropy(out, ys)
        else:
            value = output_loss(plan.loss_kind, out, target)
        if not plan.pairs:
            return value, len(local), {}
        feat_loss = out.new_zeros(())
        for k, ((_, b), proj) in enumerate(zip(plan.pairs, student.projections)):
            tf = torch.from_numpy(t_feats[k][local]).to(device)
            feat_loss = feat_loss + F.mse_loss(proj(student.captured[b]), tf) / student.feat_scale[k]
        return value + feature_weight * feat_loss, len(local), {"feature_loss": float(feat_loss.detach())}

    return loss


def _task(student: _Student, plan: _Plan, params: dict[str, Any], data: Dataset, names: list[str],
          device: str) -> TrainTask:
    seed, batch_size = int(params["seed"]), int(params["batch_size"])
    rows = np.arange(len(data.splits["train"]))
    _, val_labels = data.split("val")
    t_val = torch.from_numpy(plan.t_val)

    def evaluate(_epoch: int) -> dict[str, Any]:
        return _val_metrics(_outputs(student.module, data, "val", names), t_val,
                            val_labels if plan.classification else None, plan.classification,
                            plan.loss_kind, plan.temperature, plan.alpha if plan.use_labels else 1.0)

    def score(row: dict[str, Any]) -> tuple:
        primary = row["val_accuracy"] if (plan.use_labels and row["val_accuracy"] is not None) else row["fidelity"]
        return (round(primary, 6), -row["val_loss"])

    return TrainTask(
        batches=lambda epoch: data.batches("train", batch_size, names=names, shuffle=True, seed=seed + epoch,
                                           extra=[rows], training=True),
        loss=_batch_loss(student, plan, float(params["feature_weight"]), seed, device),
        evaluate=evaluate, score=score)


def apply(handle: ModelHandle, params: dict[str, Any], data: Dataset | None,
          progress: Progress | None = None) -> ModelHandle:
    progress = progress or null_progress()
    params = TECHNIQUE.complete(params)  # a validated step's, or a direct caller's partial ones
    if data is None:
        raise DataError("distillation needs data: the student learns from the teacher's outputs on it")
    for split in ("train", "val"):
        if len(data.splits.get(split, ())) == 0:
            raise DataError(f"distillation needs a non-empty '{split}' split", path=data.ref)
    device = resolve_device(params["device"], "distill.device")
    t_start = time.perf_counter()
    plan = _plan(handle, params, data, progress)
    student = _student(handle, params, data, plan, progress.sub(0.1, 0.12, "student: "))
    epochs, batch_size = int(params["epochs"]), int(params["batch_size"])
    spec = TrainSpec(epochs=epochs, lr=FRESH_LR, optimizer=params["optimizer"],
                     steps_per_epoch=max(1, math.ceil(len(data.splits["train"]) / batch_size)),
                     seed=int(params["seed"]), patience=int(params["patience"]), name="distillation",
                     device=device)
    student.projections.to(device)
    trainable = list(student.module.parameters()) + list(student.projections.parameters())
    try:
        task = _task(student, plan, params, data, handle.input_names, device)
        spec.lr, probe = _learning_rate(student, trainable, spec, params, data, plan, handle.input_names,
                                        progress)
        result = train(student.module, trainable, spec, task, progress.sub(0.12, 1.0))
    finally:
        student.remove_hooks()
    for p in student.module.parameters():
        p.requires_grad_(False)
    new = _distilled(handle, params, plan, student, result)
    new.info["distill"].update(device=device, seconds=round(time.perf_counter() - t_start, 3), lr=spec.lr,
                               lr_chosen_by="recipe" if params["lr"] != "auto" else "probe" if probe
                               else "fresh student", lr_probe=probe)
    if probe:
        new.info["step_notes"] = [*new.info.get("step_notes", []), lr_note(spec.lr, probe)]
    progress.update(1.0, "distilled")
    return new


FRESH_LR = BASE_LR["adamw"]  # lr = "auto" for a student built fresh (family): training from scratch


def _learning_rate(student: _Student, trainable: list, spec: TrainSpec, params: dict[str, Any], data: Dataset,
                   plan: _Plan, names: list[str], progress: Progress) -> tuple[float, list | None]:
    """The rate and, when it was probed, the probe's rows. ``lr = "auto"``: a fresh student
    (``family``) trains from scratch at AdamW's 3e-3, what the defaults were tuned on; a pruned copy
    of the teacher or the user's own student file is already trained, so a few steps at 3e-3, 3e-4
    and 3e-5 decide, measured by the val loss (as pruning's fine-tuning,
    :func:`tugboat.engine.techniques.finetune.probe_lr`)."""
    if params["lr"] != "auto":
        return float(params["lr"]), None
    if params["student"] == "family":
        return FRESH_LR, None
    # its own batch order and augmentation draws: the real run's are left as they were
    task = _task(student, plan, {**params, "seed": int(params["seed"]) + 1}, data, names, spec.device)
    both = nn.ModuleList([student.module, student.projections])  # both restored after each rate

    def held() -> float:
        eval_mode(student.module)
        return float(task.evaluate(0)["val_loss"])

    return probe_lr(both, trainable, spec, TrainTask(batches=task.batches, loss=task.loss), held,
                    progress.sub(0.12, 0.15, "learning rate: "))


def _distilled(handle: ModelHandle, params: dict[str, Any], plan: _Plan, student: _Student,
               result: TrainResult) -> ModelHandle:
    """The student as the step's result, with its training history and a summary for the report."""
    new = handle.derive(module=student.module, step={"technique": "distill", **params})
    new.arch = student.arch
    new.info["training"] = result.history
    teacher_params = _count(handle)
    # the student's deployed artifact, counted as measure counts it (the export is reused there)
    student_params = _count(new) or sum(p.numel() for p in student.module.parameters())
    new.info["distill"] = {
        "student": params["student"], **student.info, "loss": plan.loss_kind, "alpha": plan.alpha,
        "temperature": plan.temperature, "labels_used": plan.use_labels, "epochs_run": len(result.history),
        "best_epoch": result.best_epoch, "teacher_params": teacher_params, "student_params": student_params,
        "param_ratio": student_params / max(1, teacher_params), "augment": plan.augment,
        "feature_pairs": [f"{a}:{b}" for a, b in plan.pairs],
        "teacher_seconds": round(plan.cache.seconds, 3), "notes": plan.notes,
    }
    new.warnings += plan.notes
    return new


def _count(handle: ModelHandle) -> int:
    try:
        return int(handle.param_count()[0])
    except Exception:  # counting must never fail a job
        return 0


def _estimate(step: dict[str, Any], est) -> bool:
    """The instant estimate (:class:`tugboat.engine.techniques.estimate.EstimateState`): a family student
    replaces the model; a pruned one keeps ``width`` of each layer's channels (no fine-tuning); a
    student file is unknown until loaded."""
    if step["student"] == "family":
        return est.use_student(step["width"], step["depth"])
    if step["student"] != "pruned" or not est.profile.torch:
        return False
    est.prune_channels(1.0 - step["width"])
    return True


def _memory(step: dict[str, Any], mem) -> None:
    mem.training("training")  # the teacher runs beside the student (:class:`~.measuring.memory.StepMemory`)


TECHNIQUE = Technique(
    name="distill",
    title="Distillation",
    summary="Train a small student to imitate the model's outputs (its softened predictions), "
            "with or without labels.",
    methods={"kd": "knowledge distillation: the student learns the teacher's outputs at a temperature, "
                   "plus the labels where there are any"},
    default_method="kd",
    params=[
        Param("student", "choice", "family", "family: a built-in CNN / MLP / transformer sized by width "
              "and depth; pruned: a channel-pruned copy of the teacher; file: your own model file",
              choices=STUDENTS),
        Param("width", "float", 0.5, "family: size multiplier (CNN base channels 32 x width); pruned: "
              "share of channels kept", minimum=0.02, maximum=4.0, short="w"),
        Param("depth", "int", 3, "family: number of blocks (conv blocks, hidden layers, encoder layers)",
              minimum=1, maximum=12),
        Param("student_file", "str", "", "student = file: path of the student model"),
        Param("temperature", "float", 4.0, "softens the teacher's predictions; higher shares more about "
              "the wrong classes", minimum=1.0, maximum=20.0, short="T"),
        Param("alpha", "float", 0.7, "weight of the teacher's soft targets vs the labels (1: teacher "
              "only; forced to 1 without labels)", minimum=0.0, maximum=1.0, short="a"),
        Param("loss", "choice", "auto", "auto: kd for class logits, cosine for embeddings, mse otherwise",
              choices=LOSSES),
        Param("epochs", "int", 20, "training epochs (at most)", minimum=1, maximum=1000),
        Param("lr", "float", "auto", "learning rate; auto: 3e-3 for a fresh student (family), and for a "
              "pretrained one (pruned, file) a short probe picks 3e-3, 3e-4 or 3e-5 (x10 for sgd) by "
              "the val loss after a few steps at each", minimum=1e-6, maximum=1.0, log_scale=True, auto=True),
        Param("batch_size", "int", 64, "batch size", minimum=1, maximum=8192),
        Param("optimizer", "choice", "adamw", "optimizer (cosine learning-rate schedule)",
              choices=("adamw", "sgd")),
        Param("patience", "int", 5, "stop after this many epochs without a better validation score "
              "(0: never); the best epoch's weights are kept", minimum=0, maximum=1000),
        Param("augment", "bool", False, "images: random one-pixel shifts (teacher outputs cached per shift)"),
        Param("feature_pairs", "list", [], "intermediate layers to match, \"teacher_layer:student_layer\" "
              "(a learned projection maps the student's feature to the teacher's)", check=parse_pairs),
        Param("feature_weight", "float", 1.0, "weight of the feature-matching loss", minimum=0.0,
              maximum=100.0),
        Param("seed", "int", 0, "random seed (initialisation, batch order, augmentation)", minimum=0),
        Param("device", "choice", DEFAULT_TRAINING, "training " + DEVICE_HELP, choices=DEVICE_CHOICES),
    ],
    apply=apply,
    needs_torch=False,  # the teacher may be ONNX-only; student = "pruned" checks for itself
    extras={"loads_files": True},  # student_file: gets this run's trust decision, never a stored one
    estimate=_estimate,
    memory=_memory,
)
