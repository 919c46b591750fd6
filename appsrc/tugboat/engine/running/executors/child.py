"""One persistent worker process for the window's jobs (issue 17: the window never stalls).

Compressing and measuring a model holds Python's GIL for long stretches inside C calls (ONNX
Runtime's ``quantize_static``, session creation, ONNX serialization and checks, ``torch.onnx.export``),
and a GUI thread in the same process waits for every one of them. So the window runs that work here:
in a second process, forked from the ``forkserver`` that imported torch, the engine and ONNX Runtime
once (:mod:`..worker_start`), holding the loaded original (:meth:`ChildWorker.write_context`, one
private file per loaded model, read once by the worker) and its timing sessions across runs. The
price is a second process with torch (~240 MB resident) and a copy of the model and data (330 MB in
all with the demo; 1.4 GB with EfficientNet-Lite0 loaded and measured, its sessions included).

The job thread that asked (:meth:`ChildWorker.call`) waits on a pipe and re-publishes what streams
back while the worker works: ``progress.update`` (coalesced to one per :data:`UPDATE_S`) and every
``progress.record`` (epoch rows, logs), so a 30 s fine-tuning shows its curves live. A cancel ends the
worker at once (it is killed; the next call starts a fresh one), and since the worker writes nothing
the user sees (the parent alone writes the workspace, after the result came back), nothing half-made
lands anywhere. A :class:`TugboatError` raised in the worker arrives as the same error with the same
one-line message; a worker that dies (a crash, the out-of-memory killer) raises
:class:`WorkerDiedError` naming what it was making, and the next call starts a new worker.

Messages are pickled with the standard pickler (not ``multiprocessing``'s, which would move torch
tensors through shared memory), between this process and its own worker only; the context file
lives in a private (0700) folder and is read only from there (:func:`processes._check_private`).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import multiprocessing
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from ...errors import Cancelled, TugboatError
from ...progress import Progress, null_progress
from ..worker_start import start_context
from .base import DEFAULT_RETRIES, Context, Executor, Outcome, PrefixCache, Task, compress

POLL_S = 0.02  # how often the waiting job thread looks at its cancel token
UPDATE_S = 0.05  # progress updates are coalesced to one per interval (records never are)
START_TIMEOUT_S = 120.0  # a worker that has not answered by then (forkserver imports) cannot start


class WorkerDiedError(TugboatError):
    """The worker process ended while it was making something (crash, out-of-memory kill)."""


class WorkerUnavailableError(Exception):
    """The work cannot run in the worker (it cannot start, or the work or its result cannot travel):
    the caller runs it in its own thread instead. ``context``: the context file the worker could not
    read (its model's runs all stay in the caller's process)."""

    def __init__(self, message: str, context: str | None = None) -> None:
        super().__init__(message)
        self.context = context


class ChildWorker:
    """The parent's handle on one worker process, started lazily and restarted after a cancel or a
    crash. One call at a time (a lock); safe to use from any job thread."""

    def __init__(self, threads: int = 1) -> None:
        self.threads = max(1, int(threads))
        # a frozen bundle starts its workers by spawning itself (multiprocessing.freeze_support in its
        # entry script); elsewhere they are forked from the forkserver that preloaded torch and the engine
        self._mp = multiprocessing.get_context("spawn") if getattr(sys, "frozen", False) else start_context()
        self._start_failed: str | None = None  # a worker that could not start is not tried again
        self._dir = tempfile.mkdtemp(prefix="tugboat-child-")  # private (0700)
        self._live: dict[str, Any] = {"proc": None, "conn": None}  # what the finalizer ends
        self._calls = threading.Lock()
        self._starting = threading.Lock()
        self._contexts = 0
        self._holds: str | None = None  # the context the running worker has read
        self._unreadable: dict[str, str] = {}  # contexts a worker cannot read, and why
        self.closed = False
        self._finalizer = weakref.finalize(self, _end_process, self._live, self._dir)

    @property
    def _proc(self):
        return self._live["proc"]

    @property
    def _conn(self):
        return self._live["conn"]

    # --- life ---------------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.is_alive() else None

    def warm(self) -> threading.Thread:
        """Start the worker now, on a helper thread (the forkserver's imports take seconds the first
        time): it is ready when the first job needs it. (Not named ``tugboat-*``: a quit does not
        wait for it.)"""
        helper = threading.Thread(target=self._warm, name="worker-start", daemon=True)
        helper.start()
        return helper

    def _warm(self) -> None:
        with contextlib.suppress(Exception):  # the first call reports what went wrong
            self._ensure()

    def _ensure(self) -> None:
        with self._starting:
            if self.closed:
                raise WorkerUnavailableError("the worker process was closed")
            if self._proc is not None and self._proc.is_alive():
                return
            if self._start_failed:
                raise WorkerUnavailableError(self._start_failed)
            self._stop_process()
            proc = None
            try:
                parent, child = self._mp.Pipe(duplex=True)
                proc = self._mp.Process(target=_serve, args=(child, self.threads), name="tugboat-child",
                                        daemon=True)
                proc.start()
                child.close()
                if not parent.poll(START_TIMEOUT_S) or _loads(parent.recv_bytes()) != ("ready", proc.pid):
                    raise OSError("no answer from the new worker")
            except Exception as exc:
                _kill(proc, None)
                self._start_failed = f"the worker process could not start ({type(exc).__name__}: {exc})"
                raise WorkerUnavailableError(self._start_failed) from None
            self._live.update(proc=proc, conn=parent)
            self._holds = None
            if self.closed:  # closed while it started
                self._stop_process()
                raise WorkerUnavailableError("the worker process was closed")

    def stop(self) -> None:
        """End the worker now (a cancel, or a new model): the next call starts a fresh one."""
        with self._starting:
            self._stop_process()

    def _stop_process(self) -> None:
        proc, conn = self._live["proc"], self._live["conn"]
        self._live.update(proc=None, conn=None)
        _kill(proc, conn)

    def close(self) -> None:
        """End the worker and remove its private folder (the window closes); never waits for a
        worker that is still starting (it ends itself once started)."""
        self.closed = True
        self._finalizer()

    def use(self, context: str | None) -> None:
        """``context`` is the loaded model's now: the files of other models go, and a worker that
        holds another model is replaced by a fresh one (its memory given back), on a helper thread."""
        self.forget_contexts(keep=context)
        if self._holds is not None and self._holds != context:
            threading.Thread(target=self._restart, name="worker-restart", daemon=True).start()
        elif context is not None and self.pid is None:
            self.warm()

    def _restart(self) -> None:
        with self._calls:  # after the calls of the previous model (cancelled) let go
            self.stop()
            self._warm()

    # --- context ------------------------------------------------------------------------------------
    def new_context_path(self) -> str:
        """A new private file name for one loaded model's context."""
        self._contexts += 1
        return str(Path(self._dir) / f"context-{self._contexts:04d}.pickle")

    def write_context(self, context: Any) -> str:
        """Write what every call of one loaded model needs (its original, data, reference outputs) to
        a new private file; calls name it (:meth:`call`), and the worker reads it once."""
        path = self.new_context_path()
        _write_context(path, context)
        return path

    def forget_contexts(self, keep: str | None) -> None:
        """Remove the context files of models no longer loaded (all but ``keep``)."""
        for p in Path(self._dir).glob("context-*.pickle"):
            if str(p) != keep:
                with contextlib.suppress(OSError):
                    p.unlink()

    # --- calls --------------------------------------------------------------------------------------
    def call(self, fn: Callable[..., Any], args: tuple, progress: Progress, *, context: str | None,
             what: str, shared: dict[str, Any] | None = None) -> Any:
        """``fn(context, progress, *args)`` in the worker; its result. ``fn`` must be importable by
        name; ``what`` names the work in the error when the worker dies; ``shared``: this process's
        copies of the context's big parts (:func:`shared_parts`), which the result names instead of
        carrying them again (an int8 variant's float model is the original's). Raises :class:`Cancelled`
        (the worker is ended) when ``progress`` is cancelled, :class:`WorkerUnavailableError` when the
        work cannot go to the worker (run it here instead)."""
        if context is not None and context in self._unreadable:
            raise WorkerUnavailableError(self._unreadable[context])
        if getattr(sys.modules.get(fn.__module__), "__spec__", None) is None:
            raise WorkerUnavailableError(f"{fn.__module__}.{fn.__qualname__} cannot be imported by a worker")
        try:
            request = pickle.dumps((fn.__module__, fn.__qualname__, args, context),
                                   protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise WorkerUnavailableError(f"what {what} needs cannot be sent to a worker process ({exc})") from None
        with self._calls:
            progress.check()
            self._ensure()
            conn = self._conn
            self._holds = context
            try:
                conn.send_bytes(request)
            except OSError:
                raise self._died(what, progress) from None
            try:
                return self._wait(conn, progress, what, shared or {})
            except WorkerUnavailableError as exc:
                if exc.context is not None:
                    self._unreadable[exc.context] = str(exc)
                raise

    def _wait(self, conn, progress: Progress, what: str, shared: dict[str, Any]) -> Any:
        try:
            while True:
                if not conn.poll(POLL_S):
                    progress.check()
                    if self._proc is None or not self._proc.is_alive():
                        raise self._died(what, progress)
                    continue
                try:
                    raw = conn.recv_bytes()
                except (EOFError, OSError):
                    raise self._died(what, progress) from None
                msg = _read(raw, shared)
                done, result = _handle(msg, progress)
                if done:
                    return result
        except Cancelled:
            self.stop()  # killed at once; whatever it had made is dropped with it
            raise

    def _died(self, what: str, progress: Progress) -> WorkerDiedError:
        progress.check()  # ended because this call was cancelled (a new model, the window closing)
        proc = self._proc
        if proc is not None:
            proc.join(timeout=1.0)
        code = proc.exitcode if proc is not None else None
        self.stop()
        how = _exit_text(code)
        return WorkerDiedError(f"the worker process {what} {how}; nothing of it was kept and the "
                               "next run starts a new worker")


def _handle(msg: tuple, progress: Progress) -> tuple[bool, Any]:
    """One message from the worker: (True, result) at the end, else (False, None)."""
    kind = msg[0]
    if kind == "progress":
        progress.update(msg[1], msg[2])
    elif kind == "record":
        progress.record(msg[1], **msg[2])
    elif kind == "done":
        return True, msg[1]
    elif kind == "unavailable":
        raise WorkerUnavailableError(msg[1], msg[2] if len(msg) > 2 else None)
    elif kind == "error":
        raise _rebuild(msg[1])
    return False, None


def _exit_text(code: int | None) -> str:
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (the system ran out of memory?)" if -code == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"ended unexpectedly (exit code {code})"


def _kill(proc, conn) -> None:
    if conn is not None:
        with contextlib.suppress(Exception):
            conn.close()
    if proc is not None:
        with contextlib.suppress(Exception):
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=5)


