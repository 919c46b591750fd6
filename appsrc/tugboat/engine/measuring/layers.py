"""Per-layer numbers for the Layers view: parameters, FLOPs, measured latency share, and the
pruning and quantization sensitivity of each layer.

:func:`layer_profile` starts from :func:`tugboat.engine.measuring.measure.layer_table` (one row per layer
with weights) and adds the share of one forward pass's time spent inside each layer, measured in
the runtime the user deploys to:

* ``onnxruntime``: ONNX Runtime's own profiler (``SessionOptions.enable_profiling``) on the
  optimised graph. Each kernel's time is attributed to the torch layer its node came from
  (``/features/features.3/Conv`` -> ``features.3``); a BatchNorm fused into its convolution by
  ONNX Runtime shows 0 ms because its work runs inside the convolution's kernel.
* ``torch``: forward pre/post hooks around each layer (wall time inside the module's ``forward``)
  in eager mode.

Either way the share is the layer's median time divided by the median time of the whole forward
pass, so the shares do not add up to 1: the rest is spent in layers without weights (activations,
pooling, reshapes) and in runtime overhead; ``other_share`` reports it.

:func:`layer_sensitivity` combines :func:`tugboat.engine.techniques.prune.layer_sensitivity` (quality drop
when only that layer is structurally pruned) and :func:`tugboat.engine.techniques.quantize.layer_sensitivity`
(output error and accuracy drop when only that layer is quantized to static int8).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..names import layer_key
from ..progress import Progress, null_progress
from .layer_timing import hooked_times

if TYPE_CHECKING:  # pragma: no cover
    from ..io.data import Dataset
    from ..io.models import ModelHandle

QUANTIZABLE_TYPES = {"Conv1d", "Conv2d", "Conv3d", "Linear", "Conv", "Gemm", "MatMul"}


def _torch_latency(module: torch.nn.Module, inputs: list[torch.Tensor], names: list[str],
                   repeats: int, progress: Progress) -> tuple[dict[str, float], dict[str, float], float]:
    """Median ms and share of the time inside each named module, and the median ms of the whole
    forward pass (forward hooks)."""
    from .runtime import eval_mode

    eval_mode(module)
    # rows of ONNX nodes outside any module (a positional embedding) have no hooks
    times, totals = hooked_times(module, inputs, names, repeats, lambda i: progress.update(
        0.2 + 0.8 * (i + 1) / repeats, "timing layers (torch)"))
    return _summarise([{n: t[i] for n, t in times.items() if i < len(t)} for i in range(len(totals))],
                      totals)


def _summarise(per_run: list[dict[str, float]], totals: list[float]
               ) -> tuple[dict[str, float], dict[str, float], float]:
    """(median ms per layer, share per layer, median ms per run). A share is the layer's time
    summed over all runs divided by the runs' summed time, so the shares add up to at most 1 even
    when other processes make single runs noisy."""
    keys = {k for r in per_run for k in r}
    median = {k: float(np.median([r.get(k, 0.0) for r in per_run])) for k in keys}
    whole = sum(totals)
    share = {k: sum(r.get(k, 0.0) for r in per_run) / whole if whole > 0 else 0.0 for k in keys}
    return median, share, float(statistics.median(totals)) if totals else 0.0


def _kernel_attribution(model):
    """``attribute(kernel_name, op_name) -> layer``: which layer of ``model`` a profiled kernel of
    ONNX Runtime's optimised graph belongs to.

    Unfused nodes keep their names. A fused node is named after a tensor it outputs (e.g.
    ``/f/f.2/Relu_output_0_nchwc`` for Conv+ReLU in the NCHWc layout) or ``fused <node>``; it is
    traced back through the producers of that tensor to the original node of the kernel's
    operator type (``Conv`` for ``Conv``/``QLinearConv``, ``Gemm`` for ``FusedGemm``)."""
    by_name = {n.name: n for n in model.graph.node if n.name}
    producer = {o: n for n in model.graph.node for o in n.output}

    def attribute(kernel: str, op: str) -> str:
        name = kernel[len("fused "):] if kernel.startswith("fused ") else kernel
        if name in by_name:
            return layer_key(name)
        node = None
        tensor = name
        while node is None and tensor:
            node = producer.get(tensor)
            if node is None:
                head, sep, _ = tensor.rpartition("_")  # drop layout suffixes such as "_nchwc"
                tensor = head if sep else ""
        if node is None:
            return layer_key(name)
        start = node
        for _ in range(8):
            if node.op_type and node.op_type in op:
                return layer_key(node.name or node.output[0])
            node = producer.get(node.input[0]) if node.input else None
            if node is None:
                break
        return layer_key(start.name or start.output[0])

    return attribute


def _ort_latency(model_bytes: bytes, inputs: list[np.ndarray], threads: int, repeats: int,
                 progress: Progress) -> tuple[dict[str, float], dict[str, float], float]:
    """Per torch layer (summed over its kernels): median ms and share of the run time, and the
    median ms per run, from ONNX Runtime's profiler."""
    import onnx
    import onnxruntime as ort

    from .runtime import _cast

    attribute = _kernel_attribution(onnx.load_from_string(model_bytes))

    with tempfile.TemporaryDirectory(prefix="tugboat-prof-") as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, int(threads))
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "ort")
        sess = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
        feeds = {i.name: _cast(x, i.type) for i, x in zip(sess.get_inputs(), inputs)}
        sess.run(None, feeds)  # warm-up (its events are dropped below)
        for i in range(repeats):
            sess.run(None, feeds)
            progress.update(0.2 + 0.7 * (i + 1) / repeats, "timing layers (ONNX Runtime profiler)")
        path = sess.end_profiling()
        with open(path, encoding="utf-8") as f:
            events = json.load(f)
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    runs.sort(key=lambda e: e["ts"])
    runs = runs[1:] or runs  # drop the warm-up run
    per_run: list[dict[str, float]] = []
    for run in runs:
        lo, hi = run["ts"], run["ts"] + run["dur"]
        acc: dict[str, float] = defaultdict(float)
        for e in events:
            if e.get("cat") != "Node" or not lo <= e.get("ts", -1) <= hi:
                continue
            name = str(e.get("name", ""))
            if not name.endswith("_kernel_time"):
                continue
            op = str((e.get("args") or {}).get("op_name", ""))
            acc[attribute(name[: -len("_kernel_time")], op)] += e["dur"] / 1000.0
        per_run.append(acc)
    return _summarise(per_run, [r["dur"] / 1000.0 for r in runs])


