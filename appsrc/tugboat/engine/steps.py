"""The common step interface every technique plugs into.

A technique (prune, quantize, distill, ...) is one module exposing a :class:`Technique`: its
methods, a schema of its parameters, and ``apply(handle, params, data, progress) -> handle``. The
recipe validator, the sweep runner, the CLI and the GUI panels are all written against this
registry, so a new technique is a new module, not a change everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import RecipeError
from .formatting import did_you_mean

if TYPE_CHECKING:  # pragma: no cover
    from .data import Dataset
    from .models import ModelHandle
    from .progress import Progress


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

    def applies_to(self, method: str) -> bool:
        return not self.methods or method in self.methods

    def coerce(self, value: Any, where: str) -> Any:
        """Check ``value`` against type and range; return it normalised or raise RecipeError."""
        name = f"{where}.{self.name}"
        value = self._typed(value, name)
        if self.kind in ("float", "int"):
            # NaN passes every comparison below, and Infinity is no setting
            if isinstance(value, float) and not math.isfinite(value):
                raise RecipeError(f"'{name}' must be a finite number, got {value!r}")
            lo, hi = self.minimum, self.maximum
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                raise RecipeError(f"'{name}' = {value} is out of range [{lo}, {hi}]")
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
    default_method: str = ""
    extras: dict[str, Any] = field(default_factory=dict)

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def params_for(self, method: str) -> list[Param]:
        return [p for p in self.params if p.applies_to(method)]

    def defaults(self, method: str) -> dict[str, Any]:
        return {p.name: p.default for p in self.params_for(method)}

    def validate(self, step: dict[str, Any], where: str) -> dict[str, Any]:
        """Return ``step`` with defaults filled in, or raise RecipeError naming the problem."""
        method = step.get("method", self.default_method or next(iter(self.methods)))
        if not isinstance(method, str) or method not in self.methods:
            raise RecipeError(
                f"'{where}.method': unknown {self.name} method {method!r}; "
                f"valid: {', '.join(self.methods)}" + did_you_mean(str(method), self.methods)
            )
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


_REGISTRY: dict[str, Technique] = {}


def register(technique: Technique) -> Technique:
    _REGISTRY[technique.name] = technique
    return technique


def techniques() -> dict[str, Technique]:
    """All registered techniques (importing the technique modules registers them)."""
    from . import _techniques  # noqa: F401  (import for side effect: registration)

    return dict(_REGISTRY)


def get(name: str, where: str = "technique") -> Technique:
    registry = techniques()
    if name not in registry:
        valid = ", ".join(sorted(registry)) or "none registered"
        raise RecipeError(
            f"'{where}': unknown technique {name!r}; valid: {valid}" + did_you_mean(name, registry)
        )
    return registry[name]
