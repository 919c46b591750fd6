"""``tugboat info``: everything known about a model, as plain data."""

from __future__ import annotations

from typing import Any

from .measure import layer_table, onnx_flops, size_metrics
from .models import load_model


def model_info(ref: str, *, trust: bool = False, arch: str | None = None,
               input_shape: tuple[int, ...] | None = None, handle=None) -> dict[str, Any]:
    handle = handle or load_model(ref, trust=trust, arch=arch, input_shape=input_shape)
    model = handle.to_onnx()
    params, nonzero = handle.param_count()
    flops, _ = onnx_flops(model)
    info = {
        "source": handle.source, "format": handle.format, "task": handle.task, "arch": handle.arch,
        "inputs": [s.to_dict() for s in handle.inputs], "outputs": [s.to_dict() for s in handle.outputs],
        "params": params, "nonzero_params": nonzero, "flops": flops,
        **size_metrics(model.SerializeToString()),
        "torch_available": handle.module is not None,
        "conversion_error": handle.conversion_error,
        "warnings": list(handle.warnings),
        "layers": layer_table(handle),
    }
    return info
