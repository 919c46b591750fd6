"""Quantization: fewer bits for weights (and activations), measured in the runtime it deploys to.

Every method works on the exported ONNX graph with ONNX Runtime's own quantization tools
(``onnxruntime.quantization``), because ONNX Runtime is where the int8 kernels are fast on a CPU:

* ``dynamic-int8``: int8 weights, activations quantized on the fly (``quantize_dynamic``).
* ``static-int8``: int8 weights and activations, ranges calibrated on the data's ``calib`` split
  (``quantize_static``, QDQ format), with accuracy-aware exclusion (``max_accuracy_drop``).
* ``weight-only-int8``: int8 weights (one symmetric scale per output channel) for every weight-bearing
  operator, Conv, ConvTranspose, Gemm/MatMul, LSTM/GRU/RNN, embedding Gather, inside If/Loop/Scan bodies
  too, read through ``DequantizeLinear``; activations and compute stay float
  (:mod:`tugboat.engine.techniques.weight_dequant`).
* ``weight-only-int4``: block-wise int4 weights for MatMul/Linear layers (``MatMulNBits``); the other
  weights as in ``weight-only-int8``.
* ``fp16``: half-precision weights and compute (``onnxruntime.transformers.float16``).
* ``qat-int8``: quantization-aware training in torch (``torch.ao.quantization.FakeQuantize`` on
  weights and layer inputs, trained on the ``train`` split), then static int8 in ONNX Runtime on the
  trained weights.

bf16 is not offered: ONNX Runtime's CPU provider has no bf16 kernels for MatMul/Conv (a session
with a bf16 MatMul fails with NOT_IMPLEMENTED), so a bf16 ONNX artifact would not run.

The result of every method is an ONNX-only handle (``module=None``): the technique is ``final``.
It does not need a torch module (``needs_torch=False``): a loaded ONNX file that onnx2torch cannot
convert still quantizes. Only ``qat-int8`` trains, so only it asks for the torch module (with the
loader's reason when there is none).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import io
import logging
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..devices import DEFAULT_TRAINING, DEVICE_CHOICES
from ..devices import HELP as DEVICE_HELP
from ..errors import Cancelled, DataError, TugboatError
from ..io.data import Dataset
from ..io.models import ModelHandle
from ..io.onnx_graph import (
    graph_nodes,
    graphs,
    node_subgraphs,
    rename_reads,
    share_subgraph_weights,
    toposort,
    unique_initializer_names,
    weights_in_subgraphs,
)
from ..measuring.runtime import checked_bytes, ort_session, run_onnx
from ..names import layer_of
from ..progress import Progress, null_progress
from . import weight_dequant
from .quant_error import fixed_batch, rank_layers, severity
from .quant_error import run as run_graph
from .technique import NO_CHANGE, Param, Technique
from .weight_dequant import dequant_int8_weights, quantize_tensor

METHODS = {
    "auto": "int8 chosen per model kind: static-int8 for convolutional networks (fast int8 "
            "convolutions), dynamic-int8 on MatMul/Gather weights for transformers, recurrent and "
            "Linear-heavy models (static activation ranges hurt attention and LayerNorm outputs).",
    "dynamic-int8": "int8 weights, activations quantized at run time; no calibration data needed. "
                    "Good for Linear/MatMul-heavy models; often slower on convolutions.",
    "static-int8": "int8 weights and activations, ranges calibrated on the calibration split. "
                   "Usually the smallest and fastest on CPU.",
    "weight-only-int8": "int8 weights (per output channel) for every layer with weights: convolutions, "
                        "Linear/MatMul, LSTM/GRU, embeddings; activations and compute stay float. About "
                        "4x smaller, nearly float fidelity, about float speed.",
    "weight-only-int4": "4-bit weights for MatMul/Linear layers in blocks of block_size (about 6-7x "
                        "smaller for Linear-heavy models); the other layers' weights int8 as in "
                        "weight-only-int8.",
    "fp16": "half-precision weights and compute: about 2x smaller, nearly no accuracy change; "
            "speed depends on the CPU's fp16 support.",
    "qat-int8": "quantization-aware training: fine-tunes with simulated int8 for a few epochs, then "
                "quantizes like static-int8. Recovers accuracy static-int8 loses.",
}

_STATIC = ("static-int8", "qat-int8")
_CALIBRATED = (*_STATIC, "auto")
_WEIGHT_ONLY = ("weight-only-int8", "weight-only-int4")
_INT8 = ("auto", "dynamic-int8", "static-int8", "qat-int8")
CALIBRATIONS = ("auto", "percentile", "minmax", "entropy")
FORMATS = ("auto", "qdq", "qoperator")
# format "auto" tries QOperator where a QDQ graph's bytes besides its int8 weights exceed this share of them
QOPERATOR_MIN_OVERHEAD = 0.25
# below these the variant says fidelity dropped (and what to try): top-1 agreement with the float
# model for classifiers, mean cosine similarity of the outputs for everything else
MIN_TOP1_AGREEMENT = 0.95
MIN_COSINE = 0.99

# operator types ONNX Runtime's quantizers know (onnxruntime.quantization.registry 1.32: the
# integer-ops, QDQ and QLinear registries; Gemm becomes MatMul for dynamic int8): anything else
# in op_types would quantize nothing, so it is refused when the recipe is read
QUANTIZABLE_OPS = (
    "Add", "ArgMax", "Attention", "AveragePool", "BatchNormalization", "Clip", "Concat", "Conv",
    "ConvTranspose", "CumSum", "EmbedLayerNormalization", "Flatten", "Gather", "GatherElements", "Gemm",
    "GlobalAveragePool", "InstanceNormalization", "LSTM", "LayerNormalization", "LeakyRelu", "MatMul",
    "MaxPool", "Mul", "Pad", "Relu", "Reshape", "Resize", "Sigmoid", "Slice", "Softmax", "Split",
    "Squeeze", "TopK", "Transpose", "Unsqueeze", "Where")
QUANTIZED_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
                 "MatMulNBits", "QLinearConv", "QLinearMatMul", "DynamicQuantizeLSTM", "QAttention",
                 "GatherBlockQuantized")

PARAMS = [
    Param("per_channel", "bool", True,
          "one scale per output channel instead of one per tensor: more accurate, slightly larger",
          methods=_INT8),
    Param("calibration", "choice", "auto",
          "how activation ranges are chosen: percentile (clips the rarest 0.001% of values: robust "
          "to the outliers SiLU, squeeze-excite and attention produce), minmax (full range), "
          "entropy (minimises information loss), or auto: percentile and minmax both tried, the "
          "one closer to the float model on the val split kept",
          choices=CALIBRATIONS, methods=_CALIBRATED),
    Param("calibration_samples", "int", 256,
          "samples used to measure activation ranges: the calib split first, then more rows of "
          "the train split (more: steadier ranges, slower); the variant says how many were used",
          minimum=8, maximum=100000, methods=_CALIBRATED),
    Param("reduce_range", "choice", "auto",
          "7-bit weights: avoids int16 overflow in the int8 kernels of x86 CPUs without VNNI "
          "(auto: on exactly there), slightly less accurate", choices=("auto", "on", "off"),
          methods=_CALIBRATED),
    Param("activation_type", "choice", "uint8",
          "storage type of quantized activations (uint8 suits ReLU outputs, int8 symmetric ones)",
          choices=("uint8", "int8"), methods=_CALIBRATED),
    Param("weight_type", "choice", "int8",
          "storage type of quantized weights (int8 is what the fast CPU kernels expect)",
          choices=("int8", "uint8"), methods=_INT8),
    Param("format", "choice", "auto",
          "how the int8 graph is written: qdq (QuantizeLinear/DequantizeLinear pairs around float "
          "ops: what every runtime reads, and what the Diagnose view ranks layer by layer), "
          "qoperator (ONNX Runtime's QLinearConv/QLinearAdd/...: no Q/DQ nodes; per-tensor weight "
          "scales unless per_channel) or auto: qdq, except where the Q/DQ nodes, scales and biases "
          "weigh more than a quarter of the int8 weights (small graphs of many layers): there "
          "qoperator with per-tensor weights is also tried and kept when it is smaller and as "
          "close to the float model on the val split", choices=FORMATS, methods=_CALIBRATED),
    Param("op_types", "list", [],
          "operator types to quantize, e.g. [\"MatMul\", \"Gemm\"]; empty: every type the method "
          "supports (set [\"MatMul\", \"Gemm\"] to keep slow int8 convolutions out of dynamic-int8); "
          "static-int8 on a transformer quantizes its weighted MatMul/Gemm/Gather layers only",
          methods=_INT8, choices=QUANTIZABLE_OPS),
    Param("exclude", "list", [],
          "layers kept in float: torch module names (e.g. \"classifier.3\") or ONNX node names",
          methods=(*_INT8, *_WEIGHT_ONLY, "fp16")),
    Param("rounding", "choice", "auto",
          "how weights are rounded to int8: nearest (each weight on its own), gptq (GPTQ: one input "
          "column at a time, each column's rounding error spread over the columns not rounded yet, "
          "weighted by how the layer's inputs on the calibration rows correlate, so the layer's "
          "output moves far less for the same int8 values and scales; a pass over the calibration "
          "rows) or auto: gptq where there are calibration rows, else nearest",
          choices=("auto", "gptq", "nearest"), methods=("auto", "static-int8", "weight-only-int8")),
    Param("max_accuracy_drop", "float", 0.0,
          "accuracy-aware exclusion: keep the most sensitive layers in float until accuracy on the "
          "val split drops at most this much (0.01 = 1 point); 0 turns it off",
          minimum=0.0, maximum=0.5, methods=(*_STATIC, "auto")),
    Param("block_size", "int", 32,
          "weights per shared scale of int4 MatMul/Linear weights (power of two, at least 16): "
          "smaller blocks are more accurate and a little larger; int8 weights have one scale per "
          "output channel", minimum=16, maximum=256,
          methods=_WEIGHT_ONLY, short="bs"),
    Param("symmetric", "bool", True,
          "symmetric int4 weight ranges (no zero point): simpler and usually as accurate (int8 "
          "weights are always symmetric)",
          methods=_WEIGHT_ONLY),
    Param("runtime", "choice", "onnxruntime",
          "where the dynamic int8 model will run: onnxruntime (the ONNX artifact) or torch "
          "(torch.ao dynamic int8 Linear layers; the ONNX artifact is ONNX Runtime's equivalent)",
          choices=("onnxruntime", "torch"), methods=("dynamic-int8",)),
    Param("keep_io_float32", "bool", True,
          "keep the model's inputs and outputs float32 so callers need no change",
          methods=("fp16",)),
    Param("epochs", "int", 3, "fine-tuning epochs with simulated int8 on the train split",
          minimum=1, maximum=100, methods=("qat-int8",)),
    Param("lr", "float", 1e-4, "fine-tuning learning rate (small: the model is already trained)",
          minimum=1e-7, maximum=1e-1, methods=("qat-int8",), log_scale=True),
    Param("teacher_weight", "float", 0.8,
          "share of the fine-tuning loss that makes the int8 model copy the float model's outputs "
          "(distillation); the rest fits the labels. Without labels it is 1",
          minimum=0.0, maximum=1.0, methods=("qat-int8",)),
    Param("batch_size", "int", 64, "fine-tuning batch size", minimum=1, maximum=4096,
          methods=("qat-int8",)),
    Param("device", "choice", DEFAULT_TRAINING, "fine-tuning " + DEVICE_HELP, choices=DEVICE_CHOICES,
          methods=("qat-int8",)),
]

_CALIB_BATCH = 32
_LOG = logging.getLogger(__name__)


# --- names: ONNX nodes <-> torch layers ----------------------------------------------------------

def _resolve_names(model: onnx.ModelProto, names: list[str], where: str) -> list[str]:
    """ONNX node names for user-given layer names (torch module names or node names)."""
    out: list[str] = []
    nodes = [n for n in graph_nodes(model.graph) if n.name]  # If branches, Loop bodies too
    for name in names:
        hits = [n.name for n in nodes if n.name == name or layer_of(n.name) == name
                or n.name.startswith(f"/{name}/") or (f"__/{name}/" in n.name)]  # inlined branches
        if not hits:
            known = sorted({layer_of(n.name) for n in nodes if n.op_type in ("Conv", "Gemm", "MatMul")})
            raise TugboatError(f"'{where}': no layer named {name!r}; layers with weights: "
                               f"{', '.join(known[:20])}")
        out += hits
    return out


# --- graph helpers --------------------------------------------------------------------------------

def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def gemm_to_matmul(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite ``Gemm`` with a constant weight as ``MatMul`` (+ ``Add``) on a copy of ``model``.

    ONNX Runtime's dynamic and weight-only quantizers only handle MatMul; the exporter writes
    ``nn.Linear`` on 2-D inputs as Gemm. A graph without Gemm is returned as it is (not copied)."""
    if not any(n.op_type == "Gemm" for n in model.graph.node):
        return model
    model = _copy(model)
    inits = {i.name: i for i in model.graph.initializer}
    nodes = []
    taken = {n.name for n in model.graph.node}

    def unique(name: str) -> str:
        # several Linears in one scope (a flat graph from a torch.export program: "/program/...")
        # would otherwise give two nodes one name, which ONNX Runtime refuses
        out, i = name, 1
        while out in taken:
            out, i = f"{name}_{i}", i + 1
        taken.add(out)
        return out

    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            w = w.T
        w_name = f"{node.input[1]}_kn"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w), w_name))
        base = node.name.rsplit("/", 1)[0] if "/" in node.name else node.name
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = f"{node.output[0]}_mm" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], w_name], [mm_out],
                                      name=unique(f"{base}/MatMul")))
        if has_bias:
            nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]],
                                          name=unique(f"{base}/Add")))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in model.graph.node for i in n.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return model


