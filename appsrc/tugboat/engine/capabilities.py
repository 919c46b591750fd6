"""Which techniques and methods can run on a loaded model, and why not when they cannot.

The GUI panels and ``tugboat info`` ask this before anything runs, so a technique that cannot apply
says why up front instead of failing on Run: an ONNX file onnx2torch cannot convert still quantizes in
ONNX Runtime and still teaches a student, but cannot be pruned or trained with quantization.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx

from . import steps as step_registry

if TYPE_CHECKING:  # pragma: no cover
    from .data import Dataset
    from .models import ModelHandle

_TORCH_METHODS = {("quantize", "qat-int8")}  # methods of ONNX-capable techniques that still train in torch
_CALIBRATED = {("quantize", "static-int8"), ("quantize", "qat-int8")}
_WEIGHT_ONLY = {("quantize", "weight-only-int8"), ("quantize", "weight-only-int4")}


def capabilities(handle: ModelHandle, data: Dataset | None = None) -> dict[str, dict[str, str | None]]:
    """``{technique: {method: None if it can run, else one line saying why not}}``.

    ``data``: when given, methods that need data (calibration, fine-tuning) are checked against it;
    without it they are not refused (the data may come later)."""
    why_no_torch = None
    if handle.module is None:
        why_no_torch = "needs a torch model; " + (
            f"this one is ONNX-only ({handle.conversion_error})" if handle.conversion_error
            else "this variant exists only as an ONNX graph")
    matmul_weights = None
    out: dict[str, dict[str, str | None]] = {}
    for name, tech in step_registry.techniques().items():
        per: dict[str, str | None] = {}
        for method in tech.methods:
            reason = None
            if why_no_torch and (tech.needs_torch or (name, method) in _TORCH_METHODS):
                reason = why_no_torch
            elif (name, method) in _WEIGHT_ONLY:
                if matmul_weights is None:
                    matmul_weights = _has_matmul_weights(handle)
                if not matmul_weights:
                    reason = "the model has no MatMul/Linear weights (weight-only quantization skips convolutions)"
            elif (name, method) in _CALIBRATED and data is not None and len(data) < 2:
                reason = "needs data to calibrate activation ranges"
            per[method] = reason
        out[name] = per
    return out


def summary(caps: dict[str, dict[str, str | None]]) -> list[str]:
    """One line per technique with methods that cannot run: ``prune: needs a torch model; ...``."""
    lines = []
    for tech, per in caps.items():
        refused = {m: r for m, r in per.items() if r}
        if not refused:
            continue
        reasons = sorted(set(refused.values()))
        scope = "" if len(refused) == len(per) else f" ({', '.join(refused)})"
        lines.append(f"{tech}{scope}: {'; '.join(reasons)}")
    return lines


def _has_matmul_weights(handle: ModelHandle) -> bool:
    graph = handle.onnx_model or handle.deploy_onnx
    if graph is None and handle.module is not None:
        import torch

        return any(isinstance(m, torch.nn.Linear) for m in handle.module.modules())
    if graph is None:
        return False
    inits = {i.name: i for i in graph.graph.initializer}
    for node in graph.graph.node:
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1:
            w = inits.get(node.input[1])
            if w is not None and len(w.dims) == 2 and w.data_type in (onnx.TensorProto.FLOAT,
                                                                      onnx.TensorProto.FLOAT16):
                return True
    return False
