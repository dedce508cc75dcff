"""Evaluation split across the ranks of a distributed run: each rank evaluates its slice of the rows,
the per-row outputs are gathered to every rank, and every rank scores the whole set.

Rows, not metrics, travel: most metrics do not average over slices (macro F1, entity F1, Spearman,
retrieval among all pairs, a loss per token), so each rank keeps its rows' :meth:`Task.outputs` and
the whole set's are put back in order before :meth:`Task.score`. The metrics are then those of one
process evaluating the whole set; only what a row's forward pass computes can move, by float rounding,
because the row shares its batch (and padding) with other rows than in one process.

Each rank takes a contiguous slice of ``ceil(rows / world size)`` rows; the last slices are filled up
with rows from the start of the set, whose outputs are dropped. Contiguous, so the gathered slices
in rank order are the set in its order (the filling last, cut off by one slice); equal in length, so
every rank runs the same number of forward passes, which a sharded (FSDP2) model needs, since each of
its forward passes is a collective.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from . import distributed
from .distributed import World
from .tasks.base import Features, Task


def splits(task: Task) -> bool:
    """Whether ``task`` keeps per-row evaluation outputs (else it is evaluated whole, on one rank)."""
    return type(task).outputs is not Task.outputs


def shard(count: int, world: World) -> list[int]:
    """The indices of this rank's ``ceil(count / size)`` rows: its contiguous slice, filled up from the start."""
    per_rank = -(-count // world.size)
    start = world.rank * per_rank
    return [index % count for index in range(start, start + per_rank)]


def evaluate(task: Task, model: nn.Module, features: Sequence[Features], batch_size: int) -> dict[str, float]:
    """The task's metrics on ``features``, this rank evaluating its slice (every rank must call it)."""
    mine = [features[i] for i in shard(len(features), distributed.current())]
    slices: list[list[Any]] = distributed.all_gather_object(task.outputs(model, mine, batch_size))
    outputs = [output for part in slices for output in part][:len(features)]
    return task.score(features, outputs)