def compact(q: onnx.ModelProto, source: onnx.ModelProto) -> onnx.ModelProto:
    """Make a quantized graph smaller without changing what it computes, in place.

    ONNX Runtime's quantizers name every tensor they add after the tensor it quantizes
    (``/blocks/blocks.4/se/expand/Conv_output_0_QuantizeLinear_Output``, its ``_scale`` and
    ``_zero_point``): on a small or depthwise-heavy network those names weigh as much as the int8
    weights. They become short ids; the names of the graph's inputs and outputs, of the source
    model's tensors and of every node that existed in the source (the layers, mapped back to torch
    modules by :func:`layer_of`) stay. All-zero zero points of weight and bias dequantization are
    dropped (0 is the default), equal small constants (scales, zero points) are stored once, and
    the shape annotations the pre-pass added go (the runtime infers them again). Graphs with
    subgraphs (If/Loop) keep their names: subgraphs may refer to outer tensors by name."""
    g = q.graph
    del g.value_info[:]
    if any(True for n in g.node for _ in node_subgraphs(n)):
        for sub in graphs(g):
            del sub.value_info[:]
        share_subgraph_weights(q)  # copies the pre-pass folded into each branch (see there)
        _short_subgraph_names(q, source)
        return q
    keep = {i.name for i in g.input} | {o.name for o in g.output}
    keep |= {i.name for i in source.graph.initializer} | {i.name for i in source.graph.input}
    keep |= {o for n in source.graph.node for o in n.output}
    source_nodes = {n.name for n in source.graph.node}
    _drop_zero_weight_zero_points(g)
    _share_equal_constants(g, keep)
    _drop_default_conv_attributes(g)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    kept_inits = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(kept_inits)
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        if name not in names:
            names[name] = f"q{len(names)}"
        return names[name]

    for init in g.initializer:
        init.name = short(init.name)
    for node in g.node:
        node.input[:] = [short(i) for i in node.input]
        node.output[:] = [short(o) for o in node.output]
        if node.name not in source_nodes:
            node.name = ""
    return q


def _short_subgraph_names(q: onnx.ModelProto, source: onnx.ModelProto) -> None:
    """:func:`compact`'s short ids for the tensors a quantizer added inside If/Loop/Scan bodies, in
    place: each is defined in one body and read only there and in the bodies nested in it, so it is
    renamed there. Names the source model has, graph outputs and names defined twice stay."""
    keep = {i.name for g in graphs(source.graph) for i in [*g.initializer, *g.input, *g.output]}
    keep |= {o for n in graph_nodes(source.graph) for o in n.output}
    defined: dict[str, int] = {}
    for g in graphs(q.graph):
        keep |= {o.name for o in g.output} | {i.name for i in g.input}
        for name in [*(i.name for i in g.initializer), *(o for n in g.node for o in n.output)]:
            defined[name] = defined.get(name, 0) + 1
    taken = set(defined) | keep
    fresh = (f"s{k}" for k in range(10**9) if f"s{k}" not in taken)
    for g in list(graphs(q.graph))[1:]:
        for name in [*(i.name for i in g.initializer), *(o for n in g.node for o in n.output)]:
            if name in keep or defined[name] != 1 or not name:
                continue
            new = next(fresh)
            for init in g.initializer:
                if init.name == name:
                    init.name = new
            for node in g.node:
                node.output[:] = [new if o == name else o for o in node.output]
            rename_reads(g, name, new)


def _drop_zero_weight_zero_points(g: onnx.GraphProto) -> None:
    """Drop all-zero zero points of DequantizeLinear on signed integer initializers (symmetric
    int8 weights, int32 biases): 0 is the default, and per-channel weights carry one per channel.
    Only DequantizeLinear, and only of initializers: a QuantizeLinear's zero point also sets its
    output type, and activations keep theirs."""
    inits = {i.name: i for i in g.initializer}
    signed = (onnx.TensorProto.INT8, onnx.TensorProto.INT32)
    for node in g.node:
        if node.op_type != "DequantizeLinear" or len(node.input) != 3 or node.input[0] not in inits:
            continue
        zp = inits.get(node.input[2])
        if zp is not None and zp.data_type in signed and inits[node.input[0]].data_type == zp.data_type \
                and not numpy_helper.to_array(zp).any():
            del node.input[2]


# Conv attributes at their ONNX default values; kernel_shape is the weight's own when omitted
_CONV_DEFAULTS = {"auto_pad": lambda v: v == b"NOTSET", "dilations": lambda v: all(x == 1 for x in v),
                  "strides": lambda v: all(x == 1 for x in v), "group": lambda v: v == 1,
                  "pads": lambda v: not any(v)}


def _drop_default_conv_attributes(g: onnx.GraphProto) -> None:
    """Drop the attributes of Conv / QLinearConv that state the default (``dilations = [1, 1]``,
    ``group = 1``, ...) or the weight's own kernel shape: five attributes of 20-30 bytes on every
    convolution, 3 % of a small many-layer network's int8 file. The graph computes the same."""
    dims = {i.name: list(i.dims) for i in g.initializer}
    for node in g.node:
        if node.op_type not in ("Conv", "QLinearConv"):
            continue
        weight = node.input[1] if node.op_type == "Conv" else node.input[3]
        kept = []
        for a in node.attribute:
            value = helper.get_attribute_value(a)
            default = _CONV_DEFAULTS.get(a.name, lambda v: False)(value)
            if a.name == "kernel_shape":
                default = weight in dims and list(value) == dims[weight][2:]
            if not default:
                kept.append(a)
        if len(kept) < len(node.attribute):
            del node.attribute[:]
            node.attribute.extend(kept)


def _share_equal_constants(g: onnx.GraphProto, keep: set[str], max_elements: int = 64) -> None:
    """Let nodes share one copy of equal small initializers (the quantizers write a scale and a
    zero point per quantized tensor; after ReLUs many are the same)."""
    first: dict[tuple, str] = {}
    alias: dict[str, str] = {}
    for init in g.initializer:
        if init.name in keep or int(np.prod(init.dims)) > max_elements:
            continue
        key = (init.data_type, tuple(init.dims), numpy_helper.to_array(init).tobytes())
        if key in first:
            alias[init.name] = first[key]
        else:
            first[key] = init.name
    if alias:
        for node in g.node:
            node.input[:] = [alias.get(i, i) for i in node.input]


def _with_meta(q: onnx.ModelProto, source: onnx.ModelProto) -> onnx.ModelProto:
    """Carry the float model's ``tugboat`` metadata (input/output spec) to the quantized graph."""
    have = {p.key for p in q.metadata_props}
    for prop in source.metadata_props:
        if prop.key not in have:
            q.metadata_props.add(key=prop.key, value=prop.value)
    return q


def weight_nodes(model: onnx.ModelProto, op_types=("Conv", "Gemm", "MatMul")) -> list[onnx.NodeProto]:
    """Nodes of ``op_types``; for static quantization activation-only MatMuls count too."""
    return [n for n in model.graph.node if n.op_type in op_types]


def constants_to_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Move the tensors of top-level ``Constant`` nodes into initializers (on a copy when there
    are any): some exporters store weights that way, and ONNX Runtime's quantizers only see
    initializers (``quantize_dynamic`` fails, ``quantize_static`` leaves them float)."""
    consts = [n for n in model.graph.node if n.op_type == "Constant" and len(n.output) == 1
              and n.attribute and n.attribute[0].name == "value"]
    if not consts:
        return model
    model = _copy(model)
    keep = []
    for node in model.graph.node:
        if node.op_type == "Constant" and len(node.output) == 1 and node.attribute \
                and node.attribute[0].name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            model.graph.initializer.append(tensor)
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return model


def opset_of(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def at_least_opset(model: onnx.ModelProto, version: int = 13) -> tuple[onnx.ModelProto, str | None]:
    """``model`` converted up to opset ``version`` when it is older (per-channel Quantize/
    DequantizeLinear need opset 13: ONNX Runtime writes an ``axis`` the old opset does not know, and
    the quantized graph is refused at load). Returns (model, None) or (model as-is, why not)."""
    have = opset_of(model)
    if not have or have >= version:
        return model, None
    try:
        from onnx import version_converter

        converted = version_converter.convert_version(model, version)
        onnx.checker.check_model(converted)
        return converted, None
    except Exception as exc:
        return model, (f"the model is opset {have} and could not be converted to opset {version} "
                       f"({' '.join(str(exc).split())[:120]})")


_WEIGHTED = {"Conv": "conv", "ConvTranspose": "conv", "MatMul": "linear", "Gemm": "linear",
             "Gather": "embedding", "LSTM": "recurrent", "GRU": "recurrent", "RNN": "recurrent"}


def _weight_input(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> str | None:
    """The initializer holding ``node``'s weights (the data of a Gather, the kernel otherwise)."""
    slots = (0,) if node.op_type == "Gather" else (1, 0) if node.op_type in ("MatMul", "Gemm") else (1,)
    for i in slots:
        if i < len(node.input) and node.input[i] in inits and len(inits[node.input[i]].dims) >= 2:
            return node.input[i]
    return None


def model_kind(model: onnx.ModelProto) -> dict[str, Any]:
    """What a graph mostly is, from where its weights sit: ``conv`` (most weights in
    convolutions), ``transformer`` (MatMul weights plus Softmax attention), ``recurrent``
    (LSTM/GRU weights) or ``linear``; with the weight counts per kind."""
    inits = {i.name: i for i in model.graph.initializer}
    counts = {"conv": 0, "linear": 0, "embedding": 0, "recurrent": 0}
    for node in model.graph.node:
        kind = _WEIGHTED.get(node.op_type)
        name = _weight_input(node, inits) if kind else None
        if name:
            counts[kind] += int(np.prod(inits[name].dims))
    ops = {n.op_type for n in model.graph.node}
    dense = counts["linear"] + counts["embedding"]
    if counts["recurrent"] and counts["recurrent"] >= counts["conv"]:
        kind = "recurrent"
    elif counts["conv"] >= dense:
        kind = "conv"
    elif "Softmax" in ops and ("LayerNormalization" in ops or "ReduceMean" in ops or counts["embedding"]):
        kind = "transformer"
    else:
        kind = "linear"
    return {"kind": kind, "weights": counts}


def auto_method(model: onnx.ModelProto) -> tuple[str, str]:
    """(method, why) for ``method = "auto"``."""
    outside, inside = weights_in_subgraphs(model)
    if inside and not outside:  # static int8 (QDQ) does not enter If/Loop/Scan bodies
        if _mostly_conv_or_recurrent(model):
            return "weight-only-int8", ("the weights are all inside If/Loop/Scan subgraphs, which static int8 "
                                        "does not enter, and they feed convolutions or recurrent layers, "
                                        "whose inputs dynamic int8 would quantize on the fly: int8 weights "
                                        "with float activations")
        return "dynamic-int8", ("the weights are all inside If/Loop/Scan subgraphs, which only dynamic "
                                "int8 enters")
    kind = model_kind(model)["kind"]
    if kind == "conv":
        return "static-int8", ("a convolutional network: static int8 runs its convolutions as fast "
                               "int8 kernels")
    return "dynamic-int8", (f"a {kind} model: dynamic int8 on its MatMul/Gather weights keeps "
                            f"activations in float, where attention and LayerNorm outliers would "
                            f"lose fidelity with static ranges")


def _mostly_conv_or_recurrent(model: onnx.ModelProto) -> bool:
    """Whether a graph (subgraphs included) has recurrent layers or more convolution than
    MatMul/Gemm/Gather weights (weights read directly or through one Unsqueeze/Reshape)."""
    inits = {i.name: i for g in graphs(model.graph) for i in g.initializer}
    via = {n.output[0]: n.input[0] for n in graph_nodes(model.graph)
           if n.op_type in ("Unsqueeze", "Reshape", "Squeeze", "Identity") and n.output and n.input}
    counts = {"conv": 0, "linear": 0, "embedding": 0, "recurrent": 0}
    for node in graph_nodes(model.graph):
        kind = _WEIGHTED.get(node.op_type)
        if kind:
            names = [via.get(i, i) for i in node.input]
            counts[kind] += sum(int(np.prod(inits[n].dims)) for n in names if n in inits and len(inits[n].dims) >= 2)
    return counts["recurrent"] + counts["conv"] >= max(1, counts["linear"] + counts["embedding"])


# ops whose inputs stay float in static-int8 on a transformer; only layers with weights are
# quantized (attention scores, Softmax and LayerNorm outputs have outliers static ranges clip)
_TRANSFORMER_STATIC_OPS = ["MatMul", "Gemm", "Gather"]
# dynamic-int8 chosen by "auto": weights of these ops; never ConvInteger (slow on CPUs)
_AUTO_DYNAMIC_OPS = ["MatMul", "Gather", "LSTM", "Attention", "EmbedLayerNormalization"]


