"""Int8 on real networks: Tugboat's defaults against ONNX Runtime's own options, in one run.

For each model (the real-model corpus of ``tools/real_models.py`` where installed, and the trained
stand-ins of ``tests/standins.py``: an EfficientNet-like depthwise CNN with squeeze-excite and SiLU,
a BERT-like sentence encoder), the float ONNX graph and every configuration below are measured the
same way: artifact size, fidelity to the float model on the data's test split (top-1 agreement for
classifiers, mean cosine similarity otherwise), ONNX Runtime latency (1 thread) and the seconds
quantization took.

* ``tugboat:auto`` (the default), ``tugboat:static-int8``, ``tugboat:dynamic-int8``,
  ``tugboat:weight-only-int8``: ``quantize.apply`` with its defaults.
* ``ort:static-minmax`` (``quantize_static`` with ONNX Runtime's defaults: per-tensor, MinMax, QDQ),
  ``ort:static-minmax-pc``, ``ort:static-percentile-pc``, ``ort:static-entropy-pc`` (per-channel),
  ``ort:static-minmax-pc-qop`` (QOperator format: QLinearConv etc. instead of Q/DQ pairs),
  ``ort:dynamic`` (``quantize_dynamic`` defaults): ONNX Runtime alone, calibrated on the same rows.

Classifiers also get the top-1 agreement on the *decisive* rows, where the float model's softmax
top-1 leads the runner-up by at least 0.1, and the share of such rows: on images far from a
classifier's training data most disagreements are flips between near-tied classes.

    python benchmarks/quantization_real.py [--models effnet-lite0-onnx,minilm-onnx,standin-senet]
                                           [--no-corpus] [--out FILE]

Prints a table and writes the rows as JSON (default benchmarks/results/quantization_real.json).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import numpy as np
import onnx
import torch

from tugboat.engine.measuring.runtime import ort_session
from tugboat.engine.progress import null_progress
from tugboat.engine.techniques import quantize

ROOT = Path(__file__).resolve().parent.parent
TUGBOAT = ("auto", "static-int8", "dynamic-int8", "weight-only-int8")
ORT = ("static-minmax", "static-minmax-pc", "static-percentile-pc", "static-entropy-pc", "static-minmax-pc-qop",
       "dynamic")


def _module(name: str, path: Path):
    """Import a helper module by file path (tools/ and tests/ are not packages)."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def standins():
    mod = _module("standins", ROOT / "tests" / "standins.py")
    return {"standin-senet": lambda: mod.build_senet(epochs=3),
            "standin-tinybert": lambda: mod.build_tinybert(epochs=3)}


def corpus(images: int = 0):
    """Corpus entries the engine can quantize (ONNX or torch-loadable), when the tool exists.
    ``images``: replace an ImageNet classifier's small data file by this many photo crops (more
    rows make top-1 agreement less coarse; no labels, so quality is fidelity)."""
    tool = ROOT / "tools" / "real_models.py"
    if not tool.exists():
        return {}
    rm = _module("real_models", tool)
    from tugboat.engine.io.data import _make_dataset, load_data
    from tugboat.engine.io.loading import load_model

    out = {}
    for name, entry in rm.ENTRIES.items():
        if not rm.available(name) or entry.format == "hf":
            continue

        def load(name=name, entry=entry):
            real = rm.materialise(name)
            handle = load_model(str(real.model), trust=True, arch=real.arch) if real.arch else \
                load_model(str(real.model))
            data = load_data(str(real.data), handle)
            shape = next(iter(data.inputs.values())).shape[1:]
            if images and entry.task == "classification" and len(data.inputs) == 1 and shape == (3, 224, 224):
                data = _make_dataset(f"{real.data} + {images} photo crops",
                                     {handle.input_names[0]: rm.imagenet_images(images, 224, seed=7)}, None)
            return handle, data

        out[name] = load
    return out


