"""Where training and latency measurement run: the ``device`` setting, resolved in one place.

A setting is ``"cpu"``, ``"cuda"`` (the current GPU), ``"cuda:N"`` (GPU number N) or ``"auto"``
(the first GPU when torch sees one, else the CPU). Training-type steps (fine-tuning after pruning,
distillation, quantization-aware training) take it as their ``device`` parameter; latency takes it
from ``[measure] device``; ``tugboat run|sweep --device`` sets both for one run. A GPU setting on
a machine without one is refused with one line naming the setting, never silently run on the CPU.
"""

from __future__ import annotations

import re

from .errors import DeviceError

DEVICES = ("auto", "cpu", "cuda", "cuda:N")  # the forms a setting may take (N: a GPU number)
# the values a recipe's ``device`` may take, as a choice list (validated and offered like any other)
DEVICE_CHOICES = ("auto", "cpu", "cuda", *(f"cuda:{i}" for i in range(16)))
DEFAULT_TRAINING = "auto"  # training uses a GPU wherever there is one
DEFAULT_MEASURE = "cpu"  # latency is the deployment target's: a GPU only when asked for
_FORM = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
HELP = "where it runs: cpu, cuda, cuda:N (GPU number N) or auto (a GPU when there is one, else the cpu)"


def check(setting: object, where: str = "device") -> str:
    """``setting`` as a normalised device string (lower case, no spaces); raises :class:`DeviceError`
    for anything that is not one of :data:`DEVICES`. Says nothing about this machine's GPUs."""
    text = str(setting).strip().lower() if isinstance(setting, str) else None
    if not text or not _FORM.match(text):
        raise DeviceError(f"'{where}' must be one of {', '.join(DEVICES)}, got {setting!r}")
    return text


def gpu_count() -> int:
    import torch

    try:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken driver reads as no GPU
        return 0


def resolve(setting: object = "auto", where: str = "device") -> str:
    """The concrete device (``"cpu"`` or ``"cuda:N"``) for ``setting`` on this machine."""
    text = check(setting, where)
    if text == "cpu":  # before asking torch about GPUs: an ONNX-only run never imports it
        return "cpu"
    count = gpu_count()
    if text == "auto":
        return "cuda:0" if count else "cpu"
    index = int(text.partition(":")[2] or 0) if ":" in text else _current_gpu(count)
    if count == 0:
        raise DeviceError(f"'{where}' = {setting!r} asks for a GPU, but torch sees none on this machine "
                          f"(torch without CUDA, or no GPU)", hint="use cpu or auto")
    if index >= count:
        raise DeviceError(f"'{where}' = {setting!r}: this machine has {count} GPU(s), numbered 0 to "
                          f"{count - 1}", hint="use cuda:0 or auto")
    return f"cuda:{index}"


def _current_gpu(count: int) -> int:
    if not count:
        return 0
    import torch

    return int(torch.cuda.current_device())


def torch_device(setting: object = "auto", where: str = "device"):
    """:func:`resolve` as a ``torch.device``."""
    import torch

    return torch.device(resolve(setting, where))


def describe(device: str) -> str:
    """A resolved device in words for reports: ``"cpu"`` or ``"cuda:0 (NVIDIA H200)"``."""
    if not device.startswith("cuda"):
        return device
    try:
        import torch

        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    except Exception:
        return device


def set_run_device(recipe, setting: str, where: str = "--device") -> str:
    """One run's device (``tugboat run|sweep --device``): latency (``[measure] device``) and every
    step that trains (those with a ``device`` parameter) use ``setting``. Resolved here, before any
    work, so a missing GPU is one line up front rather than a failed variant per step. Returns the
    resolved device."""
    resolved = resolve(setting, where)
    text = check(setting, where)
    recipe.measure.device = text
    for step in recipe.steps:
        if "device" in step:
            step["device"] = text
    return resolved


def wants_gpu(recipe) -> bool:
    """Whether a step of ``recipe`` (or a value its ``[sweep]`` tries for a step's device) names a
    GPU explicitly: a Ray task then declares one (``auto`` does not: it takes one only if present)."""
    named = [step.get("device") for step in recipe.steps]
    for key, values in (getattr(recipe, "sweep", None) or {}).items():
        if str(key).endswith(".device"):
            named += list(values) if isinstance(values, (list, tuple)) else [values]
    return any(isinstance(v, str) and v.strip().lower().startswith("cuda") for v in named)
