"""Model formats people bring: TorchScript (traced and scripted), torch.export ``.pt2`` (also the
ones Tugboat writes), state_dict / safetensors with the architecture from the user's code.

The networks are small third-party-like ones written here: depthwise + squeeze-excite convolutions,
an LSTM, a token model with int64 ids and an attention mask."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from helpers import FAST
from tugboat.cli import main
from tugboat.engine.errors import ModelLoadError, UntrustedFileError
from tugboat.engine.io.loading import load_model, save_exported, save_torchscript
from tugboat.engine.running.info import model_info
from tugboat.engine.running.recipe import parse_recipe, validate_steps
from tugboat.engine.running.runner import prepare, run_variant


class SqueezeExcite(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(c, c // 2, 1), nn.Conv2d(c // 2, c, 1)

    def forward(self, x):
        w = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(torch.relu(self.reduce(w))))


class MobileLike(nn.Module):
    """Stem, depthwise-separable block with squeeze-excite, classifier (an EfficientNet in small)."""

    def __init__(self, classes: int = 10, c1: int = 16, c2: int = 96):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, c1, 3, padding=1), nn.BatchNorm2d(c1)
        self.dw, self.pw = nn.Conv2d(c1, c1, 3, padding=1, groups=c1), nn.Conv2d(c1, c2, 1)
        self.se, self.head = SqueezeExcite(c2), nn.Linear(c2, classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = self.se(torch.relu(self.pw(self.dw(x))))
        return self.head(x.mean((2, 3)))


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm, self.head = nn.LSTM(6, 12, batch_first=True), nn.Linear(12, 3)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def _mobile() -> MobileLike:
    torch.manual_seed(0)
    model = MobileLike().eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        model.bn.running_mean.uniform_(-0.1, 0.1)
        model.bn.running_var.uniform_(0.5, 1.5)
    return model


def _image_data(tmp_path, name="input", n=96):
    rng = np.random.default_rng(0)
    path = tmp_path / "images.npz"
    np.savez(path, **{name: rng.random((n, 1, 8, 8)).astype(np.float32)},
             labels=rng.integers(0, 10, n))
    return path


def _quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A traced, a scripted and a torch.export'ed MobileLike, and a traced LSTM."""
    d = tmp_path_factory.mktemp("formats")
    model, x = _mobile(), torch.rand(2, 1, 8, 8)
    _quiet(torch.jit.trace, model, x).save(str(d / "traced.pt"))
    torch.jit.script(model).save(str(d / "scripted.pt"))
    batch = torch.export.Dim("batch")
    torch.export.save(_quiet(torch.export.export, model, (x,), dynamic_shapes=({0: batch},)), str(d / "exported.pt2"))
    torch.export.save(_quiet(torch.export.export, model, (x[:1],)), str(d / "exported_b1.pt2"))
    rnn = Recurrent().eval()
    _quiet(torch.jit.trace, rnn, torch.rand(2, 5, 6)).save(str(d / "lstm.pt"))
    with torch.no_grad():
        ref = model(x).numpy()
    return d, model, x, ref


# --- TorchScript and .pt2: info ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["traced.pt", "scripted.pt"])
def test_torchscript_info_without_shape_tells_what_the_file_knows(files, name, capsys):
    d, model, _, _ = files
    info = model_info(str(d / name))
    expected = sum(p.numel() for p in model.parameters())
    assert info["params"] == expected  # weights of every layer, batch-norm included
    assert info["flops"] is None and info["size_bytes"] > 1000
    assert {r["name"] for r in info["layers"]} >= {"stem", "dw", "pw", "se.reduce", "head"}
    assert [s["name"] for s in info["inputs"]] == ["x"]  # from forward's signature
    assert any("input shape" in w and "--input-shape" in w for w in info["warnings"])
    assert main(["info", str(d / name)]) == 0  # no INTERNAL ASSERT from PyTorch
    out = capsys.readouterr().out
    assert "needs the input shape" in out and "Params" in out