def _static_plan(model: onnx.ModelProto, params: dict) -> tuple[dict, list[str], str | None]:
    """Per-kind defaults for static-int8: (params, nodes to keep float, note)."""
    if params["op_types"] or model_kind(model)["kind"] != "transformer":
        return params, [], None
    inits = {i.name: i for i in model.graph.initializer}
    keep = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.name
            and _weight_input(n, inits) is None]
    note = ("a transformer: static int8 quantizes the layers with weights (MatMul/Gemm/Gather) and "
            "keeps attention scores, Softmax and LayerNorm in float")
    return {**params, "op_types": list(_TRANSFORMER_STATIC_OPS)}, keep, note


@functools.lru_cache(maxsize=1)
def cpu_has_vnni() -> bool | None:
    """Whether this x86 CPU has VNNI int8 dot products (None: not x86, or unknown)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return None
    try:
        text = Path("/proc/cpuinfo").read_text(errors="ignore")
    except OSError:
        return None
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return any(f in flags.split() for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def _reduce_range(setting: str | bool) -> bool:
    """7-bit weights where u8 x s8 products could overflow int16 (x86 without VNNI)."""
    if isinstance(setting, bool):
        return setting
    if setting == "on":
        return True
    if setting == "off":
        return False
    return cpu_has_vnni() is False


# --- calibration ---------------------------------------------------------------------------------

def _calib_arrays(data: Dataset | None, handle: ModelHandle, samples: int, method: str,
                  notes: list[str] | None = None) -> list[np.ndarray]:
    """``samples`` rows for calibration: the calib split first, then further rows of the train
    split when more are asked for than it holds (``default_splits`` puts 256 in calib), trimmed to
    whole calibration batches (ONNX Runtime's histogram calibrators need equal batch shapes).
    What was used, when it is not what was asked, goes into ``notes``."""
    if data is None:
        raise DataError(f"quantize {method} needs data to calibrate activation ranges; give a "
                        f"dataset (recipe 'data = ...')")
    idx, available = _calib_rows(data, samples)
    if not available:
        raise DataError("has no calib or train samples to calibrate on", path=data.ref)
    batch = calib_batch(min(available, samples))
    if notes is not None and len(idx) < samples:
        why = (f"the data has {available}" if available < samples
               else f"whole batches of {batch}")
        notes.append(f"calibrated on {len(idx)} samples (asked for {samples}; {why})")
    return [_in_layout(data.inputs[spec.name][idx], spec) for spec in handle.inputs]


def _calib_rows(data: Dataset, samples: int) -> tuple[np.ndarray, int]:
    """(the rows static int8 calibrates on, the rows it could take): the calib split, then the rest
    of the train split, ``samples`` at most, trimmed to whole calibration batches."""
    rows = [np.asarray(data.splits.get(s, ()), dtype=np.int64) for s in ("calib", "train")]
    idx = np.concatenate(rows) if any(len(r) for r in rows) else np.zeros(0, np.int64)
    _, first = np.unique(idx, return_index=True)  # calib is a subset of train: no repeats
    idx = idx[np.sort(first)]
    available = len(idx)
    idx = idx[:samples]
    batch = calib_batch(len(idx))
    return idx[: len(idx) - len(idx) % batch], available


def _in_layout(array: np.ndarray, spec):
    """Sample-first rows as the model takes them (see :class:`_ModelLayout`)."""
    return array if spec.batch_axis == 0 else _ModelLayout(array, spec)


class _ModelLayout:
    """Sample-first data that, sliced into batches, gives them in the model's layout (a recurrent
    state with the batch on axis 1, a scalar input without a batch)."""

    def __init__(self, array: np.ndarray, spec) -> None:
        self.array, self.spec = array, spec

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index: slice) -> np.ndarray:
        return self.spec.to_model(self.array[index])


def calib_batch(n: int) -> int:
    """The calibration batch size for ``n`` rows: all batches must have the same size (ONNX
    Runtime's histogram calibrators stack them), so the largest size from 8 to 32 that divides
    ``n`` (``n`` itself up to 32); 32 when none does (the rows are then cut to whole batches)."""
    if n <= _CALIB_BATCH:
        return max(1, n)
    return next((b for b in range(_CALIB_BATCH, 7, -1) if n % b == 0), _CALIB_BATCH)


class _Reader:
    """An ONNX Runtime ``CalibrationDataReader`` over arrays, reporting progress per batch."""

    def __init__(self, names: list[str], arrays: list[np.ndarray], progress: Progress,
                 batch: int | None = None, *, fixed: bool = False):
        self.fixed = fixed  # the model takes exactly ``batch`` rows: a short last batch is filled
        self.n = len(arrays[0])
        self.names, self.arrays, self.progress = names, arrays, progress
        self.batch = batch or calib_batch(self.n)
        self.i = 0

    def get_next(self):
        if self.i >= self.n:
            return None
        parts = [a[self.i : self.i + self.batch] for a in self.arrays]
        if self.fixed:
            from ..measuring.runtime import fill_batch

            parts = fill_batch(parts, self.batch)
        feed = {name: np.ascontiguousarray(a) for name, a in zip(self.names, parts)}
        self.i += self.batch
        self.progress.update(min(1.0, self.i / self.n),
                             f"calibrating: batch {-(-self.i // self.batch)}/{-(-self.n // self.batch)}")
        return feed

    def rewind(self):
        self.i = 0

    def __iter__(self):
        return self

    def __next__(self):
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


def _calibration_reader(names, arrays, progress, fixed: int | None = None):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(_Reader, CalibrationDataReader):
        pass

    return Reader(names, arrays, progress, fixed, fixed=fixed is not None)


# --- ONNX Runtime quantizers ----------------------------------------------------------------------

def _quant_type(name: str):
    from onnxruntime.quantization import QuantType

    return {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[name]


@contextlib.contextmanager
def _quiet():
    """ONNX Runtime's quantizers log and warn freely; keep it out of the user's console."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        # the histogram calibrators print their progress to stdout
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def _tmp() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="tugboat-quant-")


def _symbolic_shapes(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """``model`` with every shape from ONNX Runtime's symbolic shape inference, or None when it
    cannot infer them all.

    Run here rather than inside ``quant_pre_process`` because there, when it does not get every
    shape, ``SymbolicShapeInference.infer_shapes`` saves ``sym_shape_infer_temp.onnx`` and its
    weights as ``<uuid>.data`` files into the current directory before raising: 90 MB of litter per
    MiniLM quantization. The same steps as ``infer_shapes``, so its result is handed on as-is (one
    inference, not a trial run and then the real one)."""
    try:
        from ..lazy import ort_symbolic_shape_inference  # without torch (onnxruntime.tools imports it)

        ssi = ort_symbolic_shape_inference()(2**31 - 1, True, False, 0)
        ssi._preprocess(_copy(model))
        done = False
        while ssi.run_:
            done = ssi._infer_impl()
        if not done:
            return None
        ssi._update_output_from_vi()
        return ssi.out_mp_
    except Exception as exc:  # an ONNX Runtime without these internals, or a graph it refuses
        _LOG.debug("symbolic shape inference skipped: %s", exc)
        return None


def _prepared(model: onnx.ModelProto, tmp: Path) -> onnx.ModelProto:
    """``quant_pre_process`` (shape inference, constant folding) when it succeeds, else as-is."""
    from onnxruntime.quantization import quant_pre_process

    src, dst = tmp / "float.onnx", tmp / "prep.onnx"
    started = time.time()
    try:
        with _quiet():
            inferred = _symbolic_shapes(model)
            # below opset 11 quant_pre_process first replaces Upsample, then infers: let it
            early = inferred is not None and opset_of(model) <= 10
            onnx.save(inferred if inferred is not None and not early else model, str(src))
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=not early, auto_merge=True)
        return onnx.load(str(dst))
    except Exception as exc:  # an exotic graph: quantize without the pre-pass
        _LOG.debug("quant_pre_process skipped: %s", exc)
        return model
    finally:
        _remove_symbolic_shape_dump(started)


_SYMBOLIC_DUMP = "sym_shape_infer_temp.onnx"


def _remove_symbolic_shape_dump(since: float) -> None:
    """ONNX Runtime's symbolic shape inference, when it cannot infer every shape, saves the model into
    the *current folder* as sym_shape_infer_temp.onnx plus a uuid-named external-data file (90 MB for
    a sentence encoder) and never removes them. Remove the dump it just wrote (and only that)."""
    dump = Path(_SYMBOLIC_DUMP)
    try:
        if not dump.is_file() or dump.stat().st_mtime < since - 1:
            return
        from ..io.onnx_graph import all_tensors as _all_tensors

        dumped = onnx.load(str(dump), load_external_data=False)
        files = {e.value for t in _all_tensors(dumped) for e in t.external_data if e.key == "location"}
        for name in files:
            target = Path(name)
            if target.name == name and target.suffix == ".data" and target.is_file():  # a bare file name here
                target.unlink()
        dump.unlink()
    except Exception as exc:  # cleaning up is best effort
        _LOG.debug("could not remove %s: %s", dump, exc)


