"""``tugboat sweep`` and ``tugboat report``: the CLI glue between the engine and the chart renderer.

Lives outside :mod:`tugboat.engine` because the HTML report's chart is drawn with pyqtgraph
(:mod:`tugboat.ui.render`), and the engine never imports Qt.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

EXIT_USAGE = 2


def run_sweep_cli(args) -> int:
    from .cli import TerminalProgress, format_summary, print_notes
    from .engine.executors import make_executor
    from .engine.progress import Progress
    from .engine.recipe import load_recipe
    from .engine.sweep import run_sweep

    executor = make_executor(getattr(args, "executor", "local") or "local", workers=getattr(args, "workers", None),
                             address=getattr(args, "address", None))  # a missing Ray: one line, before any work
    recipe = load_recipe(args.recipe)
    print_notes(recipe)
    recipe.trust = recipe.trust_steps = bool(getattr(args, "trust", False))  # per run, never from a file
    quiet = getattr(args, "quiet", False)
    bar = TerminalProgress(enabled=not quiet)

    def log(msg: str) -> None:
        if quiet:
            return
        if bar.tty and bar._last_text:
            bar.stream.write("\r" + " " * len(bar._last_text) + "\r")
        print(msg, file=bar.stream, flush=True)

    try:
        result = run_sweep(recipe, args.out, resume=args.resume, progress=Progress(bar), log=log,
                           max_variants=getattr(args, "max_variants", None), executor=executor)
    finally:
        bar.close()
    report = result.workspace.report()
    print(format_summary(report))
    if report.get("failed"):
        for v in report["failed"]:
            print(f"failed: {v['name']}: {v.get('error')}")
    print(f"{len(result.tried)} variant(s) run, {len(result.skipped)} kept from before; "
          f"workspace {args.out}, report {Path(args.out) / 'report.json'}")
    if result.kind == "target":
        if result.best is None:
            print(f"no variant within the accuracy tolerance ({len(result.workspace)} tried)")
            return 1
        print(f"best within tolerance ({result.workspace.meta['target']['objective']}): {result.best} "
              f"(of {len(result.within)} within tolerance, {len(result.workspace)} tried)")
    if report["variants"] == [] and report.get("failed"):
        return 1
    return 0


def load_any_report(folder: str | Path) -> dict[str, Any]:
    """The report of a workspace (``workspace.json``) or of a ``tugboat run`` folder (``report.json``),
    validated (:mod:`tugboat.engine.stored`): a malformed file is one error naming it."""
    from .engine.errors import TugboatError
    from .engine.report import read_report
    from .engine.workspace import Workspace

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
    from .cli import format_summary
    from .engine.html_report import write_csv, write_html
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
