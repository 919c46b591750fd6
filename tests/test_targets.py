"""Issue 19: measure in the runtime a variant will run in, export what that runtime loads.

One static-int8 demo variant is measured in every installed runtime and exported to every format;
each file is loaded back in its runtime (independently of the export's own check) and compared with
the variant. Without an extra, its runtime is reported unavailable with the install command and
everything else still works."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from tugboat.engine.errors import Cancelled, RecipeError, TugboatError
from tugboat.engine.measuring import runtimes
from tugboat.engine.measuring.measure import MeasureConfig
from tugboat.engine.measuring.runtime import run_onnx
from tugboat.engine.measuring.targets import TARGETS, export_target
from tugboat.engine.progress import CancelToken, Progress
from tugboat.engine.running.recipe import Recipe, parse_recipe, validate_steps
from tugboat.engine.running.runner import prepare, run_variant

FAST = dict(batch=16, min_runs=3, min_seconds=0.01, max_seconds=0.2, also_batch1=False, both_runtimes=False)
INSTALLED = [r["name"] for r in runtimes.list_runtimes() if r["available"]]
FORMATS = [k for k in TARGETS if runtimes.availability(
    {"onnx": "onnxruntime", "ort": "onnxruntime", "pte": "executorch", "openvino": "openvino"}[k])["available"]]


@pytest.fixture
def no_openvino(monkeypatch):
    """The openvino extra absent (``import openvino`` fails as it does when it is not installed)."""
    monkeypatch.setitem(sys.modules, "openvino", None)


def test_runtime_list_in_recipes_is_validated():
    r = parse_recipe({"model": "demo:digits-cnn", "measure": {"runtime": ["openvino", "onnxruntime"]}})
    assert r.measure.runtime == "openvino" and r.measure.runtimes == ["openvino", "onnxruntime"]
    assert r.to_dict()["measure"]["runtime"] == ["openvino", "onnxruntime"]
    assert parse_recipe({"model": "demo:x", "measure": {"runtime": "torch"}}).measure.runtimes == []
    with pytest.raises(RecipeError, match=r"'openvnio'.*did you mean 'openvino'"):
        parse_recipe({"model": "demo:x", "measure": {"runtime": ["onnxruntime", "openvnio"]}})
    with pytest.raises(RecipeError, match="runtime name or a list"):
        parse_recipe({"model": "demo:x", "measure": {"runtime": 3}})


def test_missing_extra_is_unavailable_with_install_command_and_the_rest_works(no_openvino, demo_data, tmp_path,
                                                                               capsys):
    from tugboat.cli import main

    entry = runtimes.availability("openvino")
    assert not entry["available"] and entry["install"] == "pip install tugboat-ml[openvino]"
    assert "pip install tugboat-ml[openvino]" in entry["reason"]
    assert main(["info", "--runtimes"]) == 0
    listed = capsys.readouterr().out
    assert "openvino     not available" in listed and "pip install tugboat-ml[openvino]" in listed
    assert "onnxruntime  " in listed
    # a recipe that asks for it still measures: ONNX Runtime's figures, OpenVINO's reason
    cfg = MeasureConfig(**FAST, runtime="openvino", runtimes=["openvino", "onnxruntime"])
    recipe = Recipe(model="demo:digits-mlp", data="demo:digits", measure=cfg)
    base = prepare(recipe)
    per = base.metrics["runtimes"]
    assert not per["openvino"]["available"] and "tugboat-ml[openvino]" in per["openvino"]["reason"]
    assert per["onnxruntime"]["ok"] and per["onnxruntime"]["fidelity"]["top1_agreement"] == 1.0
    assert base.metrics["latency_ms"]["runtime"] == "onnxruntime"
    assert "openvino is not installed" in base.metrics["latency_ms"]["note"]
    # exporting for it: one line naming the install command, nothing written
    with pytest.raises(TugboatError, match=r"pip install tugboat-ml\[openvino\]"):
        export_target(base.handle, "openvino", tmp_path / "m.xml")
    assert not list(tmp_path.iterdir())
    assert "ort" in export_target(base.handle, "ort", tmp_path / "m")["kind"]


def _quantized_variant(cfg):
    """The baseline in ONNX Runtime only (lowering it for ExecuTorch too would cost seconds), the
    variant in ``cfg``'s runtimes."""
    steps = validate_steps([{"technique": "quantize", "method": "static-int8", "calibration_samples": 64}])
    base = prepare(Recipe(model="demo:digits-cnn", data="demo:digits", measure=MeasureConfig(**FAST)))
    base.cfg = cfg  # variants are measured with the baseline's settings
    recipe = Recipe(model="demo:digits-cnn", data="demo:digits", measure=cfg, steps=steps)
    return base, run_variant(base, recipe)