def layer_profile(handle: ModelHandle, *, batch: int = 64, threads: int = 1, runtime: str = "onnxruntime",
                  repeats: int = 20, progress: Progress | None = None) -> dict[str, Any]:
    """Per-layer params, FLOPs (batch 1) and measured latency share at ``batch``.

    Returns ``{"rows": [{"name", "type", "params", "params_share", "flops", "flops_share",
    "latency_ms", "latency_share", "layer" (torch layer name), "prunable", "quantizable"}],
    "latency": {"runtime", "batch",
    "threads", "repeats", "total_ms", "other_share", "method"}}``."""
    from .measure import layer_table

    progress = progress or null_progress()
    progress.update(0.0, "reading layers")
    rows = [dict(r) for r in layer_table(handle)]
    progress.update(0.1, "finding prunable layers")
    torch_ok = handle.module is not None and handle.onnx_model is None
    prunable: set[str] = set()
    if handle.module is not None:
        try:
            from ..techniques.prune import prunable_layers

            prunable = set(prunable_layers(handle.module, tuple(handle.example_inputs(2))))
        except Exception:  # a graph torch-pruning cannot trace: nothing is offered for pruning
            prunable = set()
    use_torch = runtime == "torch" and torch_ok
    if use_torch:
        from .runtime import torch_threads

        with torch_threads(threads):
            lat, share, total = _torch_latency(handle.module, handle.example_inputs(batch),
                                        [r["name"] for r in rows], repeats, progress)
        method = "torch forward hooks: wall time inside each layer's forward (eager)"
    else:
        inputs = [t.numpy() for t in handle.example_inputs(batch)]
        lat, share, total = _ort_latency(handle.to_onnx().SerializeToString(), inputs, threads, repeats,
                                  progress)
        runtime = "onnxruntime"
        method = ("ONNX Runtime profiler: kernel time of each layer's nodes in the optimised graph "
                  "(fused BatchNorm/activations count towards their convolution)")
    total_params = max(1, sum(r["params"] for r in rows))
    total_flops = max(1, sum(r["flops"] for r in rows))
    seen_keys: set[str] = set()
    for r in rows:
        key = layer_key(r["name"]) if not use_torch else r["name"]
        # two rows of one torch layer (e.g. MatMul + Add of a Linear) share its time once
        first = key not in seen_keys
        ms, sh = (lat.get(key, 0.0), share.get(key, 0.0)) if first else (0.0, 0.0)
        seen_keys.add(key)
        r.update(params_share=r["params"] / total_params, flops_share=r["flops"] / total_flops,
                 latency_ms=ms, latency_share=sh,
                 layer=layer_key(r["name"]), prunable=layer_key(r["name"]) in prunable,
                 quantizable=r["type"] in QUANTIZABLE_TYPES)
    in_layers = sum(r["latency_share"] for r in rows)
    progress.update(1.0, "layers profiled")
    return {"rows": rows, "latency": {
        "runtime": runtime, "batch": batch, "threads": threads, "repeats": repeats,
        "total_ms": total, "other_share": max(0.0, 1.0 - in_layers),
        "method": method}}


