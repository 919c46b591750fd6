"""Where a quantized graph's error comes from, layer by layer: one ranking for the whole app.

Both :func:`tugboat.engine.measuring.diagnose.diagnose` (the Diagnose view) and the low-fidelity advice of
:func:`tugboat.engine.techniques.quantize.apply` rank layers with :func:`rank_layers` / :func:`isolated_impact`
and :func:`severity`, so the layer the quantize step suggests keeping in float is the layer the
Diagnose view puts first.

A layer's *impact* is the model output with only that layer quantized, everything else float,
compared with the float model. The graph with one layer quantized is built from the float graph and
the variant's own Q/DQ pairs (:func:`isolated_model`): the layer keeps exactly the scales and zero
points the variant was calibrated with, and nothing is recalibrated. Ranking by impact (not by the
accumulated error of each layer's output) blames the layer that adds the error, not every layer
after it, and compares what the next layer reads: where ONNX Runtime folded a ReLU/Clip into a
convolution's output Q/DQ pair, the float graph's ReLU/Clip output is the matching tensor.

This module imports neither ``quantize`` nor ``diagnose`` (both import it).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx
from onnx import helper

from ..names import layer_of
from ..progress import Progress, null_progress

_LOG = logging.getLogger(__name__)
QDQ = ("QuantizeLinear", "DequantizeLinear")
# nodes that only move or select values: not "layers" a user would keep in float
PASS_THROUGH = {"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "MaxPool", "Relu", "Clip",
                "Concat", "Gather", "Slice", "Split", "Identity", "Cast", "Shape", "Resize", "Pad",
                "GlobalMaxPool", "Expand", "Tile"}
DQ_SUFFIX = "_DequantizeLinear_Output"


# --- numbers --------------------------------------------------------------------------------------

def sqnr_db(reference: np.ndarray, other: np.ndarray) -> float:
    """Signal to quantization noise ratio in dB (ONNX Runtime's definition); capped at 100."""
    from onnxruntime.quantization.qdq_loss_debug import compute_signal_to_quantization_noice_ratio

    return min(100.0, float(compute_signal_to_quantization_noice_ratio(
        np.asarray(reference, np.float64).ravel(), np.asarray(other, np.float64).ravel())))


def cosine(reference: np.ndarray, other: np.ndarray) -> float:
    """Mean per-sample cosine similarity (1 = same direction)."""
    a = np.asarray(reference, np.float64).reshape(len(reference), -1)
    b = np.asarray(other, np.float64).reshape(len(other), -1)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both_zero = (na < 1e-12) & (nb < 1e-12)
    cos = np.sum(a * b, axis=1) / np.maximum(na * nb, 1e-12)
    cos[both_zero] = 1.0
    return float(np.clip(cos.mean(), -1.0, 1.0))


def errors(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """SQNR (dB), mean per-sample cosine, max-abs and relative error of ``other`` against
    ``reference`` (same number of samples; each sample's values compared flat)."""
    n = len(reference)
    ref = np.asarray(reference, np.float64).reshape(n, -1)
    other = np.asarray(other, np.float64).reshape(n, -1)
    diff = ref - other
    return {"sqnr_db": sqnr_db(ref, other), "cosine": cosine(reference, other),
            "max_abs": float(np.max(np.abs(diff))) if diff.size else 0.0,
            "rel_error": float(np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-12))}


def top1(reference: np.ndarray, other: np.ndarray) -> float | None:
    """Top-1 agreement of two score arrays (None for a single column)."""
    a = np.asarray(reference).reshape(len(reference), -1)
    b = np.asarray(other).reshape(len(other), -1)
    if a.shape[1] < 2:
        return None
    return float(np.mean(a.argmax(1) == b.argmax(1)))


def severity(row: dict[str, Any]) -> float:
    """The ranking key (lower is worse): the output SQNR with only this layer quantized, else the
    layer's own accumulated SQNR."""
    return (row.get("impact") or row.get("accumulated") or {"sqnr_db": 100.0})["sqnr_db"]


# --- running graphs -------------------------------------------------------------------------------

def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The constant first dimension of every graph input, if the graph has one (else None)."""
    inits = {i.name for i in model.graph.initializer}
    sizes = set()
    for value in model.graph.input:
        if value.name in inits:
            continue
        dims = value.type.tensor_type.shape.dim
        sizes.add(int(dims[0].dim_value) if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0
                  else None)
    return sizes.pop() if len(sizes) == 1 and None not in sizes else None


def run(model: onnx.ModelProto, xs: list[np.ndarray], outputs: list[str] | None = None,
        rows: int = 256, keep: bool = False) -> list[np.ndarray]:
    """``model``'s outputs (all, or ``outputs``) on sample-first arrays, in chunks of ``rows``; a
    fixed-batch model gets exactly its batch per call (the last one padded, then cut). ``keep``: a
    graph that is final (never changed after): its session is kept for measuring it next
    (:func:`~tugboat.engine.measuring.runtime.trial_session`)."""
    from ..measuring.runtime import _cast, cached_session, fill_batch, ort_session, trial_session

    # the measured original's session, if it is that graph
    sess = trial_session(model, 1) if keep else (cached_session(model, 1) or ort_session(model, 1))
    fixed = fixed_batch(model)
    rows = fixed or rows
    chunks: list[list[np.ndarray]] = []
    for i in range(0, len(xs[0]), rows):
        part = [x[i : i + rows] for x in xs]
        n = len(part[0])
        if fixed:
            part = fill_batch(part, fixed)
        feed = {s.name: _cast(np.asarray(x), s.type) for s, x in zip(sess.get_inputs(), part)}
        chunks.append([np.asarray(o)[:n] for o in sess.run(outputs, feed)])
    return [np.concatenate([c[k] for c in chunks]) for k in range(len(chunks[0]))]


def toposort(model: onnx.ModelProto) -> onnx.ModelProto:
    """Order the graph's nodes so every input is produced before use (the fp16 converter
    appends its input casts at the end, which onnx.checker rejects)."""
    graph = model.graph
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):  # a cycle or a subgraph reference: leave the order alone
            return model
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)
    return model


# --- lining the graphs up -------------------------------------------------------------------------

def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


class Graphs:
    """Lookups that line a quantized graph's nodes up with the float graph's, by node name (QDQ
    quantizers keep node names; the tensor names may be shortened when the variant is compacted)."""

    def __init__(self, float_model: onnx.ModelProto, q_model: onnx.ModelProto) -> None:
        self.float_nodes = {n.name: n for n in float_model.graph.node if n.name}
        self.q_names = {n.name for n in q_model.graph.node}
        self.f_consumers = consumers(float_model)
        self.q_consumers = consumers(q_model)


def layer_output(node: onnx.NodeProto, q_tensors, graphs: Graphs) -> tuple[str, str]:
    """(float tensor name, quantized graph tensor to compare with it) for a node's output.

    What the next layer reads is compared: the DequantizeLinear output when the output is
    quantized. ONNX Runtime fuses a following Relu into the Q/DQ pair (the Relu node is gone and the
    uint8 zero point clips), so then the float graph's Relu output is the matching tensor."""
    out = node.output[0]
    seen = out + DQ_SUFFIX if out + DQ_SUFFIX in q_tensors else out
    q = next((c for c in graphs.q_consumers.get(out, []) if c.op_type == "QuantizeLinear"), None)
    if q is not None:
        dq = next((c for c in graphs.q_consumers.get(q.output[0], []) if c.op_type == "DequantizeLinear"), None)
        if dq is not None and dq.output[0] in q_tensors:
            seen = dq.output[0]
    twin = graphs.float_nodes.get(node.name)
    if twin is None:
        return float_name(out), seen
    fname = twin.output[0]
    after = graphs.f_consumers.get(fname, [])
    if len(after) == 1 and after[0].op_type in ("Relu", "Clip") and after[0].name not in graphs.q_names:
        fname = after[0].output[0]  # the Relu/Clip folded into the variant's Q/DQ pair
    return fname, seen