def _end_process(live: dict[str, Any], folder: str) -> None:
    """A worker's end (closed, or its owner collected): the process killed, its folder removed."""
    _kill(live.get("proc"), live.get("conn"))
    live.update(proc=None, conn=None)
    shutil.rmtree(folder, ignore_errors=True)


def _loads(data: bytes, shared: dict[str, Any] | None = None) -> Any:
    """Unpickle a message from our own worker process (see the module doc); what it names by a key of
    ``shared`` (:func:`shared_parts`) is this process's own copy."""
    unpickler = pickle.Unpickler(io.BytesIO(data))
    unpickler.persistent_load = lambda key: (shared or {})[key]
    return unpickler.load()


def _dumps(obj: Any, shared: dict[str, Any] | None = None) -> bytes:
    """Pickle for the other side; a part of ``shared`` (by identity) goes as its key only."""
    keys = {id(v): k for k, v in (shared or {}).items()}
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.persistent_id = lambda o: keys.get(id(o))
    pickler.dump(obj)
    return buffer.getvalue()


def shared_parts(handle, data=None) -> dict[str, Any]:
    """The big parts of one loaded original, which both processes hold: a result that contains one
    (the float model an int8 variant keeps is the original's module) names it instead of carrying
    (and, for a converted graph module, compiling) it again."""
    parts = {"module": getattr(handle, "module", None), "onnx": getattr(handle, "onnx_model", None),
             "deploy": getattr(handle, "deploy_onnx", None), "float": getattr(handle, "float_module", None),
             "data": data}
    return {k: v for k, v in parts.items() if v is not None}


