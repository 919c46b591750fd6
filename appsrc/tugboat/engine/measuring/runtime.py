"""Running a model: ONNX Runtime sessions and torch eager, with pinned thread counts."""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import onnx

from ..lazy import torch


def ort_providers(device: str = "cpu") -> list[str]:
    """ONNX Runtime's execution providers for a resolved ``device``: CUDA first for a GPU when this
    ONNX Runtime has it (the ``onnxruntime-gpu`` package), the CPU always (also as the fallback)."""
    import onnxruntime as ort

    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def ort_device(session, device: str = "cpu") -> str:
    """Where ``session`` runs: ``device`` when its first provider is CUDA, else ``"cpu"``."""
    return device if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"


def ort_session(model: onnx.ModelProto | bytes, threads: int = 1, device: str = "cpu"):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, int(threads))
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 4  # errors are raised as exceptions (and reported once, as one line)
    data = model if isinstance(model, bytes) else model.SerializeToString()
    providers = ort_providers(device)
    if providers[0] == "CUDAExecutionProvider":
        index = int(device.partition(":")[2] or 0)
        return ort.InferenceSession(data, opts, providers=[("CUDAExecutionProvider", {"device_id": index}),
                                                           "CPUExecutionProvider"])
    return ort.InferenceSession(data, opts, providers=providers)


WEIGHTLESS_MIN_BYTES = 4096  # smaller tensors keep their values (shape constants, Reshape targets)
_PROBE_DATA = "tugboat-weights-in-memory"


_WEIGHTLESS: OrderedDict[int, tuple[onnx.ModelProto, onnx.ModelProto, dict[str, onnx.TensorProto]]] = OrderedDict()


def weightless(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, onnx.TensorProto]]:
    """A copy of ``model`` whose large main-graph weights carry their name, type and shape but no
    values, and the weights left out (by name, the caller's own tensors: not copied). Made once per
    graph (the memory check and the FLOPs count of one graph share it; ``model`` must not change
    after, like every :meth:`ModelHandle.to_onnx` graph): callers copy it before changing it.

    Shape inference reads a weight's type and shape only, so it gives the same shapes on this copy
    in a fraction of the time (MiniLM, 90 MB: 0.01 s instead of 1.3 s; serializing the weights to
    the C++ side was the cost); :func:`session_with_weights` runs it in ONNX Runtime with the
    weights handed over in memory. Subgraph weights are kept (they are small, and inlined branches
    take them along)."""
    with _SHARED_LOCK:
        hit = _WEIGHTLESS.get(id(model))
        if hit is not None and hit[0] is model:
            return hit[1], hit[2]
    out = onnx.ModelProto()
    _copy_fields(model, out, skip="graph")
    _copy_fields(model.graph, out.graph, skip="initializer")
    left: dict[str, onnx.TensorProto] = {}
    for init in model.graph.initializer:
        if init.HasField("raw_data") and _raw_size(init) >= WEIGHTLESS_MIN_BYTES:
            out.graph.initializer.add(name=init.name, dims=list(init.dims), data_type=init.data_type)
            left[init.name] = init
        else:
            out.graph.initializer.append(init)
    with _SHARED_LOCK:
        _WEIGHTLESS[id(model)] = (model, out, left)
        while len(_WEIGHTLESS) > SHARED_SESSIONS:
            _WEIGHTLESS.popitem(last=False)
    return out, left


_ITEM_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}


def _raw_size(init: onnx.TensorProto) -> int:
    """Bytes of a weight's ``raw_data`` from its shape and type (reading ``raw_data`` copies it:
    90 MB for MiniLM), its real length for types packed below a byte."""
    itemsize = _ITEM_BYTES.get(init.data_type)
    if itemsize is None:
        return len(init.raw_data)
    n = itemsize
    for d in init.dims:
        n *= int(d)
    return n


def session_with_weights(model: onnx.ModelProto, weights: dict[str, onnx.TensorProto], opts):
    """An ONNX Runtime session of a :func:`weightless` graph, its weights given in memory (as external
    initializers: nothing of them is serialized)."""
    import onnxruntime as ort
    from onnx import numpy_helper

    model = _copy_model(model)
    names, values = [], []
    for init in model.graph.initializer:
        if init.name in weights and not init.HasField("raw_data"):
            init.data_location = onnx.TensorProto.EXTERNAL
            del init.external_data[:]
            for key, value in (("location", _PROBE_DATA), ("offset", "0"), ("length", "0")):
                init.external_data.add(key=key, value=value)
            names.append(init.name)
            values.append(ort.OrtValue.ortvalue_from_numpy(numpy_helper.to_array(weights[init.name])))
    if names:
        opts.add_external_initializers(names, values)
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    sess.tugboat_weights = values  # ONNX Runtime reads the arrays in place: they live as long as the session
    return sess


