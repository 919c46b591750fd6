"""The machine's memory: how much this process can still use, and recognising when it ran out.

:func:`available_memory` asks psutil when installed, else ``/proc/meminfo`` and the cgroup limit on
Linux, ``GlobalMemoryStatusEx`` on Windows, ``sysconf`` elsewhere. :func:`is_out_of_memory`
recognises ``MemoryError`` and torch's and ONNX Runtime's allocation failures, so a job that runs
out ends as a failed job with a clear message (:func:`oom_message`), not a dead app.

Below everything that loads files or runs techniques (the data loader refuses a file too big for
it); what a job will need is :mod:`tugboat.engine.measuring.memory`'s.
"""

from __future__ import annotations

import os
import sys

SAFETY = 0.9  # leave a tenth of what is available to the rest of the machine
OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "bad_alloc",
               "failed to allocate memory")


# --- what is available -------------------------------------------------------------------------

def available_memory() -> int | None:
    """Bytes of memory this process can still use, or None if the platform does not say."""
    try:
        import psutil  # optional

        avail = int(psutil.virtual_memory().available)
    except Exception:
        avail = _proc_meminfo() or _windows_available() or _sysconf_available()
    limit = _cgroup_headroom()
    if avail is None:
        return limit
    return min(avail, limit) if limit is not None else avail


def meminfo(key: str) -> int | None:
    """Bytes of one ``/proc/meminfo`` line (``MemAvailable``, ``MemTotal``), or None off Linux."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _proc_meminfo() -> int | None:
    return meminfo("MemAvailable")


def _cgroup_headroom() -> int | None:
    """Limit minus usage of this process's cgroup (containers see the host's /proc/meminfo)."""
    pairs = [("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
             ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")]
    for limit_file, usage_file in pairs:
        try:
            with open(limit_file, encoding="ascii") as fh:
                text = fh.read().strip()
            if text == "max":
                return None
            limit = int(text)
            if limit >= 1 << 60:  # cgroup v1 "unlimited"
                return None
            with open(usage_file, encoding="ascii") as fh:
                usage = int(fh.read().strip())
            return max(0, limit - usage)
        except (OSError, ValueError):
            continue
    return None


def _windows_available() -> int | None:
    if sys.platform != "win32":
        return None
    try:
        import ctypes

        class MemoryStatus(ctypes.Structure):
            _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong),
                        ("ullTotalPhys", ctypes.c_ulonglong), ("ullAvailPhys", ctypes.c_ulonglong),
                        ("ullTotalPageFile", ctypes.c_ulonglong), ("ullAvailPageFile", ctypes.c_ulonglong),
                        ("ullTotalVirtual", ctypes.c_ulonglong), ("ullAvailVirtual", ctypes.c_ulonglong),
                        ("ullAvailExtendedVirtual", ctypes.c_ulonglong)]

        status = MemoryStatus()
        status.dwLength = ctypes.sizeof(MemoryStatus)
        if ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):  # type: ignore[attr-defined]
            return int(status.ullAvailPhys)
    except Exception:
        pass
    return None


def _sysconf_available() -> int | None:
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


# --- running out anyway --------------------------------------------------------------------------

def is_out_of_memory(exc: BaseException) -> bool:
    """``MemoryError``, torch's ``OutOfMemoryError`` and the CPU allocator's ``RuntimeError``
    ("DefaultCPUAllocator: can't allocate memory"), ONNX Runtime's allocation failures."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    if isinstance(exc, RuntimeError) or type(exc).__module__.startswith("onnxruntime"):
        text = str(exc).lower()
        return any(m in text for m in OOM_MARKERS)
    return False


def oom_message(what: str) -> str:
    return (f"out of memory {what}; lower the batch size (batch_size, measure.batch, "
            f"calibration_samples) or use a smaller model")
