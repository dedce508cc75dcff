"""The label vocabulary of a classification task, learned from the training rows."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import DataError
from ..hf import from_pretrained


def _order(values: set[str]) -> list[str]:
    """Numeric labels in numeric order ("2" before "10"), otherwise alphabetical."""
    try:
        return sorted(values, key=float)
    except ValueError:
        return sorted(values)


class LabelSet:
    """Label name <-> id; names are strings so the set round-trips through JSON unchanged."""

    def __init__(self, names: Sequence[str] = ()) -> None:
        self.names = list(names)
        self.ids = {name: i for i, name in enumerate(self.names)}

    @classmethod
    def learn(cls, values: Iterable[object], source: str) -> LabelSet:
        """Every distinct label in the training data; at least two are needed."""
        names = _order({str(v) for v in values})
        if len(names) < 2:
            raise DataError(f"{source}: classification needs at least two distinct labels; found {names}")
        return cls(names)

    def id(self, value: object, where: str) -> int:
        """The id of ``value``; a label never seen in training is an error naming the known ones."""
        name = str(value)
        if name not in self.ids:
            shown = self.names if len(self.names) <= 20 else self.names[:20] + ["..."]
            raise DataError(f"{where}: label {name!r} was not seen in the training data; labels seen: {shown}")
        return self.ids[name]

    def __len__(self) -> int:
        return len(self.names)


class LabelledTask:
    """For task types whose learned state is a label set (mix in before ``Task``).

    ``fit`` sets ``self.labels``; the run file keeps the names, and ``load_model`` builds a head
    of the right size whose config maps ids to those names (so a merged model folder says them).
    """

    labels: LabelSet

    def state(self) -> dict[str, Any]:
        return {"labels": self.labels.names}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.labels = LabelSet(state.get("labels", ()))

    def labelled_model(self, class_name: str, model_path: str, dtype: torch.dtype | None) -> nn.Module:
        """``class_name`` (a transformers Auto class) with a head for these labels, offline."""
        names = self.labels.names
        model: nn.Module = from_pretrained(class_name, model_path, num_labels=len(names), dtype=dtype,
                                           id2label=dict(enumerate(names)),
                                           label2id={n: i for i, n in enumerate(names)})
        return model
