"""The recipe format: a model, data, and ordered compression steps, read from TOML and validated.

The TOML format is the one in DESIGN.md. Validation goes through the technique registry
(:mod:`tugboat.engine.techniques.steps`), so every unknown name gets the closest valid one and every
out-of-range value its range. Running a recipe is :mod:`.runner`; what a run produces (variants,
their names, the baseline) is :mod:`.variants`.
"""

from __future__ import annotations

import copy
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..devices import check as check_device
from ..errors import TRUST_OPTION, DeviceError, RecipeError
from ..formatting import did_you_mean
from ..io.data import check_regular_file
from ..io.tasks import check_task
from ..measuring.measure import MeasureConfig
from ..measuring.runtimes import RUNTIME_NAMES
from ..stored import TRUST_KEYS, recipe_dict_to_toml, without_trust  # noqa: F401  (without_trust: its old home)
from ..techniques import steps as step_registry

TOP_LEVEL_KEYS = {"model", "data", "steps", "sweep", "measure", "target", "name", "trust", "arch",
                  "input_shape", "search", "arch_kwargs", "task", "seed", "constants"}
MEASURE_KEYS = {"batch": (1, 65536), "threads": (1, 256), "runtime": RUNTIME_NAMES, "warmup": (0, 1000),
                "min_runs": (1, 100000), "min_seconds": (0.0, 600.0), "max_seconds": (0.01, 3600.0),
                "also_batch1": bool, "both_runtimes": bool, "min_blocks": (2, 10000),
                "block_seconds": (0.0, 60.0), "max_width": (0.01, 10.0), "noisy_seconds": (0.0, 3600.0),
                "confidence": (0.5, 0.999), "systematic": (0.0, 0.5), "device": str}
DEFAULT_SEED = 0


@dataclass
class Recipe:
    model: str
    data: str | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    sweep: dict[str, list[Any]] = field(default_factory=dict)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    target: dict[str, Any] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    trust: bool = False  # per run only (tugboat run/sweep --trust): never read from a file, never written
    # per run only: files named by steps (a distillation student_file) may be unpickled. The CLI's
    # --trust sets both; the app's confirmation names one model file and sets only ``trust``
    trust_steps: bool = False
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)  # for a user architecture ("file.py:Name")
    input_shape: list[int] | None = None
    constants: dict[str, Any] = field(default_factory=dict)  # a scripted forward's non-tensor arguments
    task: str | None = None  # overrides the task inferred from the model's outputs (tasks.TASKS)
    source: str | None = None  # the recipe file, for messages and relative paths
    notes: list[str] = field(default_factory=list)  # warnings found while reading (printed by the CLI)
    seed: int = DEFAULT_SEED  # torch / numpy / random seeds of every step (reproducible weights)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"model": self.model}
        optional = {"data": self.data, "name": self.name, "arch": self.arch,
                    "arch_kwargs": dict(self.arch_kwargs or {}), "input_shape": list(self.input_shape or []),
                    "constants": dict(self.constants or {}), "task": self.task}
        d.update({k: v for k, v in optional.items() if v})  # in this order; empty ones left out
        d["seed"] = self.seed
        d["steps"] = [dict(s) for s in self.steps]
        m = self.measure
        d["measure"] = {"batch": m.batch, "threads": m.threads,
                        "runtime": [m.runtime, *[r for r in m.runtimes if r != m.runtime]] if m.runtimes
                        else m.runtime}
        if m.device != "cpu":
            d["measure"]["device"] = m.device
        if self.sweep:
            d["sweep"] = dict(self.sweep)
        if self.target:
            d["target"] = dict(self.target)
        if self.search:
            d["search"] = dict(self.search)
        return d

    def with_steps(self, steps: list[dict[str, Any]]) -> Recipe:
        new = copy.deepcopy(self)
        new.steps, new.sweep, new.target, new.search = [dict(s) for s in steps], {}, {}, {}
        return new


