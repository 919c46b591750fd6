"""Pruning: remove the weights, channels, hidden units and attention heads that matter least.

Two methods:

* ``unstructured``: magnitude pruning with :mod:`torch.nn.utils.prune` (global or per layer). The
  masks are made permanent, so the tensors keep their shapes with zeros in them: the file only
  shrinks once compressed, and a dense runtime runs it no faster. The variant says so.
* ``structured``: whole channels / filters / hidden units / head dimensions are removed through
  torch-pruning's dependency graph, so residual additions, concatenations, depthwise convolutions
  and attention stay consistent. The result is a genuinely smaller dense model that exports to
  ONNX and runs faster in ONNX Runtime.

Both can be followed by fine-tuning (:mod:`tugboat.engine.techniques.finetune`). :func:`layer_sensitivity`
measures, for every prunable layer, how much quality it loses when pruned alone, which the GUI
charts and ``allocation = "sensitivity"`` uses to prune less where it hurts.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..devices import DEFAULT_TRAINING, DEVICE_CHOICES
from ..devices import HELP as DEVICE_HELP
from ..devices import resolve as resolve_device
from ..errors import RecipeError, TugboatError
from ..formatting import did_you_mean
from ..lazy import nn, torch
from ..measuring.layer_timing import hooked_times
from ..progress import Progress, null_progress
from .channels import kept_unrounded, ratio_for_keep, resolve_round_to, rounded_keep
from .finetune import (
    OPTIMIZERS,
    evaluate,
    finetune,
    frozen_copy,
    lr_note,
    outputs_for,
    recalibrate_batchnorm,
    soft_target_loss,
)
from .technique import NO_CHANGE, Param, Technique

if TYPE_CHECKING:  # pragma: no cover
    from ..io.data import Dataset
    from ..io.models import ModelHandle

IMPORTANCES = ("l1", "l2", "taylor", "random")
CLIP_DEFAULT = 2.5  # fine-tuning gradient norm: see docs/techniques/pruning.md (measured)
# the one bound of a pruning ratio (the whole step's and each layer's): torch-pruning removes at most
# this share of any layer, so a larger ratio would only be this one under another name
MAX_RATIO = 0.95
DENSE_RUNTIME_NOTE = (
    "unstructured pruning zeroes weights but keeps every tensor's shape: a dense runtime "
    "(ONNX Runtime, torch) runs it no faster and the file is the same size until compressed; "
    "use structured pruning for a smaller, faster model")


# --- helpers -------------------------------------------------------------------------------------

def _tp():
    import torch_pruning as tp

    return tp


def _as_tuple(example_inputs) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def _forward(module: nn.Module, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    out = module(*inputs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _prunable_types() -> tuple[type, ...]:
    return (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def execution_order(module: nn.Module, example_inputs) -> list[str]:
    """Names of Conv / Linear modules in the order a forward pass runs them."""
    names = {m: n for n, m in module.named_modules()}
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda mod, _i, _o: order.append(names[mod]))
             for m in module.modules() if isinstance(m, _prunable_types())]
    try:
        with torch.no_grad():
            module.eval()
            module(*_as_tuple(example_inputs))
    finally:
        for h in hooks:
            h.remove()
    return order


def default_ignored(module: nn.Module, example_inputs) -> list[str]:
    """The classifier head: the last Linear (or Conv) the forward pass runs."""
    order = execution_order(module, example_inputs)
    linears = [n for n in order if isinstance(module.get_submodule(n), nn.Linear)]
    if linears:
        return [linears[-1]]
    return order[-1:]


def _with_head(module: nn.Module, example, ignored: Iterable[str] | None) -> list[str]:
    """The user's ignored layers plus the classifier head (pruning it would change the output)."""
    from ..io.converted_graphs import KEEP_OUT_CHANNELS

    names = list(ignored or [])
    # recurrent layers keep their hidden size: torch-pruning 1.6's LSTM pruner slices the wrong rows
    # (IndexError); so do layers whose channels are laid out by position further on (converted_graphs).
    # Their inputs are still pruned with the layer that feeds them
    names += [n for n, m in module.named_modules() if n not in names and (
        isinstance(m, (nn.LSTM, nn.GRU, nn.RNN)) or getattr(m, KEEP_OUT_CHANNELS, False))]
    return names + [n for n in default_ignored(module, example) if n not in names]


def attention_modules(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """timm-style attention: a fused ``qkv`` Linear and an integer ``num_heads``."""
    found = []
    for name, m in module.named_modules():
        if isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "num_heads", None), int):
            found.append((name, m))
    return found


