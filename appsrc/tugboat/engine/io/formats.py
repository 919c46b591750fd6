"""Networks that arrive without an editable ``nn.Module``: TorchScript, ``torch.export`` programs,
and state_dicts whose architecture lives in the user's own code.

**TorchScript and ``.pt2`` are made editable through ONNX.** A ``ScriptModule`` refuses forward
hooks, its submodules cannot be replaced (structured pruning) and it cannot be re-traced by FX
(quantization); an ``ExportedProgram``'s module refuses ``train()`` and holds aten calls on bare
parameters instead of ``nn.Conv2d`` / ``nn.Linear`` layers. Both go through the same path that
ONNX files already take: the legacy TorchScript-based ONNX exporter (which accepts scripted and
traced modules, and ``ExportedProgram.module()`` behind a wrapper that tolerates ``train()``),
then onnx2torch, which rebuilds real ``nn.Conv2d`` / ``nn.Linear`` layers every technique can edit.
The exported ONNX graph is the model's deployable artifact, exactly as for an ``.onnx`` file.

The ONNX export needs example inputs, so a file is loaded in two stages: first what the file
itself tells (parameters, layers, size; input names from the ``forward`` signature), and, once
input shapes are known (recorded in the file, ``--input-shape`` / ``input_shape``, or the arrays of
the data file), the conversion. Until then the handle is *pending* (``handle.pending`` holds the
original object) and :func:`pending_info` describes it.

What this path cannot do: scripted data-dependent control flow becomes ONNX ``If`` / ``Loop``
nodes, which onnx2torch cannot convert, so such a model is measured and quantized in ONNX Runtime
(and still teaches a student) but cannot be pruned; inputs that are not tensors (lists, dicts,
optional arguments without a default) are refused; a program exported with a fixed batch size keeps
that batch size.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import logging
import sys
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from ..errors import DataError, ModelLoadError
from .models import ONNX_OPSET, ModelHandle, TensorSpec, _short, batch_axes, onnx_to_torch

UNKNOWN = "?"  # a dimension nothing has told yet
_LOG = logging.getLogger(__name__)


# --- pending handles: what the file tells before shapes are known --------------------------------

def shapes_known(handle: ModelHandle) -> bool:
    return bool(handle.inputs) and all(
        isinstance(d, int) and d > 0 for s in handle.inputs for d in s.shape[1:]) and all(
        len(s.shape) >= 1 for s in handle.inputs)


def script_input_specs(module: torch.jit.ScriptModule, path: Path) -> list[TensorSpec]:
    """Input names from ``forward``'s signature (shapes are not recorded in TorchScript files).
    Arguments that are not tensors (``sr: int``) are no inputs: they are bound to a value before
    the export (see :func:`constant_values`)."""
    try:
        args = module.forward.schema.arguments[1:]
    except Exception as exc:  # a module without a scripted forward
        raise ModelLoadError(f"the TorchScript module has no usable forward ({_short(exc)})", path=path) from None
    specs = [TensorSpec(arg.name, ("batch", UNKNOWN)) for arg in args
             if str(arg.type) in ("Tensor", "Optional[Tensor]")]
    if not specs:
        raise ModelLoadError("the TorchScript module's forward takes no tensor input", path=path)
    return specs


def constant_values(handle: ModelHandle, module: torch.jit.ScriptModule) -> dict[str, Any]:
    """Values of ``forward``'s non-tensor arguments: given by the user (``constants`` in a recipe,
    ``--constant NAME=VALUE``), else by the data (an array of that name holding one value), else
    the default in the signature. One line naming the argument when none of them says."""
    from .scripted import coerce, constant_arguments

    given = {**handle.info.get("data_constants", {}), **handle.info.get("constants", {})}
    args = constant_arguments(module)
    unknown = sorted(set(handle.info.get("constants", {})) - set(args))
    if unknown:
        raise ModelLoadError(f"constants {', '.join(unknown)} name no non-tensor argument of forward "
                             f"(those are: {', '.join(args) or 'none'})", path=handle.source)
    values = {}
    for name, arg in args.items():
        if name in given:
            try:
                values[name] = coerce(name, arg["type"], given[name])
            except ModelLoadError as exc:
                raise ModelLoadError(exc.message, path=handle.source) from None
        elif "default" in arg:
            values[name] = arg["default"]
        else:
            raise ModelLoadError(
                f"forward argument '{name}' is a {arg['type']} with no default, and nothing gives its value",
                path=handle.source, hint=f"give it with --constant {name}=VALUE (constants = {{{name} = ...}} in "
                "a recipe), or as an array of that name in the data")
    return values


def _needs_specialising(module: Any) -> bool:
    """A scripted module with non-tensor arguments, a state it rewrites on every call, or fused
    inference kernels (a traced nn.TransformerEncoderLayer)."""
    if not isinstance(module, torch.jit.ScriptModule):
        return False
    from .scripted import constant_arguments, has_fused_kernels

    try:
        return (bool(constant_arguments(module)) or "prim::SetAttr" in str(module.inlined_graph)
                or has_fused_kernels(module))
    except Exception:
        return False


class _FunctionModule(nn.Module):
    """A specialised scripted function as a module (for running in torch when ONNX cannot take it)."""

    def __init__(self, function) -> None:
        super().__init__()
        self.function = function

    def forward(self, *args):
        return self.function(*args)


def module_input_specs(module: nn.Module, path: Path | str) -> list[TensorSpec]:
    """Input names of a plain module's ``forward`` (arguments without a default value)."""
    import inspect

    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return [TensorSpec("input", ("batch", UNKNOWN))]
    names = [p.name for p in sig.parameters.values()
             if p.default is inspect.Parameter.empty
             and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not names and any(p.kind == p.VAR_POSITIONAL for p in sig.parameters.values()):
        names = ["input"]
    if not names:
        raise ModelLoadError("the module's forward takes no input", path=path)
    return [TensorSpec(n, ("batch", UNKNOWN)) for n in names]


def _serialized(original: Any) -> bytes:
    buf = io.BytesIO()
    try:
        if isinstance(original, torch.jit.ScriptModule):
            torch.jit.save(original, buf)
        elif isinstance(original, nn.Module):
            torch.save(original.state_dict(), buf)
        else:
            torch.export.save(original, buf)
    except Exception:
        return b""
    return buf.getvalue()


def _original_module(original: Any) -> nn.Module:
    return original if isinstance(original, nn.Module) else original.module()


def pending_info(handle: ModelHandle) -> dict[str, Any]:
    """``tugboat info`` for a file whose input shapes are not known: what the file itself tells."""
    module = _original_module(handle.pending)
    seen: set[int] = set()
    params = nonzero = 0
    layers = []
    for name, sub in module.named_modules():
        own = [p for p in sub.parameters(recurse=False) if id(p) not in seen]
        own += [b for n, b in sub.named_buffers(recurse=False)
                if id(b) not in seen and not n.startswith(("running_", "num_batches"))]
        if not own:
            continue
        count = 0
        for t in own:
            seen.add(id(t))
            count += t.numel()
            nonzero += int(torch.count_nonzero(t.detach()))
        params += count
        layers.append({"name": name or "(root)", "type": getattr(sub, "original_name", type(sub).__name__),
                       "params": count, "flops": None})
    blob = _serialized(handle.pending)
    names = ", ".join(handle.input_names)
    note = (f"FLOPs and outputs need the input shape, which this file does not record: give data with "
            f"arrays for {names}, or --input-shape (input_shape = [...] in a recipe)")
    return {"params": params, "nonzero_params": nonzero, "flops": None, "size_bytes": len(blob),
            "compressed_bytes": len(zlib.compress(blob, 6)), "layers": layers, "note": note}


# --- making it editable ---------------------------------------------------------------------------

class _ProgramModule(nn.Module):
    """``ExportedProgram.module()`` behind a module whose ``train()`` only sets a flag (the program's
    own module raises on it, and the ONNX exporter calls it)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        _keep_sizes_dynamic(module)
        self.program = module

    def forward(self, *args):
        return self.program(*args)

    def train(self, mode: bool = True):
        self.training = mode
        return self


def _dim_size(x: torch.Tensor, dim: int):
    return x.size(dim)


def _reshape(x: torch.Tensor, shape, *_):
    return x.reshape(shape)


def _expand(x: torch.Tensor, shape, *_):
    return x.expand(shape)


def _arange(*args, **kwargs):
    # torch.arange takes a traced size as its end (the aten overload wants a number)
    return torch.arange(*args, dtype=kwargs.get("dtype"), device=kwargs.get("device"))


def _zeros(size, *_, **kwargs):
    from .batch_shapes import filled

    return filled(size, 0, kwargs.get("dtype") or torch.get_default_dtype())


def _new_ones(x: torch.Tensor, size, *_, **kwargs):
    from .batch_shapes import filled

    return filled(size, 1, kwargs.get("dtype") or x.dtype)


def _keep_sizes_dynamic(gm: nn.Module) -> None:
    """A program exported with a dynamic batch computes sizes with ``aten.sym_size`` and passes them
    to ``aten.view`` / ``expand`` as plain ints; the TorchScript tracer behind the ONNX exporter would
    bake the example's batch into those shapes (a flatten before the classifier then fails at any
    other batch). Tensor-method calls keep them traced, so the export stays batch-dynamic."""
    graph = getattr(gm, "graph", None)
    if graph is None:
        return
    swap = {torch.ops.aten.sym_size.int: _dim_size, torch.ops.aten.view.default: _reshape,
            torch.ops.aten.reshape.default: _reshape, torch.ops.aten._unsafe_view.default: _reshape,
            torch.ops.aten.expand.default: _expand, torch.ops.aten.arange.default: _arange,
            torch.ops.aten.arange.start: _arange, torch.ops.aten.arange.start_step: _arange,
            torch.ops.aten.zeros.default: _zeros, torch.ops.aten.new_ones.default: _new_ones}
    changed = False
    for node in graph.nodes:
        if node.op == "call_function" and node.target in swap:
            node.target = swap[node.target]
            changed = True
    if changed:
        gm.recompile()


def make_editable(handle: ModelHandle) -> ModelHandle:
    """Convert the pending original (ScriptModule / ExportedProgram) once input shapes are known:
    ONNX export (the deployable artifact) then onnx2torch (the editable module). A scripted module
    with non-tensor arguments or an internal state is specialised first (engine/io/scripted.py)."""
    original = handle.pending
    if original is None:
        return handle
    if isinstance(original, nn.Module) and not isinstance(original, torch.jit.ScriptModule):
        return _plain_ready(handle, original)
    module = original if isinstance(original, nn.Module) else _ProgramModule(original.module())
    specialised = _needs_specialising(original)
    if specialised:
        module = _specialised(handle, original)
    args, probe = _probe(handle, module, _export_batch(original))
    outs = probe if isinstance(probe, (tuple, list)) else [probe]
    if not all(isinstance(o, torch.Tensor) for o in outs):
        raise ModelLoadError("the model returns something other than tensors; only tensor outputs "
                             "can be measured", path=handle.source)
    out_names = handle.output_names or None
    if not out_names or len(out_names) != len(outs):
        out_names = ["output"] if len(outs) == 1 else [f"output_{i}" for i in range(len(outs))]
    handle.outputs = [TensorSpec(n, ("batch", *o.shape[1:]), str(o.dtype).replace("torch.", ""))
                      for n, o in zip(out_names, outs)]
    try:
        model = _export_onnx(handle, module, args, out_names)
    except Exception as exc:
        why = f"could not convert the {handle.format} model to ONNX, the path that makes it editable " \
              f"({_short(exc, 300)})"
        if not isinstance(original, torch.jit.ScriptModule):
            raise ModelLoadError(why, path=handle.source) from None
        # e.g. a torch dynamic-int8 module (quantized::linear_dynamic has no ONNX export): it still runs
        # and measures in torch as it is; techniques that edit it or need its ONNX say why
        handle.module = _FunctionModule(module) if specialised else original
        handle.pending, handle.conversion_error = None, why
        handle.warnings.append(f"runs in torch only: {why}")
        return handle
    if specialised:
        from .onnx_graph import lift_constant_weights

        lift_constant_weights(model)  # the frozen weights are Constant nodes: onnx2torch needs initializers
    _check_other_batch(handle, model)
    handle.onnx_model, handle.pending = model, None
    _convert_to_torch(handle, model)
    return handle


def _feeds(handle: ModelHandle) -> list[dict[str, np.ndarray]]:
    """Example inputs at three batch sizes: what is the same at all of them depends on shapes only."""
    return [dict(zip(handle.input_names, (x.numpy() for x in handle.example_inputs(b, seed=b))))
            for b in (1, 2, 3)]


def _convert_folded(handle: ModelHandle, model: onnx.ModelProto) -> bool:
    """onnx2torch cannot convert If: fold those that only test shapes (fixed here but the batch)."""
    from .converted_graphs import fold_static_ifs, lift_layer_constants, widen_edge_pads

    feeds = _feeds(handle)
    folded = fold_static_ifs(model, feeds)
    if folded is None or any(n.op_type == "If" for n in folded.graph.node):
        return False
    lift_layer_constants(folded)
    widen_edge_pads(folded, feeds)
    handle.module = _checked_torch(handle, folded)  # its error says more than "cannot convert If"
    handle.onnx_model, handle.conversion_error = folded, None
    return True


def convert_with_data_shapes(handle: ModelHandle) -> None:
    """Retry onnx2torch on an ONNX file it refused at load, with the shape of every value recorded from
    one run at the data's sizes (a BatchNormalization or LayerNormalization converter needs its input's
    rank, which shape inference loses after a Reshape to a computed shape) and a Clip's bounds as
    initializers. When that does not help the model stays ONNX-only, saying what still blocks."""
    from .converted_graphs import annotate_shapes, lift_layer_constants

    if handle.info.get("conversion_retried"):  # once per model, not at every data load
        return
    handle.info["conversion_retried"] = True
    try:
        feeds = _feeds(handle)
    except ModelLoadError:
        return
    work = annotate_shapes(handle.onnx_model, feeds[-1])
    if work is None:
        return
    lift_layer_constants(work)
    old = handle.conversion_error
    try:
        handle.module = _checked_torch(handle, work, reference=handle.onnx_model)
    except ModelLoadError as exc:  # what still blocks after the fixes above says more than the first error
        handle.conversion_error = exc.message
        if old:
            handle.warnings = [w.replace(old, exc.message) for w in handle.warnings]
        return
    handle.conversion_error = None
    handle.warnings = [w for w in handle.warnings if old not in w]


def _specialised(handle: ModelHandle, original: torch.jit.ScriptModule):
    from .scripted import specialise

    values = constant_values(handle, original)
    try:
        function = specialise(original, values, tuple(handle.example_inputs(2)))
    except ModelLoadError as exc:
        raise ModelLoadError(exc.message, path=handle.source, hint=exc.hint) from None
    handle.info["constants_used"] = values
    return function


def _export_onnx(handle: ModelHandle, module, args, out_names: list[str]) -> onnx.ModelProto:
    dynamic = batch_axes([*handle.inputs, *handle.outputs])
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, buf, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=handle.input_names, output_names=out_names,
                          dynamic_axes=dynamic, do_constant_folding=True)
    return onnx.load_from_string(buf.getvalue())


def _convert_to_torch(handle: ModelHandle, model: onnx.ModelProto) -> None:
    from .converted_graphs import lift_layer_constants, widen_edge_pads

    lift_layer_constants(model)
    widen_edge_pads(model, _feeds(handle))
    try:
        handle.module = _checked_torch(handle, model)
        handle.conversion_error = None
    except ModelLoadError as exc:
        try:
            if "'If'" in exc.message and _convert_folded(handle, model):
                return
        except ModelLoadError as folded_exc:
            exc = folded_exc
        handle.module = None
        handle.conversion_error = exc.message
        handle.warnings.append(f"runs in ONNX Runtime only (quantization and measuring work; pruning and "
                               f"fine-tuning do not): {exc.message}")


def _checked_torch(handle: ModelHandle, model: onnx.ModelProto,
                   reference: onnx.ModelProto | None = None) -> nn.Module:
    """onnx2torch's module, run once beside the graph: a converter that builds a module which then
    fails or computes something else (a padding mode torch lacks) is caught here, not in a technique."""
    from ..measuring.runtime import run_onnx

    module = onnx_to_torch(model)
    args = handle.example_inputs(2, seed=3)
    try:
        with torch.no_grad():
            out = module(*args)
        mine = [o.numpy() for o in (out if isinstance(out, (tuple, list)) else [out])]
        ref = run_onnx(model if reference is None else reference, [x.numpy() for x in args])
    except Exception as exc:
        raise ModelLoadError(f"the graph converted to torch fails to run ({_short(exc, 200)})") from None
    if len(mine) != len(ref) or not all(_same(a, b) for a, b in zip(mine, ref)):
        raise ModelLoadError("the graph converted to torch computes something else than the ONNX graph")
    return module


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape:
        return False
    if b.dtype.kind != "f" or a.dtype.kind != "f":
        return bool(np.array_equal(a, b))
    finite = np.abs(b[np.isfinite(b)])
    scale = max(1.0, float(finite.max())) if finite.size else 1.0
    return bool(np.allclose(a, b, rtol=1e-3, atol=1e-4 * scale, equal_nan=True))


def _probe(handle: ModelHandle, module: nn.Module, batch: int):
    """Run the module once on example inputs. When the file did not say the inputs' dtype (a shape
    from --input-shape) and float inputs fail, integer ids are tried (token models)."""
    failure = None
    for attempt in range(2):
        args = tuple(handle.example_inputs(batch))
        try:
            with torch.no_grad():
                return args, module(*args)
        except Exception as exc:
            failure = failure or exc
        if attempt or not handle.info.get("input_dtypes_guessed") or any(
                s.dtype != "float32" for s in handle.inputs):
            break
        guessed = handle.inputs
        handle.inputs = [TensorSpec(s.name, s.shape, "int64") for s in guessed]
    if handle.info.get("input_dtypes_guessed") and any(s.dtype == "int64" for s in handle.inputs):
        handle.inputs = [TensorSpec(s.name, s.shape, "float32") for s in handle.inputs]
    raise ModelLoadError(f"the model fails on inputs of shape "
                         f"{', '.join(str(s.shape[1:]) for s in handle.inputs)}: {_short(failure, 300)}",
                         path=handle.source)


def _export_batch(original: Any) -> int:
    """The example batch size: 2, or the fixed batch a program was exported with (its inputs are
    checked against it)."""
    if isinstance(original, nn.Module):
        return 2
    for node in original.graph.nodes:
        if node.op == "placeholder" and node.name in original.graph_signature.user_inputs:
            val = node.meta.get("val")
            if val is not None and getattr(val, "ndim", 0) > 0 and isinstance(val.shape[0], int):
                return int(val.shape[0])
    return 2


def _check_other_batch(handle: ModelHandle, model: onnx.ModelProto) -> None:
    """Tugboat measures at the user's batch size: a graph whose batch was fixed when it was traced
    or exported (a reshape to [2, ...]) is refused here, with what to do, not at the first run."""
    from ..measuring.runtime import run_onnx

    try:
        run_onnx(model, [x.numpy() for x in handle.example_inputs(3, seed=1)])
    except Exception as exc:
        raise ModelLoadError(
            f"the {handle.format} model only runs at the batch size it was traced or exported with "
            f"(at batch 3: {_short(exc, 120)})", path=handle.source,
            hint="export it with a dynamic batch, e.g. torch.export.export(model, args, "
                 "dynamic_shapes=({0: torch.export.Dim('batch')},))") from None


def _plain_ready(handle: ModelHandle, module: nn.Module) -> ModelHandle:
    """A plain ``nn.Module`` (user architecture, trusted pickle) is editable as it is: only the
    outputs are filled in from a run on example inputs."""
    _, out = _probe(handle, module.eval(), 2)
    outs = out if isinstance(out, (tuple, list)) else [out]
    if not all(isinstance(o, torch.Tensor) for o in outs):
        raise ModelLoadError("the model returns something other than tensors; only tensor outputs "
                             "can be measured", path=handle.source)
    if not handle.outputs or len(handle.outputs) != len(outs):
        names = ["output"] if len(outs) == 1 else [f"output_{i}" for i in range(len(outs))]
        handle.outputs = [TensorSpec(n, ("batch", *o.shape[1:]), str(o.dtype).replace("torch.", ""))
                          for n, o in zip(names, outs)]
    handle.module = module
    handle.pending = None
    return handle


def complete_from_data(handle: ModelHandle, ds) -> ModelHandle:
    """Take a pending model's input shapes from the data's arrays and convert it.

    Inputs match arrays by name; a single-input model takes a single array whatever its name;
    otherwise inputs and arrays are matched by position (with a warning)."""
    arrays = _take_constants(handle, dict(ds.inputs), ds.ref)
    optional = set(handle.info.get("optional_inputs", ()))  # e.g. token_type_ids: used when the data has it
    if optional:
        handle.inputs = [s for s in handle.inputs if s.name not in optional or s.name in arrays]
    names = handle.input_names
    if all(n in arrays for n in names):
        chosen = {n: arrays[n] for n in names}
    elif len(names) == 1 and len(arrays) == 1:
        chosen = {names[0]: next(iter(arrays.values()))}
    elif len(names) == len(arrays):
        chosen = dict(zip(names, arrays.values()))
        handle.warnings.append(f"data arrays {', '.join(arrays)} matched to the inputs {', '.join(names)} "
                               "by position (no names in common)")
    else:
        raise DataError(f"has arrays {', '.join(arrays) or 'none'}, but the model takes "
                        f"{len(names)} input{'s' if len(names) > 1 else ''} ({', '.join(names)})", path=ds.ref)
    specs = []
    for name, arr in chosen.items():
        if arr.ndim < 1 or len(arr) == 0:
            raise DataError(f"array for input '{name}' holds no samples", path=ds.ref)
        if arr.dtype.kind == "f":
            dtype = "float32"
        elif arr.dtype.kind == "b":
            dtype = "bool"
        else:
            dtype = "int64"
            handle.info.setdefault("vocab_size", {})[name] = int(np.max(arr)) + 1 if arr.size else 2
        specs.append(TensorSpec(name, ("batch", *arr.shape[1:]), dtype))
    handle.info.pop("input_dtypes_guessed", None)
    handle.inputs = specs
    ds.inputs = chosen
    return make_editable(handle)


def _take_constants(handle: ModelHandle, arrays: dict[str, np.ndarray], ref) -> dict[str, np.ndarray]:
    """Arrays named after a scripted forward's non-tensor arguments (``sr``) give their value (one
    value for every sample) and are no input."""
    if not isinstance(handle.pending, torch.jit.ScriptModule):
        return arrays
    from .scripted import constant_arguments

    found = {}
    for name in constant_arguments(handle.pending):
        if name not in arrays:
            continue
        values = np.unique(np.asarray(arrays.pop(name)))
        if values.size != 1:
            raise DataError(f"array '{name}' must hold one value for all samples: the model takes it as a "
                            f"plain number, not a tensor (it holds {values.size} different values)", path=ref)
        found[name] = values.item()
    handle.info["data_constants"] = found
    return arrays


# --- architecture from the user's code -------------------------------------------------------------

def build_user_arch(arch: str, kwargs: dict[str, Any] | None, where: str | Path) -> nn.Module:
    """Build ``"path/to/models.py:Name"`` or ``"package.module:factory"`` with ``kwargs``.

    This imports and runs the user's code: callers must only do it for a trusted load."""
    if ":" not in arch:
        raise ModelLoadError(f"architecture {arch!r} is neither built in nor 'file.py:Name' / "
                             "'package.module:factory'", path=where)
    target, _, attr = arch.rpartition(":")
    if target.endswith(".py") or "/" in target or "\\" in target:
        file = Path(target).expanduser()
        if not file.is_file():
            raise ModelLoadError(f"architecture file {target} not found", path=where)
        name = f"tugboat_user_arch_{abs(hash(str(file.resolve())))}"
        spec = importlib.util.spec_from_file_location(name, file)
        if spec is None or spec.loader is None:
            raise ModelLoadError(f"architecture file {target} cannot be imported as Python", path=where)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses and pickling look the module up by name
        try:
            spec.loader.exec_module(mod)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise ModelLoadError(f"importing {target} failed: {type(exc).__name__}: {_short(exc)}",
                                 path=where) from None
    else:
        try:
            mod = importlib.import_module(target)
        except Exception as exc:
            raise ModelLoadError(f"cannot import module '{target}' for the architecture: "
                                 f"{type(exc).__name__}: {_short(exc)}", path=where) from None
    factory = getattr(mod, attr, None)
    if factory is None or not callable(factory):
        found = [n for n, v in vars(mod).items() if isinstance(v, type) and issubclass(v, nn.Module)
                 and getattr(v, "__module__", "") == mod.__name__]
        raise ModelLoadError(f"'{target}' has no class or function named '{attr}'"
                             + (f" (nn.Module classes there: {', '.join(found[:6])})" if found else ""),
                             path=where)
    try:
        module = factory(**(kwargs or {}))
    except Exception as exc:
        raise ModelLoadError(f"building {attr}(**{kwargs or {}}) raised {type(exc).__name__}: {_short(exc)}",
                             path=where) from None
    if not isinstance(module, nn.Module):
        raise ModelLoadError(f"{attr}(...) returned a {type(module).__name__}, not an nn.Module", path=where)
    return module


def load_weights_into(module: nn.Module, state: dict[str, torch.Tensor], arch: str, where) -> None:
    """``load_state_dict`` with a message that lists missing, unexpected and mis-shaped keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing and unexpected:  # a common prefix ("module." from DataParallel, "model.")
        for prefix in ("module.", "model."):
            stripped = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
            if all(k in stripped for k in own):
                state = stripped
                missing, unexpected = [], [k for k in state if k not in own]
                break
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                more = f" and {len(keys) - 4} more" if len(keys) > 4 else ""
                parts.append(f"{len(keys)} {label} ({', '.join(keys[:4])}{more})")
        raise ModelLoadError(f"weights do not fit architecture '{arch}': {'; '.join(parts)}", path=where)
    module.load_state_dict(state)


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ModelLoadError("reading .safetensors needs the 'safetensors' package",
                             path=path, hint="pip install safetensors") from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:
        raise ModelLoadError(f"not a readable safetensors file ({_short(exc)})", path=path) from None
