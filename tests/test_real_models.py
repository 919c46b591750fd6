"""The real-model corpus (tools/real_models.py): what it covers, how it is cached, and what Tugboat's
info says about each model (parameters, FLOPs, task kind)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from realmodels import NAMES, corpus

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
