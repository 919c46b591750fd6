"""onnx2torch converters for ONNX operators it lacks: ``LSTM`` and ``GRU``, and the opset-16 versions
of ``GreaterOrEqual`` / ``LessOrEqual`` (which only added types; the legacy exporter writes them for
an attention mask); and fixes of two it gets wrong (``Softmax`` of opset 1-12, ``Flatten`` at axis 0
or at the input's rank).

Without them every recurrent graph (Silero VAD's LSTM cell, speech and text RNNs) stays ONNX-only:
measured and quantized in ONNX Runtime, but not prunable or trainable. Each node becomes a real
``nn.LSTM`` / ``nn.GRU`` whose weights are the node's, re-ordered from ONNX's gate order
(LSTM ``i o f c``, GRU ``z r h``) to torch's (``i f g o``, ``r z n``). What torch's layers cannot do
is refused, so onnx2torch reports the operator: other activations, ``clip``, peepholes, per-sample
``sequence_lens``, LSTM ``input_forget``, GRU ``linear_before_reset = 0``.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

_REGISTERED = False


class OnnxRecurrent(nn.Module):
    """An ``nn.LSTM`` / ``nn.GRU`` with ONNX's inputs and outputs: (X, initial_h[, initial_c]) ->
    (Y [seq, dirs, batch, hidden], Y_h[, Y_c])."""

    def __init__(self, rnn: nn.Module, batch_first: bool, has_h: bool, has_c: bool):
        super().__init__()
        self.rnn, self.batch_first, self.has_h, self.has_c = rnn, batch_first, has_h, has_c

    def forward(self, x: torch.Tensor, *state: torch.Tensor):
        lstm = isinstance(self.rnn, nn.LSTM)
        h0 = state[0] if self.has_h else None
        c0 = state[1 if self.has_h else 0] if self.has_c else None
        dirs = 2 if self.rnn.bidirectional else 1
        batch = x.shape[0] if self.batch_first else x.shape[1]
        # zeros made from x itself, so that a trace (the ONNX export of an edited model) keeps the batch
        # open; not zeros_like (the export folds it) nor ``* 0`` (a reloaded TorchScript trace exports
        # the 0 as an int64 constant: Mul(float, int64) then fails in ONNX Runtime)
        first = x[:, :1, :1] if self.batch_first else x[:1, :, :1]
        first = first.transpose(0, 1) if self.batch_first else first
        zeros = (first - first).expand(dirs, -1, self.rnn.hidden_size)
        if lstm:
            y, state = self.rnn(x, (zeros if h0 is None else h0, zeros if c0 is None else c0))
        elif h0 is None:
            y, state = self.rnn(x, zeros)
        else:
            y, state = self.rnn(x, h0)
        h, c = state if lstm else (state, None)
        steps = y.shape[1] if self.batch_first else y.shape[0]
        if self.batch_first:  # ONNX layout 1: Y [batch, seq, dirs, hidden]
            y = y.reshape(batch, steps, dirs, self.rnn.hidden_size)
            h = h.transpose(0, 1)
            c = c.transpose(0, 1) if c is not None else None
        else:
            y = y.reshape(steps, batch, dirs, self.rnn.hidden_size).transpose(1, 2)
        return (y, h, c) if lstm else (y, h)


def _reorder(w: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    return torch.cat([w.chunk(len(order), 0)[i] for i in order], 0)


def _convert(node, graph, kind: str):
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult

    attrs = node.attributes
    names = list(node.input_values) + [""] * (8 - len(node.input_values))
    x, w, r, b, lens, h0, c0, peep = names[:8]
    acts = [a.decode() if isinstance(a, bytes) else a for a in attrs.get("activations", [])]
    default = ["Sigmoid", "Tanh", "Tanh"] if kind == "LSTM" else ["Sigmoid", "Tanh"]
    direction = attrs.get("direction", "forward")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    if (any(n and n not in graph.initializers for n in (w, r, b)) or lens or peep or attrs.get("clip")
            or attrs.get("input_forget", 0) or direction == "reverse"
            or (acts and acts != default * (2 if direction == "bidirectional" else 1))
            or (kind == "GRU" and not attrs.get("linear_before_reset", 0))):
        raise NotImplementedError(f"Converter is not implemented ({kind} with options torch has no layer for)")
    weights = {n: graph.initializers[n].to_torch() for n in (w, r, b) if n}
    hidden = int(attrs["hidden_size"])
    dirs = 2 if direction == "bidirectional" else 1
    size_in = weights[w].shape[-1]
    order = (0, 2, 3, 1) if kind == "LSTM" else (1, 0, 2)
    layer = (nn.LSTM if kind == "LSTM" else nn.GRU)(size_in, hidden, bidirectional=dirs == 2,
                                                    batch_first=bool(attrs.get("layout", 0)))
    gates = 4 if kind == "LSTM" else 3
    bias = weights[b] if b else torch.zeros(dirs, 2 * gates * hidden)
    with torch.no_grad():
        for d in range(dirs):
            suffix = "_reverse" if d else ""
            getattr(layer, f"weight_ih_l0{suffix}").copy_(_reorder(weights[w][d], order))
            getattr(layer, f"weight_hh_l0{suffix}").copy_(_reorder(weights[r][d], order))
            getattr(layer, f"bias_ih_l0{suffix}").copy_(_reorder(bias[d][: gates * hidden], order))
            getattr(layer, f"bias_hh_l0{suffix}").copy_(_reorder(bias[d][gates * hidden:], order))
    h0 = "" if h0 and _zero_state(graph, h0) else h0
    c0 = "" if c0 and _zero_state(graph, c0) else c0
    module = OnnxRecurrent(layer, layer.batch_first, bool(h0), bool(c0) and kind == "LSTM")
    inputs = tuple(n for n in (x, h0, c0 if kind == "LSTM" else "") if n)
    return OperationConverterResult(torch_module=module, onnx_mapping=OnnxMapping(inputs=inputs,
                                                                                 outputs=node.output_values))


def _zero_state(graph, name: str) -> bool:
    """Whether an initial state is all zeros made from a shape (``ConstantOfShape`` of 0, perhaps
    reshaped): the layer then starts from zeros itself, and an export keeps the batch open."""
    for _ in range(8):
        try:
            node, _index = graph.value_as_node_output(name)
        except KeyError:
            return False
        if node.operation_type == "ConstantOfShape":
            value = node.attributes.get("value")
            return value is None or not bool(value.to_torch().any())
        if node.operation_type not in ("Unsqueeze", "Squeeze", "Reshape", "Identity", "Cast", "Expand"):
            return False
        name = node.input_values[0]
    return False


def register() -> None:
    """Add the converters to onnx2torch's registry (once; onnx2torch must be importable)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from onnx2torch.node_converters.registry import add_converter


    for kind, versions in (("LSTM", (7, 14)), ("GRU", (7, 14))):
        for version in versions:
            with contextlib.suppress(ValueError):  # a later onnx2torch that has its own
                add_converter(operation_type=kind, version=version)(
                    lambda node, graph, kind=kind: _convert(node, graph, kind))
    from onnx2torch.node_converters.comparisons import OnnxCompare
    from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node

    def compare(node, graph):
        return OperationConverterResult(torch_module=OnnxCompare(operation_type=node.operation_type),
                                        onnx_mapping=onnx_mapping_from_node(node=node))

    for kind in ("GreaterOrEqual", "LessOrEqual"):
        with contextlib.suppress(ValueError):
            add_converter(operation_type=kind, version=16)(compare)
    from onnx2torch.node_converters.activations import OnnxSoftmaxV1V11

    OnnxSoftmaxV1V11.forward = _softmax_v1_v11
    from onnx2torch.node_converters.flatten import OnnxFlatten

    OnnxFlatten.forward = _flatten
    _REGISTERED = True


