"""Static int8's file format and size bookkeeping (issue 14: the OCR direction classifier was 3.1x,
not 3.5x, because a QDQ graph of many small convolutions spends a third of its bytes besides the
int8 weights). Tiny models only; the real-model figure is in tests/test_real_models.py."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from standins import IMG, SENet, _train, digits_images
from tugboat.engine.io.data import Dataset, default_splits
from tugboat.engine.io.models import ModelHandle, TensorSpec
from tugboat.engine.progress import null_progress
from tugboat.engine.techniques import quantize
from tugboat.engine.techniques.quant_error import run as run_graph


def _conv_graph() -> onnx.ModelProto:
    """Two convolutions: one stating every default, one with stride 2 and a 5x5 kernel."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((2, 4, 5, 5)).astype(np.float32), "w2")
    n1 = helper.make_node("Conv", ["x", "w1"], ["h"], name="c1", kernel_shape=[3, 3], strides=[1, 1],
                          dilations=[1, 1], pads=[0, 0, 0, 0], group=1, auto_pad="NOTSET")
    n2 = helper.make_node("Conv", ["h", "w2"], ["y"], name="c2", kernel_shape=[5, 5], strides=[2, 2],
                          pads=[1, 1, 1, 1], dilations=[1, 1])
    g = helper.make_graph([n1, n2], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 6, 6])], [w1, w2])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def test_compact_drops_default_conv_attributes_and_computes_the_same():
    model = _conv_graph()
    small = quantize.compact(quantize._copy(model), model)
    attrs = {n.name: {a.name: helper.get_attribute_value(a) for a in n.attribute} for n in small.graph.node}
    assert attrs["c1"] == {}, attrs  # every attribute was a default or the weight's own kernel
    assert attrs["c2"] == {"strides": [2, 2], "pads": [1, 1, 1, 1]}, attrs
    assert len(small.SerializeToString()) < len(model.SerializeToString())
    onnx.checker.check_model(small)
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    np.testing.assert_array_equal(run_graph(small, [x])[0], run_graph(model, [x])[0])


@functools.cache
def _senet():
    """The SENet stand-in at width 8 (27k weights in 30 convolutions, like a small OCR network):
    its QDQ graph's bookkeeping is over a quarter of its int8 weights."""
    x, y = digits_images(seed=0)
    data = Dataset("standin:digits24", {"input": x}, y, default_splits(len(y)))
    torch.manual_seed(0)
    model = SENet(width=8)
    train = data.splits["train"]
    _train(model, [torch.from_numpy(x[train])], torch.from_numpy(y[train]), 2)
    handle = ModelHandle(model, [TensorSpec("input", ("batch", 1, IMG, IMG))], [TensorSpec("logits", ("batch", 10))],
                         source="standin:senet8", format="torch", arch="senet")
    return handle, data


def _static(fmt: str):
    handle, data = _senet()
    params = quantize.TECHNIQUE.defaults("static-int8") | {"method": "static-int8", "format": fmt,
                                                           "calibration": "minmax", "calibration_samples": 64}
    return handle, quantize.apply(handle, params, data, null_progress())


def _ops(model: onnx.ModelProto) -> set[str]:
    return {n.op_type for n in model.graph.node}


@pytest.mark.slow
def test_formats_qdq_qoperator_and_auto_on_a_small_many_layer_cnn():
    handle, qdq = _static("qdq")
    _, qop = _static("qoperator")
    _, auto = _static("auto")
    assert "QLinearConv" not in _ops(qdq.onnx_model) and "DequantizeLinear" in _ops(qdq.onnx_model)
    assert "QLinearConv" in _ops(qop.onnx_model)
    assert qop.info["quantize"]["format"]["format"] == "qoperator"
    # the QDQ graph spends more than a quarter of its int8 weights on bookkeeping, so auto weighs
    # QOperator against it and says what it found
    assert quantize.int8_overhead(qdq.onnx_model, qdq.onnx_model) > quantize.QOPERATOR_MIN_OVERHEAD
    chosen = auto.info["quantize"]["format"]
    sizes, tried = chosen["bytes"], chosen["tried"]
    assert set(sizes) == {"qdq", "qoperator"} and set(tried) == {"qdq", "qoperator"}
    if chosen["format"] == "qoperator":
        assert sizes["qoperator"] < sizes["qdq"]
        assert tried["qoperator"] >= min(tried["qdq"], quantize.MIN_TOP1_AGREEMENT)
        assert "QLinearConv" in _ops(auto.onnx_model)
    else:
        assert "QLinearConv" not in _ops(auto.onnx_model)
    x, _ = _senet()[1].split("test")
    ref = run_graph(handle.to_onnx(), [x["input"]])[0]
    for variant in (qdq, qop, auto):
        fid = quantize.fidelity_of(run_graph(variant.onnx_model, [x["input"]])[0], ref)
        assert fid["top1_agreement"] >= 0.9, (variant.info["quantize"].get("format"), fid)


def test_one_scale_only_where_every_channel_keeps_its_precision():
    """A depthwise 3x3 whose channels' ranges differ 20x keeps per-channel scales; one whose
    channels are alike takes one scale (its bookkeeping is more than its 9 weights a channel)."""
    rng = np.random.default_rng(0)
    alike = rng.uniform(0.5, 1.0, (8, 1, 3, 3)).astype(np.float32) * rng.choice([-1, 1], (8, 1, 3, 3))
    spread = alike * np.linspace(0.05, 1.0, 8, dtype=np.float32)[:, None, None, None]
    nodes, inits = [], []
    for name, w in (("alike", alike), ("spread", spread)):
        inits.append(numpy_helper.from_array(w, f"w_{name}"))
        nodes.append(helper.make_node("Conv", ["x", f"w_{name}"], [f"y_{name}"], name=name, group=8,
                                      pads=[1, 1, 1, 1]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
                          [helper.make_tensor_value_info(f"y_{n}", TensorProto.FLOAT, [1, 8, 6, 6])
                           for n in ("alike", "spread")],
                          inits)
    overrides = quantize.one_scale_layers(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]))
    assert set(overrides) == {"w_alike"}, overrides
