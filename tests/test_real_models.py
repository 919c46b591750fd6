"""The real-model corpus (tools/real_models.py): what it covers, how it is cached, and what Tugboat's
info says about each model (parameters, FLOPs, task kind)."""

from __future__ import annotations

import functools
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
    from tugboat.engine.io.data import load_data
    from tugboat.engine.io.loading import load_model
    from tugboat.engine.measuring.measure import input_shapes, onnx_flops
    from tugboat.engine.running.info import model_info

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
    from tugboat.engine.io.loading import load_model
    from tugboat.engine.techniques import quantize

    rm = real_model("ocr-det")
    model = load_model(rm.model).onnx_model
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    (tmp_path / "work").mkdir()
    quantize._prepared(model, tmp_path / "work")
    assert list(cwd.iterdir()) == []


# --- issue 14's Done-when for quantization: every quantizable corpus model, method "auto" (the default)

# what each model must keep: top-1 agreement for classifiers, mean cosine similarity of the outputs
# otherwise; issue 14 asks at least 3.5x smaller for all of them
QUANT_FIDELITY = {"effnet-lite0-onnx": ("top1_agreement", 0.95), "ocr-cls": ("top1_agreement", 0.95),
                  "minilm-onnx": ("cosine", 0.99), "silero-vad-onnx": ("cosine", 0.99)}
# what method auto picks for each (silero: every weight inside If branches, which static int8 cannot enter)
AUTO_METHOD = {"effnet-lite0-onnx": "static-int8", "ocr-cls": "static-int8", "minilm-onnx": "dynamic-int8",
               "silero-vad-onnx": "weight-only-int8"}
MIN_RATIO = 3.5
# strict: the day they pass, the marks must go (docs/techniques/quantization.md, "Real models")
_QUANT_GAPS = {
    "effnet-lite0-onnx": "auto picks static int8 (its 10-row val check reads 1.000), which keeps top-1 "
                         "agreement 0.948 with GPTQ rounding (0.913 without) on photo crops where the float "
                         "model is unsure (a fifth within 0.1 probability of the runner-up); weight-only "
                         "int8 with GPTQ rounding passes (the test below, docs/real-models.md)",
}


def _held_out(name: str, rm, handle, data):
    """The test split (calibration and the auto choices never see it) and fresh rows made like the
    data file's with another seed, so that top-1 agreement counts more than a dozen images."""
    from tugboat.engine.techniques.quantize import _in_layout

    xs, _ = data.split("test")
    rows = [_in_layout(xs[spec.name], spec) for spec in handle.inputs]  # Silero's state: batch on axis 1
    if name.startswith("effnet"):
        rows = [np.concatenate([rows[0], corpus.imagenet_images(96, 224, seed=1414)])]
    elif name == "ocr-cls":
        rows = [np.concatenate([rows[0], corpus.text_lines(128, 48, 192, seed=1414, flip_every=2)[0]])]
    return rows


def _quant_cases():
    for name, (metric, low) in QUANT_FIDELITY.items():
        marks = [pytest.mark.slow]
        if name in _QUANT_GAPS:
            marks.append(pytest.mark.xfail(reason=_QUANT_GAPS[name], strict=True, raises=AssertionError))
        yield pytest.param(name, metric, low, marks=marks, id=name)


@functools.cache
def _default_int8(name: str):
    """(size ratio, fidelity on held-out rows, decisive-row agreement, the variant's info) of the
    corpus model ``name`` quantized with the defaults (method "auto"); one quantization per model
    for all the tests below."""
    from tugboat.engine.io.data import load_data
    from tugboat.engine.io.loading import load_model
    from tugboat.engine.progress import null_progress
    from tugboat.engine.techniques import quantize

    rm = real_model(name)
    handle = load_model(str(rm.model))
    data = load_data(str(rm.data), handle)
    out = quantize.apply(handle, quantize.TECHNIQUE.defaults("auto") | {"method": "auto"}, data,
                         null_progress())
    float_model, q = handle.to_onnx(), out.onnx_model
    xs = _held_out(name, rm, handle, data)
    y, ref = quantize._run(q, xs), quantize._run(float_model, xs)
    ratio = len(float_model.SerializeToString()) / len(q.SerializeToString())
    return ratio, quantize.fidelity_of(y, ref), _decisive(y, ref), out.info["quantize"], out.warnings


