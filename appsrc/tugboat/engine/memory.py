"""Memory: estimate a job's peak before it starts, refuse what cannot fit, recognise out-of-memory.

:func:`estimate` adds up what a recipe's phases hold at their peak, from the model's parameter
bytes and its activation bytes per sample (measured by one batch-1 forward pass with hooks on a
torch module, or from ONNX shape inference) times each phase's batch size:

* measuring (baseline and variants): activations at ``measure.batch`` and at the quality batch
  (256), plus an ONNX Runtime session (about twice the weights);
* training (fine-tuning after pruning, QAT, distillation): weights, gradients and two optimizer
  states (4x the weights) plus activations kept for the backward pass (3x) at ``batch_size``;
* static int8 calibration: ONNX Runtime keeps every intermediate tensor of up to
  ``calibration_samples`` samples;
* every step's output model stays in memory until the variant is measured.

:func:`check` compares the estimate with :func:`available_memory` (psutil when installed, else
``/proc/meminfo`` and the cgroup limit on Linux, ``GlobalMemoryStatusEx`` on Windows,
``sysconf`` elsewhere) and raises :class:`ResourceError` naming the setting to lower and a value
that fits. ``TUGBOAT_SKIP_MEMORY_CHECK=1`` turns the refusal off (the estimate is conservative).

:func:`is_out_of_memory` recognises ``MemoryError`` and torch's allocator errors, so a job that
runs out anyway ends as a failed job with a clear message (:func:`oom_message`), not a dead app.
"""

from __future__ import annotations

import contextlib
import os
import sys
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import ResourceError
from .formatting import fmt_bytes

if TYPE_CHECKING:  # pragma: no cover
    from .data import Dataset
    from .measure import MeasureConfig
    from .models import ModelHandle

SAFETY = 0.9  # leave a tenth of what is available to the rest of the machine
QUALITY_BATCH = 256  # runtime.predict's batch
CALIB_BATCHES_KEPT = 64  # quantize.static_int8: CalibMaxIntermediateOutputs
CALIB_BATCH = 32
ORT_OVERHEAD = 32 * 1024**2  # an ONNX Runtime session's arenas and code, beyond weights and tensors
OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "bad_alloc",
               "failed to allocate memory")


# --- what is available -------------------------------------------------------------------------

def available_memory() -> int | None:
    """Bytes of memory this process can still use, or None if the platform does not say."""
    try:
        import psutil  # optional

        avail = int(psutil.virtual_memory().available)
    except Exception:
        avail = _proc_meminfo() or _windows_available() or _sysconf_available()
    limit = _cgroup_headroom()
    if avail is None:
        return limit
    return min(avail, limit) if limit is not None else avail


def _proc_meminfo() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_headroom() -> int | None:
    """Limit minus usage of this process's cgroup (containers see the host's /proc/meminfo)."""
    pairs = [("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
             ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")]
    for limit_file, usage_file in pairs:
        try:
            with open(limit_file, encoding="ascii") as fh:
                text = fh.read().strip()
            if text == "max":
                return None
            limit = int(text)
            if limit >= 1 << 60:  # cgroup v1 "unlimited"
                return None
            with open(usage_file, encoding="ascii") as fh:
                usage = int(fh.read().strip())
            return max(0, limit - usage)
        except (OSError, ValueError):
            continue
    return None


def _windows_available() -> int | None:
    if sys.platform != "win32":
        return None
    try:
        import ctypes

        class MemoryStatus(ctypes.Structure):
            _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong),
                        ("ullTotalPhys", ctypes.c_ulonglong), ("ullAvailPhys", ctypes.c_ulonglong),
                        ("ullTotalPageFile", ctypes.c_ulonglong), ("ullAvailPageFile", ctypes.c_ulonglong),
                        ("ullTotalVirtual", ctypes.c_ulonglong), ("ullAvailVirtual", ctypes.c_ulonglong),
                        ("ullAvailExtendedVirtual", ctypes.c_ulonglong)]

        status = MemoryStatus()
        status.dwLength = ctypes.sizeof(MemoryStatus)
        if ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):  # type: ignore[attr-defined]
            return int(status.ullAvailPhys)
    except Exception:
        pass
    return None


def _sysconf_available() -> int | None:
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


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
    for t in handle.example_inputs(1):
        total += t.numel() * t.element_size()
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
        inferred = onnx.shape_inference.infer_shapes(model)
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


def step_phases(index: int, step: dict[str, Any], stats: ModelStats, data: Dataset | None) -> list[Phase]:
    """The memory phases of one validated step (``index`` counts from 0 in the recipe)."""
    tech, method = step.get("technique", ""), step.get("method", "")
    where = f"steps.{index} ({tech} {method})".replace(" )", ")")
    phases = [Phase(f"{where}: the new model", 2 * stats.param_bytes, stats.activation_bytes, 2)]
    if tech == "prune":
        if int(step.get("finetune_epochs") or 0) > 0:
            phases.append(_training(f"fine-tuning in {where}", stats, int(step.get("batch_size", 64)),
                                    f"steps.{index}.batch_size", extra_models=1))
    elif tech == "distill":
        phases.append(_training(f"training in {where}", stats, int(step.get("batch_size", 64)),
                                f"steps.{index}.batch_size", extra_models=1))
    elif tech == "quantize":
        if method == "qat-int8":
            phases.append(_training(f"QAT in {where}", stats, int(step.get("batch_size", 64)),
                                    f"steps.{index}.batch_size", extra_models=1))
        elif method in ("static-int8", "auto"):  # auto calibrates when it picks static int8
            samples = int(step.get("calibration_samples", 256))
            if data is not None:
                split = "calib" if len(data.splits.get("calib", ())) else "train"
                samples = min(samples, len(data.splits.get(split, ())) or samples)
            samples = min(samples, CALIB_BATCH * CALIB_BATCHES_KEPT)
            # the augmented graph outputs every intermediate tensor, kept for up to 64 batches
            phases.append(Phase(f"calibration in {where}", 3 * stats.param_bytes + ORT_OVERHEAD,
                                2 * stats.activation_bytes, samples, f"steps.{index}.calibration_samples"))
        else:
            phases.append(Phase(f"{where}", 3 * stats.param_bytes + ORT_OVERHEAD, 0, 1))
    return phases


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


# --- running out anyway --------------------------------------------------------------------------

def is_out_of_memory(exc: BaseException) -> bool:
    """``MemoryError``, torch's ``OutOfMemoryError`` and the CPU allocator's ``RuntimeError``
    ("DefaultCPUAllocator: can't allocate memory"), ONNX Runtime's allocation failures."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    if isinstance(exc, RuntimeError) or type(exc).__module__.startswith("onnxruntime"):
        text = str(exc).lower()
        return any(m in text for m in OOM_MARKERS)
    return False


def oom_message(what: str) -> str:
    return (f"out of memory {what}; lower the batch size (batch_size, measure.batch, "
            f"calibration_samples) or use a smaller model")
