"""Why was a heartbeat late? A probe for ``responsiveness.py --diagnose`` (issue 17).

Each beat reads the GUI thread's ``/proc/self/task/TID/schedstat`` (CPU time and run-queue wait, in
ns) and re-arms ``faulthandler.dump_traceback_later``, whose C watchdog thread dumps every thread's
Python stack *without needing the GIL* when no beat came for ``dump_after`` seconds. A late beat is
then classified by where the GUI thread's time went during the gap:

* ``gui``: it was on a CPU (its own work: redraws, model resets, signal floods, GC, ...);
* ``starved``: it was runnable but waited for a core (compute threads >= cores);
* ``blocked``: it was neither, i.e. asleep: on the GIL held by another thread (a C extension
  call on the worker, or a worker holding the GIL while the machine has descheduled it), on a Qt
  lock, or on the disk (an fsync); the GUI thread's stack in ``stacks`` tells which.

Linux only (``/proc``); elsewhere every stall is ``unknown``.
"""

from __future__ import annotations

import faulthandler
import os
import tempfile
import threading
import time


def _schedstat(tid: int) -> tuple[int, int]:
    try:
        with open(f"/proc/self/task/{tid}/schedstat") as f:
            cpu, wait, _ = f.read().split()
        return int(cpu), int(wait)
    except (OSError, ValueError):
        return 0, 0


class StallProbe:
    def __init__(self, threshold_ms: float = 25.0, dump_after: float = 0.03, stacks: bool = True) -> None:
        self.stacks = stacks  # False: classify only (no watchdog reading other threads' frames)
        self.tid = threading.get_native_id()
        self.threshold_ms = threshold_ms
        self.dump_after = dump_after
        self.fd, self.path = tempfile.mkstemp(prefix="tugboat-stalls-", suffix=".txt")
        self.read_pos = 0
        self.last = _schedstat(self.tid)
        self.stalls: list[dict] = []
        self.label = ""

    def beat(self, interval_ms: float, beat_ms: float) -> None:
        """Call first thing in every beat with the measured interval."""
        now = _schedstat(self.tid)
        cpu_ms, wait_ms = (now[0] - self.last[0]) / 1e6, (now[1] - self.last[1]) / 1e6
        self.last = now
        stall = interval_ms - beat_ms
        faulthandler.cancel_dump_traceback_later()
        if stall > self.threshold_ms:
            other = max(0.0, interval_ms - cpu_ms - wait_ms)
            parts = {"gui": cpu_ms, "starved": wait_ms, "blocked": other}
            with open(self.path) as f:
                f.seek(self.read_pos)
                stacks = f.read()
                self.read_pos = f.tell()
            self.stalls.append({"job": self.label, "t": round(time.perf_counter(), 3),
                                "stall_ms": round(stall, 1), "gui_cpu_ms": round(cpu_ms, 1),
                                "runqueue_ms": round(wait_ms, 1), "blocked_ms": round(other, 1),
                                "class": max(parts, key=parts.get), "stacks": _trim(stacks)})
        else:
            self.read_pos = os.lseek(self.fd, 0, os.SEEK_END)
        if self.stacks:
            faulthandler.dump_traceback_later(self.dump_after, repeat=False, file=self.fd)

    def stop(self) -> None:
        faulthandler.cancel_dump_traceback_later()

    def summary(self) -> list[str]:
        lines = []
        for s in sorted(self.stalls, key=lambda s: -s["stall_ms"])[:25]:
            lines.append(f"{s['job'][:28]:<28} {s['stall_ms']:>7} ms  {s['class']:<8} gui {s['gui_cpu_ms']} "
                         f"runq {s['runqueue_ms']} blocked {s['blocked_ms']}")
            lines += ["      " + ln for ln in s["stacks"].splitlines()[:24]]
        return lines


def _trim(stacks: str) -> str:
    """Keep each thread's innermost frames, drop the interpreter's own threads' noise."""
    out, frames = [], 0
    for line in stacks.splitlines():
        if line.startswith(("Thread", "Current thread", "Timeout")):
            out.append(line)
            frames = 0
        elif frames < 10 and line.strip():
            out.append(line)
            frames += 1
    return "\n".join(out)
