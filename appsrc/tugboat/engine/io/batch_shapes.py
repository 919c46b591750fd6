"""Make a graph converted by onnx2torch savable as a torch file that runs at any batch.

onnx2torch keeps ONNX's shape arithmetic as tensors: ``Shape -> Gather -> Concat -> Reshape``,
``ConstantOfShape`` of a computed size, the pads of ``Pad`` (``torch.onnx`` writes ``F.pad`` that way),
the bounds of ``Slice`` and the axes of ``Squeeze``. Each consumer turns its tensor back into Python
numbers (``torch.Size(shape)``, ``pads.tolist()``), which ``torch.export`` cannot follow (a
data-dependent value) and a TorchScript trace bakes in at the example batch. The model runs, but no
torch file Tugboat writes from it reopens at another batch.

:func:`batch_dynamic` rewrites such consumers to take plain Python numbers. It runs the graph at three
batch sizes and reads the value each consumer receives: a value that is the same at every batch is a
constant; one that changes is kept only when it is ``a * batch + b`` element by element (a flatten's
``[batch, 200]``, a sequence's ``[batch * T, C]``), and becomes that expression of the batch read
from the input at run time. The shape arithmetic that fed the consumers is then dead and removed.
The rewritten module is checked against the original at four batch sizes; anything it cannot
explain, or any difference, leaves the graph as it was (None is returned).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

PROBE_BATCHES = (2, 3, 4)
CHECK_BATCHES = (1, 5)

# the onnx2torch module -> the argument positions that carry shape numbers
_SLOTS = {"OnnxReshape": (1,), "OnnxConstantOfShape": (0,), "OnnxPadDynamic": (1, 2), "OnnxExpand": (1,),
          "OnnxTile": (1,), "OnnxSlice": (1, 2, 3, 4), "OnnxSqueezeDynamicAxes": (1,),
          "OnnxUnsqueezeDynamicAxes": (1,), "OnnxResize": (1, 2, 3), "OnnxResizeV10": (1,)}
_CONSTANT_ONLY = {"OnnxPadDynamic", "OnnxSlice", "OnnxSqueezeDynamicAxes", "OnnxUnsqueezeDynamicAxes",
                  "OnnxResizeV10"}


# ---- the run-time pieces (plain functions: torch.export and a TorchScript trace follow them) ----

def batch_of(x: torch.Tensor, axis: int) -> int:
    return x.shape[axis]


def numbers(batch: int, spec: tuple) -> list:
    """``spec`` holds, per element, a constant or an ``(a, b)`` pair meaning ``a * batch + b``."""
    return [v if not isinstance(v, tuple) else _affine(batch, *v) for v in spec]


def _affine(batch: int, a: int, b: int) -> int:
    if a == 1:
        return batch if b == 0 else batch + b
    return a * batch if b == 0 else a * batch + b


def onnx_reshape(x: torch.Tensor, batch: int, spec: tuple) -> torch.Tensor:
    # ONNX's 0 copies the input's size (decided on the spec's constants: no traced size is compared)
    return torch.reshape(x, [x.shape[i] if not isinstance(v, tuple) and v == 0 else d
                             for i, (v, d) in enumerate(zip(spec, numbers(batch, spec), strict=True))])


def constant_of_shape(batch: int, spec: tuple, fill: Any, dtype: torch.dtype) -> torch.Tensor:
    shape = numbers(batch, spec)
    if all(not isinstance(v, tuple) for v in spec):
        return torch.full(shape, fill, dtype=dtype)
    return filled(shape, fill, dtype)


def filled(shape: Sequence, fill: Any, dtype: torch.dtype) -> torch.Tensor:
    """``torch.full`` whose sizes a trace keeps open: a one-element tensor expanded to them (a
    TorchScript trace, and the ONNX exporter behind a reopened file, bake the sizes of torch.full)."""
    return torch.full([1] * len(shape), fill, dtype=dtype).expand(list(shape))


def onnx_expand(x: torch.Tensor, batch: int, spec: tuple) -> torch.Tensor:
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(numbers(batch, spec))))


def onnx_tile(x: torch.Tensor, batch: int, spec: tuple) -> torch.Tensor:
    return x.repeat(numbers(batch, spec))


def onnx_pad(x: torch.Tensor, pads: list, mode: str, value: float) -> torch.Tensor:
    return F.pad(x, pads, mode=mode, value=value) if mode == "constant" else F.pad(x, pads, mode=mode)


def onnx_slice(x: torch.Tensor, flip: list, pos: list, neg: list) -> torch.Tensor:
    if flip:
        x = torch.flip(x, dims=flip)
    if pos:
        x = x[tuple(pos)]
    if neg:
        x = x[tuple(neg)]
    return x


def resize(x: torch.Tensor, sizes: list | None, scales: list | None, mode: str,
           align_corners: bool | None) -> torch.Tensor:
    return F.interpolate(x, size=sizes, scale_factor=scales, mode=mode, align_corners=align_corners)


def squeeze_axes(x: torch.Tensor, axes: list) -> torch.Tensor:
    return torch.squeeze(x, dim=tuple(axes)) if axes else torch.squeeze(x)


def unsqueeze_axes(x: torch.Tensor, axes: list) -> torch.Tensor:
    for axis in sorted(axes):
        x = torch.unsqueeze(x, axis)
    return x


# ---- probing -------------------------------------------------------------------------------------

class _Recorder(fx.Interpreter):
    """Runs the graph and keeps, for every consumer node, the values of its shape arguments."""

    def __init__(self, gm: fx.GraphModule, consumers: dict[fx.Node, tuple[int, ...]]):
        super().__init__(gm)
        self.consumers, self.seen = consumers, {}

    def run_node(self, n: fx.Node) -> Any:
        if n in self.consumers:
            args = self.fetch_args_kwargs_from_env(n)[0]
            self.seen[n] = [_as_list(args[i]) if i < len(args) else None for i in self.consumers[n]]
        return super().run_node(n)


def _as_list(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().reshape(-1).tolist()
    return value


def _spec(values: Sequence[list | None], batches: Sequence[int]) -> tuple | bool | None:
    """The affine description of one argument seen at ``batches``; False when it is not one."""
    if all(v is None for v in values):
        return None
    if any(v is None or len(v) != len(values[0]) for v in values):
        return False
    out = []
    for column in zip(*values, strict=True):
        if all(c == column[0] for c in column):
            out.append(column[0])
            continue
        (b0, b1), (v0, v1) = batches[:2], column[:2]
        a = (v1 - v0) / (b1 - b0)
        if a != int(a) or any(int(a) * b + (v0 - int(a) * b0) != v for b, v in zip(batches, column, strict=True)):
            return False
        out.append((int(a), int(v0 - int(a) * b0)))
    return tuple(out)


# ---- rewriting -----------------------------------------------------------------------------------

def _kind(gm: fx.GraphModule, n: fx.Node) -> str:
    return type(gm.get_submodule(n.target)).__name__ if n.op == "call_module" else ""


def _replacement(gm: fx.GraphModule, n: fx.Node, kind: str, specs: list, batch: fx.Node):
    """(function, args) replacing consumer ``n``, or None when its values do not allow it."""
    module = gm.get_submodule(n.target)
    is_constant = all(s is None or not any(isinstance(v, tuple) for v in s) for s in specs)
    if kind in _CONSTANT_ONLY and not is_constant:
        return None
    if kind == "OnnxReshape":
        return onnx_reshape, (n.args[0], batch, specs[0])
    if kind == "OnnxConstantOfShape":
        return constant_of_shape, (batch, specs[0], module.value.item(), module.value.dtype)
    if kind == "OnnxExpand":
        return onnx_expand, (n.args[0], batch, specs[0])
    if kind == "OnnxTile":
        return onnx_tile, (n.args[0], batch, specs[0])
    if kind == "OnnxPadDynamic":
        return _pad(module, n, specs)
    if kind in ("OnnxResize", "OnnxResizeV10"):
        return _resize(module, n, specs)
    if kind == "OnnxSlice":
        return _slice(n, specs)
    axes = list(specs[0] or [])
    return (squeeze_axes if kind == "OnnxSqueezeDynamicAxes" else unsqueeze_axes), (n.args[0], axes)


def _pad(module: nn.Module, n: fx.Node, specs: list):
    from onnx2torch.node_converters.pad import _onnx_padding_to_torch, _torch_padding_to_mode_format

    pads = _torch_padding_to_mode_format(_onnx_padding_to_torch(list(specs[0])), module.mode)
    value = specs[1][0] if specs[1] else 0.0
    return onnx_pad, (n.args[0], list(pads), module.mode, float(value))


def _resize(module: nn.Module, n: fx.Node, specs: list):
    """F.interpolate with constant target sizes or scales (the batch and channels are never resized)."""
    from onnx2torch.node_converters.resize import _onnx_mode_to_torch_mode

    if type(module).__name__ == "OnnxResizeV10":
        module, specs = module._resize, [None, specs[0], None]
    roi, scales, sizes = (specs + [None] * 3)[:3]
    if roi and not module.ignore_roi:
        return None
    sizes = list(sizes[2:]) if sizes else None
    if sizes and any(isinstance(v, tuple) for v in sizes):
        return None
    scales = [float(v) for v in scales[2:]] if scales and not sizes else None
    rank = len(sizes or scales or [])
    mode = _onnx_mode_to_torch_mode(module.onnx_mode, rank)
    return resize, (n.args[0], [int(v) for v in sizes] if sizes else None, scales, mode, module.align_corners)


def _slice(n: fx.Node, specs: list):
    from onnx2torch.node_converters.slice import _get_slices

    starts, ends, axes, steps = (None if s is None else torch.tensor(s) for s in (specs + [None] * 4)[:4])
    flip, pos, neg = _get_slices(starts.tolist(), ends.tolist(), axes, steps)
    return onnx_slice, (n.args[0], [int(d) for d in flip], _plain(pos), _plain(neg))


def _plain(slices: list) -> list:
    """Slices of Python ints (numpy integers would not survive the generated code)."""
    def num(v):
        return None if v is None else int(v)
    return [s if not isinstance(s, slice) else slice(num(s.start), num(s.stop), num(s.step)) for s in slices]


def _probe(gm: fx.GraphModule, consumers: dict, inputs: Callable[[int], list]) -> dict[fx.Node, list]:
    runs = []
    with torch.no_grad():
        for b in PROBE_BATCHES:
            rec = _Recorder(gm, consumers)
            rec.run(*inputs(b))
            runs.append(rec.seen)
    specs = {}
    for n, slots in consumers.items():
        per_slot = [_spec([run[n][k] for run in runs], PROBE_BATCHES) if all(n in r for r in runs) else False
                    for k in range(len(slots))]
        if all(s is not False for s in per_slot):
            specs[n] = per_slot
    return specs


def _rewrite(gm: fx.GraphModule, specs: dict, batch_input: int, batch_axis: int) -> int:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    with gm.graph.inserting_after(placeholders[-1]):
        batch = gm.graph.call_function(batch_of, (placeholders[batch_input], batch_axis))
    done = 0
    for n, slot_specs in specs.items():
        new = _replacement(gm, n, _kind(gm, n), slot_specs, batch)
        if new is None:
            continue
        with gm.graph.inserting_before(n):
            repl = gm.graph.call_function(new[0], new[1])
        n.replace_all_uses_with(repl)
        gm.graph.erase_node(n)
        done += 1
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return done


def _same(a: nn.Module, b: nn.Module, inputs: Callable[[int], list]) -> bool:
    with torch.no_grad():
        for batch in CHECK_BATCHES:
            xs = inputs(batch)
            ya, yb = a(*xs), b(*xs)
            ya, yb = (ya if isinstance(ya, list | tuple) else [ya]), (yb if isinstance(yb, list | tuple) else [yb])
            for p, q in zip(ya, yb, strict=True):
                if p.shape != q.shape or not torch.allclose(p, q, rtol=1e-4, atol=1e-5):
                    return False
    return True


def batch_dynamic(module: nn.Module, inputs: Callable[[int], list], *, batch_input: int = 0,
                  batch_axis: int = 0) -> fx.GraphModule | None:
    """A copy of the converted graph ``module`` whose shape arithmetic is plain Python of the batch
    (read from input ``batch_input`` on ``batch_axis``), or None when there is nothing to rewrite or
    the rewrite does not compute the same. ``inputs(b)`` gives example inputs at batch ``b``."""
    if not isinstance(module, fx.GraphModule):
        return None
    consumers = {n: _SLOTS[k] for n in module.graph.nodes if (k := _kind(module, n)) in _SLOTS}
    if not consumers:
        return None
    try:
        specs = _probe(module, consumers, inputs)
        gm = copy.deepcopy(module)
        by_name = {n.name: n for n in gm.graph.nodes}
        if not _rewrite(gm, {by_name[n.name]: s for n, s in specs.items()}, batch_input, batch_axis):
            return None
        return gm if _same(module, gm, inputs) else None
    except Exception:
        return None
