"""The interface every technique plugs into: :class:`Param` and :class:`Technique`.

A technique (prune, quantize, distill, ...) is one module exposing one :class:`Technique`: its
methods, the schema of its parameters (each with its one default and its one range), ``apply(handle,
params, data, progress) -> handle``, and the hooks the rest of the engine asks it through:

* ``estimate(step, est) -> bool``: change the instant estimate's state as the step would change the
  model (:class:`tugboat.engine.techniques.estimate.EstimateState`); False when it cannot be estimated;
* ``memory(step, mem)``: add the memory phases the step runs through
  (:class:`tugboat.engine.measuring.memory.StepMemory`), beyond holding the new model;
* ``label(step) -> str``: the step's part of a variant name (default: technique, method and every
  parameter that has a ``short`` name);
* ``unavailable(method, handle, data) -> str | None``: why a method cannot run on a loaded model
  (:mod:`tugboat.engine.running.capabilities`; ``needs_torch`` and ``torch_methods`` are checked for it).

The hooks get the engine's objects passed in, so a technique module imports none of them, and the
registry (:mod:`tugboat.engine.techniques.steps`) sits above every technique. Defaults are merged once, where
a step is validated (:meth:`Technique.validate`; :meth:`Technique.complete` for direct callers).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import RecipeError
from ..formatting import did_you_mean

if TYPE_CHECKING:  # pragma: no cover
    from ..io.data import Dataset
    from ..io.models import ModelHandle
    from ..measuring.memory import StepMemory
    from ..progress import Progress
    from .estimate import EstimateState


@dataclass(frozen=True)
class Param:
    """One recipe parameter of a technique: type, default, range and a one-line explanation."""

    name: str
    kind: str  # "float" | "int" | "bool" | "choice" | "str" | "list"
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()  # empty: applies to every method
    log_scale: bool = False  # GUI hint for sliders (learning rates)
    short: str = ""  # shown in variant names as ``<short><value>`` (a number): "r" -> "r0.5"
    check: Callable[[Any, str], Any] | None = None  # further checks of a valid value (raises RecipeError)
    auto: bool = False  # a number that also takes the string "auto" (the engine decides, e.g. by measuring)

    def applies_to(self, method: str) -> bool:
        return not self.methods or method in self.methods

    def coerce(self, value: Any, where: str) -> Any:
        """Check ``value`` against type and range; return it normalised or raise RecipeError."""
        name = f"{where}.{self.name}"
        if self.auto and isinstance(value, str):
            if value.strip().lower() == "auto":
                return "auto"
            number = "a whole number" if self.kind == "int" else "a number"
            raise RecipeError(f"'{name}' must be {number} or \"auto\", got {value!r}")
        value = self._typed(value, name)
        if self.kind in ("float", "int"):
            # NaN passes every comparison below, and Infinity is no setting
            if isinstance(value, float) and not math.isfinite(value):
                raise RecipeError(f"'{name}' must be a finite number, got {value!r}")
            lo, hi = self.minimum, self.maximum
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                raise RecipeError(f"'{name}' = {value} is out of range [{lo}, {hi}]")
        if self.check is not None:
            self.check(value, name)
        return value

    def _typed(self, value: Any, name: str) -> Any:
        """``value`` as this parameter's kind (an int for a whole float, a list for one string)."""
        if self.kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RecipeError(f"'{name}' must be a number, got {value!r}")
            return float(value)
        if self.kind == "int":
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, bool) or not isinstance(value, int):
                raise RecipeError(f"'{name}' must be a whole number, got {value!r}")
            return value
        if self.kind == "bool" and not isinstance(value, bool):
            raise RecipeError(f"'{name}' must be true or false, got {value!r}")
        if self.kind == "choice" and value not in self.choices:
            raise RecipeError(f"'{name}' must be one of {', '.join(map(repr, self.choices))}, got {value!r}"
                              + did_you_mean(str(value), self.choices))
        if self.kind == "str" and not isinstance(value, str):
            raise RecipeError(f"'{name}' must be a string, got {value!r}")
        if self.kind == "list":
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise RecipeError(f"'{name}' must be a list of strings, got {value!r}")
            unknown = [v for v in value if self.choices and v not in self.choices]
            if unknown:
                raise RecipeError(f"'{name}': unknown value {unknown[0]!r}; valid: {', '.join(self.choices)}"
                                  + did_you_mean(unknown[0], self.choices))
            return list(value)
        return value


# a technique that leaves the model as it was sets ``handle.info[NO_CHANGE] = "why"``: the step
# gets a warning and the variant's name does not claim it (recipe.apply_steps)
NO_CHANGE = "no_change"

