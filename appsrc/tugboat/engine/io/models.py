"""The model handle: :class:`ModelHandle` (a loaded model and everything known about it) and
:class:`TensorSpec`, with the two conversions a handle makes of itself (its torch module to ONNX,
an ONNX graph to torch). The bottom of the loading and saving layer: it reads no file (that is
:mod:`.loading`, above the format readers) and imports nothing of the engine but errors, runtime
and the ONNX graph facts (:mod:`.onnx_graph`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import re
import sys
import types
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from ..errors import ModelLoadError, TugboatError
from ..lazy import nn, torch
from ..measuring.runtime import eval_mode
from .onnx_graph import node_subgraphs, onnx_param_count

ONNX_OPSET = 17



METADATA_NAME = "tugboat.json"  # spec stored inside TorchScript / .pt2 archives we write



@dataclass
class TensorSpec:
    """A model input or output: name, shape (``None`` or a string for symbolic dims), dtype.

    ``sample_shape`` is the concrete shape of one sample (without the batch dimension) seen in the
    data the model was checked against: it fills the dimensions the file leaves open (a sequence
    length, an image height and width), so a dynamic-shape model runs with the data's sizes."""

    name: str
    shape: tuple[int | str | None, ...]
    dtype: str = "float32"
    sample_shape: tuple[int, ...] | None = None
    # where the samples of a batch sit in the model's own layout: 0 for almost every input, 1 for a
    # recurrent state such as [layers, batch, hidden], None for an input without a batch (a scalar
    # sample rate). Data arrays are always stored sample-first; to_model() moves the axis.
    batch_axis: int | None = 0

    def concrete(self, batch: int) -> tuple[int, ...]:
        """The full shape the model takes for ``batch`` samples (in the model's own layout)."""
        rest = [i for i in range(len(self.shape)) if i != self.batch_axis]
        known = self.sample_shape if self.sample_shape is not None and \
            len(self.sample_shape) == len(rest) else None
        dims = []
        for i, d in enumerate(self.shape):
            if isinstance(d, int) and d > 0:
                dims.append(d)
            elif i == self.batch_axis:
                dims.append(batch)
            elif known is not None:
                dims.append(int(known[rest.index(i)]))
            else:
                raise ModelLoadError(
                    f"input '{self.name}' has an unknown size in dimension {i} ({self.shape}) and no data "
                    "tells it",
                    hint="give data (arrays of the real sizes) or the input shape, e.g. --input-shape 1,8,8",
                )
        return tuple(dims)

    def sample_dims(self) -> tuple[int | str | None, ...]:
        """The shape of one sample as data stores it (the model's shape without the batch axis)."""
        return tuple(d for i, d in enumerate(self.shape) if i != self.batch_axis)

    def data_shape(self, batch: int) -> tuple[int, ...]:
        """The shape of ``batch`` samples as data stores them: sample-first."""
        full = self.concrete(batch)
        return (batch, *(d for i, d in enumerate(full) if i != self.batch_axis))

    def to_model(self, arr):
        """Sample-first data (numpy or torch) in the model's layout."""
        if self.batch_axis == 0:
            return arr
        if self.batch_axis is None:  # the same value for every sample (e.g. a sample rate)
            return np.array(arr[0]) if isinstance(arr, np.ndarray) else arr[0]
        if isinstance(arr, np.ndarray):
            return np.ascontiguousarray(np.moveaxis(arr, 0, self.batch_axis))
        return arr.movedim(0, self.batch_axis).contiguous()

    @property
    def is_dynamic(self) -> bool:
        """True when a dimension other than the batch is not fixed by the file."""
        return any(not (isinstance(d, int) and d > 0) for d in self.sample_dims())

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(d["name"], tuple(d["shape"]), d.get("dtype", "float32"))



