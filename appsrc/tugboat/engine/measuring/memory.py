"""Memory: estimate a job's peak before it starts and refuse what cannot fit.

:func:`estimate` adds up what a recipe's phases hold at their peak, from the model's parameter
bytes and its activation bytes per sample (measured by one batch-1 forward pass with hooks on a
torch module, or from ONNX shape inference) times each phase's batch size:

* measuring (baseline and variants): activations at ``measure.batch`` and at the quality batch
  (256), plus an ONNX Runtime session (about twice the weights);
* every step's output model stays in memory until the variant is measured;
* the phases each step's technique declares through its ``memory`` hook, built with
  :class:`StepMemory`: training (fine-tuning after pruning, QAT, distillation: weights, gradients
  and two optimizer states, 4x the weights, plus activations kept for the backward pass at
  ``batch_size``), calibration (ONNX Runtime keeps every intermediate tensor of up to
  ``calibration_samples`` samples), or one ONNX Runtime pass over the weights.

:func:`check` compares the estimate with :func:`available_memory` (psutil when installed, else
``/proc/meminfo`` and the cgroup limit on Linux, ``GlobalMemoryStatusEx`` on Windows,
``sysconf`` elsewhere) and raises :class:`ResourceError` naming the setting to lower and a value
that fits. ``TUGBOAT_SKIP_MEMORY_CHECK=1`` turns the refusal off (the estimate is conservative).
What is available and running out anyway (:func:`is_out_of_memory`) are :mod:`tugboat.engine.ram`'s.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import ResourceError
from ..formatting import fmt_bytes
from ..ram import SAFETY, available_memory, is_out_of_memory, oom_message  # noqa: F401  (callers' names)

if TYPE_CHECKING:  # pragma: no cover
    from ..io.data import Dataset
    from ..io.models import ModelHandle
    from .measure import MeasureConfig

QUALITY_BATCH = 256  # runtime.predict's batch
CALIB_BATCHES_KEPT = 64  # quantize.static_int8: CalibMaxIntermediateOutputs
CALIB_BATCH = 32
ORT_OVERHEAD = 32 * 1024**2  # an ONNX Runtime session's arenas and code, beyond weights and tensors


# --- what a model needs ------------------------------------------------------------------------

@dataclass
class ModelStats:
    param_bytes: int  # weights and buffers
    activation_bytes: int  # every intermediate tensor of one sample (an upper bound of a peak)
    input_bytes: int  # one sample's inputs


_torch_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_onnx_cache: dict[int, tuple[Any, ModelStats]] = {}


def model_stats(handle: ModelHandle) -> ModelStats:
    if handle.module is not None and handle.onnx_model is None:
        stats = _torch_cache.get(handle.module)
        if stats is None:
            stats = _torch_stats(handle)
            with contextlib.suppress(TypeError):
                _torch_cache[handle.module] = stats
        return stats
    model = handle.to_onnx()
    hit = _onnx_cache.get(id(model))
    if hit is not None and hit[0] is model:
        return hit[1]
    stats = _onnx_stats(handle, model)
    if len(_onnx_cache) > 16:
        _onnx_cache.clear()
    _onnx_cache[id(model)] = (model, stats)
    return stats


def _input_bytes(handle: ModelHandle) -> int:
    total = 0
    for a in handle.example_arrays(1):  # numpy: sizing an ONNX model's inputs needs no torch
        total += a.nbytes
    return total


def _torch_stats(handle: ModelHandle) -> ModelStats:
    import torch

    from .runtime import eval_mode

    module = handle.module
    seen: set[int] = set()
    params = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            params += t.numel() * t.element_size()
    acts = [0]

    def hook(_m, _inp, out):
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor):
                acts[0] += o.numel() * max(4, o.element_size())

    leaves = [m for m in module.modules() if not list(m.children())] or [module]
    handles = []
    try:
        for m in leaves:
            handles.append(m.register_forward_hook(hook))
    except RuntimeError:  # TorchScript modules take no hooks: the input-size fallback below
        for h in handles:
            h.remove()
        handles = []
    was_training = module.training
    try:
        eval_mode(module)
        with torch.inference_mode():
            module(*handle.example_inputs(1))
    except Exception:  # a module that cannot run on random inputs: fall back to the input size
        acts[0] = 0
    finally:
        for h in handles:
            h.remove()
        eval_mode(module, was_training)
    inp = _input_bytes(handle)
    return ModelStats(params, max(acts[0], 8 * inp), inp)


_ONNX_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}


def _onnx_stats(handle: ModelHandle, model) -> ModelStats:
    import numpy as np
    import onnx

    params = 0
    for init in model.graph.initializer:
        n = int(np.prod(init.dims)) if init.dims else 1
        params += n * _ONNX_BYTES.get(init.data_type, 4)
    acts = 0
    try:
        from .runtime import weightless

        # the same shapes without handing the weights to the C++ side (seconds for a 90 MB model)
        inferred = onnx.shape_inference.infer_shapes(weightless(model)[0])
        for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
            t = vi.type.tensor_type
            n = 1
            for d in t.shape.dim:
                n *= d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1
            acts += n * _ONNX_BYTES.get(t.elem_type, 4)
    except Exception:
        acts = 0
    inp = _input_bytes(handle)
    return ModelStats(params, max(acts, 8 * inp), inp)


# --- the estimate ------------------------------------------------------------------------------

@dataclass
class Phase:
    name: str  # "fine-tuning in steps.0 (prune structured)"
    fixed: int  # bytes that do not depend on the batch
    per_sample: int  # bytes per sample of the batch
    batch: int
    knob: str | None = None  # the recipe setting that sets ``batch`` (e.g. "steps.0.batch_size")

    @property
    def total(self) -> int:
        return self.fixed + self.per_sample * self.batch


@dataclass
class MemoryEstimate:
    peak: int
    phase: Phase
    held: int  # models kept alive through the run (one per step)
    phases: list[Phase] = field(default_factory=list)

    def fits_batch(self, budget: int) -> int | None:
        """The largest batch of the peak phase that fits ``budget`` bytes (None if none does)."""
        room = budget - self.held - self.phase.fixed
        if self.phase.per_sample <= 0 or room < self.phase.per_sample:
            return None
        return max(1, min(self.phase.batch - 1, room // self.phase.per_sample))


def _training(name: str, stats: ModelStats, batch: int, knob: str, extra_models: int = 0) -> Phase:
    # weights + gradients + two optimizer states; the activations saved for backward and their
    # gradients (2x); ``extra_models`` frozen copies (a teacher) run forward at the same batch, their
    # tensors freed layer by layer (0.5x). Measured on the demo CNN at batch 1024 (fine-tuning, QAT,
    # distillation): the real peak was 0.5-0.75x this estimate.
    return Phase(name, 4 * stats.param_bytes + extra_models * stats.param_bytes,
                 2 * stats.activation_bytes + extra_models * stats.activation_bytes // 2 + stats.input_bytes,
                 batch, knob)


class StepMemory:
    """What a technique's ``memory`` hook is given: the validated ``step``, the model's sizes, and
    builders of the phases the step runs through (each adds one :class:`Phase`)."""

    def __init__(self, index: int, step: dict[str, Any], stats: ModelStats, data: Dataset | None) -> None:
        self.index, self.step, self.stats, self.data = index, step, stats, data
        tech, method = step.get("technique", ""), step.get("method", "")
        self.where = f"steps.{index} ({tech} {method})".replace(" )", ")")
        self.phases = [Phase(f"{self.where}: the new model", 2 * stats.param_bytes, stats.activation_bytes, 2)]

    def training(self, what: str, batch_key: str = "batch_size", extra_models: int = 1) -> None:
        """Training at the step's ``batch_key`` batch with ``extra_models`` frozen copies (a teacher)."""
        self.phases.append(_training(f"{what} in {self.where}", self.stats, int(self.step[batch_key]),
                                     f"steps.{self.index}.{batch_key}", extra_models))

    def calibration(self, samples_key: str) -> None:
        """Static int8 calibration on up to ``step[samples_key]`` samples: the augmented graph
        outputs every intermediate tensor, kept for up to :data:`CALIB_BATCHES_KEPT` batches."""
        samples = int(self.step[samples_key])
        if self.data is not None:
            split = "calib" if len(self.data.splits.get("calib", ())) else "train"
            samples = min(samples, len(self.data.splits.get(split, ())) or samples)
        samples = min(samples, CALIB_BATCH * CALIB_BATCHES_KEPT)
        self.phases.append(Phase(f"calibration in {self.where}", 3 * self.stats.param_bytes + ORT_OVERHEAD,
                                 2 * self.stats.activation_bytes, samples, f"steps.{self.index}.{samples_key}"))

    def onnx_pass(self) -> None:
        """One ONNX Runtime pass over the weights (a quantizer's copy of the graph)."""
        self.phases.append(Phase(f"{self.where}", 3 * self.stats.param_bytes + ORT_OVERHEAD, 0, 1))


