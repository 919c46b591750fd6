"""Access to the real-model corpus (tools/real_models.py) for tests.

``real_model(name)`` materialises an entry (cached outside the repository, see tools/real_models.py) and
returns its :class:`RealModel` (``.model``, ``.data``, ``.arch``, ``.entry.task`` ...). It skips the test
ONLY when a package that ships the weights is not installed, naming the pip command that installs it;
any other failure (a broken materialiser, a changed package) fails the test.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_tool():
    name = "tugboat_real_models"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / "real_models.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
    return sys.modules[name]


corpus = _load_tool()
NAMES = list(corpus.ENTRIES)


def real_model(name: str):
    """The materialised entry ``name``; skips the calling test if its package is absent."""
    gone = corpus.missing(name)
    if gone:
        pytest.skip(f"real model '{name}' needs {', '.join(gone)}: {corpus.ENTRIES[name].install_command}")
    return corpus.materialise(name)
