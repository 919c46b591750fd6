"""Instant estimates: a variant's size, parameters, FLOPs and latency without running anything.

While the user drags a slider the GUI shows a "ghost" point where the variant will probably land.
Nothing is pruned, quantized, exported or timed for it: the estimate is arithmetic on a
:class:`ModelProfile` read once from the baseline (the layers' shapes, which layer feeds which, the
measured size, FLOPs and latency), so it costs microseconds and can run on every slider move.

How each number is estimated:

* **layers** come from the torch module (Conv / Linear with their channel counts, kernel sizes,
  biases and the BatchNorm folded into them on export) or, for an ONNX-only model, from the
  weights of its Conv / Gemm / MatMul nodes;
* **structured pruning** keeps ``int(channels * (1 - ratio))`` output channels per layer (rounded
  down to ``round_to``), as torch-pruning does; a layer's input channels follow the layer that
  feeds it, the first layer keeps its inputs and the classifier head keeps its outputs. So params
  and FLOPs fall roughly with ``(1 - ratio) ** 2``, exactly where the layer table says so;
* **unstructured pruning** zeroes ``ratio`` of the weights: params and file size stay, the
  deflate-compressed size falls (a table of deflate ratios for random sparsity, per element size);
* **quantization** stores each covered weight in 1 byte (int8), half a byte (int4) or 2 bytes
  (fp16), plus the per-channel / per-block scales, zero points and int32 biases ONNX Runtime's
  quantizers write and a per-layer allowance for the added Quantize/Dequantize nodes;
* **size on disk** is the baseline's graph overhead (measured bytes minus 4 bytes per float) plus
  the bytes of every tensor; **compressed size** scales the baseline's deflate ratio;
* **FLOPs** scale per layer with the kept input x output channels (quantization keeps them);
* **latency** scales the measured baseline: a fixed share (``LATENCY_FIXED_SHARE``) plus the rest
  in proportion to FLOPs, times a per-method factor for quantized layers (int8 convolutions via
  ConvInteger are *slower* in ONNX Runtime; static int8 faster), in the runtime the variant will be
  measured in (the factors are the quantizing technique's: ``quantize.LATENCY``);
* **quality** (accuracy, fidelity) cannot be computed without running: it is interpolated between
  measured variants of the same chain when there are some (e.g. ratio 0.4 between measured 0.3 and
  0.5), else the original's is shown and flagged (``quality_estimated = False``).

Every estimate carries ``"estimated": True``; :func:`estimate_errors` compares one with the real
measurement so the estimator can be checked (``tests/test_estimate.py``) and improved.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .channels import kept_unrounded, rounded_keep

# a fixed share of latency that does not scale with FLOPs (session overhead, memory-bound ops)
LATENCY_FIXED_SHARE = 0.1
# deflate-compressed size of a tensor with a share of zeros at random places, relative to the same
# tensor without zeros, by element size (measured with zlib level 6 on normal-distributed values)
_SPARSITY = (0.0, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0)
_DEFLATE_REL = {
    4: (1.0, 0.825, 0.600, 0.336, 0.149, 0.079, 0.0),
    2: (1.0, 0.879, 0.672, 0.398, 0.190, 0.105, 0.0),
    1: (1.0, 0.904, 0.726, 0.456, 0.232, 0.136, 0.0),
}
# bytes ONNX Runtime's quantizers add per quantized layer besides the weights (Q/DQ nodes, names
# shortened by quantize.compact)
_PER_LAYER_BYTES = {"static": 300, "dynamic": 150, "weight-only": 100, "fp16": 200}
_NODE_DEFLATE = 0.35  # node protos with repetitive names deflate well


@dataclass
class Layer:
    """One layer with weights, as the estimator sees it (shapes only, no tensors)."""

    name: str
    op: str  # "conv" | "linear"
    in_ch: int  # input channels / features (for a Linear after a flatten: the channels before it)
    out_ch: int
    unit: int = 1  # weight elements per (input channel, output channel) pair: kernel size, or the
    #                spatial positions a flattened channel becomes
    groups: int = 1
    own_bias: bool = True  # a bias parameter in torch
    onnx_bias: bool = True  # a bias in the exported graph (its own, or a folded BatchNorm's)
    norm_per_channel: int = 0  # torch params per output channel of a BatchNorm folded on export
    producer: int | None = None  # index of the layer whose outputs are this layer's inputs
    head: bool = False  # the output layer: its outputs are never pruned
    flops: int = 0  # at batch 1
    depthwise: bool = False

    def weights(self, in_ch: int | None = None, out_ch: int | None = None) -> int:
        i = self.in_ch if in_ch is None else in_ch
        o = self.out_ch if out_ch is None else out_ch
        if self.depthwise:
            return o * self.unit
        return o * max(1, i // self.groups) * self.unit


@dataclass
class ModelProfile:
    """What the estimator knows about the baseline: its layers and its measured metrics."""

    layers: list[Layer]
    metrics: dict[str, Any]
    other_floats: int = 0  # float elements of the exported graph outside ``layers``
    other_params: int = 0  # torch parameters outside ``layers`` (embeddings, LayerNorm, ...)
    other_flops: int = 0  # FLOPs outside ``layers`` (attention products, ...)
    overhead_bytes: int = 0  # graph bytes besides the weights
    torch: bool = True  # a torch module exists (pruning and distillation need one)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def floats(self) -> int:
        return sum(lay.weights() + (lay.out_ch if lay.onnx_bias else 0) for lay in self.layers) \
            + self.other_floats


# --- building a profile ----------------------------------------------------------------------------

def _torch_layers(module) -> tuple[list[Layer], int, int]:
    """Layers of a torch module in registration order, with BatchNorms folded into the layer before."""
    from torch import nn

    layers: list[Layer] = []
    other_params = other_floats = 0
    for name, m in module.named_modules():
        own = list(m.parameters(recurse=False))
        if isinstance(m, nn.modules.conv._ConvNd) and not isinstance(m, nn.modules.conv._ConvTransposeMixin):
            unit = int(math.prod(m.kernel_size))
            dw = m.groups > 1 and m.groups == m.in_channels == m.out_channels
            layers.append(Layer(name, "conv", m.in_channels, m.out_channels, unit, m.groups,
                                own_bias=m.bias is not None, onnx_bias=m.bias is not None, depthwise=dw))
        elif isinstance(m, nn.Linear):
            layers.append(Layer(name, "linear", m.in_features, m.out_features, 1, 1,
                                own_bias=m.bias is not None, onnx_bias=m.bias is not None))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and layers and \
                layers[-1].op == "conv" and layers[-1].out_ch == m.num_features and \
                not layers[-1].norm_per_channel:
            # exported in eval mode, a BatchNorm after a conv folds into the conv's weight and bias
            layers[-1].norm_per_channel = 2 if m.affine else 0
            layers[-1].onnx_bias = True
        elif own:
            n = sum(p.numel() for p in own)
            other_params += n
            other_floats += n
    # which layer feeds which: the nearest earlier layer whose outputs match this layer's inputs
    # (a Linear after a flatten takes channels x positions)
    for i, lay in enumerate(layers):
        for j in range(i - 1, -1, -1):
            prev = layers[j]
            if prev.out_ch == lay.in_ch:
                lay.producer = j
                break
            if lay.op == "linear" and prev.op == "conv" and lay.in_ch % prev.out_ch == 0:
                lay.unit = lay.in_ch // prev.out_ch
                lay.in_ch = prev.out_ch
                lay.producer = j
                break
    linears = [lay for lay in layers if lay.op == "linear"]
    if linears or layers:
        (linears or layers)[-1].head = True
    return layers, other_params, other_floats


def _onnx_layers(model) -> tuple[list[Layer], int]:
    """Layers of an ONNX-only model from its Conv / Gemm / MatMul weight initializers."""
    import numpy as np

    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    used: set[str] = set()
    layers: list[Layer] = []
    for node in model.graph.node:
        w = node.input[1] if len(node.input) > 1 else ""
        if w not in inits:
            continue
        dims = inits[w]
        bias = len(node.input) > 2 and node.input[2] in inits
        if node.op_type == "Conv" and len(dims) >= 3:
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            layers.append(Layer(node.name or w, "conv", dims[1] * group, dims[0], int(np.prod(dims[2:])),
                                group, own_bias=bias, onnx_bias=bias))
        elif node.op_type in ("Gemm", "MatMul") and len(dims) == 2:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            n_out, n_in = (dims[0], dims[1]) if trans_b else (dims[1], dims[0])
            layers.append(Layer(node.name or w, "linear", n_in, n_out, 1, 1, own_bias=bias, onnx_bias=bias))
        else:
            continue
        used.update(node.input[1:3])
    other = sum(int(np.prod(d)) for n, d in inits.items() if n not in used and d and int(np.prod(d)) > 1)
    if layers:
        layers[-1].head = True
    return layers, other


def build_profile(handle, metrics: dict[str, Any], layer_rows: list[dict[str, Any]] | None = None
                  ) -> ModelProfile:
    """Read a model's layers once (attribute reads only: no forward pass, no export).

    ``metrics`` are the baseline's measured metrics; ``layer_rows`` the optional per-layer table of
    :func:`tugboat.engine.measuring.measure.layer_table` (``model_info()["layers"]``) for per-layer FLOPs."""
    module = getattr(handle, "module", None)
    torch_ok = module is not None and getattr(handle, "onnx_model", None) is None
    if torch_ok:
        layers, other_params, other_floats = _torch_layers(module)
    else:
        layers, other_floats = _onnx_layers(handle.to_onnx())
        other_params = other_floats
    profile = ModelProfile(layers, dict(metrics), other_floats, other_params, torch=torch_ok,
                           inputs=[s.to_dict() for s in getattr(handle, "inputs", [])],
                           outputs=[s.to_dict() for s in getattr(handle, "outputs", [])])
    _assign_flops(profile, layer_rows)
    size = int(metrics.get("size_bytes") or 4 * profile.floats)
    profile.overhead_bytes = max(0, size - 4 * profile.floats)
    return profile


def _assign_flops(profile: ModelProfile, layer_rows: list[dict[str, Any]] | None) -> None:
    total = int(profile.metrics.get("flops") or 0)
    by_name = {str(r.get("name")): int(r.get("flops") or 0) for r in (layer_rows or [])}
    known = 0
    for lay in profile.layers:
        if by_name.get(lay.name):
            lay.flops = by_name[lay.name]
            known += lay.flops
    missing = [lay for lay in profile.layers if not lay.flops]
    if missing:
        # no table: a Linear does 2 FLOPs per weight; convolutions share what is left by weights
        for lay in missing:
            if lay.op == "linear":
                lay.flops = 2 * lay.weights()
                known += lay.flops
        convs = [lay for lay in missing if lay.op == "conv"]
        left = max(0, total - known)
        w = sum(lay.weights() for lay in convs)
        for lay in convs:
            lay.flops = int(left * lay.weights() / w) if w and left else 2 * lay.weights()
            known += lay.flops
    profile.other_flops = max(0, total - known)


# --- estimating -----------------------------------------------------------------------------------

@dataclass
class _LayerState:
    in_ch: int
    out_ch: int
    sparsity: float = 0.0
    scheme: str = "float32"  # float32 | fp16 | static | dynamic | wo8 | wo4


class EstimateState:
    """The model as the steps so far would leave it, and the operations a technique's ``estimate``
    hook (:class:`tugboat.engine.techniques.technique.Technique`) describes its step with."""

    def __init__(self, profile: ModelProfile) -> None:
        self.profile = profile
        self.layers = [_LayerState(lay.in_ch, lay.out_ch) for lay in profile.layers]
        self.other_sparsity = 0.0
        self.quant: str | None = None  # the quantize method, once applied
        self.quant_params: dict[str, Any] = {}
        # compute time of a quantized layer relative to float (>1: slower) by op, at small (< 8) and
        # large batches, as the quantizing technique measured it
        self.quant_latency: dict[str, tuple[float, float]] = {}
        self.torch_model = True  # the variant is measured as a torch module (else in ONNX Runtime)
        self.approximate: list[str] = []
        self.channel_multiple = 0  # the channel multiple structured pruning rounded to ("auto" resolved)
        self.closed = False  # a final step (an ONNX-only artifact) was applied: nothing follows

    def apply(self, step: dict[str, Any]) -> bool:
        """Change the state as ``step`` would change the model; False when it cannot be estimated
        (an unknown technique, one without an ``estimate`` hook, an invalid step)."""
        from ..errors import RecipeError
        from .steps import find

        tech = find(step.get("technique"))
        if tech is None or tech.estimate is None:
            return False
        try:
            params = tech.complete(step)
        except RecipeError:  # a half-typed GUI value: no estimate rather than a wrong one
            return False
        closed = self.closed
        if not tech.estimate(params, self) or (closed and self.closed):
            return False  # only a fresh model (use_student) may follow an ONNX-only artifact
        self.closed = tech.final
        return True

    def weights(self, op: str) -> int:
        """Weight elements of the profiled layers of one kind ("conv" or "linear")."""
        return sum(lay.weights() for lay in self.profile.layers if lay.op == op)

    def prune_channels(self, ratio: float, ignored: Sequence[str] = (), round_to: int = 0,
                       per_layer: dict[str, float] | None = None) -> None:
        """Structured pruning: ``int(channels * (1 - ratio))`` outputs kept per layer (head kept),
        rounded to the nearest multiple of ``round_to`` (an int: the caller resolves "auto")."""
        self.channel_multiple = int(round_to or 0)
        _prune_structured(self.profile, self, ratio, list(ignored), self.channel_multiple, per_layer)

    def sparsify(self, ratio: float, ignored: Sequence[str] = (), per_layer: dict[str, float] | None = None) -> None:
        """Unstructured pruning: ``ratio`` of each layer's weights zeroed (``per_layer`` overrides)."""
        per_layer = per_layer or {}
        for lay, st in zip(self.profile.layers, self.layers):
            if not _matches(lay.name, list(ignored)):
                r = per_layer.get(lay.name, ratio)
                st.sparsity = 1.0 - (1.0 - st.sparsity) * (1.0 - r)

    def quantize(self, method: str, params: dict[str, Any], scheme_of: Callable[[str], str | None],
                 exclude: Sequence[str] = (), runs_in_torch: bool = False,
                 latency: dict[str, tuple[float, float]] | None = None) -> None:
        """Store layers in another format: ``scheme_of(op)`` names a layer's scheme (``static``,
        ``dynamic``, ``wo8``, ``wo4``, ``fp16``) or None to keep it float. ``params`` give the
        scales' layout (per_channel, block_size, symmetric); ``latency`` a quantized layer's compute
        time relative to float by op ("conv", "linear") at small and large batches."""
        self.quant, self.quant_params, self.torch_model = method, dict(params), runs_in_torch
        self.quant_latency = dict(latency or {})
        for lay, st in zip(self.profile.layers, self.layers):
            scheme = None if _matches(lay.name, list(exclude)) else scheme_of(lay.op)
            if scheme:
                st.scheme = scheme

    def use_student(self, width: float, depth: int) -> bool:
        """A fresh built-in student replaces the model (whatever came before it); False when the
        student cannot be built for these inputs."""
        student = student_profile(self.profile, width, depth)
        if student is None:
            return False
        self.__init__(student)
        return True


