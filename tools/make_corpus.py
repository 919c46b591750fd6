"""Write the broken-input corpus: bad models, data and recipes, each with the error it must give.

    python tools/make_corpus.py [--out tests/corpus]

Every file is made by this script (no hand-written bytes): a tiny valid model in each format is
built, then truncated, bit-flipped, emptied or mislabelled; data and recipe files get one mistake
each. ``manifest.json`` lists every case:

- ``file``: path relative to the corpus folder (``absent`` cases name a file that must not exist)
- ``kind``: ``model`` (load_model / ``tugboat info``), ``baseline`` (loads, then the baseline
  measurement must refuse it), ``data`` (load_data against ``model``), ``first_run`` (data that
  loads but the original model's first run on it must refuse it), ``recipe`` (load_recipe),
  ``run`` (a valid recipe whose run must fail), ``workspace`` (a workspace.json read back by
  ``Workspace.open`` / ``tugboat report``), ``report`` (a report.json read back by
  ``tugboat report``)
- ``error``: the TugboatError subclass expected
- ``expect``: words the message must contain (besides the file name)
- ``options``: extra keyword arguments (``arch``, ``model`` for data cases)

The output is deterministic: running it again rewrites the same bytes, so the committed corpus
can be checked against the script (tests/test_corpus.py does).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = "manifest.json"
M, D, R = "ModelLoadError", "DataError", "RecipeError"  # the errors expected
INVALID_ONNX, BAD_PT, BAD_PT2 = "not a valid ONNX file", "not a readable PyTorch file", \
    "not a valid torch.export program"


# --- tiny valid models -------------------------------------------------------------------------

def tiny_onnx(*, weights=None, dims=("batch", 1, 8, 8), opset=17, op="Gemm", domain=""):
    """input [batch,1,8,8] -> Flatten -> Gemm(64 -> 10) -> logits, built node by node."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((10, 64)).astype(np.float32) * 0.1 if weights is None else weights
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, list(dims))
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])
    inits = [helper.make_tensor("w", TensorProto.FLOAT, [10, 64], w.ravel().tolist()),
             helper.make_tensor("b", TensorProto.FLOAT, [10], [0.0] * 10)]
    nodes = [helper.make_node("Flatten", ["input"], ["flat"], name="flatten", axis=1),
             helper.make_node(op, ["flat", "w", "b"], ["logits"], name="fc", domain=domain, transB=1)]
    graph = helper.make_graph(nodes, "tiny", [x], [y], inits)
    opsets = [helper.make_opsetid("", opset)]
    if domain:
        opsets.append(helper.make_opsetid(domain, 1))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="tugboat-corpus")
    model.ir_version = 8
    return model


def tiny_module():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()


