"""A pool of ``spawn`` worker processes that make variants (issue 17.8: a sweep uses every core).

Tasks go to the workers in *groups* that share their first step (a pruned-and-fine-tuned model that
three quantization methods start from is made once, in one worker, with a prefix cache of that group
only); groups are handed out largest first, and split when there are fewer groups than workers.
Each worker uses ``cores // workers`` torch threads.

Start-up is paid once and early: :meth:`ProcessExecutor.warm` starts the workers (each imports
torch and the engine, the slow part) while the driver still loads and measures the original; the
model and data follow once per worker, in a private file the driver writes at :meth:`start` (our
own objects between our own processes, as a pool's initializer arguments would be). A worker that
dies takes its in-flight group with it: the pool is rebuilt and the group tried again, at most
``max_retries`` times, then its variants are recorded as failed with the reason. A made model that
cannot travel back (it does not pickle) is made again in the driver, so no variant is lost.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from ...errors import Cancelled
from ...progress import CancelToken, Progress, null_progress
from .base import Context, Executor, Outcome, PrefixCache, Task, compress, cpu_count, steps_key

_CTX: Context | None = None
_CTX_PATH: str | None = None
_CTX_STAMP: float | None = None
_GATE = None  # set by the driver while it measures: workers wait at their next progress check
PRELOAD = ("tugboat.engine.running.runner", "tugboat.engine.running.sweep", "tugboat.engine.techniques.prune",
           "tugboat.engine.techniques.quantize",
           "onnxruntime")


class _PauseToken(CancelToken):
    """A worker's token: never cancelled (the driver ends workers), but a check waits while the
    driver is timing a variant, so a worker's compression never shares the CPU with a timing."""

    def __init__(self, gate) -> None:
        super().__init__()
        self.gate = gate

    @property
    def cancelled(self) -> bool:
        while self.gate is not None and self.gate.is_set():
            time.sleep(0.002)
        return False


def _init(ctx_path: str, threads: int, gate=None) -> None:
    global _CTX_PATH, _GATE
    _GATE = gate
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    import importlib

    import torch

    torch.set_num_threads(threads)
    for name in PRELOAD:  # what every task needs, imported while the driver measures the original
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    _CTX_PATH = ctx_path


def _ping() -> int:
    return os.getpid()


def _context() -> Context:
    """The sweep's context, read from the driver's file once (again if the driver rewrote it)."""
    global _CTX, _CTX_STAMP
    assert _CTX_PATH is not None
    stamp = os.stat(_CTX_PATH).st_mtime_ns
    if _CTX is None or stamp != _CTX_STAMP:
        _check_private(Path(_CTX_PATH))
        with open(_CTX_PATH, "rb") as f:
            _CTX = pickle.load(f)  # written by this sweep's driver process (see the module doc)
        _CTX_STAMP = stamp
    return _CTX


def _check_private(path: Path) -> None:
    """The context is only read from the driver's own private folder: made by ``mkdtemp`` (0700),
    owned by this user, the file ours too; anything else is refused rather than unpickled."""
    for p in (path.parent, path):
        st = os.lstat(p)
        if st.st_uid != os.getuid() or (p == path.parent and st.st_mode & 0o077):
            raise PermissionError(f"{p}: not this sweep's private worker folder; refusing to read it")


def _run_group(tasks: list[Task]) -> list[Outcome]:
    ctx = _context()
    counts: dict[str, int] = {}
    for t in tasks:
        for p in PrefixCache.prefixes(t.steps):
            counts[p] = counts.get(p, 0) + 1
    cache = PrefixCache({k: n for k, n in counts.items() if n > 1})
    outs = []
    progress = Progress(token=_PauseToken(_GATE))
    for task in tasks:
        out = compress(ctx, task, cache, progress)
        cache.release(task.steps)
        out.where = f"process {os.getpid()}"
        outs.append(out)
    return outs


