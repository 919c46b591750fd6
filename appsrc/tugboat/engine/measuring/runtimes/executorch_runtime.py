"""ExecuTorch with the XNNPACK delegate: the variant's torch module is exported (``torch.export``),
lowered (``to_edge_transform_and_lower`` + ``XnnpackPartitioner``) to a ``.pte`` program and run by
ExecuTorch's runtime.

int8 variants that ONNX Runtime quantized (static-int8, qat-int8, dynamic-int8) are quantized again
for XNNPACK from the float module they were made from, with the XNNPACK quantizer (pt2e: static
per-channel int8 calibrated on the data's calib split, or dynamic int8), because the ONNX int8 graph
cannot be turned back into torch. Weight-only and fp16 variants run as float in XNNPACK (noted).
The program has a fixed batch size. Lowering takes seconds, so programs are cached per module."""

from __future__ import annotations

import os
import threading
import weakref

import numpy as np

from ...errors import RuntimeUnsupportedError, one_line

_CACHE: dict[tuple, tuple[weakref.ref, bytes, dict]] = {}
_LOCK = threading.Lock()
_STATIC = ("static-int8", "qat-int8")


def version() -> str:
    from importlib.metadata import version as dist_version

    import executorch  # noqa: F401  (ImportError when the extra is absent)

    return dist_version("executorch")


def _quant_method(handle) -> str | None:
    for step in handle.history or []:
        if step.get("technique") == "quantize":
            return step.get("method")
    return None


def source_module(handle):
    """(float or quantizable torch module, quantize method or None) for this variant."""
    method = _quant_method(handle)
    if handle.module is not None and method is None:  # float (pruned, distilled, converted) modules
        return handle.module, None
    float_module = getattr(handle, "float_module", None)
    if method and float_module is not None:
        return float_module, method
    if method:
        raise RuntimeUnsupportedError(
            f"needs the float torch module this {method} variant was made from: the original has none "
            f"({handle.conversion_error or 'ONNX only'}), or the variant was reopened from disk (re-run it)")
    raise RuntimeUnsupportedError(f"no torch module: {handle.conversion_error or 'the model exists only as ONNX'}")


def _calibration(handle, data, batch: int) -> list[list]:
    import torch

    if data is not None:
        try:
            return [xs for xs, _, _ in data.batches("calib", batch, names=handle.input_names)][:8]
        except Exception:  # no calib split: the test split's first samples
            from ..timing import batch_inputs

            x = batch_inputs(handle, batch, data.split("test", limit=batch)[0])
            return [[torch.from_numpy(a) for a in x]]
    return [list(handle.example_inputs(batch, seed=i)) for i in range(4)]


def lower(handle, batch: int, data=None, progress=None) -> tuple[bytes, dict]:
    """The variant as ExecuTorch program bytes (XNNPACK delegate) at ``batch``, and notes."""
    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    module, method = source_module(handle)
    key = (id(module), batch, method)
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is not None and hit[0]() is module:
            return hit[1], dict(hit[2])
    import copy
    import warnings

    import torch

    with warnings.catch_warnings():
        # ExecuTorch's own import-time notices (importlib.resources, torch.jit.script_method,
        # "experimental API"): not ours to fix, and they would fill every log
        warnings.simplefilter("ignore")
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

    from ..runtime import eval_mode

    notes: dict = {"delegate": "XNNPACK", "fixed_batch": batch}
    example = tuple(handle.example_inputs(batch))
    work = copy.deepcopy(module)
    eval_mode(work)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if method in (*_STATIC, "dynamic-int8"):
            from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
                XNNPACKQuantizer,
                get_symmetric_quantization_config,
            )
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

            dynamic = method == "dynamic-int8"
            quantizer = XNNPACKQuantizer().set_global(
                get_symmetric_quantization_config(is_per_channel=True, is_dynamic=dynamic))
            graph = torch.export.export(work, example).module()
            graph = prepare_pt2e(graph, quantizer)
            for xs in ([list(example)] if dynamic else _calibration(handle, data, batch)):
                if progress is not None:
                    progress.check()
                if len(xs[0]) == batch:
                    graph(*xs)
            work = convert_pt2e(graph)
            notes["quantized"] = f"XNNPACK {'dynamic' if dynamic else 'static per-channel'} int8 " \
                                 f"(from the float module; ONNX Runtime's {method} graph is not reused)"
        elif method:
            notes["quantized"] = f"none: {method} has no XNNPACK path here; runs as float"
        program = torch.export.export(work, example)
        if progress is not None:
            progress.check()
        buffer = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer
    with _LOCK:
        _CACHE[key] = (weakref.ref(module), buffer, dict(notes))
    return buffer, notes


def load(buffer: bytes):
    """The program's ``forward`` method in ExecuTorch's runtime."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "This API is experimental" on first import
        from executorch.runtime import Runtime

        return Runtime.get().load_program(buffer).load_method("forward")


class Runner:
    def __init__(self, method, batch: int, notes: dict, threads: int) -> None:
        self.method, self.fixed_batch, self.notes, self.threads = method, batch, notes, threads

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        import torch

        outs = self.method.execute([torch.from_numpy(np.ascontiguousarray(x)) for x in inputs])
        return [o.detach().numpy() if hasattr(o, "detach") else np.asarray(o) for o in outs]


def prepare(handle, *, batch: int, threads: int, data=None, progress=None) -> Runner:
    try:
        buffer, notes = lower(handle, batch, data, progress)
    except RuntimeUnsupportedError:
        raise
    except ImportError:
        raise
    except Exception as exc:
        raise RuntimeUnsupportedError(f"export/lowering failed: {one_line(exc)}") from None
    _set_threads(threads)
    return Runner(load(buffer), batch, notes, threads)


def _set_threads(threads: int) -> None:
    """XNNPACK's thread pool size (process-wide in ExecuTorch's Python bindings)."""
    import contextlib
    import warnings

    with contextlib.suppress(Exception), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "This API is experimental" on first import
        from executorch.extension.pybindings import portable_lib

        portable_lib._unsafe_reset_threadpool(max(1, int(threads)))
