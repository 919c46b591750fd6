"""A self-contained HTML report (and CSV) from a ``report.json`` dictionary.

The trade-off chart is passed in as PNG bytes and embedded as base64, so the file opens anywhere
with nothing beside it. The chart itself is drawn by :mod:`tugboat.ui.render` (pyqtgraph, the
GUI's charting library, offscreen); this module stays Qt-free and, without a chart, says so.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import os
from pathlib import Path
from typing import Any

from ..formatting import fmt_bytes
from ..stored import atomic_write_bytes, recipe_dict_to_toml
from .report_json import pareto_labels, quality_of

COLUMNS = ["name", "pareto", "status", "size_bytes", "compressed_bytes", "params", "nonzero_params", "flops",
           "latency_median_ms", "latency_p90_ms", "latency_batch", "latency_runtime", "latency_device",
           "speedup", "speedup_low", "speedup_high", "timing_noisy", "accuracy",
           "top1_agreement", "cosine", "rel_error", "seconds", "warnings", "error"]


def rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per baseline / variant / failed variant."""
    pareto = set(report.get("pareto") or [])
    entries = [{"name": "baseline", **report.get("baseline", {})}]
    entries += list(report.get("variants") or []) + list(report.get("failed") or [])
    out = []
    for e in entries:
        m = e.get("metrics") or {}
        lat = m.get("latency_ms") or {}
        fid = m.get("fidelity") or {}
        sp = lat.get("speedup") or {}
        out.append({
            "name": e.get("name", ""), "pareto": e.get("name") in pareto, "status": e.get("status", "ok"),
            "size_bytes": m.get("size_bytes"), "compressed_bytes": m.get("compressed_bytes"),
            "params": m.get("params"), "nonzero_params": m.get("nonzero_params"), "flops": m.get("flops"),
            "latency_median_ms": lat.get("median"), "latency_p90_ms": lat.get("p90"),
            "latency_batch": lat.get("batch"), "latency_runtime": lat.get("runtime"),
            "latency_device": lat.get("device") or "cpu",
            "speedup": sp.get("median"), "speedup_low": sp.get("low"), "speedup_high": sp.get("high"),
            "timing_noisy": sp.get("noisy"),
            "accuracy": m.get("accuracy"), "top1_agreement": fid.get("top1_agreement"),
            "cosine": fid.get("cosine"), "rel_error": fid.get("rel_error"), "seconds": m.get("seconds"),
            "warnings": "; ".join(e.get("warnings") or []), "error": e.get("error") or "",
        })
    return out


