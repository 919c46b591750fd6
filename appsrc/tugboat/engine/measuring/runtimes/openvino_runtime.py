"""OpenVINO (CPU plugin): compiles the variant's ONNX artifact (``openvino.convert_model``).

int8 QDQ graphs from ONNX Runtime's static quantization run as OpenVINO int8 (it folds the
QuantizeLinear/DequantizeLinear pairs into its low-precision kernels); weight-only MatMulNBits and
some ONNX Runtime contrib operators it cannot read, which is reported as the reason."""

from __future__ import annotations

import io

import numpy as np


def version() -> str:
    import openvino

    return openvino.__version__.split("-")[0]


def convert(handle):
    """The variant as an OpenVINO model (``openvino.Model``)."""
    import openvino as ov

    return ov.convert_model(io.BytesIO(handle.to_onnx().SerializeToString()))


def compile_model(model, threads: int):
    import openvino as ov

    core = ov.Core()
    return core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": max(1, int(threads)),
                                             "PERFORMANCE_HINT": "LATENCY"})


class Runner:
    fixed_batch = None

    def __init__(self, compiled) -> None:
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        try:
            # on CPUs with bf16 units OpenVINO computes float layers in bf16 by default: say so
            hint = compiled.get_property("INFERENCE_PRECISION_HINT")
            self.notes = {"precision": hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)}
        except Exception:
            self.notes = {}

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        result = self.request.infer([np.ascontiguousarray(x) for x in inputs])
        return [np.asarray(result[out]) for out in self.compiled.outputs]


def prepare(handle, *, batch: int, threads: int, data=None) -> Runner:
    return Runner(compile_model(convert(handle), threads))