def _read(data: bytes, shared: dict[str, Any] | None = None) -> Any:
    """A message from the worker. A model converted by onnx2torch names its modules, which import
    only through the engine's loader here (torchvision stubbed); what still cannot be read here
    raises :class:`WorkerUnavailableError` (the caller makes it in this process)."""
    try:
        return _loads(data, shared)
    except ImportError:
        try:
            from ...io.models import _import_onnx2torch

            _import_onnx2torch()
            return _loads(data, shared)
        except Exception as exc:
            raise WorkerUnavailableError(f"its result cannot be read in this process ({exc})") from None
    except Exception as exc:
        raise WorkerUnavailableError(f"its result cannot be read in this process ({exc})") from None


# --- errors across the process boundary ------------------------------------------------------------
def _error_payload(exc: BaseException, tb: str) -> dict[str, Any]:
    cls = type(exc)
    if isinstance(exc, TugboatError):
        return {"module": cls.__module__, "name": cls.__qualname__, "message": exc.message,
                "path": exc.path, "hint": exc.hint}
    return {"module": cls.__module__, "name": cls.__qualname__, "text": str(exc), "traceback": tb}


def _rebuild(p: dict[str, Any]) -> BaseException:
    """The worker's exception as this process raises it: the same TugboatError class and one-line
    message; another exception as its builtin class (MemoryError stays MemoryError) with the
    worker's traceback as a note, else a RuntimeError naming its class."""
    cls = None
    with contextlib.suppress(Exception):
        cls = getattr(importlib.import_module(p["module"]), p["name"])
    if "message" in p:
        cls = cls if isinstance(cls, type) and issubclass(cls, TugboatError) else TugboatError
        exc = cls.__new__(cls)
        TugboatError.__init__(exc, p["message"], path=p["path"], hint=p["hint"])
        return exc
    if isinstance(cls, type) and issubclass(cls, Exception) and cls.__module__ == "builtins":
        exc = cls(p["text"])
    else:
        exc = RuntimeError(f"{p['name']}: {p['text']}")
    exc.add_note(f"in the worker process:\n{p['traceback']}")
    return exc