def token_onnx(vocab: int = 17) -> bytes:
    """ids int64 [batch, 5] -> Gather from a [vocab, 8] embedding -> mean -> Gemm -> 10 logits."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((vocab, 8)).astype(np.float32)
    w = rng.standard_normal((10, 8)).astype(np.float32)
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 5])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])
    inits = [helper.make_tensor("emb", TensorProto.FLOAT, list(emb.shape), emb.ravel().tolist()),
             helper.make_tensor("w", TensorProto.FLOAT, [10, 8], w.ravel().tolist())]
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["e"], name="embed"),
             helper.make_node("ReduceMean", ["e"], ["m"], axes=[1], keepdims=0),
             helper.make_node("Gemm", ["m", "w"], ["logits"], transB=1)]
    model = helper.make_model(helper.make_graph(nodes, "tokens", [ids], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)], producer_name="tugboat-corpus")
    model.ir_version = 8
    return model.SerializeToString()


def torchscript_bytes() -> bytes:
    import torch

    m = tiny_module()
    traced = torch.jit.trace(m, (torch.zeros(2, 1, 8, 8),), check_trace=False)
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    return buf.getvalue()


def pt2_bytes() -> bytes:
    import torch

    program = torch.export.export(tiny_module(), (torch.zeros(2, 1, 8, 8),))
    buf = io.BytesIO()
    torch.export.save(program, buf)
    return buf.getvalue()


def torchscript_with_meta(meta_text: str) -> bytes:
    import torch

    traced = torch.jit.trace(tiny_module(), (torch.zeros(2, 1, 8, 8),), check_trace=False)
    buf = io.BytesIO()
    torch.jit.save(traced, buf, _extra_files={"tugboat.json": meta_text})
    return buf.getvalue()


def pt2_with_meta(meta_text: str) -> bytes:
    import torch

    program = torch.export.export(tiny_module(), (torch.zeros(2, 1, 8, 8),))
    buf = io.BytesIO()
    torch.export.save(program, buf, extra_files={"tugboat.json": meta_text})
    return buf.getvalue()


def onnx_with_meta(meta_text: str) -> bytes:
    model = tiny_onnx()
    prop = model.metadata_props.add()
    prop.key, prop.value = "tugboat", meta_text
    return model.SerializeToString()


def mlp_state_dict(hidden: int = 8, depth: int = 1) -> dict:
    """A small digits-mlp state_dict (built with arch_kwargs hidden/depth)."""
    import torch

    from tugboat.engine.io import zoo

    torch.manual_seed(0)
    return zoo.build("digits-mlp", hidden=hidden, depth=depth).state_dict()


def custom_domain_models() -> dict[str, bytes]:
    """Custom-domain operators a domain check must not let through: beside an unused local
    function of the same domain, inside an If branch, and inside a local function that is called."""
    from onnx import TensorProto, helper

    def model_with(nodes, functions=(), domains=("evil.ops",)):
        x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])
        y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4])
        graph = helper.make_graph(nodes, "evil", [x], [y])
        opsets = [helper.make_opsetid("", 17)] + [helper.make_opsetid(d, 1) for d in domains]
        model = helper.make_model(graph, opset_imports=opsets, functions=list(functions),
                                  producer_name="tugboat-corpus")
        model.ir_version = 8
        return model.SerializeToString()

    harmless = helper.make_function("evil.ops", "Harmless", ["x"], ["y"],
                                    [helper.make_node("Relu", ["x"], ["y"])], [helper.make_opsetid("", 17)])
    calls_evil = helper.make_function("evil.ops", "Wrapper", ["x"], ["y"],
                                      [helper.make_node("Detonate", ["x"], ["y"], domain="evil.ops")],
                                      [helper.make_opsetid("", 17), helper.make_opsetid("evil.ops", 1)])
    branch = helper.make_graph([helper.make_node("Detonate", ["input"], ["b_out"], domain="evil.ops")], "then",
                               [], [helper.make_tensor_value_info("b_out", TensorProto.FLOAT, ["batch", 4])])
    other = helper.make_graph([helper.make_node("Relu", ["input"], ["e_out"])], "else",
                              [], [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, ["batch", 4])])
    cond = helper.make_tensor("cond", TensorProto.BOOL, [], [True])
    return {
        "unused_function": model_with(
            [helper.make_node("Detonate", ["input"], ["output"], name="boom", domain="evil.ops")], [harmless]),
        "in_if_branch": model_with(
            [helper.make_node("Constant", [], ["c"], value=cond),
             helper.make_node("If", ["c"], ["output"], name="branch", then_branch=branch, else_branch=other)]),
        "in_called_function": model_with(
            [helper.make_node("Wrapper", ["input"], ["output"], name="wrap", domain="evil.ops")], [calls_evil]),
    }


def state_dict_bytes(obj=None) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(tiny_module().state_dict() if obj is None else obj, buf)
    return buf.getvalue()


# --- corruption ------------------------------------------------------------------------------

def truncated(data: bytes, fraction: float = 0.5) -> bytes:
    return data[: max(1, int(len(data) * fraction))]


def bit_flipped(data: bytes, seed: int, zone: tuple[float, float] = (0.0, 1.0), count: int = 12) -> bytes:
    """Flip one random bit in ``count`` bytes, within the ``zone`` fraction of the file."""
    rng = np.random.default_rng(seed)
    lo, hi = int(len(data) * zone[0]), max(int(len(data) * zone[0]) + 1, int(len(data) * zone[1]))
    out = bytearray(data)
    for i in rng.integers(lo, hi, size=count):
        out[int(i)] ^= 1 << int(rng.integers(0, 8))
    return bytes(out)


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            zf.writestr(info, data)
    return buf.getvalue()


# --- the corpus ------------------------------------------------------------------------------

class Corpus:
    def __init__(self, out: Path):
        self.out = out
        self.cases: list[dict] = []

    def write(self, rel: str, data: bytes | str) -> Path:
        path = self.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, str):
            path.write_text(data, encoding="utf-8")
        else:
            path.write_bytes(data)
        return path

    def case(self, rel: str, kind: str, error: str, expect: list[str], why: str, data=None, *,
             names: str | None = None, **options):
        if data is not None:
            self.write(rel, data)
        entry = {"file": rel, "kind": kind, "error": error, "expect": expect, "why": why,
                 "names": names or Path(rel).name}
        if options:
            entry["options"] = options
        self.cases.append(entry)


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _npy_claiming(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    """An .npy header declaring ``shape`` followed by only 8 bytes of data."""
    header = np.lib.format.header_data_from_array_1_0(np.zeros(1, np.float32))
    header.update(shape=shape, descr=descr)
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + bytes(8)


def _png(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb)."""
    import struct
    import zlib

    data = bytearray(_png(0))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    return bytes(data)


