"""The executor interface, below the sweep and every executor: a :class:`Task` (one variant to make),
the :class:`Context` every task needs, the :class:`Outcome` that comes back, :func:`compress` (a task's
steps applied from the longest cached prefix), the :class:`PrefixCache` itself and the in-process
:class:`LocalExecutor`. :mod:`tugboat.engine.running.executors` chooses one (:func:`~.make_executor`)."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ...errors import Cancelled, TugboatError
from ...io.models import ModelHandle
from ...measuring import memory
from ...progress import Progress, null_progress
from ..runner import apply_steps

DEFAULT_RETRIES = 2
CRASH_ENV = "TUGBOAT_TEST_CRASH_ONCE"  # tests only: a marker file; the first task to see it absent dies


class ExecutorError(TugboatError):
    """An executor cannot be used (Ray not installed, no cluster at the address, bad --workers)."""


@dataclass
class Task:
    """One variant to make: its name and its validated steps."""

    name: str
    steps: list[dict[str, Any]]


@dataclass
class Outcome:
    """What came back for one task: the made model, or the reason it could not be made."""

    name: str
    handle: ModelHandle | None = None
    error: str | None = None
    reused_prefix_steps: int = 0
    seconds: float = 0.0  # compression time, wherever it ran
    attempts: int = 1
    where: str = "local"
    # the variant measured where it was made (the window's worker process): the driver only checks
    # it against the recipe and writes it (None: the driver measures the handle itself)
    measured: Any = None


@dataclass
class Context:
    """What every task needs, sent once per worker / once into the object store."""

    handle: ModelHandle
    data: Any
    cfg: Any  # MeasureConfig (for memory.check)
    trust_steps: bool = False
    crash_once: str | None = None
    seed: int = 0  # the recipe's seed: a variant made in a worker has the weights a local run gives
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, base, recipe) -> Context:
        return cls(base.handle, base.data, base.cfg, bool(recipe.trust_steps), os.environ.get(CRASH_ENV) or None,
                   seed=int(getattr(recipe, "seed", 0) or 0))


def compress(ctx: Context, task: Task, cache=None, progress: Progress | None = None) -> Outcome:
    """Apply a task's steps (from the longest prefix in ``cache``); a TugboatError becomes an
    outcome with its message (one combination that cannot be made does not end the sweep)."""
    progress = progress or null_progress()
    _maybe_crash(ctx)
    t0 = time.perf_counter()
    done, handle, prefix_seconds = cache.lookup(task.steps) if cache is not None else (0, None, 0.0)
    handle = handle or ctx.handle
    n = len(task.steps)
    try:
        memory.check(handle, task.steps[done:], ctx.data, ctx.cfg, first_index=done, where=task.name)
        for k in range(done, n):
            step_t0 = time.perf_counter()
            handle = apply_steps(handle, [task.steps[k]], ctx.data, progress.sub(k / n, (k + 1) / n),
                                 first_index=k, trust=ctx.trust_steps, seed=ctx.seed)
            prefix_seconds += time.perf_counter() - step_t0
            if cache is not None and k + 1 < n and cache.wants(task.steps, k + 1):
                cache.store(task.steps, k + 1, handle, prefix_seconds)
    except Cancelled:
        raise
    except TugboatError as exc:
        return Outcome(task.name, error=exc.message, reused_prefix_steps=done,
                       seconds=time.perf_counter() - t0)
    return Outcome(task.name, handle, reused_prefix_steps=done, seconds=time.perf_counter() - t0)


def _maybe_crash(ctx: Context) -> None:
    if ctx.crash_once:
        try:
            fd = os.open(ctx.crash_once, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        os._exit(3)  # a worker lost mid-task (tests: the sweep must still complete)


class Executor:
    """The interface: ``start`` once with the context, ``map`` chunks of tasks, ``close``."""

    name = "local"
    width = 1  # how many tasks the driver hands over at once

    def warm(self) -> None:
        """Get ready before the context exists (start workers while the driver measures the original)."""

    def start(self, ctx: Context, cache=None) -> None:
        self.ctx, self.cache = ctx, cache

    def map(self, tasks: Iterable[Task], progress: Progress | None = None) -> Iterator[Outcome]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def quiet(self) -> contextlib.AbstractContextManager:
        """Entered while the driver measures a variant: an executor that can pause its work does."""
        return contextlib.nullcontext()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "workers": self.width}


class LocalExecutor(Executor):
    """In this process, one task after another, with the sweep's prefix cache (the default)."""

    def map(self, tasks: Iterable[Task], progress: Progress | None = None) -> Iterator[Outcome]:
        progress = progress or null_progress()
        tasks = list(tasks)
        for i, task in enumerate(tasks):
            progress.check()
            out = compress(self.ctx, task, self.cache, progress.sub(i / len(tasks), (i + 1) / len(tasks)))
            if self.cache is not None:
                self.cache.release(task.steps)
            yield out


def cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def check_workers(workers: int | None) -> int:
    n = cpu_count() if workers is None else workers
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 1024:
        raise ExecutorError(f"--workers must be a whole number from 1 to 1024, got {workers!r}")
    return n


def steps_key(steps: list[dict[str, Any]]) -> str:
    """Canonical JSON of validated steps: equal keys mean equal computations."""
    return json.dumps(steps, sort_keys=True, separators=(",", ":"), default=str)


class PrefixCache:
    """Handles of step prefixes that a later candidate still needs, keyed by canonical JSON."""

    def __init__(self, needed: dict[str, int] | None = None) -> None:
        self._handles: dict[str, ModelHandle] = {}
        self._seconds: dict[str, float] = {}
        self.needed = needed  # prefix key -> candidates still to come that use it (None: keep all)

    @staticmethod
    def prefixes(steps: list[dict[str, Any]]) -> list[str]:
        return [steps_key(steps[:k]) for k in range(1, len(steps))]

    @classmethod
    def for_candidates(cls, cands: list[Any]) -> PrefixCache:  # sweep.Candidate: anything with .steps
        counts: dict[str, int] = {}
        for c in cands:
            for p in cls.prefixes(c.steps):
                counts[p] = counts.get(p, 0) + 1
        return cls({k: n for k, n in counts.items() if n > 1})

    def lookup(self, steps: list[dict[str, Any]]) -> tuple[int, ModelHandle | None, float]:
        """The longest cached prefix: (steps done, a private copy of its handle, its seconds)."""
        for k in range(len(steps) - 1, 0, -1):
            key = steps_key(steps[:k])
            if key in self._handles:
                return k, _private_copy(self._handles[key]), self._seconds[key]
        return 0, None, 0.0

    def wants(self, steps: list[dict[str, Any]], k: int) -> bool:
        key = steps_key(steps[:k])
        return self.needed is None or self.needed.get(key, 0) > 0

    def store(self, steps: list[dict[str, Any]], k: int, handle: ModelHandle, seconds: float) -> None:
        key = steps_key(steps[:k])
        self._handles[key] = _private_copy(handle)
        self._seconds[key] = seconds

    def release(self, steps: list[dict[str, Any]]) -> None:
        """One candidate using these prefixes is done: drop prefixes nobody needs any more."""
        if self.needed is None:
            return
        for p in self.prefixes(steps):
            if p in self.needed:
                self.needed[p] -= 1
                if self.needed[p] <= 0:
                    self._handles.pop(p, None)

    def __len__(self) -> int:
        return len(self._handles)


def _private_copy(handle: ModelHandle) -> ModelHandle:
    """A copy a technique may change without touching the cached prefix."""
    new = copy.copy(handle)
    new.module = copy.deepcopy(handle.module) if handle.module is not None else None
    new.history = list(handle.history)
    new.info = dict(handle.info)
    new.warnings = list(handle.warnings)
    return new

