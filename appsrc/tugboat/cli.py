"""The headless face of Tugboat: ``tugboat info | run | sweep | report | remeasure`` (and the GUI with no
command).

Errors the user can act on (:class:`TugboatError`) print one line naming the file and the problem
and exit with code 2; nothing else is caught, so real bugs keep their tracebacks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .console import TerminalProgress, format_info, format_summary, print_notes
from .engine.io.tasks import TASKS

__all__ = ["build_parser", "format_info", "format_summary", "main", "parse_args"]

EXIT_USAGE = 2


def _parse_shape(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-shape must be integers like 1,8,8, got {text!r}") from None


DEVICE_HELP = ("where training steps (fine-tuning, distillation, QAT) and latency timing run for this "
               "run: cpu, cuda, cuda:N or auto (a GPU when torch sees one); overrides the recipe's "
               "[measure] device and the steps' device")
TRUST_HELP = ("allow unpickling the model file and a distillation student_file of this run (runs code "
              "from them: only for files you trust); never read from a recipe, never saved")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """What one run of a recipe decides for itself: trust and the device."""
    p.add_argument("--trust", action="store_true", help=TRUST_HELP)
    p.add_argument("--device", help=DEVICE_HELP)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return value


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
    _add_info(sub)
    _add_run_and_sweep(sub)
    _add_export_report_remeasure(sub)
    return parser


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="describe a model: format, inputs/outputs, params, size, FLOPs, layers",
                       description="Describe a model file or demo:NAME.")
    p.add_argument("model", nargs="?", help="model file (.onnx, .pt, .pth, .pt2, .safetensors), a Hugging Face model "
                   "folder, or demo:NAME")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--runtimes", action="store_true",
                   help="list the runtimes variants can be measured in, installed or not (with the install command)")
    p.add_argument("--trust", action="store_true",
                   help="allow unpickling a whole nn.Module or running --arch code (only for files you trust)")
    _add_arch_args(p)
    p.add_argument("--input-shape", type=_parse_shape, help="input shape without batch, e.g. 1,8,8")
    p.add_argument("--data", help="data (.npz, folder, demo:NAME): sizes for dynamic inputs, labels for the task")
    p.add_argument("--task", choices=TASKS, help="override the task inferred from the model's outputs")


def _add_run_and_sweep(sub) -> None:
    p = sub.add_parser("run", help="run a recipe: measure the baseline, apply the steps, write report.json",
                       description="Run a recipe file (TOML). Without steps it measures the baseline.")
    p.add_argument("recipe", help="recipe file (.toml)")
    p.add_argument("--out", required=True, help="output folder (artifacts and report.json)")
    _add_run_args(p)
    _add_arch_args(p, recipe=True)
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--task", choices=TASKS, help="override the task (how quality is measured)")

    p = sub.add_parser("sweep", help="run every combination of a recipe's [sweep] table into a workspace",
                       description="Run a recipe's sweep (grid, random search or target search).")
    p.add_argument("recipe", help="recipe file (.toml) with a [sweep] or [target] table")
    p.add_argument("--out", required=True, help="workspace folder")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep; finished variants are kept")
    p.add_argument("--max-variants", type=_positive_int, metavar="N",
                   help="allow a [sweep] grid of up to N combinations (default 1000)")
    p.add_argument("--executor", choices=("auto", "local", "processes", "ray"), default="auto",
                   help="where variants are made: auto (default: worker processes for a grid of 6+ variants "
                   "on 2+ cores), this process, worker processes, or Ray tasks (pip install 'tugboat-ml[ray]')"
                   "; timing always runs here, one variant at a time")
    p.add_argument("--workers", type=_positive_int, metavar="N",
                   help="worker processes (processes) or CPUs of a local Ray instance (default: all cores)")
    p.add_argument("--address", metavar="ADDR",
                   help="join the Ray cluster at ADDR (e.g. auto, ray://head:10001) instead of a local instance")
    _add_run_args(p)
    _add_arch_args(p, recipe=True)
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _add_export_report_remeasure(sub) -> None:
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

    p = sub.add_parser("remeasure", help="time a workspace's baseline and variants again, back to back",
                       description="Re-time the baseline and the variants (all, or those named) of a "
                       "workspace, each paired with the baseline, and update the workspace and report.json. "
                       "Use it when a timing was marked 'timing too noisy: re-measure'.")
    p.add_argument("workspace", help="workspace folder (written by tugboat sweep or the window)")
    p.add_argument("variants", nargs="*", metavar="VARIANT", help="variant names (default: all)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


COMMANDS = ("info", "run", "sweep", "export", "report", "remeasure")
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


def _add_arch_args(p: argparse.ArgumentParser, recipe: bool = False) -> None:
    over = " (overrides the recipe's)" if recipe else ""
    p.add_argument("--arch", help="architecture for a bare state_dict or .safetensors: a built-in name "
                   "(e.g. digits-cnn), or your code as path/to/models.py:ClassName or package.module:factory "
                   "(runs that code: needs --trust)" + over)
    p.add_argument("--arch-kwargs", type=_parse_kwargs, metavar="JSON",
                   help="keyword arguments for --arch as a JSON object, e.g. '{\"width\": 32}'" + over)
    p.add_argument("--constant", type=_parse_constant, action="append", metavar="NAME=VALUE",
                   help="value of a non-tensor argument of a TorchScript model's forward, e.g. sr=16000 "
                   "(repeatable)" + over)


def _parse_kwargs(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--arch-kwargs must be a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"--arch-kwargs must be a JSON object like '{{\"width\": 32}}', "
                                         f"got {text!r}")
    return value


def _parse_constant(text: str) -> tuple[str, Any]:
    name, sep, raw = text.partition("=")
    if not sep or not name.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"--constant must be NAME=VALUE like sr=16000, got {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw  # a plain string
    return name.strip(), value


def apply_arch_args(recipe, args) -> None:
    """--arch / --arch-kwargs / --device from the command line onto a loaded recipe (trust is set per run)."""
    if getattr(args, "device", None):
        from .engine.devices import set_run_device

        set_run_device(recipe, args.device)  # a missing GPU: one line before any work
    if getattr(args, "arch", None):
        recipe.arch = args.arch
    if getattr(args, "arch_kwargs", None) is not None:
        recipe.arch_kwargs = dict(args.arch_kwargs)
    if getattr(args, "constant", None):
        recipe.constants = {**recipe.constants, **dict(args.constant)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command is None:
        return _start_gui(args)
    from .engine.errors import Cancelled, TugboatError

    try:
        with _ctrl_c_cancels():
            return {"info": cmd_info, "run": cmd_run, "sweep": cmd_sweep, "report": cmd_report,
                    "export": cmd_export, "remeasure": cmd_remeasure}[args.command](args)
    except (KeyboardInterrupt, Cancelled):
        print("tugboat: interrupted", file=sys.stderr)
        _exit_if_native_work_left(130)
        return 130
    except TugboatError as exc:
        print(f"tugboat: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # running out of memory is the user's to fix (a smaller batch), not a bug
        from .engine.measuring.memory import is_out_of_memory, oom_message

        if not is_out_of_memory(exc):
            raise
        print(f"tugboat: error: {oom_message(f'in tugboat {args.command}')}", file=sys.stderr)
        return EXIT_USAGE


@contextlib.contextmanager
def _ctrl_c_cancels():
    """While a command runs, Ctrl+C (SIGINT) cancels the work cooperatively: every progress token
    reads as cancelled and the work raises Cancelled at its next check (within
    cancellable.POLL_S while a helper thread runs native code). A second Ctrl+C exits at once."""
    import signal

    from .engine import progress

    presses = [0]

    def on_sigint(_signum, _frame):
        presses[0] += 1
        if presses[0] > 1:
            print("tugboat: interrupted", file=sys.stderr)
            _hard_exit(130)
        progress.stop_everything()

    try:
        previous = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread (an embedding app): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        progress.reset_stop_everything()


def _exit_if_native_work_left(code: int) -> None:
    """After an interrupt, helper threads of cancelled work may still be inside torch or ONNX
    Runtime; letting the interpreter finalise under them aborts in C++ ("terminate called
    without an active exception", exit 134). Give them a moment to reach their next check, then
    end the process without finalising if any is left."""
    from .engine import cancellable

    if not cancellable.wait_abandoned(timeout=1.0):
        _hard_exit(code)


def _hard_exit(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


QT_PACKAGES = ("PySide6", "pyqtgraph", "superqt")


def _start_gui(args) -> int:
    # the engine (torch, onnx) before Qt: once PySide6 is imported, its import hook reads the source
    # of every module imported after it (inspect.getsource: ~1 s for torch's thousand modules)
    from .engine.running import recipe  # noqa: F401

    try:
        from .ui.app import main as gui_main
    except ModuleNotFoundError as exc:  # Qt itself missing (a broken install); any other error is a bug
        if (exc.name or "").split(".")[0] not in QT_PACKAGES:
            raise
        print(f"tugboat: the desktop app is not available ({exc}); use a command, see --help",
              file=sys.stderr)
        return EXIT_USAGE
    return gui_main(args)


def cmd_info(args) -> int:
    from .engine.running.info import model_info

    if args.runtimes:
        from .engine.measuring.runtimes import list_runtimes

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
                      data=args.data, task=args.task, arch_kwargs=args.arch_kwargs,
                      constants=dict(args.constant or ()))
    if args.json:
        from .engine.stored import finite

        print(json.dumps(finite(info), indent=2, allow_nan=False))  # strict JSON: no bare NaN
        return 0
    print(format_info(info))
    return 0


def cmd_run(args) -> int:
    from .engine.progress import Progress
    from .engine.running.recipe import load_recipe
    from .engine.running.runner import run

    recipe = load_recipe(args.recipe)
    print_notes(recipe)
    recipe.trust = recipe.trust_steps = bool(args.trust)  # per run: a recipe file never grants trust
    apply_arch_args(recipe, args)
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


def cmd_remeasure(args) -> int:
    from .engine.measuring.remeasure import remeasure_workspace
    from .engine.progress import Progress
    from .engine.running.workspace import Workspace

    bar = TerminalProgress(enabled=not args.quiet)
    try:
        remeasure_workspace(args.workspace, args.variants or None, progress=Progress(bar))
    finally:
        bar.close()
    report = Workspace.open(args.workspace).report()
    if args.variants:
        report["variants"] = [v for v in report["variants"] if v["name"] in args.variants]
    print(format_summary(report))
    print(f"updated {os.path.join(args.workspace, 'report.json')}")
    return 0


def cmd_export(args) -> int:
    from .engine.measuring.targets import describe, export_from_folder
    from .engine.progress import Progress

    bar = TerminalProgress(enabled=not args.quiet)
    try:
        result = export_from_folder(args.dir, args.variant, args.to, args.out, Progress(bar), batch=args.batch)
    finally:
        bar.close()
    print(describe(result) + f" ({result['checked_on']})")
    return 0


def cmd_sweep(args) -> int:
    from .engine.running.worker_start import prestart

    # workers' forkserver first: its imports run on another core beside this process's own
    prestart(args.recipe, getattr(args, "executor", "auto") or "auto")
    from .engine.progress import Progress
    from .engine.running.executors import make_executor
    from .engine.running.recipe import load_recipe
    from .engine.running.sweep import run_sweep

    executor = make_executor(getattr(args, "executor", "auto") or "auto", workers=getattr(args, "workers", None),
                             address=getattr(args, "address", None))  # a missing Ray: one line, before any work
    recipe = load_recipe(args.recipe)
    print_notes(recipe)
    recipe.trust = recipe.trust_steps = bool(getattr(args, "trust", False))  # per run, never from a file
    apply_arch_args(recipe, args)
    from .engine.devices import wants_gpu

    if getattr(executor, "name", "") == "ray" and wants_gpu(recipe):
        executor.num_gpus = 1  # each variant's task declares the GPU its steps train on
    if hasattr(executor, "plan_for"):  # auto: choose now (a GPU recipe: this process), start workers now
        executor.plan_for(recipe, getattr(args, "max_variants", None), local=wants_gpu(recipe))
    quiet = getattr(args, "quiet", False)
    bar = TerminalProgress(enabled=not quiet)

    def log(msg: str) -> None:
        if not quiet:
            bar.print_line(msg)

    try:
        result = run_sweep(recipe, args.out, resume=args.resume, progress=Progress(bar), log=log,
                           max_variants=getattr(args, "max_variants", None), executor=executor)
    finally:
        executor.close()  # workers started early are ended even when the sweep stopped before its loop
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


def cmd_report(args) -> int:
    from .report_command import report_cli

    return report_cli(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
