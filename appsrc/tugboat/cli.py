"""The headless face of Tugboat: ``tugboat info | run | sweep | report`` (and the GUI with no command).

Errors the user can act on (:class:`TugboatError`) print one line naming the file and the problem
and exit with code 2; nothing else is caught, so real bugs keep their tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from . import __version__
from .engine.tasks import TASKS

EXIT_USAGE = 2


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
        eta_text = f" ETA {_fmt_seconds(eta)}" if eta is not None else ""
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

    def close(self) -> None:
        if self.enabled and self.tty and self._last_text:
            self.stream.write("\n")
            self.stream.flush()


def _fmt_seconds(s: float) -> str:
    s = round(s)
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _fmt_count(n: int | None) -> str:
    if n is None:
        return "-"
    if n >= 1e9:
        return f"{n / 1e9:.2f}G"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k"
    return str(n)


def _parse_shape(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-shape must be integers like 1,8,8, got {text!r}") from None


TRUST_HELP = ("allow unpickling the model file and a distillation student_file of this run (runs code "
              "from them: only for files you trust); never read from a recipe, never saved")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return value


def print_notes(recipe) -> None:
    """Warnings found while reading a recipe (e.g. a trust flag, which is ignored)."""
    for note in getattr(recipe, "notes", []):
        print(f"tugboat: warning: {note}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tugboat",
        description="Tugboat makes neural networks smaller and faster: distillation, pruning and "
        "quantization, each variant measured for size, latency and accuracy. With no command, "
        "the desktop app starts; `tugboat FILE` starts it on a model, workspace folder or recipe.",
    )
    parser.add_argument("--version", action="version", version=f"tugboat {__version__}")
    parser.add_argument("--demo", action="store_true", help="open the app with demo:digits-cnn and demo:digits loaded")
    parser.add_argument("--workspace", help="open the app on this workspace folder")
    parser.add_argument("--open", metavar="FILE", dest="open_path",
                        help="open the app on a model file, a workspace folder or a recipe (.toml); "
                        "`tugboat FILE` is the same")
    parser.add_argument("--quit-after", type=float, metavar="SECONDS",
                        help="quit the app after SECONDS (smoke tests)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("info", help="describe a model: format, inputs/outputs, params, size, FLOPs, layers",
                       description="Describe a model file or demo:NAME.")
    p.add_argument("model", nargs="?", help="model file (.onnx, .pt, .pth, .pt2) or demo:NAME")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--runtimes", action="store_true",
                   help="list the runtimes variants can be measured in, installed or not (with the install command)")
    p.add_argument("--trust", action="store_true",
                   help="allow unpickling a whole nn.Module (runs code from the file: only for files you trust)")
    p.add_argument("--arch", help="built-in architecture for a bare state_dict (e.g. digits-cnn)")
    p.add_argument("--input-shape", type=_parse_shape, help="input shape without batch, e.g. 1,8,8")
    p.add_argument("--data", help="data (.npz, folder, demo:NAME): sizes for dynamic inputs, labels for the task")
    p.add_argument("--task", choices=TASKS, help="override the task inferred from the model's outputs")

    p = sub.add_parser("run", help="run a recipe: measure the baseline, apply the steps, write report.json",
                       description="Run a recipe file (TOML). Without steps it measures the baseline.")
    p.add_argument("recipe", help="recipe file (.toml)")
    p.add_argument("--out", required=True, help="output folder (artifacts and report.json)")
    p.add_argument("--trust", action="store_true", help=TRUST_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--task", choices=TASKS, help="override the task (how quality is measured)")

    p = sub.add_parser("sweep", help="run every combination of a recipe's [sweep] table into a workspace",
                       description="Run a recipe's sweep (grid, random search or target search).")
    p.add_argument("recipe", help="recipe file (.toml) with a [sweep] or [target] table")
    p.add_argument("--out", required=True, help="workspace folder")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep; finished variants are kept")
    p.add_argument("--max-variants", type=_positive_int, metavar="N",
                   help="allow a [sweep] grid of up to N combinations (default 1000)")
    p.add_argument("--executor", choices=("local", "processes", "ray"), default="local",
                   help="where variants are made: in this process (default), in worker processes, or as Ray "
                   "tasks (pip install 'tugboat-ml[ray]'); timing always runs here, one variant at a time")
    p.add_argument("--workers", type=_positive_int, metavar="N",
                   help="worker processes (processes) or CPUs of a local Ray instance (default: all cores)")
    p.add_argument("--address", metavar="ADDR",
                   help="join the Ray cluster at ADDR (e.g. auto, ray://head:10001) instead of a local instance")
    p.add_argument("--trust", action="store_true", help=TRUST_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress output")

    p = sub.add_parser("export", help="export a variant for a runtime: onnx, ort (ONNX Runtime Mobile), "
                       "pte (ExecuTorch, XNNPACK), openvino (IR)",
                       description="Export a variant of a workspace or tugboat run folder; the file is loaded "
                       "back in its runtime and compared with the variant before it is written.")
    p.add_argument("dir", help="workspace or tugboat run folder")
    p.add_argument("variant", help="variant name (or baseline)")
    p.add_argument("--to", required=True, choices=("onnx", "ort", "pte", "openvino"), help="target format")
    p.add_argument("--out", required=True, help="output file (the format's suffix is added when missing)")
    p.add_argument("--batch", type=_positive_int, default=1, help="fixed batch size of a .pte program (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress output")

    p = sub.add_parser("report", help="summarise a run or sweep folder; write HTML or CSV",
                       description="Print the variants of a report.json / workspace; optionally write HTML or CSV.")
    p.add_argument("dir", help="folder written by tugboat run or tugboat sweep")
    p.add_argument("--html", help="write a self-contained HTML report here")
    p.add_argument("--csv", help="write the variants table as CSV here")
    return parser


COMMANDS = ("info", "run", "sweep", "export", "report")
_VALUE_OPTIONS = ("--workspace", "--quit-after", "--open")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a command line; ``tugboat FILE`` (what a desktop's "Open with" runs) means
    ``tugboat --open FILE``: argparse alone would take FILE for an unknown command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            break
        if arg in _VALUE_OPTIONS:
            i += 2
            continue
        if arg.startswith("-") and arg != "-":
            i += 1
            continue
        if arg not in COMMANDS:  # the first positional is not a command: a file to open
            argv[i:i + 1] = ["--open", arg]
        break
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command is None:
        return _start_gui(args)
    from .engine.errors import TugboatError

    try:
        return {"info": cmd_info, "run": cmd_run, "sweep": cmd_sweep, "report": cmd_report,
                "export": cmd_export}[args.command](args)
    except TugboatError as exc:
        print(f"tugboat: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # running out of memory is the user's to fix (a smaller batch), not a bug
        from .engine.resources import is_out_of_memory, oom_message

        if not is_out_of_memory(exc):
            raise
        print(f"tugboat: error: {oom_message(f'in tugboat {args.command}')}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("tugboat: interrupted", file=sys.stderr)
        return 130


def _start_gui(args) -> int:
    try:
        from .ui.app import main as gui_main
    except ImportError as exc:
        print(f"tugboat: the desktop app is not available ({exc}); use a command, see --help",
              file=sys.stderr)
        return EXIT_USAGE
    return gui_main(args)


def cmd_info(args) -> int:
    from .engine.info import model_info

    if args.runtimes:
        from .engine.runtimes import list_runtimes

        rows = list_runtimes()
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for r in rows:
                state = f"{r['version']}" if r["available"] else f"not available: {r['reason']}"
                print(f"{r['name']:<12} {state}")
        if not args.model:
            return 0
    if not args.model:
        print("tugboat info: error: give a model (file or demo:NAME), or --runtimes", file=sys.stderr)
        return EXIT_USAGE
    info = model_info(args.model, trust=args.trust, arch=args.arch, input_shape=args.input_shape,
                      data=args.data, task=args.task)
    if args.json:
        from .engine.stored import finite

        print(json.dumps(finite(info), indent=2, allow_nan=False))  # strict JSON: no bare NaN
        return 0
    print(format_info(info))
    return 0


def format_info(info: dict[str, Any]) -> str:
    lines = [f"Model     {info['source']}", f"Format    {info['format']}",
             f"Task      {info['task']}"]
    for kind in ("inputs", "outputs"):
        for spec in info[kind]:
            shape = "x".join(str(d) if d is not None else "?" for d in spec["shape"])
            lines.append(f"{kind[:-1].capitalize():<9} {spec['name']}  [{shape}]  {spec['dtype']}")
    lines.append(f"Params    {_fmt_count(info['params'])} ({info['params']:,}; non-zero {info['nonzero_params']:,})")
    size, deflated = _fmt_bytes(info["size_bytes"]), _fmt_bytes(info["compressed_bytes"])
    lines.append(f"Size      {size} as ONNX ({deflated} deflated)")
    lines.append(f"FLOPs     {_fmt_count(info['flops'])} per sample")
    if info.get("warnings"):
        for w in info["warnings"]:
            lines.append(f"Warning   {w}")
    layers = info.get("layers") or []
    if layers:
        width = max(len(r["name"]) for r in layers)
        lines.append("")
        lines.append(f"{'layer':<{width}}  {'type':<16} {'params':>10} {'FLOPs':>10}")
        for r in layers:
            lines.append(f"{r['name']:<{width}}  {r['type']:<16} {r['params']:>10,} {_fmt_count(r['flops']):>10}")
    return "\n".join(lines)


def cmd_run(args) -> int:
    from .engine.progress import Progress
    from .engine.recipe import load_recipe, run

    recipe = load_recipe(args.recipe)
    print_notes(recipe)
    recipe.trust = recipe.trust_steps = bool(args.trust)  # per run: a recipe file never grants trust
    recipe.task = args.task or recipe.task
    bar = TerminalProgress(enabled=not args.quiet)
    try:
        report = run(recipe, args.out, Progress(bar))
    finally:
        bar.close()
    print(format_summary(report))
    print(f"wrote {os.path.join(args.out, 'report.json')}")
    failed = [v for v in report["variants"] if v.get("status") == "failed"]
    for v in failed:
        print(f"tugboat: variant {v['name']} failed: {v.get('error')}", file=sys.stderr)
    return 1 if failed else 0


def format_summary(report: dict[str, Any]) -> str:
    rows = [("baseline", report["baseline"]["metrics"], [])]
    rows += [(v["name"], v["metrics"], v.get("warnings", []) + ([v["error"]] if v.get("error") else []))
             for v in report["variants"]]
    width = max(len(r[0]) for r in rows)
    out = [f"{'variant':<{width}}  {'size':>9} {'deflated':>9} {'params':>8} {'latency':>10} "
           f"{'accuracy':>8} {'agree':>6}"]
    pareto = set(report.get("pareto", []))
    for name, m, warns in rows:
        if not m:
            out.append(f"{name:<{width}}  (no metrics) {'; '.join(warns)}")
            continue
        lat = m.get("latency_ms") or {}
        acc = m.get("accuracy")
        agree = (m.get("fidelity") or {}).get("top1_agreement")
        out.append(
            f"{name:<{width}}  {_fmt_bytes(m.get('size_bytes')):>9} {_fmt_bytes(m.get('compressed_bytes')):>9} "
            f"{_fmt_count(m.get('params')):>8} {_fmt_ms(lat.get('median')):>7} ms "
            f"{(f'{acc * 100:.2f}%' if acc is not None else '-'):>8} "
            f"{(f'{agree:.3f}' if agree is not None else '-'):>6}"
            + (" *" if name in pareto else ""))
        out += format_runtimes(m, width)
        for w in warns:
            out.append(f"{'':<{width}}  ! {w}")
    lat = report["baseline"]["metrics"].get("latency_ms") or {}
    out.append(f"latency: median at batch {lat.get('batch')}, {lat.get('threads')} threads, "
               f"{lat.get('runtime')}; * = on the Pareto front")
    return "\n".join(out)


def cmd_export(args) -> int:
    from .engine.progress import Progress
    from .engine.targets import describe, export_from_folder

    bar = TerminalProgress(enabled=not args.quiet)
    try:
        result = export_from_folder(args.dir, args.variant, args.to, args.out, Progress(bar), batch=args.batch)
    finally:
        bar.close()
    print(describe(result) + f" ({result['checked_on']})")
    return 0


def format_runtimes(m: dict[str, Any], width: int) -> list[str]:
    """One line per runtime a variant was measured in (``[measure] runtime = [...]``)."""
    out = []
    for name, r in (m.get("runtimes") or {}).items():
        if not r.get("ok"):
            out.append(f"{'':<{width}}  {name}: {r.get('reason') or 'not measured'}")
            continue
        lat, fid = r.get("latency_ms") or {}, r.get("fidelity") or {}
        agree = fid.get("top1_agreement")
        out.append(f"{'':<{width}}  {name} {r.get('version')}: {_fmt_ms(lat.get('median'))} ms at batch "
                   f"{lat.get('batch')}, agreement {agree if agree is None else f'{agree:.3f}'}, "
                   f"rel. error {fid.get('rel_error', 0):.3g}")
    return out


def cmd_sweep(args) -> int:
    try:
        from .reporting import run_sweep_cli
    except ImportError:
        print("tugboat: error: sweeps are not available in this build", file=sys.stderr)
        return EXIT_USAGE
    return run_sweep_cli(args)


def cmd_report(args) -> int:
    try:
        from .reporting import report_cli
    except ImportError:
        print("tugboat: error: reports are not available in this build", file=sys.stderr)
        return EXIT_USAGE
    return report_cli(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
