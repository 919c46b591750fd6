"""Time spent inside named submodules of a torch module, measured with forward hooks: one helper
for the Layers view's latency share (engine/measuring/layers.py) and pruning's sensitivity table
(engine/techniques/prune.py)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from ..lazy import torch


def hooked_times(module: torch.nn.Module, inputs: Sequence[torch.Tensor], names: list[str],
                 repeats: int, on_run: Callable[[int], None] | None = None
                 ) -> tuple[dict[str, list[float]], list[float]]:
    """(ms inside each named submodule per timed run, ms of each whole forward pass), after one
    warm-up pass. Names that are not submodules (an ONNX node outside any module) are left out."""
    subs = {}
    for n in names:
        try:
            subs[n] = module.get_submodule(n)
        except AttributeError:
            continue
    times: dict[str, list[float]] = {n: [] for n in subs}
    starts: dict[str, float] = {}
    hooks = []
    for n, m in subs.items():
        hooks.append(m.register_forward_pre_hook(lambda _m, _i, n=n: starts.__setitem__(n, time.perf_counter())))
        hooks.append(m.register_forward_hook(
            lambda _m, _i, _o, n=n: times[n].append((time.perf_counter() - starts[n]) * 1000.0)))
    totals: list[float] = []
    try:
        with torch.inference_mode():
            module(*inputs)  # warm-up
            for t in times.values():
                t.clear()
            for i in range(repeats):
                t0 = time.perf_counter()
                module(*inputs)
                totals.append((time.perf_counter() - t0) * 1000.0)
                if on_run is not None:
                    on_run(i)
    finally:
        for h in hooks:
            h.remove()
    return times, totals
