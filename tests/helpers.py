"""Small models and files the tests build themselves (no downloads, no hand-written bytes)."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from tugboat.engine.measuring.measure import MeasureConfig
from tugboat.engine.measuring.runtime import eval_mode

FAST = MeasureConfig(batch=32, min_runs=3, min_seconds=0.0, max_seconds=0.5, warmup=1,
                     also_batch1=False, both_runtimes=False, threads=1)


class TokenClassifier(nn.Module):
    """Two inputs (token ids + attention mask), like a text model."""

    def __init__(self, vocab: int = 17, dim: int = 16, classes: int = 10):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids, mask):
        h = self.embed(ids) * mask.unsqueeze(-1).float()
        return self.head(h.sum(1) / (mask.float().sum(1, keepdim=True) + 1e-6))


class Wide(nn.Module):
    """A stack of square Linear layers: FLOPs scale with ``width ** 2``."""

    def __init__(self, width: int, depth: int = 4):
        super().__init__()
        self.inp = nn.Linear(64, width)
        self.layers = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(depth)])
        self.out = nn.Linear(width, 10)

    def forward(self, x):
        return self.out(self.layers(self.inp(x.flatten(1))))


def token_data(n: int = 64, seq: int = 12, vocab: int = 17, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(n, seq)).astype(np.int64)
    mask = (rng.random((n, seq)) > 0.2).astype(np.int64)
    labels = rng.integers(0, 10, size=n).astype(np.int64)
    return ids, mask, labels


def onnx_with_unsupported_op(path) -> None:
    """A valid ONNX graph ORT runs but onnx2torch cannot convert (Shrink)."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).ravel().tolist())
    nodes = [helper.make_node("MatMul", ["input", "w"], ["h"], name="mm"),
             helper.make_node("Shrink", ["h"], ["output"], name="shrink", lambd=0.5)]
    graph = helper.make_graph(nodes, "g", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def outputs_of(module: nn.Module, *inputs: torch.Tensor) -> np.ndarray:
    eval_mode(module)
    with torch.inference_mode():
        out = module(*inputs)
    return out.numpy()


def run_prune(qtbot, window, ratio: float):
    """In the real window: one structured-pruning variant at ``ratio`` (no fine-tuning), waited for."""
    panel = window.show_panel("prune")
    panel.set_value("finetune_epochs", 0)
    panel.set_value("ratio", ratio)
    before = len(window.store)
    panel.run_button.click()
    qtbot.waitUntil(lambda: len(window.store) == before + 1, timeout=120000)
    return window.store.variants()[-1]
