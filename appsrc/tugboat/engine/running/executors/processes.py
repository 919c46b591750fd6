"""A pool of worker processes that make variants (issue 17.8: a sweep uses every core).

Tasks go to the workers in *groups* that share their first step (a pruned-and-fine-tuned model that
three quantization methods start from is made once, in one worker, with a prefix cache of that group
only); groups are handed out largest first, and split when there are fewer groups than workers.
Each worker uses ``cores // workers`` torch threads.

Start-up is paid once and early: :meth:`ProcessExecutor.warm` starts the workers while the driver
still loads and measures the original. Where the OS has it, the workers are forked from a
``forkserver`` that imported torch, the engine and ONNX Runtime once (:data:`PRELOAD`), so a worker
starts in milliseconds instead of importing torch again (about 1.3 s of CPU each); elsewhere they are
``spawn``-ed. The model and data follow once per worker, in a private file the driver writes at
:meth:`start` (our own objects between our own processes, as a pool's initializer arguments would
be). Each variant comes back *as soon as it is made* (a file in the same private folder, written
atomically), not when its whole group is done, so the driver measures it while the workers go on.
Workers pause while the driver measures (:meth:`ProcessExecutor.quiet`, a gate checked at every
progress check). A worker that dies takes its unfinished tasks with it: the pool is rebuilt and those
tasks tried again, at most ``max_retries`` times, then they are recorded as failed with the reason. A
made model that cannot travel back (it does not pickle) is made again in the driver, so no variant
is lost.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from ...errors import Cancelled
from ...progress import CancelToken, Progress, null_progress
from ..worker_start import PRELOAD, start_context
from .base import Context, Executor, Outcome, PrefixCache, Task, compress, cpu_count, steps_key

_CTX: Context | None = None
_CTX_PATH: str | None = None
_CTX_STAMP: float | None = None
_GATE = None  # set by the driver while it measures: workers wait at their next progress check
POLL_S = 0.05  # how often the driver looks for variants made
OUT = "made"  # the private folder's sub-folder where workers put each variant they made


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


def write_pickle(path: str, obj) -> None:
    """``obj`` pickled into ``path`` (in a private worker folder), atomically: a process killed
    mid-write leaves no file, and a reader never sees half of one."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)


def _check_private(path: Path) -> None:
    """Files (the context, made variants) are only read from the sweep's private folder (``mkdtemp``, 0700),
    owned by this user, the file ours too; anything else is refused rather than unpickled."""
    for p in (path.parent, path):
        st = os.lstat(p)
        if st.st_uid != os.getuid() or (p == path.parent and st.st_mode & 0o077):
            raise PermissionError(f"{p}: not this sweep's private worker folder; refusing to read it")


def _run_group(group: list[tuple[int, Task]]) -> int:
    """Make a group's variants in this worker, handing each back as soon as it is made."""
    ctx = _context()
    counts: dict[str, int] = {}
    for _, t in group:
        for p in PrefixCache.prefixes(t.steps):
            counts[p] = counts.get(p, 0) + 1
    cache = PrefixCache({k: n for k, n in counts.items() if n > 1})
    progress = Progress(token=_PauseToken(_GATE))
    for seq, task in group:
        progress.check()  # a new task waits while the driver measures
        out = compress(ctx, task, cache, progress)
        cache.release(task.steps)
        out.where = f"process {os.getpid()}"
        _deliver(seq, out)
    return len(group)


