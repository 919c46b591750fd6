"""Sweep executors (issue 20, issue 17.8): variants made in worker processes or on Ray are the same
variants, with the same non-timing metrics, as those made in this process; a worker that dies is
retried or recorded as failed; the driver alone measures and writes the workspace."""

from __future__ import annotations

import importlib.util
import sys
import time
import tomllib

import pytest

from sweep_support import FAST_MEASURE
from tugboat.cli import main
from tugboat.engine.running.executors import CRASH_ENV, ExecutorError, make_executor
from tugboat.engine.running.recipe import parse_recipe
from tugboat.engine.running.sweep import run_sweep

HAVE_RAY = importlib.util.find_spec("ray") is not None

# 3 ratios x 2 methods = 6 variants, no fine-tuning (training sums differ in the last bits with the
# thread count, which a worker sets); the two methods share each pruned prefix
SIX = """
model = "demo:digits-cnn"
data = "demo:digits"
[[steps]]
technique = "prune"
method = "unstructured"
ratio = 0.25
finetune_epochs = 0
[[steps]]
technique = "quantize"
method = "dynamic-int8"
[sweep]
"steps.0.ratio" = [0.25, 0.5, 0.75]
"steps.1.method" = ["dynamic-int8", "fp16"]
""" + FAST_MEASURE

NON_TIMING = ("size_bytes", "compressed_bytes", "params", "nonzero_params", "flops")


def _sweep(tmp_path, name, executor=None, text=SIX):
    recipe = parse_recipe(tomllib.loads(text), str(tmp_path / f"{name}.toml"))
    return run_sweep(recipe, tmp_path / name, executor=executor)


def _table(result):
    out = {}
    for v in result.variants:
        m = v.metrics or {}
        out[v.name] = (v.status, {k: m.get(k) for k in NON_TIMING}, m.get("accuracy"), m.get("fidelity"))
    return out


def _assert_same(a, b):
    assert set(a) == set(b) and len(a) == 6
    for name in a:
        sa, na, acc_a, fid_a = a[name]
        sb, nb, acc_b, fid_b = b[name]
        assert sa == sb == "ok", (name, sa, sb)
        # deflate size moves by a few bytes with float noise in the weights; everything else is exact
        assert na["compressed_bytes"] == pytest.approx(nb["compressed_bytes"], rel=1e-3), name
        assert {k: v for k, v in na.items() if k != "compressed_bytes"} == \
            {k: v for k, v in nb.items() if k != "compressed_bytes"}, name
        assert acc_a == pytest.approx(acc_b, abs=1e-6), name
        for k in set(fid_a or {}) | set(fid_b or {}):
            va, vb = (fid_a or {}).get(k), (fid_b or {}).get(k)
            if isinstance(va, float):
                assert va == pytest.approx(vb, rel=1e-6, abs=1e-9), (name, k)
            else:
                assert va == vb, (name, k)


@pytest.fixture(scope="module")
def local_table(tmp_path_factory):
    return _table(_sweep(tmp_path_factory.mktemp("local"), "ws"))


@pytest.mark.slow
def test_process_pool_makes_the_same_variants_as_local(tmp_path, local_table):
    result = _sweep(tmp_path, "ws", make_executor("processes", workers=2))
    _assert_same(_table(result), local_table)
    made = {v.info.get("made_on", "") for v in result.variants}
    assert all(m.startswith("process ") for m in made), made  # made in workers, measured here
    assert result.workspace.meta["sweep"]["executor"] == {"name": "processes", "workers": 2}


@pytest.mark.slow
def test_a_dead_worker_process_is_replaced_and_its_variant_retried(tmp_path, monkeypatch, local_table):
    marker = tmp_path / "crashed-once"
    monkeypatch.setenv(CRASH_ENV, str(marker))
    result = _sweep(tmp_path, "ws", make_executor("processes", workers=2))
    assert marker.exists()  # a worker really died
    table = _table(result)
    _assert_same(table, local_table)
    assert any(v.info.get("attempts", 1) > 1 for v in result.variants)