def _ort_static(model, names, calib, calibration: str, per_channel: bool, qoperator: bool = False):
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[calibration]
    with tempfile.TemporaryDirectory() as tmp, quantize._quiet():
        src, dst = Path(tmp) / "f.onnx", Path(tmp) / "q.onnx"
        onnx.save(model, str(src))
        quantize_static(str(src), str(dst), quantize._Reader(names, calib, null_progress()),
                        quant_format=QuantFormat.QOperator if qoperator else QuantFormat.QDQ,
                        per_channel=per_channel, calibrate_method=method,
                        extra_options={"CalibMaxIntermediateOutputs": 64})
        return onnx.load(str(dst))


def _ort_dynamic(model):
    from onnxruntime.quantization import quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp, quantize._quiet():
        src, dst = Path(tmp) / "f.onnx", Path(tmp) / "q.onnx"
        onnx.save(model, str(src))
        quantize_dynamic(str(src), str(dst))
        return onnx.load(str(dst))


def _decisive_agreement(y: np.ndarray, ref: np.ndarray, margin: float = 0.1) -> dict:
    """Top-1 agreement on the rows where the float model's softmax top-1 leads its runner-up by at
    least ``margin`` (where it has an opinion), and the share of such rows: on out-of-domain images
    most disagreements are flips between near-tied classes."""
    p = np.exp(ref - ref.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    top2 = np.sort(p, 1)[:, -2:]
    keep = top2[:, 1] - top2[:, 0] >= margin
    agree = y.argmax(1) == ref.argmax(1)
    return {"top1": round(float(agree[keep].mean()), 4) if keep.any() else None,
            "rows": round(float(keep.mean()), 3)}


def _latency(model, xs, batch: int, budget: float = 1.0) -> float:
    sess = ort_session(model, 1)
    feed = {i.name: quantize._cast(x[:batch], i.type) for i, x in zip(sess.get_inputs(), xs)}
    sess.run(None, feed)
    times, t_end = [], time.perf_counter() + budget
    while len(times) < 5 or (time.perf_counter() < t_end and len(times) < 200):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000)


def bench(name: str, load, batch: int = 8, only: list[str] | None = None) -> list[dict]:
    handle, data = load()
    float_model = quantize.constants_to_initializers(handle.to_onnx())
    xs_d, _ = data.split("test", limit=256)
    xs = [xs_d[n] for n in handle.input_names]
    ref = quantize._run(float_model, xs)
    classification = handle.task == "classification" and ref.ndim == 2 and ref.shape[1] > 1
    metric = "top1_agreement" if classification else "cosine"
    f_size = len(float_model.SerializeToString())
    f_lat = _latency(float_model, xs, batch)
    kind = quantize.model_kind(float_model)["kind"]
    calib = quantize._calib_arrays(data, handle, 256, "static-int8")
    rows = [{"model": name, "config": "float", "kind": kind, "task": handle.task, "size_bytes": f_size,
             "size_ratio": 1.0, "metric": metric, "fidelity": 1.0, "latency_ms": round(f_lat, 3),
             "speedup": 1.0, "seconds": 0.0, "warnings": []}]
    configs = [f"tugboat:{m}" for m in TUGBOAT] + [f"ort:{c}" for c in ORT]
    configs = [c for c in configs if not only or c in only]
    for config in configs:
        t0 = time.perf_counter()
        warnings: list[str] = []
        chosen = None
        try:
            if config.startswith("tugboat:"):
                method = config.split(":", 1)[1]
                params = quantize.TECHNIQUE.defaults(method) | {"method": method}
                out = quantize.apply(handle, params, data, null_progress())
                q = out.onnx_model or out.to_onnx()
                warnings = out.warnings
                info = out.info.get("quantize", {})
                chosen = (info.get("auto") or {}).get("method")
                if info.get("calibration"):
                    chosen = f"{chosen or method} ({info['calibration']['method']})"
            elif config == "ort:dynamic":
                q = _ort_dynamic(float_model)
            else:
                _, cal, *rest = config.split(":", 1)[1].split("-")
                q = _ort_static(float_model, handle.input_names, calib, cal, "pc" in rest, "qop" in rest)
            seconds = time.perf_counter() - t0
            y = quantize._run(q, xs)
            fid = quantize.fidelity_of(y, ref)[metric]
            decisive = _decisive_agreement(y, ref) if classification else None
            size = len(q.SerializeToString())
            lat = _latency(q, xs, batch)
            row = {"size_bytes": size, "size_ratio": round(f_size / size, 2), "fidelity": round(fid, 4),
                   "decisive_top1": decisive,
                   "latency_ms": round(lat, 3), "speedup": round(f_lat / lat, 2),
                   "seconds": round(seconds, 1), "status": "ok"}
        except Exception as exc:  # a configuration ONNX Runtime refuses is a result too
            row = {"status": f"failed: {' '.join(str(exc).split())[:160]}"}
        rows.append({"model": name, "config": config, "chosen": chosen, "kind": kind, "task": handle.task,
                     "metric": metric, "warnings": warnings, **row})
        print(_line(rows[-1]), flush=True)
    return rows


