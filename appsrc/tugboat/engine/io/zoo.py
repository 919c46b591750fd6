"""The demo zoo: small models the app trains itself on scikit-learn's packaged digits data.

Nothing is downloaded: ``sklearn.datasets.load_digits`` ships with scikit-learn. Each model trains
in seconds, seeded, and is cached as a plain ``state_dict`` (loadable with ``weights_only=True``) in
the user cache directory. The architectures double as the "named built-in architectures" a user's
``state_dict`` file can be loaded into.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..stored import replace_with, temp_file_beside

ZOO_VERSION = 1
IMAGE_SHAPE = (1, 8, 8)
NUM_CLASSES = 10


class DigitsCNN(nn.Module):
    """Three conv blocks and a two-layer head: the conv-heavy case."""

    def __init__(self, width: int = 32, num_classes: int = NUM_CLASSES):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(4 * w * 4, 4 * w), nn.ReLU(), nn.Linear(4 * w, num_classes)
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class DigitsMLP(nn.Module):
    """Linear-heavy: the case where dynamic and weight-only quantization shine."""

    def __init__(self, hidden: int = 256, depth: int = 2, num_classes: int = NUM_CLASSES):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        size = 64
        for _ in range(depth):
            layers += [nn.Linear(size, hidden), nn.ReLU()]
            size = hidden
        layers.append(nn.Linear(size, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class _Residual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class DigitsResNet(nn.Module):
    """Residual blocks with identity and projection skips: the hard case for structured pruning."""

    def __init__(self, width: int = 32, num_classes: int = NUM_CLASSES):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.layer1 = nn.Sequential(_Residual(w, w), _Residual(w, w))
        self.layer2 = nn.Sequential(_Residual(w, 2 * w, stride=2), _Residual(2 * w, 2 * w))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * w, num_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm's layout, which torch-pruning
    knows how to prune head-consistently)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # unbind (not indexing) lets torch-pruning map qkv channels to heads
        attn = (q @ k.transpose(-2, -1)) * self.scale
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        return self.proj(x)


class _EncoderBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: int = 2):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DigitsViT(nn.Module):
    """A tiny vision transformer over 2x2 patches: attention plus Linear layers."""

    def __init__(self, dim: int = 64, depth: int = 2, num_heads: int = 4, patch: int = 2,
                 num_classes: int = NUM_CLASSES):
        super().__init__()
        self.patch_embed = nn.Conv2d(1, dim, patch, stride=patch)
        tokens = (8 // patch) ** 2
        self.pos = nn.Parameter(torch.zeros(1, tokens, dim))
        self.blocks = nn.Sequential(*[_EncoderBlock(dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos
        x = self.norm(self.blocks(x))
        return self.head(x.mean(dim=1))


# name -> (class, default kwargs, demo dataset, training epochs, learning rate)
ARCHITECTURES: dict[str, type[nn.Module]] = {
    "digits-cnn": DigitsCNN,
    "digits-mlp": DigitsMLP,
    "digits-resnet": DigitsResNet,
    "digits-vit": DigitsViT,
}
_TRAINING = {
    "digits-cnn": dict(epochs=20, lr=3e-3),
    "digits-mlp": dict(epochs=40, lr=2e-3),
    "digits-resnet": dict(epochs=20, lr=3e-3),
    "digits-vit": dict(epochs=60, lr=2e-3),
}
# accuracy each demo model is promised to reach on the test split (tests check it)
STATED_ACCURACY = {"digits-cnn": 0.97, "digits-mlp": 0.96, "digits-resnet": 0.97, "digits-vit": 0.92}
DEMO_DATASETS = ("digits",)


def build(arch: str, **kwargs) -> nn.Module:
    if arch not in ARCHITECTURES:
        raise KeyError(arch)
    return ARCHITECTURES[arch](**kwargs)


# --- the digits data -----------------------------------------------------------------------

def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 1, 8, 8) float32 in [0, 1] and labels (N,) int64."""
    x, y = _digits_file()
    return x.copy(), y.copy()


@functools.lru_cache(maxsize=1)
def _digits_file() -> tuple[np.ndarray, np.ndarray]:
    # the CSV that ``sklearn.datasets.load_digits`` reads, read here without importing scikit-learn
    # (its import costs 0.7-1.2 s at every demo start); load_digits itself where the file moved
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is not None and path.is_file():
        table = np.loadtxt(path, delimiter=",", dtype=np.float32)
        images, target = table[:, :-1].reshape(-1, 8, 8), table[:, -1]
    else:
        from sklearn.datasets import load_digits

        d = load_digits()
        images, target = d.images, d.target
    return (images.astype(np.float32) / 16.0)[:, None, :, :], target.astype(np.int64)


def digits_splits(n: int) -> dict[str, np.ndarray]:
    """Fixed, seeded splits: 20% test, 10% validation, the rest train; calibration is the first
    256 training samples (post-training quantization calibrates on data the model has seen)."""
    order = np.random.default_rng(0).permutation(n)
    n_test, n_val = round(n * 0.2), round(n * 0.1)
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    return {"train": np.sort(train), "val": np.sort(val), "calib": np.sort(train[:256]),
            "test": np.sort(test)}


# --- training and caching ------------------------------------------------------------------

def cache_dir() -> Path:
    override = os.environ.get("TUGBOAT_CACHE_DIR")
    if override:
        return Path(override)
    import platformdirs

    return Path(platformdirs.user_cache_dir("tugboat", appauthor=False))


_train_lock = threading.Lock()


def pretrained(arch: str, progress=None) -> nn.Module:
    """The trained demo model, from the cache or trained now (seconds) and cached."""
    path = cache_dir() / "zoo" / f"{arch}-v{ZOO_VERSION}.pt"
    with torch.random.fork_rng():  # seeded init without disturbing the caller's RNG
        torch.manual_seed(0)
        model = build(arch)
    with _train_lock:
        if path.exists():
            try:
                model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
                return model.eval()
            except Exception:  # a corrupt cache entry is retrained, never trusted
                path.unlink(missing_ok=True)
        threads = torch.get_num_threads()
        try:
            # one thread: the same weights on every machine (multi-threaded reductions reorder sums)
            torch.set_num_threads(1)
            with torch.random.fork_rng():
                train_demo(model, arch, progress)
        finally:
            torch.set_num_threads(threads)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_file_beside(path)  # two processes training at once each write their own
        try:
            torch.save(model.state_dict(), tmp)
            replace_with(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return model.eval()


def train_demo(model: nn.Module, arch: str, progress=None) -> nn.Module:
    cfg = _TRAINING[arch]
    x, y = digits_arrays()
    train = digits_splits(len(x))["train"]
    xt, yt = torch.from_numpy(x[train]), torch.from_numpy(y[train])
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=1e-4)
    epochs, batch = cfg["epochs"], 64
    steps = epochs * math.ceil(len(xt) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=steps)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), batch):
            idx = perm[i : i + batch]
            xb = xt[idx]
            # light augmentation: one-pixel shifts keep the small models from overfitting
            shift = torch.randint(-1, 2, (2,), generator=gen).tolist()
            xb = torch.roll(xb, shifts=shift, dims=(2, 3))
            opt.zero_grad()
            loss_fn(model(xb), yt[idx]).backward()
            opt.step()
            sched.step()
        if progress is not None:
            progress.update((epoch + 1) / epochs, f"training demo {arch}: epoch {epoch + 1}/{epochs}")
    return model.eval()