def step_phases(index: int, step: dict[str, Any], stats: ModelStats, data: Dataset | None) -> list[Phase]:
    """The memory phases of one validated step (``index`` counts from 0 in the recipe): holding the
    new model, and what its technique's ``memory`` hook adds."""
    from ..techniques.steps import find

    tech = find(step.get("technique"))
    if tech is None or tech.memory is None:
        return StepMemory(index, step, stats, data).phases
    params = tech.complete(step)
    mem = StepMemory(index, {"technique": tech.name, **params}, stats, data)
    tech.memory(params, mem)
    return mem.phases


def estimate(handle: ModelHandle, steps: list[dict[str, Any]], data: Dataset | None,
             cfg: MeasureConfig | None, *, first_index: int = 0) -> MemoryEstimate:
    stats = model_stats(handle)
    batch = cfg.batch if cfg is not None else 64
    session = 2 * stats.param_bytes + ORT_OVERHEAD  # an ONNX Runtime session: its copy of the weights
    phases = [Phase("measuring at measure.batch", session, stats.activation_bytes + stats.input_bytes, batch,
                    "measure.batch")]
    if data is not None:
        test = len(data.splits.get("test", ())) or QUALITY_BATCH
        phases.append(Phase("measuring quality", session, stats.activation_bytes + stats.input_bytes,
                            min(QUALITY_BATCH, test)))
    for i, step in enumerate(steps):
        phases += step_phases(first_index + i, step, stats, data)
    held = stats.param_bytes * len(steps)  # each step's output stays until the variant is measured
    peak_phase = max(phases, key=lambda p: p.total)
    return MemoryEstimate(held + peak_phase.total, peak_phase, held, phases)


