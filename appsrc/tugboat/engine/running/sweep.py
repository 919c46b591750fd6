"""Sweeps: grids over recipe parameters, random search, accuracy-aware target search, prefix reuse.

A recipe's ``[sweep]`` table maps a step parameter to the values to try::

    [sweep]
    "steps.0.ratio" = [0.25, 0.5, 0.75]
    "steps.1.method" = ["static-int8", "dynamic-int8"]

* **grid** (only ``[sweep]``): every combination is a variant, in an order where variants sharing
  a step prefix are neighbours.
* **random search** (``[search] budget_seconds = N``, optional ``max_variants``, ``seed``): draws
  combinations until the time budget or ``max_variants`` is used up. A sweep value may also be a
  range ``{min = 0.2, max = 0.8}`` (uniform; ``log = true`` for a log scale), drawn afresh each time.
* **target search** (``[target] max_accuracy_drop = 0.01, objective = "latency" | "size",
  budget_seconds = N``): tries combinations of the ``[sweep]`` space (all of a finite grid, or
  random draws) within the budget, keeps *every* variant it tried, and names the best one whose
  quality is within ``max_accuracy_drop`` of the baseline (absolute, 0.01 = one point).

Every combination is validated through the technique registry before anything runs, so a typo in
the 9th combination fails in the first second, not after an hour. Range endpoints are checked
against the parameter's own range up front, and ranges over whole-number parameters draw whole
numbers. The size of a grid is computed arithmetically before any combination is built: more than
:data:`MAX_VARIANTS` (1000) is refused unless raised explicitly (``tugboat sweep --max-variants N``),
so a 1 KB recipe describing 10^8 combinations is refused in a millisecond, not by the kernel's
out-of-memory killer. Random and target search over a grid that large draw combinations lazily.

**Prefix reuse**: variants whose first *k* steps are equal (canonical JSON of the validated steps)
share one computation of that prefix: a sweep of one pruning ratio x four quantization methods
prunes once. Only prefixes a later variant still needs are kept in memory.

Results go to a :class:`~tugboat.engine.running.workspace.Workspace`, locked while the sweep runs
(:mod:`lock`: a second sweep or run on the same folder is refused with the PID holding it); with
``resume=True`` variants already in the workspace are skipped (their names are deterministic for a
recipe). Resuming with a different model, data or ``[measure]`` batch, threads or runtime is refused
with the settings that differ: its variants would not be comparable with those on record.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import Cancelled, NumericalError, RecipeError, ResourceError, TugboatError
from ..formatting import did_you_mean
from ..lock import locked_output
from ..machine import machine_info
from ..measuring import memory
from ..progress import Progress, null_progress
from ..techniques import steps as step_registry
from .executors.base import Context, LocalExecutor, PrefixCache, Task, steps_key
from .recipe import Recipe, validate_steps
from .report_json import quality_of
from .runner import finish_variant, judge_timing, prepare
from .variants import Baseline, Variant, variant_name
from .workspace import Workspace, WorkspaceError

SEARCH_KEYS = {"budget_seconds": (0.0, 7 * 24 * 3600.0), "max_variants": (1, 100000), "seed": (0, 2**31)}
TARGET_KEYS = {**SEARCH_KEYS, "max_accuracy_drop": (0.0, 1.0), "objective": ("latency", "size")}
DEFAULT_BUDGET = 600.0
MAX_VARIANTS = 1000  # the largest grid run without an explicit --max-variants
LISTED = "steps"  # [sweep] steps = [[...], [...]]: the variants' step lists, one by one


# --- the search space ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Axis:
    """One ``[sweep]`` entry: a step index, a parameter, and its values (or a range)."""

    key: str
    step: int
    param: str
    values: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False  # a range over a whole-number parameter draws whole numbers

    @property
    def is_range(self) -> bool:
        return not self.values

    def draw(self, rng: random.Random) -> Any:
        if self.values:
            return rng.choice(self.values)
        assert self.low is not None and self.high is not None
        if self.log:
            value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
            if self.integer:
                return min(max(round(value), int(self.low)), int(self.high))
            return min(max(float(f"{value:.3g}"), self.low), self.high)  # rounding never leaves the range
        if self.integer:
            return rng.randint(int(self.low), int(self.high))
        return min(max(round(rng.uniform(self.low, self.high), 3), self.low), self.high)


@dataclass
class Candidate:
    """One combination: its validated steps, the sweep values that made it, and its name."""

    steps: list[dict[str, Any]]
    overrides: dict[str, Any]
    name: str = ""

    @property
    def key(self) -> str:
        return steps_key(self.steps)


def parse_axes(recipe: Recipe) -> list[Axis]:
    """Check every ``[sweep]`` key against the recipe's steps and the technique registry."""
    where = recipe.source or "recipe"
    axes = []
    for key, spec in recipe.sweep.items():
        parts = key.split(".")
        if len(parts) != 3 or parts[0] != "steps" or not parts[1].isdigit():
            raise RecipeError(f"sweep key {key!r} must look like \"steps.0.ratio\" "
                              "(steps.<step number>.<parameter>)", path=where)
        index, param = int(parts[1]), parts[2]
        if index >= len(recipe.steps):
            raise RecipeError(f"sweep key {key!r}: the recipe has {len(recipe.steps)} step(s), "
                              f"numbered from 0", path=where)
        tech = step_registry.get(recipe.steps[index]["technique"])
        known = {p.name for p in tech.params}
        if param != "method" and param not in known:
            raise RecipeError(f"sweep key {key!r}: unknown {tech.name} parameter {param!r}"
                              + did_you_mean(param, known | {"method"}), path=where)
        p = tech.param(param) if param != "method" else None
        if isinstance(spec, list):
            if not spec:
                raise RecipeError(f"sweep key {key!r} has an empty list of values", path=where)
            if p is not None:  # each value on its own (NaN, out of range), before any combination
                for value in spec:
                    _check_value(p, value, key, index, where)
            axes.append(Axis(key, index, param, values=tuple(spec)))
        elif isinstance(spec, dict):
            low, high, log = spec.get("min"), spec.get("max"), spec.get("log", False)
            extra = set(spec) - {"min", "max", "log"}
            if extra or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) \
                    or not low < high or not isinstance(log, bool) or (log and low <= 0):
                raise RecipeError(f"sweep key {key!r}: a range is {{min = A, max = B}} with A < B "
                                  "(and A > 0 with log = true)", path=where)
            if p is None or p.kind not in ("float", "int"):
                raise RecipeError(f"sweep key {key!r}: a {{min, max}} range needs a numeric parameter; "
                                  f"give a list of values instead", path=where)
            for label, value in (("min", low), ("max", high)):
                _check_value(p, value, key, index, where, label=f"range {label}")
            axes.append(Axis(key, index, param, low=float(low), high=float(high), log=log,
                             integer=p.kind == "int"))
        else:
            raise RecipeError(f"sweep key {key!r} must be a list of values or a {{min, max}} range",
                              path=where)
    # earlier steps vary slowest, so neighbours share the longest prefix
    return sorted(axes, key=lambda a: (a.step, a.param != "method", a.key))


