"""Which techniques and methods can run on a loaded model, and why not when they cannot.

The GUI panels and ``tugboat info`` ask this before anything runs, so a technique that cannot apply
says why up front instead of failing on Run: an ONNX file onnx2torch cannot convert still quantizes in
ONNX Runtime and still teaches a student, but cannot be pruned or trained with quantization.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..techniques import steps as step_registry

if TYPE_CHECKING:  # pragma: no cover
    from ..io.data import Dataset
    from ..io.models import ModelHandle


def capabilities(handle: ModelHandle, data: Dataset | None = None) -> dict[str, dict[str, str | None]]:
    """``{technique: {method: None if it can run, else one line saying why not}}``.

    A method needs a torch module when its technique does (``needs_torch``) or names it in
    ``torch_methods``; anything else is the technique's own ``unavailable`` hook's to say.
    ``data``: when given, methods that need data (calibration, fine-tuning) are checked against it;
    without it they are not refused (the data may come later)."""
    why_no_torch = None
    if handle.module is None:
        why_no_torch = "needs a torch model; " + (
            f"this one is ONNX-only ({handle.conversion_error})" if handle.conversion_error
            else "this variant exists only as an ONNX graph")
    out: dict[str, dict[str, str | None]] = {}
    for name, tech in step_registry.techniques().items():
        per: dict[str, str | None] = {}
        for method in tech.methods:
            reason = None
            if why_no_torch and (tech.needs_torch or method in tech.torch_methods):
                reason = why_no_torch
            elif tech.unavailable is not None:
                reason = tech.unavailable(method, handle, data)
            per[method] = reason
        out[name] = per
    return out


def needs_torch_module(recipe) -> bool:
    """Whether anything a recipe will do needs the model as a torch module: a technique or method
    that edits or trains it, torch or ExecuTorch as a runtime, a step with ``runtime = "torch"``.
    A recipe without steps (the window's load: any step may follow) or with a sweep or target
    search (which may change methods) always does."""
    cfg = recipe.measure
    runtimes = {cfg.runtime, *(cfg.runtimes or [])}
    if not recipe.steps or recipe.sweep or recipe.target or runtimes & {"torch", "executorch"}:
        return True
    for step in recipe.steps:
        name, method = step.get("technique"), step.get("method")
        try:
            tech = step_registry.get(name)
        except Exception:
            return True
        if tech.needs_torch or method in getattr(tech, "torch_methods", ()) or name == "distill" or \
                step.get("runtime") == "torch":
            return True
    return False


def summary(caps: dict[str, dict[str, str | None]]) -> list[str]:
    """One line per technique with methods that cannot run: ``prune: needs a torch model; ...``."""
    lines = []
    for tech, per in caps.items():
        refused = {m: r for m, r in per.items() if r}
        if not refused:
            continue
        reasons = sorted(set(refused.values()))
        scope = "" if len(refused) == len(per) else f" ({', '.join(refused)})"
        lines.append(f"{tech}{scope}: {'; '.join(reasons)}")
    return lines