def _softmax_v1_v11(self, x: torch.Tensor) -> torch.Tensor:
    """Softmax of opset 1-12 (over the input flattened from ``axis`` on), reshaped back *like the
    input*: onnx2torch's own reshapes to ``x.shape``, which an ONNX export of the edited model (a
    trace) freezes at the example's batch, so the pruned or trained file then ran at one batch only."""
    flat = torch.flatten(x, start_dim=self.axis)
    out = torch.log_softmax(flat, -1) if self.is_log else torch.softmax(flat, -1)
    return out.reshape_as(x)


def _flatten(self, x: torch.Tensor) -> torch.Tensor:
    """ONNX Flatten: ``[prod(shape[:axis]), prod(shape[axis:])]`` for every axis from 0 to the rank.
    onnx2torch's flattens twice with ``start_dim=1``, which fails ("Dimension out of range") when
    ``axis`` is 0 or the rank: a BERT export flattens its ``[batch, sequence]`` mask with axis 2."""
    axis = self.axis if self.axis >= 0 else self.axis + x.dim()
    if axis == 0:
        x, axis = x.unsqueeze(0), 1
    if axis == x.dim():
        x = x.unsqueeze(-1)
    return torch.flatten(torch.flatten(x, end_dim=axis - 1), start_dim=1)