def group_tasks(tasks: list[Task], workers: int) -> list[list[Task]]:
    """Tasks grouped by their first step (a shared prefix is made once), largest group first;
    the largest groups are split while there are fewer groups than workers."""
    by_first: dict[str, list[Task]] = {}
    for t in tasks:
        by_first.setdefault(steps_key(t.steps[:1]) if len(t.steps) > 1 else t.name, []).append(t)
    groups = sorted(by_first.values(), key=len, reverse=True)
    while groups and len(groups) < workers and len(groups[0]) > 1:
        big = groups.pop(0)
        half = (len(big) + 1) // 2
        groups = sorted([*groups, big[:half], big[half:]], key=len, reverse=True)
    return groups


class ProcessExecutor(Executor):
    name = "processes"

    def __init__(self, workers: int, max_retries: int = 2, threads: int | None = None) -> None:
        self.width = workers
        self.max_retries = max_retries
        self.threads = threads or max(1, cpu_count() // workers)
        self._pool: ProcessPoolExecutor | None = None
        self._dir: str | None = None
        self._mp = multiprocessing.get_context("spawn")
        self._gate = self._mp.Event()  # set while the driver measures a variant it got back

    @property
    def _ctx_path(self) -> str:
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="tugboat-workers-")  # private (0700)
        return str(Path(self._dir) / "context.pickle")

    def warm(self) -> None:
        """Start every worker now (their imports overlap the driver's own work)."""
        if self._pool is None:
            self._pool = self._new_pool()
            for _ in range(self.width):
                self._pool.submit(_ping)

    def start(self, ctx: Context, cache=None) -> None:
        super().start(ctx, None)  # the driver's cache stays in the driver; each group has its own
        tmp = self._ctx_path + ".tmp"
        with open(tmp, "wb") as f:
            pickle.dump(ctx, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, self._ctx_path)

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.width, mp_context=self._mp, initializer=_init,
                                   initargs=(self._ctx_path, self.threads, self._gate))

    def _submit(self, group: list[Task], pending: dict[Future, list[Task]], attempts: dict[str, int]) -> None:
        for task in group:
            attempts[task.name] = attempts.get(task.name, 0) + 1
        if self._pool is None:
            self._pool = self._new_pool()
        try:
            fut = self._pool.submit(_run_group, group)
        except BrokenProcessPool as exc:  # a worker died while groups were still being handed over
            fut = Future()
            fut.set_exception(exc)
        pending[fut] = group

    def map(self, tasks: Iterable[Task], progress: Progress | None = None) -> Iterator[Outcome]:
        progress = progress or null_progress()
        attempts: dict[str, int] = {}
        pending: dict[Future, list[Task]] = {}
        for group in group_tasks(list(tasks), self.width):
            self._submit(group, pending, attempts)
        try:
            while pending:
                progress.check()
                done, _ = wait(list(pending), timeout=0.2, return_when=FIRST_COMPLETED)
                broken: list[list[Task]] = []
                for fut in done:
                    group = pending.pop(fut)
                    try:
                        outs = fut.result()
                    except BrokenProcessPool:
                        broken.append(group)
                        continue
                    except Cancelled:
                        raise
                    except Exception as exc:  # e.g. a made model that does not pickle: make it here
                        outs = [self._in_driver(task, exc) for task in group]
                    for out in outs:
                        out.attempts = attempts[out.name]
                        self._gate.set()  # workers wait while the driver measures this variant
                        try:
                            yield out
                        finally:
                            self._gate.clear()
                if broken:
                    yield from self._retry(broken + list(pending.values()), pending, attempts)
        except BaseException:
            self._kill()
            raise

    def _in_driver(self, task: Task, exc: Exception) -> Outcome:
        out = compress(self.ctx, task)
        out.where = f"driver ({type(exc).__name__} in the worker)"
        return out

    def _retry(self, groups: list[list[Task]], pending: dict[Future, list[Task]],
               attempts: dict[str, int]) -> Iterator[Outcome]:
        """A dead worker breaks the pool and every group in flight: a new pool, and each group again
        unless it has used up its retries."""
        pending.clear()
        self._kill()
        for group in groups:
            if max(attempts[t.name] for t in group) > self.max_retries:
                for t in group:
                    yield Outcome(t.name, error=f"its worker process died {attempts[t.name]} time(s) while "
                                  "making it", attempts=attempts[t.name], where="processes")
            else:
                self._submit(group, pending, attempts)

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
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
