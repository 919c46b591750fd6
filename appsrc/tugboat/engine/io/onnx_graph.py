"""Facts about an ONNX graph, read without running it: its subgraphs, nodes and tensors, and the one
definition of its "parameters" (weights, quantization scales and zero points excluded) that every
model and report counts with. Imports nothing else of Tugboat."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

# inputs of quantization operators that are scales or zero points (not parameters), by position
_QUANT_AUX_INPUTS = {
    "QuantizeLinear": (1, 2), "DequantizeLinear": (1, 2), "DynamicQuantizeLinear": (),
    "QLinearConv": (1, 2, 4, 5, 6, 7), "QLinearMatMul": (1, 2, 4, 5, 6, 7),
    "ConvInteger": (2, 3), "MatMulInteger": (2, 3), "MatMulIntegerToFloat": (2, 3, 4, 5),
    "DynamicQuantizeMatMul": (2, 3), "MatMulNBits": (2, 3), "GatherBlockQuantized": (2, 3),
    "QLinearAdd": (1, 2, 4, 5, 6, 7), "QLinearMul": (1, 2, 4, 5, 6, 7),
}


def quantization_aux_names(model: onnx.ModelProto) -> set[str]:
    """Initializers a quantized graph uses only as scales or zero points: not parameters (an int8
    model has the float model's parameter count, not that plus one scale per channel).

    Besides the scale and zero-point inputs of quantization operators, a dynamic-int8 graph
    multiplies each weight's scale with the activation's run-time scale (``Mul(x_scale, w_scale)``
    after ``DynamicQuantizeLinear``): a constant multiplied only with quantization scales is one
    too. So is the scale of an int8 weight expanded by ``Cast`` and ``Mul`` (weight-only int8).
    Anything also used elsewhere (as a weight, a bias) stays a parameter."""
    nodes = list(graph_nodes(model.graph))
    constants = {i.name for g in graphs(model.graph) for i in g.initializer}
    constants |= {o for n in nodes if n.op_type == "Constant" for o in n.output}
    scales: set[str] = set()  # run-time values that are quantization scales
    for node in nodes:
        if node.op_type == "DynamicQuantizeLinear" and len(node.output) > 1:
            scales.add(node.output[1])
    widened = _widened_int8(model)
    for node in nodes:
        if node.op_type == "Mul" and len(node.input) == 2 and widened & set(node.input):
            scales.update(i for i in node.input if i not in widened and i in constants)
    aux: set[str] = set()
    other: set[str] = set()
    changed = True
    while changed:  # scale products can chain (Mul(Mul(x_scale, a), b)); graphs are small to walk
        changed = False
        for node in nodes:
            if (node.op_type == "Mul" and any(i in scales for i in node.input)
                    and all(i in scales or i in constants for i in node.input)
                    and not set(node.output) <= scales):
                scales.update(node.output)
                changed = True
    for node in nodes:
        positions = _QUANT_AUX_INPUTS.get(node.op_type)
        if node.op_type == "Mul" and widened & set(node.input):
            positions = [i for i, name in enumerate(node.input) if name in scales]
        elif node.op_type == "Mul" and set(node.output) <= scales:
            positions = range(len(node.input))
        for i, name in enumerate(node.input):
            if positions is not None and i in positions:
                aux.add(name)
            else:
                other.add(name)
    return aux - other


def _widened_int8(model: onnx.ModelProto) -> set[str]:
    """Outputs of ``Cast`` to float of an int8/uint8 initializer (weight-only int8's stored weights)."""
    small = {t.name for g in graphs(model.graph) for t in g.initializer
             if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)}
    return {n.output[0] for n in graph_nodes(model.graph) if n.op_type == "Cast" and n.input and n.input[0] in small
            and n.output and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in n.attribute)}


def graphs(graph: onnx.GraphProto):
    """``graph`` and every subgraph in it (If branches, Loop and Scan bodies)."""
    yield graph
    for node in graph.node:
        for sub in node_subgraphs(node):
            yield from graphs(sub)


def graph_nodes(graph: onnx.GraphProto):
    """Every node of ``graph`` and of its subgraphs, each node followed by its subgraphs' nodes."""
    for node in graph.node:
        yield node
        for sub in node_subgraphs(node):
            yield from graph_nodes(sub)


