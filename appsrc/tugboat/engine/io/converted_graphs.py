"""Make graphs converted by onnx2torch prunable: show torch-pruning the real channel structure.

onnx2torch turns every ONNX node into a module of a ``torch.fx.GraphModule``. Weights that ONNX kept
outside a Conv / Gemm become *buffers* that torch-pruning cannot see and so never slices:

* a convolution without bias followed by ``Add(conv, Reshape(bias, [1, C, 1, 1]))`` (Paddle exports,
  e.g. the RapidOCR models) or ``Add(conv_transpose, bias[1, C, 1, 1])``;
* per-channel scales and shifts (``Mul`` / ``Add`` / ``Sub`` / ``Div`` by a ``[1, C, 1, 1]`` constant);
* a classifier written as ``MatMul(x, W)`` (+ ``Add(b)``) with a constant ``W``;
* a flatten written as ``Reshape(x, Concat(Shape(x)[:1], [200]))``: the 200 is a constant.

After pruning their producer these constants still hold ``C`` values, and the model fails with
"The size of tensor a (18) must match the size of tensor b (24)". :func:`normalise_for_pruning`
rewrites such a graph into the same function with native, prunable parts: such reshapes as
``torch.flatten(x, 1)``, biases folded into the
producing Conv / Linear, ``MatMul`` by a constant matrix as ``nn.Linear`` (so the classifier is found and
kept whole), and the remaining per-channel constants as :class:`ChannelConstant` modules holding a
parameter that :class:`ChannelConstantPruner` slices together with their channels. Elementwise ops
between two activations (residual additions, squeeze-excite multiplications) are already coupled by
torch-pruning's autograd tracing; a depthwise convolution is pruned with its producer by torch-pruning's
group-convolution rule once nothing else hides the channels. Constants are folded so that a
``Reshape`` or ``Cast`` of a weight counts as the weight.
"""

from __future__ import annotations

import math
import operator
from typing import Any

from ..lazy import fx, nn, torch

_ADD = {torch.add, operator.add}
_SUB = {torch.sub, operator.sub}
_MUL = {torch.mul, operator.mul}
_DIV = {torch.div, operator.truediv}


def _op_of(gm: fx.GraphModule, node: fx.Node):
    """The binary function a node applies (``torch.add`` ...), or None."""
    if node.op == "call_function" and node.target in _ADD | _SUB | _MUL | _DIV:
        return node.target
    if node.op == "call_module" and type(gm.get_submodule(node.target)).__name__ == "OnnxBinaryMathOperation":
        mod = gm.get_submodule(node.target)
        if getattr(mod, "broadcast", None) == 1 and getattr(mod, "axis", None) is not None:
            return None  # old-style axis broadcast: leave as is
        fn = mod.math_op_function
        if fn in _ADD | _SUB | _MUL:
            return fn
        if getattr(fn, "__name__", "") == "_onnx_div":
            return torch.div  # float division (integer inputs are never weights)
    return None


def _is(gm: fx.GraphModule, node: fx.Node, module_type: str, functions: tuple, methods: tuple) -> bool:
    """Whether ``node`` is an onnx2torch ``module_type`` module, one of ``functions`` or a ``methods`` call."""
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__ == module_type
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target in methods


def _kind(fn) -> str:
    return "add" if fn in _ADD else "sub" if fn in _SUB else "mul" if fn in _MUL else "div"


class ChannelConstant(nn.Module):
    """``x op c`` (or ``c op x``) with a per-channel constant ``c`` kept as a prunable parameter."""

    def __init__(self, value: torch.Tensor, op: str, constant_first: bool, dim: int):
        super().__init__()
        self.value = nn.Parameter(value.detach().clone().float(), requires_grad=True)
        self.op = op
        self.constant_first = constant_first
        self.dim = dim  # the axis of ``value`` that holds the channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.value.to(x.dtype)
        a, b = (c, x) if self.constant_first else (x, c)
        if self.op == "add":
            return a + b
        if self.op == "sub":
            return a - b
        if self.op == "mul":
            return a * b
        return a / b

    def extra_repr(self) -> str:
        return f"op={self.op}, shape={tuple(self.value.shape)}, dim={self.dim}"


