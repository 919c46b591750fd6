"""One results store: the window's VariantStore is an observable adapter over the engine's
Workspace (the one collection of record). What the workspace gains, updates or loses reaches the
table and the chart through it, and a single run lands in the workspace before the table shows it."""

from __future__ import annotations

import json

import pytest

from tugboat.engine.running.variants import Variant
from tugboat.engine.running.workspace import Workspace
from tugboat.jobs import JobQueue
from tugboat.ui.chart import TradeoffChart
from tugboat.ui.results_table import ResultsTable
from tugboat.ui.session import Session
from tugboat.ui.store import VariantStore
from tugboat.ui.workspace_io import WorkspaceKeeper

pytestmark = pytest.mark.timeout(60)

PRUNE = [{"technique": "prune", "method": "structured", "ratio": 0.5}]


def _metrics(size: int, latency: float, accuracy: float) -> dict:
    return {"size_bytes": size, "params": size // 4, "latency_ms": {"median": latency, "p90": latency},
            "accuracy": accuracy}


def _points(chart) -> set[str]:
    chart.refresh()
    return {str(n) for n in chart.scatter.data["data"]}


def _window_parts() -> tuple[JobQueue, VariantStore, Session, WorkspaceKeeper]:
    """What the window wires together around its workspace: queue, store, session, keeper."""
    queue, store = JobQueue(), VariantStore()
    session = Session(store, queue)
    return queue, store, session, WorkspaceKeeper(store, session, queue)


def test_a_variant_the_workspace_gains_reaches_table_and_chart_through_the_adapter(qtbot, tmp_path):
    ws = Workspace.create(tmp_path / "ws", model="demo:digits-cnn")
    store = VariantStore(workspace=ws)
    table, chart = ResultsTable(store), TradeoffChart(store)
    qtbot.addWidget(table)
    qtbot.addWidget(chart)
    store.set_baseline(Variant("baseline", {"steps": []}, _metrics(4000, 2.0, 0.97)))
    assert ws.baseline is store.baseline  # the workspace's entry, not a copy

    # a worker (a sweep) adds to the workspace; the adapter announces it on the GUI thread
    made = Variant("prune-a", {"steps": PRUNE}, _metrics(1000, 1.0, 0.95))
    ws.add_variant(made, write=False)
    with qtbot.waitSignal(store.variant_added) as added:
        assert store.announce(made)
    assert added.args == ["prune-a"]
    assert table.results_model.rowCount() == 2 and table.results_model.row_of("prune-a") >= 0
    assert "prune-a" in _points(chart)
    assert store.get("prune-a") is ws.get("prune-a")

    # added through the adapter: into the workspace (a unique name, the index on disk), then shown
    again = store.add(Variant("prune-a", {"steps": PRUNE}, _metrics(900, 0.9, 0.94)))
    assert again == "prune-a (2)" and again in ws
    on_disk = json.loads((tmp_path / "ws" / "workspace.json").read_text())
    assert [d["name"] for d in on_disk["variants"]] == ["prune-a", "prune-a (2)"]
    assert table.results_model.rowCount() == 3 and again in _points(chart)

    # an update of the workspace's entry reaches the table
    ws.get(again).metrics["size_bytes"] = 123
    with qtbot.waitSignal(store.variant_changed):
        store.update(ws.get(again))

    # removed through the adapter: gone from the workspace (and its index), the table and the chart
    store.remove("prune-a")
    assert "prune-a" not in ws and "prune-a" not in store
    assert table.results_model.rowCount() == 2 and "prune-a" not in _points(chart)
    index = json.loads((tmp_path / "ws" / "workspace.json").read_text())
    assert "prune-a" not in {d["name"] for d in index["variants"]}
    # a variant the workspace does not hold is not announced
    assert not store.announce(Variant("stray", {"steps": PRUNE}, _metrics(1, 1.0, 0.5)))
    assert "stray" not in store and table.results_model.rowCount() == 2


