"""What a model needs before it trains: its trainable parameters, an optimizer over them, and the
memory options of ``TrainConfig`` (gradient checkpointing, fused kernels, keeping freed memory)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ..errors import AdapterError, TrainingError
from ..fast import accelerate, retain_freed_memory
from ..layer import ADAPTER_PARTS, STATE_ATTR
from ..quant.model import packed_weight_values
from ..registry import GroupsFor
from .config import TrainConfig


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that train, in the model's order (a stable order for optimizer state)."""
    return [p for p in model.parameters() if p.requires_grad]


def base_parameters(model: nn.Module) -> int:
    """How many parameters the model has outside its adapters' own modules (each shared one once; a
    4-bit layer's weight counts as the values it stores)."""
    own = sum(p.numel() for name, p in model.named_parameters()
              if not any(part in ADAPTER_PARTS for part in name.split(".")[:-1]))
    return own + packed_weight_values(model)


def make_optimizer(model: nn.Module, config: TrainConfig,
                   param_groups: GroupsFor | None = None) -> torch.optim.Optimizer:
    """AdamW (fp32 or blockwise 8-bit states, ``config.optimizer``) over the trainable parameters: one
    group at ``config.lr``, or the groups ``param_groups`` builds (the method's recipe: a rate per group)."""
    params = trainable(model)
    if not params:
        raise TrainingError("the model has no trainable parameters: attach an adapter first (dt.attach)")
    groups = param_groups(model, config.lr, config.weight_decay) if param_groups is not None else None
    if groups is not None:
        check_groups_cover(groups, params)
    chosen: list[dict[str, Any]] | list[nn.Parameter] = groups if groups is not None else params
    if config.optimizer == "adamw8bit":
        from ..quant.optim import AdamW8bit

        return AdamW8bit(chosen, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(chosen, lr=config.lr, weight_decay=config.weight_decay)


def check_groups_cover(groups: list[dict[str, Any]], params: list[nn.Parameter]) -> None:
    """A method's groups must hold every trainable parameter exactly once and no frozen one: a parameter
    left out would silently not train, one listed twice would step twice."""
    listed = [id(p) for group in groups for p in group["params"]]
    if len(listed) != len(set(listed)) or set(listed) != {id(p) for p in params}:
        raise TrainingError(f"the method's optimizer groups list {len(listed)} parameter(s) ({len(set(listed))} "
                            f"distinct) for {len(params)} trainable ones; each trainable parameter must be in "
                            "exactly one group (a bug in the method's param_groups)")


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on activation recomputation so that it works with a frozen base.

    With the base frozen no input of a checkpointed block requires grad, and reentrant
    checkpointing then drops the adapter gradients ("element 0 of tensors does not require
    grad"). Making the embedding output require grad fixes that for either checkpoint flavour.
    """
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if enable is None:
        raise TrainingError(f"{type(model).__name__} has no gradient_checkpointing_enable(); "
                            "gradient checkpointing is supported on transformers models")
    enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    make_inputs_require_grad = getattr(model, "enable_input_require_grads", None)
    if make_inputs_require_grad is not None:
        make_inputs_require_grad()


def refuse_checkpointing(model: nn.Module) -> None:
    """Stop, before anything is written, when an active adapter cannot train with gradient checkpointing."""
    state = model.__dict__.get(STATE_ATTR)
    refusing = [n for n in state.active if not state.configs[n].trains_with_checkpointing()] if state else []
    if refusing:
        raise AdapterError(f"adapter(s) {refusing} cannot train with gradient checkpointing (every layer's recomputation "
                           "would see the state the adapter handed it once more); drop --gradient-checkpointing "
                           "(TrainConfig.gradient_checkpointing=False)")


def apply_memory_options(model: nn.Module, config: TrainConfig) -> None:
    """Gradient checkpointing, fused kernels (``accelerate``) and ``retain_freed_memory`` as ``config`` asks."""
    if config.gradient_checkpointing:  # checked first: nothing has changed the model yet
        refuse_checkpointing(model)
    if config.accelerate:  # it refuses an unsupported model before anything changes it
        accelerate(model)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if config.retain_freed_memory and not retain_freed_memory():
        # stacklevel 3: the warning names the caller of Trainer(...), as it did when the trainer warned itself
        warnings.warn("retain_freed_memory needs glibc (Linux); the allocator is left as it is", stacklevel=3)