ApplyFn = Callable[["ModelHandle", dict[str, Any], "Dataset | None", "Progress"], "ModelHandle"]
EstimateFn = Callable[[dict[str, Any], "EstimateState"], bool]
MemoryFn = Callable[[dict[str, Any], "StepMemory"], None]
# set by the runner for one run, never read from a recipe: the seed (offset by the recipe's; 0 for a
# direct caller) and this run's trust decision (only for techniques that load files; absent: not trusted)
RUN_KEYS = ("seed", "trust")
RUN_DEFAULTS: dict[str, Any] = {"seed": 0}


@dataclass
class Technique:
    name: str
    title: str
    summary: str
    methods: dict[str, str]  # method name -> one-line help
    params: Sequence[Param]
    apply: ApplyFn
    needs_torch: bool = True  # needs a torch module as input (False: works on ONNX graphs)
    final: bool = False  # its output is an ONNX-only artifact; no torch step may follow
    once: bool = False  # at most one step of it in a recipe (a quantized graph is no quantizer's input)
    default_method: str = ""
    extras: dict[str, Any] = field(default_factory=dict)
    estimate: EstimateFn | None = None  # None: its variants cannot be estimated before they run
    memory: MemoryFn | None = None  # None: it only holds the new model
    label: Callable[[dict[str, Any]], str] | None = None  # None: :meth:`default_label`
    torch_methods: tuple[str, ...] = ()  # methods that need a torch module when the technique does not
    # why a method cannot run on a loaded model and its data (None: it can); the GUI and `tugboat info`
    unavailable: Callable[[str, ModelHandle, Dataset | None], str | None] | None = None

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def params_for(self, method: str) -> list[Param]:
        return [p for p in self.params if p.applies_to(method)]

    def defaults(self, method: str) -> dict[str, Any]:
        return {p.name: p.default for p in self.params_for(method)}

    def _method(self, step: dict[str, Any], where: str) -> str:
        method = step.get("method", self.default_method or next(iter(self.methods)))
        if not isinstance(method, str) or method not in self.methods:
            raise RecipeError(
                f"'{where}.method': unknown {self.name} method {method!r}; "
                f"valid: {', '.join(self.methods)}" + did_you_mean(str(method), self.methods)
            )
        return method

    def validate(self, step: dict[str, Any], where: str) -> dict[str, Any]:
        """Return ``step`` with defaults filled in, or raise RecipeError naming the problem."""
        method = self._method(step, where)
        out: dict[str, Any] = {"technique": self.name, "method": method}
        known = {p.name: p for p in self.params}
        for key, value in step.items():
            if key in ("technique", "method"):
                continue
            if key not in known:
                raise RecipeError(
                    f"'{where}': unknown {self.name} parameter {key!r}"
                    + did_you_mean(key, known)
                )
            p = known[key]
            if not p.applies_to(method):
                raise RecipeError(
                    f"'{where}.{key}' does not apply to method {method!r} "
                    f"(it applies to {', '.join(p.methods)})"
                )
            out[key] = p.coerce(value, where)
        for p in self.params_for(method):
            out.setdefault(p.name, p.default)
        return out

    def complete(self, params: dict[str, Any]) -> dict[str, Any]:
        """The parameters ``apply`` works with: ``params`` (a validated step's, or a direct caller's
        partial ones) checked as a recipe step is, with the method and its defaults filled in.
        Parameters of other methods are left out; :data:`RUN_KEYS` the schema lacks pass through
        (or get their defaults)."""
        method = self._method(params, self.name)
        names = {p.name for p in self.params}
        mine = {p.name for p in self.params_for(method)}
        given = {k: v for k, v in params.items() if k in mine or (k not in names and k not in RUN_KEYS)}
        out = self.validate({**given, "method": method}, self.name)
        del out["technique"]
        out.update({k: params[k] for k in RUN_KEYS if k in params and k not in names})
        return {**{k: v for k, v in RUN_DEFAULTS.items() if k not in names}, **out}

    def step_label(self, step: dict[str, Any]) -> str:
        """The step's part of a variant name (the ``label`` hook, else :meth:`default_label`)."""
        return (self.label or self.default_label)(step)

    def default_label(self, step: dict[str, Any]) -> str:
        """``prune-structured-r0.5``: technique, method, and each numeric parameter with a ``short``."""
        parts = [self.name, str(step.get("method", ""))]
        for p in self.params:
            value = step.get(p.name)
            if p.short and isinstance(value, (int, float)) and not isinstance(value, bool):
                parts.append(f"{p.short}{value:g}")
        return "-".join(x for x in parts if x)
