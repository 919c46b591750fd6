"""The hardware and software a timing was taken on, and the advice that follows from it.

Read from ``/proc/cpuinfo`` and ``/proc/meminfo`` where they exist (Linux) and from the
standard library elsewhere; no new dependency. The int8 features matter most: without VNNI
(``avx512_vnni`` / ``avx_vnni``) or AMX, ONNX Runtime's int8 kernels use the 16-bit ``vpmaddubsw``
path, whose intermediate sums saturate, so static int8 needs ``reduce_range = true`` there.
"""

from __future__ import annotations

import functools
import os
import platform
from importlib import metadata
from typing import Any

from .ram import meminfo

# flags of /proc/cpuinfo relevant to int8 inference, shown in this order
INT8_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
RUNTIME_PACKAGES = ("onnxruntime", "torch", "onnx")


def _cpuinfo(text: str | None = None) -> tuple[str, set[str]]:
    if text is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
                text = fh.read()
        except OSError:
            text = ""
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model, flags


def _memory_bytes() -> int | None:
    total = meminfo("MemTotal")
    if total is not None:
        return total
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def isa_features(flags: set[str]) -> dict[str, bool]:
    """The int8-relevant ISA features, summarised (VNNI in either its AVX-512 or AVX form)."""
    return {"avx2": "avx2" in flags, "avx512": "avx512f" in flags,
            "vnni": bool({"avx512_vnni", "avx_vnni"} & flags), "amx": bool({"amx_int8", "amx_tile"} & flags)}


def machine_info(cpuinfo_text: str | None = None) -> dict[str, Any]:
    """CPU model, cores, int8 features, memory, OS and runtime versions (``report.json["machine"]``)."""
    if cpuinfo_text is None:
        return dict(_machine_cached())
    return _machine(cpuinfo_text)


@functools.lru_cache(maxsize=1)
def _machine_cached() -> dict[str, Any]:
    return _machine(None)


def _machine(cpuinfo_text: str | None) -> dict[str, Any]:
    model, flags = _cpuinfo(cpuinfo_text)
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    return {
        "cpu": model or platform.processor() or platform.machine() or "unknown",
        "arch": platform.machine(),
        "cores": os.cpu_count() or 1,
        "usable_cores": usable,
        "isa": isa_features(flags),
        "flags": [f for f in INT8_FLAGS if f in flags],
        "memory_bytes": _memory_bytes(),
        "os": f"{platform.system()} {platform.release()}".strip(),
        "python": platform.python_version(),
        "runtimes": {p: _version(p) for p in RUNTIME_PACKAGES},
    }


def describe(info: dict[str, Any]) -> str:
    """One line for a status bar: ``AMD EPYC, 2 cores, AVX-512 VNNI, 8.0 GB, onnxruntime 1.32.0``
    (tolerant: ``info`` may come from a report file read back)."""
    try:
        return _describe(info)
    except (TypeError, ValueError, AttributeError):
        return "unknown machine"


def _describe(info: dict[str, Any]) -> str:
    isa = info.get("isa") or {}
    features = [name for name, on in (("AVX2", isa.get("avx2") and not isa.get("avx512")),
                                      ("AVX-512", isa.get("avx512")), ("VNNI", isa.get("vnni")),
                                      ("AMX", isa.get("amx"))) if on]
    parts = [str(info.get("cpu") or "unknown CPU"), f"{info.get('usable_cores') or info.get('cores')} cores"]
    parts.append(" ".join(features) if features else "no AVX2")
    if not isa.get("vnni") and not isa.get("amx"):
        parts[-1] += " (no VNNI)"
    mem = info.get("memory_bytes")
    if mem:
        parts.append(f"{mem / 2**30:.1f} GB")
    ort = (info.get("runtimes") or {}).get("onnxruntime")
    if ort:
        parts.append(f"onnxruntime {ort}")
    return ", ".join(parts)


def advice(steps: list[dict[str, Any]], info: dict[str, Any] | None = None) -> list[str]:
    """Information tied to this machine and a variant's steps (not warnings: nothing went wrong)."""
    info = info or machine_info()
    isa = info.get("isa") or {}
    notes = []
    for step in steps:
        tech, method = step.get("technique"), step.get("method")
        if tech == "quantize" and method == "static-int8" and not (isa.get("vnni") or isa.get("amx")) \
                and not step.get("reduce_range"):
            notes.append("this CPU has no VNNI (nor AMX): ONNX Runtime's int8 kernels may saturate and "
                         "lose accuracy; quantize with reduce_range (7-bit weights) if accuracy drops")
        if tech == "prune" and method == "unstructured":
            notes.append("unstructured sparsity gives no speed-up in ONNX Runtime (dense kernels); it "
                         "shrinks the deflated file only: use structured pruning for speed")
        if tech == "quantize" and method == "dynamic-int8":
            notes.append("dynamic int8 speeds up Linear/MatMul layers; on convolutions ONNX Runtime runs "
                         "ConvInteger, often slower than float")
    return list(dict.fromkeys(notes))


@functools.lru_cache(maxsize=4)
def channel_multiple(threads: int = 1) -> int:
    """The channel multiple ONNX Runtime's convolutions run fast at on this CPU (8 or 16), measured:
    a 3x3 convolution with 56 channels (a multiple of 8, not of 16) against one with 64, per FLOP.
    About 0.1 s, once per process."""
    import time

    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from .measuring.runtime import ort_session

    def per_flop(c: int) -> float:
        rng = np.random.default_rng(0)
        w = numpy_helper.from_array(rng.standard_normal((c, c, 3, 3)).astype(np.float32), "w")
        node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
        graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                 [8, c, 16, 16])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        sess = ort_session(model, threads)
        feed = {"x": rng.standard_normal((8, c, 16, 16)).astype(np.float32)}
        for _ in range(3):
            sess.run(None, feed)
        best = float("inf")
        for _ in range(15):
            t0 = time.perf_counter()
            sess.run(None, feed)
            best = min(best, time.perf_counter() - t0)
        return best / (c * c)

    try:
        return 16 if per_flop(56) > 1.15 * per_flop(64) else 8
    except Exception:  # a runtime that cannot build the probe: the common safe choice
        return 8