def test_processes_with_no_retries_record_the_lost_variant_as_failed(tmp_path, monkeypatch):
    monkeypatch.setenv(CRASH_ENV, str(tmp_path / "crashed-once"))
    text = SIX.replace('[0.25, 0.5, 0.75]', '[0.5]').replace('["dynamic-int8", "fp16"]', '["fp16"]')
    result = _sweep(tmp_path, "ws", make_executor("processes", workers=1, max_retries=0), text=text)
    (v,) = result.variants
    assert v.status == "failed" and "worker process died" in v.error


def test_resume_works_across_executors(tmp_path, local_table):
    text = SIX.replace('[0.25, 0.5, 0.75]', '[0.25]')  # 2 variants locally, then all 6 in processes
    first = _sweep(tmp_path, "ws", text=text)
    assert len(first.tried) == 2
    recipe = parse_recipe(tomllib.loads(SIX), str(tmp_path / "ws.toml"))
    again = run_sweep(recipe, tmp_path / "ws", resume=True, executor=make_executor("processes", workers=2))
    assert sorted(again.skipped) == sorted(first.tried) and len(again.tried) == 4
    _assert_same(_table(again), local_table)


def test_cli_flags_and_errors(tmp_path, capsys, monkeypatch):
    path = tmp_path / "r.toml"
    path.write_text(SIX)
    assert main(["sweep", str(path), "--out", str(tmp_path / "o"), "--executor", "local",
                 "--address", "auto"]) == 2
    assert "--address is for --executor ray" in capsys.readouterr().err
    assert main(["sweep", str(path), "--out", str(tmp_path / "p"), "--executor", "processes", "--workers", "2",
                 "--quiet"]) == 0
    assert "6 variant(s) run" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    sys.modules.pop("tugboat.engine.running.executors.ray_executor", None)
    assert main(["sweep", str(path), "--out", str(tmp_path / "o"), "--executor", "ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'tugboat-ml[ray]'" in err, err
    assert not (tmp_path / "o").exists()  # refused before any work
    with pytest.raises(ExecutorError, match="unknown executor"):
        make_executor("slurm")


# --- Ray (the optional extra): skipped only where Ray is not installed ----------------------------

@pytest.fixture(scope="module")
def ray_local():
    if not HAVE_RAY:
        pytest.skip("Ray is not installed (pip install 'tugboat-ml[ray]')")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_gives_the_same_variants_and_metrics_as_local(tmp_path, ray_local, local_table):
    from tugboat.engine.running.executors.ray_executor import RayExecutor

    result = _sweep(tmp_path, "ws", RayExecutor())
    _assert_same(_table(result), local_table)
    assert all(v.info.get("made_on", "").startswith("ray") for v in result.variants)
    assert result.workspace.meta["sweep"]["executor"]["name"] == "ray"


@pytest.mark.slow
def test_ray_retries_a_task_whose_worker_died(tmp_path, monkeypatch, ray_local, local_table):
    from tugboat.engine.running.executors.ray_executor import RayExecutor

    marker = tmp_path / "crashed-once"
    monkeypatch.setenv(CRASH_ENV, str(marker))
    result = _sweep(tmp_path, "ws", RayExecutor(max_retries=2))
    assert marker.exists()  # one worker really died mid-task
    _assert_same(_table(result), local_table)


@pytest.mark.slow
def test_ray_without_retries_records_the_lost_task_as_failed(tmp_path, monkeypatch, ray_local):
    from tugboat.engine.running.executors.ray_executor import RayExecutor

    monkeypatch.setenv(CRASH_ENV, str(tmp_path / "crashed-once"))
    text = SIX.replace('[0.25, 0.5, 0.75]', '[0.5]').replace('["dynamic-int8", "fp16"]', '["fp16"]')
    result = _sweep(tmp_path, "ws", RayExecutor(max_retries=0), text=text)
    (v,) = result.variants
    assert v.status == "failed" and "lost on Ray" in v.error


@pytest.mark.slow
def test_cancel_on_ray_cancels_the_tasks_and_keeps_only_finished_variants(tmp_path, monkeypatch, ray_local):
    from tugboat.engine.errors import Cancelled
    from tugboat.engine.progress import CancelToken, Progress
    from tugboat.engine.running.executors.ray_executor import RayExecutor
    from tugboat.engine.running.workspace import Workspace

    cancelled = []
    real_cancel = ray_local.cancel
    monkeypatch.setattr(ray_local, "cancel", lambda ref, **kw: (cancelled.append(ref), real_cancel(ref, **kw)))
    token = CancelToken()
    recipe = parse_recipe(tomllib.loads(SIX), str(tmp_path / "r.toml"))
    with pytest.raises(Cancelled):
        run_sweep(recipe, tmp_path / "ws", progress=Progress(token=token), on_variant=lambda v: token.cancel(),
                  executor=RayExecutor())
    assert cancelled  # the tasks still in flight were cancelled on Ray, not left to finish
    ws = Workspace.open(tmp_path / "ws")
    assert 1 <= len(ws) < 6 and all(v.status == "ok" for v in ws.variants())
    assert not list((tmp_path / "ws").rglob("*.tmp"))  # nothing half-written
    deadline = time.monotonic() + 30  # the cancelled tasks give their CPUs back (force-cancelled workers)
    while time.monotonic() < deadline and _busy_cpus(ray_local):
        time.sleep(0.2)
    assert _busy_cpus(ray_local) == 0


def _busy_cpus(ray) -> float:
    return ray.cluster_resources().get("CPU", 0) - ray.available_resources().get("CPU", 0)


def test_cancel_stops_the_workers_and_keeps_only_finished_variants(tmp_path):
    import multiprocessing

    from tugboat.engine.errors import Cancelled
    from tugboat.engine.progress import CancelToken, Progress
    from tugboat.engine.running.workspace import Workspace

    token = CancelToken()
    recipe = parse_recipe(tomllib.loads(SIX), str(tmp_path / "r.toml"))
    with pytest.raises(Cancelled):
        run_sweep(recipe, tmp_path / "ws", progress=Progress(token=token), on_variant=lambda v: token.cancel(),
                  executor=make_executor("processes", workers=2))
    assert multiprocessing.active_children() == []  # no worker left behind
    ws = Workspace.open(tmp_path / "ws")
    assert 1 <= len(ws) < 6 and all(v.status == "ok" for v in ws.variants())
    again = run_sweep(recipe, tmp_path / "ws", resume=True)  # and it resumes (here, locally)
    assert len(again.variants) == 6 and len(again.skipped) == len(ws)


# --- auto (the default of `tugboat sweep`) ---------------------------------------------------------

def _steps(ratio, method, epochs=1):
    return [{"technique": "prune", "method": "structured", "ratio": ratio, "finetune_epochs": epochs},
            {"technique": "quantize", "method": method}]


def test_auto_uses_workers_only_for_enough_independent_variants(monkeypatch):
    from tugboat.engine.running import executors
    from tugboat.engine.running.executors.processes import ProcessExecutor, group_tasks

    monkeypatch.setattr(executors, "cpu_count", lambda: 2)
    monkeypatch.setattr(executors, "idle_cores", lambda: 2.0)
    grid = [_steps(r, m) for r in (0.2, 0.4, 0.6) for m in ("fp16", "static-int8")]
    auto = make_executor("auto")
    assert auto.width >= 2  # a grid is handed over whole
    assert auto.parallel(grid)
    assert not auto.parallel(grid[:4])  # too few to pay for a worker's start
    assert not auto.parallel([_steps(r, m, 0) for r in (0.2, 0.4, 0.6) for m in ("fp16", "static-int8")])
    monkeypatch.setattr(executors, "idle_cores", lambda: 0.3)
    assert not auto.parallel(grid)  # a busy machine: no core for a worker
    monkeypatch.setattr(executors, "idle_cores", lambda: 2.0)
    assert not auto.parallel([_steps(0.5, m) for m in ("fp16", "static-int8", "dynamic-int8") * 2])  # one prefix
    # a technique registered at run time (a script's, a test's) does not exist in a fresh worker
    assert not auto.parallel([[{"technique": "scale", "method": "weights"}, *s[1:]] for s in grid])
    monkeypatch.setattr(executors, "cpu_count", lambda: 1)
    assert not make_executor("auto").parallel(grid)  # one core: this process
    chosen = make_executor("auto", workers=2)
    chosen.cores = 2
    assert isinstance(chosen.choose(grid), ProcessExecutor)
    chosen.close()
    # a shared prefix goes to one worker whole; with fewer groups than workers the largest splits
    tasks = [executors.Task(f"t{i}", s) for i, s in enumerate(grid)]
    groups = group_tasks(tasks, 2)
    assert sorted(len(g) for g in groups) == [2, 2, 2]
    assert all(len({str(t.steps[0]) for t in g}) == 1 for g in groups)
    assert sorted(len(g) for g in group_tasks(tasks[:2], 2)) == [1, 1]


@pytest.mark.slow
def test_tugboat_sweep_defaults_to_auto_and_gives_the_local_variants(tmp_path, capsys, local_table, monkeypatch):
    from tugboat.engine.running import executors
    from tugboat.engine.running.executors import cpu_count
    from tugboat.engine.running.workspace import Workspace

    monkeypatch.setattr(executors, "idle_cores", lambda: float(cpu_count()))  # as on an idle machine

    text = SIX.replace("finetune_epochs = 0", "finetune_epochs = 1")  # training in the workers too
    path = tmp_path / "r.toml"
    path.write_text(text)
    assert main(["sweep", str(path), "--out", str(tmp_path / "auto"), "--quiet"]) == 0
    assert main(["sweep", str(path), "--out", str(tmp_path / "local"), "--quiet", "--executor", "local"]) == 0
    auto, local = Workspace.open(tmp_path / "auto"), Workspace.open(tmp_path / "local")
    assert auto.meta["sweep"]["executor"]["chose"] == ("processes" if cpu_count() > 1 else "local")

    def table(ws):
        return {v.name: (v.status, {k: v.metrics.get(k) for k in (*NON_TIMING, "accuracy", "fidelity")})
                for v in ws.variants()}

    assert table(auto) == table(local) and len(table(auto)) == 6  # fine-tuned weights identical too



# --- workers hand variants back as they are made, and wait while the driver measures ---------------

def _one_worker(tmp_path, text):
    from tugboat.engine.running.executors import Context
    from tugboat.engine.running.executors.processes import ProcessExecutor
    from tugboat.engine.running.runner import prepare

    recipe = parse_recipe(tomllib.loads(text), str(tmp_path / "r.toml"))
    ex = ProcessExecutor(1, threads=1)
    ex.start(Context.of(prepare(recipe), recipe))
    return ex


@pytest.mark.slow
def test_a_worker_hands_each_variant_back_when_made_not_when_its_group_is_done(tmp_path):
    from tugboat.engine.running.executors import Task

    prefix = {"technique": "prune", "method": "unstructured", "ratio": 0.25, "finetune_epochs": 0}
    quick = Task("quick", [prefix, {"technique": "quantize", "method": "fp16"}])
    slow = Task("slow", [prefix, {"technique": "prune", "method": "structured", "ratio": 0.5,
                                  "finetune_epochs": 2}])  # seconds of training after the shared prefix
    ex = _one_worker(tmp_path, SIX)
    arrived = {}
    try:
        for out in ex.map([quick, slow]):  # one group (a shared first step): one worker, in order
            assert out.error is None, out.error
            arrived[out.name] = time.monotonic()
    finally:
        ex.close()
    assert arrived["slow"] - arrived["quick"] > 0.3  # "quick" came back while "slow" was being made


@pytest.mark.slow
def test_workers_wait_while_the_driver_measures(tmp_path):
    import threading

    from tugboat.engine.running.executors import Task

    task = Task("fp16", [{"technique": "quantize", "method": "fp16"}])
    ex = _one_worker(tmp_path, SIX)
    got = []
    consumer = threading.Thread(target=lambda: got.extend(ex.map([task])), daemon=True)
    try:
        with ex.quiet():  # the driver is measuring: the worker starts, then waits at its first check
            consumer.start()
            consumer.join(3.0)
            assert got == [] and consumer.is_alive()
        consumer.join(60)
        assert [o.name for o in got] == ["fp16"] and got[0].error is None
    finally:
        ex.close()


def test_the_cli_starts_workers_early_only_for_a_grid_that_trains(tmp_path, monkeypatch):
    from tugboat.engine.running import worker_start

    started = []
    monkeypatch.setattr(worker_start, "cores", lambda: 2)
    monkeypatch.setattr(worker_start, "idle_cores", lambda: 2.0)
    monkeypatch.setattr("multiprocessing.forkserver.ensure_running", lambda: started.append(1))
    trains = tmp_path / "trains.toml"
    trains.write_text(SIX.replace("finetune_epochs = 0", "finetune_epochs = 1"))
    quick = tmp_path / "quick.toml"
    quick.write_text(SIX)  # no step trains: quantizing alone costs less than a worker's start
    assert worker_start.prestart(str(trains), "auto") is True and started == [1]
    assert worker_start.prestart(str(quick), "auto") is False
    assert worker_start.prestart(str(quick), "processes") is True  # asked for: always
    assert worker_start.prestart(str(trains), "local") is False
    swept = tmp_path / "swept.toml"  # training only in some combinations of the grid
    swept.write_text(SIX.replace('"steps.1.method"', '"steps.0.finetune_epochs" = [0, 1]\n"steps.1.method"'))
    assert worker_start.prestart(str(swept), "auto") is True
    (tmp_path / "bad.toml").write_text("model = [")
    assert worker_start.prestart(str(tmp_path / "bad.toml"), "auto") is False  # the sweep reports it
    assert worker_start.prestart(str(tmp_path / "missing.toml"), "auto") is False
    monkeypatch.setattr(worker_start, "idle_cores", lambda: 0.2)
    assert worker_start.prestart(str(trains), "auto") is False  # a busy machine: auto runs locally
    monkeypatch.setattr(worker_start, "cores", lambda: 1)
    assert worker_start.prestart(str(trains), "processes") is False


def test_a_made_variant_that_does_not_pickle_is_made_again_in_the_driver(tmp_path, monkeypatch):
    """A worker hands back what it made through a file; a model that cannot be pickled leaves a note
    instead, and the driver makes that variant itself (no worker process needed to show it)."""
    from tugboat.engine.running.executors import Outcome, Task, processes

    ex = _one_worker(tmp_path, SIX)
    try:
        monkeypatch.setattr(processes, "_CTX_PATH", ex._ctx_path)  # as in a worker of this executor
        task = Task("fp16", [{"technique": "quantize", "method": "fp16"}])
        processes._deliver(0, Outcome("fp16", handle=lambda: None))  # a lambda does not pickle
        (out,) = list(ex._made({0: task}, {"fp16": 1}))
        assert out.error is None and out.handle is not None and out.where.startswith("driver (")
        assert "in the worker" in out.where and list(ex._made({}, {})) == []  # the note was consumed
    finally:
        ex.close()
