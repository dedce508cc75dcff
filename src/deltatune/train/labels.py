"""The label vocabulary of a classification task, learned from the training rows."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ..errors import DataError


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