def _decisive(y: np.ndarray, ref: np.ndarray, margin: float = 0.1) -> tuple[float | None, float]:
    """(top-1 agreement on the rows where the float model's softmax top-1 leads by ``margin``, the
    share of such rows)."""
    if ref.ndim != 2 or ref.shape[1] < 2:
        return None, 0.0
    p = np.exp(ref - ref.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    top2 = np.sort(p, 1)[:, -2:]
    keep = top2[:, 1] - top2[:, 0] >= margin
    return (float(np.mean(y.argmax(1)[keep] == ref.argmax(1)[keep])) if keep.any() else None), float(keep.mean())


@pytest.mark.parametrize(("name", "metric", "low"), list(_quant_cases()))
def test_default_int8_is_3_5x_smaller_and_keeps_fidelity(name, metric, low):
    ratio, fid, _, info, warnings = _default_int8(name)
    assert info["auto"]["method"] == AUTO_METHOD[name], info["auto"]
    # what the variant says about itself is measured with the same metric
    assert info["fidelity_check"]["metric"] == metric
    assert fid[metric] >= low, (fid, ratio, warnings)
    assert ratio >= MIN_RATIO, (ratio, fid)


# what holds today where the Done-when above does not (so that these models cannot get worse unseen)

@pytest.mark.slow
def test_efficientnet_default_int8_changes_no_decision_the_float_model_is_sure_of():
    ratio, fid, (decisive, share), _, _ = _default_int8("effnet-lite0-onnx")
    assert ratio >= MIN_RATIO
    assert share >= 0.4 and decisive >= 0.98, (decisive, share, fid)
    assert fid["top1_agreement"] >= 0.85 and fid["cosine"] >= 0.98, fid  # measured 0.896 and 0.989


@pytest.mark.slow
def test_efficientnet_weight_only_int8_with_gptq_rounding_is_3_5x_smaller_at_0_95_agreement():
    """Issue 14's bar for EfficientNet-Lite0, met by method weight-only-int8 with its default rounding
    (GPTQ on the calibration rows): 0.965 on the 115 held-out rows, 0.922 with nearest rounding."""
    from tugboat.engine.io.data import load_data
    from tugboat.engine.io.loading import load_model
    from tugboat.engine.progress import null_progress
    from tugboat.engine.techniques import quantize

    rm = real_model("effnet-lite0-onnx")
    handle = load_model(str(rm.model))
    data = load_data(str(rm.data), handle)
    out = quantize.apply(handle, {"method": "weight-only-int8"}, data, null_progress())
    info = out.info["quantize"]
    assert info["rounding"]["method"] == "gptq" and info["rounding"]["layers"] == 50, info["rounding"]
    float_model, q = handle.to_onnx(), out.onnx_model
    xs = _held_out("effnet-lite0-onnx", rm, handle, data)
    fid = quantize.fidelity_of(quantize._run(q, xs), quantize._run(float_model, xs))
    assert fid["top1_agreement"] >= 0.95 and fid["cosine"] >= 0.999, fid  # measured 0.965, 0.9994
    assert len(float_model.SerializeToString()) / len(q.SerializeToString()) >= MIN_RATIO


@pytest.mark.slow
def test_ocr_classifier_default_int8_is_written_as_qoperator_and_agrees():
    ratio, fid, _, info, _ = _default_int8("ocr-cls")
    # 53 small convolutions: the QDQ graph's bookkeeping is ~0.45 of its int8 weights (3.1x)
    assert info["format"]["format"] == "qoperator", info.get("format")
    assert info["format"]["bytes"]["qoperator"] < 0.9 * info["format"]["bytes"]["qdq"], info["format"]
    assert fid["top1_agreement"] >= 0.98, fid
    assert ratio >= 3.5, ratio  # 2.7x before its per-channel bookkeeping was cut, 3.1x before QOperator


def test_the_animal_dataset_is_read_as_arrays_only():
    """Animal-Shape MNIST ships gzipped pickles: they are read with an unpickler that builds numpy
    arrays and refuses anything else a pickle could call."""
    import io
    import os
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    with pytest.raises(pickle.UnpicklingError, match="not part of a numpy array"):
        corpus._ArraysOnly(io.BytesIO(pickle.dumps(Evil()))).load()
    arr = np.arange(6, dtype=np.int64).reshape(2, 3)
    assert np.array_equal(corpus._ArraysOnly(io.BytesIO(pickle.dumps(arr))).load(), arr)
    try:
        x, y = corpus.animal_shapes()
    except corpus.PackageMissingError as exc:
        pytest.skip(str(exc))
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [1000] * 10 and x.max() == 255


@pytest.mark.slow
def test_ocr_recogniser_weight_only_finds_its_one_sensitive_convolution():
    """Weight-only int8 of the OCR recogniser (every weight int8) reads cosine 0.976 on its check rows
    and 0.944 on the test split: one 145-weight convolution, p2o.Conv.1, does it. The search finds that
    one layer (what method auto then keeps float, after static int8 fails its check: about a minute and
    a half on this machine, so not run here), and keeping it float gives >= 3.5x at cosine >= 0.99 on
    the test split, which neither the check nor the search ever read."""
    from tugboat.engine.io.data import load_data
    from tugboat.engine.io.loading import load_model
    from tugboat.engine.progress import null_progress
    from tugboat.engine.techniques import quantize

    rm = real_model("ocr-rec")
    handle = load_model(str(rm.model))
    data = load_data(str(rm.data), handle)
    nearest = {"method": "weight-only-int8", "rounding": "nearest"}
    q = quantize.apply(handle, nearest, data, null_progress())
    check = q.info["quantize"]["fidelity_check"]
    assert check["value"] < 0.99 and check["suggested_exclude"] == ["p2o.Conv.1"], check
    kept = quantize.apply(handle, {**nearest, "exclude": ["p2o.Conv.1"]}, data, null_progress())
    assert kept.info["quantize"]["fidelity_check"]["value"] >= 0.99
    xs = _held_out("ocr-rec", rm, handle, data)
    ref = quantize._run(handle.to_onnx(), xs)
    fid = quantize.fidelity_of(quantize._run(kept.onnx_model, xs), ref)
    ratio = len(handle.to_onnx().SerializeToString()) / len(kept.onnx_model.SerializeToString())
    assert fid["cosine"] >= 0.99 and ratio >= MIN_RATIO, (fid, ratio)
    # with GPTQ rounding (the default) no layer needs to stay float: 0.9995 on the test split, 3.77x
    gptq = quantize.apply(handle, {"method": "weight-only-int8"}, data, null_progress())
    assert gptq.info["quantize"]["rounding"]["method"] == "gptq" and "float_layers" not in gptq.info["quantize"]
    fid = quantize.fidelity_of(quantize._run(gptq.onnx_model, xs), ref)
    ratio = len(handle.to_onnx().SerializeToString()) / len(gptq.onnx_model.SerializeToString())
    assert fid["cosine"] >= 0.99 and ratio >= MIN_RATIO, (fid, ratio)
