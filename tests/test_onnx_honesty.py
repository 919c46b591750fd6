"""ONNX honesty (issue 14): parameters over initializers, Constant nodes and subgraphs; FLOPs that are
never negative and count LSTM/GRU, attention and the data's sizes; the task told from the outputs;
shapes and names taken from the data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tugboat.engine.errors import DataError, RecipeError
from tugboat.engine.io.data import load_data
from tugboat.engine.io.loading import load_model
from tugboat.engine.io.models import TensorSpec
from tugboat.engine.io.onnx_graph import onnx_param_count
from tugboat.engine.io.tasks import infer_task
from tugboat.engine.measuring.measure import onnx_flops
from tugboat.engine.progress import null_progress
from tugboat.engine.running.info import model_info
from tugboat.engine.running.recipe import parse_recipe

ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)


def _const(name, arr):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(arr, name + "_v"))


def _save(graph, path, opset=17):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return model


def _conv_net_with_constant_weights(path, dynamic=True):
    """Conv (weights as Constant nodes) -> GlobalAveragePool -> Flatten -> MatMul: [N, 3, H, W] -> [N, 5]."""
    w = RNG.normal(size=(8, 3, 3, 3)).astype(np.float32)
    fc = RNG.normal(size=(8, 5)).astype(np.float32)
    nodes = [_const("w", w), _const("fc", fc), _const("shape_c", np.array([0, -1], np.int64)),
             helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c"], ["g"]),
             helper.make_node("Reshape", ["g", "shape_c"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["logits"])]
    dims = [-1, 3, "h", "w"] if dynamic else ["n", 3, 16, 16]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [-1 if dynamic else "n", 5])
    return _save(helper.make_graph(nodes, "constnet", [x], [y]), path), w.size + fc.size


def test_params_count_constant_nodes_and_subgraphs_once(tmp_path):
    model, expected = _conv_net_with_constant_weights(tmp_path / "c.onnx")
    assert onnx_param_count(model)[0] == expected  # the int64 reshape constant is not a weight
    # an If whose branches hold their own weights (as Constant nodes and as a subgraph initializer)
    a = RNG.normal(size=(4, 4)).astype(np.float32)
    b = RNG.normal(size=(4, 4)).astype(np.float32)
    then_g = helper.make_graph([_const("wa", a), helper.make_node("MatMul", ["x", "wa"], ["ya"])], "then", [],
                              [helper.make_tensor_value_info("ya", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("MatMul", ["x", "wb"], ["yb"])], "else", [],
                              [helper.make_tensor_value_info("yb", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(b, "wb")])
    shared = RNG.normal(size=(4, 4)).astype(np.float32)
    nodes = [helper.make_node("If", ["cond"], ["y0"], then_branch=then_g, else_branch=else_g),
             helper.make_node("MatMul", ["y0", "shared"], ["y"])]
    graph = helper.make_graph(nodes, "ifnet",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
                               helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                              initializer=[numpy_helper.from_array(shared, "shared")])
    model = _save(graph, tmp_path / "if.onnx")
    params, nonzero = onnx_param_count(model)
    assert params == a.size + b.size + shared.size and nonzero == params
    info = model_info(str(tmp_path / "if.onnx"))
    assert info["params"] == params
    assert info["flops"] == 2 * 2 * 4 * 4 * 2  # the shared MatMul + the larger branch (only one runs)


def test_flops_never_negative_and_counted_at_the_data_sizes(tmp_path):
    path = tmp_path / "c.onnx"
    model, _ = _conv_net_with_constant_weights(path)  # batch dim -1 (not symbolic) and open H, W
    flops, _ = onnx_flops(model)
    assert flops >= 0
    info = model_info(str(path))
    assert info["params"] > 0 and info["flops"] is None
    assert any("FLOPs need the sizes" in w for w in info["warnings"])
    data = tmp_path / "d.npz"
    np.savez(data, images=RNG.normal(size=(6, 3, 20, 24)).astype(np.float32))  # any name: single input
    info = model_info(str(path), data=str(data))
    conv = 2 * 20 * 24 * 8 * 3 * 3 * 3
    assert info["flops"] == conv + 2 * 8 * 5
    assert info["task"] == "classification"


def test_flops_of_lstm_gru_and_attention():
    seq, batch, inp, hidden = 7, 1, 10, 16
    nodes = [helper.make_node("LSTM", ["x", "W", "R"], ["y", "yh"], hidden_size=hidden),
             helper.make_node("GRU", ["x", "Wg", "Rg"], ["yg", "ygh"], hidden_size=hidden, direction="bidirectional")]
    inits = [numpy_helper.from_array(RNG.normal(size=s).astype(np.float32), n) for n, s in
             [("W", (1, 4 * hidden, inp)), ("R", (1, 4 * hidden, hidden)),
              ("Wg", (2, 3 * hidden, inp)), ("Rg", (2, 3 * hidden, hidden))]]
    graph = helper.make_graph(nodes, "rnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [seq, "b", inp])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("yg", TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    flops, rows = onnx_flops(model, batch=batch)
    lstm = 2 * seq * batch * 4 * hidden * (inp + hidden)
    gru = 2 * seq * batch * 2 * 3 * hidden * (inp + hidden)
    assert {r["type"]: r["flops"] for r in rows} == {"LSTM": lstm, "GRU": gru}
    assert flops == lstm + gru
    # attention: softmax(Q K^T) V with both MatMuls between activations
    t, d = 5, 8
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["s"]), helper.make_node("Softmax", ["s"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["o"])]
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", "t", d]) for n in "qkv"]
    graph = helper.make_graph(nodes, "attn", ins, [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    flops, _ = onnx_flops(model, input_shapes={n: (1, t, d) for n in "qkv"})
    assert flops == 2 * t * t * d + 3 * t * t + 2 * t * d * t


def test_flops_never_negative_over_the_broken_input_corpus():
    files = sorted((ROOT / "tests" / "corpus").rglob("*.onnx"))
    assert files
    for f in files:
        try:
            model = onnx.load(str(f))
        except Exception:
            continue  # unreadable files are the point of some corpus entries
        try:
            flops, rows = onnx_flops(model)
        except Exception:
            continue
        assert flops >= 0 and all(r["flops"] >= 0 for r in rows), f.name


@pytest.mark.parametrize(("shape", "name", "labels", "task"), [
    (("batch", 10), "logits", None, "classification"),
    (("batch", 384), "sentence_embedding", None, "embedding"),
    (("batch", 384), "pooler_output", np.array([0, 1]), "classification"),
    (("batch", 1), "output", None, "regression"),
    (("batch",), "speech_probs", None, "regression"),
    (("batch", 1, "h", "w"), "sigmoid_0.tmp_0", None, "dense"),
    (("batch", "t", 6625), "softmax_11.tmp_0", None, "sequence"),
    (("batch", "seq", 384), "last_hidden_state", None, "embedding"),
])
def test_task_inferred_from_outputs(shape, name, labels, task):
    assert infer_task([TensorSpec(name, shape)], labels) == task


def test_task_override_in_recipe_and_bad_task_named(tmp_path):
    r = parse_recipe({"model": "demo:digits-cnn", "task": "embedding"})
    assert r.task == "embedding" and r.to_dict()["task"] == "embedding"
    with pytest.raises(RecipeError, match=r"unknown task 'segmentation'.*classification"):
        parse_recipe({"model": "demo:digits-cnn", "task": "segmentation"})


def _two_input_model(path):
    nodes = [helper.make_node("MatMul", ["a", "w"], ["h"]), helper.make_node("Add", ["h", "bias_in"], ["y"])]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 4]),
                                             helper.make_tensor_value_info("bias_in", TensorProto.FLOAT, ["n", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
                              initializer=[numpy_helper.from_array(RNG.normal(size=(4, 3)).astype(np.float32), "w")])
    return _save(graph, path)


def test_multi_input_matched_by_name_then_position_with_a_warning(tmp_path):
    _two_input_model(tmp_path / "two.onnx")
    handle = load_model(tmp_path / "two.onnx")
    a = RNG.normal(size=(5, 4)).astype(np.float32)
    b = RNG.normal(size=(5, 3)).astype(np.float32)
    np.savez(tmp_path / "named.npz", bias_in=b, a=a)
    ds = load_data(tmp_path / "named.npz", handle)
    assert np.array_equal(ds.inputs["a"], a) and np.array_equal(ds.inputs["bias_in"], b) and not ds.notes
    np.savez(tmp_path / "pos.npz", first=a, second=b)
    with pytest.warns(UserWarning, match="by position"):
        ds = load_data(tmp_path / "pos.npz", handle)
    assert np.array_equal(ds.inputs["a"], a) and np.array_equal(ds.inputs["bias_in"], b)
    assert "'first' -> input 'a'" in ds.notes[0]
    np.savez(tmp_path / "short.npz", a=a, labels=np.zeros(5, np.int64))
    with pytest.raises(DataError, match=r"short\.npz.*no array named 'bias_in'"):
        load_data(tmp_path / "short.npz", handle)


def test_dynamic_shapes_come_from_the_data_for_a_whole_run(tmp_path):
    """The issue's "has an unknown size in dimension 1 ... give the input shape" on a dynamic-H/W ONNX."""
    from tugboat.engine.running.runner import prepare

    _conv_net_with_constant_weights(tmp_path / "c.onnx")
    np.savez(tmp_path / "d.npz", pixels=RNG.normal(size=(10, 3, 12, 12)).astype(np.float32),
             labels=RNG.integers(0, 5, 10))
    recipe = parse_recipe({"model": str(tmp_path / "c.onnx"), "data": str(tmp_path / "d.npz"),
                           "measure": {"batch": 4, "min_runs": 2, "min_seconds": 0.0, "warmup": 1,
                                       "also_batch1": False, "both_runtimes": False}})
    base = prepare(recipe)
    assert base.handle.inputs[0].concrete(3) == (3, 3, 12, 12)
    assert base.metrics["flops"] == 2 * 12 * 12 * 8 * 27 + 2 * 8 * 5
    assert base.metrics["accuracy"] is not None and base.metrics["latency_ms"]["batch"] == 4


