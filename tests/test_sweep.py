"""Sweeps: grid expansion and naming, prefix reuse, random and target search, resume, reports."""

from __future__ import annotations

import json
from html import escape as html_escape

import jsonschema
import pytest

from sweep_support import ROOT, count_calls, install_scale, report_schema, write_recipe
from tugboat.cli import main
from tugboat.engine.errors import Cancelled, RecipeError
from tugboat.engine.progress import Progress
from tugboat.engine.running.recipe import load_recipe, parse_recipe
from tugboat.engine.running.report_json import quality_of
from tugboat.engine.running.runner import prepare, run_variant
from tugboat.engine.running.sweep import PrefixCache, grid, plan, run_sweep
from tugboat.engine.running.workspace import Workspace
from tugboat.engine.techniques import steps as step_registry


@pytest.fixture
def scale(monkeypatch):
    return install_scale(monkeypatch)


SCALE_TWO_STEPS = """
[[steps]]
technique = "scale"
factor = 2.0
[[steps]]
technique = "scale"
factor = 0.5
[sweep]
"steps.0.factor" = [2.0, 3.0]
"steps.1.factor" = [0.5, 0.25, 4.0]
"""


def test_grid_names_every_combination_uniquely_in_prefix_order(scale, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, SCALE_TWO_STEPS))
    cands = grid(recipe)
    assert len(cands) == 6
    assert len({c.name for c in cands}) == 6
    assert cands[0].name == "scale-weights+scale-weights~s0.factor=2,s1.factor=0.5"
    # the first step varies slowest: neighbours share the prefix
    firsts = [c.steps[0]["factor"] for c in cands]
    assert firsts == [2.0, 2.0, 2.0, 3.0, 3.0, 3.0]
    # names that the short label cannot tell apart carry the sweep values
    assert all("factor=" in c.name for c in cands)
    assert cands[1].overrides == {"steps.0.factor": 2.0, "steps.1.factor": 0.25}


def test_switching_method_drops_parameters_of_the_old_one(scale, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, """
[[steps]]
technique = "scale"
method = "noise"
sigma = 0.1
[sweep]
"steps.0.method" = ["noise", "weights"]
"""))
    a, b = grid(recipe)
    assert a.steps[0] == {"technique": "scale", "method": "noise", "factor": 1.0, "sigma": 0.1}
    assert b.steps[0] == {"technique": "scale", "method": "weights", "factor": 1.0}
    assert a.name != b.name


@pytest.mark.parametrize("sweep, fragment", [
    ('"steps.0.factr" = [1.0]', "did you mean 'factor'"),
    ('"steps.3.factor" = [1.0]', "1 step(s)"),
    ('"steps.0.factor" = [1.0, 50.0]', "out of range [0.1, 10.0]"),
    ('"steps.0.method" = ["weights", "nosie"]', "did you mean 'noise'"),
    ('"steps.0.factor" = []', "empty list"),
    ('"ratio" = [1.0]', "steps.<step number>"),
])
def test_every_combination_is_validated_before_running(scale, tmp_path, sweep, fragment):
    recipe = load_recipe(write_recipe(tmp_path, f'[[steps]]\ntechnique = "scale"\n[sweep]\n{sweep}\n'))
    with pytest.raises(RecipeError) as err:
        plan(recipe)
    assert fragment in str(err.value)


def test_prefix_cache_keeps_only_shared_prefixes(scale, tmp_path):
    cands = grid(load_recipe(write_recipe(tmp_path, SCALE_TWO_STEPS)))
    cache = PrefixCache.for_candidates(cands)
    assert sorted(cache.needed.values()) == [3, 3]  # two prefixes, each shared by three variants