def hf_attention_modules(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Hugging Face-style attention: ``query`` / ``key`` / ``value`` Linears, an integer
    ``num_attention_heads`` and an ``attention_head_size`` the forward reshapes with (BERT family)."""
    found = []
    for name, m in module.named_modules():
        if (all(isinstance(getattr(m, a, None), nn.Linear) for a in ("query", "key", "value"))
                and isinstance(getattr(m, "num_attention_heads", None), int)
                and isinstance(getattr(m, "attention_head_size", None), int)):
            found.append((name, m))
    return found


def _importance(name: str):
    tp = _tp()
    if name == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if name == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    if name == "random":
        return tp.importance.RandomImportance()
    raise TugboatError(f"unknown importance {name!r}; valid: {', '.join(IMPORTANCES)}")


def _resolve_names(module: nn.Module, names: Iterable[str], what: str) -> list[nn.Module]:
    out = []
    known = dict(module.named_modules())
    for n in names:
        if n not in known:
            raise TugboatError(f"{what}: the model has no layer named {n!r}{did_you_mean(n, known)}")
        out.append(known[n])
    return out


def _deployed_params(handle: ModelHandle) -> int:
    """Parameters of the handle's deployed artifact (``ModelHandle.param_count``, the count every
    report shows); the torch module's own count only if the export fails (reporting never fails a
    prune)."""
    try:
        return int(handle.param_count()[0])
    except Exception:
        return _param_count(handle.torch_module())


def _param_count(module: nn.Module) -> int:
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _channels(module: nn.Module) -> dict[str, int]:
    """Output channels / features of every Conv and Linear (what structured pruning changes)."""
    out = {}
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            out[name] = m.out_features
        elif isinstance(m, nn.modules.conv._ConvNd):
            out[name] = m.out_channels
    return out



def _channels_as_pruned(module: nn.Module, example) -> dict[str, int]:
    """:func:`_channels` of the layers as pruning sees them: a converted graph's MatMuls by constant
    weights only become Linear layers once normalised (on a copy)."""
    if not isinstance(module, torch.fx.GraphModule):
        return _channels(module)
    probe = copy.deepcopy(module)
    _normalise(probe, _as_tuple(example))
    return _channels(probe)


# --- structured ----------------------------------------------------------------------------------

def prune_structured_module(module: nn.Module, example_inputs, ratio: float, *, importance: str = "l1",
                            scope: str = "uniform", ignored: Iterable[str] | None = None,
                            iterative_steps: int = 1, round_to: int | str | None = None,
                            per_layer: dict[str, float] | None = None,
                            data_batches: Callable[[], Iterable] | Iterable | None = None,
                            compensate: Sequence[Sequence[torch.Tensor]] | None = None,
                            progress: Progress | None = None) -> nn.Module:
    """Structured pruning of a deep copy of ``module``; returns the smaller dense module.

    ``ratio`` is the share of channels removed from each group (``scope = "uniform"``) or across
    the whole model ranked together (``"global"``). ``ignored`` names layers whose outputs are kept;
    the classifier head (the last Linear the forward pass runs) is always kept. ``per_layer``
    maps layer names to their own ratios (used by sensitivity allocation). ``round_to`` (a multiple, or
    ``"auto"``) rounds kept channels to the nearest multiple (:mod:`tugboat.engine.techniques.channels`).
    ``data_batches`` (an iterable, or a callable returning one) yields ``(inputs, targets)`` pairs for Taylor
    importance's gradients: targets are labels (LongTensor, cross-entropy) or the original
    model's outputs (float, soft targets). ``compensate`` (batches of inputs) turns on bias
    compensation: each removed input channel's mean activation on these batches, times the weights
    that read it, moves into the consuming layer's bias (see :func:`_compensate_removed_inputs`).
    """
    tp = _tp()
    progress = progress or null_progress()
    if not 0.0 <= ratio < 1.0:
        raise TugboatError(f"structured pruning ratio must be in [0, 1), got {ratio}")
    example = _as_tuple(example_inputs)
    model = copy.deepcopy(module).eval()
    _normalise(model, example)  # onnx2torch graphs: weights kept as buffers become prunable
    for p in model.parameters():
        p.requires_grad_(True)
    ignored_layers = _resolve_names(model, _with_head(model, example, ignored), "ignored")
    num_heads = _head_counts(model)
    if resolve_round_to(round_to) > 1:  # every group's ratio keeps its rounded count; ranked per group
        per_layer, scope = _rounded_ratios(model, example, ratio, scope=scope, ignored=ignored, per_layer=per_layer,
                                           multiple=resolve_round_to(round_to), importance=importance,
                                           skip=set(num_heads)), "uniform"
    ratio_dict = None
    if per_layer:
        ratio_dict = {m: float(r) for m, r in zip(_resolve_names(model, per_layer, "per_layer"),
                                                   per_layer.values())}
    if importance == "taylor" and data_batches is None:
        raise TugboatError("Taylor importance needs data to compute gradients")
    steps = max(1, int(iterative_steps))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(
            model, example, importance=_importance(importance),
            global_pruning=(scope == "global"), pruning_ratio=float(ratio),
            pruning_ratio_dict=ratio_dict, iterative_steps=steps,
            ignored_layers=ignored_layers,
            num_heads=num_heads, prune_num_heads=False, prune_head_dims=True,
            max_pruning_ratio=MAX_RATIO, customized_pruners=_customized_pruners(),
        )
        for step in range(steps):
            progress.update(step / steps, f"pruning step {step + 1}/{steps}")
            _prune_step(pruner, model, data_batches if importance == "taylor" else None, compensate)
    _update_head_sizes(model, pruner.num_heads)
    for p in model.parameters():
        p.requires_grad_(True)
    progress.update(1.0, "pruned")
    return model.eval()


def _groups(model: nn.Module, example: tuple[torch.Tensor, ...], ignored: Iterable[str] | None):
    """(dependency graph, its pruning groups) with the ignored layers and the head left out."""
    tp = _tp()
    ignored_layers: list[nn.Module] = []
    for m in _resolve_names(model, _with_head(model, example, ignored), "ignored"):
        ignored_layers.extend(m.modules())
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example,
                                               customized_pruners=_customized_pruners())
    return dg, dg.get_all_groups(ignored_layers=ignored_layers,
                                 root_module_types=[nn.modules.conv._ConvNd, nn.Linear])


def _rounded_ratios(model: nn.Module, example: tuple[torch.Tensor, ...], ratio: float, *, scope: str,
                    ignored: Iterable[str] | None, per_layer: dict[str, float] | None, multiple: int,
                    importance: str, skip: set[nn.Module]) -> dict[str, float]:
    """Per-layer ratios (by group root) that keep each group's channels at the nearest multiple of
    ``multiple`` to what ``ratio`` / ``per_layer`` would keep. A global ranking is run first without
    pruning to learn how many channels it keeps per group. Attention and grouped layers, whose
    channels are pruned per head or group, keep their unrounded ratio."""
    keeps = _global_keeps(model, example, ratio, ignored, importance) \
        if scope == "global" and not per_layer else None
    names = {m: n for n, m in model.named_modules()}
    dg, groups = _groups(model, example, ignored)
    out: dict[str, float] = {}
    for group in groups:
        root = group[0].dep.target.module
        members = [dep.target.module for dep, _ in group]
        channels = dg.get_out_channels(root)
        if root not in names or not channels:
            continue
        own = [per_layer[names[m]] for m in members if per_layer and names.get(m) in per_layer]
        r = min(own[0] if own else ratio, MAX_RATIO)
        keep = keeps.get(names[root], channels) if keeps is not None else kept_unrounded(channels, r)
        if any(m in skip or (isinstance(m, nn.modules.conv._ConvNd) and 1 < m.groups < m.out_channels)
               for m in members):
            out[names[root]] = ratio_for_keep(channels, keep)
            continue
        out[names[root]] = ratio_for_keep(channels, rounded_keep(channels, keep, multiple))
    return out


def _global_keeps(model: nn.Module, example: tuple[torch.Tensor, ...], ratio: float,
                  ignored: Iterable[str] | None, importance: str) -> dict[str, int]:
    """Channels a global ranking at ``ratio`` keeps per group root (a dry run on a copy: nothing is
    pruned; Taylor importance, which needs gradients, is approximated by l1 here)."""
    tp = _tp()
    probe = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(
            probe, example, importance=_importance("l1" if importance == "taylor" else importance),
            global_pruning=True, pruning_ratio=float(ratio),
            ignored_layers=_resolve_names(probe, _with_head(probe, example, ignored), "ignored"),
            num_heads=_head_counts(probe), prune_num_heads=False, prune_head_dims=True,
            max_pruning_ratio=MAX_RATIO, customized_pruners=_customized_pruners())
        names = {m: n for n, m in probe.named_modules()}
        keeps: dict[str, int] = {}
        for group in pruner.step(interactive=True):
            root = group[0].dep.target.module
            if root in names:
                keeps[names[root]] = pruner.DG.get_out_channels(root) - len(group[0].idxs)
    return keeps


def _prune_step(pruner, model: nn.Module, gradient_batches, compensate) -> None:
    """One of torch-pruning's iterative steps: gradients first for Taylor importance, each removed
    input channel's mean moved into its consumer's bias when ``compensate`` batches are given."""
    if gradient_batches is not None:
        _accumulate_gradients(model, gradient_batches)
    means = _input_means(model, compensate) if compensate else {}
    kept: dict[nn.Module, list[int]] = {}
    for group in pruner.step(interactive=True):
        if means:
            _compensate_removed_inputs(pruner.DG, group, means, kept)
        group.prune()
    model.zero_grad(set_to_none=True)


def _head_counts(model: nn.Module) -> dict[nn.Module, int]:
    """Attention heads per projection (ours, Hugging Face's and converted graphs'): torch-pruning prunes
    head dimensions."""
    from ..io.converted_graphs import NUM_HEADS

    num_heads = {m: getattr(m, NUM_HEADS) for m in model.modules() if isinstance(getattr(m, NUM_HEADS, None), int)}
    num_heads.update({m.qkv: m.num_heads for _, m in attention_modules(model)})
    for _, m in hf_attention_modules(model):
        num_heads.update({m.query: m.num_attention_heads, m.key: m.num_attention_heads,
                          m.value: m.num_attention_heads})
    return num_heads


def _head_layers(model: nn.Module) -> dict[str, int]:
    """Layer name -> heads, for the projections pruned alike in every head (the heads themselves kept)."""
    names = {m: n for n, m in model.named_modules()}
    return {names[m]: h for m, h in _head_counts(model).items() if m in names}


def _update_head_sizes(model: nn.Module, num_heads: dict[nn.Module, int]) -> None:
    """The attention modules' head counts and sizes after their projections were pruned."""
    for _, m in attention_modules(model):
        m.num_heads = num_heads[m.qkv]
        if hasattr(m, "head_dim"):
            m.head_dim = m.qkv.out_features // (3 * m.num_heads)
    for _, m in hf_attention_modules(model):  # the forward views q/k/v as [.., heads, attention_head_size]
        m.attention_head_size = m.query.out_features // m.num_attention_heads
        m.all_head_size = m.query.out_features


