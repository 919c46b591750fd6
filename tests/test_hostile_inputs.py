"""Hostile model and data inputs beyond the corpus files (issue 15): metadata that is valid must
still load, custom-operator checks must not reject what ONNX Runtime can run, size checks happen
before any allocation, and special files never hang a reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from tugboat.engine.errors import DataError, ModelLoadError
from tugboat.engine.io.loading import load_model, validate_meta

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
    from tugboat.engine.io.loading import save_torchscript

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


# --- data: sizes before allocation, special files ---------------------------------------------

def test_npz_too_big_for_memory_is_refused_before_loading(tmp_path, monkeypatch):
    from tugboat.engine import ram as resources
    from tugboat.engine.errors import ResourceError
    from tugboat.engine.io.data import load_data

    path = tmp_path / "big.npz"
    np.savez(path, input=np.zeros((64, 1, 64, 64), np.float32))  # 1 MB of arrays
    monkeypatch.delenv("TUGBOAT_SKIP_MEMORY_CHECK", raising=False)
    monkeypatch.setattr(resources, "available_memory", lambda: 512 * 1024)
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("np.load called before the size check"))
    with pytest.raises(ResourceError) as err:
        load_data(path)
    assert "big.npz" in str(err.value) and "memory" in str(err.value)


def test_npz_members_that_are_not_arrays_are_ignored(tmp_path):
    import zipfile

    from tugboat.engine.io.data import load_data

    np.savez(tmp_path / "d.npz", input=np.zeros((4, 1, 8, 8), np.float32))
    with zipfile.ZipFile(tmp_path / "d.npz", "a") as z:
        z.writestr("notes.txt", "written by another tool")
    assert list(load_data(tmp_path / "d.npz").inputs) == ["input"]


@pytest.mark.parametrize("name", ["data.npz", "data.csv", "model.onnx", "model.pt", "recipe.toml"])
def test_a_fifo_is_refused_without_blocking(tmp_path, name):
    import os

    from tugboat.engine.errors import RecipeError
    from tugboat.engine.io.data import load_data
    from tugboat.engine.running.recipe import load_recipe

    fifo = tmp_path / name
    os.mkfifo(fifo)
    load = {"data": load_data, "model": load_model, "recipe": load_recipe}[name.split(".")[0]]
    with pytest.raises((DataError, ModelLoadError, RecipeError)) as err:  # opening it would block forever
        load(fifo)
    assert "named pipe" in str(err.value) and name in str(err.value)


def test_devices_are_refused_as_models_and_data(tmp_path):
    from tugboat.engine.io.data import load_data

    (tmp_path / "zero.npz").symlink_to("/dev/zero")
    (tmp_path / "zero.pt").symlink_to("/dev/zero")
    with pytest.raises(DataError, match="is a device"):
        load_data(tmp_path / "zero.npz")
    with pytest.raises(ModelLoadError, match="is a device"):
        load_model(tmp_path / "zero.pt")


def test_a_fifo_among_images_is_refused(tmp_path):
    import os

    from tugboat.engine.io.data import load_data

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
    os.mkfifo(tmp_path / "a" / "x.png")
    with pytest.raises(DataError, match="named pipe"):
        load_data(tmp_path)


def test_non_utf8_file_names_give_one_clean_line(tmp_path):
    import os
    import subprocess
    import sys

    raw = os.fsencode(tmp_path) + b"/caf\xe9\xff.onnx"
    with open(raw, "wb") as f:
        f.write(b"not a model")
    proc = subprocess.run([sys.executable, "-m", "tugboat", "info", raw], capture_output=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "appsrc")})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and b"not a valid ONNX file" in lines[0], proc.stderr


# --- the first run of the original model --------------------------------------------------------

def test_a_fixed_batch_1_model_is_measured_at_batch_1_with_a_note(tmp_path):
    from helpers import FAST
    from tugboat.engine.running.recipe import Recipe, validate_steps
    from tugboat.engine.running.runner import prepare, run_variant

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 8, 8])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])
    w = helper.make_tensor("w", TensorProto.FLOAT, [10, 64], np.linspace(-1, 1, 640, dtype=np.float32).tolist())
    nodes = [helper.make_node("Flatten", ["input"], ["flat"]), helper.make_node("Gemm", ["flat", "w"], ["logits"],
                                                                                transB=1)]
    model = helper.make_model(helper.make_graph(nodes, "fixed", [x], [y], [w]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "fixed.onnx"))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", input=rng.random((23, 1, 8, 8)).astype(np.float32),
             labels=rng.integers(0, 10, 23))
    base = prepare(Recipe(model=str(tmp_path / "fixed.onnx"), data=str(tmp_path / "d.npz"), measure=FAST))
    assert base.metrics["latency_ms"]["batch"] == 1
    assert base.metrics["accuracy"] is not None and len(base.outputs[0]) == len(base.data.splits["test"])
    assert any("fixed to 1" in w for w in base.handle.warnings)
    # static int8 calibrates it one sample at a time too
    recipe = Recipe(model=str(tmp_path / "fixed.onnx"), data=str(tmp_path / "d.npz"), measure=FAST,
                    steps=validate_steps([{"technique": "quantize", "method": "static-int8"}]))
    variant = run_variant(base, recipe)
    assert variant.status == "ok", variant.error
    assert variant.metrics["latency_ms"]["batch"] == 1


# --- technique edge cases ---------------------------------------------------------------------

class _NoParams(torch.nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :10] * 2


def _bn_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.BatchNorm1d(32),
                               torch.nn.ReLU(), torch.nn.Linear(32, 10)).eval()


def _handle(module):
    from tugboat.engine.io.models import ModelHandle, TensorSpec

    return ModelHandle(module, [TensorSpec("input", ("batch", 1, 8, 8))], [TensorSpec("logits", ("batch", 10))],
                       "mlp.pt", "pickle")


def _digits_like(n: int, seed: int = 0):
    from tugboat.engine.io.data import _make_dataset

    rng = np.random.default_rng(seed)
    return _make_dataset("d.npz", {"input": rng.random((n, 1, 8, 8)).astype(np.float32)}, rng.integers(0, 10, n))


@pytest.mark.parametrize("method", ["structured", "unstructured"])
def test_pruning_a_model_without_parameters_says_so(method):
    from tugboat.engine.errors import TugboatError
    from tugboat.engine.progress import null_progress
    from tugboat.engine.techniques import prune

    with pytest.raises(TugboatError, match="no Conv or Linear weights to prune"):
        prune.apply(_handle(_NoParams()), {"method": method, "ratio": 0.5, "finetune_epochs": 1},
                    _digits_like(20), null_progress())


def test_finetuning_nothing_trainable_is_a_clear_error():
    from tugboat.engine.errors import TugboatError
    from tugboat.engine.techniques.finetune import finetune

    with pytest.raises(TugboatError, match="no trainable parameters"):
        finetune(_NoParams(), _digits_like(20), input_names=["input"], epochs=1, lr=1e-3)


def test_structured_pruning_of_an_onnx_mlp_with_batchnorm1d(tmp_path):
    from tugboat.engine.progress import null_progress
    from tugboat.engine.techniques import prune

    torch.onnx.export(_bn_mlp(), (torch.zeros(2, 1, 8, 8),), str(tmp_path / "bn.onnx"), dynamo=False,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    handle = load_model(tmp_path / "bn.onnx")
    out = prune.apply(handle, {"method": "structured", "ratio": 0.5, "finetune_epochs": 1, "batch_size": 8},
                      _digits_like(30), null_progress())
    bns = [m for m in out.module.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert bns and bns[0].running_mean.shape == (16,)
    with torch.no_grad():
        assert out.module(torch.rand(3, 1, 8, 8)).shape == (3, 10)


@pytest.mark.parametrize("batch_size", [1, 8])
def test_finetuning_with_batchnorm_never_trains_on_one_sample(batch_size):
    from tugboat.engine.techniques.finetune import finetune

    data = _digits_like(24)
    assert len(data.splits["train"]) % 8 == 1  # the last batch would hold a single sample
    history = finetune(_bn_mlp(), data, input_names=["input"], epochs=1, lr=1e-3, batch_size=batch_size)
    assert history and np.isfinite(history[0]["train_loss"])


def test_a_prune_step_that_removes_nothing_is_named_and_warned(tmp_path):
    from helpers import FAST
    from tugboat.engine.running.recipe import Recipe, validate_steps
    from tugboat.engine.running.runner import prepare, run_variant

    torch.save(_bn_mlp(), tmp_path / "bn.pt")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", input=rng.random((30, 1, 8, 8)).astype(np.float32), labels=rng.integers(0, 10, 30))
    steps = validate_steps([{"technique": "prune", "method": "structured", "ratio": 0.5, "round_to": 256,
                             "finetune_epochs": 1}])
    recipe = Recipe(model=str(tmp_path / "bn.pt"), data=str(tmp_path / "d.npz"), steps=steps, measure=FAST,
                    trust=True, input_shape=[1, 8, 8])
    variant = run_variant(prepare(recipe), recipe)
    assert variant.status == "ok"
    assert variant.name == "unchanged"
    assert any("changed nothing" in w and "round_to = 256" in w for w in variant.warnings), variant.warnings


def test_unknown_quantize_op_types_are_refused_when_the_recipe_is_read():
    from tugboat.engine.errors import RecipeError
    from tugboat.engine.running.recipe import validate_steps

    with pytest.raises(RecipeError, match="unknown value 'Bogus'"):
        validate_steps([{"technique": "quantize", "method": "dynamic-int8", "op_types": ["Bogus"]}])
    assert validate_steps([{"technique": "quantize", "method": "dynamic-int8", "op_types": ["MatMul", "Gemm"]}])


def test_a_quantize_step_that_quantizes_nothing_is_warned(tmp_path):
    from tugboat.engine.progress import null_progress
    from tugboat.engine.running.recipe import validate_steps
    from tugboat.engine.running.runner import apply_steps

    steps = validate_steps([{"technique": "quantize", "method": "dynamic-int8", "op_types": ["LSTM"]}])
    out = apply_steps(_handle(_bn_mlp()), steps, None, null_progress())
    assert out.info["unchanged_steps"] == [0]
    assert any("changed nothing" in w and "no operator was quantized" in w for w in out.warnings)


@pytest.mark.parametrize("second", ["dynamic-int8", "static-int8", "fp16"])
def test_two_quantize_steps_are_refused_up_front(second):
    from tugboat.engine.errors import RecipeError
    from tugboat.engine.running.recipe import validate_steps

    with pytest.raises(RecipeError) as err:
        validate_steps([{"technique": "quantize", "method": "static-int8"},
                        {"technique": "quantize", "method": second}], "r.toml")
    assert "second quantize step" in str(err.value) and str(err.value).startswith("r.toml: ")


# --- signals ----------------------------------------------------------------------------------

def _interrupt_when(proc, marker: str, timeout: float = 90.0) -> str:
    """Read the child's stderr until a line holds ``marker``, then send SIGINT; the text read."""
    import select
    import signal
    import time

    seen, deadline = b"", time.monotonic() + timeout
    while marker.encode() not in seen:
        assert time.monotonic() < deadline and proc.poll() is None, seen.decode(errors="replace")
        ready, _, _ = select.select([proc.stderr], [], [], 0.5)
        if ready:
            seen += __import__("os").read(proc.stderr.fileno(), 4096)
    proc.send_signal(signal.SIGINT)
    return seen.decode(errors="replace")