def test_constant_node_weights_become_initializers_so_tools_find_them(tmp_path):
    """Weights stored as Constant nodes: onnx2torch could not convert the graph and ONNX Runtime's
    static int8 quantized only activations (the model grew). Lifted to initializers at load, the same
    graph converts to torch, computes the same, and int8 makes it about 4x smaller."""
    from tugboat.engine.measuring.runtime import run_onnx

    w = RNG.normal(size=(32, 3, 3, 3)).astype(np.float32)
    fc = RNG.normal(size=(32, 512)).astype(np.float32) * 0.1
    nodes = [_const("w", w), _const("fc", fc), _const("shape_c", np.array([0, -1], np.int64)),
             helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]), helper.make_node("Reshape", ["g", "shape_c"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["logits"])]
    graph = helper.make_graph(nodes, "constnet",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 512])])
    original = _save(graph, tmp_path / "c.onnx")
    handle = load_model(tmp_path / "c.onnx")
    assert handle.info["lifted_constant_weights"] == 2
    assert {i.name for i in handle.onnx_model.graph.initializer} == {"w", "fc"}
    assert handle.module is not None, handle.conversion_error
    assert handle.param_count()[0] == w.size + fc.size
    x = RNG.normal(size=(4, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run_onnx(handle.to_onnx(), [x])[0], run_onnx(original, [x])[0], rtol=1e-5, atol=1e-5)
    np.savez(tmp_path / "d.npz", x=RNG.normal(size=(40, 3, 8, 8)).astype(np.float32))
    data = load_data(tmp_path / "d.npz", handle)
    from tugboat.engine.running.recipe import validate_steps
    from tugboat.engine.running.runner import apply_steps

    q = apply_steps(handle, validate_steps([{"technique": "quantize", "method": "static-int8"}]), data,
                    null_progress())
    size = len(original.SerializeToString())
    assert len(q.to_onnx().SerializeToString()) < size / 3


def test_capabilities_say_why_a_technique_cannot_run(tmp_path):
    from helpers import onnx_with_unsupported_op
    from tugboat.engine.running.capabilities import capabilities, summary

    onnx_with_unsupported_op(tmp_path / "odd.onnx")
    info = model_info(str(tmp_path / "odd.onnx"))
    caps = info["capabilities"]
    assert caps["prune"] and all(r and "needs a torch model" in r for r in caps["prune"].values())
    assert caps["quantize"]["qat-int8"] and "ONNX-only" in caps["quantize"]["qat-int8"]
    assert caps["quantize"]["static-int8"] is None and caps["quantize"]["dynamic-int8"] is None
    assert all(r is None for r in caps["distill"].values())  # an ONNX-only model still teaches
    lines = summary(caps)
    assert any(line.startswith("prune: needs a torch model") for line in lines)
    assert not any(line.startswith("distill") for line in lines)
    demo = capabilities(load_model("demo:digits-cnn"))
    assert all(r is None for per in demo.values() for r in per.values())


def _recurrent_model(path):
    """Like Silero VAD: x [N, 4], a state [2, N, 1] with the batch on axis 1, a scalar sample rate
    choosing the branch (If); outputs a value [N, 1] and the new state."""
    wa = numpy_helper.from_array(RNG.normal(size=(4, 1)).astype(np.float32), "wa")
    wb = numpy_helper.from_array(RNG.normal(size=(4, 16)).astype(np.float32), "wb")
    wc = numpy_helper.from_array(RNG.normal(size=(16, 1)).astype(np.float32), "wc")
    out = helper.make_tensor_value_info
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "wa"], ["ha"])], "then", [],
                              [out("ha", TensorProto.FLOAT, None)], initializer=[wa])
    else_g = helper.make_graph([helper.make_node("MatMul", ["x", "wb"], ["hb0"]),
                                helper.make_node("MatMul", ["hb0", "wc"], ["hb"])], "else", [],
                              [out("hb", TensorProto.FLOAT, None)], initializer=[wb, wc])
    nodes = [_const("rate", np.array(16000, np.int64)), helper.make_node("Equal", ["sr", "rate"], ["is16k"]),
             helper.make_node("If", ["is16k"], ["h"], then_branch=then_g, else_branch=else_g),
             _const("axes0", np.array([0], np.int64)),
             helper.make_node("ReduceSum", ["state", "axes0"], ["s"], keepdims=0),
             helper.make_node("Add", ["h", "s"], ["value"]), helper.make_node("Add", ["state", "value"], ["stateN"])]
    graph = helper.make_graph(nodes, "vadlike",
                              [out("x", TensorProto.FLOAT, [None, 4]), out("state", TensorProto.FLOAT, [2, None, 1]),
                               out("sr", TensorProto.INT64, [])],
                              [out("value", TensorProto.FLOAT, [None, 1]),
                               out("stateN", TensorProto.FLOAT, [2, None, 1])])
    return _save(graph, path)