def _line(r: dict) -> str:
    if r.get("status", "ok") != "ok":
        return f"{r['model']:<22} {r['config']:<26} {r['status']}"
    low = " LOW" if any(w.startswith("low fidelity") for w in r.get("warnings", [])) else ""
    chosen = f" -> {r['chosen']}" if r.get("chosen") else ""
    dec = r.get("decisive_top1") or {}
    decisive = f" decisive {dec['top1']} ({dec['rows']:.0%} of rows)" if dec.get("top1") is not None else ""
    return (f"{r['model']:<22} {r['config']:<26} {r['size_ratio']:>5.2f}x {r['metric'][:6]:>6} "
            f"{r['fidelity']:.4f} {r['latency_ms']:>8.2f} ms {r['speedup']:>5.2f}x "
            f"{r['seconds']:>6.1f} s{low}{chosen}{decisive}")


def markdown(rows: list[dict]) -> str:
    """The rows as the Markdown table docs/techniques/quantization.md shows."""
    out = ["| model | config | chose | x smaller | fidelity | speed-up | quantize s | warned |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("config") == "float" and r.get("status", "ok") == "ok":
            continue
        if r.get("status", "ok") != "ok":
            out.append(f"| {r['model']} | {r['config']} | | {r['status'][:60]} | | | | |")
            continue
        what = "top-1" if r["metric"] == "top1_agreement" else "cos"
        dec = r.get("decisive_top1") or {}
        if dec.get("top1") is not None:
            what = f"(decisive {dec['top1']:.3f} on {dec['rows']:.0%}) {what}"
        low = "low fidelity" if any(w.startswith("low fidelity") for w in r.get("warnings", [])) else ""
        out.append(f"| {r['model']} | {r['config']} | {r.get('chosen') or ''} | {r['size_ratio']:.2f} | "
                   f"{what} {r['fidelity']:.3f} | {r['speedup']:.2f} | {r['seconds']:.0f} | {low} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="", help="comma-separated names (default: all available)")
    ap.add_argument("--no-corpus", action="store_true", help="stand-ins only")
    ap.add_argument("--images", type=int, default=0,
                    help="ImageNet classifiers: this many photo crops instead of the corpus data file")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for loading/training")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quantization_real.json"))
    ap.add_argument("--configs", default="", help="comma-separated configurations (default: all)")
    ap.add_argument("--markdown", metavar="JSON", help="print the Markdown table of a results file and exit")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())["rows"]))
        return 0
    torch.set_num_threads(args.threads)
    models = {**({} if args.no_corpus else corpus(args.images)), **standins()}
    wanted = [m for m in args.models.split(",") if m] or list(models)
    unknown = [m for m in wanted if m not in models]
    if unknown:
        print(f"unknown or not installed: {', '.join(unknown)}; available: {', '.join(models)}")
        return 2
    print(f"{'model':<22} {'config':<26} {'ratio':>6} {'metric':>6} {'fid':>6} {'latency':>11} "
          f"{'speed':>6} {'quant':>8}")
    rows = []
    for name in wanted:
        try:
            rows += bench(name, models[name], only=[c for c in args.configs.split(",") if c])
        except Exception as exc:
            print(f"{name}: could not load or export: {' '.join(str(exc).split())[:200]}")
            rows.append({"model": name, "config": "float", "status": f"failed: {exc}"})
    out = {"machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
                       "vnni": quantize.cpu_has_vnni(), "cores": os.cpu_count()},
           "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(markdown(rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
