"""Which training rows micro-batch ``k`` holds: the data position of a run, and so of its checkpoints.

The data order is a pure function of (seed, epoch, position): epoch ``e`` visits the training
features in the order of ``randperm(n)`` drawn from a generator seeded with ``seed + e``, and
only whole micro-batches are used. Together with the optimizer, scheduler and random-generator
states stored in a checkpoint, this is what makes 10 steps + resume + 10 steps give the same
adapter as 20 straight steps. A stream (``stream.py``) is read in its own order instead.

Under torchrun (``WORLD_SIZE`` > 1) global micro-batch ``k`` is the 1-process micro-batch of
``batch_size x world size`` rows, and rank ``r`` takes its ``r``-th slice of ``batch_size`` rows.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, TypeAlias, cast

import torch

from ..errors import TrainingError
from . import distributed
from .config import TrainConfig
from .stream import FeatureStream, StreamBatches, streamed_steps
from .tasks.base import Batch, Features, Task


def planned_steps(num_examples: int, config: TrainConfig, world_size: int = 1) -> int:
    """The optimizer steps a run of ``config`` makes over ``num_examples`` training examples
    (on ``world_size`` processes, each micro-batch takes ``batch_size`` rows per process)."""
    rows = config.batch_size * world_size
    micro_batches_per_epoch = num_examples // rows
    if micro_batches_per_epoch == 0:
        across = f" ({config.batch_size} per process x {world_size} processes)" if world_size > 1 else ""
        raise TrainingError(f"{num_examples} training examples are fewer than one batch of "
                            f"{rows}{across}; lower --batch-size or add data")
    steps_per_epoch = max(1, micro_batches_per_epoch // config.grad_accum)
    return config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))


class MicroBatches:
    """Micro-batch ``k`` of the endless, epoch-by-epoch shuffled stream of training features.

    With ``world`` processes the stream is the one of a single process with ``batch_size x world.size``
    rows per micro-batch, and this rank's micro-batch ``k`` is its ``world.rank``-th slice of it: the
    ranks together see exactly the rows of that single process, in the same steps.
    """

    def __init__(self, size: int, batch_size: int, seed: int, world: distributed.World | None = None) -> None:
        self.world = world or distributed.World()
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.per_epoch = size // (batch_size * self.world.size)
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def indices(self, k: int) -> list[int]:
        epoch, position = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.size, generator=generator)
        start = (position * self.world.size + self.world.rank) * self.batch_size
        return self._order[start:start + self.batch_size].tolist()


Source: TypeAlias = MicroBatches | StreamBatches
"""Where micro-batches come from: listed features (shuffled by epoch) or a stream (read in order)."""


def batch_source(features: list[Features] | FeatureStream, config: TrainConfig,
                 world: distributed.World) -> tuple[int, Source]:
    """(the run's optimizer steps, its micro-batches) for listed or streamed training ``features``."""
    if isinstance(features, FeatureStream):
        return streamed_steps(config.max_steps), StreamBatches(features, config.batch_size, world)
    return (planned_steps(len(features), config, world.size),
            MicroBatches(len(features), config.batch_size, config.seed, world))


def micro_batch(task: Task, source: Source, features: list[Features] | FeatureStream, k: int,
                device: torch.device) -> Batch:
    """This rank's micro-batch ``k``, collated and on ``device``."""
    if isinstance(source, StreamBatches):
        batch = task.collate(source.batch(k))
    else:  # listed features (only a FeatureStream comes with StreamBatches)
        listed = cast(list[Features], features)
        batch = task.collate([listed[i] for i in source.indices(k)])
    return {key: value.to(device) for key, value in batch.items()}


def check_same_batches(state: dict[str, Any], folder: Path, batch_size: int, world: distributed.World) -> None:
    """The data position of a checkpoint means the same rows only with the same global micro-batch
    (batch size x processes): 2 processes x 4 rows may resume as 1 x 8, not as 2 x 8."""
    stored = state.get("global_micro_batch")  # absent from older (one-process) checkpoints
    here = batch_size * world.size
    if stored is not None and int(stored) != here:
        raise TrainingError(f"{folder} was written by a run with {state.get('world_size', 1)} process(es) x "
                            f"{int(stored) // int(state.get('world_size', 1))} rows per micro-batch; this run has "
                            f"{world.size} x {batch_size}. Resume with a batch size and number of "
                            f"processes whose product is {stored}")
