"""Loading and saving models: one :class:`ModelHandle` for every format.

Formats: ONNX (kept as the original graph for ONNX Runtime and converted with onnx2torch for
techniques that need torch), TorchScript, ``torch.export`` programs (``.pt2``), a ``state_dict``
for a named built-in architecture, a whole pickled ``nn.Module`` (only when the caller passes
``trust=True``), and the demo zoo (``demo:NAME``).

Nothing is unpickled unless trusted: plain ``torch.load`` always runs with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import sys
import types
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from . import zoo
from .errors import ModelLoadError, UntrustedFileError
from .runtime import eval_mode  # noqa: F401  (its old home: code on other branches imports it from here)
from .tasks import TASKS

ONNX_OPSET = 17
METADATA_NAME = "tugboat.json"  # spec stored inside TorchScript / .pt2 archives we write

_NP_DTYPES = {
    onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.BOOL: "bool",
}


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
    # with the XNNPACK quantizer (engine/runtimes/executorch_runtime.py); in memory only
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
                out.append(torch.from_numpy(gen.integers(0, high, shape)).to(getattr(torch, spec.dtype)))
            elif spec.dtype == "bool":
                out.append(torch.ones(shape, dtype=torch.bool))
            else:
                out.append(torch.from_numpy(gen.random(shape, dtype=np.float32)).to(getattr(torch, spec.dtype)))
        return out

    def torch_module(self) -> nn.Module:
        if self.module is None:
            why = self.conversion_error or "this variant exists only as an ONNX graph"
            raise ModelLoadError(f"no trainable torch module: {why}", path=self.source)
        return self.module

    def param_count(self) -> tuple[int, int]:
        """(parameters, non-zero parameters) of the deployed artifact: the ONNX graph that is measured
        and exported (:func:`onnx_param_count`), for torch models too (a BatchNorm folded into its
        convolution by the export is not counted twice; an int8 or fp16 variant counts what its float
        original counts). A torch model is exported once and the graph reused (:meth:`to_onnx`)."""
        if self.pending is not None:
            from .formats import pending_info

            info = pending_info(self)
            return info["params"], info["nonzero_params"]
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
        if self.pending is not None:
            from .formats import require_shapes

            require_shapes(self)
        from .export import export_onnx_model

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




# inputs of quantization operators that are scales or zero points (not parameters), by position
_QUANT_AUX_INPUTS = {
    "QuantizeLinear": (1, 2), "DequantizeLinear": (1, 2), "DynamicQuantizeLinear": (),
    "QLinearConv": (1, 2, 4, 5, 6, 7), "QLinearMatMul": (1, 2, 4, 5, 6, 7),
    "ConvInteger": (2, 3), "MatMulInteger": (2, 3), "MatMulIntegerToFloat": (2, 3, 4, 5),
    "DynamicQuantizeMatMul": (2, 3), "MatMulNBits": (2, 3), "GatherBlockQuantized": (2, 3),
    "QLinearAdd": (1, 2, 4, 5, 6, 7), "QLinearMul": (1, 2, 4, 5, 6, 7),
}


def quantization_aux_names(model: onnx.ModelProto) -> set[str]:
    """Initializers a quantized graph uses only as scales or zero points: not parameters (an int8
    model has the float model's parameter count, not that plus one scale per channel).

    Besides the scale and zero-point inputs of quantization operators, a dynamic-int8 graph
    multiplies each weight's scale with the activation's run-time scale (``Mul(x_scale, w_scale)``
    after ``DynamicQuantizeLinear``): a constant multiplied only with quantization scales is one
    too. Anything also used elsewhere (as a weight, a bias) stays a parameter."""
    nodes = list(_graph_nodes(model.graph))
    constants = {i.name for g in _graphs(model.graph) for i in g.initializer}
    constants |= {o for n in nodes if n.op_type == "Constant" for o in n.output}
    scales: set[str] = set()  # run-time values that are quantization scales
    for node in nodes:
        if node.op_type == "DynamicQuantizeLinear" and len(node.output) > 1:
            scales.add(node.output[1])
    aux: set[str] = set()
    other: set[str] = set()
    changed = True
    while changed:  # scale products can chain (Mul(Mul(x_scale, a), b)); graphs are small to walk
        changed = False
        for node in nodes:
            if (node.op_type == "Mul" and any(i in scales for i in node.input)
                    and all(i in scales or i in constants for i in node.input)
                    and not set(node.output) <= scales):
                scales.update(node.output)
                changed = True
    for node in nodes:
        positions = _QUANT_AUX_INPUTS.get(node.op_type)
        if node.op_type == "Mul" and set(node.output) <= scales:
            positions = range(len(node.input))
        for i, name in enumerate(node.input):
            if positions is not None and i in positions:
                aux.add(name)
            else:
                other.add(name)
    return aux - other


def _graphs(graph: onnx.GraphProto):
    """``graph`` and every subgraph in it (If branches, Loop and Scan bodies)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graphs(g)


def _graph_nodes(graph: onnx.GraphProto):
    for g in _graphs(graph):
        yield from g.node


def onnx_weight_tensors(model: onnx.ModelProto):
    """Every weight tensor of an ONNX graph, each once: initializers and ``Constant`` node values, in
    the main graph and in every subgraph (If branches, Loop and Scan bodies).

    A weight is a tensor of more than one element that is not ``int64`` or ``bool``: that excludes
    scalars (quantization scales and zero points, constants such as 1.0) and the shape, axes and index
    constants graphs carry as int64 vectors, and keeps float weights and int8/uint8/int32 quantized ones.
    Tensors are keyed by name (an initializer overriding a graph input is counted once)."""
    seen: set[str] = set()

    def weight(t: onnx.TensorProto) -> bool:
        n = int(np.prod(t.dims)) if t.dims else 1
        return n > 1 and t.data_type not in (onnx.TensorProto.INT64, onnx.TensorProto.BOOL,
                                              onnx.TensorProto.STRING)

    def walk(graph: onnx.GraphProto):
        for init in graph.initializer:
            if init.name not in seen and weight(init):
                seen.add(init.name)
                yield init.name, init
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for attr in node.attribute:
                    if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                        key = node.output[0] if node.output else id(node)
                        if key not in seen and weight(attr.t):
                            seen.add(key)
                            yield key, attr.t
                    elif attr.name == "value_floats" and len(attr.floats) > 1:
                        key = node.output[0] if node.output else id(node)
                        if key not in seen:
                            seen.add(key)
                            yield key, onnx.helper.make_tensor(key, onnx.TensorProto.FLOAT,
                                                               [len(attr.floats)], list(attr.floats))
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        yield from walk(g)

    yield from walk(model.graph)


def onnx_param_tensors(model: onnx.ModelProto) -> list[tuple[str, int, int]]:
    """``(tensor name, parameters, non-zero parameters)`` for every weight tensor of the graph that
    counts as parameters (:func:`onnx_param_count` sums them; the Layers view attributes each to its
    layer, so the per-layer figures add up to the total)."""
    from onnx import numpy_helper

    aux = quantization_aux_names(model)
    packed: dict[str, int] = {}  # 4-bit weights packed two per byte: count the weights, K x N
    for node in _graph_nodes(model.graph):
        if node.op_type == "MatMulNBits" and len(node.input) > 1:
            attrs = {a.name: a.i for a in node.attribute}
            if attrs.get("K") and attrs.get("N"):
                packed[node.input[1]] = int(attrs["K"]) * int(attrs["N"])
    out: list[tuple[str, int, int]] = []
    for name, tensor in onnx_weight_tensors(model):
        if name in aux:
            continue
        values = numpy_helper.to_array(tensor)
        if name in packed:
            # a packed byte is zero only when both of its weights are (at their zero point 0)
            out.append((name, packed[name], min(packed[name], 2 * int(np.count_nonzero(values)))))
        else:
            out.append((name, int(np.prod(tensor.dims)), int(np.count_nonzero(values))))
    return out


def onnx_param_count(model: onnx.ModelProto) -> tuple[int, int]:
    """(parameters, non-zero parameters) over :func:`onnx_weight_tensors` (initializers and Constant
    nodes, subgraphs included), quantization scales and zero points excluded (the one definition of
    "parameters" for every model and report: ``ModelHandle.param_count`` applies it to the deployed
    artifact); 4-bit packed weights count as K x N."""
    rows = onnx_param_tensors(model)
    return sum(r[1] for r in rows), sum(r[2] for r in rows)


# --- loading ---------------------------------------------------------------------------------

def load_model(ref: str | os.PathLike, *, trust: bool = False, arch: str | None = None,
               input_shape: tuple[int, ...] | None = None,
               arch_kwargs: dict[str, Any] | None = None,
               constants: dict[str, Any] | None = None, torch_module: bool = True) -> ModelHandle:
    """Load a model reference: ``demo:NAME``, a file path, or a Hugging Face model folder.

    ``torch_module=False``: an ONNX file is not converted to torch (onnx2torch takes seconds on a
    large model) when nothing will need the module (:func:`capabilities.needs_torch_module`).

    ``trust`` allows unpickling a whole ``nn.Module`` and running the user's architecture code
    (arbitrary code can run: only for files the user vouches for). ``arch`` names the architecture
    for a bare ``state_dict`` / ``.safetensors``: a built-in name, ``"path/to/models.py:Class"`` or
    ``"package.module:factory"`` (called with ``arch_kwargs``). ``input_shape`` (without batch)
    fills in the input spec when the file does not record it. ``constants`` gives values to a scripted
    ``forward``'s non-tensor arguments (``{"sr": 16000}``; see engine/scripted.py).
    """
    ref = str(ref)
    if ref.startswith("demo:"):
        return load_demo(ref[5:])
    path = Path(ref)
    if not path.exists():
        raise ModelLoadError("file not found", path=ref)
    if path.is_dir():
        if (path / "config.json").is_file():
            from .hf import load_hf_folder

            return _with_shape(load_hf_folder(path, trust=trust), input_shape, path, constants)
        raise ModelLoadError("is a folder, not a model file (a Hugging Face model folder has a config.json)",
                             path=ref)
    from .data import check_regular_file, refuse_if_too_big

    check_regular_file(path, ModelLoadError)  # a FIFO or /dev/zero would block or never end
    refuse_if_too_big(path.stat().st_size, "the model file", path)  # read whole (a sparse file can claim TBs)
    if path.stat().st_size == 0:
        raise ModelLoadError("the file is empty", path=ref)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return _with_shape(load_onnx(path, convert=torch_module), input_shape, path, constants)
    if suffix == ".safetensors":
        from .formats import load_safetensors

        state = load_safetensors(path)
        return _with_shape(_from_state_dict(path, state, arch, {}, trust=trust, arch_kwargs=arch_kwargs),
                           input_shape, path, constants)
    if suffix in (".pt2", ".pt", ".pth", ".bin", ".ckpt", ".torchscript", ".jit", ".ts"):
        names = _zip_names(path)
        if suffix == ".pt2" and not _is_torchscript(names):  # export's TorchScript fallback: by content
            return _with_shape(_load_exported(path), input_shape, path, constants)
        if _is_exported_program(names):
            return _with_shape(_load_exported(path), input_shape, path, constants)
        return _with_shape(_load_torch_file(path, trust=trust, arch=arch, arch_kwargs=arch_kwargs),
                           input_shape, path, constants)
    raise ModelLoadError(
        f"unknown model format '{suffix or '(no extension)'}'",
        path=ref, hint="supported: .onnx, .pt/.pth (TorchScript, state_dict or trusted pickle), .pt2, "
        ".safetensors (with --arch), a Hugging Face model folder",
    )


def _is_torchscript(names: list[str] | None) -> bool:
    return names is not None and any(n.split("/", 1)[-1].startswith("code/") for n in names)


def _is_exported_program(names: list[str] | None) -> bool:
    return names is not None and any(n.split("/", 1)[-1] == "models/model.json" for n in names)


def load_demo(name: str, progress=None) -> ModelHandle:
    if name not in zoo.ARCHITECTURES:
        raise ModelLoadError(
            f"unknown demo model '{name}'; available: {', '.join('demo:' + a for a in zoo.ARCHITECTURES)}",
            path=f"demo:{name}",
        )
    module = zoo.pretrained(name, progress)
    return ModelHandle(module, [TensorSpec("input", ("batch", *zoo.IMAGE_SHAPE))],
                       [TensorSpec("logits", ("batch", zoo.NUM_CLASSES))],
                       source=f"demo:{name}", format="demo", arch=name)


def _with_shape(handle: ModelHandle, input_shape, path, constants=None) -> ModelHandle:
    if constants:
        handle.info["constants"] = dict(constants)
    try:
        return _with_shape_inner(handle, input_shape, path)
    finally:
        if handle.task_source == "default":
            from .tasks import infer_task

            handle.task = infer_task(handle.outputs)
            handle.task_source = "inferred"


def _with_shape_inner(handle: ModelHandle, input_shape, path) -> ModelHandle:
    if handle.pending is not None:
        if input_shape is not None:
            # several inputs of one shape (token ids and their attention mask) all take it
            if len({(s.shape, s.dtype) for s in handle.inputs}) > 1:
                raise ModelLoadError("--input-shape only works for single-input models", path=path)
            handle.inputs = [TensorSpec(s.name, ("batch", *input_shape), s.dtype) for s in handle.inputs]
        from .formats import make_editable, shapes_known

        return make_editable(handle) if shapes_known(handle) else handle
    if input_shape is not None:
        if len(handle.inputs) > 1:
            raise ModelLoadError("--input-shape only works for single-input models", path=path)
        name = handle.inputs[0].name if handle.inputs else "input"
        dtype = handle.inputs[0].dtype if handle.inputs else "float32"
        handle.inputs = [TensorSpec(name, ("batch", *input_shape), dtype)]
    if not handle.outputs and handle.inputs and all(
        isinstance(d, int) for d in handle.inputs[0].shape[1:]
    ):
        handle.outputs = _infer_outputs(handle)
    return handle


def _infer_outputs(handle: ModelHandle) -> list[TensorSpec]:
    try:
        with torch.inference_mode():
            out = handle.torch_module()(*handle.example_inputs(2))
    except Exception as exc:
        raise ModelLoadError(f"the model fails on inputs of shape {handle.inputs[0].shape}: {exc}",
                             path=handle.source) from exc
    outs = out if isinstance(out, (tuple, list)) else [out]
    names = ["output"] if len(outs) == 1 else [f"output_{i}" for i in range(len(outs))]
    return [TensorSpec(n, ("batch", *o.shape[1:]), str(o.dtype).replace("torch.", ""))
            for n, o in zip(names, outs)]


def _read_meta(extra: dict[str, Any], path: Path | str | None = None,
               where: str = METADATA_NAME) -> dict[str, Any]:
    """The ``tugboat.json`` text of an archive (or an ONNX ``metadata_props`` value, ``where``
    names it), parsed and checked with :func:`validate_meta`; absent or empty means none."""
    raw = extra.get(METADATA_NAME)
    if not raw:
        return {}
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ModelLoadError(f"its Tugboat metadata ({where}) is not UTF-8 text", path=path) from None
    try:
        meta = json.loads(raw)
    except (ValueError, TypeError, RecursionError) as exc:
        raise ModelLoadError(f"its Tugboat metadata ({where}) is not valid JSON ({_short(exc, 80)})",
                             path=path) from None
    return validate_meta(meta, path)


# --- Tugboat's model metadata: one schema for every reader --------------------------------------

_META_KEYS = ("inputs", "outputs", "task", "arch", "arch_kwargs")
MAX_META_TENSORS = 256  # inputs or outputs a model may declare
MAX_META_RANK = 16
MAX_META_DIM = 2**31 - 1
MAX_META_SAMPLE = 2**27  # values in one sample of an input or output (512 MB as float32)


def _meta_dtype(value: Any) -> bool:
    return isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype)


