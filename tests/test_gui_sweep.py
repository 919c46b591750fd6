"""One way to run a sweep: the window's sweep is one job of ``engine.sweep.run_sweep`` whose variants
land in the workspace and stream into the table; "Save as recipe" writes exactly what ran, so
``tugboat sweep`` of that recipe makes the same variants; where it runs is a choice (here, or Ray)."""

from __future__ import annotations

import pytest

from tugboat import cli
from tugboat.engine.errors import RecipeError
from tugboat.engine.measuring.measure import MeasureConfig
from tugboat.engine.running.recipe import load_recipe, parse_recipe
from tugboat.engine.running.sweep import plan
from tugboat.engine.running.workspace import Workspace
from tugboat.ui import main_window as main_window_module
from tugboat.ui.main_window import RAY_INSTALL, MainWindow

pytestmark = pytest.mark.timeout(240)

QUICK = {"batch": 16, "threads": 1, "warmup": 1, "min_runs": 3, "min_seconds": 0.0, "max_seconds": 0.2,
         "also_batch1": False, "both_runtimes": False}
PRUNE = {"technique": "prune", "method": "structured", "finetune_epochs": 0}


def test_a_listed_sweep_plans_exactly_its_entries_and_names_a_bad_one():
    entries = [[{**PRUNE, "ratio": 0.3}], [{**PRUNE, "ratio": 0.6}],
               [{**PRUNE, "ratio": 0.3}, {"technique": "quantize", "method": "dynamic-int8"}]]
    p = plan(parse_recipe({"model": "demo:digits-cnn", "sweep": {"steps": entries}}))
    assert p.kind == "grid" and len(p.candidates) == 3  # not the 2x2 grid of what differs
    assert [c.steps[0]["ratio"] for c in p.candidates] == [0.3, 0.6, 0.3]
    assert len({c.name for c in p.candidates}) == 3
    bad = [entries[0], [{**PRUNE, "ratio": 7}]]
    with pytest.raises(RecipeError, match=r"sweep\.steps\[1\].*ratio") as info:
        plan(parse_recipe({"model": "demo:digits-cnn", "sweep": {"steps": bad}}, source="r.toml"))
    assert info.value.path == "r.toml"
    with pytest.raises(RecipeError, match="no other"):
        plan(parse_recipe({"model": "demo:digits-cnn", "sweep": {"steps": entries, "steps.0.ratio": [0.1]}}))


def test_a_variant_deleted_while_a_sweep_writes_the_workspace_leaves_it_when_the_sweep_ends(qtbot, tmp_path):
    import threading

    from tugboat.engine.running.variants import Variant
    from tugboat.jobs import JobQueue
    from tugboat.ui.session import Session
    from tugboat.ui.store import VariantStore
    from tugboat.ui.workspace_io import WorkspaceKeeper

    queue, store = JobQueue(), VariantStore()
    keeper = WorkspaceKeeper(store, Session(store, queue), queue)
    ws = keeper.new(str(tmp_path / "ws"))
    v = Variant("prune-a", {"steps": []}, {"size_bytes": 1}, status="failed", error="x")
    ws.add_variant(v, write=False)
    store.announce(v)  # as a sweep does: the worker added it, the store shows it
    release = threading.Event()
    writer = queue.submit(lambda p: release.wait(10), name="sweep", kind="sweep")
    keeper.written_by(writer)
    keeper.delete("prune-a")  # the worker may be saving the index right now: the GUI waits
    assert "prune-a" not in store and "prune-a" in ws
    release.set()
    qtbot.waitUntil(lambda: writer.is_ended, timeout=5000)
    assert "prune-a" not in ws and "prune-a" not in Workspace.open(tmp_path / "ws")
    keeper.close()
    queue.shutdown(5)


def test_ray_choice_unavailable_without_ray_shows_the_install_command(qtbot, monkeypatch):
    monkeypatch.setattr(main_window_module, "ray_installed", lambda: False)
    w = MainWindow()
    qtbot.addWidget(w)
    view = w.sweep_view
    item = view.where.model().item(1)
    assert not item.isEnabled()
    assert RAY_INSTALL in item.toolTip() and RAY_INSTALL in view.where.itemText(1)
    assert view.executor() == ("local", "")
    view.set_ray_available(True)  # with Ray: it can be chosen, with an address
    view.where.setCurrentIndex(1)
    view.address.setText("ray://head:10001")
    assert view.executor() == ("ray", "ray://head:10001")


