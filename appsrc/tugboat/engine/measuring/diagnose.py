"""Diagnose: where, layer by layer, a variant diverges from the model it was made from.

:func:`diagnose` compares a variant with its float original on a bounded sample (``samples``
inputs of the val split, 64-256 is plenty) and returns one row per layer, worst first, each with
the recipe change that would fix it:

* **Quantized variants** (the variant's graph holds QuantizeLinear/DequantizeLinear pairs, i.e.
  static-int8 and qat-int8; dynamic-int8, weight-only and fp16 get the accumulated part only):

  - *accumulated*: the whole quantized graph runs and every layer's output is compared with the
    float graph's tensor of the same name (ONNX Runtime's ``qdq_loss_debug``:
    ``modify_model_output_intermediate_tensors`` + ``collect_activations`` on both graphs,
    ``create_activation_matching`` for the per-activation SQNR of each Q/DQ pair);
  - *isolated*: only that layer quantized, everything else float. Built by rewiring the variant's
    own QDQ graph, not by re-quantizing: every other node reads the float tensor in front of its
    Q/DQ pair (and the float weight from the float graph), so the layer keeps exactly the scales
    and zero points the variant was calibrated with, and no calibration is rerun (one small
    ONNX Runtime session per layer; re-quantizing with ``nodes_to_quantize`` would recalibrate
    per layer and take several times longer). The row also carries the *impact*: the model
    output's SQNR and top-1 agreement with only this layer quantized. Rows are ranked by that
    impact, so an early layer whose error every later layer inherits is not blamed for it.
  - Fix: "keep this layer in float": the variant's recipe with the node added to the quantize
    step's ``exclude``. For static-int8 the ``verify`` worst rows' fixes are measured (``if_float``:
    re-quantized with that node excluded, same calibration data), because isolation can blame a
    layer whose exclusion changes nothing (a quantized activation it shares with a neighbour stays
    quantized).

* **Pruned or distilled variants** (torch modules): forward hooks record every named module's
  output in both models; where the shapes agree the row holds the cosine and relative error of
  the block's output, where they do not (channels removed) it holds the channels kept. Rows are
  ranked by the error a block adds over the previous comparable block. Fix for a pruned layer:
  "prune this layer less": a ``layer_ratios`` entry at half the layer's current ratio.

:func:`compare` puts two variants side by side: recipe differences, metrics, and per-layer
output channels.

Bounded: at most 256 samples, and fewer when every intermediate tensor of that many would not fit
in ``ACTIVATION_BUDGET`` (1 GB). No Qt here. Long loops call ``progress.update`` (which also
honours a cancel request).
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..errors import TugboatError
from ..io.data import Dataset
from ..io.models import ModelHandle
from ..names import layer_of
from ..progress import Progress, null_progress
from ..techniques import steps as registry
from ..techniques.quant_error import (
    DQ_SUFFIX,
    PASS_THROUGH,
    QDQ,
    Graphs,
    cosine,
    errors,
    fixed_batch,
    isolated_impact,
    layer_output,
    quantized_layers,
    severity,
    sqnr_db,
    top1,
)

_LOG = logging.getLogger(__name__)
DEFAULT_SAMPLES = 128
MAX_SAMPLES = 256
__all__ = ["compare", "cosine", "diagnose", "errors", "fixed_steps", "sample_inputs", "sqnr_db"]
_COMPUTE = {"Conv", "ConvTranspose", "Gemm", "MatMul", "ConvInteger", "MatMulInteger", "MatMulNBits",
            "QLinearConv", "QLinearMatMul", "DynamicQuantizeMatMul", "FusedMatMul", "Attention"}


# --- numbers (one ranking for the app: engine/techniques/quant_error.py) -----------------------------------

_top1 = top1
_QDQ, _PASS_THROUGH, _DQ_SUFFIX = QDQ, PASS_THROUGH, DQ_SUFFIX


# --- inputs ---------------------------------------------------------------------------------------

def sample_inputs(handle: ModelHandle, data: Dataset | None, samples: int = DEFAULT_SAMPLES
                  ) -> tuple[list[np.ndarray], np.ndarray | None, str]:
    """A bounded sample in the model's input order: (arrays, labels or None, where it came from)."""
    samples = max(8, min(int(samples), MAX_SAMPLES))
    if data is not None:
        for split in ("val", "calib", "test", "train"):
            if len(data.splits.get(split, ())):
                xs, labels = data.split(split, limit=samples)
                return [np.ascontiguousarray(xs[n]) for n in handle.input_names], labels, split
    xs = [t.numpy() for t in handle.example_inputs(samples, seed=0)]
    return xs, None, "random inputs"