def _copy_fields(src, dst, skip: str) -> None:
    """Every set field of protobuf message ``src`` but ``skip`` into ``dst`` (copies)."""
    for fd, value in src.ListFields():
        if fd.name == skip:
            continue
        if hasattr(value, "extend"):  # a repeated field
            getattr(dst, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def _copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


_SHARED: OrderedDict[tuple[int, int, str], tuple[object, object]] = OrderedDict()
_SHARED_LOCK = threading.Lock()
SHARED_SESSIONS = 2  # a variant's graph and the baseline's: enough for measuring one after another


def shared_session(model: onnx.ModelProto, threads: int = 1, device: str = "cpu"):
    """One ONNX Runtime session per graph and thread count, reused by the first-run probe, the quality
    pass and the timing of the same graph (each new session serializes the graph and optimises it
    again: about 0.3 s for a 90 MB model). Sessions are safe to run from several threads. The graph
    must not be changed after (:meth:`ModelHandle.to_onnx` graphs are not)."""
    sess = cached_session(model, threads, device)
    if sess is not None:
        return sess
    key = (id(model), max(1, int(threads)), device)
    with _SHARED_LOCK:  # measuring moved on to a graph: a trial session is taken over or dropped
        trial = _TRIAL.pop("last", None)
    if trial is not None and trial[0] is model and trial[1] == key[1:]:
        remember_serialized(model, trial[2])
        sess = trial[3]
    else:
        trial = None  # (freed before the new session is made)
        sess = ort_session(serialized(model), threads, device)
    with _SHARED_LOCK:
        _SHARED[key] = (model, sess)  # the graph is held, so its id cannot be reused while cached
        _SHARED.move_to_end(key)
        while len(_SHARED) > SHARED_SESSIONS:
            _SHARED.popitem(last=False)
    return sess


def cached_session(model: onnx.ModelProto, threads: int = 1, device: str = "cpu"):
    """The :func:`shared_session` of this very graph object and thread count if there is one, else
    None (for callers that run many throw-away graphs and must not push the measured ones out)."""
    key = (id(model), max(1, int(threads)), device)
    with _SHARED_LOCK:
        hit = _SHARED.get(key)
        if hit is not None and hit[0] is model:
            _SHARED.move_to_end(key)
            return hit[1]
    return None


_TRIAL: dict[str, tuple[onnx.ModelProto, tuple[int, str], bytes, object]] = {}


def trial_session(model: onnx.ModelProto, threads: int = 1, device: str = "cpu"):
    """A session for checking a graph that may be thrown away (a technique scoring what it made):
    the :func:`shared_session` of this graph if it has one, else a new one kept aside with the
    graph's bytes (the latest only), never pushing the measured graphs' sessions out. When this
    graph is the one measured next (the variant a step returns), :func:`shared_session` takes both
    over: the variant is not serialized and optimised a second time. The graph must not be changed
    after."""
    sess = cached_session(model, threads, device)
    if sess is not None:
        return sess
    key = (max(1, int(threads)), device)
    with _SHARED_LOCK:
        hit = _TRIAL.get("last")
        if hit is not None and hit[0] is model and hit[1] == key:
            return hit[3]
        _TRIAL.pop("last", None)  # the previous trial is freed before this one is made
    data = model.SerializeToString()
    sess = ort_session(data, threads, device)
    with _SHARED_LOCK:
        _TRIAL["last"] = (model, key, data, sess)
    return sess


_BYTES: OrderedDict[int, tuple[onnx.ModelProto, bytes]] = OrderedDict()


def serialized(model: onnx.ModelProto) -> bytes:
    """``model.SerializeToString()``, done once per graph for its size, its sessions and its file
    (0.3-1 s each time for a 90 MB model). Only for graphs that are never changed after
    (:meth:`ModelHandle.to_onnx` graphs); the last :data:`SHARED_SESSIONS` are kept."""
    key = id(model)
    with _SHARED_LOCK:
        hit = _BYTES.get(key)
        if hit is not None and hit[0] is model:
            _BYTES.move_to_end(key)
            return hit[1]
        trial = _TRIAL.get("last")
    if trial is not None and trial[0] is model:  # the bytes a trial session was made from
        remember_serialized(model, trial[2])
        return trial[2]
    data = model.SerializeToString()
    remember_serialized(model, data)
    return data


def remember_serialized(model: onnx.ModelProto, data: bytes, checked: bool = False) -> None:
    """``data`` is ``model`` serialized: the bytes of the file it was parsed from, unchanged.
    ``checked``: they passed ``onnx.checker`` already (:func:`checked_bytes` does not check again)."""
    with _SHARED_LOCK:
        old = _BYTES.get(id(model))
        _BYTES[id(model)] = (model, data)
        _BYTES.move_to_end(id(model))
        if checked:
            _CHECKED.add(id(model))
        elif old is None or old[0] is not model or old[1] is not data:
            _CHECKED.discard(id(model))
        while len(_BYTES) > SHARED_SESSIONS:
            _CHECKED.discard(_BYTES.popitem(last=False)[0])


_CHECKED: set[int] = set()  # keys of _BYTES whose bytes passed onnx.checker


def checked_bytes(model: onnx.ModelProto) -> bytes:
    """:func:`serialized` bytes of ``model`` that pass ``onnx.checker`` (its exception otherwise),
    checked once per graph: a file checked when it was loaded, or a quantized graph checked when it
    was made, is not checked again when it is written."""
    data = serialized(model)
    with _SHARED_LOCK:
        hit = _BYTES.get(id(model))
        if id(model) in _CHECKED and hit is not None and hit[0] is model and hit[1] is data:
            return data
    onnx.checker.check_model(data)
    with _SHARED_LOCK:
        hit = _BYTES.get(id(model))
        if hit is not None and hit[0] is model and hit[1] is data:
            _CHECKED.add(id(model))
    return data


def run_onnx(model, inputs: Sequence[np.ndarray], threads: int = 1, session=None) -> list[np.ndarray]:
    sess = session or ort_session(model, threads)
    feeds = {i.name: _cast(x, i.type) for i, x in zip(sess.get_inputs(), inputs)}
    return [np.asarray(o) for o in sess.run(None, feeds)]


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(bool)": np.bool_, "tensor(double)": np.float64}


def _cast(x: np.ndarray, ort_type: str) -> np.ndarray:
    dtype = _ORT_TYPES.get(ort_type)
    return np.ascontiguousarray(x.astype(dtype, copy=False) if dtype is not None else x)


@contextlib.contextmanager
def torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def eval_mode(module: torch.nn.Module, training: bool = False) -> torch.nn.Module:
    """``module.train(training)``, tolerating modules that refuse it (``torch.export`` programs are
    always in the mode they were exported in)."""
    with contextlib.suppress(NotImplementedError):
        module.train(training)
    return module


def run_torch(module: torch.nn.Module, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    eval_mode(module)
    with torch.inference_mode():
        out = module(*[torch.from_numpy(np.ascontiguousarray(x)) for x in inputs])
    outs = out if isinstance(out, (tuple, list)) else [out]
    return [o.detach().float().numpy() if o.is_floating_point() else o.numpy() for o in outs]


def fixed_batch(handle) -> int | None:
    """The batch size every batched input of the model is fixed to (an ONNX graph exported with a
    constant batch dimension), or None when the batch is free."""
    sizes = set()
    for spec in handle.inputs:
        axis = getattr(spec, "batch_axis", 0)
        if axis is None:  # no batch at all (a scalar setting): says nothing
            continue
        d = spec.shape[axis] if len(spec.shape) > axis else None
        sizes.add(d if isinstance(d, int) and not isinstance(d, bool) and d > 0 else None)
    return sizes.pop() if len(sizes) == 1 and None not in sizes else None


def fill_batch(arrays: Sequence[np.ndarray], batch: int) -> list[np.ndarray]:
    """``arrays`` cut or repeated to exactly ``batch`` rows (a fixed-batch model takes no other)."""
    out = []
    for a in arrays:
        reps = -(-batch // max(1, len(a)))
        out.append(np.ascontiguousarray(np.concatenate([a] * reps)[:batch]) if len(a) != batch else a)
    return out


def predict(handle, inputs: dict[str, np.ndarray], *, runtime: str = "onnxruntime",
            batch: int = 256, threads: int = 1, progress=None) -> list[np.ndarray]:
    """Outputs of the model over all samples, in batches (``inputs``: name -> array). A model with
    a fixed batch size gets exactly that many rows per call (the last batch padded, then cut)."""
    arrays = [inputs[name] for name in handle.input_names]
    n = len(arrays[0]) if arrays else 0
    fixed = fixed_batch(handle)
    batch = fixed or batch
    use_torch = runtime == "torch" and handle.module is not None and handle.onnx_model is None
    session = None if use_torch else shared_session(handle.to_onnx(), threads)
    chunks: list[list[np.ndarray]] = []
    with torch_threads(threads) if use_torch else contextlib.nullcontext():
        for i in range(0, n, batch):
            part = [a[i : i + batch] for a in arrays]
            rows = len(part[0]) if part else 0
            if fixed and rows != fixed:
                part = fill_batch(part, fixed)
            part = [spec.to_model(a) for spec, a in zip(handle.inputs, part)]
            out = run_torch(handle.module, part) if use_torch else run_onnx(None, part, session=session)
            if fixed and rows != fixed:
                out = [o[:rows] for o in out]
            chunks.append(out)
            if progress is not None:
                progress.update(min(1.0, (i + batch) / n), "evaluating")
    if not chunks:
        return []
    return [np.concatenate([c[k] for c in chunks]) for k in range(len(chunks[0]))]
