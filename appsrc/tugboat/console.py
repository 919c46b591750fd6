"""What the CLI prints on a terminal: the progress bar, the model description and the variants table.

Shared by ``tugboat info | run | sweep | report`` (:mod:`tugboat.cli`, :mod:`tugboat.report_command`);
numbers go through :mod:`tugboat.engine.formatting`, as in the widgets and the HTML report.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from .engine.formatting import fmt_bytes, fmt_count, fmt_ms, fmt_seconds

__all__ = ["TerminalProgress", "format_info", "format_runtimes", "format_summary", "print_notes"]


class TerminalProgress:
    """A progress bar with ETA on a terminal; plain lines (at most one per second) otherwise."""

    def __init__(self, stream=None, enabled: bool = True):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.enabled = enabled
        self.t0 = time.monotonic()
        self._last = 0.0
        self._last_text = ""

    def __call__(self, fraction: float, message: str) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        elapsed = now - self.t0
        eta = elapsed * (1 - fraction) / fraction if fraction > 0.02 else None
        eta_text = f" ETA {fmt_seconds(eta)}" if eta is not None else ""
        if self.tty:
            width = 28
            filled = round(width * fraction)
            line = f"\r[{'#' * filled}{'.' * (width - filled)}] {fraction * 100:5.1f}%{eta_text} {message}"
            self.stream.write(line[:160].ljust(len(self._last_text)))
            self._last_text = line[:160]
            self.stream.flush()
        elif now - self._last >= 1.0 or fraction >= 1.0:
            self.stream.write(f"{fraction * 100:5.1f}%{eta_text} {message}\n")
            self.stream.flush()
            self._last = now

    def print_line(self, text: str) -> None:
        """A log line on the progress stream, clearing the bar first (it is redrawn on the next update)."""
        if self.tty and self._last_text:
            self.stream.write("\r" + " " * len(self._last_text) + "\r")
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty and self._last_text:
            self.stream.write("\n")
            self.stream.flush()


def print_notes(recipe) -> None:
    """Warnings found while reading a recipe (e.g. a trust flag, which is ignored)."""
    for note in getattr(recipe, "notes", []):
        print(f"tugboat: warning: {note}", file=sys.stderr)


def format_info(info: dict[str, Any]) -> str:
    lines = [f"Model     {info['source']}", f"Format    {info['format']}",
             f"Task      {info['task']}"]
    for kind in ("inputs", "outputs"):
        for spec in info[kind]:
            shape = "x".join(str(d) if d is not None else "?" for d in spec["shape"])
            lines.append(f"{kind[:-1].capitalize():<9} {spec['name']}  [{shape}]  {spec['dtype']}")
    lines.append(f"Params    {fmt_count(info['params'])} ({info['params']:,}; non-zero {info['nonzero_params']:,})")
    size, deflated = fmt_bytes(info["size_bytes"]), fmt_bytes(info["compressed_bytes"])
    lines.append(f"Size      {size} as {info.get('size_of', 'ONNX')} ({deflated} deflated)")
    if info["flops"] is None:
        lines.append("FLOPs     - (needs the input shape)")
    else:
        lines.append(f"FLOPs     {fmt_count(info['flops'])} per sample")
    if info.get("warnings"):
        for w in info["warnings"]:
            lines.append(f"Warning   {w}")
    layers = info.get("layers") or []
    if layers:
        width = max(len(r["name"]) for r in layers)
        lines.append("")
        lines.append(f"{'layer':<{width}}  {'type':<16} {'params':>10} {'FLOPs':>10}")
        for r in layers:
            lines.append(f"{r['name']:<{width}}  {r['type']:<16} {r['params']:>10,} {fmt_count(r['flops']):>10}")
    return "\n".join(lines)


def format_speedup(lat: dict[str, Any]) -> str:
    """``1.84x [1.79-1.90]`` from a paired timing; ``-`` without one; ``?`` marks a noisy one."""
    sp = lat.get("speedup") if isinstance(lat, dict) else None
    try:  # a report read back from disk may hold anything
        return f"{sp['median']:.2f}x [{sp['low']:.2f}-{sp['high']:.2f}]" + ("?" if sp.get("noisy") else "")
    except (TypeError, KeyError, ValueError, AttributeError):
        return "-"


def format_summary(report: dict[str, Any]) -> str:
    rows = [("baseline", report["baseline"]["metrics"], [])]
    rows += [(v["name"], v["metrics"], v.get("warnings", []) + ([v["error"]] if v.get("error") else []))
             for v in report["variants"]]
    chosen = {v["name"]: (v.get("info") or {}).get("step_notes") or [] for v in report["variants"]}
    width = max(len(r[0]) for r in rows)
    out = [f"{'variant':<{width}}  {'size':>9} {'deflated':>9} {'params':>8} {'latency':>10} "
           f"{'speed-up [95%]':>20} {'accuracy':>8} {'agree':>6}"]
    pareto = set(report.get("pareto", []))
    for name, m, warns in rows:
        if not m:
            out.append(f"{name:<{width}}  (no metrics) {'; '.join(warns)}")
            continue
        lat = m.get("latency_ms") or {}
        acc = m.get("accuracy")
        agree = (m.get("fidelity") or {}).get("top1_agreement")
        out.append(
            f"{name:<{width}}  {fmt_bytes(m.get('size_bytes')):>9} {fmt_bytes(m.get('compressed_bytes')):>9} "
            f"{fmt_count(m.get('params')):>8} {fmt_ms(lat.get('median')):>7} ms "
            f"{format_speedup(lat):>20} "
            f"{(f'{acc * 100:.2f}%' if acc is not None else '-'):>8} "
            f"{(f'{agree:.3f}' if agree is not None else '-'):>6}"
            + (" *" if name in pareto else ""))
        out += format_runtimes(m, width)
        for w in warns:
            out.append(f"{'':<{width}}  ! {w}")
        out += [f"{'':<{width}}  i {n}" for n in chosen.get(name, []) if isinstance(n, str)]
    lat = report["baseline"]["metrics"].get("latency_ms") or {}
    out.append(f"latency: median at batch {lat.get('batch')}, {lat.get('threads')} threads, "
               f"{lat.get('runtime')} on {lat.get('device') or 'cpu'}; speed-up: paired with the original, "
               f"95% interval, ? = noisy; "
               f"* = on the Pareto front")
    if isinstance(report.get("machine"), dict):
        from .engine.machine import describe

        out.append(f"machine: {describe(report['machine'])}")
    return "\n".join(out)


def format_runtimes(m: dict[str, Any], width: int) -> list[str]:
    """One line per runtime a variant was measured in (``[measure] runtime = [...]``)."""
    out = []
    for name, r in (m.get("runtimes") or {}).items():
        if not r.get("ok"):
            out.append(f"{'':<{width}}  {name}: {r.get('reason') or 'not measured'}")
            continue
        lat, fid = r.get("latency_ms") or {}, r.get("fidelity") or {}
        agree = fid.get("top1_agreement")
        out.append(f"{'':<{width}}  {name} {r.get('version')}: {fmt_ms(lat.get('median'))} ms at batch "
                   f"{lat.get('batch')}, agreement {agree if agree is None else f'{agree:.3f}'}, "
                   f"rel. error {fid.get('rel_error', 0):.3g}")
    return out
