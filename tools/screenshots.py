"""Screenshots of the real window, made offscreen: one per panel, into docs/screenshots/.

    python tools/screenshots.py [--out docs/screenshots] [--quick]

Opens the window with the demo model, measures the baseline, runs two pruning variants and a
chained one, then grabs the whole window and each panel. ``--quick`` measures with fewer repeats.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
# never touch the user's real settings or workspaces
os.environ.setdefault("TUGBOAT_CONFIG_DIR", tempfile.mkdtemp(prefix="tugboat-shots-"))


def wait_until(app, condition, timeout: float = 300.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        app.processEvents()
        if condition():
            return True
        time.sleep(0.02)
    return False


def shoot_chart(app, window, grab) -> None:
    """The trade-off chart after a real small sweep on the demo (prune ratios, int8 and fp16, a
    prune → int8 chain) with the estimate ghost of a pending setting: chart.png."""
    chart, live = window.chart, getattr(window, "live_preview", None)
    if not hasattr(chart, "set_ghost") or "prune" not in window.panels:
        return
    if live is not None:
        live.set_enabled(False)  # the sweep below runs explicitly; no preview jobs meanwhile
    window.session.clear_chain()
    jobs = []
    prune = window.show_panel("prune")
    prune.set_value("finetune_epochs", 1)
    for ratio in (0.45, 0.75, 0.9):
        prune.set_value("ratio", ratio)
        jobs.append(window.run_current())
    if "quantize" in window.panels:
        from tugboat.engine.running.recipe import validate_steps

        def quantize(method: str) -> dict:
            return validate_steps([{"technique": "quantize", "method": method}])[0]

        for method in ("static-int8", "fp16", "dynamic-int8"):
            jobs.append(window.session.run_step(quantize(method)))
        window.session.set_chain([{**prune.step(), "ratio": 0.6}])
        jobs.append(window.session.run_step(quantize("static-int8")))
        window.session.clear_chain()
    jobs = [j for j in jobs if j is not None]
    wait_until(app, lambda: all(j.is_ended for j in jobs), 900)
    wait_until(app, lambda: not window.queue.active(), 120)
    window.view_tabs.setCurrentWidget(chart)
    split = window.view_tabs.parentWidget()
    sizes = split.sizes() if hasattr(split, "setSizes") else None
    if sizes:  # a taller chart for the picture; the table keeps a few rows
        split.setSizes([sum(sizes) - 170, 170])
    chart.set_axes("size", "quality", colour="latency")
    best = [n for n in chart.pareto_names() if n != "baseline"]
    if best:
        window.store.select(best[len(best) // 2])
    if live is not None:  # a pending setting's ghost: the estimate, grabbed before the commit runs it
        live.set_enabled(True)
        prune.set_value("ratio", 0.55)
    grab(chart, "chart")
    if sizes:
        split.setSizes(sizes)
    if live is not None:  # off before the panel's commit delay ends: the ghost stays a ghost
        live.set_enabled(False)
        live.clear_ghost()
        live.set_enabled(True)


def shoot_dark(app, window, grab) -> None:
    """The main window in the dark palette (what a system in dark mode shows): main-dark.png."""
    from tugboat.ui import theme

    was_dark = theme.is_dark()
    theme.apply_palette(app, dark=True)
    for _ in range(3):
        app.processEvents()
    grab(window, "main-dark")
    theme.apply_palette(app, dark=was_dark)
    app.processEvents()


def shoot_layers(app, window, grab) -> None:
    """The Layers view of the demo model with its sensitivity measured and two overrides set (one
    layer pruned less, one kept in float), the Pruning panel showing the override: layers.png."""
    view = getattr(window, "layers_view", None)
    if view is None:
        return
    window.store.select("baseline")
    window.view_tabs.setCurrentWidget(view)
    wait_until(app, lambda: view.profile_job is not None and view.profile_job.is_ended, 120)
    job = view.measure_sensitivity()
    if job is not None:
        wait_until(app, lambda: job.is_ended, 300)
    view.set_sparsity("features.3", 0.25)
    view.set_keep_float("features.0", True)
    window.show_panel("prune")
    grab(window, "layers")
    view.clear_overrides()


def shoot_training(app, window, grab) -> None:
    """The Training view after a real 8-epoch distillation on the demo: training.png."""
    view = getattr(window, "training_view", None)
    if view is None or "distill" not in window.panels:
        return
    window.session.clear_chain()
    window.view_tabs.setCurrentWidget(view)
    panel = window.show_panel("distill")
    panel.set_value("epochs", 8)
    job = window.run_current()
    if job is not None:
        wait_until(app, lambda: job.is_ended, 600)
    wait_until(app, lambda: not window.queue.active(), 120)
    grab(window, "training")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "screenshots"))
    parser.add_argument("--quick", action="store_true", help="measure latency with fewer repeats")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from tugboat.ui.app import make_app
    from tugboat.ui.main_window import MainWindow

    app = make_app([sys.argv[0]])
    window = MainWindow()
    window.resize(1500, 940)
    window.show()
    shots: list[Path] = []

    def grab(widget, name: str) -> None:
        app.processEvents()
        path = out / f"{name}.png"
        widget.grab().save(str(path))
        shots.append(path)

    grab(window, "empty_state")
    if args.quick:
        m = window.session.measure
        m.min_runs, m.min_seconds, m.max_seconds, m.warmup = 5, 0.05, 0.3, 2
    job = window.load_demo()
    if not wait_until(app, lambda: job.is_ended):
        print("baseline did not finish", file=sys.stderr)
        return 1
    panels = window.panels
    jobs = []
    if "prune" in panels:
        p = window.show_panel("prune")
        p.set_value("finetune_epochs", 1)
        for ratio in (0.3, 0.6):
            p.set_value("ratio", ratio)
            jobs.append(window.run_current())
    jobs = [j for j in jobs if j is not None]
    wait_until(app, lambda: all(j.is_ended for j in jobs), 600)
    wait_until(app, lambda: not window.queue.active(), 120)
    if "prune" in panels and len(window.store) > 1:
        names = [n for n in window.store.names() if n != "baseline"]
        window.store.select(names[0])
    grab(window.model_panel, "model_panel")
    window.left_tabs.setCurrentWidget(window.data_panel)
    grab(window.data_panel, "data_panel")
    window.left_tabs.setCurrentWidget(window.model_panel)
    for name in panels:
        window.show_panel(name)
        grab(window.technique_dock, f"technique_{name}")
    shoot_chart(app, window, grab)
    # the README's picture: the whole window with the chart of that sweep (no pending ghost)
    if hasattr(window.chart, "set_ghost"):
        window.chart.set_ghost(None)
    window.view_tabs.setCurrentWidget(window.chart)
    grab(window, "main_window")
    # a 1366x768 laptop: every panel still there (docks narrower, the forms scroll)
    size = window.size()
    window.resize(1366, 768)
    grab(window, "main_laptop")
    window.resize(size)
    shoot_dark(app, window, grab)
    grab(window.results_table, "results_table")
    grab(window.jobs_view, "jobs")
    shoot_layers(app, window, grab)
    shoot_training(app, window, grab)
    window.notify("Example: prune failed: this model has no torch module (ONNX-only)",
                  "Traceback (most recent call last): ...", "error")
    grab(window.centralWidget(), "notification")
    window.close()
    for path in shots:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