def float_name(name: str) -> str:
    from onnxruntime.quantization.quant_utils import QUANT_INPUT_SUFFIX

    return name[:-len(QUANT_INPUT_SUFFIX)] if name.endswith(QUANT_INPUT_SUFFIX) else name


def quantized_layers(float_model: onnx.ModelProto, q_model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The QDQ graph's layers worth ranking: named nodes that read a dequantized tensor, have a
    twin in the float graph, and compute something (not Q/DQ, not pass-through ops)."""
    dq_outputs = {n.output[0] for n in q_model.graph.node if n.op_type == "DequantizeLinear"}
    float_nodes = {n.name for n in float_model.graph.node}
    return [n for n in q_model.graph.node
            if n.name and n.name in float_nodes and n.op_type not in QDQ and n.op_type not in PASS_THROUGH
            and any(i in dq_outputs for i in n.input)]


# --- one layer quantized --------------------------------------------------------------------------

def _copy_qdq(node: onnx.NodeProto, inputs: list[str], output: str, name: str) -> onnx.NodeProto:
    out = helper.make_node(node.op_type, inputs, [output], name=name, domain=node.domain)
    out.attribute.extend(node.attribute)
    return out


def _input_pairs(target, qnode, q_prod, need, node_name) -> list[onnx.NodeProto]:
    """The variant's Q/DQ pairs in front of ``target``'s inputs, reading the float tensors."""
    added = []
    for k, t in enumerate(qnode.input):
        dq = q_prod.get(t)
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = q_prod.get(dq.input[0])
        dq_in = dq.input[0]
        if q is not None and q.op_type == "QuantizeLinear":
            dq_in = f"{q.output[0]}__iso{k}"
            added.append(_copy_qdq(q, [target.input[k], *q.input[1:]], dq_in, f"{node_name}__iso_q{k}"))
            need(q.input[1:])
        else:
            need([dq_in])
        out = f"{dq.output[0]}__iso{k}"
        added.append(_copy_qdq(dq, [dq_in, *dq.input[1:]], out, f"{node_name}__iso_dq{k}"))
        need(dq.input[1:])
        target.input[k] = out
    return added


def _output_pair(target, qnode, q_consumers, need, node_name) -> list[onnx.NodeProto]:
    """The node's output Q/DQ pair (a folded Relu included: the uint8 zero point clips)."""
    q_out = next((c for c in q_consumers.get(qnode.output[0], []) if c.op_type == "QuantizeLinear"), None)
    if q_out is None:
        return []
    dq_out = next((c for c in q_consumers.get(q_out.output[0], []) if c.op_type == "DequantizeLinear"), None)
    if dq_out is None:
        return []
    raw, qt = f"{target.output[0]}__iso_raw", f"{target.output[0]}__iso_q"
    final = target.output[0]
    target.output[0] = raw
    need([*q_out.input[1:], *dq_out.input[1:]])
    return [_copy_qdq(q_out, [raw, *q_out.input[1:]], qt, f"{node_name}__iso_q_out"),
            _copy_qdq(dq_out, [qt, *dq_out.input[1:]], final, f"{node_name}__iso_dq_out")]


def isolated_model(float_model: onnx.ModelProto, q_model: onnx.ModelProto, node_name: str,
                   outputs: list[str]) -> onnx.ModelProto:
    """The float graph with only ``node_name`` quantized: the variant's own Q/DQ pairs in front of
    that node's inputs (activations and weights, with the scales and zero points it was calibrated
    with) and after its output when the variant quantizes it. ``outputs`` become graph outputs.

    Built from the float graph rather than by un-quantizing the variant, because ONNX Runtime folds
    a Relu after a Conv into the Conv's output Q/DQ pair (the Relu node is gone from the variant)."""
    q_nodes = {n.name: n for n in q_model.graph.node}
    q_prod = {o: n for n in q_model.graph.node for o in n.output}
    q_inits = {i.name: i for i in q_model.graph.initializer}
    m = onnx.ModelProto()
    m.CopyFrom(float_model)
    g = m.graph
    target = next((n for n in g.node if n.name == node_name), None)
    qnode = q_nodes.get(node_name)
    if target is None or qnode is None or len(target.input) != len(qnode.input):
        from ..errors import TugboatError

        raise TugboatError(f"{node_name}: not in both graphs")
    have = {i.name for i in g.initializer}

    def need(names):
        for name in names:
            if name and name not in have and name in q_inits:
                g.initializer.append(q_inits[name])
                have.add(name)

    g.node.extend(_input_pairs(target, qnode, q_prod, need, node_name)
                  + _output_pair(target, qnode, consumers(q_model), need, node_name))
    names = {o.name for o in g.output}
    for name in outputs:
        if name not in names:
            g.output.append(helper.make_empty_tensor_value_info(name))
    for opset in q_model.opset_import:  # Q/DQ with per-channel axes need the variant's opset
        for own in m.opset_import:
            if own.domain == opset.domain:
                own.version = max(own.version, opset.version)
    return toposort(m)


def isolated_impact(float_model: onnx.ModelProto, q_model: onnx.ModelProto, node_name: str,
                    xs: list[np.ndarray], float_out: np.ndarray, layer_tensor: str | None = None
                    ) -> tuple[dict[str, Any], np.ndarray | None]:
    """(impact, the layer's own output or None): the model output with only ``node_name``
    quantized, against ``float_out``; ``layer_tensor`` (a float graph tensor) also comes back."""
    extra = [layer_tensor] if layer_tensor else []
    iso = isolated_model(float_model, q_model, node_name, extra)
    got = run(iso, xs, [float_model.graph.output[0].name, *extra])
    impact = {**errors(float_out, got[0]), "top1_agreement": top1(float_out, got[0])}
    return impact, (got[1] if extra else None)


def rank_layers(float_model: onnx.ModelProto, q_model: onnx.ModelProto, xs: list[np.ndarray],
                progress: Progress | None = None, budget_s: float | None = None) -> list[dict[str, Any]]:
    """The quantized layers of a QDQ graph, worst first by :func:`severity` (the impact of each
    layer quantized alone on ``xs``): ``{"node", "layer", "op_type", "name", "impact", "rank"}``,
    where ``name`` is what ``exclude`` takes (the torch layer for nodes with weights, else the
    node). Empty for graphs
    without Q/DQ pairs or ones ONNX Runtime will not run rewired. With ``budget_s``, layers are
    measured in graph order until that many seconds have passed (the rest are not ranked)."""
    import time

    progress = progress or null_progress()
    started = time.perf_counter()
    layers = quantized_layers(float_model, q_model)
    if not layers:
        return []
    float_out = run(float_model, xs)[0]
    inits = {i.name: len(i.dims) for i in float_model.graph.initializer}
    weighted = {n.name for n in float_model.graph.node if any(inits.get(i, 0) >= 2 for i in n.input)}
    rows = []
    for k, node in enumerate(layers):
        if budget_s is not None and time.perf_counter() - started > budget_s:
            break
        progress.update(k / len(layers), f"layer {k + 1}/{len(layers)}: {layer_of(node.name)} alone")
        try:
            impact, _ = isolated_impact(float_model, q_model, node.name, xs, float_out)
        except Exception as exc:  # an exotic graph ORT refuses once rewired: not ranked
            _LOG.debug("isolated run of %s failed: %s", node.name, exc)
            continue
        rows.append({"node": node.name, "layer": layer_of(node.name), "op_type": node.op_type,
                     "name": layer_of(node.name) if node.name in weighted else node.name, "impact": impact})
    rows.sort(key=severity)
    for i, r in enumerate(rows):
        r["rank"] = i + 1
    return rows
