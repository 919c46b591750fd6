"""The real-model corpus (tools/real_models.py) through the engine: what works on networks people bring.

Per corpus model (those whose packages are installed): ``info`` (parameters, FLOPs at the data's sizes,
task kind), every quantization method, a structured prune at 0.25 where the model is torch-loadable, and
an ONNX export checked with ``onnx.checker`` and run in ONNX Runtime. Each variant is measured against the
float model with the same settings: size ratio, ONNX Runtime speed-up at batch 1 and at ``--batch``,
fidelity (top-1 agreement for classifiers, cosine for every other task). A step that cannot run says why.

    python benchmarks/real_models.py [--models ocr-cls,minilm-onnx] [--steps static-int8,prune] [--out FILE] [--quick]

Prints a Markdown table (docs/real-models.md holds the last full run) and writes JSON
(default benchmarks/results/real_models.json).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import numpy as np
import torch
from _common import cell, write_results

from tugboat.engine.measuring.measure import MeasureConfig
from tugboat.engine.running.recipe import Recipe, validate_steps
from tugboat.engine.running.runner import prepare, run_variant

ROOT = Path(__file__).resolve().parents[1]
QUANT = ("dynamic-int8", "static-int8", "weight-only-int8", "weight-only-int4", "fp16", "qat-int8")


def _corpus():
    spec = importlib.util.spec_from_file_location("tugboat_real_models", ROOT / "tools" / "real_models.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:180]


def _lat(metrics: dict, batch: int) -> float | None:
    lat = (metrics.get("latency") or {}).get("onnxruntime", {}).get(f"b{batch}")
    return lat["median"] if lat else None


def _quality(metrics: dict, task: str) -> tuple[str, float | None]:
    fid = metrics.get("fidelity") or {}
    if task == "classification":
        return "top-1 agree", fid.get("top1_agreement")
    return "cosine", fid.get("cosine")


def _variant_row(name: str, step: str, metrics: dict, base: dict, task: str, batch: int,
                 warnings_: list[str]) -> dict:
    kind, q = _quality(metrics, task)
    row = {"model": name, "step": step, "status": "ok", "size_bytes": metrics.get("size_bytes"),
           "size_ratio": round(base["size_bytes"] / metrics["size_bytes"], 2) if metrics.get("size_bytes") else None,
           "params": metrics.get("params"), "quality_kind": kind, "quality": q,
           "rel_error": (metrics.get("fidelity") or {}).get("rel_error"), "accuracy": metrics.get("accuracy"),
           "warnings": warnings_}
    for b in (1, batch):
        v, f = _lat(metrics, b), _lat(base, b)
        row[f"ort_b{b}_ms"] = v
        row[f"ort_b{b}_speedup"] = round(f / v, 2) if v and f else None
    return row


def _export_check(handle, data) -> str:
    """The deployable ONNX graph: checker, then an ONNX Runtime run on real samples."""
    import onnx

    from tugboat.engine.measuring.runtime import run_onnx

    model = handle.to_onnx()
    onnx.checker.check_model(model)
    xs, _ = data.split("test", limit=4)
    outs = run_onnx(model, [spec.to_model(xs[spec.name]) for spec in handle.inputs])
    if not all(np.all(np.isfinite(o)) for o in outs if o.dtype.kind == "f"):
        raise ValueError("ONNX Runtime outputs are not finite")
    return f"ok ({len(model.SerializeToString()) / 1e6:.1f} MB)"


def bench_model(corpus, name: str, cfg: MeasureConfig, prune: bool = True, only: list[str] | None = None
                ) -> list[dict]:
    rm = corpus.materialise(name)
    e = rm.entry
    head = {"model": name, "format": e.format, "expected_task": e.task}
    t0 = time.perf_counter()
    try:
        # the arch file of a state_dict entry is the corpus tool's own code, so this run trusts it
        recipe = Recipe(model=str(rm.model), data=str(rm.data), arch=rm.arch, measure=cfg,
                        trust=bool(rm.arch and ":" in rm.arch))
        base = prepare(recipe)
    except Exception as exc:
        return [{**head, "step": "info", "status": "failed", "error": f"{type(exc).__name__}: {_short(exc)}"}]
    h = base.handle
    rows = [{**head, "step": "info", "status": "ok", "task": h.task, "params": base.metrics["params"],
             "flops": base.metrics.get("flops"), "size_bytes": base.metrics["size_bytes"],
             "torch": h.module is not None, "conversion_error": h.conversion_error,
             "ort_b1_ms": _lat(base.metrics, 1), f"ort_b{cfg.batch}_ms": _lat(base.metrics, cfg.batch),
             "seconds": round(time.perf_counter() - t0, 1)}]
    try:
        rows.append({"model": name, "step": "export", "status": "ok", "result": _export_check(h, base.data)})
    except Exception as exc:
        rows.append({"model": name, "step": "export", "status": "failed", "error": _short(exc)})
    steps = [{"technique": "quantize", "method": m} for m in (*QUANT, "auto") if m in (only or QUANT)]
    if prune and (not only or "prune" in only):
        steps.append({"technique": "prune", "method": "structured", "ratio": 0.25, "finetune_epochs": 1})
    for raw in steps:
        label = raw["method"] if raw["technique"] == "quantize" else "prune-structured-0.25"
        t1 = time.perf_counter()
        try:
            r = Recipe(model=recipe.model, data=recipe.data, arch=recipe.arch, measure=cfg,
                       steps=validate_steps([raw]), trust=recipe.trust)
            v = run_variant(base, r)
            if v.status != "ok":
                rows.append({"model": name, "step": label, "status": v.status, "error": v.error})
                continue
            row = _variant_row(name, label, v.metrics, base.metrics, h.task, cfg.batch, v.warnings)
            if raw["technique"] == "prune":
                try:
                    row["export"] = _export_check(v.handle, base.data)
                except Exception as exc:
                    row["export"] = f"failed: {_short(exc)}"
            row["seconds"] = round(time.perf_counter() - t1, 1)
            rows.append(row)
        except Exception as exc:  # the step does not apply to this model: say why
            rows.append({"model": name, "step": label, "status": "failed",
                         "error": f"{type(exc).__name__}: {_short(exc)}"})
    return rows


def main(argv: list[str] | None = None) -> int:
    corpus = _corpus()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(corpus.ENTRIES))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "real_models.json"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--no-prune", action="store_true")
    ap.add_argument("--steps", default="", help="only these steps, comma-separated: quantization methods "
                                                "(auto too) and/or 'prune' (default: all but auto)")
    ap.add_argument("--quick", action="store_true", help="fewer timing runs (for a smoke test)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    cfg = MeasureConfig(batch=args.batch, threads=args.threads, also_batch1=True, both_runtimes=False,
                        warmup=1 if args.quick else 3, min_runs=3 if args.quick else 10,
                        min_seconds=0.02 if args.quick else 0.3, max_seconds=1.0 if args.quick else 3.0)
    rows: list[dict] = []
    t0 = time.perf_counter()
    for name in args.models.split(","):
        if corpus.missing(name):
            rows.append({"model": name, "step": "info", "status": "skipped",
                         "error": corpus.ENTRIES[name].install_command})
            continue
        print(f"... {name}", file=sys.stderr, flush=True)
        rows.extend(bench_model(corpus, name, cfg, prune=not args.no_prune,
                                only=[s for s in args.steps.split(",") if s]))
    print(format_table(rows, args.batch))
    write_results(args.out, rows, t0, threads=args.threads, batch=args.batch)
    return 0




def _count(n) -> str:
    if n is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def format_table(rows: list[dict], batch: int) -> str:
    lines = ["| model | format | task | params | FLOPs/sample | size MB | export (checker + ORT) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["step"] != "info":
            continue
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r.get('format', '-')} | - | - | - | - | {r['status']}: "
                         f"{r.get('error', '')} |")
            continue
        export = next((x for x in rows if x["model"] == r["model"] and x["step"] == "export"), {})
        exp = export.get("result") or f"failed: {export.get('error', '')}"
        task = r["task"] + ("" if r["task"] == r["expected_task"] else f" (expected {r['expected_task']})")
        lines.append(f"| {r['model']} | {r['format']} | {task} | {_count(r['params'])} | {_count(r['flops'])} "
                     f"| {r['size_bytes'] / 1e6:.1f} | {exp} |")
    lines += ["", f"| model | step | x smaller | ORT b1 speed-up | ORT b{batch} speed-up | fidelity | notes |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["step"] in ("info", "export"):
            continue
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['step']} | - | - | - | - | {r['status']}: {r.get('error', '')} |")
            continue
        notes = "; ".join(w[:90] for w in r.get("warnings", [])[:2])
        if r.get("export"):
            notes = f"export {r['export']}" + (f"; {notes}" if notes else "")
        lines.append(f"| {r['model']} | {r['step']} | {cell(r['size_ratio'], '.2f')} | "
                     f"{cell(r['ort_b1_speedup'], '.2f')} | {cell(r.get(f'ort_b{batch}_speedup'), '.2f')} | "
                     f"{r['quality_kind']} {cell(r['quality'], '.3f')} | {notes} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