def layer_sensitivity(handle: ModelHandle, data: Dataset | None, *, ratios=(0.25, 0.5, 0.75),
                      progress: Progress | None = None) -> dict[str, Any]:
    """Pruning and quantization sensitivity per torch layer name.

    Returns ``{"layers": {name: {"prune": mean drop, "prune_drop": {ratio: drop},
    "quant_rel_error", "quant_accuracy_drop"}}, "prune_metric": "accuracy" | "fidelity",
    "notes": [...]}`` (a technique that cannot run on this model leaves its keys out, with a
    note saying why)."""
    progress = progress or null_progress()
    out: dict[str, Any] = {"layers": defaultdict(dict), "prune_metric": None, "notes": [],
                           "ratios": [float(r) for r in ratios]}
    if handle.module is not None:
        from ..techniques.prune import layer_sensitivity as prune_sensitivity

        rows = prune_sensitivity(handle, data, ratios, progress.sub(0.0, 0.5, "pruning sensitivity: "))
        for r in rows:
            out["layers"][r["name"]].update(prune=r["sensitivity"], prune_drop=dict(r["drop"]))
            out["prune_metric"] = r["metric"]
    else:
        out["notes"].append("pruning sensitivity needs a torch model; this one exists only as ONNX")
    progress.update(0.5, "quantization sensitivity")
    if data is None:
        out["notes"].append("quantization sensitivity needs data (calibration and a val split)")
    elif any(s.get("technique") == "quantize" for s in handle.history):
        out["notes"].append("quantization sensitivity is measured on float models; this one is "
                            "already quantized or ONNX-only")
    else:
        from ..techniques.quantize import layer_sensitivity as quant_sensitivity

        for r in quant_sensitivity(handle, data, None, progress.sub(0.5, 1.0, "quantization sensitivity: ")):
            entry = out["layers"][r["layer"]]
            # a layer with several weight nodes: its worst node speaks for it
            if r["rel_error"] >= entry.get("quant_rel_error", -1.0):
                entry.update(quant_rel_error=r["rel_error"], quant_accuracy_drop=r["accuracy_drop"])
    out["layers"] = dict(out["layers"])
    progress.update(1.0, "sensitivity measured")
    return out
