"""What the trainer adds to a micro-batch's loss besides the task's own, and to its log.

Two sources: loss terms the caller passes (a regulariser on the adapter's parameters), and modules of
the model that record a loss and statistics during the forward (:class:`TrainingSignals`: a token
router's load-balancing loss). The trainer finds those modules itself, so no method is named here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from torch import Tensor, nn

LossTerm = Callable[[], Tensor]
"""A scalar added to every micro-batch's loss (e.g. a regulariser on the adapter's parameters)."""


@runtime_checkable
class TrainingSignals(Protocol):
    """A module of the model that reports to the trainer from inside the forward (a token router's
    load-balancing loss and load statistics): each method returns what was recorded since its last
    call. The trainer adds ``take_loss()`` to each micro-batch's loss and ``take_statistics()`` to the
    "train" records of metrics.jsonl; it finds these modules itself, so no method is named here."""

    def take_loss(self) -> Tensor | None: ...

    def take_statistics(self) -> dict[str, float]: ...


def find_signals(model: nn.Module) -> list[TrainingSignals]:
    """The modules of ``model`` that report to the trainer, in the model's order."""
    return [m for m in model.modules() if isinstance(m, TrainingSignals)]


def signal_loss(signals: Sequence[TrainingSignals]) -> Tensor | None:
    """The sum of what ``signals`` recorded for the loss since the last call (None: nothing)."""
    taken = [t for t in (s.take_loss() for s in signals) if t is not None]
    return sum(taken[1:], taken[0]) if taken else None


def signal_statistics(signals: Sequence[TrainingSignals]) -> dict[str, float]:
    """What ``signals`` recorded for the log since the last call, merged into one record."""
    return {k: v for s in signals for k, v in s.take_statistics().items()}


def full_loss(task_loss: Callable[[], Tensor], terms: Sequence[LossTerm], signals: Sequence[TrainingSignals]) -> Tensor:
    """``task_loss()`` plus every loss term plus what ``signals`` recorded during that forward."""
    signal_loss(signals)  # dropped: recorded by forwards outside this micro-batch
    loss = task_loss()
    for term in terms:
        loss = loss + term()
    signalled = signal_loss(signals)
    return loss if signalled is None else loss + signalled