def _check_value(p: step_registry.Param, value: Any, key: str, index: int, where: str, label: str = "value") -> None:
    try:
        p.coerce(value, f"steps.{index}")
    except RecipeError as exc:
        what = f"sweep combination ({key} = {value!r})" if label == "value" else f"sweep key {key!r}, {label}"
        raise RecipeError(f"{what}: {exc.message}", path=where) from None


def grid_size(axes: list[Axis]) -> int | None:
    """How many combinations a grid has (None with a range), computed without building any."""
    if any(a.is_range for a in axes):
        return None
    return math.prod(len(a.values) for a in axes)


def check_grid_size(recipe: Recipe, axes: list[Axis], limit: int | None) -> int:
    limit = MAX_VARIANTS if limit is None else limit
    n = grid_size(axes) or 0
    if n > limit:
        raise RecipeError(f"the [sweep] grid has {n:,} combinations, more than the limit of {limit:,}; "
                          f"to run them all, raise the limit explicitly (tugboat sweep --max-variants {n}), "
                          "or sample it with [search] budget_seconds = N and max_variants = M",
                          path=recipe.source or "recipe")
    return n


def combine(recipe: Recipe, overrides: dict[str, Any]) -> list[dict[str, Any]]:
    """The recipe's steps with ``overrides`` ({"steps.0.ratio": 0.5}) applied, validated.

    When a method changes, parameters that do not apply to the new method are dropped (and the new
    method's defaults filled in), so ``"steps.1.method" = [...]`` can span methods."""
    raw = [dict(s) for s in recipe.steps]
    by_step: dict[int, dict[str, Any]] = {}
    for key, value in overrides.items():
        _, index, param = key.split(".")
        by_step.setdefault(int(index), {})[param] = value
    for index, changes in by_step.items():
        step = raw[index]
        step.update(changes)
        if "method" in changes:
            tech = step_registry.get(step["technique"])
            method = step["method"]
            if method in tech.methods:
                for p in tech.params:
                    if p.name in step and not p.applies_to(method) and p.name not in changes:
                        del step[p.name]
    try:
        return validate_steps(raw, recipe.source or "recipe")
    except RecipeError as exc:
        shown = ", ".join(f"{k} = {v!r}" for k, v in overrides.items())
        raise RecipeError(f"sweep combination ({shown}): {exc.message}", path=exc.path) from None