def test_sweep_reuses_shared_prefixes(scale, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, SCALE_TWO_STEPS))
    result = run_sweep(recipe, tmp_path / "ws")
    assert len(result.tried) == 6
    # each of the 2 first-step settings ran once, each of the 6 second steps once: 8 applies, not 12
    first = [c["factor"] for c in scale.calls if c["factor"] in (2.0, 3.0)]
    second = [c["factor"] for c in scale.calls if c["factor"] not in (2.0, 3.0)]
    assert first == [2.0, 3.0] and len(second) == 6
    reused = [v for v in result.variants if v.info.get("reused_prefix_steps") == 1]
    assert len(reused) == 4
    # a reused prefix gives the same model as computing it afresh
    by = {tuple(v.info["sweep"].values()): v for v in result.variants}
    v_fresh = by[(2.0, 0.5)]
    v_reused = by[(2.0, 0.25)]
    assert v_fresh.info.get("reused_prefix_steps") is None and v_reused.info["reused_prefix_steps"] == 1
    # factor 2 * 0.5 = 1: the original model's outputs
    assert v_fresh.metrics["fidelity"]["rel_error"] < 1e-5
    fresh = run_variant(prepare(recipe), recipe.with_steps(v_reused.recipe["steps"]))
    assert fresh.metrics["fidelity"]["rel_error"] == pytest.approx(v_reused.metrics["fidelity"]["rel_error"],
                                                                  rel=1e-4)
    assert fresh.metrics["fidelity"]["rel_error"] > 0.01  # a real change, not the original again


def test_sweep_writes_a_valid_report_and_reopens(scale, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, SCALE_TWO_STEPS))
    result = run_sweep(recipe, tmp_path / "ws")
    report = json.loads((tmp_path / "ws" / "report.json").read_text())
    jsonschema.validate(report, report_schema())
    assert len(report["variants"]) == 6 and report["pareto"]
    assert set(report["pareto"]) <= {v["name"] for v in report["variants"]} | {"baseline"}

    ws = Workspace.open(tmp_path / "ws")
    assert ws.names() == result.tried
    for v in ws.variants():
        assert v.metrics == result.workspace.get(v.name).metrics
        assert (ws.folder(v.name) / "recipe.toml").is_file()
        # each variant's recipe re-parses to the exact steps that made it
        again = parse_recipe(v.recipe)
        assert again.steps == v.recipe["steps"]
    handle = ws.load_handle(result.tried[0])
    assert handle.onnx_model is not None and ws.get(result.tried[0]).handle is handle


def test_random_search_respects_max_variants_and_ranges(scale, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, """
[[steps]]
technique = "scale"
[sweep]
"steps.0.factor" = {min = 0.5, max = 4.0}
[search]
budget_seconds = 120
max_variants = 3
seed = 7
"""))
    result = run_sweep(recipe, tmp_path / "ws")
    assert result.kind == "random" and len(result.tried) == 3
    factors = [v.recipe["steps"][0]["factor"] for v in result.variants]
    assert len(set(factors)) == 3 and all(0.5 <= f <= 4.0 for f in factors)
    # resuming the same seeded search skips the three and stops at max_variants
    again = run_sweep(recipe, tmp_path / "ws", resume=True)
    assert again.tried == [] and len(again.skipped) == 3


def test_random_search_stops_at_the_time_budget(scale, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, """
[[steps]]
technique = "scale"
[sweep]
"steps.0.factor" = {min = 0.5, max = 4.0}
[search]
budget_seconds = 0.0
"""))
    result = run_sweep(recipe, tmp_path / "ws")
    assert result.stopped_by_budget and result.tried == []


def test_target_search_tries_everything_and_returns_the_best_within_tolerance(tmp_path):
    step_registry.get("prune")
    recipe = load_recipe(write_recipe(tmp_path, """
[[steps]]
technique = "prune"
method = "structured"
finetune_epochs = 1
[sweep]
"steps.0.ratio" = [0.1, 0.2, 0.4, 0.6]
[target]
max_accuracy_drop = 0.03
objective = "size"
budget_seconds = 300
"""))
    result = run_sweep(recipe, tmp_path / "ws")
    ws = result.workspace
    assert len(result.tried) == 4  # it did not stop at the first variant within tolerance
    base_q = quality_of(ws.baseline.metrics)
    within = [v for v in ws.variants() if base_q - quality_of(v.metrics) <= 0.03]
    assert within, [(v.name, quality_of(v.metrics)) for v in ws.variants()]
    assert result.best == min(within, key=lambda v: v.metrics["size_bytes"]).name
    assert set(result.within) == {v.name for v in within}
    report = json.loads((tmp_path / "ws" / "report.json").read_text())
    jsonschema.validate(report, report_schema())
    assert report["target"]["best"] == result.best
    assert sorted(report["target"]["tried"]) == sorted(v["name"] for v in report["variants"])
    # the ratios really trade quality for size
    sizes = {v.recipe["steps"][0]["ratio"]: v.metrics["size_bytes"] for v in ws.variants()}
    assert sizes[0.6] < sizes[0.1]


