"""Where a sweep's variants are *compressed*: in this process, in worker processes, or on Ray.

An executor only makes variants (applies their steps, from a shared prefix where it can); it never
times them and never writes the workspace. The driver (:func:`tugboat.engine.running.sweep.run_sweep`)
measures every variant it gets back one after another in its own process (so a timing is never
disturbed by parallel work, and latency stays paired with the baseline) and is the only writer of
the workspace, whose folder lock it holds.

``Executor.map(tasks, progress)`` yields one :class:`Outcome` per task *as tasks finish* (not in
order). A task that cannot be made (a :class:`TugboatError`, a worker that died more than
``max_retries`` times) comes back as an outcome with ``error`` set, and the sweep goes on.

* :class:`AutoExecutor` (``auto``, the default of ``tugboat sweep``): worker processes when the plan
  has at least ``MIN_PARALLEL`` variants in two or more independent groups, some of its steps train,
  and the machine has more than one core and a core to spare, this process otherwise. One worker
  per core (at most one per group), each with this process's torch thread count where that
  oversubscribes the cores at most twice (so a variant's weights are those a local run gives);
  workers wait while the driver times a variant (a shared gate checked at every progress check),
  so parallel work never disturbs a timing.
* :class:`LocalExecutor` (``local``, the default of :func:`~tugboat.engine.running.sweep.run_sweep`): in this
  process, one task at a time, with the sweep's prefix cache.
* :class:`ProcessExecutor` (``processes``): a pool of ``spawn`` worker processes, ``torch`` threads
  per worker = cores / workers. Model and data are sent once per worker.
* ``RayExecutor`` (``ray``, in :mod:`.ray_executor`, the optional ``tugboat-ml[ray]`` extra,
  imported only when asked for): one Ray task per variant with declared resources; model and data
  go once into Ray's object store.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

from ...progress import Progress
from ..worker_start import MIN_PARALLEL, trains
from .base import (
    CRASH_ENV,
    DEFAULT_RETRIES,
    Context,
    Executor,
    ExecutorError,
    LocalExecutor,
    Outcome,
    Task,
    check_workers,
    compress,
    cpu_count,
    steps_key,
)

__all__ = ["CRASH_ENV", "DEFAULT_RETRIES", "EXECUTORS", "MIN_PARALLEL", "AutoExecutor", "Context", "Executor",
           "ExecutorError", "LocalExecutor", "Outcome", "Task", "check_workers", "compress", "cpu_count",
           "idle_cores", "make_executor"]

EXECUTORS = ("auto", "local", "processes", "ray")


class AutoExecutor(Executor):
    """Worker processes when they pay off (see the module doc), this process otherwise; decided from
    the recipe's plan at :meth:`plan_for` (then the workers start at once) or from the first tasks."""

    name = "auto"

    def __init__(self, workers: int | None = None, max_retries: int = DEFAULT_RETRIES) -> None:
        self.cores = cpu_count()
        self.workers = workers or self.cores
        self.max_retries = max_retries
        self.width = max(2, self.workers) if self.cores > 1 else 1  # a grid is handed over whole
        self.inner: Executor | None = None
        self._described: dict[str, Any] = {"name": "auto", "chose": "local", "workers": 1}

    @staticmethod
    def groups(steps: list[list[dict[str, Any]]]) -> int:
        """How many independent groups (distinct first steps of multi-step variants) a plan has."""
        return len({steps_key(s[:1]) if len(s) > 1 else steps_key(s) for s in steps})

    def parallel(self, steps: list[list[dict[str, Any]]]) -> bool:
        """Worker processes pay off for a big enough grid of independent groups that trains (fine-
        tuning, distillation, QAT: seconds per group, where quantizing alone takes a fraction of a
        worker's start) on a machine with a core to spare (a busy machine gains nothing from them)."""
        return (self.cores > 1 and len(steps) >= MIN_PARALLEL and self.groups(steps) >= 2
                and all(_builtin(step.get("technique")) for s in steps for step in s)
                and any(trains(step) for s in steps for step in s) and idle_cores() >= 1)

    def choose(self, steps: list[list[dict[str, Any]]] | None) -> Executor:
        if self.inner is None:
            if steps is not None and self.parallel(steps):
                import torch

                from .processes import ProcessExecutor

                workers = min(self.workers, self.groups(steps))  # no idle worker holding a model copy
                # the thread count this process trains with, so a variant made in a worker has the
                # weights a local run gives (training sums change in the last bits with it), unless
                # that oversubscribes the cores more than twice (many-core machines): then cores/workers
                threads = torch.get_num_threads()
                if workers * threads > 2 * self.cores:
                    threads = max(1, self.cores // workers)
                self.inner = ProcessExecutor(workers, max_retries=self.max_retries, threads=threads)
            else:
                self.inner = LocalExecutor()
        return self.inner

    def plan_for(self, recipe, max_variants: int | None = None, local: bool = False) -> None:
        """Choose from the recipe's sweep plan and start the workers now, if any (``local``: this
        process, e.g. for a recipe that trains on the GPU)."""
        from ..sweep import plan

        if local:
            self.choose(None)
            return

        try:
            cands = plan(recipe, max_variants).candidates
        except Exception:  # the sweep itself reports a bad plan, with its file and reason
            return
        self.choose([c.steps for c in cands] if isinstance(cands, list) else None).warm()

    def start(self, ctx: Context, cache=None) -> None:
        super().start(ctx, cache)
        if self.inner is not None:
            self.inner.start(ctx, cache)

    def map(self, tasks: Iterable[Task], progress: Progress | None = None) -> Iterator[Outcome]:
        tasks = list(tasks)
        if self.inner is None:
            self.choose([t.steps for t in tasks]).start(self.ctx, self.cache)
            self.describe()
        assert self.inner is not None
        yield from self.inner.map(tasks, progress)

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()

    def quiet(self):
        return self.inner.quiet() if self.inner is not None else super().quiet()

    def describe(self) -> dict[str, Any]:
        # the same dict stays on record and is updated when the choice is made later, at map
        if self.inner is not None:
            inner = self.inner.describe()
            self._described.update(chose=inner["name"], workers=inner["workers"])
        return self._described


def idle_cores() -> float:
    """Cores not busy right now (cores minus the 1-minute load average; all of them where the OS
    has no load average)."""
    try:
        return cpu_count() - os.getloadavg()[0]
    except (AttributeError, OSError):
        return float(cpu_count())


def _builtin(name: Any) -> bool:
    """A technique a fresh worker process knows: one of Tugboat's own (a technique registered at run
    time by a script or a test exists only in this process)."""
    from ...techniques import steps as step_registry

    tech = step_registry.techniques().get(name) if isinstance(name, str) else None
    return tech is not None and getattr(tech.apply, "__module__", "").startswith("tugboat.")



def make_executor(name: str = "local", *, workers: int | None = None, address: str | None = None,
                  max_retries: int = DEFAULT_RETRIES) -> Executor:
    """The executor called ``name`` (``auto``, ``local``, ``processes``, ``ray``)."""
    if name == "auto":
        if address:
            raise ExecutorError("--address is for --executor ray")
        return AutoExecutor(None if workers is None else check_workers(workers), max_retries=max_retries)
    if name == "local":
        if address:
            raise ExecutorError("--address is for --executor ray")
        return LocalExecutor()
    if name == "processes":
        if address:
            raise ExecutorError("--address is for --executor ray")
        from .processes import ProcessExecutor

        return ProcessExecutor(check_workers(workers), max_retries=max_retries)
    if name == "ray":
        from .ray_executor import RayExecutor  # raises ExecutorError with the install line without Ray

        return RayExecutor(address=address, workers=None if workers is None else check_workers(workers),
                           max_retries=max_retries)
    raise ExecutorError(f"unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}")