def static_int8(model: onnx.ModelProto, names: list[str], calib: list[np.ndarray], params: dict,
                progress: Progress, *, nodes_to_quantize: list[str] | None = None,
                exclude: list[str] | None = None, qoperator: bool = False) -> onnx.ModelProto:
    """``quantize_static`` in QDQ format (QOperator with ``qoperator``), calibrated on ``calib``
    (arrays in ``names`` order)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    params = TECHNIQUE.defaults("static-int8") | params  # direct callers may give only some
    if params["activation_type"] == "int8" and params["weight_type"] == "uint8":
        raise TugboatError("static int8 with activation_type int8 needs weight_type int8 (ONNX "
                           "Runtime has no kernels for int8 activations with uint8 weights)")
    calibration = params["calibration"]
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[
        "percentile" if calibration == "auto" else calibration]
    extra: dict[str, Any] = {"CalibMaxIntermediateOutputs": 64}
    if params["per_channel"] and params["weight_type"] == "int8" and not qoperator:
        # (ONNX Runtime's QOperator quantizer takes no per-tensor overrides of per-channel weights)
        extra["TensorQuantOverrides"] = one_scale_layers(model)
    if method == CalibrationMethod.Percentile:
        extra["CalibPercentile"] = 99.999  # ONNX Runtime's own default
    with _tmp() as tmp:
        out = Path(tmp) / "q.onnx"
        with _quiet(), _histogram_errors(calibration):
            quantize_static(
                # a copy: ORT may move the tensors of the model it is given to external data
                _copy(model), str(out), _calibration_reader(names, calib, progress, fixed_batch(model)),
                quant_format=QuantFormat.QOperator if qoperator else QuantFormat.QDQ,
                op_types_to_quantize=params["op_types"] or None,
                per_channel=params["per_channel"],
                activation_type=_quant_type(params["activation_type"]),
                weight_type=_quant_type(params["weight_type"]),
                nodes_to_quantize=nodes_to_quantize, nodes_to_exclude=exclude or None,
                calibrate_method=method, extra_options=extra,
                reduce_range=_reduce_range(params["reduce_range"]),
                calibration_cache_path=None,
            )
        return onnx.load(str(out))


# A per-channel weight costs 13 bytes a channel in a QDQ graph besides its int8 weights (a float
# scale, an int8 zero point, and its bias as int32 with a float scale of its own): on a convolution
# with few weights per output channel (a depthwise 3x3 has 9) that is more than the weights. Where
# one scale for the whole tensor loses little, it gets one scale.
ONE_SCALE_MAX_WEIGHTS = 128  # weights per output channel: below it the bookkeeping is >= 10 %
# worst channel's relative rounding error with one scale for all: per-channel int8 rounds a 3x3
# channel to about 0.5 %; at 0.1, EfficientNet-Lite0's stem and first depthwise convolution (its
# two most sensitive layers) took one scale and the output cosine fell from 0.9925 to 0.9902
ONE_SCALE_MAX_ERROR = 0.02


def one_scale_layers(model: onnx.ModelProto) -> dict[str, list[dict[str, Any]]]:
    """ONNX Runtime ``TensorQuantOverrides`` giving one (symmetric) scale to the weights of
    convolutions with few weights per output channel whose channels all keep their precision with
    it: every channel's relative rounding error at most ``ONE_SCALE_MAX_ERROR``. The others stay
    per-channel (depthwise convolutions with batch-norm folded in usually do: their channels'
    ranges differ by 10x and more)."""
    inits = {i.name: i for i in model.graph.initializer}
    users: dict[str, set[str]] = {}
    for node in model.graph.node:
        for i in node.input:
            users.setdefault(i, set()).add(node.op_type)
    out: dict[str, list[dict[str, Any]]] = {}
    for node in model.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in inits \
                or users[node.input[1]] != {"Conv"}:
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        rows = w.reshape(w.shape[0], -1)
        if rows.shape[1] > ONE_SCALE_MAX_WEIGHTS or not np.abs(rows).max() > 0:
            continue
        scale = np.abs(rows).max() / 127.0
        err = np.linalg.norm(np.clip(np.round(rows / scale), -127, 127) * scale - rows, axis=1)
        if np.all(err <= ONE_SCALE_MAX_ERROR * np.linalg.norm(rows, axis=1)):
            out[node.input[1]] = [{"symmetric": True}]
    return out


@contextlib.contextmanager
def _histogram_errors(calibration: str):
    """ONNX Runtime's histogram calibrators fail with numpy's words on activations whose range is
    astronomically wide (an attention mask's most negative float): say what it means."""
    try:
        yield
    except ValueError as exc:
        if "has not been collected" in str(exc):  # ORT's calibrator saw no activation to quantize
            raise TugboatError("static int8 found no activation to calibrate: no operator it quantizes "
                               "runs in the main graph (operators inside If/Loop/Scan bodies are not "
                               "entered); use method = \"dynamic-int8\"") from None
        if "bins" not in str(exc) or calibration not in ("entropy", "percentile"):
            raise
        raise TugboatError(f"{calibration} calibration failed: an activation's range is too wide for "
                           f"its histogram ({str(exc)[:80]}); use calibration = \"minmax\", or "
                           f"method = \"auto\" / \"dynamic-int8\" for transformers") from None


def dynamic_int8(model: onnx.ModelProto, params: dict, exclude: list[str]) -> onnx.ModelProto:
    """``quantize_dynamic``, inside If/Loop/Scan bodies too; per-channel weights for convolutions."""
    from onnxruntime.quantization import quantize_dynamic

    params = TECHNIQUE.defaults("dynamic-int8") | params  # direct callers may give only some
    subgraphs = any(True for n in model.graph.node for _ in node_subgraphs(n))
    names = {i.name for i in model.graph.input} | {o for n in model.graph.node for o in n.output}
    if subgraphs or any(t.name in names for t in model.graph.initializer):
        # sibling branches may both hold a "weight": find each one's own (renamed in a copy; else
        # the quantizer copies the graph itself: a 90 MB copy less)
        model = _copy(model)
        unique_initializer_names(model)
    with _tmp() as tmp:
        out = Path(tmp) / "q.onnx"
        with _quiet():
            quantize_dynamic(model, str(out), op_types_to_quantize=params["op_types"] or None,
                             per_channel=params["per_channel"],
                             weight_type=_quant_type(params["weight_type"]),
                             nodes_to_exclude=exclude or None,
                             # weights inside subgraphs (Silero VAD's are all in the If branches)
                             extra_options={"EnableSubgraph": True} if subgraphs else None)
        q = onnx.load(str(out))
    if params["per_channel"] and params["weight_type"] == "int8":
        per_channel_conv_integer(q, model)
    return q


def per_channel_conv_integer(q: onnx.ModelProto, source: onnx.ModelProto) -> int:
    """Give the weights of dynamic int8's ``ConvInteger`` nodes one symmetric scale per output
    channel, in place; returns how many. ONNX Runtime's dynamic quantizer gives a convolution one
    scale for the whole weight whatever ``per_channel`` says, and a convolution whose channels'
    ranges differ by 100x (re-parameterised or batch-norm-folded kernels: Silero VAD's encoder)
    then loses its small channels: cosine 0.50 instead of 0.89 there. With zero points all 0 the
    int32 sums stay exact per channel and the float rescale after the ``ConvInteger`` (a ``Mul`` by
    activation scale x weight scale) broadcasts the per-channel scale over the output."""
    floats: dict[str, list[onnx.TensorProto]] = {}
    for g in graphs(source.graph):
        for t in g.initializer:
            floats.setdefault(t.name, []).append(t)
    done = 0
    for g in graphs(q.graph):
        inits = {t.name: t for t in g.initializer}
        for node in g.node:
            if node.op_type != "ConvInteger" or len(node.input) < 4 \
                    or not node.input[1].endswith("_quantized"):
                continue
            src = node.input[1][:-len("_quantized")]
            parts = [inits.get(node.input[1]), inits.get(node.input[3]), inits.get(f"{src}_scale")]
            if len(floats.get(src, ())) != 1 or any(p is None for p in parts) \
                    or parts[0].data_type != onnx.TensorProto.INT8:
                continue
            w = numpy_helper.to_array(floats[src][0])
            qw, scale = quantize_tensor(w, 0)
            parts[0].CopyFrom(numpy_helper.from_array(qw, parts[0].name))
            parts[1].CopyFrom(numpy_helper.from_array(np.array(0, np.int8), parts[1].name))
            parts[2].CopyFrom(numpy_helper.from_array(scale.reshape([-1] + [1] * (w.ndim - 2)), parts[2].name))
            done += 1
    return done


def weight_only(model: onnx.ModelProto, bits: int, params: dict, exclude: list[str]) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    params = TECHNIQUE.defaults(f"weight-only-int{bits}") | params  # direct callers may give only some
    block = params["block_size"]
    if block & (block - 1):
        raise TugboatError(f"'block_size' must be a power of two (16, 32, 64, ...), got {block}")
    cfg = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=params["symmetric"],
                                       bits=bits, op_types_to_quantize=("MatMul",))
    quant = MatMulNBitsQuantizer(_copy(model), bits=bits, block_size=block,
                                 is_symmetric=params["symmetric"],
                                 nodes_to_exclude=exclude or [], algo_config=cfg)
    with _quiet():
        quant.process()
    return quant.model.model


def fp16(model: onnx.ModelProto, params: dict, exclude: list[str]) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    params = TECHNIQUE.defaults("fp16") | params  # direct callers may give only some
    model = _copy(model)
    unique_initializer_names(model)  # the converter keys initializers by name over every subgraph
    with _quiet():
        half = convert_float_to_float16(model, keep_io_types=params["keep_io_float32"],
                                        node_block_list=exclude or None)
    return toposort(half)


# --- evaluation and sensitivity ------------------------------------------------------------------

def _eval_split(data: Dataset) -> str:
    for split in ("val", "calib", "test"):
        if len(data.splits.get(split, ())):
            return split
    raise DataError("has no samples to measure quantization error on", path=data.ref)


def _evaluate(model: onnx.ModelProto, xs: list[np.ndarray], labels, reference: np.ndarray,
              threads: int = 1) -> dict[str, float]:
    """Accuracy (top-1 agreement with the float model without labels) and output error."""
    sess = ort_session(model, threads)
    outs = [run_onnx(None, [x[i : i + 256] for x in xs], session=sess)[0] for i in
            range(0, len(xs[0]), 256)]
    y = np.concatenate(outs).reshape(len(reference), -1).astype(np.float64)
    y0 = reference.reshape(len(reference), -1).astype(np.float64)
    target = labels if labels is not None else y0.argmax(1)
    rel = float(np.linalg.norm(y - y0) / max(np.linalg.norm(y0), 1e-12))
    return {"accuracy": float(np.mean(y.argmax(1) == target)), "rel_error": rel}


def layer_sensitivity(handle: ModelHandle, data: Dataset, params: dict[str, Any] | None = None,
                      progress: Progress | None = None, *, model: onnx.ModelProto | None = None
                      ) -> list[dict[str, Any]]:
    """Per-layer quantization sensitivity: each layer quantized alone (static int8 with
    ``params``), its accuracy and output error on the val split against the float model.

    Rows, most sensitive first: ``{"node", "layer", "op_type", "accuracy", "accuracy_drop",
    "rel_error"}``. The GUI charts these; ``max_accuracy_drop`` uses them to pick layers to keep."""
    progress = progress or null_progress()
    params = TECHNIQUE.defaults("static-int8") | dict(params or {})
    float_model = model if model is not None else handle.to_onnx()
    split = _eval_split(data)
    xs_d, labels = data.split(split)
    xs = [xs_d[n] for n in handle.input_names]
    calib = _calib_arrays(data, handle, params["calibration_samples"], "static-int8")
    with _tmp() as tmp:
        prepared = _prepared(float_model, Path(tmp))
    reference = run_onnx(prepared, xs)[0]
    base = _evaluate(prepared, xs, labels, reference)
    op_types = params["op_types"] or ["Conv", "Gemm", "MatMul"]
    candidates = [n for n in weight_nodes(prepared, tuple(op_types)) if n.name]
    rows = []
    for i, node in enumerate(candidates):
        sub = progress.sub(i / max(1, len(candidates)), (i + 1) / max(1, len(candidates)),
                           f"layer {i + 1}/{len(candidates)} ({layer_of(node.name)}): ")
        q = static_int8(prepared, handle.input_names, calib, params, sub, nodes_to_quantize=[node.name])
        m = _evaluate(q, xs, labels, reference)
        rows.append({"node": node.name, "layer": layer_of(node.name), "op_type": node.op_type,
                     "accuracy": m["accuracy"], "accuracy_drop": base["accuracy"] - m["accuracy"],
                     "rel_error": m["rel_error"], "split": split})
    rows.sort(key=lambda r: (r["accuracy_drop"], r["rel_error"]), reverse=True)
    return rows


def _accuracy_aware(handle: ModelHandle, float_model: onnx.ModelProto, calib, data: Dataset,
                    params: dict, exclude: list[str], progress: Progress
                    ) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Static int8, then keep the most sensitive layers in float until the val accuracy drop is
    within ``max_accuracy_drop`` (or every candidate is kept)."""
    tol = params["max_accuracy_drop"]
    split = _eval_split(data)
    xs_d, labels = data.split(split)
    xs = [xs_d[n] for n in handle.input_names]
    reference = run_onnx(float_model, xs)[0]
    base = _evaluate(float_model, xs, labels, reference)
    q = static_int8(float_model, handle.input_names, calib, params, progress.sub(0.0, 0.15, "all layers: "),
                    exclude=exclude)
    first = _evaluate(q, xs, labels, reference)
    info: dict[str, Any] = {"tolerance": tol, "split": split, "float_accuracy": base["accuracy"],
                            "int8_accuracy": first["accuracy"], "kept_float": [], "sensitivity": []}
    if base["accuracy"] - first["accuracy"] <= tol:
        info["final_accuracy"] = first["accuracy"]
        return q, info
    rows = layer_sensitivity(handle, data, params, progress.sub(0.15, 0.7, "sensitivity: "),
                             model=float_model)
    info["sensitivity"] = rows
    kept: list[str] = []
    current = first
    candidates = [r for r in rows if r["node"] not in exclude]
    for i, row in enumerate(candidates):
        kept.append(row["node"])
        sub = progress.sub(0.7 + 0.3 * i / len(candidates), 0.7 + 0.3 * (i + 1) / len(candidates),
                           f"keeping {len(kept)} layer(s) in float: ")
        q = static_int8(float_model, handle.input_names, calib, params, sub, exclude=exclude + kept)
        current = _evaluate(q, xs, labels, reference)
        if base["accuracy"] - current["accuracy"] <= tol:
            break
    by_node = {r["node"]: r for r in rows}
    info["kept_float"] = [{"node": n, "layer": by_node[n]["layer"],
                           "accuracy_drop_alone": by_node[n]["accuracy_drop"],
                           "rel_error_alone": by_node[n]["rel_error"]} for n in kept]
    info["final_accuracy"] = current["accuracy"]
    info["within_tolerance"] = base["accuracy"] - current["accuracy"] <= tol
    return q, info


# --- fidelity: is the quantized model still the float model? ----------------------------------

_CHECK_ROWS = 512
# a val split under this many rows is too few to decide on (a 32-48 row file gives it 3-5, and one odd
# row decides): the check then also reads every train row the method was not fitted to
# (docs/techniques/quantization.md, "How many rows the check reads")
MIN_CHECK_ROWS = 32


@dataclass
class _CheckSet:
    """Held-out rows (the val split, topped up with train rows the method fits nothing to) and the
    float model's outputs on them."""

    split: str
    xs: list[np.ndarray]
    reference: np.ndarray
    classification: bool
    idx: np.ndarray | None = None  # the data's rows
    where: str = "the val split"  # what the messages say the check read


def check_rows(data: Dataset, method: str, params: dict[str, Any]) -> tuple[str, np.ndarray, int]:
    """(split, row indices, how many of them are train rows) the fidelity check of ``method`` reads:
    the val split (at most 512 rows); below :data:`MIN_CHECK_ROWS` rows, the train rows the method is
    not fitted to join it (every train row for the methods that read no data, those beyond its
    calibration rows for static int8, none for QAT, which trains on them). Test rows never."""
    split = _eval_split(data)
    idx = np.asarray(data.splits[split], np.int64)[:_CHECK_ROWS]
    if len(idx) >= MIN_CHECK_ROWS or split != "val" or method == "qat-int8":
        return split, idx, 0
    fits = method in _STATIC or (method == "weight-only-int8" and params.get("rounding") == "gptq")
    fitted = _calib_rows(data, _samples(params))[0] if fits else ()
    held = {*idx.tolist(), *np.asarray(data.splits.get("test", ()), np.int64).tolist(), *np.asarray(fitted).tolist()}
    extra = [i for i in np.asarray(data.splits.get("train", ()), np.int64).tolist() if i not in held]
    extra = extra[: _CHECK_ROWS - len(idx)]
    return ("val+train" if extra else split), np.concatenate([idx, np.asarray(extra, np.int64)]), len(extra)


def _check_set(handle: ModelHandle, data: Dataset | None, float_model: onnx.ModelProto, method: str,
               params: dict[str, Any], reuse: _CheckSet | None = None) -> _CheckSet | None:
    """The rows :func:`check_rows` picks and the float model's outputs on them (``reuse`` when it
    holds the same rows)."""
    if data is None:
        return None
    try:
        split, idx, extra = check_rows(data, method, params)
    except DataError:
        return None
    if reuse is not None and reuse.idx is not None and np.array_equal(reuse.idx, idx):
        return reuse
    xs = [_in_layout(data.inputs[spec.name][idx], spec) for spec in handle.inputs]
    reference = _run(float_model, xs)
    classification = (handle.task == "classification" and reference.ndim == 2
                      and reference.shape[1] > 1)
    where = f"the val split and {extra} train rows it was not fitted to" if extra else f"the {split} split"
    return _CheckSet(split, xs, reference, classification, idx, where)


