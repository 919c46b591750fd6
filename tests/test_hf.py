"""Hugging Face model folders (config.json + weights as save_pretrained writes them), through the
optional transformers extra: tiny BERTs built here, never downloaded."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
import torch

from helpers import FAST
from tugboat.engine.errors import ModelLoadError, UntrustedFileError
from tugboat.engine.io.loading import load_model
from tugboat.engine.measuring.runtime import run_onnx
from tugboat.engine.running.info import model_info
from tugboat.engine.running.recipe import parse_recipe, validate_steps
from tugboat.engine.running.runner import prepare, run_variant

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow  # the first transformers model import takes seconds


def _config(**extra):
    return transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=64, **extra)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    transformers.BertModel(_config()).save_pretrained(d / "base")
    transformers.BertForSequenceClassification(_config(num_labels=3)).save_pretrained(d / "cls")
    pickled = transformers.BertModel(_config())
    pickled.save_pretrained(d / "pickled")  # then weights as a pickle, as older versions wrote them
    (d / "pickled" / "model.safetensors").unlink()
    torch.save(pickled.state_dict(), d / "pickled" / "pytorch_model.bin")
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 100, (64, 10))
    mask = np.ones_like(ids)
    mask[::3, 7:] = 0  # padded rows
    np.savez(d / "tokens.npz", input_ids=ids, attention_mask=mask, token_type_ids=np.zeros_like(ids),
             labels=rng.integers(0, 3, 64))
    np.savez(d / "ids_mask.npz", input_ids=ids, attention_mask=mask)
    return d


def _prepare(model, data):
    recipe = parse_recipe({"model": str(model), "data": str(data)})
    recipe.measure = FAST
    return recipe, prepare(recipe)


def test_task_comes_from_the_config(folders):
    cls = model_info(str(folders / "cls"))
    base = model_info(str(folders / "base"), input_shape=(12,))
    assert cls["format"] == "huggingface" and cls["task"] == "classification" and cls["params"] > 20000
    assert base["task"] == "embedding" and base["outputs"][0]["shape"] == ["batch", 32]
    assert [s["name"] for s in cls["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]


def test_classifier_measures_accuracy_and_compresses(folders):
    recipe, base = _prepare(folders / "cls", folders / "tokens.npz")
    assert base.metrics["accuracy"] is not None and base.handle.outputs[0].shape == ("batch", 3)
    for step in ({"technique": "quantize", "method": "dynamic-int8"},
                 {"technique": "prune", "method": "structured", "ratio": 0.25, "finetune_epochs": 0}):
        v = run_variant(base, recipe.with_steps(validate_steps([step])))
        assert v.status == "ok", (step, v.error)
        assert v.metrics["accuracy"] is not None
    assert v.metrics["params"] < 0.8 * base.metrics["params"]  # heads' dimensions really removed


def test_embedding_model_is_measured_by_cosine_and_exports_dynamic_sequence(folders):
    recipe, base = _prepare(folders / "base", folders / "ids_mask.npz")  # no token_type_ids: optional
    assert base.handle.task == "embedding" and base.metrics["accuracy"] is None
    assert base.handle.input_names == ["input_ids", "attention_mask"]
    v = run_variant(base, recipe.with_steps(validate_steps([{"technique": "quantize", "method": "dynamic-int8"}])))
    assert v.status == "ok" and v.metrics["fidelity"]["cosine"] >= 0.99
    assert v.metrics["size_bytes"] < base.metrics["size_bytes"]
    pruned = run_variant(base, recipe.with_steps(validate_steps(
        [{"technique": "prune", "method": "structured", "ratio": 0.25, "finetune_epochs": 0}])))
    assert pruned.status == "ok", pruned.error
    assert pruned.metrics["params"] < base.metrics["params"]
    with torch.no_grad():  # the embedding keeps its width (the heads' dimensions shrank)
        ids = torch.randint(1, 100, (2, 9))
        assert pruned.handle.module(ids, torch.ones_like(ids)).shape == (2, 32)
    graph = base.handle.to_onnx()
    onnx.checker.check_model(graph)
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input]
    assert dims == [["batch", "sequence"], ["batch", "sequence"]]
    with torch.no_grad():
        for seq in (5, 13):  # any sequence length runs in ONNX Runtime and agrees with torch
            ids = torch.randint(1, 100, (3, seq))
            mask = torch.ones_like(ids)
            (out,) = run_onnx(graph, [ids.numpy(), mask.numpy()])
            np.testing.assert_allclose(out, base.handle.module(ids, mask).numpy(), atol=1e-4)


def test_pickled_weights_need_trust(folders):
    with pytest.raises(UntrustedFileError, match=r"pytorch_model\.bin, a pickle") as info:
        load_model(folders / "pickled")
    assert "pytorch_model.bin" in str(info.value) and "--trust" in str(info.value)
    handle = load_model(folders / "pickled", trust=True, input_shape=(8,))
    assert handle.task == "embedding" and handle.module is not None


def test_missing_extra_and_broken_folders_say_what_to_do(folders, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the extra were not installed
    with pytest.raises(ModelLoadError, match=r"needs the optional 'transformers' package.*tugboat-ml\[hf\]"):
        load_model(folders / "cls")
    monkeypatch.undo()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ModelLoadError, match="no weights"):
        load_model(empty)
    (empty / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config\.json is not readable JSON"):
        load_model(empty)


def test_a_torch_file_written_from_a_folder_reopens_and_quantizes(folders, tmp_path):
    """The .pt2 Tugboat writes from a Hugging Face model reopens at another batch (its sizes were
    baked into arange / zeros / new_ones by the ONNX exporter's tracer before) and compresses again."""
    from tugboat.engine.io.loading import save_exported

    _, base = _prepare(folders / "base", folders / "ids_mask.npz")
    path = save_exported(base.handle, tmp_path / "bert.pt2")
    again = parse_recipe({"model": str(path), "data": str(folders / "ids_mask.npz")})
    again.measure = FAST
    reopened = prepare(again)
    assert reopened.handle.format == "pt2"
    ids = torch.randint(1, 100, (5, 10))
    with torch.no_grad():
        expected = base.handle.module(ids, torch.ones_like(ids)).numpy()
    (out,) = run_onnx(reopened.handle.to_onnx(), [ids.numpy(), np.ones_like(ids.numpy())])
    np.testing.assert_allclose(out, expected, atol=1e-4)
    v = run_variant(reopened, again.with_steps(validate_steps([{"technique": "quantize", "method": "dynamic-int8"}])))
    assert v.status == "ok", v.error
    assert v.metrics["size_bytes"] < reopened.metrics["size_bytes"]