# --- the worker's side ------------------------------------------------------------------------------
class _Sender:
    """The worker's progress callbacks: each message pickled and written to the pipe (a parent that
    is gone ends the worker)."""

    def __init__(self, conn) -> None:
        self.conn = conn
        self.last = 0.0

    def send(self, msg: tuple) -> None:
        try:
            self.conn.send_bytes(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))
        except (OSError, EOFError):
            os._exit(0)  # the parent is gone (or ended this worker): nobody waits for the result

    def update(self, fraction: float, message: str) -> None:
        now = time.monotonic()
        if now - self.last >= UPDATE_S or fraction >= 1.0:
            self.last = now
            self.send(("progress", fraction, message))

    def record(self, kind: str, data: dict[str, Any]) -> None:
        self.send(("record", kind, dict(data)))


def _serve(conn, threads: int) -> None:
    """The worker's loop: one request at a time until the parent closes the pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C is the parent's to handle
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)
    sender = _Sender(conn)
    sender.send(("ready", os.getpid()))
    while True:
        try:
            raw = conn.recv_bytes()
        except (EOFError, OSError):
            return
        _serve_one(sender, raw)


def _serve_one(sender: _Sender, raw: bytes) -> None:
    import traceback

    context_path = None
    try:  # what the parent sent, and the model it names (a class only the parent can import: its runs stay there)
        module, name, args, context_path = pickle.loads(raw)  # from our parent (see the module doc)
        fn = getattr(importlib.import_module(module), name)
        context = _context(context_path)
    except Exception as exc:
        sender.send(("unavailable", f"the work or its model cannot be read in a worker ({type(exc).__name__}: "
                                    f"{exc})", context_path))
        return
    try:
        result = fn(context, Progress(sender.update, None, sender.record), *args)
    except Exception as exc:
        sender.send(("error", _error_payload(exc, traceback.format_exc())))
        return
    try:
        base = context if hasattr(context, "handle") else None
        data = _dumps(("done", result), shared_parts(base.handle, base.data) if base is not None else None)
    except Exception as exc:  # e.g. a made model that does not pickle: the parent makes it itself
        sender.send(("unavailable", f"the result cannot travel back ({type(exc).__name__}: {exc})"))
        return
    try:
        sender.conn.send_bytes(data)
    except (OSError, EOFError):
        os._exit(0)


_CONTEXTS: dict[str, Any] = {}  # in the worker: the loaded model's context, by its file


def _context(path: str | None) -> Any:
    """The context at ``path``, read once (the previous model's is dropped when another comes)."""
    if path is None:
        return None
    if path not in _CONTEXTS:
        from .processes import _check_private

        _check_private(Path(path))
        with open(path, "rb") as f:
            loaded = pickle.load(f)  # written by our parent (or this worker) into its private folder
        _CONTEXTS.clear()
        _CONTEXTS[path] = loaded
    return _CONTEXTS[path]


def _write_context(path: str, context: Any) -> None:
    from .processes import write_pickle

    write_pickle(path, context)


# --- the window's loads -------------------------------------------------------------------------------
def prepare_in(worker: ChildWorker, recipe, progress: Progress):
    """Load and measure the recipe's original in ``worker`` (:func:`~..runner.prepare`, the model's
    layer table too), which keeps it as the context of the runs to come: (baseline, info, context
    file). :class:`WorkerUnavailableError` when it cannot go there."""
    path = worker.new_context_path()
    base, info, onnx_bytes = worker.call(load_original, (recipe, path), progress, context=None,
                                         what=f"loading {recipe.model!r}")
    worker._holds = path  # it keeps the original it loaded
    adopt(base.handle, onnx_bytes)
    from ..runner import timing_reference

    base.timing = timing_reference(base.handle, base.data, base.cfg)  # for what is timed here (re-measure)
    return base, info, path


def load_original(_none, progress: Progress, recipe, path: str):
    """The worker's side of :func:`prepare_in`: the original loaded, measured and kept here (its
    context file written for a worker started later), then sent back."""
    import dataclasses

    from ..info import model_info
    from ..runner import prepare

    base = prepare(recipe, progress.sub(0.0, 0.9))
    progress.update(0.92, "reading layers")
    info = model_info(recipe.model, handle=base.handle)
    kept = dataclasses.replace(base, timing=None)
    _write_context(path, kept)
    _CONTEXTS.clear()
    _CONTEXTS[path] = base  # the same original, its timing sessions kept for the runs to come
    return kept, info, checked_onnx(base.handle)


# --- the window's variant runs ----------------------------------------------------------------------
def run_variant_in(worker: ChildWorker | None, context: str | None, base, recipe, progress: Progress,
                   start=None, done_steps: int = 0):
    """:func:`~..runner.run_variant` in ``worker`` (against the original its ``context`` file holds),
    or in this thread when there is no worker or the work cannot go there (said in a log line)."""
    from ..runner import run_variant
    from ..variants import variant_name

    if worker is not None and context is not None:
        what = f"making variant {variant_name(recipe.steps)!r}"
        try:
            modules = technique_modules(recipe.steps)
            variant, onnx_bytes = worker.call(make_variant, (recipe, start, done_steps, base.metrics, modules),
                                              progress, context=context, what=what,
                                              shared=shared_parts(base.handle, base.data))
            adopt(variant.handle, onnx_bytes)
            return variant
        except WorkerUnavailableError as exc:
            progress.record("log", message=f"{what} in the window's process: {exc}")
    return run_variant(base, recipe, progress, start=start, done_steps=done_steps)


def technique_modules(steps: list[dict[str, Any]]) -> list[str]:
    """The modules that define the steps' techniques (a worker imports them, so a technique a plug-in
    registers at import is known there too); :class:`WorkerUnavailableError` for one only this process has."""
    from ...techniques import steps as step_registry

    modules = set()
    for step in steps:
        module = getattr(step_registry.get(step["technique"]).apply, "__module__", None) or "__main__"
        if module == "__main__" or getattr(sys.modules.get(module), "__spec__", None) is None:
            raise WorkerUnavailableError(f"technique {step['technique']!r} exists only in this process")
        modules.add(module)
    return sorted(modules)


def make_variant(base, progress: Progress, recipe, start, done_steps: int, metrics: dict[str, Any],
                 modules: list[str]):
    """The worker's side of :func:`run_variant_in` (``base``: the context, this model's original,
    whose timing sessions stay alive here across runs)."""
    from ..runner import run_variant

    for module in modules:
        importlib.import_module(module)
    base.metrics = metrics  # the original's metrics on record now (a re-measure changes them)
    variant = run_variant(base, recipe, progress, start=start, done_steps=done_steps)
    variant.info["made_on"] = f"process {os.getpid()}"
    return variant, checked_onnx(variant.handle)


def checked_onnx(handle) -> bytes | None:
    """In the worker: the made model's ONNX bytes, serialized and passed through ``onnx.checker``
    here, so the window's process writes its artifact without doing either again (both hold the GIL:
    30-120 ms on an 18 MB graph). None when there are none to give."""
    if handle is None or getattr(handle, "status", "ok") != "ok":
        return None
    from ...measuring.runtime import checked_bytes

    try:
        return checked_bytes(handle.to_onnx())
    except Exception:  # the window's process checks it when it writes it, and says what is wrong
        return None


def adopt(handle, onnx_bytes: bytes | None) -> None:
    """In the window's process: a model that came back from the worker keeps its export (see
    :func:`keep_export`) and the checked bytes of its graph (see :func:`checked_onnx`)."""
    if handle is None:
        return
    keep_export(handle)
    if onnx_bytes is not None:
        from ...measuring.runtime import remember_serialized

        with contextlib.suppress(Exception):
            remember_serialized(handle.to_onnx(), onnx_bytes, checked=True)


def keep_export(handle) -> None:
    """A torch model's ONNX export came back with it: keep it valid for the copy here (its cache is
    keyed by tensor identities, new after unpickling), so writing the artifact exports nothing again."""
    cached = handle.__dict__.get("_exported")
    if cached is not None and handle.module is not None and cached[0] is handle.module:
        with contextlib.suppress(Exception):
            handle.__dict__["_exported"] = (handle.module, handle._export_key(), cached[2])


# --- the window's sweeps ----------------------------------------------------------------------------
class ChildExecutor(Executor):
    """The window's sweep in its worker process: each variant made *and measured* there, one after
    another (so timing stays serial and paired with the original the worker holds), handed back as
    soon as it is done; the driver (the sweep job, in the window's process) only writes it. A worker
    that dies is replaced and its variant tried again (``max_retries``); work that cannot go to the
    worker is made here."""

    name = "worker process"

    def __init__(self, worker: ChildWorker, context: str, max_retries: int = DEFAULT_RETRIES) -> None:
        self.worker, self.context, self.max_retries = worker, context, max_retries
        self.sweep_id = f"{os.getpid()}-{id(self)}-{time.monotonic_ns()}"

    def start(self, ctx: Context, cache=None) -> None:
        super().start(ctx, cache)
        self.needed = dict(cache.needed) if cache is not None and cache.needed is not None else None

    def map(self, tasks: Iterable[Task], progress: Progress | None = None) -> Iterator[Outcome]:
        progress = progress or null_progress()
        tasks = list(tasks)
        for i, task in enumerate(tasks):
            yield self._one(task, progress.sub(i / len(tasks), (i + 1) / len(tasks)))
            if self.cache is not None:
                self.cache.release(task.steps)

    def _one(self, task: Task, progress: Progress) -> Outcome:
        attempts = 0
        while True:
            attempts += 1
            try:
                args = (task, self.ctx.trust_steps, self.ctx.seed, self.sweep_id, self.needed,
                        technique_modules(task.steps))
                out = self.worker.call(make_outcome, args, progress, context=self.context,
                                       what=f"making variant {task.name!r}",
                                       shared=shared_parts(self.ctx.handle, self.ctx.data))
            except WorkerDiedError as exc:
                if attempts <= self.max_retries:
                    continue
                return Outcome(task.name, error=f"{exc.message} (tried {attempts} times)", attempts=attempts,
                               where=self.name)
            except WorkerUnavailableError as exc:
                progress.record("log", message=f"making {task.name!r} in the window's process: {exc}")
                out = compress(self.ctx, task, self.cache, progress)
                out.where = "driver (not in the worker)"
                return out
            out, onnx_bytes = out
            out.attempts = attempts
            adopt(out.handle, None)
            adopt(getattr(out.measured, "handle", None), onnx_bytes)
            return out

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "workers": 1, "pid": self.worker.pid}


