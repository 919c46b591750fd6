"""torch, imported the first time it is used (issue 17.7).

``import torch`` takes 1.5 s on a quiet machine and 4 s or more on a busy one. An ONNX-only recipe
(load an ``.onnx`` file, quantize it with ONNX Runtime, measure it in ONNX Runtime) never needs it, so
engine modules write ``from ..lazy import torch`` (and ``nn``, ``F``, ``fx``): the name stands for the
module and imports it when an attribute is first read (``torch.from_numpy``, ``torch.nn.Module``, ...).
Annotations are strings (``from __future__ import annotations``) and cost nothing; a class deriving
from ``nn.Module`` at module level imports torch with its module, so such modules are imported by
the functions that need them. :func:`torch_loaded` tells whether torch
has really been imported (generators are seeded only where it has, see ``runner.seed_everything``).
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any


class LazyModule:
    """Stands for the module ``name`` until one of its attributes is read."""

    __slots__ = ("_module", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        module = self._module
        if module is None:
            module = self._module = importlib.import_module(self._name)
        return getattr(module, attr)

    def __repr__(self) -> str:
        state = "imported" if self._name in sys.modules else "not imported yet"
        return f"<lazy module {self._name!r} ({state})>"


torch: Any = LazyModule("torch")
nn: Any = LazyModule("torch.nn")
F: Any = LazyModule("torch.nn.functional")
fx: Any = LazyModule("torch.fx")


def torch_loaded() -> bool:
    """Whether torch has been imported in this process (by Tugboat or anyone else)."""
    return "torch" in sys.modules


def ort_symbolic_shape_inference() -> type:
    """ONNX Runtime's ``SymbolicShapeInference``, without importing torch.

    ``onnxruntime/tools/__init__.py`` imports torch whenever it is installed (for a PyTorch export
    helper), so ``from onnxruntime.tools.symbolic_shape_infer import ...`` costs a torch import
    (1.5-4 s) to a static int8 quantization of an ONNX model. The module itself needs only onnx,
    numpy and sympy: it is loaded alone from its file (once), or the usual way if that fails."""
    name = "onnxruntime.tools.symbolic_shape_infer"
    if name in sys.modules:
        return sys.modules[name].SymbolicShapeInference
    alone = "tugboat._ort_symbolic_shape_infer"
    if alone not in sys.modules:
        try:
            import importlib.util
            from pathlib import Path

            import onnxruntime

            path = Path(onnxruntime.__file__).parent / "tools" / "symbolic_shape_infer.py"
            spec = importlib.util.spec_from_file_location(alone, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            sys.modules[alone] = module
        except Exception:  # another layout of the package: its own import, torch and all
            from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

            return SymbolicShapeInference
    return sys.modules[alone].SymbolicShapeInference