def _run(model: onnx.ModelProto, xs: list[np.ndarray], outputs: list[str] | None = None,
         rows: int = _CHECK_ROWS, keep: bool = False) -> Any:
    cols = run_graph(model, xs, outputs, rows, keep=keep)
    return cols if outputs is not None else cols[0]


def fidelity_of(outputs: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Top-1 agreement and mean cosine similarity of ``outputs`` with ``reference`` (row-wise)."""
    y = outputs.reshape(len(outputs), -1).astype(np.float64)
    y0 = reference.reshape(len(reference), -1).astype(np.float64)
    if y.shape[1] == 1:  # one value a sample (a probability, a score): a row's cosine is its sign
        y, y0 = y.T, y0.T
    norms = np.linalg.norm(y, axis=1) * np.linalg.norm(y0, axis=1)
    cos = np.sum(y * y0, axis=1) / np.maximum(norms, 1e-12)
    return {"top1_agreement": float(np.mean(y.argmax(1) == y0.argmax(1))),
            "cosine": float(np.clip(cos.mean(), -1.0, 1.0))}


def _score(q: onnx.ModelProto, check: _CheckSet, keep: bool = False) -> dict[str, Any]:
    """Fidelity of ``q`` on the check split; ``keep``: ``q`` is the final graph (its session is
    kept for the measuring that follows)."""
    f = fidelity_of(_run(q, check.xs, keep=keep), check.reference)
    metric = "top1_agreement" if check.classification else "cosine"
    low = MIN_TOP1_AGREEMENT if check.classification else MIN_COSINE
    return {"split": check.split, "rows": len(check.reference), "where": check.where, "metric": metric,
            "value": f[metric], "threshold": low,
            "top1_agreement": f["top1_agreement"] if check.classification else None,
            "cosine": f["cosine"], "low": f[metric] < low}


def _best_calibration(prepared: onnx.ModelProto, handle: ModelHandle, calib: list[np.ndarray],
                      params: dict, exclude: list[str], check: _CheckSet | None, progress: Progress
                      ) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Static int8 with the asked calibration, or with ``auto``: percentile and minmax both, the
    one closer to the float model on the val split kept (top-1 agreement, then cosine)."""
    asked = params["calibration"]
    methods = ["percentile", "minmax"] if asked == "auto" and check is not None else \
        ["percentile" if asked == "auto" else asked]
    best = None
    tried: dict[str, float | None] = {}
    for i, cal in enumerate(methods):
        sub = progress.sub(i / len(methods), (i + 1) / len(methods), f"{cal} calibration: ")
        try:
            q = static_int8(prepared, handle.input_names, calib, {**params, "calibration": cal}, sub,
                            exclude=exclude)
        except TugboatError:
            if len(methods) == 1 or (best is None and i == len(methods) - 1):
                raise
            tried[cal] = None  # e.g. percentile on an astronomically wide range: the other one
            continue
        if len(methods) == 1:
            return q, {"method": cal, "asked": asked}
        score = _score(q, check)
        tried[cal] = score["value"]
        key = (score["value"], score["cosine"])  # ties in top-1 agreement: the closer outputs
        if best is None or key > best[0]:
            best = (key, cal, q)
    assert best is not None
    return best[2], {"method": best[1], "asked": asked, "tried": tried,
                     "metric": "top1_agreement" if check.classification else "cosine",
                     "split": check.split}


def _nodes_for(model: onnx.ModelProto, layers: list[str]) -> list[str]:
    """Node names of ``model`` for layer or node names (unknown ones skipped)."""
    out: list[str] = []
    for name in layers:
        out += [n.name for n in graph_nodes(model.graph)
                if n.name and (n.name == name or layer_of(n.name) == name)]
    return out


def error_by_layer(float_model: onnx.ModelProto, q: onnx.ModelProto, xs: list[np.ndarray],
                   rows: int = 64) -> list[dict[str, Any]]:
    """How much output error each node of the float graph adds in ``q``: the relative error of
    its output against the float model minus the largest relative error of its inputs, on
    ``rows`` samples, largest first. One run of each model with the tensors exposed as outputs.

    Rows: ``{"node", "layer", "name", "op_type", "error_in", "error_out", "added_error", "weighted"}``, where
    ``name`` is what ``exclude`` takes: the torch layer for nodes with weights, else the node."""
    inits = {i.name: i for i in float_model.graph.initializer}
    q_tensors = {o for n in q.graph.node for o in n.output} | {i.name for i in q.graph.input}
    f_types = {v.name: v.type.tensor_type.elem_type for v in
               [*float_model.graph.value_info, *float_model.graph.output, *float_model.graph.input]}
    nodes = []
    for node in float_model.graph.node:
        if not node.name or not node.output or node.output[0] not in q_tensors \
                or any(True for _ in node_subgraphs(node)):  # an If is no layer to keep in float
            continue
        if f_types.get(node.output[0], onnx.TensorProto.FLOAT) != onnx.TensorProto.FLOAT:
            continue
        ins = [i for i in node.input if i and i not in inits and i in q_tensors
               and f_types.get(i, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT]
        nodes.append((node, ins, node.output[0]))
    if not nodes:
        return []
    wanted = sorted({t for _, ins, out in nodes for t in (*ins, out)})
    small = [_ModelLayout(x.array[:rows], x.spec) if isinstance(x, _ModelLayout) else x[:rows] for x in xs]

    def expose(model):
        m = _copy(model)
        have = {o.name for o in m.graph.output}
        for t in wanted:
            if t not in have:
                m.graph.output.append(helper.make_empty_tensor_value_info(t))
        return m

    try:
        f_out = dict(zip(wanted, _run(expose(float_model), small, wanted)))
        q_out = dict(zip(wanted, _run(expose(q), small, wanted)))
    except Exception as exc:  # a graph ORT will not run with extra outputs: no ranking
        _LOG.debug("per-layer error skipped: %s", exc)
        return []

    @functools.cache
    def rel(t: str) -> float:
        a, b = np.asarray(q_out[t], np.float64), np.asarray(f_out[t], np.float64)
        if a.shape != b.shape or b.dtype.kind != "f":
            return 0.0
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))

    out = []
    for n, ins, o in nodes:
        before = max((rel(i) for i in ins), default=0.0)
        weighted = _weight_input(n, inits) is not None
        out.append({"node": n.name, "layer": layer_of(n.name), "op_type": n.op_type,
                    "name": layer_of(n.name) if weighted else n.name, "weighted": weighted,
                    "error_in": before, "error_out": rel(o), "added_error": rel(o) - before})
    out.sort(key=lambda r: r["added_error"], reverse=True)
    return out


def _neighbourhood(model: onnx.ModelProto, ranking: list[dict[str, Any]], count: int) -> list[str]:
    """``exclude`` names for the ``count`` nodes that add the most error, with the nodes on both
    sides of their input tensors: a tensor stays quantized while any node next to it is."""
    worst = {r["node"] for r in ranking[:count]
             if (severity(r) < 100.0 if "impact" in r else r["added_error"] > 0)}
    if not worst:
        return []
    producers = {o: n.name for n in model.graph.node for o in n.output}
    consumers: dict[str, list[str]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n.name)
    around = set(worst)
    for n in model.graph.node:
        if n.name in worst:
            for i in n.input:
                around.update(filter(None, [producers.get(i), *consumers.get(i, [])]))
    name_of = {r["node"]: r["name"] for r in ranking}
    return list(dict.fromkeys(name_of[r["node"]] for r in ranking if r["node"] in around))


# the per-layer ranking, and then wider trials, stop once each has taken this long (a large model
# has a hundred layers to run alone and its quantization takes a minute on a small machine; the
# advice quotes the best trial so far)
_ADVICE_SECONDS = 60.0
_RANK_ROWS = 32  # samples for the per-layer ranking (one ONNX Runtime session per layer)


def _ranking(float_model: onnx.ModelProto, q: onnx.ModelProto, check: _CheckSet) -> list[dict[str, Any]]:
    """Layers worst first. A QDQ graph (static int8, QDQ format): the Diagnose view's ranking
    (:func:`tugboat.engine.techniques.quant_error.rank_layers`: the output error with only that layer
    quantized), so the advice names the layer the Diagnose view puts first. Graphs the quantizer
    rewrote (dynamic int8, weight-only, fp16, QOperator): the error each node adds (:func:`error_by_layer`)."""
    xs = [x[:_RANK_ROWS] for x in check.xs]
    ops = {n.op_type for n in q.graph.node}
    if not any(isinstance(x, _ModelLayout) for x in check.xs) and "DequantizeLinear" in ops \
            and not ops & {"MatMulInteger", "ConvInteger", "MatMulNBits", "QLinearConv", "QLinearMatMul"}:
        try:
            ranked = rank_layers(float_model, q, xs, budget_s=_ADVICE_SECONDS)
        except Cancelled:
            raise
        except Exception as exc:  # the advice is best effort
            _LOG.debug("per-layer ranking failed: %s", exc)
            ranked = []
        if ranked:
            return ranked
    return error_by_layer(float_model, q, check.xs)


def _weight_only_ranking(rows: list[dict[str, Any]], check: _CheckSet, redo) -> list[dict[str, Any]]:
    """The layers with weights, most harmful first, each measured with only its weights int8 (the
    others float) on the check rows: the error a layer adds at its own output says little when a
    later layer amplifies it (a weight-only graph's activations are float, so what counts is how far
    the final output moves). Stops after ``_ADVICE_SECONDS``; layers not measured by then follow in
    their first order."""
    names = list(dict.fromkeys(r["name"] for r in rows))
    firsts = {r["name"]: r for r in reversed(rows)}
    started, out = time.perf_counter(), []
    for name in names:
        if time.perf_counter() - started > _ADVICE_SECONDS:
            break
        try:
            alone = _score(redo([n for n in names if n != name]), check)
        except Cancelled:
            raise
        except Exception as exc:  # the advice is best effort
            _LOG.debug("weight-only ranking: %s alone failed: %s", name, exc)
            continue
        out.append({**firsts[name], "alone": alone["value"], "added_error": 1.0 - alone["cosine"]})
    out.sort(key=lambda r: (r["alone"], -r["added_error"]))
    done = {r["name"] for r in out}
    return out + [firsts[n] for n in names if n not in done]


def _fidelity_check(q: onnx.ModelProto, float_model: onnx.ModelProto, check: _CheckSet, method: str,
                    info: dict[str, Any], warn: list[str], redo, int8_nodes: dict[str, int] | None = None,
                    progress: Progress | None = None) -> None:
    """Measure fidelity on the check rows; when it is low, say so, find the layers that add the
    most error, try keeping them in float, and offer what worked (``exclude`` / accuracy-aware)."""
    score = _score(q, check, keep=True)  # q is final: measuring runs it next in the same session
    info["fidelity_check"] = {k: score[k] for k in ("split", "rows", "metric", "value", "threshold",
                                                     "top1_agreement", "cosine")}
    if not score["low"]:
        return
    what = "top-1 agreement" if score["metric"] == "top1_agreement" else "cosine similarity"
    msg = (f"low fidelity: {what} with the float model is {score['value']:.3f} on "
           f"{check.where} (below {score['threshold']:g})")
    found = fewest_float(q, check, redo, int8_nodes, progress or null_progress()) \
        if method in _WEIGHT_ONLY and redo is not None and int8_nodes else None
    if found is not None:  # the fewest layers with weights kept float that pass, most harmful first
        kept, _, after, losses = found
        ranking = [{"node": n, "layer": layer_of(n), "name": layer_of(n), "weighted": True, "loss_alone": v}
                   for n, v in losses]
        best = (after["value"], list(dict.fromkeys(layer_of(n) for n in kept)))
        which = "whose int8 weights cost the most"
    else:
        which = "around those that add the most error"
        ranking = _ranking(float_model, q, check)
        if method in _WEIGHT_ONLY and redo is not None:  # activations are float: only layers with weights count
            ranking = _weight_only_ranking([r for r in ranking if r.get("weighted")], check, redo)
        best = _widening_trials(float_model, ranking, method, check, redo)
    advice = []
    if best is not None:
        value, names = best
        info["fidelity_check"]["suggested_exclude"] = names
        info["fidelity_check"]["with_suggested_exclude"] = value
        listed = ", ".join(f'"{w}"' for w in names)
        gain = "" if value > score["value"] else " (no better: the loss is spread out)"
        advice.append(f"keeping {len(names)} layer(s) or node(s) {which} in float gives "
                      f"{value:.3f}{gain}: exclude = [{listed}]")
    if method in _STATIC:
        advice.append("max_accuracy_drop = 0.01 searches for the fewest layers to keep in float")
        advice.append("dynamic-int8 (what method \"auto\" picks for transformers) keeps "
                      "activations in float")
    elif method == "dynamic-int8":
        advice.append("weight-only-int8 (int8 weights, float activations) or fp16 keep activations "
                      "and compute in float")
    info["fidelity_check"]["ranking"] = ranking[:10]
    warn.append(msg + ("; " + "; ".join(advice) if advice else ""))


