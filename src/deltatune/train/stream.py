"""Training on a streamed dataset (``datasets.IterableDataset``, any re-iterable of rows) without loading it whole.

A stream has no length, so the map-style trainer's shuffled epochs (``randperm(n)``) do not exist.
Its order is defined instead as:

* one epoch is one pass over the stream in the order it yields rows; before epoch ``e`` the stream's
  ``set_epoch(e)`` is called when it has one (a ``datasets`` stream shuffled with a seed then reshuffles
  its buffer deterministically per epoch);
* the passes are cut into global micro-batches of ``batch_size x world size`` consecutive features; a
  pass's last, incomplete one is dropped (as the map-style trainer uses only whole micro-batches);
* rank ``r`` of a data-parallel run takes the ``r``-th ``batch_size`` slice of each global micro-batch,
  so N processes see the rows one process with N times the batch would (every rank reads the stream);
* the run's length is ``TrainConfig.max_steps``, which a stream requires (epochs cannot be counted
  before the stream has been read); ``max_time`` can end it sooner.

Micro-batch ``k`` is thus a pure function of the stream and ``k``: resuming at step ``s`` re-reads the
stream from its start and skips the micro-batches before it (reading, not training, them).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from ..errors import TrainingError
from . import distributed
from .data import Rows
from .tasks.base import Features, Task


class FeatureStream:
    """The task's features of a re-iterable stream of rows, encoded ``chunk_rows`` rows at a time.

    The task must already know its labels (``task.fit`` on rows in memory: the evaluation rows, or a
    first slice of the stream), since a stream's label set is unknown until it has been read whole.
    """

    def __init__(self, task: Task, rows: Iterable[Mapping[str, Any]], chunk_rows: int = 256,
                 skip_bad_rows: bool = False, source: str = "stream") -> None:
        if chunk_rows < 1:
            raise TrainingError(f"chunk_rows={chunk_rows}: pass a positive number of rows to encode at a time")
        self.task, self.rows, self.chunk_rows = task, rows, chunk_rows
        self.skip_bad_rows, self.source = skip_bad_rows, source

    def epoch(self, number: int) -> Iterator[Features]:
        """The features of pass ``number`` over the stream, in stream order."""
        set_epoch = getattr(self.rows, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(number)
        chunk: list[dict[str, Any]] = []
        for row in self.rows:
            chunk.append(dict(row))
            if len(chunk) == self.chunk_rows:
                yield from self._encode(chunk)
                chunk = []
        if chunk:
            yield from self._encode(chunk)

    def _encode(self, chunk: list[dict[str, Any]]) -> list[Features]:
        return self.task.encode(self.task.usable(Rows(chunk, self.source), self.skip_bad_rows))


def stream_features(task: Task, rows: Iterable[Mapping[str, Any]], chunk_rows: int = 256,
                    skip_bad_rows: bool = False) -> FeatureStream:
    """Training features for :class:`~deltatune.train.Trainer` from a stream (see the module docstring)."""
    return FeatureStream(task, rows, chunk_rows, skip_bad_rows, type(rows).__name__)


class StreamBatches:
    """Micro-batch ``k`` of a :class:`FeatureStream`, read in order (going back re-reads from the start)."""

    def __init__(self, stream: FeatureStream, batch_size: int, world: distributed.World | None = None) -> None:
        self.stream, self.batch_size = stream, batch_size
        self.world = world or distributed.World()
        self._restart()

    def _restart(self) -> None:
        self._epoch, self._next = 0, 0  # the epoch being read; the micro-batch the reader yields next
        self._reader = self._micro_batches()

    def _micro_batches(self) -> Iterator[list[Features]]:
        rows = self.batch_size * self.world.size
        while True:
            batch: list[Features] = []
            whole = 0
            for feature in self.stream.epoch(self._epoch):
                batch.append(feature)
                if len(batch) == rows:
                    whole += 1
                    start = self.world.rank * self.batch_size
                    yield batch[start:start + self.batch_size]
                    batch = []
            if not whole:
                raise TrainingError(f"{self.stream.source}: pass {self._epoch} over the stream gave fewer than one "
                                    f"micro-batch of {rows} rows; lower the batch size or stream more data (a "
                                    "generator is read only once: pass an object iterated afresh each time)")
            self._epoch += 1

    def batch(self, k: int) -> list[Features]:
        """The features of this rank's part of global micro-batch ``k``."""
        if k < self._next:
            self._restart()
        while True:
            batch = next(self._reader)
            self._next += 1
            if self._next > k:
                return batch


def streamed_steps(max_steps: int) -> int:
    """The optimizer steps of a streamed run: ``max_steps``, which must be given."""
    if max_steps <= 0:
        raise TrainingError("a streamed dataset has no length to count epochs by: set TrainConfig.max_steps "
                            "(--max-steps); an epoch is one pass over the stream")
    return max_steps
