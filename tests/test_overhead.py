"""No wasted seconds (issue 17.7): an ONNX-only recipe never imports torch, and the work a run does
once (shape inference, ONNX Runtime sessions, serialization) is not done again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]


def _mlp_onnx(path: Path, features: int = 32, hidden: int = 64, classes: int = 5) -> None:
    """A small float MLP written with onnx.helper alone (no torch export): MatMul, Add, Relu."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(0, 0.3, (features, hidden)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(rng.normal(0, 0.1, hidden).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.3, (hidden, classes)).astype(np.float32), "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
             helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
             helper.make_node("Relu", ["h1"], ["h2"], name="act"),
             helper.make_node("MatMul", ["h2", "w2"], ["logits"], name="fc2")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])
    graph = helper.make_graph(nodes, "mlp", [x], [y], [w1, b1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _run_in_fresh_process(tmp_path: Path, method: str) -> tuple[dict, bool, bool]:
    model, data = tmp_path / "mlp.onnx", tmp_path / "data.npz"
    _mlp_onnx(model)
    rng = np.random.default_rng(1)
    np.savez(data, x=rng.normal(size=(60, 32)).astype(np.float32))
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'model = "{model.as_posix()}"\ndata = "{data.as_posix()}"\n[[steps]]\n'
                      f'technique = "quantize"\nmethod = "{method}"\n'
                      '[measure]\nbatch = 8\nthreads = 1\nmin_runs = 3\nmin_seconds = 0.01\nmax_seconds = 0.05\n')
    out = tmp_path / "out"
    code = ("import sys\nfrom tugboat.cli import main\n"
            f"rc = main(['run', {str(recipe)!r}, '--out', {str(out)!r}, '--quiet'])\n"
            "print('TORCH-IMPORTED' if 'torch' in sys.modules else 'NO-TORCH')\n"
            "print('SYMPY-IMPORTED' if 'sympy' in sys.modules else 'NO-SYMPY')\nsys.exit(rc)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "appsrc"), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    return report, "NO-TORCH" in res.stdout, "NO-SYMPY" in res.stdout


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dynamic-int8", "static-int8"])
def test_quantizing_an_onnx_model_never_imports_torch(tmp_path, method):
    report, torch_free, sympy_free = _run_in_fresh_process(tmp_path, method)
    base, variant = report["baseline"]["metrics"], report["variants"][0]["metrics"]
    assert report["variants"][0]["status"] == "ok"
    assert variant["size_bytes"] < 0.6 * base["size_bytes"]  # really quantized (float32 weights -> int8)
    assert variant["fidelity"]["cosine"] > 0.98
    assert variant["latency_ms"]["speedup"]["blocks"] >= 3  # measured, paired
    # the work a timing did is on record (benchmarks/overhead.py gives its plain script as many runs)
    assert variant["latency_ms"]["speedup"]["warmup_runs"] >= 2 and base["latency_ms"]["warmup_runs"] >= 1
    assert torch_free, f"tugboat run of an ONNX model with {method} imported torch"
    # dynamic int8 of MatMuls skips quant_pre_process (its symbolic shape inference imports sympy)
    assert sympy_free == (method == "dynamic-int8")


def test_engine_modules_import_without_torch():
    # the registry loads every built-in technique; none may need torch just to be imported
    code = ("import sys\nimport tugboat.cli, tugboat.engine.running.runner, tugboat.engine.io.loading\n"
            "import tugboat.engine.measuring.measure, tugboat.engine.measuring.memory\n"
            "from tugboat.engine.techniques import steps\nsteps.techniques()\n"
            "from tugboat.engine.running.recipe import parse_recipe\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "appsrc"), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "[]", res.stdout


def test_lazy_torch_is_the_real_module_once_used():
    import torch as real

    from tugboat.engine.lazy import nn, torch

    assert torch.from_numpy is real.from_numpy
    assert issubclass(real.nn.Linear, nn.Module)
    assert isinstance(real.zeros(1), torch.Tensor)


def test_example_arrays_are_the_example_inputs_without_torch():
    from tugboat.engine.io.loading import load_model

    handle = load_model("demo:digits-cnn")
    arrays = handle.example_arrays(3, seed=5)
    tensors = handle.example_inputs(3, seed=5)
    assert [a.dtype for a in arrays] == [t.numpy().dtype for t in tensors]
    for a, t in zip(arrays, tensors):
        np.testing.assert_array_equal(a, t.numpy())


def test_a_large_artifacts_deflate_size_is_remembered_by_content(tmp_path, monkeypatch):
    import zlib

    from tugboat.engine.measuring import measure

    monkeypatch.setenv("TUGBOAT_CACHE_DIR", str(tmp_path / "cache"))
    artifact = np.random.default_rng(0).integers(0, 4, 3 << 20, dtype=np.uint8).tobytes()
    expected = len(zlib.compress(artifact, 6))
    assert measure.remembered_deflate(artifact) == expected
    calls = []
    compress = zlib.compress
    monkeypatch.setattr(measure.zlib, "compress", lambda *a: calls.append(1) or compress(*a))
    assert measure.remembered_deflate(artifact) == expected  # the same bytes: not compressed again
    assert not calls
    other = artifact[:-1] + bytes([artifact[-1] ^ 1])  # one bit differs: measured, not looked up
    assert measure.remembered_deflate(other) == len(compress(other, 6)) and calls
    (tmp_path / "cache" / "deflate-sizes.json").write_text("{not json")  # a broken table is only slower
    assert measure.remembered_deflate(artifact) == expected


def test_one_serialization_and_one_session_per_measured_graph(tmp_path, monkeypatch):
    from tugboat.engine.io.data import load_data
    from tugboat.engine.io.loading import load_model
    from tugboat.engine.measuring import runtime
    from tugboat.engine.measuring.guards import probe_outputs
    from tugboat.engine.measuring.measure import MeasureConfig, measure

    _mlp_onnx(tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(1).normal(size=(40, 32)).astype(np.float32))
    handle = load_model(tmp_path / "m.onnx", torch_module=False)
    data = load_data(str(tmp_path / "d.npz"), handle)
    made = []
    real = runtime.ort_session
    monkeypatch.setattr(runtime, "ort_session", lambda m, *a, **k: made.append(type(m)) or real(m, *a, **k))
    cfg = MeasureConfig(batch=4, threads=1, min_runs=2, min_seconds=0.0, max_seconds=0.05)
    probe_outputs(handle, [data.inputs["x"][:8]], threads=1)
    metrics, _ = measure(handle, data, cfg)
    assert made == [bytes]  # the probe, the quality pass and the timing share one session
    assert metrics["size_bytes"] == len(handle.to_onnx().SerializeToString())
    assert runtime.serialized(handle.to_onnx()) is runtime.serialized(handle.to_onnx())


def test_a_weight_with_too_few_bytes_is_still_refused_at_load(tmp_path):
    # load checks each weight's byte count against its shape without decoding it (90 MB copied)
    from tugboat.engine.errors import ModelLoadError
    from tugboat.engine.io.loading import load_model

    _mlp_onnx(tmp_path / "ok.onnx")
    assert load_model(tmp_path / "ok.onnx", torch_module=False).onnx_model is not None
    model = onnx.load(str(tmp_path / "ok.onnx"))
    w1 = next(t for t in model.graph.initializer if t.name == "w1")
    w1.raw_data = w1.raw_data[:-4]  # one float short
    (tmp_path / "bad.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(ModelLoadError, match="w1") as err:
        load_model(tmp_path / "bad.onnx", torch_module=False)
    assert "bad.onnx" in str(err.value)


def _quick_recipe(tmp_path: Path, method: str = "dynamic-int8"):
    from tugboat.engine.running.recipe import load_recipe

    _mlp_onnx(tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(1).normal(size=(60, 32)).astype(np.float32))
    (tmp_path / "r.toml").write_text(
        f'model = "{(tmp_path / "m.onnx").as_posix()}"\ndata = "{(tmp_path / "d.npz").as_posix()}"\n'
        f'[[steps]]\ntechnique = "quantize"\nmethod = "{method}"\n'
        '[measure]\nbatch = 8\nthreads = 1\nmin_runs = 3\nmin_seconds = 0.01\nmax_seconds = 0.05\n')
    return load_recipe(tmp_path / "r.toml")


def test_a_run_makes_one_session_and_one_check_per_graph(tmp_path, monkeypatch):
    # the variant the quantize step checks on the val split is probed, measured and timed in that
    # same session, and neither the original (checked at load) nor the variant (checked when made)
    # goes through onnx.checker again when written
    from tugboat.engine.measuring import measure, runtime
    from tugboat.engine.running import runner

    recipe = _quick_recipe(tmp_path)
    made, checked, counted = [], [], []
    real_session, real_check, real_flops = runtime.ort_session, onnx.checker.check_model, measure.onnx_flops
    monkeypatch.setattr(runtime, "ort_session", lambda m, *a, **k: made.append(m) or real_session(m, *a, **k))
    monkeypatch.setattr(measure, "onnx_flops", lambda m, *a, **k: counted.append(m) or real_flops(m, *a, **k))
    monkeypatch.setattr(onnx.checker, "check_model", lambda m, *a, **k: checked.append(m) or real_check(m, *a, **k))
    report = runner.run(recipe, tmp_path / "out")
    variant = report["variants"][0]
    assert variant["status"] == "ok" and variant["metrics"]["latency_ms"]["speedup"]["blocks"] >= 3
    assert "val" in variant["info"]["quantize"]["fidelity_check"]["split"]  # the step's own check ran
    assert len(made) == 2, [type(m) for m in made]  # the original's session and the variant's
    assert len(checked) == 2 and all(isinstance(m, bytes) for m in checked)
    assert len(counted) == 2  # the original's FLOPs (begun beside its first run) and the variant's
    assert report["baseline"]["metrics"]["flops"] == 2 * (32 * 64 + 64 * 5)  # two MatMuls, batch 1
    written = {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.onnx")}
    assert written["baseline.onnx"] == (tmp_path / "m.onnx").read_bytes()  # the original, unchanged
    assert set(written) == {"baseline.onnx", variant["artifacts"]["onnx"]}
    q = onnx.load_model_from_string(written[variant["artifacts"]["onnx"]])
    real_check(q)
    assert any(n.op_type == "MatMulInteger" for n in q.graph.node)
    assert len(written[variant["artifacts"]["onnx"]]) == variant["metrics"]["size_bytes"]


def test_a_trial_session_is_taken_over_only_by_its_unchanged_graph():
    from tugboat.engine.measuring import runtime

    a = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                                            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                                            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]),
                          opset_imports=[helper.make_opsetid("", 17)])
    b = onnx.ModelProto()
    b.CopyFrom(a)
    trial = runtime.trial_session(a, 1)
    assert runtime.trial_session(a, 1) is trial
    assert runtime.shared_session(b, 1) is not trial  # another graph: the trial is dropped, not reused
    trial = runtime.trial_session(a, 1)
    assert runtime.shared_session(a, 2) is not trial  # another thread count
    trial = runtime.trial_session(a, 1)
    assert runtime.serialized(a) == a.SerializeToString()
    assert runtime.shared_session(a, 1) is trial  # its graph, measured next: taken over
    assert runtime.shared_session(a, 1) is trial and runtime.trial_session(a, 1) is trial


def test_counts_begun_early_are_made_once_per_graph_and_sample(tmp_path, monkeypatch):
    from tugboat.engine.io.data import load_data
    from tugboat.engine.io.loading import load_model
    from tugboat.engine.measuring import measure

    _mlp_onnx(tmp_path / "m.onnx")
    x = np.random.default_rng(1).normal(size=(40, 32)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    np.savez(tmp_path / "e.npz", x=x[::-1].copy())
    handle = load_model(tmp_path / "m.onnx", torch_module=False)
    data = load_data(str(tmp_path / "d.npz"), handle)
    counted = []
    real = measure.onnx_flops
    monkeypatch.setattr(measure, "onnx_flops", lambda m, *a, **k: counted.append(m) or real(m, *a, **k))
    waiter = measure.start_counts(handle, data)
    params = 32 * 64 + 64 + 64 * 5
    assert measure.start_counts(handle, data) is waiter and waiter() == (params, params, 2 * (32 * 64 + 64 * 5))
    assert len(counted) == 1 and waiter()[:2] == handle.param_count()
    other = load_data(str(tmp_path / "e.npz"), handle)  # another first sample: counted again, not reused
    assert measure.start_counts(handle, other)() == waiter() and len(counted) == 2


def test_a_graph_is_checked_once_and_a_bad_one_is_never_written(tmp_path, monkeypatch):
    from tugboat.engine.errors import TugboatError
    from tugboat.engine.io.export import write_onnx
    from tugboat.engine.io.loading import load_model

    _mlp_onnx(tmp_path / "m.onnx")
    handle = load_model(tmp_path / "m.onnx", torch_module=False)
    good = onnx.ModelProto()
    good.CopyFrom(handle.to_onnx())
    bad = onnx.ModelProto()
    bad.CopyFrom(good)
    bad.graph.node[0].input[1] = "no_such_weight"  # reads a value nothing defines
    checked = []
    real = onnx.checker.check_model
    monkeypatch.setattr(onnx.checker, "check_model", lambda m, *a, **k: checked.append(m) or real(m, *a, **k))
    write_onnx(handle, tmp_path / "a.onnx")  # its file's bytes, checked at load: not again
    assert not checked and (tmp_path / "a.onnx").read_bytes() == (tmp_path / "m.onnx").read_bytes()
    variant = handle.derive(onnx_model=good)
    write_onnx(variant, tmp_path / "b.onnx")
    write_onnx(variant, tmp_path / "c.onnx")
    assert len(checked) == 1  # a new graph: checked on its first write only
    with pytest.raises(TugboatError, match=r"onnx\.checker") as err:
        write_onnx(handle.derive(onnx_model=bad), tmp_path / "d.onnx")
    assert "m.onnx" in str(err.value) and not (tmp_path / "d.onnx").exists()
    with pytest.raises(TugboatError, match=r"onnx\.checker"):  # and still refused the second time
        write_onnx(handle.derive(onnx_model=bad), tmp_path / "d.onnx")
