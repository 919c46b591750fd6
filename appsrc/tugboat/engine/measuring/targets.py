"""Exports for the runtimes a variant will be deployed to (``tugboat export --to ...``):

* ``onnx``: the variant's ONNX graph (``onnx.checker``), reloaded in ONNX Runtime;
* ``ort``: ONNX Runtime's ``.ort`` format for ONNX Runtime Mobile / minimal builds
  (``onnxruntime.tools.convert_onnx_models_to_ort``), with ``<name>.required_operators.config``
  beside it: the operator list a minimal build (``build.py --include_ops_by_config``) needs;
* ``pte``: an ExecuTorch program with the XNNPACK delegate (int8 variants re-quantized with the
  XNNPACK quantizer; see :mod:`tugboat.engine.measuring.runtimes.executorch_runtime`);
* ``openvino``: OpenVINO IR (``<name>.xml`` + ``<name>.bin``, weights kept at their precision).

Every export is checked before anything is written: the produced file is loaded back in its runtime
and its outputs compared with the variant's (ONNX Runtime on the variant's graph) on the same
inputs; the result holds the max-abs error and the top-1 agreement. Files are written atomically
(a Tugboat-named temporary file renamed into place) and only after the check, and the work runs
through :func:`cancellable.call`, so a cancel leaves the old files (or none), never partial ones.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .. import cancellable
from ..errors import ExportCheckError, TugboatError
from ..io.models import ModelHandle
from ..progress import Progress, null_progress
from ..stored import atomic_write_bytes, fsync_dir

TARGETS = {"onnx": ".onnx", "ort": ".ort", "pte": ".pte", "openvino": ".xml"}
RUNTIME_OF = {"onnx": "onnxruntime", "ort": "onnxruntime", "pte": "executorch", "openvino": "openvino"}
CHECK_SAMPLES = 64


def output_files(path: str | os.PathLike, kind: str) -> list[Path]:
    """Every file an export to ``path`` writes (the main file first)."""
    path = Path(path)
    if kind == "ort":
        return [path, path.with_name(path.stem + ".required_operators.config")]
    if kind == "openvino":
        return [path, path.with_suffix(".bin")]
    return [path]


def check_inputs(handle: ModelHandle, data=None, n: int = CHECK_SAMPLES) -> list[np.ndarray]:
    from .timing import batch_inputs

    if data is not None:
        try:
            samples = data.split("test", limit=n)[0]
            return batch_inputs(handle, min(n, len(next(iter(samples.values())))), samples)
        except Exception:  # data that does not fit this model: random inputs still check the file
            pass
    return batch_inputs(handle, 16, None)


def compare(outputs: list[np.ndarray], reference: list[np.ndarray], classification: bool) -> dict[str, Any]:
    y, y0 = outputs[0].astype(np.float64), reference[0].astype(np.float64)
    out = {"max_abs_error": float(np.max(np.abs(y - y0))) if y.size else 0.0, "samples": len(y)}
    if classification:
        out["top1_agreement"] = float(np.mean(y.reshape(len(y), -1).argmax(1) == y0.reshape(len(y0), -1).argmax(1)))
    return out


def _build(handle: ModelHandle, kind: str, name: str, data, progress: Progress, batch: int,
           inputs: list[np.ndarray]) -> tuple[dict[str, bytes], list[np.ndarray], dict[str, Any]]:
    """(file name -> bytes, outputs of the reloaded file on ``inputs``, notes); runs on a helper."""
    from .runtimes import availability

    builder = _BUILDERS.get(kind)
    if builder is None:
        raise TugboatError(f"unknown export target {kind!r}; valid: {', '.join(TARGETS)}")
    runtime = RUNTIME_OF[kind]
    avail = availability(runtime)
    if not avail["available"]:
        raise TugboatError(f"cannot export {kind}: {avail['reason']}")
    notes: dict[str, Any] = {"runtime": runtime, "version": avail["version"]}
    files, outputs = builder(handle, name, data, progress, batch, inputs, notes)
    return files, outputs, notes


def _checked_onnx(handle: ModelHandle) -> bytes:
    from ..io.export import check_onnx

    model = handle.to_onnx()
    check_onnx(model, handle.source)
    return model.SerializeToString()


def _build_onnx(handle, name, data, progress, batch, inputs, notes):
    from .runtime import ort_session, run_onnx

    data_onnx = _checked_onnx(handle)
    return {name: data_onnx}, run_onnx(None, inputs, session=ort_session(data_onnx))


def _build_ort(handle, name, data, progress, batch, inputs, notes):
    from .runtime import run_onnx

    with tempfile.TemporaryDirectory(prefix="tugboat-ort-") as tmp:
        src = Path(tmp) / "model.onnx"
        src.write_bytes(_checked_onnx(handle))
        _convert_to_ort(src, Path(tmp) / "out")
        made = Path(tmp) / "out" / "model.ort"
        configs = sorted((Path(tmp) / "out").glob("*required_operators*.config"))
        config = configs[0] if configs else Path(tmp) / "out" / "missing.config"
        if not made.is_file():
            raise TugboatError("ONNX Runtime's ORT converter wrote no .ort file", path=handle.source)
        ort_bytes = made.read_bytes()
        config_text = config.read_bytes() if config.is_file() else b""
        # its header names the converted file: name the exported one, not a temporary path
        config_text = config_text.replace(str(made).encode(), name.encode())
        progress.check()
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(made), opts, providers=["CPUExecutionProvider"])
        outputs = run_onnx(None, inputs, session=sess)
    notes["operators"] = sum(1 for line in config_text.decode().splitlines()
                             if line.strip() and not line.startswith("#"))
    stem = Path(name).stem
    return {name: ort_bytes, f"{stem}.required_operators.config": config_text}, outputs


def _build_pte(handle, name, data, progress, batch, inputs, notes):
    from ..errors import one_line
    from .runtimes import executorch_runtime as et
    from .runtimes import run_batched

    try:
        buffer, lowered = et.lower(handle, batch, data, progress)
    except TugboatError:
        raise
    except Exception as exc:
        raise TugboatError(f"ExecuTorch export failed: {one_line(exc)}", path=handle.source) from None
    notes.update(lowered)
    runner = et.Runner(et.load(bytes(buffer)), batch, lowered, 1)
    return {name: bytes(buffer)}, run_batched(runner, inputs, progress)


def _build_openvino(handle, name, data, progress, batch, inputs, notes):
    import openvino as ov

    from .runtimes import openvino_runtime as ovr
    from .runtimes import run_batched

    with tempfile.TemporaryDirectory(prefix="tugboat-ov-") as tmp:
        xml = Path(tmp) / "model.xml"
        ov.save_model(ovr.convert(handle), xml, compress_to_fp16=False)
        progress.check()
        runner = ovr.Runner(ovr.compile_model(ov.Core().read_model(xml), 1))
        outputs = run_batched(runner, inputs, progress)
        notes.update(runner.notes)
        stem = Path(name).stem
        # the .xml names its weights file: keep the pair's names together
        return {f"{stem}.bin": xml.with_suffix(".bin").read_bytes(), name: xml.read_bytes()}, outputs


_BUILDERS = {"onnx": _build_onnx, "ort": _build_ort, "pte": _build_pte, "openvino": _build_openvino}


def _convert_to_ort(src: Path, out_dir: Path) -> None:
    import contextlib
    import io

    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    out_dir.mkdir()
    import logging

    # the converter prints and logs its progress; the caller reports instead
    quiet = logging.getLogger("ort_format_model.utils")
    old_level = quiet.level
    quiet.setLevel(logging.WARNING)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            convert_onnx_models_to_ort(src, output_dir=out_dir, optimization_styles=[OptimizationStyle.Fixed])
        finally:
            quiet.setLevel(old_level)


def export_target(handle: ModelHandle, kind: str, path: str | os.PathLike, progress: Progress | None = None, *,
                  data=None, batch: int = 1, atol: float | None = None,
                  min_top1: float = 0.9) -> dict[str, Any]:
    """Export ``handle`` for ``kind`` to ``path``, check it and write it; returns the check:
    ``{"files", "runtime", "version", "max_abs_error", "top1_agreement", "samples", ...}``.

    ``batch`` is the fixed batch size of an ExecuTorch program. The check refuses (writes nothing)
    an export whose outputs are not finite, whose max-abs error exceeds ``atol`` (None: 10% of the
    largest output magnitude: other runtimes round int8 and bf16 differently, which is reported,
    not refused) or whose top-1 agreement is under ``min_top1``."""
    progress = progress or null_progress()
    if kind not in TARGETS:
        raise TugboatError(f"unknown export target {kind!r}; valid: {', '.join(TARGETS)}")
    path = Path(path)
    if path.suffix.lower() != TARGETS[kind]:
        path = path.with_name(path.name + TARGETS[kind])
    progress.update(0.05, f"exporting {kind}")
    from .runtime import run_onnx

    inputs = check_inputs(handle, data)
    reference = run_onnx(handle.to_onnx(), inputs)
    files, outputs, notes = cancellable.call(
        lambda: _build(handle, kind, path.name, data, progress.sub(0.05, 0.9), batch, inputs),
        progress, name=f"tugboat-export-{kind}")
    progress.check()
    result = {"kind": kind, **notes, **compare(outputs, reference, handle.task == "classification")}
    scale = max(float(np.max(np.abs(reference[0]))), 1e-6) if reference[0].size else 1.0
    limit = atol if atol is not None else 0.1 * scale
    if not result["max_abs_error"] <= limit:  # NaN fails too
        raise ExportCheckError(f"the {kind} export differs from the variant by {result['max_abs_error']:.3g} "
                               f"(> {limit:.3g}); nothing written", path=str(path))
    if result.get("top1_agreement", 1.0) < min_top1:
        raise ExportCheckError(f"the {kind} export agrees with the variant on only "
                               f"{100 * result['top1_agreement']:.1f}% of top-1 predictions "
                               f"(< {100 * min_top1:.0f}%); nothing written", path=str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fname, content in files.items():  # the main file last: it names the others
        if fname != path.name:
            written.append(atomic_write_bytes(path.with_name(fname), content))
    written.insert(0, atomic_write_bytes(path, files[path.name]))
    fsync_dir(path.parent)
    result["files"] = [str(p) for p in written]
    progress.update(1.0, f"exported {path.name}")
    return result


def describe(result: dict[str, Any]) -> str:
    """One line for the CLI and the window's log."""
    top1 = result.get("top1_agreement")
    agree = f", top-1 agreement {100 * top1:.1f}%" if top1 is not None else ""
    extra = f"; {result['quantized']}" if result.get("quantized") else ""
    return (f"{result['kind']}: {', '.join(Path(f).name for f in result['files'])} reloaded in "
            f"{result['runtime']} {result['version']}: max-abs error {result['max_abs_error']:.3g}"
            f"{agree} on {result['samples']} samples{extra}")