def _reload(kind: str, files: list[str], x: np.ndarray) -> np.ndarray:
    """The exported file run in its runtime, without Tugboat's export code."""
    if kind in ("onnx", "ort"):
        import onnxruntime as ort

        return ort.InferenceSession(files[0], providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    if kind == "openvino":
        import openvino as ov

        compiled = ov.Core().compile_model(ov.Core().read_model(files[0]), "CPU")
        return np.asarray(compiled([x])[compiled.outputs[0]])
    import torch
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(files[0]).load_method("forward")
    return method.execute([torch.from_numpy(x)])[0].numpy()


@pytest.mark.slow
def test_quantized_variant_in_every_installed_runtime_and_format(demo_data, tmp_path, capsys):
    """The done-when of issue 19 (ExecuTorch lowers once: the program is cached for the export)."""
    cfg = MeasureConfig(**FAST, runtime="onnxruntime", runtimes=list(runtimes.RUNTIME_NAMES))
    _base, variant = _quantized_variant(cfg)
    assert variant.status != "failed", variant.error
    per = variant.metrics["runtimes"]
    assert list(per) == list(runtimes.RUNTIME_NAMES)
    for name in INSTALLED:
        entry = per[name]
        if name == "torch":  # an ONNX Runtime int8 graph has no torch module: one line says so
            assert not entry["ok"] and entry["reason"].startswith("torch cannot run this variant: no torch module")
            assert "\n" not in entry["reason"]
            continue
        assert entry["ok"], entry
        assert entry["version"] and entry["latency_ms"]["median"] > 0 and entry["latency_ms"]["runtime"] == name
        assert entry["fidelity"]["top1_agreement"] >= 0.9, (name, entry["fidelity"])
    assert variant.metrics["latency_ms"]["runtime"] == "onnxruntime"  # the primary runtime's timing stays
    x = demo_data.split("test", limit=FAST["batch"])[0]["input"]
    expected = run_onnx(variant.handle.to_onnx(), [x])[0].argmax(1)
    for kind in FORMATS:
        result = export_target(variant.handle, kind, tmp_path / f"digits-int8.{kind}", data=demo_data,
                               batch=FAST["batch"])
        assert result["top1_agreement"] >= 0.9 and np.isfinite(result["max_abs_error"])
        for f in result["files"]:
            assert (tmp_path / f).stat().st_size > 0
        out = _reload(kind, result["files"], x)
        assert np.mean(out.argmax(1) == expected) >= 0.75, kind
    assert not [p for p in tmp_path.iterdir() if ".tugboat-" in p.name]  # no temporary file left
    names = {p.name for p in tmp_path.iterdir()}
    assert "digits-int8.ort" in names and "digits-int8.required_operators.config" in names
    config = (tmp_path / "digits-int8.required_operators.config").read_text()
    assert "QLinearConv" in config or "QuantizeLinear" in config  # the int8 operators a minimal build needs
    if "pte" in FORMATS:
        assert "int8" in export_target(variant.handle, "pte", tmp_path / "again.pte", batch=FAST["batch"])["quantized"]


def test_export_is_cancellable_and_leaves_nothing(demo_models, tmp_path):
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        export_target(demo_models("digits-mlp"), "ort", tmp_path / "m.ort", Progress(token=token))
    assert not list(tmp_path.iterdir())


def test_cli_export_from_a_run_folder(tmp_path, capsys):
    from tugboat.cli import main

    recipe = tmp_path / "r.toml"
    recipe.write_text('model = "demo:digits-mlp"\ndata = "demo:digits"\n[measure]\nbatch = 8\nmin_runs = 3\n'
                      'min_seconds = 0.01\nmax_seconds = 0.2\nalso_batch1 = false\nboth_runtimes = false\n')
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["export", str(out), "baseline", "--to", "ort", "--out", str(tmp_path / "mlp"), "--quiet"]) == 0
    line = capsys.readouterr().out
    assert "mlp.ort, mlp.required_operators.config reloaded in onnxruntime" in line
    assert "max-abs error 0" in line and "top-1 agreement 100.0%" in line
    assert main(["export", str(out), "nope", "--to", "onnx", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no variant named 'nope'" in err and str(out) in err and len(err.splitlines()) == 1


def test_report_shows_runtimes_and_refuses_a_malformed_entry(tmp_path, capsys):
    import json

    from tugboat.cli import main

    recipe = tmp_path / "r.toml"
    recipe.write_text('model = "demo:digits-mlp"\ndata = "demo:digits"\n[measure]\nbatch = 8\nmin_runs = 3\n'
                      'min_seconds = 0.01\nmax_seconds = 0.2\nalso_batch1 = false\nboth_runtimes = false\n'
                      'runtime = ["onnxruntime", "torch"]\n')
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "onnxruntime 1." in printed and "torch 2." in printed and "agreement 1.000" in printed
    report = json.loads((out / "report.json").read_text())
    assert set(report["baseline"]["metrics"]["runtimes"]) == {"onnxruntime", "torch"}
    report["baseline"]["metrics"]["runtimes"]["torch"] = ["not", "an", "object"]
    (out / "report.json").write_text(json.dumps(report))
    assert main(["report", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "runtimes.torch" in err and "must be an object" in err and len(err.splitlines()) == 1
