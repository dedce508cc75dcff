"""LoRA+: a larger learning rate for B than for A (Hayou, Ghosh & Yu 2024, "LoRA+: Efficient Low
Rank Adaptation of Large Models", https://arxiv.org/abs/2402.12354).

Rule: with LoRA's ``W' = W + s B A``, train B with ``eta_B = loraplus_lr_ratio * eta_A``. The
paper shows that equal learning rates are inefficient for wide models (feature learning needs
B to move faster than A) and that a ratio of about 16 (2**4) works well for most tasks,
improving both speed (up to ~2x) and final quality at the same compute. Use it in place of a
plain optimizer whenever you train LoRA or DoRA adapters; it costs nothing extra. The ratio
matters more on harder tasks (where the model must change its features); there, a base
learning rate about half the usual LoRA one is a good start.

This builds the parameter groups exactly as ``peft.optimizers.create_loraplus_optimizer``
(which follows the authors' reference code, github.com/nikhil-ghosh-berkeley/loraplus):

- ``B`` of every LoRA/DoRA delta on a linear/conv layer, and every other trainable 1-D tensor
  (DoRA magnitudes, trained biases, norm weights of saved modules): ``lr * loraplus_lr_ratio``;
  those inside ``nn.LayerNorm`` modules or registered as ``bias`` get no weight decay.
- ``A`` and B of deltas on embedding layers: ``loraplus_lr_embedding``.
- Every other trainable tensor (``A`` of non-embedding deltas, 2-D+ tensors of saved module
  copies): ``lr``.

Deltas are found structurally (``LoraDelta`` instances in the model's ``DeltaLayer``s), never by
parameter name.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..state import delta_layers
from .lora import GROUPINGS, LoraDelta

_WHERE = "loraplus_optimizer"


def _number(field: str, value: float, fix: str, zero_ok: bool = False) -> None:
    """Raise a ConfigError unless ``value`` is a number > 0 (>= 0 with ``zero_ok``)."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or not (value >= 0 if zero_ok else value > 0):
        raise ConfigError(_WHERE, field, value, f"it must be a number {'>=' if zero_ok else '>'} 0", fix)


def _delta_roles(model: nn.Module) -> tuple[set[int], set[int], set[int]]:
    """Ids of (every LoRA/DoRA A and B, B on non-embedding layers, A and B on embedding layers)."""
    lora_ids: set[int] = set()
    b_ids: set[int] = set()
    embedding_ids: set[int] = set()
    for _, layer in delta_layers(model):
        for delta in layer.deltas.values():
            if not isinstance(delta, LoraDelta):
                continue
            lora_ids.update((id(delta.A), id(delta.B)))
            if delta.base.kind == "embedding":
                embedding_ids.update((id(delta.A), id(delta.B)))
            else:
                b_ids.add(id(delta.B))
    return lora_ids, b_ids, embedding_ids


def _no_decay_ids(model: nn.Module) -> set[int]:
    """peft's rule: no weight decay for tensors of LayerNorm modules or registered as ``bias``."""
    return {id(param) for module in model.modules() for name, param in module.named_parameters(recurse=False)
            if isinstance(module, nn.LayerNorm) or name == "bias"}


def _grouped(model: nn.Module) -> tuple[dict[str, list[nn.Parameter]], bool]:
    """The trainable parameters by LoRA+ group, and whether any LoRA/DoRA tensor trains."""
    lora_ids, b_ids, embedding_ids = _delta_roles(model)
    no_decay = _no_decay_ids(model)
    groups: dict[str, list[nn.Parameter]] = {
        "loraplus_A": [], "loraplus_embedding": [], "loraplus_B": [], "loraplus_B_no_decay": []}
    trains_lora = False
    for param in model.parameters():  # each shared parameter once
        if not param.requires_grad:
            continue
        trains_lora = trains_lora or id(param) in lora_ids
        if id(param) in embedding_ids:
            groups["loraplus_embedding"].append(param)
        elif id(param) in b_ids or param.ndim == 1:
            groups["loraplus_B_no_decay" if id(param) in no_decay else "loraplus_B"].append(param)
        else:
            groups["loraplus_A"].append(param)
    return groups, trains_lora


