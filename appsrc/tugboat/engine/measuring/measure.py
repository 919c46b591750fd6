"""Honest measurement: size on disk, parameters, FLOPs, latency in a real runtime, quality.

Every number here is measured on the artifact that would be deployed (the ONNX graph) or on the
torch module itself; nothing is estimated. Latency runs warm-up iterations first, then repeats
until both a minimum count and a minimum time are reached, and reports median and p90 with the
batch size, thread count and runtime it was measured with (threads pinned while measuring).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import statistics
import threading
import time
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..devices import resolve as resolve_device
from ..errors import ModelLoadError, TugboatError
from ..io.models import ModelHandle
from ..io.onnx_graph import graph_nodes, onnx_param_count, onnx_param_tensors
from ..lazy import torch
from ..machine import channel_multiple
from ..names import layer_key
from ..progress import Progress, null_progress
from ..stored import atomic_write_bytes
from .runtime import (
    _cast,
    eval_mode,
    fixed_batch,
    ort_device,
    ort_session,
    predict,
    serialized,
    session_with_weights,
    shared_session,
    torch_threads,
    weightless,
)
from .runtimes import measure_runtimes
from .timing import (
    NOISY_SPREAD,
    check_finite,
    fidelity,
    machine_load,
    model_inputs,
    p90,
    spread,
    summary,
    time_loop,
)

RUNTIMES = ("onnxruntime", "torch")
BLOCKS_PER_MIN_SECONDS = 32  # the default block_seconds is min_seconds / 32


def default_threads() -> int:
    return max(1, min(2, os.cpu_count() or 1))


@dataclass
class MeasureConfig:
    """How latency is measured: the user's deployment target (``[measure]`` in a recipe)."""

    batch: int = 64
    threads: int = 0  # 0: the default (up to 2)
    runtime: str = "onnxruntime"
    warmup: int = 5
    min_runs: int = 15
    min_seconds: float = 0.25
    max_seconds: float = 2.0
    # the user's runtime and batch are timed; others only when asked (issue 17.7: seconds per variant)
    also_batch1: bool = False  # also time batch 1 (interactive use), as information
    both_runtimes: bool = False  # also time the other runtime when the variant can run there
    # every runtime to measure in (engine/runtimes: latency, fidelity, version per runtime under
    # metrics["runtimes"]); ``runtime`` is the first, whose latency is ``latency_ms``
    runtimes: list[str] = field(default_factory=list)
    # where latency is timed (engine/devices: cpu, cuda, cuda:N, auto); every latency entry names
    # the device it really ran on (ONNX Runtime without its CUDA provider times on the cpu)
    device: str = "cpu"
    # paired timing of a variant against the baseline (docs/measurement.md)
    min_blocks: int = 8  # alternating blocks before the interval is judged
    block_seconds: float = 0.0  # time per model per block; 0: min_seconds / 32 (2 ms to 0.1 s)
    max_width: float = 0.15  # an interval wider than this (high / low - 1) is noisy: extend, then mark
    noisy_seconds: float = 0.0  # how long a noisy timing may be extended; 0: 3 x max_seconds
    confidence: float = 0.95
    systematic: float = 0.03  # the interval is at least this much either side of the median

    def __post_init__(self) -> None:
        if not self.threads:
            self.threads = default_threads()
        if not self.block_seconds:
            # short blocks: the interval comes from the spread between blocks (more blocks in a
            # noisy window, never a weaker verdict); the defaults give 8 ms, 8 blocks in ~0.15 s
            self.block_seconds = min(0.1, max(0.002, self.min_seconds / BLOCKS_PER_MIN_SECONDS))
        if not self.noisy_seconds:
            self.noisy_seconds = 3 * self.max_seconds

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- size --------------------------------------------------------------------------------------

def size_metrics(artifact: bytes) -> dict[str, int]:
    """Artifact bytes and deflate-compressed bytes (what sparsity saves in a zip or an app store)."""
    return {"size_bytes": len(artifact), "compressed_bytes": len(zlib.compress(artifact, 6))}


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


DEFLATE_REMEMBERED_FROM = 8 << 20  # artifacts this large have their deflate size remembered by content
_DEFLATE_TABLE_ROWS = 256
_deflate_table_lock = threading.Lock()


def _deflate_table() -> Path:
    override = os.environ.get("TUGBOAT_CACHE_DIR")  # the same folder as the demo zoo's cache
    if override:
        return Path(override) / "deflate-sizes.json"
    import platformdirs

    return Path(platformdirs.user_cache_dir("tugboat", appauthor=False)) / "deflate-sizes.json"


def remembered_deflate(artifact: bytes) -> int:
    """``len(zlib.compress(artifact, 6))`` for a large artifact, remembered by its content (a 128-bit
    BLAKE2b digest: 0.15 s for 90 MB, where the deflate takes 4-5 s). The same bytes always deflate
    to the same size, so a model measured again (the original of every run on it) costs nothing; a
    missing or unreadable table is only slower."""
    key = hashlib.blake2b(artifact, digest_size=16).hexdigest()
    path = _deflate_table()
    known = _read_table(path).get(key)
    if isinstance(known, int) and known > 0:
        return known
    size = len(zlib.compress(artifact, 6))
    with _deflate_table_lock, contextlib.suppress(OSError):
        table = _read_table(path)
        table[key] = size
        rows = list(table.items())[-_DEFLATE_TABLE_ROWS:]
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(dict(rows)).encode())
    return size


def _read_table(path: Path) -> dict[str, Any]:
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return table if isinstance(table, dict) else {}


def _deflate_beside(artifact: bytes):
    """:func:`size_metrics`' deflate size computed on a helper thread (zlib releases the GIL: a
    90 MB model takes seconds) beside the quality pass, and beside the timing when the timing leaves a
    core idle (its thread count is below the cores; each block of the paired timing times variant and
    original under the same conditions); returns a function that waits for it."""
    if len(artifact) < (1 << 20):
        size = len(zlib.compress(artifact, 6))
        return lambda: size
    box: dict[str, int] = {}
    deflate = remembered_deflate if len(artifact) >= DEFLATE_REMEMBERED_FROM else (
        lambda a: len(zlib.compress(a, 6)))
    worker = threading.Thread(target=lambda: box.setdefault("n", deflate(artifact)),
                              name="tugboat-deflate", daemon=True)
    worker.start()

    def result() -> int:
        worker.join()
        return box["n"] if "n" in box else size_metrics(artifact)["compressed_bytes"]

    return result


_DEFLATES: dict[int, tuple[onnx.ModelProto, Any]] = {}
_DEFLATES_LOCK = threading.Lock()


