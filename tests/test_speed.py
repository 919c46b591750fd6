"""No wasted seconds (issue 17, item 7): what a command or the window does not need is not imported.

Each check runs a fresh interpreter (imports are per process) and asserts on ``sys.modules``."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch._dynamo", "sympy", "sklearn", "openvino", "executorch", "onnx2torch")


def _modules_after(code: str) -> dict:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in {list(HEAVY)!r} if m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_info_of_the_demo_imports_no_compiler_stack():
    """``tugboat info demo:digits-cnn``: no torch._dynamo / sympy (FLOPs per layer come from the
    exported graph), no scikit-learn (the digits are read from its CSV file)."""
    code = ("import io, contextlib\nfrom tugboat.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n    assert main(['info', 'demo:digits-cnn']) == 0")
    assert _modules_after(code) == []


def test_demo_data_and_example_inputs_import_nothing_heavy():
    code = ("from tugboat.engine.io.loading import load_model\nfrom tugboat.engine.io.data import load_data\n"
            "h = load_model('demo:digits-cnn')\nd = load_data('demo:digits', h)\nh.example_inputs(4)")
    assert _modules_after(code) == []


def test_runtimes_listed_without_import_match_the_loaded_list():
    """The window lists runtimes without importing OpenVINO / ExecuTorch (about 1 s at start)."""
    probe = ("import json, sys\nfrom tugboat.engine.measuring.runtimes import list_runtimes\n"
             "print(json.dumps([(r['name'], r['available']) for r in list_runtimes(load=False)]))\n"
             "print(json.dumps(sorted(m for m in ('openvino', 'executorch') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=300)
    quick, imported = (json.loads(line) for line in out.stdout.strip().splitlines()[-2:])
    assert imported == []
    from tugboat.engine.measuring.runtimes import list_runtimes

    assert [tuple(x) for x in quick] == [(r["name"], r["available"]) for r in list_runtimes()]


def test_layer_flops_from_the_graph_match_the_flop_counter(demo_models):
    """Per-layer FLOPs now come from the exported graph: the same numbers FlopCounterMode gives."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from tugboat.engine.measuring.measure import layer_table

    handle = demo_models("digits-cnn")
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        handle.module(*handle.example_inputs(1))
    counted = {k.split(".", 1)[-1]: int(sum(v.values())) for k, v in counter.get_flop_counts().items()}
    rows = {r["name"]: r["flops"] for r in layer_table(handle) if r["flops"]}
    assert rows and all(rows[name] == counted.get(name) for name in rows), (rows, counted)


def test_an_onnx_model_is_converted_to_torch_only_when_a_step_needs_it(tmp_path, demo_models):
    from tugboat.engine.io.export import write_onnx
    from tugboat.engine.running.capabilities import needs_torch_module
    from tugboat.engine.running.recipe import parse_recipe

    path = write_onnx(demo_models("digits-mlp"), tmp_path / "mlp.onnx")

    def recipe(*steps, **extra):
        return parse_recipe({"model": str(path), "data": "demo:digits", "steps": list(steps), **extra})

    quant = {"technique": "quantize", "method": "dynamic-int8"}
    assert not needs_torch_module(recipe(quant))
    assert needs_torch_module(recipe())  # the window's load: any step may follow
    assert needs_torch_module(recipe({"technique": "prune", "method": "structured", "ratio": 0.5}, quant))
    assert needs_torch_module(recipe({**quant, "method": "qat-int8"}))
    assert needs_torch_module(recipe(quant, measure={"runtime": "torch"}))
    code = ("from tugboat.engine.running.recipe import parse_recipe\n"
            "from tugboat.engine.running.runner import prepare, run_variant\n"
            f"r = parse_recipe({{'model': {str(path)!r}, 'data': 'demo:digits', 'steps': [{quant!r}],"
            f" 'measure': {{'batch': 16, 'threads': 1, 'min_runs': 3, 'min_seconds': 0.0, 'max_seconds': 0.2}}}})\n"
            f"base = prepare(r)\nv = run_variant(base, r)\nassert v.status == 'ok', v.error\n"
            f"assert v.metrics['size_bytes'] < base.metrics['size_bytes']")
    assert "onnx2torch" not in _modules_after(code)
