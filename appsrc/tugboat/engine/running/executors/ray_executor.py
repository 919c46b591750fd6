"""Variants made as Ray tasks (``tugboat sweep --executor ray [--address ADDR]``), an optional extra.

Without ``address`` a local Ray instance is started with a bounded number of CPUs (``--workers``,
default: this machine's cores) and no dashboard; with one, the driver joins that cluster
(``ray.init(address=...)``, e.g. ``auto`` or ``ray://head:10001``). The baseline model, data and
measure settings go once into the object store (``ray.put``) and every task gets them by reference.
Each variant is one task declaring ``num_cpus`` (and ``num_gpus=1`` when the recipe asks for a CUDA
device); Ray retries a task whose worker died up to ``max_retries`` times, after which the variant is
recorded as failed with Ray's reason. Cancelling the sweep (Ctrl+C, the window's Cancel) cancels the
tasks in flight (``ray.cancel``); the workspace is only ever written by the driver.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

from ...progress import Progress, null_progress
from .base import Context, Executor, ExecutorError, Outcome, Task, compress, cpu_count

INSTALL = "pip install 'tugboat-ml[ray]'"

try:
    import ray
except ImportError:  # an optional extra
    raise ExecutorError(f"--executor ray needs Ray, which is not installed; install it with: {INSTALL}") from None


def _remote_compress(ctx: Context, task: Task, threads: int) -> Outcome:
    import torch

    torch.set_num_threads(max(1, threads))
    out = compress(ctx, task)
    try:
        out.where = f"ray node {ray.get_runtime_context().get_node_id()[:8]}"
    except Exception:
        out.where = "ray"
    return out


class RayExecutor(Executor):
    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None, max_retries: int = 2,
                 num_cpus_per_task: float = 1.0, num_gpus_per_task: float = 0.0) -> None:
        self.address = address
        self.workers = workers
        self.max_retries = max_retries
        self.num_cpus = num_cpus_per_task
        self.num_gpus = num_gpus_per_task
        self._started_here = False
        self._ctx_ref = None
        self._fn = None

    def start(self, ctx: Context, cache=None) -> None:
        super().start(ctx, None)
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                      "configure_logging": False}
            try:
                if self.address:
                    ray.init(address=self.address, **kwargs)
                else:
                    ray.init(num_cpus=self.workers or cpu_count(), num_gpus=0 if not self.num_gpus else None,
                             **kwargs)
            except Exception as exc:
                where = f"the Ray cluster at {self.address}" if self.address else "a local Ray instance"
                raise ExecutorError(f"could not start or join {where}: {' '.join(str(exc).split())[:200]}") \
                    from None
            self._started_here = True
        total = int(ray.cluster_resources().get("CPU", 1))
        self.width = max(1, int(total // max(self.num_cpus, 1e-9)))
        self._ctx_ref = ray.put(ctx)  # once; every task gets it by reference
        self._fn = ray.remote(_remote_compress).options(num_cpus=self.num_cpus, num_gpus=self.num_gpus,
                                                         max_retries=self.max_retries,
                                                         retry_exceptions=False)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "workers": self.width, "address": self.address or "local"}

    def map(self, tasks: Iterable[Task], progress: Progress | None = None) -> Iterator[Outcome]:
        progress = progress or null_progress()
        assert self._fn is not None
        pending = {self._fn.remote(self._ctx_ref, task, max(1, int(self.num_cpus))): task for task in tasks}
        try:
            while pending:
                progress.check()
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.2)
                for ref in ready:
                    task = pending.pop(ref)
                    try:
                        out = ray.get(ref)
                    except ray.exceptions.RayTaskError as exc:  # raised inside the task: not retried
                        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                        out = Outcome(task.name, error=f"{type(cause).__name__}: "
                                      f"{' '.join(str(cause).split())[:300]}", where="ray")
                    except ray.exceptions.RayError as exc:  # a worker or node lost max_retries + 1 times
                        out = Outcome(task.name, error=f"lost on Ray after {self.max_retries + 1} attempt(s): "
                                      f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}",
                                      attempts=self.max_retries + 1, where="ray")
                    yield out
        except BaseException:
            for ref in pending:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
            raise

    def close(self) -> None:
        self._ctx_ref = None
        if self._started_here and ray.is_initialized():
            ray.shutdown()
        self._started_here = False
