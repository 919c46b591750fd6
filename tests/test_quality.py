"""Compression quality on stand-ins for real networks (issue 14, deliverable 7).

The stand-ins (``tests/standins.py``) are trained briefly so their activations look like real
ones: an EfficientNet-like depthwise-separable CNN with squeeze-excite and SiLU, and a BERT-like
encoder with token ids, an attention mask and a mean-pooled sentence embedding. Sizes are of the
artifact ONNX Runtime runs; fidelity is measured on the test split against the float model.
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch

from helpers import FAST
from realmodels import animal_cnn
from standins import build_senet, build_tinybert
from tugboat.engine.io.data import Dataset
from tugboat.engine.measuring.measure import measure
from tugboat.engine.progress import null_progress
from tugboat.engine.techniques import prune as prune_mod
from tugboat.engine.techniques import quantize
from tugboat.engine.techniques.finetune import evaluate


@functools.cache
def _senet():
    with torch.random.fork_rng():
        handle, data = build_senet(epochs=3)
    metrics, outputs = measure(handle, data, FAST)
    return handle, data, metrics, outputs


@functools.cache
def _bert():
    with torch.random.fork_rng():
        handle, data = build_tinybert(epochs=3)
    metrics, outputs = measure(handle, data, FAST)
    return handle, data, metrics, outputs


def _quantize(handle, data, **params):
    method = params.setdefault("method", quantize.TECHNIQUE.default_method)
    full = quantize.TECHNIQUE.defaults(method) | params
    return quantize.apply(handle, full, data, null_progress())


def _measured(base, out):
    _, data, metrics, reference = base
    m, _ = measure(out, data, FAST, reference=reference)
    return metrics["size_bytes"] / m["size_bytes"], m["fidelity"]


def test_model_kind_decides_the_auto_method():
    senet, bert = _senet()[0], _bert()[0]
    assert quantize.model_kind(senet.to_onnx())["kind"] == "conv"
    assert quantize.model_kind(bert.to_onnx())["kind"] == "transformer"
    assert quantize.auto_method(senet.to_onnx())[0] == "static-int8"
    assert quantize.auto_method(bert.to_onnx())[0] == "dynamic-int8"


def test_depthwise_se_cnn_static_int8_agrees_and_is_small():
    base = _senet()
    out = _quantize(base[0], base[1])  # the default: auto -> static int8 for a CNN
    info = out.info["quantize"]
    assert info["auto"]["method"] == "static-int8"
    assert info["calibration"]["method"] in ("percentile", "minmax")
    assert set(info["calibration"]["tried"]) == {"percentile", "minmax"}
    ratio, fid = _measured(base, out)
    assert fid["top1_agreement"] >= 0.95, fid
    assert ratio >= 3.5, ratio
    assert not any("low fidelity" in w for w in out.warnings)
    # the compacted artifact keeps the layers' node names (exclude and the layer view use them)
    names = [n.name for n in out.onnx_model.graph.node if n.op_type == "Conv"]
    assert len(names) == 32 and all(n.startswith(("/stem/", "/blocks/", "/head/")) for n in names)


def test_transformer_default_int8_keeps_the_embedding_and_is_small():
    base = _bert()
    out = _quantize(base[0], base[1])
    assert out.info["quantize"]["auto"]["method"] == "dynamic-int8"
    ops = {n.op_type for n in out.onnx_model.graph.node}
    assert "ConvInteger" not in ops and "MatMulInteger" in ops
    ratio, fid = _measured(base, out)
    assert fid["cosine"] >= 0.99, fid
    assert ratio >= 3.5, ratio


def test_transformer_static_int8_keeps_attention_float():
    base = _bert()
    out = _quantize(base[0], base[1], method="static-int8", calibration="minmax")
    assert "transformer" in out.info["quantize"]["plan"]
    _, fid = _measured(base, out)
    assert fid["cosine"] >= 0.99, fid


def test_forced_bad_static_int8_warns_and_offers_an_exclude_that_works():
    handle, data = _senet()[:2]
    # two channels of the head made 300x larger (the classifier takes them back down), like the
    # outlier channels of real networks: one per-tensor int8 range for the whole activation
    # then rounds every other channel away, and static int8 collapses
    module = copy.deepcopy(handle.module)
    with torch.no_grad():
        module.head[1].weight[:2] *= 300
        module.head[1].bias[:2] *= 300
        module.classifier.weight[:, :2] /= 300
    fragile = handle.derive(module=module)
    out = _quantize(fragile, data, method="static-int8", calibration="minmax")
    check = out.info["quantize"]["fidelity_check"]
    assert check["metric"] == "top1_agreement" and check["value"] < 0.95
    warning = next(w for w in out.warnings if w.startswith("low fidelity"))
    assert "top-1 agreement" in warning and "exclude = [" in warning
    assert "max_accuracy_drop" in warning
    # the offered exclude list was tried, helps, and taking it does what the warning says
    assert check["with_suggested_exclude"] > check["value"] + 0.3
    assert {"head.0", "classifier"} <= set(check["suggested_exclude"])
    again = _quantize(fragile, data, method="static-int8", calibration="minmax",
                      exclude=check["suggested_exclude"])
    assert again.info["quantize"]["fidelity_check"]["value"] == pytest.approx(
        check["with_suggested_exclude"], abs=0.02)


def test_transformer_with_everything_quantized_is_worse_than_the_default():
    base = _bert()
    ops = ["MatMul", "Gemm", "Gather", "Add", "Softmax", "LayerNormalization", "Mul"]  # (no quantizer knows Div)
    every = _quantize(base[0], base[1], method="static-int8", calibration="minmax", op_types=ops)
    default = _quantize(base[0], base[1], method="static-int8", calibration="minmax")
    f_every = every.info["quantize"]["fidelity_check"]["cosine"]
    f_default = default.info["quantize"]["fidelity_check"]["cosine"]
    assert 1 - f_default < 0.2 * (1 - f_every), (f_default, f_every)


def test_calibration_batches_are_equal_and_samples_beyond_the_calib_split_are_used():
    handle, data = _senet()[:2]
    # 100 samples used to end in a batch of 4, which crashed entropy calibration: now 4 x 25
    out = _quantize(handle, data, method="static-int8", calibration="entropy", calibration_samples=100)
    assert out.info["quantize"]["calibration_samples_used"] == 100
    assert quantize.calib_batch(100) == 25 and quantize.calib_batch(97) == 32
    out = _quantize(handle, data, method="static-int8", calibration="entropy", calibration_samples=97)
    assert out.info["quantize"]["calibration_samples_used"] == 96
    assert "whole batches of 32" in out.info["quantize"]["calibration_note"]
    notes: list[str] = []
    calib = quantize._calib_arrays(data, handle, 600, "static-int8", notes)
    assert len(data.splits["calib"]) == 256 and len(calib[0]) == 600 and not notes  # 20 x 30
    small = Dataset(data.ref, {"input": data.inputs["input"][:50]}, data.labels[:50],
                    {"train": np.arange(40), "calib": np.arange(20), "val": np.arange(40, 50),
                     "test": np.arange(40, 50)})
    notes = []
    assert len(quantize._calib_arrays(small, handle, 256, "static-int8", notes)[0]) == 40  # 2 x 20
    assert "the data has 40" in notes[0]


def test_reduce_range_follows_the_cpu():
    assert quantize._reduce_range("on") is True and quantize._reduce_range("off") is False
    assert quantize._reduce_range("auto") is (quantize.cpu_has_vnni() is False)


def test_constant_weights_become_initializers():
    from onnx import helper, numpy_helper

    model = _bert()[0].to_onnx()
    inits = list(model.graph.initializer)
    moved = helper.make_model(helper.make_graph(
        [helper.make_node("Constant", [], [i.name], value=i) for i in inits] + list(model.graph.node),
        "g", model.graph.input, model.graph.output), opset_imports=model.opset_import)
    back = quantize.constants_to_initializers(moved)
    names = {i.name for i in inits}
    assert names <= {i.name for i in back.graph.initializer}
    assert not any(n.op_type == "Constant" for n in back.graph.node)
    moved_back = {i.name: i for i in back.graph.initializer}
    assert np.array_equal(numpy_helper.to_array(moved_back[inits[0].name]), numpy_helper.to_array(inits[0]))
    # and the quantizer sees them: dynamic int8 of the Constant-weight graph quantizes the MatMuls
    q = quantize.dynamic_int8(quantize.constants_to_initializers(moved), {}, [])
    assert sum(n.op_type == "MatMulInteger" for n in q.graph.node) >= 12


@pytest.mark.slow
def test_pruned_half_recovers_within_two_points_in_two_epochs():
    """Issue 14: a 0.5 structured prune of a small CNN on a real 10-class task recovers in 2 epochs.

    The task is Animal-Shape MNIST (a third-party dataset from PyPI: 10,000 silhouettes of ten
    animals, 1,000 each, 2,000 held out for the test), on which the CNN reaches about 96 %.
    ``round_to = 0`` prunes exactly half the channels of every layer (the default's rounding keeps
    more here: 24 -> 16 channels instead of 12), the hard case: it costs 20-70 points before
    fine-tuning. Over seeds 0-4 the defaults (the original as teacher, AdamW at 3e-3 (which the
    ``lr = "auto"`` probe picks here), batch 32,
    gradients clipped to norm 2.5, a cosine schedule, BatchNorm re-estimated) ended within the
    2 points on every seed; docs/techniques/pruning.md has the table."""
    with torch.random.fork_rng():
        handle, data = animal_cnn()
    base = evaluate(handle.module, data, "test", handle.input_names)["accuracy"]
    params = prune_mod.TECHNIQUE.defaults("structured") | {"method": "structured", "ratio": 0.5, "round_to": 0}
    assert params["teacher_weight"] > 0 and params["finetune_epochs"] == 2  # distillation by default
    assert params["batch_size"] == 32 and params["max_grad_norm"] > 0 and params["recalibrate_bn"]
    untuned = prune_mod.apply(handle, {**params, "finetune_epochs": 0}, data, null_progress())
    tuned = prune_mod.apply(handle, params, data, null_progress())
    before = evaluate(untuned.module, data, "test", handle.input_names)["accuracy"]
    after = evaluate(tuned.module, data, "test", handle.input_names)["accuracy"]
    info = tuned.info["pruning"]
    assert info["achieved_param_ratio"] < 0.35
    assert info["batchnorm_recalibrated"] == 2 and info["teacher_weight"] == params["teacher_weight"]
    # lr = "auto": the probe keeps AdamW's 3e-3 for a CNN trained from scratch (what the table measured)
    assert params["lr"] == "auto" and info["lr_chosen_by"] == "probe" and info["lr"] == 3e-3, info["lr_probe"]
    assert base - before > 0.1, (base, before)  # hard enough that pruning costs real accuracy
    assert base - after <= 0.02, (base, before, after)


def test_old_opset_graph_gets_per_channel_static_int8():
    import io
    import warnings

    import onnx

    handle, data = _senet()[:2]
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(handle.module.eval(), (torch.zeros(2, 1, 24, 24),), buf, dynamo=False,
                          opset_version=11, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    old = onnx.load_from_string(buf.getvalue())
    assert quantize.opset_of(old) == 11
    onnx_only = handle.derive(module=None, onnx_model=old)
    # per-channel DequantizeLinear has an axis only from opset 13: ONNX Runtime refused the graph
    out = _quantize(onnx_only, data, method="static-int8", calibration="minmax")
    assert quantize.opset_of(out.onnx_model) >= 13
    assert any(n.op_type == "DequantizeLinear" and any(a.name == "axis" for a in n.attribute)
               for n in out.onnx_model.graph.node)
    assert out.info["quantize"]["fidelity_check"]["value"] >= 0.95


def test_histogram_calibration_on_a_masked_attention_range_says_what_to_do():
    from tugboat.engine.errors import TugboatError

    base = _bert()
    ops = ["MatMul", "Gemm", "Gather", "Add", "Softmax"]  # the mask's most negative float included
    with pytest.raises(TugboatError, match=r"too wide .*minmax"):
        _quantize(base[0], base[1], method="static-int8", calibration="entropy", op_types=ops)