def test_recurrent_state_with_the_batch_on_axis_1_and_a_scalar_input_run(tmp_path):
    from tugboat.engine.running.runner import prepare

    _recurrent_model(tmp_path / "vad.onnx")
    handle = load_model(tmp_path / "vad.onnx")
    assert [s.batch_axis for s in handle.inputs] == [0, 1, None]
    assert handle.task == "regression"
    n = 12  # stored sample-first like every array: state [N, 2, 1], sr [N]
    np.savez(tmp_path / "d.npz", x=RNG.normal(size=(n, 4)).astype(np.float32),
             state=np.zeros((n, 2, 1), np.float32), sr=np.full(n, 16000, np.int64))
    recipe = parse_recipe({"model": str(tmp_path / "vad.onnx"), "data": str(tmp_path / "d.npz"),
                           "measure": {"batch": 5, "min_runs": 2, "min_seconds": 0.0, "warmup": 1,
                                       "also_batch1": False, "both_runtimes": False}})
    base = prepare(recipe)
    assert base.outputs[0].shape == (len(base.data.splits["test"]), 1)
    assert base.metrics["latency_ms"]["batch"] == 5
    # FLOPs: the samples take the 16 kHz branch (8 FLOPs), not the larger one (2*4*16 + 2*16 = 160)
    assert base.metrics["flops"] == 8
    assert model_info(str(tmp_path / "vad.onnx"))["flops"] == 160  # without data: the larger branch
    # every weight sits in the If branches: static int8 (which does not enter them) says so in one line
    # naming the file; dynamic int8 quantizes them, fed in the model's layout
    from tugboat.engine.errors import TugboatError
    from tugboat.engine.running.recipe import validate_steps
    from tugboat.engine.running.runner import apply_steps

    with pytest.raises(TugboatError, match=r"vad\.onnx.*inside If/Loop/Scan subgraphs.*dynamic-int8"):
        apply_steps(base.handle, validate_steps([{"technique": "quantize", "method": "static-int8"}]), base.data,
                    null_progress())
    q = apply_steps(base.handle, validate_steps([{"technique": "quantize", "method": "dynamic-int8"}]), base.data,
                    null_progress())
    assert q.onnx_model is not None and q.history[-1]["method"] == "dynamic-int8"


