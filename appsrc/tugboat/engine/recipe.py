"""Recipes: a model, data, and ordered compression steps; loading, validation and running.

The TOML format is the one in DESIGN.md. Validation goes through the technique registry
(:mod:`tugboat.engine.steps`), so every unknown name gets the closest valid one and every
out-of-range value its range. Running a recipe measures the baseline, applies the steps, measures
the variant with the same settings and writes artifacts plus ``report.json``.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import os
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import cancellable, memory
from . import steps as step_registry
from .capabilities import needs_torch_module
from .data import Dataset, check_labels_fit, check_regular_file, load_data
from .devices import check as check_device
from .errors import TRUST_OPTION, Cancelled, DeviceError, NumericalError, RecipeError, ResourceError, TugboatError
from .formatting import did_you_mean
from .guards import (
    INDEX_MARKERS,
    check_outputs,
    describe_step,
    first_run_error,
    non_finite,
    probe_inputs,
    probe_outputs,
)
from .measure import (
    MeasureConfig,
    TimingReference,
    flops_promise,
    is_timing_warning,
    measure,
    own_timing_warnings,
    slower_than,
    timing_notes,
)
from .models import ModelHandle, load_model
from .progress import Progress, null_progress
from .runtime import fixed_batch
from .runtimes import RUNTIME_NAMES
from .steps import NO_CHANGE
from .stored import TRUST_KEYS, recipe_dict_to_toml, without_trust  # noqa: F401  (without_trust: its old home)
from .tasks import set_task

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
        if self.data:
            d["data"] = self.data
        if self.name:
            d["name"] = self.name
        if self.arch:
            d["arch"] = self.arch
        if self.arch_kwargs:
            d["arch_kwargs"] = dict(self.arch_kwargs)
        if self.input_shape:
            d["input_shape"] = list(self.input_shape)
        if self.constants:
            d["constants"] = dict(self.constants)
        if self.task:
            d["task"] = self.task
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
    sweep = raw.get("sweep", {})
    if not isinstance(sweep, dict):
        raise RecipeError("'sweep' must be a table of parameter lists", path=where)
    for key in ("target", "search"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise RecipeError(f"'{key}' must be a table", path=where)
    for key in ("name", "arch"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise RecipeError(f"'{key}' must be a string, got {raw[key]!r}", path=where)
    seed = raw.get("seed", DEFAULT_SEED)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise RecipeError(f"'seed' must be a whole number from 0 to 4294967295, got {seed!r}", path=where)
    if raw.get("arch_kwargs") is not None and not isinstance(raw["arch_kwargs"], dict):
        raise RecipeError(f"'arch_kwargs' must be a table of keyword arguments, got {raw['arch_kwargs']!r}",
                          path=where)
    if raw.get("constants") is not None and not isinstance(raw["constants"], dict):
        raise RecipeError(f"'constants' must be a table like {{sr = 16000}}, got {raw['constants']!r}", path=where)
    if not isinstance(raw.get("trust", False), bool):
        raise RecipeError(f"'trust' must be true or false, got {raw['trust']!r}", path=where)
    if raw.get("trust"):
        notes.append(f"{where}: 'trust = true' is ignored: trust is never read from a file; "
                     f"{TRUST_OPTION}")
    shape = raw.get("input_shape")
    if shape is not None and (not isinstance(shape, list) or not shape or not all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        raise RecipeError(f"'input_shape' must be a list of positive whole numbers (without the batch), "
                          f"e.g. [1, 8, 8]; got {shape!r}", path=where)
    task = raw.get("task")
    if task is not None:
        from .tasks import check_task

        try:
            task = check_task(task) if isinstance(task, str) else check_task(repr(task))
        except ValueError as exc:
            raise RecipeError(f"'task': {exc}", path=where) from None
    recipe = Recipe(model=model, data=data, steps=steps, sweep=dict(sweep), measure=cfg,
                    target=dict(raw.get("target", {}) or {}), search=dict(raw.get("search", {}) or {}),
                    name=raw.get("name"), trust=False, arch=_resolve_arch(raw.get("arch"), base),
                    arch_kwargs=dict(raw.get("arch_kwargs") or {}), input_shape=shape, task=task, source=source,
                    constants=dict(raw.get("constants") or {}),
                    notes=notes, seed=seed)
    return recipe


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
    kwargs = {}
    for key, value in raw.items():
        if key not in MEASURE_KEYS:
            raise RecipeError(f"unknown key 'measure.{key}'" + did_you_mean(key, MEASURE_KEYS), path=where)
        rule = MEASURE_KEYS[key]
        if rule is bool:
            if not isinstance(value, bool):
                raise RecipeError(f"'measure.{key}' must be true or false", path=where)
        elif key == "runtime":
            names = [value] if isinstance(value, str) else value
            if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
                raise RecipeError("'measure.runtime' must be a runtime name or a list of them "
                                  f"({', '.join(rule)}), got {value!r}", path=where)
            for name in names:
                if name not in rule:
                    raise RecipeError(f"'measure.runtime' must be one of {', '.join(rule)}, got {name!r}"
                                      + did_you_mean(name, rule), path=where)
            names = list(dict.fromkeys(names))
            kwargs["runtime"] = names[0]
            if len(names) > 1:
                kwargs["runtimes"] = names
            continue
        elif key == "device":
            try:
                value = check_device(value, "measure.device")
            except DeviceError as exc:
                raise RecipeError(exc.message, path=where) from None
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
        kwargs[key] = value
    return MeasureConfig(**kwargs)


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


# --- running -------------------------------------------------------------------------------------

def step_label(step: dict[str, Any]) -> str:
    """A short, readable name for a step: ``prune-structured-r0.5`` (its technique's label hook;
    a technique this build lacks, named in a stored report, gets technique and method)."""
    tech = step_registry.find(step.get("technique"))
    if tech is None:
        return "-".join(str(p) for p in (step.get("technique"), step.get("method")) if p)
    return tech.step_label(step)


def variant_name(steps: list[dict[str, Any]]) -> str:
    return "+".join(step_label(s) for s in steps) if steps else "baseline"


def settings_difference(steps: list[dict[str, Any]], other: list[dict[str, Any]]) -> str:
    """What ``steps`` set differently from ``other`` (same chain), as ``key=value`` pairs, e.g.
    ``finetune_epochs=0,lr=0.01``: told apart in a name where :func:`step_label` shows neither."""
    parts = []
    for i, step in enumerate(steps):
        before = other[i] if i < len(other) else {}
        for key, value in step.items():
            if key in ("technique", "method") or before.get(key) == value:
                continue
            if isinstance(value, float):
                text = f"{value:g}"
            elif isinstance(value, (list, tuple)):
                text = ",".join(map(str, value)) or "none"
            else:
                text = str(value).lower() if isinstance(value, bool) else str(value)
            parts.append(f"{key}={text}" if len(steps) == 1 else f"{i + 1}.{key}={text}")
    return ",".join(parts)


@dataclass
class Variant:
    name: str
    recipe: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    status: str = "ok"  # ok | failed | cancelled
    error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)  # per-technique extras (kept layers, curves)
    handle: ModelHandle | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "recipe": self.recipe, "metrics": self.metrics,
             "artifacts": self.artifacts, "warnings": self.warnings, "status": self.status,
             "error": self.error}
        if self.info:
            d["info"] = _jsonable(self.info)
        return d


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def seed_everything(seed: int) -> None:
    """Seed the global torch, numpy and ``random`` generators (fine-tuning, distillation, dropout,
    anything a technique draws without its own generator)."""
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_seed(seed: int, index: int) -> int:
    """The seed of recipe step ``index`` (0-based): a prefix computed once in a sweep and the same
    prefix computed alone draw the same numbers."""
    return (int(seed) * 1_000_003 + index) % 2**32


def apply_steps(handle: ModelHandle, steps: list[dict[str, Any]], data: Dataset | None,
                progress: Progress, *, first_index: int = 0, guard: bool = True,
                trust: bool = False, seed: int = DEFAULT_SEED) -> ModelHandle:
    """Apply validated steps in order; each technique returns a new handle.

    After every step the new model runs on a small probe batch (:mod:`guards`): NaN or Inf outputs
    raise :class:`NumericalError` naming the step ("outputs are NaN after step 2 (quantize
    static-int8)"; ``first_index`` is the number of recipe steps applied before ``steps``). Running
    out of memory inside a step raises :class:`ResourceError` naming the step. ``trust`` (this run's
    decision, never part of a step) reaches techniques that load files (``extras["loads_files"]``).

    Every step starts from seeded generators (:func:`step_seed` of the recipe's ``seed``), and a
    technique's own ``seed`` parameter is offset by the recipe seed, so a re-run of a recipe
    reproduces the same weights and a different recipe seed draws different ones."""
    n = max(1, len(steps))
    probe = probe_inputs(handle, data) if guard and steps else None
    for i, step in enumerate(steps):
        tech = step_registry.get(step["technique"])
        sub = progress.sub(i / n, (i + 1) / n, prefix=f"{step['technique']}: ")
        params = {k: v for k, v in step.items() if k not in ("technique", "method")}
        params["method"] = step["method"]
        if tech.extras.get("loads_files"):
            params["trust"] = bool(trust)
        params["seed"] = int(params.get("seed", 0)) + int(seed)
        this_seed = step_seed(seed, first_index + i)
        if tech.needs_torch and handle.module is None:
            why = handle.conversion_error or "this model is ONNX-only"
            raise TugboatError(f"{tech.name} needs a torch model, but {why}", path=handle.source)
        progress.check()
        before = len(handle.history)
        label = describe_step(first_index + i + 1, step)
        out_of_memory = False
        try:  # on a helper thread: a cancel is honoured within cancellable.POLL_S, at any point
            handle = cancellable.call(lambda f=tech.apply, h=handle, p=params, s=sub, k=this_seed: (
                seed_everything(k), f(h, p, data, s))[1], progress, name=f"tugboat-{tech.name}")
        except Exception as exc:
            if not memory.is_out_of_memory(exc):
                raise
            out_of_memory = True  # raised outside the handler so the failed step's tensors are freed
        if out_of_memory:
            gc.collect()
            raise ResourceError(memory.oom_message(f"in {label}"))
        if len(handle.history) <= before:  # the technique did not record the step itself
            handle.history = [*handle.history, step]
        reason = handle.info.pop(NO_CHANGE, None)
        if reason:  # a step that changed nothing is said so, never passed off as done
            handle.info["unchanged_steps"] = [*handle.info.get("unchanged_steps", []), first_index + i]
            handle.warnings = [*handle.warnings, f"{label} changed nothing: {reason}"]
        progress.check()
        if probe is not None:
            check_outputs(handle, probe, label)
    return handle


@dataclass
class Baseline:
    """The loaded original model, its data, metrics and test outputs (the reference)."""

    handle: ModelHandle
    data: Dataset | None
    metrics: dict[str, Any]
    outputs: list[np.ndarray] | None
    cfg: MeasureConfig
    # the baseline kept ready for paired timing (sessions alive across variants); see measure.py
    timing: TimingReference | None = None


def prepare(recipe: Recipe, progress: Progress | None = None) -> Baseline:
    progress = progress or null_progress()
    progress.update(0.0, f"loading {recipe.model}")
    def load():
        handle = load_model(recipe.model, trust=recipe.trust, arch=recipe.arch,
                            input_shape=tuple(recipe.input_shape) if recipe.input_shape else None,
                            arch_kwargs=recipe.arch_kwargs or None, constants=recipe.constants or None,
                            torch_module=needs_torch_module(recipe))
        set_task(handle, recipe.task)
        if handle.pending is not None and not recipe.data:  # no input shapes in the file, no data
            from .formats import require_shapes

            require_shapes(handle)
        return handle, (load_data(recipe.data, handle) if recipe.data else None)

    handle, data = cancellable.call(load, progress, name="tugboat-load")
    cfg = recipe.measure
    fixed = fixed_batch(handle)
    if fixed and (cfg.batch != fixed or cfg.also_batch1):
        # a graph exported with a constant batch runs at no other: measure it (and every variant,
        # to compare like with like) at that batch, and say so
        handle.warnings.append(f"the model's batch size is fixed to {fixed}: latency is measured at batch "
                               f"{fixed}, not {cfg.batch}")
        cfg = dataclasses.replace(cfg, batch=fixed, also_batch1=False)
    # refuse what cannot fit before any work, for the baseline and every step of the recipe
    memory.check(handle, recipe.steps, data, cfg, where=recipe.source or recipe.model)
    probe = probe_inputs(handle, data)
    try:
        outputs = probe_outputs(handle, probe)
    except TugboatError:
        raise
    except Exception as exc:  # the first run of the original model: one line, naming model or data
        if memory.is_out_of_memory(exc):
            raise
        raise first_run_error(exc, handle, data) from None
    if data is not None and handle.task == "classification" and outputs and outputs[0].ndim == 2:
        # the class count is known for sure only now when the output shape is symbolic
        check_labels_fit(data, int(outputs[0].shape[1]), recipe.model)
    bad = non_finite(outputs)
    if bad:
        on = f"{len(probe[0])} samples of the data" if data is not None else f"{len(probe[0])} random inputs"
        raise NumericalError(f"the model's outputs are {bad} on {on}; it cannot be measured or "
                             f"compressed", path=recipe.model)
    progress.update(0.3, "measuring the original model")
    metrics = outputs = None
    try:
        metrics, outputs = cancellable.call(
            lambda: measure(handle, data, cfg, reference=None,
                            progress=progress.sub(0.3, 1.0, "baseline: ")), progress, name="tugboat-measure")
    except TugboatError as exc:
        if data is not None and any(m in exc.message.lower() for m in INDEX_MARKERS):
            raise first_run_error(exc, handle, data) from None  # a bad token id beyond the probe's
        raise
    except Cancelled:
        raise
    except Exception as exc:
        if not memory.is_out_of_memory(exc):
            raise first_run_error(exc, handle, data) from None
    if metrics is None:
        gc.collect()
        raise ResourceError(memory.oom_message("measuring the original model"), path=recipe.model)
    handle.warnings = [w for w in handle.warnings if not is_timing_warning(w)] + own_timing_warnings(metrics)
    return Baseline(handle, data, metrics, outputs, cfg, timing_reference(handle, data, cfg))


def timing_reference(handle: ModelHandle, data: Dataset | None, cfg: MeasureConfig) -> TimingReference:
    """The baseline ready for paired timing, on the same real samples every variant is timed on."""
    samples = data.split("test", limit=cfg.batch)[0] if data is not None else None
    return TimingReference(handle, samples)


def finish_variant(variant: Variant, handle: ModelHandle, base: Baseline,
                   progress: Progress) -> Variant:
    """Measure a produced handle against the baseline and fill in the variant."""
    if base.timing is None:
        base.timing = timing_reference(base.handle, base.data, base.cfg)
    metrics, _ = cancellable.call(
        lambda: measure(handle, base.data, base.cfg, reference=base.outputs, progress=progress,
                        timing=base.timing), progress, name="tugboat-measure")
    variant.metrics = metrics
    variant.handle = handle
    variant.info.update(handle.info)
    variant.warnings += handle.warnings[len(base.handle.warnings):]
    judge_timing(variant, base.metrics)
    return variant


def judge_timing(variant: Variant, baseline_metrics: dict[str, Any]) -> None:
    """Replace the variant's timing verdict (:func:`measure.slower_than`) and information notes
    (other runtimes and batches, advice for this machine and these steps)."""
    from .machine import advice

    variant.warnings = [w for w in variant.warnings if not is_timing_warning(w)]
    steps = list((variant.recipe or {}).get("steps") or [])
    variant.warnings += slower_than(variant.metrics, baseline_metrics)
    variant.warnings += flops_promise(variant.metrics, baseline_metrics, steps)
    notes = timing_notes(variant.metrics, baseline_metrics)
    notes += advice(steps)
    if notes:
        variant.info["notes"] = notes
    else:
        variant.info.pop("notes", None)


def run_variant(base: Baseline, recipe: Recipe, progress: Progress | None = None,
                start: ModelHandle | None = None, done_steps: int = 0) -> Variant:
    """Apply ``recipe.steps`` (from ``start`` after ``done_steps`` steps, for prefix reuse) and
    measure. Numerical failures become a failed variant with the reason, not garbage metrics."""
    progress = progress or null_progress()
    variant = Variant(variant_name(recipe.steps), recipe.to_dict())
    t0 = time.perf_counter()
    todo = recipe.steps[done_steps:]
    memory.check(start or base.handle, todo, base.data, base.cfg, first_index=done_steps,
                    where=recipe.source or recipe.model)
    out_of_memory = False
    try:
        handle = apply_steps(start or base.handle, todo, base.data, progress.sub(0.0, 0.7),
                             first_index=done_steps, trust=recipe.trust_steps, seed=recipe.seed)
        unchanged = set(handle.info.get("unchanged_steps", []))
        if unchanged:  # the name claims only the steps that did something
            done = [s for i, s in enumerate(recipe.steps) if i not in unchanged]
            variant.name = variant_name(done) if done else "unchanged"
        finish_variant(variant, handle, base, progress.sub(0.7, 1.0, "measuring: "))
    except NumericalError as exc:
        variant.status, variant.error = "failed", f"numerical failure: {exc.message}"
    except Cancelled:
        variant.status, variant.error = "cancelled", "cancelled by the user"
        raise
    except Exception as exc:
        if not memory.is_out_of_memory(exc):
            raise
        out_of_memory = True
    if out_of_memory:
        variant.handle = None
        gc.collect()
        raise ResourceError(memory.oom_message(f"measuring {variant.name}"))
    if variant.metrics:
        variant.metrics["seconds"] = round(time.perf_counter() - t0, 3)
    return variant


def write_variant_artifacts(variant: Variant, folder: str | os.PathLike) -> dict[str, str]:
    """Write the variant's ONNX artifact (and torch file where there is one), atomically."""
    from .export import write_onnx

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if variant.handle is None:
        return {}
    safe = _safe_name(variant.name)
    path = write_onnx(variant.handle, folder / f"{safe}.onnx")
    variant.artifacts["onnx"] = str(path.relative_to(folder)) if path.is_relative_to(folder) else str(path)
    return variant.artifacts


def _safe_name(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_.+" else "_" for c in name)
    return keep[:120] or "variant"


def run(recipe: Recipe, out_dir: str | os.PathLike, progress: Progress | None = None) -> dict[str, Any]:
    """``tugboat run``: baseline, one variant (if the recipe has steps), artifacts, report.json.

    ``out_dir`` is checked first (writable, not a sweep workspace) and locked while the run writes it
    (:mod:`lock`): a second run or sweep on it is refused with the PID that holds it."""
    from .lock import locked_output
    from .stored import WORKSPACE_FILE

    progress = progress or null_progress()
    out = Path(out_dir)
    if (out / WORKSPACE_FILE).is_file():  # its report.json belongs to the sweep: never replace it
        raise TugboatError("holds a sweep workspace; tugboat run would replace its report.json. Choose "
                           "another --out folder (or add the steps to the sweep and use tugboat sweep "
                           "--resume)", path=str(out))
    with locked_output(out, "tugboat run"):  # an existing file, read-only, full: before any work
        return _run_locked(recipe, out, progress)


def _run_locked(recipe: Recipe, out: Path, progress: Progress) -> dict[str, Any]:
    from .report_json import build_report, write_report

    base = prepare(recipe, progress.sub(0.0, 0.3 if recipe.steps else 0.9))
    variants: list[Variant] = []
    baseline_variant = Variant("baseline", recipe.with_steps([]).to_dict(), base.metrics, handle=base.handle)
    if recipe.steps:
        variants.append(run_variant(base, recipe, progress.sub(0.3, 0.95)))
    progress.check()  # a cancelled run writes nothing: every file is written after all the work
    write_variant_artifacts(baseline_variant, out)
    for v in variants:
        if v.status == "ok":
            write_variant_artifacts(v, out)
    report = build_report(recipe, base.metrics, variants, baseline_artifacts=baseline_variant.artifacts)
    write_report(report, out / "report.json")
    progress.update(1.0, "done")
    return report
