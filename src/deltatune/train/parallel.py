"""The trainer's glue to data parallelism (``distributed.py``) and to FSDP2 sharding (``fsdp.py``).

Data parallel, each rank scales its loss by its share of the global loss terms (rows, or labelled
tokens: ``Task.loss_weight``), and the adapter gradients are averaged once per optimizer step (none on
the other micro-batches of an accumulation), so an N-process run computes the update of a 1-process
run with N times the micro-batch. Every rank then holds the same adapter; rank 0 alone writes.

Sharded (``TrainConfig.fsdp``), FSDP2 averages the gradients in the last backward of a step, and every
rank joins every gather of the adapter and optimizer states (saves, checkpoints) while rank 0 writes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from ..errors import TrainingError
from . import distributed, fsdp
from .config import TrainConfig
from .prepare import trainable
from .tasks.base import Batch, Task, tokens_in


def shard_if_asked(model: nn.Module, config: TrainConfig, optimizer: torch.optim.Optimizer | None) -> bool:
    """Shard ``model`` with FSDP2 when ``config.fsdp`` asks (before an optimizer is built over its
    parameters); whether the model is sharded now."""
    if config.fsdp and not fsdp.sharded_here(model):  # the command line may have sharded it (meta init)
        if optimizer is not None:
            raise TrainingError("with --fsdp the trainer shards the model and then builds the optimizer; "
                                "do not pass an optimizer (or shard the model yourself, without --fsdp)")
        fsdp.shard(model, trainable(model), config.bf16)
    return fsdp.is_sharded(model)


def joins_saves(world: distributed.World, sharded: bool) -> bool:
    """Whether this rank takes part in saving the adapter: rank 0 writes; sharded, every rank gathers."""
    return world.main or sharded


def whole(model: nn.Module, sharded: bool, write_back: bool = False) -> AbstractContextManager[Any]:
    """Sharded: whole copies of the trainable parameters (``fsdp.whole_trainables``); else nothing to do."""
    return fsdp.whole_trainables(model, write_back=write_back) if sharded else contextlib.nullcontext()


def optimizer_state(optimizer: torch.optim.Optimizer, sharded: bool) -> dict[str, Any]:
    """The optimizer's state, sharded or not stored whole, as one process stores it."""
    state = optimizer.state_dict()
    return fsdp.gather_optimizer_state(optimizer, state) if sharded else state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any], sharded: bool) -> None:
    """Load a whole optimizer state (``optimizer_state``) and, sharded, cut it to this rank's shards."""
    optimizer.load_state_dict(state)
    if sharded:
        fsdp.shard_optimizer_state(optimizer)


def global_loss(value: float, batch: Batch, task: Task, world: distributed.World,
                device: torch.device) -> tuple[float, float, int]:
    """(the loss of the global micro-batch, this rank's loss scale, the global micro-batch's tokens).

    The global loss averages all ranks' loss terms (rows, or labelled tokens), so this rank's share
    is its terms over all terms; times the world size, since the gradient sync averages over ranks.
    """
    tokens = tokens_in(batch)
    if not world.distributed:
        return value, 1.0, tokens
    weight = task.loss_weight(batch)
    weighted = value * weight if weight else 0.0
    total_weight, total_loss, total_tokens = distributed.all_reduce_sum([weight, weighted, tokens], device)
    if total_weight == 0:
        return math.nan, 0.0, int(total_tokens)
    return total_loss / total_weight, weight * world.size / total_weight, int(total_tokens)


def sync_gradients(params: Sequence[nn.Parameter], sharded: bool) -> None:
    """Average the gradients over the ranks once per step (accumulation needs no traffic in between)."""
    if not sharded:  # FSDP2 reduce-scattered (averaged) them in the last backward
        distributed.all_reduce_mean(params)
