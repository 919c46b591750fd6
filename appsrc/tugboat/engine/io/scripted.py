"""Specialising a scripted module (TorchScript) into a pure tensor function that ONNX can export.

A ``torch.jit.script`` module is a small program, not a graph: its ``forward`` may take plain
numbers (Silero VAD's ``forward(x, sr: int)``), keep a recurrent state in module attributes that
each call reads and rewrites (``self._state = ...``), and branch on both. The ONNX exporter refuses
all three. :func:`specialise` turns such a module into the function of its tensor inputs that one
call computes from the state the file holds:

1. the module is frozen (submodules inlined, unchanged attributes become constants);
2. every non-tensor argument is replaced by its value (given by the user, by the data, or its
   default in the signature);
3. the state is threaded through the call: a read of an attribute takes the last value written
   before it in the same call, or the file's value; the writes are dropped (they only matter for
   the next call, and Tugboat measures every batch as the start of a stream);
4. branches whose condition is now constant are folded, as are tests on the rank of tensors and on
   the non-batch sizes of the inputs (fixed by the data), so ``if sr == 16000`` or
   ``if x.dim() == 1`` leave no ``If`` behind. Branches that depend on the data's values stay, as
   ONNX ``If`` nodes.

What it cannot do: state read or written under a condition that depends on the data, and attributes
that are not tensors, numbers, booleans or strings; such models are refused with the reason.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..errors import ModelLoadError

_NUMBER_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def constant_arguments(module: torch.jit.ScriptModule) -> dict[str, dict[str, Any]]:
    """The forward arguments that are not tensors: ``{name: {"type": "int", "default": 16000}}``
    (``default`` absent when the signature has none)."""
    out = {}
    for arg in module.forward.schema.arguments[1:]:
        kind = str(arg.type)
        if kind in ("Tensor", "Optional[Tensor]"):
            continue
        entry: dict[str, Any] = {"type": kind}
        if arg.has_default_value():
            entry["default"] = arg.default_value
        out[arg.name] = entry
    return out


def coerce(name: str, kind: str, value: Any) -> Any:
    """A user's or the data's value for a non-tensor argument, as the argument's type."""
    base = kind.removeprefix("Optional[").removesuffix("]")
    if value is None and kind.startswith("Optional["):
        return None
    cast = _NUMBER_TYPES.get(base)
    if cast is None:
        raise ModelLoadError(f"forward argument '{name}' is a {kind}: only int, float, bool and str "
                             "arguments can be given a value")
    if cast is bool and isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ModelLoadError(f"forward argument '{name}' is a bool, not {value!r}")
        return value.lower() in ("true", "1")
    try:
        out = cast(value)
    except (TypeError, ValueError):
        raise ModelLoadError(f"forward argument '{name}' is a {kind}, not {value!r}") from None
    if cast is int and isinstance(value, float) and value != out:
        raise ModelLoadError(f"forward argument '{name}' is an int, not {value!r}")
    return out


