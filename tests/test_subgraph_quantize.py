"""ONNX graphs whose weights live inside If/Loop/Scan bodies (Silero VAD: everything in the two `If`
branches, as Constant nodes) quantize honestly: dynamic int8 enters the bodies, a step that quantizes
nothing never writes a larger file, static int8 refuses in one line naming the file, fp16 passes the
checker (issue 14)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tugboat.engine.errors import TugboatError
from tugboat.engine.io.data import load_data
from tugboat.engine.io.loading import load_model
from tugboat.engine.io.onnx_graph import graph_nodes, graphs, share_subgraph_weights, toposort
from tugboat.engine.progress import null_progress
from tugboat.engine.running.recipe import validate_steps
from tugboat.engine.running.runner import apply_steps

RNG = np.random.default_rng(3)
C_IN, C, L, H = 8, 48, 24, 48  # input channels, conv channels, length, LSTM hidden size
OUT = helper.make_tensor_value_info


def _const(name, arr):
    arr = arr.astype(np.float32) if arr.dtype.kind == "f" else arr
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(arr, name + "_v"))


def _rnn_branch(tag: str) -> onnx.GraphProto:
    """LSTM whose W/R are the enclosing branch's weights read through Unsqueeze (as Silero's are):
    constant folding gives each of the two inner branches its own copy."""
    nodes = [_const(f"ax{tag}", np.array([0], np.int64)),
             helper.make_node("Unsqueeze", ["wih", f"ax{tag}"], [f"W{tag}"]),
             helper.make_node("Unsqueeze", ["whh", f"ax{tag}"], [f"R{tag}"]),
             helper.make_node("LSTM", ["seq", f"W{tag}", f"R{tag}"], ["", f"yh{tag}"], hidden_size=H),
             helper.make_node("Squeeze", [f"yh{tag}", f"ax{tag}"], [f"h{tag}"])]
    return helper.make_graph(nodes, f"rnn{tag}", [], [OUT(f"h{tag}", TensorProto.FLOAT, None)])


def _branch(tag: str) -> onnx.GraphProto:
    """Conv (per-channel ranges 100x apart, as re-parameterised kernels have) -> ReLU -> LSTM in an
    inner If -> MatMul -> Sigmoid: [N, C_IN, L] -> [N, 1]. Every weight is a Constant node."""
    gain = np.logspace(-1, 1, C).astype(np.float32)  # the next layer undoes it: every channel counts
    nodes = [_const("wc", RNG.normal(size=(C, C_IN, 3)) * gain[:, None, None] / np.sqrt(3 * C_IN)),
             _const("bc", RNG.normal(size=C).astype(np.float32) * 0.1 * gain),
             _const("wih", RNG.normal(size=(4 * H, C)) / gain / np.sqrt(C)),
             _const("whh", RNG.normal(size=(4 * H, H)).astype(np.float32) * 0.3 / np.sqrt(H)),
             _const("wo", RNG.normal(size=(H, 1)).astype(np.float32)),
             helper.make_node("Conv", ["x", "wc", "bc"], ["c"], pads=[1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Transpose", ["r"], ["seq"], perm=[2, 0, 1]),  # [L, N, C]
             helper.make_node("Size", ["x"], ["n"]), _const("zero", np.array(0, np.int64)),
             helper.make_node("Equal", ["n", "zero"], ["empty"]), helper.make_node("Not", ["empty"], ["any"]),
             helper.make_node("If", ["any"], ["h"], then_branch=_rnn_branch("a"), else_branch=_rnn_branch("b")),
             helper.make_node("MatMul", ["h", "wo"], ["z"]),
             helper.make_node("Sigmoid", ["z"], [f"p{tag}"])]
    return helper.make_graph(nodes, f"branch{tag}", [], [OUT(f"p{tag}", TensorProto.FLOAT, None)])


def _vad_like(path):
    """Silero-VAD-shaped: a scalar sample rate picks one of two If branches holding all weights."""
    nodes = [_const("rate", np.array(16000, np.int64)), helper.make_node("Equal", ["sr", "rate"], ["is16k"]),
             helper.make_node("If", ["is16k"], ["prob"], then_branch=_branch("t"), else_branch=_branch("e"))]
    graph = helper.make_graph(nodes, "vadlike", [OUT("x", TensorProto.FLOAT, [None, C_IN, L]),
                                                 OUT("sr", TensorProto.INT64, [])],
                              [OUT("prob", TensorProto.FLOAT, [None, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return model


@pytest.fixture(scope="module")
def vad(tmp_path_factory):
    root = tmp_path_factory.mktemp("vad")
    _vad_like(root / "vad.onnx")
    n = 40
    x = RNG.normal(size=(n, C_IN, L)).astype(np.float32) * np.logspace(-2, 0, n).astype(np.float32)[:, None, None]
    np.savez(root / "d.npz", x=x, sr=np.full(n, 16000, np.int64))
    handle = load_model(root / "vad.onnx")
    return root, handle, load_data(root / "d.npz", handle)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x, "sr": np.array(16000, np.int64)})[0]


def _quantize(vad, **step):
    _, handle, data = vad
    return apply_steps(handle, validate_steps([{"technique": "quantize", **step}]), data, null_progress())


def _cosine(a, b) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_dynamic_int8_quantizes_the_weights_inside_if_branches(vad):
    root, handle, data = vad
    q = _quantize(vad, method="dynamic-int8")
    ops = [n.op_type for n in graph_nodes(q.onnx_model.graph)]
    assert ops.count("ConvInteger") == 2 and ops.count("DynamicQuantizeLSTM") == 4  # both branches, both inner
    assert not any("changed nothing" in w for w in q.warnings)
    size_in = (root / "vad.onnx").stat().st_size
    size_q = len(q.onnx_model.SerializeToString())
    # all weights int8, the LSTM copies folded into both inner branches stored once (1.8x without sharing)
    assert size_in / size_q > 3.2, (size_in, size_q)
    x = data.inputs["x"]
    ref, out = _run(handle.onnx_model, x), _run(q.onnx_model, x)
    # per-channel conv weights: one scale for the whole (100x-spread) kernel gives cosine ~0.9 here
    assert _cosine(ref, out) > 0.99 and np.abs(ref - out).max() < 0.05


def test_a_step_that_quantizes_nothing_keeps_the_input_graph(vad):
    _, handle, _ = vad
    q = _quantize(vad, method="dynamic-int8", op_types=["Gather"])
    assert any("changed nothing" in w and "no operator was quantized" in w and "input graph unchanged" in w
               for w in q.warnings), q.warnings
    # the quantizer's pre-pass folds each LSTM weight into both inner branches: that copy is not kept
    assert len(q.onnx_model.SerializeToString()) <= len(handle.onnx_model.SerializeToString()) + 256
    assert not any(n.op_type in ("DynamicQuantizeLinear", "MatMulInteger") for n in graph_nodes(q.onnx_model.graph))


def test_static_int8_refuses_in_one_line_naming_the_file_and_the_method_that_works(vad):
    with pytest.raises(TugboatError) as err:
        _quantize(vad, method="static-int8")
    msg = str(err.value)
    assert "vad.onnx" in msg and "If/Loop/Scan" in msg and "dynamic-int8" in msg and "\n" not in msg
    # the panel says so before Run; the methods that enter subgraphs stay available
    from tugboat.engine.running.capabilities import capabilities

    caps = capabilities(vad[1], vad[2])["quantize"]
    assert "If/Loop/Scan" in caps["static-int8"] and caps["dynamic-int8"] is None and caps["fp16"] is None


def test_auto_picks_weight_only_int8_when_every_weight_is_in_a_subgraph(vad):
    """Static int8 cannot enter the branches, dynamic int8 would quantize the conv's and LSTM's inputs
    on the fly: int8 weights with float activations (it passes the fidelity check here)."""
    q = _quantize(vad, method="auto")
    assert q.info["quantize"]["auto"]["method"] == "weight-only-int8"
    ops = [n.op_type for n in graph_nodes(q.onnx_model.graph)]
    assert "Cast" in ops and "DynamicQuantizeLSTM" not in ops and "QuantizeLinear" not in ops
    assert q.info["quantize"]["fidelity_check"]["value"] >= 0.99


def test_auto_falls_back_to_dynamic_int8_when_weight_only_loses_fidelity(vad, monkeypatch):
    """When weight-only int8 fails its fidelity check (simulated: its graph's output layer replaced by
    a wrong one), auto keeps dynamic int8 on LSTM/MatMul weights, and says why."""
    from tugboat.engine.techniques import quantize

    real = quantize.dequant_int8_weights

    def wrong(model, exclude=None, skip_ops=()):
        q, done = real(model, exclude, skip_ops)
        for node in graph_nodes(q.graph):
            if node.op_type == "Sigmoid":
                node.op_type = "Neg"
        return q, done

    monkeypatch.setattr(quantize, "dequant_int8_weights", wrong)
    q = _quantize(vad, method="auto")
    auto = q.info["quantize"]["auto"]
    assert auto["method"] == "dynamic-int8" and auto["instead_of"] == "weight-only-int8", auto
    assert auto["first_choice_fidelity"] < 0.99 <= q.info["quantize"]["fidelity_check"]["value"]
    assert any(w.startswith("method auto: weight-only-int8 kept cosine") for w in q.warnings), q.warnings
    assert "DynamicQuantizeLSTM" in [n.op_type for n in graph_nodes(q.onnx_model.graph)]


def test_auto_keeps_its_first_choice_when_the_other_is_no_better(vad, monkeypatch):
    from tugboat.engine.techniques import quantize

    monkeypatch.setattr(quantize, "MIN_COSINE", 1.5)  # nothing passes
    q = _quantize(vad, method="auto")
    auto = q.info["quantize"]["auto"]
    assert auto["method"] == "weight-only-int8" and "dynamic-int8" in auto["tried"]
    assert any("low fidelity" in w for w in q.warnings)


def test_fp16_of_a_graph_whose_branches_read_the_inputs_passes_the_checker(vad):
    _, handle, data = vad
    q = _quantize(vad, method="fp16")  # the converter's input casts land after the If that reads them
    onnx.checker.check_model(q.onnx_model)
    halves = [t for g in graphs(q.onnx_model.graph) for t in g.initializer if t.data_type == TensorProto.FLOAT16]
    halves += [n for n in graph_nodes(q.onnx_model.graph) if n.op_type == "Constant"
               and n.attribute[0].t.data_type == TensorProto.FLOAT16]
    assert halves
    x = data.inputs["x"]
    assert _cosine(_run(handle.onnx_model, x), _run(q.onnx_model, x)) > 0.999


def test_toposort_waits_for_the_values_a_subgraph_reads():
    inner = helper.make_graph([helper.make_node("Identity", ["xc"], ["y1"])], "b", [],
                              [OUT("y1", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("If", ["c"], ["y"], then_branch=inner, else_branch=inner),
             helper.make_node("Identity", ["x"], ["xc"])]  # produced after the If that reads it
    graph = helper.make_graph(nodes, "g", [OUT("x", TensorProto.FLOAT, [2]), OUT("c", TensorProto.BOOL, [])],
                              [OUT("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)
    onnx.checker.check_model(toposort(model))
    assert [n.op_type for n in model.graph.node] == ["Identity", "If"]


def test_equal_weights_in_sibling_branches_are_stored_once():
    w = RNG.normal(size=(16, 16)).astype(np.float32)
    branch = [helper.make_graph([helper.make_node("MatMul", ["x", f"w{k}"], [f"y{k}"])], f"b{k}", [],
                                [OUT(f"y{k}", TensorProto.FLOAT, None)],
                                initializer=[numpy_helper.from_array(w, f"w{k}")]) for k in "ab"]
    graph = helper.make_graph([helper.make_node("If", ["c"], ["y"], then_branch=branch[0], else_branch=branch[1])],
                              "g", [OUT("x", TensorProto.FLOAT, [2, 16]), OUT("c", TensorProto.BOOL, [])],
                              [OUT("y", TensorProto.FLOAT, [2, 16])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])
    model.ir_version = 8
    x = RNG.normal(size=(2, 16)).astype(np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    before = [sess.run(None, {"x": x, "c": np.array(c)})[0] for c in (True, False)]
    size = len(model.SerializeToString())
    assert share_subgraph_weights(model) == w.nbytes
    onnx.checker.check_model(model)
    assert len(model.SerializeToString()) < size - w.nbytes + 64
    assert [len(g.initializer) for g in graphs(model.graph)] == [1, 0, 0]  # one copy, in the enclosing graph
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for c, ref in zip((True, False), before):
        np.testing.assert_array_equal(sess.run(None, {"x": x, "c": np.array(c)})[0], ref)


def test_dynamic_int8_convolutions_get_one_weight_scale_per_channel():
    """ONNX Runtime's ConvInteger path ignores per_channel: a kernel whose channels' ranges are 100x
    apart (re-parameterised, batch-norm folded) then loses its small channels."""
    from tugboat.engine.techniques.quantize import dynamic_int8

    gain = np.logspace(-1, 1, 32).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1]),
             helper.make_node("Mul", ["c", "undo"], ["y"])]  # the next layer undoes the gain
    inits = [numpy_helper.from_array((RNG.normal(size=(32, 8, 3)) * gain[:, None, None]).astype(np.float32), "w"),
             numpy_helper.from_array((1 / gain)[:, None].astype(np.float32), "undo")]
    graph = helper.make_graph(nodes, "conv", [OUT("x", TensorProto.FLOAT, [None, 8, 20])],
                              [OUT("y", TensorProto.FLOAT, [None, 32, 20])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])
    x = RNG.normal(size=(16, 8, 20)).astype(np.float32)

    def rel_error(per_channel: bool) -> float:
        q = dynamic_int8(model, {"per_channel": per_channel}, [])
        assert [n.op_type for n in q.graph.node].count("ConvInteger") == 1
        run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
               for m in (model, q)]
        return float(np.linalg.norm(run[1] - run[0]) / np.linalg.norm(run[0]))

    per_channel, per_tensor = rel_error(True), rel_error(False)
    assert per_channel < 0.03 and per_tensor > 3 * per_channel, (per_channel, per_tensor)


@pytest.mark.slow
def test_silero_vad_onnx_quantizes_inside_its_if_branches():
    """The real file: every weight is a Constant node inside the 16 kHz / 8 kHz If branches. Dynamic
    int8 reaches them (it quantized nothing and wrote a 1.4x *larger* file); its fidelity is what it is
    (per-tensor int8 activations of the STFT and first encoder convolution), and said when low."""
    from pathlib import Path

    from realmodels import real_model
    from tugboat.engine.techniques import quantize

    rm = real_model("silero-vad-onnx")
    handle = load_model(rm.model)
    data = load_data(rm.data, handle)
    q = quantize.apply(handle, {"method": "dynamic-int8"}, data, null_progress())
    ops = [n.op_type for n in graph_nodes(q.onnx_model.graph)]
    assert ops.count("ConvInteger") == 12 and ops.count("DynamicQuantizeLSTM") == 4
    assert Path(rm.model).stat().st_size / len(q.onnx_model.SerializeToString()) >= 3.5
    check = q.info["quantize"]["fidelity_check"]
    assert check["value"] >= 0.99 or any("low fidelity" in w for w in q.warnings), (check, q.warnings)
    with pytest.raises(TugboatError, match=r"silero_vad\.onnx.*If/Loop/Scan.*dynamic-int8"):
        quantize.apply(handle, {"method": "static-int8"}, data, null_progress())
    half = quantize.apply(handle, {"method": "fp16"}, data, null_progress())
    onnx.checker.check_model(half.onnx_model)
    assert half.info["quantize"]["fidelity_check"]["value"] >= 0.99


def test_weight_only_finds_matmul_weights_inside_if_branches(tmp_path):
    from tugboat.engine.techniques import quantize

    branches = [helper.make_graph([_const(f"w{k}", RNG.normal(size=(64, 64))),
                                   helper.make_node("MatMul", ["x", f"w{k}"], [f"y{k}"])], f"b{k}", [],
                                  [OUT(f"y{k}", TensorProto.FLOAT, None)]) for k in "ab"]
    graph = helper.make_graph([helper.make_node("If", ["c"], ["y"], then_branch=branches[0], else_branch=branches[1])],
                              "g", [OUT("x", TensorProto.FLOAT, [None, 64]), OUT("c", TensorProto.BOOL, [])],
                              [OUT("y", TensorProto.FLOAT, [None, 64])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "m.onnx"))
    q = quantize.apply(load_model(tmp_path / "m.onnx"), {"method": "weight-only-int8"}, None, null_progress())
    assert [n.op_type for n in graph_nodes(q.onnx_model.graph)].count("Cast") == 2  # int8 -> float
    assert len(q.onnx_model.SerializeToString()) < 0.3 * len(model.SerializeToString())
    q4 = quantize.apply(load_model(tmp_path / "m.onnx"), {"method": "weight-only-int4"}, None, null_progress())
    assert [n.op_type for n in graph_nodes(q4.onnx_model.graph)].count("MatMulNBits") == 2


def test_dynamic_int8_quantizes_a_loop_body_weight(tmp_path):
    """Loop bodies as well as If branches: a weight (Constant node) applied 3 times in a Loop."""
    w = RNG.normal(size=(64, 64)) / 8
    body = helper.make_graph(
        [_const("w", w), helper.make_node("MatMul", ["h_in", "w"], ["h_mm"]), helper.make_node("Tanh", ["h_mm"], ["h"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])], "body",
        [OUT("i", TensorProto.INT64, []), OUT("cond_in", TensorProto.BOOL, []), OUT("h_in", TensorProto.FLOAT, None)],
        [OUT("cond_out", TensorProto.BOOL, []), OUT("h", TensorProto.FLOAT, None)])
    nodes = [_const("trips", np.array(3, np.int64)), _const("true", np.array(True)),
             helper.make_node("Loop", ["trips", "true", "x"], ["y"], body=body)]
    graph = helper.make_graph(nodes, "loop", [OUT("x", TensorProto.FLOAT, [None, 64])],
                              [OUT("y", TensorProto.FLOAT, [None, 64])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(tmp_path / "loop.onnx"))
    np.savez(tmp_path / "d.npz", x=RNG.normal(size=(24, 64)).astype(np.float32))
    handle = load_model(tmp_path / "loop.onnx")
    q = _quantize((tmp_path, handle, load_data(tmp_path / "d.npz", handle)), method="dynamic-int8")
    assert "MatMulInteger" in [n.op_type for n in graph_nodes(q.onnx_model.graph)]
    assert len(q.onnx_model.SerializeToString()) < 0.4 * len(model.SerializeToString())
    x = RNG.normal(size=(8, 64)).astype(np.float32)
    runs = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
            for m in (model, q.onnx_model)]
    assert _cosine(*runs) > 0.99
