"""Running a recipe: load and measure the original (:func:`prepare`), apply steps (:func:`apply_steps`,
guarded against NaN, out of memory and cancels), measure each variant against the baseline
(:func:`run_variant`), write artifacts and ``report.json`` (:func:`run`, ``tugboat run``). Sweeps
(:mod:`.sweep`) and executors build on it."""

from __future__ import annotations

import dataclasses
import functools
import gc
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .. import cancellable
from ..errors import Cancelled, NumericalError, ResourceError, TugboatError
from ..io.data import Dataset, check_labels_fit, load_data
from ..io.export import write_onnx
from ..io.loading import load_model
from ..io.models import ModelHandle, require_shapes
from ..io.tasks import set_task
from ..lazy import torch_loaded
from ..lock import locked_output
from ..machine import advice
from ..measuring import memory
from ..measuring.guards import (
    INDEX_MARKERS,
    check_outputs,
    describe_step,
    first_run_error,
    non_finite,
    probe_inputs,
    probe_outputs,
)
from ..measuring.measure import (
    MeasureConfig,
    TimingReference,
    flops_promise,
    is_timing_warning,
    measure,
    own_timing_warnings,
    slower_than,
    start_counts,
    start_deflate,
    timing_notes,
)
from ..measuring.runtime import fixed_batch
from ..progress import Progress, null_progress
from ..stored import WORKSPACE_FILE
from ..techniques import steps as step_registry
from ..techniques.steps import NO_CHANGE
from .capabilities import needs_torch_module
from .recipe import DEFAULT_SEED, Recipe
from .report_json import build_report, write_report
from .variants import Baseline, Variant, safe_name, variant_name


def seed_everything(seed: int, torch_too: bool = True) -> None:
    """Seed the global torch, numpy and ``random`` generators (fine-tuning, distillation, dropout,
    anything a technique draws without its own generator). ``torch_too=False``: torch's only if it
    is imported already (a step on an ONNX graph alone does not import it just to seed it)."""
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    if torch_too or torch_loaded():
        import torch

        torch.manual_seed(seed)


def step_seed(seed: int, index: int) -> int:
    """The seed of recipe step ``index`` (0-based): a prefix computed once in a sweep and the same
    prefix computed alone draw the same numbers."""
    return (int(seed) * 1_000_003 + index) % 2**32


def apply_steps(handle: ModelHandle, steps: list[dict[str, Any]], data: Dataset | None,
                progress: Progress, *, first_index: int = 0, guard: bool = True,
                trust: bool = False, seed: int = DEFAULT_SEED, threads: int = 1) -> ModelHandle:
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
        handle = out_of_memory_as_error(
            functools.partial(_apply_one, tech, handle, params, data, progress, sub, this_seed), f"in {label}")
        if len(handle.history) <= before:  # the technique did not record the step itself
            handle.history = [*handle.history, step]
        reason = handle.info.pop(NO_CHANGE, None)
        if reason:  # a step that changed nothing is said so, never passed off as done
            handle.info["unchanged_steps"] = [*handle.info.get("unchanged_steps", []), first_index + i]
            handle.warnings = [*handle.warnings, f"{label} changed nothing: {reason}"]
        progress.check()
        if probe is not None:
            check_outputs(handle, probe, label, threads)  # in the session measuring uses next
    return handle


def _apply_one(tech, handle: ModelHandle, params: dict[str, Any], data: Dataset | None, progress: Progress,
               sub: Progress, seed: int) -> ModelHandle:
    """One technique on a helper thread (a cancel is honoured within cancellable.POLL_S, at any
    point), from seeded generators."""
    def work() -> ModelHandle:
        seed_everything(seed, torch_too=tech.needs_torch or handle.module is not None)
        return tech.apply(handle, params, data, sub)

    return cancellable.call(work, progress, name=f"tugboat-{tech.name}")


def prepare(recipe: Recipe, progress: Progress | None = None, *, deflate_later: bool = False) -> Baseline:
    """Load the recipe's model and data, check the original runs (finite outputs, labels that fit),
    refuse what cannot fit in memory, and measure it: the :class:`Baseline` every variant is
    compared with."""
    progress = progress or null_progress()
    progress.update(0.0, f"loading {recipe.model}")
    handle, data = cancellable.call(lambda: _load(recipe), progress, name="tugboat-load")
    if handle.onnx_model is not None:  # its deflate size on another core from now on (issue 17.7)
        start_deflate(handle.to_onnx())
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
    if handle.onnx_model is not None:  # its counts and FLOPs probe beside the first-run check (17.7)
        start_counts(handle, data)
    _check_first_run(recipe, handle, data, cfg.threads)
    progress.update(0.3, "measuring the original model")
    metrics, outputs = _measure_original(recipe, handle, data, cfg, progress, deflate_later)
    handle.warnings = [w for w in handle.warnings if not is_timing_warning(w)] + own_timing_warnings(metrics)
    return Baseline(handle, data, metrics, outputs, cfg, timing_reference(handle, data, cfg))


def _load(recipe: Recipe) -> tuple[ModelHandle, Dataset | None]:
    handle = load_model(recipe.model, trust=recipe.trust, arch=recipe.arch,
                        input_shape=tuple(recipe.input_shape) if recipe.input_shape else None,
                        arch_kwargs=recipe.arch_kwargs or None, constants=recipe.constants or None,
                        torch_module=needs_torch_module(recipe))
    set_task(handle, recipe.task)
    if handle.pending is not None and not recipe.data:  # no input shapes in the file, no data
        require_shapes(handle)
    return handle, (load_data(recipe.data, handle) if recipe.data else None)


