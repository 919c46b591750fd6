"""Reading and writing model files: :func:`load_model` for every format, one :class:`ModelHandle` out.

Formats: ONNX (kept as the original graph for ONNX Runtime and converted with onnx2torch for
techniques that need torch), TorchScript, ``torch.export`` programs (``.pt2``), a ``state_dict``
for a named built-in architecture, a whole pickled ``nn.Module`` (only when the caller passes
``trust=True``), a Hugging Face folder (:mod:`.hf`), safetensors and pending shapes (:mod:`.formats`),
and the demo zoo (``demo:NAME``). Sits above the handle (:mod:`.models`) and the format readers.

Nothing is unpickled unless trusted: plain ``torch.load`` always runs with ``weights_only=True``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import onnx

from ..errors import ModelLoadError, UntrustedFileError
from ..lazy import nn, torch
from .data import check_regular_file, refuse_if_too_big
from .models import METADATA_NAME, ONNX_OPSET, ModelHandle, TensorSpec, _short, onnx_to_torch
from .onnx_graph import all_tensors, lift_constant_weights, node_subgraphs
from .tasks import TASKS, infer_task

_NP_DTYPES = {
    onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.BOOL: "bool",
}


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
    ``forward``'s non-tensor arguments (``{"sr": 16000}``; see engine/io/scripted.py).
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
    from . import zoo
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
                     arch_kwargs: dict[str, Any] | None = None,
               constants: dict[str, Any] | None = None) -> ModelHandle:
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
    # torch.export logs a full traceback at WARNING before re-raising; the error below says it all.
    # torch is imported first (torch is lazy here): its logging set-up resets that logger's level
    load = torch.export.load
    export_log = logging.getLogger("torch.export")
    level = export_log.level
    export_log.setLevel(logging.ERROR)
    try:
        program = load(str(path), extra_files=extra)
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
    from . import zoo

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
    if not trust:
        raise UntrustedFileError(
            f"the architecture {arch} is Python code that runs when the model is built; it was not run",
            path=path, hint="if you trust that code, load with --trust (or confirm in the app)")
    from .formats import build_user_arch, load_weights_into, module_input_specs
    module = build_user_arch(arch, arch_kwargs, path)
    load_weights_into(module, state, arch, path)
    handle = ModelHandle(None, module_input_specs(module, path), [], source=str(path), format="state_dict",
                         arch=arch, pending=module.eval())
    handle.info["input_dtypes_guessed"] = True
    handle.conversion_error = "the input shape is not known yet"
    return handle


def load_demo_spec(module: nn.Module, arch: str, source: str, fmt: str) -> ModelHandle:
    from . import zoo
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


def check_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Refuse external-data locations that point outside the model's folder."""
    base = path.resolve().parent
    for tensor in all_tensors(model):
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
        for g in node_subgraphs(node):
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


def load_onnx(path: Path, convert: bool = True) -> ModelHandle:
    try:
        data = path.read_bytes()
        model = onnx.load_model_from_string(data)
    except Exception as exc:
        raise ModelLoadError(f"not a valid ONNX file ({_short(exc)})" + _text_note(path), path=path) from None
    if not model.graph.node:
        raise ModelLoadError("not a valid ONNX file (the graph has no nodes)", path=path)
    check_external_data(model, path)
    check_opsets(model, path)
    from onnx.external_data_helper import _get_all_tensors  # subgraphs' tensors too

    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in _get_all_tensors(model))
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except Exception as exc:
        raise ModelLoadError(f"its external weight data could not be read ({_short(exc)})",
                             path=path) from None
    try:
        # the file's own bytes when they hold the whole model: not serialized again to be checked
        onnx.checker.check_model(model if external else data)
    except Exception as exc:
        raise ModelLoadError(f"the ONNX graph is invalid: {_short(exc, 300)}", path=path) from None
    _check_weights(model, path)
    lifted = lift_constant_weights(model)
    if not lifted and not external:  # the file's bytes are the graph's: not serialized again to be measured
        from ..measuring.runtime import remember_serialized

        remember_serialized(model, data, checked=True)  # checked above, as these bytes
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


def _check_weights(model: onnx.ModelProto, path: Path) -> None:
    """Every weight's bytes fit its shape (the checker does not compare them)."""
    from onnx import numpy_helper

    for tensor in all_tensors(model):
        try:
            if not _raw_bytes_fit(tensor):  # else decode it: to_array says what is wrong
                numpy_helper.to_array(tensor)
        except Exception as exc:
            raise ModelLoadError(f"weight '{tensor.name}' is corrupt ({_short(exc)})", path=path) from None


_WHOLE_BYTE_TYPES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}


def _raw_bytes_fit(tensor: onnx.TensorProto) -> bool:
    """Whether a weight's raw bytes are exactly as many as its shape and type need (what decoding it
    checks, without copying 90 MB of weights to find out); False means: decode it to know."""
    itemsize = _WHOLE_BYTE_TYPES.get(tensor.data_type)  # not strings, not packed 4-bit types
    if itemsize is None or not tensor.HasField("raw_data"):
        return False
    n = 1
    for d in tensor.dims:
        n *= int(d)
    return len(tensor.raw_data) == n * itemsize


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
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return TensorSpec(value.name, tuple(dims), _NP_DTYPES.get(t.elem_type, "float32"))


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


def _savable_module(handle: ModelHandle) -> nn.Module:
    """The handle's torch module, with a converted graph's shape arithmetic rewritten as Python of the
    batch (engine/io/batch_shapes.py) so that a trace or ``torch.export`` keeps the batch open."""
    from tugboat.engine.io.batch_shapes import batch_dynamic

    module = handle.torch_module()
    found = next(((i, s.batch_axis) for i, s in enumerate(handle.inputs) if s.batch_axis is not None), None)
    if found is None:
        return module
    rewritten = batch_dynamic(module, handle.example_inputs, batch_input=found[0], batch_axis=found[1])
    return module if rewritten is None else rewritten


def save_torchscript(handle: ModelHandle, path: str | os.PathLike) -> Path:
    module = _savable_module(handle)
    with torch.inference_mode():
        scripted = torch.jit.trace(module, tuple(handle.example_inputs(2)), check_trace=False)
    path = Path(path)
    torch.jit.save(scripted, str(path), _extra_files={METADATA_NAME: json.dumps(handle.spec_dict())})
    return path


def save_exported(handle: ModelHandle, path: str | os.PathLike) -> Path:
    module = _savable_module(handle)
    batch = torch.export.Dim("batch", min=1, max=4096)
    dims = {f"arg{i}": None if s.batch_axis is None else {s.batch_axis: batch} for i, s in enumerate(handle.inputs)}
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