@pytest.mark.slow
@pytest.mark.parametrize("command", ["run", "sweep"])
def test_ctrl_c_mid_work_exits_130_cleanly(tmp_path, command):
    import os
    import subprocess
    import sys

    recipe = tmp_path / "r.toml"
    sweep = '[sweep]\n"steps.0.ratio" = [0.3, 0.5]\n' if command == "sweep" else ""
    recipe.write_text('model = "demo:digits-mlp"\ndata = "demo:digits"\n[[steps]]\ntechnique = "prune"\n'
                      'method = "structured"\nratio = 0.5\nfinetune_epochs = 200\n' + sweep +
                      "[measure]\nbatch = 8\nwarmup = 0\nmin_runs = 1\nmin_seconds = 0.0\nmax_seconds = 0.05\n"
                      "also_batch1 = false\nboth_runtimes = false\n")
    proc = subprocess.Popen([sys.executable, "-m", "tugboat", command, str(recipe), "--out", str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "appsrc")})
    try:
        before = _interrupt_when(proc, "fine-tuning")
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    err = before + err.decode(errors="replace")
    assert proc.returncode == 130, err
    assert "tugboat: interrupted" in err and "terminate called" not in err and "Traceback" not in err, err
    assert not (tmp_path / "out" / "report.json").exists() or command == "sweep"