def test_a_model_file_that_names_no_inputs_takes_them_from_the_data(tmp_path):
    """TorchScript files record no input spec: the data's arrays (any names) become the inputs instead of
    the issue's "holds labels but no input arrays"."""
    import torch

    traced = torch.jit.trace(torch.nn.Linear(6, 3).eval(), torch.zeros(2, 6))
    traced.save(str(tmp_path / "lin.pt"))
    handle = load_model(tmp_path / "lin.pt")
    np.savez(tmp_path / "d.npz", features=RNG.normal(size=(8, 6)).astype(np.float32), labels=np.arange(8) % 3)
    ds = load_data(tmp_path / "d.npz", handle)
    # the input keeps its name from forward()'s signature (engine.formats); the single array feeds it
    assert handle.input_names == ["input"] and handle.inputs[0].shape == ("batch", 6)
    assert ds.inputs["input"].shape == (8, 6) and ds.has_labels


def test_a_file_with_minus_one_dimensions_round_trips_through_tugboat_files(tmp_path):
    """Exporters (Paddle's among them) write -1 for an open dimension: it is an open dimension, and
    the files Tugboat writes from such a model open again (they were refused: "shape dimension -1")."""
    from tugboat.cli import main

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 10)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 10])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "m.onnx"))
    assert load_model(str(tmp_path / "m.onnx")).inputs[0].shape == (None, 16)
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((64, 16)).astype(np.float32), labels=rng.integers(0, 10, 64))
    (tmp_path / "r.toml").write_text('model = "m.onnx"\ndata = "d.npz"\n[measure]\nbatch = 8\n'
                                     '[[steps]]\ntechnique = "quantize"\nmethod = "dynamic-int8"\n')
    assert main(["run", str(tmp_path / "r.toml"), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    written = sorted((tmp_path / "out").glob("*.onnx"))
    assert len(written) == 2
    for path in written:
        again = load_model(str(path))
        assert again.inputs[0].shape == (None, 16), path.name
