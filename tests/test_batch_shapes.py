"""A model converted from ONNX keeps its shape arithmetic as tensors (``Shape -> Gather -> Concat ->
Reshape``, ``ConstantOfShape`` of a computed size, ``Pad`` with computed pads). The torch files
Tugboat writes from such a model (torch.export ``.pt2``, TorchScript) must reopen at any batch and
compress again (issue 14, item 2): engine/io/batch_shapes.py rewrites that arithmetic as Python of the
batch before saving."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tugboat.engine.io.batch_shapes import batch_dynamic
from tugboat.engine.io.data import load_data
from tugboat.engine.io.loading import load_model, save_exported, save_torchscript
from tugboat.engine.progress import null_progress
from tugboat.engine.techniques import quantize


class SamePadded(nn.Module):
    """What third-party exports hold: "same" padding computed from the input size (EfficientNet), a
    zero block sized by the batch (a recurrent model's initial state), a flatten by ``x.shape[0]``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.fc = nn.Linear(8 * 4 * 4 + 3, 5)

    def forward(self, x):
        ih, iw = x.shape[-2:]
        ph = max((math.ceil(ih / 2) - 1) * 2 + 3 - ih, 0)
        pw = max((math.ceil(iw / 2) - 1) * 2 + 3 - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        x = torch.relu(self.conv(x))
        flat = x.reshape(x.shape[0], -1)
        return self.fc(torch.cat([flat, torch.zeros(x.shape[0], 3)], 1))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A third-party-like ONNX file (exported by torch with a dynamic batch) opened by Tugboat, so
    that its torch module is onnx2torch's conversion, and a data file for it."""
    d = tmp_path_factory.mktemp("bs")
    torch.manual_seed(0)
    model = SamePadded().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.rand(2, 3, 8, 8),), str(d / "m.onnx"), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    rng = np.random.default_rng(0)
    np.savez(d / "d.npz", input=rng.random((48, 3, 8, 8), dtype=np.float32), labels=rng.integers(0, 5, 48))
    handle = load_model(str(d / "m.onnx"))
    load_data(str(d / "d.npz"), handle)
    assert handle.torch_module() is not None, handle.conversion_error
    return handle, d


def test_the_shape_arithmetic_becomes_python_of_the_batch(converted):
    handle, _ = converted
    module = handle.torch_module()
    kinds = {type(m).__name__ for m in module.modules()}
    assert {"OnnxReshape", "OnnxConstantOfShape", "OnnxPadDynamic"} <= kinds  # what the export wrote
    rewritten = batch_dynamic(module, handle.example_inputs)
    assert rewritten is not None
    left = {type(m).__name__ for m in rewritten.modules()}
    assert not left & {"OnnxReshape", "OnnxConstantOfShape", "OnnxPadDynamic", "OnnxShape"}, left
    for batch in (1, 3, 6):
        x = handle.example_inputs(batch)
        with torch.no_grad():
            torch.testing.assert_close(rewritten(*x), module(*x))
    # what torch.export could not follow before (a tensor turned into sizes) it now exports at any batch
    program = torch.export.export(rewritten, tuple(handle.example_inputs(2)),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    assert program.module()(*handle.example_inputs(5)).shape == (5, 5)


def test_a_module_with_nothing_to_rewrite_is_left_alone():
    assert batch_dynamic(nn.Linear(3, 2), lambda b: [torch.rand(b, 3)]) is None  # not a graph
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(3, 2), nn.ReLU()))
    assert batch_dynamic(gm, lambda b: [torch.rand(b, 3)]) is None


@pytest.mark.parametrize("save", [save_exported, save_torchscript], ids=["pt2", "torchscript"])
def test_a_converted_model_saved_as_a_torch_file_reopens_at_any_batch_and_compresses_again(converted, save):
    handle, d = converted
    path = save(handle, d / ("again.pt2" if save is save_exported else "again.pt"))
    reopened = load_model(str(path))  # refused before: "only runs at the batch size it was traced with"
    data = load_data(str(d / "d.npz"), reopened)
    x = handle.example_inputs(7)
    with torch.no_grad():
        torch.testing.assert_close(reopened.torch_module()(*x), handle.torch_module()(*x), rtol=1e-4, atol=1e-5)
    q = quantize.apply(reopened, {"method": "dynamic-int8"}, data, null_progress())
    assert len(q.to_onnx().SerializeToString()) < len(reopened.to_onnx().SerializeToString())