def loraplus_optimizer(
    model: nn.Module,
    lr: float,
    loraplus_lr_ratio: float = 16.0,
    loraplus_lr_embedding: float = 1e-6,
    weight_decay: float = 0.0,
    optimizer_class: type[torch.optim.Optimizer] = torch.optim.AdamW,
    **optimizer_kwargs: Any,
) -> torch.optim.Optimizer:
    """An optimizer over the model's trainable parameters with LoRA+ learning rates.

    LoRA+ (Hayou et al. 2024) trains each adapter's B with ``eta_B = loraplus_lr_ratio * eta_A``
    where ``eta_A = lr``; the paper recommends ``loraplus_lr_ratio`` around 16 (larger for harder
    tasks, with ``lr`` about half a usual LoRA learning rate). Use it for any LoRA or DoRA
    training run as a drop-in replacement for ``optimizer_class(params, lr=lr)``.

    Groups (as peft's ``create_loraplus_optimizer``; empty groups are left out; each group has a
    ``"name"``):

    - ``"loraplus_A"``: A of non-embedding deltas and every other trainable tensor of 2+
      dimensions (e.g. saved module copies); ``lr``, ``weight_decay``.
    - ``"loraplus_embedding"``: A and B of deltas on embedding layers; ``loraplus_lr_embedding``,
      ``weight_decay``.
    - ``"loraplus_B"``: B of non-embedding deltas and every trainable 1-D tensor (DoRA magnitudes,
      biases, norm weights); ``lr * loraplus_lr_ratio``, ``weight_decay``.
    - ``"loraplus_B_no_decay"``: the tensors of the previous group that are biases or belong to
      an ``nn.LayerNorm``; ``lr * loraplus_lr_ratio``, weight decay 0.

    Args:
        model: a model with deltatune LoRA/DoRA adapters (``dt.attach`` / ``dt.load(trainable=True)``).
        lr: the base learning rate ``eta_A``.
        loraplus_lr_ratio: ``eta_B / eta_A``; 16 is the paper's recommendation, values >= 1 make sense.
        loraplus_lr_embedding: the learning rate of adapters on embedding layers.
        weight_decay: weight decay of every group but the no-decay one.
        optimizer_class: the optimizer to build (any ``torch.optim.Optimizer`` taking param groups).
        **optimizer_kwargs: passed to ``optimizer_class`` (betas, eps, ...).

    Raises:
        ConfigError: an argument is out of range, or the model has no trainable LoRA parameters.
    """
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
        raise ConfigError(_WHERE, "optimizer_class", optimizer_class, "it is not a torch.optim.Optimizer subclass",
                          "pass a class such as torch.optim.AdamW")
    if "params" in optimizer_kwargs:
        raise ConfigError(_WHERE, "params", "...", "the parameters are taken from the model",
                          "drop params from the keyword arguments")
    param_groups = loraplus_groups(model, lr, loraplus_lr_ratio, loraplus_lr_embedding, weight_decay)
    return optimizer_class(param_groups, **{"lr": lr, **optimizer_kwargs})


def loraplus_groups(model: nn.Module, lr: float, loraplus_lr_ratio: float = 16.0,
                    loraplus_lr_embedding: float = 1e-6, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """The parameter groups of ``loraplus_optimizer`` (same arguments, same checks), for an optimizer
    built elsewhere: ``deltatune train --loraplus-lr-ratio R`` builds its AdamW over these."""
    _number("lr", lr, "pass the base (A) learning rate, e.g. lr=2e-4")
    _number("loraplus_lr_ratio", loraplus_lr_ratio, "pass eta_B / eta_A, e.g. loraplus_lr_ratio=16")
    _number("loraplus_lr_embedding", loraplus_lr_embedding, "pass e.g. loraplus_lr_embedding=1e-6")
    _number("weight_decay", weight_decay, "pass e.g. weight_decay=0.0", zero_ok=True)
    groups, trains_lora = _grouped(model)
    if not trains_lora:
        raise ConfigError(_WHERE, "model", type(model).__name__, "it has no trainable LoRA/DoRA parameters",
                          "attach a LoRA adapter with dt.attach(model, dt.LoraConfig(...)) (or dt.load(..., "
                          "trainable=True)) before building the optimizer")

    settings = {
        "loraplus_A": (lr, weight_decay),
        "loraplus_embedding": (loraplus_lr_embedding, weight_decay),
        "loraplus_B": (lr * loraplus_lr_ratio, weight_decay),
        "loraplus_B_no_decay": (lr * loraplus_lr_ratio, 0.0),
    }
    return [{"name": name, "params": params, "lr": settings[name][0], "weight_decay": settings[name][1]}
            for name, params in groups.items() if params]


def _recipe_groups(model: nn.Module, lr: float, ratio: float, weight_decay: float) -> list[dict[str, Any]]:
    """``--loraplus-lr-ratio``: peft's default embedding rate, the run's lr and weight decay."""
    return loraplus_groups(model, lr, ratio, weight_decay=weight_decay)


GROUPINGS["loraplus"] = _recipe_groups