def channel_constant_pruner():
    """torch-pruning's pruner for :class:`ChannelConstant`: inputs and outputs are the same channels."""
    import torch_pruning as tp

    class ChannelConstantPruner(tp.pruner.function.BasePruningFunc):
        def prune_out_channels(self, layer: ChannelConstant, idxs):
            keep = sorted(set(range(layer.value.shape[layer.dim])) - set(int(i) for i in idxs))
            layer.value = nn.Parameter(torch.index_select(layer.value.data, layer.dim, torch.tensor(keep)),
                                       requires_grad=layer.value.requires_grad)
            return layer

        prune_in_channels = prune_out_channels

        def get_out_channels(self, layer: ChannelConstant):
            return layer.value.shape[layer.dim]

        get_in_channels = get_out_channels

    return ChannelConstantPruner()


def _constants(gm: fx.GraphModule) -> dict[fx.Node, Any]:
    """Values of the nodes that do not depend on the inputs (weights, shapes, their reshapes)."""
    known: dict[fx.Node, Any] = {}

    def value(a):
        return fx.node.map_arg(a, lambda n: known[n])

    def all_known(n: fx.Node) -> bool:
        deps = n.all_input_nodes
        return all(d in known for d in deps)

    for n in gm.graph.nodes:
        try:
            if n.op == "get_attr":
                known[n] = _getattr_path(gm, n.target)
            elif n.op == "call_module" and all_known(n):
                mod = gm.get_submodule(n.target)
                if any(True for _ in mod.parameters()):
                    continue
                with torch.no_grad():
                    known[n] = mod(*value(n.args), **value(n.kwargs))
            elif n.op == "call_function" and all_known(n) and n.all_input_nodes:
                with torch.no_grad():
                    known[n] = n.target(*value(n.args), **value(n.kwargs))
        except Exception:  # a node that cannot run alone is simply not a constant
            continue
    return known


