"""Property-based fuzzing of everything that reads user files: the recipe parser (random TOML-ish
text and random dictionaries), the model loaders (random and mutated ONNX / TorchScript / .pt2 /
state_dict bytes) and the data loaders (mutated .npz, random CSV). The only exceptions allowed are
the documented :class:`TugboatError` types; anything else is a bug and fails the test.

Bounded for CI (well under a minute on two slow cores); ``tools/fuzz_long.py`` runs the same
properties for minutes. The number of inputs tried is printed in the terminal summary.
Set ``TUGBOAT_FUZZ_SCALE`` to multiply the example counts, ``TUGBOAT_FUZZ_RANDOM=1`` for a new
random seed instead of the fixed CI sequence.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from tugboat.engine.errors import TugboatError
from tugboat.engine.io.data import load_data
from tugboat.engine.io.loading import load_model
from tugboat.engine.running.recipe import load_recipe, parse_recipe
from tugboat.engine.techniques import steps as step_registry

CORPUS = Path(__file__).resolve().parent / "corpus"
SCALE = float(os.environ.get("TUGBOAT_FUZZ_SCALE", "1"))
TRIED: Counter[str] = Counter()
LOADED: Counter[str] = Counter()  # mutated model files that still loaded (then described by model_info)


def fuzz_settings(n: int):
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None, database=None,
                    derandomize=os.environ.get("TUGBOAT_FUZZ_RANDOM") != "1",
                    suppress_health_check=list(HealthCheck), print_blob=True)


@pytest.fixture(scope="module", autouse=True)
def _report_count(request):
    """Print how many inputs each property tried, in the terminal summary."""
    t0 = time.perf_counter()
    yield
    total, elapsed = sum(TRIED.values()), time.perf_counter() - t0
    parts = ", ".join(f"{k} {v}" for k, v in sorted(TRIED.items()))
    line = (f"fuzz: {total} inputs tried in {elapsed:.1f} s, 0 unexpected exceptions ({parts}; "
            f"{sum(LOADED.values())} mutated models still loaded and were described)")

    class _Summary:
        def pytest_terminal_summary(self, terminalreporter):
            terminalreporter.write_sep("-", line)

    if not request.session.testsfailed:
        request.config.pluginmanager.register(_Summary(), "tugboat-fuzz-summary")
    out = os.environ.get("TUGBOAT_FUZZ_REPORT")
    if out:
        Path(out).write_text(f"{total} {elapsed:.1f}\n")


@pytest.fixture(scope="module")
def work():
    with tempfile.TemporaryDirectory(prefix="tugboat-fuzz-") as d:
        yield Path(d)


def expect_only_tugboat_errors(label: str | None, fn, *args, **kwargs):
    if label:
        TRIED[label] += 1
    try:
        return fn(*args, **kwargs)
    except TugboatError as exc:
        text = str(exc)
        assert text.strip() and "Traceback" not in text
        return None


# --- recipes -----------------------------------------------------------------------------------

_TECHS = step_registry.techniques()
_METHODS = sorted({m for t in _TECHS.values() for m in t.methods})
_PARAMS = sorted({p.name for t in _TECHS.values() for p in t.params})
_TOP = ["model", "data", "steps", "sweep", "measure", "target", "name", "trust", "arch", "input_shape", "search"]
_MEASURE = ["batch", "threads", "runtime", "warmup", "min_runs", "min_seconds", "max_seconds", "also_batch1"]
_WORDS = _TOP + _MEASURE + _PARAMS + _METHODS + list(_TECHS) + ["technique", "method", "demo:digits",
                                                                  "demo:digits-mlp", "onnxruntime", "torch"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.sampled_from(_WORDS))
keys = st.one_of(st.sampled_from(_WORDS), st.text(max_size=8))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(keys, inner, max_size=4)), max_leaves=12)
step_dicts = st.fixed_dictionaries(
    {}, optional={"technique": st.one_of(st.sampled_from(list(_TECHS)), values),
                  "method": st.one_of(st.sampled_from(_METHODS), values)},
).flatmap(lambda base: st.dictionaries(st.sampled_from(_PARAMS) | keys, values, max_size=4)
          .map(lambda extra: {**extra, **base}))
recipe_dicts = st.fixed_dictionaries(
    {}, optional={"model": st.one_of(st.just("demo:digits-mlp"), values),
                  "data": st.one_of(st.just("demo:digits"), values),
                  "steps": st.one_of(st.lists(step_dicts, max_size=3), values),
                  "measure": st.one_of(st.dictionaries(st.sampled_from(_MEASURE) | keys, values, max_size=3), values),
                  "sweep": values, "target": values, "search": values, "trust": values,
                  "input_shape": values, "name": values, "arch": values},
).flatmap(lambda base: st.dictionaries(keys, values, max_size=2).map(lambda extra: {**extra, **base}))


def _toml_value(v) -> str:
    import json

    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return repr(v) if not isinstance(v, float) or np.isfinite(v) else ("nan" if v != v else "inf")
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return '""'


toml_lines = st.one_of(
    st.builds(lambda k, v: f"{k} = {_toml_value(v)}", st.sampled_from(_WORDS), values),
    st.sampled_from(["[[steps]]", "[measure]", "[sweep]", "[target]", "[search]", "[steps]", "[[measure]]"]),
    st.text(max_size=30),
)
toml_texts = st.lists(toml_lines, max_size=12).map("\n".join)


@fuzz_settings(250)
@given(raw=recipe_dicts)
def test_recipe_dicts(raw):
    expect_only_tugboat_errors("recipe-dict", parse_recipe, raw, "fuzz.toml")


@fuzz_settings(250)
@given(text=toml_texts)
def test_recipe_text(work, text):
    path = work / "recipe.toml"
    path.write_bytes(text.encode("utf-8", errors="surrogatepass"))
    expect_only_tugboat_errors("recipe-text", load_recipe, path)


# --- model files ----------------------------------------------------------------------------------

def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()


def _valid_files() -> dict[str, bytes]:
    out = {".onnx": (CORPUS / "good" / "tiny.onnx").read_bytes()}
    buf = io.BytesIO()
    torch.jit.save(torch.jit.trace(_tiny(), (torch.zeros(2, 1, 8, 8),)), buf)
    out[".pt"] = buf.getvalue()
    buf = io.BytesIO()
    torch.save(_tiny().state_dict(), buf)
    out[".pth"] = buf.getvalue()
    buf = io.BytesIO()
    torch.export.save(torch.export.export(_tiny(), (torch.zeros(2, 1, 8, 8),)), buf)
    out[".pt2"] = buf.getvalue()
    return out


VALID: dict[str, bytes] = {}


def valid(suffix: str) -> bytes:
    if not VALID:
        VALID.update(_valid_files())
    return VALID[suffix]


@st.composite
def mutations(draw, data: bytes) -> bytes:
    """Flip bits, overwrite, insert, delete and truncate at random places (a few edits)."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "splice"]))
        if not out:
            break
        pos = draw(st.integers(0, len(out) - 1))
        if op == "flip":
            out[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            out[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            out[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del out[pos : pos + draw(st.integers(1, 64))]
        elif op == "truncate":
            del out[pos:]
        else:  # copy one stretch of the file over another (keeps plausible structure)
            src = draw(st.integers(0, len(out) - 1))
            n = draw(st.integers(1, 64))
            out[pos : pos + n] = out[src : src + n]
    return bytes(out)


def _load_file(work: Path, suffix: str, data: bytes, label: str):
    path = work / f"model{suffix}"
    path.write_bytes(data)
    arch = "digits-mlp" if suffix == ".pth" else None
    handle = expect_only_tugboat_errors(label, load_model, path, arch=arch)
    if handle is not None:  # a mutation that still loads must still describe itself
        from tugboat.engine.running.info import model_info

        LOADED[label] += 1
        expect_only_tugboat_errors(None, model_info, str(path), handle=handle)


@fuzz_settings(120)
@given(suffix=st.sampled_from([".onnx", ".pt", ".pth", ".pt2"]), data=st.binary(max_size=512))
def test_random_bytes_as_models(work, suffix, data):
    _load_file(work, suffix, data, "model-random")


@fuzz_settings(150)
@given(data=st.data())
def test_mutated_onnx(work, data):
    _load_file(work, ".onnx", data.draw(mutations(valid(".onnx"))), "onnx-mutated")


@fuzz_settings(100)
@given(data=st.data())
def test_mutated_torchscript(work, data):
    _load_file(work, ".pt", data.draw(mutations(valid(".pt"))), "torchscript-mutated")


@fuzz_settings(60)
@given(data=st.data())
def test_mutated_state_dict(work, data):
    _load_file(work, ".pth", data.draw(mutations(valid(".pth"))), "state-dict-mutated")


@fuzz_settings(30)
@given(data=st.data())
def test_mutated_pt2(work, data):
    _load_file(work, ".pt2", data.draw(mutations(valid(".pt2"))), "pt2-mutated")


# --- data files -------------------------------------------------------------------------------------

MODEL = None


def tiny_model():
    global MODEL
    if MODEL is None:
        MODEL = load_model(CORPUS / "good" / "tiny.onnx")
    return MODEL


def _npz_bytes() -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    np.savez(buf, input=rng.random((12, 1, 8, 8)).astype(np.float32), labels=rng.integers(0, 10, 12))
    return buf.getvalue()


NPZ = _npz_bytes()


@fuzz_settings(150)
@given(data=st.data(), with_model=st.booleans())
def test_mutated_npz(work, data, with_model):
    path = work / "data.npz"
    path.write_bytes(data.draw(mutations(NPZ)))
    expect_only_tugboat_errors("npz-mutated", load_data, path, tiny_model() if with_model else None)


arrays_npz = st.dictionaries(
    st.sampled_from(["input", "labels", "x", "extra"]),
    st.one_of(
        st.builds(lambda n, shape, dt: np.zeros((n, *shape), dtype=dt), st.integers(0, 4),
                  st.lists(st.integers(0, 9), max_size=3), st.sampled_from(["f4", "f8", "i8", "u1", "?", "f2"])),
        st.builds(lambda v: np.array(v), st.lists(st.one_of(st.integers(-5, 20), st.floats()), max_size=6)),
    ), max_size=3)


@fuzz_settings(150)
@given(arrays=arrays_npz, with_model=st.booleans())
def test_random_npz_arrays(work, arrays, with_model):
    path = work / "arrays.npz"
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.write_bytes(buf.getvalue())
    expect_only_tugboat_errors("npz-arrays", load_data, path, tiny_model() if with_model else None)


csv_cells = st.one_of(st.sampled_from(["0", "1", "0.5", "-3", "1e9", "nan", "inf", "", "label", "x", '"q"']),
                      st.text(max_size=5))
csv_texts = st.lists(st.lists(csv_cells, min_size=0, max_size=66).map(",".join), max_size=8).map("\n".join)


@fuzz_settings(150)
@given(text=csv_texts, header=st.booleans(), with_model=st.booleans())
def test_random_csv(work, text, header, with_model):
    path = work / "data.csv"
    head = ",".join(f"p{i}" for i in range(64)) + ",label\n" if header else ""
    path.write_bytes((head + text).encode("utf-8", errors="surrogatepass"))
    expect_only_tugboat_errors("csv", load_data, path, tiny_model() if with_model else None)


def _png_bytes() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png_bytes()


@fuzz_settings(60)
@given(data=st.data())
def test_mutated_image_in_folder(work, data):
    folder = work / "images"
    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True, exist_ok=True)
        (folder / cls / "ok.png").write_bytes(PNG)
    (folder / "b" / "x.png").write_bytes(data.draw(mutations(PNG)))
    expect_only_tugboat_errors("image-folder", load_data, folder, tiny_model())


# --- Tugboat's model metadata (ONNX metadata_props, tugboat.json, a state_dict's "tugboat") ---------

_DIMS = st.one_of(st.integers(-3, 2**40), st.text(max_size=5), st.none(), st.floats(), st.booleans(), values)
_SPECS = st.fixed_dictionaries({}, optional={
    "name": st.one_of(st.sampled_from(["input", "x", "logits", ""]), values),
    "shape": st.one_of(st.lists(_DIMS, max_size=5), st.just(["batch", 1, 8, 8]), values),
    "dtype": st.one_of(st.sampled_from(["float32", "int64", "bool", "float16", "notatype", "Tensor"]), values)})
_KWARGS = st.dictionaries(st.sampled_from(["hidden", "depth", "num_classes", "bogus", "__class__"]) | keys,
                          st.one_of(st.integers(-3, 2**20), values), max_size=3)
metadata = st.one_of(values, st.fixed_dictionaries({}, optional={
    "inputs": st.one_of(st.lists(_SPECS, max_size=3), values),
    "outputs": st.one_of(st.lists(_SPECS, max_size=3), values),
    "task": st.one_of(st.sampled_from(["classification", "regression", "embedding"]), values),
    "arch": st.one_of(st.sampled_from(["digits-mlp", "digits-cnn"]), values),
    "arch_kwargs": st.one_of(_KWARGS, values)}))


def _meta_text(draw_value, raw_text) -> str:
    import json

    if raw_text is not None:
        return raw_text
    try:
        return json.dumps(draw_value, allow_nan=True)
    except (TypeError, ValueError, RecursionError):
        return "{}"


@fuzz_settings(40)
@given(meta=metadata, raw=st.one_of(st.none(), st.text(max_size=40)),
       carrier=st.sampled_from([".onnx", ".pt", ".pth", ".pt2"]))
def test_model_metadata(work, meta, raw, carrier):
    import onnx

    text = _meta_text(meta, raw)
    path = work / f"meta{carrier}"
    if carrier == ".onnx":
        model = onnx.load_from_string(valid(".onnx"))
        prop = model.metadata_props.add()
        prop.key, prop.value = "tugboat", text
        path.write_bytes(model.SerializeToString())
    elif carrier == ".pt":
        torch.jit.save(torch.jit.trace(_tiny(), (torch.zeros(2, 1, 8, 8),)), str(path),
                       _extra_files={"tugboat.json": text})
    elif carrier == ".pt2":
        torch.export.save(_exported(), str(path), extra_files={"tugboat.json": text})
    else:  # a state_dict saved with Tugboat's metadata beside it (weights_only keeps plain values)
        torch.save({"state_dict": _mlp_state(), "tugboat": meta}, path)
    handle = expect_only_tugboat_errors(f"metadata{carrier}", load_model, path)
    if handle is not None:
        from tugboat.engine.running.info import model_info

        LOADED[f"metadata{carrier}"] += 1
        expect_only_tugboat_errors(None, model_info, str(path), handle=handle)


_CACHE: dict[str, object] = {}


def _exported():
    if "pt2" not in _CACHE:
        _CACHE["pt2"] = torch.export.export(_tiny(), (torch.zeros(2, 1, 8, 8),))
    return _CACHE["pt2"]


def _mlp_state():
    if "mlp" not in _CACHE:
        from tugboat.engine.io import zoo

        torch.manual_seed(0)
        _CACHE["mlp"] = zoo.build("digits-mlp", hidden=8, depth=1).state_dict()
    return _CACHE["mlp"]