_SWEEP_CACHE: dict[str, PrefixCache] = {}  # in the worker: the running sweep's prefix cache


def make_outcome(base, progress: Progress, task: Task, trust: bool, seed: int, sweep_id: str,
                 needed: dict[str, int] | None, modules: list[str]) -> tuple[Outcome, bytes | None]:
    """The worker's side of :class:`ChildExecutor`: make one variant (from the sweep's prefix cache
    here) and measure it against the original this worker holds."""
    from ..runner import finish_variant
    from ..variants import Variant

    for module in modules:
        importlib.import_module(module)
    if sweep_id not in _SWEEP_CACHE:
        _SWEEP_CACHE.clear()
        _SWEEP_CACHE[sweep_id] = PrefixCache(dict(needed) if needed is not None else None)
    cache = _SWEEP_CACHE[sweep_id]
    t0 = time.perf_counter()
    ctx = Context(base.handle, base.data, base.cfg, trust, seed=seed)
    out = compress(ctx, task, cache, progress.sub(0.0, 0.7))
    cache.release(task.steps)
    out.where = f"process {os.getpid()}"
    if out.handle is not None:
        try:
            out.measured = finish_variant(Variant(task.name, {}), out.handle, base, progress.sub(0.7, 1.0))
            out.measured.info["made_on"] = out.where
        except Cancelled:
            raise
        except Exception:  # measured by the driver instead, which reports it as a sweep does
            out.measured = None
    out.seconds = time.perf_counter() - t0 if out.measured is not None else out.seconds
    return out, checked_onnx(getattr(out.measured, "handle", None))