def test_cancelled_sweep_resumes_without_redoing_finished_variants(scale, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, SCALE_TWO_STEPS))
    seen = []

    def stop_after_two(variant):
        seen.append(variant.name)
        if len(seen) == 2:
            progress.token.cancel()

    progress = Progress()
    with pytest.raises(Cancelled):
        run_sweep(recipe, tmp_path / "ws", progress=progress, on_variant=stop_after_two)
    assert Workspace.open(tmp_path / "ws").names() == seen
    scale.calls.clear()
    result = run_sweep(recipe, tmp_path / "ws", resume=True)
    assert result.skipped == seen and len(result.tried) == 4
    assert not set(seen) & set(result.tried)
    # the four left: (2, 4) and (3, *): prefix 2.0 computed again once (not kept on disk), 3.0 once
    assert sorted(c["factor"] for c in scale.calls if c["factor"] in (2.0, 3.0)) == [2.0, 3.0]
    assert len(scale.calls) == 6
    assert len(Workspace.open(tmp_path / "ws")) == 6


def test_a_failing_combination_is_recorded_and_the_sweep_goes_on(scale, tmp_path, capsys):
    path = write_recipe(tmp_path, '[[steps]]\ntechnique = "scale"\n[sweep]\n"steps.0.factor" = [9.0, 2.0]\n')
    assert main(["sweep", str(path), "--out", str(tmp_path / "ws"), "--quiet"]) == 0
    assert "refuses a factor of 9" in capsys.readouterr().out
    report = json.loads((tmp_path / "ws" / "report.json").read_text())
    jsonschema.validate(report, report_schema())
    assert [v["status"] for v in report["failed"]] == ["failed"] and len(report["variants"]) == 1
    # a failed combination counts as finished: --resume does not retry it
    scale.calls.clear()
    assert main(["sweep", str(path), "--out", str(tmp_path / "ws"), "--quiet", "--resume"]) == 0
    assert scale.calls == []


