"""``tugboat report``: read a run or workspace folder back, print its variants, write CSV or HTML.

Lives outside :mod:`tugboat.engine` because the HTML report's chart is drawn with pyqtgraph
(:mod:`tugboat.ui.render`), and the engine never imports Qt.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def load_any_report(folder: str | Path) -> dict[str, Any]:
    """The report of a workspace (``workspace.json``) or of a ``tugboat run`` folder (``report.json``),
    validated (:mod:`tugboat.engine.stored`): a malformed file is one error naming it."""
    from .engine.errors import TugboatError
    from .engine.running.report_json import read_report
    from .engine.running.workspace import Workspace

    folder = Path(folder)
    if Workspace.exists(folder):
        return Workspace.open(folder).report()
    path = folder / "report.json" if folder.is_dir() else folder
    if not path.is_file():
        raise TugboatError("no workspace.json or report.json here", path=str(folder))
    report = read_report(path)
    # tugboat run keeps failed variants in "variants"; show them as failed
    variants = report.get("variants") or []
    report["failed"] = list(report.get("failed") or []) + [v for v in variants if not v.get("metrics")]
    report["variants"] = [v for v in variants if v.get("metrics")]
    report["baseline"].setdefault("metrics", {})
    return report


def chart_png(report: dict[str, Any]) -> tuple[bytes | None, str]:
    """The trade-off chart, or (None, why not)."""
    try:
        from .ui.render import tradeoff_png
    except ImportError as exc:
        return None, f"pyqtgraph / Qt is not available ({exc})"
    try:
        return tradeoff_png(report), ""
    except Exception as exc:  # a broken display setup must not lose the rest of the report
        return None, f"the chart could not be drawn ({exc})"


def report_cli(args) -> int:
    from .console import format_summary
    from .engine.running.report_html import write_csv, write_html
    from .engine.stored import check_writable_file

    report = load_any_report(args.dir)
    for path, what in ((args.csv, "CSV file"), (args.html, "HTML file")):
        if path:  # a folder, a read-only place: one line before anything is printed
            check_writable_file(path, what)
    print(format_summary(report))
    for v in report.get("failed") or []:
        print(f"failed: {v.get('name')}: {v.get('error')}")
    if args.csv:
        print(f"wrote {write_csv(report, args.csv)}")
    if args.html:
        png, why = chart_png(report)
        if png is None:
            print(f"tugboat: warning: {why}; the HTML report has no chart", file=sys.stderr)
        print(f"wrote {write_html(report, args.html, png, chart_note=why)}")
    return 0
