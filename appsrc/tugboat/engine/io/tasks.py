"""What kind of output a model produces, which decides how its quality is measured.

- ``classification``: scores over classes, ``[batch, classes]``; accuracy with labels, else top-1
  agreement with the original.
- ``embedding``: a feature vector per sample (``[batch, dim]`` named like an embedding, or a
  ``[batch, tokens, dim]`` hidden state); cosine similarity and relative error to the original.
- ``dense``: a map per sample (``[batch, C, H, W]``: segmentation, a probability map, depth).
- ``sequence``: a score vector per step (``[batch, steps, classes]``: OCR, speech recognition).
- ``regression``: one or a few numbers per sample (``[batch]``, ``[batch, 1]``: a probability, a value).

Only classification is measured by top-1; every other kind by fidelity (cosine, relative error).
The guess comes from the first output's shape and name; data with integer labels turns a
``[batch, C]`` output back into classification; a recipe's ``task = "..."`` or ``--task`` overrides all.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

TASKS = ("classification", "embedding", "dense", "sequence", "regression")

_EMBEDDING_NAMES = re.compile(r"embed|pool|sentence|feature|hidden|encod|vector|last_hidden|repr|latent",
                              re.IGNORECASE)
_CLASS_NAMES = re.compile(r"logit|class|prob|score|softmax|pred", re.IGNORECASE)


def infer_task(outputs: Sequence, labels=None) -> str:
    """The task kind from a model's output specs (objects with ``.name`` and ``.shape``), and from the
    data's labels when given. Unknown outputs (nothing recorded) stay ``classification``."""
    if not outputs:
        return "classification"
    out = outputs[0]
    shape = tuple(out.shape)
    name = str(getattr(out, "name", "") or "")
    rank = len(shape)
    last = shape[-1] if shape and isinstance(shape[-1], int) and shape[-1] > 0 else None
    if rank <= 1:
        return "regression"
    if rank == 2:
        if last == 1:
            return "regression"
        if labels is not None:
            return "classification"
        if _EMBEDDING_NAMES.search(name) and not _CLASS_NAMES.search(name):
            return "embedding"
        return "classification"
    if rank == 3:
        if _EMBEDDING_NAMES.search(name):
            return "embedding"
        return "sequence"
    return "dense"


def check_task(task: str) -> str:
    """A user's task name, validated (``ValueError`` naming the choices)."""
    t = str(task).strip().lower()
    if t not in TASKS:
        raise ValueError(f"unknown task '{task}'; choose one of: {', '.join(TASKS)}")
    return t


def set_task(handle, task: str | None) -> None:
    """Override the task (a recipe's ``task``, CLI ``--task``, the window's choice)."""
    if task:
        handle.task = check_task(task)
        handle.task_source = "user"
