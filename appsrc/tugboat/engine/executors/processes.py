"""A pool of ``spawn`` worker processes that make variants (issue 17.8: a sweep uses every core).

Model and data are sent once per worker (the pool's initializer arguments); each worker uses
``cores // workers`` torch threads and keeps a small cache of step prefixes of its own. A worker that
dies takes its in-flight tasks with it: the pool is rebuilt and those tasks are tried again, at most
``max_retries`` times, then recorded as failed with the reason. A made model that cannot travel back
(it does not pickle) is made again in the driver, so no variant is lost to transport.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from ..errors import Cancelled
from ..progress import Progress, null_progress
from . import Context, Executor, Outcome, Task, compress, cpu_count

_CTX: Context | None = None
_CACHE = None
_CACHE_LIMIT = 8


def _init(ctx: Context, threads: int) -> None:
    global _CTX, _CACHE
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)
    from ..sweep import PrefixCache

    _CTX = ctx  # sent by the pool to this worker once (Tugboat's own objects between its processes)
    _CACHE = PrefixCache(None)


def _run(task: Task) -> Outcome:
    assert _CTX is not None
    if _CACHE is not None and len(_CACHE) > _CACHE_LIMIT:
        _CACHE._handles.clear()
        _CACHE._seconds.clear()
    out = compress(_CTX, task, _CACHE)
    out.where = f"process {os.getpid()}"
    return out


class ProcessExecutor(Executor):
    name = "processes"

    def __init__(self, workers: int, max_retries: int = 2) -> None:
        self.width = workers
        self.max_retries = max_retries
        self.threads = max(1, cpu_count() // workers)
        self._pool: ProcessPoolExecutor | None = None
        self._ctx: Context | None = None

    def start(self, ctx: Context, cache=None) -> None:
        super().start(ctx, None)  # the driver's cache stays in the driver; workers keep their own
        self._ctx = ctx

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.width, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init, initargs=(self._ctx, self.threads))

    def map(self, tasks: Iterable[Task], progress: Progress | None = None) -> Iterator[Outcome]:
        progress = progress or null_progress()
        if self._pool is None:
            self._pool = self._new_pool()
        attempts: dict[str, int] = {}
        pending: dict[Future, Task] = {}

        def submit(task: Task) -> None:
            attempts[task.name] = attempts.get(task.name, 0) + 1
            assert self._pool is not None
            try:
                fut = self._pool.submit(_run, task)
            except BrokenProcessPool as exc:  # a worker died while tasks were still being handed over
                fut = Future()
                fut.set_exception(exc)
            pending[fut] = task

        for task in tasks:
            submit(task)
        try:
            while pending:
                progress.check()
                done, _ = wait(list(pending), timeout=0.2, return_when=FIRST_COMPLETED)
                broken: list[Task] = []
                for fut in done:
                    task = pending.pop(fut)
                    try:
                        out = fut.result()
                    except BrokenProcessPool:
                        broken.append(task)
                        continue
                    except Cancelled:
                        raise
                    except Exception as exc:  # e.g. a made model that does not pickle: make it here
                        out = compress(self.ctx, task)
                        out.where = f"driver ({type(exc).__name__} in the worker)"
                    out.attempts = attempts[task.name]
                    yield out
                if broken:
                    broken += list(pending.values())  # a dead pool fails every task in flight
                    pending.clear()
                    self._kill()
                    self._pool = self._new_pool()
                    for task in broken:
                        if attempts[task.name] > self.max_retries:
                            yield Outcome(task.name, error=f"its worker process died {attempts[task.name]} "
                                          "time(s) while making it", attempts=attempts[task.name],
                                          where="processes")
                        else:
                            submit(task)
        except BaseException:
            self._kill()
            raise

    def _kill(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        procs = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=5)

    def close(self) -> None:
        self._kill()  # every result is in; idle workers are ended, never waited on
