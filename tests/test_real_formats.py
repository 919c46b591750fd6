"""Every corpus model in every format (issue 14, "Done when"): every torch-loadable one prunes
structured at 0.25 and its exported ONNX passes onnx.checker and runs in ONNX Runtime at another
batch; a model that cannot become a torch module says why in the panels and still quantizes in ONNX
Runtime; a file Tugboat exports reopens and compresses again. (info's parameters and task kind for
every model: tests/test_real_models.py.)

Slow: each model is loaded (converted) once per session and shared by the tests here."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from realmodels import NAMES, real_model

pytestmark = pytest.mark.slow

# formats Tugboat runs in ONNX Runtime only, and the reason it gives. Silero's ONNX file branches on the
# *value* of its sample-rate input (If nodes holding the weights): no torch graph can take both branches
_ONNX_ONLY = {"silero-vad-onnx": "'If'"}
# strict: the day these work, the marks must go
_GAPS: dict[str, str] = {}  # none left (the OCR recogniser's batch-bound Softmax reshape is fixed)

@functools.cache
def _loaded(name: str):
    from tugboat.engine.io.data import load_data
    from tugboat.engine.io.loading import load_model

    rm = real_model(name)
    trusted = bool(rm.arch and ":" in rm.arch)  # the architecture file is the corpus tool's own code
    handle = load_model(rm.model, arch=rm.arch, trust=trusted)
    data = load_data(rm.data, handle)
    return handle, data


def _few(data, handle, n: int) -> list[np.ndarray]:
    """``n`` test samples in the model's layout (a recurrent state is stored sample-first)."""
    xs, _ = data.split("test")
    return [spec.to_model(np.asarray(xs[spec.name][:n])) for spec in handle.inputs]


def _prunes_and_exports(handle, data, name: str):
    from tugboat.engine.io.export import check_onnx
    from tugboat.engine.io.models import export_onnx_model
    from tugboat.engine.measuring.runtime import run_onnx
    from tugboat.engine.progress import null_progress
    from tugboat.engine.techniques import prune

    pruned = prune.apply(handle, {"method": "structured", "ratio": 0.25, "finetune_epochs": 0, "batch_size": 8},
                         data, null_progress())
    info = pruned.info["pruning"]
    assert info["params_after"] < 0.9 * info["params_before"], info
    model = export_onnx_model(pruned)
    check_onnx(model, name)
    feeds = _few(data, handle, 5)  # not the export's example batch of 2
    out = run_onnx(model, feeds)[0]
    assert out.shape == (5, *run_onnx(handle.to_onnx(), feeds)[0].shape[1:])
    assert np.isfinite(out).all()
    return pruned


def _cases():
    for name in NAMES:
        if name in _GAPS:
            yield pytest.param(name, marks=pytest.mark.xfail(reason=_GAPS[name], strict=True), id=name)
        elif name not in _ONNX_ONLY:
            yield pytest.param(name, id=name)


@pytest.mark.parametrize("name", list(_cases()))
def test_every_torch_loadable_corpus_model_prunes_and_exports_a_checked_onnx(name):
    handle, data = _loaded(name)
    assert handle.module is not None, handle.conversion_error
    _prunes_and_exports(handle, data, name)


@pytest.mark.parametrize("name", list(_ONNX_ONLY))
def test_an_onnx_only_corpus_model_says_why_and_still_quantizes(name):
    from tugboat.engine.measuring.runtime import run_onnx
    from tugboat.engine.progress import null_progress
    from tugboat.engine.running.capabilities import capabilities
    from tugboat.engine.techniques import quantize

    handle, data = _loaded(name)
    assert handle.module is None and _ONNX_ONLY[name] in handle.conversion_error
    caps = capabilities(handle, data)
    assert all(_ONNX_ONLY[name] in why for why in caps["prune"].values())
    assert caps["distill"]  # the panel exists; a teacher needs no torch module
    q = quantize.apply(handle, {"method": "dynamic-int8"}, data, null_progress())
    feeds = _few(data, handle, 4)
    out, ref = run_onnx(q.to_onnx(), feeds)[0], run_onnx(handle.to_onnx(), feeds)[0]
    assert out.shape == ref.shape and np.isfinite(out).all()


@pytest.mark.parametrize("name,save,pruned", [("silero-vad-jit", "save_torchscript", True),
                                               ("silero-vad-jit", "save_exported", True),
                                               ("ocr-cls", "save_exported", False),
                                               ("minilm-hf", "save_exported", False)])
def test_a_corpus_model_saved_as_a_torch_file_reopens_and_compresses_again(name, save, pruned, tmp_path):
    """Converted graphs (onnx2torch) keep shape arithmetic as tensors, which torch.export could not
    follow and a TorchScript trace baked to the example batch (engine/io/batch_shapes.py)."""
    from tugboat.engine.io import loading
    from tugboat.engine.io.data import load_data

    handle, data = _loaded(name)
    model = _prunes_and_exports(handle, data, name) if pruned else handle
    path = getattr(loading, save)(model, tmp_path / ("again.pt2" if save == "save_exported" else "again.pt"))
    reopened = loading.load_model(path)
    again = load_data(data.ref, reopened)
    assert reopened.module is not None, reopened.conversion_error
    with torch.no_grad():
        xs = [torch.from_numpy(x) for x in _few(data, handle, 3)]
        np.testing.assert_allclose(reopened.module(*xs).numpy(), model.module(*xs).numpy(), rtol=1e-3, atol=1e-4)
    _prunes_and_exports(reopened, again, f"{name} reopened")