def specialise(module: torch.jit.ScriptModule, constants: dict[str, Any],
               example: tuple[torch.Tensor, ...]) -> torch.jit.ScriptFunction:
    """The pure function of the tensor inputs that ``module`` computes with ``constants`` bound,
    starting from the state the module holds (see the module docstring)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.freeze is deprecated in favour of torch.compile
            frozen = torch.jit.freeze(module.eval())
    except Exception as exc:
        raise ModelLoadError(f"the scripted module cannot be frozen for export ({_short(exc)})") from None
    graph = frozen.graph.copy()
    names = [a.name for a in module.forward.schema.arguments[1:]]
    _bind_arguments(graph, names, constants)
    _thread_state(graph, frozen)
    _decompose_fused(graph)
    graph.eraseInput(0)  # self: nothing reads it any more
    _fold_shapes(graph, example)
    torch._C._jit_pass_dce(graph)
    return torch._C._create_function_from_graph("forward", graph)


def _bind_arguments(graph: torch._C.Graph, names: list[str], constants: dict[str, Any]) -> None:
    inputs = list(graph.inputs())  # self first, then forward's arguments in order
    first = next(iter(graph.nodes()))
    for index in range(len(names), 0, -1):
        name = names[index - 1]
        if name not in constants:
            continue
        with graph.insert_point_guard(first):
            value = graph.insertConstant(constants[name])
        inputs[index].replaceAllUsesWith(value)
        graph.eraseInput(index)


def _attr_path(node: torch._C.Node, paths: dict[str, tuple[str, ...]]) -> tuple[str, ...] | None:
    """The attribute path (``("_model", "_state")``) a GetAttr/SetAttr node names, if its object is
    the module itself or one of its submodules."""
    base = paths.get(node.inputsAt(0).debugName())
    return None if base is None else (*base, node.s("name"))


def _touches_state(block, paths) -> bool:
    for node in block.nodes():
        if node.kind() in ("prim::GetAttr", "prim::SetAttr") and _attr_path(node, paths) is not None:
            return True
        if any(_touches_state(b, paths) for b in node.blocks()):
            return True
    return False


def _read_attr(frozen: torch.jit.ScriptModule, path: tuple[str, ...]) -> Any:
    obj = frozen
    for part in path:
        obj = getattr(obj, part)
    return obj


def _thread_state(graph: torch._C.Graph, frozen: torch.jit.ScriptModule) -> None:
    """Reads of module attributes take the value last written in this call (or the file's); the
    writes are dropped. Branches are folded between passes, which exposes the state they touch."""
    self_value = next(iter(graph.inputs()))
    paths: dict[str, tuple[str, ...]] = {self_value.debugName(): ()}
    current: dict[tuple[str, ...], torch._C.Value] = {}
    for _ in range(1000):
        torch._C._jit_pass_constant_propagation(graph)
        changed = False
        for node in list(graph.nodes()):
            path = _attr_path(node, paths) if node.kind() in ("prim::GetAttr", "prim::SetAttr") else None
            if path is not None and node.kind() == "prim::SetAttr":
                current[path] = node.inputsAt(1)
                node.destroy()
                changed = True
            elif path is not None:
                if isinstance(node.output().type(), torch._C.ClassType):  # a submodule: follow it
                    paths[node.output().debugName()] = path
                    continue
                if path not in current:
                    with graph.insert_point_guard(next(iter(graph.nodes()))):  # before every use
                        current[path] = _constant(graph, path, _read_attr(frozen, path))
                node.output().replaceAllUsesWith(current[path])
                node.destroy()
                changed = True
            elif any(_touches_state(b, paths) for b in node.blocks()):
                break  # a branch not folded yet: fold what is now constant, then go on
        if not changed:
            break
    if _touches_state(graph, {self_value.debugName(): ()} | paths):
        raise ModelLoadError("the scripted module reads or writes its state under a condition that "
                             "depends on the input data, which no ONNX graph can express")


def _constant(graph: torch._C.Graph, path: tuple[str, ...], value: Any) -> torch._C.Value:
    try:
        return graph.insertConstant(value)
    except Exception:
        raise ModelLoadError(f"the scripted module's attribute '{'.'.join(path)}' is a "
                             f"{type(value).__name__}, which cannot be exported") from None


def _fold_shapes(graph: torch._C.Graph, example: tuple[torch.Tensor, ...]) -> None:
    """Fold ``x.dim()`` (ranks do not change with the batch) and the non-batch sizes of the inputs
    (fixed by the data), so shape checks and rank branches leave the graph."""
    inputs = {v.debugName(): t for v, t in zip(graph.inputs(), example)}
    for _ in range(20):
        torch._C._jit_pass_complete_shape_analysis(graph, tuple(example), False)
        folded = 0
        for node in graph.findAllNodes("aten::dim"):
            kind = node.inputsAt(0).type()
            if isinstance(kind, torch._C.TensorType) and kind.dim() is not None:
                folded += _replace(graph, node, kind.dim())
        for node in graph.findAllNodes("aten::size"):
            source = inputs.get(node.inputsAt(0).debugName())
            if source is None:
                continue
            if node.inputsSize() == 2 and node.inputsAt(1).toIValue() is not None:
                dim = node.inputsAt(1).toIValue() % source.dim()
                folded += _replace(graph, node, int(source.shape[dim])) if dim else 0
            elif node.inputsSize() == 1:
                folded += _fold_size_items(graph, node, source)
        folded = folded or _fold_ranks_by_running(graph, example)
        torch._C._jit_pass_constant_propagation(graph)
        if not folded:
            return


def _fold_ranks_by_running(graph: torch._C.Graph, example: tuple[torch.Tensor, ...]) -> int:
    """Ranks static analysis did not tell (after ops it does not know): run a copy of the graph that
    also returns them, once, on the example inputs."""
    nodes = [n for n in graph.nodes() if n.kind() == "aten::dim"]
    if not nodes:
        return 0
    probe = graph.copy()
    values = [n.output() for n in probe.nodes() if n.kind() == "aten::dim"]
    pack = probe.create("prim::TupleConstruct", values)
    pack.output().setType(torch._C.TupleType([torch._C.IntType.get()] * len(values)))
    pack.insertBefore(probe.return_node())
    while len(list(probe.outputs())):
        probe.eraseOutput(0)
    probe.registerOutput(pack.output())
    try:
        with torch.no_grad():
            ranks = torch._C._create_function_from_graph("probe", probe)(*example)
    except Exception:  # leave the branches to ONNX If nodes
        return 0
    for node, rank in zip(nodes, ranks):
        _replace(graph, node, int(rank))
    return len(nodes)


def _fold_size_items(graph: torch._C.Graph, size_node: torch._C.Node, source: torch.Tensor) -> int:
    folded = 0
    for use in list(size_node.output().uses()):
        item = use.user
        if item.kind() == "aten::__getitem__" and item.inputsAt(1).toIValue() is not None:
            dim = item.inputsAt(1).toIValue() % source.dim()
            folded += _replace(graph, item, int(source.shape[dim])) if dim else 0
        elif item.kind() == "aten::len":
            folded += _replace(graph, item, source.dim())
    return folded


def _replace(graph: torch._C.Graph, node: torch._C.Node, value: Any) -> int:
    with graph.insert_point_guard(node):
        constant = graph.insertConstant(value)
    node.output().replaceAllUsesWith(constant)
    node.destroy()
    return 1


def _short(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- fused inference kernels: the same math in plain ops --------------------------------------------
# In eval mode nn.TransformerEncoderLayer and nn.MultiheadAttention run fused "fast path" kernels, and a
# trace records those; they have no ONNX export. Each is replaced by a call of the plain-op version.

def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, embed_dim: int, num_heads: int,
               qkv_weight: torch.Tensor, qkv_bias: torch.Tensor, proj_weight: torch.Tensor,
               proj_bias: torch.Tensor, mask: torch.Tensor | None, mask_type: int | None):
    """Batch-first multi-head attention: (output, per-head weights [B, H, L, S])."""
    head = embed_dim // num_heads
    wq, wk, wv = qkv_weight.chunk(3, 0)
    bq, bk, bv = qkv_bias.chunk(3, 0)
    batch, length, source = q.shape[0], q.shape[1], k.shape[1]
    q = torch.nn.functional.linear(q, wq, bq).reshape(batch, length, num_heads, head).transpose(1, 2)
    k = torch.nn.functional.linear(k, wk, bk).reshape(batch, source, num_heads, head).transpose(1, 2)
    v = torch.nn.functional.linear(v, wv, bv).reshape(batch, source, num_heads, head).transpose(1, 2)
    scores = torch.matmul(q, k.transpose(-2, -1)) / (float(head) ** 0.5)
    if mask is not None:
        m = mask
        if mask_type is not None and mask_type == 1:  # key padding [B, S]
            m = m.reshape(batch, 1, 1, source)
        elif m.dim() == 2:  # [L, S]
            m = m.reshape(1, 1, length, source)
        scores = scores.masked_fill(m, float("-inf")) if m.dtype == torch.bool else scores + m
    weights = torch.softmax(scores, -1)
    out = torch.matmul(weights, v).transpose(1, 2).reshape(batch, length, embed_dim)
    return torch.nn.functional.linear(out, proj_weight, proj_bias), weights


def _multi_head_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, embed_dim: int,
                          num_head: int, qkv_weight: torch.Tensor, qkv_bias: torch.Tensor,
                          proj_weight: torch.Tensor, proj_bias: torch.Tensor, mask: torch.Tensor | None,
                          need_weights: bool, average_attn_weights: bool, mask_type: int | None):
    out, weights = _attention(query, key, value, embed_dim, num_head, qkv_weight, qkv_bias, proj_weight,
                              proj_bias, mask, mask_type)
    if not need_weights:
        return out, torch.empty(0)
    return out, weights.mean(1) if average_attn_weights else weights


def _encoder_layer(src: torch.Tensor, embed_dim: int, num_heads: int, qkv_weight: torch.Tensor,
                   qkv_bias: torch.Tensor, proj_weight: torch.Tensor, proj_bias: torch.Tensor, use_gelu: bool,
                   norm_first: bool, eps: float, norm_weight_1: torch.Tensor, norm_bias_1: torch.Tensor,
                   norm_weight_2: torch.Tensor, norm_bias_2: torch.Tensor, ffn_weight_1: torch.Tensor,
                   ffn_bias_1: torch.Tensor, ffn_weight_2: torch.Tensor, ffn_bias_2: torch.Tensor,
                   mask: torch.Tensor | None, mask_type: int | None):
    x = src
    h = torch.nn.functional.layer_norm(x, [embed_dim], norm_weight_1, norm_bias_1, eps) if norm_first else x
    x = x + _attention(h, h, h, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias, mask,
                       mask_type)[0]
    if not norm_first:
        x = torch.nn.functional.layer_norm(x, [embed_dim], norm_weight_1, norm_bias_1, eps)
    h = torch.nn.functional.layer_norm(x, [embed_dim], norm_weight_2, norm_bias_2, eps) if norm_first else x
    h = torch.nn.functional.linear(h, ffn_weight_1, ffn_bias_1)
    h = torch.nn.functional.gelu(h) if use_gelu else torch.relu(h)
    x = x + torch.nn.functional.linear(h, ffn_weight_2, ffn_bias_2)
    if not norm_first:
        x = torch.nn.functional.layer_norm(x, [embed_dim], norm_weight_2, norm_bias_2, eps)
    return x


FUSED_KERNELS = {"aten::_transformer_encoder_layer_fwd": _encoder_layer,
                 "aten::_native_multi_head_attention": _multi_head_attention}


def has_fused_kernels(module: torch.jit.ScriptModule) -> bool:
    text = str(module.inlined_graph)
    return any(kind in text for kind in FUSED_KERNELS)


def _decompose_fused(graph: torch._C.Graph) -> None:
    for kind, python in FUSED_KERNELS.items():
        nodes = graph.findAllNodes(kind)
        if not nodes:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plain = torch.jit.script(python).graph.copy()
        torch._C._jit_pass_inline(plain)
        for node in nodes:
            with graph.insert_point_guard(node):
                outs = graph.insertGraph(plain, list(node.inputs()))
            if len(outs) == 1 and node.outputsSize() > 1:  # a tuple: unpack it
                with graph.insert_point_guard(node):
                    outs = graph.insertNode(graph.create("prim::TupleUnpack", outs, node.outputsSize())).outputs()
            for old, new in zip(node.outputs(), outs):
                new.setType(old.type())
                old.replaceAllUsesWith(new)
            node.destroy()
