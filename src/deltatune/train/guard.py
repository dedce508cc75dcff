"""Divergence checks on every training step, so that nothing is ever saved from a broken state.

A step stops the run (TrainingError) when

* the loss of a micro-batch is NaN/inf, or the gradient norm is: the update is not applied;
* after the update, a trainable parameter is NaN/inf, their joint L2 norm grew by more than
  ``max_norm_growth`` (default 10x; a norm below 1 counts as 1) in this one step, or a
  trainable value exceeds ``max_param_value`` in magnitude (default 1e4): the update is in the
  model in memory, but no checkpoint, ``best/`` or final adapter is written from it.

The checks run before the step is counted or saved, so every checkpoint on disk passed them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..errors import TrainingError
from ..io import gathered
from .checkpoint import latest_checkpoint
from .config import TrainConfig


@torch.no_grad()
def parameter_stats(params: Sequence[Tensor]) -> tuple[float, float]:
    """(joint L2 norm, largest magnitude) of ``params``, in fp32, with one device sync; NaN/inf propagate."""
    params = [p for p in params if p.numel()]  # the max of an empty tensor is undefined
    if not params:
        return 0.0, 0.0
    device = params[0].device
    # a sharded (DTensor) parameter's norm is reduced over the ranks: ``gathered`` makes it a plain tensor
    norms = torch.stack([gathered(torch.linalg.vector_norm(p, dtype=torch.float32)).to(device) for p in params])
    peaks = torch.stack([gathered(torch.linalg.vector_norm(p, ord=math.inf, dtype=torch.float32)).to(device)
                         for p in params])
    norm, peak = torch.stack([torch.linalg.vector_norm(norms), peaks.max()]).tolist()
    return norm, peak


def gradient_norm(params: Sequence[Tensor]) -> float:
    """The joint L2 norm of the gradients that exist (0.0 when there are none)."""
    return parameter_stats([p.grad for p in params if p.grad is not None])[0]


def clipped_gradient_norm(params: Sequence[Tensor], max_grad_norm: float) -> float:
    """The gradients' joint L2 norm, clipping them to ``max_grad_norm`` first when it is positive."""
    if max_grad_norm > 0:
        return float(gathered(torch.nn.utils.clip_grad_norm_(params, max_grad_norm)))
    return gradient_norm(params)


def divergence(before: float, after: float, peak: float, config: TrainConfig) -> str:
    """Why parameters of norm ``after`` (``before`` one step earlier) and largest magnitude ``peak`` have
    diverged, or "" when they have not. See the module docstring for the criterion."""
    if not math.isfinite(peak):  # the largest magnitude: the norm may overflow to inf while every value is finite
        return f"a trainable parameter became {peak}"
    growth = config.max_norm_growth
    if growth and after > growth * max(before, 1.0):
        return (f"the trainable parameters' norm grew more than max_norm_growth={growth:g}x in one update "
                f"(from {before:.4g} to {after:.4g})")
    if config.max_param_value and peak > config.max_param_value:
        return (f"a trainable parameter exceeded max_param_value={config.max_param_value:g} in magnitude "
                f"(reached {peak:.4g})")
    return ""


def stop_error(why: str, applied: bool, step: int, checkpoints: Path) -> TrainingError:
    """The TrainingError of a diverged step, naming it and the last checkpoint (all on disk are good)."""
    latest = latest_checkpoint(checkpoints)
    kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint was written yet"
    done = ("the update is in the model in memory, but nothing was saved from it" if applied
            else "the update was not applied")
    return TrainingError(f"{why} at step {step}; {done} and training stopped ({kept}). "
                         "Try a lower --lr, --max-grad-norm 1.0, or fp32 instead of --bf16.")


def check_resumed(params: Sequence[Tensor], config: TrainConfig, folder: Path) -> None:
    """A checkpoint written before divergence was checked on every step may hold broken weights."""
    norm, peak = parameter_stats(params)
    why = divergence(norm, norm, peak, config)
    if why:
        raise TrainingError(f"{folder} is not a good checkpoint: {why}. Resume from an earlier one (write its "
                            f"name into {folder.parent / 'latest'}), or start afresh without --resume")