def _widening_trials(float_model: onnx.ModelProto, ranking: list[dict[str, Any]], method: str, check: _CheckSet,
                     redo) -> tuple[float, list[str]] | None:
    """(best fidelity, names kept float) of trials keeping the 3, 6, then 12 worst layers (with their
    neighbourhood for int8 activations) in float, until one passes or a minute has gone."""
    best = None
    started = time.perf_counter()
    for count in (3, 6, 12):  # widen until fidelity is back (each try is one quantization)
        names = _neighbourhood(float_model, ranking, count) if method not in _WEIGHT_ONLY \
            else [r["name"] for r in ranking[:count]]
        if not names or redo is None or (best and names == best[1]) \
                or time.perf_counter() - started > _ADVICE_SECONDS:
            break
        try:
            trial = _score(redo(names), check)
        except Cancelled:
            raise
        except Exception as exc:  # the advice is best effort; the variant stands
            _LOG.debug("re-quantizing without %s failed: %s", names, exc)
            break
        if best is None or trial["value"] > best[0]:
            best = (trial["value"], names)
        if not trial["low"]:
            break
    return best


# --- keeping the few most sensitive layers in float ----------------------------------------------

# weight-only int8 keeps its most sensitive layers float32 only while the variant stays at most this
# much larger than with every weight int8 (a weight kept float costs 3 more bytes: about 3 % of the
# weights at most); beyond it, it is no longer the ~4x smaller int8 file the method is about
KEEP_FLOAT_BUDGET = 0.10
_HARD_ROWS = 8  # the search runs layer groups on the check rows the all-int8 variant misses most
_SEARCH_SHARE = 0.1  # a group of layers is split further while it costs this share of the loss or more


def _keep_sensitive_float(job: _Job, q: onnx.ModelProto, score: dict[str, Any]
                          ) -> tuple[onnx.ModelProto, dict[str, Any]] | None:
    """Weight-only int8 below its check, under method auto: the variant with the fewest layers kept
    float that passes the check (:func:`fewest_float`), its score, and what was kept recorded in
    ``job.info`` (``kept_float``, ``sensitive_float``) and said in ``job.warn``. None where there is no
    such set, and where the user gave ``exclude`` (their choice of float layers wins)."""
    if job.method != "weight-only-int8" or job.params["exclude"] or not job.int8_nodes or job.redo is None:
        return None
    job.progress.update(0.9, "looking for the layers int8 weights hurt most")
    found = fewest_float(q, job.check, job.redo, job.int8_nodes, job.progress)
    if found is None:
        job.int8_nodes = None  # searched: the advice need not search again
        return None
    kept, trial, after, losses = found
    names = list(dict.fromkeys(layer_of(n) for n in kept))
    share = sum(job.int8_nodes[n] for n in kept) / max(1, sum(job.int8_nodes.values()))
    grow = len(trial.SerializeToString()) / len(q.SerializeToString()) - 1.0
    job.info["kept_float"] = names
    job.info["sensitive_float"] = {
        "layers": names, "nodes": kept, "weights_share": share, "larger_by": grow, "budget": KEEP_FLOAT_BUDGET,
        "metric": score["metric"], "before": score["value"], "after": after["value"], "rows": after["rows"],
        "loss_alone": {layer_of(n): v for n, v in losses[:10]}}
    job.info["float_layers"] = list(dict.fromkeys([*job.info.get("float_layers", []), *names]))
    job.exclude = [*job.exclude, *kept]
    what = "top-1 agreement" if score["metric"] == "top1_agreement" else "cosine"
    job.warn.append(f"method auto: {job.method} kept {what} {score['value']:.3f} on {score['where']} (below "
                    f"{score['threshold']:g}); its most sensitive layer(s) kept in float, {', '.join(names)} "
                    f"({100 * share:.2g} % of the weights, the file {100 * grow:.2g} % larger), give "
                    f"{after['value']:.3f}")
    return trial, after


def fewest_float(q: onnx.ModelProto, check: _CheckSet, redo, sizes: dict[str, int], progress: Progress):
    """``(nodes kept float, the graph, its score, [(node, loss alone)...])`` for the fewest of the layers
    ``sizes`` names (node -> int8 weight elements) that, kept float in ``redo(nodes)``, bring ``q``
    back over the check's threshold, while the float weights cost at most :data:`KEEP_FLOAT_BUDGET`
    of ``q``'s bytes; None when no such set is found (or keeping every one float would not pass
    either: then the loss is not in the weights). Layers are tried most harmful first."""
    started = time.perf_counter()
    budget = KEEP_FLOAT_BUDGET * len(q.SerializeToString())
    nodes = list(sizes)

    def cost(names) -> int:
        return 3 * sum(sizes[n] for n in names)

    if _score(redo(nodes), check)["low"]:
        return None
    losses = _sensitive_layers(nodes, q, _hard_rows(q, check), redo,
                               lambda group: min(cost([n]) for n in group) <= budget, progress)
    kept: list[str] = []
    for node, _ in losses:
        if cost([*kept, node]) > budget or time.perf_counter() - started > 2 * _ADVICE_SECONDS:
            continue
        kept.append(node)
        progress.check()
        trial = redo(kept)
        after = _score(trial, check)
        if not after["low"]:
            return kept, trial, after, losses
    return None


