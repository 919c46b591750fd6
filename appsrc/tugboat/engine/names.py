"""Layer names across torch and ONNX: which torch module an exported node belongs to.

Pure string rules, below every module that needs them (quantize, layers, measure, diagnose)."""

from __future__ import annotations


def layer_of(node_name: str) -> str:
    """The torch module path an exported node belongs to.

    The legacy exporter names nodes by scope, e.g. ``/blocks/blocks.0/attn/qkv/MatMul`` for module
    ``blocks.0.attn.qkv`` and ``/net/net.1/Gemm`` for ``net.1``; a scope names a container's child
    after the container (``/blocks/blocks.0/mlp/mlp.0/MatMul`` is ``blocks.0.mlp.0``)."""
    parts = [p for p in node_name.split("/") if p][:-1]
    path: list[str] = []
    for p in parts:
        if path and p.startswith(path[-1] + "."):
            path[-1] = p
        else:
            path.append(p)
    return ".".join(path) or node_name


def layer_key(name: str) -> str:
    """The torch layer a row or ONNX node belongs to (``/a/a.1/Conv`` -> ``a.1``)."""
    if name.startswith("/"):
        return layer_of(name)
    return name
