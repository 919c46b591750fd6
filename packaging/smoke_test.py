"""Smoke test of the built bundle (or of any `tugboat` command):

    python packaging/smoke_test.py [dist/tugboat/tugboat] [--quit-after 8] [--keep]

1. `--version` and `--help` answer;
2. the bundle ships the resources where tugboat.resources looks for them (bundles only);
3. `run` on a recipe (demo CNN, structured pruning, one fine-tuning epoch) writes report.json and an
   ONNX file: torch, torch-pruning, the ONNX export and onnxruntime all work frozen;
4. the desktop app starts offscreen with `--demo --quit-after N` and exits 0 with no traceback.

Settings, caches and outputs go to a temporary folder (the demo model trains there once, in step 3),
so the user's files are never touched. Exit code 0 when every check passes; each check prints a line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPE = """\
model = "demo:digits-cnn"
data = "demo:digits"
[[steps]]
technique = "prune"
method = "structured"
ratio = 0.5
finetune_epochs = 1
[measure]
batch = 16
threads = 1
warmup = 1
min_runs = 3
min_seconds = 0.0
max_seconds = 0.2
also_batch1 = false
both_runtimes = false
"""


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("exe", nargs="?", default="dist/tugboat/tugboat", help="the built executable")
    parser.add_argument("--quit-after", type=float, default=8.0, help="seconds the app stays open")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)

    exe = Path(args.exe).resolve() if os.sep in args.exe else Path(shutil.which(args.exe) or args.exe)
    if not exe.exists():
        print(f"FAIL {exe}: not found (build it with: bash packaging/build.sh)")
        return 1
    home = Path(tempfile.mkdtemp(prefix="tugboat-smoke-"))
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "TUGBOAT_CONFIG_DIR": str(home / "config"),
           "TUGBOAT_CACHE_DIR": str(home / "cache"), "TORCHAO_FORCE_SKIP_LOADING_SO_FILES": "1"}
    failures: list[str] = []

    def check(name: str, ok: bool, detail: str = "") -> None:
        print(f"{'ok  ' if ok else 'FAIL'} {name}" + (f": {detail}" if detail else ""), flush=True)
        if not ok:
            failures.append(name)

    try:
        proc, secs = _run([str(exe), "--version"], env, 120)
        check("--version", proc.returncode == 0 and proc.stdout.startswith("tugboat "),
              f"{proc.stdout.strip() or proc.stderr[-500:]} ({secs:.1f} s)")
        proc, _ = _run([str(exe), "--help"], env, 120)
        check("--help", proc.returncode == 0 and "usage: tugboat" in proc.stdout, proc.stderr[-500:])

        internal = exe.parent / "_internal"
        if internal.is_dir():
            svg = internal / "tugboat" / "_resources" / "icons" / "tugboat.svg"
            check("resources in the bundle", svg.is_file(), str(svg.relative_to(exe.parent)))

        recipe = home / "recipe.toml"
        recipe.write_text(RECIPE)
        out = home / "out"
        proc, secs = _run([str(exe), "run", str(recipe), "--out", str(out)], env, 900)
        report_path = out / "report.json"
        ok = proc.returncode == 0 and report_path.is_file()
        detail = f"{secs:.0f} s"
        if ok:
            report = json.loads(report_path.read_text())
            variants = report.get("variants") or []
            onnx = [v.get("artifacts", {}).get("onnx") for v in variants]
            ok = bool(variants) and all(p and (out / p).is_file() for p in onnx)
            base, var = report["baseline"]["metrics"], variants[0]["metrics"] if variants else {}
            detail += f", params {base.get('params')} -> {var.get('params')}, onnx {onnx}"
        else:
            detail += f", exit {proc.returncode}: {proc.stderr[-1500:]}"
        check("run a pruning recipe", ok, detail)

        proc, secs = _run([str(exe), "--demo", "--quit-after", str(args.quit_after)], env, 300)
        settings = home / "config" / "settings.json"
        clean = proc.returncode == 0 and "Traceback" not in proc.stderr
        check("--demo --quit-after", clean and settings.is_file(),
              f"exit {proc.returncode} after {secs:.1f} s" + ("" if clean else f": {proc.stderr[-2000:]}"))
    finally:
        if args.keep:
            print(f"kept {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)
    print("smoke test " + ("passed" if not failures else f"FAILED: {', '.join(failures)}"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
