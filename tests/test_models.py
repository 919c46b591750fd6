"""Model loading: every format round-trips, untrusted pickles never run, bad files fail clearly."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from helpers import TokenClassifier, onnx_with_unsupported_op, outputs_of
from tugboat.engine.errors import ModelLoadError, UntrustedFileError
from tugboat.engine.io import zoo
from tugboat.engine.io.export import parity, write_onnx
from tugboat.engine.io.loading import load_model, save_exported, save_pickle, save_state_dict, save_torchscript
from tugboat.engine.io.models import TensorSpec
from tugboat.engine.measuring.runtime import run_onnx

X = torch.from_numpy(zoo.digits_arrays()[0][:16])


@pytest.fixture(scope="module")
def cnn():
    return load_model("demo:digits-cnn")


def _expected(handle):
    return outputs_of(handle.module, X)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "pt2", "state_dict"])
def test_formats_round_trip(cnn, tmp_path, fmt):
    expected = _expected(cnn)
    if fmt == "onnx":
        path = write_onnx(cnn, tmp_path / "m.onnx")
    elif fmt == "torchscript":
        path = save_torchscript(cnn, tmp_path / "m.pt")
    elif fmt == "pt2":
        path = save_exported(cnn, tmp_path / "m.pt2")
    else:
        path = save_state_dict(cnn, tmp_path / "m.pth")
    loaded = load_model(path, arch="digits-cnn" if fmt == "state_dict" else None)
    assert loaded.format == fmt
    assert [s.name for s in loaded.inputs] == ["input"]
    assert loaded.inputs[0].shape[1:] == (1, 8, 8)
    got = outputs_of(loaded.module, X)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    if fmt == "onnx":  # the original graph is kept for ONNX Runtime too
        np.testing.assert_allclose(run_onnx(loaded.onnx_model, [X.numpy()])[0], expected, atol=1e-5)


def test_pt2_batch_is_dynamic(cnn, tmp_path):
    loaded = load_model(save_exported(cnn, tmp_path / "m.pt2"))
    assert outputs_of(loaded.module, X[:5]).shape == (5, 10)


def test_state_dict_without_arch_names_the_fix(cnn, tmp_path):
    path = save_state_dict(cnn, tmp_path / "weights.pth")
    with pytest.raises(ModelLoadError) as err:
        load_model(path)
    assert "weights.pth" in str(err.value) and "--arch" in str(err.value)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_runs_nothing_unless_trusted(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    torch.save({"model": _Evil(marker)}, path)
    with pytest.raises(UntrustedFileError) as err:
        load_model(path)
    assert "model.pt" in str(err.value) and "--trust" in str(err.value)
    assert not marker.exists()
    # the gate is the only thing standing in the way: trusted, the payload does run
    with pytest.raises(ModelLoadError):
        load_model(path, trust=True)
    assert marker.exists()


def test_trusted_pickled_module_loads(cnn, tmp_path):
    path = save_pickle(cnn, tmp_path / "whole.pt")
    with pytest.raises(UntrustedFileError):
        load_model(path)
    loaded = load_model(path, trust=True)
    assert loaded.format == "pickle"
    np.testing.assert_allclose(outputs_of(loaded.module, X), _expected(cnn), atol=1e-6)


def _corrupt_variants(data: bytes) -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    flipped = bytearray(data)
    for i in rng.integers(0, len(data), size=max(8, len(data) // 50)):
        flipped[i] ^= 0xFF
    return {"truncated": data[: len(data) // 3], "random": rng.bytes(2048), "flipped": bytes(flipped)}


@pytest.mark.parametrize("fmt", ["onnx", "pt", "pt2", "pth"])
def test_broken_files_fail_with_one_clear_error(cnn, tmp_path, fmt):
    saver = {"onnx": write_onnx, "pt": save_torchscript, "pt2": save_exported, "pth": save_state_dict}[fmt]
    good = saver(cnn, tmp_path / f"good.{fmt}").read_bytes()
    for kind, data in _corrupt_variants(good).items():
        path = tmp_path / f"{kind}.{fmt}"
        path.write_bytes(data)
        try:
            handle = load_model(path, arch="digits-cnn")
        except ModelLoadError as exc:
            assert str(path) in str(exc), exc
            assert len(str(exc).splitlines()) == 1
            continue
        # a bit flip may land in weights only: then the file is a valid model with other numbers
        assert kind == "flipped", f"{kind} {fmt} loaded without error"
        assert handle.module is not None or handle.onnx_model is not None


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty"):
        load_model(empty)
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "nope.onnx")
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n")
    with pytest.raises(ModelLoadError, match=r"notes\.onnx"):
        load_model(text)


def test_onnx_conversion_failure_names_the_operator_and_still_loads(tmp_path):
    path = tmp_path / "shrink.onnx"
    onnx_with_unsupported_op(path)
    handle = load_model(path)
    assert handle.module is None
    assert "Shrink" in handle.conversion_error
    assert any("Shrink" in w for w in handle.warnings)
    out = run_onnx(handle.onnx_model, [np.ones((2, 4), np.float32)])[0]
    assert out.shape == (2, 4)
    with pytest.raises(ModelLoadError, match="Shrink"):
        handle.torch_module()


def test_onnx_external_data_outside_folder_is_refused(cnn, tmp_path):
    import onnx

    model = cnn.to_onnx()
    init = model.graph.initializer[0]
    init.ClearField("raw_data")
    init.data_location = onnx.TensorProto.EXTERNAL
    entry = init.external_data.add()
    entry.key, entry.value = "location", "../../etc/passwd"
    path = tmp_path / "evil.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        load_model(path)


def test_multi_input_model_everywhere(tmp_path):
    from helpers import FAST, token_data
    from tugboat.engine.io.data import load_data
    from tugboat.engine.measuring.measure import measure

    module = TokenClassifier().eval()
    ids, mask, labels = token_data()
    handle = load_model(save_torchscript(_handle_for(module), tmp_path / "tok.pt"))
    assert handle.input_names == ["ids", "mask"]
    assert handle.inputs[0].dtype == "int64"
    onnx_path = write_onnx(handle, tmp_path / "tok.onnx")
    from_onnx = load_model(onnx_path)
    assert from_onnx.input_names == ["ids", "mask"]
    parity(from_onnx)
    np.savez(tmp_path / "tok.npz", ids=ids, mask=mask, labels=labels)
    data = load_data(tmp_path / "tok.npz", from_onnx)
    metrics, _ = measure(from_onnx, data, FAST)
    assert metrics["params"] == handle.param_count()[0] == sum(p.numel() for p in module.parameters())
    assert 0.0 <= metrics["accuracy"] <= 1.0


def _handle_for(module):
    from tugboat.engine.io.models import ModelHandle

    specs = [TensorSpec("ids", ("batch", 12), "int64"), TensorSpec("mask", ("batch", 12), "int64")]
    handle = ModelHandle(module, specs, [TensorSpec("logits", ("batch", 10))], "test", "torch")
    handle.info["vocab_size"] = {"ids": 17}
    return handle


def test_unknown_demo_and_format(tmp_path):
    with pytest.raises(ModelLoadError, match="demo:digits-cnn"):
        load_model("demo:nope")
    p = tmp_path / "model.h5"
    p.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="unknown model format"):
        load_model(p)


def test_pickle_module_is_not_imported_by_loading_npz_like_state(tmp_path):
    # weights_only=True is what blocks arbitrary globals; a plain pickle of a dict of tensors loads
    path = tmp_path / "sd.pth"
    with open(path, "wb") as f:
        pickle.dump({"a": 1}, f)
    with pytest.raises(ModelLoadError):
        load_model(path)


def test_an_exported_torch_module_keeps_each_inputs_own_batch_axis(tmp_path):
    """A recurrent state [layers, batch, hidden] has its batch on axis 1 (and a scalar setting has
    none): the ONNX Tugboat exports from the editable module keeps the batch there, so the variant
    runs at any batch, not only at the example batch it was traced at."""
    import onnxruntime as ort
    import torch
    from torch import nn

    from tugboat.engine.io.loading import load_model
    from tugboat.engine.io.models import export_onnx_model

    class Stateful(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, x, state):
            return self.fc(x) + state.sum(0), state * 0.5

    path = tmp_path / "stateful.onnx"
    torch.onnx.export(Stateful().eval(), (torch.zeros(3, 8), torch.zeros(2, 3, 4)), str(path), dynamo=False,
                      input_names=["x", "state"], output_names=["y", "new_state"],
                      dynamic_axes={"x": {0: "batch"}, "state": {1: "batch"}, "y": {0: "batch"},
                                    "new_state": {1: "batch"}})
    handle = load_model(str(path))
    assert [s.batch_axis for s in handle.inputs] == [0, 1] and handle.module is not None
    exported = export_onnx_model(handle)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in exported.graph.input}
    assert dims["state"][1] and isinstance(dims["state"][1], str) and dims["state"][0] == 2, dims
    sess = ort.InferenceSession(exported.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    x, state = rng.standard_normal((5, 8)).astype(np.float32), rng.standard_normal((2, 5, 4)).astype(np.float32)
    y, new_state = sess.run(None, {"x": x, "state": state})
    expected = handle.module(torch.from_numpy(x), torch.from_numpy(state))
    assert np.allclose(y, expected[0].detach().numpy(), atol=1e-5) and new_state.shape == (2, 5, 4)
