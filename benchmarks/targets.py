"""The demo CNN and a transformer from the real-model corpus (MiniLM), float and compressed, measured
in every installed runtime in one run: latency at one batch, fidelity to the float model, and the
ratio to the float model in the same runtime (a ratio under 1 is faster).

    python benchmarks/targets.py [--quick] [--out FILE]

Prints one table per model and writes the rows as JSON (default benchmarks/results/targets.json).
Timings on a shared machine vary by 30% or more between runs: compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

from tugboat.engine.measuring import runtimes
from tugboat.engine.measuring.measure import MeasureConfig
from tugboat.engine.running.recipe import Recipe, validate_steps
from tugboat.engine.running.runner import prepare, run_variant

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "digits-cnn": {"model": "demo:digits-cnn", "data": "demo:digits", "batch": 64, "steps": {
        "float": [],
        "static-int8": [{"technique": "quantize", "method": "static-int8"}],
        "fp16": [{"technique": "quantize", "method": "fp16"}],
        "pruned-50%": [{"technique": "prune", "method": "structured", "ratio": 0.5, "finetune_epochs": 1}],
    }},
    # the same encoder as a Hugging Face folder: a torch module, so torch and ExecuTorch can run it too
    "minilm-hf": {"real": "minilm-hf", "batch": 8, "steps": {
        "float": [],
        "dynamic-int8": [{"technique": "quantize", "method": "dynamic-int8"}],
        "weight-only-int4": [{"technique": "quantize", "method": "weight-only-int4"}],
        "fp16": [{"technique": "quantize", "method": "fp16"}],
        "pruned-25%": [{"technique": "prune", "method": "structured", "ratio": 0.25, "finetune_epochs": 1}],
    }},
    "minilm": {"real": "minilm-onnx", "batch": 8, "steps": {
        "float": [],
        "dynamic-int8": [{"technique": "quantize", "method": "dynamic-int8"}],
        "weight-only-int4": [{"technique": "quantize", "method": "weight-only-int4"}],
        "fp16": [{"technique": "quantize", "method": "fp16"}],
    }},
}


def _real(name: str) -> tuple[str, str]:
    spec = importlib.util.spec_from_file_location("tugboat_real_models", ROOT / "tools" / "real_models.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return str(mod.ensure(name)), str(mod.ensure_data(name))


def run_case(name: str, case: dict, names: list[str], quick: bool) -> list[dict]:
    if "real" in case:
        model, data = _real(case["real"])
    else:
        model, data = case["model"], case["data"]
    cfg = MeasureConfig(batch=case["batch"], also_batch1=False, both_runtimes=False, runtime=names[0],
                        runtimes=names, min_seconds=0.05 if quick else 0.25, max_seconds=0.5 if quick else 2.0)
    base = prepare(Recipe(model=model, data=data, measure=cfg))
    rows = []
    float_lat = {r: (e.get("latency_ms") or {}).get("median") for r, e in base.metrics["runtimes"].items()
                 if e.get("ok")}
    for label, steps in case["steps"].items():
        t0 = time.perf_counter()
        if steps:
            v = run_variant(base, Recipe(model=model, data=data, measure=cfg, steps=validate_steps(steps)))
            if v.status == "failed":
                rows.append({"model": name, "variant": label, "error": v.error})
                continue
            metrics = v.metrics
        else:
            metrics = base.metrics
        for runtime, e in metrics["runtimes"].items():
            row = {"model": name, "variant": label, "runtime": runtime, "size_bytes": metrics["size_bytes"]}
            if e.get("ok"):
                med = e["latency_ms"]["median"]
                row.update(version=e["version"], batch=e["latency_ms"]["batch"], median_ms=med,
                           vs_float=round(med / float_lat[runtime], 3) if float_lat.get(runtime) else None,
                           top1_agreement=e["fidelity"]["top1_agreement"], cosine=round(e["fidelity"]["cosine"], 5),
                           notes={k: e[k] for k in ("precision", "quantized", "delegate") if k in e})
            else:
                row["reason"] = e.get("reason")
            rows.append(row)
        print(f"  {name} {label}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return rows


def table(rows: list[dict]) -> str:
    out = ["| model | variant | runtime | median ms | vs float (same runtime) | top-1 agree / cosine | note |",
           "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        if "median_ms" in r:
            agree = f"{r['top1_agreement']:.3f}" if r["top1_agreement"] is not None else f"cos {r['cosine']:.4f}"
            note = "; ".join(f"{k}: {v}" for k, v in (r.get("notes") or {}).items())
            out.append(f"| {r['model']} | {r['variant']} | {r['runtime']} | {r['median_ms']:.3f} | "
                       f"{r['vs_float']:.2f}x | {agree} | {note} |")
        else:
            out.append(f"| {r['model']} | {r['variant']} | {r.get('runtime', '-')} | - | - | - | "
                       f"{r.get('reason') or r.get('error')} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="shorter timings")
    ap.add_argument("--models", default=",".join(CASES))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "targets.json"))
    args = ap.parse_args()
    names = [r["name"] for r in runtimes.list_runtimes() if r["available"]]
    rows = []
    for name in args.models.split(","):
        rows += run_case(name, CASES[name], names, args.quick)
    print(table(rows))
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "load": os.getloadavg()[0], "runtimes": runtimes.list_runtimes(), "date": time.strftime("%Y-%m-%d")}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