def _matches(name: str, names: list[str]) -> bool:
    return any(name == n or name.startswith(n + ".") for n in names)


def _keep(channels: int, ratio: float, round_to: int) -> int:
    """Channels structured pruning keeps, rounded as :mod:`tugboat.engine.techniques.channels` rounds them
    (ratios are validated against the technique's one bound)."""
    return max(1, rounded_keep(channels, kept_unrounded(channels, ratio), round_to))


def _prune_structured(profile: ModelProfile, state: EstimateState, ratio: float, ignored: list[str],
                      round_to: int = 0, per_layer: dict[str, float] | None = None) -> None:
    per_layer = per_layer or {}
    for lay, st in zip(profile.layers, state.layers):
        if lay.depthwise:
            continue  # follows its input below
        if not lay.head and not _matches(lay.name, ignored):
            st.out_ch = _keep(st.out_ch, per_layer.get(lay.name, ratio), round_to)
    for lay, st in zip(profile.layers, state.layers):
        if lay.producer is not None:
            st.in_ch = state.layers[lay.producer].out_ch
            if lay.depthwise:
                st.out_ch = st.in_ch


_STUDENTS: dict[tuple, ModelProfile] = {}


def student_profile(teacher: ModelProfile, width: float, depth: int) -> ModelProfile | None:
    """The profile of the built-in student a ``distill`` step with ``student = "family"`` trains:
    the student is built (untrained, small) and its FLOPs counted once per width and depth."""
    key = (id(teacher), width, depth)
    if key in _STUDENTS:
        return _STUDENTS[key]
    try:
        import torch

        from ..io.models import ModelHandle, TensorSpec
        from ..measuring.measure import layer_table
        from .students import build_student, input_kind

        inputs = [TensorSpec.from_dict(d) for d in teacher.inputs]
        outputs = [TensorSpec.from_dict(d) for d in teacher.outputs]
        shapes = [tuple(int(x) for x in s.shape[1:]) for s in inputs]
        kind = input_kind(shapes, [s.dtype for s in inputs])
        out_shape = tuple(int(x) for x in outputs[0].shape[1:]) if outputs else (1,)
        with torch.random.fork_rng():
            module = build_student(kind, shapes, out_shape, width=width, depth=depth)
        handle = ModelHandle(module, inputs, outputs, "student", "torch")
        rows = layer_table(handle)
    except Exception:  # an input layout the built-in students do not cover, unknown shapes, ...
        return None
    metrics = dict(teacher.metrics)
    profile = ModelProfile([], metrics, torch=True, inputs=teacher.inputs, outputs=teacher.outputs)
    profile.layers, profile.other_params, profile.other_floats = _torch_layers(module)
    metrics["flops"] = sum(int(r.get("flops") or 0) for r in rows)
    _assign_flops(profile, rows)
    # the student is timed against the teacher's latency and FLOPs: keep the teacher's as reference
    profile.metrics = dict(teacher.metrics)
    profile.other_flops = max(0, metrics["flops"] - sum(lay.flops for lay in profile.layers))
    profile.overhead_bytes = teacher.overhead_bytes
    if len(_STUDENTS) > 64:
        _STUDENTS.clear()
    _STUDENTS[key] = profile
    return profile


