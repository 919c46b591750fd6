"""Access to the real-model corpus (tools/real_models.py) for tests.

``real_model(name)`` materialises an entry (cached outside the repository, see tools/real_models.py) and
returns its :class:`RealModel` (``.model``, ``.data``, ``.arch``, ``.entry.task`` ...). It skips the test
ONLY when a package that ships the weights is not installed, naming the pip command that installs it;
any other failure (a broken materialiser, a changed package) fails the test.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_tool():
    name = "tugboat_real_models"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / "real_models.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
    return sys.modules[name]


corpus = _load_tool()
NAMES = list(corpus.ENTRIES)


def real_model(name: str):
    """The materialised entry ``name``; skips the calling test if its package is absent."""
    gone = corpus.missing(name)
    if gone:
        pytest.skip(f"real model '{name}' needs {', '.join(gone)}: {corpus.ENTRIES[name].install_command}")
    return corpus.materialise(name)


def animal_cnn(epochs: int = 6, size: int = 20, seed: int = 0):
    """A small CNN trained on Animal-Shape MNIST (tools/real_models.py: ``animal_shapes``), 10,000
    real 28x28 silhouettes of ten animals, resized to ``size`` (20: half the training cost of 28,
    the same accuracy): (handle, dataset). Skips the calling test, naming the pip command, when the
    package is absent."""
    import numpy as np
    import torch

    from standins import SmallCNN, _train
    from tugboat.engine.io.data import Dataset, default_splits
    from tugboat.engine.io.models import ModelHandle, TensorSpec

    try:
        images, labels = corpus.animal_shapes()
    except corpus.PackageMissingError as exc:
        pytest.skip(str(exc))
    x = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]
    if size != x.shape[-1]:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.numpy()
    data = Dataset("animal-shapes", {"input": x}, labels, default_splits(len(labels), seed=seed))
    torch.manual_seed(seed)
    model = SmallCNN(width=24, size=size)
    train = data.splits["train"]
    _train(model, [torch.from_numpy(x[train])], torch.from_numpy(labels[train]), epochs, seed=seed)
    handle = ModelHandle(model, [TensorSpec("input", ("batch", 1, size, size))], [TensorSpec("logits", ("batch", 10))],
                         source="animal-shapes-cnn", format="torch", arch="smallcnn")
    return handle, data
