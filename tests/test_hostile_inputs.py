"""Hostile model and data inputs beyond the corpus files (issue 15): metadata that is valid must
still load, custom-operator checks must not reject what ONNX Runtime can run, size checks happen
before any allocation, and special files never hang a reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tugboat.engine.errors import ModelLoadError
from tugboat.engine.models import load_model, validate_meta

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "corpus"


# --- model metadata -------------------------------------------------------------------------

def test_valid_metadata_round_trips_through_the_one_schema():
    meta = {"inputs": [{"name": "ids", "shape": ["batch", 12], "dtype": "int64"}],
            "outputs": [{"name": "y", "shape": ["batch", None, 3]}], "task": "embedding", "arch": "x",
            "arch_kwargs": {"hidden": 8}, "unknown_future_key": {"kept": False}}
    clean = validate_meta(meta, "m.pt")
    assert clean["inputs"][0] == {"name": "ids", "shape": ["batch", 12], "dtype": "int64"}
    assert clean["outputs"][0]["dtype"] == "float32"
    assert "unknown_future_key" not in clean


@pytest.mark.parametrize("meta, field", [
    ({"inputs": [{"name": "x", "shape": [True]}]}, "inputs[0]"),
    ({"inputs": [{"name": "x", "shape": [-3]}]}, "inputs[0]"),
    ({"inputs": [{"name": "x", "shape": [1]}, {"name": "x", "shape": [1]}]}, "inputs"),
    ({"outputs": [{"name": "y", "shape": [1], "dtype": "Tensor"}]}, "outputs[0]"),
    ({"arch_kwargs": {"__class__": 1}}, "arch_kwargs"),
    ({"arch_kwargs": {"hidden": "8"}}, "arch_kwargs"),
    ({"arch": ""}, "arch"),
])
def test_each_malformed_field_is_named(meta, field):
    with pytest.raises(ModelLoadError) as err:
        validate_meta(meta, "model.pt")
    assert f"'{field}'" in str(err.value) and str(err.value).startswith("model.pt: ")


def test_state_dict_with_arch_kwargs_in_its_metadata_loads():
    handle = load_model(CORPUS / "good" / "mlp_h8_state_dict.pt")
    assert handle.arch == "digits-mlp"
    assert handle.module.net[1].out_features == 8


def test_torchscript_metadata_written_by_tugboat_still_loads(tmp_path, demo_models):
    from tugboat.engine.models import save_torchscript

    path = save_torchscript(demo_models("digits-mlp"), tmp_path / "m.pt")
    handle = load_model(path)
    assert handle.inputs[0].name == "input" and handle.outputs[0].shape == ("batch", 10)


# --- custom operator domains ------------------------------------------------------------------

def _function_model(tmp_path: Path) -> Path:
    fn = helper.make_function("my.funcs", "Twice", ["x"], ["y"],
                              [helper.make_node("Add", ["x", "x"], ["y"])], [helper.make_opsetid("", 17)])
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4])
    graph = helper.make_graph([helper.make_node("Twice", ["input"], ["output"], domain="my.funcs")], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.funcs", 1)],
                              functions=[fn])
    model.ir_version = 8
    path = tmp_path / "fn.onnx"
    onnx.save(model, str(path))
    return path


def test_a_used_local_function_with_clean_body_still_loads_and_runs(tmp_path):
    import onnxruntime as ort

    path = _function_model(tmp_path)
    handle = load_model(path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.ones((2, 4), np.float32)
    assert np.allclose(sess.run(None, {"input": x})[0], 2 * x)
    assert handle.onnx_model is not None


def test_cli_info_refuses_the_bypass_with_exit_2(capsys):
    from tugboat import cli

    rc = cli.main(["info", str(CORPUS / "models" / "custom_domain_unused_function.onnx")])
    err = capsys.readouterr().err
    assert rc == 2 and "evil.ops" in err and "Detonate" in err
