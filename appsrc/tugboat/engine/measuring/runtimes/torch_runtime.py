"""torch eager on the CPU: runs the variant's torch module (none for ONNX-only variants)."""

from __future__ import annotations

import numpy as np

from ...errors import RuntimeUnsupportedError


def version() -> str:
    import torch

    return torch.__version__


class Runner:
    fixed_batch = None

    def __init__(self, module, threads: int) -> None:
        self.module, self.threads = module, threads

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        from ..runtime import run_torch, torch_threads

        with torch_threads(self.threads):
            return run_torch(self.module, inputs)


def prepare(handle, *, batch: int, threads: int, data=None) -> Runner:
    if handle.module is None or handle.onnx_model is not None:
        why = handle.conversion_error or "it exists only as an ONNX graph"
        raise RuntimeUnsupportedError(f"no torch module: {why}")
    return Runner(handle.module, threads)