def onnx_weight_tensors(model: onnx.ModelProto):
    """Every weight tensor of an ONNX graph, each once: initializers and ``Constant`` node values, in
    the main graph and in every subgraph (If branches, Loop and Scan bodies).

    A weight is a tensor of more than one element that is not ``int64`` or ``bool``: that excludes
    scalars (quantization scales and zero points, constants such as 1.0) and the shape, axes and index
    constants graphs carry as int64 vectors, and keeps float weights and int8/uint8/int32 quantized ones.
    Tensors are keyed by name (an initializer overriding a graph input is counted once)."""
    seen: set[str] = set()

    def weight(t: onnx.TensorProto) -> bool:
        n = int(np.prod(t.dims)) if t.dims else 1
        return n > 1 and t.data_type not in (onnx.TensorProto.INT64, onnx.TensorProto.BOOL,
                                              onnx.TensorProto.STRING)

    for graph in graphs(model.graph):
        for init in graph.initializer:
            if init.name not in seen and weight(init):
                seen.add(init.name)
                yield init.name, init
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                yield from _constant_weights(node, seen, weight)


def _constant_weights(node: onnx.NodeProto, seen: set, weight):
    """The weight a ``Constant`` node holds (``value`` or a ``value_floats`` list), unless seen."""
    key = node.output[0] if node.output else id(node)
    for attr in node.attribute:
        if key in seen:
            return
        if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR and weight(attr.t):
            seen.add(key)
            yield key, attr.t
        elif attr.name == "value_floats" and len(attr.floats) > 1:
            seen.add(key)
            yield key, onnx.helper.make_tensor(key, onnx.TensorProto.FLOAT, [len(attr.floats)], list(attr.floats))


def onnx_param_tensors(model: onnx.ModelProto) -> list[tuple[str, int, int]]:
    """``(tensor name, parameters, non-zero parameters)`` for every weight tensor of the graph that
    counts as parameters (:func:`onnx_param_count` sums them; the Layers view attributes each to its
    layer, so the per-layer figures add up to the total)."""
    aux = quantization_aux_names(model)
    packed: dict[str, int] = {}  # 4-bit weights packed two per byte: count the weights, K x N
    for node in graph_nodes(model.graph):
        if node.op_type == "MatMulNBits" and len(node.input) > 1:
            attrs = {a.name: a.i for a in node.attribute}
            if attrs.get("K") and attrs.get("N"):
                packed[node.input[1]] = int(attrs["K"]) * int(attrs["N"])
    out: list[tuple[str, int, int]] = []
    for name, tensor in onnx_weight_tensors(model):
        if name in aux:
            continue
        values = numpy_helper.to_array(tensor)
        if name in packed:
            # a packed byte is zero only when both of its weights are (at their zero point 0)
            out.append((name, packed[name], min(packed[name], 2 * int(np.count_nonzero(values)))))
        else:
            out.append((name, int(np.prod(tensor.dims)), int(np.count_nonzero(values))))
    return out


def onnx_param_count(model: onnx.ModelProto) -> tuple[int, int]:
    """(parameters, non-zero parameters) over :func:`onnx_weight_tensors` (initializers and Constant
    nodes, subgraphs included), quantization scales and zero points excluded (the one definition of
    "parameters" for every model and report: ``ModelHandle.param_count`` applies it to the deployed
    artifact); 4-bit packed weights count as K x N."""
    rows = onnx_param_tensors(model)
    return sum(r[1] for r in rows), sum(r[2] for r in rows)


def node_subgraphs(node: onnx.NodeProto):
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def all_tensors(model: onnx.ModelProto):
    yield from model.graph.initializer
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t