def parse_recipe(raw: dict[str, Any], source: str | None = None) -> Recipe:
    """Validate a recipe dictionary (as read from TOML) into a :class:`Recipe`."""
    where = source or "recipe"
    if not isinstance(raw, dict):
        raise RecipeError("a recipe must be a table of keys", path=where)
    for key in raw:
        if key not in TOP_LEVEL_KEYS:
            raise RecipeError(f"unknown key {key!r}" + did_you_mean(key, TOP_LEVEL_KEYS), path=where)
    model = raw.get("model")
    if not isinstance(model, str) or not model:
        raise RecipeError("'model' is missing (a file path or demo:NAME)", path=where)
    data = raw.get("data")
    if data is not None and not isinstance(data, str):
        raise RecipeError("'data' must be a string (a file path or demo:NAME)", path=where)
    base = Path(source).parent if source else None
    model, data = _resolve(model, base), _resolve(data, base) if data else None
    raw_steps = raw.get("steps", [])
    if not isinstance(raw_steps, list) or not all(isinstance(s, dict) for s in raw_steps):
        raise RecipeError("'steps' must be a list of tables ([[steps]])", path=where)
    notes: list[str] = []
    steps = validate_steps(raw_steps, where, notes)
    cfg = _parse_measure(raw.get("measure", {}), where)
    _check_tables(raw, where)
    if raw.get("trust"):
        notes.append(f"{where}: 'trust = true' is ignored: trust is never read from a file; "
                     f"{TRUST_OPTION}")
    return Recipe(model=model, data=data, steps=steps, sweep=dict(raw.get("sweep", {})), measure=cfg,
                  target=dict(raw.get("target", {}) or {}), search=dict(raw.get("search", {}) or {}),
                  name=raw.get("name"), trust=False, arch=_resolve_arch(raw.get("arch"), base),
                  arch_kwargs=dict(raw.get("arch_kwargs") or {}), input_shape=_input_shape(raw, where),
                  task=_task(raw, where), source=source, notes=notes, seed=_seed(raw, where),
                  constants=dict(raw.get("constants") or {}))