def _deliver(seq: int, out: Outcome) -> None:
    """Write one outcome for the driver, atomically (a worker killed mid-write leaves no file)."""
    try:
        data = pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # e.g. a made model that does not pickle: the driver makes it itself
        data = pickle.dumps({"name": out.name, "unpicklable": f"{type(exc).__name__}: {exc}"})
    assert _CTX_PATH is not None
    path = Path(_CTX_PATH).parent / OUT / f"{seq:06d}.pickle"
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


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
        self._mp = start_context()
        self._gate = self._mp.Event()  # set while the driver measures a variant it got back
        self._warming: threading.Thread | None = None

    @property
    def _ctx_path(self) -> str:
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="tugboat-workers-")  # private (0700)
            os.mkdir(Path(self._dir) / OUT, 0o700)
        return str(Path(self._dir) / "context.pickle")

    def warm(self) -> None:
        """Start every worker now, on a helper thread (starting the forkserver waits for its imports):
        the workers' start overlaps the driver's own loading and measuring of the original."""
        if self._pool is None and self._warming is None:
            self._pool = self._new_pool()
            self._warming = threading.Thread(target=self._ping_all, args=(self._pool,), name="tugboat-warm",
                                             daemon=True)
            self._warming.start()

    def _ping_all(self, pool: ProcessPoolExecutor) -> None:
        with contextlib.suppress(Exception):  # a pool that broke or was shut down meanwhile
            for _ in range(self.width):
                pool.submit(_ping)

    def _warmed(self) -> None:
        """Wait for :meth:`warm`'s helper (the pool is used from this thread only after it)."""
        if self._warming is not None:
            self._warming.join()
            self._warming = None

    def start(self, ctx: Context, cache=None) -> None:
        super().start(ctx, None)  # the driver's cache stays in the driver; each group has its own
        write_pickle(self._ctx_path, ctx)

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """Workers wait (at their next progress check) while the driver measures a variant."""
        self._gate.set()
        try:
            yield
        finally:
            self._gate.clear()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.width, mp_context=self._mp, initializer=_init,
                                   initargs=(self._ctx_path, self.threads, self._gate))

    def _submit(self, group: list[tuple[int, Task]], pending: dict[Future, list[tuple[int, Task]]],
                attempts: dict[str, int]) -> None:
        for _, task in group:
            attempts[task.name] = attempts.get(task.name, 0) + 1
        self._warmed()
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
        tasks = list(tasks)
        seq = {id(t): i for i, t in enumerate(tasks)}
        todo = dict(enumerate(tasks))  # not handed back yet
        attempts: dict[str, int] = {}
        pending: dict[Future, list[tuple[int, Task]]] = {}
        for stale in (Path(self._ctx_path).parent / OUT).iterdir():  # numbers restart with every map
            stale.unlink()
        for group in group_tasks(tasks, self.width):
            self._submit([(seq[id(t)], t) for t in group], pending, attempts)
        try:
            while pending:
                progress.check()
                done, _ = wait(list(pending), timeout=POLL_S, return_when=FIRST_COMPLETED)
                yield from self._made(todo, attempts)
                broken = False
                for fut in done:
                    group = pending.pop(fut)
                    try:
                        fut.result()
                    except BrokenProcessPool:
                        broken = True
                        pending[fut] = group  # retried below with every group in flight
                    except Cancelled:
                        raise
                    except Exception as exc:  # not expected: make what is left of the group here
                        yield from self._made(todo, attempts)
                        for i, task in group:
                            if todo.pop(i, None) is not None:
                                yield self._in_driver(task, exc)
                if broken:
                    yield from self._retry(todo, pending, attempts)
            yield from self._made(todo, attempts)
        except BaseException:
            self._kill()
            raise

    def _made(self, todo: dict[int, Task], attempts: dict[str, int]) -> Iterator[Outcome]:
        """The variants workers have handed back since the last look, in the order they were made."""
        folder = Path(self._ctx_path).parent / OUT
        for path in sorted(folder.glob("*.pickle"), key=lambda p: p.stat().st_mtime_ns):
            _check_private(path)
            with open(path, "rb") as f:
                got = pickle.load(f)  # written by this sweep's own workers (see the module doc)
            path.unlink()
            task = todo.pop(int(path.stem), None)
            if task is None:  # made twice (a retry raced the first worker's last write)
                continue
            if isinstance(got, dict):
                got = self._in_driver(task, got["unpicklable"])
            got.attempts = attempts.get(task.name, 1)
            yield got

    def _in_driver(self, task: Task, why: Exception | str) -> Outcome:
        out = compress(self.ctx, task)
        kind = type(why).__name__ if isinstance(why, Exception) else str(why).split(":")[0]
        out.where = f"driver ({kind} in the worker)"
        return out

    def _retry(self, todo: dict[int, Task], pending: dict[Future, list[tuple[int, Task]]],
               attempts: dict[str, int]) -> Iterator[Outcome]:
        """A dead worker breaks the pool and every group in flight: a new pool, and the tasks of those
        groups not handed back yet again, unless they have used up their retries."""
        groups = list(pending.values())
        pending.clear()
        self._kill()
        yield from self._made(todo, attempts)  # what the workers finished before the pool broke
        for group in groups:
            left = [(i, t) for i, t in group if i in todo]
            if not left:
                continue
            if max(attempts[t.name] for _, t in left) > self.max_retries:
                for i, t in left:
                    del todo[i]
                    yield Outcome(t.name, error=f"its worker process died {attempts[t.name]} time(s) while "
                                  "making it", attempts=attempts[t.name], where="processes")
            else:
                self._submit(left, pending, attempts)

    def _kill(self) -> None:
        self._warmed()
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
