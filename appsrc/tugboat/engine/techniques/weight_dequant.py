"""Weight-only int8 for every weight-bearing operator: int8 weights, float activations and compute.

Each float weight of a Conv, ConvTranspose, Gemm, MatMul (constant weight), LSTM / GRU / RNN (W and R;
B stays float) or embedding Gather becomes an int8 initializer with one symmetric scale per output
channel, expanded by ``Cast`` (to float) and ``Mul`` (by the scales) into a tensor with the weight's
old name: every float operator stays as it was and reads float weights, so no activation is ever
quantized. Weights inside If / Loop / Scan bodies are found the same way (a weight is quantized in the
graph that holds it, whichever graph reads it). Biases (1-D) and tensors too small for int8 to pay for
its scales stay float.

Why ``Cast`` + ``Mul`` and not ``DequantizeLinear``: ONNX Runtime's constant folding skips
``DequantizeLinear`` (it keeps Q/DQ pairs for its int8 fusions), so a DQ-fed convolution loses its
prepacked weights and NCHWc layout and runs at about half the float speed (digits CNN, batch 1 and 64:
0.47x / 0.52x); ``Cast`` and ``Mul`` of constants are folded when the session is created, so the
file is about 4x smaller and the model runs at the float speed (1.0x), holding float weights in memory.

Imports nothing of Tugboat beyond :mod:`tugboat.engine.io.onnx_graph`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..io.onnx_graph import graph_nodes, node_subgraphs

# which inputs of an operator are weights: {op type: input positions}
WEIGHT_SLOTS = {"Conv": (1,), "ConvTranspose": (1,), "Gemm": (1,), "MatMul": (1,),
                "LSTM": (1, 2), "GRU": (1, 2), "RNN": (1, 2), "Gather": (0,)}
# the Cast and Mul nodes and their names cost about this many bytes in the file
_NODE_BYTES = 200


@dataclass
class WeightOnlyResult:
    """What :func:`dequant_int8_weights` did: tensors quantized, by op type, and weights left float."""

    tensors: int = 0
    elements: int = 0
    by_op: dict[str, int] = field(default_factory=dict)
    float_nodes: list[str] = field(default_factory=list)  # weight-bearing nodes whose weight stays float
    # named nodes that read an int8 weight (in graph order) -> its elements: what keeping
    # that node float (``exclude``) would give back to float32
    int8_nodes: dict[str, int] = field(default_factory=dict)


def output_axis(node: onnx.NodeProto, slot: int, ndim: int) -> int | None:
    """The axis of the weight read at input ``slot`` of ``node`` that runs over its output channels
    (None: one scale for the whole tensor)."""
    op = node.op_type
    if op == "Conv":
        return 0
    if op == "ConvTranspose":
        return 1  # [C_in, C_out / group, k...]
    if op == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if op == "MatMul":
        return ndim - 1  # [..., K, N]
    if op in ("LSTM", "GRU", "RNN"):
        return 1  # [directions, gates x hidden, inputs]: one scale per gate row, shared by directions
    if op == "Gather":
        return 0 if next((a.i for a in node.attribute if a.name == "axis"), 0) == 0 else None
    return None


def _readers(graph: onnx.GraphProto, name: str, out: list) -> list:
    """``(node, input position)`` of every reader of ``name`` in ``graph`` and its subgraphs."""
    for node in graph.node:
        out.extend((node, i) for i, n in enumerate(node.input) if n == name)
        for sub in node_subgraphs(node):
            if not any(t.name == name for t in sub.initializer) and not any(i.name == name for i in sub.input):
                _readers(sub, name, out)
    return out


@dataclass
class _Walk:
    """What the walk over the graphs shares: the choices, the names in use, the result."""

    exclude: set[str]
    skip_ops: set[str]
    taken: set[str]
    result: WeightOnlyResult


def _plan(graph: onnx.GraphProto, tensor: onnx.TensorProto, walk: _Walk):
    """``((axis, op types), reader nodes)`` to quantize ``tensor`` with, or ``((None, None), nodes left
    float)``: every reader must read it as the weight of a weight-bearing operator that is not excluded."""
    ndim = len(tensor.dims)
    if tensor.data_type != onnx.TensorProto.FLOAT or ndim < 2 or any(i.name == tensor.name for i in graph.input):
        return (None, None), []
    readers = _readers(graph, tensor.name, [])
    weighted = [(n, i) for n, i in readers
                if i in WEIGHT_SLOTS.get(n.op_type, ()) and n.op_type not in walk.skip_ops]
    if not readers or len(weighted) != len(readers):
        return (None, None), []
    if any(n.name and n.name in walk.exclude for n, _ in weighted):
        return (None, None), [n.name for n, _ in weighted]
    axes = {output_axis(n, i, ndim) for n, i in weighted}
    axis = axes.pop() if len(axes) == 1 else None
    channels = tensor.dims[axis] if axis is not None else 1
    if not pays_for_int8(int(np.prod(tensor.dims)), channels):
        return (None, None), [n.name for n, _ in weighted]
    return (axis, sorted({n.op_type for n, _ in weighted})), [n.name for n, _ in weighted]


def pays_for_int8(size: int, channels: int) -> bool:
    """Whether int8 pays for a weight of ``size`` elements with ``channels`` scales (and the Cast
    and Mul nodes that expand it): it saves 3 bytes per element."""
    return 3 * size > 4 * channels + _NODE_BYTES


def quantize_tensor(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 of ``w`` with one scale per index of ``axis`` (None: one for all):
    ``(int8 values, float32 scales shaped to broadcast over w)``; an all-zero channel gets scale 1."""
    w = w.astype(np.float64)
    if axis is None:
        peak = np.array(np.abs(w).max())
    else:
        peak = np.abs(np.moveaxis(w, axis, 0)).reshape(w.shape[axis], -1).max(axis=1)
        peak = peak.reshape([-1 if k == axis else 1 for k in range(w.ndim)])
    scale = np.where(peak > 0, peak / 127.0, 1.0)
    q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def _quantize_graph(graph: onnx.GraphProto, walk: _Walk) -> None:
    """Quantize the weights ``graph`` holds (its subgraphs' own weights first), in place."""
    for node in graph.node:
        for sub in node_subgraphs(node):
            _quantize_graph(sub, walk)
    keep, new_nodes = [], []
    result, taken = walk.result, walk.taken
    for tensor in graph.initializer:
        (axis, ops), readers = _plan(graph, tensor, walk)
        if ops is None:
            result.float_nodes += [n for n in readers if n]
            keep.append(tensor)
            continue
        q, scale = quantize_tensor(numpy_helper.to_array(tensor), axis)
        q_name, s_name = _fresh(f"{tensor.name}_int8", taken), _fresh(f"{tensor.name}_scale", taken)
        keep += [numpy_helper.from_array(q, q_name), numpy_helper.from_array(scale, s_name)]
        cast = _fresh(f"{tensor.name}_int8_float", taken)
        new_nodes += [helper.make_node("Cast", [q_name], [cast], to=onnx.TensorProto.FLOAT,
                                       name=_fresh(f"{tensor.name}_Cast", taken)),
                      helper.make_node("Mul", [cast, s_name], [tensor.name], name=_fresh(f"{tensor.name}_Mul", taken))]
        result.tensors += 1
        result.elements += q.size
        for name in filter(None, readers):
            result.int8_nodes[name] = result.int8_nodes.get(name, 0) + q.size
        for op in ops:
            result.by_op[op] = result.by_op.get(op, 0) + 1
    if new_nodes:
        del graph.initializer[:]
        graph.initializer.extend(keep)
        nodes = new_nodes + list(graph.node)  # the float weights exist before any reader runs
        del graph.node[:]
        graph.node.extend(nodes)