def _sensitive_layers(nodes: list[str], q: onnx.ModelProto, hard: _CheckSet, redo, affordable,
                      progress: Progress) -> list[tuple[str, float]]:
    """The layers whose int8 weights cost the most, most harmful first: ``[(node, loss)]``, where loss
    is 1 - cosine on ``hard``'s rows with only that layer's weights int8. Found by halving: the small,
    independent errors of int8 weights add up over layers (1 - cosine grows with the squared error),
    so a group of layers (in graph order) is split in two while it costs at least
    :data:`_SEARCH_SHARE` of the whole loss: a couple of runs per halving towards each sensitive layer
    (10 runs for the OCR recogniser's one bad convolution among 47) instead of one per layer. Groups
    with no layer ``affordable`` to keep float are not searched; it stops after ``_ADVICE_SECONDS``."""
    started = time.perf_counter()

    def loss(group: list[str]) -> float:
        progress.check()
        keep = set(group)
        out = _run(redo([n for n in nodes if n not in keep]), hard.xs)
        return 1.0 - fidelity_of(out, hard.reference)["cosine"]

    total = 1.0 - fidelity_of(_run(q, hard.xs), hard.reference)["cosine"]
    todo, found = [(nodes, total)], []
    while todo and time.perf_counter() - started < _ADVICE_SECONDS:
        group, value = todo.pop(0)
        if len(group) == 1:
            found.append((group[0], value))
            continue
        for part in (group[: len(group) // 2], group[len(group) // 2:]):
            if affordable(part):
                v = loss(part)
                if v >= _SEARCH_SHARE * total:
                    todo.append((part, v))
        todo.sort(key=lambda t: -t[1])
    return sorted(found, key=lambda t: -t[1])


def _hard_rows(q: onnx.ModelProto, check: _CheckSet) -> _CheckSet:
    """The :data:`_HARD_ROWS` rows of ``check`` where ``q`` is furthest from the float model (per-row
    1 - cosine; absolute difference for one value a row)."""
    n = len(check.reference)
    if n <= _HARD_ROWS:
        return check
    y = np.asarray(_run(q, check.xs), np.float64).reshape(n, -1)
    y0 = np.asarray(check.reference, np.float64).reshape(n, -1)
    if y.shape[1] == 1:
        err = np.abs(y - y0)[:, 0]
    else:
        err = 1.0 - np.sum(y * y0, 1) / np.maximum(np.linalg.norm(y, axis=1) * np.linalg.norm(y0, axis=1), 1e-12)
    idx = np.sort(np.argsort(-err, kind="stable")[:_HARD_ROWS])
    xs = [_ModelLayout(x.array[idx], x.spec) if isinstance(x, _ModelLayout) else x[idx] for x in check.xs]
    return dataclasses.replace(check, xs=xs, reference=check.reference[idx], idx=None)


# --- quantization-aware training ---------------------------------------------------------------

def _qat_train(handle: ModelHandle, data: Dataset, params: dict, progress: Progress):
    """Fine-tune a copy of the torch module with fake-quantized weights and layer inputs; return it
    as a plain float module (the trained latent weights), ready for ORT static int8. The training
    (the shared loop, on the step's ``device``) is :func:`tugboat.engine.techniques.qat.train_qat`."""
    if data is None:
        raise DataError("quantize qat-int8 fine-tunes on data; give a dataset (recipe 'data = ...')")
    from .qat import train_qat  # lazy: torch (and torchao's observers) only when QAT runs

    params = TECHNIQUE.complete({**params, "method": "qat-int8"})  # direct callers may give only some
    return train_qat(handle, data, params, progress, split=_eval_split(data))


# --- torch-side dynamic int8 -------------------------------------------------------------------

def torch_dynamic_int8(module, exclude: list[str]):
    """``torch.ao.quantization.quantize_dynamic`` on Linear layers (minus ``exclude``).

    Still torch.ao (its deprecation warning silenced): torchao's replacement
    (``quantize_(Int8DynamicActivationInt8WeightConfig())``) runs 8x slower than float in torch
    eager on this CPU (it is fast only under ``torch.compile``) and its tensor subclasses cannot be
    saved as TorchScript, so it does not cover what this method promises (docs/targets/torch.md)."""
    import torch
    from torch import nn

    spec = {name for name, m in module.named_modules() if isinstance(m, nn.Linear)
            and name not in exclude}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(module).eval(), spec,
                                                      dtype=torch.qint8)


# --- the technique -----------------------------------------------------------------------------

def _count(model: onnx.ModelProto, ops: tuple[str, ...]) -> int:
    """Nodes of ``ops`` in the graph and its subgraphs (If branches, Loop and Scan bodies)."""
    return sum(1 for n in graph_nodes(model.graph) if n.op_type in ops)


@dataclass
class _Job:
    """One quantize step on its way: the graphs, the layers kept in float, and what it reports."""

    handle: ModelHandle
    data: Dataset | None
    params: dict[str, Any]
    method: str
    float_model: onnx.ModelProto  # the float graph the quantized one is checked against
    progress: Progress
    info: dict[str, Any]
    warn: list[str]
    work: onnx.ModelProto | None = None  # the graph given to the quantizer (names kept by compact())
    exclude: list[str] | None = None  # node names kept in float, resolved once on ``work``
    check: _CheckSet | None = None
    redo: Any = None  # redo(extra layers kept float) -> quantized graph: to try the low-fidelity advice
    module_out: Any = None  # a torch module beside the graph (dynamic int8 for torch)
    reference: onnx.ModelProto | None = None  # the float graph the check's reference outputs come from
    int8_nodes: dict[str, int] | None = None  # weight-only: node -> int8 weight elements it reads
    rounded: Any = None  # gptq.Rounded: the weights of ``work`` GPTQ put on the int8 grid
    qmax: int = 127  # the grid ``rounded`` is on
    calib: tuple[list, list[str]] | None = None  # (calibration arrays, notes): see _calibration


def apply(handle: ModelHandle, params: dict[str, Any], data: Dataset | None,
          progress: Progress) -> ModelHandle:
    params = TECHNIQUE.complete(params)  # a validated step's, or a direct caller's partial ones
    step = {"technique": "quantize", **params}
    job = _Job(handle, data, params, params["method"], None, progress, {"method": params["method"]}, [])
    progress.update(0.0, "exporting the float graph")
    source = handle
    if job.method == "qat-int8":
        trained, job.info["qat"] = _qat_train(handle, data, params, progress.sub(0.0, 0.7, "QAT: "))
        source = handle.derive(module=trained, onnx_model=None)
        job.float_model = source.to_onnx()
        job.progress = progress.sub(0.7, 1.0)
    else:
        job.float_model = handle.to_onnx()
    _prepare_graphs(job)
    before = (dict(job.info), list(job.warn))  # what a method auto falls back to starts from
    q = _runner(job.method)(job)
    job, q = _auto_fallback(job, q, *before)
    return _finish(job, q, source, step)


def _runner(method: str):
    return {"static-int8": _quantize_static, "qat-int8": _quantize_static, "dynamic-int8": _quantize_dynamic,
            "weight-only-int8": _quantize_weight_only, "weight-only-int4": _quantize_weight_only,
            "fp16": _quantize_fp16}[method]


def _auto_fallback(job: _Job, q: onnx.ModelProto, info: dict[str, Any], warn: list[str]
                   ) -> tuple[_Job, onnx.ModelProto]:
    """Method ``auto`` only: when the int8 method it chose falls below the fidelity threshold, first
    (weight-only int8) keep its few most sensitive layers in float (:func:`_keep_sensitive_float`),
    then try the other int8 way that keeps activations float (weight-only int8, with its sensitive
    layers float if need be, after static or dynamic int8; dynamic int8 on MatMul/Gather/LSTM weights
    after weight-only int8), used only if it passes its check. Where the first choice passes, nothing
    changes; where nothing passes, the first choice stays, with its warning."""
    if "auto" not in job.info or job.check is None or job.method not in ("static-int8", "dynamic-int8",
                                                                          "weight-only-int8"):
        return job, q
    first = _score(q, job.check)
    if not first["low"]:
        return job, q
    rescued = _keep_sensitive_float(job, q, first)
    if rescued is not None:
        return job, rescued[0]
    alt = _alternative(job, info, warn)
    try:
        q2 = _runner(alt.method)(alt)
        second = _score(q2, alt.check)
        rescued = _keep_sensitive_float(alt, q2, second) if second["low"] else None
        if rescued is not None:
            q2, second = rescued
    except Cancelled:
        raise
    except Exception as exc:  # the fallback is best effort: the first choice stands
        _LOG.debug("auto: %s failed: %s", alt.method, exc)
        return job, q
    job.info["auto"]["tried"] = {alt.method: second["value"]}
    if second["low"]:
        return job, q
    metric = "top-1 agreement" if first["metric"] == "top1_agreement" else "cosine"
    alt.info["auto"] = {"method": alt.method, "instead_of": job.method, "first_choice_fidelity": first["value"],
                        "why": f"{alt.info['auto']['why']}; but it fell below the fidelity threshold, and "
                               f"{alt.method} did not"}
    slow = ", at about the float model's speed" if alt.method == "weight-only-int8" else ""
    alt.warn.append(f"method auto: {job.method} kept {metric} {first['value']:.3f} on {first['where']} "
                    f"(below {first['threshold']:g}); {alt.method} keeps {second['value']:.3f} on "
                    f"{second['where']} and is used instead{slow}")
    return alt, q2


def _alternative(job: _Job, info: dict[str, Any], warn: list[str]) -> _Job:
    """The job :func:`_auto_fallback` tries: same float graph, data and check, the other method."""
    method = "dynamic-int8" if job.method == "weight-only-int8" else "weight-only-int8"
    params = TECHNIQUE.defaults(method) | job.params
    if method == "dynamic-int8":
        params["op_types"] = list(params["op_types"] or _AUTO_DYNAMIC_OPS)
    work = gemm_to_matmul(job.float_model) if method == "dynamic-int8" else job.float_model
    names = params["exclude"]
    alt = dataclasses.replace(job, params=params, method=method, info=dict(info, auto=dict(info["auto"])),
                              warn=list(warn), work=work, redo=None, check=None, int8_nodes=None,
                              rounded=None, qmax=127,
                              exclude=_resolve_names(work, names, "quantize.exclude") if names else [])
    alt.params = {**params, "rounding": _rounding(alt)}
    alt.check = _check_set(job.handle, job.data, job.reference, method, alt.params, reuse=job.check)
    if alt.params["rounding"] == "gptq":
        if job.rounded is not None and job.qmax == 127 and job.work is not None and not alt.exclude:
            alt.work, alt.rounded = job.work, job.rounded  # the same grid: GPTQ's pass is not made twice
            alt.info["rounding"] = job.info["rounding"]
        else:
            _gptq(alt)
    return alt


def _prepare_graphs(job: _Job) -> None:
    """The float graph ready for the method (opset, ``auto`` decided), the quantizer's input graph,
    and the layers kept in float resolved once on it."""
    params = job.params
    job.float_model = constants_to_initializers(job.float_model)
    if job.method in (*_INT8,) and params["per_channel"]:
        job.float_model, why_not = at_least_opset(job.float_model, 13)
        if why_not:
            job.params = params = {**params, "per_channel": False}
            job.warn.append(f"per-tensor weight scales: per-channel needs opset 13, and {why_not}")
    if job.method == "auto":
        job.method, why = auto_method(job.float_model)
        job.info["auto"] = {"method": job.method, "why": why}
        job.params = params = TECHNIQUE.defaults(job.method) | params  # the chosen method's own settings
        if job.method == "dynamic-int8" and not params["op_types"]:
            job.params = {**params, "op_types": list(_AUTO_DYNAMIC_OPS)}
    job.params = {**job.params, "rounding": _rounding(job)}
    # the original graph where the float one only has its Constant nodes lifted (the same outputs, bit
    # for bit): its reference outputs come from the session the original was measured in
    same = job.method == "qat-int8" or opset_of(job.float_model) == opset_of(job.handle.to_onnx())
    job.reference = job.handle.to_onnx() if same else job.float_model
    job.check = _check_set(job.handle, job.data, job.reference, job.method, job.params)
    if job.method in (*_STATIC, *_WEIGHT_ONLY) or (job.method == "dynamic-int8" and _needs_pre_pass(job.float_model)):
        # shape inference and constant folding: fewer, smaller nodes (and weights read through
        # Unsqueeze folded). A graph of MatMuls skips it for dynamic int8: on MiniLM the same 36
        # MatMulInteger, cosine 0.99314 either way, +0.1% bytes, no slower, 2-5 s saved (sympy,
        # symbolic shape inference; issue 17.7). Recurrent layers and If/Loop/Scan bodies need it
        # (their weights become initializers the quantizer sees: Silero's DynamicQuantizeLSTM), and
        # convolutions keep it (EfficientNet-Lite0: same ops and fidelity, but 1.1% smaller with it)
        with _tmp() as tmp:
            job.float_model = _prepared(job.float_model, Path(tmp))
    job.work = gemm_to_matmul(job.float_model) if job.method in ("dynamic-int8", "weight-only-int4") \
        else job.float_model
    names = job.params["exclude"]
    job.exclude = _resolve_names(job.work, names, "quantize.exclude") if names else []
    if job.params["rounding"] == "gptq":
        _gptq(job)


def _samples(params: dict[str, Any]) -> int:
    """Calibration rows of ``params`` (weight-only int8 has no such setting: GPTQ takes the default)."""
    return int(params.get("calibration_samples") or next(p.default for p in PARAMS if p.name == "calibration_samples"))


def _rounding(job: _Job) -> str:
    """``rounding`` resolved for the method: "gptq" or "nearest"."""
    if job.method not in ("static-int8", "weight-only-int8"):
        return "nearest"
    asked = job.params["rounding"]
    if asked == "nearest":
        return "nearest"
    if (job.params.get("max_accuracy_drop") or 0) > 0:  # its layer search rounds to nearest
        if asked == "gptq":
            job.warn.append("rounding = \"gptq\" is not combined with max_accuracy_drop: nearest rounding")
        return "nearest"
    has_rows = job.data is not None and any(len(job.data.splits.get(s, ())) for s in ("calib", "train"))
    if not has_rows:
        if asked == "gptq":
            raise DataError("rounding = \"gptq\" needs calibration rows (a calib or train split); give a "
                            "dataset (recipe 'data = ...') or use rounding = \"nearest\"")
        return "nearest"
    from . import gptq

    # nothing GPTQ can round (weights only inside If/Loop bodies, or all too small): nearest, and the
    # fidelity check keeps the train rows a GPTQ pass would have been fitted to
    return "gptq" if gptq.eligible(job.float_model, _pays(job.method)) else "nearest"


def _pays(method: str):
    """Which weights ``method`` quantizes, as ``pays(size, channels)``: every one for static int8,
    those int8 pays for (their scales and nodes) for weight-only int8."""
    return (lambda size, channels: True) if method in _STATIC else weight_dequant.pays_for_int8


def _calibration(job: _Job) -> tuple[list, list[str]]:
    """The calibration rows (and what :func:`_calib_arrays` notes about them), made once per job:
    the GPTQ pass and static int8's calibration read the same rows."""
    if job.calib is None:
        notes: list[str] = []
        job.calib = (_calib_arrays(job.data, job.handle, _samples(job.params), job.method, notes), notes)
    return job.calib


def _gptq(job: _Job) -> None:
    """Put ``job.work``'s weights on the int8 grid the method will use, GPTQ-rounded on the
    calibration rows (:mod:`.gptq`): the quantizer's nearest rounding then keeps them as they are."""
    from . import gptq

    static = job.method in _STATIC
    job.qmax = 64 if static and _reduce_range(job.params["reduce_range"]) else 127
    calib, _notes = _calibration(job)
    # the convolutions static int8 gives one scale (one_scale_layers): rounded on that grid
    one = set(one_scale_layers(job.work)) if static else set()
    try:
        job.work, job.rounded = gptq.round_weights(job.work, calib, job.handle.input_names, qmax=job.qmax,
                                                   exclude=job.exclude, pays=_pays(job.method), one_scale=one,
                                                   progress=job.progress.sub(0.0, 0.05, ""))
    except Cancelled:
        raise
    except Exception as exc:  # an improvement, not a requirement: the step goes on with nearest rounding
        why = f"{type(exc).__name__}: {str(exc)[:200]}"
        job.warn.append(f"GPTQ rounding could not run ({why}); weights rounded to nearest")
        job.info["rounding"] = {"method": "nearest", "gptq_failed": why}
        return
    job.info["rounding"] = {**job.rounded.info(), "calibration_samples": len(calib[0])}


def _unrounded(job: _Job, model: onnx.ModelProto, nodes: list[str]) -> onnx.ModelProto:
    """``model`` with the original float weights of ``nodes`` (layers a search keeps float)."""
    if job.rounded is None or not nodes:
        return model
    from . import gptq

    return gptq.restore(model, job.rounded, nodes)


_PRE_PASS_OPS = ("LSTM", "GRU", "RNN", "If", "Loop", "Scan", "Conv", "ConvTranspose")


def _needs_pre_pass(model: onnx.ModelProto) -> bool:
    """Whether dynamic int8 runs ``quant_pre_process`` first: for recurrent layers, subgraphs and
    convolutions (where it was measured to matter), not for a transformer's MatMuls."""
    return any(n.op_type in _PRE_PASS_OPS for n in graph_nodes(model.graph))


def _subgraph_weights_check(job: _Job) -> None:
    """Static int8 (ONNX Runtime's QDQ quantizer) does not enter If/Loop/Scan bodies: refuse a
    graph whose weights all sit there, say how many stay float otherwise."""
    outside, inside = weights_in_subgraphs(job.handle.to_onnx())  # before folding copies weights
    if not inside:
        return
    if outside == 0:
        raise TugboatError(f"{job.method} cannot quantize this model: all {inside:,} of its weights are "
                           f"inside If/Loop/Scan subgraphs, which ONNX Runtime's static (QDQ) quantizer "
                           f"does not enter; use method = \"weight-only-int8\" or \"dynamic-int8\" "
                           f"(both quantize them)",
                           path=job.handle.source)
    job.warn.append(f"{inside:,} of {outside + inside:,} weights are inside If/Loop/Scan subgraphs, which "
                    f"static int8 leaves in float; weight-only-int8 and dynamic-int8 quantize them")


def _quantize_static(job: _Job) -> onnx.ModelProto:
    _subgraph_weights_check(job)
    params, handle, progress, prepared = job.params, job.handle, job.progress, job.work
    calib, notes = _calibration(job)
    params, keep_float, plan = _static_plan(prepared, params)
    job.params = params
    if plan:
        job.info["plan"] = plan
    exclude = job.exclude = job.exclude + [n for n in keep_float if n not in job.exclude]
    job.info["calibration_samples_used"] = len(calib[0])
    if notes:
        job.info["calibration_note"] = "; ".join(notes)
        job.warn.extend(n for n in notes if "the data has" in n)
    if params["max_accuracy_drop"] > 0:
        q = _quantize_accuracy_aware(job, calib)
    else:
        q, job.info["calibration"] = _best_calibration(prepared, handle, calib, params, exclude, job.check,
                                                       progress.sub(0.05, 0.85))
        chosen = {**params, "calibration": job.info["calibration"]["method"]}
        q, chosen, qop = _choose_format(job, q, calib, chosen, progress.sub(0.85, 0.95, "QOperator format: "))
        job.redo = (lambda extra: static_int8(_unrounded(job, prepared, _nodes_for(prepared, extra)),  # cancellable
                                              handle.input_names, calib, chosen,
                                              progress.sub(0.95, 1.0, "trying layers in float: "),
                                              exclude=exclude + _nodes_for(prepared, extra), qoperator=qop))
    job.info["quantized_nodes"] = _count(q, ("QuantizeLinear",))
    return q


def int8_overhead(q: onnx.ModelProto, source: onnx.ModelProto) -> float:
    """Bytes of the compacted quantized graph besides its int8 weights, as a share of them: Q/DQ
    nodes, scales, zero points, int32 biases, the float ops between (0.05 for EfficientNet-Lite0,
    0.46 for the OCR direction classifier's 3146 output channels in 53 small convolutions)."""
    small = compact(_copy(q), source)
    weights = sum(int(np.prod(i.dims)) for i in small.graph.initializer
                  if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) and np.prod(i.dims) > 64)
    return len(small.SerializeToString()) / max(weights, 1) - 1.0


