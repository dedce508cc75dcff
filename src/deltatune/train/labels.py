"""The label vocabulary of a classification task, learned from the training rows.

Label names are strings (so the set round-trips through JSON), but the cells they come from
need not be: a JSON file may hold ``1`` or ``"1"``. Both would become the name "1", so one file
whose labels mix JSON types is an error rather than two classes silently merged into one; a
null label is an error too (it would otherwise train a class named "None").
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import DataError
from ..hf import from_pretrained

Cell = tuple[object, str]
"""A label cell and where it is (``file:line``, or ``source, row N``)."""


def _order(values: set[str]) -> list[str]:
    """Numeric labels in numeric order ("2" before "10"), otherwise alphabetical."""
    try:
        return sorted(values, key=float)
    except ValueError:
        return sorted(values)


def label_kind(value: object) -> str:
    """The type of a label cell: text, boolean, integer or decimal; 1 and 1.0 differ (as "1" and "1.0")."""
    if isinstance(value, str):
        return "text"
    if isinstance(value, bool):
        return "boolean"
    return "integer" if isinstance(value, int) else "decimal"


def label_name(value: object, where: str) -> str:
    """The name of a label cell; null, NaN, lists and objects are errors that say where."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise DataError(f"{where}: the label is null (no value). Give the row a label, or pass --skip-bad-rows to "
                        "skip and count rows with a null cell")
    if not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: a label must be text or a number, found {type(value).__name__} {value!r:.60}")
    return str(value)


def check_one_kind(cells: Iterable[Cell]) -> None:
    """Fail when the labels mix JSON types: 1 and "1" would both be named "1" and merge into one class."""
    first: dict[str, Cell] = {}
    for value, where in cells:
        kind = label_kind(value)
        first.setdefault(kind, (value, where))
        if len(first) > 1:
            (kind_a, (value_a, where_a)), (kind_b, (value_b, where_b)) = first.items()
            raise DataError(f"{where_b}: label {value_b!r} ({kind_b}) and label {value_a!r} at {where_a} ({kind_a}) "
                            "mix types; labels of mixed types are ambiguous (1 and \"1\" would be merged into "
                            "one class, 1 and 1.0 split into two). Write every label the same way: all quoted, "
                            "or all integers")


class LabelSet:
    """Label name <-> id; names are strings so the set round-trips through JSON unchanged."""

    def __init__(self, names: Sequence[str] = ()) -> None:
        self.names = list(names)
        self.ids = {name: i for i, name in enumerate(self.names)}

    @classmethod
    def learn(cls, cells: Iterable[Cell], source: str) -> LabelSet:
        """Every distinct label of the training cells, all of one JSON type; at least two are needed."""
        cells = list(cells)
        names = {label_name(value, where) for value, where in cells}
        check_one_kind(cells)
        ordered = _order(names)
        if len(ordered) < 2:
            raise DataError(f"{source}: classification needs at least two distinct labels; found {ordered}")
        return cls(ordered)

    def id(self, value: object, where: str) -> int:
        """The id of ``value``; a label never seen in training is an error naming the known ones."""
        name = label_name(value, where)
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