def test_the_store_keeps_a_model_the_workspace_dropped(qtbot, tmp_path):
    ws = Workspace.create(tmp_path / "ws")
    store = VariantStore(workspace=ws)
    entry = Variant("prune-a", {"steps": PRUNE}, _metrics(1000, 1.0, 0.9))
    ws.add_variant(entry, write=False)
    handle = object()
    store.announce(Variant("prune-a", {"steps": PRUNE}, entry.metrics, handle=handle))  # the sweep's copy
    entry.handle = None  # what the sweep does once the ONNX file is on disk
    assert store.get("prune-a") is entry and entry.handle is handle  # Diagnose/Layers/Continue from
    assert [v.name for v in store.variants()] == ["prune-a"]


def test_a_single_run_lands_in_the_workspace_before_the_table(qtbot, tmp_path):
    queue, store, session, keeper = _window_parts()
    table = ResultsTable(store)
    qtbot.addWidget(table)
    ws = keeper.new(str(tmp_path / "ws"))
    assert store.workspace is ws
    seen = {}

    def on_rows(_parent, first, _last):  # the table learns of the row: where is the variant now?
        name = table.results_model._names[first]
        index = json.loads((tmp_path / "ws" / "workspace.json").read_text())
        seen[name] = (name in ws, [d["name"] for d in index["variants"]])

    table.results_model.rowsInserted.connect(on_rows)
    run = Variant("prune-r0.5", {"steps": PRUNE}, _metrics(1000, 1.0, 0.9))
    with qtbot.waitSignal(session.variant_finished):
        session._on_variant_finished(run)  # what a technique panel's Run job finishes into
    assert seen == {"prune-r0.5": (True, ["prune-r0.5"])}
    assert ws.get("prune-r0.5") is run and store.get("prune-r0.5") is run
    qtbot.waitUntil(lambda: not queue.active(), timeout=10000)
    assert (ws.folder("prune-r0.5") / "metrics.json").is_file()  # its files, written in a job
    keeper.close()
    assert Workspace.open(tmp_path / "ws").names() == ["prune-r0.5"]
    queue.shutdown(5)


def test_results_made_before_a_folder_move_into_the_first_one(qtbot, tmp_path, monkeypatch):
    from tugboat.ui import workspace_io

    queue, store, _session, keeper = _window_parts()
    unsaved = store.workspace
    assert not unsaved.persist
    store.start(Variant("baseline", {"steps": []}, _metrics(4000, 2.0, 0.97)))
    store.add(Variant("early", {"steps": PRUNE}, _metrics(1000, 1.0, 0.9)))
    monkeypatch.setattr(workspace_io, "default_workspace_dir", lambda: tmp_path / "auto")
    removed = []
    store.variant_removed.connect(removed.append)
    store.cleared.connect(lambda: removed.append("cleared"))
    ws = keeper.ensure()
    assert store.workspace is ws and ws.path == tmp_path / "auto"
    assert ws.names() == ["early"] and ws.baseline is store.baseline and not removed  # nothing flickers
    qtbot.waitUntil(lambda: not queue.active(), timeout=10000)
    keeper.close()
    reopened = Workspace.open(tmp_path / "auto")
    assert reopened.names() == ["early"] and reopened.baseline.metrics["size_bytes"] == 4000
    queue.shutdown(5)