def export_from_folder(folder: str | os.PathLike, variant: str, kind: str, out: str | os.PathLike,
                       progress: Progress | None = None, *, batch: int = 1) -> dict[str, Any]:
    """``tugboat export``: a variant of a workspace or ``tugboat run`` folder (its ONNX artifact),
    exported for ``kind``; checked on the folder's data when it loads, else on random inputs."""
    from ..errors import WorkspaceError
    from ..io.loading import load_model
    from ..stored import inside

    folder = Path(folder)
    report = _folder_report(folder)
    entries = {"baseline": report.get("baseline") or {}}
    entries.update({v.get("name"): v for v in report.get("variants") or [] if isinstance(v, dict)})
    if variant not in entries:
        names = ", ".join(str(n) for n in entries)
        raise WorkspaceError(f"has no variant named {variant!r} (it has: {names})", path=str(folder))
    rel = (entries[variant].get("artifacts") or {}).get("onnx")
    if not rel:
        raise WorkspaceError(f"variant {variant!r} has no model file", path=str(folder))
    base = folder if folder.is_dir() else folder.parent
    artifact = inside(base, rel, what=f"artifact of {variant!r}", file=base)
    if not Path(artifact).is_file():
        raise WorkspaceError(f"the model file of {variant!r} is missing", path=str(artifact))
    handle = load_model(str(artifact))
    data = None
    if report.get("data"):
        from ..io.data import load_data

        try:
            data = load_data(report["data"])
        except Exception:  # the check falls back to random inputs (said in the result)
            data = None
    result = export_target(handle, kind, out, progress, data=data, batch=batch)
    result["checked_on"] = "the folder's data" if data is not None else "random inputs"
    return result


def _folder_report(folder: Path) -> dict[str, Any]:
    from ..running.report_json import read_report
    from ..running.workspace import Workspace

    if Workspace.exists(folder):
        return Workspace.open(folder).report()
    path = folder / "report.json" if folder.is_dir() else folder
    if not path.is_file():
        raise TugboatError("no workspace.json or report.json here", path=str(folder))
    return read_report(path)