def test_existing_workspace_needs_resume(scale, tmp_path, capsys):
    path = write_recipe(tmp_path, '[[steps]]\ntechnique = "scale"\n[sweep]\n"steps.0.factor" = [2.0]\n')
    assert main(["sweep", str(path), "--out", str(tmp_path / "ws"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["sweep", str(path), "--out", str(tmp_path / "ws"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and err.count("\n") == 1
    assert main(["sweep", str(path), "--out", str(tmp_path / "ws"), "--quiet", "--resume"]) == 0
    assert "1 kept from before" in capsys.readouterr().out


def test_report_command_writes_html_and_csv(scale, tmp_path, capsys):
    path = write_recipe(tmp_path, SCALE_TWO_STEPS.replace("4.0]", "4.0]\n"))
    assert main(["sweep", str(path), "--out", str(tmp_path / "ws"), "--quiet"]) == 0
    html, csv_path = tmp_path / "r.html", tmp_path / "r.csv"
    assert main(["report", str(tmp_path / "ws"), "--html", str(html), "--csv", str(csv_path)]) == 0
    text = html.read_text()
    assert "data:image/png;base64," in text and "src='http" not in text  # self-contained
    ws = Workspace.open(tmp_path / "ws")
    for v in ws.variants():
        assert v.name.replace("&", "&amp;") in text
    assert text.count("<pre>") == 6 and 'technique = "scale"' in text
    for w in {w for v in ws.variants() for w in v.warnings}:
        assert html_escape(w) in text
    import csv

    rows = list(csv.DictReader(csv_path.open()))
    assert [r["name"] for r in rows] == ["baseline", *ws.names()]
    assert float(rows[0]["size_bytes"]) == ws.baseline.metrics["size_bytes"]
    # the PNG decodes and is a real picture
    import base64
    import re

    png = base64.b64decode(re.search(r"base64,([A-Za-z0-9+/=]+)", text).group(1))
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_report_command_reads_a_run_folder(tmp_path, capsys):
    path = write_recipe(tmp_path, "")
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert main(["report", str(tmp_path / "run"), "--csv", str(tmp_path / "r.csv")]) == 0
    assert "baseline" in (tmp_path / "r.csv").read_text()
    assert main(["report", str(tmp_path / "nothing")]) == 2


# --- end to end with the real techniques ----------------------------------------------------------

def _real(name: str):
    registry = step_registry.techniques()
    assert name in registry, f"the {name} technique is not registered"
    return registry[name]


def _fast(recipe):
    from helpers import FAST

    recipe.measure = FAST
    return recipe


def test_readme_sweep_structured_ratios_x_quantization_methods(tmp_path, capsys):
    """examples/sweep-cnn.toml (fine-tuning shortened, fast timing): >= 9 variants, a Pareto front,
    report.json per the schema and the HTML report."""
    _real("prune"), _real("quantize")
    recipe = _fast(load_recipe(ROOT / "examples" / "sweep-cnn.toml"))
    recipe.steps[0]["finetune_epochs"] = 1
    the_plan = plan(recipe)
    assert the_plan.kind == "grid" and len(the_plan.candidates) >= 9
    result = run_sweep(recipe, tmp_path / "ws")
    ws = result.workspace
    assert len(ws) == len(the_plan.candidates) and all(v.status == "ok" for v in ws.variants()), \
        [(v.name, v.error) for v in ws.variants()]
    # each pruning ratio was computed once and reused by the other quantization methods
    assert sum(1 for v in ws.variants() if v.info.get("reused_prefix_steps") == 1) == len(ws) - 3
    report = json.loads((tmp_path / "ws" / "report.json").read_text())
    jsonschema.validate(report, report_schema())
    assert report["pareto"] and len(report["variants"]) >= 9
    # more pruning, smaller file, measured
    size = {(v.recipe["steps"][0]["ratio"], v.recipe["steps"][1]["method"]): v.metrics["size_bytes"]
            for v in ws.variants()}
    assert size[(0.75, "static-int8")] < size[(0.25, "static-int8")] < ws.baseline.metrics["size_bytes"]
    assert main(["report", str(tmp_path / "ws"), "--html", str(tmp_path / "r.html")]) == 0
    assert "data:image/png;base64," in (tmp_path / "r.html").read_text()


def test_prefix_reuse_prunes_once_for_four_quantization_methods(tmp_path, monkeypatch):
    methods = list(_real("quantize").methods)
    _real("prune")
    preferred = [m for m in ("static-int8", "dynamic-int8", "fp16", "weight-only-int8") if m in methods]
    chosen = (preferred + [m for m in methods if m not in preferred and "qat" not in m])[:4]
    assert len(chosen) == 4, methods
    recipe = _fast(load_recipe(write_recipe(tmp_path, f"""
[[steps]]
technique = "prune"
method = "structured"
ratio = 0.4
finetune_epochs = 1
[[steps]]
technique = "quantize"
method = "{chosen[0]}"
[sweep]
"steps.1.method" = {json.dumps(chosen)}
""")))
    prune_calls = count_calls(monkeypatch, "prune")
    quant_calls = count_calls(monkeypatch, "quantize")
    result = run_sweep(recipe, tmp_path / "ws")
    assert len(result.tried) == 4
    assert len(prune_calls) == 1 and sorted(c["method"] for c in quant_calls) == sorted(chosen)
    ok = [v for v in result.variants if v.status == "ok"]
    assert ok and all(v.metrics["params"] < result.workspace.baseline.metrics["params"] for v in ok)
