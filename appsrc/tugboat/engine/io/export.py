"""Export to ONNX (checked with ``onnx.checker`` and an ONNX Runtime parity run) and torch files."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx

from ..errors import ModelLoadError, TugboatError
from ..stored import atomic_write_bytes, recipe_dict_to_toml, replace_with, temp_file_beside, without_trust
from .models import ModelHandle


def onnx_bytes(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString()


PROVENANCE_KEYS = ("tugboat.version", "tugboat.recipe", "tugboat.inputs", "tugboat.preprocessing")


def used_domains(model: onnx.ModelProto) -> set[str]:
    """Operator domains the graph (subgraphs and local functions included) really uses."""
    used: set[str] = set()

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            used.add("" if node.domain == "ai.onnx" else node.domain)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)
                for g in attr.graphs:
                    visit(g)

    visit(model.graph)
    function_domains = {f.domain for f in model.functions}
    for f in model.functions:
        for node in f.node:
            used.add("" if node.domain == "ai.onnx" else node.domain)
    return used | function_domains


def for_export(model: onnx.ModelProto, recipe: dict | None = None,
               handle: ModelHandle | None = None) -> onnx.ModelProto:
    """A copy fit to hand to someone: only the opset domains it uses are declared (an ONNX Runtime
    round trip leaves training, preview, nchwc and aten declared though no node uses them), and
    ``metadata_props`` say where it came from: Tugboat's version, the recipe that made it (JSON), the
    inputs it expects and the preprocessing its data had."""
    from tugboat import __version__

    out = onnx.ModelProto()
    out.CopyFrom(model)
    used = used_domains(out) | {""}
    keep = [op for op in out.opset_import if op.domain in used or (op.domain == "ai.onnx" and "" in used)]
    del out.opset_import[:]
    out.opset_import.extend(keep)
    props = {p.key: p.value for p in out.metadata_props}
    props["tugboat.version"] = __version__
    if recipe:
        # trust is never stored, in files we hand out least of all
        props["tugboat.recipe"] = json.dumps(without_trust(recipe), sort_keys=True, default=str)
    if handle is not None:
        props["tugboat.inputs"] = json.dumps([s.to_dict() for s in handle.inputs])
    data = (recipe or {}).get("data")
    if data:
        props["tugboat.preprocessing"] = preprocessing_note(str(data))
    del out.metadata_props[:]
    for key, value in props.items():
        entry = out.metadata_props.add()
        entry.key, entry.value = key, value
    return out


def preprocessing_note(data: str) -> str:
    """How the data the variant was calibrated, tuned and measured on reached the model."""
    if data.startswith("demo:"):
        return f"{data}: the built-in arrays, fed as they are (8x8 digits scaled to 0..1)"
    suffix = Path(data).suffix.lower()
    if suffix in (".npz", ".csv"):
        return f"{Path(data).name}: arrays fed as they are (no resizing or normalisation added)"
    return (f"{Path(data).name}: images resized to the model's input size, as float32 in 0..1 "
            "(divided by 255), no mean/std normalisation")


def provenance(model: onnx.ModelProto) -> dict[str, str]:
    """What :func:`for_export` recorded in a file (empty for files Tugboat did not export)."""
    return {p.key: p.value for p in model.metadata_props if p.key in PROVENANCE_KEYS}


def write_onnx(handle: ModelHandle, path: str | os.PathLike, *, check: bool = True) -> Path:
    from ..measuring.runtime import checked_bytes, serialized

    # the bytes measured (and run) already, not serialized again; checked once per graph (a loaded
    # file's bytes at load, a quantized graph's when it was made)
    model = handle.to_onnx()
    if not check:
        return atomic_write_bytes(path, serialized(model))
    try:
        data = checked_bytes(model)
    except Exception as exc:
        raise TugboatError(f"exported ONNX fails onnx.checker: {str(exc)[:300]}", path=handle.source) from None
    return atomic_write_bytes(path, data)


def check_onnx(model: onnx.ModelProto | bytes, where: str = "") -> None:
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise TugboatError(f"exported ONNX fails onnx.checker: {str(exc)[:300]}", path=where) from None


def parity(handle: ModelHandle, *, batch: int = 4, atol: float = 1e-4) -> float:
    """Max absolute difference between torch and ONNX Runtime on the same random inputs."""
    from ..measuring.runtime import run_onnx, run_torch

    inputs = [spec.to_model(t.numpy()) for spec, t in zip(handle.inputs, handle.example_inputs(batch, seed=1))]
    ort_out = run_onnx(handle.to_onnx(), inputs)
    torch_out = run_torch(handle.torch_module(), inputs)
    diff = max(float(np.max(np.abs(a - b))) if a.size else 0.0 for a, b in zip(ort_out, torch_out))
    if not np.isfinite(diff) or diff > atol:
        raise ModelLoadError(f"ONNX Runtime and torch disagree by {diff:.3g} (> {atol})",
                             path=handle.source)
    return diff


EXPORT_KINDS = ("onnx", "torch", "recipe", "copy")


def export_variant(path: str | os.PathLike, kind: str, progress, *, handle: ModelHandle | None = None,
                   recipe: dict | None = None, source: str | os.PathLike | None = None) -> Path:
    """The GUI's export job: write a variant as ``onnx``, ``torch`` (torch.export ``.pt2``, TorchScript
    when the model cannot be exported), its ``recipe`` (TOML), or a ``copy`` of a saved file.

    Cancellable at any point within a fraction of a second (the conversion runs through
    :func:`cancellable.call`) and atomic: the file is written under a temporary name in the target
    folder and renamed into place only if the job was not cancelled, so a cancelled or killed export
    leaves the old file (or none), never a partial one."""
    from .. import cancellable
    from ..errors import Cancelled

    if kind not in EXPORT_KINDS:
        raise TugboatError(f"unknown export kind {kind!r}; valid: {', '.join(EXPORT_KINDS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    progress.update(0.05, f"exporting {kind}")
    tmp = temp_file_beside(path)

    def work() -> None:
        try:
            _write_export(kind, tmp, path, handle=handle, recipe=recipe, source=source)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            if progress.cancelled:  # abandoned by a cancel: leave nothing behind
                raise Cancelled()
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    try:
        cancellable.call(work, progress, name="tugboat-export")
        progress.check()
        replace_with(tmp, path)
    except BaseException:
        # a helper still writing after a cancel removes what it wrote when it stops (it checks the
        # token last); whatever it already finished is removed here
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    progress.update(1.0, f"exported {path.name}")
    return path


def _write_export(kind: str, tmp: Path, path: Path, *, handle: ModelHandle | None, recipe: dict | None,
                  source: str | os.PathLike | None) -> None:
    """Write one :data:`EXPORT_KINDS` file to ``tmp`` (renamed to ``path`` by the caller)."""
    if kind == "recipe":
        tmp.write_bytes(recipe_dict_to_toml(recipe or {}).encode("utf-8"))
    elif kind == "copy":
        if source is None or not Path(source).is_file():
            raise TugboatError("the saved model file is missing", path=str(source))
        if path.suffix.lower() == ".onnx":  # a saved variant: cleaned and labelled on the way
            tmp.write_bytes(onnx_bytes(for_export(onnx.load(str(source)), recipe)))
        else:
            shutil.copyfile(source, tmp)
    elif handle is None:
        raise TugboatError("this variant has no model in memory; re-run it first")
    elif kind == "onnx":
        model = for_export(handle.to_onnx(), recipe, handle)
        check_onnx(model, handle.source)
        tmp.write_bytes(onnx_bytes(model))
    else:
        from .loading import save_exported, save_torchscript

        if handle.module is None:
            raise TugboatError("this variant exists only as ONNX; export it as ONNX", path=handle.source)
        try:
            save_exported(handle, tmp)
        except Exception:  # torch.export cannot trace every model: TorchScript next
            save_torchscript(handle, tmp)