def to_csv(report: dict[str, Any]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows(report):
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buf.getvalue()


def write_csv(report: dict[str, Any], path: str | os.PathLike) -> Path:
    return atomic_write_bytes(path, to_csv(report).encode("utf-8"))


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _recipe_text(recipe: dict[str, Any]) -> str:
    try:
        return recipe_dict_to_toml(recipe)
    except Exception:
        import json

        return json.dumps(recipe, indent=2)


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;
color:#1d232b;padding:0 1em}h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em}
table{border-collapse:collapse;width:100%;font-size:.9em}th,td{padding:.35em .6em;border-bottom:1px solid #dde;
text-align:right}th{background:#f3f5f8}td:first-child,th:first-child{text-align:left}
tr.pareto td:first-child{font-weight:600}tr.failed{color:#999}.star{color:#d9822b}
pre{background:#f6f8fa;padding:.8em;overflow:auto;font-size:.85em}.warn{color:#a15c00}
.err{color:#b00020}.muted{color:#667}img{max-width:100%;border:1px solid #e4e7eb}
details{margin:.5em 0}summary{cursor:pointer}
"""


def render_html(report: dict[str, Any], chart_png: bytes | None = None, *, title: str | None = None,
                chart_note: str = "") -> str:
    """The whole report as one HTML string (chart embedded, no external files)."""
    esc = html.escape
    title = title or f"Tugboat report: {report.get('model', '')}"
    out = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
           f"<style>{CSS}</style></head><body>", f"<h1>{esc(title)}</h1>", *_html_intro(report),
           "<h2>Trade-off</h2>"]
    if chart_png:
        b64 = base64.b64encode(chart_png).decode("ascii")
        out.append(f"<img alt='quality against latency and size, one point per variant' "
                   f"src='data:image/png;base64,{b64}'>")
    else:
        out.append(f"<p class='muted'>No chart: {esc(chart_note or 'the chart renderer is not available')}.</p>")
    out += _html_table(report)
    out.append("<h2>Recipes and warnings</h2>")
    out += _html_details(report)
    out.append("<p class='muted'>Written by Tugboat. Re-run any variant with "
               "<code>tugboat run recipe.toml --out DIR</code> using its recipe above.</p></body></html>")
    return "\n".join(out)


def _html_intro(report: dict[str, Any]) -> list[str]:
    """What was measured, how, on which machine, and the target search's outcome."""
    esc = html.escape
    out = [f"<p>Model <code>{esc(str(report.get('model', '')))}</code>, data "
           f"<code>{esc(str(report.get('data', '') or '(none: fidelity to the original)'))}</code>. "
           f"{len(report.get('variants') or [])} variant(s)"
           + (f", {len(report['failed'])} failed" if report.get("failed") else "") + ".</p>"]
    lat = ((report.get("baseline") or {}).get("metrics") or {}).get("latency_ms") or {}
    if lat:
        out.append(f"<p class='muted'>Latency: median of timed runs at batch {lat.get('batch')}, "
                   f"{lat.get('threads')} thread(s), {esc(str(lat.get('runtime')))} on "
                   f"{esc(str(lat.get('device') or 'cpu'))}; speed-up: timed "
                   "beside the original in alternating blocks, with its 95% interval (? = noisy). "
                   "Quality: accuracy on the test split, or top-1 agreement with the original without "
                   "labels. <span class='star'>&#9733;</span> = on the Pareto front (size, latency, quality).</p>")
    if isinstance(report.get("machine"), dict):
        from ..machine import describe

        out.append(f"<p class='muted'>Measured on: {esc(describe(report['machine']))}.</p>")
    target = report.get("target")
    if isinstance(target, dict):
        best = target.get("best")
        out.append("<p><b>Target search</b>: objective " + esc(str(target.get("objective"))) +
                   f", accuracy drop at most {target.get('max_accuracy_drop')}; "
                   f"{len(target.get('tried') or [])} variant(s) tried, "
                   f"{len(target.get('within_tolerance') or [])} within tolerance; best: "
                   + (f"<b>{esc(best)}</b>" if best else "none") + ".</p>")
    return out


def _html_table(report: dict[str, Any]) -> list[str]:
    """The variants table: one row a variant, the Pareto front starred, failures with their reason."""
    esc = html.escape
    base_q = quality_of((report.get("baseline") or {}).get("metrics") or {})
    out = ["<h2>Variants</h2><table><tr><th>variant</th><th>size</th><th>deflated</th><th>params</th>"
           "<th>latency (ms)</th><th>p90 (ms)</th><th>speed-up [95%]</th><th>accuracy</th><th>agreement</th>"
           "<th>&Delta; quality</th><th>job (s)</th></tr>"]
    labels = pareto_labels(report)
    for r in rows(report):
        if r["status"] != "ok":
            out.append(f"<tr class='failed'><td>{esc(r['name'])}</td><td colspan='10' class='err'>"
                       f"{esc(r['status'])}: {esc(r['error'])}</td></tr>")
            continue
        q = r["accuracy"] if r["accuracy"] is not None else r["top1_agreement"]
        dq = "-" if q is None or base_q is None else f"{(q - base_q) * 100:+.2f} pt"
        star = (f" <span class='star'>&#9733;&nbsp;{esc(labels[r['name']])}</span>"
                if r["pareto"] and r["name"] != "baseline" else
                (" <span class='star'>&#9733;</span>" if r["pareto"] else ""))
        out.append(
            f"<tr class='{'pareto' if r['pareto'] else ''}'><td>{esc(r['name'])}{star}</td>"
            f"<td>{fmt_bytes(r['size_bytes'])}</td>"
            f"<td>{fmt_bytes(r['compressed_bytes'])}</td><td>{_num(r['params'], ',')}</td>"
            f"<td>{_num(r['latency_median_ms'], '.3f')}</td><td>{_num(r['latency_p90_ms'], '.3f')}</td>"
            f"<td>{_speedup_cell(r)}</td>"
            f"<td>{_num(r['accuracy'], '.2%')}</td><td>{_num(r['top1_agreement'], '.3f')}</td>"
            f"<td>{dq}</td><td>{_num(r['seconds'], '.1f')}</td></tr>")
    out.append("</table>")
    return out


def _html_details(report: dict[str, Any]) -> list[str]:
    """Each variant's warnings, error, artifact and recipe, folded unless there is something to see."""
    esc = html.escape
    out = []
    for e in list(report.get("variants") or []) + list(report.get("failed") or []):
        warns = e.get("warnings") or []
        out.append(f"<details{' open' if warns or e.get('error') else ''}><summary><b>{esc(e.get('name', ''))}</b>"
                   + (f" &mdash; <span class='warn'>{len(warns)} warning(s)</span>" if warns else "")
                   + "</summary>")
        for w in warns:
            out.append(f"<p class='warn'>&#9888; {esc(w)}</p>")
        if e.get("error"):
            out.append(f"<p class='err'>{esc(e['error'])}</p>")
        art = (e.get("artifacts") or {}).get("onnx")
        if art:
            out.append(f"<p class='muted'>artifact: <code>{esc(art)}</code></p>")
        out.append(f"<pre>{esc(_recipe_text(e.get('recipe') or {}), quote=False)}</pre></details>")
    return out


def _speedup_cell(r: dict[str, Any]) -> str:
    if r.get("speedup") is None:
        return "1x" if r.get("name") == "baseline" else "-"
    try:
        return (f"{r['speedup']:.2f}x [{r['speedup_low']:.2f}-{r['speedup_high']:.2f}]"
                + ("?" if r.get("timing_noisy") else ""))
    except (TypeError, ValueError):  # an incomplete entry read back from a file
        return "-"


def write_html(report: dict[str, Any], path: str | os.PathLike, chart_png: bytes | None = None,
               **kwargs: Any) -> Path:
    return atomic_write_bytes(path, render_html(report, chart_png, **kwargs).encode("utf-8"))
