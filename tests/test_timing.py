"""Numbers you can trust: paired timing with an interval, verdicts only when real, re-measure,
the machine on record, and seeded, reproducible recipes (issue 17)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import jsonschema
import numpy as np
import pytest

from sweep_support import report_schema
from tugboat.cli import main
from tugboat.engine.machine import advice, describe, machine_info
from tugboat.engine.measuring.measure import is_timing_warning, measure, speedup_interval
from tugboat.engine.running.recipe import parse_recipe, validate_steps
from tugboat.engine.running.runner import judge_timing, prepare, run, run_variant

# small budgets: the demo CNN at batch 32 runs in about a millisecond
MEASURE = {"batch": 32, "threads": 1, "warmup": 2, "min_runs": 5, "min_seconds": 0.1, "max_seconds": 0.4,
           "also_batch1": False, "both_runtimes": False}


def _recipe(steps=(), data="demo:digits", **extra):
    raw = {"model": "demo:digits-cnn", "measure": dict(MEASURE), "steps": [dict(s) for s in steps], **extra}
    if data:
        raw["data"] = data
    return parse_recipe(raw)


@pytest.fixture(scope="module")
def cnn_baseline():
    return prepare(_recipe())


@pytest.fixture(scope="module")
def cnn_timing_only():
    """Without data: no quality pass, timing only (on seeded random inputs)."""
    return prepare(_recipe(data=None))


def _variant(base, *steps):
    recipe = _recipe(data="demo:digits" if base.data is not None else None)
    return run_variant(base, recipe.with_steps(validate_steps([dict(s) for s in steps])))


# --- the interval ---------------------------------------------------------------------------------

def test_speedup_interval_is_seeded_and_covers_the_median():
    rng = np.random.default_rng(1)
    ratios = list(np.exp(rng.normal(np.log(2.0), 0.05, 20)))
    med, lo, hi = speedup_interval(ratios)
    assert lo < med < hi and 1.9 < med < 2.1
    assert speedup_interval(ratios) == (med, lo, hi)  # seeded: the same blocks give the same interval
    # at least the systematic allowance either side, even when every block agrees exactly
    med, lo, hi = speedup_interval([1.0] * 10, systematic=0.02)
    assert lo == pytest.approx(1 / 1.02) and hi == pytest.approx(1.02)
    # more scatter, wider interval
    wide = speedup_interval(list(np.exp(rng.normal(0, 0.4, 20))))
    assert wide[2] / wide[1] > hi / lo


# --- paired timing on a busy machine ----------------------------------------------------------------

_BUSY = "import time\nend = time.time() + 60\nwhile time.time() < end:\n    pass\n"


@pytest.mark.slow
def test_same_speed_variant_is_never_flagged_on_a_busy_machine(cnn_timing_only):
    """A short version of benchmarks/measurement.py: unstructured pruning (the same dense graph, the
    same speed) measured 3 times beside a CPU-bound process: no "slower" verdict, and every interval
    reaches the 5% band around 1.0 unless the timing says it is noisy; dynamic int8 on the CNN
    (ConvInteger) is flagged."""
    busy = subprocess.Popen([sys.executable, "-c", _BUSY])
    try:
        time.sleep(0.2)
        v = _variant(cnn_timing_only, {"technique": "prune", "method": "unstructured", "ratio": 0.5})
        for i in range(3):
            if i:  # timing only (no quality pass), against the same kept baseline
                v.metrics, _ = measure(v.handle, None, cnn_timing_only.cfg, timing=cnn_timing_only.timing)
                judge_timing(v, cnn_timing_only.metrics)
            sp = v.metrics["latency_ms"]["speedup"]
            assert not any(w.startswith("slower than") for w in v.warnings), (v.warnings, sp)
            # the interval reaches into the 5% tolerance band (so no verdict either way); in the full
            # suite it once came out [0.942, 0.999], excluding 1.0 by 0.1%: holding 1.0 every time is
            # the benchmark's figure (benchmarks/measurement.py, 10 runs), not a unit-test promise
            assert sp["noisy"] or (sp["low"] <= 1.05 and sp["high"] >= 1 / 1.05), sp
            assert sp["blocks"] >= 2 and sp["baseline_median"] > 0
            lat = v.metrics["latency_ms"]
            assert lat["paired"] and lat["spread"] >= 1.0 and "load" in lat
        dyn = _variant(cnn_timing_only, {"technique": "quantize", "method": "dynamic-int8"})
    finally:
        busy.kill()
        busy.wait()
    slower = [w for w in dyn.warnings if w.startswith("slower than the original in onnxruntime at batch 32")]
    assert slower, dyn.warnings
    assert "95% interval" in slower[0]
    assert dyn.metrics["latency_ms"]["speedup"]["high"] < 1 / 1.05


def test_a_real_speed_up_excludes_one(cnn_baseline):
    v = _variant(cnn_baseline, {"technique": "quantize", "method": "static-int8"})
    sp = v.metrics["latency_ms"]["speedup"]
    assert sp["low"] > 1.0, sp
    assert not any(is_timing_warning(w) for w in v.warnings)
    # the baseline's session is kept for the next variant rather than rebuilt
    sessions = dict(cnn_baseline.timing._sessions)
    _variant(cnn_baseline, {"technique": "prune", "method": "structured", "ratio": 0.5})
    assert cnn_baseline.timing._sessions == sessions


def test_only_the_chosen_runtime_and_batch_give_verdicts(cnn_baseline):
    """torch and batch 1 are timed too, but as information: notes, never warnings."""
    recipe = _recipe(measure={**MEASURE, "also_batch1": True, "both_runtimes": True})
    base = prepare(recipe)
    v = run_variant(base, recipe.with_steps(validate_steps([{"technique": "prune", "method": "unstructured",
                                                             "ratio": 0.3}])))
    assert set(v.metrics["latency"]) == {"onnxruntime", "torch"}
    assert set(v.metrics["latency"]["torch"]) == {"b32", "b1"}
    assert "speedup" in v.metrics["latency"]["onnxruntime"]["b32"]
    assert "speedup" not in v.metrics["latency"]["torch"]["b1"]  # unpaired
    assert not any("torch" in w or "batch 1:" in w for w in v.warnings if is_timing_warning(w))
    assert any("unstructured sparsity" in n for n in v.info["notes"])


# --- the machine on record ------------------------------------------------------------------------

CPUINFO_OLD = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) CPU E5-2680 v4\nflags\t\t: fpu sse2 avx avx2 fma\n"


def test_machine_info_reads_isa_features_and_advice_follows_them():
    info = machine_info(CPUINFO_OLD)
    assert info["cpu"] == "Intel(R) Xeon(R) CPU E5-2680 v4"
    assert info["isa"] == {"avx2": True, "avx512": False, "vnni": False, "amx": False}
    assert info["runtimes"]["onnxruntime"] and info["runtimes"]["torch"] and info["cores"] >= 1
    assert "no VNNI" in describe(info)
    static = [{"technique": "quantize", "method": "static-int8"}]
    assert any("reduce_range" in n for n in advice(static, info))
    vnni = machine_info(CPUINFO_OLD.replace("avx2 fma", "avx2 fma avx512f avx512_vnni"))
    assert vnni["isa"]["vnni"] and not advice(static, vnni)
    here = machine_info()
    assert here["memory_bytes"] is None or here["memory_bytes"] > 2**20


def test_run_report_records_machine_speedup_and_seed(tmp_path):
    recipe = _recipe([{"technique": "prune", "method": "structured", "ratio": 0.5}])
    report = run(recipe, tmp_path)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    jsonschema.validate(on_disk, report_schema())
    assert on_disk["machine"]["cpu"] and "vnni" in on_disk["machine"]["isa"]
    assert on_disk["recipe"]["seed"] == 0
    sp = on_disk["variants"][0]["metrics"]["latency_ms"]["speedup"]
    assert {"median", "low", "high", "blocks"} <= set(sp)
    assert report["variants"][0]["recipe"]["seed"] == 0


# --- re-measure -----------------------------------------------------------------------------------

def _sweep(tmp_path, capsys):
    from sweep_support import FAST_MEASURE

    text = ('model = "demo:digits-cnn"\ndata = "demo:digits"\n[[steps]]\ntechnique = "prune"\n'
            'method = "structured"\nratio = 0.25\n[sweep]\n"steps.0.ratio" = [0.25, 0.5]\n' + FAST_MEASURE)
    path = tmp_path / "r.toml"
    path.write_text(text)
    ws = tmp_path / "ws"
    assert main(["sweep", str(path), "--out", str(ws), "--quiet"]) == 0
    capsys.readouterr()
    return ws


def test_remeasure_cli_retimes_and_saves(tmp_path, capsys):
    from tugboat.engine.running.workspace import Workspace

    ws_path = _sweep(tmp_path, capsys)
    before = Workspace.open(ws_path)
    name = before.names()[1]
    other = before.names()[0]
    old_other = before.get(other).metrics["latency_ms"]
    # as if the first timing had been disturbed: a noisy verdict to be replaced
    v = before.get(name)
    v.warnings.append("timing too noisy: re-measure (stale)")
    before.save()
    assert main(["remeasure", str(ws_path), name, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert name in out and "x [" in out and "machine:" in out
    after = Workspace.open(ws_path)
    lat = after.get(name).metrics["latency_ms"]
    assert lat["speedup"]["low"] > 1.0  # a 0.5 structured prune of the CNN is faster, paired
    assert "timing too noisy: re-measure (stale)" not in after.get(name).warnings
    assert after.get(other).metrics["latency_ms"] == old_other  # not named: untouched
    report = json.loads((ws_path / "report.json").read_text())
    assert report["remeasured"]["variants"] == [name] and report["machine"]["cpu"]
    record = json.loads((ws_path / after._folders[name] / "metrics.json").read_text())
    assert record["metrics"]["latency_ms"] == lat
    # the HTML and CSV reports carry the interval and the machine too
    assert main(["report", str(ws_path), "--csv", str(tmp_path / "t.csv"), "--html", str(tmp_path / "t.html")]) == 0
    capsys.readouterr()
    header, *lines = (tmp_path / "t.csv").read_text().splitlines()
    assert "speedup_low" in header and len(lines) == 3
    html = (tmp_path / "t.html").read_text()
    assert "speed-up [95%]" in html and "Measured on:" in html
    from tugboat.engine.lock import FolderLock

    with FolderLock(ws_path, "a sweep (test)"):  # someone else writes the workspace: refused, nothing lost
        assert main(["remeasure", str(ws_path), "--quiet"]) == 2
    assert "in use" in capsys.readouterr().err
    assert main(["remeasure", str(tmp_path / "nowhere"), "--quiet"]) == 2
    assert "not a Tugboat workspace" in capsys.readouterr().err and not (tmp_path / "nowhere").exists()
    assert main(["remeasure", str(ws_path), "no-such-variant", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(ws_path) in err and "no-such-variant" in err and len(err.strip().splitlines()) == 1


# --- a seed in every recipe -----------------------------------------------------------------------

def test_a_recipe_seed_reproduces_a_fine_tuned_prune_byte_for_byte(cnn_baseline):
    step = {"technique": "prune", "method": "structured", "ratio": 0.5, "finetune_epochs": 1}

    def artifact(seed):
        recipe = _recipe(seed=seed)
        v = run_variant(cnn_baseline, recipe.with_steps(validate_steps([dict(step)])))
        assert v.recipe["seed"] == seed
        return v.handle.to_onnx().SerializeToString()

    first = artifact(0)
    np.random.seed(123)  # whatever ran before must not matter
    assert artifact(0) == first
    assert artifact(7) != first


def test_seed_is_validated():
    from tugboat.engine.errors import RecipeError

    assert _recipe(seed=42).seed == 42
    with pytest.raises(RecipeError, match="'seed' must be a whole number"):
        _recipe(seed=-1)
    with pytest.raises(RecipeError, match="'seed'"):
        _recipe(seed="x")


def test_fewer_flops_but_no_speed_up_is_a_warning_with_a_cause():
    from tugboat.engine.measuring.measure import flops_promise

    base = {"flops": 1_000_000}
    sp = {"median": 0.98, "low": 0.95, "high": 1.02, "blocks": 8, "noisy": False}
    variant = {"flops": 450_000, "latency_ms": {"speedup": sp}}
    odd = [{"technique": "prune", "method": "structured", "ratio": 0.5, "round_to": 0}]
    warning = flops_promise(variant, base, odd)
    assert len(warning) == 1 and "2.22x fewer FLOPs" in warning[0]
    assert re.search(r"multiples of (8|16) run on slower kernels on this CPU \(measured\): try round_to = (8|16)",
                     warning[0]), warning[0]
    assert is_timing_warning(warning[0])  # replaced on re-measure
    rounded = [{**odd[0], "round_to": 16}]
    assert "round_to" not in flops_promise(variant, base, rounded)[0]
    faster = {"flops": 450_000, "latency_ms": {"speedup": {**sp, "median": 1.9, "low": 1.8, "high": 2.0}}}
    assert flops_promise(faster, base, odd) == []
    assert flops_promise({**variant, "flops": 900_000}, base, odd) == []  # no big FLOPs promise
    noisy = {"flops": 450_000, "latency_ms": {"speedup": {**sp, "noisy": True}}}
    assert flops_promise(noisy, base, odd) == []


def test_a_noisy_original_timing_is_flagged_and_cleared_by_remeasure():
    from tugboat.engine.measuring.measure import own_timing_warnings
    from tugboat.engine.measuring.remeasure import remeasure
    from tugboat.engine.running.variants import Variant

    noisy = {"latency_ms": {"median": 13.7, "p90": 14.2 * 7, "spread": 7.1, "load": 3.5, "noisy": True}}
    warning = own_timing_warnings(noisy)
    assert len(warning) == 1 and warning[0].startswith("timing too noisy: re-measure (the original")
    assert own_timing_warnings({"latency_ms": {"median": 2.0, "spread": 1.05, "noisy": False}}) == []

    # re-measuring replaces the stale warning (the same demo CNN, timed again)
    base = prepare(_recipe(data=None))
    original = Variant("baseline", {}, {**base.metrics, **noisy}, warnings=list(warning))
    remeasure(base.handle, original, [], base.cfg, timing=base.timing)
    assert warning[0] not in original.warnings
    assert original.metrics["latency_ms"]["median"] < 13.7


def test_paired_timing_is_decided_by_blocks_not_by_a_minimum_time():
    """Short blocks (min_seconds / 32) and no minimum time for a paired timing: a clear 2x speed-up is
    decided after min_blocks blocks, whatever min_seconds (for unpaired timings) says; the interval
    is still reported, and a window that cannot decide is still extended and marked noisy."""
    from tugboat.engine.measuring.measure import MeasureConfig, latency_paired

    def work(n):
        return lambda: sum(range(n))

    assert MeasureConfig().block_seconds == pytest.approx(0.25 / 32)
    cfg = MeasureConfig(min_seconds=30.0, max_seconds=1.0, warmup=1, block_seconds=0.004)
    out = latency_paired(work(20000), work(40000), [np.zeros((1, 1))], cfg, "onnxruntime")
    sp = out["speedup"]
    if not sp["extended"]:  # decided at once: the fewest blocks that give min_blocks and min_runs
        assert sp["blocks"] == max(cfg.min_blocks, -(-cfg.min_runs // sp["runs_per_block"]))
    assert sp["low"] <= sp["median"] <= sp["high"] and 1.3 < sp["median"] < 3.0
    assert sp["noisy"] == (sp["width"] > cfg.max_width)
    # a variant whose time jumps around: the interval stays wide, the timing is extended, then marked
    state = {"i": 0}

    def erratic():
        state["i"] += 1
        sum(range(40000 if state["i"] % 3 else 400000))

    cfg = MeasureConfig(min_seconds=0.0, max_seconds=0.3, warmup=1, block_seconds=0.002, max_width=0.05)
    out = latency_paired(erratic, work(40000), [np.zeros((1, 1))], cfg, "onnxruntime")
    assert out["speedup"]["extended"] and out["speedup"]["noisy"] and out["noisy"]