def build(out: Path) -> list[dict]:
    import onnx

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    c = Corpus(out)
    text = "This is a README, not a model.\nIt was renamed by mistake.\n"
    rng = np.random.default_rng(1234)

    # reference model for the data cases (valid; not a case itself)
    good_onnx = tiny_onnx().SerializeToString()
    c.write("good/tiny.onnx", good_onnx)
    ts, pt2, sd = torchscript_bytes(), pt2_bytes(), state_dict_bytes()

    # --- models: empty, text, random, truncated, bit-flipped in every format ---
    for ext in ("onnx", "pt", "pth", "pt2"):
        c.case(f"models/empty.{ext}", "model", M, ["empty"], "zero bytes", b"")
    c.case("models/readme_renamed.onnx", "model", M, [INVALID_ONNX, "it is a text file"],
           "a text file renamed .onnx", text)
    c.case("models/readme_renamed.pt", "model", M, [BAD_PT, "it is a text file"], "a text file renamed .pt", text)
    c.case("models/readme_renamed.pt2", "model", M, [BAD_PT2, "it is a text file"], "a text file renamed .pt2", text)
    c.case("models/random_bytes.onnx", "model", M, [INVALID_ONNX], "4 KB of random bytes",
           rng.bytes(4096))
    c.case("models/random_bytes.pt", "model", M, [BAD_PT], "4 KB of random bytes", rng.bytes(4096))
    c.case("models/truncated.onnx", "model", M, [INVALID_ONNX], "valid ONNX cut in half",
           truncated(good_onnx))
    c.case("models/bitflip_header.onnx", "model", M, [INVALID_ONNX],
           "bits flipped in the graph structure (first 5%)", bit_flipped(good_onnx, 1, (0.0, 0.05), 6))
    c.case("models/truncated_torchscript.pt", "model", M, [BAD_PT], "TorchScript archive cut in half",
           truncated(ts))
    c.case("models/bitflip_torchscript.pt", "model", M, [BAD_PT],
           "bits flipped in the TorchScript archive's directory (last 10%)", bit_flipped(ts, 2, (0.9, 1.0)))
    c.case("models/truncated.pt2", "model", M, [BAD_PT2], "torch.export archive cut in half", truncated(pt2))
    c.case("models/bitflip.pt2", "model", M, [BAD_PT2],
           "bits flipped in the torch.export archive's directory (last 10%)", bit_flipped(pt2, 3, (0.9, 1.0)))
    c.case("models/truncated_state_dict.pt", "model", M, [BAD_PT], "state_dict archive cut in half",
           truncated(sd), arch="digits-mlp")
    c.case("models/bitflip_state_dict.pth", "model", M, [BAD_PT],
           "bits flipped in the state_dict archive's directory (last 10%)", bit_flipped(sd, 4, (0.9, 1.0)),
           arch="digits-mlp")
    # --- models: well-formed files that are still wrong ---
    c.case("models/state_dict_wrong_arch.pt", "model", M, ["do not fit architecture 'digits-mlp'"],
           "weights of another network loaded as digits-mlp", sd, arch="digits-mlp")
    c.case("models/state_dict_no_arch.pth", "model", M, ["state_dict", "--arch"],
           "bare weights with no architecture named", sd)
    c.case("models/tensor_not_model.pt", "model", M, ["holds a Tensor", "not a model"],
           "a single tensor saved with torch.save", state_dict_bytes(__import__("torch").zeros(3)))
    c.case("models/zip_not_torch.pt", "model", M, [BAD_PT], "a zip archive of text files",
           _zip_bytes({"notes/readme.txt": text.encode()}))
    c.case("models/unknown_op.onnx", "model", M, ["invalid", "FrobnicateX"],
           "a node with an operator no ONNX opset has", tiny_onnx(op="FrobnicateX").SerializeToString())
    c.case("models/custom_domain_op.onnx", "model", M, ["com.acme", "Gemm"],
           "an operator from a custom domain no runtime implements",
           tiny_onnx(domain="com.acme").SerializeToString())
    c.case("models/opset_too_new.onnx", "model", M, ["opset 99", "newer"],
           "claims a future default-domain opset", tiny_onnx(opset=99).SerializeToString())
    c.case("models/opset_too_old.onnx", "model", M, ["opset 1,", "older"],
           "opset 1, older than Tugboat supports", tiny_onnx(opset=1).SerializeToString())
    no_nodes = tiny_onnx()
    del no_nodes.graph.node[:]
    c.case("models/no_nodes.onnx", "model", M, ["no nodes"], "a graph with no operators",
           no_nodes.SerializeToString())
    missing_ext = tiny_onnx()
    init = missing_ext.graph.initializer[0]
    init.ClearField("float_data")
    init.data_location = onnx.TensorProto.EXTERNAL
    e = init.external_data.add()
    e.key, e.value = "location", "tiny.onnx.data"
    c.case("models/missing_external_data.onnx", "model", M, ["external weight data"],
           "weights stored in a side file that is missing", missing_ext.SerializeToString())
    short_w = tiny_onnx()
    w0 = short_w.graph.initializer[0]
    w0.float_data.extend([1.0, 2.0, 3.0])  # 643 values for a 10 x 64 weight
    c.case("models/weights_wrong_length.onnx", "model", M, ["weight 'w' is corrupt"],
           "a weight with more values than its shape holds (the ONNX checker does not notice)",
           short_w.SerializeToString())
    c.case("models/weights.h5", "model", M, ["unknown model format '.h5'"], "a Keras file extension",
           rng.bytes(256))
    c.write("models/folder.onnx/README.txt", "A folder, so that git keeps it.\n")
    c.case("models/folder.onnx", "model", M, ["is a folder"], "a folder whose name ends in .onnx")
    c.case("models/does_not_exist.onnx", "model", M, ["not found"], "a path that does not exist")
    # --- models whose Tugboat metadata (untrusted, like every byte of the file) is malformed ---
    meta_cases = [
        ("meta_list.onnx", onnx_with_meta("[1, 2]"), ["metadata must be a JSON object", "a list"]),
        ("meta_string.onnx", onnx_with_meta('"tiny"'), ["metadata must be a JSON object", "a string"]),
        ("meta_bad_json.onnx", onnx_with_meta("{inputs: ["), ["metadata_props['tugboat']", "not valid JSON"]),
        ("meta_bad_task.onnx", onnx_with_meta('{"task": {"a": 1}}'), ["field 'task'"]),
        ("meta_list_torchscript.pt", torchscript_with_meta("[]"), ["metadata must be a JSON object"]),
        ("meta_unnamed_input_torchscript.pt",
         torchscript_with_meta('{"inputs": [{"shape": ["batch", 1, 8, 8]}]}'), ["'inputs[0]'", "no name"]),
        ("meta_float_shape_torchscript.pt",
         torchscript_with_meta('{"inputs": [{"name": "x", "shape": ["batch", 1.5, [8], 8]}]}'),
         ["'inputs[0]'", "shape dimension 1.5"]),
        ("meta_inputs_string.pt2", pt2_with_meta('{"inputs": "x"}'), ["field 'inputs'", "a string"]),
        ("meta_outputs_bad_dtype.pt2",
         pt2_with_meta('{"outputs": [{"name": "y", "shape": [2], "dtype": "notatype"}]}'),
         ["'outputs[0]'", "dtype \"notatype\""]),
    ]
    for name, data, expect in meta_cases:
        c.case(f"models/{name}", "model", M, expect, "malformed Tugboat metadata", data)
    import torch

    mlp = mlp_state_dict()
    sd_meta = {
        "meta_arch_list_state_dict.pt": ({"arch": ["digits-mlp"]}, ["field 'arch'", "must be a name"]),
        "meta_arch_kwargs_unknown_state_dict.pt": ({"arch": "digits-mlp", "arch_kwargs": {"bogus": 1}},
                                                   ["'arch_kwargs' does not build 'digits-mlp'", "bogus"]),
        "meta_arch_kwargs_not_numbers_state_dict.pt": ({"arch": "digits-mlp", "arch_kwargs": [1, 2]},
                                                       ["'arch_kwargs' must map parameter names"]),
        "meta_arch_kwargs_huge_state_dict.pt": ({"arch": "digits-mlp",
                                                 "arch_kwargs": {"hidden": 10**12, "depth": 1}},
                                                ["do not fit architecture 'digits-mlp'", "in the file"]),
        "meta_bad_dtype_state_dict.pt": ({"arch": "digits-mlp", "arch_kwargs": {"hidden": 8, "depth": 1},
                                          "inputs": [{"name": "input", "shape": ["batch", 64],
                                                      "dtype": "notatype"}]},
                                         ["'inputs[0]'", "\"notatype\"", "not a tensor type"]),
        "meta_tugboat_list_state_dict.pt": (["digits-mlp"], ["metadata must be a JSON object"]),
    }
    for name, (meta, expect) in sd_meta.items():
        c.case(f"models/{name}", "model", M, expect, "malformed Tugboat metadata beside a state_dict",
               state_dict_bytes({"state_dict": mlp, "tugboat": meta}))
    c.write("good/mlp_h8_state_dict.pt", state_dict_bytes(
        {"state_dict": mlp, "tugboat": {"arch": "digits-mlp", "arch_kwargs": {"hidden": 8, "depth": 1}}}))
    del torch
    for name, data in custom_domain_models().items():
        c.case(f"models/custom_domain_{name}.onnx", "model", M, ["custom domain 'evil.ops'", "Detonate"],
               f"a custom-domain operator ({name.replace('_', ' ')})", data)

    # --- models that load but must not be measured ---
    c.case("models/dynamic_features.onnx", "baseline", M, ["unknown size in dimension 1", "--input-shape"],
           "every input dimension symbolic and no data to tell the shape",
           tiny_onnx(dims=("batch", "features")).SerializeToString())
    nan_w = np.full((10, 64), np.nan, dtype=np.float32)
    c.case("models/nan_outputs.onnx", "baseline", "NumericalError", ["NaN"],
           "weights are NaN, so every output is NaN", tiny_onnx(weights=nan_w).SerializeToString())
    inf_w = np.full((10, 64), np.float32(3e38))
    c.case("models/overflow_outputs.onnx", "baseline", "NumericalError", ["Inf"],
           "huge weights overflow float32 to Inf", tiny_onnx(weights=inf_w).SerializeToString())

    # --- data (checked against good/tiny.onnx: input [batch,1,8,8] float32, 10 classes) ---
    model = "good/tiny.onnx"
    x = rng.random((20, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, 20)
    c.case("data/no_arrays.npz", "data", D, ["holds no arrays"], "an .npz with nothing in it", _npz(), model=model)
    c.case("data/zero_samples.npz", "data", D, ["no samples"], "arrays with zero rows",
           _npz(input=x[:0], labels=y[:0]), model=model)
    c.case("data/one_sample.npz", "data", D, ["1 sample", "at least 2"], "a single sample",
           _npz(input=x[:1], labels=y[:1]), model=model)
    c.case("data/wrong_shape.npz", "data", D, ["shape (1, 4, 4)", "expects (1, 8, 8)"],
           "4x4 images for an 8x8 model", _npz(input=x[:, :, :4, :4], labels=y), model=model)
    c.case("data/wrong_rank.npz", "data", D, ["shape (64,)", "expects (1, 8, 8)"],
           "flattened samples for an image model", _npz(input=x.reshape(20, 64), labels=y), model=model)
    c.case("data/int_inputs.npz", "data", D, ["dtype int64", "expects float32"],
           "integer pixels for a float model", _npz(input=(x * 255).astype(np.int64), labels=y), model=model)
    c.case("data/string_inputs.npz", "data", D, ["dtype <U", "numbers are needed"], "strings as inputs",
           _npz(input=np.array(["a"] * 20).reshape(20, 1), labels=y), model=model)
    c.case("data/label_count.npz", "data", D, ["17 labels for 20 samples"], "fewer labels than samples",
           _npz(input=x, labels=y[:17]), model=model)
    c.case("data/float_labels.npz", "data", D, ["label 2.5 of sample 0", "not a whole class index"],
           "labels stored as floats with fractions", _npz(input=x, labels=np.where(
               np.arange(20) == 0, 2.5, y).astype(np.float32)), model=model)
    c.case("data/uint64_labels.npz", "data", D, ["label 18446744073709551615", "not a plausible class index"],
           "uint64 labels with a value that wraps to -1 as int64", _npz(input=x, labels=np.where(
               np.arange(20) == 4, np.uint64(2**64 - 1), y.astype(np.uint64)).astype(np.uint64)), model=model)
    c.case("data/huge_header.npz", "data", D, ["decompression bomb", "declare"],
           "an .npy header claiming 10^12 floats in a 1 KB file (refused before allocating)",
           _zip_bytes({"input.npy": _npy_claiming((10**12,)), "labels.npy": _npy_claiming((20,), "<i8")}),
           model=model)
    c.case("data/text_member_only.npz", "data", D, ["holds no arrays"],
           "a zip whose only member is a text file (np.load hands it over as bytes)",
           _zip_bytes({"notes.txt": text.encode()}), model=model)
    c.case("data/object_header.npz", "data", D, ["pickled object arrays"],
           "an .npy header declaring an object dtype (refused from the header)",
           _zip_bytes({"input.npy": _npy_claiming((20,), "|O")}), model=model)
    c.case("data/label_out_of_range.npz", "data", D, ["label 57", "10 classes"],
           "a class index the model does not have", _npz(input=x, labels=np.where(y == y[0], 57, y)), model=model)
    c.case("data/negative_labels.npz", "data", D, ["negative"], "label -1",
           _npz(input=x, labels=np.where(y == y[0], -1, y)), model=model)
    c.case("data/nan_inputs.npz", "data", D, ["NaN"], "a NaN pixel",
           _npz(input=np.where(x > 0.99, np.nan, x).astype(np.float32), labels=y), model=model)
    c.case("data/sample_counts_differ.npz", "data", D, ["different sample counts"],
           "two inputs of different lengths", _npz(a=x, b=x[:12]), model=None)
    c.case("data/wrong_array_name.npz", "data", D, ["no array named 'input'", "arrays found: pixels, extra"],
           "arrays named differently from the model's input", _npz(pixels=x, extra=x, labels=y), model=model)
    buf = io.BytesIO()
    np.savez(buf, input=np.array([{"a": 1}] * 20, dtype=object))
    c.case("data/object_array.npz", "data", D, ["pickled object arrays", "never loaded"],
           "an object array (pickle inside the .npz)", buf.getvalue(), model=model)
    good_npz = _npz(input=x, labels=y)
    c.case("data/truncated.npz", "data", D, ["not a readable .npz"], "an .npz cut in half",
           truncated(good_npz), model=model)
    c.case("data/bitflip.npz", "data", D, ["not a readable .npz"],
           "bits flipped in the zip directory (last 5%)", bit_flipped(good_npz, 5, (0.95, 1.0)), model=model)
    c.case("data/readme_renamed.npz", "data", D, ["not a readable .npz"], "text renamed .npz", text,
           model=model)
    c.case("data/empty.csv", "data", D, ["no data rows"], "zero bytes", b"", model=model)
    c.case("data/header_only.csv", "data", D, ["no data rows"], "a header and nothing else",
           ",".join(f"p{i}" for i in range(64)) + ",label\n", model=model)
    header = ",".join(f"p{i}" for i in range(64)) + ",label\n"
    row = ",".join("0.5" for _ in range(64))
    c.case("data/non_numeric.csv", "data", D, ["non-numeric value", "'cat'"], "a word in a number column",
           header + "".join(f"{row},{i % 10}\n" for i in range(5)) + f"{row},cat\n", model=model)
    c.case("data/ragged.csv", "data", D, ["columns"], "a row with a missing value",
           header + f"{row},1\n" + ",".join("0.5" for _ in range(63)) + ",2\n", model=model)
    c.case("data/fractional_label.csv", "data", D, ["label 1.5", "not a whole class index"],
           "a label column with a fraction (was silently truncated)",
           header + "".join(f"{row},{i % 10}\n" for i in range(5)) + f"{row},1.5\n", model=model)
    c.case("data/nan_label.csv", "data", D, ["label nan", "not a whole class index"], "a NaN label",
           header + "".join(f"{row},{i % 10}\n" for i in range(5)) + f"{row},nan\n", model=model)
    c.case("data/utf16.csv", "data", D, ["not a readable CSV"], "a CSV saved as UTF-16 (a spreadsheet export)",
           (header + f"{row},1\n{row},2\n").encode("utf-16"), model=model)
    c.case("data/nul_bytes.csv", "data", D, ["non-numeric value"], "NUL bytes inside a CSV",
           (header + f"{row},1\n" + row.replace("0.5", "0\x005", 1) + ",2\n").encode(), model=model)
    c.write("data/folder.npz/README.txt", "A folder, so that git keeps it.\n")
    c.case("data/folder.npz", "data", D, ["is a folder, not a .npz file"], "a folder whose name ends in .npz",
           model=model)
    c.case("data/one_row.csv", "data", D, ["1 sample"], "one data row", header + f"{row},3\n", model=model)
    c.case("data/wrong_width.csv", "data", D, ["shape (5,)", "expects (1, 8, 8)"],
           "5 features for a 64-pixel model",
           "a,b,c,d,e,label\n" + "".join(f"1,2,3,4,5,{i % 10}\n" for i in range(10)), model=model)
    c.case("data/latin1.csv", "data", D, ["not a readable CSV"], "bytes that are not UTF-8",
           b"caf\xe9,label\n1,0\n2,1\n", model=model)
    c.case("data/table.parquet", "data", D, ["unknown data format '.parquet'"], "an unsupported format",
           rng.bytes(64), model=model)
    (out / "data" / "no_classes").mkdir()
    c.write("data/no_classes/readme.txt", text)
    c.case("data/no_classes", "data", D, ["no class sub-folders"], "an image folder without class folders",
           model=model)
    for cls in ("zero", "one"):
        (out / "data" / "no_images" / cls).mkdir(parents=True)
        c.write(f"data/no_images/{cls}/notes.txt", text)
    c.case("data/no_images", "data", D, ["holds no images"], "class folders with no images", model=model)
    for i, cls in enumerate(("zero", "one")):
        c.write(f"data/corrupt_image/{cls}/a.png", _png(i))
    c.write("data/corrupt_image/one/b.png", truncated(_png(7), 0.3))
    c.case("data/corrupt_image/one/b.png", "data_folder", D, ["image could not be read"],
           "one PNG cut short in an otherwise fine image folder", model=model, folder="data/corrupt_image")
    for i, cls in enumerate(("zero", "one")):
        c.write(f"data/image_bomb/{cls}/a.png", _png(i))
    c.write("data/image_bomb/zero/huge.png", _png_claiming(60000, 60000))
    c.case("data/image_bomb/zero/huge.png", "data_folder", D, ["too large to decode safely"],
           "a PNG whose header claims 60000 x 60000 pixels", model=model, folder="data/image_bomb")

    # --- data that loads but fails at the original model's first run (``first_run``: prepare) ---
    c.write("good/tokens.onnx", token_onnx())
    ids = rng.integers(0, 17, (20, 5))
    c.case("data/token_ids_beyond_vocab.npz", "first_run", D, ["'ids'", "beyond its vocabulary"],
           "token ids up to 99 for a 17-token embedding",
           _npz(ids=np.where(ids == ids[0, 0], 99, ids), labels=y), model="good/tokens.onnx")
    symbolic = tiny_onnx()
    symbolic.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "classes"
    c.write("good/symbolic_classes.onnx", symbolic.SerializeToString())
    c.case("data/label_beyond_symbolic_classes.npz", "first_run", D, ["label 57", "10 classes"],
           "a label beyond the class count when the model's class dimension is symbolic",
           _npz(input=x, labels=np.where(y == y[0], 57, y)), model="good/symbolic_classes.onnx")

    # --- recipes: one mistake each ---
    ok_step = '[[steps]]\ntechnique = "prune"\nmethod = "structured"\nratio = 0.5\n'
    head = 'model = "demo:digits-mlp"\ndata = "demo:digits"\n'
    recipes = [
        ("bad_syntax.toml", 'model = "demo:digits-mlp\ndata = demo:digits\n', ["not valid TOML"],
         "an unclosed string"),
        ("empty.toml", "", ["'model' is missing"], "an empty file"),
        ("missing_model.toml", 'data = "demo:digits"\n' + ok_step, ["'model' is missing"], "no model key"),
        ("model_not_string.toml", "model = 3\n", ["'model' is missing"], "model = 3"),
        ("data_not_string.toml", 'model = "demo:digits-mlp"\ndata = 5\n', ["'data' must be a string"], "data = 5"),
        ("unknown_top_key.toml", 'modle = "demo:digits-mlp"\n', ["unknown key 'modle'", "did you mean 'model'"],
         "a misspelt top-level key"),
        ("unknown_technique.toml", head + '[[steps]]\ntechnique = "prnue"\n',
         ["unknown technique 'prnue'", "did you mean 'prune'"], "a misspelt technique"),
        ("missing_technique.toml", head + "[[steps]]\nratio = 0.5\n", ["'steps.0.technique' is missing"],
         "a step without a technique"),
        ("unknown_method.toml", head + '[[steps]]\ntechnique = "prune"\nmethod = "structual"\n',
         ["unknown prune method 'structual'", "did you mean 'structured'"], "a misspelt method"),
        ("param_typo.toml", head + '[[steps]]\ntechnique = "prune"\nmethod = "structured"\nratoi = 0.5\n',
         ["unknown prune parameter 'ratoi'", "did you mean 'ratio'"], "a misspelt parameter"),
        ("out_of_range.toml", head + '[[steps]]\ntechnique = "prune"\nmethod = "structured"\nratio = 1.5\n',
         ["'steps.0.ratio' = 1.5 is out of range"], "ratio 1.5"),
        ("wrong_type.toml", head + '[[steps]]\ntechnique = "prune"\nmethod = "structured"\nratio = "half"\n',
         ["'steps.0.ratio' must be a number", "'half'"], "a string for a number"),
        ("bool_for_int.toml", head + '[[steps]]\ntechnique = "prune"\nfinetune_epochs = true\n',
         ["'steps.0.finetune_epochs' must be a whole number"], "true for an epoch count"),
        ("steps_not_list.toml", head + 'steps = "prune"\n', ["'steps' must be a list of tables"],
         "steps as a string"),
        ("method_not_string.toml", head + '[[steps]]\ntechnique = "prune"\nmethod = ["structured"]\n',
         ["unknown prune method"], "a list where a method name goes"),
        ("torch_after_onnx.toml", head + '[[steps]]\ntechnique = "quantize"\nmethod = "static-int8"\n' + ok_step,
         ["needs a torch model", "put quantize last"], "pruning an ONNX-only int8 model"),
        ("measure_unknown_key.toml", head + "[measure]\nbatchsize = 8\n",
         ["unknown key 'measure.batchsize'", "did you mean 'batch'"], "a misspelt measure key"),
        ("measure_out_of_range.toml", head + "[measure]\nbatch = 0\n", ["'measure.batch' = 0 is out of range"],
         "batch 0"),
        ("measure_runtime_typo.toml", head + '[measure]\nruntime = "onnxruntme"\n',
         ["'measure.runtime' must be one of", "did you mean 'onnxruntime'"], "a misspelt runtime"),
        ("sweep_not_table.toml", head + ok_step.replace("[[steps]]", "sweep = 3\n[[steps]]", 1),
         ["'sweep' must be a table"], "sweep = 3"),
        ("target_not_table.toml", 'model = "demo:digits-mlp"\ntarget = "fast"\n', ["'target' must be a table"],
         "target = a string"),
        ("input_shape_bad.toml", 'model = "demo:digits-mlp"\ninput_shape = "8x8"\n',
         ["'input_shape' must be a list of positive whole numbers"], "input_shape as a string"),
        ("trust_not_bool.toml", 'model = "demo:digits-mlp"\ntrust = "yes"\n', ["'trust' must be true or false"],
         "trust = \"yes\""),
    ]
    for name, body, expect, why in recipes:
        c.case(f"recipes/{name}", "recipe", R, expect, why, body)
    c.case("recipes/latin1.toml", "recipe", R, ["could not be read as text"], "bytes that are not UTF-8",
           b'model = "caf\xe9"\n')
    c.case("recipes/missing.toml", "recipe", R, ["recipe file not found"], "a recipe path that does not exist")
    # recipes that parse but name a broken model or data file: the error names *that* file
    c.case("recipes/model_not_found.toml", "run", M, ["no_such_model.onnx", "not found"],
           "the model path does not exist", 'model = "no_such_model.onnx"\n',
           names="no_such_model.onnx")
    c.case("recipes/corrupt_model.toml", "run", M, ["readme_renamed.onnx", INVALID_ONNX],
           "the model is a text file renamed .onnx", 'model = "../models/readme_renamed.onnx"\n',
           names="readme_renamed.onnx")
    c.case("recipes/bad_data.toml", "run", D, ["label_count.npz", "17 labels for 20 samples"],
           "the data has fewer labels than samples",
           'model = "../good/tiny.onnx"\ndata = "../data/label_count.npz"\n', names="label_count.npz")
    c.case("recipes/nan_model.toml", "run", "NumericalError", ["nan_outputs.onnx", "NaN"],
           "the model's outputs are NaN", 'model = "../models/nan_outputs.onnx"\n', names="nan_outputs.onnx")

    stored_cases(c)
    c.write(MANIFEST, json.dumps({"version": 1, "cases": c.cases}, indent=1) + "\n")
    return c.cases


def _workspace(**change) -> dict:
    """A valid workspace.json (as Workspace.save writes it) with ``change`` applied."""
    metrics = {"size_bytes": 1000, "compressed_bytes": 900, "params": 10, "nonzero_params": 10, "flops": 100,
               "latency_ms": {"median": 1.0, "p90": 1.1, "batch": 8, "threads": 1, "runtime": "onnxruntime"},
               "accuracy": 0.9, "fidelity": {"top1_agreement": 1.0, "cosine": 1.0, "rel_error": 0.0}}
    raw = {"format": "tugboat-workspace", "version": 1, "created": "2026-01-01T00:00:00", "model": "demo:digits-cnn",
           "data": "demo:digits", "measure": {"batch": 8, "threads": 1, "runtime": "onnxruntime"}, "recipe": None,
           "meta": {}, "baseline": {"name": "baseline", "recipe": {}, "metrics": metrics,
                                    "artifacts": {"onnx": "baseline/model.onnx"}, "warnings": [], "status": "ok",
                                    "error": None, "folder": "baseline"},
           "variants": [{"name": "v1", "recipe": {}, "metrics": metrics, "artifacts": {"onnx": "v1/model.onnx"},
                         "warnings": [], "status": "ok", "error": None, "folder": "v1"}]}
    for path, value in change.items():
        node, *keys = path.split("__")
        target = raw
        for k in [node, *keys][:-1]:
            target = target[int(k)] if k.isdigit() else target[k]
        target[[node, *keys][-1]] = value
    return raw


def stored_cases(c: Corpus) -> None:
    """Files Tugboat itself wrote, read back after someone changed them (issue 15)."""
    stored, ws_error = "StoredFileError", "WorkspaceError"
    deep = "[" * 5000 + "]" * 5000
    workspaces = [
        ("escape_folder", _workspace(baseline__folder="../../../X"), ["'../../../X' points outside"],
         "a baseline folder that climbs out of the workspace (a resumed sweep wrote there)"),
        ("absolute_folder", _workspace(variants__0__folder="/tmp/tugboat-corpus-abs"), ["points outside"],
         "an absolute variant folder"),
        ("escape_artifact", _workspace(variants__0__artifacts={"onnx": "../../model.onnx"}), ["points outside"],
         "an artifact path outside the workspace"),
        ("nested_folder", _workspace(variants__0__folder="a/b"), ["must be a single folder name"],
         "a variant folder with a separator"),
        ("metrics_string", _workspace(variants__0__metrics="str"), ["'variants[0].metrics' must be an object"],
         "metrics that are a string"),
        ("string_metric", _workspace(baseline__metrics__size_bytes="big"),
         ["'baseline.metrics.size_bytes' must be a whole number"], "a size that is a string"),
        ("measure_batch_string", _workspace(measure__batch="64"), ["'measure.batch' must be a whole number"],
         "a measure batch that is a string (the app set it on its settings)"),
        ("version_string", _workspace(version="2"), ["'version' must be a whole number"], "a version string"),
        ("variants_not_list", _workspace(variants={"v1": {}}), ["'variants' must be a list"], "variants as a table"),
    ]
    for name, raw, expect, why in workspaces:
        c.case(f"stored/ws_{name}/workspace.json", "workspace", ws_error, expect, why, json.dumps(raw, indent=1))
    c.case("stored/ws_deep/workspace.json", "workspace", ws_error, ["nested deeper than 64 levels"],
           "5000 nested brackets (a RecursionError before)", deep)
    c.case("stored/ws_not_object/workspace.json", "workspace", ws_error, ["is not a JSON object"], "a JSON list",
           "[1, 2]")
    c.case("stored/ws_not_json/workspace.json", "workspace", ws_error, ["cannot be read: not valid JSON"],
           "half a file", '{"variants": [')
    base = _workspace()["baseline"]
    reports = [
        ("empty_baseline", {"baseline": {}}, ["'baseline.metrics' is missing"], "a baseline without metrics"),
        ("metrics_string", {"baseline": {"metrics": "str"}}, ["'baseline.metrics' must be an object"],
         "metrics that are a string"),
        ("string_metric", {"baseline": {"metrics": {"latency_ms": {"median": "fast"}}}},
         ["'baseline.metrics.latency_ms.median' must be a number"], "a latency that is a string"),
        ("variant_name", {"baseline": base, "variants": [{"name": 7, "metrics": {}}]},
         ["'variants[0].name' must be a string"], "a variant name that is a number"),
        ("no_baseline", {"variants": []}, ["not a Tugboat report"], "no baseline"),
        ("pareto_numbers", {"baseline": base, "pareto": [1]}, ["'pareto[0]' must be a string"], "pareto of numbers"),
    ]
    for name, raw, expect, why in reports:
        c.case(f"stored/report_{name}/report.json", "report", stored, expect, why, json.dumps(raw, indent=1))
    c.case("stored/report_deep/report.json", "report", stored, ["nested deeper than 64 levels"],
           "5000 nested brackets (a RecursionError before)", deep)
    c.case("stored/report_list/report.json", "report", stored, ["not a Tugboat report"], "a JSON list", "[]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "tests" / "corpus"))
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    cases = build(Path(args.out))
    total = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    print(f"wrote {len(cases)} cases ({total / 1024:.0f} KB) to {os.path.relpath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