def _consumers(model: nn.Module) -> list[nn.Module]:
    """Layers whose removed input channels can be compensated in their bias (not grouped convs)."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)
            or (isinstance(m, nn.modules.conv._ConvNd) and m.groups == 1)]


_SAMPLED_ROWS = 128  # positions kept per batch and layer to check a compensation against (see below)


def _input_means(model: nn.Module, batches: Sequence[Sequence[torch.Tensor]]
                 ) -> dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """For every consumer layer: the mean of each input channel over ``batches`` (and positions), and
    a few of the positions themselves, channels last (what :func:`_shift_helps` checks against)."""
    sums: dict[nn.Module, list] = {}
    rows: dict[nn.Module, list[torch.Tensor]] = {}
    gen = torch.Generator().manual_seed(0)

    def hook(mod, args):
        x = args[0].detach().float()
        axis = x.dim() - 1 if isinstance(mod, nn.Linear) else 1
        dims = [d for d in range(x.dim()) if d != axis]
        total, count = sums.get(mod, (0.0, 0))
        sums[mod] = (total + x.sum(dim=dims), count + x.numel() // x.shape[axis])
        flat = x.movedim(axis, -1).reshape(-1, x.shape[axis])
        rows.setdefault(mod, []).append(flat[torch.randperm(len(flat), generator=gen)[:_SAMPLED_ROWS]])

    hooks = [m.register_forward_pre_hook(hook) for m in _consumers(model)]
    try:
        with torch.no_grad():
            model.eval()
            for xs in batches:
                model(*xs)
    finally:
        for h in hooks:
            h.remove()
    return {m: (total / max(1, count), torch.cat(rows[m])) for m, (total, count) in sums.items()}


def _shift_helps(rows: torch.Tensor, weights: torch.Tensor, cols: list[int], mu: torch.Tensor) -> bool:
    """Whether replacing the removed inputs ``cols`` by their mean leaves a smaller error than dropping
    them, at the typical sampled position (the mean of the error's norm per position). The mean shift
    always lowers the *squared* error, which a few outlier positions can dominate: a transformer's
    tokens with huge activations in some channels (MiniLM's third layer) set a mean that then shifts
    every other token further off than dropping the channels would."""
    x = rows[:, cols].to(weights.dtype)
    dropped = (x @ weights.T).norm(dim=1).mean()
    shifted = ((x - mu) @ weights.T).norm(dim=1).mean()
    return bool(shifted <= dropped)


def _compensate_removed_inputs(dg, group, means: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]],
                               kept: dict[nn.Module, list[int]]) -> None:
    """Before ``group`` is pruned: for every layer that loses input channels, add what those channels
    contributed on average (their mean activation times the weights reading them) to its bias.

    Networks exported to ONNX carry their BatchNorm folded into the convolutions' biases, so a channel
    with small weights can still output a large constant; removing it silently shifts every later
    activation (EfficientNet-Lite0 lost all top-1 agreement with 3% of its channels removed). Moving
    the constant into the next layer's bias keeps the shift out. ``kept`` maps each layer to the
    original indices of its current input channels (several groups can cut one layer's inputs)."""
    tp_helpers = __import__("torch_pruning._helpers", fromlist=["to_plain_idxs"])
    for dep, idxs in group:
        layer = dep.target.module
        if layer not in means or dg.is_out_channel_pruning_fn(dep.handler):
            continue
        plain = [int(i) for i in tp_helpers.to_plain_idxs(idxs)] if idxs and not isinstance(idxs[0], int) \
            else [int(i) for i in idxs]
        if not plain:
            continue
        w = layer.weight.detach()
        transposed = isinstance(layer, nn.modules.conv._ConvTransposeNd)
        n_in = w.shape[0] if transposed else w.shape[1]
        order = kept.setdefault(layer, list(range(n_in)))
        if len(order) != n_in or max(plain) >= n_in:
            continue  # the layer changed in a way this bookkeeping does not follow: leave it
        mean, rows = means[layer]
        mu = mean[[order[i] for i in plain]].to(w.dtype)
        if transposed:  # [in, out, k...] -> [out, removed]
            weights = w[plain].reshape(len(plain), w.shape[1], -1).sum(-1).T
        else:  # [out, in, k...] (a Linear is [out, in])
            weights = w[:, plain].reshape(w.shape[0], len(plain), -1).sum(-1)
        # padding positions see zeros, not the mean: the shift is exact away from the borders
        if _shift_helps(rows, weights, [order[i] for i in plain], mu):
            with torch.no_grad():
                if layer.bias is None:
                    layer.bias = nn.Parameter((weights @ mu).clone())
                else:
                    layer.bias.add_(weights @ mu)
        removed = set(plain)
        kept[layer] = [o for i, o in enumerate(order) if i not in removed]


def _normalise(module: nn.Module, example) -> None:
    """onnx2torch graphs: weights kept as buffers become prunable (converted_graphs imports torch,
    so it is imported when a pruning runs, not with the technique registry)."""
    from ..io.converted_graphs import normalise_for_pruning

    normalise_for_pruning(module, example)


def _customized_pruners() -> dict:
    from ..io.converted_graphs import ChannelConstant, channel_constant_pruner

    return {ChannelConstant: channel_constant_pruner()}


def _accumulate_gradients(model: nn.Module, data_batches) -> None:
    batches = data_batches() if callable(data_batches) else data_batches
    model.zero_grad(set_to_none=True)
    model.eval()  # BatchNorm statistics stay fixed while scoring
    for xs, target in batches:
        out = _forward(model, xs)
        if target.dtype == torch.long:
            loss = nn.functional.cross_entropy(out.reshape(len(target), -1), target)
        else:
            loss = soft_target_loss(out, target)
        loss.backward()


def prunable_layers(module: nn.Module, example_inputs, ignored: Iterable[str] | None = None) -> list[str]:
    """Names of the layers whose output channels structured pruning can remove (group roots)."""
    tp = _tp()
    example = _as_tuple(example_inputs)
    if isinstance(module, torch.fx.GraphModule):  # converted graph: as pruning sees it (same layer names)
        module = copy.deepcopy(module)
        _normalise(module, example)
    ignored_layers = []
    for m in _resolve_names(module, _with_head(module, example, ignored), "ignored"):
        ignored_layers.extend(m.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dg = tp.DependencyGraph().build_dependency(module, example_inputs=example,
                                                   customized_pruners=_customized_pruners())
        names = {m: n for n, m in module.named_modules()}
        roots = []
        for group in dg.get_all_groups(ignored_layers=ignored_layers,
                                       root_module_types=[nn.modules.conv._ConvNd, nn.Linear]):
            root = group[0].dep.target.module
            if root in names and names[root] not in roots:
                roots.append(names[root])
    order = execution_order(module, example)
    return sorted(roots, key=lambda n: order.index(n) if n in order else len(order))


# --- unstructured --------------------------------------------------------------------------------

def prune_unstructured_module(module: nn.Module, ratio: float, *, scope: str = "uniform",
                              ignored: Iterable[str] = (), permanent: bool = True,
                              per_layer: dict[str, float] | None = None) -> nn.Module:
    """Magnitude pruning of the Conv / Linear weights of a deep copy of ``module``.

    ``per_layer`` maps layer names to their own sparsity (each pruned alone, left out of the
    global ranking). With ``permanent=False`` the masks stay attached (so fine-tuning keeps the
    zeros at zero); call :func:`make_permanent` afterwards."""
    from torch.nn.utils import prune as tprune

    if not 0.0 <= ratio <= MAX_RATIO:
        raise TugboatError(f"unstructured pruning ratio must be in [0, {MAX_RATIO}], got {ratio}")
    model = copy.deepcopy(module).eval()
    skip = set(ignored)
    own = dict(per_layer or {})
    for (name, amount), m in zip(own.items(), _resolve_names(model, own, "layer_ratios")):
        if name not in skip and amount > 0:
            tprune.l1_unstructured(m, "weight", amount=float(amount))
    targets = [(m, "weight") for n, m in model.named_modules()
               if isinstance(m, _prunable_types()) and n not in skip and n not in own]
    if not targets and not own:
        raise TugboatError("the model has no Conv or Linear weights to prune")
    if not targets:
        if permanent:
            make_permanent(model)
        return model
    if scope == "global":
        tprune.global_unstructured(targets, pruning_method=tprune.L1Unstructured, amount=float(ratio))
    elif scope in ("layer", "uniform"):
        for m, name in targets:
            tprune.l1_unstructured(m, name, amount=float(ratio))
    else:
        raise TugboatError(f"unknown scope {scope!r}; valid: global, layer (= uniform)")
    if permanent:
        make_permanent(model)
    return model


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold pruning masks into the weights (no lingering ``weight_orig`` / ``weight_mask``)."""
    from torch.nn.utils import prune as tprune

    for m in model.modules():
        for name in [k[: -len("_mask")] for k, _ in list(m.named_buffers(recurse=False))
                     if k.endswith("_mask")]:
            tprune.remove(m, name)
    return model


# --- sensitivity ---------------------------------------------------------------------------------

def _quality_fn(handle: ModelHandle, data: Dataset | None, split: str = "val"):
    """quality(module) -> float: accuracy with labels, top-1 agreement (or cosine) without."""
    names = handle.input_names
    classification = handle.task == "classification"
    original = handle.torch_module()
    if data is None:
        batch = handle.example_inputs(128, seed=3)
        with torch.inference_mode():
            ref = _forward(original.eval(), batch).float().numpy()

        def q_nodata(module):
            with torch.inference_mode():
                out = _forward(module.eval(), batch).float().numpy()
            a, b = out.reshape(len(out), -1), ref.reshape(len(ref), -1)
            if classification:
                return float(np.mean(a.argmax(1) == b.argmax(1)))
            return float(np.mean(np.sum(a * b, 1) / np.maximum(
                np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)))

        return q_nodata, "fidelity"
    if data.has_labels and classification:
        return (lambda module: evaluate(module, data, split, names)["accuracy"]), "accuracy"
    ref = outputs_for(original, data, split, names)

    def q(module):
        if classification:
            return evaluate(module, data, split, names, ref)["fidelity"]
        out = outputs_for(module, data, split, names)
        a, b = out.reshape(len(out), -1), ref.reshape(len(ref), -1)
        return float(np.mean(np.sum(a * b, 1) / np.maximum(
            np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)))

    return q, "fidelity"


def _layer_latency(module: nn.Module, inputs: Sequence[torch.Tensor], names: list[str],
                   repeats: int = 5) -> dict[str, float]:
    """Measured torch time (ms) spent inside each named layer at the given batch (median)."""
    times, _ = hooked_times(module, inputs, names, repeats)
    return {n: float(np.median(t)) if t else 0.0 for n, t in times.items()}


def layer_sensitivity(handle: ModelHandle, data: Dataset | None, ratios: Sequence[float] = (0.25, 0.5, 0.75),
                      progress: Progress | None = None, *, importance: str = "l1",
                      ignored: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """For every prunable layer: quality when only that layer is pruned at each ratio, and the
    layer's share of parameters, FLOPs and measured latency (torch, batch 64).

    Rows: ``{"name", "type", "out_channels", "params", "params_share", "flops", "flops_share",
    "latency_ms", "latency_share", "baseline_quality", "quality": {ratio: q}, "drop": {ratio: d},
    "sensitivity": mean drop, "metric": "accuracy" | "fidelity"}``."""
    from ..measuring.measure import layer_table

    progress = progress or null_progress()
    module = handle.torch_module().eval()
    example = tuple(handle.example_inputs(2))
    layers = prunable_layers(module, example, ignored)
    quality, metric = _quality_fn(handle, data)
    base_q = quality(module)
    table = {r["name"]: r for r in layer_table(handle)}
    total_params = max(1, _deployed_params(handle))  # the count the table's rows add up to
    total_flops = max(1, sum(r["flops"] for r in table.values()))
    lat_inputs = tuple(handle.example_inputs(64))
    lat = _layer_latency(module, lat_inputs, layers)
    total_lat = max(1e-9, sum(lat.values()))
    rows = []
    n_jobs = max(1, len(layers) * len(ratios))
    done = 0
    for name in layers:
        sub = module.get_submodule(name)
        q_at, drop_at = {}, {}
        for r in ratios:
            progress.update(done / n_jobs, f"sensitivity of {name} at {r:g}")
            pruned = prune_structured_module(module, example, 0.0, importance=importance,
                                             ignored=ignored, per_layer={name: float(r)})
            q = quality(pruned)
            q_at[f"{r:g}"] = q
            drop_at[f"{r:g}"] = base_q - q
            done += 1
        row = table.get(name, {})
        params = int(row.get("params", 0))  # in the deployed artifact (a folded BatchNorm's included)
        rows.append({
            "name": name, "type": type(sub).__name__, "out_channels": _channels(sub).get("", None),
            "params": params, "params_share": params / total_params,
            "flops": int(row.get("flops", 0)), "flops_share": row.get("flops", 0) / total_flops,
            "latency_ms": lat.get(name, 0.0), "latency_share": lat.get(name, 0.0) / total_lat,
            "baseline_quality": base_q, "quality": q_at, "drop": drop_at,
            "sensitivity": float(np.mean(list(drop_at.values()))), "metric": metric,
        })
    progress.update(1.0, "sensitivity measured")
    return rows


def sensitivity_allocation(module: nn.Module, example_inputs, ratio: float, rows: list[dict[str, Any]],
                           *, ignored: Iterable[str] | None = None, importance: str = "l1",
                           round_to: int | None = None, max_ratio: float = 0.75) -> dict[str, float]:
    """Per-layer ratios that remove as many parameters as uniform ``ratio`` would, but less from
    layers whose quality drops more when pruned alone (and more from those that barely notice).

    Each layer's weight is ``sqrt(1 / (sensitivity + eps))``, normalised to mean 1; its ratio is
    ``k * ratio * weight`` clipped to ``[0, max_ratio]``, with ``k`` found by bisection so the
    pruned model's parameter count matches the uniformly pruned one's."""
    example = _as_tuple(example_inputs)
    if not rows:
        return {}
    target = _param_count(prune_structured_module(module, example, ratio, ignored=ignored,
                                                  importance=importance, round_to=round_to))
    sens = np.array([max(0.0, r["sensitivity"]) for r in rows])
    eps = max(0.005, 0.1 * float(sens.mean()))
    w = np.sqrt(1.0 / (sens + eps))  # square root: single-layer drops overstate interactions
    w = w / w.mean()
    names = [r["name"] for r in rows]

    def ratios_for(k: float) -> dict[str, float]:
        return {n: float(np.clip(k * ratio * wi, 0.0, max_ratio)) for n, wi in zip(names, w)}

    def params_for(k: float) -> int:
        pruned = prune_structured_module(module, example, 0.0, ignored=ignored, importance=importance,
                                         round_to=round_to, per_layer=ratios_for(k))
        return _param_count(pruned)

    lo, hi = 0.0, 1.0
    while params_for(hi) > target and hi < 64:
        lo, hi = hi, hi * 2
    for _ in range(10):
        mid = (lo + hi) / 2
        if params_for(mid) > target:
            lo = mid
        else:
            hi = mid
    return ratios_for(hi)


# --- the technique -------------------------------------------------------------------------------

def _data_batches(handle: ModelHandle, data: Dataset | None, reference: nn.Module, n_batches: int = 4,
                  batch_size: int = 64):
    """Batches for Taylor importance: labels when there are any, else the original's outputs."""
    names = handle.input_names

    def gen():
        if data is None:
            for i in range(n_batches):
                xs = handle.example_inputs(batch_size, seed=10 + i)
                with torch.no_grad():
                    yield xs, _forward(reference, xs).float()
            return
        for i, (xs, ys, _) in enumerate(data.batches("train", batch_size, names=names, shuffle=True)):
            if i >= n_batches:
                break
            if ys is None or handle.task != "classification":
                with torch.no_grad():
                    ys = _forward(reference, xs).float()
            yield xs, ys

    return gen


def _compensation_batches(handle: ModelHandle, data: Dataset | None, n_batches: int = 2,
                          batch_size: int = 32) -> list[tuple[torch.Tensor, ...]] | None:
    """A few training batches whose mean activations bias compensation moves into the next layers."""
    if data is None or not len(data.splits.get("train", ())):
        return None
    out = []
    for xs, _, _ in data.batches("train", batch_size, names=handle.input_names, shuffle=True, seed=7):
        out.append(tuple(xs))
        if len(out) >= n_batches:
            break
    return out or None


def _finetune_after(handle: ModelHandle, module: nn.Module, params: dict[str, Any], data: Dataset | None,
                    progress: Progress, reference: nn.Module, notes: list[str],
                    chosen: dict[str, Any]) -> list[dict[str, Any]]:
    """Fine-tune ``module`` in place as ``params`` say; warnings go to ``notes`` (for the variant,
    never the original handle), the learning rate used to ``chosen``."""
    epochs = params["finetune_epochs"]
    if epochs <= 0:
        return []
    if data is None:
        notes.append("fine-tuning skipped: it needs data (give a dataset)")
        return []
    if params["optimizer"] in ("adam", "adamw") and params["lr"] != "auto" and params["lr"] > 0.01:
        notes.append(f"fine-tuning with {params['optimizer']} at lr {params['lr']:g} (a rate for sgd) may "
                     f"undo the pruned model's weights: with {params['optimizer']} use about 3e-3")
    quality, kind = _guard_score(handle, data, reference)
    before = quality(module) if quality else None
    kept = copy.deepcopy(module.state_dict()) if quality else None
    # the original model is the teacher: its soft outputs recover a pruned model faster than
    # labels alone (teacher_weight = 0: labels only)
    used: dict[str, Any] = {}
    history = finetune(module, data, input_names=handle.input_names, epochs=epochs, lr=params["lr"],
                       optimizer=params["optimizer"], batch_size=params["batch_size"],
                       progress=progress, reference=reference, seed=params["seed"],
                       classification=handle.task == "classification",
                       teacher_weight=params["teacher_weight"], temperature=params["teacher_temperature"],
                       augment=params["augment"], device=resolve_device(params["device"], "prune.device"),
                       max_grad_norm=params["max_grad_norm"], report=used)
    # the rate used, and how it was chosen, for the variant's info (the result shows it)
    chosen.update(lr=used["lr"], lr_chosen_by="probe" if params["lr"] == "auto" else "recipe",
                  lr_probe=used["lr_probe"])
    if used["lr_probe"]:
        chosen["note"] = lr_note(used["lr"], used["lr_probe"])
    after = quality(module) if quality else None
    if before is not None and after < before:  # fine-tuning made it worse: the pruned weights before it
        module.load_state_dict(kept)
        what = f"the {kind} on the val split ({before[0]:.3f} -> {after[0]:.3f})" if after[0] < before[0] \
            else (f"the outputs' cosine to the original's on the val split ({before[1]:.3f} -> {after[1]:.3f}; "
                  f"{kind} {after[0]:.3f} either way)")
        hint = "more training rows may let it recover (the rate was probed)" if params["lr"] == "auto" \
            else "a smaller lr may recover instead (a pretrained transformer: about 5e-5; or lr = \"auto\")"
        notes.append(f"fine-tuning lowered {what} at lr {used['lr']:g}, so the pruned weights before it are "
                     f"kept; {hint}")
    return history


def _guard_score(handle: ModelHandle, data: Dataset, reference: nn.Module):
    """score(module) -> (val quality, val cosine of the outputs to the original's), compared before and
    after fine-tuning: the cosine breaks ties of a coarse accuracy or agreement (10 val rows of
    EfficientNet-Lite0: agreement 0.0 both ways while the cosine fell from 0.27 to 0.16)."""
    if not len(data.splits.get("val", ())):
        return None, ""
    quality, kind = _quality_fn(handle, data)
    if handle.task != "classification":  # the quality is already the cosine
        return (lambda module: (quality(module), 0.0)), kind
    ref = outputs_for(reference, data, "val", handle.input_names)
    return (lambda module: (quality(module), _mean_cosine(outputs_for(module, data, "val", handle.input_names),
                                                          ref))), kind


def _mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return float(np.mean(np.sum(a * b, 1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1),
                                                        1e-12)))


def _add_step_note(new: ModelHandle, tuned: dict[str, Any]) -> None:
    """The fine-tuning's chosen learning rate as a note of the variant (``info["step_notes"]``: the
    result shows it), out of the pruning info it was put in."""
    pruning = new.info.get("pruning") or {}
    note = pruning.pop("note", None)
    if note:
        new.info["step_notes"] = [*new.info.get("step_notes", []), note]


def parse_layer_ratios(items: Iterable[str] | None, where: str = "prune.layer_ratios", *,
                       skip_bad: bool = False) -> dict[str, float]:
    """``["features.3=0.25", "classifier.1=0"]`` -> ``{"features.3": 0.25, "classifier.1": 0.0}``.

    The one reader of per-layer ratios: recipe validation (the ``layer_ratios`` parameter's check),
    pruning, the estimator, diagnose and the Layers view. A bad entry raises :class:`RecipeError`
    naming ``where``; with ``skip_bad`` (a half-typed entry in a GUI field) it is left out."""
    out: dict[str, float] = {}
    for item in items or []:
        name, sep, value = str(item).rpartition("=")
        name = name.strip()
        try:
            ratio = float(value)
        except ValueError:
            ratio = float("nan")
        if not sep or not name or not 0.0 <= ratio <= MAX_RATIO:
            if skip_bad:
                continue
            raise RecipeError(f"'{where}': {item!r} must be \"layer=ratio\" with a ratio in [0, {MAX_RATIO}] "
                              "(e.g. \"features.3=0.25\"; 0 keeps the layer whole)")
        out[name] = ratio
    return out


def apply(handle: ModelHandle, params: dict[str, Any], data: Dataset | None,
          progress: Progress) -> ModelHandle:
    params = TECHNIQUE.complete(params)  # a validated step's, or a direct caller's partial ones
    original = handle.torch_module()
    if isinstance(original, torch.jit.ScriptModule):  # compiled: no layer can be edited or copied
        raise TugboatError("pruning cannot edit a TorchScript module (its layers are compiled); give the "
                           "model as ONNX, a .pt2 program or a state_dict", path=handle.source)
    example = tuple(handle.example_inputs(2))
    probe = original
    if isinstance(original, torch.fx.GraphModule) and not any(isinstance(m, _prunable_types())
                                                                for m in original.modules()):
        probe = copy.deepcopy(original)  # a MatMul-only classifier becomes a Linear once normalised
        _normalise(probe, example)
    if not any(isinstance(m, _prunable_types()) for m in probe.modules()):
        raise TugboatError("the model has no Conv or Linear weights to prune", path=handle.source)
    run = _apply_unstructured if params["method"] == "unstructured" else _apply_structured
    new = run(handle, params, data, progress, example)
    progress.update(1.0, "done")
    return new


def _apply_unstructured(handle: ModelHandle, params: dict[str, Any], data: Dataset | None,
                        progress: Progress, example) -> ModelHandle:
    original = handle.torch_module()
    reference = frozen_copy(original)
    overrides = parse_layer_ratios(params["layer_ratios"])
    progress.update(0.0, "magnitude pruning")
    model = prune_unstructured_module(original, params["ratio"], scope=params["scope"],
                                      ignored=list(params["ignored"]), permanent=False, per_layer=overrides)
    progress.update(0.5, "pruned")
    notes: list[str] = []
    tuned: dict[str, Any] = {}
    history = _finetune_after(handle, model, params, data, progress.sub(0.5, 1.0, "fine-tuning: "), reference,
                              notes, tuned)
    make_permanent(model)
    zeros = sum(int((m.weight == 0).sum()) for m in model.modules() if isinstance(m, _prunable_types()))
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, _prunable_types()))
    new = handle.derive(module=model, step={"technique": "prune", **params})
    new.info.update({"method": "unstructured", "pruning": {
        "method": "unstructured", "ratio": params["ratio"], "scope": params["scope"],
        "weights_zeroed": zeros, "weights": weights, "achieved_weight_sparsity": zeros / max(1, weights),
        "layer_ratios": overrides, "finetune": history, **tuned}})
    _add_step_note(new, tuned)
    new.warnings.extend(n for n in [*notes, DENSE_RUNTIME_NOTE] if n not in new.warnings)
    return new


def _allocate(handle: ModelHandle, params: dict[str, Any], data: Dataset | None, progress: Progress,
              example) -> tuple[dict[str, float] | None, list[dict[str, Any]] | None]:
    """Per-layer ratios: measured sensitivity's (``allocation = "sensitivity"``), then the user's."""
    per_layer, rows = None, None
    importance, ign = params["importance"], list(params["ignored"]) or None
    if params["allocation"] == "sensitivity":
        rows = layer_sensitivity(handle, data, progress=progress.sub(0.0, 0.35, "sensitivity: "),
                                 importance="l1" if importance in ("taylor", "random") else importance,
                                 ignored=ign)
        per_layer = sensitivity_allocation(handle.torch_module(), example, params["ratio"], rows, ignored=ign,
                                           importance="l1" if importance == "taylor" else importance,
                                           round_to=resolve_round_to(params["round_to"]))
    overrides = parse_layer_ratios(params["layer_ratios"])
    if overrides:  # the user's per-layer ratios win over the allocation's
        per_layer = {**(per_layer or {}), **overrides}
    return per_layer, rows


def _apply_structured(handle: ModelHandle, params: dict[str, Any], data: Dataset | None,
                      progress: Progress, example) -> ModelHandle:
    original = handle.torch_module()
    reference = frozen_copy(original)
    before_params = _deployed_params(handle)  # the deployed ONNX: buffer weights of converted graphs count
    ratio, importance, ign = params["ratio"], params["importance"], list(params["ignored"]) or None
    per_layer, rows = _allocate(handle, params, data, progress, example)
    multiple = resolve_round_to(params["round_to"])
    model = prune_structured_module(
        original, example, ratio, importance=importance, scope=params["scope"],
        ignored=ign, iterative_steps=params["iterative_steps"], round_to=multiple, per_layer=per_layer,
        data_batches=_data_batches(handle, data, reference) if importance == "taylor" else None,
        compensate=_compensation_batches(handle, data) if params["bias_compensation"] else None,
        progress=progress.sub(0.35, 0.5, "pruning: "))
    _check_shapes(handle, original, model, example)
    unchanged = _param_count(model) == _param_count(original) and ratio > 0
    recalibrated = 0
    if not unchanged and params["recalibrate_bn"] and data is not None:
        recalibrated = recalibrate_batchnorm(model, data, handle.input_names)
    # fine-tuning a model that was not pruned would change it under a name that says "pruned"
    notes: list[str] = []
    tuned: dict[str, Any] = {}
    history = [] if unchanged else _finetune_after(handle, model, params, data,
                                                   progress.sub(0.5, 1.0, "fine-tuning: "), reference, notes,
                                                   tuned)
    before_ch, after_ch = _channels_as_pruned(original, example), _channels(model)
    new = handle.derive(module=model, step={"technique": "prune", **params})
    new.warnings.extend(n for n in notes if n not in new.warnings)
    after_params = _deployed_params(new)
    new.info.update({"method": "structured", "pruning": {
        "method": "structured", "ratio": ratio, "importance": importance, "scope": params["scope"],
        "allocation": params["allocation"], "ignored": _with_head(original, example, ign),
        "round_to": params["round_to"], "channel_multiple": multiple,
        "params_before": before_params, "params_after": after_params,
        "achieved_param_ratio": after_params / max(1, before_params),
        "kept_channels": {n: {"before": before_ch[n], "after": after_ch.get(n, before_ch[n])} for n in before_ch},
        "per_layer_ratio": per_layer, "layer_ratios": parse_layer_ratios(params["layer_ratios"]),
        "attention_heads": _head_layers(model),
        "finetune": history, "batchnorm_recalibrated": recalibrated,
        "teacher_weight": params["teacher_weight"] if history else None, **tuned}})
    _add_step_note(new, tuned)
    if rows is not None:
        new.info["sensitivity"] = rows
    if unchanged:
        new.info[NO_CHANGE] = _why_unchanged(original, example, ign, params["round_to"], multiple, ratio,
                                             before_ch)
    return new


def _why_unchanged(original: nn.Module, example, ignored: list[str] | None, round_to: int | str, multiple: int,
                   ratio: float, channels: dict[str, int]) -> str:
    if not prunable_layers(original, example, ignored):
        return "its only Conv/Linear layers are the output layer and 'ignored' ones, which are kept"
    if multiple > 1:
        widest = max(channels.values(), default=0)
        shown = f"auto ({multiple}, measured on this CPU)" if round_to == "auto" else str(multiple)
        return f"with round_to = {shown} no layer could lose channels (the widest has {widest})"
    return f"ratio {ratio:g} removes less than one channel in every prunable layer"


def _check_shapes(handle: ModelHandle, original: nn.Module, pruned: nn.Module, example) -> None:
    with torch.no_grad():
        a = _forward(original.eval(), example)
        try:
            b = _forward(pruned.eval(), example)
        except Exception as exc:  # a layer torch-pruning could not follow (weights fed as inputs, ...)
            text = " ".join(str(exc).split())[:200]
            raise TugboatError(f"structured pruning left the model inconsistent ({text}); a layer it "
                               f"cannot follow is involved: add it to 'ignored' or use unstructured pruning",
                               path=handle.source) from None
    if a.shape != b.shape:
        raise TugboatError(f"structured pruning changed the output shape from {tuple(a.shape)} to "
                           f"{tuple(b.shape)}; add the output layer to 'ignored'", path=handle.source)


# --- the technique: its hooks and its one schema -----------------------------------------------------

def _estimate(step: dict[str, Any], est) -> bool:
    """The instant estimate (:class:`tugboat.engine.techniques.estimate.EstimateState`): the channels each layer
    keeps (structured) or the share of its weights zeroed (unstructured)."""
    if not est.profile.torch:
        return False
    per_layer = parse_layer_ratios(step["layer_ratios"], skip_bad=True)
    if step["method"] == "structured":
        if step["scope"] == "global" or step["allocation"] == "sensitivity":
            est.approximate.append("per-layer ratios vary; estimated as uniform")
        est.prune_channels(step["ratio"], step["ignored"], resolve_round_to(step["round_to"]), per_layer)
    else:
        est.sparsify(step["ratio"], step["ignored"], per_layer)
    return True


def _memory(step: dict[str, Any], mem) -> None:
    """Memory phases (:class:`tugboat.engine.measuring.memory.StepMemory`): fine-tuning, when there is any."""
    if step["finetune_epochs"] > 0:
        mem.training("fine-tuning")


_FT = ("unstructured", "structured")
TECHNIQUE = Technique(
    name="prune",
    title="Pruning",
    summary="Remove the weights or channels that matter least, then fine-tune to recover accuracy.",
    methods={
        "structured": "remove whole channels, hidden units and head dimensions: smaller and faster",
        "unstructured": "zero the smallest weights: smaller only when compressed, not faster",
    },
    default_method="structured",
    params=[
        Param("ratio", "float", 0.5, "share of channels (structured) or weights (unstructured) removed",
              minimum=0.0, maximum=MAX_RATIO, short="r"),
        Param("scope", "choice", "uniform", "uniform: same ratio in every layer (structured) / "
              "layer: per layer (unstructured); global: rank all layers together",
              choices=("uniform", "global", "layer")),
        Param("importance", "choice", "l1", "how channels are ranked: weight magnitude (l1, l2), "
              "gradient x weight (taylor), or random as a control", choices=IMPORTANCES,
              methods=("structured",)),
        Param("ignored", "list", [], "layer names never pruned (the classifier head always is kept)"),
        Param("layer_ratios", "list", [], "per-layer ratios that override the ratio, as "
              "\"layer=ratio\" (e.g. \"features.3=0.25\"; 0 keeps the layer whole); set from the "
              "Layers view", check=parse_layer_ratios),
        Param("iterative_steps", "int", 1, "prune in this many smaller steps", minimum=1, maximum=20,
              methods=("structured",)),
        Param("round_to", "int", "auto", "keep channel counts a multiple of this (0: any); auto: the "
              "multiple this CPU's kernels run fast (8 or 16, measured once and cached); each pruned "
              "layer keeps the nearest multiple to what the ratio asks", minimum=0, maximum=256,
              methods=("structured",), auto=True),
        Param("allocation", "choice", "uniform", "uniform: the ratio everywhere; sensitivity: less "
              "where pruning hurts, more where it does not (measured per layer first)",
              choices=("uniform", "sensitivity"), methods=("structured",)),
        Param("bias_compensation", "bool", True, "move each removed channel's mean activation on the "
              "training data into the next layer's bias (keeps networks whose BatchNorm was folded "
              "into the convolutions, as in every ONNX export, from drifting)", methods=("structured",)),
        Param("finetune_epochs", "int", 2, "epochs of fine-tuning after pruning (0: none)",
              minimum=0, maximum=200, methods=_FT),
        Param("lr", "float", "auto", "fine-tuning learning rate (cosine decay to 0 over the epochs); "
              "auto: a short probe picks the rate (the optimizer's usual one, 1/10 or 1/100 of it: 3e-3, "
              "3e-4, 3e-5 for adam and adamw, 0.03 .. 3e-4 for sgd) whose few steps lower the fine-tuning "
              "loss on held-out rows most: the usual rate for a small CNN, about 100x less for a "
              "pretrained transformer", minimum=1e-7, maximum=1.0, log_scale=True, methods=_FT, auto=True),
        Param("optimizer", "choice", "adamw", "fine-tuning optimizer (sgd: momentum 0.9, Nesterov: "
              "recovered a pruned CNN with labels best, but collapsed a text detector's probability "
              "map; see docs/techniques/pruning.md)", choices=OPTIMIZERS, methods=_FT),
        Param("teacher_weight", "float", 0.5, "share of the fine-tuning loss that copies the original "
              "(unpruned) model's outputs (distillation: KL on softened scores, MSE for other outputs); "
              "the rest fits the labels. 0: labels only. Without labels it is always 1",
              minimum=0.0, maximum=1.0, methods=_FT),
        Param("teacher_temperature", "float", 1.0, "softening of the original's class scores for "
              "distillation during fine-tuning (higher: more weight on near-miss classes)",
              minimum=1.0, maximum=20.0, methods=_FT),
        Param("augment", "bool", True, "shift images by up to a pixel during fine-tuning; the "
              "original model labels each shifted batch (more to learn from on small data sets)",
              methods=_FT),
        Param("recalibrate_bn", "bool", True, "re-estimate BatchNorm statistics on training data "
              "right after pruning (the removed channels leave them stale)", methods=("structured",)),
        Param("batch_size", "int", 32, "fine-tuning batch size (smaller: more steps per epoch)",
              minimum=1, maximum=8192, methods=_FT),
        Param("max_grad_norm", "float", CLIP_DEFAULT, "clip the fine-tuning gradients to this total norm "
              "before each step (0: no clipping); keeps networks without BatchNorm (ONNX exports, "
              "where it is folded away) from being thrown off by their first large gradients",
              minimum=0.0, maximum=1000.0, methods=_FT),
        Param("device", "choice", DEFAULT_TRAINING, "fine-tuning " + DEVICE_HELP, choices=DEVICE_CHOICES,
              methods=_FT),
    ],
    apply=apply,
    needs_torch=True,
    estimate=_estimate,
    memory=_memory,
)
