"""Learning-rate schedules, equal to ``transformers.get_scheduler``'s step by step.

A run here and a Hugging Face ``Trainer`` run with the same ``warmup_ratio`` and schedule use the
same learning rate at every optimizer step (tested against transformers), so the two compare 1:1:

* warm-up: ``ceil(total * warmup_ratio)`` steps (``TrainingArguments.get_warmup_steps``), the
  factor rising as ``step / warmup`` from 0 (the first step of a warmed-up run uses lr 0);
* then ``linear`` (transformers' "linear"), ``cosine`` ("cosine", half a cycle) or ``constant``
  ("constant_with_warmup"; with no warm-up it is "constant").

The expressions are transformers' own, in the same order, so the factors are the same floats.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def warmup_steps(total: int, warmup_ratio: float) -> int:
    """How many of ``total`` steps warm up: rounded up, as transformers' ``get_warmup_steps`` does."""
    return math.ceil(total * warmup_ratio)


def lr_factor(schedule: str, step: int, total: int, warmup: int) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based) of ``total``."""
    if step < warmup:
        return float(step) / float(max(1, warmup))
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = float(step - warmup) / float(max(1, total - warmup))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))
    return max(0.0, float(total - step) / float(max(1, total - warmup)))


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total: int,
                   warmup_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over ``total`` steps with ``warmup_ratio`` of them warming up."""
    warmup = warmup_steps(total, warmup_ratio)
    factor: Callable[[int], float] = lambda step: lr_factor(schedule, step, total, warmup)  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
