"""Small stand-ins for real networks, trained briefly so their activations look like real ones.

* :class:`SENet`: an EfficientNet-like depthwise-separable CNN (MBConv blocks: 1x1 expand, 3x3
  depthwise, squeeze-excite, 1x1 project, SiLU, residuals) on scikit-learn digits upscaled to
  24x24 with noise, so the inputs are not trivially separable.
* :class:`TinyBert`: a BERT-like encoder (token + position embeddings, LayerNorm, multi-head
  attention with an attention mask, GELU feed-forward) whose output is a mean-pooled, masked
  sentence embedding (task ``embedding``). Trained as a classifier on a synthetic "topic" task
  (each class draws its tokens from its own vocabulary slice), then the head is dropped.

Both train in a few seconds on two cores with fixed seeds. ``build_*`` return
``(ModelHandle, Dataset)`` ready for the engine; the benchmark uses them when the real corpus is
not installed.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from tugboat.engine.io.data import Dataset, default_splits
from tugboat.engine.io.models import ModelHandle, TensorSpec

IMG = 24
SEQ = 16
VOCAB = 120


# --- an EfficientNet-like CNN ------------------------------------------------------------------

class SqueezeExcite(nn.Module):
    def __init__(self, c: int, reduced: int):
        super().__init__()
        self.reduce = nn.Conv2d(c, reduced, 1)
        self.expand = nn.Conv2d(reduced, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.expand(F.silu(self.reduce(s))))


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4):
        super().__init__()
        mid = cin * expand
        self.expand = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.SiLU())
        self.depthwise = nn.Sequential(nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False),
                                       nn.BatchNorm2d(mid), nn.SiLU())
        self.se = SqueezeExcite(mid, max(4, cin // 4))
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.residual else y


class SENet(nn.Module):
    def __init__(self, width: int = 16, num_classes: int = 10):
        super().__init__()
        w = width
        # like EfficientNet, most parameters sit in the late, low-resolution stages
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.SiLU())
        self.blocks = nn.Sequential(MBConv(w, w, 1), MBConv(w, 2 * w, 2), MBConv(2 * w, 2 * w, 1),
                                    MBConv(2 * w, 4 * w, 2), MBConv(4 * w, 12 * w, 1), MBConv(12 * w, 16 * w, 1))
        self.head = nn.Sequential(nn.Conv2d(16 * w, 32 * w, 1, bias=False), nn.BatchNorm2d(32 * w), nn.SiLU())
        self.classifier = nn.Linear(32 * w, num_classes)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def digits_images(size: int = IMG, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """sklearn digits upscaled to ``size`` x ``size``, randomly shifted, with pixel noise."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    x = F.interpolate(x, size=(size - 4, size - 4), mode="bilinear", align_corners=False)
    x = F.pad(x, (2, 2, 2, 2))
    rng = np.random.default_rng(seed)
    shifts = rng.integers(-2, 3, size=(len(x), 2))
    x = torch.stack([torch.roll(img, tuple(int(s) for s in sh), dims=(1, 2)) for img, sh in zip(x, shifts)])
    x = x + 0.15 * torch.from_numpy(rng.standard_normal(x.shape).astype(np.float32))
    x = (x - 0.2) / 0.35
    return x.numpy().astype(np.float32), d.target.astype(np.int64)


