"""Method auto keeps the few layers int8 weights hurt most in float, and checks on enough rows (issue 14).

A tiny MatMul network whose first layer has one huge weight per output channel on an input that is always
zero: one int8 scale per channel then rounds every other weight of that layer to a few levels, and the
output is lost, while the other layers quantize as well as weights usually do. ``auto`` (dynamic int8
first, then weight-only int8) must find that layer alone, keep it float32, pass its check, stay about
4x smaller and say so; a user's ``exclude`` wins over the automatic choice.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tugboat.engine.io.data import load_data
from tugboat.engine.io.loading import load_model
from tugboat.engine.progress import null_progress
from tugboat.engine.techniques import quantize

RNG = np.random.default_rng(14)
WIDTHS = [16, 32, 256, 256, 24]  # the first layer: 512 of the 76k weights


def _sensitive_model() -> onnx.ModelProto:
    inits, nodes, x = [], [], "x"
    for k, (n_in, n_out) in enumerate(itertools.pairwise(WIDTHS)):
        w = RNG.normal(size=(n_in, n_out)) / np.sqrt(n_in)
        if k == 0:
            w[0] = 300.0  # the outlier row: input 0 is always 0, so only its int8 scale matters
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"w{k}"))
        out = "y" if k == len(WIDTHS) - 2 else f"h{k}"
        nodes.append(helper.make_node("MatMul", [x, f"w{k}"], [out if out == "y" else f"m{k}"], name=f"mm{k}"))
        if out != "y":
            nodes.append(helper.make_node("Tanh", [f"m{k}"], [out], name=f"act{k}"))
        x = out
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 24])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def sensitive(tmp_path_factory):
    root = tmp_path_factory.mktemp("sensitive")
    onnx.save(_sensitive_model(), str(root / "m.onnx"))
    x = RNG.normal(size=(48, 16)).astype(np.float32)
    x[:, 0] = 0.0
    np.savez(root / "d.npz", x=x)
    handle = load_model(root / "m.onnx")
    return root, handle, load_data(root / "d.npz", handle)


def _quantize(files, **params):
    _, handle, data = files
    return quantize.apply(handle, quantize.TECHNIQUE.defaults("auto") | params, data, null_progress())


def _fidelity(files, q):
    _, handle, data = files
    xs, _ = data.split("test")
    return quantize.fidelity_of(quantize._run(q.onnx_model, [xs["x"]]), quantize._run(handle.onnx_model, [xs["x"]]))


def test_auto_keeps_exactly_the_sensitive_layer_float_and_says_so(sensitive):
    root = sensitive[0]
    q = _quantize(sensitive, method="auto")
    info = q.info["quantize"]
    kept = info["sensitive_float"]
    assert kept["layers"] == ["mm0"] and q.info["kept_float"] == ["mm0"], kept
    assert kept["before"] < kept["after"] and not info["fidelity_check"].get("suggested_exclude")
    check = info["fidelity_check"]
    assert check["value"] >= check["threshold"] and check["rows"] == 38  # 5 val rows + the 33 train rows
    assert info["auto"]["method"] == "weight-only-int8"  # after dynamic int8 fell short
    metric = check["metric"]
    assert _fidelity(sensitive, q)[metric] >= check["threshold"]  # and on the test split, never seen
    ratio = (root / "m.onnx").stat().st_size / len(q.onnx_model.SerializeToString())
    assert ratio >= 3.5, ratio
    assert kept["larger_by"] <= quantize.KEEP_FLOAT_BUDGET and kept["weights_share"] < 0.01, kept
    assert any("mm0" in w and "kept in float" in w for w in q.warnings), q.warnings
    # the float-kept layer's is the only weight left float32 (beside the int8 weights' scales)
    floats = [t.name for t in q.onnx_model.graph.initializer
              if t.data_type == TensorProto.FLOAT and np.prod(t.dims) > 256]
    assert floats == ["w0"], floats


def test_without_the_sensitive_layer_float_the_same_variant_fails_its_check(sensitive):
    """The search is needed: every weight int8 (what auto gave before) loses the output."""
    q = _quantize(sensitive, method="weight-only-int8")
    assert q.info["quantize"]["fidelity_check"]["value"] < q.info["quantize"]["fidelity_check"]["threshold"]
    assert "sensitive_float" not in q.info["quantize"]  # an explicit method is quantized as asked ...
    # ... and its advice names the same one layer, tried
    assert q.info["quantize"]["fidelity_check"]["suggested_exclude"] == ["mm0"]


def test_a_users_exclude_wins_over_the_automatic_choice(sensitive):
    q = _quantize(sensitive, method="auto", exclude=["mm3"])
    info = q.info["quantize"]
    assert "sensitive_float" not in info and "kept_float" not in q.info
    assert any("low fidelity" in w for w in q.warnings), q.warnings  # and the advice says what would help


def test_the_check_reads_train_rows_only_where_the_method_was_not_fitted_to_them(sensitive):
    _, _, data = sensitive
    params = quantize.TECHNIQUE.defaults("static-int8")
    split, rows, extra = quantize.check_rows(data, "weight-only-int8", params)
    assert (split, len(rows), extra) == ("val+train", 38, 33)
    assert not set(rows) & set(data.splits["test"])
    # static int8 calibrates on the train rows: only those it did not calibrate on join the check
    split, rows, extra = quantize.check_rows(data, "static-int8", params | {"calibration_samples": 16})
    assert extra == 33 - 16 and not set(rows) & set(data.splits["calib"][:16])
    assert quantize.check_rows(data, "static-int8", params)[2] == 0  # all 33 calibrated on
    assert quantize.check_rows(data, "qat-int8", params)[2] == 0  # trained on them


def _deep_model(layers: int, sensitive: int) -> onnx.ModelProto:
    """``layers`` MatMul + Tanh layers of width 32; layer ``sensitive`` has the outlier row on a unit the
    layer before it never drives."""
    rng = np.random.default_rng(32)
    inits, nodes, x = [], [], "x"
    for k in range(layers):
        w = rng.normal(size=(32, 32)) * 1.2 / np.sqrt(32)
        if k == sensitive - 1:
            w[:, 0] = 0.0  # unit 0 of this layer's output is tanh(0) = 0 for every input
        if k == sensitive:
            w[0] = 300.0
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"w{k}"))
        nodes += [helper.make_node("MatMul", [x, f"w{k}"], [f"m{k}"], name=f"mm{k}"),
                  helper.make_node("Tanh", [f"m{k}"], [f"h{k}"], name=f"act{k}")]
        x = f"h{k}"
    # [N, 32, 1]: a dense output, compared by cosine (not top-1 agreement of 32 near-tied "classes")
    inits.append(numpy_helper.from_array(np.array([2], np.int64), "axes"))
    nodes.append(helper.make_node("Unsqueeze", [x, "axes"], ["y"], name="unsqueeze"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 32, 1])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_the_search_halves_the_layers_instead_of_running_each(tmp_path):
    """One sensitive layer among 32: found in a couple of runs per halving (log2 32 = 5), not 32."""
    model = _deep_model(32, sensitive=20)
    onnx.save(model, str(tmp_path / "deep.onnx"))
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(48).normal(size=(48, 32)).astype(np.float32))
    handle = load_model(tmp_path / "deep.onnx")
    data = load_data(tmp_path / "d.npz", handle)
    params = quantize.TECHNIQUE.defaults("weight-only-int8")
    check = quantize._check_set(handle, data, model, "weight-only-int8", params)
    q, done = quantize.weight_only_all(model, "weight-only-int8", params, [])
    runs = []

    def redo(extra):
        runs.append(list(extra))
        return quantize.weight_only_all(model, "weight-only-int8", params, extra)[0]

    assert quantize._score(q, check)["low"] and not check.classification
    found = quantize.fewest_float(q, check, redo, done.int8_nodes, null_progress())
    assert found is not None, (runs, quantize._score(redo(["mm20"]), check))
    kept, _, after, losses = found
    assert kept == ["mm20"] and not after["low"] and losses[0][0] == "mm20", (kept, losses[:3])
    assert len(runs) <= 2 * 5 + 2, len(runs)
