"""Recipes: chained steps, validation messages (one line, exit code 2), and reproducing a variant."""

from __future__ import annotations

import json
import tomllib

import pytest

from sweep_support import write_recipe
from tugboat.cli import main
from tugboat.engine.running.recipe import load_recipe, parse_recipe, recipe_to_toml
from tugboat.engine.techniques import steps as step_registry

PRUNE = '[[steps]]\ntechnique = "prune"\nmethod = "structured"\nfinetune_epochs = 0\n'


@pytest.mark.parametrize("command", ["run", "sweep"])
@pytest.mark.parametrize("body, fragment", [
    ('[[steps]]\ntechnique = "prunning"\n', "unknown technique 'prunning'"),  # unknown technique
    ('[[steps]]\ntechnique = "prune"\nratoi = 0.5\n', "unknown prune parameter 'ratoi' (did you mean 'ratio'?)"),
    ('[[steps]]\ntechnique = "prune"\nratio = 1.5\n', "'steps.0.ratio' = 1.5 is out of range [0.0, 0.95]"),
    ('[[steps]]\ntechnique = "prune"\nmethod = "structral"\n', "did you mean 'structured'"),
    ('[[steps]]\ntechnique = "prune"\nratio = "half"\n', "must be a number"),
])
def test_invalid_recipe_gives_one_clear_line_and_exit_2(tmp_path, capsys, command, body, fragment):
    path = write_recipe(tmp_path, body)
    out = tmp_path / "out"
    assert main([command, str(path), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err, err
    assert len(err.splitlines()) == 1 and err.startswith("tugboat: error: ") and str(path) in err
    assert not (out / "workspace.json").exists()


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_missing_model_file_exits_2(tmp_path, capsys, command):
    path = tmp_path / "r.toml"
    path.write_text('model = "models/missing.onnx"\ndata = "demo:digits"\n' + PRUNE)
    out = tmp_path / "out"
    assert main([command, str(path), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing.onnx" in err and "not found" in err
    assert not out.exists()  # refused before any folder was made


@pytest.mark.parametrize("tables, fragment", [
    ('[sweep]\n"steps.0.ratoi" = [0.5]\n', "did you mean 'ratio'"),
    ('[sweep]\n"steps.0.ratio" = [0.5, 1.5]\n',
     "sweep combination (steps.0.ratio = 1.5): 'steps.0.ratio' = 1.5 is out of range"),
    ('[sweep]\n"steps.1.ratio" = [0.5]\n', "the recipe has 1 step(s)"),
    ('[sweep]\n"steps.0.ratio" = [0.5]\n[target]\nobjective = "size"\n', "'target.max_accuracy_drop' is missing"),
    ('[sweep]\n"steps.0.ratio" = [0.5]\n[target]\nmax_accuracy_drop = 0.01\nobjectiv = "size"\n',
     "did you mean 'objective'"),
    ('[sweep]\n"steps.0.ratio" = [0.5]\n[target]\nmax_accuracy_drop = 0.01\nobjective = "speed"\n',
     "must be one of latency, size"),
    ('[search]\nbudget_seconds = 10\n', "needs a [sweep] table"),
    ('[sweep]\n"steps.0.ratio" = {min = 0.1, max = 0.5}\n', "needs random or target search"),
])
def test_invalid_sweep_tables_exit_2_before_any_work(tmp_path, capsys, tables, fragment):
    path = write_recipe(tmp_path, PRUNE + tables)
    assert main(["sweep", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_steps_chain_and_round_trip_through_toml(tmp_path):
    registry = step_registry.techniques()
    body = PRUNE + '[[steps]]\ntechnique = "prune"\nmethod = "unstructured"\nratio = 0.3\n'
    if "distill" in registry:
        body += '[[steps]]\ntechnique = "distill"\n'
    recipe = load_recipe(write_recipe(tmp_path, body))
    assert [s["technique"] for s in recipe.steps][:2] == ["prune", "prune"]
    assert recipe.steps[0]["ratio"] == 0.5  # defaults filled in
    again = parse_recipe(tomllib.loads(recipe_to_toml(recipe)))
    assert again.steps == recipe.steps and again.model == recipe.model and again.data == recipe.data


def test_a_variants_recipe_reproduces_it(tmp_path, capsys):
    """The recipe.toml saved beside a sweep variant, run again, gives the same model."""
    path = write_recipe(tmp_path, PRUNE + '[sweep]\n"steps.0.ratio" = [0.3, 0.6]\n')
    assert main(["sweep", str(path), "--out", str(tmp_path / "ws"), "--quiet"]) == 0
    variant_dir = tmp_path / "ws" / "prune-structured-r0.6"
    saved = json.loads((variant_dir / "metrics.json").read_text())
    assert main(["run", str(variant_dir / "recipe.toml"), "--out", str(tmp_path / "again"), "--quiet"]) == 0
    rerun = json.loads((tmp_path / "again" / "report.json").read_text())["variants"][0]
    assert rerun["recipe"]["steps"] == saved["recipe"]["steps"]
    for key in ("size_bytes", "params", "nonzero_params", "flops", "accuracy"):
        assert rerun["metrics"][key] == saved["metrics"][key], key
