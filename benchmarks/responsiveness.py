"""Event-loop responsiveness while a real job runs in the window.

    python benchmarks/responsiveness.py [--out benchmarks/results/responsiveness.json]

Opens the real window offscreen with the demo model, then runs a pruning job with fine-tuning (and
a distillation job if that technique is installed) while a 10 ms QTimer heartbeats. A stall is how
much later than 10 ms a beat arrived. Prints worst, p99 and median stall per job and writes JSON.
Target: worst stall < 50 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
os.environ.setdefault("TUGBOAT_CONFIG_DIR", tempfile.mkdtemp(prefix="tugboat-bench-"))

BEAT_MS = 10


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))] if s else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "responsiveness.json"))
    parser.add_argument("--epochs", type=int, default=3, help="fine-tuning / distillation epochs")
    args = parser.parse_args(argv)

    from PySide6.QtCore import QTimer

    from tugboat.jobs import warm_up_torch, worker_threads
    from tugboat.ui.app import make_app
    from tugboat.ui.main_window import MainWindow

    app = make_app([sys.argv[0]])
    warm_up_torch(wait=True)  # as the app does at start, before any job can be clicked
    window = MainWindow()
    window.show()

    def wait(job, timeout=900):
        end = time.monotonic() + timeout
        while not job.is_ended and time.monotonic() < end:
            app.processEvents()
            time.sleep(0.005)

    wait(window.load_demo())
    steps = []
    if "prune" in window.panels:
        steps.append({"technique": "prune", "method": "structured", "ratio": 0.5,
                      "finetune_epochs": args.epochs})
    if "distill" in window.panels:
        steps.append({"technique": "distill", "method": "kd", "epochs": args.epochs})
    results = []
    for step in steps:
        full = window.panels[step["technique"]].technique.validate(step, "bench")
        beats: list[float] = []
        last = [time.perf_counter()]

        def beat(beats=beats, last=last):
            now = time.perf_counter()
            beats.append((now - last[0]) * 1000.0)
            last[0] = now

        timer = QTimer()
        timer.setInterval(BEAT_MS)
        timer.timeout.connect(beat)
        job = window.session.run_step(full)
        t0 = time.perf_counter()
        last[0] = t0
        timer.start()
        # the real event loop, not processEvents polling: exec until the job ends
        job.state_changed.connect(lambda s, j=job: app.exit(0) if j.is_ended else None)
        app.exec()
        timer.stop()
        seconds = time.perf_counter() - t0
        stalls = [max(0.0, b - BEAT_MS) for b in beats[1:]]
        row = {"job": job.name, "state": job.state, "seconds": round(seconds, 2), "beats": len(beats),
               "worst_stall_ms": round(max(stalls, default=0.0), 2),
               "p99_stall_ms": round(percentile(stalls, 0.99), 2),
               "median_stall_ms": round(statistics.median(stalls) if stalls else 0.0, 2),
               "worker_threads": worker_threads(), "cpu_count": os.cpu_count()}
        results.append(row)
        wait_all_end = time.monotonic() + 60
        while window.queue.active() and time.monotonic() < wait_all_end:  # autosave job
            app.processEvents()
            time.sleep(0.01)
    window.close()
    print(f"{'job':<48} {'state':<6} {'s':>6} {'beats':>6} {'worst ms':>9} {'p99 ms':>7} {'median':>7}")
    for r in results:
        print(f"{r['job']:<48} {r['state']:<6} {r['seconds']:>6} {r['beats']:>6} {r['worst_stall_ms']:>9} "
              f"{r['p99_stall_ms']:>7} {r['median_stall_ms']:>7}")
    ok = all(r["worst_stall_ms"] < 50 for r in results)
    print(f"target worst stall < 50 ms: {'met' if ok else 'NOT met'}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"beat_ms": BEAT_MS, "target_worst_ms": 50, "results": results}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
