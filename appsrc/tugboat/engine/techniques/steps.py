"""The technique registry: what a recipe step's ``technique`` may name.

The built-in techniques are the modules :mod:`~tugboat.engine.techniques.distill`,
:mod:`~tugboat.engine.techniques.prune` and :mod:`~tugboat.engine.techniques.quantize`, each exposing one
:class:`~tugboat.engine.techniques.technique.Technique` as ``TECHNIQUE``; :func:`register` adds
another (a plug-in, or a toy in a test). The recipe validator, the runner, the estimators, the
sweep, the CLI and the GUI panels all ask this registry, so a new technique is one new module.

The registry sits above the techniques (they import only :mod:`~tugboat.engine.techniques.technique`), so there
is no import circle; the built-ins are imported on first use, which keeps ``import tugboat.cli`` free
of torch. A technique module that fails to import is an error, not a technique quietly missing.
"""

from __future__ import annotations

from ..errors import RecipeError
from ..formatting import did_you_mean
from .technique import NO_CHANGE, RUN_KEYS, Param, Technique  # noqa: F401  (the interface, for callers)

_REGISTRY: dict[str, Technique] = {}
_BUILT_IN: list[str] = []


def _load_built_in() -> None:
    if _BUILT_IN:
        return
    from . import distill, prune, quantize

    # built-ins first, in this order (the window's technique tabs follow it); registered ones after
    built_in = {t.name: t for t in (distill.TECHNIQUE, prune.TECHNIQUE, quantize.TECHNIQUE)}
    others = {k: v for k, v in _REGISTRY.items() if k not in built_in}
    _REGISTRY.clear()
    _REGISTRY.update({**built_in, **others})
    _BUILT_IN.extend(built_in)


def register(technique: Technique) -> Technique:
    """Add ``technique`` (or replace the one of the same name); returns it."""
    _load_built_in()
    _REGISTRY[technique.name] = technique
    return technique


def unregister(name: str) -> None:
    """Remove a registered technique (a test's toy, when the test ends)."""
    _REGISTRY.pop(name, None)


def techniques() -> dict[str, Technique]:
    """All registered techniques, the built-in ones first."""
    _load_built_in()
    return dict(_REGISTRY)


def get(name: str, where: str = "technique") -> Technique:
    registry = techniques()
    if name not in registry:
        valid = ", ".join(sorted(registry)) or "none registered"
        raise RecipeError(
            f"'{where}': unknown technique {name!r}; valid: {valid}" + did_you_mean(name, registry)
        )
    return registry[name]


def find(name: object) -> Technique | None:
    """The technique named ``name``, or None (a stored report may name one this build lacks)."""
    return techniques().get(name) if isinstance(name, str) else None
