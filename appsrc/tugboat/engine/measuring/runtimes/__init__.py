"""Runtimes a variant is measured in: ONNX Runtime and torch (always there), OpenVINO and
ExecuTorch (optional extras, imported only when a recipe or the window asks for them).

Each runtime module offers the same three things:

* ``version()``: the installed version (raises :class:`ImportError` when the extra is absent);
* ``prepare(handle, *, batch, threads, data=None) -> Runner``: the variant ready to run (the
  compiled model, the session, the lowered program); raises :class:`~tugboat.engine.errors.RuntimeUnsupportedError`
  with a one-line
  reason for a variant this runtime cannot run;
* a ``Runner`` with ``run(inputs) -> outputs`` (numpy in, numpy out) and ``fixed_batch`` (the batch
  size the prepared program takes, or None for any).

:func:`measure_runtimes` measures one variant in several runtimes (latency, fidelity, version) and
never fails because one runtime cannot run it: that runtime's entry says why.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np

from ...errors import Cancelled, TugboatError, one_line
from ..timing import batch_inputs, fidelity, summary, time_loop

RUNTIME_NAMES = ("onnxruntime", "torch", "openvino", "executorch")
CORE = ("onnxruntime", "torch")  # installed with Tugboat itself
EXTRAS = {"openvino": "openvino", "executorch": "executorch"}  # runtime -> pip extra of tugboat-ml
FIDELITY_SAMPLES = 256  # test samples each runtime's outputs are compared on


def install_command(name: str) -> str:
    return f"pip install tugboat-ml[{EXTRAS[name]}]" if name in EXTRAS else "pip install tugboat-ml"


def module(name: str):
    """The adapter module of runtime ``name`` (importing it imports nothing heavy). Plain imports,
    not importlib, so PyInstaller sees and bundles every adapter."""
    if name == "onnxruntime":
        from . import ort_runtime as adapter
    elif name == "torch":
        from . import torch_runtime as adapter
    elif name == "openvino":
        from . import openvino_runtime as adapter
    elif name == "executorch":
        from . import executorch_runtime as adapter
    else:
        raise TugboatError(f"unknown runtime {name!r}; valid: {', '.join(RUNTIME_NAMES)}")
    return adapter


def _installed_version(name: str) -> str:
    """The installed version of a runtime's package without importing it (ImportError if absent)."""
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec(name) is None:
        raise ImportError(name, name=name)
    return importlib.metadata.version(name)


def availability(name: str, load: bool = True) -> dict[str, Any]:
    """``{"name", "available", "version"}`` or ``{"name", "available": False, "reason", "install"}``.
    ``load=False``: an optional runtime is only looked up, not imported (OpenVINO's import takes
    about 1 s: a window listing runtimes at start does not pay it; a broken install shows when used)."""
    try:
        if not load and name in EXTRAS:
            return {"name": name, "available": True, "version": _installed_version(name)}
        return {"name": name, "available": True, "version": module(name).version()}
    except ImportError as exc:
        return {"name": name, "available": False, "install": install_command(name),
                "reason": f"{name} is not installed ({exc.name or exc}): {install_command(name)}"}
    except Exception as exc:  # installed but broken (a wrong binary, a missing library)
        return {"name": name, "available": False, "install": install_command(name),
                "reason": f"{name} does not load ({' '.join(str(exc).split())[:160]}): "
                          f"{install_command(name)}"}


def list_runtimes(load: bool = True) -> list[dict[str, Any]]:
    """Every runtime Tugboat knows, with its availability (``tugboat info --runtimes``)."""
    return [availability(name, load) for name in RUNTIME_NAMES]


def as_list(runtime: str | list[str] | tuple[str, ...]) -> list[str]:
    """``runtime`` of ``[measure]`` (a name or a list of names) as a list without repeats."""
    names = [runtime] if isinstance(runtime, str) else list(runtime)
    return list(dict.fromkeys(names))