def _fresh(name: str, taken: set[str]) -> str:
    out, i = name, 1
    while out in taken:
        out, i = f"{name}_{i}", i + 1
    taken.add(out)
    return out


def dequant_int8_weights(model: onnx.ModelProto, exclude: list[str] | None = None,
                         skip_ops: tuple[str, ...] = ()) -> tuple[onnx.ModelProto, WeightOnlyResult]:
    """Int8 weights with float activations (see the module): a copy of ``model`` whose weights read by
    the operators of :data:`WEIGHT_SLOTS` (less ``skip_ops``) are int8, expanded by ``Cast`` and
    ``Mul``; weights of nodes named in ``exclude`` stay float."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    result = WeightOnlyResult()
    _quantize_graph(out.graph, _Walk(set(exclude or ()), set(skip_ops), _all_names(out.graph, set()), result))
    result.float_nodes = list(dict.fromkeys(result.float_nodes))
    order = [n.name for n in graph_nodes(out.graph) if n.name in result.int8_nodes]
    result.int8_nodes = {name: result.int8_nodes[name] for name in dict.fromkeys(order)}
    return out, result


def _all_names(graph: onnx.GraphProto, out: set[str]) -> set[str]:
    out |= {i.name for i in graph.input} | {o.name for o in graph.output} | {t.name for t in graph.initializer}
    for node in graph.node:
        out |= set(node.output) | {node.name}
        for sub in node_subgraphs(node):
            _all_names(sub, out)
    return out