def _choose_format(job: _Job, q: onnx.ModelProto, calib, params: dict, progress: Progress
                   ) -> tuple[onnx.ModelProto, dict, bool]:
    """(graph, its params, whether QOperator) for ``format``: QDQ as quantized; ``qoperator``
    re-quantized so; ``auto`` tries QOperator with per-tensor weights where the QDQ graph's
    bookkeeping exceeds :data:`QOPERATOR_MIN_OVERHEAD` of its weights, and keeps it when it is
    smaller and at least as close to the float model on the val split (or both pass the bar)."""
    fmt, work = params["format"], job.work
    if fmt == "qdq" or (fmt == "auto" and (job.check is None or int8_overhead(q, work) <= QOPERATOR_MIN_OVERHEAD)):
        return q, params, False
    trial = {**params, "per_channel": params["per_channel"] and fmt == "qoperator"}
    qop = static_int8(work, job.handle.input_names, calib, trial, progress, exclude=job.exclude, qoperator=True)
    if fmt == "qoperator":
        job.info["format"] = {"format": "qoperator", "asked": fmt}
        return qop, trial, True
    sizes = [len(compact(_copy(m), work).SerializeToString()) for m in (q, qop)]
    a, b = _score(q, job.check), _score(qop, job.check)
    keep = sizes[1] < sizes[0] and not b["low"] and b["value"] >= min(a["value"], b["threshold"])
    job.info["format"] = {"format": "qoperator" if keep else "qdq", "asked": fmt,
                          "bytes": {"qdq": sizes[0], "qoperator": sizes[1]},
                          "tried": {"qdq": a["value"], "qoperator": b["value"]}, "metric": a["metric"]}
    return (qop, trial, True) if keep else (q, params, False)


def _quantize_accuracy_aware(job: _Job, calib) -> onnx.ModelProto:
    params, info = job.params, job.info
    q, aware = _accuracy_aware(job.handle, job.work, calib, job.data, params, job.exclude,
                               job.progress.sub(0.05, 1.0))
    info["accuracy_aware"] = {k: v for k, v in aware.items() if k != "sensitivity"}
    info["sensitivity"] = aware["sensitivity"]
    info["kept_float"] = [k["layer"] for k in aware["kept_float"]]
    if aware["kept_float"]:
        why = ", ".join(f"{k['layer']} (alone it costs {100 * k['accuracy_drop_alone']:.1f} "
                        f"points, output error {k['rel_error_alone']:.3f})"
                        for k in aware["kept_float"])
        job.warn.append(f"kept in float to stay within max_accuracy_drop={params['max_accuracy_drop']:g}"
                        f": {why}")
    if not aware.get("within_tolerance", True):
        job.warn.append("accuracy-aware quantization could not reach the tolerance even with "
                        "every layer in float")
    return q


def _quantize_dynamic(job: _Job) -> onnx.ModelProto:
    work, exclude = job.work, job.exclude
    job.progress.update(0.2, "quantizing weights")
    if job.params["runtime"] == "torch" and not job.params["op_types"]:
        # torch dynamic int8 covers Linear only: the ONNX equivalent quantizes MatMul only
        job.params = {**job.params, "op_types": ["MatMul"]}
    params = job.params
    q = dynamic_int8(work, params, exclude)
    job.redo = (lambda extra: dynamic_int8(work, params, exclude + _nodes_for(work, extra)))
    if params["runtime"] == "torch":
        job.module_out = torch_dynamic_int8(job.handle.torch_module(), params["exclude"])
    if _count(q, ("ConvInteger",)):
        # advice only: whether it is really slower is measured (measure.slower_than)
        static = "static-int8 or " if weights_in_subgraphs(work)[0] else ""  # static: main graph only
        job.info["note"] = ("dynamic int8 quantized convolutions (ConvInteger), which ONNX Runtime often "
                            f"runs slower than float; {static}op_types = [\"MatMul\", \"Gemm\"] avoid it")
    return q


def _quantize_weight_only(job: _Job) -> onnx.ModelProto:
    """int8 weights behind DequantizeLinear for every weight-bearing op (weight_dequant); int4 puts the
    MatMul weights into MatMulNBits first and gives the rest int8 the same way."""
    work, exclude, params = job.work, job.exclude, job.params
    job.progress.update(0.2, "quantizing weights" + (" (MatMul to 4 bits, the rest to 8)"
                                                     if job.method == "weight-only-int4" else " to 8 bits"))
    q, done = weight_only_all(work, job.method, params, exclude)
    job.redo = lambda extra: weight_only_all(_unrounded(job, work, _nodes_for(work, extra)), job.method, params,
                                             exclude + _nodes_for(work, extra))[0]
    job.int8_nodes = done.int8_nodes
    int4 = _count(q, ("MatMulNBits",))
    job.info["quantized_layers"] = int4 + done.tensors
    job.info["weight_only"] = {"int4_matmul": int4, "int8_tensors": done.tensors, "int8_by_op": done.by_op,
                               "int8": "symmetric, one scale per output channel, expanded by Cast and Mul"}
    job.info["note"] = ("weight-only: weights are stored in fewer bits and expanded to float when ONNX "
                        "Runtime loads the model; activations and compute stay float, so expect about the "
                        "float model's speed (measured, not promised)")
    if done.float_nodes:
        job.info["float_layers"] = [layer_of(n) for n in done.float_nodes]
    if not int4 and not done.tensors:
        raise TugboatError(f"{job.method} found no weights of a size it can quantize (weights of Conv, "
                           f"Gemm, MatMul, LSTM/GRU/RNN or Gather)", path=job.handle.source)
    return q


def weight_only_all(model: onnx.ModelProto, method: str, params: dict, exclude: list[str]):
    """(quantized graph, :class:`~tugboat.engine.techniques.weight_dequant.WeightOnlyResult`) for a
    weight-only method: int4 MatMulNBits on MatMul weights for ``weight-only-int4``, then int8
    DequantizeLinear weights for everything still float."""
    if method == "weight-only-int4":
        model = weight_only(model, 4, params, exclude)
    return dequant_int8_weights(model, exclude)


def _quantize_fp16(job: _Job) -> onnx.ModelProto:
    work, exclude, params = job.work, job.exclude, job.params
    job.progress.update(0.2, "converting to float16")
    job.redo = lambda extra: fp16(work, params, exclude + _nodes_for(work, extra))
    return fp16(work, params, exclude)


def _finish(job: _Job, q: onnx.ModelProto, source: ModelHandle, step: dict[str, Any]) -> ModelHandle:
    """Compact, check fidelity and the graph, and wrap the quantized graph in a new handle."""
    handle, method, float_model, info, progress = job.handle, job.method, job.float_model, job.info, job.progress
    progress.check()
    q = compact(q, job.work)
    unchanged = _unchanged(job, q)
    if unchanged and job.module_out is None:
        # nothing was quantized: the variant is the input graph as it was, never the quantizer's
        # copy (its pre-pass can fold one weight into several copies and make the file larger)
        q = _copy(source.to_onnx())
        unchanged += "; the variant keeps the input graph unchanged"
    q = _with_meta(q, float_model)  # before the check: q is not changed after its session is made
    if not (unchanged and job.module_out is None) and job.check is not None and not info.get("accuracy_aware"):
        progress.update(0.97, "checking fidelity to the float model")
        _fidelity_check(q, float_model, job.check, method, info, job.warn, job.redo, job.int8_nodes, progress)
    try:
        checked_bytes(q)  # the bytes its session ran, checked once (not again when it is written)
    except Exception as exc:
        raise TugboatError(f"quantized graph fails onnx.checker: {str(exc)[:300]}",
                           path=handle.source) from None
    progress.update(1.0, "quantized")
    if job.module_out is not None:
        out = handle.derive(module=job.module_out, onnx_model=None, step=step)
        out.deploy_onnx = q  # the torch module cannot be exported; this is its ONNX equivalent
    else:
        out = handle.derive(module=None, onnx_model=q, step=step)
        out.conversion_error = f"quantized with {method} for ONNX Runtime (no torch module)"
        out.float_module = source.module
    out.info["quantize"] = info
    for key in ("kept_float", "sensitivity"):
        if key in info:
            out.info[key] = info[key]
    out.warnings += job.warn
    if unchanged:
        out.info[NO_CHANGE] = unchanged
    return out


def _unchanged(job: _Job, q: onnx.ModelProto) -> str | None:
    """Why the quantized graph ``q`` quantizes nothing (None when it does: fp16 always does)."""
    if job.method == "fp16" or _count(q, QUANTIZED_OPS) or _count(job.float_model, QUANTIZED_OPS):
        return None
    if job.info.get("weight_only", {}).get("int8_tensors"):  # int8 weights behind Cast + Mul
        return None
    ops = job.params.get("op_types") or ["every supported type"]  # fp16 and weight-only have none
    have = sorted({n.op_type for n in graph_nodes(job.float_model.graph)})
    return f"no operator was quantized (op_types: {', '.join(ops)}; the model's operators: {', '.join(have)})"


# --- the technique: its hooks and its one schema -----------------------------------------------------

# how the instant estimate stores a layer each method quantizes (tugboat.engine.techniques.estimate)
_SCHEMES = {"static-int8": "static", "qat-int8": "static", "dynamic-int8": "dynamic",
            "weight-only-int8": "wo8", "weight-only-int4": "wo4", "fp16": "fp16"}
# ONNX Runtime compute time of a quantized layer relative to float (>1: slower), by method and op,
# for small (< 8) and large batches; from benchmarks/results/quantization.json on the demo zoo
LATENCY = {
    "static-int8": {"conv": (0.6, 0.35), "linear": (1.0, 0.45)},
    "qat-int8": {"conv": (0.6, 0.35), "linear": (1.0, 0.45)},
    "dynamic-int8": {"conv": (5.0, 7.0), "linear": (1.3, 0.55)},
    "weight-only-int8": {"conv": (1.0, 1.0), "linear": (1.0, 1.0)},  # Cast + Mul folded at load
    "weight-only-int4": {"conv": (1.0, 1.0), "linear": (1.3, 1.3)},
    "fp16": {"conv": (1.0, 1.0), "linear": (1.0, 1.0)},
}


def _layer_scheme(method: str, op: str, ops: list[str], linear_only: bool) -> str | None:
    """The estimate's storage scheme of a layer (``op``: "conv" | "linear") under ``method``, or
    None where the method leaves it float (op_types; Linear-only methods)."""
    onnx_op = "Conv" if op == "conv" else ("Gemm" if method in _STATIC else "MatMul")
    if ops and onnx_op not in ops and not (onnx_op == "Gemm" and "MatMul" in ops):
        return None
    if op != "linear" and linear_only:
        return None
    if method == "weight-only-int4" and op != "linear":
        return "wo8"  # MatMulNBits takes MatMul only: the other weights are int8
    return _SCHEMES[method]


def _estimate(step: dict[str, Any], est) -> bool:
    """The instant estimate (:class:`tugboat.engine.techniques.estimate.EstimateState`): which layers are
    stored how, as each method (and ``auto``, like :func:`auto_method`) quantizes them."""
    method = step["method"]
    if method == "qat-int8" and not est.profile.torch:
        return False
    ops = [str(o) for o in step["op_types"]] if "op_types" in step else []
    if method == "auto":  # where most weights sit
        method = "static-int8" if est.weights("conv") >= est.weights("linear") else "dynamic-int8"
        if method == "dynamic-int8" and not ops:
            ops = ["MatMul"]
    torch_model = "runtime" in step and step["runtime"] == "torch"  # dynamic int8 in torch: Linear only
    linear_only = torch_model
    est.quantize(method, step, lambda op: _layer_scheme(method, op, ops, linear_only), step["exclude"],
                 runs_in_torch=torch_model, latency=LATENCY[method])
    return True


def _unavailable(method: str, handle: ModelHandle, data: Dataset | None) -> str | None:
    """Why ``method`` cannot run on this model (capabilities; qat-int8's torch module is checked there)."""
    if method in _WEIGHT_ONLY and not _has_weights(handle):
        return "the model has no weight tensors to store in fewer bits"
    if method in _STATIC and data is not None and len(data) < 2:
        return "needs data to calibrate activation ranges"
    if method in _STATIC and handle.onnx_model is not None \
            and weights_in_subgraphs(handle.onnx_model)[0] == 0 < weights_in_subgraphs(handle.onnx_model)[1]:
        return ("the model's weights are all inside If/Loop/Scan subgraphs, which static int8 does not "
                "enter (weight-only-int8 and dynamic-int8 do)")
    return None


def _has_weights(handle: ModelHandle) -> bool:
    """Whether the model has a weight (2-D or more) for weight-only quantization to store."""
    graph = handle.onnx_model or handle.deploy_onnx
    if graph is None and handle.module is not None:
        return any(p.dim() >= 2 for p in handle.module.parameters())
    return graph is not None and sum(weights_in_subgraphs(graph)) > 0


def _memory(step: dict[str, Any], mem) -> None:
    """Memory phases (:class:`tugboat.engine.measuring.memory.StepMemory`): QAT trains, static int8 calibrates
    (``auto`` may pick it), the others run ONNX Runtime's quantizer over the weights."""
    if step["method"] == "qat-int8":
        mem.training("QAT")
    elif step["method"] in ("static-int8", "auto"):
        mem.calibration("calibration_samples")
    else:
        mem.onnx_pass()


TECHNIQUE = Technique(
    name="quantize",
    title="Quantization",
    summary="Store weights (and activations) in fewer bits: int8, int4 or float16, measured in "
            "ONNX Runtime against the float model.",
    methods=METHODS,
    params=PARAMS,
    apply=apply,
    needs_torch=False,  # ONNX Runtime quantizes the graph; only qat-int8 asks for the module
    final=True,
    once=True,  # a quantized graph (QDQ pairs, integer kernels) is no input for another quantizer
    default_method="auto",  # static int8 for CNNs, dynamic int8 for transformers (auto_method)
    estimate=_estimate,
    memory=_memory,
    torch_methods=("qat-int8",),  # trains the torch module with simulated int8
    unavailable=_unavailable,
)
