"""What a task type is to the trainer: columns, model, encoding, batches, loss, metric.

One :class:`Task` subclass per task type (one file each). The trainer only calls the methods
below, so a new task type touches its own file and the list in ``tasks/__init__.py``.

A task is built from a tokenizer and options, learns what it needs from the training rows
(:meth:`Task.fit`, e.g. the label set), and can be written to and rebuilt from a small JSON
state (:meth:`Task.state`), which the run folder keeps so ``deltatune eval``/``predict`` can
rebuild the same model later.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...errors import DataError
from ..data import Row, Rows, drop_null_rows, require_columns

Features = dict[str, Any]
"""One encoded example: token ids and targets as plain Python lists and numbers."""

Batch = dict[str, Tensor]


class Task(ABC):
    """A task type: how rows become batches, how a batch becomes a loss, how a model is scored."""

    name: ClassVar[str]
    """The name on the command line, e.g. ``seq-cls``."""
    task_type: ClassVar[str]
    """peft's task type, written to adapter_config.json."""
    metric: str
    """The main metric (higher is better) that evaluation, early stopping and 'best' use. A class
    default; a task whose metric depends on its data (feature-extraction) sets it per instance."""
    columns: ClassVar[Mapping[str, str]]
    """Role -> default column name of the columns every row must have."""
    optional_columns: ClassVar[Mapping[str, str]] = {}
    """Role -> default column name of columns a row may have."""

    def __init__(self, tokenizer: Any, max_length: int = 128, column_map: Mapping[str, str] | None = None,
                 state: Mapping[str, Any] | None = None) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        known = {**self.columns, **self.optional_columns}
        unknown = sorted(set(column_map or {}) - set(known))
        if unknown:
            raise DataError(f"task {self.name}: unknown column role(s) {unknown}; roles: {sorted(known)}")
        self.column_map = {**known, **(column_map or {})}
        self.load_state(state or {})

    def column(self, role: str) -> str:
        """The column that holds ``role`` (after ``--columns`` mapping)."""
        return self.column_map[role]

    def check(self, rows: Rows) -> None:
        """Fail with a clear message if the rows lack a required column."""
        require_columns(rows, [self.column(role) for role in self.columns])

    def usable(self, rows: Rows, skip_bad_rows: bool = False) -> Rows:
        """``rows`` after :meth:`check`, less those with a null required cell: an error naming the row's
        file and line, or with ``skip_bad_rows`` skipped and counted like other bad rows."""
        self.check(rows)
        return drop_null_rows(rows, [self.column(role) for role in self.columns], skip_bad_rows)

    def fit(self, rows: Rows) -> None:
        """Learn what the task needs from the training rows (default: nothing)."""

    def state(self) -> dict[str, Any]:
        """What :meth:`fit` learned, as JSON-able data (default: nothing)."""
        return {}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`fit` learned (default: nothing)."""

    @abstractmethod
    def load_model(self, model_path: str, dtype: torch.dtype | None = None) -> nn.Module:
        """The pretrained model with this task's head, loaded offline from ``model_path``."""

    def saved_modules(self, model: nn.Module) -> list[str]:
        """Modules that must train fully and be saved with the adapter (the new head)."""
        return []

    @abstractmethod
    def encode(self, rows: Rows) -> list[Features]:
        """Tokenize rows into features (fails on rows the task cannot use)."""

    @abstractmethod
    def collate(self, features: Sequence[Features]) -> Batch:
        """Pad features into one batch of tensors."""

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """The training loss of one batch (default: the model's own loss from ``labels``)."""
        return model(**batch).loss

    def loss_weight(self, batch: Batch) -> int:
        """How many terms :meth:`loss` averages over in ``batch``: the labelled tokens of token labels
        (shifted by one for next-token prediction, as the model's loss shifts them), else the rows.

        Data-parallel training weighs each process's loss by it, so the loss of a step is the mean over
        the global batch. A loss that compares rows within a batch (in-batch negatives) is not such a
        mean; its processes each see their own rows only.
        """
        labels = batch.get("labels")
        if labels is not None and labels.dim() >= 2 and not labels.is_floating_point():
            counted = labels[..., 1:] if self.task_type == "CAUSAL_LM" else labels
            return int((counted != -100).sum())
        return len(next(iter(batch.values())))

    def outputs(self, model: nn.Module, features: Sequence[Features], batch_size: int) -> list[Any]:
        """What evaluation keeps of each feature, in the features' order: one small picklable value per
        feature (a predicted label, a loss sum and its token count, CPU tensors) that does not depend on
        which other features share its batch. Evaluation across ranks computes them on each rank's slice
        and gathers them; :meth:`score` turns the whole set's into metrics. A task without them (one that
        only overrides :meth:`evaluate`) is evaluated whole, on one rank."""
        raise NotImplementedError(f"task {self.name} keeps no per-row evaluation outputs")

    def score(self, features: Sequence[Features], outputs: Sequence[Any]) -> dict[str, float]:
        """The metrics of ``features`` from their :meth:`outputs` (in the same order); must include :attr:`metric`."""
        raise NotImplementedError(f"task {self.name} keeps no per-row evaluation outputs")

    def evaluate(self, model: nn.Module, features: Sequence[Features], batch_size: int) -> dict[str, float]:
        """Metrics on ``features``; must include :attr:`metric`."""
        return self.score(features, self.outputs(model, features, batch_size))

    @abstractmethod
    def predict(self, model: nn.Module, rows: Sequence[Row], batch_size: int = 32) -> list[Any]:
        """Predictions for raw rows (labels, spans, generated text or embeddings)."""


def tokens_in(batch: Batch) -> int:
    """Real (non-padding) tokens in a batch, for tokens/s."""
    mask = batch.get("attention_mask")
    if mask is not None:
        return int(mask.sum())
    ids = batch.get("input_ids")
    return int(ids.numel()) if ids is not None else 0


def batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """Consecutive slices of at most ``size`` items."""
    return [items[i:i + size] for i in range(0, len(items), size)]