def _train(model: nn.Module, inputs: list[torch.Tensor], labels: torch.Tensor, epochs: int,
           lr: float = 3e-3, batch: int = 64, forward=None, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    forward = forward or (lambda m, *xs: m(*xs))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    n = len(labels)
    steps = epochs * math.ceil(n / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, batch):
            idx = order[i : i + batch]
            loss = F.cross_entropy(forward(model, *[x[idx] for x in inputs]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def build_senet(epochs: int = 6, seed: int = 0) -> tuple[ModelHandle, Dataset]:
    torch.manual_seed(seed)
    x, y = digits_images(seed=seed)
    data = Dataset("standin:digits24", {"input": x}, y, default_splits(len(y)))
    model = SENet()
    train = data.splits["train"]
    _train(model, [torch.from_numpy(x[train])], torch.from_numpy(y[train]), epochs, seed=seed)
    handle = ModelHandle(model, [TensorSpec("input", ("batch", 1, IMG, IMG))],
                         [TensorSpec("logits", ("batch", 10))], source="standin:senet", format="torch",
                         arch="senet")
    return handle, data


# --- a BERT-like sentence encoder ---------------------------------------------------------------

class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, ffn), nn.Linear(ffn, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x, bias):
        b, t, d = x.shape
        h = self.heads

        def split(z):
            return z.reshape(b, t, h, d // h).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h) + bias, dim=-1)
        ctx = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = self.norm1(x + self.out(ctx))
        return self.norm2(x + self.fc2(F.gelu(self.fc1(x))))


class TinyBert(nn.Module):
    def __init__(self, vocab: int = VOCAB, dim: int = 128, heads: int = 4, layers: int = 3,
                 ffn: int = 512, max_len: int = SEQ):
        super().__init__()
        self.dim = dim
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(max_len, dim)
        self.norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList([EncoderLayer(dim, heads, ffn) for _ in range(layers)])

    def forward(self, input_ids, attention_mask):
        t = input_ids.shape[1]
        x = self.norm(self.tokens(input_ids) + self.positions(torch.arange(t, device=input_ids.device)))
        mask = attention_mask.to(x.dtype)
        # like Hugging Face BERT: masked positions get the most negative float
        bias = (1.0 - mask)[:, None, None, :] * torch.finfo(x.dtype).min
        for layer in self.layers:
            x = layer(x, bias)
        return (x * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)


def topic_tokens(n: int = 1200, classes: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token sequences whose class decides which vocabulary slice most tokens come from, with
    padding at the end of each sequence (attention mask 0)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    span = (VOCAB - 2) // classes
    ids = rng.integers(2, VOCAB, size=(n, SEQ))
    own = rng.random((n, SEQ)) < 0.6
    ids = np.where(own, 2 + labels[:, None] * span + rng.integers(0, span, size=(n, SEQ)), ids)
    lengths = rng.integers(SEQ // 2, SEQ + 1, n)
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, ids, 0).astype(np.int64)
    ids[:, 0] = 1  # a [CLS]-like first token
    return ids, mask, labels.astype(np.int64)


def build_tinybert(epochs: int = 4, seed: int = 0) -> tuple[ModelHandle, Dataset]:
    torch.manual_seed(seed)
    ids, mask, labels = topic_tokens(seed=seed)
    data = Dataset("standin:topics", {"input_ids": ids, "attention_mask": mask}, labels,
                   default_splits(len(labels)))
    model = TinyBert()
    head = nn.Linear(model.dim, int(labels.max()) + 1)
    both = nn.ModuleDict({"encoder": model, "head": head})
    train = data.splits["train"]
    _train(both, [torch.from_numpy(ids[train]), torch.from_numpy(mask[train])],
           torch.from_numpy(labels[train]), epochs, lr=2e-3, seed=seed,
           forward=lambda m, i, a: m["head"](m["encoder"](i, a)))
    handle = ModelHandle(model.eval(), [TensorSpec("input_ids", ("batch", SEQ), "int64"),
                                        TensorSpec("attention_mask", ("batch", SEQ), "int64")],
                         [TensorSpec("embedding", ("batch", model.dim))], source="standin:tinybert",
                         format="torch", task="embedding", arch="tinybert")
    handle.info["vocab_size"] = {"input_ids": VOCAB}
    return handle, data


# --- a harder 10-class image task for pruning + fine-tuning ---------------------------------------

class SmallCNN(nn.Module):
    """A Fashion-MNIST-style CNN: two conv blocks and a two-layer head."""

    def __init__(self, width: int = 32, size: int = 20, num_classes: int = 10):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * (size // 4) ** 2, 128), nn.ReLU(),
                                        nn.Dropout(0.2), nn.Linear(128, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))
