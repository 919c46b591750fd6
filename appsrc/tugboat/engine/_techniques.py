"""The technique catalogue: importing it imports every technique module, and each registers itself
with :mod:`tugboat.engine.steps` (imported by :func:`steps.techniques` on first use).

A technique module that fails to import is an error, not a technique quietly missing: every
technique's dependencies are required ones, so a failure here is a broken install or a bug.
"""

from __future__ import annotations

from . import distill, prune, quantize  # noqa: F401  (imported to register themselves)
