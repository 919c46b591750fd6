"""ONNX Runtime (CPU execution provider): runs the variant's ONNX artifact."""

from __future__ import annotations

import numpy as np


def version() -> str:
    import onnxruntime

    return onnxruntime.__version__


class Runner:
    fixed_batch = None

    def __init__(self, session) -> None:
        self.session = session

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        from ..runtime import run_onnx

        return run_onnx(None, inputs, session=self.session)


def prepare(handle, *, batch: int, threads: int, data=None) -> Runner:
    from ..runtime import ort_session

    return Runner(ort_session(handle.to_onnx(), threads))