def test_torchscript_info_with_input_shape_counts_flops(files):
    d, _, x, ref = files
    info = model_info(str(d / "traced.pt"), input_shape=(1, 8, 8))
    assert info["flops"] > 0 and info["outputs"][0]["shape"] == ["batch", 10]
    handle = load_model(d / "scripted.pt", input_shape=(1, 8, 8))
    assert type(handle.module).__name__ == "GraphModule"  # editable: real Conv2d / Linear layers
    assert any(isinstance(m, nn.Conv2d) for m in handle.module.modules())
    with torch.no_grad():
        np.testing.assert_allclose(handle.module(x).numpy(), ref, atol=1e-4)


def test_pt2_info_takes_shapes_from_the_program(files):
    d, _, x, ref = files
    for name in ("exported.pt2", "exported_b1.pt2"):  # dynamic batch, and a batch fixed at 1
        info = model_info(str(d / name))
        assert info["params"] > 10000 and info["flops"] > 0, name
        handle = load_model(d / name)
        with torch.no_grad():
            np.testing.assert_allclose(handle.module(x).numpy(), ref, atol=1e-4)


def test_torchscript_without_shape_or_data_refuses_to_run_in_one_line(files, tmp_path, capsys):
    d = files[0]
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'model = "{d / "traced.pt"}"\n[[steps]]\ntechnique = "quantize"\nmethod = "fp16"\n')
    assert main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "traced.pt" in err[0] and "input shape" in err[0] and "input_shape" in err[0]


# --- TorchScript and .pt2: every technique --------------------------------------------------------

STEPS = [
    {"technique": "prune", "method": "structured", "ratio": 0.25, "finetune_epochs": 1},
    {"technique": "prune", "method": "unstructured", "ratio": 0.5, "finetune_epochs": 0},
    {"technique": "quantize", "method": "dynamic-int8"},
    {"technique": "quantize", "method": "static-int8"},
    {"technique": "quantize", "method": "weight-only-int8"},
    {"technique": "quantize", "method": "weight-only-int4"},
    {"technique": "quantize", "method": "fp16"},
    {"technique": "quantize", "method": "qat-int8", "epochs": 1},
    {"technique": "distill", "method": "kd", "epochs": 1},
]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["traced.pt", "scripted.pt", "exported.pt2"])
def test_every_technique_runs_on_torchscript_and_pt2(files, name, tmp_path):
    d = files[0]
    # the data's array is called "input", the model's argument "x": a single input takes it anyway
    recipe = parse_recipe({"model": str(d / name), "data": str(_image_data(tmp_path))})
    recipe.measure = FAST
    base = prepare(recipe)
    assert base.handle.format == ("pt2" if name.endswith(".pt2") else "torchscript")
    params = base.metrics["params"]
    for step in STEPS:
        v = run_variant(base, recipe.with_steps(validate_steps([step])))
        assert v.status == "ok", (step, v.error)
        if step["method"] == "structured":
            assert v.metrics["params"] < 0.85 * params
        if step["method"] == "unstructured":
            assert v.metrics["nonzero_params"] < 0.7 * v.metrics["params"]
        if step["method"] in ("static-int8", "dynamic-int8"):
            assert v.metrics["fidelity"]["top1_agreement"] >= 0.9, step
            assert v.handle.to_onnx().graph.node  # the int8 variant is a deployable graph


def test_torchscript_student_file_learns_from_a_pt2_teacher(files, tmp_path):
    d = files[0]
    torch.manual_seed(2)
    small = MobileLike(c1=8, c2=16).eval()
    _quiet(torch.jit.trace, small, torch.rand(2, 1, 8, 8)).save(str(tmp_path / "student.pt"))
    recipe = parse_recipe({"model": str(d / "exported.pt2"), "data": str(_image_data(tmp_path))})
    recipe.measure = FAST
    base = prepare(recipe)
    step = {"technique": "distill", "student": "file", "student_file": str(tmp_path / "student.pt"), "epochs": 1}
    v = run_variant(base, recipe.with_steps(validate_steps([step])))
    assert v.status == "ok", v.error
    assert v.metrics["params"] < 0.5 * base.metrics["params"]