def test_a_reload_shows_the_workspace_only_when_its_results_compare(qtbot, tmp_path):
    queue, store, session, keeper = _window_parts()
    ws = keeper.new(str(tmp_path / "ws"))
    session.model_ref, session.data_ref = "demo:digits-cnn", "demo:digits"  # as if it were loaded
    keeper.place_baseline(Variant("baseline", {"steps": []}, _metrics(4000, 2.0, 0.97)))
    store.add(Variant("prune-a", {"steps": PRUNE}, _metrics(1000, 1.0, 0.9)))
    qtbot.waitUntil(lambda: not queue.active(), timeout=10000)
    # the same model measured the same way again: its results on record stay in view
    keeper.place_baseline(Variant("baseline", {"steps": []}, _metrics(4000, 2.1, 0.97)))
    assert keeper.ws is ws and store.names() == ["baseline", "prune-a"]
    assert ws.baseline.metrics["latency_ms"]["median"] == 2.1
    qtbot.waitUntil(lambda: not queue.active(), timeout=10000)
    # other measure settings: those latencies would not compare, so a new workspace takes the results
    problems = []
    keeper.problem.connect(lambda msg, _level: problems.append(msg))
    session.measure.batch = 1
    keeper.place_baseline(Variant("baseline", {"steps": []}, _metrics(4000, 0.1, 0.97)))
    assert keeper.ws is None and store.names() == ["baseline"] and not store.workspace.persist
    assert problems and "measure settings (batch)" in problems[0] and str(ws.path) in problems[0]
    assert Workspace.open(tmp_path / "ws").names() == ["prune-a"]  # left as it was
    queue.shutdown(5)


def test_the_index_names_the_artifact_when_saved_is_told_and_a_burst_saves_it_once(qtbot, tmp_path, monkeypatch):
    # once a variant's files are written, the index that names its artifact is saved in the event
    # loop's next turn (a shorter piece of GUI-thread work per landing, issue 17): ``saved`` comes
    # after that save, and files written in one turn are one save, not one each
    queue, _store, session, keeper = _window_parts()
    ws = keeper.new(str(tmp_path / "ws"))
    saves = []
    real_save = Workspace.save
    monkeypatch.setattr(Workspace, "save", lambda self, **kw: (saves.append(kw), real_save(self, **kw))[1])
    runs = [Variant(f"prune-{i}", {"steps": PRUNE}, _metrics(1000 + i, 1.0, 0.9)) for i in range(3)]
    on_saved = {}

    def check(name: str) -> None:
        index = json.loads((tmp_path / "ws" / "workspace.json").read_text())
        on_saved[name] = {d["name"]: d["artifacts"] for d in index["variants"]}.get(name)

    keeper.saved.connect(check)
    for run in runs:
        session._on_variant_finished(run)
    assert len(saves) == 3  # each lands in the index at once, before any view shows it
    qtbot.waitUntil(lambda: not queue.active(), timeout=10000)
    qtbot.waitUntil(lambda: len(on_saved) == 3, timeout=5000)
    assert all(on_saved[r.name] is not None for r in runs)  # listed when saved is told ...
    # ... with its files (demo-less variants have no model, so metrics.json and recipe.toml)
    assert all((ws.folder(r.name) / "metrics.json").is_file() for r in runs)
    assert len(saves) <= 3 + 3 and {"report": True} in saves[3:]

    saves.clear()
    for run in runs:  # three files written in one turn: the index and report are saved once
        keeper._on_written(ws, run)
    assert saves == []
    qtbot.waitUntil(lambda: len(saves) == 1, timeout=2000)
    qtbot.wait(50)
    assert saves == [{"report": True}]
    keeper.close()
    queue.shutdown(5)


def test_switching_workspace_writes_the_put_off_save_first(qtbot, tmp_path):
    queue, _store, session, keeper = _window_parts()
    ws = keeper.new(str(tmp_path / "ws"))
    run = Variant("prune-a", {"steps": PRUNE}, _metrics(1000, 1.0, 0.9))
    session._on_variant_finished(run)
    qtbot.waitUntil(lambda: not queue.active(), timeout=10000)
    run.metrics["accuracy"] = 0.5  # changed after its last save: only the put-off save has it
    keeper._on_written(ws, run)
    keeper.close()  # before the event loop's next turn
    index = json.loads((tmp_path / "ws" / "workspace.json").read_text())
    assert index["variants"][0]["metrics"]["accuracy"] == 0.5
    queue.shutdown(5)
