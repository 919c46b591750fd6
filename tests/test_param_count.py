"""One parameter count: quantization scales and zero points are not parameters, packed 4-bit weights
count as weights, and the torch module and its ONNX artifact agree."""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tugboat.engine.io.onnx_graph import onnx_param_count


def _qdq_matmul(per_channel: int = 4) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(16, dtype=np.int8).reshape(4, 4) - 3, "w_q")
    scale = numpy_helper.from_array(np.full(per_channel, 0.1, np.float32), "w_scale")
    zero = numpy_helper.from_array(np.zeros(per_channel, np.int8), "w_zero")
    bias = numpy_helper.from_array(np.ones(4, np.float32), "bias")
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"], axis=1),
             helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Add", ["h", "bias"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
                              [w, scale, zero, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model)
    return model


def test_scales_and_zero_points_are_not_parameters():
    params, nonzero = onnx_param_count(_qdq_matmul())
    assert params == 16 + 4  # the weight and the bias; not the 4 scales and 4 zero points
    assert nonzero == 15 + 4  # one weight is zero


def test_packed_int4_weights_count_as_weights():
    k, n, block = 32, 4, 16
    packed = numpy_helper.from_array(np.full((n, k // block, block // 2), 0x11, np.uint8), "b")
    scales = numpy_helper.from_array(np.full(n * k // block, 0.1, np.float32), "scales")
    node = helper.make_node("MatMulNBits", ["x", "b", "scales"], ["y"], domain="com.microsoft",
                            K=k, N=n, bits=4, block_size=block)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])], [packed, scales])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    assert onnx_param_count(model) == (k * n, k * n)


def test_layers_of_a_quantized_onnx_model_have_their_parameters(tmp_path):
    from tugboat.engine.io.loading import load_model
    from tugboat.engine.measuring.measure import layer_table

    path = tmp_path / "qdq.onnx"
    onnx.save(_qdq_matmul(), str(path))
    handle = load_model(str(path))
    rows = layer_table(handle)
    # the weight was 0 behind DequantizeLinear; the bias has its row (this graph names no layers)
    assert [(r["type"], r["params"]) for r in rows] == [("MatMul", 16), ("Add", 4)]
    assert handle.param_count()[0] == 20 == sum(r["params"] for r in rows)


def _variant(handle, data, **step):
    from tugboat.engine.progress import null_progress
    from tugboat.engine.running.recipe import validate_steps
    from tugboat.engine.running.runner import apply_steps

    return apply_steps(handle, validate_steps([step]), data, null_progress())


def test_a_float_model_and_its_variants_count_the_deployed_artifact(demo_models, demo_data):
    from tugboat.engine.measuring.measure import layer_table

    handle = demo_models("digits-cnn")
    params, nonzero = handle.param_count()
    # the artifact: BatchNorm folded into the convolutions (the torch module holds 448 more)
    assert (params, nonzero) == onnx_param_count(handle.to_onnx())
    assert params == sum(p.numel() for p in handle.module.parameters()) - 448
    for method in ("static-int8", "dynamic-int8", "fp16"):
        # no scale, zero point or scale product (dynamic int8 multiplies the weights' scales with the
        # activations' at run time) counts: the same parameters as the float original
        q = _variant(handle, demo_data, technique="quantize", method=method)
        assert q.module is None and q.param_count()[0] == params, method
        assert sum(r["params"] for r in layer_table(q)) == params, method  # the Layers view adds up
    structured = _variant(handle, demo_data, technique="prune", method="structured", ratio=0.5, finetune_epochs=0)
    assert structured.param_count()[0] < 0.5 * params
    sparse = _variant(handle, demo_data, technique="prune", method="unstructured", ratio=0.5, finetune_epochs=0)
    sparse_params, sparse_nonzero = sparse.param_count()
    assert sparse_params == params and sparse_nonzero < 0.6 * nonzero


def test_a_torch_model_is_exported_once_and_again_when_its_weights_change(demo_data, monkeypatch):
    import torch

    from helpers import FAST
    from tugboat.engine.io import models
    from tugboat.engine.io.loading import load_model
    from tugboat.engine.measuring.measure import measure

    calls = []
    real = models.export_onnx_model
    monkeypatch.setattr(models, "export_onnx_model", lambda h: calls.append(1) or real(h))
    handle = load_model("demo:digits-mlp")
    handle.module = copy.deepcopy(handle.module)  # edited below: never the zoo's own module
    metrics, _ = measure(handle, demo_data, FAST)  # counts, times and runs the one export
    assert len(calls) == 1 and metrics["params"] == handle.param_count()[0] == metrics["nonzero_params"]
    with torch.no_grad():
        handle.module.net[1].weight[:10].zero_()  # an in-place edit: the cached graph is stale
    params, nonzero = handle.param_count()
    assert len(calls) == 2 and params == metrics["params"]
    assert nonzero == params - 10 * handle.module.net[1].weight.shape[1]


def test_run_summary_report_json_and_tugboat_report_print_the_same_count(tmp_path, capsys, demo_models):
    import json

    from tugboat.cli import main
    from tugboat.engine.formatting import fmt_count as _fmt_count

    recipe = tmp_path / "q.toml"
    recipe.write_text('model = "demo:digits-cnn"\ndata = "demo:digits"\n'
                      '[[steps]]\ntechnique = "quantize"\nmethod = "dynamic-int8"\n'
                      "[measure]\nbatch = 16\nthreads = 1\nmin_runs = 3\nmin_seconds = 0.0\nwarmup = 1\n")
    out = tmp_path / "out"
    assert main(["run", str(recipe), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    expected = demo_models("digits-cnn").param_count()[0]
    (variant,) = report["variants"]
    assert report["baseline"]["metrics"]["params"] == variant["metrics"]["params"] == expected
    assert onnx_param_count(onnx.load(str(out / variant["artifacts"]["onnx"])))[0] == expected
    assert main(["report", str(out)]) == 0
    reported = capsys.readouterr().out

    def shown(text: str, name: str) -> list[str]:  # name, size and deflated (value unit), params
        return [line.split()[5] for line in text.splitlines() if line.split()[:1] == [name]]

    for text in (printed, reported):
        assert shown(text, "baseline") == shown(text, variant["name"]) == [_fmt_count(expected)]