def _steps(original: ModelHandle, variant: ModelHandle) -> list[dict[str, Any]]:
    return [dict(s) for s in variant.history[len(original.history):] if isinstance(s, dict)]


def variant_kind(steps: list[dict[str, Any]]) -> str:
    """``quantize`` if any step quantizes (it is final), else the last step's technique."""
    techniques = [s.get("technique") for s in steps]
    if "quantize" in techniques:
        return "quantize"
    return techniques[-1] if techniques else "none"


ACTIVATION_BUDGET = 1 << 30  # bytes of intermediate tensors kept per model run (two models run)


def _within_budget(xs: list[np.ndarray], bytes_per_sample: float, notes: list[str]) -> list[np.ndarray]:
    """Fewer samples when every intermediate tensor of that many would not fit the budget (a large
    model at 224x224 holds megabytes of activations per sample)."""
    n = len(xs[0])
    fit = int(ACTIVATION_BUDGET / max(1.0, 2 * bytes_per_sample))
    if fit >= n:
        return xs
    fit = max(4, fit)
    notes.append(f"{fit} of {n} samples used: the layer outputs of more would not fit in "
                 f"{ACTIVATION_BUDGET >> 20} MB")
    return [x[:fit] for x in xs]


def _onnx_bytes_per_sample(model: onnx.ModelProto) -> float:
    """Bytes of all float intermediate tensors for one sample (from the inferred shapes)."""
    total = 0
    for vi in model.graph.value_info:
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim]
        if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT and dims:
            total += 4 * int(np.prod(dims[1:])) if len(dims) > 1 else 4
    return float(total)


# --- ONNX helpers ---------------------------------------------------------------------------------

def _tmpdir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="tugboat-diagnose-")


def _prepared_float(reference: ModelHandle) -> onnx.ModelProto:
    """The float graph exactly as the quantizer saw it (``quant_pre_process``), so tensor and node
    names line up with the quantized graph."""
    from ..techniques.quantize import _prepared

    with _tmpdir() as tmp:
        return _prepared(reference.to_onnx(), Path(tmp))