def lift_constant_weights(model: onnx.ModelProto) -> int:
    """Turn weights stored as ``Constant`` nodes into initializers of the same name, in place, in the
    main graph and in subgraphs; returns how many. The graph computes exactly the same, but the tools
    that look for weights among initializers now find them: ONNX Runtime's quantizers (which otherwise
    quantize only activations and make such a model *larger*) and onnx2torch (which otherwise cannot
    convert it). Shape and index constants (int64) and scalars stay Constant nodes."""
    count = 0

    def lift(graph: onnx.GraphProto) -> None:
        nonlocal count
        keep = []
        for node in graph.node:
            for sub in node_subgraphs(node):
                lift(sub)
            value = next((a.t for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR),
                         None)
            if (node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1
                    and value is not None and len(node.output) == 1 and int(np.prod(value.dims)) > 1
                    and value.data_type not in (onnx.TensorProto.INT64, onnx.TensorProto.INT32,
                                                onnx.TensorProto.BOOL, onnx.TensorProto.STRING)):
                tensor = onnx.TensorProto()
                tensor.CopyFrom(value)
                tensor.name = node.output[0]
                graph.initializer.append(tensor)
                count += 1
            else:
                keep.append(node)
        if len(keep) != len(graph.node):
            del graph.node[:]
            graph.node.extend(keep)

    lift(model.graph)
    return count


def outer_names(graph: onnx.GraphProto) -> set[str]:
    """Names ``graph`` (with its own subgraphs) reads but does not define: the values it takes from
    the enclosing graphs by name (ONNX subgraphs see every value of their outer scopes)."""
    defined = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    used: set[str] = set()
    for node in graph.node:
        used.update(node.input)
        for sub in node_subgraphs(node):
            used |= outer_names(sub)
        defined.update(node.output)
    used.update(o.name for o in graph.output)
    return used - defined


def node_reads(node: onnx.NodeProto) -> set[str]:
    """Every value ``node`` needs before it runs: its inputs and what its subgraphs read from outside."""
    out = set(node.input)
    for sub in node_subgraphs(node):
        out |= outer_names(sub)
    return out


def toposort(model: onnx.ModelProto) -> onnx.ModelProto:
    """Order every graph's nodes (If branches, Loop and Scan bodies too) so each value is produced
    before it is used, in place; returns ``model``. A node with subgraphs waits also for the outer
    values its subgraphs read (converters that append input casts at the end of a graph break that,
    and onnx.checker rejects it). A graph that cannot be ordered (a cycle) is left as it is."""
    _toposort_graph(model.graph, set())
    return model


