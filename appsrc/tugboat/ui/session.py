"""The window's working state: model and data references, the measured baseline, the step chain.

A :class:`Session` turns user intent into jobs (load + measure the baseline, run one variant,
export). Results go workspace-first: a measured baseline or variant is handed on the GUI thread to
whoever places it (``baseline_measured`` / ``variant_measured``: the window's
:class:`~tugboat.ui.workspace_io.WorkspaceKeeper` adds it to the open workspace, which the
:class:`VariantStore` shows); a sweep's worker adds its variants to the workspace itself and the
store announces them. No widget code here and no torch math on the GUI thread: every engine call
runs inside a job.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, QTimer, Signal

from ..engine.errors import RecipeError, UntrustedFileError
from ..engine.measuring.measure import MeasureConfig
from ..engine.running.recipe import Recipe, validate_steps
from ..engine.running.sweep import LISTED
from ..engine.running.variants import Baseline, Variant, settings_difference, variant_name
from ..jobs import Job, JobQueue, JobSlot
from .store import BASELINE, VariantStore

DEMO_MODEL, DEMO_DATA = "demo:digits-cnn", "demo:digits"
_KEEP: Any = object()  # load(): keep the current architecture
IN_CHILD_ENV = "TUGBOAT_JOBS_IN_CHILD"  # "0": the window's runs stay in its own process (tests, debugging)
# the worker starts this long after the window (its forkserver imports torch and the engine, ~3 s of
# the other core), so the first load does not wait for it and the window's own start is not slowed
WARM_WORKER_AFTER_MS = 1000


def jobs_in_child() -> bool:
    """Whether the window makes its variants in a worker process (the default; see :class:`Session`)."""
    return os.environ.get(IN_CHILD_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _timing_copy(v: Variant) -> Variant:
    """A copy whose metrics, warnings and notes a worker may change (the store's stay untouched)."""
    return dataclasses.replace(v, metrics=copy.deepcopy(v.metrics), warnings=list(v.warnings),
                               info=copy.deepcopy(v.info))


class _Untrusted:
    """Returned (not raised) by the load job so the GUI can ask the user and retry with trust."""

    def __init__(self, path: str, message: str) -> None:
        self.path, self.message = path, message


class Session(QObject):
    loading = Signal(str, str)  # model ref, data ref ("" if none)
    load_ended = Signal(str, str)  # a load failed or was cancelled: model still loaded ("" if none), why
    baseline_ready = Signal(object)  # engine Baseline
    model_info_ready = Signal(dict)  # engine.info.model_info(...) result
    data_ready = Signal(object)  # Dataset summary dict, or None without data
    trust_needed = Signal(str, str)  # path, message
    chain_changed = Signal(list)
    sweep_changed = Signal(list)
    error = Signal(str, str)  # message, details (non-job errors, e.g. invalid chain)
    baseline_measured = Signal(object)  # the baseline Variant, to be placed (before baseline_ready)
    variant_measured = Signal(object)  # a single run's Variant, to be placed (before variant_finished)
    variant_finished = Signal(object)  # Variant placed in the workspace and shown (files still written)
    sweep_variant = Signal(object)  # Variant a sweep wrote into the workspace, then shown by the store
    sweep_ended = Signal(object)  # engine SweepResult, or None when the sweep failed or was cancelled
    message = Signal(str)  # information for the user (e.g. a re-measure in another runtime)
    remeasured = Signal(list)  # names (baseline included) whose timings were taken again

    def __init__(self, store: VariantStore, queue: JobQueue, parent: QObject | None = None, *,
                 in_child: bool | None = None) -> None:
        super().__init__(parent)
        self.store = store
        self.queue = queue
        # the window's variants and sweeps are made (and measured) in one worker process, so C calls
        # that hold the GIL (quantization, ONNX Runtime sessions, export) never stall the window; it
        # holds the loaded original (330 MB with the demo, more with a big model: docs/guide.md). Off: in a job thread.
        self.in_child = jobs_in_child() if in_child is None else bool(in_child)
        self.worker = None  # the ChildWorker, started when a model is loaded
        self.worker_context: str | None = None  # its context file for the loaded baseline
        if self.in_child:
            QTimer.singleShot(WARM_WORKER_AFTER_MS, self._warm_worker)
        self.model_ref: str = ""
        self.data_ref: str = ""
        self.trust = False  # for this load only: never written into a recipe or workspace
        self.arch: str | None = None  # the architecture of a bare state_dict / safetensors file
        self.arch_kwargs: dict[str, Any] = {}
        self.task: str | None = None  # the user's task override (None: inferred from the outputs)
        self.measure = MeasureConfig()
        self.baseline: Baseline | None = None
        self.info: dict[str, Any] | None = None
        self._before_load: tuple = ("", "", False, None, {})
        self.chain: list[dict[str, Any]] = []
        self.chain_from: str | None = None  # variant whose model the chain starts from (reuse)
        self.sweep: list[dict[str, Any]] = []
        self.load_job: Job | None = None  # the latest load (the load slot's job while it runs)
        # one slot per purpose: a new load supersedes the old; a new model drops the old one's runs
        self.load_slot = JobSlot(queue, self)
        self.model_jobs = JobSlot(queue, self)

    # --- recipes --------------------------------------------------------------------------------
    def base_recipe(self) -> Recipe:
        return Recipe(model=self.model_ref, data=self.data_ref or None, measure=copy.copy(self.measure),
                      trust=self.trust, task=self.task, arch=self.arch, arch_kwargs=dict(self.arch_kwargs))

    def recipe_for(self, step: dict[str, Any] | None) -> Recipe:
        steps = [*self.chain, step] if step else list(self.chain)
        # defaults filled in (a bare {"technique": "quantize"} runs), and e.g. a torch step after
        # an ONNX-only step refused; validation is idempotent, so the chain prefix stays equal
        steps = validate_steps(steps, "chain")
        return self.base_recipe().with_steps(steps)

    # --- loading --------------------------------------------------------------------------------
    def load(self, model_ref: str | None = None, data_ref: str | None = None, *,
             trust: bool = False, arch: str | None = _KEEP,
             arch_kwargs: dict[str, Any] | None = None) -> Job | None:
        """Load the model (and data) and measure the baseline in a job; clears earlier results."""
        model_ref = model_ref if model_ref is not None else self.model_ref
        data_ref = data_ref if data_ref is not None else self.data_ref
        if not model_ref:
            return None
        previous = (self.model_ref, self.data_ref, self.trust, self.arch, self.arch_kwargs)
        if self.load_slot.job is None:  # not while another load is pending
            self._before_load = previous
        if str(model_ref) != self.model_ref:
            self.task = None  # a task chosen for one model does not carry over to the next
        self.model_ref, self.data_ref, self.trust = str(model_ref), str(data_ref or ""), trust
        if arch is not _KEEP:
            self.arch, self.arch_kwargs = arch or None, dict(arch_kwargs or {})
        recipe = self.base_recipe()
        self.loading.emit(self.model_ref, self.data_ref)
        worker = self._worker()

        def work(progress):
            try:
                return self._load_original(recipe, worker, progress)
            except UntrustedFileError as exc:
                return _Untrusted(str(exc.path or recipe.model), str(exc))

        # a newer load disconnects this one (the slot): what arrives here is the current load's
        self.load_job = self.load_slot.submit(
            work, name=f"load {Path(self.model_ref).name}", kind="load", finished=self._on_load_finished,
            failed=lambda msg, _det: self._on_load_ended(msg), cancelled=lambda: self._on_load_ended("cancelled"))
        return self.load_job

    # --- the worker process -------------------------------------------------------------------------
    def _worker(self):
        """The worker process's handle (created on first use), or None when runs stay in-thread."""
        if not self.in_child:
            return None
        if self.worker is None:
            from ..engine.running.executors.child import ChildWorker
            from ..jobs import worker_threads

            self.worker = ChildWorker(self.queue.threads or worker_threads())
        return self.worker

    def _warm_worker(self) -> None:
        worker = self._worker()
        if worker is not None and not worker.closed and worker.pid is None:
            worker.warm()

    def _load_original(self, recipe: Recipe, worker, progress) -> tuple[Baseline, dict[str, Any], str | None]:
        """In the load job: the original loaded and measured, in the worker process when there is one
        (which keeps it for the runs to come), else here: (baseline, layer info, worker context)."""
        from ..engine.running.info import model_info
        from ..engine.running.runner import prepare

        if worker is not None:
            from ..engine.running.executors.child import WorkerUnavailableError, prepare_in

            try:
                return prepare_in(worker, recipe, progress)
            except WorkerUnavailableError as exc:
                progress.record("log", message=f"loading {recipe.model} in the window's process: {exc}")
        base = prepare(recipe, progress.sub(0.0, 0.9))
        progress.update(0.92, "reading layers")
        info = model_info(recipe.model, handle=base.handle)
        return base, info, self._context_for(base, progress)

    def _context_for(self, base: Baseline, progress) -> str | None:
        """In the load job: the loaded original written once for the worker (None: runs in-thread)."""
        worker = self._worker()
        if worker is None:
            return None
        progress.update(0.96, "handing the model to the worker process")
        try:
            return worker.write_context(dataclasses.replace(base, timing=None))
        except Exception as exc:  # e.g. a model that does not pickle: its runs stay in this process
            progress.record("log", message=f"runs of this model stay in the window's process: {exc}")
            return None

    def _use_context(self, context: str | None) -> None:
        """A new model is loaded: the worker drops the previous one (a fresh worker starts now)."""
        self.worker_context = context
        if self.worker is not None:
            self.worker.use(context)

    def close(self) -> None:
        """The window closes: runs are cancelled, the worker process ends."""
        self.model_jobs.cancel()
        if self.worker is not None:
            self.worker.close()

    def abandon_load(self, reason: str) -> None:
        """The user declined to trust the file: as if the load had failed."""
        self._on_load_ended(reason)

    def forget_baseline(self) -> None:
        """Results are cleared (a workspace opened or made): runs of the old model are dropped."""
        self.model_jobs.cancel()
        self.baseline = None

    def _on_load_ended(self, reason: str) -> None:
        """A failed or cancelled load: the model that was loaded before stays the one recipes use."""
        if self.baseline is not None:
            self.model_ref, self.data_ref, self.trust, self.arch, self.arch_kwargs = self._before_load
        self.load_ended.emit(self.model_ref if self.baseline is not None else "", reason)

    def _on_load_finished(self, result: object) -> None:
        if isinstance(result, _Untrusted):
            self.trust_needed.emit(result.path, result.message)
            return
        base, info, context = result
        self.model_jobs.cancel()  # runs of the previous model: their results would be stale
        self.baseline, self.info = base, info
        self._use_context(context)
        self.chain, self.chain_from, self.sweep = [], None, []
        self.baseline_measured.emit(Variant(BASELINE, self.base_recipe().with_steps([]).to_dict(),
                                            base.metrics, handle=base.handle,
                                            warnings=list(base.handle.warnings)))
        self.chain_changed.emit([])
        self.sweep_changed.emit([])
        self.model_info_ready.emit(info)
        self.data_ready.emit(base.data.summary() if base.data is not None else None)
        self.baseline_ready.emit(base)

    # --- chain ----------------------------------------------------------------------------------
    def set_chain(self, steps: list[dict[str, Any]], start_from: str | None = None) -> None:
        self.chain = [dict(s) for s in steps]
        self.chain_from = start_from
        self.chain_changed.emit(list(self.chain))

    def continue_from(self, name: str) -> None:
        """Chain the next step after variant ``name`` (its model is reused, not rebuilt)."""
        v = self.store.get(name)
        if v is None:
            return
        steps = list((v.recipe or {}).get("steps", []))
        self.set_chain(steps, start_from=name if steps else None)

    def clear_chain(self) -> None:
        self.set_chain([])

    # --- running --------------------------------------------------------------------------------
    def run_step(self, step: dict[str, Any] | None, *, name: str | None = None) -> Job | None:
        """Run chain + ``step`` as one variant in a job; the result is placed (``variant_measured``)."""
        if self.baseline is None:
            self.error.emit("Load a model first (File > Open model..., or Try the demo).", "")
            return None
        try:
            recipe = self.recipe_for(step)
        except RecipeError as exc:
            self.error.emit(str(exc), "")
            return None
        return self.run_recipe(recipe, name=name)

    def run_recipe(self, recipe: Recipe, *, name: str | None = None) -> Job | None:
        base = self.baseline
        if base is None:
            return None
        start, done = None, 0
        origin = self.store.get(self.chain_from) if self.chain_from else None
        if (origin is not None and origin.handle is not None and origin.status == "ok"
                and recipe.steps[:len(self.chain)] == self.chain):
            start, done = origin.handle, len(self.chain)
        label = name or variant_name(recipe.steps)

        worker, context = self.worker, self.worker_context

        def work(progress):
            from ..engine.running.executors.child import run_variant_in

            return run_variant_in(worker, context, base, recipe, progress, start=start, done_steps=done)

        return self.model_jobs.submit(work, name=label, kind="variant", keep=True,
                                      finished=self._on_variant_finished)

    def _on_variant_finished(self, variant: Variant) -> None:
        variant.name = self._distinct_name(variant)
        self.variant_measured.emit(variant)  # into the workspace, then the store's views
        self.variant_finished.emit(variant)

    def _distinct_name(self, variant: Variant) -> str:
        """A name taken by a variant with other settings gets what differs (``~alpha=0.5``); only a
        re-run of the very same settings is numbered "(2)" by the workspace."""
        taken = self.store.get(variant.name)
        steps = list((variant.recipe or {}).get("steps") or [])
        if taken is None or taken.name == BASELINE:
            return variant.name
        other = list((taken.recipe or {}).get("steps") or [])
        if steps == other:
            return variant.name
        diff = settings_difference(steps, other)
        return f"{variant.name}~{diff}" if diff else variant.name

    def rerun(self, name: str) -> Job | None:
        v = self.store.get(name)
        if v is None or self.baseline is None or name == BASELINE:
            return None
        return self.run_recipe(self.base_recipe().with_steps(list(v.recipe.get("steps", []))))

    def _export_target(self, name: str, kind: str, path: str, handle, source: str | None) -> Job | None:
        """Export for a runtime (engine/targets): reloaded and compared there, atomic, cancellable;
        the check (max-abs error, top-1 agreement) goes to the log."""
        base = self.baseline
        data, batch = (base.data if base is not None else None), int(self.measure.batch)

        def work(progress):
            from ..engine.io.loading import load_model
            from ..engine.measuring.targets import describe, export_target

            model = handle if handle is not None else load_model(source)
            result = export_target(model, kind, path, progress, data=data, batch=batch)
            progress.record("log", message=describe(result))
            return result["files"][0]

        return self.queue.submit(work, name=f"export {name} ({kind})", kind="export")

    def remeasure_in(self, name: str, runtime: str) -> Job | None:
        """Measure a variant again in ``runtime`` (latency, fidelity to the original, version); the
        result joins its ``metrics["runtimes"]``. A runtime that cannot run it records why."""
        v, base = self.store.get(name), self.baseline
        if v is None or base is None:
            return None
        if v.handle is None:
            self.error.emit(f"Variant {name!r} has no model in memory; re-run it first.", "")
            return None
        handle, cfg = v.handle, self.measure

        def work(progress):
            from ..engine.measuring.runtimes import measure_runtimes

            return measure_runtimes(handle, cfg, [runtime], data=base.data, reference=base.outputs,
                                    progress=progress)

        return self.model_jobs.submit(work, name=f"measure {name} in {runtime}", kind="measure", keep=True,
                                      finished=lambda per, n=name: self._on_remeasured_in(n, per))

    def _on_remeasured_in(self, name: str, per: dict[str, Any]) -> None:
        v = self.store.get(name)
        if v is None:  # deleted meanwhile
            return
        v.metrics.setdefault("runtimes", {}).update(per)
        for runtime, entry in per.items():
            lat = entry.get("latency_ms") or {}
            text = (f"{name} in {runtime} {entry.get('version')}: {lat.get('median', 0):.3g} ms at batch "
                    f"{lat.get('batch')}, top-1 agreement {entry['fidelity'].get('top1_agreement')}"
                    if entry.get("ok") else f"{name}: {entry.get('reason')}")
            self.message.emit(text)
        self.store.update(v)

    # --- re-measure -----------------------------------------------------------------------------
    def remeasure(self, names: list[str], artifact_dir: str | None = None) -> Job | None:
        """Time the original and the variants ``names`` again, back to back (each paired with the
        original, whose session is kept), in a job; the store is updated on the GUI thread."""
        base = self.baseline
        if base is None or self.store.baseline is None:
            self.error.emit("Load a model first (File > Open model..., or Try the demo).", "")
            return None
        chosen, missing = [], []
        for name in names:
            v = self.store.get(name)
            if v is None or name == BASELINE or v.status != "ok" or not v.metrics:
                continue
            saved = (v.artifacts or {}).get("onnx")
            path = os.path.join(artifact_dir, saved) if saved and artifact_dir else None
            if v.handle is None and not (path and os.path.exists(path)):
                missing.append(name)
                continue
            chosen.append((_timing_copy(v), v.handle, path))
        if missing:
            self.error.emit(f"No model in memory for {', '.join(missing)}; re-run to time again.", "")
        if not chosen:
            return None
        base_copy = _timing_copy(self.store.baseline)

        def work(progress):
            from ..engine.io.loading import load_model
            from ..engine.measuring.remeasure import remeasure

            pairs = [(copy_, handle if handle is not None else load_model(path)) for copy_, handle, path in chosen]
            remeasure(base.handle, base_copy, pairs, base.cfg, timing=base.timing, progress=progress)
            return base_copy, [p[0] for p in pairs]

        label = chosen[0][0].name if len(chosen) == 1 else f"{len(chosen)} variants"
        return self.model_jobs.submit(work, name=f"re-measure {label}", kind="measure", keep=True,
                                      finished=lambda result, b=base: self._on_remeasured(result, b))

    def _on_remeasured(self, result, base: Baseline) -> None:
        new_base, variants = result
        names = []
        for new in [new_base, *variants]:
            old = self.store.get(new.name)
            if old is None:
                continue
            # the workspace's own entries change (the store shows them; no copies)
            old.metrics, old.warnings, old.info = new.metrics, new.warnings, new.info
            self.store.update(old)
            names.append(new.name)
        base.metrics = self.store.baseline.metrics
        self.remeasured.emit(names)

    # --- sweep ----------------------------------------------------------------------------------
    def add_to_sweep(self, step: dict[str, Any]) -> None:
        steps = [*self.chain, dict(step)]
        if steps not in self.sweep:
            self.sweep.append(steps)
            self.sweep_changed.emit(list(self.sweep))

    def clear_sweep(self) -> None:
        self.sweep = []
        self.sweep_changed.emit([])

    def sweep_as_recipe(self) -> Recipe:
        """The sweep as a recipe: each picked setting is one entry of ``[sweep] steps``, so the
        recipe names exactly the variants the window runs (``tugboat sweep`` runs the same ones)."""
        recipe = self.base_recipe().with_steps([])
        recipe.sweep = {LISTED: [[dict(step) for step in steps] for steps in self.sweep]}
        return recipe

    def sweep_recipe(self) -> dict[str, Any]:
        return self.sweep_as_recipe().to_dict()

    def run_sweep(self, workspace, executor: str = "local", address: str | None = None) -> Job | None:
        """Run the sweep as one job of :func:`engine.sweep.run_sweep` (its plan, prefix cache and
        memory check) into ``workspace`` (open, its lock held by the window). Each variant lands
        in the workspace first, then in the store as it finishes (``sweep_variant``)."""
        base = self.baseline
        if base is None or not self.sweep:
            return None
        recipe = self._checked_sweep_recipe()
        if recipe is None:
            return None

        worker, context = (self.worker, self.worker_context) if executor == "local" else (None, None)

        def work(progress):
            from ..engine.running.executors import make_executor
            from ..engine.running.executors.child import ChildExecutor
            from ..engine.running.sweep import run_sweep

            runner = make_executor(executor, address=address or None) if executor != "local" else None
            if worker is not None and context is not None:  # made and measured in the worker process
                runner = ChildExecutor(worker, context)
            return run_sweep(recipe, workspace.path, progress=progress, executor=runner,
                             workspace=workspace, base=base,
                             on_variant=lambda v: progress.record("variant", variant=dataclasses.replace(v)),
                             log=lambda msg: progress.record("log", message=msg))

        where = "here" if executor == "local" else f"on {executor}" + (f" at {address}" if address else "")
        return self.model_jobs.submit(
            work, name=f"sweep of {len(self.sweep)} ({where})", kind="sweep", keep=True,
            record=self._on_sweep_record, finished=self.sweep_ended.emit,
            failed=lambda _m, _d: self.sweep_ended.emit(None), cancelled=lambda: self.sweep_ended.emit(None))

    def _checked_sweep_recipe(self) -> Recipe | None:
        """The sweep recipe, checked (each setting validated, the list planned) before a job starts."""
        from ..engine.running.sweep import plan

        recipe = self.sweep_as_recipe()
        try:
            plan(recipe)
        except RecipeError as exc:
            self.error.emit(str(exc), "")
            return None
        return recipe

    def _on_sweep_record(self, kind: str, data: dict) -> None:
        variant = data.get("variant") if kind == "variant" else None
        # a copy of the workspace's entry with the model still in memory (Diagnose, Layers,
        # Continue from): the store keeps the model and announces the workspace's entry
        if isinstance(variant, Variant) and self.store.announce(variant):
            self.sweep_variant.emit(self.store.get(variant.name))

    # --- export ---------------------------------------------------------------------------------
    def export(self, name: str, kind: str, path: str, artifact_dir: str | None = None) -> Job | None:
        """Export a variant as ``onnx``, ``torch`` (torch.export .pt2, TorchScript fallback) or
        ``recipe`` (TOML) in a job."""
        v = self.store.get(name)
        if v is None:
            return None
        handle, recipe = v.handle, dict(v.recipe)

        saved = v.artifacts.get("onnx") if kind == "onnx" else None
        source = None
        if saved and artifact_dir:
            from ..engine.errors import StoredFileError
            from ..engine.stored import inside

            try:  # a stored artifact name never reads from outside its workspace
                source = str(inside(artifact_dir, saved, what=f"artifact of {name!r}"))
            except StoredFileError as exc:
                self.error.emit(str(exc), "")
                return None
        if kind != "recipe" and handle is None and not (source and os.path.exists(source)):
            self.error.emit(f"Variant {name!r} has no model in memory; re-run it first.", "")
            return None
        if kind == "torch" and handle is not None and handle.module is None:
            self.error.emit(f"Variant {name!r} exists only as ONNX; export it as ONNX.", "")
            return None

        if kind in ("ort", "pte", "openvino"):
            return self._export_target(name, kind, path, handle, source)

        def work(progress):
            # atomic and cancellable: a cancelled export leaves the old file (or none), never a part
            from ..engine.io.export import export_variant

            use = "copy" if kind != "recipe" and handle is None else kind
            return str(export_variant(path, use, progress, handle=handle, recipe=recipe, source=source))

        return self.queue.submit(work, name=f"export {name} ({kind})", kind="export")
