"""Imports every technique module so each registers itself with :mod:`tugboat.engine.steps`.

A technique module that fails to import (e.g. an optional dependency is missing) is skipped; the
recipe validator then reports it as unknown, which is the honest answer.
"""

from __future__ import annotations

import importlib
import logging

_log = logging.getLogger(__name__)

for _name in ("prune", "quantize", "distill"):
    try:
        importlib.import_module(f"tugboat.engine.{_name}")
    except ModuleNotFoundError as exc:  # the module itself not written yet, or a missing extra
        if exc.name != f"tugboat.engine.{_name}":
            _log.warning("technique %s unavailable: %s", _name, exc)
