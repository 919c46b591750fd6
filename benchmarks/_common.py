"""What the benchmark scripts share: the results file they write and how a table cell shows a
missing value. Imported as ``_common`` (a script's own folder is first on ``sys.path``)."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path


def write_results(out: str | Path, rows: list[dict], started: float, **fields) -> Path:
    """``{"machine", "python", "torch", **fields, "seconds", "rows"}`` as JSON at ``out``."""
    import torch

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                               "python": sys.version.split()[0], "torch": torch.__version__, **fields,
                               "seconds": round(time.perf_counter() - started, 1), "rows": rows}, indent=1))
    print(f"\nwrote {out}")
    return out


def cell(v, spec: str = "") -> str:
    """A table cell: ``-`` for a missing value, else ``v`` formatted with ``spec``."""
    if v is None:
        return "-"
    return format(v, spec) if spec else str(v)