def test_lstm_torchscript_converts_prunes_and_quantizes(files, tmp_path):
    """onnx2torch has no LSTM converter; engine/onnx_recurrent.py adds one (a real nn.LSTM)."""
    d = files[0]
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "seq.npz", seq=rng.random((64, 5, 6)).astype(np.float32))
    recipe = parse_recipe({"model": str(d / "lstm.pt"), "data": str(tmp_path / "seq.npz")})
    recipe.measure = FAST
    base = prepare(recipe)
    assert base.handle.conversion_error is None
    assert any(isinstance(m, nn.LSTM) for m in base.handle.module.modules())
    v = run_variant(base, recipe.with_steps(validate_steps([{"technique": "quantize", "method": "dynamic-int8"}])))
    assert v.status == "ok" and v.metrics["fidelity"]["cosine"] > 0.99
    v = run_variant(base, recipe.with_steps(validate_steps([{"technique": "prune", "finetune_epochs": 0}])))
    assert v.status == "ok", v.error  # the LSTM keeps its hidden size; the file runs at the data's batch


def test_pt2_with_a_dynamic_batch_and_a_flatten_runs_at_any_batch(tmp_path):
    """The program computes the flatten's size from the batch (aten.sym_size): the ONNX conversion
    must not bake the example's batch into it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)).eval()
    x = torch.rand(2, 1, 8, 8)
    program = _quiet(torch.export.export, model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(tmp_path / "flat.pt2"))
    handle = load_model(tmp_path / "flat.pt2")
    from tugboat.engine.measuring.runtime import run_onnx

    x5 = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        expected = model(x5).numpy()
        np.testing.assert_allclose(handle.module(x5).numpy(), expected, atol=1e-4)
    np.testing.assert_allclose(run_onnx(handle.to_onnx(), [x5.numpy()])[0], expected, atol=1e-4)


def test_pt2_with_a_baked_in_batch_is_refused_with_what_to_do(tmp_path):
    model = Recurrent().eval()  # the LSTM's initial state is expanded to the example batch
    torch.export.save(_quiet(torch.export.export, model, (torch.rand(2, 5, 6),)), str(tmp_path / "fixed.pt2"))
    with pytest.raises(ModelLoadError, match="batch size it was traced or exported with") as info:
        load_model(tmp_path / "fixed.pt2")
    assert "fixed.pt2" in str(info.value) and "dynamic_shapes" in str(info.value)


# --- round trip: every torch file Tugboat exports reopens and compresses again ----------------------

@pytest.mark.slow
def test_round_trip_of_every_file_tugboat_exports(files, tmp_path):
    from tugboat.engine.io.export import export_variant
    from tugboat.engine.progress import null_progress

    d = files[0]
    data = str(_image_data(tmp_path))
    recipe = parse_recipe({"model": str(d / "traced.pt"), "data": data})
    recipe.measure = FAST
    base = prepare(recipe)
    pruned = run_variant(base, recipe.with_steps(validate_steps(
        [{"technique": "prune", "ratio": 0.25, "finetune_epochs": 0}])))
    written = [
        export_variant(tmp_path / "a.pt2", "torch", null_progress(), handle=pruned.handle),
        export_variant(tmp_path / "a.onnx", "onnx", null_progress(), handle=pruned.handle),
        save_exported(pruned.handle, tmp_path / "b.pt2"),
        save_torchscript(pruned.handle, tmp_path / "c.pt"),
    ]
    inputs = torch.from_numpy(np.load(data)["input"][:8])
    with torch.no_grad():
        expected = pruned.handle.module(inputs).numpy()
    for path in written:
        again = parse_recipe({"model": str(path), "data": data})
        again.measure = FAST
        reopened = prepare(again)
        with torch.no_grad():
            np.testing.assert_allclose(reopened.handle.module(inputs).numpy(), expected, atol=1e-4,
                                       err_msg=str(path))
        v = run_variant(reopened, again.with_steps(validate_steps([{"technique": "quantize",
                                                                      "method": "static-int8"}])))
        assert v.status == "ok" and v.metrics["size_bytes"] < reopened.metrics["size_bytes"], path
        onnx.checker.check_model(v.handle.to_onnx())


def test_export_torch_fallback_named_pt2_reopens(files, tmp_path):
    """export_variant writes TorchScript under a .pt2 name when torch.export refuses a model: the
    loader goes by the content, not the name."""
    d, _, x, ref = files
    handle = load_model(d / "scripted.pt", input_shape=(1, 8, 8))
    save_torchscript(handle, tmp_path / "fallback.pt2")
    again = load_model(tmp_path / "fallback.pt2")
    assert again.format == "torchscript"
    with torch.no_grad():
        np.testing.assert_allclose(again.module(x).numpy(), ref, atol=1e-4)


def test_cli_run_traced_with_data(files, tmp_path):
    d = files[0]
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'model = "{d / "traced.pt"}"\ndata = "{_image_data(tmp_path)}"\n'
                      '[measure]\nbatch = 8\n[[steps]]\ntechnique = "quantize"\nmethod = "static-int8"\n')
    assert main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["baseline"]["metrics"]["flops"] > 0
    assert report["variants"][0]["metrics"]["size_bytes"] < report["baseline"]["metrics"]["size_bytes"]


# --- architecture from the user's code ------------------------------------------------------------

ARCH_CODE = '''
import torch
from torch import nn


class ResNetish(nn.Module):
    def __init__(self, width=8, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.head = nn.Linear(width, classes)

    def forward(self, image):
        x = torch.relu(self.stem(image))
        x = x + self.block(x)
        return self.head(x.mean((2, 3)))


def build(width=8):
    return ResNetish(width=width)


def broken(width=8):
    raise ValueError("width must be even")
'''


@pytest.fixture()
def user_arch(tmp_path):
    code = tmp_path / "my_models.py"
    code.write_text(ARCH_CODE)
    ns: dict = {}
    exec(compile(ARCH_CODE, str(code), "exec"), ns)
    torch.manual_seed(1)
    model = ns["ResNetish"](width=12).eval()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(tmp_path / "weights.safetensors"))
    return tmp_path, code, model


@pytest.mark.parametrize("weights", ["weights.pt", "weights.safetensors"])
def test_user_architecture_rebuilds_state_dict_and_safetensors(user_arch, weights):
    d, code, model = user_arch
    handle = load_model(d / weights, arch=f"{code}:ResNetish", arch_kwargs={"width": 12}, trust=True,
                        input_shape=(1, 8, 8))
    assert handle.format == "state_dict" and handle.arch == f"{code}:ResNetish"
    assert handle.input_names == ["image"]  # from the user's forward signature
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        np.testing.assert_allclose(handle.module(x).numpy(), model(x).numpy(), atol=1e-5)


def test_user_architecture_needs_trust_and_names_the_file(user_arch):
    d, code, _ = user_arch
    for weights in ("weights.pt", "weights.safetensors"):
        with pytest.raises(UntrustedFileError, match="runs when the model is built") as info:
            load_model(d / weights, arch=f"{code}:ResNetish", arch_kwargs={"width": 12})
        assert weights in str(info.value) and "--trust" in str(info.value)


def test_user_architecture_errors_are_one_clear_line(user_arch, tmp_path):
    d, code, _ = user_arch
    cases = {
        f"{d / 'nope.py'}:ResNetish": "architecture file .*nope.py not found",
        f"{code}:ResNetsh": "has no class or function named 'ResNetsh'.*ResNetish",
        f"{code}:broken": r"building broken\(\*\*\{'width': 12\}\) raised ValueError: width must be even",
        "no_such_package_xyz.models:Net": "cannot import module 'no_such_package_xyz.models'",
    }
    for arch, pattern in cases.items():
        with pytest.raises(ModelLoadError, match=pattern):
            load_model(d / "weights.pt", arch=arch, arch_kwargs={"width": 12}, trust=True)
    with pytest.raises(ModelLoadError) as info:  # wrong width: every weight has the wrong shape
        load_model(d / "weights.pt", arch=f"{code}:ResNetish", arch_kwargs={"width": 8}, trust=True)
    assert "wrong shape" in str(info.value) and "stem.weight (12, 1, 3, 3) vs (8, 1, 3, 3)" in str(info.value)
    state = torch.load(d / "weights.pt")
    state["extra.weight"] = torch.zeros(2)
    del state["head.bias"]
    torch.save(state, tmp_path / "mismatch.pt")
    with pytest.raises(ModelLoadError) as info:
        load_model(tmp_path / "mismatch.pt", arch=f"{code}:ResNetish", arch_kwargs={"width": 12}, trust=True)
    text = str(info.value)
    assert "mismatch.pt" in text and "1 missing (head.bias)" in text and "1 unexpected (extra.weight)" in text


def test_user_architecture_from_a_package_factory(user_arch, monkeypatch):
    d, _, model = user_arch
    pkg = d / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(ARCH_CODE)
    monkeypatch.syspath_prepend(str(d))
    handle = load_model(d / "weights.pt", arch="userpkg.nets:build", arch_kwargs={"width": 12}, trust=True,
                        input_shape=(1, 8, 8))
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        np.testing.assert_allclose(handle.module(x).numpy(), model(x).numpy(), atol=1e-5)


def test_user_architecture_in_cli_and_recipe(user_arch, capsys):
    d, code, _ = user_arch
    args = ["info", str(d / "weights.safetensors"), "--arch", f"{code}:ResNetish",
            "--arch-kwargs", '{"width": 12}', "--input-shape", "1,8,8"]
    assert main(args) == 2  # not trusted: the code did not run
    err = capsys.readouterr().err
    assert "weights.safetensors" in err and "--trust" in err
    assert main([*args, "--trust", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] > 1000 and info["flops"] > 0 and info["format"] == "state_dict"
    with pytest.raises(SystemExit) as stop:
        main(["info", str(d / "weights.pt"), "--arch", "x.py:A", "--arch-kwargs", "[1]"])
    assert stop.value.code == 2
    assert "--arch-kwargs must be a JSON object" in capsys.readouterr().err
    # a recipe: arch relative to the recipe file, arch_kwargs a table, data gives the shapes; trust
    # comes from the command line and is never written back
    rng = np.random.default_rng(0)
    np.savez(d / "imgs.npz", pictures=rng.random((64, 1, 8, 8)).astype(np.float32), labels=rng.integers(0, 10, 64))
    recipe = d / "r.toml"
    recipe.write_text('model = "weights.safetensors"\ndata = "imgs.npz"\narch = "my_models.py:ResNetish"\n'
                      '[arch_kwargs]\nwidth = 12\n[measure]\nbatch = 8\n'
                      '[[steps]]\ntechnique = "prune"\nratio = 0.25\nround_to = 0\nfinetune_epochs = 0\n')
    assert main(["run", str(recipe), "--out", str(d / "out"), "--quiet"]) == 2
    assert main(["run", str(recipe), "--out", str(d / "out"), "--quiet", "--trust"]) == 0
    report = json.loads((d / "out" / "report.json").read_text())
    variant = report["variants"][0]
    assert variant["metrics"]["params"] < report["baseline"]["metrics"]["params"]
    assert variant["recipe"]["arch_kwargs"] == {"width": 12} and "trust" not in variant["recipe"]
    assert "trust" not in json.dumps(report)


def test_token_model_in_every_format_quantizes(tmp_path):
    """Two int64 inputs (ids + mask) named differently from the data's arrays; the .pt2 with a
    dynamic sequence is a flat graph whose Linear layers share one scope (quantizer node names)."""
    from helpers import TokenClassifier, token_data

    torch.manual_seed(0)
    model = TokenClassifier().eval()
    ids, mask = torch.randint(0, 17, (2, 12)), torch.ones(2, 12, dtype=torch.long)
    _quiet(torch.jit.trace, model, (ids, mask)).save(str(tmp_path / "tokens.pt"))
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", min=2, max=512)
    torch.export.save(_quiet(torch.export.export, model, (ids, mask),
                             dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq})), str(tmp_path / "tokens.pt2"))
    i, m, labels = token_data()
    np.savez(tmp_path / "tok.npz", input_ids=i, attention_mask=m, labels=labels)
    # without data, --input-shape: float inputs fail, integer ids are tried
    assert [s["dtype"] for s in model_info(str(tmp_path / "tokens.pt"), input_shape=(12,))["inputs"]] == ["int64"] * 2
    for name in ("tokens.pt", "tokens.pt2"):
        recipe = parse_recipe({"model": str(tmp_path / name), "data": str(tmp_path / "tok.npz")})
        recipe.measure = FAST
        base = prepare(recipe)
        assert any("by position" in w for w in base.handle.warnings)
        for method in ("dynamic-int8", "weight-only-int8"):  # both rewrite Gemm as MatMul + Add
            v = run_variant(base, recipe.with_steps(validate_steps([{"technique": "quantize", "method": method}])))
            assert v.status == "ok" and v.metrics["fidelity"]["top1_agreement"] >= 0.95, (name, method, v.error)