def test_window_sweep_streams_into_the_table_and_its_recipe_reproduces_it(qtbot, tmp_path, capsys):
    w = MainWindow()
    qtbot.addWidget(w)
    w.session.measure = MeasureConfig(**QUICK)
    w.show()
    w.new_workspace(str(tmp_path / "ws"))  # before the model: one load, measured into it
    with qtbot.waitSignal(w.session.baseline_ready, timeout=120000):
        w.load_demo()
    picked = [{**PRUNE, "ratio": 0.3}, {**PRUNE, "ratio": 0.6}]
    for step in picked:
        w.session.add_to_sweep(step)
    w.session.set_chain([{**PRUNE, "ratio": 0.3}])
    w.session.add_to_sweep({"technique": "quantize", "method": "dynamic-int8"})
    w.session.clear_chain()

    rows_while_running = []
    w.store.variant_added.connect(lambda _n: rows_while_running.append(
        (w.results_table.model().rowCount(), w.sweep_job.is_ended)))
    w.sweep_job = w.run_sweep()
    assert w.sweep_job is not None and w.sweep_job.kind == "sweep"
    assert len([j for j in w.queue.jobs() if j.kind == "sweep"]) == 1  # one job, not one per variant
    # while it writes the open workspace, another one is not opened (its folder lock would go)
    assert w.new_workspace(str(tmp_path / "other")) is None
    assert "running sweep" in w.statusBar().currentMessage() and not (tmp_path / "other").exists()
    with qtbot.waitSignal(w.session.sweep_ended, timeout=180000) as ended:
        pass
    assert ended.args[0] is not None, w.sweep_job.error
    # rows came one by one while the job still ran (remote or local, they stream the same way)
    assert [n for n, _ in rows_while_running] == [2, 3, 4]
    assert not any(done for _, done in rows_while_running)
    ws = w.workspace
    gui = {n: ws.get(n) for n in ws.names()}
    assert len(gui) == 3 and set(gui) <= set(w.store.names())
    assert [s["ratio"] for s in gui[next(iter(gui))].recipe["steps"]] == [0.3]
    # one store: the table's entries are the workspace's; the window keeps each model in memory
    # (Diagnose, Layers) beside the record, which has it on disk
    assert all(w.store.get(n) is ws.get(n) and w.store.get(n).handle is not None for n in gui)
    assert all(ws.artifact_path(n).is_file() for n in gui)
    qtbot.waitUntil(lambda: all(w.chart.point_of(n) is not None for n in gui), timeout=5000)

    recipe_path = tmp_path / "sweep.toml"
    w.ask_save_path = lambda *_a: str(recipe_path)
    w.sweep_view.save_button.click()
    assert len(load_recipe(str(recipe_path)).sweep["steps"]) == 3
    assert cli.main(["sweep", str(recipe_path), "--out", str(tmp_path / "cli"), "--quiet"]) == 0
    made = Workspace.open(tmp_path / "cli")
    assert made.names() == list(gui)
    for name, v in gui.items():
        other = made.get(name)
        assert other.recipe["steps"] == v.recipe["steps"]
        assert other.metrics["params"] == v.metrics["params"]
        assert other.metrics["size_bytes"] == pytest.approx(v.metrics["size_bytes"], rel=0.01)
    w.queue.shutdown(10)


@pytest.mark.slow
def test_window_sweep_on_a_local_ray_lands_in_the_table_and_chart(qtbot, monkeypatch):
    pytest.importorskip("ray")
    import ray

    from tugboat.engine.running.executors import ray_executor

    # a small local instance (the window would use every core)
    real = ray_executor.RayExecutor
    monkeypatch.setattr(ray_executor, "RayExecutor", lambda **kw: real(**{**kw, "workers": 1}))
    w = MainWindow()
    qtbot.addWidget(w)
    w.session.measure = MeasureConfig(**QUICK)
    with qtbot.waitSignal(w.session.baseline_ready, timeout=120000):
        w.load_demo()
    for ratio in (0.3, 0.6):
        w.session.add_to_sweep({**PRUNE, "ratio": ratio})
    try:
        job = w.run_sweep("ray", "")
        with qtbot.waitSignal(w.session.sweep_ended, timeout=180000) as ended:
            pass
        assert ended.args[0] is not None, job.error
        names = ended.args[0].tried
        assert len(names) == 2
        for name in names:  # made by a Ray task, measured here, shown like any other variant
            assert w.store.get(name).info["made_on"].startswith("ray")
        qtbot.waitUntil(lambda: all(w.chart.point_of(n) is not None for n in names), timeout=5000)
    finally:
        w.queue.shutdown(10)
        ray.shutdown()