@dataclass
class ModelHandle:
    """A loaded model and everything known about it.

    ``module`` is the torch module (``None`` when the model exists only as an ONNX graph, e.g. an
    ONNX file onnx2torch could not convert, or an ONNX Runtime int8 variant). ``onnx_model`` is an
    ONNX graph that is *the* deployable artifact when set (loaded ONNX files, quantized variants);
    when ``None`` the artifact is exported from ``module`` on demand.
    """

    module: nn.Module | None
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    source: str
    format: str
    onnx_model: onnx.ModelProto | None = None
    task: str = "classification"  # see tasks.TASKS: classification | embedding | dense | sequence | regression
    # where ``task`` came from: "default", "inferred" (from the outputs), "file" (recorded in it),
    # "user" (a recipe's ``task`` or ``--task``); only a default or inferred task is ever re-guessed
    task_source: str = "default"
    arch: str | None = None
    conversion_error: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # steps applied, in order
    info: dict[str, Any] = field(default_factory=dict)  # technique notes (kept layers, ...)
    warnings: list[str] = field(default_factory=list)
    # the ONNX graph that stands for ``module`` when the module itself cannot be exported (e.g.
    # torch dynamic int8 Linear layers); unlike ``onnx_model`` the torch module stays measurable
    deploy_onnx: onnx.ModelProto | None = None
    # the float module an ONNX Runtime int8 variant was quantized from: ExecuTorch quantizes it again
    # with the XNNPACK quantizer (engine/measuring/runtimes/executorch_runtime.py); in memory only
    float_module: nn.Module | None = None
    # the loaded object (ScriptModule, ExportedProgram, a plain module) while its input shapes are
    # unknown; see engine.formats (None once the model is ready to run)
    pending: Any = None

    @property
    def has_torch(self) -> bool:
        return self.module is not None

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    def derive(self, module: nn.Module | None = None, onnx_model: onnx.ModelProto | None = None,
               step: dict[str, Any] | None = None) -> ModelHandle:
        """A new handle for a variant made from this one (the original stays untouched)."""
        new = copy.copy(self)
        new.module = module
        new.onnx_model = onnx_model
        new.deploy_onnx = None
        new.pending = None
        new.__dict__.pop("_exported", None)
        new.conversion_error = None if module is not None else self.conversion_error
        new.history = [*self.history, step] if step else list(self.history)
        new.info = dict(self.info)
        new.warnings = list(self.warnings)
        return new

    def example_inputs(self, batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
        """Random inputs for the model as torch tensors (the values of :meth:`example_arrays`)."""
        return [torch.from_numpy(a).to(getattr(torch, spec.dtype))
                for spec, a in zip(self.inputs, self._example_raw(batch, seed))]

    def example_arrays(self, batch: int = 2, seed: int = 0) -> list[np.ndarray]:
        """The same random inputs as numpy arrays, without importing torch (an ONNX-only run needs
        none); a dtype numpy lacks (bfloat16) stays float32."""
        out = []
        for spec, a in zip(self.inputs, self._example_raw(batch, seed)):
            try:
                out.append(a.astype(np.dtype(spec.dtype), copy=False))
            except TypeError:
                out.append(a)
        return out

    def _example_raw(self, batch: int, seed: int) -> list[np.ndarray]:
        # numpy's generator, not torch.Generator: torch.rand(generator=...) imports torch._dynamo
        # (and sympy, scikit-learn: about 1 s) the first time it runs
        gen = np.random.default_rng(seed)
        out = []
        for spec in self.inputs:
            try:
                shape = spec.data_shape(batch)
            except ModelLoadError as exc:
                raise ModelLoadError(exc.message, path=self.source, hint=exc.hint) from None
            if spec.dtype.startswith("int"):
                high = int(self.info.get("vocab_size", {}).get(spec.name, 2))
                out.append(gen.integers(0, high, shape))
            elif spec.dtype == "bool":
                out.append(np.ones(shape, dtype=bool))
            else:
                out.append(gen.random(shape, dtype=np.float32))
        return out

    def torch_module(self) -> nn.Module:
        if self.module is None:
            why = self.conversion_error or "this variant exists only as an ONNX graph"
            raise ModelLoadError(f"no trainable torch module: {why}", path=self.source)
        return self.module

    def param_count(self) -> tuple[int, int]:
        """(parameters, non-zero parameters) of the deployed artifact: the ONNX graph that is measured
        and exported (:func:`~.onnx_graph.onnx_param_count`), for torch models too (a BatchNorm folded
        into its convolution by the export is not counted twice; an int8 or fp16 variant counts what
        its float original counts). A torch model is exported once and the graph reused
        (:meth:`to_onnx`). A pending handle (input shapes unknown) has no graph yet: it refuses, as
        :meth:`to_onnx` does; ``formats.pending_info`` tells what its file holds."""
        return onnx_param_count(self.to_onnx())

    def to_onnx(self) -> onnx.ModelProto:
        """The deployable ONNX graph (exported from torch with a dynamic batch if needed).

        The export of a torch module is kept and reused while the module, its tensors and the input
        spec are unchanged (measuring, counting and writing one variant export it once); callers
        must not modify the graph they get (copy it first)."""
        if self.onnx_model is not None:
            return self.onnx_model
        if self.deploy_onnx is not None:
            return self.deploy_onnx
        require_shapes(self)
        try:
            key = self._export_key()
        except Exception:  # a module whose state cannot be read cheaply: export every time
            key = None
        cached = self.__dict__.get("_exported")
        if key is not None and cached is not None and cached[0] is self.module and cached[1] == key:
            return cached[2]
        model = export_onnx_model(self)
        if key is not None:
            self.__dict__["_exported"] = (self.module, key, model)
        return model

    def _export_key(self) -> tuple:
        """What an export of the module depends on: each tensor's identity, shape and version
        counter (bumped by in-place updates such as optimizer steps), a checksum of float buffers
        (BatchNorm statistics change without bumping it) and the input/output spec."""
        module = self.torch_module()
        tensors = tuple((id(t), tuple(t.shape), t._version) for t in module.state_dict(keep_vars=True).values()
                        if isinstance(t, torch.Tensor))
        with torch.no_grad():
            buffers = tuple(float(b.double().sum()) for b in module.buffers() if b.is_floating_point())
        return tensors, buffers, json.dumps(self.spec_dict(), sort_keys=True, default=str)

    def spec_dict(self) -> dict[str, Any]:
        return {"inputs": [s.to_dict() for s in self.inputs],
                "outputs": [s.to_dict() for s in self.outputs],
                "task": self.task, "arch": self.arch}



def _import_onnx2torch():
    """Import onnx2torch, which imports torchvision only for its NMS / RoiAlign converters.

    PyPI's torchvision cannot load beside the CPU torch used here, so when it is missing a stub
    stands in during the import; graphs with those two ops then fail to convert with a clear
    message instead of breaking every conversion.
    """
    try:
        import onnx2torch

        return onnx2torch
    except ImportError as exc:
        if "torchvision" not in str(exc):
            raise
    stub = types.ModuleType("torchvision")
    stub.ops = types.ModuleType("torchvision.ops")  # type: ignore[attr-defined]

    def _missing(*_a, **_k):
        raise RuntimeError("this operator needs torchvision, which is not installed")

    for name in ("nms", "box_convert", "roi_align"):
        setattr(stub.ops, name, _missing)
    saved = {k: sys.modules.get(k) for k in ("torchvision", "torchvision.ops")}
    sys.modules["torchvision"], sys.modules["torchvision.ops"] = stub, stub.ops
    try:
        for key in [k for k in sys.modules if k.startswith("onnx2torch")]:
            del sys.modules[key]
        import onnx2torch

        return onnx2torch
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v



def onnx_to_torch(model: onnx.ModelProto) -> nn.Module:
    """Convert an ONNX graph to a trainable torch module; the error names the failing operator."""
    try:
        onnx2torch = _import_onnx2torch()
    except Exception as exc:  # pragma: no cover - environment problem
        raise ModelLoadError(f"onnx2torch is not available ({exc})") from None
    from .onnx_converters import register

    register()  # converters onnx2torch lacks (LSTM, GRU, comparisons of opset 16)
    from .converted_graphs import layer_constants_lifted

    work = layer_constants_lifted(_fold_initializer_identities(model))  # a Clip's bounds as Constant nodes
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset > 18:
        with contextlib.suppress(Exception):
            work = onnx.version_converter.convert_version(work, 18)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = onnx2torch.convert(work)
    except NotImplementedError as exc:
        op = _failing_op(str(exc))
        raise ModelLoadError(f"could not convert operator {op} to torch") from None
    except Exception as exc:
        raise ModelLoadError(f"could not convert the graph to torch ({_short(exc)})") from None
    return module.eval()



def _fold_initializer_identities(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy without ``Identity`` nodes that merely forward an initializer (the legacy exporter
    writes them for shared tensors such as BatchNorm statistics). onnx2torch only turns a
    BatchNormalization whose statistics are initializers into an ``nn.BatchNorm``; fed through
    Identity they become inputs of a functional batch norm that structured pruning cannot see
    ("running_mean should contain 16 elements not 32")."""
    inits = {i.name for i in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    in_subgraphs = any(True for n in model.graph.node for _ in node_subgraphs(n))
    forward = {n.output[0]: n.input[0] for n in model.graph.node
               if n.op_type == "Identity" and n.domain in ("", "ai.onnx") and len(n.input) == 1
               and n.input[0] in inits and n.output[0] not in outputs}
    if not forward or in_subgraphs:
        return model
    work = copy.deepcopy(model)
    keep = [n for n in work.graph.node if not (n.op_type == "Identity" and n.output and n.output[0] in forward)]
    for node in keep:
        for k, name in enumerate(node.input):
            if name in forward:
                node.input[k] = forward[name]
    del work.graph.node[:]
    work.graph.node.extend(keep)
    return work



def _failing_op(text: str) -> str:
    # onnx2torch: "Converter is not implemented (OperationDescription(domain='', operation_type='X', version=N))"
    m = re.search(r"operation_type='([^']+)'.*?version=(\d+)", text)
    if m:
        return f"'{m.group(1)}' (opset {m.group(2)})"
    return f"(a converter refused: {' '.join(text.split())[:120]})"



def _short(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def require_shapes(handle: ModelHandle) -> None:
    """Refuse to run a handle whose input shapes the file did not record (``handle.pending``)."""
    if handle.pending is not None:
        raise ModelLoadError(
            f"the input shape of {', '.join(handle.input_names)} is not recorded in this {handle.format} "
            "file, so it cannot be run", path=handle.source,
            hint="give data (a .npz with arrays for the inputs), or input_shape = [...] in the recipe "
                 "(--input-shape for tugboat info)")



def batch_axes(specs: list[TensorSpec]) -> dict[str, dict[int, str]]:
    """The ONNX export's ``dynamic_axes`` for the batch: each tensor's own batch axis (a recurrent
    state's is 1), none for a tensor without a batch (a scalar setting)."""
    return {s.name: {int(s.batch_axis): "batch"} for s in specs if s.batch_axis is not None}


def export_onnx_model(handle: ModelHandle) -> onnx.ModelProto:
    """Export the handle's torch module with a dynamic batch dimension, and the other sizes the
    original file left open (an ONNX file's sequence length) where the export computes at other
    sizes what the module does.

    The legacy TorchScript-based exporter is used on purpose: 0.05 s instead of 1-2.5 s for the
    dynamo exporter, a single self-contained file, and graphs onnx2torch can read back.
    """
    module = handle.torch_module()
    args = tuple(handle.example_inputs(2))
    dynamic = batch_axes([*handle.inputs, *handle.outputs])
    for name, dims in (handle.info.get("dynamic_dims") or {}).items():  # e.g. a text model's sequence
        if name in handle.input_names or name in handle.output_names:
            dynamic.setdefault(name, {}).update({int(axis): label for axis, label in dims.items()})
    opened = _open_sizes(handle)
    model = _traced_onnx(handle, module, args, {n: {**d, **opened.get(n, {})} for n, d in dynamic.items()})
    if opened and not _same_at_other_sizes(handle, module, model, opened):
        model = _traced_onnx(handle, module, args, dynamic)  # a size the trace wrote into the graph
    meta = model.metadata_props.add()
    meta.key, meta.value = "tugboat", json.dumps(handle.spec_dict())
    return model


def _traced_onnx(handle: ModelHandle, module: nn.Module, args, dynamic: dict) -> onnx.ModelProto:
    buf = io.BytesIO()
    was_training = module.training
    eval_mode(module)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, args, buf, dynamo=False, opset_version=ONNX_OPSET,
                input_names=handle.input_names, output_names=handle.output_names,
                dynamic_axes=dynamic, do_constant_folding=True,
            )
    except Exception as exc:
        raise TugboatError(f"ONNX export failed: {' '.join(str(exc).split())[:300]}",
                           path=handle.source) from None
    finally:
        eval_mode(module, was_training)
    return onnx.load_from_string(buf.getvalue())


def _open_sizes(handle: ModelHandle) -> dict[str, dict[int, str]]:
    """Input dimensions besides the batch that the original file names instead of fixing them."""
    out = {}
    for spec in handle.inputs:
        dims = {i: d for i, d in enumerate(spec.shape) if i not in (0, spec.batch_axis)
                and isinstance(d, str) and d not in ("", "?")}
        if dims and spec.sample_shape is not None:
            out[spec.name] = dims
    return out


def _same_at_other_sizes(handle: ModelHandle, module: nn.Module, model: onnx.ModelProto,
                         opened: dict[str, dict[int, str]]) -> bool:
    """Whether ``model`` runs and agrees with ``module`` with every opened size one larger than the
    example's (a trace can write a size into a computed shape; then the size stays fixed)."""
    from dataclasses import replace

    from ..measuring.runtime import run_onnx

    probe = copy.copy(handle)
    probe.inputs = []
    for spec in handle.inputs:
        rest = [i for i in range(len(spec.shape)) if i != spec.batch_axis]
        grown = spec.sample_shape if spec.name not in opened else tuple(
            d + 1 if rest[k] in opened[spec.name] else d for k, d in enumerate(spec.sample_shape))
        probe.inputs.append(replace(spec, sample_shape=grown))
    was_training = module.training
    eval_mode(module)  # as exported: no BatchNorm statistics updated, no dropout
    try:
        xs = probe.example_inputs(3, seed=5)
        with torch.no_grad():
            want = module(*xs)
        want = [o.numpy() for o in (want if isinstance(want, (tuple, list)) else [want])]
        got = run_onnx(model, [x.numpy() for x in xs])
    except Exception:
        return False
    finally:
        eval_mode(module, was_training)
    return len(got) == len(want) and all(
        a.shape == b.shape and np.allclose(a, b, rtol=1e-3, atol=1e-4 * max(1.0, float(np.abs(b).max(initial=0))))
        for a, b in zip(got, want))
