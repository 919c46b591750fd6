"""The real-model corpus (tools/real_models.py): what it covers, how it is cached, and what Tugboat's
info says about each model (parameters, FLOPs, task kind)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from realmodels import NAMES, corpus, real_model

REQUIRED = {"depthwise-se", "bert", "int64-ids", "dynamic-seq", "recurrent", "control-flow", "non-classification",
            "constant-weights", "onnx", "torchscript", "pt2", "state_dict", "hf"}


def test_corpus_covers_what_issue_14_asks_for():
    cov = corpus.coverage()
    assert set(cov) >= REQUIRED, f"nothing covers {REQUIRED - set(cov)}"
    assert len({e.package for e in corpus.ENTRIES.values()}) >= 4
    assert len(NAMES) >= 6
    for e in corpus.ENTRIES.values():
        assert e.install_command.startswith("pip install") and e.package in e.install_command


def test_ensure_is_idempotent_and_safe_when_racing(tmp_path, monkeypatch):
    if corpus.missing("ocr-cls"):
        pytest.skip(corpus.ENTRIES["ocr-cls"].install_command)
    monkeypatch.setenv("TUGBOAT_REAL_MODELS", str(tmp_path / "cache"))
    results, errors = [], []

    def work():
        try:
            results.append(corpus.materialise("ocr-cls"))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({r.model for r in results}) == 1
    folders = [p.name for p in (tmp_path / "cache").iterdir()]
    assert len(folders) == 1 and not folders[0].startswith("."), folders  # no temporary folder left behind
    first = results[0]
    stamp = first.model.stat().st_mtime_ns
    again = corpus.materialise("ocr-cls")
    assert again.model == first.model and again.model.stat().st_mtime_ns == stamp  # not rebuilt
    with np.load(first.data) as z:
        assert z["x"].shape[1:] == (3, 48, 192) and set(np.unique(z["labels"])) == {0, 1}


def test_missing_package_names_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "silero_vad" else real(name, *a))
    with pytest.raises(corpus.PackageMissingError, match="pip install silero-vad"):
        corpus.materialise("silero-vad-onnx")


_BIG = {"minilm-hf", "minilm-onnx"}  # 90 MB each: deflating them for the size metric takes seconds


def _cases():
    for name in NAMES:
        marks = []
        if name in _BIG:
            marks.append(pytest.mark.slow)
        yield pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", list(_cases()))
def test_info_on_every_real_model_shows_params_flops_and_task(name):
    from tugboat.engine.data import load_data
    from tugboat.engine.info import model_info
    from tugboat.engine.measure import input_shapes, onnx_flops
    from tugboat.engine.models import load_model

    rm = real_model(name)
    trusted = bool(rm.arch and ":" in rm.arch)  # the architecture file is the corpus tool's own code
    if name in _BIG:  # what info computes, without deflating 90 MB for the size metric
        handle = load_model(rm.model, arch=rm.arch, trust=trusted)
        load_data(rm.data, handle)
        flops, rows = onnx_flops(handle.to_onnx(), input_shapes=input_shapes(handle))
        info = {"params": handle.param_count()[0], "task": handle.task, "flops": flops, "layers": rows,
                "outputs": [s.to_dict() for s in handle.outputs]}
    else:
        info = model_info(str(rm.model), arch=rm.arch, data=str(rm.data), trust=trusted)
    assert info["params"] > 0
    assert info["task"] == rm.entry.task, (info["task"], info["outputs"])
    assert info["flops"] > 0  # at the data's sizes (and, for Silero, the branch its 16 kHz samples take)
    assert all(r["flops"] >= 0 for r in info["layers"])


def test_quantizing_leaves_no_files_in_the_working_folder(tmp_path, monkeypatch):
    """ONNX Runtime's symbolic shape inference dumps a model and its external data (uuid.data) into the
    current folder when it cannot infer every shape (it cannot on the OCR text detector)."""
    from tugboat.engine import quantize
    from tugboat.engine.models import load_model

    rm = real_model("ocr-det")
    model = load_model(rm.model).onnx_model
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    (tmp_path / "work").mkdir()
    quantize._prepared(model, tmp_path / "work")
    assert list(cwd.iterdir()) == []