def check(handle: ModelHandle, steps: list[dict[str, Any]], data: Dataset | None,
          cfg: MeasureConfig | None, *, first_index: int = 0, where: str | None = None) -> MemoryEstimate | None:
    """Refuse (``ResourceError``) a job whose estimated peak does not fit the available memory."""
    if os.environ.get("TUGBOAT_SKIP_MEMORY_CHECK", "") not in ("", "0"):
        return None
    avail = available_memory()
    est = estimate(handle, steps, data, cfg, first_index=first_index)
    if avail is None:
        return est
    budget = int(avail * SAFETY)
    if est.peak <= budget:
        return est
    p = est.phase
    advice = "use a smaller model or a machine with more memory"
    fit = est.fits_batch(budget)
    if p.knob and fit:
        advice = f"lower {p.knob} to {_round_down(fit)} (it is {p.batch})"
    raise ResourceError(f"this job needs about {fmt_bytes(est.peak)} of memory ({p.name}), "
                        f"{fmt_bytes(avail)} available; {advice}",
                        path=where or handle.source,
                        hint="set TUGBOAT_SKIP_MEMORY_CHECK=1 to run it anyway")


def _round_down(n: int) -> int:
    """A friendly batch size: a power of two at most ``n`` (or ``n`` itself below 8)."""
    if n < 8:
        return max(1, int(n))
    p = 1
    while p * 2 <= n:
        p *= 2
    return p
