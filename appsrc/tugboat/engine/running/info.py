"""``tugboat info``: everything known about a model, as plain data."""

from __future__ import annotations

from typing import Any

from ..io.loading import load_model
from ..io.tasks import set_task
from ..measuring.measure import input_shapes, layer_table, one_sample, onnx_flops, size_metrics, unknown_input_dims
from .capabilities import capabilities


def model_info(ref: str, *, trust: bool = False, arch: str | None = None,
               input_shape: tuple[int, ...] | None = None, handle=None, data: str | None = None,
               task: str | None = None, arch_kwargs: dict[str, Any] | None = None,
               constants: dict[str, Any] | None = None) -> dict[str, Any]:
    """``data`` (a data reference) gives concrete sizes for inputs the file leaves open (FLOPs then
    count at the data's sizes) and labels that tell classification from other tasks; ``task``
    overrides the inferred task. A file that records no input shapes (TorchScript) takes them from
    the data too."""
    handle = handle or load_model(ref, trust=trust, arch=arch, input_shape=input_shape,
                                  arch_kwargs=arch_kwargs, constants=constants)
    set_task(handle, task)
    samples = None
    if data is not None:
        from ..io.data import load_data

        ds = load_data(data, handle)  # checks the data against the model and records its sample shapes
        samples = one_sample(handle, ds)
    if handle.pending is not None:  # input shapes unknown: what the file itself tells
        from ..io.formats import pending_info

        told = pending_info(handle)
        return {
            "source": handle.source, "format": handle.format, "task": handle.task,
            "task_source": handle.task_source, "arch": handle.arch,
            "inputs": [s.to_dict() for s in handle.inputs], "outputs": [],
            **{k: told[k] for k in ("params", "nonzero_params", "flops", "size_bytes", "compressed_bytes")},
            "size_of": handle.format, "torch_available": False, "conversion_error": None,
            "warnings": [*handle.warnings, told["note"]], "layers": told["layers"],
        }
    model = handle.to_onnx()
    params, nonzero = handle.param_count()
    shapes = input_shapes(handle)
    flops, _ = onnx_flops(model, input_shapes=shapes, samples=samples)
    warnings = list(handle.warnings)
    open_dims = unknown_input_dims(model, shapes)
    if open_dims:
        flops = None
        warnings.append(f"FLOPs need the sizes the file leaves open ({', '.join(open_dims)}): "
                        "give data (--data) or --input-shape")
    info = {
        "source": handle.source, "format": handle.format, "task": handle.task,
        "task_source": handle.task_source, "arch": handle.arch,
        "inputs": [s.to_dict() for s in handle.inputs], "outputs": [s.to_dict() for s in handle.outputs],
        "params": params, "nonzero_params": nonzero, "flops": flops,
        **size_metrics(model.SerializeToString()),
        "torch_available": handle.module is not None,
        "conversion_error": handle.conversion_error,
        "warnings": warnings,
        "layers": layer_table(handle),
        "capabilities": capabilities(handle),
    }
    from ..io.export import provenance

    made_by = provenance(model)
    if made_by:  # a file Tugboat exported: where it came from
        info["provenance"] = made_by
    problem = _output_problem(handle)
    if problem:
        info["warnings"].append(problem)
    return info


def _output_problem(handle) -> str | None:
    """A warning when the model's outputs are NaN/Inf on example inputs (a broken model)."""
    from ..errors import NumericalError
    from ..measuring.measure import check_finite
    from ..measuring.runtime import predict

    try:
        probe = {n: x.numpy() for n, x in zip(handle.input_names, handle.example_inputs(2))}
        check_finite(predict(handle, probe, runtime="torch"), handle.source, "on example inputs")
    except NumericalError as exc:
        return f"the model is broken: {exc.message}"
    except Exception:  # e.g. an input size only data can tell: the probe is optional
        return None
    return None
