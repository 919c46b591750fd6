"""Pruning benchmark: method x ratio x demo model, every number measured in this run.

For each demo model it measures the float baseline, then each pruning setting: parameters,
FLOPs, ONNX file size, compressed size, latency at batch 1 and 64 in ONNX Runtime and torch,
test accuracy right after pruning and after fine-tuning, and the speed-up against the float
baseline measured in the same run (same runtime, batch and thread count).

    python benchmarks/pruning.py                 # full table, writes benchmarks/results/pruning.json
    python benchmarks/pruning.py --quick         # fewer settings and shorter timing, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TUGBOAT_CACHE_DIR", str(ROOT / ".test-home" / "cache"))

import torch  # noqa: E402

from tugboat.engine.progress import null_progress  # noqa: E402
from tugboat.engine.running.recipe import parse_recipe  # noqa: E402
from tugboat.engine.running.runner import finish_variant, prepare  # noqa: E402
from tugboat.engine.running.variants import Variant, variant_name  # noqa: E402
from tugboat.engine.techniques import prune  # noqa: E402
from tugboat.engine.techniques.finetune import evaluate  # noqa: E402

MODELS = ("digits-cnn", "digits-mlp", "digits-resnet", "digits-vit")
SETTINGS = (
    ("structured", 0.25), ("structured", 0.5), ("structured", 0.75),
    ("unstructured", 0.5), ("unstructured", 0.8),
)


def _lat(metrics: dict, runtime: str, batch: int) -> float | None:
    entry = (metrics.get("latency") or {}).get(runtime, {}).get(f"b{batch}")
    return entry["median"] if entry else None


def run(models, settings, epochs: int, measure: dict) -> list[dict]:
    rows = []
    for name in models:
        recipe = parse_recipe({"model": f"demo:{name}", "data": "demo:digits", "measure": measure})
        base = prepare(recipe)
        bm = base.metrics
        rows.append(_row(name, "float", 0.0, bm, bm, bm["accuracy"], 0.0))
        for method, ratio in settings:
            step = {"technique": "prune", "method": method, "ratio": ratio, "lr": 1e-3,
                    "scope": "uniform" if method == "structured" else "global"}
            t0 = time.perf_counter()
            raw = prune.apply(base.handle, {**step, "finetune_epochs": 0}, base.data, null_progress())
            before = evaluate(raw.module, base.data, "test", raw.input_names)["accuracy"]
            tuned = prune.apply(base.handle, {**step, "finetune_epochs": epochs}, base.data, null_progress())
            seconds = time.perf_counter() - t0
            variant = Variant(variant_name([step]), recipe.with_steps([step]).to_dict())
            finish_variant(variant, tuned, base, null_progress())
            rows.append(_row(name, method, ratio, variant.metrics, bm, before, seconds, variant.warnings))
            print(f"  {name} {method} {ratio}: done in {seconds:.1f}s", file=sys.stderr)
    return rows


def _row(model, method, ratio, m, bm, acc_before, seconds, warnings=()) -> dict:
    row = {
        "model": model, "method": method, "ratio": ratio,
        "params": m["params"], "nonzero_params": m["nonzero_params"], "flops": m["flops"],
        "size_bytes": m["size_bytes"], "compressed_bytes": m["compressed_bytes"],
        "accuracy_before_ft": acc_before, "accuracy": m["accuracy"],
        "prune_and_finetune_seconds": round(seconds, 2), "warnings": list(warnings),
    }
    for runtime, key in (("onnxruntime", "ort"), ("torch", "torch")):
        for b in (1, 64):
            v, v0 = _lat(m, runtime, b), _lat(bm, runtime, b)
            row[f"{key}_b{b}_ms"] = v
            row[f"{key}_b{b}_speedup"] = round(v0 / v, 2) if v and v0 else None
    return row


def table(rows: list[dict]) -> str:
    head = ("| model | method | ratio | params | nonzero | MFLOPs | size KB | zip KB | ORT b1 ms | "
            "ORT b64 ms | torch b1 ms | torch b64 ms | acc pruned | acc tuned | ORT b64 x | torch b64 x |")
    lines = [head, "|" + "|".join(["---"] * 16) + "|"]
    for r in rows:
        acc0 = "" if r["method"] == "float" else f"{r['accuracy_before_ft']:.3f}"
        lines.append(
            f"| {r['model']} | {r['method']} | {r['ratio']:g} | {r['params']:,} | {r['nonzero_params']:,} | "
            f"{(r['flops'] or 0) / 1e6:.2f} | {r['size_bytes'] / 1024:.0f} | {r['compressed_bytes'] / 1024:.0f} | "
            f"{_f(r['ort_b1_ms'])} | {_f(r['ort_b64_ms'])} | {_f(r['torch_b1_ms'])} | {_f(r['torch_b64_ms'])} | "
            f"{acc0} | {r['accuracy']:.3f} | {_f(r['ort_b64_speedup'], 2)} | {_f(r['torch_b64_speedup'], 2)} |")
    return "\n".join(lines)


def _f(v, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}g}" if digits == 3 else f"{v:.{digits}f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs after pruning")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="two settings, short timing")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pruning.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    measure = dict(batch=64, threads=args.threads, warmup=5, min_runs=20, min_seconds=0.3, max_seconds=2.0,
                   also_batch1=True, both_runtimes=True)
    settings = SETTINGS
    if args.quick:
        settings = (("structured", 0.5), ("unstructured", 0.8))
        measure.update(min_runs=5, min_seconds=0.05, max_seconds=0.5)
    t0 = time.perf_counter()
    rows = run(args.models, settings, args.epochs, measure)
    text = table(rows)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "pruning", "torch": torch.__version__, "machine": platform.machine(),
        "python": platform.python_version(), "threads": args.threads, "finetune_epochs": args.epochs,
        "measure": measure, "seconds": round(time.perf_counter() - t0, 1), "rows": rows,
        "table": text}, indent=2))
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