def grid(recipe: Recipe, limit: int | None = None) -> list[Candidate]:
    """Every combination of a ``[sweep]`` table made only of lists, validated and named; a grid
    larger than ``limit`` (default :data:`MAX_VARIANTS`) is refused before any is built."""
    axes = parse_axes(recipe)
    if any(a.is_range for a in axes):
        raise RecipeError("a [sweep] with {min, max} ranges needs random or target search: "
                          "add [search] budget_seconds = N", path=recipe.source or "recipe")
    check_grid_size(recipe, axes, limit)
    cands = []
    for values in itertools.product(*(a.values for a in axes)):
        overrides = {a.key: v for a, v in zip(axes, values)}
        cands.append(Candidate(combine(recipe, overrides), overrides))
    return name_candidates(_unique(cands), axes)


def listed(recipe: Recipe, limit: int | None = None) -> list[Candidate]:
    """The variants of a ``[sweep] steps = [[...], [...]]`` list, each entry one variant's whole step
    list (what the window's sweep of picked settings runs, and its "Save as recipe" writes)."""
    where = recipe.source or "recipe"
    entries = recipe.sweep[LISTED]
    if set(recipe.sweep) != {LISTED} or recipe.steps:
        raise RecipeError("a [sweep] 'steps' list gives each variant's steps in full: it takes no other "
                          "[sweep] keys and no [[steps]]", path=where)
    if not isinstance(entries, list) or not entries or not all(
            isinstance(e, list) and e and all(isinstance(s, dict) for s in e) for e in entries):
        raise RecipeError("sweep key 'steps' must be a list of step lists, e.g. "
                          "[[{technique = \"prune\", ratio = 0.5}], [{technique = \"quantize\"}]]", path=where)
    if len(entries) > (MAX_VARIANTS if limit is None else limit):
        raise RecipeError(f"the [sweep] 'steps' list has {len(entries):,} variants, more than the limit of "
                          f"{MAX_VARIANTS if limit is None else limit:,} (tugboat sweep --max-variants N)", path=where)
    cands = []
    for i, entry in enumerate(entries):
        try:
            cands.append(Candidate(validate_steps([dict(s) for s in entry], where), {}))
        except RecipeError as exc:
            raise RecipeError(f"sweep.steps[{i}]: {exc.message}", path=where) from None
    return name_candidates(_unique(cands), [])


def _unique(cands: list[Candidate]) -> list[Candidate]:
    seen, out = set(), []
    for c in cands:
        if c.key not in seen:
            seen.add(c.key)
            out.append(c)
    return out


