"""Every quantization method on every demo model, measured through the engine in one run.

For each demo model the float baseline and each method are measured with the same settings
(``recipe.prepare`` + ``recipe.run_variant``): size, deflate-compressed size, latency at batch 1
and 64 in ONNX Runtime and (where the variant is a torch module) torch, test accuracy and
fidelity to the float model, and the speed-up against the float model in the same runtime.

    python benchmarks/quantization.py [--models digits-cnn,digits-mlp] [--out FILE] [--quick]

Prints one table and writes the same rows as JSON (default benchmarks/results/quantization.json).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import torch
from _common import cell, write_results

from tugboat.engine.measuring.measure import MeasureConfig
from tugboat.engine.running.recipe import Recipe, validate_steps
from tugboat.engine.running.runner import prepare, run_variant

MODELS = ("digits-mlp", "digits-cnn", "digits-resnet", "digits-vit")
METHODS = (
    {"method": "dynamic-int8"},
    {"method": "dynamic-int8", "runtime": "torch"},
    {"method": "static-int8"},
    {"method": "weight-only-int8"},
    {"method": "weight-only-int4"},
    {"method": "fp16"},
    {"method": "qat-int8"},
)


def _label(step: dict) -> str:
    extra = "-torch" if step.get("runtime") == "torch" else ""
    return step["method"] + extra


def _lat(metrics: dict, runtime: str, batch: int) -> float | None:
    lat = (metrics.get("latency") or {}).get(runtime, {}).get(f"b{batch}")
    return lat["median"] if lat else None


def _row(model: str, name: str, metrics: dict, base: dict, warnings: list[str], status: str = "ok") -> dict:
    row = {"model": model, "method": name, "status": status,
           "size_bytes": metrics.get("size_bytes"), "compressed_bytes": metrics.get("compressed_bytes"),
           "size_ratio": round(base["size_bytes"] / metrics["size_bytes"], 2) if metrics.get("size_bytes") else None,
           "accuracy": metrics.get("accuracy"),
           "top1_agreement": (metrics.get("fidelity") or {}).get("top1_agreement"),
           "rel_error": (metrics.get("fidelity") or {}).get("rel_error"),
           "warnings": warnings}
    for runtime in ("onnxruntime", "torch"):
        for b in (1, 64):
            v, f = _lat(metrics, runtime, b), _lat(base, runtime, b)
            row[f"{runtime}_b{b}_ms"] = v
            row[f"{runtime}_b{b}_speedup"] = round(f / v, 2) if v and f else None
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "quantization.json"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="fewer timing runs (for a smoke test)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = MeasureConfig(batch=64, threads=args.threads, also_batch1=True, both_runtimes=True,
                        min_runs=5 if args.quick else 30,
                        min_seconds=0.05 if args.quick else 0.5)
    rows = []
    t0 = time.perf_counter()
    for model in args.models.split(","):
        recipe = Recipe(model=f"demo:{model}", data="demo:digits", measure=cfg)
        base = prepare(recipe)
        rows.append(_row(model, "float", base.metrics, base.metrics, []))
        for step in METHODS:
            r = Recipe(model=recipe.model, data=recipe.data, measure=cfg,
                       steps=validate_steps([{"technique": "quantize", **step}]))
            try:
                v = run_variant(base, r)
                rows.append(_row(model, _label(step), v.metrics or {"size_bytes": 0}, base.metrics,
                                 v.warnings, v.status))
            except Exception as exc:  # a method that does not apply to this model: say why
                rows.append({"model": model, "method": _label(step), "status": "failed",
                             "error": " ".join(str(exc).split())[:200]})
    _print(rows)
    write_results(args.out, rows, t0, threads=args.threads, batch=cfg.batch)
    return 0




def _print(rows: list[dict]) -> None:
    head = ("| model | method | size KB | zip KB | x smaller | ORT b1 ms | ORT b64 ms | ORT b64 speed-up "
            "| torch b1 ms | torch b64 ms | accuracy | top-1 agree | slower? |")
    print(head)
    print("|" + "|".join("---" for _ in range(13)) + "|")
    for r in rows:
        if r.get("status") != "ok":
            print(f"| {r['model']} | {r['method']} | failed: {r.get('error', r.get('status'))} |")
            continue
        slower = "yes" if any("slower" in w for w in r["warnings"]) else ""
        print(f"| {r['model']} | {r['method']} | {r['size_bytes'] / 1024:.0f} | {r['compressed_bytes'] / 1024:.0f} "
              f"| {cell(r['size_ratio'], '.2f')} | {cell(r['onnxruntime_b1_ms'], '.3f')} "
              f"| {cell(r['onnxruntime_b64_ms'], '.3f')} | {cell(r['onnxruntime_b64_speedup'], '.2f')}x "
              f"| {cell(r['torch_b1_ms'], '.3f')} | {cell(r['torch_b64_ms'], '.3f')} "
              f"| {cell(r['accuracy'], '.4f')} | {cell(r['top1_agreement'], '.3f')} | {slower} |")


if __name__ == "__main__":
    raise SystemExit(main())
