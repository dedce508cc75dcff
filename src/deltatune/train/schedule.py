"""Learning-rate schedules: linear warm-up from 0, then linear decay, cosine decay or constant."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def lr_factor(schedule: str, step: int, total: int, warmup: int) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based) of ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1.0 - progress)


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total: int,
                   warmup_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over ``total`` steps with ``warmup_ratio`` of them warming up."""
    warmup = int(total * warmup_ratio)
    factor: Callable[[int], float] = lambda step: lr_factor(schedule, step, total, warmup)  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
