"""One parameter count: quantization scales and zero points are not parameters, packed 4-bit weights
count as weights, and the torch module and its ONNX artifact agree."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tugboat.engine.models import onnx_param_count


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
    from tugboat.engine.measure import layer_table
    from tugboat.engine.models import load_model

    path = tmp_path / "qdq.onnx"
    onnx.save(_qdq_matmul(), str(path))
    handle = load_model(str(path))
    rows = layer_table(handle)
    # the weight was 0 behind DequantizeLinear; the bias has its row (this graph names no layers)
    assert [(r["type"], r["params"]) for r in rows] == [("MatMul", 16), ("Add", 4)]
    assert handle.param_count()[0] == 20 == sum(r["params"] for r in rows)
