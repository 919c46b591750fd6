"""Tugboat's data files (icons, desktop entry), installed as the package ``tugboat._resources``.

This folder is mapped into the wheel by ``[tool.setuptools] package-dir`` in pyproject.toml. Do not
import it directly: use :mod:`tugboat.resources`, which also finds these files in a source checkout
and in a PyInstaller bundle.
"""
