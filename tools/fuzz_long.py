"""A longer fuzzing run: the properties of tests/test_fuzz.py and tests/test_fuzz_stored.py, with fresh
random seeds, for N minutes.

    python tools/fuzz_long.py --minutes 10 [--scale 4]

Runs rounds of ``pytest tests/test_fuzz.py tests/test_fuzz_stored.py`` (each with a new random seed
and ``--scale`` times the CI example counts) until the time is up, then prints the number of inputs
tried and every failure (with hypothesis' minimal failing example and its ``@reproduce_failure``
blob). Exit code 1 if any round failed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="total time (default 10)")
    parser.add_argument("--scale", type=float, default=4.0, help="examples per round, times the CI counts")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.minutes * 60
    total, rounds, failures = 0, 0, []
    t0 = time.monotonic()
    cache = os.environ.get("TUGBOAT_CACHE_DIR") or tempfile.mkdtemp(prefix="tugboat-fuzz-cache-")
    while time.monotonic() < deadline:
        report = Path(tempfile.mkstemp(prefix="tugboat-fuzz-", suffix=".txt")[1])
        env = {**os.environ, "TUGBOAT_FUZZ_RANDOM": "1", "TUGBOAT_FUZZ_SCALE": str(args.scale),
               "TUGBOAT_FUZZ_REPORT": str(report), "TUGBOAT_CACHE_DIR": cache,
               "QT_QPA_PLATFORM": "offscreen"}
        left = max(30, int(deadline - time.monotonic()) + 60)
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:logging", "-p", "no:cacheprovider",
                                   str(ROOT / "tests" / "test_fuzz.py"), str(ROOT / "tests" / "test_fuzz_stored.py")],
                                  cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=left)
            output, code = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:
            output, code = f"round timed out after {left} s\n{exc.stdout or ''}", -1
        rounds += 1
        text = report.read_text().split() if report.exists() and report.stat().st_size else []
        report.unlink(missing_ok=True)
        if text:
            total += int(text[0])
        if code != 0:
            failures.append(output[-6000:])
            print(f"round {rounds}: FAILED (exit {code})", flush=True)
        else:
            print(f"round {rounds}: {text[0] if text else '?'} inputs, {total} so far, "
                  f"{time.monotonic() - t0:.0f} s", flush=True)
    print(f"fuzz_long: {total} inputs tried in {rounds} rounds, {time.monotonic() - t0:.0f} s, "
          f"{len(failures)} failing round(s)")
    for i, f in enumerate(failures, 1):
        print(f"\n===== failure {i} =====\n{f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