def _activations(model: onnx.ModelProto, names: list[str], xs: list[np.ndarray], tmp: Path,
                 tag: str) -> dict[str, np.ndarray]:
    """Every float intermediate tensor of ``model`` on ``xs`` (qdq_loss_debug's augmentation)."""
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        modify_model_output_intermediate_tensors,
    )

    from ..techniques.quantize import _calibration_reader, _quiet

    src, aug = tmp / f"{tag}.onnx", tmp / f"{tag}_aug.onnx"
    onnx.save(model, str(src))
    fixed = fixed_batch(model)  # a fixed-batch model gets whole batches: the last one padded
    reader = _calibration_reader(names, xs, null_progress(), fixed)
    with _quiet():
        modify_model_output_intermediate_tensors(str(src), str(aug))
        acts = collect_activations(str(aug), reader)
    # the augmentation flattens each batch's tensor: back to one row per sample (padding cut)
    n, batch = len(xs[0]), reader.batch
    real = [min(batch, n - i) for i in range(0, n, batch)]
    fed = [batch if fixed else r for r in real]
    out = {}
    for k, batches in acts.items():
        if len(batches) != len(fed) or any(b.size % f for b, f in zip(batches, fed)):
            continue
        if len({b.size // f for b, f in zip(batches, fed)}) == 1:
            out[k] = np.concatenate([b.reshape(f, -1)[:r] for b, f, r in zip(batches, fed, real)])
    return out


def _run(model: onnx.ModelProto, xs: list[np.ndarray], outputs: list[str] | None = None
         ) -> list[np.ndarray]:
    from ..techniques.quant_error import run

    return run(model, xs, outputs)


# --- quantized variants ---------------------------------------------------------------------------

def _verify_fixes(rows: list[dict[str, Any]], float_model: onnx.ModelProto, reference: ModelHandle,
                  step: dict[str, Any], data: Dataset, xs: list[np.ndarray], float_out: np.ndarray,
                  progress: Progress) -> None:
    """Re-quantize with each row's layer kept in float, as its fix would, and measure the output.

    Needed because a fix can fail where isolation blames a layer: ONNX Runtime still quantizes a
    tensor that another quantized node reads, so keeping one layer of a shared activation in
    float may change nothing."""
    from ..techniques.quantize import TECHNIQUE, _calib_arrays, _resolve_names, static_int8

    params = TECHNIQUE.defaults("static-int8")
    params.update({k: v for k, v in step.items() if k not in ("technique", "method")})
    calib = _calib_arrays(data, reference, params["calibration_samples"], "static-int8")
    exclude = _resolve_names(float_model, list(step.get("exclude") or []), "quantize.exclude") \
        if step.get("exclude") else []
    for k, row in enumerate(rows):
        sub = progress.sub(k / len(rows), (k + 1) / len(rows), f"{row['layer']} in float: ")
        q = static_int8(float_model, reference.input_names, calib, params, sub,
                        exclude=[*exclude, row["node"]])
        y = _run(q, xs)[0]
        row["if_float"] = {**errors(float_out, y), "top1_agreement": _top1(float_out, y)}


@dataclass
class _Compared:
    """The float graph and the variant's, run on the same sample, every tensor kept."""

    float_model: onnx.ModelProto
    q_model: onnx.ModelProto
    xs: list[np.ndarray]
    f_acts: dict[str, np.ndarray]
    q_acts: dict[str, np.ndarray]
    float_out: np.ndarray
    q_out: np.ndarray

    def __post_init__(self) -> None:
        from onnxruntime.quantization.qdq_loss_debug import create_activation_matching

        self.graphs = Graphs(self.float_model, self.q_model)
        self.has_qdq = any(n.op_type == "DequantizeLinear" for n in self.q_model.graph.node)
        self.float_nodes = {n.name for n in self.float_model.graph.node}
        # per Q/DQ pair: the activation before and after its quantization (its own rounding error)
        matching = create_activation_matching({k: [v] for k, v in self.q_acts.items()})
        self.qdq_err = {k: sqnr_db(m["pre_qdq"][0], m["post_qdq"][0]) for k, m in matching.items()}
        self.shapes = {}  # the per-sample shape of each tensor (the activations come back flattened)
        for vi in [*self.float_model.graph.value_info, *self.float_model.graph.output]:
            dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
            if len(dims) > 1 and all(dims[1:]):
                self.shapes[vi.name] = dims[1:]

    def candidates(self) -> list[onnx.NodeProto]:
        """QDQ graphs keep the float graph's node names: the variant's quantized layers (ranked by
        engine/techniques/quant_error.py, as the quantize step's advice is). Other methods rewrite nodes
        (MatMulInteger, MatMulNBits, Gemm as MatMul + Add): the float graph's weight layers whose
        output tensor the variant still has."""
        pool = quantized_layers(self.float_model, self.q_model) if self.has_qdq else [
            n for n in self.float_model.graph.node if n.name and n.op_type in _COMPUTE]
        out = []
        for node in pool:
            fname, seen = layer_output(node, self.q_acts, self.graphs)
            if fname in self.f_acts and seen in self.q_acts and self.f_acts[fname].shape == self.q_acts[seen].shape:
                out.append(node)
        return out


def _layer_row(c: _Compared, node: onnx.NodeProto, q_step: int) -> tuple[dict[str, Any], bool]:
    """One diagnose row for ``node``; and whether its isolated run failed."""
    fname, seen = layer_output(node, c.q_acts, c.graphs)
    input_sqnr = [c.qdq_err[i[: -len(_DQ_SUFFIX)]] for i in node.input
                  if i.endswith(_DQ_SUFFIX) and i[: -len(_DQ_SUFFIX)] in c.qdq_err]
    row: dict[str, Any] = {
        "node": node.name, "layer": layer_of(node.name), "op_type": node.op_type,
        "output": fname, "shape": c.shapes.get(fname) or list(c.f_acts[fname].shape[1:]),
        "accumulated": errors(c.f_acts[fname], c.q_acts[seen]), "isolated": None, "impact": None,
        "input_qdq_sqnr_db": min(input_sqnr) if input_sqnr else None,
    }
    failed = False
    if c.has_qdq:
        try:
            row["impact"], layer_iso = isolated_impact(c.float_model, c.q_model, node.name, c.xs, c.float_out,
                                                       fname)
            row["isolated"] = errors(c.f_acts[fname], layer_iso)
        except Exception as exc:  # an exotic graph ORT refuses once rewired: accumulated only
            _LOG.debug("isolated run of %s failed: %s", node.name, exc)
            failed = True
    # a node name is exact for QDQ graphs; the layer name resolves for the rewriting methods
    exclude = node.name if c.has_qdq and node.name in c.float_nodes else layer_of(node.name)
    row["action"] = {"kind": "keep_float", "label": "Keep this layer in float", "step": q_step,
                     "exclude": exclude}
    return row, failed


def _compared(reference: ModelHandle, variant: ModelHandle, xs: list[np.ndarray], notes: list[str],
              progress: Progress) -> _Compared:
    progress.update(0.0, "preparing the float graph")
    float_model = _prepared_float(reference)
    q_model = variant.to_onnx()
    names = variant.input_names
    xs = _within_budget(xs, _onnx_bytes_per_sample(float_model), notes)
    with _tmpdir() as tmp:
        progress.update(0.05, "running the float graph")
        f_acts = _activations(float_model, names, xs, Path(tmp), "float")
        progress.update(0.15, "running the quantized graph")
        q_acts = _activations(q_model, names, xs, Path(tmp), "quant")
    return _Compared(float_model, q_model, xs, f_acts, q_acts, _run(float_model, xs)[0], _run(q_model, xs)[0])


def _diagnose_quantized(reference: ModelHandle, variant: ModelHandle, steps: list[dict[str, Any]],
                        xs: list[np.ndarray], progress: Progress, data: Dataset | None = None,
                        verify: int = 0) -> dict[str, Any]:
    q_step = max(i for i, s in enumerate(steps) if s.get("technique") == "quantize")
    method = steps[q_step].get("method", "")
    notes: list[str] = []
    c = _compared(reference, variant, xs, notes, progress)
    if not c.has_qdq:
        notes.append(f"{method}: isolated errors need a QDQ graph (static-int8, qat-int8); this "
                     f"variant shows accumulated errors only")
    candidates = c.candidates()
    if not candidates:
        raise TugboatError(f"no quantized layer of {variant.source} lines up with the float graph "
                           f"(method {method}); nothing to diagnose")
    rows, skipped = [], 0
    for k, node in enumerate(candidates):
        progress.update(0.25 + 0.55 * k / len(candidates),
                        f"layer {k + 1}/{len(candidates)}: {layer_of(node.name)}")
        row, failed = _layer_row(c, node, q_step)
        rows.append(row)
        skipped += failed
    if skipped:
        notes.append(f"{skipped} layer(s) could not be run in isolation; accumulated errors only")
    rows.sort(key=severity)  # the same key as the quantize step's advice (engine/techniques/quant_error.py)
    for i, r in enumerate(rows):
        r.update(rank=i + 1, score_db=severity(r), if_float=None)
    step = registry.get("quantize").complete(steps[q_step])
    if method == "static-int8" and data is not None and verify > 0:
        if step["max_accuracy_drop"] > 0:
            notes.append("fixes not verified: the variant kept layers in float by itself "
                         "(max_accuracy_drop)")
        else:
            _verify_fixes(rows[:verify], c.float_model, reference, step, data, c.xs, c.float_out,
                          progress.sub(0.8, 1.0, "verifying fixes: "))
    return {"kind": "quantize", "method": method, "rows": rows, "notes": notes, "samples": len(c.xs[0]),
            "output": {**errors(c.float_out, c.q_out), "top1_agreement": _top1(c.float_out, c.q_out)}}


# --- pruned / distilled variants ------------------------------------------------------------------

def _module_outputs(module, xs: list[np.ndarray]) -> tuple[dict[str, np.ndarray], list[str], np.ndarray]:
    """Every named module's first tensor output (forward hooks), in execution order."""
    import torch

    from .runtime import eval_mode

    seen: dict[str, np.ndarray] = {}
    order: list[str] = []
    hooks = []

    def hook(name):
        def fn(_m, _inp, out):
            t = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(t, torch.Tensor) and name not in seen:
                seen[name] = t.detach().float().numpy().copy()
                order.append(name)
        return fn

    eval_mode(module)
    for name, m in module.named_modules():
        if name:
            hooks.append(m.register_forward_hook(hook(name)))
    try:
        with torch.inference_mode():
            out = module(*[torch.from_numpy(x) for x in xs])
    finally:
        for h in hooks:
            h.remove()
    out = out[0] if isinstance(out, (tuple, list)) else out
    return seen, order, out.detach().float().numpy()


def _channels(module) -> dict[str, int]:
    from ..techniques.prune import _channels as channels

    return channels(module)


def _layer_ratios(steps: list[dict[str, Any]], p_step: int) -> dict[str, float]:
    from ..techniques.prune import parse_layer_ratios

    try:
        return parse_layer_ratios(steps[p_step].get("layer_ratios"))
    except TugboatError:
        return {}


def _prune_one(original, example, step: dict[str, Any], layer: str, ratio: float):
    """The original with only ``layer`` pruned at ``ratio`` the way ``step`` prunes (no fine-tuning)."""
    from ..techniques.prune import prune_structured_module, prune_unstructured_module

    step = registry.get("prune").complete(step)
    if step["method"] == "unstructured":
        return prune_unstructured_module(original, 0.0, per_layer={layer: ratio})
    importance = step["importance"]
    return prune_structured_module(original, example, 0.0, per_layer={layer: ratio},
                                   importance="l1" if importance == "taylor" else importance,
                                   round_to=step["round_to"] or None)


def _diagnose_torch(original: ModelHandle, variant: ModelHandle, steps: list[dict[str, Any]],
                    xs: list[np.ndarray], progress: Progress, kind: str) -> dict[str, Any]:
    if variant.module is None:
        raise TugboatError("this variant exists only as ONNX; per-block agreement needs its torch "
                           "module", path=variant.source)
    a_mod, b_mod = original.torch_module(), variant.module
    notes: list[str] = []
    probe, _order, _y = _module_outputs(a_mod, [x[:2] for x in xs])
    xs = _within_budget(xs, sum(a.nbytes for a in probe.values()) / len(xs[0][:2]), notes)
    progress.update(0.05, "running the original")
    a_out, order, a_y = _module_outputs(a_mod, xs)
    progress.update(0.15, "running the variant")
    b_out, _order, b_y = _module_outputs(b_mod, xs)
    prune_steps = [i for i, s in enumerate(steps) if s.get("technique") == "prune"]
    p_step = prune_steps[-1] if prune_steps else None
    rows = _block_rows(a_mod, b_mod, order, a_out, b_out, steps, p_step)
    _isolated_impacts(original, a_mod, a_y, xs, steps, p_step, [r for r in rows if r["action"] is not None],
                      progress)
    if not rows:
        raise TugboatError("no layer of the variant lines up with the original", path=variant.source)
    _rank_blocks(rows)
    if kind == "distill":
        notes.insert(0, "a distilled student: blocks are compared where their names and shapes match "
                        "the teacher's; the others show the channels kept")
    else:
        notes.insert(0, "pruned layers are ranked by the output error with only that layer pruned at "
                        "its ratio (no fine-tuning); rows whose shapes changed show the channels kept")
    return {"kind": kind, "method": steps[-1].get("method", "") if steps else "", "rows": rows,
            "notes": notes, "samples": len(xs[0]), "output": {**errors(a_y, b_y), "top1_agreement": _top1(a_y, b_y)}}


def _block_rows(a_mod, b_mod, order: list[str], a_out: dict, b_out: dict, steps: list[dict[str, Any]],
                p_step: int | None) -> list[dict[str, Any]]:
    """One row per block or layer both models have: the accumulated error, the channels kept and,
    for a pruned layer, the "prune this layer less" action."""
    a_ch, b_ch = _channels(a_mod), _channels(b_mod)
    overrides = _layer_ratios(steps, p_step) if p_step is not None else {}
    unstructured = p_step is not None and steps[p_step].get("method") == "unstructured"
    modules = dict(b_mod.named_modules())
    rows: list[dict[str, Any]] = []
    for name in order:
        if name not in b_out:
            continue
        a, b = a_out[name], b_out[name]
        is_layer = name in a_ch
        if not is_layer and a.shape != b.shape:
            continue  # a block whose shape changed: its layers' rows say how
        row: dict[str, Any] = {"node": name, "layer": name, "op_type": "layer" if is_layer else "block",
                               "shape": list(a.shape[1:]), "variant_shape": list(b.shape[1:]),
                               "accumulated": errors(a, b) if a.shape == b.shape else None,
                               "isolated": None, "impact": None, "action": None}
        if is_layer:
            _layer_fields(row, a_ch[name], b_ch.get(name), modules.get(name), unstructured,
                          overrides, p_step)
        rows.append(row)
    return rows


def _layer_fields(row: dict[str, Any], before: int, after: int | None, module, unstructured: bool,
                  overrides: dict[str, float], p_step: int | None) -> None:
    import torch

    row["channels"] = {"before": before, "after": after}
    if after is None:  # the variant has no such layer
        return
    ratio = 1.0 - after / max(1, before)
    w = getattr(module, "weight", None)
    if unstructured and isinstance(w, torch.Tensor) and w.numel():
        ratio = float((w == 0).sum()) / w.numel()
    row["ratio"] = round(overrides.get(row["layer"], ratio), 4)
    if p_step is not None and row["ratio"] > 0.005:
        row["action"] = {"kind": "prune_less", "label": "Prune this layer less", "step": p_step,
                         "layer": row["layer"], "ratio": math.floor(row["ratio"] * 50) / 100}


def _isolated_impacts(original: ModelHandle, a_mod, a_y: np.ndarray, xs: list[np.ndarray],
                      steps: list[dict[str, Any]], p_step: int | None, todo: list[dict[str, Any]],
                      progress: Progress) -> None:
    """Isolated: only this layer pruned at its ratio (no fine-tuning), the model output compared."""
    import torch

    example = tuple(original.example_inputs(2))
    inputs = [torch.from_numpy(x) for x in xs]
    for k, row in enumerate(todo):
        progress.update(0.25 + 0.7 * k / len(todo), f"layer {k + 1}/{len(todo)}: {row['layer']} alone")
        try:
            one = _prune_one(a_mod, example, steps[p_step], row["layer"], row["ratio"])
            with torch.inference_mode():
                y = one(*inputs)
            y = (y[0] if isinstance(y, (tuple, list)) else y).float().numpy()
            row["impact"] = {**errors(a_y, y), "top1_agreement": _top1(a_y, y)}
        except Exception as exc:  # e.g. a layer torch-pruning will not prune alone
            _LOG.debug("pruning %s alone failed: %s", row["layer"], exc)


def _rank_blocks(rows: list[dict[str, Any]]) -> None:
    def severity(r: dict[str, Any]) -> tuple:
        impact = (r["impact"] or {}).get("sqnr_db")
        acc = (r["accumulated"] or {}).get("sqnr_db")
        return (impact is None, impact if impact is not None else 0.0, acc if acc is not None else 100.0)

    rows.sort(key=severity)
    for i, r in enumerate(rows):
        r["rank"] = i + 1
        r["score_db"] = (r["impact"] or r["accumulated"] or {}).get("sqnr_db")


# --- the entry point ------------------------------------------------------------------------------

def diagnose(original: ModelHandle, variant: ModelHandle, data: Dataset | None, *,
             reference: ModelHandle | None = None, samples: int = DEFAULT_SAMPLES,
             verify: int = 3, progress: Progress | None = None) -> dict[str, Any]:
    """Per-layer divergence of ``variant`` from ``original`` on at most ``samples`` inputs.

    ``reference`` is the float model the quantize step started from when steps came before it
    (e.g. the pruned variant of a prune + quantize chain); the original by default.

    Returns ``{"kind", "method", "rows" (worst first), "notes", "output", "samples", "split"}``;
    each row: ``node``, ``layer``, ``op_type``, ``accumulated`` / ``isolated`` / ``impact``
    (``{"sqnr_db", "cosine", "max_abs", "rel_error"}`` or ``None``), ``rank`` and ``action``
    (feed it to :func:`fixed_steps`). For static-int8 the ``verify`` worst rows also get
    ``if_float``: the model output re-quantized with that layer kept in float (its fix, measured)."""
    if any(getattr(s, "batch_axis", 0) != 0 for s in original.inputs):
        raise TugboatError("diagnose compares sample by sample and needs every input's batch on "
                           "axis 0", path=original.source)
    progress = progress or null_progress()
    steps = _steps(original, variant)
    kind = variant_kind(steps)
    if kind == "none":
        raise TugboatError(f"{variant.source}: the variant has no steps; it is the original")
    xs, _labels, split = sample_inputs(original, data, samples)
    notes: list[str] = []
    if kind == "quantize":
        q_index = max(i for i, s in enumerate(steps) if s.get("technique") == "quantize")
        if reference is None and q_index > 0:
            # the float model the quantizer saw is not kept: rebuild it from the steps before
            from ..running.runner import apply_steps

            reference = apply_steps(original, steps[:q_index], data, progress.sub(0.0, 0.4, "rebuilding: "),
                                    guard=False)
            notes.append(f"the float model before quantization was rebuilt by re-running step(s) "
                         f"1-{q_index}")
        result = _diagnose_quantized(reference or original, variant, steps, xs,
                                     progress.sub(0.4 if notes else 0.0, 1.0), data, verify)
        result["notes"] = notes + result["notes"]
    else:
        result = _diagnose_torch(original, variant, steps, xs, progress, kind)
    result.update(split=split, steps=steps)
    progress.update(1.0, "done")
    return result


def fixed_steps(steps: list[dict[str, Any]], action: dict[str, Any]) -> list[dict[str, Any]]:
    """The steps with a row's fix applied: the node added to the quantize step's ``exclude``
    (keep in float), or a lower ``layer_ratios`` entry for the layer (prune less)."""
    new = copy.deepcopy([dict(s) for s in steps])
    step = new[action["step"]]
    if action["kind"] == "keep_float":
        exclude = list(step.get("exclude") or [])
        if action["exclude"] not in exclude:
            exclude.append(action["exclude"])
        step["exclude"] = exclude
    elif action["kind"] == "prune_less":
        from ..techniques.prune import parse_layer_ratios

        ratios = parse_layer_ratios(step.get("layer_ratios"))
        ratios[action["layer"]] = float(action["ratio"])
        step["layer_ratios"] = [f"{k}={v:g}" for k, v in ratios.items()]
    else:
        raise TugboatError(f"unknown diagnose action {action['kind']!r}")
    return new


# --- side by side ---------------------------------------------------------------------------------

def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(obj, list) and obj and all(isinstance(v, dict) for v in obj):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flat(v, f"{prefix}.{i}"))
        return out
    return {prefix: obj}


METRIC_KEYS = ("size_bytes", "compressed_bytes", "params", "nonzero_params", "flops",
               "latency_ms.median", "latency_ms.p90", "accuracy", "fidelity.top1_agreement",
               "fidelity.cosine", "fidelity.rel_error", "seconds")


def layer_channels(handle: ModelHandle | None) -> dict[str, int]:
    """Output channels / features per layer: from the torch module, else from the ONNX weights."""
    if handle is None:
        return {}
    if handle.module is not None:
        return _channels(handle.module)
    from onnx import numpy_helper

    model = handle.to_onnx()
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    out: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul", "ConvInteger", "MatMulInteger"):
            continue
        w = node.input[1] if len(node.input) > 1 else ""
        dq = producers.get(w)
        if dq is not None and dq.op_type == "DequantizeLinear":
            w = dq.input[0]
        if w not in inits:
            continue
        dims = list(inits[w].dims)
        if not dims:
            continue
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        if node.op_type in ("Conv", "ConvInteger") or (node.op_type == "Gemm" and trans_b):
            n = dims[0]
        else:
            n = dims[-1]
        out[layer_of(node.name)] = int(n)
    del numpy_helper
    return out


def compare(variant_a, variant_b) -> dict[str, Any]:
    """Two engine Variants side by side: recipe differences, metrics and channels per layer.

    Rows are ``(key, a, b)``; ``recipe`` lists only keys that differ (``steps.0.ratio``)."""
    ra = _flat({"steps": (variant_a.recipe or {}).get("steps", [])}) if (variant_a.recipe or {}).get("steps") else {}
    rb = _flat({"steps": (variant_b.recipe or {}).get("steps", [])}) if (variant_b.recipe or {}).get("steps") else {}
    recipe = [(k, ra.get(k), rb.get(k)) for k in sorted(set(ra) | set(rb)) if ra.get(k) != rb.get(k)]
    ma, mb = _flat(variant_a.metrics or {}), _flat(variant_b.metrics or {})
    metrics = [(k, ma.get(k), mb.get(k)) for k in METRIC_KEYS if k in ma or k in mb]
    ca, cb = layer_channels(variant_a.handle), layer_channels(variant_b.handle)
    names = list(ca) + [n for n in cb if n not in ca]
    layers = [(n, ca.get(n), cb.get(n)) for n in names]
    return {"a": variant_a.name, "b": variant_b.name, "recipe": recipe, "metrics": metrics,
            "layers": layers}
