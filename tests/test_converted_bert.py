"""A BERT encoder that arrives as a graph (issue 14): the ONNX export of a sentence embedder (int64
ids, attention mask, dynamic batch and sequence, as `minilm-onnx` in the real-model corpus) and the
`.pt2` / TorchScript files Tugboat writes from a Hugging Face folder become torch modules through
onnx2torch and prune structured, head dimensions alike in every head. Tiny BERTs built from a config
here, never downloaded; the real MiniLM: tests/test_real_formats.py."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from tugboat.engine.io.models import onnx_to_torch
from tugboat.engine.measuring.runtime import run_onnx


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_flatten_at_every_axis_converts_as_onnx_computes_it(axis):
    """onnx2torch flattened twice with start_dim=1, which fails on what axis 0 or the input's rank
    leaves one-dimensional (a BERT export flattens its [batch, sequence] mask with axis 2)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None])
    graph = helper.make_graph([helper.make_node("Flatten", ["x"], ["y"], axis=axis)], "flat", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    data = np.arange(15, dtype=np.float32).reshape(3, 5)
    (expected,) = run_onnx(model, [data])
    with torch.no_grad():
        out = onnx_to_torch(model)(torch.from_numpy(data)).numpy()
    assert out.shape == expected.shape
    np.testing.assert_array_equal(out, expected)


def _split_graph(tail_written: bool) -> onnx.ModelProto:
    """x [batch, 8] -> MatMul by a constant [8, 24] -> Reshape to [batch, 2, 12] -> ReduceSum over the
    last axis. The target is Concat(batch, 2, 12) with both sizes written down (a split into 2 heads),
    or Concat(batch, width / 12, 12) with the first read from the input (not a head count)."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 24)).astype(np.float32), "w")
    consts = [numpy_helper.from_array(np.array(v, dtype=np.int64), n) for n, v in
              [("zero", [0]), ("one", [1]), ("two", [2]), ("twelve", [12])]]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]),
             helper.make_node("Shape", ["y"], ["shape"]),
             helper.make_node("Gather", ["shape", "zero"], ["batch"]),
             helper.make_node("Gather", ["shape", "one"], ["width"]),
             helper.make_node("Div", ["width", "twelve"], ["parts"])]
    second = "two" if tail_written else "parts"
    nodes += [helper.make_node("Concat", ["batch", second, "twelve"], ["target"], axis=0),
              helper.make_node("Reshape", ["y", "target"], ["split"]),
              helper.make_node("ReduceSum", ["split", "minus_one"], ["out"], keepdims=0)]
    consts.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), "minus_one"))
    graph = helper.make_graph(nodes, "split", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", 2])], [w, *consts])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("tail_written", [True, False])
def test_only_a_split_into_a_written_number_of_heads_is_pruned_per_head(tail_written):
    from tugboat.engine.io.converted_graphs import KEEP_OUT_CHANNELS, NUM_HEADS, normalise_for_pruning

    model = _split_graph(tail_written)
    onnx.checker.check_model(model)
    module = onnx_to_torch(model)
    x = torch.randn(3, 8)
    with torch.no_grad():
        before = module(x)
    counts = normalise_for_pruning(module, (x,))
    (linear,) = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        torch.testing.assert_close(module(x), before)  # the same function
    if tail_written:
        assert counts["head_reshapes"] == 1 and getattr(linear, NUM_HEADS) == 2
    else:  # the 2 is read from the input: the reshape stays, and the layer keeps its outputs
        assert counts["head_reshapes"] == 0 and getattr(linear, KEEP_OUT_CHANNELS, False)
        assert not hasattr(linear, NUM_HEADS)


# --- tiny BERTs ----------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def _embedder(bert):
    class SentenceEmbedder(torch.nn.Module):  # BertModel + masked mean pooling + L2 norm (minilm-onnx)
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)

    return SentenceEmbedder().eval()


@pytest.fixture(scope="module")
def bert_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, attn_implementation="eager",
                                     initializer_range=0.2)  # weights that matter: pruning changes the outputs
    bert = transformers.BertModel(config).eval()
    bert.save_pretrained(d / "folder")
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 100, (40, 10))
    mask = np.ones_like(ids)
    mask[::3, 7:] = 0  # padded rows
    np.savez(d / "tokens.npz", input_ids=ids, attention_mask=mask)
    example = (torch.from_numpy(ids[:2]), torch.from_numpy(mask[:2]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_embedder(bert), example, str(d / "embedder.onnx"), dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask"], output_names=["embedding"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                        "attention_mask": {0: "batch", 1: "sequence"}, "embedding": {0: "batch"}})
    return d


def _load(model, data):
    from tugboat.engine.io.data import load_data
    from tugboat.engine.io.loading import load_model

    handle = load_model(model)
    return handle, load_data(str(data), handle)


def _pruned(handle, data, **extra):
    from tugboat.engine.progress import null_progress
    from tugboat.engine.techniques import prune

    params = {"method": "structured", "ratio": 0.25, "finetune_epochs": 0, "round_to": 0, **extra}
    return prune.apply(handle, params, data, null_progress())


def _runs_in_onnx_runtime(pruned, batch: int, seq: int) -> None:
    """The pruned model's exported ONNX passes the checker and computes what the pruned module does."""
    from tugboat.engine.io.export import check_onnx
    from tugboat.engine.io.models import export_onnx_model

    model = export_onnx_model(pruned)
    check_onnx(model, "pruned")
    ids = torch.randint(1, 100, (batch, seq))
    mask = torch.ones_like(ids)
    mask[0, seq - 2:] = 0
    (out,) = run_onnx(model, [ids.numpy(), mask.numpy()])
    with torch.no_grad():
        np.testing.assert_allclose(out, pruned.module(ids, mask).numpy(), atol=1e-4)


@pytest.mark.slow  # the first transformers model takes seconds to import
def test_a_bert_onnx_export_becomes_torch_and_prunes_its_heads_alike(bert_files):
    """The exported encoder converts (a Clip whose bound is a Constant node, a Flatten at the mask's
    rank), and pruning removes the same share of every head's dimensions, keeping the heads: the
    same channels as pruning the Hugging Face model itself (same outputs)."""
    handle, data = _load(bert_files / "embedder.onnx", bert_files / "tokens.npz")
    assert handle.module is not None, handle.conversion_error
    pruned = _pruned(handle, data, bias_compensation=False)
    info = pruned.info["pruning"]
    assert info["params_after"] < 0.85 * info["params_before"], info
    heads = info["attention_heads"]
    assert len(heads) == 6 and set(heads.values()) == {2}  # q, k, v of both layers, 2 heads each
    kept = {name: c["after"] for name, c in info["kept_channels"].items()}
    assert sorted(kept[n] for n in heads) == [24] * 6  # 16 -> 12 dimensions in each head
    assert sorted(v for n, v in kept.items() if "intermediate" in n) == [48, 48]

    folder, folder_data = _load(bert_files / "folder", bert_files / "tokens.npz")
    reference = _pruned(folder, folder_data, bias_compensation=False)
    ids = torch.randint(1, 100, (3, 10))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        hidden = reference.module(ids, mask)
        if isinstance(hidden, (tuple, list)):
            hidden = hidden[0]
        pooled = torch.nn.functional.normalize(hidden.mean(1) if hidden.dim() == 3 else hidden, dim=-1)
        mine = pruned.module(ids, mask).numpy()
        np.testing.assert_allclose(mine, pooled.numpy(), atol=1e-5)
        assert np.abs(mine - handle.module(ids, mask).numpy()).max() > 1e-3  # pruning changed it: not vacuous
    for seq in (10, 7):  # the file's dynamic sequence stays dynamic in the pruned model's ONNX
        _runs_in_onnx_runtime(pruned, batch=5, seq=seq)


@pytest.mark.slow
@pytest.mark.parametrize("save", ["save_exported", "save_torchscript"])
def test_bert_torch_files_written_by_tugboat_reopen_and_prune(bert_files, tmp_path, save):
    """The `.pt2` and TorchScript that *Export torch file* writes from a Hugging Face folder went
    through ONNX and onnx2torch when reopened, and failed to run ("Dimension out of range")."""
    from tugboat.engine.io import loading

    folder, _ = _load(bert_files / "folder", bert_files / "tokens.npz")
    path = getattr(loading, save)(folder, tmp_path / ("bert.pt2" if save == "save_exported" else "bert.pt"))
    handle, data = _load(path, bert_files / "tokens.npz")
    assert handle.module is not None, handle.conversion_error
    pruned = _pruned(handle, data)
    assert pruned.info["pruning"]["params_after"] < 0.85 * pruned.info["pruning"]["params_before"]
    assert len(pruned.info["pruning"]["attention_heads"]) == 6
    _runs_in_onnx_runtime(pruned, batch=5, seq=10)


@pytest.mark.slow
def test_a_bert_onnx_export_trains_quantization_aware(bert_files):
    """qat-int8 found no Conv or Linear layers in the converted encoder (its weights are MatMuls by
    constants): they become Linear layers for it, as for pruning."""
    from tugboat.engine.progress import null_progress
    from tugboat.engine.techniques import quantize

    handle, data = _load(bert_files / "embedder.onnx", bert_files / "tokens.npz")
    q = quantize.apply(handle, {"method": "qat-int8", "epochs": 1}, data, null_progress())
    model = q.to_onnx()
    assert model.ByteSize() < 0.5 * handle.to_onnx().ByteSize()
    ids = torch.randint(1, 100, (4, 10))
    (out,) = run_onnx(model, [ids.numpy(), np.ones_like(ids.numpy())])
    with torch.no_grad():
        ref = handle.module(ids, torch.ones_like(ids)).numpy()
    cosine = (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
    assert cosine.min() > 0.9, cosine


@pytest.mark.slow
def test_fine_tuning_that_lowers_fidelity_is_undone_and_says_so(bert_files):
    """The default fine-tuning lr suits CNNs; on a pretrained transformer it can leave the pruned model
    further from the original than no fine-tuning (MiniLM: cosine 0.70 -> 0.40). Such a fine-tuning
    is measured on the val split and undone, with a warning naming the lr."""
    handle, data = _load(bert_files / "embedder.onnx", bert_files / "tokens.npz")
    plain = _pruned(handle, data)
    tuned = _pruned(handle, data, finetune_epochs=1, lr=0.5, max_grad_norm=0)  # a rate that wrecks it
    assert any("fine-tuning lowered the fidelity" in w and "lr 0.5" in w for w in tuned.warnings), tuned.warnings
    ids = torch.randint(1, 100, (4, 10))
    with torch.no_grad():
        np.testing.assert_allclose(tuned.module(ids, torch.ones_like(ids)).numpy(),
                                   plain.module(ids, torch.ones_like(ids)).numpy(), atol=1e-6)
