"""Hugging Face model folders (``config.json`` + weights, as ``save_pretrained`` writes them).

Needs the optional ``transformers`` package (``pip install tugboat-ml[hf]``). Only a local folder is
read: ``local_files_only=True`` and ``HF_HUB_OFFLINE=1``, never a download, never remote code.
``model.safetensors`` loads as plain tensors; ``pytorch_model.bin`` is a pickle and needs trust.

The task comes from the config: a ``...ForSequenceClassification`` architecture is a classifier
(its logits, accuracy with labels); anything else is loaded as the base model and is an *embedding*
model whose output is the mean of the last hidden state over the tokens the attention mask keeps
(the sentence-transformers pooling; a ``pooler_output`` is not used because many checkpoints leave
the pooler untrained), measured by cosine fidelity to the original.

Inputs are ``input_ids``, ``attention_mask`` and (when the model takes it and the data has it)
``token_type_ids``, all int64 ``[batch, sequence]``: a tokenised ``.npz`` gives them. The exported
ONNX graph keeps both the batch and the sequence length dynamic.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelLoadError, UntrustedFileError
from .models import ModelHandle, TensorSpec, _short

TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class TextModel(nn.Module):
    """A transformers model as a module of tensors: logits, or the mask-weighted mean embedding."""

    def __init__(self, model: nn.Module, task: str, takes_token_types: bool) -> None:
        super().__init__()
        self.model = model
        self.task = task
        self.takes_token_types = takes_token_types

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.takes_token_types and token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        out = self.model(**kwargs, return_dict=True)
        if self.task == "classification":
            return out.logits
        hidden = out.last_hidden_state
        weight = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weight).sum(1) / weight.sum(1).clamp(min=1e-9)


def _transformers(path: Path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        import transformers
    except ImportError:
        raise ModelLoadError("is a Hugging Face model folder, which needs the optional 'transformers' package",
                             path=path, hint="pip install tugboat-ml[hf]") from None
    return transformers


def load_hf_folder(path: Path, *, trust: bool = False) -> ModelHandle:
    try:
        config_raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"config.json is not readable JSON ({_short(exc)})", path=path) from None
    if not isinstance(config_raw, dict) or "model_type" not in config_raw:
        raise ModelLoadError("config.json has no 'model_type': not a Hugging Face model folder", path=path)
    names = {p.name for p in path.iterdir()}
    safetensors = any(n.endswith(".safetensors") for n in names)
    pickled = {"pytorch_model.bin", "pytorch_model.bin.index.json"} & names
    if not safetensors and not pickled:
        raise ModelLoadError("has a config.json but no weights (model.safetensors or pytorch_model.bin)",
                             path=path)
    if not safetensors and not trust:
        raise UntrustedFileError(
            "holds its weights in pytorch_model.bin, a pickle, which can run arbitrary code when loaded; "
            "it was not loaded", path=path / "pytorch_model.bin",
            hint="if you trust where this folder came from, load it with --trust (or confirm in the app); "
                 "a folder with model.safetensors needs no trust")
    transformers = _transformers(path)
    archs = config_raw.get("architectures") or []
    classification = any(a.endswith("ForSequenceClassification") for a in archs)
    task = "classification" if classification else "embedding"
    auto = transformers.AutoModelForSequenceClassification if classification else transformers.AutoModel
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True,
                                                         trust_remote_code=False)
        options = {"config": config, "local_files_only": True, "trust_remote_code": False,
                   "use_safetensors": safetensors or None, "attn_implementation": "eager"}
        with _QuietLogs(transformers):
            try:  # an embedding model does not use the pooler (and pruning must not resize for it)
                model = auto.from_pretrained(str(path), **options,
                                             **({} if classification else {"add_pooling_layer": False}))
            except TypeError:
                model = auto.from_pretrained(str(path), **options)
    except Exception as exc:
        raise ModelLoadError(f"transformers could not load the folder ({type(exc).__name__}: {_short(exc, 240)})",
                             path=path) from None
    model.eval()
    params = inspect.signature(model.forward).parameters
    takes_types = "token_type_ids" in params and int(getattr(config, "type_vocab_size", 0) or 0) > 1
    wrapper = TextModel(model, task, takes_types).eval()
    inputs = [TensorSpec("input_ids", ("batch", "?"), "int64"), TensorSpec("attention_mask", ("batch", "?"), "int64")]
    if takes_types:
        inputs.append(TensorSpec("token_type_ids", ("batch", "?"), "int64"))
    handle = ModelHandle(None, inputs, [], source=str(path), format="huggingface", task=task,
                         arch=archs[0] if archs else config_raw["model_type"], pending=wrapper)
    handle.conversion_error = "the sequence length is not known yet"
    handle.task_source = "config"  # not re-inferred from the outputs
    vocab = int(getattr(config, "vocab_size", 2) or 2)
    handle.info["vocab_size"] = {"input_ids": vocab, "attention_mask": 2, "token_type_ids": 2}
    handle.info["optional_inputs"] = ["token_type_ids"]
    handle.info["dynamic_dims"] = {n: {1: "sequence"} for n in TEXT_INPUTS}
    if classification:
        labels = getattr(config, "id2label", None) or {}
        handle.info["classes"] = [str(labels[k]) for k in sorted(labels, key=lambda k: int(k))] if labels else []
    return handle


class _QuietLogs:
    """transformers logs unused-weight notes at WARNING; the load result says what matters."""

    def __init__(self, transformers) -> None:
        self.logging = transformers.utils.logging

    def __enter__(self):
        self.level = self.logging.get_verbosity()
        self.bars = self.logging.is_progress_bar_enabled()
        self.logging.set_verbosity_error()
        self.logging.disable_progress_bar()

    def __exit__(self, *exc):
        self.logging.set_verbosity(self.level)
        if self.bars:
            self.logging.enable_progress_bar()
        return False