def _deflate_rel(sparsity: float, itemsize: int) -> float:
    table = _DEFLATE_REL[4 if itemsize >= 4 else itemsize]
    s = min(max(sparsity, 0.0), 1.0)
    for k in range(1, len(_SPARSITY)):
        if s <= _SPARSITY[k]:
            a, b = _SPARSITY[k - 1], _SPARSITY[k]
            t = (s - a) / (b - a)
            return table[k - 1] + t * (table[k] - table[k - 1])
    return table[-1]


def _batch_and_runtime(metrics: dict[str, Any]) -> tuple[int, str]:
    lat = metrics.get("latency_ms") or {}
    return int(lat.get("batch") or 1), str(lat.get("runtime") or "onnxruntime")


def estimate(profile: ModelProfile, steps: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Estimated metrics of ``steps`` applied to the profiled baseline (the keys of measured
    metrics, plus ``estimated`` and ``approximate`` notes), or None when it cannot be estimated.
    Each step is described by its technique's ``estimate`` hook (:meth:`EstimateState.apply`)."""
    est = EstimateState(profile)
    for step in steps:
        if not est.apply(step):
            return None
    return _metrics(est)


@dataclass
class _Totals:
    size_bytes: float = 0.0
    raw_compressed: float = 0.0  # bytes before deflate, weighted by how well each tensor deflates
    params: int = 0
    nonzero: int = 0
    flops: float = 0.0
    lat_work: float = 0.0  # FLOP-weighted compute time of the layers, relative units
    per_layer: int = 0  # bytes of the nodes a quantizer adds per layer


def _layer_bytes(lay: Layer, st: _LayerState, quant_params: dict[str, Any]) -> tuple[int, float, int, int, int]:
    """One layer's (bytes, bytes before deflate weighted by how they deflate, params, non-zero params,
    bytes of the nodes its quantizer adds). Params count as in the exported artifact: a BatchNorm
    folds into the bias; scales and zero points are not parameters (models.onnx_param_count)."""
    w = lay.weights(st.in_ch, st.out_ch)
    o = st.out_ch
    zeros = w - round(w * (1.0 - st.sparsity))
    bias = o if lay.onnx_bias else 0
    if st.scheme == "float32":
        return 4 * (w + bias), 4 * w * _deflate_rel(st.sparsity, 4) + 4 * bias, w + bias, w + bias - zeros, 0
    if st.scheme == "fp16":
        return (2 * (w + bias), 2 * w * _deflate_rel(st.sparsity, 2) + 2 * bias, w + bias, w + bias - zeros,
                _PER_LAYER_BYTES["fp16"])
    if st.scheme in ("static", "dynamic"):
        if st.scheme == "static":  # bias: int32 + scale (no zero point: quantize.compact())
            b = w + (5 * o if quant_params["per_channel"] else 5) + 8 * bias
        else:
            b = w + 5 * o + 4 * bias
        return b, w * _deflate_rel(st.sparsity, 1) + (b - w), w + bias, w + bias - zeros, _PER_LAYER_BYTES[st.scheme]
    if st.scheme == "wo8":  # int8 behind DequantizeLinear, one float scale per output channel
        b = w + 4 * o + 4 * bias
        return (b, w * _deflate_rel(st.sparsity, 1) + (b - w), w + bias, w + bias - zeros,
                _PER_LAYER_BYTES["weight-only"])
    # weight-only int4: block-wise over the input dimension (MatMulNBits)
    bits = 4
    k = st.in_ch * lay.unit
    blocks = math.ceil(k / int(quant_params["block_size"]))
    packed = math.ceil(k * bits / 8) * o
    zero_points = 0 if quant_params["symmetric"] else math.ceil(blocks * bits / 8) * o
    b = packed + 4 * blocks * o + zero_points + 4 * bias
    # packed weights count as weights; scales are not parameters
    return (b, packed * _deflate_rel(st.sparsity, 1) + (b - packed), k * o + bias,
            k * o + bias - int(k * o * st.sparsity), _PER_LAYER_BYTES["weight-only"])


def _totals(est: EstimateState, big: int) -> _Totals:
    profile = est.profile
    t = _Totals(size_bytes=profile.overhead_bytes, flops=profile.other_flops)
    for lay, st in zip(profile.layers, est.layers):
        b, raw, n_params, n_nonzero, node_bytes = _layer_bytes(lay, st, est.quant_params)
        t.size_bytes += b
        t.raw_compressed += raw
        t.params += n_params
        t.nonzero += n_nonzero
        t.per_layer += node_bytes
        keep = (st.out_ch / lay.out_ch) * (1.0 if lay.depthwise else st.in_ch / lay.in_ch)
        layer_flops = lay.flops * keep
        t.flops += layer_flops
        factor = 1.0
        if st.scheme != "float32" and lay.op in est.quant_latency:
            factor = est.quant_latency[lay.op][big]
        t.lat_work += layer_flops * factor
    other_bytes = (2 if est.quant == "fp16" else 4) * profile.other_floats
    t.size_bytes += other_bytes + t.per_layer
    t.raw_compressed += other_bytes * _deflate_rel(est.other_sparsity, 4) + profile.overhead_bytes
    t.params += profile.other_floats  # counted in the artifact, as measure counts (ModelHandle.param_count)
    t.nonzero += profile.other_floats
    t.lat_work += profile.other_flops
    return t


def _metrics(est: EstimateState) -> dict[str, Any]:
    base = est.profile.metrics
    batch, runtime = _batch_and_runtime(base)
    t = _totals(est, 1 if batch >= 8 else 0)
    base_size = int(base.get("size_bytes") or 1)
    ratio = (base.get("compressed_bytes") or base_size) / base_size
    # the measured baseline's deflate ratio stands for how its floats compress
    compressed = int(t.raw_compressed * ratio + t.per_layer * _NODE_DEFLATE)
    base_flops = max(1, int(base.get("flops") or 1))
    measure_runtime = runtime if est.torch_model else "onnxruntime"
    lat0 = _base_latency(base, measure_runtime, batch)
    latency = None
    if lat0 is not None:
        scale = LATENCY_FIXED_SHARE + (1.0 - LATENCY_FIXED_SHARE) * t.lat_work / base_flops
        latency = {"median": round(lat0["median"] * scale, 4),
                   "p90": round(float(lat0.get("p90") or lat0["median"]) * scale, 4),
                   "batch": batch, "threads": lat0.get("threads"), "runtime": measure_runtime,
                   "estimated": True}
    return {
        "size_bytes": int(t.size_bytes), "compressed_bytes": compressed,
        "params": int(max(1, t.params)), "nonzero_params": int(t.nonzero),
        "flops": round(t.flops) if base.get("flops") else None,
        "latency_ms": latency, "accuracy": base.get("accuracy"),
        "fidelity": copy.deepcopy(base.get("fidelity")),
        "estimated": True, "quality_estimated": False, "approximate": list(est.approximate),
        "channels": {lay.name: st.out_ch for lay, st in zip(est.profile.layers, est.layers)},
        "channel_multiple": est.channel_multiple,
    }


def _base_latency(base: dict[str, Any], runtime: str, batch: int) -> dict[str, Any] | None:
    per = (base.get("latency") or {}).get(runtime, {}).get(f"b{batch}")
    return per or base.get("latency_ms")


# --- quality from measured neighbours ------------------------------------------------------------

def _signature(steps: list[dict[str, Any]]) -> tuple[tuple[str, str], ...]:
    return tuple((str(s.get("technique")), str(s.get("method"))) for s in steps)


def _numeric_diff(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> tuple[int, str] | None:
    """The one numeric parameter in which two step lists of the same shape differ (or None)."""
    diff = None
    for i, (x, y) in enumerate(zip(a, b)):
        for key in set(x) | set(y):
            if x.get(key) == y.get(key):
                continue
            vx, vy = x.get(key), y.get(key)
            if isinstance(vx, bool) or not isinstance(vx, (int, float)) or \
                    isinstance(vy, bool) or not isinstance(vy, (int, float)) or diff is not None:
                return None
            diff = (i, key)
    return diff


def estimate_quality(steps: list[dict[str, Any]], measured: list[tuple[list[dict[str, Any]], dict[str, Any]]],
                     estimate_metrics: dict[str, Any]) -> dict[str, Any]:
    """Fill accuracy / fidelity of an estimate by interpolating measured variants of the same
    chain that differ in one number (``ratio``, ``width``...); unchanged if there are none."""
    from ..running.report_json import quality_of

    sig = _signature(steps)
    points: list[tuple[float, dict[str, Any]]] = []
    where = None
    for other_steps, metrics in measured:
        if _signature(other_steps) != sig or quality_of(metrics) is None:
            continue
        if other_steps == steps:
            points = [(0.0, metrics)]
            where = None
            break
        diff = _numeric_diff(steps, other_steps)
        if diff is None or (where is not None and diff != where):
            continue
        where = diff
        points.append((float(other_steps[diff[0]][diff[1]]), metrics))
    out = dict(estimate_metrics)
    if not points:
        return out
    if where is None:
        chosen = points[0][1]
        out["accuracy"], out["fidelity"] = chosen.get("accuracy"), copy.deepcopy(chosen.get("fidelity"))
        out["quality_estimated"] = True
        return out
    x = float(steps[where[0]][where[1]])
    points.sort(key=lambda p: p[0])
    lo = max((p for p in points if p[0] <= x), key=lambda p: p[0], default=None)
    hi = min((p for p in points if p[0] >= x), key=lambda p: p[0], default=None)
    if lo is None or hi is None:  # outside the measured range: the nearest one
        near = lo or hi
        lo = hi = near
    t = 0.0 if hi[0] == lo[0] else (x - lo[0]) / (hi[0] - lo[0])

    def mix(a, b):
        if a is None or b is None:
            return a if b is None else b
        return a + t * (b - a)

    out["accuracy"] = mix(lo[1].get("accuracy"), hi[1].get("accuracy"))
    fa, fb = lo[1].get("fidelity") or {}, hi[1].get("fidelity") or {}
    out["fidelity"] = {k: mix(fa.get(k), fb.get(k)) for k in set(fa) | set(fb)}
    out["quality_estimated"] = True
    return out


# --- checking -------------------------------------------------------------------------------------

ERROR_KEYS = ("size_bytes", "compressed_bytes", "params", "flops", "latency_ms")


def _value(metrics: dict[str, Any], key: str) -> float | None:
    v = metrics.get(key)
    if isinstance(v, dict):
        v = v.get("median")
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def estimate_errors(est: dict[str, Any], measured: dict[str, Any]) -> dict[str, float]:
    """Relative error (estimate / measured - 1) per metric both have."""
    out = {}
    for key in ERROR_KEYS:
        a, b = _value(est, key), _value(measured, key)
        if a is not None and b:
            out[key] = round(a / b - 1.0, 4)
    return out


def with_metrics(profile: ModelProfile, metrics: dict[str, Any]) -> ModelProfile:
    """The same layers with new measured baseline metrics (e.g. after a re-measure)."""
    return replace(profile, metrics=dict(metrics))
