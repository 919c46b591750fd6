"""The compression engine: plain Python and torch/ONNX, no Qt.

The GUI (``tugboat.ui``) and the CLI (``tugboat.cli``) both drive this package.
"""