def name_candidates(cands: list[Candidate], axes: list[Axis], taken: set[str] | None = None,
                    always: bool = False) -> list[Candidate]:
    """Readable, unique names: :func:`recipe.variant_name`, plus the sweep values that the short
    name does not show when two combinations would otherwise look alike (or ``always``).
    ``taken`` (updated) holds names already given out."""
    taken = set() if taken is None else taken
    base = [variant_name(c.steps) for c in cands]
    counts: dict[str, int] = {}
    for b in base:
        counts[b] = counts.get(b, 0) + 1
    for c, b in zip(cands, base):
        name = b
        if always or counts[b] > 1 or name in taken:
            shown = [f"s{a.step}.{a.param}={_fmt(c.overrides[a.key])}" for a in axes
                     if a.key in c.overrides and _fmt(c.overrides[a.key]) not in b]
            if shown:
                name = f"{b}~{','.join(shown)}"
        i = 2
        unique = name
        while unique in taken:
            unique = f"{name}#{i}"
            i += 1
        c.name = unique
        taken.add(unique)
    return cands


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "|".join(map(str, value))
    return str(value)


def random_candidates(recipe: Recipe, seed: int = 0, limit: int | None = None) -> Iterator[Candidate]:
    """Random draws from the sweep space: without repeats for a finite grid of at most ``limit``
    combinations (then it ends), lazily for a larger grid or a space with ranges. Names stay unique
    across the draws."""
    axes = parse_axes(recipe)
    rng = random.Random(seed)
    if _small_grid(axes, limit):
        cands = grid(recipe, limit)
        rng.shuffle(cands)
        yield from cands
        return
    seen: set[str] = set()
    taken: set[str] = set()
    misses = 0
    while misses < 1000:
        overrides = {a.key: a.draw(rng) for a in axes}
        cand = Candidate(combine(recipe, overrides), overrides)
        if cand.key in seen:
            misses += 1
            continue
        misses = 0
        seen.add(cand.key)
        name_candidates([cand], axes, taken, always=True)
        yield cand