def _toposort_graph(graph: onnx.GraphProto, outer: set[str]) -> None:
    ready = outer | {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    nodes = list(graph.node)
    defined_here = {o for n in nodes for o in n.output}
    reads = [node_reads(n) for n in nodes]
    pending, order = list(range(len(nodes))), []
    while pending:
        rest = []
        for k in pending:
            # a name defined neither here nor in the scopes this walk knows does not block
            if all(i in ready or i not in defined_here for i in reads[k]):
                order.append(k)
                ready.update(nodes[k].output)
            else:
                rest.append(k)
        if len(rest) == len(pending):  # a cycle: leave the order alone
            order = list(range(len(nodes)))
            break
        pending = rest
    if order != sorted(order):
        copies = [onnx.NodeProto() for _ in order]
        for c, k in zip(copies, order):
            c.CopyFrom(nodes[k])
        del graph.node[:]
        graph.node.extend(copies)
    scope = ready | defined_here
    for node in graph.node:
        for sub in node_subgraphs(node):
            _toposort_graph(sub, scope)


def _graph_tree(graph: onnx.GraphProto, parent: int, out: list) -> list:
    """``[(graph, parent index)]``: ``graph`` and its subgraphs, each after its parent (root: -1)."""
    out.append((graph, parent))
    me = len(out) - 1
    for node in graph.node:
        for sub in node_subgraphs(node):
            _graph_tree(sub, me, out)
    return out


def _enclosing(tree: list, members: set[int]) -> int:
    """The innermost graph of ``tree`` that is, or encloses, every graph in ``members``."""
    def chain(k: int) -> list[int]:
        path = []
        while k >= 0:
            path.append(k)
            k = tree[k][1]
        return path[::-1]

    chains = [chain(k) for k in members]
    common = 0
    for level in zip(*chains):
        if len(set(level)) > 1:
            break
        common = level[0]
    return common


def rename_reads(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Point every reader of ``old`` in ``graph`` and its subgraphs (and its outputs) at ``new``."""
    for node in graph.node:
        node.input[:] = [new if i == old else i for i in node.input]
        for sub in node_subgraphs(node):
            rename_reads(sub, old, new)
    for out in graph.output:
        if out.name == old:
            out.name = new


def share_subgraph_weights(model: onnx.ModelProto, min_bytes: int = 64) -> int:
    """Store equal weights that several graphs hold (If branches, Loop and Scan bodies) once, in the
    innermost graph enclosing them all, in place; returns the bytes saved. Constant folding gives
    every subgraph that reads an outer weight through its own Slice/Unsqueeze a folded copy (Silero
    VAD's LSTM weights, read by both branches of an inner If, doubled its file): subgraphs see outer
    values by name, so one copy serves them all (under a fresh name where sibling graphs reuse one)."""
    tree = _graph_tree(model.graph, -1, [])
    defined: dict[str, int] = {}
    for g, _ in tree:
        for name in [*(i.name for i in g.input), *(i.name for i in g.initializer),
                     *(o for n in g.node for o in n.output)]:
            defined[name] = defined.get(name, 0) + 1
    groups: dict[tuple, list[tuple[int, str]]] = {}
    for k, (g, _) in enumerate(tree):
        inputs = {i.name for i in g.input} | {o.name for o in g.output}
        for t in g.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL or t.name in inputs:
                continue
            data = t.raw_data or numpy_helper.to_array(t).tobytes()
            if len(data) >= min_bytes:
                groups.setdefault((t.data_type, tuple(t.dims), data), []).append((k, t.name))
    saved = 0
    for (_, _, data), copies in groups.items():
        if len(copies) > 1:
            _share(tree, copies, defined)
            saved += len(data) * (len(copies) - 1)
    return saved


def _share(tree: list, copies: list[tuple[int, str]], defined: dict[str, int]) -> None:
    """Keep one of ``copies`` (graph index, initializer name) in their enclosing graph and point
    every reader of the others at it."""
    home = _enclosing(tree, {k for k, _ in copies})
    first_k, first = next(((k, n) for k, n in copies if k == home), copies[0])
    keep, i = first, 0
    while defined.get(keep, 0) > (1 if keep == first else 0):  # defined elsewhere too: a fresh name
        keep, i = f"{first}_shared{i or ''}", i + 1
    defined[keep] = 1
    for k, name in copies:
        _move_initializer(tree[k][0], tree[home][0] if (k, name) == (first_k, first) else None, name, keep)
        if name != keep:
            rename_reads(tree[k][0], name, keep)


def _move_initializer(src: onnx.GraphProto, dst: onnx.GraphProto | None, name: str, new_name: str) -> None:
    """Take initializer ``name`` out of ``src`` (into ``dst`` as ``new_name`` unless dst is None)."""
    keep = []
    for t in src.initializer:
        if t.name != name:
            keep.append(t)
        elif dst is not None:
            dst.initializer.append(t)
            dst.initializer[-1].name = new_name
    copies = [onnx.TensorProto() for _ in keep]
    for c, t in zip(copies, keep):
        c.CopyFrom(t)
    del src.initializer[:]
    src.initializer.extend(copies)



def weights_in_subgraphs(model: onnx.ModelProto) -> tuple[int, int]:
    """(weights in the main graph, weights inside If/Loop/Scan bodies), as element counts over
    :func:`onnx_weight_tensors`: quantizers that do not enter subgraphs leave the second float."""
    main = {i.name for i in model.graph.initializer}
    main |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    outside = inside = 0
    for name, tensor in onnx_weight_tensors(model):
        size = int(np.prod(tensor.dims))
        if name in main:
            outside += size
        else:
            inside += size
    return outside, inside


def unique_initializer_names(model: onnx.ModelProto) -> int:
    """Rename initializers whose name another graph of the model also defines (sibling If branches
    may each hold a "weight"; ONNX allows it), in place, within their own graph; returns how many.
    ONNX Runtime's float16 converter keys initializers by name over all subgraphs and fails on them."""
    tree = _graph_tree(model.graph, -1, [])
    seen: set[str] = set()
    for g, _ in tree:
        seen |= {i.name for i in g.input} | {o for n in g.node for o in n.output}
    count = 0
    taken = set(seen) | {t.name for g, _ in tree for t in g.initializer}
    for g, _ in tree:
        for t in g.initializer:
            if t.name not in seen:
                seen.add(t.name)
                continue
            new, i = f"{t.name}_{count}", count
            while new in taken:
                i += 1
                new = f"{t.name}_{i}"
            taken.add(new)
            rename_reads(g, t.name, new)
            t.name = new
            count += 1
    return count
