"""Trade-off chart redraw time with many variants, offscreen.

    python benchmarks/chart.py [--variants 500] [--repeats 30] [--out benchmarks/results/chart.json]

Fills a results store with synthetic variants (four technique chains, realistic metric spreads),
then times full redraws of the chart: ``refresh()`` (every point, colours, symbols, the Pareto front
from ``store.pareto()``, axes and legend rebuilt from the store) and the same followed by a forced
repaint of the plot. Also times moving the estimate ghost (what a slider drag costs) and the
instant estimate itself on the demo CNN. Prints a table and writes JSON. Target: a full redraw of
500 variants under 50 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
os.environ.setdefault("TUGBOAT_CONFIG_DIR", tempfile.mkdtemp(prefix="tugboat-bench-"))

TARGET_MS = 50.0
CHAINS = (
    [{"technique": "prune", "method": "structured", "ratio": 0.5}],
    [{"technique": "quantize", "method": "static-int8"}],
    [{"technique": "prune", "method": "structured", "ratio": 0.5},
     {"technique": "quantize", "method": "static-int8"}],
    [{"technique": "distill", "method": "kd", "width": 0.5}],
)


def synthetic_metrics(rng: random.Random, base_size: int = 640_000) -> dict:
    share = rng.uniform(0.04, 1.0)
    size = int(base_size * share)
    latency = 1.7 * (0.1 + 0.9 * share) * rng.uniform(0.8, 1.25)
    accuracy = 0.97 - rng.uniform(0.0, 0.35) * (1.0 - share) ** 2
    return {"size_bytes": size, "compressed_bytes": int(size * rng.uniform(0.55, 0.93)),
            "params": size // 4, "nonzero_params": size // 4, "flops": size * 8,
            "latency_ms": {"median": latency, "p90": latency * 1.1, "batch": 64, "runtime": "onnxruntime"},
            "accuracy": accuracy,
            "fidelity": {"top1_agreement": accuracy + 0.01, "cosine": 0.99, "rel_error": 0.05}}


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


def summary(times: list[float]) -> dict:
    return {"median_ms": round(statistics.median(times), 2), "worst_ms": round(max(times), 2),
            "best_ms": round(min(times), 2), "runs": len(times)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "chart.json"))
    parser.add_argument("--no-estimate", action="store_true", help="skip timing the estimator")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from PySide6.QtWidgets import QApplication

    import tugboat.jobs._qt_compat  # noqa: F401  (PySide6 6.12 reference fix)
    from tugboat.engine.running.variants import Variant
    from tugboat.ui.chart import TradeoffChart
    from tugboat.ui.store import VariantStore

    app = QApplication.instance() or QApplication([sys.argv[0]])
    rng = random.Random(0)
    store = VariantStore()
    store.set_baseline(Variant("baseline", {"steps": []}, synthetic_metrics(random.Random(1)) | {
        "size_bytes": 640_000, "accuracy": 0.97}))
    chart = TradeoffChart(store)
    chart.resize(1000, 600)
    chart.show()
    app.processEvents()
    t0 = time.perf_counter()
    for i in range(args.variants):
        store.add(Variant(f"v{i}", {"steps": CHAINS[i % len(CHAINS)]}, synthetic_metrics(rng)))
    app.processEvents()  # the coalesced redraw after the burst
    burst_ms = (time.perf_counter() - t0) * 1000.0
    assert len(chart.plotted_names()) == args.variants + 1

    def redraw():
        chart.refresh()

    def redraw_and_paint():
        chart.refresh()
        chart.view.viewport().repaint()

    ghost = dict(store.get("v0").metrics)

    def move_ghost():
        ghost["size_bytes"] = int(ghost["size_bytes"] * 0.999)
        chart.set_ghost(ghost)
        chart.view.viewport().repaint()

    rows = []
    for label, fn in (("refresh (log x, colour by latency)", redraw),
                      ("refresh + repaint", redraw_and_paint),
                      ("move the estimate ghost + repaint", move_ghost)):
        fn()  # warm the symbol atlas
        rows.append({"case": label, **summary(timed(fn, args.repeats))})
    chart.set_axes("latency", "accuracy", colour="size", log_x=False)
    rows.append({"case": "refresh (linear axes, colour by size)", **summary(timed(redraw, args.repeats))})
    rows.append({"case": "store.pareto() alone", **summary(timed(store.pareto, args.repeats))})

    if not args.no_estimate:
        from tugboat.engine.measuring.measure import MeasureConfig, layer_table
        from tugboat.engine.running.recipe import Recipe
        from tugboat.engine.running.runner import prepare
        from tugboat.engine.techniques.estimate import build_profile, estimate

        cfg = MeasureConfig(batch=64, threads=1, warmup=1, min_runs=3, min_seconds=0.0, max_seconds=0.2,
                            also_batch1=False, both_runtimes=False)
        base = prepare(Recipe(model="demo:digits-cnn", data="demo:digits", measure=cfg))
        profile = build_profile(base.handle, base.metrics, layer_table(base.handle))
        steps = [{"technique": "prune", "method": "structured", "ratio": 0.5},
                 {"technique": "quantize", "method": "static-int8"}]
        rows.append({"case": "estimate() prune+quantize, demo CNN",
                     **summary(timed(lambda: estimate(profile, steps), args.repeats))})

    print(f"{args.variants} variants (+ baseline); add burst and first redraw: {burst_ms:.1f} ms")
    print(f"{'case':42s} {'median ms':>10s} {'worst ms':>10s}")
    for r in rows:
        print(f"{r['case']:42s} {r['median_ms']:10.2f} {r['worst_ms']:10.2f}")
    full = rows[1]
    ok = full["median_ms"] < TARGET_MS
    print(f"target: full redraw (refresh + repaint) median < {TARGET_MS:.0f} ms: {'met' if ok else 'NOT met'}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "chart", "variants": args.variants, "repeats": args.repeats,
        "target_ms": TARGET_MS, "target_met": ok, "burst_add_ms": round(burst_ms, 1),
        "machine": platform.machine(), "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "rows": rows,
    }, indent=2) + "\n")
    chart.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