# --- measuring one variant in several runtimes ---------------------------------------------------

def _inputs(handle, data, n: int) -> list[np.ndarray]:
    samples = data.split("test", limit=n)[0] if data is not None else None
    if samples is not None:
        count = len(next(iter(samples.values())))
        return batch_inputs(handle, min(n, count), samples)
    return batch_inputs(handle, min(n, 16), None)


def run_batched(runner, inputs: list[np.ndarray], progress=None) -> list[np.ndarray]:
    """Outputs over all samples; a runner with a fixed batch gets full batches (the last one padded
    by repeating samples and the padding dropped from the outputs)."""
    n = len(inputs[0])
    step = runner.fixed_batch or 256
    chunks: list[list[np.ndarray]] = []
    for i in range(0, n, step):
        if progress is not None:
            progress.check()
        part = [x[i:i + step] for x in inputs]
        m = len(part[0])
        if runner.fixed_batch and m < step:
            part = [np.ascontiguousarray(np.resize(x, (step, *x.shape[1:]))) for x in part]
        outs = runner.run(part)
        chunks.append([o[:m] for o in outs])
    return [np.concatenate([c[k] for c in chunks]) for k in range(len(chunks[0]))]


def measure_runtime(name: str, handle, cfg, inputs: list[np.ndarray], reference: list[np.ndarray] | None,
                    data=None, progress=None) -> dict[str, Any]:
    """Latency at ``cfg.batch``, fidelity to ``reference`` on ``inputs`` and the version, in one
    runtime; an unavailable runtime or a variant it cannot run gives a one-line ``reason``."""
    entry = availability(name)
    if not entry["available"]:
        return entry
    t0 = time.perf_counter()
    try:
        runner = module(name).prepare(handle, batch=cfg.batch, threads=cfg.threads, data=data)
        outputs = run_batched(runner, inputs, progress)
        batch = runner.fixed_batch or cfg.batch
        x = batch_inputs(handle, batch, {n: a for n, a in zip(handle.input_names, inputs)})
        times = time_loop(lambda: runner.run(x), replace(cfg, noisy_seconds=cfg.max_seconds)
                           if hasattr(cfg, "noisy_seconds") else cfg, progress)
        if isinstance(times, tuple):  # the paired-timing measure returns (times, extended)
            times = times[0]
    except Cancelled:
        raise
    except Exception as exc:
        entry.update(ok=False, reason=f"{name} cannot run this variant: {one_line(exc)}")
        return entry
    classification = handle.task == "classification"
    fid = fidelity(outputs, [r[:len(outputs[0])] for r in reference] if reference is not None else None,
                   classification)
    bad = any(o.dtype.kind == "f" and not np.all(np.isfinite(o)) for o in outputs)
    entry.update(ok=not bad, latency_ms=summary(times, batch, cfg.threads, name), fidelity=fid,
                 samples=len(outputs[0]), seconds=round(time.perf_counter() - t0, 3))
    entry.update(getattr(runner, "notes", {}))
    if bad:
        entry["reason"] = f"{name} gives NaN/Inf outputs for this variant"
    return entry


def measure_runtimes(handle, cfg, names: list[str], data=None, reference: list[np.ndarray] | None = None,
                     progress=None) -> dict[str, dict[str, Any]]:
    """:func:`measure_runtime` for every name; ``reference``: outputs on the test split to compare
    with (the original model's; None: this variant's own outputs in ONNX Runtime)."""
    from ..runtime import run_onnx

    inputs = _inputs(handle, data, FIDELITY_SAMPLES)
    if reference is None:
        reference = run_onnx(handle.to_onnx(), inputs, threads=cfg.threads)
    else:
        reference = [r[:len(inputs[0])] for r in reference]
    out = {}
    for i, name in enumerate(names):
        if progress is not None:
            progress.update(i / max(1, len(names)), f"measuring in {name}")
        out[name] = measure_runtime(name, handle, cfg, inputs, reference, data, progress)
    return out
