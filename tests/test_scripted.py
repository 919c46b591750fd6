"""Scripted (TorchScript) modules that are programs, not graphs (engine/io/scripted.py): non-tensor
forward arguments bound to values, a state kept in module attributes, and control flow on both."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from tugboat.engine.errors import DataError, ModelLoadError
from tugboat.engine.io.loading import load_model


class Streaming(nn.Module):
    """Like Silero VAD: a rate argument that picks a branch, a context carried between calls, a
    bool flag with a default, and a rank check."""

    def __init__(self):
        super().__init__()
        self.fast = nn.Linear(12, 3)
        self.slow = nn.Linear(12, 3)
        self._context = torch.zeros(0)
        self._calls = 0

    def forward(self, x: torch.Tensor, rate: int, gain: float = 1.0, clip: bool = True) -> torch.Tensor:
        if x.dim() == 1:
            x = x.unsqueeze(0)
        if x.shape[-1] != 8:
            raise ValueError("8 samples per chunk")
        if not len(self._context):
            self._context = torch.zeros(x.shape[0], 4)
        x = torch.cat([self._context, x], 1) * gain
        self._context = x[:, -4:]
        self._calls += 1
        y = self.fast(x) if rate == 16000 else self.slow(x)
        return torch.clamp(y, -1.0, 1.0) if clip else y


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("scripted") / "streaming.pt"
    torch.jit.script(Streaming().eval()).save(str(path))
    return path


def _fresh(path, x, *args):
    with torch.no_grad():
        return torch.jit.load(str(path))(torch.from_numpy(x), *args).numpy()


def test_constants_from_the_user_bind_arguments_and_the_state_starts_fresh(scripted):
    x = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32) * 3
    handle = load_model(scripted, input_shape=(8,), constants={"rate": 8000, "gain": 0.5})
    assert handle.input_names == ["x"] and handle.module is not None  # editable: no If left
    assert not any(n.op_type == "If" for n in handle.onnx_model.graph.node)
    with torch.no_grad():
        mine = handle.module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(mine, _fresh(scripted, x, 8000, 0.5), rtol=1e-5, atol=1e-6)
    assert not np.allclose(mine, _fresh(scripted, x, 16000, 0.5))  # the other branch differs
    from tugboat.engine.measuring.runtime import run_onnx

    again = run_onnx(handle.onnx_model, [x])[0]  # every call is the start of a stream: same result
    np.testing.assert_allclose(run_onnx(handle.onnx_model, [x])[0], again)
    np.testing.assert_allclose(again, mine, rtol=1e-4, atol=1e-5)


def test_constants_from_the_data_and_a_missing_one_named(scripted, tmp_path):
    from tugboat.engine.io.data import load_data

    x = np.random.default_rng(1).normal(size=(6, 8)).astype(np.float32)
    with pytest.raises(ModelLoadError, match=r"'rate' is a int with no default.*--constant rate=VALUE"):
        load_model(scripted, input_shape=(8,))
    np.savez(tmp_path / "d.npz", x=x, rate=np.full(6, 16000))
    handle = load_model(scripted)
    load_data(tmp_path / "d.npz", handle)
    assert handle.info["constants_used"] == {"rate": 16000, "gain": 1.0, "clip": True}
    with torch.no_grad():
        np.testing.assert_allclose(handle.module(torch.from_numpy(x)).numpy(), _fresh(scripted, x, 16000),
                                   rtol=1e-5, atol=1e-6)
    np.savez(tmp_path / "bad.npz", x=x, rate=np.arange(6))
    with pytest.raises(DataError, match="'rate' must hold one value"):
        load_data(tmp_path / "bad.npz", load_model(scripted))
    with pytest.raises(ModelLoadError, match="constants speed name no non-tensor argument"):
        load_model(scripted, input_shape=(8,), constants={"rate": 1, "speed": 2})
    with pytest.raises(ModelLoadError, match="'clip' is a bool"):
        load_model(scripted, input_shape=(8,), constants={"rate": 1, "clip": "maybe"})


def test_cli_constant_option_and_recipe_constants(scripted, tmp_path, capsys):
    from tugboat.cli import main
    from tugboat.engine.running.recipe import load_recipe

    assert main(["info", str(scripted), "--input-shape", "8", "--constant", "rate=16000", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] == 39  # the one branch taken: the fast layer (12 * 3 + 3), not the slow one
    assert main(["info", str(scripted), "--input-shape", "8"]) != 0
    assert "--constant rate=VALUE" in capsys.readouterr().err
    (tmp_path / "r.toml").write_text(f'model = "{scripted}"\ninput_shape = [8]\nconstants = {{rate = 8000}}\n')
    recipe = load_recipe(tmp_path / "r.toml")
    assert recipe.constants == {"rate": 8000} and recipe.to_dict()["constants"] == {"rate": 8000}


class Encoder(nn.Module):
    def __init__(self, norm_first: bool, activation: str):
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, norm_first=norm_first,
                                                activation=activation)
        self.attention = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 5)

    def forward(self, x, padding):
        h = self.layer(self.embed(x), src_key_padding_mask=padding)
        h = self.attention(h, h, h, need_weights=False)[0] + h
        return self.head(h.mean(1))


@pytest.mark.parametrize("norm_first,activation", [(False, "relu"), (True, "gelu")])
def test_traced_transformer_layers_with_fused_kernels_become_editable(tmp_path, norm_first, activation):
    """In eval mode these layers run fused kernels (no ONNX export); a trace records them."""
    from tugboat.engine.io.data import load_data
    from tugboat.engine.measuring.runtime import run_onnx

    torch.manual_seed(0)
    model = Encoder(norm_first, activation).eval()
    x = torch.rand(4, 6, 8)
    padding = torch.zeros(4, 6, dtype=torch.bool)
    padding[0, 4:] = padding[2, 5:] = True
    with torch.no_grad():
        traced = torch.jit.trace(model, (x[:2], padding[:2]))
    assert "aten::_transformer_encoder_layer_fwd" in str(traced.inlined_graph)
    traced.save(str(tmp_path / "enc.pt"))
    np.savez(tmp_path / "d.npz", x=x.numpy(), padding=padding.numpy())
    handle = load_model(tmp_path / "enc.pt")
    load_data(tmp_path / "d.npz", handle)
    assert handle.conversion_error is None and handle.module is not None
    with torch.no_grad():
        ref = model(x, padding).numpy()
        np.testing.assert_allclose(handle.module(x, padding).numpy(), ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(run_onnx(handle.onnx_model, [x.numpy(), padding.numpy()])[0], ref,
                               rtol=1e-4, atol=1e-5)