def _getattr_path(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _shapes(gm: fx.GraphModule, example: tuple[torch.Tensor, ...]) -> dict[fx.Node, torch.Size]:
    """The output shape of every tensor-valued node at the example inputs."""
    from torch.fx.passes.shape_prop import ShapeProp

    with torch.no_grad():
        ShapeProp(gm).propagate(*example)
    out = {}
    for n in gm.graph.nodes:
        meta = n.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            out[n] = meta.shape
    return out


def _channel_axis(rank: int) -> int:
    """The channel axis of an activation: 1 for [N, C, ...] maps, the last for [N, C] features."""
    return 1 if rank >= 3 else rank - 1


def _per_channel(c: torch.Tensor, shape: torch.Size) -> int | None:
    """The axis of ``c`` (aligned to ``shape`` by broadcasting) holding one value per channel, or None
    when ``c`` is a scalar, varies along another axis too, or does not broadcast that way."""
    if not isinstance(c, torch.Tensor) or not c.is_floating_point() or c.numel() <= 1 or c.dim() > len(shape):
        return None
    axis = _channel_axis(len(shape))
    offset = len(shape) - c.dim()
    if len(shape) == 3 and c.shape[-1] == shape[-1] and c.numel() == shape[-1] != shape[axis]:
        axis = 2  # [batch, steps, features] (a transformer's LayerNorm scale): one value per feature
    for i, size in enumerate(c.shape):
        if i + offset == axis:
            if size != shape[axis]:
                return None
        elif size != 1:
            return None
    if axis - offset < 0:
        return None
    return axis - offset


_PRODUCERS = (nn.modules.conv._ConvNd, nn.Linear)


def _out_channels(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def normalise_for_pruning(gm: nn.Module, example: tuple[torch.Tensor, ...]) -> dict[str, int]:
    """Rewrite an onnx2torch ``GraphModule`` in place (same outputs) so torch-pruning can prune it.

    Returns counts of what changed: ``{"flatten", "matmul_to_linear", "bias_folded", "channel_constants",
    "head_reshapes", "fixed_channels"}`` (the last: layers whose output channels pruning must keep, see
    _fix_split_channels).
    Any other module is left untouched (an empty dict)."""
    counts = {"flatten": 0, "matmul_to_linear": 0, "bias_folded": 0, "channel_constants": 0, "head_reshapes": 0}
    if not isinstance(gm, fx.GraphModule):
        return {}
    known = _constants(gm)
    graph = gm.graph
    shapes = _shapes(gm, example)
    _rewrite_flattens(gm, known, shapes, counts)
    _matmuls_to_linear(gm, known, shapes, counts)
    _channel_constants(gm, known, shapes, counts)
    _rewrite_head_reshapes(gm, known, shapes, counts)

    if any(counts.values()):
        graph.eliminate_dead_code()
        graph.lint()
        gm.recompile()
        gm.delete_all_unused_submodules()
    counts["fixed_channels"] = _fix_split_channels(gm, known)
    return counts

def _rewrite_flattens(gm: fx.GraphModule, known: dict[fx.Node, Any], shapes: dict, counts: dict[str, int]) -> None:
    # 0. a Reshape to [N, C*H*W] (a flatten whose target size is partly written down as a constant,
    #    which goes stale once channels are removed): torch.flatten(x, 1)
    for n, x, si, so in _reshapes(gm, known, shapes):
        if len(si) > 2 and len(so) == 2 and so[0] == si[0] and so[1] == math.prod(si[1:]):
            _replace(gm, n, torch.flatten, (x, 1), shapes)
            counts["flatten"] += 1


def _reshapes(gm: fx.GraphModule, known: dict[fx.Node, Any], shapes: dict):
    """(node, input, input shape, output shape) of every Reshape of a computed (not constant) input
    whose shapes were recorded."""
    for n in list(gm.graph.nodes):
        if not _is(gm, n, "OnnxReshape", (torch.reshape,), ("reshape", "view")) or not n.args:
            continue
        x = n.args[0]
        if isinstance(x, fx.Node) and x not in known and x in shapes and n in shapes:
            yield n, x, tuple(shapes[x]), tuple(shapes[n])


def _replace(gm: fx.GraphModule, n: fx.Node, fn, args: tuple, shapes: dict) -> fx.Node:
    """``n`` replaced by ``fn(*args)`` (same meta and recorded shape)."""
    with gm.graph.inserting_after(n):
        new = gm.graph.call_function(fn, args)
    new.meta = dict(n.meta)
    n.replace_all_uses_with(new)
    gm.graph.erase_node(n)
    shapes[new] = shapes[n]
    return new


def _matmuls_to_linear(gm: fx.GraphModule, known: dict[fx.Node, Any], shapes: dict, counts: dict[str, int]) -> None:
    graph = gm.graph
    # 1. MatMul(x, W) with a constant 2-D W: a Linear layer (the classifier of many converted graphs)
    for n in list(graph.nodes):
        if not _is(gm, n, "OnnxMatMul", (torch.matmul, operator.matmul), ()) or len(n.args) != 2 or n.kwargs:
            continue
        x, w = n.args
        wv = known.get(w) if isinstance(w, fx.Node) else None
        if x in known or not isinstance(wv, torch.Tensor) or wv.dim() != 2 or not wv.is_floating_point():
            continue
        lin = nn.Linear(wv.shape[0], wv.shape[1], bias=False)
        lin.weight = nn.Parameter(wv.detach().t().contiguous().float())
        if n.op == "call_module":
            gm.add_submodule(n.target, lin)
            n.args = (x,)
        else:
            name = f"{n.name}_linear"
            gm.add_submodule(name, lin)
            with graph.inserting_after(n):
                new = graph.call_module(name, (x,))
            n.replace_all_uses_with(new)
            graph.erase_node(n)
            if n in shapes:
                shapes[new] = shapes[n]
        counts["matmul_to_linear"] += 1


def _channel_constants(gm: fx.GraphModule, known: dict[fx.Node, Any], shapes: dict, counts: dict[str, int]) -> None:
    graph = gm.graph
    # 2. producer + constant bias -> the producer's bias; 3. other per-channel constants -> ChannelConstant
    for n in list(graph.nodes):
        fn = _op_of(gm, n)
        if fn is None or len(n.args) != 2 or n.kwargs or n not in shapes:
            continue
        a, b = n.args
        a_const = isinstance(a, fx.Node) and a in known
        b_const = isinstance(b, fx.Node) and b in known
        if a_const == b_const:
            continue
        x, c_node = (b, a) if a_const else (a, b)
        if not isinstance(x, fx.Node) or x in known:
            continue
        c = known[c_node]
        axis = _per_channel(c, shapes[n])
        if axis is None or shapes.get(x) != shapes[n]:
            continue
        prod = gm.get_submodule(x.target) if x.op == "call_module" else None
        if (fn in _ADD and isinstance(prod, _PRODUCERS) and len(x.users) == 1
                and _out_channels(prod) == c.numel()):
            bias = c.detach().reshape(-1).float()
            if prod.bias is not None:
                bias = prod.bias.data + bias
            prod.bias = nn.Parameter(bias.clone())
            n.replace_all_uses_with(x)
            graph.erase_node(n)
            counts["bias_folded"] += 1
            continue
        name = f"{n.name}_channel_constant"
        gm.add_submodule(name, ChannelConstant(c, _kind(fn), constant_first=a_const, dim=axis))
        with graph.inserting_after(n):
            new = graph.call_module(name, (x,))
        n.replace_all_uses_with(new)
        graph.erase_node(n)
        shapes[new] = shapes[n]  # a constant right after it (LayerNorm's shift after its scale) follows
        counts["channel_constants"] += 1



NUM_HEADS = "tugboat_num_heads"  # set on a layer whose outputs are split into this many heads further on


def _rewrite_head_reshapes(gm: fx.GraphModule, known: dict[fx.Node, Any], shapes: dict,
                           counts: dict[str, int]) -> None:
    """An attention's split into heads, ``Reshape(x [.., C], [.., H, C / H])``, and its merge back,
    ``Reshape(y [.., H, D], [.., H * D])``, write the head size into a shape computed from constants
    (BERT's ``Concat(batch, sequence, 12, 32)``), which goes stale once head dimensions are pruned:
    they become ``unflatten(x, -1, (H, -1))`` and ``flatten(y, -2)``, which follow. The layers whose
    outputs are split get ``NUM_HEADS`` = H, so pruning removes the same share of every head's
    dimensions (torch-pruning's ``num_heads``) and keeps the heads."""
    for n, x, si, so in _reshapes(gm, known, shapes):
        if (len(so) == len(si) + 1 >= 3 and so[:-2] == si[:-1] and so[-2] * so[-1] == si[-1] and so[-1] > 1
                and len(n.args) > 1 and _written_tail(gm, n.args[1], known)):
            fn, args = torch.unflatten, (x, -1, (so[-2], -1))
        elif len(si) == len(so) + 1 >= 4 and si[:-2] == so[:-1] and si[-2] * si[-1] == so[-1]:
            fn, args = torch.flatten, (x, -2)
        else:
            continue
        _replace(gm, n, fn, args, shapes)
        counts["head_reshapes"] += 1
        if fn is torch.unflatten:
            _mark_heads(gm, x, known, so[-2], si[-1])


def _written_tail(gm: fx.GraphModule, shape: Any, known: dict[fx.Node, Any]) -> bool:
    """Whether a Reshape's target ends in two sizes written down as constants (heads and head size),
    the rest computed from the input: ``Concat(batch, sequence, 12, 32)``. A size read from the input
    there (a sequence split off a flattened map) must stay read at run time."""
    if not isinstance(shape, fx.Node):
        return False
    if shape in known:
        return True
    if not _is(gm, shape, "OnnxConcat", (torch.cat,), ()):
        return False
    parts = list(shape.args[0] if shape.op == "call_function" else shape.args)
    tail, count = list(reversed(parts)), 0
    for part in tail:
        value = known.get(part) if isinstance(part, fx.Node) else None
        if value is None:
            return False
        count += int(torch.as_tensor(value).numel())
        if count >= 2:
            return True
    return False


def _mark_heads(gm: fx.GraphModule, start: fx.Node, known: dict[fx.Node, Any], heads: int, width: int) -> None:
    """Give the Linear layers of ``width`` outputs that produce ``start`` (through anything but other
    layers) ``NUM_HEADS``; any other layer found there, or one split two ways, keeps its output
    channels instead."""
    for _node, layer in _layers_behind(gm, [start], known):
        if not isinstance(layer, nn.Linear) or layer.out_features != width or \
                getattr(layer, NUM_HEADS, heads) != heads:
            setattr(layer, KEEP_OUT_CHANNELS, True)
        else:
            setattr(layer, NUM_HEADS, heads)


def _layers_behind(gm: fx.GraphModule, starts: list, known: dict[fx.Node, Any], stop=lambda node: False):
    """``(node, layer)`` for each layer (:data:`_PRODUCERS`) reached walking back from ``starts``
    through everything but other layers, graph inputs, computed constants (``known``) and the nodes
    ``stop`` says end the walk; each node once."""
    todo, seen = list(starts), set()
    while todo:
        node = todo.pop()
        if not isinstance(node, fx.Node) or node in seen or node in known or node.op == "placeholder":
            continue
        seen.add(node)
        layer = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(layer, _PRODUCERS):
            yield node, layer
        elif not stop(node):
            todo.extend(node.all_input_nodes)


# --- If nodes that only test shapes -----------------------------------------------------------------

def fold_static_ifs(model, feeds: list[dict[str, Any]]):
    """A copy of ONNX ``model`` whose top-level ``If`` nodes that take the same branch for every feed
    (at several batch sizes: tests on ranks and on fixed sizes, such as the exporter's
    ``If(size == 1, Squeeze, Identity)``) are replaced by that branch; None when none folds.
    onnx2torch cannot convert ``If``; the folded graph computes the same for inputs of these shapes."""
    import onnx

    work = model
    folded_any = False
    for _ in range(8):  # a folded branch can bring nested Ifs to the top level
        conditions = _if_conditions(work, feeds)
        if not conditions:
            break
        work = _inline_branches(onnx, work, conditions)
        folded_any = True
    return work if folded_any else None


def _if_conditions(model, feeds: list[dict[str, Any]]) -> dict[str, bool]:
    """The condition of each top-level If that is the same for every feed."""
    names = sorted({n.input[0] for n in model.graph.node if n.op_type == "If"})
    return {k: bool(v) for k, v in _steady_values(model, names, feeds).items()}


def _steady_values(model, names: list[str], feeds: list[dict[str, Any]]) -> dict[str, Any]:
    """The values of ``names`` that are the same at every feed (ONNX Runtime runs the graph with them
    as extra outputs); none when the graph does not run."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    if not names:
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    for name in names:
        if name not in have:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    try:
        session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        runs = [dict(zip([o.name for o in session.get_outputs()], session.run(None, feed))) for feed in feeds]
    except Exception:
        return {}
    return {name: runs[0][name] for name in names
            if all(np.array_equal(run[name], runs[0][name]) for run in runs)}


def _inline_branches(onnx, model, conditions: dict[str, bool]):
    work = onnx.ModelProto()
    work.CopyFrom(model)
    nodes = []
    for node in work.graph.node:
        if node.op_type != "If" or node.input[0] not in conditions:
            nodes.append(node)
            continue
        wanted = "then_branch" if conditions[node.input[0]] else "else_branch"
        branch = next(a.g for a in node.attribute if a.name == wanted)
        work.graph.initializer.extend(branch.initializer)
        nodes.extend(branch.node)
        for inner, outer in zip(branch.output, node.output):
            nodes.append(onnx.helper.make_node("Identity", [inner.name], [outer], name=f"{outer}_from_branch"))
    del work.graph.node[:]
    work.graph.node.extend(nodes)
    return work


_LAYER_OPS = {"Conv", "ConvTranspose", "Gemm", "BatchNormalization", "LayerNormalization", "LSTM", "GRU",
              "InstanceNormalization", "Clip"}  # Clip: onnx2torch takes its min / max only from initializers


def lift_layer_constants(model) -> int:
    """Turn ``Constant`` nodes that feed a layer's weights (a one-channel convolution's one-element
    bias, which ``models.lift_constant_weights`` leaves as a scalar; a Clip's bounds) into initializers,
    in place: onnx2torch looks for them only among initializers. Returns how many."""
    import onnx

    for node in model.graph.node:  # an omitted optional input written as "" (Clip's max): onnx2torch
        while node.input and not node.input[-1]:  # looks the empty name up as a value
            del node.input[-1]
    wanted = _layer_weight_inputs(model)
    keep, count = [], 0
    for node in model.graph.node:
        value = next((a.t for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR),
                     None)
        if node.op_type == "Constant" and value is not None and len(node.output) == 1 and node.output[0] in wanted:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value)
            tensor.name = node.output[0]
            model.graph.initializer.append(tensor)
            count += 1
        else:
            keep.append(node)
    if count:
        del model.graph.node[:]
        model.graph.node.extend(keep)
    return count


def _layer_weight_inputs(model) -> set[str]:
    return {i for n in model.graph.node if n.op_type in _LAYER_OPS for i in list(n.input)[1:] if i}


def layer_constants_lifted(model):
    """``model`` itself when :func:`lift_layer_constants` has nothing to do, else a lifted copy (the
    original stays the deployable graph)."""
    import onnx

    constants = {n.output[0] for n in model.graph.node if n.op_type == "Constant" and len(n.output) == 1}
    if not (constants & _layer_weight_inputs(model)) and all(not n.input or n.input[-1] for n in model.graph.node):
        return model
    work = onnx.ModelProto()
    work.CopyFrom(model)
    lift_layer_constants(work)
    return work


def widen_edge_pads(model, feeds: list[dict[str, Any]]) -> int:
    """torch pads in ``reflect`` / ``replicate`` mode only from rank 3 on; ONNX also pads a rank-2
    ``[batch, samples]`` signal that way (Silero VAD's STFT front end). Such a Pad becomes
    Unsqueeze -> Pad -> Squeeze over a middle axis of size 1, in place; returns how many."""
    import numpy as np
    import onnx
    from onnx import helper

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        return 0
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in
             [*inferred.graph.value_info, *inferred.graph.input] if v.type.tensor_type.HasField("shape")}
    candidates = [n.input[1] for n in model.graph.node if n.op_type == "Pad" and len(n.input) > 1
                  and ranks.get(n.input[0]) == 2 and any(a.name == "mode" and a.s != b"constant" for a in n.attribute)]
    if not candidates:
        return 0
    values = _steady_values(model, candidates, feeds)  # pads are often computed from constants
    nodes, count = [], 0
    for node in model.graph.node:
        mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "constant")
        pads = values.get(node.input[1]) if node.op_type == "Pad" and len(node.input) > 1 else None
        if (mode == "constant" or pads is None or ranks.get(node.input[0]) != 2 or len(node.input) > 3
                or np.shape(pads) != (4,) or pads[0] or pads[2]):
            nodes.append(node)
            continue
        name = f"{node.output[0]}_widened"
        axes = helper.make_tensor(f"{name}_axes", onnx.TensorProto.INT64, [1], [1])
        wide = helper.make_tensor(f"{name}_pads", onnx.TensorProto.INT64, [6],
                                  np.array([0, 0, pads[1], 0, 0, pads[3]], dtype=np.int64).tolist())
        model.graph.initializer.extend([axes, wide])
        nodes += [helper.make_node("Unsqueeze", [node.input[0], axes.name], [f"{name}_in"]),
                  helper.make_node("Pad", [f"{name}_in", wide.name, *node.input[2:]], [f"{name}_out"], mode=mode),
                  helper.make_node("Squeeze", [f"{name}_out", axes.name], [node.output[0]])]
        count += 1
    if count:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return count


KEEP_OUT_CHANNELS = "tugboat_keep_out_channels"  # set on a layer whose output channels pruning must keep


def _slices_channels(gm: fx.GraphModule, node: fx.Node, known: dict[fx.Node, Any], rank: int) -> bool:
    """Whether a chain of Slice nodes after ``node`` cuts its channel axis (1)."""
    todo, seen = list(node.users), set()
    while todo:
        user = todo.pop()
        if user in seen or user.op != "call_module" or \
                not type(gm.get_submodule(user.target)).__name__.startswith("OnnxSlice"):
            continue
        seen.add(user)
        axes = known.get(user.args[3]) if len(user.args) > 3 else None
        if axes is not None and any(int(a) % rank == 1 for a in torch.as_tensor(axes).flatten()):
            return True
        todo.extend(user.users)
    return False


def _feeding_reshapes(gm: fx.GraphModule, known: dict[fx.Node, Any]) -> set[str]:
    """The layers whose output channels reach a Reshape (an attention's split into heads, a sequence
    turned back into a map: their shapes hold the channel count, written down or computed), walking
    back through everything but other layers and reshapes. Flattens were already rewritten as
    torch.flatten, which follows pruning."""
    def reshape(n: fx.Node) -> bool:
        return _is(gm, n, "OnnxReshape", (torch.reshape,), ("reshape", "view"))

    starts = [n.args[0] for n in gm.graph.nodes if reshape(n) and n.args]
    return {node.target for node, _layer in _layers_behind(gm, starts, known, stop=reshape)}


def _fix_split_channels(gm: fx.GraphModule, known: dict[fx.Node, Any]) -> int:
    """Mark the layers whose output channels are laid out by position further on (the real and
    imaginary halves of an STFT basis cut by Slices; an attention's fused q/k/v split into heads by a
    Reshape): removing some of their channels would leave the slices or the reshape wrong."""
    count = 0
    reshaped = _feeding_reshapes(gm, known)
    for n in list(gm.graph.nodes):
        conv = gm.get_submodule(n.target) if n.op == "call_module" else None
        if (n.op == "call_module" and n.target in reshaped) or (isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) \
                and _slices_channels(gm, n, known, conv.weight.dim())):
            setattr(conv, KEEP_OUT_CHANNELS, True)  # pruning keeps its outputs; its inputs still follow
            count += 1
    return count


def annotate_shapes(model, feed: dict[str, Any]):
    """A copy of ONNX ``model`` whose value_info holds the shape of every value seen in one run on
    ``feed`` (the first dimension, the batch, left symbolic); None when the graph does not run."""
    import onnx
    import onnxruntime as ort

    work = onnx.ModelProto()
    work.CopyFrom(model)
    outputs = {o.name for o in work.graph.output}
    names = [o for n in work.graph.node for o in n.output if o and o not in outputs]
    probe = onnx.ModelProto()
    probe.CopyFrom(work)
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    try:
        session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        values = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
    except Exception:
        return None
    batch = len(next(iter(feed.values())))
    del work.graph.value_info[:]
    for name in names:
        value = values.get(name)
        dtype = onnx.helper.np_dtype_to_tensor_dtype(value.dtype) if hasattr(value, "dtype") else None
        if dtype is None:
            continue
        dims = ["batch" if i == 0 and d == batch and value.ndim > 1 else int(d) for i, d in enumerate(value.shape)]
        work.graph.value_info.append(onnx.helper.make_tensor_value_info(name, dtype, dims))
    return work