def _validate_spec(raw: Any, field_name: str, path) -> dict[str, Any]:
    def bad(problem: str) -> ModelLoadError:
        return ModelLoadError(f"its Tugboat metadata field '{field_name}' {problem}", path=path)

    if not isinstance(raw, dict):
        raise bad(f"must be an object with name, shape and dtype, got {_json_kind(raw)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise bad("has no name (a non-empty string is needed)")
    shape = raw.get("shape")
    if not isinstance(shape, list) or len(shape) > MAX_META_RANK:
        raise bad(f"needs a shape: a list of at most {MAX_META_RANK} dimensions, got {_json_kind(shape)}")
    for d in shape:
        ok = (d is None or (isinstance(d, str) and 0 < len(d) <= 64)
              or (isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_META_DIM))
        if not ok:
            raise bad(f"has a shape dimension {_json_short(d)}; each must be a whole number, "
                      "a symbolic name or null")
    per_sample = 1
    for d in shape[1:]:
        per_sample *= d if isinstance(d, int) else 1
    if per_sample > MAX_META_SAMPLE:
        raise bad(f"declares {per_sample} values per sample (more than {MAX_META_SAMPLE}); refused before "
                  "anything that size is allocated")
    dtype = raw.get("dtype", "float32")
    if not _meta_dtype(dtype):
        raise bad(f"has dtype {_json_short(dtype)}, which is not a tensor type (e.g. 'float32', 'int64')")
    return {"name": name, "shape": shape, "dtype": dtype}


def validate_meta(meta: Any, path: Path | str | None = None) -> dict[str, Any]:
    """Check Tugboat's model metadata read from a file (ONNX ``metadata_props["tugboat"]``, the
    ``tugboat.json`` of a TorchScript / ``.pt2`` archive, the ``"tugboat"`` entry of a saved
    state_dict or pickle): every field read from disk is untrusted. Returns a clean copy with only
    known fields; a malformed field raises ModelLoadError naming the file and the field (a
    model described wrongly would be measured or rebuilt wrongly, so it is never guessed around).
    """
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise ModelLoadError(f"its Tugboat metadata must be a JSON object, got {_json_kind(meta)}", path=path)
    clean: dict[str, Any] = {}
    for key in ("inputs", "outputs"):
        value = meta.get(key)
        if value is None:
            continue
        if not isinstance(value, list) or len(value) > MAX_META_TENSORS:
            raise ModelLoadError(f"its Tugboat metadata field '{key}' must be a list of at most "
                                 f"{MAX_META_TENSORS} tensors, got {_json_kind(value)}", path=path)
        specs = [_validate_spec(d, f"{key}[{i}]", path) for i, d in enumerate(value)]
        names = [s["name"] for s in specs]
        if len(set(names)) != len(names):
            raise ModelLoadError(f"its Tugboat metadata field '{key}' names a tensor twice", path=path)
        clean[key] = specs
    task = meta.get("task")
    if task is not None:
        if task not in TASKS:
            raise ModelLoadError(f"its Tugboat metadata field 'task' is {_json_short(task)}; "
                                 f"one of {', '.join(TASKS)} is needed", path=path)
        clean["task"] = task
    arch = meta.get("arch")
    if arch is not None:
        if not isinstance(arch, str) or not arch or len(arch) > 200:
            raise ModelLoadError(f"its Tugboat metadata field 'arch' must be a name, got {_json_short(arch)}",
                                 path=path)
        clean["arch"] = arch
    kwargs = meta.get("arch_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict) or not all(
                isinstance(k, str) and k.isidentifier() and not k.startswith("_")
                and isinstance(v, (int, float, bool))
                for k, v in kwargs.items()):
            raise ModelLoadError("its Tugboat metadata field 'arch_kwargs' must map parameter names to "
                                 f"numbers, got {_json_short(kwargs)}", path=path)
        clean["arch_kwargs"] = dict(kwargs)
    return clean


def _json_kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "true/false", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _json_short(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= 60 else text[:59] + "…"


def _apply_meta(handle: ModelHandle, meta: dict[str, Any]) -> ModelHandle:
    """Apply metadata already checked by :func:`validate_meta`."""
    if meta.get("inputs"):
        handle.inputs = [TensorSpec.from_dict(d) for d in meta["inputs"]]
    if meta.get("outputs"):
        handle.outputs = [TensorSpec.from_dict(d) for d in meta["outputs"]]
    if meta.get("task"):
        handle.task, handle.task_source = meta["task"], "file"
    handle.arch = meta.get("arch", handle.arch)
    return handle


def _zip_names(path: Path) -> list[str] | None:
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return None


def _looks_pickled(path: Path, names: list[str] | None) -> bool:
    """A torch.save archive (zip with a data.pkl) or a legacy pickle (protocol 2+ header byte);
    anything else (text, random bytes) is just not a PyTorch file, not an untrusted pickle."""
    if names is not None:
        return any(n.endswith("data.pkl") for n in names)
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def _load_torch_file(path: Path, *, trust: bool, arch: str | None,
                     arch_kwargs: dict[str, Any] | None = None) -> ModelHandle:
    names = _zip_names(path)
    if _is_torchscript(names):
        return _load_torchscript(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        if _looks_pickled(path, names) and (
                "Unsupported global" in text or "Unsupported operand" in text or "weights_only" in text):
            if not trust:
                raise UntrustedFileError(
                    "holds pickled Python objects, which can run arbitrary code when loaded; "
                    "it was not loaded",
                    path=path,
                    hint="if you trust where this file came from, load it with --trust "
                    "(or confirm in the app)",
                ) from None
            return _load_pickled_module(path)
        # torch's weights_only message suggests weights_only=False: wrong for a file that is no pickle
        if names is not None and not any(n.endswith("data.pkl") for n in names):
            detail = "a zip archive, but not one torch.save wrote: it has no data.pkl"
        elif names is None and not _looks_pickled(path, names):
            with open(path, "rb") as f:
                damaged_zip = f.read(4) == b"PK\x03\x04"
            detail = ("a damaged zip archive: cut short or corrupted" if damaged_zip
                      else "neither a zip archive nor a pickle")
        else:
            detail = _short(exc)
        raise ModelLoadError(f"not a readable PyTorch file ({detail})" + _text_note(path), path=path) from None
    if isinstance(obj, dict):
        state = obj.get("state_dict", obj) if isinstance(obj.get("state_dict"), dict) else obj
        meta = validate_meta(obj.get("tugboat"), path)
        return _from_state_dict(path, state, arch or meta.get("arch"), meta, trust=trust,
                                arch_kwargs=arch_kwargs)
    raise ModelLoadError(f"holds a {type(obj).__name__}, not a model or a state_dict", path=path)


def _load_torchscript(path: Path) -> ModelHandle:
    extra = {METADATA_NAME: ""}
    try:
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as exc:
        raise ModelLoadError(f"not a valid TorchScript archive ({_short(exc)})", path=path) from None
    from .formats import script_input_specs

    handle = ModelHandle(None, script_input_specs(module, path), [], source=str(path), format="torchscript",
                         pending=module.eval())
    handle.conversion_error = "the input shape is not known yet"
    meta = _read_meta(extra, path)
    if not meta.get("inputs"):
        handle.info["input_dtypes_guessed"] = True  # float32 until data or a failed probe says otherwise
    return _apply_meta(handle, meta)


def _load_exported(path: Path) -> ModelHandle:
    extra = {METADATA_NAME: ""}
    # torch.export logs a full traceback at WARNING before re-raising; the error below says it all
    export_log = logging.getLogger("torch.export")
    level = export_log.level
    export_log.setLevel(logging.ERROR)
    try:
        program = torch.export.load(str(path), extra_files=extra)
    except Exception as exc:
        raise ModelLoadError(f"not a valid torch.export program ({_short(exc)})" + _text_note(path),
                             path=path) from None
    finally:
        export_log.setLevel(level)
    handle = ModelHandle(None, [], [], source=str(path), format="pt2", pending=program)
    handle.conversion_error = "the input shape is not known yet"
    meta = _read_meta(extra, path)
    if not meta.get("inputs"):
        # placeholders of user inputs carry fake tensors with the example shapes
        specs = []
        user_inputs = program.graph_signature.user_inputs
        for node in program.graph.nodes:
            if node.op == "placeholder" and node.name in user_inputs:
                val = node.meta.get("val")
                if val is not None and hasattr(val, "shape"):
                    # a symbolic dimension (dynamic sequence, height) takes its size from the data
                    shape = tuple(d if isinstance(d, int) else "?" for d in val.shape)
                    specs.append(TensorSpec(node.name, ("batch", *shape[1:]),
                                            str(val.dtype).replace("torch.", "")))
        handle.inputs = specs
    return _apply_meta(handle, meta)


def _from_state_dict(path: Path, state: dict[str, Any], arch: str | None, meta: dict, *,
                     trust: bool = False, arch_kwargs: dict[str, Any] | None = None) -> ModelHandle:
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError("holds a dictionary that is not a state_dict of tensors", path=path)
    if arch is None:
        raise ModelLoadError(
            "is a state_dict (weights only); name its architecture",
            path=path, hint=f"--arch one of: {', '.join(zoo.ARCHITECTURES)}, or your own code as "
            "--arch path/to/models.py:ClassName (with --trust)",
        )
    if ":" in arch and arch not in zoo.ARCHITECTURES:
        return _from_user_arch(path, state, arch, arch_kwargs, trust=trust)
    if arch not in zoo.ARCHITECTURES:
        raise ModelLoadError(f"unknown architecture '{arch}'; built-in: {', '.join(zoo.ARCHITECTURES)}",
                             path=path)
    kwargs = meta.get("arch_kwargs", {})
    # built on the meta device first: bogus arch_kwargs (a width of 10^9) allocate nothing, and
    # the weights are checked against the shapes before any real memory is spent
    try:
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in zoo.build(arch, **kwargs).state_dict().items()}
    except Exception as exc:
        raise ModelLoadError(f"its Tugboat metadata field 'arch_kwargs' does not build '{arch}' "
                             f"({_short(exc, 120)})", path=path) from None
    got = {k: tuple(v.shape) for k, v in state.items()}
    if shapes != got:
        missing, unexpected = sorted(set(shapes) - set(got)), sorted(set(got) - set(shapes))
        if missing or unexpected:
            detail = (f"missing {', '.join(map(repr, missing[:3]))}" if missing
                      else f"unexpected {', '.join(map(repr, unexpected[:3]))}")
        else:
            key = next(k for k in shapes if shapes[k] != got[k])
            detail = f"'{key}' has shape {list(got[key])} in the file, {list(shapes[key])} in the architecture"
        raise ModelLoadError(f"weights do not fit architecture '{arch}': {_short(Exception(detail), 300)}",
                             path=path)
    try:
        module = zoo.build(arch, **kwargs)
        module.load_state_dict(state)
    except Exception as exc:
        raise ModelLoadError(f"weights do not fit architecture '{arch}': {_short(exc, 300)}",
                             path=path) from None
    handle = load_demo_spec(module, arch, str(path), "state_dict")
    return _apply_meta(handle, meta)


def _from_user_arch(path: Path, state: dict[str, Any], arch: str, arch_kwargs: dict[str, Any] | None, *,
                    trust: bool) -> ModelHandle:
    from .formats import build_user_arch, load_weights_into, module_input_specs

    if not trust:
        raise UntrustedFileError(
            f"the architecture {arch} is Python code that runs when the model is built; it was not run",
            path=path, hint="if you trust that code, load with --trust (or confirm in the app)")
    module = build_user_arch(arch, arch_kwargs, path)
    load_weights_into(module, state, arch, path)
    handle = ModelHandle(None, module_input_specs(module, path), [], source=str(path), format="state_dict",
                         arch=arch, pending=module.eval())
    handle.info["input_dtypes_guessed"] = True
    handle.conversion_error = "the input shape is not known yet"
    return handle


def load_demo_spec(module: nn.Module, arch: str, source: str, fmt: str) -> ModelHandle:
    return ModelHandle(module.eval(), [TensorSpec("input", ("batch", *zoo.IMAGE_SHAPE))],
                       [TensorSpec("logits", ("batch", zoo.NUM_CLASSES))],
                       source=source, format=fmt, arch=arch)


def _load_pickled_module(path: Path) -> ModelHandle:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ModelLoadError(f"could not unpickle the trusted file ({_short(exc)})", path=path) from None
    meta: dict[str, Any] = {}
    if isinstance(obj, dict) and isinstance(obj.get("model"), nn.Module):
        meta = obj.get("tugboat") or {}
        obj = obj["model"]
    if not isinstance(obj, nn.Module):
        raise ModelLoadError(f"holds a {type(obj).__name__}, not an nn.Module", path=path)
    handle = ModelHandle(obj.eval(), [], [], source=str(path), format="pickle")
    meta = meta or getattr(obj, "_tugboat_meta", None) or {}
    handle = _apply_meta(handle, validate_meta(meta, path))
    if not handle.inputs:  # shapes come from the data or --input-shape, as for TorchScript
        from .formats import module_input_specs

        handle.inputs = module_input_specs(obj, path)
        handle.module, handle.pending = None, obj.eval()
        handle.info["input_dtypes_guessed"] = True
        handle.conversion_error = "the input shape is not known yet"
    return handle


# --- ONNX --------------------------------------------------------------------------------------

def check_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Refuse external-data locations that point outside the model's folder."""
    base = path.resolve().parent
    for tensor in _all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (base / location).resolve()
        if os.path.isabs(location) or base not in target.parents:
            raise ModelLoadError(
                f"tensor '{tensor.name}' points to external data outside the model's folder "
                f"({location!r}); refused", path=path)


ORT_MIN_OPSET = 7  # the oldest default-domain opset ONNX Runtime runs
KNOWN_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft"}  # what ONNX Runtime implements


def check_opsets(model: onnx.ModelProto, path: Path) -> None:
    """Refuse graphs no runtime here can run: an opset outside the supported range, or operators
    from custom domains (those need a runtime extension Tugboat does not load)."""
    newest = onnx.defs.onnx_opset_version()
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and opset > newest:
        raise ModelLoadError(f"uses ONNX opset {opset}, newer than this version supports (up to {newest})",
                             path=path, hint=f"re-export it with opset {ONNX_OPSET}")
    if opset is not None and opset < ORT_MIN_OPSET:
        raise ModelLoadError(f"uses ONNX opset {opset}, older than ONNX Runtime supports "
                             f"({ORT_MIN_OPSET} or newer)",
                             path=path, hint=f"convert it with onnx.version_converter to opset {ONNX_OPSET}")
    check_domains(model, path)


def _subgraphs(node: onnx.NodeProto):
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def check_domains(model: onnx.ModelProto, path: Path) -> None:
    """Every node, in the main graph, in If/Loop/Scan bodies and in the local functions it calls,
    must be an operator ONNX Runtime implements or a call of a model-local function whose own body
    passes the same check. A local function merely *defined* in a domain proves nothing about other
    operators of that domain (a node ``evil.ops::Anything`` beside an unused ``evil.ops::f``)."""
    functions = {(f.domain, f.name, getattr(f, "overload", "")): f for f in model.functions}
    checked: set[tuple[str, str, str]] = set()
    # an explicit stack, not recursion: a hostile file can nest subgraphs thousands deep
    stack: list[tuple[onnx.NodeProto, str]] = [(n, "") for n in reversed(model.graph.node)]
    while stack:
        node, inside = stack.pop()
        for g in _subgraphs(node):
            stack.extend((n, inside) for n in reversed(g.node))
        if node.domain in KNOWN_DOMAINS:
            continue
        key = (node.domain, node.op_type, getattr(node, "overload", ""))
        fn = functions.get(key)
        if fn is None:
            where = f" (in local function '{inside}')" if inside else ""
            raise ModelLoadError(f"node '{node.name or node.op_type}'{where} uses operator '{node.op_type}' "
                                 f"from the custom domain '{node.domain}', which no runtime here implements",
                                 path=path)
        if key not in checked:
            checked.add(key)
            stack.extend((n, fn.name) for n in reversed(fn.node))


def _all_tensors(model: onnx.ModelProto):
    yield from model.graph.initializer
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t


def load_onnx(path: Path, convert: bool = True) -> ModelHandle:
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelLoadError(f"not a valid ONNX file ({_short(exc)})" + _text_note(path), path=path) from None
    if not model.graph.node:
        raise ModelLoadError("not a valid ONNX file (the graph has no nodes)", path=path)
    check_external_data(model, path)
    check_opsets(model, path)
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except Exception as exc:
        raise ModelLoadError(f"its external weight data could not be read ({_short(exc)})",
                             path=path) from None
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelLoadError(f"the ONNX graph is invalid: {_short(exc, 300)}", path=path) from None
    from onnx import numpy_helper

    for tensor in _all_tensors(model):  # the checker does not compare a weight's bytes with its shape
        try:
            numpy_helper.to_array(tensor)
        except Exception as exc:
            raise ModelLoadError(f"weight '{tensor.name}' is corrupt ({_short(exc)})", path=path) from None
    lifted = lift_constant_weights(model)
    inits = {i.name for i in model.graph.initializer}
    inputs = [_spec(v) for v in model.graph.input if v.name not in inits]
    outputs = [_spec(v) for v in model.graph.output]
    _assign_batch_axes(inputs)
    handle = ModelHandle(None, inputs, outputs, source=str(path), format="onnx", onnx_model=model)
    if lifted:  # weights that were Constant nodes (see lift_constant_weights)
        handle.info["lifted_constant_weights"] = lifted
    for prop in model.metadata_props:
        if prop.key == "tugboat":
            meta = _read_meta({METADATA_NAME: prop.value}, path, "metadata_props['tugboat']")
            if meta.get("task"):
                handle.task, handle.task_source = meta["task"], "file"
            handle.arch = meta.get("arch")
    if not convert:  # no step needs a module (no conversion_error either: nothing to retry with the data)
        return handle
    try:
        handle.module = onnx_to_torch(model)
    except ModelLoadError as exc:
        handle.conversion_error = exc.message
        handle.warnings.append(f"loaded for ONNX Runtime only: {exc.message}")
    return handle


def lift_constant_weights(model: onnx.ModelProto) -> int:
    """Turn weights stored as ``Constant`` nodes into initializers of the same name, in place, in the
    main graph and in subgraphs; returns how many. The graph computes exactly the same, but the tools
    that look for weights among initializers now find them: ONNX Runtime's quantizers (which otherwise
    quantize only activations and make such a model *larger*) and onnx2torch (which otherwise cannot
    convert it). Shape and index constants (int64) and scalars stay Constant nodes."""
    count = 0

    def lift(graph: onnx.GraphProto) -> None:
        nonlocal count
        keep = []
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    lift(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        lift(g)
            value = next((a.t for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR),
                         None)
            if (node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1
                    and value is not None and len(node.output) == 1 and int(np.prod(value.dims)) > 1
                    and value.data_type not in (onnx.TensorProto.INT64, onnx.TensorProto.INT32,
                                                onnx.TensorProto.BOOL, onnx.TensorProto.STRING)):
                tensor = onnx.TensorProto()
                tensor.CopyFrom(value)
                tensor.name = node.output[0]
                graph.initializer.append(tensor)
                count += 1
            else:
                keep.append(node)
        if len(keep) != len(graph.node):
            del graph.node[:]
            graph.node.extend(keep)

    lift(model.graph)
    return count


def _assign_batch_axes(inputs: list[TensorSpec]) -> None:
    """Where each input's batch is. A scalar has none. The first input's dimension 0 names the batch;
    another input takes the axis carrying the same symbolic name, else its dimension 0 when that is
    open, else its only open dimension (a recurrent state [layers, batch, hidden])."""
    if not inputs:
        return
    first = inputs[0].shape[0] if inputs[0].shape else None
    batch_name = first if isinstance(first, str) and first else None
    for k, spec in enumerate(inputs):
        if not spec.shape:
            spec.batch_axis = None
            continue
        named = [i for i, d in enumerate(spec.shape) if batch_name is not None and d == batch_name]
        open_dims = [i for i, d in enumerate(spec.shape) if not (isinstance(d, int) and d > 0)]
        if k == 0 or spec.shape[0] == 1 or 0 in open_dims or not open_dims:
            spec.batch_axis = 0  # the usual case, and any model whose batch is fixed
        elif named:
            spec.batch_axis = named[0]
        elif len(open_dims) == 1:
            spec.batch_axis = open_dims[0]


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    t = value.type.tensor_type
    dims: list[int | str | None] = []
    for d in t.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return TensorSpec(value.name, tuple(dims), _NP_DTYPES.get(t.elem_type, "float32"))


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
    work = _fold_initializer_identities(model)
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
    in_subgraphs = any(True for n in model.graph.node for _ in _subgraphs(n))
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
    import re

    m = re.search(r"operation_type='([^']+)'.*?version=(\d+)", text)
    if m:
        return f"'{m.group(1)}' (opset {m.group(2)})"
    return f"(a converter refused: {' '.join(text.split())[:120]})"


def _text_note(path: Path) -> str:
    """'; it is a text file' when the start of the file is readable text (a renamed README, an
    HTML error page saved instead of the download), which says more than the parser's error."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
        text = head.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return ""
    if head and all(c.isprintable() or c in "\r\n\t" for c in text):
        return f"; it is a text file starting {' '.join(text.split())[:40]!r}"
    return ""


def _short(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- saving ----------------------------------------------------------------------------------

def save_torchscript(handle: ModelHandle, path: str | os.PathLike) -> Path:
    module = handle.torch_module()
    with torch.inference_mode():
        scripted = torch.jit.trace(module, tuple(handle.example_inputs(2)), check_trace=False)
    path = Path(path)
    torch.jit.save(scripted, str(path), _extra_files={METADATA_NAME: json.dumps(handle.spec_dict())})
    return path


def save_exported(handle: ModelHandle, path: str | os.PathLike) -> Path:
    module = handle.torch_module()
    batch = torch.export.Dim("batch", min=1, max=4096)
    dims = {f"arg{i}": {0: batch} for i in range(len(handle.inputs))}
    args = tuple(handle.example_inputs(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.export.export(module, args, dynamic_shapes=tuple(dims.values()))
        except Exception:
            program = torch.export.export(module, args)
    path = Path(path)
    torch.export.save(program, str(path), extra_files={METADATA_NAME: json.dumps(handle.spec_dict())})
    return path


def save_state_dict(handle: ModelHandle, path: str | os.PathLike) -> Path:
    """Weights only (loadable with ``weights_only=True``); needs a built-in architecture."""
    if not handle.arch:
        raise ModelLoadError("a state_dict needs a built-in architecture; save TorchScript instead",
                             path=handle.source)
    path = Path(path)
    torch.save(handle.torch_module().state_dict(), path)
    return path


def save_pickle(handle: ModelHandle, path: str | os.PathLike) -> Path:
    """The whole module pickled (for pruned models whose shapes no architecture matches).
    Loading it back needs trust, like any pickle."""
    path = Path(path)
    torch.save({"model": handle.torch_module(), "tugboat": handle.spec_dict()}, path)
    return path


def serialize_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()
