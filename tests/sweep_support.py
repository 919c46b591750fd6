"""Shared by the recipe / sweep / workspace tests: a tiny test-only technique and recipe files."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from tugboat.engine.errors import TugboatError
from tugboat.engine.techniques import steps as step_registry
from tugboat.engine.techniques.steps import Param, Technique

ROOT = Path(__file__).resolve().parents[1]

FAST_MEASURE = """
[measure]
batch = 32
threads = 1
warmup = 1
min_runs = 3
min_seconds = 0.0
max_seconds = 0.5
also_batch1 = false
both_runtimes = false
"""


def report_schema() -> dict:
    for candidate in (ROOT.parent / "shared" / "report.schema.json", ROOT / "tests" / "data" / "report.schema.json"):
        if candidate.exists():
            return json.loads(candidate.read_text())
    pytest.fail("report.schema.json not found")


class ScaleTechnique:
    """Test-only technique: multiplies every weight by ``factor`` (``noise`` method: adds seeded
    Gaussian noise of std ``sigma`` first). Counts its calls so tests can see prefix reuse."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def apply(self, handle, params, data, progress):
        self.calls.append(dict(params))
        if params["factor"] == 9.0:
            raise TugboatError("the scale technique refuses a factor of 9 (test)")
        module = copy.deepcopy(handle.torch_module())
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in module.parameters():
                if params["method"] == "noise":
                    p.add_(torch.randn(p.shape, generator=gen) * params["sigma"])
                p.mul_(params["factor"])
        progress.update(1.0, "scaled")
        return handle.derive(module=module)

    def technique(self) -> Technique:
        return Technique(
            name="scale", title="Scale (test only)", summary="multiplies weights",
            methods={"weights": "multiply", "noise": "add noise, then multiply"},
            default_method="weights",
            params=[Param("factor", "float", 1.0, "multiplier", minimum=0.1, maximum=10.0),
                    Param("sigma", "float", 0.0, "noise std", minimum=0.0, maximum=1.0, methods=("noise",))],
            apply=self.apply, needs_torch=True)


def install_scale(monkeypatch) -> ScaleTechnique:
    """Register the test-only ``scale`` technique for one test (use from a fixture)."""
    step_registry.techniques()  # real techniques registered first
    tech = ScaleTechnique()
    monkeypatch.setitem(step_registry._REGISTRY, "scale", tech.technique())
    return tech


def write_recipe(folder: Path, body: str, name: str = "recipe.toml", measure: bool = True) -> Path:
    path = folder / name
    path.write_text('model = "demo:digits-cnn"\ndata = "demo:digits"\n' + body + (FAST_MEASURE if measure else ""))
    return path


def count_calls(monkeypatch, technique_name: str) -> list:
    """Wrap a registered technique's apply to count its calls."""
    tech = step_registry.get(technique_name)
    calls: list = []
    original = tech.apply

    def counting(handle, params, data, progress):
        calls.append(dict(params))
        return original(handle, params, data, progress)

    monkeypatch.setattr(tech, "apply", counting)
    return calls
