"""Distillation benchmark: student size and latency vs the teacher, accuracy, agreement, seconds.

Teacher: demo:digits-cnn. Every number is measured in this run by the engine's own measurement
(ONNX Runtime, one thread). Four parts:

1. width sweep: family students of several widths, KD (T=4, alpha=0.7) vs labels only (alpha=0:
   plain cross-entropy), same epochs (no early stopping), same seeds, mean and spread over the
   seeds; both keep the epoch with the best validation accuracy (ties: lower validation objective);
2. temperature sweep at one width (alpha=0.9);
3. low-data: only 10% of the labelled training rows (the student and the teacher's cached outputs
   both see only those rows; the teacher itself was trained on all of them), KD vs labels only;
   plus KD with no labels at all (the teacher's outputs on the whole training split);
4. other students: a structured-pruned copy of the teacher (width = channels kept).

    python benchmarks/distillation.py            # full run, writes benchmarks/results/distillation.json
    python benchmarks/distillation.py --quick    # one seed, fewer settings
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TUGBOAT_CACHE_DIR", str(ROOT / ".test-home" / "cache"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tugboat.engine.io.data import Dataset  # noqa: E402
from tugboat.engine.progress import null_progress  # noqa: E402
from tugboat.engine.running.recipe import parse_recipe  # noqa: E402
from tugboat.engine.running.runner import finish_variant, prepare  # noqa: E402
from tugboat.engine.running.variants import Variant, variant_name  # noqa: E402
from tugboat.engine.techniques import distill  # noqa: E402

MEASURE = {"batch": 64, "threads": 1, "runtime": "onnxruntime", "both_runtimes": False,
           "also_batch1": True, "min_runs": 20, "max_seconds": 1.0}


def _lat(metrics: dict, batch: int) -> float | None:
    entry = (metrics.get("latency") or {}).get("onnxruntime", {}).get(f"b{batch}")
    return entry["median"] if entry else None


def _one(base, recipe, data, params: dict, group: str, label: str) -> dict:
    step = {"technique": "distill", "method": "kd", **params}
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    handle = distill.apply(base.handle, dict(step), data, null_progress())
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    variant = Variant(variant_name([step]), recipe.with_steps([step]).to_dict())
    finish_variant(variant, handle, base, null_progress())  # measured on the full test split
    m, bm = variant.metrics, base.metrics
    info = handle.info["distill"]
    row = {
        "group": group, "label": label, "student": params.get("student", "family"),
        "width": params.get("width"), "temperature": params.get("temperature"),
        "alpha": info["alpha"], "seed": params.get("seed", 0), "labels_used": info["labels_used"],
        "train_rows": len(data.splits["train"]), "epochs_run": info["epochs_run"],
        "params": m["params"], "param_ratio": round(m["params"] / bm["params"], 4),
        "size_bytes": m["size_bytes"], "size_ratio": round(m["size_bytes"] / bm["size_bytes"], 4),
        "ort_b64_ms": _lat(m, 64), "ort_b1_ms": _lat(m, 1),
        "speedup_b64": round(_lat(bm, 64) / _lat(m, 64), 2) if _lat(m, 64) else None,
        "accuracy": m["accuracy"], "accuracy_vs_teacher": round(m["accuracy"] / bm["accuracy"], 4),
        "agreement": m["fidelity"]["top1_agreement"], "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
        "warnings": variant.warnings,
    }
    print(f"  {group:<10} {label:<28} acc {row['accuracy']:.4f} agree {row['agreement']:.4f} "
          f"{row['seconds']:.1f}s", file=sys.stderr)
    return row


def run(quick: bool) -> dict:
    torch.set_num_threads(1)
    recipe = parse_recipe({"model": "demo:digits-cnn", "data": "demo:digits", "measure": MEASURE})
    base = prepare(recipe)
    data = base.data
    seeds = (0,) if quick else (0, 1, 2)
    widths = (0.25, 0.5) if quick else (0.125, 0.25, 0.5)
    temps = (1.0, 4.0, 10.0) if quick else (1.0, 2.0, 4.0, 10.0, 20.0)
    epochs = 15
    rows: list[dict] = []
    for w in widths:
        for seed in seeds:
            common = {"width": w, "depth": 3, "epochs": epochs, "seed": seed, "patience": 0}
            rows.append(_one(base, recipe, data, {**common, "temperature": 4.0, "alpha": 0.7}, "width",
                             f"KD w={w} T=4 a=0.7 s={seed}"))
            rows.append(_one(base, recipe, data, {**common, "temperature": 4.0, "alpha": 0.0}, "width",
                             f"labels w={w} s={seed}"))
    for t in temps:
        for seed in seeds:
            rows.append(_one(base, recipe, data, {"width": 0.25, "epochs": epochs, "seed": seed,
                                                  "temperature": t, "alpha": 0.9}, "temperature",
                             f"KD w=0.25 T={t:g} a=0.9 s={seed}"))
    # low data: 10% of the labelled training rows (same rows for every run)
    train = data.splits["train"]
    few = np.sort(np.random.default_rng(0).permutation(train)[: len(train) // 10])
    small = Dataset("demo:digits[10% train]", data.inputs, data.labels, {**data.splits, "train": few})
    for seed in seeds:
        common = {"width": 0.5, "epochs": 60, "patience": 0, "seed": seed, "augment": True}
        rows.append(_one(base, recipe, small, {**common, "temperature": 4.0, "alpha": 0.9}, "low-data",
                         f"KD 10% rows w=0.5 s={seed}"))
        rows.append(_one(base, recipe, small, {**common, "alpha": 0.0}, "low-data",
                         f"labels 10% rows w=0.5 s={seed}"))
    unlabelled = Dataset("demo:digits[no labels]", data.inputs, None, dict(data.splits))
    for seed in seeds:
        rows.append(_one(base, recipe, unlabelled, {"width": 0.5, "epochs": epochs, "seed": seed,
                                                    "temperature": 4.0}, "no-labels",
                         f"KD no labels w=0.5 s={seed}"))
    for w in ((0.5,) if quick else (0.25, 0.5)):
        rows.append(_one(base, recipe, data, {"student": "pruned", "width": w, "epochs": epochs,
                                              "temperature": 4.0, "alpha": 0.7}, "pruned",
                         f"KD pruned-teacher keep={w}"))
    bm = base.metrics
    teacher = {"params": bm["params"], "size_bytes": bm["size_bytes"], "ort_b64_ms": _lat(bm, 64),
               "ort_b1_ms": _lat(bm, 1), "accuracy": bm["accuracy"]}
    return {"teacher": teacher, "rows": rows, "summary": summarise(rows)}


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and spread over seeds for each setting (label without the seed)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        key = r["label"].rsplit(" s=", 1)[0]
        groups.setdefault(key, []).append(r)
    out = []
    for key, rs in groups.items():
        acc = [r["accuracy"] for r in rs]
        agree = [r["agreement"] for r in rs]
        out.append({
            "setting": key, "group": rs[0]["group"], "runs": len(rs), "params": rs[0]["params"],
            "param_ratio": rs[0]["param_ratio"], "size_bytes": rs[0]["size_bytes"],
            "ort_b64_ms": statistics.median(r["ort_b64_ms"] for r in rs),
            "ort_b1_ms": statistics.median(r["ort_b1_ms"] for r in rs),
            "accuracy_mean": round(statistics.mean(acc), 4),
            "accuracy_sd": round(statistics.stdev(acc), 4) if len(acc) > 1 else 0.0,
            "agreement_mean": round(statistics.mean(agree), 4),
            "seconds_mean": round(statistics.mean(r["seconds"] for r in rs), 2),
            "epochs_mean": round(statistics.mean(r["epochs_run"] for r in rs), 1),
        })
    return out


def table(result: dict) -> str:
    t = result["teacher"]
    lines = [
        "| setting | params (vs teacher) | ONNX bytes | ORT b64 ms | ORT b1 ms | test accuracy | agreement | seconds |",
        "|---|---|---|---|---|---|---|---|",
        f"| teacher digits-cnn | {t['params']:,} (100%) | {t['size_bytes']:,} | {t['ort_b64_ms']:.3f} | "
        f"{t['ort_b1_ms']:.3f} | {t['accuracy']:.4f} | 1.0000 | - |",
    ]
    for s in result["summary"]:
        spread = f" ± {s['accuracy_sd']:.4f}" if s["runs"] > 1 else ""
        lines.append(
            f"| {s['setting']} | {s['params']:,} ({s['param_ratio']:.1%}) | {s['size_bytes']:,} | "
            f"{s['ort_b64_ms']:.3f} | {s['ort_b1_ms']:.3f} | {s['accuracy_mean']:.4f}{spread} | "
            f"{s['agreement_mean']:.4f} | {s['seconds_mean']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distillation.json"))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    result = run(args.quick)
    result["meta"] = {"python": platform.python_version(), "torch": torch.__version__,
                      "machine": platform.machine(), "cpus": os.cpu_count(), "torch_threads": 1,
                      "quick": args.quick, "measure": MEASURE,
                      "total_seconds": round(time.perf_counter() - t0, 1)}
    print(table(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
