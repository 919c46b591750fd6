"""The built-in student family for distillation: one small architecture per kind of input.

- **images** (one float input of shape ``(C, H, W)``): a plain CNN, ``depth`` conv blocks
  (conv 3x3, batch norm, ReLU, 2x2 max-pool while the map is at least 4 pixels wide), channels
  doubling per block up to 4x the base, then a small pooled head.
- **vectors** (one float input of any other shape): an MLP with ``depth`` hidden layers.
- **token sequences** (an integer input of shape ``(L,)``, optionally a second input that is the
  attention mask): a small transformer encoder, mean-pooled over the unmasked tokens.

``width`` scales the base size of each (CNN base channels ``32 * width``, MLP hidden units
``512 * width``, transformer dimension ``128 * width``); ``depth`` is the number of blocks. The
output is reshaped to the teacher's output shape, so any output a teacher gives can be matched.
Every student exports to ONNX with a dynamic batch (only ops the legacy exporter knows).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import TugboatError
from ..lazy import F, nn, torch

CNN_BASE = 32
MLP_BASE = 512
TRANSFORMER_BASE = 128
KINDS = ("image", "vector", "tokens")


def input_kind(shapes: Sequence[tuple[int, ...]], dtypes: Sequence[str]) -> str:
    """``image``, ``vector`` or ``tokens`` from per-sample input shapes and dtypes."""
    if not shapes:
        raise TugboatError("the model has no inputs to build a student for")
    if str(dtypes[0]).startswith(("int", "uint")):
        if len(shapes[0]) != 1:
            raise TugboatError(f"token inputs must be 1-D sequences per sample, got {shapes[0]}")
        return "tokens"
    if len(shapes) > 1:
        raise TugboatError(f"built-in students take one float input (or token ids + mask); this "
                           f"model has {len(shapes)} inputs: give student = \"file\" instead")
    return "image" if len(shapes[0]) == 3 else "vector"


class _Reshape(nn.Module):
    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape = tuple(int(d) for d in shape)

    def forward(self, x):
        return x.reshape(x.shape[0], *self.shape)


class StudentCNN(nn.Module):
    def __init__(self, in_shape: tuple[int, int, int], out_shape: tuple[int, ...], width: float = 0.5,
                 depth: int = 3):
        super().__init__()
        c, h, w = in_shape
        base = max(4, round(CNN_BASE * width))
        layers: list[nn.Module] = []
        cin = c
        for i in range(depth):
            cout = base * 2 ** min(i, 2)
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
            if min(h, w) >= 4:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            cin = cout
        self.features = nn.Sequential(*layers)
        pool = (min(h, 2), min(w, 2))
        n_out = math.prod(out_shape)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(pool), nn.Flatten(),
                                  nn.Linear(cin * pool[0] * pool[1], n_out), _Reshape(out_shape))

    def forward(self, x):
        return self.head(self.features(x))


class StudentMLP(nn.Module):
    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], width: float = 0.5,
                 depth: int = 2):
        super().__init__()
        hidden = max(8, round(MLP_BASE * width))
        layers: list[nn.Module] = [nn.Flatten()]
        size = math.prod(in_shape)
        for _ in range(depth):
            layers += [nn.Linear(size, hidden), nn.ReLU()]
            size = hidden
        layers += [nn.Linear(size, math.prod(out_shape)), _Reshape(out_shape)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class _Block(nn.Module):
    """Pre-norm encoder block; attention written out so the key mask exports cleanly."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, bias):
        b, n, d = x.shape
        hd = d // self.heads
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1)) * (hd ** -0.5) + bias
        h = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(h)
        return x + self.mlp(self.norm2(x))


class StudentTransformer(nn.Module):
    def __init__(self, vocab: int, seq_len: int, out_shape: tuple[int, ...], width: float = 0.5,
                 depth: int = 2, with_mask: bool = False):
        super().__init__()
        heads = 4 if TRANSFORMER_BASE * width >= 32 else 2
        dim = max(heads * 4, round(TRANSFORMER_BASE * width / heads) * heads)
        self.with_mask = with_mask
        self.embed = nn.Embedding(max(2, vocab), dim)
        self.pos = nn.Parameter(torch.zeros(1, seq_len, dim))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList([_Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Sequential(nn.Linear(dim, math.prod(out_shape)), _Reshape(out_shape))

    def forward(self, ids, mask=None, *_token_types):  # token_type_ids of a BERT teacher: unused
        x = self.embed(ids) + self.pos[:, : ids.shape[1]]
        if mask is None:
            m = torch.ones_like(ids, dtype=x.dtype)
        else:
            m = (mask != 0).to(x.dtype)
        bias = ((1.0 - m) * -1e4)[:, None, None, :]
        for block in self.blocks:
            x = block(x, bias)
        x = self.norm(x)
        pooled = (x * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp_min(1.0)
        return self.head(pooled)


def build_student(kind: str, in_shapes: Sequence[tuple[int, ...]], out_shape: tuple[int, ...], *,
                  width: float = 0.5, depth: int = 3, vocab: int = 2) -> nn.Module:
    """A fresh (untrained) student for ``kind`` with per-sample input and output shapes."""
    if not 0.0 < width <= 4.0:
        raise TugboatError(f"student width must be in (0, 4], got {width}")
    if depth < 1:
        raise TugboatError(f"student depth must be at least 1, got {depth}")
    out_shape = tuple(int(d) for d in out_shape) or (1,)
    if kind == "image":
        return StudentCNN(tuple(in_shapes[0]), out_shape, width, depth)
    if kind == "vector":
        return StudentMLP(tuple(in_shapes[0]), out_shape, width, depth)
    if kind == "tokens":
        return StudentTransformer(vocab, int(in_shapes[0][0]), out_shape, width, depth,
                                  with_mask=len(in_shapes) > 1)
    raise TugboatError(f"unknown student kind {kind!r}; valid: {', '.join(KINDS)}")


class FeatureProjection(nn.Module):
    """Maps a student feature onto the teacher's feature shape (learned; dropped after training)."""

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]):
        super().__init__()
        self.teacher_shape = tuple(teacher_shape)
        self.conv = len(student_shape) == 3 and len(teacher_shape) == 3
        self.tokens = (len(student_shape) == 2 and len(teacher_shape) == 2
                       and student_shape[0] == teacher_shape[0])
        if self.conv:
            self.proj: nn.Module = nn.Conv2d(student_shape[0], teacher_shape[0], 1)
        elif self.tokens:
            self.proj = nn.Linear(student_shape[-1], teacher_shape[-1])
        else:
            self.proj = nn.Linear(math.prod(student_shape), math.prod(teacher_shape))

    def forward(self, x):
        if self.conv:
            y = self.proj(x)
            if tuple(y.shape[2:]) != self.teacher_shape[1:]:
                y = F.adaptive_avg_pool2d(y, self.teacher_shape[1:])
            return y
        if self.tokens:
            return self.proj(x)
        return self.proj(x.reshape(len(x), -1)).reshape(len(x), *self.teacher_shape)