def _check_first_run(recipe: Recipe, handle: ModelHandle, data: Dataset | None, threads: int = 1) -> None:
    """The original runs on a probe batch with finite outputs (and as many classes as the labels)."""
    probe = probe_inputs(handle, data)
    try:
        outputs = probe_outputs(handle, probe, threads)
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


def _measure_original(recipe: Recipe, handle: ModelHandle, data: Dataset | None, cfg: MeasureConfig,
                      progress: Progress, deflate_later: bool = False
                      ) -> tuple[dict[str, Any], list[np.ndarray] | None]:
    def work():
        try:
            return cancellable.call(
                lambda: measure(handle, data, cfg, reference=None, progress=progress.sub(0.3, 1.0, "baseline: "),
                                deflate_later=deflate_later), progress, name="tugboat-measure")
        except TugboatError as exc:
            if data is not None and any(m in exc.message.lower() for m in INDEX_MARKERS):
                raise first_run_error(exc, handle, data) from None  # a bad token id beyond the probe's
            raise
        except Cancelled:
            raise
        except Exception as exc:
            if not memory.is_out_of_memory(exc):
                raise first_run_error(exc, handle, data) from None
            raise

    return out_of_memory_as_error(work, "measuring the original model", path=recipe.model)


def out_of_memory_as_error(work: Callable[[], Any], where: str | Callable[[], str], path: str | None = None):
    """``work()``; running out of memory in it raises :class:`ResourceError` naming ``where`` (a text
    or a function giving it, read when it happens), after the failed work's tensors are freed: it is
    raised outside the handler (whose traceback still holds them) and after ``gc.collect()``."""
    try:
        return work()
    except Exception as exc:
        if not memory.is_out_of_memory(exc):
            raise
    gc.collect()  # only out of memory reaches here
    raise ResourceError(memory.oom_message(where() if callable(where) else where), path=path)


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
    variant.warnings = [w for w in variant.warnings if not is_timing_warning(w)]
    steps = list((variant.recipe or {}).get("steps") or [])
    variant.warnings += slower_than(variant.metrics, baseline_metrics)
    variant.warnings += flops_promise(variant.metrics, baseline_metrics, steps)
    notes = list(variant.info.get("step_notes") or [])  # what the steps chose (a fine-tuning's lr)
    notes += timing_notes(variant.metrics, baseline_metrics)
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
    def work() -> None:
        try:
            handle = apply_steps(start or base.handle, todo, base.data, progress.sub(0.0, 0.7),
                                 first_index=done_steps, trust=recipe.trust_steps, seed=recipe.seed,
                                 threads=base.cfg.threads)
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
            if memory.is_out_of_memory(exc):
                variant.handle = None
            raise

    out_of_memory_as_error(work, lambda: f"measuring {variant.name}")
    if variant.metrics:
        variant.metrics["seconds"] = round(time.perf_counter() - t0, 3)
    return variant


def write_variant_artifacts(variant: Variant, folder: str | os.PathLike) -> dict[str, str]:
    """Write the variant's ONNX artifact (and torch file where there is one), atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if variant.handle is None:
        return {}
    safe = safe_name(variant.name)
    path = write_onnx(variant.handle, folder / f"{safe}.onnx")
    variant.artifacts["onnx"] = str(path.relative_to(folder)) if path.is_relative_to(folder) else str(path)
    return variant.artifacts


def run(recipe: Recipe, out_dir: str | os.PathLike, progress: Progress | None = None) -> dict[str, Any]:
    """``tugboat run``: baseline, one variant (if the recipe has steps), artifacts, report.json.

    ``out_dir`` is checked first (writable, not a sweep workspace) and locked while the run writes it
    (:mod:`lock`): a second run or sweep on it is refused with the PID that holds it."""
    progress = progress or null_progress()
    out = Path(out_dir)
    if (out / WORKSPACE_FILE).is_file():  # its report.json belongs to the sweep: never replace it
        raise TugboatError("holds a sweep workspace; tugboat run would replace its report.json. Choose "
                           "another --out folder (or add the steps to the sweep and use tugboat sweep "
                           "--resume)", path=str(out))
    with locked_output(out, "tugboat run"):  # an existing file, read-only, full: before any work
        return _run_locked(recipe, out, progress)


def _run_locked(recipe: Recipe, out: Path, progress: Progress) -> dict[str, Any]:
    # the original's deflate size goes on beside the steps and the variant's measuring (issue 17.7)
    base = prepare(recipe, progress.sub(0.0, 0.3 if recipe.steps else 0.9), deflate_later=True)
    variants: list[Variant] = []
    baseline_variant = Variant("baseline", recipe.with_steps([]).to_dict(), base.metrics, handle=base.handle)
    if recipe.steps:
        variants.append(run_variant(base, recipe, progress.sub(0.3, 0.95)))
    progress.check()  # a cancelled run writes nothing: every file is written after all the work
    write_variant_artifacts(baseline_variant, out)
    for v in variants:
        if v.status == "ok":
            write_variant_artifacts(v, out)
    if base.metrics.get("compressed_bytes") is None:
        base.metrics["compressed_bytes"] = start_deflate(base.handle.to_onnx())()
    report = build_report(recipe, base.metrics, variants, baseline_artifacts=baseline_variant.artifacts)
    write_report(report, out / "report.json")
    progress.update(1.0, "done")
    return report