def _check_table(table: dict[str, Any], rules: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    for key, value in table.items():
        if key not in rules:
            raise RecipeError(f"unknown key '{name}.{key}'" + did_you_mean(key, rules), path=where)
        rule = rules[key]
        if isinstance(rule[0], str):
            if value not in rule:
                raise RecipeError(f"'{name}.{key}' must be one of {', '.join(rule)}, got {value!r}"
                                  + did_you_mean(str(value), rule), path=where)
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not rule[0] <= value <= rule[1]:
            raise RecipeError(f"'{name}.{key}' = {value!r} is out of range [{rule[0]}, {rule[1]}]", path=where)
    return table


def _small_grid(axes: list[Axis], limit: int | None) -> bool:
    n = grid_size(axes)
    return n is not None and n <= (MAX_VARIANTS if limit is None else limit)


@dataclass
class Plan:
    """What a sweep will do: its kind and its candidates (a list, or an endless iterator)."""

    kind: str  # single | grid | random | target
    candidates: list[Candidate] | Iterator[Candidate]
    budget_seconds: float | None = None
    max_variants: int | None = None
    max_accuracy_drop: float | None = None
    objective: str | None = None

    @property
    def total(self) -> int | None:
        n = len(self.candidates) if isinstance(self.candidates, list) else None
        if self.max_variants is not None:
            return min(n, self.max_variants) if n is not None else self.max_variants
        return n


def plan(recipe: Recipe, max_variants: int | None = None) -> Plan:
    """Validate the recipe's sweep, search and target tables and list what will run.

    ``max_variants`` raises (or lowers) the largest grid that may run (default :data:`MAX_VARIANTS`)."""
    where = recipe.source or "recipe"
    if max_variants is not None and (isinstance(max_variants, bool) or not isinstance(max_variants, int)
                                     or max_variants < 1):
        raise RecipeError(f"--max-variants must be a positive whole number, got {max_variants!r}", path=where)
    search = _check_table(recipe.search, SEARCH_KEYS, "search", where)
    target = _check_table(recipe.target, TARGET_KEYS, "target", where)
    if LISTED in recipe.sweep:
        if search or target:
            raise RecipeError("a [sweep] 'steps' list names each variant; it takes no [search] or [target]",
                              path=where)
        return Plan("grid", listed(recipe, max_variants))
    if target:
        if "max_accuracy_drop" not in target:
            raise RecipeError("'target.max_accuracy_drop' is missing (e.g. 0.01 for one point)", path=where)
        if not recipe.sweep:
            raise RecipeError("a [target] search needs a [sweep] table saying which parameters to vary",
                              path=where)
        if not recipe.data:
            raise RecipeError("a [target] search needs 'data' to measure quality", path=where)
        opts = {**search, **target}
        cands = random_candidates(recipe, int(opts.get("seed", 0)), max_variants)
        if _small_grid(parse_axes(recipe), max_variants):
            cands = list(cands)
        return Plan("target", cands, float(opts.get("budget_seconds", DEFAULT_BUDGET)),
                    opts.get("max_variants"), float(target["max_accuracy_drop"]),
                    target.get("objective", "latency"))
    if search:
        if not recipe.sweep:
            raise RecipeError("a [search] needs a [sweep] table saying which parameters to vary", path=where)
        cands = random_candidates(recipe, int(search.get("seed", 0)), max_variants)
        if _small_grid(parse_axes(recipe), max_variants):
            cands = list(cands)
        return Plan("random", cands, float(search.get("budget_seconds", DEFAULT_BUDGET)),
                    search.get("max_variants"))
    if recipe.sweep:
        return Plan("grid", grid(recipe, max_variants))
    if not recipe.steps:
        return Plan("single", [])
    return Plan("single", [Candidate(list(recipe.steps), {}, variant_name(recipe.steps))])


def finish_outcome(base: Baseline, recipe: Recipe, cand: Candidate, outcome, progress: Progress) -> Variant:
    """The variant for an executor's outcome: measured here (quality and latency, serially, in the
    driver), or failed with the reason it could not be made or measured."""
    t0 = time.perf_counter()
    variant_recipe = recipe.with_steps(cand.steps)
    if outcome.error is not None:
        variant = Variant(cand.name, variant_recipe.to_dict(), status="failed", error=outcome.error)
    elif outcome.measured is not None:  # measured where it was made, against the same original
        variant = outcome.measured
        variant.recipe = variant_recipe.to_dict()
        judge_timing(variant, base.metrics)  # with this recipe's steps (advice) and the original on record
    else:
        variant = Variant(cand.name, variant_recipe.to_dict())
        try:
            finish_variant(variant, outcome.handle, base, progress)
        except NumericalError as exc:
            variant = Variant(cand.name, variant_recipe.to_dict(), status="failed",
                              error=f"numerical failure: {exc.message}")
        except Cancelled:
            raise
        except TugboatError as exc:
            variant = Variant(cand.name, variant_recipe.to_dict(), status="failed", error=exc.message)
        except Exception as exc:
            if not memory.is_out_of_memory(exc):
                raise
            raise ResourceError(memory.oom_message(f"measuring {cand.name}")) from None
    variant.name = cand.name
    if outcome.reused_prefix_steps:
        variant.info["reused_prefix_steps"] = outcome.reused_prefix_steps
    if outcome.where != "local":
        variant.info["made_on"] = outcome.where
    if outcome.attempts > 1:
        variant.info["attempts"] = outcome.attempts
    if variant.metrics:
        variant.metrics["seconds"] = round(outcome.seconds + time.perf_counter() - t0, 3)
    if cand.overrides:
        variant.info["sweep"] = dict(cand.overrides)
    return variant


# --- running a sweep ------------------------------------------------------------------------------

@dataclass
class SweepResult:
    workspace: Any  # Workspace
    kind: str
    tried: list[str] = field(default_factory=list)  # names run now, in order
    skipped: list[str] = field(default_factory=list)  # finished before (resume)
    best: str | None = None  # target search: the best variant within tolerance
    within: list[str] = field(default_factory=list)  # target search: every variant within tolerance
    stopped_by_budget: bool = False

    @property
    def variants(self) -> list[Variant]:
        return self.workspace.variants()


def run_sweep(recipe: Recipe, out_dir: str | Path, *, resume: bool = False,
              progress: Progress | None = None, on_variant: Callable[[Variant], None] | None = None,
              log: Callable[[str], None] | None = None, max_variants: int | None = None,
              executor=None, workspace=None, base: Baseline | None = None) -> SweepResult:
    """Run a recipe's sweep (grid, random or target search) into the workspace ``out_dir``, holding
    the folder's lock throughout. ``max_variants`` raises the grid-size limit (:data:`MAX_VARIANTS`).

    ``executor`` (:mod:`tugboat.engine.running.executors`; default: in this process) makes the variants;
    this process measures each one as it comes back, one at a time, and alone writes the workspace.

    ``workspace`` (an open Workspace whose folder lock the caller holds, e.g. the window's) is
    continued instead of ``out_dir`` (as with ``resume``); ``base``: the baseline already prepared."""
    the_plan = plan(recipe, max_variants)  # every combination validated before any work
    if workspace is not None:
        return _run_sweep_locked(recipe, the_plan, workspace.path, None, resume=True, progress=progress,
                                 on_variant=on_variant, log=log, executor=executor, ws=workspace, base=base)
    out = Path(out_dir)
    with locked_output(out, "tugboat sweep") as lock:  # an existing file, read-only, full: first
        return _run_sweep_locked(recipe, the_plan, out, lock, resume=resume, progress=progress,
                                 on_variant=on_variant, log=log, executor=executor)


def _same_ref(a: str | None, b: str | None) -> bool:
    a, b = a or "", b or ""
    if a == b:
        return True
    if not a or not b or a.startswith("demo:") or b.startswith("demo:"):
        return False
    import os

    return os.path.realpath(a) == os.path.realpath(b)


COMPARABLE_MEASURE = ("batch", "threads", "runtime", "device")


def resume_differences(ws, recipe: Recipe) -> list[str]:
    """What makes ``recipe``'s variants incomparable with those on record in ``ws``."""
    diffs = []
    if ws.model and not _same_ref(ws.model, recipe.model):
        diffs.append(f"model {ws.model!r} (now {recipe.model!r})")
    if (ws.data or recipe.data) and not _same_ref(ws.data, recipe.data):
        diffs.append(f"data {ws.data or 'none'!r} (now {recipe.data or 'none'!r})")
    now = recipe.measure.to_dict()
    for key in COMPARABLE_MEASURE:
        if key in ws.measure and ws.measure[key] != now.get(key):
            diffs.append(f"measure.{key} {ws.measure[key]!r} (now {now.get(key)!r})")
    return diffs


def _run_sweep_locked(recipe: Recipe, the_plan: Plan, out: Path, lock, *, resume: bool,
                      progress: Progress | None, on_variant: Callable[[Variant], None] | None,
                      log: Callable[[str], None] | None, executor=None, ws=None,
                      base: Baseline | None = None) -> SweepResult:
    progress = progress or null_progress()
    log = log or (lambda _msg: None)
    existing = _check_resumable(out, lock, recipe, resume, ws)
    progress.update(0.0, f"loading {recipe.model}")
    base = base if base is not None else prepare(recipe, progress.sub(0.0, 0.05, "baseline: "))
    if isinstance(the_plan.candidates, list):  # refuse a grid that cannot fit before any of it runs
        for cand in the_plan.candidates:
            memory.check(base.handle, cand.steps, base.data, base.cfg,
                         where=f"{recipe.source or recipe.model} (variant {cand.name})")
    ws = _open_workspace(out, lock, existing, recipe, base, the_plan, ws)
    driver = _Driver(recipe, the_plan, base, ws, SweepResult(ws, the_plan.kind), progress, log, on_variant)
    cache, source, total = driver.todo()
    if driver.result.skipped:
        log(f"resuming: {len(driver.result.skipped)} finished variant(s) kept, not recomputed")
    driver.executor = executor or LocalExecutor()
    driver.executor.start(Context.of(base, recipe), cache)
    ws.meta["sweep"]["executor"] = driver.executor.describe()
    try:
        while not driver.result.stopped_by_budget:
            chunk = driver.next_chunk(source)
            if not chunk:
                break
            driver.run_chunk(chunk, total)
    finally:
        driver.executor.close()
    return driver.finish()


def _check_resumable(out: Path, lock, recipe: Recipe, resume: bool, given=None) -> bool:
    """Whether ``out`` holds a workspace already (``given``: one open already, the window's); refuses
    one with variants unless resuming, and one made with settings whose variants this recipe's could
    not be compared with."""
    if given is None and not Workspace.exists(out):
        return False
    ws = given if given is not None else Workspace.open(out, lock=lock)
    holds = len(ws) > 0 or ws.baseline is not None
    if holds and not resume:
        raise WorkspaceError("already holds a workspace; add --resume to continue it, or choose "
                             "another --out folder", path=str(out))
    diffs = resume_differences(ws, recipe) if holds else []
    if diffs:
        raise WorkspaceError(f"was made with other settings: {'; '.join(diffs)}. Resuming would mix "
                             "variants that cannot be compared; use the original settings or another "
                             "--out folder", path=str(out))
    return True


def _open_workspace(out: Path, lock, existing: bool, recipe: Recipe, base: Baseline, the_plan: Plan, given=None):
    """The workspace the sweep writes (``given``, or the one in ``out``), with its baseline (the one
    on record when resuming), recipe and the machine the timings come from, saved."""
    if existing:
        ws = given if given is not None else Workspace.open(out, lock=lock)
        if not (len(ws) or ws.baseline is not None):  # an empty one takes this sweep's settings
            ws.model, ws.data, ws.measure = recipe.model, recipe.data or "", recipe.measure.to_dict()
    else:
        ws = Workspace.create(out, model=recipe.model, data=recipe.data or "",
                              measure=recipe.measure.to_dict(), recipe=recipe.to_dict())
    if ws.baseline is not None and ws.baseline.metrics:
        base.metrics = ws.baseline.metrics  # every variant compares with the baseline on record
    else:
        ws.set_baseline(Variant("baseline", recipe.with_steps([]).to_dict(), base.metrics, handle=base.handle,
                                warnings=list(base.handle.warnings)))
    ws.recipe = recipe.to_dict()
    ws.meta["sweep"] = {"kind": the_plan.kind}
    ws.meta["machine"] = machine_info()  # the machine this sweep's timings come from
    ws.save()
    return ws


@dataclass
class _Driver:
    """One sweep's run: hands chunks of candidates to the executor, measures what comes back (here,
    one at a time) and writes it to the workspace."""

    recipe: Recipe
    plan: Plan
    base: Baseline
    ws: Any  # Workspace
    result: SweepResult
    progress: Progress
    log: Callable[[str], None]
    on_variant: Callable[[Variant], None] | None
    executor: Any = None
    count: int = 0
    t_start: float = field(default_factory=time.monotonic)

    def todo(self) -> tuple[PrefixCache, Iterator[Candidate], int | None]:
        """(prefix cache, candidates to run, how many or None) after what the workspace holds."""
        the_plan, ws, result = self.plan, self.ws, self.result
        if not isinstance(the_plan.candidates, list):
            return PrefixCache(None), the_plan.candidates, the_plan.max_variants
        todo = [c for c in the_plan.candidates if c.name not in ws]
        result.skipped = [c.name for c in the_plan.candidates if c.name in ws]
        if the_plan.max_variants is not None:
            todo = todo[:max(0, the_plan.max_variants - len(result.skipped))]
        ws.meta["sweep"]["planned"] = [c.name for c in the_plan.candidates]
        return PrefixCache.for_candidates(todo), iter(todo), len(todo)

    def next_chunk(self, source: Iterator[Candidate]) -> list[Candidate]:
        """The next candidates to hand over: one round at a time (then the budget is looked at again),
        a whole grid at once to several workers."""
        chunk: list[Candidate] = []
        budget, result, width = self.plan.budget_seconds, self.result, max(1, self.executor.width)
        elapsed = time.monotonic() - self.t_start
        for cand in source:
            if cand.name in self.ws:
                if cand.name not in result.skipped:
                    result.skipped.append(cand.name)
                continue
            if budget is not None and elapsed >= budget:
                result.stopped_by_budget = True
                self.log(f"time budget of {budget:g} s used up after {self.count} new variant(s)")
                break
            if self.plan.max_variants is not None and \
                    self.count + len(chunk) + len(result.skipped) >= self.plan.max_variants:
                break
            chunk.append(cand)
            if len(chunk) >= width and (width == 1 or budget is not None
                                        or not isinstance(self.plan.candidates, list)):
                break
        return chunk

    def run_chunk(self, chunk: list[Candidate], total: int | None) -> None:
        budget, count = self.plan.budget_seconds, self.count
        elapsed = time.monotonic() - self.t_start
        by_name = {c.name: c for c in chunk}
        lo, hi = _share(count, total, elapsed, budget)
        _, hi2 = _share(count + len(chunk) - 1, total, elapsed, budget)
        label = f"[{count + 1}/{total}] " if total else f"[{count + 1}] "
        sub = self.progress.sub(lo, hi2 if len(chunk) > 1 else hi, label if len(chunk) > 1 else
                                f"{label}{chunk[0].name}: ")
        for outcome in self.executor.map([Task(c.name, c.steps) for c in chunk], sub.sub(0.0, 0.7)):
            cand = by_name[outcome.name]
            with self.executor.quiet():  # workers wait while this process measures; not while it writes
                variant = finish_outcome(self.base, self.recipe, cand, outcome, sub.sub(0.7, 1.0, f"{cand.name}: "))
            self.ws.add_variant(variant)
            self.result.tried.append(variant.name)
            self.count += 1
            self.log(f"done {variant.name}: {describe(variant)}")
            if self.on_variant is not None:
                self.on_variant(variant)  # with its model still in memory (the window keeps a copy)
            variant.handle = None  # the artifact is on disk; reload lazily with ws.load_handle

    def finish(self) -> SweepResult:
        the_plan, ws, result = self.plan, self.ws, self.result
        if the_plan.kind == "target":
            result.within, result.best = rank_within(ws, self.base.metrics, the_plan.max_accuracy_drop or 0.0,
                                                     the_plan.objective or "latency")
            ws.meta["target"] = {"best": result.best, "within_tolerance": result.within,
                                 "max_accuracy_drop": the_plan.max_accuracy_drop,
                                 "objective": the_plan.objective, "tried": [v.name for v in ws.variants()]}
        ws.meta["sweep"]["finished"] = not result.stopped_by_budget
        ws.save()
        self.progress.update(1.0, "done")
        return result


def _share(count: int, total: int | None, elapsed: float, budget: float | None) -> tuple[float, float]:
    lo, hi = 0.05, 1.0
    if total:
        a, b = count / total, (count + 1) / total
    elif budget:
        a = min(elapsed / budget, 0.99)
        b = min(a + 0.05, 1.0)
    else:
        a, b = 0.0, 1.0
    return lo + (hi - lo) * a, lo + (hi - lo) * b


def rank_within(ws, baseline_metrics: dict[str, Any], max_drop: float, objective: str) -> tuple[list[str], str | None]:
    """Variants whose quality is within ``max_drop`` of the baseline, best objective first."""
    base_q = quality_of(baseline_metrics)
    key = {"latency": lambda m: (m.get("latency_ms") or {}).get("median"),
           "size": lambda m: m.get("size_bytes")}[objective]
    ok = []
    for v in ws.variants():
        q = quality_of(v.metrics) if v.status == "ok" and v.metrics else None
        if q is None or base_q is None or key(v.metrics) is None:
            continue
        if base_q - q <= max_drop + 1e-12:
            ok.append((key(v.metrics), -q, v.name))
    ok.sort()
    names = [n for _, _, n in ok]
    return names, (names[0] if names else None)


def describe(variant: Variant) -> str:
    if variant.status != "ok":
        return f"{variant.status}: {variant.error}"
    m = variant.metrics
    q = quality_of(m)
    lat = (m.get("latency_ms") or {}).get("median")
    parts = [f"{m.get('size_bytes', 0) / 1024:.1f} KB"]
    if lat is not None:
        parts.append(f"{lat:.3f} ms")
    if q is not None:
        parts.append(f"quality {q:.4f}")
    if variant.info.get("reused_prefix_steps"):
        parts.append(f"reused {variant.info['reused_prefix_steps']} step(s)")
    return ", ".join(parts)
