"""NaN / overflow guards: a model's outputs are checked on a small probe batch after every step.

A technique can quietly produce a model whose outputs are NaN or Inf (a diverged fine-tune, an
int8 scale of zero, a pruned layer that divides by zero). Measuring such a model would report
garbage metrics, so :func:`check_outputs` runs it on a few real samples (random ones without data)
with the cheapest runtime at hand (torch eager when there is a torch module, else ONNX Runtime) and
raises :class:`NumericalError` naming what produced it. A probe costs one forward pass of 8 samples.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DataError, ModelLoadError, NumericalError, TugboatError

if TYPE_CHECKING:  # pragma: no cover
    from ..io.data import Dataset
    from ..io.models import ModelHandle

PROBE_SAMPLES = 8


def probe_inputs(handle: ModelHandle, data: Dataset | None, samples: int = PROBE_SAMPLES) -> list[np.ndarray]:
    """A few real samples (the first of the test split) in the model's input order, or random ones."""
    from .runtime import fill_batch, fixed_batch

    fixed = fixed_batch(handle)
    samples = fixed or samples
    if data is not None and all(n in data.inputs for n in handle.input_names):
        for split in ("test", "val", "train"):
            if len(data.splits.get(split, ())):
                xs, _ = data.split(split, limit=samples)
                arrays = [np.ascontiguousarray(xs[n]) for n in handle.input_names]
                return fill_batch(arrays, fixed) if fixed else arrays
    return handle.example_arrays(samples, seed=7)


INDEX_MARKERS = ("index out of range", "out of data bounds", "indices element", "out of bounds")


def first_run_error(exc: BaseException, handle: ModelHandle, data: Dataset | None) -> TugboatError:
    """A one-line error for the original model failing on its first inputs: blame the data when
    its values cannot be indices (token ids beyond the vocabulary), else the model on that data."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if len(lines) > 1 and "TorchScript" in lines[0]:
        lines = lines[-1:]  # the interpreter's own error, after the serialized traceback
    text = " ".join(" ".join(lines).split())
    for noise in ("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : ", "[ONNXRuntimeError] : 1 : FAIL : ",
                  "Non-zero status code returned while running "):
        text = text.replace(noise, "")
    text = text if len(text) <= 200 else text[:199] + "…"
    if data is not None and any(m in text.lower() for m in INDEX_MARKERS):
        ints = [n for n in handle.input_names if data.inputs[n].dtype.kind in "iu"]
        what = f"integer input {', '.join(map(repr, ints))} " if ints else ""
        return DataError(f"{what}holds values the model cannot use as indices (token ids beyond its "
                         f"vocabulary?): {text}", path=data.ref)
    on = f"samples of {data.ref}" if data is not None else "random inputs"
    return ModelLoadError(f"the model fails on {on}: {text}", path=handle.source)


def probe_outputs(handle: ModelHandle, inputs: list[np.ndarray], threads: int = 1) -> list[np.ndarray]:
    """The model's outputs on ``inputs``: torch eager for a torch model, else ONNX Runtime in the
    session the quality pass and the timing at ``threads`` threads use next (one session per graph)."""
    from .runtime import run_onnx, run_torch, shared_session

    inputs = [spec.to_model(x) for spec, x in zip(handle.inputs, inputs)]  # data is sample-first
    if handle.module is not None and handle.onnx_model is None:
        return run_torch(handle.module, inputs)
    return run_onnx(None, inputs, session=shared_session(handle.to_onnx(), threads))


def non_finite(outputs: list[np.ndarray]) -> str | None:
    """``"NaN"``, ``"Inf"`` or ``"NaN and Inf"`` if any floating output has such values, else None."""
    nan = inf = False
    for o in outputs:
        o = np.asarray(o)
        if o.dtype.kind in "fc":
            nan = nan or bool(np.isnan(o).any())
            inf = inf or bool(np.isinf(o).any())
    if nan and inf:
        return "NaN and Inf"
    return "NaN" if nan else ("Inf" if inf else None)


def describe_step(index: int, step: dict[str, Any]) -> str:
    """``step 2 (quantize static-int8)``; ``index`` counts from 1 over the whole recipe."""
    return f"step {index} ({step.get('technique', '?')} {step.get('method', '')})".replace(" )", ")")


def check_outputs(handle: ModelHandle, inputs: list[np.ndarray], after: str, threads: int = 1) -> None:
    """Raise :class:`NumericalError` ("outputs are NaN after step 2 (quantize static-int8)") if the
    model's outputs on ``inputs`` are not finite."""
    bad = non_finite(probe_outputs(handle, inputs, threads))
    if bad:
        raise NumericalError(f"outputs are {bad} after {after}", path=None)
