"""Measurement benchmark: are Tugboat's timing verdicts right on a busy machine?

On the demo CNN it builds four variants once and times each of them REPEAT times, paired with the
baseline (the way every variant is timed), while a CPU-bound process runs beside it:

* ``unstructured 0.5``: the same dense graph, so the same speed as the original. Expected: no
  "slower" verdict ever, and every 95% interval holds 1.0 unless the timing says it is noisy.
* ``static-int8`` and ``structured 0.5``: really faster. Expected: intervals above 1.0.
* ``dynamic-int8``: ConvInteger on the CNN, really slower. Expected: flagged every time.

    python benchmarks/measurement.py                 # 10 repetitions, table + benchmarks/results/measurement.json
    python benchmarks/measurement.py --repeat 3 --no-load
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TUGBOAT_CACHE_DIR", str(ROOT / ".test-home" / "cache"))

from tugboat.engine.machine import describe, machine_info  # noqa: E402
from tugboat.engine.measuring.measure import measure, slower_than  # noqa: E402
from tugboat.engine.progress import null_progress  # noqa: E402
from tugboat.engine.running.recipe import parse_recipe, validate_steps  # noqa: E402
from tugboat.engine.running.runner import apply_steps, prepare  # noqa: E402

VARIANTS = {
    "unstructured 0.5 (same speed)": ({"technique": "prune", "method": "unstructured", "ratio": 0.5}, "same"),
    "structured 0.5": ({"technique": "prune", "method": "structured", "ratio": 0.5}, "faster"),
    "static-int8": ({"technique": "quantize", "method": "static-int8"}, "faster"),
    "dynamic-int8 (ConvInteger)": ({"technique": "quantize", "method": "dynamic-int8"}, "slower"),
}
BUSY = "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"


def run(repeat: int, load: bool, measure_cfg: dict) -> dict:
    recipe = parse_recipe({"model": "demo:digits-cnn", "data": "demo:digits", "measure": measure_cfg})
    base = prepare(recipe)
    handles = {}
    for label, (step, _) in VARIANTS.items():
        steps = validate_steps([dict(step)])
        handles[label] = apply_steps(base.handle, steps, base.data, null_progress())
    busy = subprocess.Popen([sys.executable, "-c", BUSY.format(seconds=3600)]) if load else None
    rows = []
    try:
        time.sleep(0.5 if load else 0.0)
        for i in range(repeat):
            for label, (_, expect) in VARIANTS.items():
                metrics, _ = measure(handles[label], None, base.cfg, timing=base.timing)
                lat = metrics["latency_ms"]
                sp = lat["speedup"]
                verdict = slower_than(metrics)
                rows.append({"run": i + 1, "variant": label, "expect": expect, "median_ms": lat["median"],
                             "baseline_ms": sp["baseline_median"], "speedup": sp["median"], "low": sp["low"],
                             "high": sp["high"], "blocks": sp["blocks"], "noisy": sp["noisy"],
                             "spread": lat["spread"], "load": lat.get("load"), "seconds": sp["seconds"],
                             "slower": any(w.startswith("slower than") for w in verdict),
                             # the rule before paired timing: this median against the original's,
                             # taken once when it was loaded, with a 5% threshold
                             "unpaired_slower": lat["median"] > 1.05 * base.metrics["latency_ms"]["median"],
                             "too_noisy": any(w.startswith("timing too noisy") for w in verdict)})
                r = rows[-1]
                print(f"run {r['run']:2d}  {label:<30} {r['speedup']:6.2f}x [{r['low']:.2f}-{r['high']:.2f}]"
                      f"{' noisy' if r['noisy'] else '':6} blocks {r['blocks']:3d}  load {r['load']}"
                      f"{'  SLOWER' if r['slower'] else ''}{'  re-measure' if r['too_noisy'] else ''}",
                      flush=True)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    return {"rows": rows, "summary": summarise(rows), "machine": machine_info(), "measure": base.cfg.to_dict(),
            "busy_neighbour": load, "repeat": repeat}


def summarise(rows: list[dict]) -> dict:
    out = {}
    for label, (_, expect) in VARIANTS.items():
        mine = [r for r in rows if r["variant"] == label]
        clean = [r for r in mine if not r["noisy"]]
        entry = {"expect": expect, "runs": len(mine), "slower_flags": sum(r["slower"] for r in mine),
                 "unpaired_slower_flags": sum(r["unpaired_slower"] for r in mine),
                 "noisy": sum(r["noisy"] for r in mine),
                 "interval_holds_1": sum(r["low"] <= 1.0 <= r["high"] for r in mine),
                 "interval_above_1": sum(r["low"] > 1.0 for r in mine),
                 "median_speedup": sorted(r["speedup"] for r in mine)[len(mine) // 2] if mine else None}
        if expect == "same":
            entry["pass"] = entry["slower_flags"] == 0 and all(r["low"] <= 1.0 <= r["high"] for r in clean)
        elif expect == "faster":
            entry["pass"] = entry["interval_above_1"] == len(mine)
        else:
            entry["pass"] = entry["slower_flags"] == len(mine)
        out[label] = entry
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--no-load", action="store_true", help="no CPU-bound process beside the timing")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "measurement.json"))
    args = parser.parse_args()
    cfg = {"batch": args.batch, "threads": args.threads, "also_batch1": False, "both_runtimes": False}
    print(f"machine: {describe(machine_info())}")
    t0 = time.perf_counter()
    result = run(args.repeat, not args.no_load, cfg)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print()
    print(f"{'variant':<30} {'expect':>7} {'slower':>7} {'unpaired':>8} {'noisy':>6} {'holds 1':>8} "
          f"{'above 1':>8} {'median':>7}  pass")
    for label, s in result["summary"].items():
        print(f"{label:<30} {s['expect']:>7} {s['slower_flags']:>4}/{s['runs']:<2} "
              f"{s['unpaired_slower_flags']:>5}/{s['runs']:<2} {s['noisy']:>6} "
              f"{s['interval_holds_1']:>8} {s['interval_above_1']:>8} {s['median_speedup']:>6.2f}x  "
              f"{'yes' if s['pass'] else 'NO'}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out} ({result['seconds']} s)")
    return 0 if all(s["pass"] for s in result["summary"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