def _check_tables(raw: dict[str, Any], where: str) -> None:
    """The type of every top-level key that is neither model, data, steps nor measure."""
    if not isinstance(raw.get("sweep", {}), dict):
        raise RecipeError("'sweep' must be a table of parameter lists", path=where)
    for key in ("target", "search"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise RecipeError(f"'{key}' must be a table", path=where)
    for key in ("name", "arch"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise RecipeError(f"'{key}' must be a string, got {raw[key]!r}", path=where)
    if raw.get("arch_kwargs") is not None and not isinstance(raw["arch_kwargs"], dict):
        raise RecipeError(f"'arch_kwargs' must be a table of keyword arguments, got {raw['arch_kwargs']!r}",
                          path=where)
    if raw.get("constants") is not None and not isinstance(raw["constants"], dict):
        raise RecipeError(f"'constants' must be a table like {{sr = 16000}}, got {raw['constants']!r}", path=where)
    if not isinstance(raw.get("trust", False), bool):
        raise RecipeError(f"'trust' must be true or false, got {raw['trust']!r}", path=where)


def _seed(raw: dict[str, Any], where: str) -> int:
    seed = raw.get("seed", DEFAULT_SEED)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise RecipeError(f"'seed' must be a whole number from 0 to 4294967295, got {seed!r}", path=where)
    return seed


def _input_shape(raw: dict[str, Any], where: str) -> list[int] | None:
    shape = raw.get("input_shape")
    if shape is not None and (not isinstance(shape, list) or not shape or not all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        raise RecipeError(f"'input_shape' must be a list of positive whole numbers (without the batch), "
                          f"e.g. [1, 8, 8]; got {shape!r}", path=where)
    return shape


def _task(raw: dict[str, Any], where: str) -> str | None:
    task = raw.get("task")
    if task is None:
        return None
    try:
        return check_task(task) if isinstance(task, str) else check_task(repr(task))
    except ValueError as exc:
        raise RecipeError(f"'task': {exc}", path=where) from None


def _resolve_arch(arch: str | None, base: Path | None) -> str | None:
    """A relative ``models.py:Name`` is relative to the recipe file, like the model and data."""
    if not arch or ":" not in arch:
        return arch
    target, _, name = arch.rpartition(":")
    if target.endswith(".py") and base is not None and not os.path.isabs(target):
        return f"{base / target}:{name}"
    return arch


def _resolve(ref: str | None, base: Path | None) -> str | None:
    if ref is None or ref.startswith("demo:") or base is None or os.path.isabs(ref):
        return ref
    return str(base / ref)


def validate_steps(raw_steps: list[dict[str, Any]], where: str = "recipe",
                   notes: list[str] | None = None) -> list[dict[str, Any]]:
    """Validated steps with defaults filled in. Trust flags (``student_trust``, from recipes and
    reports of older versions) are dropped, with a note when one said true: trust is a per-run
    decision and never comes from a file."""
    steps = []
    for i, raw in enumerate(raw_steps):
        loc = f"steps.{i}"
        if any(k in raw for k in TRUST_KEYS):
            if any(raw[k] is not False for k in TRUST_KEYS if k in raw) and notes is not None:
                notes.append(f"{where}: '{loc}.student_trust' is ignored: trust is never read from a "
                             f"file; {TRUST_OPTION}")
            raw = {k: v for k, v in raw.items() if k not in TRUST_KEYS}
        name = raw.get("technique")
        if not isinstance(name, str):
            raise RecipeError(f"'{loc}.technique' is missing (prune, quantize or distill)", path=where)
        try:
            tech = step_registry.get(name, f"{loc}.technique")
            steps.append(tech.validate(raw, loc))
        except RecipeError as exc:
            raise RecipeError(exc.message, path=where) from None
    # a technique allowed once (quantize: a quantized graph, QDQ pairs and integer kernels, is no
    # input for another quantizer; ONNX Runtime fails deep inside)
    for name in dict.fromkeys(s["technique"] for s in steps if step_registry.get(s["technique"]).once):
        same = [i for i, s in enumerate(steps) if s["technique"] == name]
        if len(same) > 1:
            i, j = same[0], same[1]
            raise RecipeError(f"'steps.{j}': a second {name} step ({steps[j]['method']}) after steps.{i} "
                              f"({steps[i]['method']}) would {name} its output again; "
                              f"use one {name} step", path=where)
    # a step whose output is ONNX-only (e.g. ONNX Runtime int8) cannot feed a torch step
    for i, s in enumerate(steps[:-1]):
        tech = step_registry.get(s["technique"])
        nxt = step_registry.get(steps[i + 1]["technique"])
        if tech.final and nxt.needs_torch:
            raise RecipeError(f"'steps.{i + 1}': {nxt.name} needs a torch model, but steps.{i} "
                              f"({s['technique']} {s['method']}) produces an ONNX-only model; "
                              f"put {s['technique']} last", path=where)
    return steps


def _parse_measure(raw: dict[str, Any], where: str) -> MeasureConfig:
    if not isinstance(raw, dict):
        raise RecipeError("'measure' must be a table", path=where)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in MEASURE_KEYS:
            raise RecipeError(f"unknown key 'measure.{key}'" + did_you_mean(key, MEASURE_KEYS), path=where)
        if key == "runtime":
            kwargs.update(_measure_runtimes(value, where))
        elif key == "device":
            try:
                kwargs[key] = check_device(value, "measure.device")
            except DeviceError as exc:
                raise RecipeError(exc.message, path=where) from None
        else:
            kwargs[key] = _measure_value(key, value, where)
    return MeasureConfig(**kwargs)


def _measure_runtimes(value: Any, where: str) -> dict[str, Any]:
    """``measure.runtime``: a name or a list of them; the first is ``runtime``, all are ``runtimes``."""
    rule = MEASURE_KEYS["runtime"]
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise RecipeError("'measure.runtime' must be a runtime name or a list of them "
                          f"({', '.join(rule)}), got {value!r}", path=where)
    for name in names:
        if name not in rule:
            raise RecipeError(f"'measure.runtime' must be one of {', '.join(rule)}, got {name!r}"
                              + did_you_mean(name, rule), path=where)
    names = list(dict.fromkeys(names))
    return {"runtime": names[0], "runtimes": names} if len(names) > 1 else {"runtime": names[0]}


def _measure_value(key: str, value: Any, where: str) -> Any:
    """One ``[measure]`` value checked against its rule in :data:`MEASURE_KEYS` (a flag, a choice or
    a range; a whole-number range makes it an int)."""
    rule = MEASURE_KEYS[key]
    if rule is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"'measure.{key}' must be true or false", path=where)
    elif isinstance(rule, tuple) and isinstance(rule[0], str):
        if value not in rule:
            raise RecipeError(f"'measure.{key}' must be one of {', '.join(rule)}, got {value!r}"
                              + did_you_mean(str(value), rule), path=where)
    else:
        lo, hi = rule
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
            raise RecipeError(f"'measure.{key}' = {value!r} is out of range [{lo}, {hi}]", path=where)
        if isinstance(lo, int):
            value = int(value)
    return value


def load_recipe(path: str | os.PathLike) -> Recipe:
    path = Path(path)
    if not path.exists():
        raise RecipeError("recipe file not found", path=str(path))
    if path.is_dir():
        raise RecipeError("is a folder, not a recipe file", path=str(path))
    check_regular_file(path, RecipeError)  # a FIFO would block the read forever
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"not valid TOML: {exc}", path=str(path)) from None
    except (UnicodeDecodeError, OSError) as exc:
        raise RecipeError(f"could not be read as text ({exc})", path=str(path)) from None
    return parse_recipe(raw, str(path))


def recipe_to_toml(recipe: Recipe | dict[str, Any]) -> str:
    return recipe_dict_to_toml(recipe.to_dict() if isinstance(recipe, Recipe) else recipe)


