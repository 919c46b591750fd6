"""How a sweep's worker processes start, kept free of torch so the CLI can start them first.

Workers are forked from a ``forkserver`` that imports :data:`PRELOAD` (torch, the engine, ONNX
Runtime and ``torch._dynamo``, which the first optimizer step imports) once, so each worker starts in
milliseconds instead of importing torch again; where the OS has no forkserver they are spawned.
:func:`prestart` starts that server before the driver imports anything heavy, when the recipe looks
like a sweep the ``auto`` executor will hand to workers: its imports then run on a second core
beside the driver's own (about a second of a 12-variant demo sweep's eight on two cores). It only
reads the recipe's TOML; the sweep itself decides later, from the validated plan.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import tomllib
from typing import Any

PRELOAD = ("torch", "tugboat.engine.running.runner", "tugboat.engine.running.sweep",
           "tugboat.engine.techniques.prune", "tugboat.engine.techniques.quantize", "onnxruntime",
           "torch._dynamo")
MIN_PARALLEL = 6  # fewer variants than this are made in the driver (see executors.AutoExecutor)


def start_context():
    """The multiprocessing context workers start from: forkserver with :data:`PRELOAD`, else spawn."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        mp = multiprocessing.get_context("forkserver")
        mp.set_forkserver_preload(list(PRELOAD))  # only read when the forkserver starts
        return mp
    return multiprocessing.get_context("spawn")


def cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def idle_cores() -> float:
    """Cores not busy right now (cores minus the 1-minute load average; all where the OS has none)."""
    try:
        return cores() - os.getloadavg()[0]
    except (AttributeError, OSError):
        return float(cores())


def prestart(recipe_path: str, executor: str) -> bool:
    """Start the forkserver now if this sweep will likely use workers; True if it did. Never raises:
    a recipe that cannot be read is reported by the sweep itself."""
    if executor not in ("auto", "processes") or cores() < 2:
        return False
    if executor == "auto" and not (idle_cores() >= 1 and _looks_parallel(recipe_path)):
        return False
    mp = start_context()
    if mp.get_start_method() != "forkserver":
        return False
    try:
        from multiprocessing import forkserver

        forkserver.ensure_running()  # returns at once; the server imports PRELOAD on its own
    except Exception:
        return False
    return True


def _looks_parallel(recipe_path: str) -> bool:
    """A quick read of the TOML: a grid of at least MIN_PARALLEL variants, some of whose steps train."""
    try:
        with open(recipe_path, "rb") as f:
            raw = tomllib.load(f)
    except Exception:
        return False
    sweep = raw.get("sweep")
    if not isinstance(sweep, dict) or not sweep or "search" in raw or "target" in raw:
        return False
    if "steps" in sweep:  # each entry one variant's whole step list
        entries = [e for e in sweep["steps"] if isinstance(e, list)] if isinstance(sweep["steps"], list) else []
        n, steps = len(entries), [s for e in entries for s in e]
    else:
        lists = [v for v in sweep.values() if isinstance(v, list)]
        n = math.prod(len(v) for v in lists) if len(lists) == len(sweep) else 0
        steps = list(raw.get("steps") or []) if isinstance(raw.get("steps"), list) else []
        steps += [{str(key).rsplit(".", 1)[-1]: v} for key, vs in sweep.items() for v in vs]  # swept values
    return n >= MIN_PARALLEL and any(trains(s) for s in steps if isinstance(s, dict))


def trains(step: dict[str, Any]) -> bool:
    """A step that trains (fine-tuning, distillation, QAT): seconds of work a worker pays off for."""
    return bool(step.get("finetune_epochs") or step.get("technique") == "distill"
                or step.get("method") == "qat-int8")
