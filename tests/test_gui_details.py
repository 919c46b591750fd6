"""Details of the results views: variant names tell different settings apart, new rows and the
running job are scrolled into view."""

from __future__ import annotations

import time

import pytest

from tugboat.engine.running.recipe import validate_steps
from tugboat.engine.running.variants import Variant, settings_difference, variant_name
from tugboat.jobs import JobQueue
from tugboat.ui.jobs_view import JobsView
from tugboat.ui.results_table import ResultsTable
from tugboat.ui.session import Session
from tugboat.ui.store import VariantStore

pytestmark = pytest.mark.timeout(120)


def _distill(**params):
    return validate_steps([{"technique": "distill", "method": "kd", **params}])


def test_names_of_different_settings_differ(qtbot):
    # alpha is in the name now (re-runs at another alpha read "(2)" before)
    assert variant_name(_distill(alpha=0.5)) != variant_name(_distill(alpha=0.7))
    assert "a0.5" in variant_name(_distill(alpha=0.5))

    store, queue = VariantStore(), JobQueue()
    session = Session(store, queue)
    first = _distill(epochs=3)
    store.add(Variant(variant_name(first), {"steps": first}))
    # a setting the short name does not show: the difference is spelled out
    other = _distill(epochs=5, lr=0.01)
    v = Variant(variant_name(other), {"steps": other})
    assert session._distinct_name(v) == f"{variant_name(other)}~epochs=5,lr=0.01"
    assert settings_difference(other, first) == "epochs=5,lr=0.01"
    # the very same settings again: the store numbers it
    again = Variant(variant_name(first), {"steps": [dict(s) for s in first]})
    again.name = session._distinct_name(again)
    assert store.add(again) == f"{variant_name(first)} (2)"
    queue.shutdown(5)


def test_a_new_row_is_scrolled_into_view(qtbot):
    store = VariantStore()
    table = ResultsTable(store)
    qtbot.addWidget(table)
    table.resize(700, 150)
    table.show()
    qtbot.waitExposed(table)
    steps = [{"technique": "prune", "method": "structured", "ratio": 0.5}]
    for i in range(40):
        store.add(Variant(f"v{i}", {"steps": steps}, {"size_bytes": 1000 + i}))
    store.add(Variant("newest", {"steps": steps}, {"size_bytes": 5}))

    def visible(name: str) -> bool:
        row = table.proxy.mapFromSource(table.results_model.index(table.results_model.row_of(name), 0))
        return table.viewport().rect().intersects(table.visualRect(row))

    qtbot.waitUntil(lambda: visible("newest"), timeout=2000)
    assert not visible("v0")


def test_the_running_job_is_scrolled_into_view(qtbot):
    queue = JobQueue()
    view = JobsView(queue)
    qtbot.addWidget(view)
    view.resize(700, 140)
    view.show()
    qtbot.waitExposed(view)
    jobs = [queue.submit(lambda p: time.sleep(0.01), name=f"quick {i}") for i in range(15)]
    last = queue.submit(lambda p: time.sleep(1.0), name="the long one")
    qtbot.waitUntil(lambda: last.is_running, timeout=20000)
    row = view.rows[last.id]

    def in_view() -> bool:
        top_left = row.mapTo(view.scroll.viewport(), row.rect().topLeft())
        return view.scroll.viewport().rect().contains(top_left)

    qtbot.waitUntil(in_view, timeout=2000)
    assert all(j.is_ended for j in jobs)
    qtbot.waitUntil(lambda: last.is_ended, timeout=5000)
    queue.shutdown(5)


def test_routine_autosaves_get_a_row_only_when_slow_or_failed(qtbot, monkeypatch):
    from tugboat.ui import jobs_view

    monkeypatch.setattr(jobs_view, "SAVE_ROW_AFTER_MS", 200)
    queue = JobQueue()
    view = JobsView(queue)
    qtbot.addWidget(view)
    quick = queue.submit(lambda p: None, name="save quick", kind="save")
    qtbot.waitUntil(lambda: quick.is_ended, timeout=5000)
    qtbot.wait(300)
    assert quick.id not in view.rows and "save quick" in view.log_view.toPlainText()

    def fail(p):
        raise OSError("disk full")

    bad = queue.submit(fail, name="save bad", kind="save")
    qtbot.waitUntil(lambda: bad.is_ended, timeout=5000)
    assert bad.id in view.rows and "disk full" in view.rows[bad.id].status.text()

    slow = queue.submit(lambda p: time.sleep(1.0), name="save slow", kind="save")
    qtbot.waitUntil(lambda: slow.id in view.rows, timeout=5000)  # still running after 200 ms
    assert not slow.is_ended and view.rows[slow.id].cancel_button.isEnabled()
    qtbot.waitUntil(lambda: slow.is_ended, timeout=5000)
    qtbot.waitUntil(lambda: slow.id not in view.rows, timeout=2000)  # done: back to the log only
    run = queue.submit(lambda p: None, name="a run")
    assert run.id in view.rows  # every other job has its row at once
    queue.shutdown(5)
