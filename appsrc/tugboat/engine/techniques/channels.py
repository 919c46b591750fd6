"""Channel counts after structured pruning, rounded to what the runtime's kernels run fast.

Convolution and matrix kernels (ONNX Runtime's MLAS, oneDNN) work on blocks of 8 or 16 channels: a
layer with 25, 44 or 51 channels runs on slow remainder paths, and a pruned network can end up no
faster than its original despite having fewer FLOPs (a 0.3 prune of EfficientNet-Lite0 with counts
that were not multiples of 16 ran at 0.62x the original's speed; rounded to 16 it ran 1.83x faster).
``round_to = "auto"`` (the default) rounds to the multiple measured on this CPU
(:func:`tugboat.engine.machine.channel_multiple`, a short probe). The measured multiple is kept in the
user cache (``channel-multiple.json``, keyed by CPU model, core count, ONNX Runtime version and
threads), so every process and every re-run of a recipe prunes to the same counts, whatever the
machine's load when it starts.

Kept counts are rounded to the *nearest* multiple (so a ratio is met as closely as the multiple
allows), never below one multiple, never above the layer's width; a layer no wider than the
multiple keeps all its channels. Pure Python: :mod:`tugboat.engine.techniques.estimate` shows the same counts
without torch.
"""

from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any

AUTO = "auto"
CACHE_FILE = "channel-multiple.json"


def resolve_round_to(value: Any, threads: int = 1) -> int:
    """The channel multiple a ``round_to`` setting stands for: 0 (no rounding), an explicit
    multiple, or, for ``"auto"``, the one measured on this CPU (8 or 16)."""
    if value is None or value == "" or value is False:
        return 0
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return measured_multiple(max(1, int(threads)))
    multiple = int(value)
    return multiple if multiple > 1 else 0


def _cache_path() -> Path:
    override = os.environ.get("TUGBOAT_CACHE_DIR")
    if override:
        return Path(override) / CACHE_FILE
    import platformdirs

    return Path(platformdirs.user_cache_dir("tugboat", appauthor=False)) / CACHE_FILE


def _probe_key(threads: int) -> str:
    from ..machine import _cpuinfo

    try:
        ort = metadata.version("onnxruntime")
    except metadata.PackageNotFoundError:
        ort = "none"
    return f"{_cpuinfo()[0] or 'cpu'}|{os.cpu_count()}|onnxruntime {ort}|{threads} threads"


def measured_multiple(threads: int = 1) -> int:
    """The channel multiple this CPU runs fast (8 or 16): from the user cache, or measured once
    (:func:`tugboat.engine.machine.channel_multiple`) and stored there. An unreadable cache file is
    measured again; one that cannot be written leaves the value measured for this process only."""
    from ..machine import channel_multiple

    forced = os.environ.get("TUGBOAT_CHANNEL_MULTIPLE", "").strip()
    if forced.isdigit() and int(forced) > 1:  # the same counts on every machine (tests, comparisons)
        return int(forced)
    path, key = _cache_path(), _probe_key(threads)
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        stored = {}
    stored = stored if isinstance(stored, dict) else {}
    if stored.get(key) in (8, 16):
        return int(stored[key])
    value = int(channel_multiple(threads))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**stored, key: value}, indent=1), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass
    return value


def kept_unrounded(channels: int, ratio: float) -> int:
    """Channels torch-pruning keeps of ``channels`` at ``ratio`` (it removes ``C - int(C (1 - r))``)."""
    return int(channels * (1.0 - ratio))


def rounded_keep(channels: int, keep: int, multiple: int) -> int:
    """``keep`` channels of a ``channels``-wide layer rounded to the nearest ``multiple``, at least one
    multiple; a layer that loses nothing, or is no wider than the multiple, stays as it is (the
    step then says it changed nothing where no layer could be pruned)."""
    if multiple <= 1 or keep >= channels:
        return keep
    if channels <= multiple:
        return channels
    rounded = max(multiple, int(keep / multiple + 0.5) * multiple)
    return min(rounded, channels)


def ratio_for_keep(channels: int, keep: int) -> float:
    """The pruning ratio at which torch-pruning keeps exactly ``keep`` of ``channels``."""
    if keep >= channels:
        return 0.0
    return 1.0 - (keep + 0.5) / channels