def test_pruning_a_torchscript_module_is_a_clear_error():
    from tugboat.engine.errors import TugboatError
    from tugboat.engine.progress import null_progress
    from tugboat.engine.techniques import prune

    scripted = torch.jit.trace(_bn_mlp(), (torch.zeros(2, 1, 8, 8),))
    with pytest.raises(TugboatError, match="TorchScript"):
        prune.apply(_handle(scripted), {"method": "structured", "ratio": 0.5, "finetune_epochs": 0}, None,
                    null_progress())


def test_a_sparse_model_file_bigger_than_memory_is_refused_unread(tmp_path, monkeypatch):
    from tugboat.engine import ram as resources
    from tugboat.engine.errors import ResourceError

    path = tmp_path / "huge.onnx"
    with open(path, "wb") as f:  # sparse: claims 64 MB, stores nothing
        f.truncate(64 * 1024**2)
    monkeypatch.delenv("TUGBOAT_SKIP_MEMORY_CHECK", raising=False)
    monkeypatch.setattr(resources, "available_memory", lambda: 16 * 1024**2)
    monkeypatch.setattr(onnx, "load", lambda *a, **k: pytest.fail("read before the size check"))
    with pytest.raises(ResourceError, match=r"the model file needs about 64(\.0)? MB"):
        load_model(path)