def start_deflate(model: onnx.ModelProto):
    """Begin the deflate size of this graph's bytes on a helper thread now, once per graph object
    (:meth:`ModelHandle.to_onnx` graphs, never changed after); returns a function that waits for it.
    ``tugboat run`` starts the original's right after loading it: a 90 MB model's 4-5 s then go on
    beside the checks, the FLOPs count and the quality pass instead of after them."""
    with _DEFLATES_LOCK:
        hit = _DEFLATES.get(id(model))
        if hit is not None and hit[0] is model:
            return hit[1]
        waiter = _deflate_beside(serialized(model))
        while len(_DEFLATES) >= 2:  # the original's and the variant's being measured
            _DEFLATES.pop(next(iter(_DEFLATES)))
        _DEFLATES[id(model)] = (model, waiter)
        return waiter


# --- FLOPs ---------------------------------------------------------------------------------------

_CONV = {"Conv", "ConvInteger", "QLinearConv", "ConvTranspose"}
_MATMUL = {"MatMul", "MatMulInteger", "QLinearMatMul", "FusedMatMul", "MatMulNBits",
           "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}


_RECURRENT_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
_SOFTMAX = {"Softmax", "LogSoftmax"}
SOFTMAX_FLOPS_PER_ELEMENT = 3  # exp, sum, divide


def onnx_flops(model: onnx.ModelProto, batch: int = 1,
               input_shapes: dict[str, tuple[int, ...]] | None = None,
               samples: dict[str, np.ndarray] | None = None) -> tuple[int, list[dict[str, Any]]]:
    """FLOPs at ``batch``, in total and per node.

    Counted: Conv / ConvTranspose / MatMul / Gemm (2 x multiply-accumulates, attention's two MatMuls
    included), LSTM / GRU / RNN (their input and recurrent matrix products over every step) and
    Softmax (3 per element); element-wise ops are not counted. Nodes inside subgraphs count too:
    the larger branch of an ``If`` (only one runs), a ``Loop`` body times its trip count when that is a
    constant, a ``Scan`` body times the scanned length. ``input_shapes`` gives full concrete shapes
    (from the data) for inputs whose sizes the file leaves open; any size still unknown is taken as 1
    (see :func:`unknown_input_dims`). ``samples`` (real inputs for one sample, in the model's layout)
    fix the sizes too, and decide which branch of an ``If`` runs: that branch is then counted, with
    the sizes it really sees. Never negative."""
    # the large weights stay out of the working copy: shape inference needs their shapes only, and
    # the probe run gets them in memory (a 90 MB model: seconds less, issue 17.7)
    shared, weights = weightless(model)
    work = onnx.ModelProto()
    work.CopyFrom(shared)  # changed below; the copy holds no large weight values
    if samples:
        input_shapes = {**(input_shapes or {}), **{k: tuple(np.shape(v)) for k, v in samples.items()}}
    inits = {i.name for i in work.graph.initializer}
    for value in work.graph.input:
        if value.name in inits:
            continue
        dims = value.type.tensor_type.shape.dim
        given = (input_shapes or {}).get(value.name)
        if given is not None and len(given) == len(dims):
            for d, g in zip(dims, given):
                d.dim_value = int(g)
            continue
        for i, d in enumerate(dims):
            if not d.HasField("dim_value") or d.dim_value <= 0:
                d.dim_value = batch if i == 0 else 1
    work = _infer(work)
    feeds = _probe_feeds(work, samples)
    if feeds is not None and samples:
        work = _inline_taken_branches(work, feeds, weights)
    shapes: dict[str, list[int]] = {}
    consts: dict[str, np.ndarray] = {}
    _collect_shapes(work.graph, shapes, consts)
    if feeds is not None:
        _probe_shapes(work, shapes, feeds, weights)
    rows: list[dict[str, Any]] = []
    total = _graph_flops(work.graph, shapes, consts, rows, 1)
    return max(0, total), rows


def unknown_input_dims(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None,
                       ) -> list[str]:
    """Inputs with a size other than the batch that neither the file nor ``input_shapes`` fixes,
    as ``name[dim]`` strings (empty: FLOPs are exact)."""
    inits = {i.name for i in model.graph.initializer}
    out = []
    for value in model.graph.input:
        if value.name in inits or value.name in (input_shapes or {}):
            continue
        for i, d in enumerate(value.type.tensor_type.shape.dim):
            if i and (not d.HasField("dim_value") or d.dim_value <= 0):
                out.append(f"{value.name}[{i}]")
    return out


def _collect_shapes(graph: onnx.GraphProto, shapes: dict[str, list[int]], consts: dict[str, np.ndarray]) -> None:
    from onnx import numpy_helper

    for init in graph.initializer:
        shapes[init.name] = list(init.dims)
        if init.data_type == onnx.TensorProto.INT64 and int(np.prod(init.dims)) <= 8:
            consts[init.name] = numpy_helper.to_array(init)
    for v in list(graph.value_info) + list(graph.input) + list(graph.output):
        dims = v.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") and d.dim_value > 0 for d in dims):
            shapes[v.name] = [d.dim_value for d in dims]
        elif v.type.tensor_type.HasField("shape") and not dims:
            shapes.setdefault(v.name, [])
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    shapes[node.output[0]] = list(attr.t.dims)
                    if attr.t.data_type == onnx.TensorProto.INT64 and int(np.prod(attr.t.dims)) <= 8:
                        consts[node.output[0]] = numpy_helper.to_array(attr.t)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _collect_shapes(attr.g, shapes, consts)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    _collect_shapes(g, shapes, consts)


_COUNTED = _CONV | _MATMUL | set(_RECURRENT_GATES) | _SOFTMAX | {"Gemm"}
_PROBE_MAX_BYTES = 512 * 2**20  # the probe keeps every intermediate tensor it reads: stay modest


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    with contextlib.suppress(Exception):
        # data propagation resolves Shape -> Reshape chains (attention reshapes heads that way)
        return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    return model


def _probe_feeds(work: onnx.ModelProto, samples: dict[str, np.ndarray] | None) -> dict[str, np.ndarray] | None:
    """Inputs for one probe run: the real samples where given, else zeros / uniform noise at the
    inputs' (now concrete) sizes; None when a size is still open or the inputs would be too large."""
    feeds = {}
    inits = {i.name for i in work.graph.initializer}
    for value in work.graph.input:
        if value.name in inits:
            continue
        t = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        if samples and value.name in samples:
            feeds[value.name] = np.asarray(samples[value.name]).astype(dtype, copy=False)
            continue
        dims = [d.dim_value for d in t.shape.dim]
        if any(d <= 0 for d in dims) or int(np.prod(dims)) * 8 > _PROBE_MAX_BYTES:
            return None
        feeds[value.name] = (np.zeros(dims, dtype) if dtype.kind in "iub"
                             else np.random.default_rng(0).random(dims).astype(dtype))
    return feeds


def _run_probe(model: onnx.ModelProto, names: list[str], feeds: dict[str, np.ndarray],
               weights: dict[str, onnx.TensorProto] | None = None) -> dict[str, np.ndarray]:
    """Values of main-graph tensors ``names`` in one ONNX Runtime run; empty if the graph does not run.
    ``weights``: those :func:`~.runtime.weightless` left out of ``model``."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    # ONNX Runtime re-infers shapes itself: sizes fixed on the inputs could make a branch that never
    # runs at these sizes (an If on the sample rate) fail its checks, so the inputs stay open
    probe.graph.ClearField("value_info")
    inits = {i.name for i in probe.graph.initializer}
    for k, value in enumerate(probe.graph.input):
        if value.name not in inits:
            for i, d in enumerate(value.type.tensor_type.shape.dim):
                d.dim_param = f"probe_{k}_{i}"
    existing = {o.name for o in probe.graph.output}
    for name in names:
        if name not in existing:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 4  # a graph that does not run at these sizes is not an error here
    try:
        sess = session_with_weights(probe, weights or {}, opts)
        values = sess.run(names, feeds)
    except Exception:
        return {}
    return dict(zip(names, values))


def _inline_taken_branches(work: onnx.ModelProto, feeds: dict[str, np.ndarray],
                           weights: dict[str, onnx.TensorProto] | None = None) -> onnx.ModelProto:
    """Replace each main-graph ``If`` by the branch the samples take (repeatedly: a branch may hold
    further Ifs), so its nodes are counted with the sizes they really see."""
    for _ in range(8):
        ifs = [n for n in work.graph.node if n.op_type == "If" and n.input]
        if not ifs:
            break
        conds = _run_probe(work, sorted({n.input[0] for n in ifs}), feeds, weights)
        if not conds:
            break
        nodes: list[onnx.NodeProto] = []
        changed = False
        for node in work.graph.node:
            cond = conds.get(node.input[0]) if node.op_type == "If" and node.input else None
            if cond is None or np.size(cond) != 1:
                nodes.append(node)
                continue
            branch = next((a.g for a in node.attribute
                           if a.name == ("then_branch" if bool(np.asarray(cond).reshape(-1)[0]) else "else_branch")),
                          None)
            if branch is None:
                nodes.append(node)
                continue
            work.graph.initializer.extend(branch.initializer)
            nodes.extend(branch.node)
            for inner, outer in zip(branch.output, node.output):
                nodes.append(onnx.helper.make_node("Identity", [inner.name], [outer]))
            changed = True
        if not changed:
            break
        del work.graph.node[:]
        work.graph.node.extend(nodes)
        work = _infer(work)
    return work


def _probe_shapes(work: onnx.ModelProto, shapes: dict[str, list[int]], feeds: dict[str, np.ndarray],
                  weights: dict[str, onnx.TensorProto] | None = None) -> None:
    """Fill the shapes static inference could not tell (pads or reshapes computed at run time) by
    running the graph once in ONNX Runtime and reading the tensors the counted nodes use."""
    wanted: list[str] = []
    for node in work.graph.node:
        if node.op_type not in _COUNTED:
            continue
        for name in [*node.input[:3], node.output[0]]:
            if name and name not in shapes and name not in wanted:
                wanted.append(name)
    if not wanted:
        return
    for name, value in _run_probe(work, wanted, feeds, weights).items():
        if hasattr(value, "shape"):
            shapes[name] = list(value.shape)


def _graph_flops(graph: onnx.GraphProto, shapes, consts, rows: list[dict[str, Any]], times: int) -> int:
    total = 0
    for node in graph.node:
        if node.op_type == "If":
            branches = []
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    sub_rows: list[dict[str, Any]] = []
                    branches.append((_graph_flops(attr.g, shapes, consts, sub_rows, times), sub_rows))
            if branches:
                flops, sub_rows = max(branches, key=lambda b: b[0])
                total += flops
                rows.extend(sub_rows)
            continue
        if node.op_type in ("Loop", "Scan"):
            trips = _trip_count(node, shapes, consts)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    total += _graph_flops(attr.g, shapes, consts, rows, times * trips)
            continue
        flops = _node_flops(node, shapes) * times
        if flops > 0:
            total += flops
            rows.append({"name": node.name or node.output[0], "type": node.op_type, "flops": flops})
    return total


def _trip_count(node: onnx.NodeProto, shapes, consts) -> int:
    if node.op_type == "Loop":
        m = consts.get(node.input[0]) if node.input and node.input[0] else None
        return int(m.reshape(-1)[0]) if m is not None and m.size == 1 and 0 < int(m.reshape(-1)[0]) < 10**7 else 1
    # Scan (opset 9+): the scanned length is the size of the first scan input along its axis (0 by default)
    n_scan = next((a.i for a in node.attribute if a.name == "num_scan_inputs"), 0)
    scan_inputs = list(node.input)[len(node.input) - n_scan:] if n_scan else []
    shape = shapes.get(scan_inputs[0]) if scan_inputs else None
    return int(shape[0]) if shape else 1


def _node_flops(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int:
    out = shapes.get(node.output[0]) if node.output else None
    if not out and node.op_type == "MatMulNBits" and shapes.get(node.input[0]):
        # a contrib op shape inference does not know: A's shape with N columns
        n = next((a.i for a in node.attribute if a.name == "N"), 0)
        out = [*shapes[node.input[0]][:-1], int(n)] if n else None
    op = node.op_type
    if op in _RECURRENT_GATES:
        x = shapes.get(node.input[0])
        w = shapes.get(node.input[1]) if len(node.input) > 1 else None
        r = shapes.get(node.input[2]) if len(node.input) > 2 else None
        if not x or not w or not r or len(x) != 3 or len(w) != 3 or len(r) != 3:
            return 0
        layout = next((a.i for a in node.attribute if a.name == "layout"), 0)
        steps, batch = (x[1], x[0]) if layout else (x[0], x[1])
        dirs, rows_, inp = w
        hidden = r[2]
        return max(0, 2 * steps * batch * dirs * rows_ * (inp + hidden))
    if not out or any(d <= 0 for d in out):
        return 0
    if op in _SOFTMAX:
        return SOFTMAX_FLOPS_PER_ELEMENT * int(np.prod(out))
    if op in _CONV:
        w_index = 3 if op == "QLinearConv" else 1
        w = shapes.get(node.input[w_index]) if len(node.input) > w_index else None
        if not w or any(d <= 0 for d in w):
            return 0
        if op == "ConvTranspose":
            x = shapes.get(node.input[0], [0])
            return max(0, 2 * int(np.prod(x)) * int(np.prod(w[1:])))
        return 2 * int(np.prod(out)) * int(np.prod(w[1:]))
    if op in _MATMUL:
        if op == "MatMulNBits":
            k = next((a.i for a in node.attribute if a.name == "K"), 0)
        else:
            a = shapes.get(node.input[0])
            k = a[-1] if a else 0
        return max(0, 2 * int(np.prod(out)) * int(k))
    if op == "Gemm":
        a = shapes.get(node.input[0])
        trans_a = next((att.i for att in node.attribute if att.name == "transA"), 0)
        if not a:
            return 0
        k = a[0] if trans_a else a[-1]
        return max(0, 2 * int(np.prod(out)) * int(k))
    return 0


def one_sample(handle: ModelHandle, data) -> dict[str, np.ndarray] | None:
    """The first test sample of ``data`` for every input, in the model's layout (for FLOPs)."""
    if data is None:
        return None
    try:
        xs, _ = data.split("test", limit=1)
        return {spec.name: spec.to_model(xs[spec.name]) for spec in handle.inputs}
    except Exception:
        return None


_COUNTS: dict[int, tuple[onnx.ModelProto, dict, Any, Any]] = {}  # graph, shapes, sample, waiter


def start_counts(handle: ModelHandle, data=None):
    """Begin counting the handle's graph on a helper thread, once per graph: its parameters and
    non-zero parameters (:func:`~tugboat.engine.io.onnx_graph.onnx_param_count`) and its FLOPs
    (:func:`onnx_flops` at batch 1, sizes from the first test sample; None when they cannot be
    counted). Returns a function that waits for ``(params, nonzero, flops)``. The counts go on
    beside other work that is not a timing: ``tugboat run`` starts the original's right after the
    memory check, so its FLOPs probe session is built beside the first-run check's (ONNX Runtime
    builds sessions without holding the GIL), and :func:`measure` runs the quality pass meanwhile.
    The graph must not change after (:meth:`ModelHandle.to_onnx` graphs do not)."""
    model = handle.to_onnx()
    shapes, sample = input_shapes(handle), one_sample(handle, data)
    with _DEFLATES_LOCK:
        hit = _COUNTS.get(id(model))
        if hit is not None and hit[0] is model and hit[1] == shapes and _same_sample(hit[2], sample):
            return hit[3]
    box: dict[str, Any] = {}

    def count() -> None:
        try:
            box["params"] = onnx_param_count(model)
        except Exception as exc:  # raised by the waiter, as if counted there
            box["error"] = exc
        try:
            box["flops"] = onnx_flops(model, input_shapes=shapes, samples=sample)[0]
        except Exception:  # a graph shape inference or a probe cannot handle: no FLOPs figure
            box["flops"] = None

    worker = threading.Thread(target=count, name="tugboat-counts", daemon=True)
    worker.start()

    def result() -> tuple[int, int, int | None]:
        worker.join()
        if "error" in box:
            raise box["error"]
        return (*box["params"], box["flops"])

    with _DEFLATES_LOCK:
        while len(_COUNTS) >= 2:  # the original's and the variant's being measured
            _COUNTS.pop(next(iter(_COUNTS)))
        _COUNTS[id(model)] = (model, shapes, sample, result)
    return result


def _same_sample(a: dict[str, np.ndarray] | None, b: dict[str, np.ndarray] | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def input_shapes(handle: ModelHandle, batch: int = 1) -> dict[str, tuple[int, ...]]:
    """Concrete shapes of the inputs whose sizes are known (from the file or from the data)."""
    out = {}
    for spec in handle.inputs:
        with contextlib.suppress(ModelLoadError):
            out[spec.name] = spec.concrete(batch)
    return out


def layer_table(handle: ModelHandle) -> list[dict[str, Any]]:
    """One row per layer with weights: name, type, params, FLOPs at batch 1.

    Parameters are those of the deployed artifact (:meth:`ModelHandle.param_count`), each weight
    tensor attributed to the layer that uses it, so the rows add up to the model's ``params``. For a
    torch model the rows are its modules (FLOPs of their exported nodes, see _module_flops): a BatchNorm the
    export folds into its convolution keeps a row with 0 parameters (``folded``), and weights the
    export puts outside any module row (e.g. a positional embedding) get rows of their ONNX nodes."""
    model = handle.to_onnx()
    onnx_rows = _onnx_layer_rows(handle, model)
    if handle.module is None or handle.onnx_model is not None:
        return onnx_rows
    module = handle.module
    counts = _module_flops(handle, onnx_rows)
    deployed: dict[str, int] = {}
    for r in onnx_rows:
        key = layer_key(r["name"])
        deployed[key] = deployed.get(key, 0) + r["params"]
    rows, used = [], set()
    for name, sub in module.named_modules():
        own = list(sub.parameters(recurse=False))
        if not name or not own:
            continue
        key = next((k for k in counts if k.endswith("." + name) or k == name), None)
        flops = int(counts[key]) if key else 0
        row = {"name": name, "type": type(sub).__name__, "params": deployed.get(name, 0), "flops": flops}
        used.add(name)
        if name not in deployed:
            # no weights of its own in the artifact: a BatchNorm folded into its convolution (or a
            # module the forward pass never uses)
            row["folded"] = True
        rows.append(row)
    rows += [r for r in onnx_rows if layer_key(r["name"]) not in used and r["params"]]
    return rows


def _module_flops(handle: ModelHandle, onnx_rows: list[dict[str, Any]]) -> dict[str, int]:
    """FLOPs at batch 1 per torch module name: those of the exported graph's nodes of that module
    (the same formula), or from FlopCounterMode when no node maps onto a module. The counting mode
    imports torch._dynamo, sympy and scikit-learn (about 1 s), so it is only the fallback."""
    names = {name for name, _ in handle.module.named_modules() if name}
    counts: dict[str, int] = {}
    for r in onnx_rows:
        key = layer_key(r["name"])
        if key in names and r["flops"]:
            counts[key] = counts.get(key, 0) + int(r["flops"])
    if counts:
        return counts
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    try:
        inputs = handle.example_inputs(1)
        with counter, torch.inference_mode():
            handle.module(*inputs)
        return {k: int(sum(v.values())) for k, v in counter.get_flop_counts().items()}
    except Exception:
        return {}


def _onnx_layer_rows(handle: ModelHandle, model: onnx.ModelProto) -> list[dict[str, Any]]:
    """Rows of the graph's nodes with FLOPs or weights; every counted weight tensor
    (:func:`~tugboat.engine.io.onnx_graph.onnx_param_tensors`) goes to the first node that uses it, seen
    through DequantizeLinear / Cast (a quantized or fp16 variant's layers have their parameters),
    and to that node's layer row when the layer has one already (a Linear's MatMul and its bias Add)."""
    _, nodes = onnx_flops(model, input_shapes=input_shapes(handle))
    all_nodes = list(graph_nodes(model.graph))
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in all_nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    rows = [{"name": info["name"], "type": info["type"], "params": 0, "flops": info["flops"]} for info in nodes]
    by_name = {r["name"]: r for r in rows}
    by_key: dict[str, dict[str, Any]] = {}
    for r in rows:
        by_key.setdefault(layer_key(r["name"]), r)

    def user(name: str, depth: int = 0) -> onnx.NodeProto | None:
        for n in consumers.get(name, []):
            if n.op_type in ("DequantizeLinear", "Cast") and depth < 3 and n.output:
                found = user(n.output[0], depth + 1)
                if found is not None:
                    return found
            return n
        return None

    for tensor, params, _ in onnx_param_tensors(model):
        node = user(tensor)
        name = (node.name or node.output[0]) if node is not None and (node.name or node.output) else tensor
        row = by_name.get(name) or by_key.get(layer_key(name))
        if row is None:
            row = {"name": name, "type": node.op_type if node is not None else "Initializer",
                   "params": 0, "flops": 0}
            rows.append(row)
            by_name[name] = row
            by_key.setdefault(layer_key(name), row)
        row["params"] += params
    return [r for r in rows if r["params"] or r["flops"]]


# --- latency -----------------------------------------------------------------------------------
#
# A variant is timed *paired* with the baseline: alternating blocks of runs (variant then baseline,
# then baseline then variant, so a linear drift cancels), same inputs, same thread count, in the
# same seconds. Each block gives one ratio (baseline block median / variant block median); the
# speed-up is the median of the block ratios and its 95% interval a seeded bootstrap over blocks,
# widened by a small systematic allowance (two sessions of one graph differ by 1-2% from memory
# placement alone). A machine that is busy moves both sides of a block alike, so the ratio stays
# honest where two medians taken minutes apart do not. See docs/measurement.md.

SLOWER_PREFIX = "slower than the original"
NOISY_PREFIX = "timing too noisy: re-measure"
FLOPS_PREFIX = "no faster than its FLOPs promise"


def is_timing_warning(text: str) -> bool:
    """Warnings :func:`slower_than` and :func:`flops_promise` write (replaced, not added to, when a
    variant is re-measured)."""
    return text.startswith((SLOWER_PREFIX, NOISY_PREFIX, FLOPS_PREFIX))


def _onnx_runner(sess, inputs: list[np.ndarray]):
    feeds = {i.name: _cast(x, i.type) for i, x in zip(sess.get_inputs(), inputs)}
    return lambda: sess.run(None, feeds)


def _torch_runner(module: torch.nn.Module, inputs: list[np.ndarray], device: str = "cpu"):
    """A call of ``module`` (already on ``device``) on ``inputs``; on a GPU it waits for the result."""
    eval_mode(module)
    tensors = [torch.from_numpy(x).to(device) for x in inputs]
    if device == "cpu":
        return lambda: module(*tensors)

    def run():
        out = module(*tensors)
        torch.cuda.synchronize(device)
        return out

    return run


def on_device(module: torch.nn.Module, device: str) -> torch.nn.Module:
    """``module`` itself on the cpu, else a copy of it on ``device`` (the variant stays where it is)."""
    return module if device == "cpu" else copy.deepcopy(module).to(device)


def _mark_devices(result: dict[str, dict[str, Any]], cfg: MeasureConfig, session) -> None:
    """Every latency entry names the device it ran on (and why, when it is not the one asked for)."""
    for runtime, entries in result.items():
        device = ort_device(session, cfg.device) if runtime == "onnxruntime" and session else cfg.device
        for entry in entries.values():
            entry["device"] = device
            if device != cfg.device:
                entry["device_note"] = (f"{runtime} has no CUDA execution provider here (pip install "
                                        f"onnxruntime-gpu): timed on the {device}")


@contextlib.contextmanager
def _timing(runtime: str, threads: int):
    if runtime == "torch":
        with torch_threads(threads), torch.inference_mode():
            yield
    else:
        yield


def _measured(times: list[float], inputs: list[np.ndarray], cfg: MeasureConfig, runtime: str,
              load: float | None, extended: bool) -> dict[str, Any]:
    out = summary(times, len(inputs[0]), cfg.threads, runtime)
    out["load"] = _max_load(load, machine_load())
    out["noisy"] = out["spread"] > NOISY_SPREAD
    if extended:
        out["extended"] = True
    return out


def _max_load(*loads: float | None) -> float | None:
    known = [x for x in loads if x is not None]
    return max(known) if known else None


def latency_onnx(model: onnx.ModelProto | bytes, inputs: list[np.ndarray], cfg: MeasureConfig,
                 progress: Progress | None = None, session=None) -> dict[str, Any]:
    sess = session or ort_session(model, cfg.threads)
    load = machine_load()
    counts: dict[str, int] = {}
    times, extended = time_loop(_onnx_runner(sess, inputs), cfg, progress, counts)
    return {**_measured(times, inputs, cfg, "onnxruntime", load, extended), "warmup_runs": counts["warmup"]}


def latency_torch(module: torch.nn.Module, inputs: list[np.ndarray], cfg: MeasureConfig,
                  progress: Progress | None = None) -> dict[str, Any]:
    load = machine_load()
    run = _torch_runner(module, inputs, cfg.device)
    counts: dict[str, int] = {}
    with _timing("torch", cfg.threads):
        times, extended = time_loop(run, cfg, progress, counts)
    return {**_measured(times, inputs, cfg, "torch", load, extended), "warmup_runs": counts["warmup"]}


class TimingReference:
    """The baseline kept ready to be timed beside each variant.

    Its ONNX Runtime sessions (one per thread count) and its input batches are built once and kept
    alive across variants (a sweep, a GUI session), so pairing costs only the baseline's own runs.
    ``lock`` keeps paired timings serial: two variants measured at once would disturb each other."""

    def __init__(self, handle: ModelHandle, samples: dict[str, np.ndarray] | None = None) -> None:
        self.handle = handle
        self.samples = samples
        self.lock = threading.Lock()
        self._inputs: dict[int, list[np.ndarray]] = {}
        self._sessions: dict[tuple[int, str], Any] = {}
        self._modules: dict[str, torch.nn.Module] = {}

    @property
    def torch_ok(self) -> bool:
        return self.handle.module is not None and self.handle.onnx_model is None

    def inputs(self, batch: int) -> list[np.ndarray]:
        if batch not in self._inputs:
            self._inputs[batch] = model_inputs(self.handle, batch, self.samples)
        return self._inputs[batch]

    def session(self, threads: int, device: str = "cpu"):
        if (threads, device) not in self._sessions:
            self._sessions[threads, device] = shared_session(self.handle.to_onnx(), threads, device)
        return self._sessions[threads, device]

    def runner(self, runtime: str, batch: int, threads: int, device: str = "cpu"):
        if runtime == "torch":
            if device not in self._modules:
                self._modules[device] = on_device(self.handle.module, device)
            return _torch_runner(self._modules[device], self.inputs(batch), device)
        return _onnx_runner(self.session(threads, device), self.inputs(batch))


def speedup_interval(ratios: list[float], confidence: float = 0.95, systematic: float = 0.03,
                     seed: int = 0) -> tuple[float, float, float]:
    """(median, low, high) of the speed-up from block ratios: the median ratio, and a seeded
    percentile bootstrap of that median over blocks, at least ``systematic`` either side."""
    r = np.log(np.asarray(ratios, dtype=float))
    med = float(np.median(r))
    if len(r) < 3:
        lo, hi = float(r.min()), float(r.max())
    else:
        rng = np.random.default_rng(seed)
        boots = np.median(r[rng.integers(0, len(r), size=(2000, len(r)))], axis=1)
        alpha = (1.0 - confidence) / 2
        lo, hi = (float(v) for v in np.quantile(boots, [alpha, 1 - alpha]))
    pad = float(np.log1p(systematic))
    lo, hi = min(lo, med - pad), max(hi, med + pad)
    return float(np.exp(med)), float(np.exp(lo)), float(np.exp(hi))


def latency_paired(variant_run, base_run, inputs: list[np.ndarray], cfg: MeasureConfig, runtime: str,
                   progress: Progress | None = None) -> dict[str, Any]:
    """Time a variant and the baseline in alternating blocks; the variant's summary with a
    ``speedup`` entry: ``{"median", "low", "high", "blocks", "confidence", "baseline_median",
    "baseline_p90", "width", "noisy", ...}`` (speed-up > 1: the variant is faster)."""
    load0 = machine_load()
    t0 = time.perf_counter()
    k, warm = _runs_per_block(variant_run, base_run, cfg, progress)
    v_times, b_times, ratios, extended = _paired_blocks(variant_run, base_run, k, cfg, progress)
    med, lo, hi = speedup_interval(ratios, cfg.confidence, cfg.systematic)
    width = hi / lo - 1
    out = _measured(v_times, inputs, cfg, runtime, load0, False)
    out["speedup"] = {
        "median": round(med, 4), "low": round(lo, 4), "high": round(hi, 4), "blocks": len(ratios),
        "runs_per_block": k, "warmup_runs": warm, "confidence": cfg.confidence,
        "baseline_median": round(statistics.median(b_times), 4), "baseline_p90": round(p90(b_times), 4),
        "baseline_spread": round(spread(b_times), 3), "width": round(width, 4),
        "noisy": bool(width > cfg.max_width or len(ratios) < 3), "extended": extended,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    out["noisy"] = out["speedup"]["noisy"]
    out["paired"] = True
    return out


def _runs_per_block(variant_run, base_run, cfg: MeasureConfig, progress: Progress | None) -> tuple[int, int]:
    """Warm both models up and size a block (runs of one model in a row) to ``cfg.block_seconds``:
    (runs per block, warm-up runs of each model)."""
    warm_until = time.perf_counter() + max(cfg.max_seconds / 2, 0.05)
    # each model's time per run: its fastest warm-up run after the cold first one (a run caught by
    # a time slice of another process would make the blocks too short to filter such runs out)
    fastest = {True: float("inf"), False: float("inf")}
    i = 0
    for i in range(max(3, cfg.warmup)):
        if progress is not None:
            progress.check()
        for fn, is_variant in ((variant_run, True), (base_run, False)):
            a = time.perf_counter()
            fn()
            if i:
                fastest[is_variant] = min(fastest[is_variant], time.perf_counter() - a)
        if i and time.perf_counter() > warm_until:
            break
    per_run = max(fastest.values())
    return int(min(64, max(1, cfg.block_seconds / max(per_run, 1e-6)))), i + 1


def _paired_blocks(variant_run, base_run, k: int, cfg: MeasureConfig, progress: Progress | None
                   ) -> tuple[list[float], list[float], list[float], bool]:
    """Alternating blocks of ``k`` runs until the speed-up interval is narrow enough (or the noisy
    budget is spent): (variant times, baseline times, block ratios, extended)."""
    v_times: list[float] = []
    b_times: list[float] = []
    ratios: list[float] = []
    start = time.perf_counter()
    extended = False
    pair = ((variant_run, True), (base_run, False))
    while True:
        block: dict[bool, list[float]] = {True: [], False: []}
        for fn, is_variant in (pair if len(ratios) % 2 == 0 else pair[::-1]):
            for _ in range(k):
                if progress is not None:
                    progress.check()
                a = time.perf_counter()
                fn()
                block[is_variant].append((time.perf_counter() - a) * 1000.0)
        v_times += block[True]
        b_times += block[False]
        ratios.append(statistics.median(block[False]) / max(statistics.median(block[True]), 1e-9))
        elapsed = time.perf_counter() - start
        n = len(ratios)
        # decided by blocks and runs, not by a minimum time (min_seconds is for unpaired timings):
        # a narrow interval after min_blocks blocks is a decided one
        if n >= cfg.min_blocks and n * k >= cfg.min_runs:
            interval = speedup_interval(ratios, cfg.confidence, cfg.systematic)
            if interval[2] / interval[1] - 1 <= cfg.max_width or elapsed >= cfg.noisy_seconds:
                return v_times, b_times, ratios, extended
            extended = True  # too wide to decide yet: more blocks, up to the noisy budget
        elif elapsed >= cfg.noisy_seconds and n >= 3:
            return v_times, b_times, ratios, extended


def chosen_runtime(cfg: MeasureConfig, handle: ModelHandle) -> str:
    """The user's runtime, or ONNX Runtime for a model that has no torch module to run."""
    torch_ok = handle.module is not None and handle.onnx_model is None
    return cfg.runtime if (cfg.runtime != "torch" or torch_ok) else "onnxruntime"


def chosen_latency(lat: dict[str, dict[str, Any]], cfg: MeasureConfig, handle: ModelHandle) -> dict[str, Any]:
    """The entry of :func:`latency_all`'s result for the user's runtime and batch."""
    return lat.get(chosen_runtime(cfg, handle), {}).get(f"b{fixed_batch(handle) or cfg.batch}") or next(
        iter(next(iter(lat.values())).values()))


def latency_all(handle: ModelHandle, cfg: MeasureConfig, samples=None,
                progress: Progress | None = None,
                reference: TimingReference | None = None) -> dict[str, dict[str, Any]]:
    """Latency per runtime and batch: ``{"onnxruntime": {"b64": {...}, "b1": {...}}, "torch": ...}``.

    With a ``reference`` (the baseline), the user's runtime and batch (``cfg.runtime``,
    ``cfg.batch``) are timed paired with it (:func:`latency_paired`), on the reference's inputs;
    the other runtimes and batches are timed alone, as information."""
    fixed = fixed_batch(handle)
    batches = [fixed] if fixed else [cfg.batch] + ([1] if cfg.also_batch1 and cfg.batch != 1 else [])
    runtimes = [cfg.runtime]
    if cfg.both_runtimes:
        runtimes += [r for r in RUNTIMES if r != cfg.runtime]
    torch_ok = handle.module is not None and handle.onnx_model is None
    chosen = chosen_runtime(cfg, handle)
    if chosen not in runtimes:
        runtimes.insert(0, chosen)
    result: dict[str, dict[str, Any]] = {}
    session = None
    module = on_device(handle.module, cfg.device) if torch_ok and "torch" in runtimes else handle.module
    # only the user's runtime and batch are worth extra seconds when the machine is busy
    info_cfg = replace(cfg, noisy_seconds=cfg.max_seconds)
    for runtime in runtimes:
        if runtime == "torch" and not torch_ok:
            continue
        result[runtime] = {}
        for b in batches:
            primary = runtime == chosen and b == batches[0]  # the user's runtime and batch
            paired = primary and reference is not None and (runtime != "torch" or reference.torch_ok)
            x = reference.inputs(b) if paired else model_inputs(handle, b, samples)
            if runtime == "onnxruntime":
                session = session or shared_session(handle.to_onnx(), cfg.threads, cfg.device)
            if paired:
                run = _onnx_runner(session, x) if runtime == "onnxruntime" else _torch_runner(module, x, cfg.device)
                with reference.lock, _timing(runtime, cfg.threads):
                    base_run = reference.runner(runtime, b, cfg.threads, cfg.device)
                    result[runtime][f"b{b}"] = latency_paired(run, base_run, x, cfg, runtime, progress)
            else:
                use = cfg if primary else info_cfg
                if runtime == "onnxruntime":
                    result[runtime][f"b{b}"] = latency_onnx(None, x, use, progress, session=session)
                else:
                    result[runtime][f"b{b}"] = latency_torch(module, x, use, progress)
    _mark_devices(result, cfg, session)
    return result


# --- quality -----------------------------------------------------------------------------------


def quality(handle: ModelHandle, data, reference: list[np.ndarray] | None, runtime: str,
            threads: int, progress: Progress | None = None) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Accuracy (with labels) and fidelity to ``reference`` on the test split; also the outputs."""
    xs, labels = data.split("test")
    outputs = predict(handle, xs, runtime=runtime, threads=threads, progress=progress)
    check_finite(outputs, handle.source)
    classification = handle.task == "classification"
    acc = None
    if labels is not None and classification:
        acc = float(np.mean(outputs[0].reshape(len(labels), -1).argmax(1) == labels))
    return {"accuracy": acc, "fidelity": fidelity(outputs, reference, classification)}, outputs


# --- all together --------------------------------------------------------------------------------

def measure(handle: ModelHandle, data=None, cfg: MeasureConfig | None = None, *,
            reference: list[np.ndarray] | None = None, progress: Progress | None = None,
            artifact: bytes | None = None, timing: TimingReference | None = None,
            deflate_later: bool = False) -> tuple[dict[str, Any], list[np.ndarray] | None]:
    """All metrics of DESIGN.md for one model; returns (metrics, test-split outputs).

    With ``timing`` (the baseline's :class:`TimingReference`) the latency in the user's runtime
    and batch is paired with the baseline's and carries ``latency_ms["speedup"]``.
    ``deflate_later``: ``compressed_bytes`` may be None while the deflate goes on beside later work
    (on a core the timing leaves idle); ``start_deflate(handle.to_onnx())()`` gives it.

    Errors about the model name its file; a user's ONNX file that ONNX Runtime refuses to run is
    a :class:`ModelLoadError` (a problem with the input), not a crash."""
    cfg = cfg or MeasureConfig()
    cfg = replace(cfg, device=resolve_device(cfg.device, "measure.device"))  # a missing GPU: one line
    try:
        extra = requested_runtimes(cfg)
        if not extra:
            return _measure(handle, data, cfg, reference=reference, progress=progress, artifact=artifact,
                            timing=timing, deflate_later=deflate_later)
        # ONNX Runtime / torch measure everything else; each requested runtime adds its own entry
        core = cfg if cfg.runtime in RUNTIMES else replace(cfg, runtime="onnxruntime")
        progress = progress or null_progress()
        metrics, outputs = _measure(handle, data, core, reference=reference, progress=progress.sub(0.0, 0.6),
                                    artifact=artifact, timing=timing, deflate_later=deflate_later)
        add_runtimes(metrics, handle, data, cfg, extra, reference if reference is not None else outputs,
                     progress.sub(0.6, 1.0))
        return metrics, outputs
    except TugboatError as exc:
        if exc.path is None:
            exc.path = handle.source
            exc.args = (str(exc),)
        raise
    except Exception as exc:
        if handle.format == "onnx" and not handle.history and type(exc).__module__.startswith("onnxruntime"):
            raise ModelLoadError(f"ONNX Runtime cannot run this graph ({' '.join(str(exc).split())[:200]})",
                                 path=handle.source) from None
        raise


def requested_runtimes(cfg: MeasureConfig) -> list[str]:
    """The runtimes measured one by one (empty: only the ONNX Runtime / torch timing above)."""
    names = list(dict.fromkeys([cfg.runtime, *cfg.runtimes]))
    return names if len(names) > 1 or names[0] not in RUNTIMES else []


def add_runtimes(metrics: dict[str, Any], handle: ModelHandle, data, cfg: MeasureConfig, names: list[str],
                 reference: list[np.ndarray] | None, progress: Progress | None = None) -> None:
    """``metrics["runtimes"]``: latency, fidelity and version per runtime; ``latency_ms`` is the first
    runtime's when it could run the variant (else it stays ONNX Runtime's, and says so)."""
    per = measure_runtimes(handle, cfg, names, data=data, reference=reference, progress=progress)
    metrics["runtimes"] = per
    first = per.get(cfg.runtime) or {}
    if first.get("ok") and first.get("latency_ms"):
        lat = dict(first["latency_ms"])
        if cfg.runtime in RUNTIMES and metrics.get("latency_ms", {}).get("runtime") == cfg.runtime:
            return  # ONNX Runtime / torch: keep the main timing (paired, with warm-up statistics)
        metrics["latency_ms"] = lat
    elif cfg.runtime not in RUNTIMES:
        metrics["latency_ms"]["note"] = (f"measured in onnxruntime: "
                                         f"{first.get('reason') or cfg.runtime + ' did not run'}")


def _measure(handle: ModelHandle, data=None, cfg: MeasureConfig | None = None, *,
             reference: list[np.ndarray] | None = None, progress: Progress | None = None,
             artifact: bytes | None = None, timing: TimingReference | None = None,
             deflate_later: bool = False) -> tuple[dict[str, Any], list[np.ndarray] | None]:
    cfg = cfg or MeasureConfig()
    progress = progress or null_progress()
    t0 = time.perf_counter()
    progress.update(0.0, "measuring size")
    model = handle.to_onnx()
    if artifact is None:  # the bytes its sessions and its file use too, serialized once
        artifact, deflated = serialized(model), start_deflate(model)
    else:  # on another core while quality is measured, done before timing
        deflated = _deflate_beside(artifact)
    metrics: dict[str, Any] = {"size_bytes": len(artifact), "compressed_bytes": 0}
    counts = start_counts(handle, data)  # begun beside earlier work, or now beside the quality pass
    metrics.update(params=None, nonzero_params=None, flops=None)  # filled in below, in this order
    runtime = chosen_runtime(cfg, handle)
    outputs = None
    if data is not None:
        progress.update(0.1, "measuring quality")
        q, outputs = quality(handle, data, reference, runtime, cfg.threads, progress.sub(0.1, 0.4))
        metrics.update(q)
    else:
        metrics["accuracy"] = None
        metrics["fidelity"] = fidelity([np.zeros(1)], None, handle.task == "classification")
    params, metrics["nonzero_params"], metrics["flops"] = counts()  # before the timing: it runs alone
    metrics["params"] = max(1, params)
    spare_core = cfg.threads < _cores()  # the deflate may go on beside the timing on a core it leaves idle
    if not spare_core:
        metrics["compressed_bytes"] = deflated()
    progress.update(0.4, "measuring latency")
    samples = data.split("test", limit=cfg.batch)[0] if data is not None else None
    lat = latency_all(handle, cfg, samples, progress, reference=timing)
    metrics["compressed_bytes"] = deflated() if not deflate_later or not spare_core else None
    metrics["latency_ms"] = chosen_latency(lat, cfg, handle)
    metrics["latency"] = lat
    metrics["seconds"] = round(time.perf_counter() - t0, 3)
    progress.update(1.0, "measured")
    return metrics, outputs


def slower_than(variant: dict[str, Any], baseline: dict[str, Any] | None = None,
                tolerance: float = 1.05) -> list[str]:
    """The "is it actually faster?" verdict, for the runtime and batch the user chose only
    (``latency_ms``) and only from a paired timing (``latency_ms["speedup"]``):

    * "slower than the original ..." when the whole interval lies below ``1 / tolerance``;
    * "timing too noisy: re-measure ..." when the timing was marked noisy and its interval reaches
      below ``1 / tolerance`` (it can decide nothing);
    * nothing otherwise. Unpaired figures (other runtimes and batches, old reports) decide nothing:
      :func:`timing_notes` describes them as information. ``baseline`` is not needed (the paired
      timing holds the baseline's figures) and kept for callers of the old signature."""
    lat = variant.get("latency_ms") or {}
    sp = lat.get("speedup")
    if not sp:
        return []
    where = f"{lat.get('runtime')} at batch {lat.get('batch')}"
    shown = (f"speed-up {sp['median']:.2f}x, 95% interval {sp['low']:.2f}-{sp['high']:.2f}x, "
             f"{lat['median']:.3g} ms vs {sp['baseline_median']:.3g} ms, paired over {sp['blocks']} blocks")
    if sp["high"] < 1.0 / tolerance:
        return [f"{SLOWER_PREFIX} in {where}: {1.0 / sp['median']:.2f}x its time ({shown})"]
    if sp.get("noisy") and sp["low"] < 1.0 / tolerance:
        load = lat.get("load")
        busy = f"; machine load {load:.1f}" if load is not None else ""
        return [f"{NOISY_PREFIX} ({where}: {shown}{busy})"]
    return []


def flops_promise(variant: dict[str, Any], baseline: dict[str, Any], steps: list[dict[str, Any]] | None = None,
                  min_ratio: float = 1.25, tolerance: float = 1.05) -> list[str]:
    """A warning when the variant has at least ``min_ratio`` x fewer FLOPs than the original but the
    paired timing shows no speed-up (the whole interval below ``tolerance``): the usual cause is
    channel counts the runtime's kernels handle slowly (not multiples of 8 or 16)."""
    sp = (variant.get("latency_ms") or {}).get("speedup")
    flops, base_flops = variant.get("flops"), baseline.get("flops")
    if not sp or sp.get("noisy") or not flops or not base_flops:
        return []
    ratio = base_flops / flops
    if ratio < min_ratio or sp["high"] >= tolerance:
        return []
    prunes = [s for s in steps or [] if s.get("technique") == "prune" and s.get("method") == "structured"]
    hint = ""
    if prunes and not all(s.get("round_to") for s in prunes):
        n = channel_multiple(int((variant.get("latency_ms") or {}).get("threads") or 1))
        hint = (f"; channel counts that are not multiples of {n} run on slower kernels on this CPU "
                f"(measured): try round_to = {n}")
    return [f"{FLOPS_PREFIX}: {ratio:.2f}x fewer FLOPs than the original but a speed-up of "
            f"{sp['median']:.2f}x (95% interval {sp['low']:.2f}-{sp['high']:.2f}x){hint}"]


def own_timing_warnings(metrics: dict[str, Any], who: str = "the original") -> list[str]:
    """A warning for an unpaired timing (the original's own) that stayed noisy: its absolute
    median (the table's Latency, the chart's latency axis) is not to be trusted."""
    lat = metrics.get("latency_ms") or {}
    if not lat.get("noisy") or lat.get("speedup"):
        return []
    load = lat.get("load")
    busy = f", machine load {load:.1f}" if load is not None else ""
    return [f"{NOISY_PREFIX} ({who}: p90 is {lat.get('spread', 0):.1f}x the median of "
            f"{lat.get('median', 0):.3g} ms{busy}; speed-ups are paired and stay valid)"]


def timing_notes(variant: dict[str, Any], baseline: dict[str, Any], tolerance: float = 1.05) -> list[str]:
    """Information (not verdicts) about the runtimes and batches the user did not choose, where the
    variant's unpaired median is slower than the baseline's with the same runtime, batch, threads."""
    chosen = variant.get("latency_ms") or {}
    notes = []
    for runtime, per_batch in (variant.get("latency") or {}).items():
        for key, lat in per_batch.items():
            if runtime == chosen.get("runtime") and lat.get("batch") == chosen.get("batch"):
                continue
            base = (baseline.get("latency") or {}).get(runtime, {}).get(key)
            if not base or base.get("threads") != lat.get("threads") or not base.get("median"):
                continue
            ratio = lat["median"] / base["median"]
            if ratio > tolerance:
                notes.append(f"information: in {runtime} at batch {lat['batch']} (not the runtime/batch "
                             f"chosen in [measure]) it measured {ratio:.2f}x the original's time "
                             f"({lat['median']:.3g} vs {base['median']:.3g} ms, unpaired: no verdict)")
    return notes
