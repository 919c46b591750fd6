"""Exported ONNX declares only the opset domains it uses and says where it came from."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tugboat import __version__
from tugboat.engine.io.export import export_variant, provenance
from tugboat.engine.io.loading import load_model
from tugboat.engine.progress import null_progress
from tugboat.engine.running.info import model_info
from tugboat.ui.model_panel import provenance_text

UNUSED = ("ai.onnx.training", "ai.onnx.preview.training", "com.microsoft", "com.microsoft.nchwc",
          "org.pytorch.aten")


def _linear_with_extra_domains(path) -> None:
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    b = numpy_helper.from_array(np.zeros(4, np.float32), "b")
    nodes = [helper.make_node("MatMul", ["input", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["output"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["n", 4])], [w, b])
    opsets = [helper.make_opsetid("", 17)] + [helper.make_opsetid(d, 1) for d in UNUSED]
    model = helper.make_model(graph, opset_imports=opsets)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def test_export_keeps_used_domains_and_records_provenance(tmp_path):
    src = tmp_path / "in.onnx"
    _linear_with_extra_domains(src)
    handle = load_model(str(src))
    recipe = {"model": str(src), "data": "demo:digits",
              "steps": [{"technique": "quantize", "method": "fp16"}]}
    out = export_variant(tmp_path / "out.onnx", "onnx", null_progress(), handle=handle,
                         recipe={**recipe, "trust": True})  # never written out
    model = onnx.load(str(out))
    assert {op.domain for op in model.opset_import} == {""}  # the five unused domains are gone
    onnx.checker.check_model(model)
    made = provenance(model)
    assert made["tugboat.version"] == __version__
    assert json.loads(made["tugboat.recipe"]) == recipe
    assert json.loads(made["tugboat.inputs"])[0]["name"] == "input"
    assert "demo:digits" in made["tugboat.preprocessing"]
    # reopened in Tugboat: the model panel says where it came from
    info = model_info(str(out))
    text = provenance_text(info["provenance"])
    assert text.startswith(f"Exported by Tugboat {__version__}") and "quantize-fp16" in text
    # a saved variant copied out is cleaned and labelled too
    copied = export_variant(tmp_path / "copy.onnx", "copy", null_progress(), source=src, recipe=recipe)
    assert {op.domain for op in onnx.load(str(copied)).opset_import} == {""}
    assert provenance(onnx.load(str(copied)))["tugboat.version"] == __version__
